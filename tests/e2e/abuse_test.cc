// The proxy port under abuse by other users of the login node, end to end: the real daemon,
// real Unix users (bp-alice owns the job, bp-bob attacks it), a libssh client for what the stock
// ssh client will not send (user names with line breaks, 250 KB user names).

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <libssh/libssh.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"
#include "support/socket_as.h"

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

// Becomes `uid` (its primary group, no supplementary groups); false on failure.
bool BecomeUser(uid_t uid) {
  gid_t gid = PrimaryGid(uid);
  return setgroups(0, nullptr) == 0 && setresgid(gid, gid, gid) == 0 &&
         setresuid(uid, uid, uid) == 0;
}

// Runs `fn` in a child process as `uid`, so the proxy sees that user own the client sockets;
// returns fn's result, or -1 if the child failed or ran past `timeout_ms` (then it is killed).
int AsUser(uid_t uid, const std::function<int()>& fn, int timeout_ms = 60000) {
  pid_t pid = fork();
  if (pid == 0) _exit(BecomeUser(uid) ? fn() : 100);
  if (pid < 0) return -1;
  int status = 0;
  if (!WaitUntil([&] { return waitpid(pid, &status, WNOHANG) != 0; }, timeout_ms)) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// One plain handshake: the proxy's reply line ("OK", "ERR denied", ...; "" if none). With
// `keep_fd`, an admitted connection is left open there.
std::string Preamble(int port, const std::string& line, int* keep_fd = nullptr) {
  int fd = ConnectTcp(port);
  if (fd < 0) return "";
  std::string reply;
  if (SendAll(fd, line)) reply = ReadLine(fd).value_or("");
  if (keep_fd && reply == "OK") {
    *keep_fd = fd;
  } else {
    close(fd);
  }
  return reply;
}

// The log's lines, without the "<time> <level> " prefix where there is one.
std::vector<std::string> LogMessages(const std::string& log) {
  std::vector<std::string> out;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] < '0' || line[0] > '9') {
      out.push_back(line);  // no prefix: the line began inside the previous message
      continue;
    }
    size_t at = line.find(' ');
    if (at != std::string::npos) at = line.find_first_not_of(' ', at + 1);
    if (at != std::string::npos) at = line.find(' ', at);
    if (at != std::string::npos) at = line.find_first_not_of(' ', at);  // "warn " is padded
    out.push_back(at == std::string::npos ? line : line.substr(at));
  }
  return out;
}

const std::string kWrongSecret(64, 'a');

class AbuseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto alice = TestUser("bp-alice");
    auto bob = TestUser("bp-bob");
    if (!alice || !bob || !CanRunAs(*alice) || !CanRunAs(*bob)) {
      GTEST_SKIP() << "cannot create or become the test users";
    }
    alice_ = *alice;
    bob_ = *bob;
    backend_ = std::make_unique<Backend>(Backend::OwnedBy(alice_));
  }

  uid_t alice_ = 0;
  uid_t bob_ = 0;
  TempDir dir_;
  std::unique_ptr<Backend> backend_;  // alice's
};

// ---- the throttle never refuses a correct secret ----

TEST_F(AbuseTest, WrongSecretsFromAnotherUserNeverLockOutTheOwner) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunOptions as_alice;
  as_alice.uid = alice_;
  std::string secret = d.SaveJob("alicejob", backend_->port(), "ssh", as_alice);
  ASSERT_FALSE(secret.empty()) << d.Log();
  int port = d.proxy_port();

  // Bob fails 100 times at alice's job: ten were enough to throttle it.
  int bad = AsUser(bob_, [&] {
    for (int i = 0; i < 100; ++i) {
      std::string r = Preamble(port, "BROKER1 alicejob " + kWrongSecret + "\n");
      if (r != "ERR denied" && r != "ERR busy") return 1;
    }
    return 0;
  });
  EXPECT_EQ(bad, 0) << d.Log();

  // Alice's right secret is admitted at once, and her service answers; a wrong one is not.
  auto start = Clock::now();
  int owner = AsUser(alice_, [&] {
    int fd = -1;
    if (Preamble(port, "BROKER1 alicejob " + secret + "\necho\nping\n", &fd) != "OK") return 1;
    std::optional<std::string> echoed = ReadLine(fd);
    close(fd);
    if (echoed != "ping") return 2;
    std::string wrong = Preamble(port, "BROKER1 alicejob " + kWrongSecret + "\n");
    if (wrong != "ERR denied" && wrong != "ERR busy") return 3;
    return 0;
  });
  EXPECT_EQ(owner, 0) << "1: the owner was refused\n" << d.Log();
  EXPECT_LT(ElapsedMs(start), 5000) << "the owner must not wait for the throttle";
  // Bob's failures are his: one line for the job's episode and one for bob, none for alice.
  std::string log = d.Log();
  EXPECT_EQ(CountOf(log, "throttling job alicejob:"), 1u) << log;
  EXPECT_EQ(CountOf(log, "throttling local user " + std::to_string(bob_) + ":"), 1u) << log;
  EXPECT_EQ(CountOf(log, "throttling local user " + std::to_string(alice_) + ":"), 0u) << log;
}

