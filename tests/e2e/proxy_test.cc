// The proxy port end to end (issue 3's acceptance): the real daemon, real sockets, backends in
// threads, `connect` as a real child process, and a real OpenSSH sshd behind --stdio.

#include <linux/sockios.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"

namespace brokerproxy::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

// Opens a raw session: connect, send the preamble (plus `extra` pipelined bytes), read the
// reply line. Returns the fd (or -1) and the reply.
int OpenSession(int port, const std::string& job, const std::string& secret, std::string* reply,
                const std::string& extra = "") {
  int fd = ConnectTcp(port);
  if (fd < 0) return -1;
  SendAll(fd, "BROKER1 " + job + " " + secret + "\n" + extra);
  auto line = ReadLine(fd, 256);
  *reply = line.value_or("<closed>");
  return fd;
}

class ProxyTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::string& proxy_extra = "") {
    daemon_ = std::make_unique<Daemon>(dir_, "", proxy_extra);
    ASSERT_TRUE(daemon_->Start());
    secret_ = daemon_->SaveJob("job1", backend_.port());
    ASSERT_FALSE(secret_.empty());
  }
  // A session to job1 that asked the backend for `command`.
  int Session(const std::string& command) {
    std::string reply;
    int fd = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply, command + "\n");
    EXPECT_EQ(reply, "OK");
    return fd;
  }
  void ExpectStillServing() {
    int fd = Session("echo");
    ASSERT_GE(fd, 0);
    EchoResult r = EchoTransfer(fd, 1000);
    EXPECT_EQ(r.received, r.sent);
    close(fd);
  }

  TempDir dir_;
  Backend backend_;
  std::unique_ptr<Daemon> daemon_;
  std::string secret_;
};

TEST_F(ProxyTest, EchoOneByteAnd64KiB) {
  StartDaemon();
  for (uint64_t n : {uint64_t{1}, uint64_t{64 * 1024}}) {
    int fd = Session("echo");
    ASSERT_GE(fd, 0);
    EchoResult r = EchoTransfer(fd, n);
    EXPECT_EQ(r.received_bytes, n);
    EXPECT_EQ(r.received, r.sent);
    close(fd);
  }
}

TEST_F(ProxyTest, Transfers256MiBEachWayByHash) {
  StartDaemon();
  constexpr uint64_t kBytes = 256ull << 20;
  // Client -> backend: the backend hashes what it got, after the client's EOF (half-close).
  int up = Session("upload");
  ASSERT_GE(up, 0);
  EchoResult sent = [&] {
    EchoResult r;
    Sha256 sha;
    std::vector<char> buf(1 << 20);
    for (uint64_t off = 0; off < kBytes; off += buf.size()) {
      Pattern(off, buf.data(), buf.size());
      sha.Update(buf.data(), buf.size());
      EXPECT_TRUE(SendAll(up, buf.data(), buf.size()));
    }
    r.sent = sha.Hex();
    return r;
  }();
  shutdown(up, SHUT_WR);
  auto reply = ReadLine(up, 256);
  ASSERT_TRUE(reply);
  EXPECT_EQ(*reply, sent.sent + " " + std::to_string(kBytes));
  close(up);
  // Backend -> client.
  int down = Session("download " + std::to_string(kBytes));
  ASSERT_GE(down, 0);
  Sha256 sha;
  uint64_t got = 0;
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = recv(down, buf.data(), buf.size(), 0);
    if (n <= 0) break;
    sha.Update(buf.data(), n);
    got += n;
  }
  EXPECT_EQ(got, kBytes);
  EXPECT_EQ(sha.Hex(), PatternHash(kBytes));
  close(down);
}

TEST_F(ProxyTest, PipelinedBytesReachTheBackendFirstAndInOrder) {
  StartDaemon();
  // The command line and the first payload arrive in the same segment as the preamble.
  std::string reply;
  int fd = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply, "echo\nfirst-");
  ASSERT_EQ(reply, "OK");
  SendAll(fd, "second");
  shutdown(fd, SHUT_WR);
  EXPECT_EQ(ReadToEof(fd), "first-second");
  close(fd);
}

