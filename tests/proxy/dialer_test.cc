// The backend dialer (proxy/transport/dialer.h) on real loopback sockets driven by a real loop:
// a listening port, a refused one, one that never answers, cancellation mid-dial and mid-lookup,
// and the address check. Every port is the kernel's pick (port 0, read back).

#include "proxy/transport/dialer.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "loop/loop.h"
#include "loop/stream.h"
#include "loop/timer.h"
#include "loop/work.h"

namespace brokerproxy::proxy {
namespace {

// A non-blocking TCP socket on 127.0.0.1, port picked by the kernel; listening if `backlog` >= 0,
// else only bound (connections to it are refused, and nothing else can take its port meanwhile).
struct LocalPort {
  explicit LocalPort(int backlog) {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    if (backlog >= 0) {
      EXPECT_EQ(::listen(fd, backlog), 0);
    }
    socklen_t len = sizeof(a);
    EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
    port = ntohs(a.sin_port);
  }
  ~LocalPort() { ::close(fd); }
  int fd = -1;
  int port = 0;
};

std::set<int> FdSet() {
  std::set<int> fds;
  for (int fd = 0; fd < 4096; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1) fds.insert(fd);
  }
  return fds;
}

int OpenFds() { return static_cast<int>(FdSet().size()); }

class DialerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    auto r = loop::Reactor::Create(*loop_);
    ASSERT_TRUE(r.ok());
    reactor_ = std::move(r).value();
    cache_ = std::make_unique<ResolveCache>(loop_.get(), 30000);
  }
  void TearDown() override {
    dialer_.reset();
    result_.reset();
    cache_.reset();
    reactor_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
  }

  // Starts a dial whose result lands in result_ and whose observer's verdict in observed_;
  // `keepalive_s` >= 0: with Dialer::set_tuning(keepalive_s).
  void Dial(const std::string& host, int port, int keepalive_s = -1) {
    dialer_ = std::make_unique<Dialer>(reactor_.get(), cache_.get());
    if (keepalive_s >= 0) dialer_->set_tuning(keepalive_s);
    dialer_->set_observer(
        [this](bool connected, bool refused) { observed_ = std::make_pair(connected, refused); });
    in_dial_ = true;
    dialer_->Dial(host, port, [this](Result<loop::IoHandle> r) {
      EXPECT_FALSE(in_dial_) << "the callback ran inside Dial()";
      ++calls_;
      result_.emplace(std::move(r));
    });
    in_dial_ = false;
  }

  // Runs the loop until `done()` or `timeout_ms` passed; returns done().
  bool RunUntil(const std::function<bool()>& done, int timeout_ms = 10000) {
    auto t = loop::Timer::Create(*loop_);
    if (!t.ok()) return false;
    bool expired = false;
    (*t)->Start(timeout_ms, [&] { expired = true; });
    while (!done() && !expired) loop_->Run(UV_RUN_ONCE);
    return done();
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<loop::Reactor> reactor_;
  std::unique_ptr<ResolveCache> cache_;
  std::unique_ptr<Dialer> dialer_;
  std::optional<Result<loop::IoHandle>> result_;
  std::optional<std::pair<bool, bool>> observed_;
  bool in_dial_ = false;
  int calls_ = 0;
};

TEST_F(DialerTest, ConnectsToAListeningPort) {
  LocalPort server(16);
  Dial("127.0.0.1", server.port);
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_TRUE(result_->ok()) << result_->status().ToString();
  EXPECT_EQ(observed_, std::make_pair(true, false));
  // The handle is the socket the server accepts: a byte written on it arrives there.
  int accepted = ::accept4(server.fd, nullptr, nullptr, SOCK_CLOEXEC);
  ASSERT_GE(accepted, 0);
  ASSERT_EQ(::write((*result_)->fd(), "x", 1), 1);
  char c = 0;
  EXPECT_EQ(::read(accepted, &c, 1), 1);
  EXPECT_EQ(c, 'x');
  ::close(accepted);
  EXPECT_EQ(calls_, 1);
}

// An int socket option of `fd` (-1 if it cannot be read).
int IntOption(int fd, int level, int name) {
  int v = -1;
  socklen_t len = sizeof(v);
  return ::getsockopt(fd, level, name, &v, &len) == 0 ? v : -1;
}

// A non-loopback IPv4 address of this host, if it has one.
std::optional<std::string> NonLoopbackAddress() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return std::nullopt;
  std::optional<std::string> found;
  for (ifaddrs* i = list; i != nullptr && !found; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    const auto* in = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
    if ((ntohl(in->sin_addr.s_addr) >> 24) == 127) continue;
    char text[INET_ADDRSTRLEN];
    if (::inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text)) != nullptr) found = text;
  }
  ::freeifaddrs(list);
  return found;
}

