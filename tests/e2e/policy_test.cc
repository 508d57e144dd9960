// The backend policy and `connect --listen`'s owner check, end to end: the real daemon and CLI,
// real users bp-alice and bp-bob, listeners owned by them (support/socket_as.h).

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "e2e/harness.h"
#include "support/socket_as.h"
#include "support/tls_samples.h"

namespace brokerproxy::testing {
namespace {

// An echo service on 127.0.0.1 whose listening socket belongs to `uid`; serves one connection
// at a time and counts connections and bytes. A connection counts once it sends a byte: the
// daemon's readiness probes connect and close without one.
class OwnedServer {
 public:
  explicit OwnedServer(uid_t uid, int port = 0) {
    fd_ = ListenAs(uid, "127.0.0.1", port);
    port_ = fd_ >= 0 ? BoundPort(fd_) : 0;
    if (fd_ >= 0) thread_ = std::thread([this] { Serve(); });
  }
  ~OwnedServer() { Close(); }
  OwnedServer(const OwnedServer&) = delete;
  OwnedServer& operator=(const OwnedServer&) = delete;

  bool ok() const { return fd_ >= 0; }
  int port() const { return port_; }
  int connections() const { return connections_.load(); }
  uint64_t bytes() const { return bytes_.load(); }
  void Close() {
    if (fd_ < 0) return;
    stop_ = true;
    thread_.join();
    ::close(fd_);
    fd_ = -1;
  }

 private:
  void Serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      timeval tv{10, 0};
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      char buf[16384];
      for (bool counted = false;;) {
        ssize_t n = ::recv(c, buf, sizeof(buf), 0);
        if (n <= 0) break;
        if (!counted) connections_++;
        counted = true;
        bytes_ += static_cast<uint64_t>(n);
        if (!SendAll(c, buf, static_cast<size_t>(n))) break;
      }
      ::close(c);
    }
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<uint64_t> bytes_{0};
  std::thread thread_;
};

// A preamble session; returns the reply line and, if "OK", echoes "ping" through it.
std::string PreambleReply(int proxy_port, const std::string& job, const std::string& secret,
                          bool* echoed = nullptr) {
  int fd = ConnectTcp(proxy_port);
  if (fd < 0) return "<no connection>";
  SendAll(fd, "BROKER1 " + job + " " + secret + "\n");
  std::string reply = ReadLine(fd, 256).value_or("<closed>");
  if (echoed && reply == "OK") {
    SendAll(fd, "ping\n");
    *echoed = ReadLine(fd, 256) == "ping";
  }
  ::close(fd);
  return reply;
}

class PolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root for other users' sockets";
    auto a = TestUser("bp-alice");
    auto b = TestUser("bp-bob");
    if (!a || !b || !CanRunAs(*a) || !CanRunAs(*b)) GTEST_SKIP() << "no test users here";
    alice_ = *a;
    bob_ = *b;
  }
  RunOptions As(uid_t uid) const {
    RunOptions o;
    o.uid = uid;
    o.env = {"HOME=/nonexistent"};
    return o;
  }
  // `save ssh` of `job` as `uid` with backend 127.0.0.1:port; the secret, or "" (then `*r`).
  std::string SaveAs(const Daemon& d, uid_t uid, const std::string& job, int port,
                     RunResult* r = nullptr) {
    RunResult res = d.Cli({"save", "ssh", "--job-id", job, "--port", std::to_string(port), "--host",
                           "127.0.0.1", "--format", "env"},
                          As(uid));
    if (r) *r = res;
    size_t at = res.out.find("BROKER_SECRET=");
    if (res.exit_code != 0 || at == std::string::npos) return "";
    return res.out.substr(at + 14, res.out.find('\n', at) - at - 14);
  }

  TempDir dir_;
  uid_t alice_ = 0;
  uid_t bob_ = 0;
};

