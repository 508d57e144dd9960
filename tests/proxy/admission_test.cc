// The server's handshake step (Admission) as a plain session runs it, in process: a real Proxy
// on port 0, a real registry, backends on port 0, clients on real sockets. Each refusal gets its
// reply and counter; an admitted client gets "OK" with the bytes it pipelined behind the
// preamble delivered to the backend in order.

#include "proxy/server/admission.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
#include <functional>
#include <string>

#include "loop/loop.h"
#include "proxy/server/proxy.h"
#include "registry/registry.h"
#include "support/tcp_segments.h"

namespace brokerproxy::proxy {
namespace {

// A listening TCP socket on 127.0.0.1, port 0. `backlog` as for listen().
int Listen(int* port, int backlog = 16) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::listen(fd, backlog) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    return -1;
  }
  *port = ntohs(a.sin_port);
  return fd;
}

// A non-blocking connection to 127.0.0.1:`port` (in progress).
int ConnectTo(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  return fd;
}

class AdmissionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    registry_ = std::make_unique<registry::Registry>(registry::Registry::Options{});
    backend_ = Listen(&backend_port_);
    ASSERT_GE(backend_, 0);
    secret_ = Save("job1", backend_port_);
  }
  void TearDown() override {
    if (proxy_) proxy_->Stop();
    proxy_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
    ::close(backend_);
  }

  // Saves job `id` with its backend on 127.0.0.1:`port`; returns its secret.
  std::string Save(const std::string& id, int port) {
    registry::SaveRequest req;
    req.id = id;
    req.host = "127.0.0.1";
    req.port = port;
    std::optional<registry::Job> replaced;
    auto job = registry_->Save(req, ::getuid(), ::time(nullptr), &replaced);
    EXPECT_TRUE(job.ok()) << job.status().ToString();
    return job.ok() ? job->secret : std::string();
  }

  void StartProxy(ProxyOptions o) {
    o.listen = {{"127.0.0.1", 0}};
    o.plain_allow = {*Cidr::Parse("127.0.0.0/8")};
    proxy_ = std::make_unique<Proxy>(loop_.get(), registry_.get(), std::move(o));
    Status s = proxy_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::string addr = proxy_->addresses().at(0);
    port_ = std::stoi(addr.substr(addr.rfind(':') + 1));
  }

  // Runs the loop until `done` holds, for at most 10 s.
  bool SpinUntil(const std::function<bool()>& done) {
    for (int i = 0; i < 1000 && !done(); ++i) {
      loop_->Run(UV_RUN_NOWAIT);
      ::poll(nullptr, 0, 10);
    }
    return done();
  }

  // Appends what `fd` has to `*got`; true once the peer closed.
  static bool Drain(int fd, std::string* got) {
    char buf[4096];
    for (;;) {
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n > 0) {
        got->append(buf, static_cast<size_t>(n));
        continue;
      }
      return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
    }
  }

  // Sends `data` as a client and returns what the proxy answered up to its close (or the
  // first line, with `line_only`).
  std::string Exchange(const std::string& data, bool line_only = false, int* keep = nullptr) {
    int fd = ConnectTo(port_);
    pollfd p{fd, POLLOUT, 0};
    ::poll(&p, 1, 5000);
    EXPECT_EQ(::send(fd, data.data(), data.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(data.size()));
    std::string got;
    bool closed = false;
    SpinUntil([&] {
      closed = Drain(fd, &got);
      return closed || (line_only && got.find('\n') != std::string::npos);
    });
    if (keep) {
      *keep = fd;
    } else {
      ::close(fd);
    }
    return got;
  }

  // Accepts the proxy's connection to the backend (non-blocking, in `*conn`; -1 if none came)
  // and returns the first `n` bytes it brings (fewer if they do not come).
  std::string AcceptAndRead(int* conn, size_t n) {
    *conn = -1;
    std::string got;
    SpinUntil([&] {
      if (*conn < 0) *conn = ::accept4(backend_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (*conn >= 0) Drain(*conn, &got);
      return got.size() >= n;
    });
    return got;
  }

  // Starts the proxy with `held_ok_ms`, sends `request` as a client of a backend that says
  // nothing, and returns how long the OK took to arrive; closes both ends after.
  std::chrono::steady_clock::duration TimeToOk(int64_t held_ok_ms, const std::string& request) {
    ProxyOptions o;
    o.held_ok_ms = held_ok_ms;
    StartProxy(o);
    auto start = std::chrono::steady_clock::now();
    int client = -1;
    std::string got = Exchange(request, /*line_only=*/true, &client);
    auto waited = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(got, "OK\n");
    int conn = ::accept4(backend_, nullptr, nullptr, SOCK_CLOEXEC);
    EXPECT_GE(conn, 0);
    ::close(client);
    ::close(conn);
    EXPECT_TRUE(SpinUntil([&] { return proxy_->stats().job("job1").active == 0; }));
    return waited;
  }

  std::string Preamble(const std::string& job, const std::string& secret) {
    return EncodePreamble(job, secret);
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<registry::Registry> registry_;
  std::unique_ptr<Proxy> proxy_;
  int port_ = 0;
  int backend_ = -1;
  int backend_port_ = 0;
  std::string secret_;
};

TEST_F(AdmissionTest, OkWithPipelinedBytesDeliveredInOrder) {
  StartProxy(ProxyOptions{});
  int client = -1;
  std::string got =
      Exchange(Preamble("job1", secret_) + "first bytes", /*line_only=*/true, &client);
  EXPECT_EQ(got, "OK\n");
  // The backend got the bytes pipelined behind the preamble, and nothing of the preamble.
  int conn = -1;
  EXPECT_EQ(AcceptAndRead(&conn, 11), "first bytes");
  ASSERT_GE(conn, 0);
  ASSERT_EQ(::send(conn, "reply", 5, 0), 5);
  std::string back;
  ASSERT_TRUE(SpinUntil([&] {
    Drain(client, &back);
    return back.size() >= 5;
  }));
  EXPECT_EQ(back, "reply");
  EXPECT_EQ(proxy_->stats().global().spliced, 1u);
  EXPECT_EQ(proxy_->stats().job("job1").connections, 1u);
  EXPECT_EQ(proxy_->stats().job("job1").active, 1u);
  ::close(client);
  ::close(conn);
  ASSERT_TRUE(SpinUntil([&] { return proxy_->stats().job("job1").active == 0; }));
}

// A loopback backend is connected within connect(): the bytes pipelined behind the preamble
// leave for it in the same loop turn as the OK, not a turn later, and count as payload.
TEST_F(AdmissionTest, PipelinedBytesLeaveWithTheOk) {
  StartProxy(ProxyOptions{});
  int client = -1;
  // Exchange() stops running the loop as soon as the OK line is there.
  std::string got = Exchange(Preamble("job1", secret_) + "early", /*line_only=*/true, &client);
  ASSERT_EQ(got, "OK\n");
  int conn = ::accept4(backend_, nullptr, nullptr, SOCK_CLOEXEC);
  ASSERT_GE(conn, 0);
  pollfd p{conn, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 2000), 1) << "the early bytes waited for another loop turn";
  char buf[16];
  ASSERT_EQ(::recv(conn, buf, sizeof(buf), MSG_DONTWAIT), 5);
  EXPECT_EQ(std::string(buf, 5), "early");
  ASSERT_EQ(::send(client, "later", 5, MSG_NOSIGNAL), 5);
  std::string rest;
  ::fcntl(conn, F_SETFL, O_NONBLOCK);
  ASSERT_TRUE(SpinUntil([&] {
    Drain(conn, &rest);
    return rest.size() >= 5;
  }));
  EXPECT_EQ(rest, "later");
  ::close(client);
  ::close(conn);
  ASSERT_TRUE(SpinUntil([&] { return proxy_->stats().job("job1").active == 0; }));
  EXPECT_EQ(proxy_->stats().job("job1").bytes_up, 10u);
}

// A client that pipelined its request waits for the answer, not for the OK: the OK leaves in
// the same segment as the backend's first bytes.
TEST_F(AdmissionTest, AHeldOkLeavesInOneSegmentWithTheBackendsFirstBytes) {
  ProxyOptions o;
  o.held_ok_ms = 60000;  // however slowly this test runs, the answer comes first
  StartProxy(o);
  int client = ConnectTo(port_);
  pollfd p{client, POLLOUT, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  std::string request = Preamble("job1", secret_) + "ping";
  ASSERT_EQ(::send(client, request.data(), request.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(request.size()));
  int conn = -1;
  EXPECT_EQ(AcceptAndRead(&conn, 4), "ping");
  ASSERT_GE(conn, 0);
  std::string got;
  Drain(client, &got);
  EXPECT_EQ(got, "") << "the OK left before the backend's answer";
  ASSERT_EQ(::send(conn, "pong", 4, 0), 4);
  ASSERT_TRUE(SpinUntil([&] {
    Drain(client, &got);
    return got.size() >= 7;
  }));
  EXPECT_EQ(got, "OK\npong");
  EXPECT_EQ(testing::DataSegmentsIn(client), 1u);
  ::close(client);
  ::close(conn);
  ASSERT_TRUE(SpinUntil([&] { return proxy_->stats().job("job1").active == 0; }));
}

// A backend that says nothing does not keep the OK from a client that pipelined bytes: it
// leaves alone after held_ok_ms, long before the kernel's own release (a retransmission
// timeout, 200 ms or more). A client that waits for the OK before it sends more (connect, past
// its 64 KiB of early bytes) is not held up by a backend waiting for those bytes.
TEST_F(AdmissionTest, AHeldOkLeavesAloneWhenTheBackendSaysNothing) {
  EXPECT_LT(TimeToOk(/*held_ok_ms=*/1, Preamble("job1", secret_) + "ping"),
            std::chrono::milliseconds(150))
      << "the OK waited for the kernel to send it, not for held_ok_ms";
}

// Without bytes behind the preamble, the client is waiting for the OK: it is not held (held,
// it would take the kernel's 200 ms or more to leave).
TEST_F(AdmissionTest, AClientThatPipelinedNothingGetsItsOkAtOnce) {
  EXPECT_LT(TimeToOk(/*held_ok_ms=*/60000, Preamble("job1", secret_)),
            std::chrono::milliseconds(150));
}

TEST_F(AdmissionTest, AWrongSecretIsDenied) {
  StartProxy(ProxyOptions{});
  EXPECT_EQ(Exchange(Preamble("job1", std::string(64, '0'))), "ERR denied\n");
  EXPECT_EQ(Exchange(Preamble("nosuchjob", secret_)), "ERR denied\n");
  EXPECT_EQ(proxy_->stats().global().denied, 2u);
  EXPECT_EQ(proxy_->stats().global().spliced, 0u);
}

TEST_F(AdmissionTest, ThrottledIsBusyButTheRightSecretStillGetsIn) {
  ProxyOptions o;
  o.throttle_failures = 2;
  StartProxy(o);
  std::string wrong = Preamble("job1", std::string(64, '0'));
  EXPECT_EQ(Exchange(wrong), "ERR denied\n");
  EXPECT_EQ(Exchange(wrong), "ERR denied\n");
  EXPECT_EQ(Exchange(wrong), "ERR busy\n");
  EXPECT_EQ(proxy_->stats().global().throttled, 1u);
  // The secret is checked before the throttle.
  EXPECT_EQ(Exchange(Preamble("job1", secret_), /*line_only=*/true), "OK\n");
}

TEST_F(AdmissionTest, ABackendThatIsNotListeningIsUnavailable) {
  int closed_port = 0;
  int fd = Listen(&closed_port);
  ::close(fd);  // nothing listens there now
  std::string secret = Save("down", closed_port);
  StartProxy(ProxyOptions{});
  EXPECT_EQ(Exchange(Preamble("down", secret)), "ERR unavailable\n");
  EXPECT_EQ(proxy_->stats().global().unavailable, 1u);
  EXPECT_EQ(proxy_->stats().global().spliced, 0u);
}

TEST_F(AdmissionTest, ABackendThatDoesNotAnswerTimesOutAsUnavailable) {
  // A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
  // stays in progress.
  int full_port = 0;
  int full = Listen(&full_port, /*backlog=*/0);
  ASSERT_GE(full, 0);
  std::vector<int> fillers;
  for (int i = 0; i < 4; ++i) fillers.push_back(ConnectTo(full_port));
  std::string secret = Save("stuck", full_port);
  ProxyOptions o;
  o.connect_timeout_ms = 300;
  StartProxy(o);
  EXPECT_EQ(Exchange(Preamble("stuck", secret)), "ERR unavailable\n");
  EXPECT_EQ(proxy_->stats().global().unavailable, 1u);
  for (int f : fillers) ::close(f);
  ::close(full);
}

TEST_F(AdmissionTest, AnIncompletePreambleTimesOut) {
  ProxyOptions o;
  o.handshake_timeout_ms = 200;
  StartProxy(o);
  EXPECT_EQ(Exchange("BROKER1 job1 " + secret_.substr(0, 10)), "ERR timeout\n");
  EXPECT_EQ(proxy_->stats().global().timeouts, 1u);
}

TEST_F(AdmissionTest, APlainPreambleFromOutsidePlainAllowIsDenied) {
  ProxyOptions o;
  StartProxy(o);
  // Restart with a plain_allow that excludes loopback.
  proxy_->Stop();
  proxy_.reset();
  o.listen = {{"127.0.0.1", 0}};
  o.plain_allow = {*Cidr::Parse("10.0.0.0/8")};
  proxy_ = std::make_unique<Proxy>(loop_.get(), registry_.get(), o);
  ASSERT_TRUE(proxy_->Start().ok());
  std::string addr = proxy_->addresses().at(0);
  port_ = std::stoi(addr.substr(addr.rfind(':') + 1));
  EXPECT_EQ(Exchange(Preamble("job1", secret_)), "ERR denied\n");
  EXPECT_EQ(proxy_->stats().global().denied, 1u);
}

}  // namespace
}  // namespace brokerproxy::proxy