// A loopback backend gets TCP_NODELAY but no keepalive: the kernel answers probes there for
// any process, alive or hung, so they would find nothing, and cost two system calls per dial.
TEST_F(DialerTest, TuningLeavesKeepaliveOffForALoopbackBackend) {
  LocalPort server(16);
  Dial("127.0.0.1", server.port, /*keepalive_s=*/45);
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_TRUE(result_->ok()) << result_->status().ToString();
  int fd = (*result_)->fd();
  EXPECT_EQ(IntOption(fd, IPPROTO_TCP, TCP_NODELAY), 1);
  EXPECT_EQ(IntOption(fd, SOL_SOCKET, SO_KEEPALIVE), 0);
}

// A backend elsewhere (on another host, or this host's own network address) gets keepalive
// with its first probe after keepalive_s.
TEST_F(DialerTest, TuningTurnsKeepaliveOnForABackendOffLoopback) {
  std::optional<std::string> address = NonLoopbackAddress();
  if (!address) GTEST_SKIP() << "this host has no network address but loopback";
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  ASSERT_EQ(::inet_pton(AF_INET, address->c_str(), &a.sin_addr), 1);
  socklen_t len = sizeof(a);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  Dial(*address, ntohs(a.sin_port), /*keepalive_s=*/45);
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_TRUE(result_->ok()) << result_->status().ToString();
  int conn = (*result_)->fd();
  EXPECT_EQ(IntOption(conn, IPPROTO_TCP, TCP_NODELAY), 1);
  EXPECT_EQ(IntOption(conn, SOL_SOCKET, SO_KEEPALIVE), 1);
  EXPECT_EQ(IntOption(conn, IPPROTO_TCP, TCP_KEEPIDLE), 45);
  ::close(fd);
}