TEST_F(ProxyTest, TwoHundredConcurrentSessions) {
  StartDaemon();
  constexpr int kSessions = 200;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kSessions; ++i) {
    threads.emplace_back([&, i] {
      std::string reply;
      int fd = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply, "echo\n");
      if (fd < 0 || reply != "OK") return;
      EchoResult r = EchoTransfer(fd, 64 * 1024 + i);
      if (r.received == r.sent && r.received_bytes == 64 * 1024u + i) good++;
      close(fd);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), kSessions);
}

TEST_F(ProxyTest, ConnectListenCarriesSessions) {
  StartDaemon();
  auto connect =
      Child::Spawn({BinaryPath(), "connect", "job1", "--listen", "0", "-c", daemon_->config_path(),
                    "--proxy", "127.0.0.1:" + std::to_string(daemon_->proxy_port())},
                   dir_ / "connect.log");
  auto line = connect->WaitFor("listening on 127.0.0.1:");
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  for (uint64_t n : {uint64_t{1}, uint64_t{64 * 1024}, uint64_t{256} << 20}) {
    int fd = ConnectTcp(port);
    ASSERT_GE(fd, 0);
    SendAll(fd, "echo\n");
    EchoResult r = EchoTransfer(fd, n);
    EXPECT_EQ(r.received_bytes, n);
    EXPECT_EQ(r.received, r.sent);
    close(fd);
  }
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// `connect` sends what the local client says first right behind the preamble instead of
// waiting for the proxy's "OK", so a client that speaks first loses no round trip. The stand-in
// proxy replies only once it has those bytes (or after 5 s without them).
TEST_F(ProxyTest, ConnectSendsWhatTheClientSaysFirstWithThePreamble) {
  StartDaemon();  // `connect` loads the secret from it
  std::string preamble = "BROKER1 job1 " + secret_ + "\n";
  {
    FakeProxy fake(6, 5000);
    auto connect = Child::Spawn(
        {BinaryPath(), "connect", "job1", "--listen", "0", "-c", daemon_->config_path(), "--proxy",
         "127.0.0.1:" + std::to_string(fake.port())},
        dir_ / "connect.log");
    ExpectConnectSendsFirstBytesEarly(connect.get(), &fake, preamble);
  }
  {
    // --stdio, with stdin ending right after its bytes: the EOF still reaches the proxy, after
    // them (the stand-in then ends the stream, and `connect` exits).
    FakeProxy fake(6, 5000);
    RunOptions in;
    in.stdin_data = "hello\n";
    RunResult r = daemon_->Cli(
        {"connect", "job1", "--stdio", "--proxy", "127.0.0.1:" + std::to_string(fake.port())}, in);
    EXPECT_EQ(r.exit_code, 0) << r;
    EXPECT_EQ(r.out, "hello\n") << r;
    EXPECT_EQ(fake.BeforeReply(), preamble + "hello\n");
  }
}

TEST_F(ProxyTest, ConnectReportsTheProxysRefusal) {
  StartDaemon();
  // The job exists but nothing listens on its port: `connect` says so in words.
  ASSERT_FALSE(daemon_->SaveJob("gone", 1).empty());
  RunOptions in;
  in.stdin_data = "x";
  RunResult r = daemon_->Cli({"connect", "gone", "--stdio", "--proxy",
                              "127.0.0.1:" + std::to_string(daemon_->proxy_port())},
                             in);
  EXPECT_EQ(r.exit_code, 3) << r;  // nothing listens on port 1: unavailable
  EXPECT_NE(r.err.find("does not accept connections"), std::string::npos) << r;
}

TEST_F(ProxyTest, DeniedAndMalformedHandshakes) {
  StartDaemon("handshake_timeout = 1s\n");
  int port = daemon_->proxy_port();
  std::string reply;
  int fd = OpenSession(port, "nosuchjob", secret_, &reply);
  EXPECT_EQ(reply, "ERR denied");
  close(fd);
  std::string wrong = secret_;
  wrong[5] = wrong[5] == '0' ? '1' : '0';
  fd = OpenSession(port, "job1", wrong, &reply);
  EXPECT_EQ(reply, "ERR denied");  // same answer as an unknown job
  close(fd);

  for (const std::string& bad :
       {std::string("BROKER1 job1\n"), std::string("BROKER2 job1 00\n"),
        std::string("BROKER1 job/1 00\n"), std::string("BROKER1 job1 XYZ\n"),
        std::string("BROKER1 job1 ") + std::string(3000, 'a'), std::string("hello\n")}) {
    fd = ConnectTcp(port);
    ASSERT_GE(fd, 0);
    SendAll(fd, bad);
    EXPECT_EQ(ReadLine(fd).value_or("<closed>"), "ERR bad-request") << bad.substr(0, 40);
    close(fd);
  }

  // A silent client gets the timeout answer after handshake_timeout (with the SSH banner off:
  // StockToolsTest.AfterTheBannerItIsSshWithTheHandshakeDeadline has it on).
  daemon_->Stop();
  daemon_ = std::make_unique<Daemon>(dir_, "[ssh]\nbanner_delay = 0\n", "handshake_timeout = 1s\n");
  ASSERT_TRUE(daemon_->Start());
  port = daemon_->proxy_port();
  auto start = steady_clock::now();
  fd = ConnectTcp(port);
  EXPECT_EQ(ReadLine(fd).value_or("<closed>"), "ERR timeout");
  EXPECT_LT(steady_clock::now() - start, milliseconds(5000));
  close(fd);

  // One byte every 100 ms is still bounded by the same deadline.
  fd = ConnectTcp(port);
  start = steady_clock::now();
  std::string slow = "BROKER1 job1 " + secret_ + "\n";
  std::atomic<bool> stop{false};
  std::thread dripper([&] {
    for (char c : slow) {
      if (stop || send(fd, &c, 1, MSG_NOSIGNAL) != 1) return;
      std::this_thread::sleep_for(milliseconds(100));  // a slow client's pace, not a wait
    }
  });
  EXPECT_EQ(ReadLine(fd).value_or("<closed>"), "ERR timeout");
  EXPECT_LT(steady_clock::now() - start, milliseconds(3000));
  stop = true;
  dripper.join();
  close(fd);

  ExpectStillServing();
}

TEST_F(ProxyTest, ListensOnIpv4AndIpv6) {
  StartDaemon("listen = [::1]:0\n");
  std::string log = daemon_->Log();
  size_t at = log.find("proxy listening on [::1]:");
  ASSERT_NE(at, std::string::npos) << log;
  int port6 = std::stoi(log.substr(at + 25));
  int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in6 addr{};
  addr.sin6_family = AF_INET6;
  addr.sin6_port = htons(static_cast<uint16_t>(port6));
  addr.sin6_addr = in6addr_loopback;
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SendAll(fd, "BROKER1 job1 " + secret_ + "\necho\n");
  EXPECT_EQ(ReadLine(fd).value_or("<closed>"), "OK");  // ::1 is in the default plain_allow
  EchoResult r = EchoTransfer(fd, 4096);
  EXPECT_EQ(r.received, r.sent);
  close(fd);
  ExpectStillServing();  // and IPv4 still works
}

// The daemon's end of the loopback connection whose client end is `fd`, as /proc/net/tcp
// lists it: its TCP state (0x01 established, 0x08 close-wait: the FIN arrived) and how many
// bytes (a FIN counts one) wait in its receive queue. nullopt if it is not listed.
struct PeerEnd {
  int state = 0;
  long rx_queue = 0;
};
std::optional<PeerEnd> DaemonEndOf(int fd) {
  sockaddr_in self{}, peer{};
  socklen_t len = sizeof(self);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&self), &len) != 0) return std::nullopt;
  len = sizeof(peer);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) return std::nullopt;
  std::ifstream in("/proc/net/tcp");
  std::string line;
  std::getline(in, line);  // the header
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string slot, local, remote, state, queues;
    if (!(fields >> slot >> local >> remote >> state >> queues)) continue;
    auto port_of = [](const std::string& a) {
      return static_cast<int>(std::stoul(a.substr(a.find(':') + 1), nullptr, 16));
    };
    if (port_of(local) != ntohs(peer.sin_port) || port_of(remote) != ntohs(self.sin_port)) {
      continue;
    }
    PeerEnd end;
    end.state = static_cast<int>(std::stoul(state, nullptr, 16));
    end.rx_queue = static_cast<long>(std::stoul(queues.substr(queues.find(':') + 1), nullptr, 16));
    return end;
  }
  return std::nullopt;
}

