// Defences against other users of the login node, end to end: slow DNS, planted symlinks,
// loose directory modes, a fake control socket, core dumps, hostile input.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

// A UDP socket on 127.0.0.x:53 that reads queries and answers none of them until Answer():
// from then on each query, held or new, gets REFUSED, which ends a look-up at once.
class DnsBlackhole {
 public:
  DnsBlackhole() {
    fd_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    for (int last = 153; fd_ >= 0 && last < 250; ++last) {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(53);
      address_ = "127.0.0." + std::to_string(last);
      inet_pton(AF_INET, address_.c_str(), &a.sin_addr);
      if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
        timeval tv{0, 100 * 1000};
        setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        thread_ = std::thread([this] { Serve(); });
        return;
      }
    }
    address_.clear();
  }
  ~DnsBlackhole() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) ::close(fd_);
  }
  const std::string& address() const { return address_; }  // "" if no port 53 was free
  int queries() const { return queries_.load(); }
  // Answers every query from now on (within the 100 ms the server thread waits at most).
  void Answer() { answer_ = true; }

 private:
  struct Query {
    sockaddr_storage from;
    socklen_t from_len;
    std::string packet;
  };
  void Serve() {
    std::vector<Query> held;
    while (!stop_) {
      char buf[2048];
      Query q{};
      q.from_len = sizeof(q.from);
      ssize_t n =
          ::recvfrom(fd_, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&q.from), &q.from_len);
      if (n >= 12) {
        ++queries_;
        q.packet.assign(buf, n);
        held.push_back(std::move(q));
      }
      if (!answer_) continue;
      for (Query& h : held) {
        // The query itself, turned into a response (QR) with RCODE REFUSED and no answers.
        h.packet[2] = static_cast<char>(h.packet[2] | 0x80);
        h.packet[3] = static_cast<char>((h.packet[3] & 0xf0) | 5);
        ::sendto(fd_, h.packet.data(), h.packet.size(), 0,
                 reinterpret_cast<const sockaddr*>(&h.from), h.from_len);
      }
      held.clear();
    }
  }

  int fd_ = -1;
  std::string address_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> answer_{false};
  std::atomic<int> queries_{0};
  std::thread thread_;
};