// Removes an iptables rule at scope exit.
class IptablesRule {
 public:
  explicit IptablesRule(std::vector<std::string> spec) : spec_(std::move(spec)) {
    std::vector<std::string> argv = {"iptables", "-w", "5", "-A"};
    argv.insert(argv.end(), spec_.begin(), spec_.end());
    added_ = RunCommand(argv).exit_code == 0;
  }
  ~IptablesRule() {
    if (!added_) return;
    std::vector<std::string> argv = {"iptables", "-w", "5", "-D"};
    argv.insert(argv.end(), spec_.begin(), spec_.end());
    RunCommand(argv);
  }
  bool added() const { return added_; }

 private:
  std::vector<std::string> spec_;
  bool added_ = false;
};

// A service only root may reach (a firewall rule on the loopback interface) must not become
// reachable for anyone through an `ssl` job that names it: passthrough checks no secret, so
// without the policy a ClientHello with the job's name is all it takes.
TEST_F(PolicyTest, SniPassthroughDoesNotRelayToARootOnlyPort) {
  Backend root_service;  // owned by root, in this process
  int port = root_service.port();
  IptablesRule rule({"OUTPUT", "-o", "lo", "-p", "tcp", "--dport", std::to_string(port), "-m",
                     "owner", "!", "--uid-owner", "0", "-j", "REJECT"});
  if (!rule.added()) GTEST_SKIP() << "iptables is not usable here";
  // The rule works: bob cannot connect himself.
  RunOptions bob = As(bob_);
  bob.timeout_ms = 10000;
  RunResult direct =
      RunCommand({"socat", "-u", "/dev/null", "TCP:127.0.0.1:" + std::to_string(port)}, bob);
  ASSERT_NE(direct.exit_code, 0) << direct;

  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string certs = dir_ / "bob-certs";
  ASSERT_EQ(::mkdir(certs.c_str(), 0700), 0);
  ASSERT_EQ(::chown(certs.c_str(), bob_, PrimaryGid(bob_)), 0);
  RunResult save = d.Cli({"save", "ssl", "--job-id", "relay", "--port", std::to_string(port),
                          "--host", "127.0.0.1", "--cert-dir", certs, "--json"},
                         bob);
  ASSERT_EQ(save.exit_code, 0) << save;  // the service may start later: checked at dial

  // Anyone (here root's test process, with no secret) sends a ClientHello naming the job.
  int fd = ConnectTcp(d.proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, CaptureClientHello("relay.localhost")));
  std::string answer = ReadToEof(fd, 1 << 16);  // an alert, then EOF (bounded by a timeout)
  ::close(fd);
  EXPECT_LT(answer.size(), 64u) << "the backend's TLS answer came through";
  EXPECT_EQ(root_service.connections(), 0);
  EXPECT_TRUE(WaitUntil([&] {
    return d.Log().find(
               "job relay: refused to connect to its backend: the listener on "
               "127.0.0.1:" +
               std::to_string(port) + " belongs to uid 0") != std::string::npos;
  })) << d.Log();
  EXPECT_EQ(root_service.connections(), 0);
}

