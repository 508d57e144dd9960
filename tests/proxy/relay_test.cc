// Relay on real sockets driven by a real loop: bytes both ways, half-close, errors, backpressure,
// and destruction from inside the done callback.

#include "proxy/transport/relay.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <string>
#include <thread>

#include "loop/loop.h"
#include "loop/timer.h"

namespace brokerproxy::proxy {
namespace {

class RelayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    auto r = loop::Reactor::Create(*loop_);
    ASSERT_TRUE(r.ok());
    reactor_ = std::move(r).value();
  }
  void TearDown() override {
    relay_.reset();
    reactor_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
  }
  // A socketpair: returns the test's end, puts the relay's end (registered in the reactor) in
  // `side`.
  int Pair(Relay::Side* side) {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    auto p = reactor_->Add(sv[1], nullptr);
    EXPECT_TRUE(p.ok());
    *side = Relay::Side(std::move(p).value());
    int flags = fcntl(sv[0], F_GETFL);
    fcntl(sv[0], F_SETFL, flags & ~O_NONBLOCK);
    return sv[0];
  }
  void RunUntil(const bool& flag, int timeout_ms = 10000) {
    auto t = loop::Timer::Create(*loop_);
    bool expired = false;
    (*t)->Start(timeout_ms, [&] { expired = true; });
    while (!flag && !expired) loop_->Run(UV_RUN_ONCE);
    EXPECT_FALSE(expired) << "timed out";
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<loop::Reactor> reactor_;
  PipePool pool_{1 << 20, 4};
  std::unique_ptr<Relay> relay_;
};

// Slow readers each keep a pipe full: past the pool's budget, pipes are small.
TEST(PipePoolTest, LargePipesOnlyWithinTheBudget) {
  PipePool pool(1 << 20, 8, size_t{3} << 20);
  std::vector<PipePool::Pipe> pipes;
  for (int i = 0; i < 6; ++i) {
    auto p = pool.Acquire();
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    pipes.push_back(*p);
  }
  if (pipes[0].capacity < (1 << 20)) {
    for (auto& p : pipes) pool.Release(p, true);
    GTEST_SKIP() << "the kernel refuses 1 MiB pipes here";
  }
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(pipes[i].capacity, i < 3 ? (1 << 20) : PipePool::kSmallPipe) << i;
    EXPECT_EQ(::fcntl(pipes[i].write_fd, F_GETPIPE_SZ), pipes[i].capacity) << i;
  }
  EXPECT_EQ(pool.in_use_bytes(), (size_t{3} << 20) + 3 * PipePool::kSmallPipe);
  // A large one back, and out again: large, as the budget allows.
  pool.Release(pipes[0], true);
  auto again = pool.Acquire();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->capacity, 1 << 20);
  // The budget spent: an idle pipe is handed out small.
  pool.Release(pipes[3], true);
  auto small = pool.Acquire();
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->capacity, PipePool::kSmallPipe);
  pool.Release(*small, true);
  pool.Release(pipes[1], true);  // large, idle: 2 MiB + 3 small in use
  auto big = pool.Acquire();     // takes the large idle pipe back: within the budget again
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->capacity, 1 << 20);
  auto extra = pool.Acquire();
  ASSERT_TRUE(extra.ok());
  EXPECT_EQ(extra->capacity, PipePool::kSmallPipe);
  for (const auto& p : {*again, *big, *extra, pipes[2], pipes[4], pipes[5]}) pool.Release(p, true);
  EXPECT_EQ(pool.in_use(), 0u);
  EXPECT_EQ(pool.in_use_bytes(), 0u);
}

TEST_F(RelayTest, MovesBytesBothWaysWithPrefixesAndHalfClose) {
  Relay::Side a, b;
  int ta = Pair(&a), tb = Pair(&b);
  bool done = false;
  Status result = Status::Internal("not called");
  relay_ = std::make_unique<Relay>(&pool_, std::move(a), std::move(b), "a", "b",
                                   "to-a:", "to-b:", [&](Status s) {
                                     result = s;
                                     done = true;
                                   });
  relay_->Start();
  // Writers in threads: the loop must keep running meanwhile.
  std::string big(3 << 20, 'q');
  std::thread wa([&] {
    EXPECT_EQ(write(ta, big.data(), big.size()), static_cast<ssize_t>(big.size()));
    shutdown(ta, SHUT_WR);
  });
  std::string got_b, got_a;
  std::thread rb([&] {
    char buf[65536];
    ssize_t n;
    while ((n = read(tb, buf, sizeof(buf))) > 0) got_b.append(buf, n);
  });
  std::thread wb([&] {
    EXPECT_EQ(write(tb, "reply", 5), 5);
    shutdown(tb, SHUT_WR);
  });
  std::thread ra([&] {
    char buf[65536];
    ssize_t n;
    while ((n = read(ta, buf, sizeof(buf))) > 0) got_a.append(buf, n);
  });
  RunUntil(done);
  wa.join();
  wb.join();
  rb.join();
  ra.join();
  EXPECT_TRUE(result.ok()) << result.ToString();
  EXPECT_EQ(got_b, "to-b:" + big);
  EXPECT_EQ(got_a, "to-a:reply");
  EXPECT_EQ(relay_->counters().a_to_b, big.size());
  EXPECT_EQ(relay_->counters().b_to_a, 5u);
  EXPECT_EQ(pool_.in_use(), 0u) << "an idle relay holds no pipe";
  close(ta);
  close(tb);
}