TEST_F(AbuseTest, BadPreamblesAndHandshakeTimeoutsCountAgainstTheirSource) {
  Daemon d(dir_, "", "handshake_timeout = 300ms\n");
  ASSERT_TRUE(d.Start());
  int port = d.proxy_port();
  // Bob sends 25 malformed preambles: throttled once (one line), however many follow.
  int bad = AsUser(bob_, [&] {
    for (int i = 0; i < 25; ++i) {
      if (Preamble(port, "BROKER1 no/such/job x\n") != "ERR bad-request") return 1;
    }
    return 0;
  });
  EXPECT_EQ(bad, 0) << d.Log();
  // Alice opens connections and says nothing: each times out, and that counts too.
  int silent = AsUser(alice_, [&] {
    std::vector<int> fds;
    for (int i = 0; i < 12; ++i) fds.push_back(ConnectTcp(port));
    int rc = 0;
    for (int fd : fds) {
      if (fd < 0 || ReadLine(fd).value_or("") != "ERR timeout") rc = 1;
      if (fd >= 0) close(fd);
    }
    return rc;
  });
  EXPECT_EQ(silent, 0) << d.Log();
  std::string bob_line = "throttling local user " + std::to_string(bob_) + ":";
  std::string alice_line = "throttling local user " + std::to_string(alice_) + ":";
  WaitUntil([&] { return CountOf(d.Log(), alice_line) != 0; }, 5000);
  std::string log = d.Log();
  EXPECT_EQ(CountOf(log, bob_line), 1u) << log;
  EXPECT_EQ(CountOf(log, alice_line), 1u) << log;
}

// An IPv4 address of this host other than loopback ("" if none): connections to it from here
// arrive from it, so the proxy sees a remote source.
std::string NonLoopbackAddress() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return "";
  std::string found;
  for (ifaddrs* i = list; i && found.empty(); i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP) ||
        (i->ifa_flags & IFF_LOOPBACK)) {
      continue;
    }
    char buf[INET_ADDRSTRLEN];
    if (inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, buf,
                  sizeof(buf))) {
      found = buf;
    }
  }
  freeifaddrs(list);
  return found;
}

TEST_F(AbuseTest, RemoteSourceIsThrottledWithOneFail2banLine) {
  std::string addr = NonLoopbackAddress();
  if (addr.empty()) GTEST_SKIP() << "no address other than loopback";
  // The proxy listens on that address alone, on a port it picks and reports.
  Daemon d(dir_);
  std::string config = ReadFile(d.config_path());
  size_t at = config.find("listen = 127.0.0.1:0\n");
  ASSERT_NE(at, std::string::npos) << config;
  config.replace(at, 20, "listen = " + addr + ":0");
  WriteFile(d.config_path(), config);
  ASSERT_TRUE(d.Start());
  int port = d.proxy_port();
  ASSERT_GT(port, 0) << d.Log();
  // Malformed preambles name no job: they count against the address alone.
  for (int i = 0; i < 15; ++i) {
    int fd = ConnectTcp(port, addr);
    ASSERT_GE(fd, 0);
    EXPECT_TRUE(SendAll(fd, "BROKER1 no/such/job x\n"));
    EXPECT_EQ(ReadLine(fd).value_or(""), "ERR bad-request");
    close(fd);
  }
  std::string line = "throttling " + addr + ": 10 failed handshakes within 1m";
  std::string log = d.Log();
  EXPECT_EQ(CountOf(log, line), 1u) << log;
  // The line fail2ban's "throttling <HOST>:" matches is the whole message.
  size_t matching = 0;
  for (const std::string& m : LogMessages(log)) matching += m.rfind("throttling ", 0) == 0;
  EXPECT_EQ(matching, 1u) << log;
}

// ---- handshakes in progress cannot crowd the owner out ----