// bob listens on the port of alice's job: alice's sessions must not reach him (he would read
// her traffic, or pose as her service), and the job never turns ready on his listener. Once
// alice's own service listens there, everything works.
TEST_F(PolicyTest, AnotherUsersListenerIsNeverDialled) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  OwnedServer bobs(bob_);
  ASSERT_TRUE(bobs.ok());
  int port = bobs.port();
  std::string secret = SaveAs(d, alice_, "a1", port);
  ASSERT_FALSE(secret.empty());
  // Plain preamble.
  EXPECT_EQ(PreambleReply(d.proxy_port(), "a1", secret), "ERR unavailable");
  // Terminated TLS (`connect --tls`), as alice.
  RunOptions alice = As(alice_);
  alice.stdin_data = "hello\n";
  alice.timeout_ms = 30000;
  RunResult tls = d.Cli({"connect", "a1", "--tls", "--stdio", "--proxy",
                         "127.0.0.1:" + std::to_string(d.proxy_port())},
                        alice);
  EXPECT_NE(tls.exit_code, 0) << tls;
  EXPECT_NE(tls.err.find("unavailable"), std::string::npos) << tls;
  // An SSH channel (stock OpenSSH, `ssh -N -L`): the forward's connection is closed unserved.
  {
    std::string askpass = dir_ / "askpass";
    WriteFile(askpass, "#!/bin/sh\necho '" + secret + "'\n", 0755);
    RunOptions env;
    env.env = {"SSH_ASKPASS=" + askpass, "SSH_ASKPASS_REQUIRE=force", "DISPLAY=:0",
               "HOME=" + (dir_ / "nohome"), "SSH_AUTH_SOCK="};
    // ssh -L cannot listen on port 0: a free port, and another if it was taken meanwhile.
    std::unique_ptr<Child> ssh;
    int forward = 0;
    ASSERT_TRUE(StartOnFreePort(
        [&](int p, std::string* why) {
          size_t from = ReadFile(dir_ / "ssh.log").size();
          ssh = Child::Spawn({"ssh",
                              "-F",
                              "/dev/null",
                              "-p",
                              std::to_string(d.proxy_port()),
                              "-o",
                              "StrictHostKeyChecking=no",
                              "-o",
                              "UserKnownHostsFile=" + (dir_ / "known_hosts"),
                              "-o",
                              "PubkeyAuthentication=no",
                              "-o",
                              "NumberOfPasswordPrompts=1",
                              "-o",
                              "ExitOnForwardFailure=yes",
                              "-o",
                              "ConnectTimeout=10",
                              "-N",
                              "-L",
                              std::to_string(p) + ":a1:1",
                              "a1@127.0.0.1"},
                             dir_ / "ssh.log", env);
          return WaitListening(&ssh, p, why, from);
        },
        &forward))
        << d.Log();
    int fd = ConnectTcp(forward);
    ASSERT_GE(fd, 0) << ssh->Output();
    timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    SendAll(fd, "ping\n");
    char c;
    EXPECT_LE(::recv(fd, &c, 1, 0), 0);  // closed, no echo
    ::close(fd);
    EXPECT_TRUE(WaitUntil([&] {
      std::string log = d.Log();
      size_t n = 0;
      for (size_t at = log.find("job a1: refused to connect"); at != std::string::npos;
           at = log.find("job a1: refused to connect", at + 1)) {
        ++n;
      }
      return n >= 3;  // plain, TLS, SSH
    })) << d.Log();
  }
  // The readiness probe: a job waiting for its listener is not made ready by bob's.
  std::string reply =
      ControlRequestAs(alice_, d.socket_path(),
                       R"({"op":"save","job":"a2","type":"ssh","host":"127.0.0.1","port":)" +
                           std::to_string(port) + R"(,"wait":true})");
  ASSERT_NE(reply.find("\"ok\":true"), std::string::npos) << reply;
  EXPECT_TRUE(WaitUntil([&] {
    return d.Log().find("job a2: refused to probe its backend") != std::string::npos;
  })) << d.Log();
  auto a2 = ParseOut(d.Cli({"load", "a2", "--json"}));
  ASSERT_TRUE(a2);
  EXPECT_EQ(JsonText(a2.get(), {"job", "ready"}), "false");
  EXPECT_EQ(bobs.connections(), 0);
  EXPECT_EQ(bobs.bytes(), 0u);
  EXPECT_NE(d.Log().find("job a1: refused to connect to its backend: the listener on 127.0.0.1:" +
                         std::to_string(port) + " belongs to uid " + std::to_string(bob_)),
            std::string::npos)
      << d.Log();

  // bob leaves; alice's own service takes the port.
  bobs.Close();
  OwnedServer alices(alice_, port);
  ASSERT_TRUE(alices.ok());
  bool echoed = false;
  EXPECT_EQ(PreambleReply(d.proxy_port(), "a1", secret, &echoed), "OK");
  EXPECT_TRUE(echoed);
  EXPECT_TRUE(WaitUntil([&] {
    auto j = ParseOut(d.Cli({"load", "a2", "--json"}));
    return j && JsonText(j.get(), {"job", "ready"}) == "true";
  }));
  EXPECT_EQ(d.Stop(), 0);
}

