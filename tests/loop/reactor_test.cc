#include "loop/reactor.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "loop/poll.h"
#include "loop/timer.h"

namespace brokerproxy::loop {
namespace {

class ReactorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    auto r = Reactor::Create(*loop_);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(r).value();
  }
  void TearDown() override {
    busy_handles_.clear();
    for (int p : busy_peers_) close(p);
    reactor_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
  }
  // Runs the loop for about `ms` (a few iterations at least).
  void Spin(int ms = 50) {
    auto t = Timer::Create(*loop_);
    bool done = false;
    (*t)->Start(ms, [&] { done = true; });
    while (!done) loop_->Run(UV_RUN_ONCE);
  }
  // A non-blocking socketpair: sv[0] for the reactor, sv[1] for the test.
  void Pair(int sv[2]) {
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
  }

  // `n` always-ready watches: each callback counts itself in busy_ and Yield()s. On the first
  // watch's third turn (all are cycling by then) `kick` runs once, from inside the busy work,
  // after start_ took the count.
  void AddBusy(int n, std::function<void()> kick) {
    for (int i = 0; i < n; ++i) {
      int sv[2];
      Pair(sv);
      bool first = i == 0;
      auto h = reactor_->Add(sv[0], [this, n, first, kick](IoWatch* w) {
        ++busy_;
        if (first && start_ < 0 && busy_ > 2 * n) {
          start_ = busy_;
          kick();
        }
        w->Yield();
      });
      ASSERT_TRUE(h.ok());
      busy_handles_.push_back(std::move(h).value());
      busy_peers_.push_back(sv[1]);
    }
  }

  std::unique_ptr<Loop> loop_;
  std::unique_ptr<Reactor> reactor_;
  int busy_ = 0;
  int start_ = -1;
  std::vector<IoHandle> busy_handles_;
  std::vector<int> busy_peers_;
};

TEST_F(ReactorTest, EdgeTriggeredReadinessIsKeptInUserSpace) {
  int sv[2];
  Pair(sv);
  int calls = 0;
  std::string got;
  auto h = reactor_->Add(sv[0], [&](IoWatch* w) {
    ++calls;
    char buf[4];
    // Read only part of what is there: the watch stays readable, no new edge is needed.
    if (w->readable()) {
      ssize_t n = read(w->fd(), buf, sizeof(buf));
      if (n > 0) got.append(buf, n);
      if (n < 0 && errno == EAGAIN) w->ClearReadable();
    }
  });
  ASSERT_TRUE(h.ok());
  Spin();
  EXPECT_EQ(calls, 1) << "registered writable: one first callback";
  EXPECT_TRUE((*h)->writable());
  ASSERT_EQ(write(sv[1], "0123456789", 10), 10);
  Spin();
  EXPECT_EQ(calls, 2) << "one edge, one callback";
  EXPECT_EQ(got, "0123");
  EXPECT_TRUE((*h)->readable());
  (*h)->Yield();  // come back without an edge
  Spin();
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(got, "01234567");
  close(sv[1]);
  Spin();
  EXPECT_TRUE((*h)->hangup());
}

TEST_F(ReactorTest, HandleMayBeDroppedInsideItsOwnCallback) {
  int sv[2];
  Pair(sv);
  auto h = reactor_->Add(sv[0], nullptr);
  ASSERT_TRUE(h.ok());
  IoHandle handle = std::move(h).value();
  int calls = 0;
  handle->SetCallback([&](IoWatch*) {
    ++calls;
    handle.reset();  // closes the fd while its callback runs
  });
  Spin();
  EXPECT_EQ(calls, 1);
  EXPECT_FALSE(handle);
  char c;
  EXPECT_EQ(read(sv[1], &c, 1), 0) << "the reactor's end was closed";
  close(sv[1]);
  EXPECT_EQ(reactor_->size(), 0u);
}

