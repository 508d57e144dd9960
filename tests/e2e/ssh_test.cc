// SSH end to end (issue 4's acceptance), with real OpenSSH on loopback:
//   - a real sshd stands for the login node: save/load/query/verify/remove/stats and
//     connect --via go through it (host keys, agent, identity files);
//   - the stock ssh client talks to the daemon's embedded SSH endpoint (ssh -N -L).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "cli/ssh_client.h"
#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

int64_t ElapsedMs(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count();
}

size_t CountOf(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++n;
  }
  return n;
}

// One line through `port` (to an echo backend) on a new connection: the line echoed, or
// "(closed)" if the connection closed first.
std::string EchoLine(int port, const std::string& text) {
  int fd = ConnectTcp(port, "127.0.0.1", 30000);
  if (fd < 0) return "cannot connect";
  SendAll(fd, "echo\n" + text + "\n");
  std::string got = ReadLine(fd).value_or("(closed)");
  close(fd);
  return got;
}

// A backend that reads nothing until Release(); then it reads each connection to EOF and
// answers "<sha256 hex> <bytes>\n" before it shuts down writing (connections that send
// nothing, the daemon's readiness probes, get no answer). Every wait is bounded.
class StallingBackend {
 public:
  StallingBackend() {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(listen_fd_, 16) != 0 ||
        getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "cannot listen: " << strerror(errno);
      return;
    }
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~StallingBackend() {
    Release();
    shutdown(listen_fd_, SHUT_RDWR);  // ends accept()
    if (acceptor_.joinable()) acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : workers_) t.join();
    for (int fd : fds_) close(fd);
    close(listen_fd_);
  }
  StallingBackend(const StallingBackend&) = delete;
  StallingBackend& operator=(const StallingBackend&) = delete;

  int port() const { return port_; }
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    released_cv_.notify_all();
  }

 private:
  void AcceptLoop() {
    for (;;) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        return;
      }
      timeval tv{60, 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
      std::lock_guard<std::mutex> lock(mu_);
      fds_.push_back(fd);
      workers_.emplace_back([this, fd] { Serve(fd); });
    }
  }
  void Serve(int fd) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      released_cv_.wait_for(lock, std::chrono::seconds(60), [this] { return released_; });
    }
    Sha256 sha;
    uint64_t total = 0;
    std::vector<char> buf(1 << 20);
    for (ssize_t n; (n = recv(fd, buf.data(), buf.size(), 0)) > 0;) {
      sha.Update(buf.data(), n);
      total += n;
    }
    if (total > 0) SendAll(fd, sha.Hex() + " " + std::to_string(total) + "\n");
    shutdown(fd, SHUT_WR);
  }

  int listen_fd_ = -1;
  int port_ = 0;
  std::thread acceptor_;
  std::mutex mu_;
  std::condition_variable released_cv_;
  bool released_ = false;
  std::vector<int> fds_;
  std::vector<std::thread> workers_;
};

// Pushes Pattern bytes from *off on into `fd` without blocking, until everything up to
// `total` is sent or the socket took nothing for `quiet_ms` (the path is full); at most 60 s.
void PushUntilHeldBack(int fd, uint64_t total, uint64_t* off, int quiet_ms) {
  std::vector<char> buf(256 * 1024);
  auto start = Clock::now();
  auto last = start;
  while (*off < total && ElapsedMs(last) < quiet_ms && ElapsedMs(start) < 60000) {
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    size_t chunk = std::min<uint64_t>(buf.size(), total - *off);
    Pattern(*off, buf.data(), chunk);
    ssize_t n = send(fd, buf.data(), chunk, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      *off += n;
      last = Clock::now();
    } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      return;
    }
  }
}

// Through `port` (a forward to a StallingBackend): pushes until held back, then lets the
// backend read, sends the rest and half-closes. The reply must cover every byte in order, and
// the backend's EOF must follow it. Returns the bytes pushed while the backend stalled.
uint64_t PushThroughAStall(int port, StallingBackend* backend, uint64_t total) {
  int fd = ConnectTcp(port, "127.0.0.1", 60000);
  EXPECT_GE(fd, 0);
  if (fd < 0) return 0;
  uint64_t off = 0;
  PushUntilHeldBack(fd, total, &off, 1500);
  uint64_t held = off;
  backend->Release();
  std::thread writer([&] {
    std::vector<char> buf(1 << 20);
    while (off < total) {
      size_t chunk = std::min<uint64_t>(buf.size(), total - off);
      Pattern(off, buf.data(), chunk);
      if (!SendAll(fd, buf.data(), chunk)) break;
      off += chunk;
    }
    shutdown(fd, SHUT_WR);  // the channel's EOF: the backend's read ends, and it answers
  });
  auto reply = ReadLine(fd);
  writer.join();
  EXPECT_EQ(off, total);
  EXPECT_EQ(reply.value_or("(closed)"), PatternHash(total) + " " + std::to_string(total));
  char c;
  EXPECT_EQ(recv(fd, &c, 1, 0), 0) << "the backend's EOF follows its answer";
  close(fd);
  return held;
}

// The daemon (as on the login node), sshd in front of it, and a client configuration whose
// remote_command reaches that daemon.
class ViaTest : public ::testing::Test {
 protected:
  ViaTest() : daemon_(dir_), sshd_(dir_) {}

  void SetUp() override {
    ASSERT_TRUE(daemon_.Start());
    ASSERT_TRUE(sshd_.Start());
    WriteFile(dir_ / "client.ini",
              "[client]\nremote_command = env BROKERPROXY_CONFIG=" + daemon_.config_path() + " " +
                  BinaryPath() + "\nproxy = 127.0.0.1:" + std::to_string(daemon_.proxy_port()) +
                  "\n");
  }

  // The client side: its own HOME, no agent unless asked.
  RunOptions ClientEnv(const std::string& agent_socket = "") const {
    RunOptions o;
    o.env = {"HOME=" + sshd_.home(), "SSH_AUTH_SOCK=" + agent_socket};
    o.timeout_ms = 60000;
    return o;
  }
  // `brokerproxy <args> -c client.ini --via <sshd>`
  std::vector<std::string> Via(std::vector<std::string> args) const {
    std::vector<std::string> argv = {BinaryPath()};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"-c", dir_ / "client.ini", "--via", sshd_.via()});
    return argv;
  }
  RunResult RunVia(std::vector<std::string> args, RunOptions o) const {
    return RunCommand(Via(std::move(args)), o);
  }
  RunResult RunVia(std::vector<std::string> args) const { return RunVia(args, ClientEnv()); }
  std::string KnownHosts() const { return sshd_.home() + "/.ssh/known_hosts"; }

  TempDir dir_;
  Daemon daemon_;
  LoginSshd sshd_;
};