TEST_F(DialerTest, ConnectsToANameThroughTheCache) {
  LocalPort server(16);
  Dial("localhost", server.port);
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_TRUE(result_->ok()) << result_->status().ToString();
  EXPECT_EQ(observed_, std::make_pair(true, false));
  // A second dial to the same name on another port is answered from the cache, with that port.
  LocalPort second(16);
  result_.reset();
  Dial("localhost", second.port);
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_TRUE(result_->ok()) << result_->status().ToString();
  int accepted = ::accept4(second.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  EXPECT_GE(accepted, 0) << "the second dial went to the first port";
  if (accepted >= 0) ::close(accepted);
}

// A name with two addresses whose first refuses: the dial goes on to the second and connects
// there, with one socket open in the end. (The cache is seeded: no name here has two addresses.)
TEST_F(DialerTest, ANameWhoseFirstAddressRefusesConnectsToTheNext) {
  LocalPort server(16);  // on 127.0.0.1 only: 127.0.0.2 on its port refuses
  auto address = [](const char* ip) {
    auto a = loop::ParseNumericAddress(ip, 0);
    EXPECT_TRUE(a.has_value()) << ip;
    return a.value_or(sockaddr_storage{});
  };
  cache_->SeedForTesting("backend.test", {address("127.0.0.2"), address("127.0.0.1")});
  int fds = OpenFds();
  std::vector<std::string> tried;
  dialer_ = std::make_unique<Dialer>(reactor_.get(), cache_.get());
  dialer_->set_check([&](const sockaddr_storage& addr) {
    tried.push_back(loop::FormatAddress(reinterpret_cast<const sockaddr*>(&addr)));
    return Status::OK();
  });
  dialer_->Dial("backend.test", server.port,
                [this](Result<loop::IoHandle> r) { result_.emplace(std::move(r)); });
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_TRUE(result_->ok()) << result_->status().ToString();
  const std::string port = std::to_string(server.port);
  EXPECT_EQ(tried, (std::vector<std::string>{"127.0.0.2:" + port, "127.0.0.1:" + port}));
  EXPECT_EQ(OpenFds(), fds + 1) << "only the connected socket is open";
  int accepted = ::accept4(server.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  ASSERT_GE(accepted, 0) << "the second address was not connected to";
  ASSERT_EQ(::write((*result_)->fd(), "x", 1), 1);
  char c = 0;
  EXPECT_EQ(::read(accepted, &c, 1), 1);
  ::close(accepted);
}

TEST_F(DialerTest, ARefusedPortIsReportedRefusedOnALaterTurn) {
  LocalPort closed(/*backlog=*/-1);  // bound, not listening: refuses
  int fds = OpenFds();
  Dial("127.0.0.1", closed.port);
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_FALSE(result_->ok());
  EXPECT_NE(result_->status().ToString().find("127.0.0.1:" + std::to_string(closed.port)),
            std::string::npos)
      << result_->status().ToString();
  EXPECT_EQ(observed_, std::make_pair(false, true));
  EXPECT_EQ(calls_, 1);
  EXPECT_EQ(OpenFds(), fds) << "the failed attempt's socket is closed";
}

// Only "nothing (of the owner's) listens there" is a refusal: another reason the check gives
// (or a name that does not resolve) fails the dial without one. (No look-up of a name that
// does not exist here: that would ask the network's DNS.)
TEST_F(DialerTest, AFailureThatIsNotARefusalIsNotReportedAsOne) {
  LocalPort server(16);
  dialer_ = std::make_unique<Dialer>(reactor_.get(), cache_.get());
  dialer_->set_check(
      [](const sockaddr_storage&) { return Status::InvalidArgument("not an allowed network"); });
  dialer_->set_observer(
      [this](bool connected, bool refused) { observed_ = std::make_pair(connected, refused); });
  dialer_->Dial("127.0.0.1", server.port,
                [this](Result<loop::IoHandle> r) { result_.emplace(std::move(r)); });
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_FALSE(result_->ok());
  EXPECT_EQ(result_->status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(observed_, std::make_pair(false, false));
}

TEST_F(DialerTest, TheCheckTurnsAnAddressAwayBeforeConnecting) {
  LocalPort server(16);
  std::vector<std::string> checked;
  dialer_ = std::make_unique<Dialer>(reactor_.get(), cache_.get());
  dialer_->set_check([&](const sockaddr_storage& addr) {
    checked.push_back(loop::FormatAddress(reinterpret_cast<const sockaddr*>(&addr)));
    return Status::PermissionDenied("not the job owner's listener");
  });
  dialer_->set_observer(
      [this](bool connected, bool refused) { observed_ = std::make_pair(connected, refused); });
  dialer_->Dial("127.0.0.1", server.port,
                [this](Result<loop::IoHandle> r) { result_.emplace(std::move(r)); });
  ASSERT_TRUE(RunUntil([&] { return result_.has_value(); }));
  ASSERT_FALSE(result_->ok());
  EXPECT_NE(result_->status().ToString().find("not the job owner's listener"), std::string::npos)
      << result_->status().ToString();
  EXPECT_EQ(checked, std::vector<std::string>{"127.0.0.1:" + std::to_string(server.port)});
  // A check's PermissionDenied counts as a refusal (nothing of the owner's listens there).
  EXPECT_EQ(observed_, std::make_pair(false, true));
  int accepted = ::accept4(server.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  EXPECT_LT(accepted, 0) << "connected although the check said no";
  if (accepted >= 0) ::close(accepted);
}

// A listener whose accept queue is full drops new handshakes, so a dial to it stays in
// progress, as one to an unroutable address does: the Dialer reports nothing by itself (the
// proxy's connect_timeout deadline ends it), and dropping it cancels the attempt.
TEST_F(DialerTest, DroppingTheDialerCancelsADialInProgress) {
  LocalPort server(/*backlog=*/0);
  // Fill the queue: each of these completes its handshake and waits, never accepted.
  std::vector<int> fillers;
  for (int i = 0; i < 4; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(server.port));
    ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    fillers.push_back(fd);
  }
  std::set<int> before = FdSet();
  Dial("127.0.0.1", server.port);
  loop_->Run(UV_RUN_NOWAIT);  // whatever the loop has to tell the dialer, it is told now
  std::set<int> after = FdSet();
  ASSERT_EQ(after.size(), before.size() + 1) << "the attempt holds one socket";
  int attempt = -1;
  for (int fd : after) {
    if (!before.count(fd)) attempt = fd;
  }
  // The kernel's view of the attempt: no answer to its SYN yet (no window of time to watch).
  tcp_info info{};
  socklen_t len = sizeof(info);
  ASSERT_EQ(::getsockopt(attempt, IPPROTO_TCP, TCP_INFO, &info, &len), 0);
  if (info.tcpi_state == TCP_ESTABLISHED) {
    for (int fd : fillers) ::close(fd);
    GTEST_SKIP() << "this kernel completed a handshake past a full accept queue";
  }
  EXPECT_EQ(info.tcpi_state, TCP_SYN_SENT);
  EXPECT_FALSE(result_.has_value()) << result_->status().ToString();
  int fds = static_cast<int>(before.size());
  dialer_.reset();
  EXPECT_EQ(OpenFds(), fds) << "dropping the Dialer closes its socket";
  // Nothing is reported after the drop, even once the queue drains.
  for (int fd : fillers) ::close(fd);
  int accepted = -1;
  while ((accepted = ::accept4(server.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0) {
    ::close(accepted);
  }
  loop_->Run(UV_RUN_NOWAIT);
  EXPECT_EQ(calls_, 0);
  EXPECT_FALSE(observed_.has_value());
}

TEST_F(DialerTest, DroppingTheDialerDuringTheLookupCancelsIt) {
  LocalPort server(16);
  Dial("localhost", server.port);
  ASSERT_GE(loop::ResolvesOnPool(), 1) << "the name is being looked up";
  dialer_.reset();
  // The look-up returns (the loop cannot close before it does), and nobody is told.
  ASSERT_TRUE(RunUntil([] { return loop::ResolvesOnPool() == 0; }));
  loop_->Run(UV_RUN_NOWAIT);
  EXPECT_EQ(calls_, 0);
  EXPECT_FALSE(observed_.has_value());
  int accepted = ::accept4(server.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  EXPECT_LT(accepted, 0) << "a cancelled dial connected";
  if (accepted >= 0) ::close(accepted);
}

}  // namespace
}  // namespace brokerproxy::proxy