// One user's jobs whose backend names never resolve (DNS does not answer) are dialled by many
// clients at once, and ssl jobs with such names saved (a save checks the backend policy on
// what the name resolves to). Meanwhile another user's saves complete (registry writes share the
// thread pool with look-ups), that user's job behind a name from /etc/hosts is reached (one
// user's look-ups hold at most a share of the slots), a numeric backend is reached, and the
// dials and ssl saves of the names that do not resolve are answered (the daemon's own look-up
// timeout, not the resolver's): all of it while the look-ups still hold their pool threads, as
// the daemon's shutdown, which waits for them, then shows. A save starved by the look-ups would
// wait for a thread until the resolver gave up (30 s), and no look-up would be left at the end.
// Nothing here is timed: DNS answers nothing until the test is done, and then answers all. The
// daemon runs in a private mount namespace whose /etc/resolv.conf names the blackhole.
TEST(HardenTest, SlowDnsStarvesNeitherSavesNorNumericDials) {
  if (RunCommand({"unshare", "-m", "true"}).exit_code != 0) {
    GTEST_SKIP() << "unshare -m is not permitted here";
  }
  auto alice = TestUser("bp-alice");
  auto bob = TestUser("bp-bob");
  if (!alice || !bob || !CanRunAs(*alice)) GTEST_SKIP() << "no test users";
  DnsBlackhole dns;
  if (dns.address().empty()) GTEST_SKIP() << "no free 127.0.0.x:53";
  TempDir dir;
  // One attempt of 30 s (the resolver's longest) per look-up: far longer than the daemon's own
  // timeout, and than anything the test waits for before DNS answers.
  WriteFile(dir / "resolv.conf",
            "nameserver " + dns.address() + "\noptions timeout:30 attempts:1\n");
  Daemon d(dir);
  d.set_launcher({"unshare", "-m", "--propagation", "private", "sh", "-c",
                  "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"", dir / "resolv.conf"});
  ASSERT_TRUE(d.Start());
  Backend backend(Backend::OwnedBy(*alice));    // alice's numeric job
  Backend bob_backend(Backend::OwnedBy(*bob));  // bob's job behind a name

  RunOptions as_alice;
  as_alice.uid = *alice;
  RunOptions as_bob;
  as_bob.uid = *bob;
  constexpr int kNames = 10;
  // Saved all at once: a save of a name that does not resolve takes the look-up's timeout.
  std::vector<RunResult> saves(kNames);
  {
    std::vector<std::thread> savers;
    for (int i = 0; i < kNames; ++i) {
      savers.emplace_back([&, i] {
        saves[i] = d.Cli({"save", "ssh", "--job-id", "dns" + std::to_string(i), "--host",
                          "nx" + std::to_string(i) + ".invalid", "--port", "5000", "--json"},
                         as_alice);
      });
    }
    for (auto& t : savers) t.join();
  }
  std::vector<std::string> secrets;
  for (const RunResult& r : saves) {
    ASSERT_EQ(r.exit_code, 0) << r;
    secrets.push_back(JsonText(ParseOut(r).get(), {"job", "secret"}));
  }
  std::string numeric_secret = d.SaveJob("numeric", backend.port(), "ssh", as_alice);
  ASSERT_FALSE(numeric_secret.empty());
  // Bob's job behind a name that resolves without DNS (/etc/hosts).
  RunResult named = d.Cli({"save", "ssh", "--job-id", "bobnamed", "--host", "localhost", "--port",
                           std::to_string(bob_backend.port()), "--json"},
                          as_bob);
  ASSERT_EQ(named.exit_code, 0) << named;
  std::string named_secret = JsonText(ParseOut(named).get(), {"job", "secret"});

  // Every name dialled at once, each by two clients.
  std::vector<std::thread> clients;
  std::vector<std::string> replies(2 * kNames);
  for (int c = 0; c < 2 * kNames; ++c) {
    clients.emplace_back([&, c] {
      int fd = ConnectTcp(d.proxy_port(), "127.0.0.1", 60000);
      if (fd < 0) return;
      int i = c % kNames;
      if (SendAll(fd, "BROKER1 dns" + std::to_string(i) + " " + secrets[i] + "\n")) {
        replies[c] = ReadLine(fd).value_or("(closed)");
      }
      ::close(fd);
    });
  }
  // And ssl saves of jobs with such names: a save checks what the name resolves to.
  const std::string cert_dir = dir / "alice-certs";
  ASSERT_EQ(::mkdir(cert_dir.c_str(), 0700), 0);
  ASSERT_EQ(::chown(cert_dir.c_str(), *alice, PrimaryGid(*alice)), 0);
  std::vector<RunResult> ssl_saves(kNames);
  for (int i = 0; i < kNames; ++i) {
    clients.emplace_back([&, i] {
      ssl_saves[i] =
          d.Cli({"save", "ssl", "--job-id", "ssl" + std::to_string(i), "--host",
                 "nxs" + std::to_string(i) + ".invalid", "--port", "5000", "--cert-dir", cert_dir},
                as_alice);
    });
  }
  // The look-ups are under way once the blackhole hears them.
  WaitUntil([&] { return dns.queries() >= 4; }, 10000);
  EXPECT_GE(dns.queries(), 4);

  // Another user's saves: each a registry write on the pool.
  for (int i = 0; i < 3; ++i) {
    RunResult r =
        d.Cli({"save", "ssh", "--job-id", "bob" + std::to_string(i), "--port", "5000"}, as_bob);
    EXPECT_EQ(r.exit_code, 0) << r;
  }

  // A numeric backend is reached.
  int fd = ConnectTcp(d.proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 numeric " + numeric_secret + "\necho\nping\n"));
  EXPECT_EQ(ReadLine(fd).value_or("(closed)"), "OK");
  EXPECT_EQ(ReadLine(fd).value_or("(closed)"), "ping");
  ::close(fd);

  // Bob's named backend too: Alice's names hold at most her share of the look-ups.
  fd = ConnectTcp(d.proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 bobnamed " + named_secret + "\necho\nping\n"));
  EXPECT_EQ(ReadLine(fd).value_or("(closed)"), "OK");
  EXPECT_EQ(ReadLine(fd).value_or("(closed)"), "ping");
  ::close(fd);

  for (auto& t : clients) t.join();
  // Each ssl save succeeds, its certificate without addresses for a name that did not resolve.
  for (int i = 0; i < kNames; ++i) EXPECT_EQ(ssl_saves[i].exit_code, 0) << ssl_saves[i];
  // A clear answer for each dial.
  for (int c = 0; c < 2 * kNames; ++c) {
    EXPECT_TRUE(replies[c] == "ERR unavailable" || replies[c] == "ERR timeout")
        << "client " << c << ": " << replies[c];
  }

  // All of that happened while look-ups still held pool threads: the shutdown waits for them.
  ASSERT_EQ(::kill(d.pid(), SIGTERM), 0);
  EXPECT_TRUE(WaitUntil([&] {
    return d.Log().find("DNS look-up(s) to return") != std::string::npos ||
           d.Log().find("brokerproxy stopped") != std::string::npos;
  }));
  EXPECT_NE(d.Log().find("DNS look-up(s) to return"), std::string::npos)
      << "the look-ups had returned: the rest may have waited for them\n"
      << d.Log();
  dns.Answer();  // they return now, and the daemon exits
  EXPECT_EQ(d.Stop(0), 0);
}

// The daemon refuses a state or socket directory that another user could write to (plant a
// symlink where it writes, replace the registry or the socket), or that belongs to another user.
TEST(HardenTest, StateAndSocketDirectoriesMustBePrivate) {
  auto bob = TestUser("bp-bob");
  if (!bob) GTEST_SKIP() << "no test users";
  TempDir dir;
  const std::string state = dir / "state";
  ASSERT_EQ(::mkdir(state.c_str(), 0700), 0);

  {
    ASSERT_EQ(::chmod(state.c_str(), 0777), 0);
    Daemon d(dir);
    EXPECT_FALSE(d.Start());
    EXPECT_NE(d.Log().find(state + " is writable by other users (mode 777)"), std::string::npos)
        << d.Log();
  }
  {
    ASSERT_EQ(::chmod(state.c_str(), 0770), 0);
    Daemon d(dir);
    EXPECT_FALSE(d.Start());
    EXPECT_NE(d.Log().find("(mode 770)"), std::string::npos) << d.Log();
  }
  {
    ASSERT_EQ(::chmod(state.c_str(), 0700), 0);
    ASSERT_EQ(::chown(state.c_str(), *bob, PrimaryGid(*bob)), 0);
    Daemon d(dir);
    EXPECT_FALSE(d.Start());
    EXPECT_NE(d.Log().find(state + " belongs to uid " + std::to_string(*bob)), std::string::npos)
        << d.Log();
    ASSERT_EQ(::chown(state.c_str(), 0, 0), 0);
  }
  {
    // The socket's own directory.
    const std::string sockets = dir / "sockets";
    ASSERT_EQ(::mkdir(sockets.c_str(), 0755), 0);
    ASSERT_EQ(::chmod(sockets.c_str(), 0757), 0);
    Daemon d(dir, "", "");
    WriteFile(d.config_path(), "[broker]\nstate_dir = " + state + "\ncontrol_socket = " + sockets +
                                   "/control.sock\n[proxy]\nlisten = 127.0.0.1:0\n");
    EXPECT_FALSE(d.Start());
    EXPECT_NE(d.Log().find("the control socket's directory " + sockets +
                           " is writable by other users (mode 757)"),
              std::string::npos)
        << d.Log();
  }
  // Private again: it starts.
  Daemon d(dir);
  ASSERT_TRUE(d.Start());
  EXPECT_EQ(d.Stop(), 0);
}

// Another user serving a socket where clients look for the daemon gets nothing from them: the
// client checks who serves it before it sends a request (which may carry a secret).
TEST(HardenTest, ClientRefusesAControlSocketServedByAnotherUser) {
  auto alice = TestUser("bp-alice");
  auto bob = TestUser("bp-bob");
  if (!alice || !bob || !CanRunAs(*bob)) GTEST_SKIP() << "no test users";
  TempDir dir;
  // A directory everybody may create names in, like /tmp.
  const std::string pub = dir / "pub";
  ASSERT_EQ(::mkdir(pub.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(pub.c_str(), 01777), 0);
  const std::string sock = pub + "/control.sock";
  const std::string got = pub + "/got";
  RunOptions as_bob;
  as_bob.uid = *bob;
  // Bob's stand-in answers every request as the daemon would, and keeps what it was sent.
  auto fake = Child::Spawn({"socat", "UNIX-LISTEN:" + sock + ",fork,mode=0666",
                            "SYSTEM:head -c 4096 >>" + got + " & echo '{\"ok\":true,\"jobs\":[]}'"},
                           dir / "socat.log", as_bob);
  ASSERT_TRUE(fake);
  struct stat st {};
  ASSERT_TRUE(WaitUntil([&] { return ::stat(sock.c_str(), &st) == 0; }, 10000)) << fake->Output();

  Daemon d(dir);  // not started: only its config is used
  RunOptions as_alice;
  as_alice.uid = *alice;
  RunResult query = d.Cli({"query", "--json", "--socket", sock}, as_alice);
  EXPECT_EQ(query.exit_code, 4) << query;
  EXPECT_NE((query.out + query.err)
                .find("is served by uid " + std::to_string(*bob) +
                      ", which is neither root nor the owner of " + pub),
            std::string::npos)
      << query;
  RunOptions secret_as_alice = as_alice;
  secret_as_alice.stdin_data = "topsecret\n";
  RunResult verify = d.Cli({"verify", "4242", "-", "--socket", sock}, secret_as_alice);
  EXPECT_EQ(verify.exit_code, 4) << verify;
  fake->Stop(SIGKILL);
  EXPECT_EQ(ReadFile(got).find("topsecret"), std::string::npos) << "the secret reached bob";
}

// The control socket is made 0666 by bind() itself; a chmod() by name afterwards would follow a
// symlink that replaced it in between (as root: any file on the system).
TEST(HardenTest, ControlSocketModeComesFromBindNotChmod) {
  TempDir dir;
  Daemon d(dir);
  const std::string trace = dir / "strace.out";
  d.set_launcher({"strace", "-f", "-qq", "-e", "trace=chmod,fchmodat", "-o", trace});
  ASSERT_TRUE(d.Start());
  struct stat st {};
  ASSERT_EQ(::stat(d.socket_path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0666u);
  EXPECT_EQ(ReadFile(trace).find("control.sock"), std::string::npos) << ReadFile(trace);
  // Stop the daemon itself (strace's child); strace then exits with it.
  std::string children = ReadFile("/proc/" + std::to_string(d.pid()) + "/task/" +
                                  std::to_string(d.pid()) + "/children");
  ASSERT_FALSE(children.empty());
  const std::string daemon_proc = "/proc/" + std::to_string(std::stoi(children));
  ASSERT_EQ(::kill(std::stoi(children), SIGTERM), 0);
  struct stat gone {};
  EXPECT_TRUE(WaitUntil([&] { return ::stat(daemon_proc.c_str(), &gone) != 0; }, 20000))
      << "the daemon did not stop";
  d.Stop();
}

// The daemon holds the CA key and every secret: no core dump, and no other process of its user
// may read its memory, unless [broker] core_dumps asks for it.
TEST(HardenTest, NoCoreDumpsByDefault) {
  auto bob = TestUser("bp-bob");
  if (!bob || !CanRunAs(*bob)) GTEST_SKIP() << "no test users";
  for (bool allow : {false, true}) {
    TempDir dir;
    ASSERT_EQ(::chown(dir.path().c_str(), *bob, PrimaryGid(*bob)), 0);
    Daemon d(dir, allow ? "[broker]\ncore_dumps = 1\n" : "");
    // Bob's own daemon: not root, so /proc shows whether it is dumpable.
    d.set_launcher({"setpriv", "--reuid=" + std::to_string(*bob),
                    "--regid=" + std::to_string(PrimaryGid(*bob)), "--clear-groups", "--"});
    ASSERT_TRUE(d.Start()) << (allow ? "core_dumps = 1" : "default");
    std::string proc = "/proc/" + std::to_string(d.pid());
    struct stat st {};
    // (The /proc/<pid> directory itself always shows the process's user; its files do not.)
    ASSERT_EQ(::stat((proc + "/environ").c_str(), &st), 0);
    std::string limits = ReadFile(proc + "/limits");
    size_t at = limits.find("Max core file size");
    ASSERT_NE(at, std::string::npos);
    std::string core = limits.substr(at, limits.find('\n', at) - at);
    if (!allow) {
      // A process that is not dumpable has its /proc files owned by root.
      EXPECT_EQ(st.st_uid, 0u) << "the daemon is dumpable";
      EXPECT_NE(core.find(" 0  "), std::string::npos) << core;
    } else {
      EXPECT_EQ(st.st_uid, *bob);
    }
    // Bob's client talks to bob's own daemon (it owns the socket's directory).
    RunOptions as_bob;
    as_bob.uid = *bob;
    RunResult q = d.Cli({"query"}, as_bob);
    EXPECT_EQ(q.exit_code, 0) << q;
    EXPECT_EQ(d.Stop(), 0);
  }
}

// Durations near INT64_MAX overflowed where they were used (UBSan); each is refused clearly.
TEST(HardenTest, HugeDurationsAreRefused) {
  TempDir dir;
  Daemon d(dir);
  ASSERT_TRUE(d.Start());
  for (const char* ttl : {"9223372036854775807ms", "9223372036854775s", "3651d"}) {
    RunResult r = d.Cli({"save", "ssh", "--job-id", "1", "--port", "5000", "--ttl", ttl});
    EXPECT_EQ(r.exit_code, 2) << r;
    EXPECT_NE(r.err.find("at most 3650d"), std::string::npos) << r;
  }
  RunResult wait = d.Cli({"save", "ssh", "--job-id", "1", "--port", "5000", "--wait",
                          "--wait-timeout", "9223372036854775807ms"});
  EXPECT_EQ(wait.exit_code, 2) << wait;
  wait =
      d.Cli({"save", "ssh", "--job-id", "1", "--port", "5000", "--wait", "--wait-timeout", "25h"});
  EXPECT_EQ(wait.exit_code, 2) << wait;
  EXPECT_NE(wait.err.find("maximum of 1d"), std::string::npos) << wait;
  EXPECT_EQ(d.Cli({"query", "--json"}).out.find("\"id\":\"1\""), std::string::npos);
  d.Stop();
  for (const char* keepalive : {"9223372036854775807ms", "32768s"}) {
    RunOptions bounded;
    bounded.timeout_ms = 10000;
    RunResult run = d.Cli({"run", "--set", std::string("proxy.keepalive=") + keepalive}, bounded);
    EXPECT_EQ(run.exit_code, 2) << run;
    EXPECT_FALSE(run.timed_out) << "the daemon started with keepalive " << keepalive;
  }
}

}  // namespace
}  // namespace brokerproxy::testing