// True once every byte sent on `fd` was acknowledged by the peer's kernel.
bool AllAcked(int fd) {
  int pending = -1;
  return ioctl(fd, SIOCOUTQ, &pending) == 0 && pending == 0;
}

// A client that sends part of a preamble and then shuts down writing is dropped at once, not
// kept until the handshake timeout. The daemon is stopped while the rest of the bytes and the
// FIN arrive, so that both come with one event: after reading the bytes, nothing new will
// report the FIN.
TEST_F(ProxyTest, HalfClosedPartialPreambleIsDroppedAtOnce) {
  StartDaemon("handshake_timeout = 20s\n");
  int fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 job1 "));
  // Read by the daemon: arrived at its socket, and its receive queue is empty again.
  ASSERT_TRUE(WaitUntil([&] {
    auto end = DaemonEndOf(fd);
    return AllAcked(fd) && end && end->rx_queue == 0;
  })) << "the daemon did not read the first bytes";
  ASSERT_EQ(kill(daemon_->pid(), SIGSTOP), 0);
  ASSERT_TRUE(SendAll(fd, secret_.substr(0, 10)));
  shutdown(fd, SHUT_WR);
  // The bytes and the FIN wait together in the stopped daemon's socket.
  EXPECT_TRUE(WaitUntil([&] {
    auto end = DaemonEndOf(fd);
    return end && end->state == 0x08 && end->rx_queue >= 10;
  })) << "the FIN did not arrive";
  auto start = steady_clock::now();
  ASSERT_EQ(kill(daemon_->pid(), SIGCONT), 0);
  EXPECT_EQ(ReadToEof(fd), "");  // closed without a reply (a timeout would answer ERR timeout)
  EXPECT_LT(steady_clock::now() - start, milliseconds(5000));
  close(fd);
  ExpectStillServing();
}