// Bob opens 100 connections and says nothing while alice connects: her good preamble must not
// get ERR busy. `proxy_extra` sets the limits under test.
void ExpectOwnerGetsInDespiteSlowloris(const TempDir& dir, const Backend& backend, uid_t alice,
                                       uid_t bob, const std::string& proxy_extra) {
  Daemon d(dir, "", "max_connections = 64\nhandshake_timeout = 60s\n" + proxy_extra);
  ASSERT_TRUE(d.Start());
  RunOptions as_alice;
  as_alice.uid = alice;
  std::string secret = d.SaveJob("alicejob", backend.port(), "ssh", as_alice);
  ASSERT_FALSE(secret.empty()) << d.Log();
  int port = d.proxy_port();

  // Bob holds his connections until the test closes `stop`.
  int ready[2], stop[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(stop), 0);
  pid_t pid = fork();
  if (pid == 0) {
    close(ready[0]);
    close(stop[1]);
    if (!BecomeUser(bob)) _exit(1);
    std::vector<int> fds;
    for (int i = 0; i < 100; ++i) fds.push_back(ConnectTcp(port));
    char c = 'r';
    (void)!write(ready[1], &c, 1);
    (void)!read(stop[0], &c, 1);  // EOF when the test ends, whatever happens
    _exit(0);
  }
  close(ready[1]);
  close(stop[0]);
  char c = 0;
  EXPECT_EQ(read(ready[0], &c, 1), 1) << "bob's connections";
  // Wait until the daemon has taken in all of bob's connections (accepted or turned away).
  auto accepted = [&] {
    std::string n =
        JsonText(ParseOut(d.Cli({"stats", "--json"})).get(), {"stats", "connections", "accepted"});
    return n.empty() ? 0 : std::stoi(n);
  };
  WaitUntil([&] { return accepted() >= 100; }, 10000);
  int owner = AsUser(alice, [&] {
    int fd = -1;
    std::string r = Preamble(port, "BROKER1 alicejob " + secret + "\necho\nping\n", &fd);
    if (r == "ERR busy") return 1;
    if (r != "OK") return 2;
    std::optional<std::string> echoed = ReadLine(fd);
    close(fd);
    return echoed == "ping" ? 0 : 3;
  });
  close(stop[1]);
  close(ready[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_EQ(owner, 0) << "1: ERR busy\n" << d.Log();
}

TEST_F(AbuseTest, SlowlorisOfAnotherUserDoesNotMakeTheOwnerBusy) {
  // Bob's own cap: 8 handshakes at a time; the rest of his connections are turned away.
  ExpectOwnerGetsInDespiteSlowloris(dir_, *backend_, alice_, bob_,
                                    "max_handshakes_per_source = 8\n");
}

TEST_F(AbuseTest, HandshakesNeverTakeMoreThanTheirShare) {
  // No per-source cap (as if bob had many addresses): handshakes may fill only half of
  // max_connections, and a new one evicts the oldest, so alice's gets through.
  ExpectOwnerGetsInDespiteSlowloris(dir_, *backend_, alice_, bob_,
                                    "max_handshakes_per_source = 0\nhandshake_share = 50\n");
}

// A local client's owner is looked up only once an answer depends on it (Proxy::OnAccept), yet
// the per-source cap holds: bob's first two handshakes are taken in while fewer than the cap are
// in progress, so nobody looks up their owner; his third finds the cap reached, which settles
// the owners of all three, and is turned away; alice, the same moment, is not.
TEST_F(AbuseTest, PerSourceCapHoldsThoughLocalOwnersAreLookedUpLate) {
  Daemon d(dir_, "", "max_handshakes_per_source = 2\nhandshake_timeout = 60s\n");
  ASSERT_TRUE(d.Start());
  RunOptions as_alice;
  as_alice.uid = alice_;
  std::string secret = d.SaveJob("alicejob", backend_->port(), "ssh", as_alice);
  ASSERT_FALSE(secret.empty()) << d.Log();
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  to.sin_port = htons(static_cast<uint16_t>(d.proxy_port()));
  std::vector<int> fds;
  auto connect_as = [&](uid_t uid) {
    int fd = SocketAs(uid, AF_INET);
    if (fd >= 0) fds.push_back(fd);
    return fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)) == 0 ? fd : -1;
  };
  auto accepted = [&] {
    std::string n =
        JsonText(ParseOut(d.Cli({"stats", "--json"})).get(), {"stats", "connections", "accepted"});
    return n.empty() ? 0 : std::stoi(n);
  };
  for (int i = 0; i < 2; ++i) {
    int fd = connect_as(bob_);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(SendAll(fd, "BROKER1 "));  // a handshake that goes no further
    ASSERT_TRUE(WaitUntil([&] { return accepted() >= i + 1; })) << d.Log();
  }
  int third = connect_as(bob_);
  ASSERT_GE(third, 0);
  EXPECT_EQ(ReadLine(third), "ERR busy") << d.Log();
  int mine = connect_as(alice_);
  ASSERT_GE(mine, 0);
  ASSERT_TRUE(SendAll(mine, "BROKER1 alicejob " + secret + "\necho\nping\n"));
  EXPECT_EQ(ReadLine(mine), "OK") << d.Log();
  EXPECT_EQ(ReadLine(mine), "ping");
  for (int fd : fds) ::close(fd);
}

// ---- a libssh client ----

// A libssh client session to 127.0.0.1:port, blocking, with a 10 s timeout.
struct SshClient {
  ssh_session s = nullptr;
  ~SshClient() {
    if (s) {
      ssh_disconnect(s);
      ssh_free(s);
    }
  }
  bool Connect(int port, const std::string& user) {
    s = ssh_new();
    if (!s) return false;
    unsigned int p = static_cast<unsigned int>(port);
    long timeout = 10;
    bool no = false;
    ssh_options_set(s, SSH_OPTIONS_PROCESS_CONFIG, &no);
    ssh_options_set(s, SSH_OPTIONS_HOST, "127.0.0.1");
    ssh_options_set(s, SSH_OPTIONS_PORT, &p);
    ssh_options_set(s, SSH_OPTIONS_TIMEOUT, &timeout);
    ssh_options_set(s, SSH_OPTIONS_USER, user.c_str());
    return ssh_connect(s) == SSH_OK;
  }
  bool Login(int port, const std::string& user, const std::string& password) {
    return Connect(port, user) &&
           ssh_userauth_password(s, nullptr, password.c_str()) == SSH_AUTH_SUCCESS;
  }
  // A direct-tcpip channel to `job`, or nullptr.
  ssh_channel Forward(const std::string& job) {
    ssh_channel ch = ssh_channel_new(s);
    if (!ch) return nullptr;
    if (ssh_channel_open_forward(ch, job.c_str(), 1, "127.0.0.1", 5555) != SSH_OK) {
      ssh_channel_free(ch);
      return nullptr;
    }
    return ch;
  }
  // Channels to `job` keep opening for 10 s: false as soon as one is refused.
  bool KeepsOpening(const std::string& job) {
    return !WaitUntil(
        [&] {
          ssh_channel ch = Forward(job);
          if (ch == nullptr) return true;
          ssh_channel_close(ch);
          ssh_channel_free(ch);
          return false;
        },
        10000);
  }
};