// The proxy's own port as a backend: 80 pipelined preambles to itself once filled
// max_connections. Refused at save, and at dial for a job saved before the port was the
// proxy's (root's jobs too: they skip only the owner check).
TEST_F(PolicyTest, TheProxysOwnPortIsNeverABackend) {
  PortReservation idle;
  int later = idle.port();
  {
    Daemon d(dir_);
    ASSERT_TRUE(d.Start());
    RunResult own = d.Cli({"save", "ssh", "--job-id", "loop", "--port",
                           std::to_string(d.proxy_port()), "--host", "127.0.0.1"});
    EXPECT_EQ(own.exit_code, 4) << own;  // permission denied
    EXPECT_NE(own.err.find("is the proxy's own port"), std::string::npos) << own;
    RunResult by_name = d.Cli({"save", "ssh", "--job-id", "loop", "--port",
                               std::to_string(d.proxy_port()), "--host", "localhost"});
    EXPECT_EQ(by_name.exit_code, 4) << by_name;
    EXPECT_FALSE(d.SaveJob("loop", later).empty());
    EXPECT_EQ(d.Stop(), 0);
  }
  // The daemon now also listens on that port.
  Daemon d(dir_, "", "listen = 127.0.0.1:" + std::to_string(later) + "\n");
  ASSERT_TRUE(d.Start());
  auto job = ParseOut(d.Cli({"load", "loop", "--json"}));
  ASSERT_TRUE(job);
  std::string secret = JsonText(job.get(), {"job", "secret"});
  EXPECT_EQ(PreambleReply(d.proxy_port(), "loop", secret), "ERR unavailable");
  EXPECT_NE(d.Log().find("job loop: refused to connect to its backend: backend 127.0.0.1:" +
                         std::to_string(later) + " is the proxy's own port"),
            std::string::npos)
      << d.Log();
  EXPECT_EQ(d.Stop(), 0);
}

// [registry] backend_allow narrows the other hosts a backend may be on, at save and at dial;
// this node's own addresses stay governed by the owner check alone.
TEST_F(PolicyTest, BackendAllowNarrowsOtherHosts) {
  OwnedServer alices(alice_);
  ASSERT_TRUE(alices.ok());
  {
    Daemon d(dir_, "[registry]\nbackend_allow = 198.51.100.0/24, 2001:db8::/32\n");
    ASSERT_TRUE(d.Start());
    RunResult outside = d.Cli(
        {"save", "ssh", "--job-id", "far", "--port", "22", "--host", "192.0.2.7"}, As(alice_));
    EXPECT_EQ(outside.exit_code, 4) << outside;
    EXPECT_NE(outside.err.find("backend_allow"), std::string::npos) << outside;
    EXPECT_NE(d.Log().find("refused to save job far for uid " + std::to_string(alice_)),
              std::string::npos)
        << d.Log();
    RunResult inside = d.Cli(
        {"save", "ssh", "--job-id", "near", "--port", "22", "--host", "198.51.100.7"}, As(alice_));
    EXPECT_EQ(inside.exit_code, 0) << inside;
    // This node: not in the list, but alice's own listener.
    std::string secret = SaveAs(d, alice_, "local", alices.port());
    ASSERT_FALSE(secret.empty());
    bool echoed = false;
    EXPECT_EQ(PreambleReply(d.proxy_port(), "local", secret, &echoed), "OK");
    EXPECT_TRUE(echoed);
    EXPECT_EQ(d.Stop(), 0);
  }
  // The site narrows the list further: the job saved before is refused at dial, without any
  // connection attempt, and the refusal is logged.
  Daemon d(dir_, "[registry]\nbackend_allow = 203.0.113.0/24\n");
  ASSERT_TRUE(d.Start());
  auto job = ParseOut(d.Cli({"load", "near", "--json"}));
  ASSERT_TRUE(job);
  EXPECT_EQ(PreambleReply(d.proxy_port(), "near", JsonText(job.get(), {"job", "secret"})),
            "ERR unavailable");
  EXPECT_NE(d.Log().find("job near: refused to connect to its backend: backend "
                         "198.51.100.7:22 is outside"),
            std::string::npos)
      << d.Log();
  EXPECT_EQ(d.Stop(), 0);
}