TEST_F(ProxyTest, PlainPreambleOnlyFromAllowedSources) {
  StartDaemon("plain_allow = 10.0.0.0/8\n");
  std::string reply;
  int fd = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply);
  EXPECT_EQ(reply, "ERR denied");
  close(fd);
}

TEST_F(ProxyTest, ThrottlesRepeatedFailuresPerJob) {
  StartDaemon("throttle_failures = 3\nthrottle_window = 1m\n");
  std::string reply;
  for (int i = 0; i < 3; ++i) {
    close(OpenSession(daemon_->proxy_port(), "job1", "00", &reply));
    EXPECT_EQ(reply, "ERR denied");
  }
  // Throttled now: failures are answered busy, but the right secret is still admitted.
  close(OpenSession(daemon_->proxy_port(), "job1", "00", &reply));
  EXPECT_EQ(reply, "ERR busy");
  close(OpenSession(daemon_->proxy_port(), "job1", secret_, &reply));
  EXPECT_EQ(reply, "OK");
  EXPECT_NE(daemon_->Log().find("throttling job job1: 3 failed handshakes within 1m"),
            std::string::npos)
      << daemon_->Log();
}

TEST_F(ProxyTest, BackendRefusesGivesUnavailable) {
  StartDaemon();
  std::string secret = daemon_->SaveJob("dead", 1);  // nothing listens on port 1
  std::string reply;
  int fd = OpenSession(daemon_->proxy_port(), "dead", secret, &reply);
  EXPECT_EQ(reply, "ERR unavailable");
  close(fd);
  ExpectStillServing();
}

TEST_F(ProxyTest, MaxConnectionsAnswersBusy) {
  StartDaemon("max_connections = 2\n");
  int a = Session("echo"), b = Session("echo");
  std::string reply;
  int c = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply);
  EXPECT_EQ(reply, "ERR busy");
  close(c);
  close(a);
  close(b);
}