// Through a channel to the echo backend: true if "ping" comes back.
bool Echoes(ssh_channel ch) {
  std::string out = "echo\nping\n";
  if (ssh_channel_write(ch, out.data(), out.size()) != static_cast<int>(out.size())) return false;
  std::string got;
  char buf[64];
  auto start = Clock::now();
  while (got.find("ping\n") == std::string::npos && ElapsedMs(start) < 10000) {
    int n = ssh_channel_read_timeout(ch, buf, sizeof(buf), 0, 1000);
    if (n < 0) return false;
    got.append(buf, static_cast<size_t>(n));
    if (n == 0 && ssh_channel_is_eof(ch)) break;
  }
  return got == "ping\n";
}

// ---- logs: nothing a peer sends can forge a line ----

TEST_F(AbuseTest, SshUserNamesCannotForgeLogLines) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  const std::string forged = "throttling 198.51.100.7: 10 failed handshakes within 1m";
  const std::string user = "x\n" + forged;
  // More failures than throttle_failures, one connection each (each attempt pauses the next).
  for (int i = 0; i < 12; ++i) {
    SshClient c;
    ASSERT_TRUE(c.Connect(d.proxy_port(), user)) << d.Log();
    EXPECT_NE(ssh_userauth_password(c.s, nullptr, kWrongSecret.c_str()), SSH_AUTH_SUCCESS);
  }
  std::string log = d.Log();
  for (const std::string& m : LogMessages(log)) {
    EXPECT_NE(m.rfind("throttling 198.51.100.7", 0), 0u) << "forged line: " << m;
  }
  EXPECT_EQ(log.find("198.51.100.7"), std::string::npos) << log;
  EXPECT_EQ(log.find(user), std::string::npos) << log;
}

TEST_F(AbuseTest, LongSshUserNamesKeepMemoryBounded) {
  Daemon d(dir_);
  // ASan's quarantine keeps freed buffers for a while: a small one shows the daemon's growth.
  d.set_launcher({"env", "ASAN_OPTIONS=quarantine_size_mb=1:detect_leaks=0:halt_on_error=1"});
  ASSERT_TRUE(d.Start());
  int port = d.proxy_port();
  size_t before = d.RssBytes();
  // 4 clients in parallel, 400 connections, each with a distinct 250 KB user name: the old
  // throttle kept every name as a key (100 MB here).
  std::vector<std::thread> clients;
  std::atomic<int> connected{0};
  auto start = Clock::now();
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      for (int i = 0; i < 100 && ElapsedMs(start) < 120000; ++i) {
        std::string user(250 * 1000, static_cast<char>('a' + (t * 100 + i) % 26));
        user += std::to_string(t * 1000 + i);
        SshClient c;
        if (!c.Connect(port, user)) continue;
        connected++;
        (void)ssh_userauth_password(c.s, nullptr, "00");
      }
    });
  }
  for (auto& c : clients) c.join();
  EXPECT_GE(connected.load(), 300) << d.Log().substr(0, 4000);
  size_t after = d.RssBytes();
  EXPECT_LT(after, before + 40u * 1024 * 1024)
      << "RSS grew from " << before / 1024 << " KiB to " << after / 1024 << " KiB";
}

// ---- an SSH session follows its job ----

TEST_F(AbuseTest, SshSessionEndsWhenItsJobIsRemovedOrReplaced) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  int port = d.proxy_port();
  std::string secret = d.SaveJob("job7", backend_->port());
  ASSERT_FALSE(secret.empty()) << d.Log();

  // Unchanged job: channels keep working.
  SshClient a;
  ASSERT_TRUE(a.Login(port, "job7", secret)) << d.Log();
  for (int i = 0; i < 3; ++i) {
    ssh_channel ch = a.Forward("job7");
    ASSERT_NE(ch, nullptr) << d.Log();
    EXPECT_TRUE(Echoes(ch));
    ssh_channel_close(ch);
    ssh_channel_free(ch);
  }
  // Removed: the session ends, and no channel opens any more.
  EXPECT_EQ(d.Cli({"remove", "job7"}).exit_code, 0);
  EXPECT_FALSE(a.KeepsOpening("job7")) << "channels opened after remove\n" << d.Log();
  WaitUntil([&] { return CountOf(d.Log(), "reason=job removed or replaced") >= 1; }, 10000);
  EXPECT_EQ(CountOf(d.Log(), "reason=job removed or replaced"), 1u) << d.Log();

  // Saved again, then again with a new secret: the session that proved the old one ends too.
  std::string first = d.SaveJob("job7", backend_->port());
  ASSERT_FALSE(first.empty());
  SshClient b;
  ASSERT_TRUE(b.Login(port, "job7", first)) << d.Log();
  ssh_channel ch = b.Forward("job7");
  ASSERT_NE(ch, nullptr);
  EXPECT_TRUE(Echoes(ch));
  ssh_channel_free(ch);
  RunResult again = d.Cli({"save", "ssh", "--job-id", "job7", "--port",
                           std::to_string(backend_->port()), "--replace", "--json"});
  ASSERT_EQ(again.exit_code, 0) << again;
  std::string second = JsonText(ParseOut(again).get(), {"job", "secret"});
  ASSERT_FALSE(second.empty());
  ASSERT_NE(second, first);
  EXPECT_FALSE(b.KeepsOpening("job7")) << "channels opened with the old secret\n" << d.Log();
  // The new secret works.
  SshClient c;
  ASSERT_TRUE(c.Login(port, "job7", second)) << d.Log();
  ch = c.Forward("job7");
  ASSERT_NE(ch, nullptr);
  EXPECT_TRUE(Echoes(ch));
  ssh_channel_free(ch);
}