TEST_F(RelayTest, PeerResetEndsItAndItMayBeDestroyedInsideDone) {
  Relay::Side a, b;
  int ta = Pair(&a), tb = Pair(&b);
  bool done = false;
  Status result;
  relay_ = std::make_unique<Relay>(&pool_, std::move(a), std::move(b), "client", "backend", "", "",
                                   [&](Status s) {
                                     result = s;
                                     relay_.reset();  // destroyed from its own callback
                                     done = true;
                                   });
  relay_->Start();
  close(tb);  // the backend vanishes
  ASSERT_EQ(write(ta, "x", 1), 1);
  RunUntil(done);
  // Either an error writing to the backend or a clean EOF from it; never a hang.
  EXPECT_EQ(relay_, nullptr);
  char c;
  EXPECT_LE(read(ta, &c, 1), 0) << "the client's end is closed too";
  close(ta);
  (void)result;
}

TEST_F(RelayTest, BackpressureBoundsWhatItHolds) {
  Relay::Side a, b;
  int ta = Pair(&a), tb = Pair(&b);
  bool done = false;
  relay_ = std::make_unique<Relay>(&pool_, std::move(a), std::move(b), "a", "b", "", "",
                                   [&](Status) { done = true; });
  relay_->Start();
  // b never reads: a's writer fills the socket buffers, the relay's pipe, then blocks.
  std::atomic<uint64_t> written{0};
  std::thread writer([&] {
    std::string chunk(65536, 'w');
    for (;;) {
      ssize_t n = write(ta, chunk.data(), chunk.size());
      if (n <= 0) return;
      written += n;
    }
  });
  auto t = loop::Timer::Create(*loop_);
  bool waited = false;
  (*t)->Start(300, [&] { waited = true; });
  RunUntil(waited);
  EXPECT_LE(pool_.in_use(), 1u);
  uint64_t moved = relay_->counters().a_to_b;
  // Bounded by the peers' socket buffers plus one pipe, whatever the writer wants.
  EXPECT_LT(moved, 8u << 20);
  shutdown(ta, SHUT_RDWR);
  shutdown(tb, SHUT_RDWR);
  writer.join();
  RunUntil(done);
  close(ta);
  close(tb);
}

TEST_F(RelayTest, CopiesWhenOneSideIsAPipe) {
  // stdio-like side: read from a pipe, write to another pipe.
  int in[2], out[2];
  ASSERT_EQ(pipe2(in, O_CLOEXEC | O_NONBLOCK), 0);
  ASSERT_EQ(pipe2(out, O_CLOEXEC | O_NONBLOCK), 0);
  fcntl(in[1], F_SETFL, 0);
  fcntl(out[0], F_SETFL, 0);
  Relay::Side a(std::move(reactor_->Add(in[0], nullptr).value()),
                std::move(reactor_->Add(out[1], nullptr).value()));
  Relay::Side b;
  int tb = Pair(&b);
  bool done = false;
  Status result;
  relay_ = std::make_unique<Relay>(&pool_, std::move(a), std::move(b), "stdio", "proxy", "", "",
                                   [&](Status s) {
                                     result = s;
                                     done = true;
                                   });
  relay_->Start();
  ASSERT_EQ(write(in[1], "ping", 4), 4);
  close(in[1]);
  std::string at_b;
  std::thread peer([&] {
    char buf[64];
    ssize_t n;
    while ((n = read(tb, buf, sizeof(buf))) > 0) at_b.append(buf, n);
    EXPECT_EQ(write(tb, "pong", 4), 4);
    shutdown(tb, SHUT_WR);
  });
  RunUntil(done);
  peer.join();
  EXPECT_TRUE(result.ok()) << result.ToString();
  EXPECT_EQ(at_b, "ping");
  char buf[16];
  ssize_t n = read(out[0], buf, sizeof(buf));
  EXPECT_EQ(std::string(buf, n > 0 ? n : 0), "pong");
  EXPECT_EQ(read(out[0], buf, sizeof(buf)), 0) << "stdout closed at the end";
  close(out[0]);
  close(tb);
}

}  // namespace
}  // namespace brokerproxy::proxy