TEST_F(ReactorTest, ReleaseHandsTheFdBackOpenAndSilent) {
  int sv[2];
  Pair(sv);
  int calls = 0;
  auto h = reactor_->Add(sv[0], [&](IoWatch*) { ++calls; });
  ASSERT_TRUE(h.ok());
  Spin();
  int fd = (*h)->fd();
  EXPECT_EQ(h->Release(), fd);
  int before = calls;
  ASSERT_EQ(write(sv[1], "x", 1), 1);
  Spin();
  EXPECT_EQ(calls, before) << "no events after release";
  char c;
  EXPECT_EQ(read(fd, &c, 1), 1) << "still open";
  close(fd);
  close(sv[1]);
}

TEST_F(ReactorTest, ClearingTheCallbackFromInsideItSticks) {
  int sv[2];
  Pair(sv);
  int calls = 0;
  auto h = reactor_->Add(sv[0], [&](IoWatch* w) {
    ++calls;
    w->ClearReadable();
    w->SetCallback(nullptr);  // e.g. a dialer handing its socket on
  });
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(write(sv[1], "a", 1), 1);
  Spin();
  ASSERT_EQ(write(sv[1], "b", 1), 1);  // a new edge, for nobody
  Spin();
  EXPECT_EQ(calls, 1);
  close(sv[1]);
}

// epoll forgets an fd only when its open file is closed: a dup registered as shared must leave
// the set when its handle closes, or the next event on the other descriptor would reach a
// freed watch (ASan reports that as a use after free).
TEST_F(ReactorTest, ClosingASharedDupLeavesTheSet) {
  int sv[2];
  Pair(sv);
  int calls = 0;
  {
    auto h = reactor_->Add(
        fcntl(sv[0], F_DUPFD_CLOEXEC, 3), [&](IoWatch*) { ++calls; }, Reactor::Sharing::kShared);
    ASSERT_TRUE(h.ok());
    Spin();  // the first (writable) edge
  }
  Spin();  // the watch is freed
  int before = calls;
  ASSERT_EQ(write(sv[1], "x", 1), 1);  // readable on the open file the dup shared
  Spin();
  EXPECT_EQ(calls, before);
  close(sv[0]);
  close(sv[1]);
}

// A dup made behind the reactor's back (a library, a fork, SCM_RIGHTS) keeps the epoll entry
// after the handle closed its fd: its events must find neither the freed watch (ASan would
// report a use after free) nor the watch that reuses its slot.
TEST_F(ReactorTest, StaleEventsThroughADupReachNoWatch) {
  int sv[2];
  Pair(sv);
  int dup = fcntl(sv[0], F_DUPFD_CLOEXEC, 3);
  ASSERT_GE(dup, 0);
  int calls = 0;
  {
    auto h = reactor_->Add(sv[0], [&](IoWatch*) { ++calls; });
    ASSERT_TRUE(h.ok());
    Spin();  // the first (writable) edge
    ASSERT_EQ(calls, 1);
  }
  Spin();  // the watch is freed; the dup keeps its epoll entry
  ASSERT_EQ(write(sv[1], "x", 1), 1);
  Spin();
  EXPECT_EQ(calls, 1);

  int other[2];
  Pair(other);
  int other_calls = 0;
  auto h2 = reactor_->Add(other[0], [&](IoWatch* w) {
    ++other_calls;
    w->ClearWritable();
  });
  ASSERT_TRUE(h2.ok());
  Spin();
  ASSERT_EQ(other_calls, 1) << "its own first edge";
  ASSERT_EQ(write(sv[1], "y", 1), 1);  // a new edge on the old entry
  Spin();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(other_calls, 1) << "the old entry's event reached the watch in its slot";
  close(dup);
  close(sv[1]);
  close(other[1]);
}