// ---- an SSH channel's dial is bounded ----

TEST_F(AbuseTest, SshChannelToABackendThatNeverAnswersEndsAfterConnectTimeout) {
  // A backend whose accept queue is full: the kernel drops further SYNs, so a dial hangs.
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(lfd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(lfd, 0), 0);
  socklen_t len = sizeof(addr);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
  std::vector<int> fillers;
  for (int i = 0; i < 8; ++i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    (void)connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    fillers.push_back(fd);
  }

  Daemon d(dir_, "", "connect_timeout = 1s\n");
  ASSERT_TRUE(d.Start());
  std::string secret = d.SaveJob("stuck", ntohs(addr.sin_port));
  ASSERT_FALSE(secret.empty()) << d.Log();
  // A client that leaves while its opens wait for their dials: the held opens are freed with
  // the session (the daemon's sanitizers report a leak or a double free when it stops). 33
  // opens: once the 33rd is refused, the 32 before it are held.
  {
    SshClient early;
    ASSERT_TRUE(early.Login(d.proxy_port(), "stuck", secret)) << d.Log();
    ssh_set_blocking(early.s, 0);
    std::vector<ssh_channel> held;
    for (int i = 0; i < 33; ++i) {
      held.push_back(ssh_channel_new(early.s));
      ASSERT_NE(held.back(), nullptr);
      EXPECT_EQ(ssh_channel_open_forward(held.back(), "stuck", 1, "127.0.0.1", 5555), SSH_AGAIN);
    }
    int last = SSH_AGAIN;
    auto start = Clock::now();
    while (last == SSH_AGAIN && ElapsedMs(start) < 10000) {
      pollfd p{ssh_get_fd(early.s), POLLIN, 0};
      (void)poll(&p, 1, 100);
      last = ssh_channel_open_forward(held.back(), "stuck", 1, "127.0.0.1", 5555);
    }
    EXPECT_EQ(last, SSH_ERROR) << d.Log();
    for (ssh_channel ch : held) ssh_channel_free(ch);
  }
  ASSERT_TRUE(WaitUntil([&] {
    return d.Log().find("reason=client disconnected") != std::string::npos;
  })) << d.Log();
  SshClient c;
  ASSERT_TRUE(c.Login(d.proxy_port(), "stuck", secret)) << d.Log();
  // 40 channel opens at once (nonblocking client). Each waits unanswered while its backend is
  // dialed, and at most 32 of a session may: the other 8 are refused at once; the 32 are
  // refused when connect_timeout ends their dial. None opens.
  ssh_set_blocking(c.s, 0);
  constexpr int kOpens = 40;
  std::vector<ssh_channel> chans;
  std::vector<int> result(kOpens, SSH_AGAIN);
  for (int i = 0; i < kOpens; ++i) {
    ssh_channel ch = ssh_channel_new(c.s);
    ASSERT_NE(ch, nullptr);
    chans.push_back(ch);
    result[i] = ssh_channel_open_forward(ch, "stuck", 1, "127.0.0.1", 5555);
  }
  auto start = Clock::now();
  auto pending = [&] { return std::count(result.begin(), result.end(), SSH_AGAIN); };
  while (pending() > 0 && ElapsedMs(start) < 15000) {
    pollfd p{ssh_get_fd(c.s), POLLIN, 0};
    (void)poll(&p, 1, 100);
    for (int i = 0; i < kOpens; ++i) {
      if (result[i] == SSH_AGAIN) {
        result[i] = ssh_channel_open_forward(chans[i], "stuck", 1, "127.0.0.1", 5555);
      }
    }
  }
  EXPECT_EQ(pending(), 0) << "opens still unanswered\n" << d.Log();
  EXPECT_LT(ElapsedMs(start), 8000) << "opens outlived connect_timeout\n" << d.Log();
  EXPECT_EQ(std::count(result.begin(), result.end(), SSH_OK), 0) << d.Log();
  std::string log = d.Log();
  EXPECT_EQ(CountOf(log, "backend connect timeout"), 32u) << log;
  EXPECT_EQ(CountOf(log, "still connecting to the backend"), 9u) << log;
  for (ssh_channel ch : chans) ssh_channel_free(ch);
  for (int fd : fillers) close(fd);
  close(lfd);
}

// ---- every path admits the right secret of a throttled job and of a throttled user ----

