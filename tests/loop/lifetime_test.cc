// loop::Lifetime and DeleteSoon: callbacks of a destroyed object do not run, and an object may
// be given up from inside its own callback (the suite runs under ASan, which reports any use of
// freed memory).

#include "loop/lifetime.h"

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>

#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/timer.h"

namespace brokerproxy::loop {
namespace {

class LifetimeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = Loop::Create();
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    loop_ = std::move(l).value();
  }
  void TearDown() override {
    loop_->Run(UV_RUN_NOWAIT);
    Status s = loop_->Close();
    EXPECT_TRUE(s.ok()) << s.ToString();
  }

  std::unique_ptr<Loop> loop_;
};

// Counts what happens to it in counters that outlive it.
struct Counters {
  int ran = 0;
  int destroyed = 0;
};

class Worker {
 public:
  Worker(Loop* loop, Counters* counters) : loop_(loop), counters_(counters) {}
  ~Worker() { ++counters_->destroyed; }

  // Queues a step that touches this object.
  void Later() {
    loop_->Defer(lifetime_.Guard([this] { ++counters_->ran; }));
  }
  // Calls `done`, which may give this object up, then carries on with its members.
  void Finish() {
    Lifetime::Weak alive = lifetime_.weak();
    done_();
    ++steps_;  // still our memory: DeleteSoon keeps it until this stack unwound
    if (alive.alive()) return;
    Later();  // queued for a Lifetime that ended: never runs
  }
  void Abandon() { lifetime_.End(); }

  std::function<void()> done_;
  int steps_ = 0;

 private:
  Loop* loop_;
  Counters* counters_;
  Lifetime lifetime_;
};

TEST_F(LifetimeTest, GuardedCallbackRunsWhileTheObjectLives) {
  Counters counters;
  Worker worker(loop_.get(), &counters);
  worker.Later();
  loop_->Run();
  EXPECT_EQ(counters.ran, 1);
}

TEST_F(LifetimeTest, CallbackQueuedBeforeTheObjectDiedDoesNotRun) {
  Counters counters;
  auto worker = std::make_unique<Worker>(loop_.get(), &counters);
  worker->Later();
  worker->Later();
  worker.reset();
  loop_->Run();
  EXPECT_EQ(counters.destroyed, 1);
  EXPECT_EQ(counters.ran, 0);
}

TEST_F(LifetimeTest, EndStopsCallbacksAtOnce) {
  Counters counters;
  Worker worker(loop_.get(), &counters);
  worker.Later();
  worker.Abandon();
  worker.Later();
  loop_->Run();
  EXPECT_EQ(counters.ran, 0);
}

TEST_F(LifetimeTest, GuardForwardsArguments) {
  Lifetime lifetime;
  std::string got;
  std::function<void(std::string, int)> cb =
      lifetime.Guard([&got](std::string s, int n) { got = s + std::to_string(n); });
  cb("x", 1);
  EXPECT_EQ(got, "x1");
  lifetime.End();
  EXPECT_TRUE(lifetime.ended());
  cb("y", 2);
  EXPECT_EQ(got, "x1");
}

TEST_F(LifetimeTest, WeakSeesTheEnd) {
  Lifetime::Weak never;
  EXPECT_FALSE(never.alive());
  Lifetime::Weak weak;
  {
    Lifetime lifetime;
    weak = lifetime.weak();
    EXPECT_TRUE(weak.alive());
  }
  EXPECT_FALSE(weak.alive());
}

// The owner gives the worker up from inside the worker's own callback: the worker leaves the
// owner at once, carries on with its members safely, what it queues meanwhile never runs, and
// its memory goes on the next loop turn.
TEST_F(LifetimeTest, DestroyFromInsideItsOwnCallbackIsSafe) {
  Counters counters;
  std::unique_ptr<Worker> owned = std::make_unique<Worker>(loop_.get(), &counters);
  Worker* worker = owned.get();
  worker->done_ = [&] {
    owned->Abandon();
    DeleteSoon(*loop_, std::move(owned));
  };
  // Called from a timer, as a real callback would be.
  auto timer = Timer::Create(*loop_);
  ASSERT_TRUE(timer.ok());
  (*timer)->Start(1, [worker] { worker->Finish(); });
  loop_->Run();  // until nothing is left: the timer, then the deferred deletion
  EXPECT_EQ(owned, nullptr);
  EXPECT_EQ(counters.destroyed, 1);
  EXPECT_EQ(counters.ran, 0);
  timer->reset();
}

TEST_F(LifetimeTest, DeleteSoonOfNothingIsHarmless) {
  DeleteSoon(*loop_, std::unique_ptr<Worker>());
  loop_->Run();
}

}  // namespace
}  // namespace brokerproxy::loop