// Always-ready watches (they Yield() every time) cannot hold back a timer for more than a
// budget's worth of callbacks per dispatch, and a watch that becomes ready meanwhile is served
// before any of them gets a second turn.
TEST_F(ReactorTest, DispatchBudgetLetsTimersAndLateSocketsIn) {
  constexpr int kBusy = 4 * Reactor::kDispatchBudget;
  auto timer = Timer::Create(*loop_);
  ASSERT_TRUE(timer.ok());
  int timer_at = -1;
  int late_at = -1;
  int late[2];
  Pair(late);
  auto late_handle = reactor_->Add(late[0], [&](IoWatch* w) {
    w->ClearWritable();
    if (!w->readable()) return;
    char c;
    while (read(w->fd(), &c, 1) == 1) {
    }
    w->ClearReadable();
    if (late_at < 0 && start_ >= 0) late_at = busy_;
  });
  ASSERT_TRUE(late_handle.ok());
  // From inside the busy work: a timer is due now and the late socket becomes readable.
  AddBusy(kBusy, [&] {
    (*timer)->Start(0, [&] { timer_at = busy_; });
    ASSERT_EQ(write(late[1], "z", 1), 1);
  });
  for (int turns = 0; (timer_at < 0 || late_at < 0) && turns < 100000; ++turns) {
    loop_->Run(UV_RUN_ONCE);
  }
  ASSERT_GE(start_, 0);
  ASSERT_GE(timer_at, 0);
  ASSERT_GE(late_at, 0);
  // At most the rest of this turn's budget and one dispatch's.
  EXPECT_LE(timer_at - start_, 2 * Reactor::kDispatchBudget);
  // In line behind each busy watch at most once (and one budget served just before its edge
  // was collected).
  EXPECT_LE(late_at - start_, kBusy + Reactor::kDispatchBudget);
  busy_handles_.clear();
  late_handle->reset();
  close(late[1]);
}

TEST_F(ReactorTest, ManySocketsOneEpollSet) {
  constexpr int kN = 300;  // more than one epoll_wait batch
  std::vector<IoHandle> handles;
  std::vector<int> peers;
  int ready = 0;
  for (int i = 0; i < kN; ++i) {
    int sv[2];
    Pair(sv);
    auto h = reactor_->Add(sv[0], [&](IoWatch* w) {
      char c;
      while (read(w->fd(), &c, 1) == 1) ++ready;
      w->ClearReadable();
    });
    ASSERT_TRUE(h.ok());
    handles.push_back(std::move(h).value());
    peers.push_back(sv[1]);
  }
  for (int p : peers) ASSERT_EQ(write(p, "y", 1), 1);
  Spin(100);
  EXPECT_EQ(ready, kN);
  handles.clear();
  for (int p : peers) close(p);
}

// Under Reactor::Run() a turn that only moves bytes is one epoll_wait: libuv runs no iteration
// (its prepare phase, which every uv_run iteration passes, stays silent). Afterwards Loop::Run()
// dispatches the reactor's events again.
TEST_F(ReactorTest, RunMovesBytesWithoutAnIterationOfLibuv) {
  constexpr int kRounds = 1000;
  uv_prepare_t prepare{};
  int iterations = 0;
  prepare.data = &iterations;
  ASSERT_EQ(uv_prepare_init(loop_->get(), &prepare), 0);
  ASSERT_EQ(uv_prepare_start(&prepare, [](uv_prepare_t* p) { ++*static_cast<int*>(p->data); }), 0);
  int sv[2];
  Pair(sv);
  // Each end sends back what it reads until kRounds bytes went across.
  int moved = 0;
  auto bounce = [&](IoWatch* w) {
    w->ClearWritable();
    char c;
    while (read(w->fd(), &c, 1) == 1) {
      if (++moved == kRounds) {
        loop_->Stop();
        return;
      }
      ASSERT_EQ(write(w->fd(), "p", 1), 1);
    }
    w->ClearReadable();
  };
  auto a = reactor_->Add(sv[0], bounce);
  auto b = reactor_->Add(sv[1], bounce);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(write(sv[0], "p", 1), 1);
  int before = iterations;
  reactor_->Run();
  EXPECT_EQ(moved, kRounds);
  EXPECT_LT(iterations - before, 10) << "libuv ran an iteration per turn";
  // Loop::Run() drives the reactor as before.
  ASSERT_EQ(write(sv[0], "p", 1), 1);
  moved = 0;
  Spin();
  EXPECT_GT(moved, 0);
  a->reset();
  b->reset();
  uv_close(reinterpret_cast<uv_handle_t*>(&prepare), nullptr);
}