// One TLS handshake without a server name (so the proxy terminates it), then `line` inside it:
// the proxy's reply line ("" if none). A line asking for "echo" makes an admitted connection
// prove its way to the backend too: "OK" only if "ping" comes back.
std::string TlsPreamble(int port, const std::string& line) {
  int fd = ConnectTcp(port);
  if (fd < 0) return "";
  std::string reply;
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL* ssl = ctx ? SSL_new(ctx) : nullptr;
  auto read_line = [&] {
    std::string got;
    char c;
    while (got.size() < 256 && SSL_read(ssl, &c, 1) == 1 && c != '\n') got += c;
    return got;
  };
  if (ssl && SSL_set_fd(ssl, fd) == 1 && SSL_connect(ssl) == 1 &&
      SSL_write(ssl, line.data(), static_cast<int>(line.size())) == static_cast<int>(line.size())) {
    reply = read_line();
    if (reply == "OK" && line.find("\necho\nping\n") != std::string::npos &&
        read_line() != "ping") {
      reply = "OK, but no echo";
    }
  }
  if (ssl) SSL_free(ssl);
  if (ctx) SSL_CTX_free(ctx);
  close(fd);
  return reply;
}

// The three ways to present `secret` for `job` on the proxy port, each used to reach the echo
// backend: 0 if all got through, else the sum of those that did not: 1 (plain), 2 (TLS), 4 (SSH
// endpoint).
int ReachesEchoOnEveryPath(int port, const std::string& job, const std::string& secret) {
  int failed = 0;
  int fd = -1;
  if (Preamble(port, "BROKER1 " + job + " " + secret + "\necho\nping\n", &fd) != "OK" ||
      ReadLine(fd) != "ping") {
    failed |= 1;
  }
  if (fd >= 0) close(fd);
  if (TlsPreamble(port, "BROKER1 " + job + " " + secret + "\necho\nping\n") != "OK") failed |= 2;
  SshClient c;
  ssh_channel ch = c.Login(port, job, secret) ? c.Forward(job) : nullptr;
  if (ch == nullptr || !Echoes(ch)) failed |= 4;
  if (ch) ssh_channel_free(ch);
  return failed;
}

// `n` wrong secrets for `job` on each path; 0 if every one was refused as it should be.
int FailOnEveryPath(int port, const std::string& job, int n) {
  for (int i = 0; i < n; ++i) {
    std::string r = Preamble(port, "BROKER1 " + job + " " + kWrongSecret + "\n");
    if (r != "ERR denied" && r != "ERR busy") return 1;
    r = TlsPreamble(port, "BROKER1 " + job + " " + kWrongSecret + "\n");
    if (r != "ERR denied" && r != "ERR busy") return 2;
    SshClient c;
    if (!c.Connect(port, job)) return 3;
    if (ssh_userauth_password(c.s, nullptr, kWrongSecret.c_str()) == SSH_AUTH_SUCCESS) return 3;
  }
  return 0;
}

TEST_F(AbuseTest, ThrottledJobAndUserStillAdmitTheRightSecretOnEveryPath) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunOptions as_alice, as_bob;
  as_alice.uid = alice_;
  as_bob.uid = bob_;
  std::string secret = d.SaveJob("alicejob", backend_->port(), "ssh", as_alice);
  ASSERT_FALSE(secret.empty()) << d.Log();
  Backend bobs_backend(Backend::OwnedBy(bob_));
  std::string bobs_secret = d.SaveJob("bobjob", bobs_backend.port(), "ssh", as_bob);
  ASSERT_FALSE(bobs_secret.empty()) << d.Log();
  int port = d.proxy_port();

  // Bob fails at alice's job on every path, well past throttle_failures (10): the job and bob
  // are both throttled.
  EXPECT_EQ(AsUser(bob_, [&] { return FailOnEveryPath(port, "alicejob", 8); }), 0) << d.Log();
  std::string log = d.Log();
  ASSERT_NE(log.find("throttling job alicejob:"), std::string::npos) << log;
  ASSERT_NE(log.find("throttling local user " + std::to_string(bob_) + ":"), std::string::npos)
      << log;

  // Alice's right secret gets through at once, on every path.
  auto start = Clock::now();
  EXPECT_EQ(AsUser(alice_, [&] { return ReachesEchoOnEveryPath(port, "alicejob", secret); }), 0)
      << "1: plain, 2: TLS, 4: SSH endpoint refused the owner (sum)\n"
      << d.Log();
  EXPECT_LT(ElapsedMs(start), 10000) << "the owner must not wait for the throttle";
  // So does bob's own right secret for his own job, throttled as he is.
  EXPECT_EQ(AsUser(bob_, [&] { return ReachesEchoOnEveryPath(port, "bobjob", bobs_secret); }), 0)
      << "1: plain, 2: TLS, 4: SSH endpoint refused a throttled user's right secret (sum)\n"
      << d.Log();
  // And the throttle still answers wrong secrets: alice's job stays throttled for bob.
  EXPECT_EQ(AsUser(bob_,
                   [&] {
                     return Preamble(port, "BROKER1 alicejob " + kWrongSecret + "\n") == "ERR busy"
                                ? 0
                                : 1;
                   }),
            0);
}

// ---- `ssh -L` through the login node's sshd: its connections are its user's ----

