// Listener on a real loop and reactor: port 0, accepting a backlog in bounded batches on an
// edge-triggered registration, turning clients away when the process is out of descriptors,
// and closing.

#include "proxy/server/listener.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "loop/loop.h"
#include "loop/reactor.h"
#include "loop/timer.h"

namespace brokerproxy::proxy {
namespace {

class ListenerTest : public ::testing::Test {
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
    listener_.reset();
    for (int fd : accepted_) close(fd);
    for (int fd : clients_) close(fd);
    reactor_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
  }
  // Listens on 127.0.0.1:0; accepted fds are kept in accepted_ (and `on_accept` runs).
  void Listen(std::function<void()> on_accept = nullptr) {
    auto l = Listener::Create(
        reactor_.get(), HostPort{"127.0.0.1", 0}, 0,
        [this, on_accept](int fd, const sockaddr_storage&) {
          accepted_.push_back(fd);
          if (on_accept) on_accept();
        },
        [this] { ++overloads_; }, "ERR busy\n");
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    listener_ = std::move(l).value();
    ASSERT_GT(listener_->port(), 0);
  }
  // A blocking connect: it returns once the connection waits in the listener's backlog.
  int Connect() {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(listener_->port()));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      int err = errno;
      close(fd);
      errno = err;
      return -1;
    }
    return fd;
  }
  // Runs loop turns until `done`, for at most 5 s.
  template <typename F>
  void RunUntil(F done) {
    auto t = loop::Timer::Create(*loop_);
    ASSERT_TRUE(t.ok());
    bool expired = false;
    (*t)->Start(5000, [&] { expired = true; });
    while (!done() && !expired) loop_->Run(UV_RUN_ONCE);
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<loop::Reactor> reactor_;
  std::unique_ptr<Listener> listener_;
  std::vector<int> accepted_;
  std::vector<int> clients_;
  int overloads_ = 0;
};

TEST_F(ListenerTest, PortZeroIsReadBack) {
  Listen();
  EXPECT_EQ(listener_->address(), "127.0.0.1:" + std::to_string(listener_->port()));
  int fd = Connect();
  ASSERT_GE(fd, 0);
  clients_.push_back(fd);
  RunUntil([&] { return accepted_.size() == 1; });
  EXPECT_EQ(accepted_.size(), 1u);
}

// One edge stands for the whole backlog: the listener accepts a batch, lets the rest of the
// loop run (a timer due meanwhile fires before the backlog is through) and comes back for the
// rest without a new edge.
TEST_F(ListenerTest, BacklogIsAcceptedInBatchesFromOneEdge) {
  constexpr size_t kClients = 3 * Listener::kAcceptBatch + 5;
  auto timer = loop::Timer::Create(*loop_);
  ASSERT_TRUE(timer.ok());
  size_t accepted_when_timer_fired = 0;
  bool timer_started = false;
  Listen([&] {
    if (timer_started) return;
    timer_started = true;
    (*timer)->Start(0, [&] { accepted_when_timer_fired = accepted_.size(); });
  });
  for (size_t i = 0; i < kClients; ++i) {
    int fd = Connect();
    ASSERT_GE(fd, 0) << "connect " << i << ": " << errno;
    clients_.push_back(fd);
  }
  RunUntil([&] { return accepted_.size() == kClients && accepted_when_timer_fired > 0; });
  EXPECT_EQ(accepted_.size(), kClients) << "all accepted, without new connections to wake it";
  EXPECT_GT(accepted_when_timer_fired, 0u);
  EXPECT_LE(accepted_when_timer_fired, 2u * Listener::kAcceptBatch)
      << "a due timer waited for more than a batch per turn";
  for (int fd : accepted_) {
    EXPECT_NE(fcntl(fd, F_GETFL) & O_NONBLOCK, 0) << "accepted non-blocking";
    EXPECT_NE(fcntl(fd, F_GETFD) & FD_CLOEXEC, 0) << "accepted close-on-exec";
  }
}

// Out of descriptors (EMFILE): the spare descriptor makes room to accept each waiting client,
// tell it "ERR busy" and close it, rather than leave it hanging in the backlog; once
// descriptors are back, accepting resumes.
TEST_F(ListenerTest, OutOfDescriptorsClientsAreToldBusy) {
  Listen();
  constexpr int kClients = 5;
  for (int i = 0; i < kClients; ++i) {
    int fd = Connect();
    ASSERT_GE(fd, 0);
    clients_.push_back(fd);
  }
  // Room for exactly one accepted descriptor.
  int next_free = dup(0);
  ASSERT_GE(next_free, 0);
  close(next_free);
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &saved), 0);
  rlimit low = saved;
  low.rlim_cur = static_cast<rlim_t>(next_free) + 1;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  RunUntil([&] { return accepted_.size() + overloads_ >= static_cast<size_t>(kClients); });
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &saved), 0);
  EXPECT_EQ(accepted_.size(), 1u);
  EXPECT_EQ(overloads_, kClients - 1);
  int busy = 0;
  for (int fd : clients_) {  // the reply was sent before the refusal was counted
    char buf[32] = {};
    ssize_t n = recv(fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);
    if (n > 0 && std::string(buf, n) == "ERR busy\n") ++busy;
  }
  EXPECT_EQ(busy, kClients - 1);
  // Descriptors are back: the next client is accepted.
  int fd = Connect();
  ASSERT_GE(fd, 0);
  clients_.push_back(fd);
  RunUntil([&] { return accepted_.size() == 2; });
  EXPECT_EQ(accepted_.size(), 2u);
}

TEST_F(ListenerTest, DestroyingItClosesThePortAndLeavesTheReactor) {
  Listen();
  int port = listener_->port();
  EXPECT_EQ(reactor_->size(), 1u);
  listener_.reset();
  EXPECT_EQ(reactor_->size(), 0u);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_NE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  EXPECT_EQ(errno, ECONNREFUSED);
  close(fd);
}

}  // namespace
}  // namespace brokerproxy::proxy