TEST_F(ViaTest, CommandsThroughTheLoginNode) {
  // Unknown host key: refused, nothing written.
  RunResult unknown = RunVia({"query"});
  EXPECT_EQ(unknown.exit_code, 4) << unknown;
  EXPECT_NE(unknown.err.find("--accept-new-host-key"), std::string::npos) << unknown;
  EXPECT_NE(unknown.err.find(KnownHosts()), std::string::npos) << unknown;
  EXPECT_TRUE(ReadFile(KnownHosts()).empty());

  // Accepted and added; later calls need no flag. No agent: the identity file logs in.
  RunResult accepted = RunVia({"query", "--accept-new-host-key"});
  ASSERT_EQ(accepted.exit_code, 0) << accepted;
  EXPECT_NE(accepted.err.find("added the host key"), std::string::npos) << accepted;
  EXPECT_NE(ReadFile(KnownHosts()).find("ssh-ed25519"), std::string::npos);

  // save from a "compute node": the backend host defaults to this machine's name.
  RunResult save = RunVia({"save", "ssh", "--job-id", "via1", "--port", "5555", "--json"});
  ASSERT_EQ(save.exit_code, 0) << save;
  auto saved = ParseOut(save.out);
  ASSERT_TRUE(saved) << save;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  EXPECT_EQ(JsonText(saved.get(), {"job", "host"}), host);
  std::string secret = JsonText(saved.get(), {"job", "secret"});
  ASSERT_EQ(secret.size(), 64u);

  // The job is really in the login node's daemon.
  RunResult local = daemon_.Cli({"load", "via1", "--json"});
  ASSERT_EQ(local.exit_code, 0) << local;
  EXPECT_EQ(JsonText(ParseOut(local.out).get(), {"job", "secret"}), secret);

  // load: --json is the reply object itself; human and env output as if local.
  RunResult load = RunVia({"load", "via1", "--json"});
  ASSERT_EQ(load.exit_code, 0) << load;
  EXPECT_EQ(load.out, local.out);
  RunResult env = RunVia({"load", "via1", "--format", "env"});
  ASSERT_EQ(env.exit_code, 0) << env;
  EXPECT_NE(env.out.find("BROKER_SECRET=" + secret + "\n"), std::string::npos) << env;

  // verify: same answers and exit codes; the secret never appears on the remote command line.
  RunResult right = RunVia({"verify", "via1", secret});
  EXPECT_EQ(right.exit_code, 0) << right;
  EXPECT_EQ(right.out, "yes\n");
  std::string wrong_secret = secret;
  wrong_secret[0] = wrong_secret[0] == 'a' ? 'b' : 'a';
  RunResult wrong = RunVia({"verify", "via1", wrong_secret});
  EXPECT_EQ(wrong.exit_code, 1) << wrong;
  EXPECT_EQ(wrong.out, "no\n");
  EXPECT_EQ(sshd_.Log().find(secret), std::string::npos);

  RunResult query = RunVia({"query", "--json"});
  ASSERT_EQ(query.exit_code, 0) << query;
  EXPECT_NE(query.out.find("\"via1\""), std::string::npos) << query;
  EXPECT_EQ(query.out.find(secret), std::string::npos);

  RunResult stats = RunVia({"stats", "--json"});
  ASSERT_EQ(stats.exit_code, 0) << stats;
  EXPECT_EQ(JsonText(ParseOut(stats.out).get(), {"stats", "ssh_host_key"}).rfind("SHA256:", 0), 0u)
      << stats;

  // Errors keep their exit codes: remove, then a missing job is "not found" (5).
  RunResult remove = RunVia({"remove", "via1"});
  EXPECT_EQ(remove.exit_code, 0) << remove;
  RunResult gone = RunVia({"load", "via1"});
  EXPECT_EQ(gone.exit_code, 5) << gone;
  EXPECT_NE(gone.err.find("via1"), std::string::npos) << gone;
  RunResult gone_json = RunVia({"load", "via1", "--json"});
  EXPECT_EQ(gone_json.exit_code, 5) << gone_json;
  EXPECT_EQ(JsonText(ParseOut(gone_json.out).get(), {"code"}), "not_found") << gone_json;
  EXPECT_EQ(daemon_.Log().find(secret), std::string::npos) << "secrets never appear in logs";

  // A host alias from ~/.ssh/config.
  WriteFile(sshd_.home() + "/.ssh/config", "Host loginalias\n  HostName 127.0.0.1\n  Port " +
                                               std::to_string(sshd_.port()) + "\n  User root\n");
  std::vector<std::string> argv = {BinaryPath(),        "query", "-c",
                                   dir_ / "client.ini", "--via", "loginalias"};
  RunResult alias = RunCommand(argv, ClientEnv());
  EXPECT_EQ(alias.exit_code, 0) << alias;
}