TEST_F(AbuseTest, ConnectionsThroughAnSshForwardCountAgainstTheUserWhoseSshdMadeThem) {
  if (access("/usr/sbin/sshd", X_OK) != 0) GTEST_SKIP() << "no /usr/sbin/sshd";
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunOptions as_alice;
  as_alice.uid = alice_;
  ASSERT_FALSE(d.SaveJob("alicejob", backend_->port(), "ssh", as_alice).empty()) << d.Log();

  // The login node's sshd lets bob in with a key (it reads the key file as bob; PAM, because
  // his password is locked), and his `ssh -N -L` forwards a local port to the proxy port: the
  // forwarded connections are made by bob's own sshd process.
  TempDir sshd_dir;
  ::mkdir("/run/sshd", 0755);  // privilege separation directory
  const std::string key = sshd_dir / "id";
  RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key});
  RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", sshd_dir / "host_key"});
  WriteFile(sshd_dir / "authorized_keys", ReadFile(key + ".pub"), 0644);
  WriteFile(sshd_dir / "sshd_config",
            "ListenAddress 127.0.0.1\nHostKey " + (sshd_dir / "host_key") +
                "\nPidFile none\nUsePAM yes\nStrictModes no\nAuthorizedKeysFile " +
                (sshd_dir / "authorized_keys") +
                "\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "AllowTcpForwarding yes\nLogLevel VERBOSE\n");
  std::unique_ptr<Child> sshd;
  int sshd_port = 0;
  // sshd cannot listen on port 0: a port taken before it bound it is picked again.
  ASSERT_TRUE(StartOnFreePort(
      [&](int port, std::string* why) {
        size_t from = ReadFile(sshd_dir / "sshd.log").size();
        sshd = Child::Spawn({"/usr/sbin/sshd", "-D", "-e", "-f", sshd_dir / "sshd_config", "-p",
                             std::to_string(port)},
                            sshd_dir / "sshd.log");
        return WaitListening(&sshd, port, why, from,
                             "Server listening on 127.0.0.1 port " + std::to_string(port) + ".");
      },
      &sshd_port));
  // Nor can ssh -L; it listens once a probe connection through it succeeds.
  std::unique_ptr<Child> tunnel;
  int local = 0;
  ASSERT_TRUE(StartOnFreePort(
      [&](int port, std::string* why) {
        size_t from = ReadFile(sshd_dir / "ssh.log").size();
        tunnel =
            Child::Spawn({"ssh", "-F", "/dev/null", "-i", key, "-o", "StrictHostKeyChecking=no",
                          "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                          "ExitOnForwardFailure=yes", "-p", std::to_string(sshd_port), "-N", "-L",
                          std::to_string(port) + ":127.0.0.1:" + std::to_string(d.proxy_port()),
                          "bp-bob@127.0.0.1"},
                         sshd_dir / "ssh.log");
        return WaitListening(&tunnel, port, why, from);
      },
      &local))
      << ReadFile(sshd_dir / "sshd.log");

  // Wrong secrets through bob's forward (sent by this process, which runs as root: only the
  // socket sshd opened reaches the proxy) throttle bob, not root, not alice.
  for (int i = 0; i < 12; ++i) {
    std::string r = Preamble(local, "BROKER1 alicejob " + kWrongSecret + "\n");
    EXPECT_TRUE(r == "ERR denied" || r == "ERR busy") << r << "\n" << d.Log();
  }
  std::string log = d.Log();
  EXPECT_EQ(CountOf(log, "throttling local user " + std::to_string(bob_) + ":"), 1u) << log;
  EXPECT_EQ(CountOf(log, "throttling local user 0:"), 0u) << log;
  EXPECT_EQ(CountOf(log, "throttling local user " + std::to_string(alice_) + ":"), 0u) << log;
  tunnel->Stop(SIGTERM, 5000);
  sshd->Stop(SIGTERM, 5000);
}

// ---- a stale `connect` of the owner recovers from a throttled job ----

// `connect JOB --listen 0` as `uid` through the proxy on `proxy_port`; `*port` once it listens.
// With `tls`, through TLS termination (--tls).
std::unique_ptr<Child> ConnectAs(uid_t uid, const Daemon& d, const std::string& job,
                                 const std::string& log, bool tls, int* port) {
  RunOptions as;
  as.uid = uid;
  *port = 0;
  std::vector<std::string> argv = {
      BinaryPath(),    "connect", job,
      "--listen",      "0",       "-c",
      d.config_path(), "--proxy", "127.0.0.1:" + std::to_string(d.proxy_port())};
  if (tls) argv.push_back("--tls");
  auto connect = Child::Spawn(argv, log, as);
  if (!connect) return connect;
  auto line = connect->WaitFor("listening on 127.0.0.1:");
  if (line) *port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  return connect;
}

// As `uid` (a listening `connect` serves its own user only), `text` echoed through `connect`
// listening on `port`: 0 if it came back.
int EchoThrough(uid_t uid, int port, const std::string& text) {
  return AsUser(uid, [&] {
    int fd = ConnectTcp(port);
    if (fd < 0) return 1;
    SendAll(fd, "echo\n" + text + "\n");
    std::optional<std::string> got = ReadLine(fd);
    close(fd);
    return got == text ? 0 : 2;
  });
}