TEST_F(ProxyTest, OutOfDescriptorsClientsAreToldBusyNotLeftHanging) {
  if (access("/usr/bin/prlimit", X_OK) != 0) GTEST_SKIP() << "prlimit (util-linux) missing";
  daemon_ = std::make_unique<Daemon>(dir_, "", "max_connections = 1000\n");
  daemon_->set_launcher({"prlimit", "--nofile=64"});
  ASSERT_TRUE(daemon_->Start());
  EXPECT_NE(daemon_->Log().find("needs about"), std::string::npos) << "warned at start";
  secret_ = daemon_->SaveJob("job1", backend_.port());
  ASSERT_FALSE(secret_.empty());
  std::vector<int> open_fds;
  int ok = 0, busy = 0;
  for (int i = 0; i < 60; ++i) {
    std::string reply;
    int fd = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply, "echo\n");
    ASSERT_GE(fd, 0);
    open_fds.push_back(fd);
    if (reply == "OK") ++ok;
    if (reply == "ERR busy") ++busy;
    ASSERT_TRUE(reply == "OK" || reply == "ERR busy") << "connection " << i << ": " << reply;
  }
  EXPECT_GT(ok, 10);
  EXPECT_GT(busy, 0) << "the limit was reached";
  for (int fd : open_fds) close(fd);
  // Service resumes once descriptors are free again.
  auto deadline = steady_clock::now() + milliseconds(5000);
  std::string reply;
  do {
    close(OpenSession(daemon_->proxy_port(), "job1", secret_, &reply, "echo\n"));
  } while (reply != "OK" && steady_clock::now() < deadline);
  EXPECT_EQ(reply, "OK");
  EXPECT_EQ(daemon_->Cli({"query"}).exit_code, 0);
}

TEST_F(ProxyTest, BackendClosesMidTransfer) {
  StartDaemon();
  int fd = Session("reset 1000000");
  std::string got = ReadToEof(fd, 8 << 20);
  EXPECT_LE(got.size(), 1000000u);  // what arrived before the reset, then the end
  close(fd);
  ExpectStillServing();
}

TEST_F(ProxyTest, ClientResetsMidTransfer) {
  StartDaemon();
  int before = daemon_->OpenFds();
  int fd = Session("download 1000000000");
  char buf[4096];
  ASSERT_GT(recv(fd, buf, sizeof(buf), 0), 0);
  linger l{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);  // RST
  // The daemon drops both ends; its fds come back.
  WaitUntil([&] { return daemon_->OpenFds() <= before + 2; }, 5000);
  EXPECT_LE(daemon_->OpenFds(), before + 2);  // at most one pooled pipe pair
  ExpectStillServing();
}

TEST_F(ProxyTest, HalfCloseEachDirection) {
  StartDaemon();
  // Client shuts down writing and still receives the whole reply.
  int fd = Session("upload");
  SendAll(fd, "some bytes");
  shutdown(fd, SHUT_WR);
  auto line = ReadLine(fd);
  ASSERT_TRUE(line);
  EXPECT_NE(line->find(" 10"), std::string::npos);
  close(fd);
  // The backend finishes first (shuts down writing); the client can still send afterwards.
  fd = Session("download 5");
  EXPECT_EQ(ReadToEof(fd).size(), 5u);  // EOF seen while our side is still open
  EXPECT_TRUE(SendAll(fd, "late bytes the backend drains"));
  shutdown(fd, SHUT_WR);
  close(fd);
  ExpectStillServing();
}

// True once the daemon's log has `needle`, polling for up to `timeout_ms`.
bool LogShows(const Daemon& d, const std::string& needle, int timeout_ms) {
  return WaitUntil([&] { return d.Log().find(needle) != std::string::npos; }, timeout_ms);
}