TEST_F(ViaTest, SaveSslKeepsTheKeyOnThisSide) {
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  std::string certs = dir_ / "node-certs";
  RunResult save =
      RunVia({"save", "ssl", "--job-id", "web1", "--port", "8443", "--cert-dir", certs, "--json"});
  ASSERT_EQ(save.exit_code, 0) << save;
  auto saved = ParseOut(save.out);
  ASSERT_TRUE(saved) << save;
  // The key was made here and never left: the login node only signed the CSR.
  std::string key = JsonText(saved.get(), {"job", "key_path"});
  std::string cert = JsonText(saved.get(), {"job", "cert_path"});
  EXPECT_EQ(key, certs + "/web1.key");
  EXPECT_EQ(cert, certs + "/web1.crt");
  struct stat st {};
  ASSERT_EQ(stat(key.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_NE(ReadFile(key).find("PRIVATE KEY"), std::string::npos);
  EXPECT_NE(ReadFile(cert).find("BEGIN CERTIFICATE"), std::string::npos);
  EXPECT_EQ(sshd_.Log().find("PRIVATE KEY"), std::string::npos);
  // The login node's daemon knows the paths (as this node sees them) and nothing of the key.
  RunResult local = daemon_.Cli({"load", "web1", "--json"});
  ASSERT_EQ(local.exit_code, 0) << local;
  EXPECT_EQ(JsonText(ParseOut(local.out).get(), {"job", "key_path"}), key);
}

TEST_F(ViaTest, ChangedHostKeyIsRefused) {
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  sshd_.Stop();
  sshd_.NewHostKey();
  ASSERT_TRUE(sshd_.Start());
  for (bool accept : {false, true}) {
    std::vector<std::string> args = {"query"};
    if (accept) args.push_back("--accept-new-host-key");  // never overrides a changed key
    RunResult r = RunVia(args);
    EXPECT_EQ(r.exit_code, 4) << r;
    EXPECT_NE(r.err.find("CHANGED"), std::string::npos) << r;
    EXPECT_NE(r.err.find(KnownHosts()), std::string::npos) << r;
  }
}

TEST_F(ViaTest, AgentFirstThenIdentityFiles) {
  // A real ssh-agent holding the key, and no identity file left on disk: only the agent can
  // log in.
  std::string sock = dir_ / "agent.sock";
  auto agent = Child::Spawn({"ssh-agent", "-D", "-a", sock}, dir_ / "agent.log");
  ASSERT_TRUE(agent);
  ASSERT_TRUE(WaitUntil([&] { return access(sock.c_str(), F_OK) == 0; }, 5000))
      << ReadFile(dir_ / "agent.log");
  RunOptions with_agent = ClientEnv(sock);
  std::string key = sshd_.home() + "/.ssh/id_ed25519";
  RunResult add = RunCommand({"ssh-add", key}, with_agent);
  ASSERT_EQ(add.exit_code, 0) << add;
  ASSERT_EQ(rename(key.c_str(), (dir_ / "moved_key").c_str()), 0);
  ASSERT_EQ(rename((key + ".pub").c_str(), (dir_ / "moved_key.pub").c_str()), 0);

  RunResult via_agent = RunVia({"query", "--accept-new-host-key"}, with_agent);
  EXPECT_EQ(via_agent.exit_code, 0) << via_agent;
  RunResult no_agent = RunVia({"query"});
  EXPECT_EQ(no_agent.exit_code, 4) << no_agent;
  EXPECT_NE(no_agent.err.find("cannot log in"), std::string::npos) << no_agent;
  agent->Stop(SIGTERM, 5000);
}

// Through the login node too, the local client's first bytes follow the preamble in the same
// channel without waiting for "OK" (see ProxyTest.ConnectSendsWhatTheClientSaysFirst...).
TEST_F(ViaTest, ConnectSendsWhatTheClientSaysFirstWithThePreamble) {
  std::string secret = daemon_.SaveJob("cf", 1);
  ASSERT_FALSE(secret.empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  FakeProxy fake(6, 5000);
  auto connect = Child::Spawn(Via({"connect", "cf", "--listen", "0", "--proxy",
                                   "127.0.0.1:" + std::to_string(fake.port())}),
                              dir_ / "connect-early.log", ClientEnv());
  ASSERT_TRUE(connect);
  ExpectConnectSendsFirstBytesEarly(connect.get(), &fake, "BROKER1 cf " + secret + "\n");
}

// `connect --via` after its job was saved again (a new secret): the secret is loaded again
// through the login node and the refused connection retried; once the job is gone, it stops.
TEST_F(ViaTest, ConnectFollowsAResaveAndStopsWhenTheJobIsRemoved) {
  Backend backend;
  ASSERT_FALSE(daemon_.SaveJob("cr", backend.port()).empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  auto connect =
      Child::Spawn(Via({"connect", "cr", "--listen", "0"}), dir_ / "connect.log", ClientEnv());
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  auto echoes = [port](const std::string& text) { return EchoLine(port, text); };
  EXPECT_EQ(echoes("before"), "before") << connect->Output();
  RunResult again = daemon_.Cli(
      {"save", "ssh", "--job-id", "cr", "--port", std::to_string(backend.port()), "--replace"});
  ASSERT_EQ(again.exit_code, 0) << again;
  EXPECT_EQ(echoes("after the re-save"), "after the re-save") << connect->Output();
  ASSERT_EQ(daemon_.Cli({"remove", "cr"}).exit_code, 0);
  EXPECT_EQ(echoes("after the remove"), "(closed)");
  EXPECT_TRUE(connect->WaitFor("job cr is no longer registered", 30000)) << connect->Output();
  EXPECT_EQ(connect->Wait(30000), 5) << connect->Output();
}

// `connect --via` after a re-save, once the job is throttled (here by failures of the old
// secret): told "ERR busy", it loads the secret again through the login node all the same.
TEST_F(ViaTest, ConnectRecoversFromAJobTheOldSecretThrottled) {
  Backend backend;
  std::string old_secret = daemon_.SaveJob("ct", backend.port());
  ASSERT_FALSE(old_secret.empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  auto connect =
      Child::Spawn(Via({"connect", "ct", "--listen", "0"}), dir_ / "connect.log", ClientEnv());
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  auto echoes = [port](const std::string& text) { return EchoLine(port, text); };
  EXPECT_EQ(echoes("before"), "before") << connect->Output();
  RunResult again = daemon_.Cli(
      {"save", "ssh", "--job-id", "ct", "--port", std::to_string(backend.port()), "--replace"});
  ASSERT_EQ(again.exit_code, 0) << again;
  std::string reply;
  for (int i = 0; i < 12; ++i) {
    int fd = ConnectTcp(daemon_.proxy_port());
    ASSERT_GE(fd, 0);
    SendAll(fd, "BROKER1 ct " + old_secret + "\n");
    reply = ReadLine(fd).value_or("");
    close(fd);
  }
  ASSERT_EQ(reply, "ERR busy") << daemon_.Log();
  EXPECT_EQ(echoes("after the re-save"), "after the re-save") << connect->Output();
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// Through the login node too (see ExecModeTest.ConnectStopsAtOnceWhileTheSecretIsFetchedAgain):
// stopped while the remote call that fetches the secret again waits for a broker that does not
// answer, `connect` cuts that call short and exits at once.
TEST_F(ViaTest, ConnectStopsAtOnceWhileTheSecretIsFetchedAgain) {
  ASSERT_FALSE(daemon_.SaveJob("cs", 6000).empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  DenyingProxy proxy;
  ASSERT_NE(proxy.port(), 0);
  auto connect = Child::Spawn(Via({"connect", "cs", "--listen", "0", "--proxy",
                                   "127.0.0.1:" + std::to_string(proxy.port())}),
                              dir_ / "connect.log", ClientEnv());
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));

  std::string control = dir_ / "control.sock";
  ASSERT_EQ(PendingOnUnixSocket(control), 0);
  ASSERT_EQ(kill(daemon_.pid(), SIGSTOP), 0);
  int fd = ConnectTcp(port, "127.0.0.1", 30000);
  ASSERT_GE(fd, 0);
  // Denied, so `connect` runs `load` on the login node over a new ssh session; that command's
  // request waits in the (stopped) daemon's backlog.
  int pending = 0;
  WaitUntil([&] { return (pending = PendingOnUnixSocket(control)) != 0; }, 30000);
  EXPECT_EQ(pending, 1) << connect->Output();
  EXPECT_EQ(proxy.handshakes(), 1);
  auto start = std::chrono::steady_clock::now();
  // Well below the remote call's own 30 s timeout.
  EXPECT_EQ(connect->Stop(SIGTERM, 10000), 0) << connect->Output();
  std::printf("connect exited %lld ms after SIGTERM\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - start)
                                         .count()));
  ::close(fd);
  ASSERT_EQ(kill(daemon_.pid(), SIGCONT), 0);
}

TEST_F(ViaTest, ConnectCarriesManyConnectionsOverOneSession) {
  Backend backend;
  std::string secret = daemon_.SaveJob("cv", backend.port());
  ASSERT_FALSE(secret.empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  size_t logins_before = sshd_.Logins();

  RunOptions env = ClientEnv();
  auto connect = Child::Spawn(Via({"connect", "cv", "--listen", "0"}), dir_ / "connect.log", env);
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));

  // 50 concurrent local connections, each an echo with its own data.
  constexpr int kConns = 50;
  constexpr uint64_t kEach = 256 * 1024;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kConns; ++i) {
    threads.emplace_back([&] {
      int fd = ConnectTcp(port, "127.0.0.1", 60000);
      if (fd < 0 || !SendAll(fd, "echo\n")) return;
      EchoResult r = EchoTransfer(fd, kEach);
      close(fd);
      if (r.received_bytes == kEach && r.sent == r.received) good++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), kConns);
  EXPECT_EQ(sshd_.Logins(), logins_before + 1) << "one SSH session carries every connection";

  // 256 MiB each way, checked by hash; EOF travels through the channel both ways.
  constexpr uint64_t kBig = 256ull << 20;
  {
    int fd = ConnectTcp(port, "127.0.0.1", 120000);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(SendAll(fd, "upload\n"));
    std::thread writer([&] {
      std::vector<char> buf(1 << 20);
      for (uint64_t off = 0; off < kBig; off += buf.size()) {
        Pattern(off, buf.data(), buf.size());
        if (!SendAll(fd, buf.data(), buf.size())) break;
      }
      shutdown(fd, SHUT_WR);
    });
    auto reply = ReadLine(fd);
    writer.join();
    close(fd);
    ASSERT_TRUE(reply);
    EXPECT_EQ(*reply, PatternHash(kBig) + " " + std::to_string(kBig));
  }
  {
    int fd = ConnectTcp(port, "127.0.0.1", 120000);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(SendAll(fd, "download " + std::to_string(kBig) + "\n"));
    shutdown(fd, SHUT_WR);
    Sha256 sha;
    uint64_t total = 0;
    std::vector<char> buf(1 << 20);
    for (;;) {
      ssize_t n = recv(fd, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      sha.Update(buf.data(), n);
      total += n;
    }
    close(fd);
    EXPECT_EQ(total, kBig);
    EXPECT_EQ(sha.Hex(), PatternHash(kBig));
  }
  EXPECT_EQ(sshd_.Logins(), logins_before + 1);
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// Makes daemon `d` (not started yet) listen on `address` instead of the harness's default.
// connect --via's side of a channel: the local client pushes while the job's service reads
// nothing, so the login node's window closes and connect stops reading the local socket; it
// resumes (without a new edge on that socket) when the window reopens, and every byte arrives.
TEST_F(ViaTest, ConnectHoldsTheClientBackWhileTheBackendStalls) {
  StallingBackend backend;
  std::string secret = daemon_.SaveJob("cs", backend.port());
  ASSERT_FALSE(secret.empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  auto connect =
      Child::Spawn(Via({"connect", "cs", "--listen", "0"}), dir_ / "connect.log", ClientEnv());
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  constexpr uint64_t kTotal = 128ull << 20;
  uint64_t held = PushThroughAStall(port, &backend, kTotal);
  EXPECT_LT(held, 64ull << 20) << "the client was not held back";
  std::printf("pushed %llu KiB while the backend stalled\n",
              static_cast<unsigned long long>(held >> 10));
}

void ListenOn(const Daemon& d, const std::string& address) {
  std::string config = ReadFile(d.config_path());
  size_t at = config.find("listen = 127.0.0.1:0\n");
  ASSERT_NE(at, std::string::npos) << config;
  config.replace(at, 20, "listen = " + address);
  WriteFile(d.config_path(), config);
}

// The laptop's [client] proxy means nothing on the login node: `connect --via` dials the
// address the login node's daemon reports for its proxy, through the SSH session.
TEST_F(ViaTest, ConnectDialsTheProxyAddressTheLoginNodeReports) {
  Backend backend;
  ASSERT_FALSE(daemon_.SaveJob("cp", backend.port()).empty());
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  // The laptop's config names a proxy that refuses everyone.
  DenyingProxy elsewhere;
  WriteFile(dir_ / "client.ini",
            "[client]\nremote_command = env BROKERPROXY_CONFIG=" + daemon_.config_path() + " " +
                BinaryPath() + "\nproxy = 127.0.0.1:" + std::to_string(elsewhere.port()) + "\n");
  auto connect =
      Child::Spawn(Via({"connect", "cp", "--listen", "0"}), dir_ / "connect.log", ClientEnv());
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  EXPECT_NE(line->find("127.0.0.1:" + std::to_string(daemon_.proxy_port()) + " via ssh"),
            std::string::npos)
      << *line;
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  int fd = ConnectTcp(port, "127.0.0.1", 30000);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\n"));
  EchoResult r = EchoTransfer(fd, 1 << 20);
  close(fd);
  EXPECT_EQ(r.received_bytes, 1u << 20) << connect->Output();
  EXPECT_EQ(r.sent, r.received);
  EXPECT_EQ(elsewhere.handshakes(), 0);
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// The SSH socket of --via sends each small message at once (TCP_NODELAY): without it a new
// connection through the session waits for the delayed ACK of the previous segment.
TEST_F(ViaTest, TheSshSocketHasNoDelay) {
  auto target = cli::ParseSshTarget(sshd_.via());
  ASSERT_TRUE(target.ok());
  std::string saved_home = getenv("HOME") ? getenv("HOME") : "";
  setenv("HOME", sshd_.home().c_str(), 1);
  unsetenv("SSH_AUTH_SOCK");
  cli::SshClientOptions options;
  options.accept_new_host_key = true;
  auto session = cli::SshConnect(*target, options);
  setenv("HOME", saved_home.c_str(), 1);
  ASSERT_TRUE(session.ok()) << session.status().ToString();
  int nodelay = 0;
  socklen_t len = sizeof(nodelay);
  ASSERT_EQ(getsockopt(ssh_get_fd(session->get()), IPPROTO_TCP, TCP_NODELAY, &nodelay, &len), 0);
  EXPECT_NE(nodelay, 0);
}

// --via --tls: the secret, the proxy's port and the CA's fingerprint come over SSH; the
// tunnels go straight to the login host's proxy port over TLS (its wildcard listen address is
// the host reached by SSH), the CA checked against that fingerprint. Nothing is pinned.
TEST_F(ViaTest, ConnectTlsViaGoesStraightToTheProxyOverTls) {
  TempDir login;
  Daemon wide(login);
  ListenOn(wide, "0.0.0.0:0");
  ASSERT_TRUE(wide.Start());
  Backend backend;
  ASSERT_FALSE(wide.SaveJob("ct", backend.port()).empty());
  WriteFile(dir_ / "client.ini", "[client]\nremote_command = env BROKERPROXY_CONFIG=" +
                                     wide.config_path() + " " + BinaryPath() + "\n");
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  RunOptions env = ClientEnv();
  env.env.push_back("XDG_CONFIG_HOME=");
  auto connect =
      Child::Spawn(Via({"connect", "ct", "--tls", "--listen", "0"}), dir_ / "connect-tls.log", env);
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  EXPECT_NE(line->find("TLS to 127.0.0.1:" + std::to_string(wide.proxy_port())), std::string::npos)
      << *line;
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  int fd = ConnectTcp(port, "127.0.0.1", 30000);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\n"));
  EchoResult r = EchoTransfer(fd, 1 << 20);
  close(fd);
  EXPECT_EQ(r.received_bytes, 1u << 20) << connect->Output();
  EXPECT_EQ(r.sent, r.received);
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
  struct stat st {};
  EXPECT_NE(stat((sshd_.home() + "/.config/brokerproxy/known_cas").c_str(), &st), 0);

  // A proxy on loopback only cannot be reached from here: said so, with what to do instead.
  WriteFile(dir_ / "client.ini", "[client]\nremote_command = env BROKERPROXY_CONFIG=" +
                                     daemon_.config_path() + " " + BinaryPath() + "\n");
  ASSERT_FALSE(daemon_.SaveJob("cl", backend.port()).empty());
  RunResult loopback = RunVia({"connect", "cl", "--tls", "--listen", "0"}, env);
  EXPECT_EQ(loopback.exit_code, 2) << loopback;
  EXPECT_NE(loopback.err.find("use --via without --tls"), std::string::npos) << loopback;
}

// --via --tls trusts only the CA whose fingerprint the login node reported over SSH: another
// CA at the proxy address is refused before the secret goes anywhere.
TEST_F(ViaTest, ConnectTlsViaRefusesACaOtherThanTheLoginNodeReports) {
  TempDir login;
  Daemon wide(login);
  ListenOn(wide, "0.0.0.0:0");
  ASSERT_TRUE(wide.Start());
  Backend backend;
  ASSERT_FALSE(wide.SaveJob("cw", backend.port()).empty());
  // The login node's reply, with the fingerprint of another CA: a stand-in remote command
  // prints it.
  RunResult load = wide.Cli({"load", "cw", "--json"});
  ASSERT_EQ(load.exit_code, 0) << load;
  std::string reply = load.out.substr(0, load.out.find('\n'));
  size_t at = reply.find("SHA256:");
  ASSERT_NE(at, std::string::npos) << reply;
  std::string other = "SHA256:" + std::string(64, '0');
  reply.replace(at, other.size(), other);
  WriteFile(dir_ / "reply.json", reply + "\n");
  WriteFile(dir_ / "fake-remote.sh", "#!/bin/sh\ncat " + (dir_ / "reply.json") + "\n", 0755);
  ASSERT_EQ(RunVia({"query", "--accept-new-host-key"}).exit_code, 0);
  WriteFile(dir_ / "client.ini", "[client]\nremote_command = " + (dir_ / "fake-remote.sh") + "\n");
  RunOptions env = ClientEnv();
  env.env.push_back("XDG_CONFIG_HOME=");
  env.timeout_ms = 20000;  // a run that should fail at once, and would listen if it did not
  RunResult r = RunVia({"connect", "cw", "--tls", "--listen", "0"}, env);
  EXPECT_EQ(r.exit_code, 4) << r;
  EXPECT_NE(r.err.find("not the expected " + other), std::string::npos) << r;
  EXPECT_EQ(backend.connections(), 0);
}

// ---- the embedded endpoint, with the stock OpenSSH client ----

class EndpointTest : public ::testing::Test {
 protected:
  // The stock client: no config files, no keys, the secret from an askpass script.
  std::vector<std::string> Ssh(int proxy_port, const std::string& user,
                               const std::vector<std::string>& extra,
                               const std::vector<std::string>& command = {}) const {
    std::vector<std::string> argv = {"ssh",
                                     "-F",
                                     "/dev/null",
                                     "-p",
                                     std::to_string(proxy_port),
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
                                     "ConnectTimeout=10"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back(user + "@127.0.0.1");
    argv.insert(argv.end(), command.begin(), command.end());
    return argv;
  }
  RunOptions SecretEnv(const std::string& secret) {
    std::string script = dir_ / ("askpass" + std::to_string(++scripts_));
    WriteFile(script, "#!/bin/sh\necho '" + secret + "'\n", 0755);
    RunOptions o;
    o.env = {"SSH_ASKPASS=" + script, "SSH_ASKPASS_REQUIRE=force", "DISPLAY=:0",
             "HOME=" + (dir_ / "nohome"), "SSH_AUTH_SOCK="};
    o.timeout_ms = 30000;
    return o;
  }
  // `ssh -N -L PORT:<target>` in the background, one forward per entry of `targets` (a job's
  // forward names the port only as a placeholder: "job:1"); returns once the first forward
  // accepts, with the local ports in `*ports`. ssh -L cannot listen on port 0: StartOnFreePort
  // picks the first port (another one if it was taken before ssh bound it), the others are held
  // until ssh starts. Its output goes to log(); nullptr after a failed assertion.
  std::unique_ptr<Child> ForwardTo(int proxy_port, const std::string& user,
                                   const std::string& secret,
                                   const std::vector<std::string>& targets,
                                   std::vector<int>* ports) {
    std::unique_ptr<Child> child;
    int first = 0;
    ::testing::AssertionResult started = StartOnFreePort(
        [&](int port, std::string* why) {
          std::vector<std::unique_ptr<PortReservation>> more;
          ports->assign(1, port);
          while (ports->size() < targets.size()) {
            more.push_back(std::make_unique<PortReservation>());
            ports->push_back(more.back()->port());
          }
          std::vector<std::string> extra = {"-N"};
          for (size_t i = 0; i < targets.size(); ++i) {
            extra.push_back("-L");
            extra.push_back(std::to_string((*ports)[i]) + ":" + targets[i]);
          }
          more.clear();  // ssh binds them itself
          child = Child::Spawn(Ssh(proxy_port, user, extra),
                               dir_ / ("ssh" + std::to_string(++children_) + ".log"),
                               SecretEnv(secret));
          return WaitListening(&child, port, why);
        },
        &first);
    EXPECT_TRUE(started);
    return started ? std::move(child) : nullptr;
  }
  // ForwardTo the job `job` (named as the user too), `count` forwards.
  std::unique_ptr<Child> Forward(int proxy_port, const std::string& job, const std::string& secret,
                                 std::vector<int>* ports, size_t count = 1) {
    return ForwardTo(proxy_port, job, secret, std::vector<std::string>(count, job + ":1"), ports);
  }
  // The output of the last ssh started by ForwardTo.
  std::string log() const { return dir_ / ("ssh" + std::to_string(children_) + ".log"); }

  // A daemon (with `proxy_extra` in its [proxy] section), a backend registered as `job`, and
  // `ssh -N -L` to it; returns the forward's local port, or -1 after a failed assertion.
  int StartForwarded(const std::string& proxy_extra, const std::string& job) {
    daemon_ = std::make_unique<Daemon>(dir_, "", proxy_extra);
    backend_ = std::make_unique<Backend>();
    EXPECT_TRUE(daemon_->Start());
    std::string secret = daemon_->SaveJob(job, backend_->port());
    EXPECT_FALSE(secret.empty());
    std::vector<int> ports;
    ssh_ = Forward(daemon_->proxy_port(), job, secret, &ports);
    EXPECT_TRUE(ssh_) << daemon_->Log();
    return ssh_ ? ports[0] : -1;
  }

  TempDir dir_;
  int scripts_ = 0;
  int children_ = 0;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Child> ssh_;
};

TEST_F(EndpointTest, StockSshForwardsWithTheSecret) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("e1", backend.port());
  ASSERT_FALSE(secret.empty());
  std::vector<int> ports;
  auto ssh = Forward(d.proxy_port(), "e1", secret, &ports, 2);
  ASSERT_TRUE(ssh) << d.Log();
  const int p1 = ports[0], p2 = ports[1];

  // Several channels at once, over two forwards of one session, data checked by hash.
  constexpr int kConns = 6;
  constexpr uint64_t kEach = 8ull << 20;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kConns; ++i) {
    threads.emplace_back([&, i] {
      int fd = ConnectTcp(i % 2 ? p1 : p2, "127.0.0.1", 60000);
      if (fd < 0 || !SendAll(fd, "echo\n")) return;
      EchoResult r = EchoTransfer(fd, kEach);
      close(fd);
      if (r.received_bytes == kEach && r.sent == r.received) good++;
    });
  }
  // Meanwhile a download (backend -> client only) of its own.
  constexpr uint64_t kDown = 32ull << 20;
  std::string down_hash;
  uint64_t down_bytes = 0;
  threads.emplace_back([&] {
    int fd = ConnectTcp(p1, "127.0.0.1", 60000);
    if (fd < 0 || !SendAll(fd, "download " + std::to_string(kDown) + "\n")) return;
    shutdown(fd, SHUT_WR);
    Sha256 sha;
    std::vector<char> buf(1 << 20);
    for (ssize_t n; (n = recv(fd, buf.data(), buf.size(), 0)) > 0;) {
      sha.Update(buf.data(), n);
      down_bytes += n;
    }
    close(fd);
    down_hash = sha.Hex();
  });
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), kConns);
  EXPECT_EQ(down_bytes, kDown);
  EXPECT_EQ(down_hash, PatternHash(kDown));

  // The host key is the one in the state dir (0600), and stats shows its fingerprint.
  std::string key_path = d.state_dir() + "/ssh_host_ed25519_key";
  struct stat st {};
  ASSERT_EQ(stat(key_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  RunResult keygen = RunCommand({"ssh-keygen", "-lf", key_path});
  ASSERT_EQ(keygen.exit_code, 0) << keygen;
  std::string fingerprint = keygen.out.substr(keygen.out.find("SHA256:"));
  fingerprint = fingerprint.substr(0, fingerprint.find(' '));
  RunResult stats = d.Cli({"stats", "--json"});
  auto sj = ParseOut(stats.out);
  EXPECT_EQ(JsonText(sj.get(), {"stats", "ssh_host_key"}), fingerprint) << stats;
  std::string download_line = "download " + std::to_string(kDown) + "\n";
  EXPECT_EQ(JsonText(sj.get(), {"stats", "per_job", "e1", "bytes_up"}),
            std::to_string(kEach * kConns + download_line.size() + 5 * kConns /* "echo\n" */));
  EXPECT_NE(d.Log().find("ssh host key " + fingerprint), std::string::npos);
  ssh->Stop(SIGKILL);

  // Kept across restarts.
  d.Stop();
  ASSERT_TRUE(d.Start());
  EXPECT_NE(d.Log().find("ssh host key " + fingerprint), std::string::npos) << d.Log();
  EXPECT_EQ(d.Log().find(secret), std::string::npos) << "secrets never appear in logs";
}

// The user name and the forward's destination are job ids: any spelling is the one job.
TEST_F(EndpointTest, UserAndDestinationInAnyCaseReachTheJob) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("abc", backend.port());
  ASSERT_FALSE(secret.empty());
  std::vector<int> ports;
  auto ssh = Forward(d.proxy_port(), "ABC", secret, &ports);
  ASSERT_TRUE(ssh) << d.Log();
  const int port = ports[0];
  int fd = ConnectTcp(port);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\nhello\n"));
  EXPECT_EQ(ReadLine(fd), "hello") << d.Log();
  close(fd);
  ssh->Stop(SIGKILL);
}

TEST_F(EndpointTest, ChannelsToAServiceThatIsDownAreRefusedAndTheForwardGoesOn) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  PortReservation service;  // refused: nothing listens there yet
  const int service_port = service.port();
  std::string secret = d.SaveJob("e7", service_port);
  ASSERT_FALSE(secret.empty());
  std::vector<int> ports;
  auto ssh = Forward(d.proxy_port(), "e7", secret, &ports);  // its probe is refused too
  ASSERT_TRUE(ssh) << d.Log();
  const int port = ports[0];
  std::string ssh_log = log();
  int fd = ConnectTcp(port);
  ASSERT_GE(fd, 0);
  EXPECT_FALSE(ReadLine(fd).has_value());  // ssh closes the local connection
  close(fd);
  // The channel was refused, not opened and then closed: OpenSSH says so.
  EXPECT_TRUE(
      WaitUntil([&] { return ReadFile(ssh_log).find("open failed") != std::string::npos; }, 10000))
      << ReadFile(ssh_log) << d.Log();
  // The session is still there: once the service listens, the same forward reaches it.
  Backend::Options o;
  o.port = service_port;
  Backend backend(o);
  fd = ConnectTcp(port);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\nhello\n"));
  EXPECT_EQ(ReadLine(fd), "hello") << ReadFile(ssh_log) << d.Log();
  close(fd);
  ssh->Stop(SIGKILL);
}

TEST_F(EndpointTest, RefusesWrongSecretUnknownJobAndShell) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("e2", backend.port());
  ASSERT_FALSE(secret.empty());
  PortReservation never;  // no login here gets as far as forwarding: ssh never listens on it
  std::vector<std::string> forward = {"-N", "-L", std::to_string(never.port()) + ":e2:1"};

  std::string wrong = secret;
  wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
  RunResult bad = RunCommand(Ssh(d.proxy_port(), "e2", forward), SecretEnv(wrong));
  EXPECT_EQ(bad.exit_code, 255) << bad;
  EXPECT_NE(bad.err.find("Permission denied"), std::string::npos) << bad;

  RunResult unknown = RunCommand(Ssh(d.proxy_port(), "nosuchjob", forward), SecretEnv(secret));
  EXPECT_EQ(unknown.exit_code, 255) << unknown;
  EXPECT_NE(unknown.err.find("Permission denied"), std::string::npos) << unknown;

  // Right secret, but a shell (a session channel): refused.
  RunResult sh = RunCommand(Ssh(d.proxy_port(), "e2", {}, {"true"}), SecretEnv(secret));
  EXPECT_EQ(sh.exit_code, 255) << sh;
  EXPECT_NE(sh.err.find("open failed"), std::string::npos) << sh;

  // Right secret, but forwarding somewhere else than the job: the channel is refused.
  std::vector<int> ports;
  auto elsewhere = ForwardTo(d.proxy_port(), "e2", secret, {"127.0.0.1:22"}, &ports);
  ASSERT_TRUE(elsewhere);
  int fd = ConnectTcp(ports[0]);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(ReadToEof(fd), "");  // closed at once, nothing reached
  close(fd);
  // SIGKILL: OpenSSH 9.2's client loop can miss a SIGTERM that lands just before its poll().
  elsewhere->Stop(SIGKILL);
  EXPECT_NE(ReadFile(log()).find("administratively prohibited"), std::string::npos);
  EXPECT_EQ(backend.connections(), 0);

  // A client that keeps guessing in one connection is dropped after 6 failures (libssh itself
  // has no limit).
  // (ssh takes the first value of an option: these go before Ssh()'s own.)
  std::vector<std::string> argv = Ssh(d.proxy_port(), "e2", {"-N"});
  argv.insert(argv.begin() + 1,
              {"-o", "NumberOfPasswordPrompts=20", "-o", "PreferredAuthentications=password"});
  RunResult guesses = RunCommand(argv, SecretEnv(wrong));
  EXPECT_EQ(guesses.exit_code, 255) << guesses;
  EXPECT_NE(d.Log().find("reason=too many authentication failures"), std::string::npos) << d.Log();

  RunResult stats = d.Cli({"stats", "--json"});
  auto sj = ParseOut(stats.out);
  EXPECT_GE(std::stoi(JsonText(sj.get(), {"stats", "connections", "ssh_failures"})), 8) << stats;
  EXPECT_EQ(d.Log().find(secret), std::string::npos);
  EXPECT_EQ(d.Log().find(wrong), std::string::npos);
}

// Each channel holds a backend connection, so channels count against max_connections like
// connections do: a full proxy refuses both new channels and new clients, and a channel that
// ends gives its slot back.
TEST_F(EndpointTest, ChannelsCountAgainstMaxConnections) {
  int p = StartForwarded("max_connections = 4", "e5");  // the session: 1 of 4
  ASSERT_GE(p, 0);
  Daemon& d = *daemon_;
  Backend& backend = *backend_;

  // A channel that echoes one line, or -1.
  auto open_channel = [&] {
    int fd = ConnectTcp(p);
    if (fd < 0) return -1;
    std::optional<std::string> line;
    if (SendAll(fd, "echo\nping\n")) line = ReadLine(fd);
    if (line != "ping") {
      close(fd);
      return -1;
    }
    return fd;
  };
  // The same, retried for up to 5 s while a channel that just ended still holds its slot (the
  // slot returns once the daemon saw the channel go).
  auto open_channel_soon = [&] {
    int fd = -1;
    WaitUntil([&] { return (fd = open_channel()) >= 0; }, 5000);
    return fd;
  };
  std::vector<int> open;
  for (int i = 0; i < 3; ++i) {  // 2, 3 and 4 of 4 (Forward's probe channel may still be going)
    int fd = open_channel_soon();
    ASSERT_GE(fd, 0) << "channel " << i << "\n" << d.Log();
    open.push_back(fd);
  }
  int backends = backend.connections();

  // Full: a fourth channel is refused, and so is a new client on the proxy port.
  EXPECT_EQ(open_channel(), -1);
  EXPECT_NE(d.Log().find("refused a channel: the proxy is at max_connections"), std::string::npos)
      << d.Log();
  int plain = ConnectTcp(d.proxy_port());
  ASSERT_GE(plain, 0);
  EXPECT_EQ(ReadLine(plain), "ERR busy");
  close(plain);
  EXPECT_EQ(backend.connections(), backends) << "a refused channel reaches no backend";

  // A channel ends and its slot comes back.
  close(open.back());
  open.pop_back();
  int again = open_channel_soon();
  EXPECT_GE(again, 0) << d.Log();
  if (again >= 0) open.push_back(again);
  for (int fd : open) close(fd);

  RunResult stats = d.Cli({"stats", "--json"});
  auto sj = ParseOut(stats.out);
  EXPECT_GE(std::stoi(JsonText(sj.get(), {"stats", "connections", "busy"})), 2) << stats;
  ssh_->Stop(SIGKILL);
}

// half_close_timeout applies to each channel as to a plain session: a channel whose backend
// finished while the client stays silent ends, with its backend connection, and the other
// channels of the session go on.
TEST_F(EndpointTest, HalfClosedChannelTimesOutAlone) {
  int p = StartForwarded("half_close_timeout = 1s", "e6");
  ASSERT_GE(p, 0);
  Daemon& d = *daemon_;
  int open = ConnectTcp(p);  // an ordinary channel, left open and idle
  ASSERT_GE(open, 0);
  ASSERT_TRUE(SendAll(open, "echo\nping\n"));
  ASSERT_EQ(ReadLine(open), "ping");
  int half = ConnectTcp(p);
  ASSERT_GE(half, 0);
  ASSERT_TRUE(SendAll(half, "download 5\n"));  // 5 bytes, then the backend shuts down writing
  EXPECT_EQ(ReadToEof(half).size(), 5u);
  auto eof_at = Clock::now();

  auto active = [&] {
    auto sj = ParseOut(d.Cli({"stats", "--json"}).out);
    return JsonText(sj.get(), {"stats", "per_job", "e6", "active"});
  };
  EXPECT_TRUE(
      WaitUntil([&] { return d.Log().find(": half-close timeout") != std::string::npos; }, 10000))
      << d.Log();
  EXPECT_GE(Clock::now() - eof_at, std::chrono::milliseconds(1000));
  std::string now_active;
  WaitUntil([&] { return (now_active = active()) == "1"; }, 5000);
  EXPECT_EQ(now_active, "1") << "only the open channel is left";
  close(half);

  // The open channel and its session are untouched.
  ASSERT_TRUE(SendAll(open, "pong\n"));
  EXPECT_EQ(ReadLine(open), "pong");
  close(open);
  EXPECT_EQ(d.Log().find("reason=idle timeout"), std::string::npos) << "the session stayed";
  auto sj = ParseOut(d.Cli({"stats", "--json"}).out);
  EXPECT_EQ(JsonText(sj.get(), {"stats", "connections", "idle_closed"}), "1");
  ssh_->Stop(SIGKILL);
}

// The endpoint's side of a channel, towards a backend that stops reading: the daemon holds at
// most kToSocketCap, leaves the rest in libssh and stops growing the window, so the client is
// held back (and the daemon's memory, measured in bench/, stays bounded); once the backend
// reads, the bytes that waited go out on the socket's writable edge, all of them, in order; the
// client's EOF reaches the backend as SHUT_WR and its answer still comes back.
TEST_F(EndpointTest, StalledBackendHoldsTheClientBackThenGetsEverything) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  StallingBackend backend;
  std::string secret = d.SaveJob("e7", backend.port());
  ASSERT_FALSE(secret.empty());
  std::vector<int> ports;
  auto ssh = Forward(d.proxy_port(), "e7", secret, &ports);
  ASSERT_TRUE(ssh) << d.Log();
  const int p = ports[0];

  constexpr uint64_t kTotal = 128ull << 20;
  uint64_t held = PushThroughAStall(p, &backend, kTotal);
  EXPECT_LT(held, 64ull << 20) << "the client was not held back";
  std::printf("pushed %llu KiB while the backend stalled\n",
              static_cast<unsigned long long>(held >> 10));
  ssh->Stop(SIGKILL);
}

// A client that half-closes its channel: the backend sees EOF (SHUT_WR on its socket, not a
// close), answers, and the answer and then the backend's EOF come back through the channel.
TEST_F(EndpointTest, HalfClosedChannelStillGetsTheReply) {
  int p = StartForwarded("", "e8");
  ASSERT_GE(p, 0);
  for (uint64_t size : {uint64_t{1}, uint64_t{3} << 20}) {
    int fd = ConnectTcp(p, "127.0.0.1", 30000);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(SendAll(fd, "upload\n"));
    std::vector<char> buf(size);
    Pattern(0, buf.data(), buf.size());
    ASSERT_TRUE(SendAll(fd, buf.data(), buf.size()));
    ASSERT_EQ(shutdown(fd, SHUT_WR), 0);
    EXPECT_EQ(ReadLine(fd).value_or("(closed)"), PatternHash(size) + " " + std::to_string(size));
    char c;
    EXPECT_EQ(recv(fd, &c, 1, 0), 0);
    close(fd);
  }
  EXPECT_EQ(EchoLine(p, "still here"), "still here") << "the session goes on";
  ssh_->Stop(SIGKILL);
}

TEST_F(EndpointTest, StalledKeyExchangeTimesOutWhileOthersFlow) {
  Daemon d(dir_, "", "handshake_timeout = 2s\n");
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("e3", backend.port());
  std::vector<int> ports;
  auto ssh = Forward(d.proxy_port(), "e3", secret, &ports);
  ASSERT_TRUE(ssh) << d.Log();
  const int p = ports[0];

  // Two clients stop mid-handshake: one after its banner, one inside its KEXINIT packet.
  auto start = Clock::now();
  int stalled[2];
  for (int i = 0; i < 2; ++i) {
    stalled[i] = ConnectTcp(d.proxy_port());
    ASSERT_GE(stalled[i], 0);
    ASSERT_TRUE(SendAll(stalled[i], "SSH-2.0-stall\r\n"));
    auto banner = ReadLine(stalled[i]);
    ASSERT_TRUE(banner);
    EXPECT_EQ(banner->rfind("SSH-2.0-brokerproxy", 0), 0u) << *banner;
  }
  ASSERT_TRUE(SendAll(stalled[1], std::string("\x00\x00\x01\x00\x0a\x14", 6)));  // partial

  // Meanwhile the authenticated session keeps moving data.
  int fd = ConnectTcp(p, "127.0.0.1", 30000);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\n"));
  EchoResult r = EchoTransfer(fd, 16ull << 20);
  close(fd);
  EXPECT_EQ(r.sent, r.received);

  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(ReadToEof(stalled[i]).find("SSH-"), std::string::npos);  // EOF, not more data
    close(stalled[i]);
  }
  int64_t ms = ElapsedMs(start);
  EXPECT_GE(ms, 1500);
  EXPECT_LT(ms, 8000);
  // Each session logs its line right after releasing its socket.
  WaitUntil([&] { return CountOf(d.Log(), "reason=handshake timeout") >= 2; }, 5000);
  EXPECT_EQ(CountOf(d.Log(), "reason=handshake timeout"), 2u) << d.Log();

  // And the session still works afterwards.
  fd = ConnectTcp(p, "127.0.0.1", 30000);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\n"));
  r = EchoTransfer(fd, 1 << 20);
  close(fd);
  EXPECT_EQ(r.sent, r.received);
  EXPECT_EQ(r.received_bytes, 1u << 20);
}

// Pushes into `fd` without reading until `stop` (or an error), counting in `*pushed` the bytes
// the socket took.
void PushUntil(int fd, const std::atomic<bool>& stop, std::atomic<uint64_t>* pushed) {
  std::vector<char> buf(256 * 1024);
  Pattern(0, buf.data(), buf.size());
  while (!stop) {
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    ssize_t n = send(fd, buf.data(), buf.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) *pushed += n;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) break;
  }
}