void ExpectStaleConnectRecoversFromAJobItsOwnSecretThrottled(const TempDir& dir, uid_t alice,
                                                             Backend* backend, bool tls) {
  Daemon d(dir);
  ASSERT_TRUE(d.Start());
  RunOptions as_alice;
  as_alice.uid = alice;
  std::string old_secret = d.SaveJob("stale", backend->port(), "ssh", as_alice);
  ASSERT_FALSE(old_secret.empty()) << d.Log();
  int port = 0;
  auto connect = ConnectAs(alice, d, "stale", dir / "connect.log", tls, &port);
  ASSERT_GT(port, 0) << (connect ? connect->Output() : "connect did not start");
  EXPECT_EQ(EchoThrough(alice, port, "before"), 0) << connect->Output();

  // The job is saved again (a requeue): the old secret, still held by alice's tools, fails
  // until the job is throttled, for her as for anyone.
  RunResult again = d.Cli(
      {"save", "ssh", "--job-id", "stale", "--port", std::to_string(backend->port()), "--replace"},
      as_alice);
  ASSERT_EQ(again.exit_code, 0) << again;
  EXPECT_EQ(AsUser(alice,
                   [&] {
                     for (int i = 0; i < 12; ++i) {
                       Preamble(d.proxy_port(), "BROKER1 stale " + old_secret + "\n");
                     }
                     return Preamble(d.proxy_port(), "BROKER1 stale " + old_secret + "\n") ==
                                    "ERR busy"
                                ? 0
                                : 1;
                   }),
            0)
      << d.Log();

  // `connect`, told "busy" for its stale secret, fetches the secret again and gets through.
  EXPECT_EQ(EchoThrough(alice, port, "after the re-save"), 0) << connect->Output();
  EXPECT_EQ(EchoThrough(alice, port, "and the next"), 0) << connect->Output();
  EXPECT_TRUE(connect->Running()) << connect->Output();
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

TEST_F(AbuseTest, StaleConnectRecoversFromAJobItsOwnSecretThrottled) {
  ExpectStaleConnectRecoversFromAJobItsOwnSecretThrottled(dir_, alice_, backend_.get(), false);
}

TEST_F(AbuseTest, StaleConnectTlsRecoversFromAJobItsOwnSecretThrottled) {
  ExpectStaleConnectRecoversFromAJobItsOwnSecretThrottled(dir_, alice_, backend_.get(), true);
}

// A stand-in proxy: the first handshake is held until `before_reply` ran (the test saves the
// job again meanwhile), then answered "ERR busy", as the proxy answers a stale secret once the
// job is throttled; the next is answered "OK" and echoed, its preamble kept.
class BusyOnceProxy {
 public:
  explicit BusyOnceProxy(std::function<void()> before_reply)
      : before_reply_(std::move(before_reply)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(fd_, 16) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      return;
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] {
      for (int n = 0;; ++n) {
        int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) return;  // shut down
        std::string line = ReadLine(c, 8192).value_or("");
        if (n == 0) {
          before_reply_();
          SendAll(c, "ERR busy\n");
        } else {
          {
            std::lock_guard<std::mutex> lock(mu_);
            retried_preamble_ = line;
          }
          SendAll(c, "OK\n");
          char buf[4096];
          for (ssize_t got; (got = recv(c, buf, sizeof(buf), 0)) > 0;) SendAll(c, buf, got);
        }
        ::close(c);
      }
    });
  }
  ~BusyOnceProxy() {
    if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) ::close(fd_);
  }
  int port() const { return port_; }
  std::string retried_preamble() {
    std::lock_guard<std::mutex> lock(mu_);
    return retried_preamble_;
  }

 private:
  std::function<void()> before_reply_;
  int fd_ = -1;
  int port_ = 0;
  std::mutex mu_;
  std::string retried_preamble_;
  std::thread thread_;
};

TEST_F(AbuseTest, StaleConnectStdioFetchesTheSecretAgainWhenToldBusy) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunOptions as_alice;
  as_alice.uid = alice_;
  ASSERT_FALSE(d.SaveJob("stdiojob", backend_->port(), "ssh", as_alice).empty()) << d.Log();
  std::string new_secret;
  BusyOnceProxy proxy([&] {
    RunResult again = d.Cli({"save", "ssh", "--job-id", "stdiojob", "--port",
                             std::to_string(backend_->port()), "--replace", "--format", "env"},
                            as_alice);
    size_t at = again.out.find("BROKER_SECRET=");
    if (at != std::string::npos) {
      new_secret = again.out.substr(at + 14, again.out.find('\n', at) - at - 14);
    }
  });
  ASSERT_NE(proxy.port(), 0);
  RunOptions opts = as_alice;
  opts.stdin_data = "ping\n";
  opts.timeout_ms = 30000;
  RunResult r = RunCommand({BinaryPath(), "connect", "stdiojob", "--stdio", "-c", d.config_path(),
                            "--proxy", "127.0.0.1:" + std::to_string(proxy.port())},
                           opts);
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out, "ping\n") << r;
  ASSERT_FALSE(new_secret.empty());
  EXPECT_EQ(proxy.retried_preamble(), "BROKER1 stdiojob " + new_secret) << r;
}

}  // namespace
}  // namespace brokerproxy::testing