// idle_timeout closes a session nobody used for that long, half_close_timeout one that a side
// finished with and the other left silent; a session that keeps moving bytes stays.
TEST_F(ProxyTest, IdleAndHalfClosedSessionsTimeOut) {
  StartDaemon("idle_timeout = 3s\nhalf_close_timeout = 1s\n");
  int idle = Session("echo");
  int busy = Session("echo");
  int half = Session("download 5");  // the backend sends 5 bytes and shuts down writing
  ASSERT_GE(idle, 0);
  ASSERT_GE(busy, 0);
  ASSERT_GE(half, 0);
  EXPECT_EQ(ReadToEof(half).size(), 5u);
  auto start = steady_clock::now();

  std::atomic<bool> stop{false};
  std::atomic<int> busy_good{0}, busy_bad{0};
  std::thread keep_busy([&] {
    while (!stop) {
      bool ok = SendAll(busy, "ping\n") && ReadLine(busy) == "ping";
      (ok ? busy_good : busy_bad)++;
      std::this_thread::sleep_for(milliseconds(250));  // the busy client's pace, not a wait
    }
  });
  // The half-closed one goes first, after its timeout (the sweep runs every second)...
  EXPECT_TRUE(LogShows(*daemon_, "reason=half-close timeout", 5000)) << daemon_->Log();
  auto half_after = steady_clock::now() - start;
  // ...then the idle one: the daemon closes it (EOF here, not our receive timeout).
  char c;
  timeval tv{8, 0};
  setsockopt(idle, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  EXPECT_EQ(recv(idle, &c, 1, 0), 0);
  auto idle_after = steady_clock::now() - start;
  stop = true;
  keep_busy.join();

  EXPECT_GE(half_after, milliseconds(1000));
  EXPECT_GE(idle_after, milliseconds(3000));
  EXPECT_GT(idle_after, half_after);
  EXPECT_GT(busy_good.load(), 10);
  EXPECT_EQ(busy_bad.load(), 0);
  EXPECT_TRUE(SendAll(busy, "still here\n"));
  EXPECT_EQ(ReadLine(busy), "still here");
  // The half-closed one is gone too: what we send now is refused (a reset, then EPIPE).
  EXPECT_TRUE(WaitUntil([&] { return send(half, "x", 1, MSG_NOSIGNAL) < 0; }, 2000));
  for (int fd : {idle, busy, half}) close(fd);
  EXPECT_NE(daemon_->Log().find("reason=idle timeout"), std::string::npos) << daemon_->Log();
  RunResult stats = daemon_->Cli({"stats", "--json"});
  auto sj = ParseOut(stats.out);
  EXPECT_EQ(JsonText(sj.get(), {"stats", "connections", "idle_closed"}), "2") << stats;
}

// A reader slower than the backend, and a backend slower than the writer: the daemon moves
// bytes only as fast as the slower side takes them (spliced through a bounded pipe) and leaves
// the rest in the kernel, so the fast side is held back: it gets rid of no more than the
// buffers on the way hold, where a daemon that read on and buffered would take everything.
// (The daemon's memory itself is measured in bench/, never bounded in a test.)
TEST_F(ProxyTest, SlowSidesAreHeldBackNotBuffered) {
  StartDaemon();
  // Far more than the kernel's buffers on the way (sockets, the 1 MiB pipe) hold, far less
  // than the transfer.
  constexpr uint64_t kOnTheWay = 64ull << 20;
  constexpr uint64_t kDown = 256ull << 20;
  int fd = Session("download " + std::to_string(kDown));
  ASSERT_GE(fd, 0);
  int rcvbuf = 64 * 1024;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
  Sha256 sha;
  std::vector<char> buf(256 * 1024);
  uint64_t got = 0;
  auto read_up_to = [&](uint64_t until) {
    while (got < until) {
      ssize_t n = recv(fd, buf.data(), std::min<uint64_t>(buf.size(), until - got), 0);
      if (n <= 0) return;
      sha.Update(buf.data(), n);
      got += n;
    }
  };
  // A first MiB, then the reader stalls: the backend is held back.
  read_up_to(1u << 20);
  uint64_t sent = WaitUntilStill([&] { return backend_.sent(); });
  EXPECT_LT(sent, got + kOnTheWay) << "the daemon kept reading the backend";
  // Then everything arrives, intact.
  read_up_to(kDown);
  close(fd);
  EXPECT_EQ(got, kDown);
  EXPECT_EQ(sha.Hex(), PatternHash(kDown));

  // The other way: the backend reads slowly (64 KiB every 10 ms), the client writes fast.
  fd = Session("slowread");
  ASSERT_GE(fd, 0);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> pushed{0};
  std::thread writer([&] {
    std::vector<char> chunk(1 << 20, 'x');
    while (!stop && SendAll(fd, chunk.data(), chunk.size())) pushed += chunk.size();
  });
  uint64_t taken = WaitUntilStill([&] { return pushed.load(); });
  EXPECT_LT(taken, kOnTheWay) << "the daemon kept reading the client";
  stop = true;
  shutdown(fd, SHUT_RDWR);
  writer.join();
  close(fd);
}

TEST_F(ProxyTest, NoDescriptorLeakAfterTenThousandSessions) {
  StartDaemon();
  auto run = [&](int sessions, int threads) {
    std::vector<std::thread> ts;
    std::atomic<int> ok{0};
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&] {
        for (int i = 0; i < sessions / threads; ++i) {
          std::string reply;
          int fd = OpenSession(daemon_->proxy_port(), "job1", secret_, &reply, "echo\nz");
          char c = 0;
          if (reply == "OK" && recv(fd, &c, 1, 0) == 1 && c == 'z') ok++;
          close(fd);
        }
      });
    }
    for (auto& t : ts) t.join();
    return ok.load();
  };
  EXPECT_EQ(run(200, 8), 200);  // warm up: the pipe pool reaches its working size
  // Every warm-up session is over on the daemon's side too before its fds are counted.
  ASSERT_TRUE(WaitUntil([&] {
    auto stats = ParseOut(daemon_->Cli({"stats", "--json"}));
    return JsonText(stats.get(), {"stats", "connections", "active"}) == "0";
  })) << daemon_->Log();
  int before = daemon_->OpenFds();
  EXPECT_EQ(run(10000, 8), 10000);
  WaitUntil([&] { return daemon_->OpenFds() == before; }, 10000);
  EXPECT_EQ(daemon_->OpenFds(), before);
}