// A libuv watcher started from a reactor callback is not in libuv's epoll set until libuv's next
// iteration; Reactor::Run() must not block before that iteration ran.
TEST_F(ReactorTest, RunRegistersLibuvWatchersStartedFromReactorCallbacks) {
  int sv[2];
  Pair(sv);
  int pipefd[2];
  ASSERT_EQ(pipe2(pipefd, O_NONBLOCK | O_CLOEXEC), 0);
  ASSERT_EQ(write(pipefd[1], "x", 1), 1);  // readable from the start
  auto watchdog = Timer::Create(*loop_);
  ASSERT_TRUE(watchdog.ok());
  bool watchdog_fired = false;
  (*watchdog)->Start(5000, [&] {
    watchdog_fired = true;
    loop_->Stop();
  });
  HandlePtr<Poll> poll;
  bool polled = false;
  auto h = reactor_->Add(sv[0], [&](IoWatch* w) {
    w->ClearWritable();
    if (!w->readable() || poll) return;
    auto p = Poll::Create(*loop_, pipefd[0], FdOwnership::kBorrowed);
    ASSERT_TRUE(p.ok());
    poll = std::move(p).value();
    poll->Start(UV_READABLE, [&](int, int) {
      polled = true;
      poll->Stop();
      loop_->Stop();
    });
  });
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(write(sv[1], "go", 2), 2);
  reactor_->Run();
  EXPECT_TRUE(polled);
  EXPECT_FALSE(watchdog_fired) << "the new watcher waited for the next timer";
  poll.reset();
  watchdog->reset();
  h->reset();
  close(sv[1]);
  close(pipefd[0]);
  close(pipefd[1]);
}

// Under Reactor::Run() busy sockets that always yield still let a due timer, deferred work and
// libuv's own fds in within a few budgets; Run() returns once nothing is left.
TEST_F(ReactorTest, RunKeepsTimersAndLibuvHandlesGoingBesideBusySockets) {
  constexpr int kBusy = 4 * Reactor::kDispatchBudget;
  auto timer = Timer::Create(*loop_);
  ASSERT_TRUE(timer.ok());
  int pipefd[2];
  ASSERT_EQ(pipe2(pipefd, O_NONBLOCK | O_CLOEXEC), 0);
  auto poll = Poll::Create(*loop_, pipefd[0], FdOwnership::kBorrowed);
  ASSERT_TRUE(poll.ok());
  int timer_at = -1;
  int deferred_at = -1;
  int polled_at = -1;
  auto maybe_done = [&] {
    if (timer_at >= 0 && deferred_at >= 0 && polled_at >= 0) busy_handles_.clear();  // Run ends
  };
  (*poll)->Start(UV_READABLE, [&](int, int) {
    char c;
    while (read(pipefd[0], &c, 1) == 1) {
    }
    if (polled_at < 0) polled_at = busy_;
    (*poll)->Stop();
    maybe_done();
  });
  (*poll)->Stop();  // started once the busy work is under way
  AddBusy(kBusy, [&] {
    (*timer)->Start(0, [&] {
      timer_at = busy_;
      maybe_done();
    });
    loop_->Defer([&] {
      deferred_at = busy_;
      maybe_done();
    });
    (*poll)->SetEvents(UV_READABLE);
    ASSERT_EQ(write(pipefd[1], "z", 1), 1);
  });
  reactor_->Run();  // returns when the handles are gone and libuv has nothing active
  ASSERT_GE(start_, 0);
  EXPECT_LE(timer_at - start_, 3 * Reactor::kDispatchBudget);
  EXPECT_LE(deferred_at - start_, 3 * Reactor::kDispatchBudget);
  EXPECT_LE(polled_at - start_, 3 * Reactor::kDispatchBudget);
  EXPECT_TRUE(busy_handles_.empty());
  poll->reset();
  timer->reset();
  close(pipefd[0]);
  close(pipefd[1]);
}

}  // namespace
}  // namespace brokerproxy::loop