// Slow sides hold the other back through the channel's window instead of piling up in the
// daemon: the fast side gets rid of no more than the buffers and windows on the way hold, where
// a daemon that read on and buffered would take everything. The daemon's memory itself is
// measured in bench/, never bounded in a test.
TEST_F(EndpointTest, SlowSidesAreHeldBackThroughTheWindow) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("e4", backend.port());
  std::vector<int> ports;
  auto ssh = Forward(d.proxy_port(), "e4", secret, &ports);
  ASSERT_TRUE(ssh) << d.Log();
  const int p = ports[0];
  // Far more than the sockets, ssh's buffers and the channel windows on the way hold.
  constexpr uint64_t kOnTheWay = 64ull << 20;
  {
    int fd = ConnectTcp(p);
    ASSERT_TRUE(SendAll(fd, "echo\n"));
    EXPECT_EQ(EchoTransfer(fd, 4 << 20).received_bytes, 4u << 20);
    close(fd);
  }

  // The backend reads slowly (64 KiB per 10 ms): the client is held back.
  int up = ConnectTcp(p);
  ASSERT_GE(up, 0);
  ASSERT_TRUE(SendAll(up, "slowread\n"));
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> pushed{0};
  std::thread writer([&] { PushUntil(up, stop, &pushed); });
  uint64_t taken = WaitUntilStill([&] { return pushed.load(); });
  EXPECT_LT(taken, kOnTheWay) << "the writer was not held back";
  stop = true;
  writer.join();
  close(up);

  // The client does not read a large download: the daemon reads the backend only as the
  // client's window allows, so the backend is held back.
  constexpr uint64_t kDown = 256ull << 20;
  int down = ConnectTcp(p, "127.0.0.1", 60000);
  ASSERT_TRUE(SendAll(down, "download " + std::to_string(kDown) + "\n"));
  uint64_t sent = WaitUntilStill([&] { return backend.sent(); });
  EXPECT_LT(sent, kOnTheWay) << "the daemon kept reading the backend";
  // Then everything arrives intact.
  Sha256 sha;
  uint64_t total = 0;
  std::vector<char> buf(1 << 20);
  shutdown(down, SHUT_WR);
  for (ssize_t n; (n = recv(down, buf.data(), buf.size(), 0)) > 0;) {
    sha.Update(buf.data(), n);
    total += n;
  }
  close(down);
  EXPECT_EQ(total, kDown);
  EXPECT_EQ(sha.Hex(), PatternHash(kDown));
  ssh->Stop(SIGKILL);
}

}  // namespace
}  // namespace brokerproxy::testing