// ---- --stdio as an OpenSSH ProxyCommand to a real sshd registered as a job ----

TEST_F(ProxyTest, StdioWorksAsSshProxyCommand) {
  if (access("/usr/sbin/sshd", X_OK) != 0 || access("/usr/bin/ssh-keygen", X_OK) != 0) {
    GTEST_SKIP() << "openssh-server is not installed";
  }
  StartDaemon();
  std::string keys = dir_ / "keys";
  ASSERT_EQ(RunCommand({"mkdir", "-p", keys}).exit_code, 0);
  ASSERT_EQ(
      RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys + "/host"}).exit_code,
      0);
  ASSERT_EQ(
      RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys + "/user"}).exit_code,
      0);
  WriteFile(keys + "/authorized_keys", ReadFile(keys + "/user.pub"), 0600);
  // A free port for sshd: bind 0, read it back, release.
  int probe = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  bind(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  getsockname(probe, reinterpret_cast<sockaddr*>(&addr), &len);
  int sshd_port = ntohs(addr.sin_port);
  close(probe);
  WriteFile(dir_ / "sshd_config",
            "ListenAddress 127.0.0.1\nPort " + std::to_string(sshd_port) + "\nHostKey " + keys +
                "/host\nAuthorizedKeysFile " + keys +
                "/authorized_keys\nPidFile none\nUsePAM no\nStrictModes no\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n");
  RunCommand({"mkdir", "-p", "/run/sshd"});
  auto sshd =
      Child::Spawn({"/usr/sbin/sshd", "-D", "-e", "-f", dir_ / "sshd_config"}, dir_ / "sshd.log");
  ASSERT_TRUE(sshd->WaitFor("Server listening", 10000)) << sshd->Output();
  ASSERT_FALSE(daemon_->SaveJob("sshjob", sshd_port).empty());

  std::string proxy_command = BinaryPath() + " connect %h --stdio -c " + daemon_->config_path() +
                              " --proxy 127.0.0.1:" + std::to_string(daemon_->proxy_port());
  RunResult r = RunCommand({"ssh", "-F", "/dev/null", "-i", keys + "/user", "-o",
                            "ProxyCommand=" + proxy_command, "-o", "StrictHostKeyChecking=no", "-o",
                            "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                            "ConnectTimeout=20", "root@sshjob", "echo", "hello-from-the-job"});
  EXPECT_EQ(r.exit_code, 0) << r << "\nsshd: " << sshd->Output();
  EXPECT_EQ(r.out, "hello-from-the-job\n");
  sshd->Stop();
}

}  // namespace
}  // namespace brokerproxy::testing