// `connect --listen` serves only the user who runs it: bob's connection to alice's local port
// is closed before anything reaches the proxy; alice's works.
TEST_F(PolicyTest, ConnectListenServesOnlyItsOwnUser) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  OwnedServer service(alice_);
  ASSERT_TRUE(service.ok());
  ASSERT_FALSE(SaveAs(d, alice_, "nb", service.port()).empty());
  RunOptions alice = As(alice_);
  auto connect =
      Child::Spawn({BinaryPath(), "connect", "nb", "--listen", "0", "-c", d.config_path(),
                    "--proxy", "127.0.0.1:" + std::to_string(d.proxy_port())},
                   dir_ / "connect.log", alice);
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:");
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  auto local = loop::ParseNumericAddress("127.0.0.1", port);

  // bob: closed without a byte, and nothing reached the proxy or the service.
  int b = SocketAs(bob_, AF_INET);
  ASSERT_GE(b, 0);
  ASSERT_EQ(::connect(b, reinterpret_cast<const sockaddr*>(&*local), sizeof(sockaddr_in)), 0);
  timeval tv{10, 0};
  ::setsockopt(b, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SendAll(b, "ping\n");
  char c;
  EXPECT_LE(::recv(b, &c, 1, 0), 0);  // EOF (or a reset), not an echo
  ::close(b);
  EXPECT_TRUE(connect->WaitFor("refused a connection from 127.0.0.1:")) << connect->Output();
  EXPECT_EQ(service.connections(), 0);
  auto stats = ParseOut(d.Cli({"stats", "--json"}));
  ASSERT_TRUE(stats);
  EXPECT_EQ(JsonText(stats.get(), {"stats", "connections", "accepted"}), "0")
      << cJSON_Print(stats.get());

  // alice: served.
  int a = SocketAs(alice_, AF_INET);
  ASSERT_GE(a, 0);
  ASSERT_EQ(::connect(a, reinterpret_cast<const sockaddr*>(&*local), sizeof(sockaddr_in)), 0);
  ::setsockopt(a, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SendAll(a, "ping\n");
  EXPECT_EQ(ReadLine(a, 64), "ping");
  ::close(a);
  EXPECT_EQ(service.connections(), 1);
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// `connect --listen unix:PATH`: a socket of mode 0600 in a directory only its user can reach;
// bob cannot connect, root (who passes file modes) is refused by SO_PEERCRED, alice is served.
TEST_F(PolicyTest, ConnectListenUnixSocketIsPrivate) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  OwnedServer service(alice_);
  ASSERT_TRUE(service.ok());
  ASSERT_FALSE(SaveAs(d, alice_, "nb", service.port()).empty());
  std::string open_dir = dir_ / "open";
  std::string private_dir = dir_ / "private";
  for (const auto& [path, mode] : {std::pair{open_dir, 0755}, std::pair{private_dir, 0700}}) {
    ASSERT_EQ(::mkdir(path.c_str(), mode), 0);
    ASSERT_EQ(::chmod(path.c_str(), mode), 0);
    ASSERT_EQ(::chown(path.c_str(), alice_, PrimaryGid(alice_)), 0);
  }
  std::string proxy = "127.0.0.1:" + std::to_string(d.proxy_port());
  RunResult refused =
      d.Cli({"connect", "nb", "--listen", "unix:" + open_dir + "/s", "--proxy", proxy}, As(alice_));
  EXPECT_EQ(refused.exit_code, 4) << refused;
  EXPECT_NE(refused.err.find("only you can reach"), std::string::npos) << refused;

  std::string sock = private_dir + "/s";
  auto connect = Child::Spawn({BinaryPath(), "connect", "nb", "--listen", "unix:" + sock, "-c",
                               d.config_path(), "--proxy", proxy},
                              dir_ / "connect.log", As(alice_));
  ASSERT_TRUE(connect);
  ASSERT_TRUE(connect->WaitFor("listening on unix:")) << connect->Output();
  struct stat st {};
  ASSERT_EQ(::stat(sock.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(st.st_uid, alice_);

  auto socat = [&](uid_t uid) {
    RunOptions o = As(uid);
    o.stdin_data = "ping\n";
    o.timeout_ms = 20000;
    return RunCommand({"socat", "-t", "5", "-", "UNIX-CONNECT:" + sock}, o);
  };
  RunResult bob = socat(bob_);
  EXPECT_NE(bob.exit_code, 0) << bob;
  EXPECT_EQ(bob.out, "") << bob;
  RunResult root = socat(0);
  EXPECT_EQ(root.out, "") << root;
  EXPECT_TRUE(connect->WaitFor("refused a connection on unix:")) << connect->Output();
  EXPECT_EQ(service.connections(), 0);
  RunResult alice = socat(alice_);
  EXPECT_EQ(alice.exit_code, 0) << alice;
  EXPECT_EQ(alice.out, "ping\n") << alice;
  EXPECT_EQ(service.connections(), 1);

  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
  EXPECT_NE(::access(sock.c_str(), F_OK), 0);  // removed on exit
}

TEST_F(PolicyTest, ConnectRefusesAListenAddressOtherHostsReachUnlessTold) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_FALSE(d.SaveJob("nb", 9).empty());
  RunResult r = d.Cli({"connect", "nb", "--listen", "0.0.0.0:0"});
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("--allow-remote-clients"), std::string::npos) << r;
  auto connect = Child::Spawn({BinaryPath(), "connect", "nb", "--listen", "0.0.0.0:0",
                               "--allow-remote-clients", "-c", d.config_path()},
                              dir_ / "connect.log");
  ASSERT_TRUE(connect);
  EXPECT_TRUE(connect->WaitFor("listening on 0.0.0.0:")) << connect->Output();
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// The plain path carries the secret in clear: `connect` sends it only to a loopback proxy
// address unless told the network is trusted. TEST-NET-1 stands for a login node's public
// address; nothing is sent there, the refusal comes first.
TEST_F(PolicyTest, ConnectSendsNoSecretInClearToANonLoopbackProxy) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_FALSE(d.SaveJob("nb", 9).empty());
  RunOptions quick;
  quick.timeout_ms = 10000;
  RunResult r =
      d.Cli({"connect", "nb", "--listen", "127.0.0.1:0", "--proxy", "192.0.2.1:7000"}, quick);
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("in clear"), std::string::npos) << r;
  EXPECT_NE(r.err.find("--insecure-plain"), std::string::npos) << r;
  // Told so, it runs; loopback proxies and the TLS path need no flag.
  int run = 0;
  for (std::vector<std::string> extra :
       {std::vector<std::string>{"--proxy", "192.0.2.1:7000", "--insecure-plain"},
        std::vector<std::string>{"--proxy", "localhost:" + std::to_string(d.proxy_port())}}) {
    std::vector<std::string> argv = {BinaryPath(),  "connect", "nb",           "--listen",
                                     "127.0.0.1:0", "-c",      d.config_path()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto connect = Child::Spawn(argv, dir_ / ("connect" + std::to_string(run++) + ".log"));
    ASSERT_TRUE(connect);
    EXPECT_TRUE(connect->WaitFor("listening on 127.0.0.1:")) << connect->Output();
    EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
  }
}

}  // namespace
}  // namespace brokerproxy::testing
