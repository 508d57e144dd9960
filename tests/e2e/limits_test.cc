// Per-user limits and fairness on a shared login node, end to end: real users (bp-alice,
// bp-bob) against the real daemon. One user must not lock the others (or root) out of the
// control socket, keep its slots after their process is gone, hold jobs without bound or keep
// the daemon probing a backend that never comes up.

#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

int64_t MsLeft(Clock::time_point deadline) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
}

// Root's `stats --json`: the control socket's totals ("control_clients", "waits", "probes").
registry::JsonPtr RootStats(const Daemon& d) { return ParseOut(d.Cli({"stats", "--json"})); }
std::string RootStat(const Daemon& d, const char* name) {
  auto stats = RootStats(d);
  return stats ? JsonText(stats.get(), {"stats", name}) : "";
}

int ConnectUnix(const std::string& path, int timeout_ms = 10000) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// A process of another user that opens `connections` control connections one after the other
// and sends `line` on each, then collects the reply lines that come back until it has
// `expect_replies` of them (or 15 s passed), reports them, and holds every connection open
// until it is killed.
class ControlHog {
 public:
  ControlHog(uid_t uid, const std::string& socket_path, int connections, const std::string& line,
             size_t expect_replies) {
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      close(out[0]);
      RunChild(uid, socket_path, connections, line, expect_replies, out[1]);
    }
    close(out[1]);
    if (pid_ < 0) {
      close(out[0]);
      return;
    }
    // The report: one reply per line, then "END".
    std::string text;
    auto deadline = Clock::now() + std::chrono::seconds(30);
    char buf[4096];
    while (text.find("END\n") == std::string::npos && MsLeft(deadline) > 0) {
      pollfd p{out[0], POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(MsLeft(deadline))) <= 0) continue;
      ssize_t n = read(out[0], buf, sizeof(buf));
      if (n <= 0) break;
      text.append(buf, n);
    }
    close(out[0]);
    for (size_t at = 0, nl; (nl = text.find('\n', at)) != std::string::npos; at = nl + 1) {
      std::string reply = text.substr(at, nl - at);
      if (reply == "END") break;
      replies_.push_back(reply);
    }
  }
  ~ControlHog() { Kill(); }

  const std::vector<std::string>& replies() const { return replies_; }
  size_t Count(const std::string& needle) const {
    size_t n = 0;
    for (const std::string& r : replies_) n += r.find(needle) != std::string::npos;
    return n;
  }
  // SIGKILL: the kernel closes every connection it held.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  [[noreturn]] static void RunChild(uid_t uid, const std::string& socket_path, int connections,
                                    const std::string& line, size_t expect_replies, int report) {
    size_t slash = socket_path.rfind('/');
    std::string dir = socket_path.substr(0, slash);
    std::string name = socket_path.substr(slash + 1);
    gid_t gid = PrimaryGid(uid);
    if (chdir(dir.c_str()) != 0 || setgroups(0, nullptr) != 0 || setresgid(gid, gid, gid) != 0 ||
        setresuid(uid, uid, uid) != 0) {
      _exit(1);
    }
    std::vector<int> fds;
    for (int i = 0; i < connections; ++i) {
      int fd = ConnectUnix(name);
      if (fd < 0) _exit(2);
      SendAll(fd, line + "\n");
      fds.push_back(fd);
    }
    std::vector<std::string> partial(fds.size());
    std::vector<bool> done(fds.size(), false);
    size_t replies = 0;
    auto deadline = Clock::now() + std::chrono::seconds(15);
    while (replies < expect_replies && MsLeft(deadline) > 0) {
      std::vector<pollfd> p;
      for (size_t i = 0; i < fds.size(); ++i) p.push_back({done[i] ? -1 : fds[i], POLLIN, 0});
      if (poll(p.data(), p.size(), static_cast<int>(MsLeft(deadline))) <= 0) continue;
      for (size_t i = 0; i < fds.size(); ++i) {
        if (done[i] || !(p[i].revents & (POLLIN | POLLHUP))) continue;
        char buf[4096];
        ssize_t n = recv(fds[i], buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) partial[i].append(buf, n);
        size_t nl = partial[i].find('\n');
        if (nl != std::string::npos || n == 0) {
          done[i] = true;
          ++replies;
          std::string reply = nl == std::string::npos ? "EOF" : partial[i].substr(0, nl);
          SendAll(report, reply + "\n");
        }
      }
    }
    SendAll(report, "END\n");
    close(report);
    for (;;) pause();  // holds the connections until killed
  }

  pid_t pid_ = -1;
  std::vector<std::string> replies_;
};

uid_t MustUser(const char* name) {
  std::optional<uid_t> uid = TestUser(name);
  EXPECT_TRUE(uid) << "cannot create user " << name;
  return uid.value_or(65534);
}

class LimitsTest : public ::testing::Test {
 protected:
  TempDir dir_;
};

// bp-bob parks as many `wait`s as he can: he is stopped at his own limits, everyone else is
// still served, and when his process dies every slot he held comes back at once.
TEST_F(LimitsTest, ControlHogIsCappedAndItsSlotsComeBackWhenItDies) {
  uid_t bob = MustUser("bp-bob");
  uid_t alice = MustUser("bp-alice");
  Daemon d(dir_,
           "[broker]\nmax_control_clients = 64\nmax_control_clients_per_user = 8\n"
           "max_waits_per_user = 4\n");
  ASSERT_TRUE(d.Start());
  // Bob's job waits for a service that never comes: a wait on it stays pending.
  PortReservation idle;
  std::string saved =
      ControlRequestAs(bob, d.socket_path(),
                       R"({"op":"save","job":"bob-job","type":"ssh","host":"127.0.0.1","port":)" +
                           std::to_string(idle.port()) + R"(,"wait":true})");
  ASSERT_NE(saved.find("\"ok\":true"), std::string::npos) << saved;

  // 12 connections: 8 admitted, 4 refused; of the 8 waits, 4 park and 4 are refused.
  ControlHog hog(bob, d.socket_path(), 12, R"({"op":"wait","job":"bob-job","timeout":3600000})", 8);
  EXPECT_EQ(hog.replies().size(), 8u);
  EXPECT_EQ(hog.Count("max_control_clients_per_user = 8"), 4u)
      << ::testing::PrintToString(hog.replies());
  EXPECT_EQ(hog.Count("max_waits_per_user = 4"), 4u) << ::testing::PrintToString(hog.replies());
  EXPECT_EQ(RootStat(d, "waits"), "4");
  EXPECT_EQ(RootStat(d, "control_clients"), "9");  // bob's 8 and this `stats`

  // Bob is told why; alice and root are served as usual.
  std::string more = ControlRequestAs(bob, d.socket_path(), R"({"op":"query"})");
  EXPECT_NE(more.find("resource_exhausted"), std::string::npos) << more;
  EXPECT_NE(more.find("you already have 8 connections"), std::string::npos) << more;
  std::string theirs = ControlRequestAs(alice, d.socket_path(), R"({"op":"query"})");
  EXPECT_NE(theirs.find("\"ok\":true"), std::string::npos) << theirs;
  RunResult root = d.Cli({"query"});
  EXPECT_EQ(root.exit_code, 0) << root;

  // Bob's process dies with its waits pending: all of it is released at once, not when the
  // waits would have timed out an hour later.
  hog.Kill();
  EXPECT_TRUE(WaitUntil(
      [&] { return RootStat(d, "waits") == "0" && RootStat(d, "control_clients") == "1"; }, 10000))
      << "waits " << RootStat(d, "waits") << ", clients " << RootStat(d, "control_clients");
  std::string again = ControlRequestAs(bob, d.socket_path(), R"({"op":"query"})");
  EXPECT_NE(again.find("\"ok\":true"), std::string::npos) << again;
  EXPECT_EQ(d.Stop(), 0);
}

// Users together may fill max_control_clients, but root keeps slots of its own.
TEST_F(LimitsTest, RootIsServedWhenUsersFillTheControlSocket) {
  uid_t bob = MustUser("bp-bob");
  uid_t alice = MustUser("bp-alice");
  Daemon d(dir_, "[broker]\nmax_control_clients = 6\nmax_control_clients_per_user = 4\n");
  ASSERT_TRUE(d.Start());
  // Each connection asks one query and then stays open, idle.
  ControlHog bobs(bob, d.socket_path(), 5, R"({"op":"query"})", 5);
  EXPECT_EQ(bobs.Count("\"ok\":true"), 4u) << ::testing::PrintToString(bobs.replies());
  EXPECT_EQ(bobs.Count("max_control_clients_per_user = 4"), 1u);
  ControlHog alices(alice, d.socket_path(), 3, R"({"op":"query"})", 3);
  EXPECT_EQ(alices.Count("\"ok\":true"), 2u) << ::testing::PrintToString(alices.replies());
  EXPECT_EQ(alices.Count("the broker is busy"), 1u);
  EXPECT_EQ(alices.Count("max_control_clients = 6"), 1u);

  RunResult root = d.Cli({"stats", "--json"});
  ASSERT_EQ(root.exit_code, 0) << root;
  EXPECT_EQ(JsonText(ParseOut(root).get(), {"stats", "control_clients"}), "7");
  std::string busy = ControlRequestAs(65534, d.socket_path(), R"({"op":"query"})");
  EXPECT_NE(busy.find("the broker is busy"), std::string::npos) << busy;
  EXPECT_EQ(d.Stop(), 0);
}

// A client whose request is in flight is still read: one that leaves, or that sends more
// than a request ahead, is dropped and its wait released at once. One that only shut down its
// sending side still gets its reply, and is released once it closes.
class InFlightTest : public LimitsTest {
 protected:
  void SetUp() override {
    ASSERT_TRUE(d_.Start());
    port_ = idle_.port();
    RunResult r =
        d_.Cli({"save", "ssh", "--job-id", "p", "--port", std::to_string(port_), "--pending"});
    ASSERT_EQ(r.exit_code, 0) << r;
  }
  bool WaitsAre(const char* n, int timeout_ms = 10000) {
    return WaitUntil([&] { return RootStat(d_, "waits") == n; }, timeout_ms);
  }
  // A connection with a wait for job "p" pending.
  int Waiting(int timeout_ms = 10000) {
    int fd = ConnectUnix(d_.socket_path(), timeout_ms);
    EXPECT_GE(fd, 0);
    EXPECT_TRUE(SendAll(fd, "{\"op\":\"wait\",\"job\":\"p\",\"timeout\":3600000}\n"));
    EXPECT_TRUE(WaitsAre("1"));
    return fd;
  }

  Daemon d_{dir_};
  PortReservation idle_;  // the job's port: nothing listens there
  int port_ = 0;
};

TEST_F(InFlightTest, ClientLeavingReleasesItsWait) {
  close(Waiting());
  EXPECT_TRUE(WaitsAre("0")) << RootStat(d_, "waits");
  EXPECT_EQ(RootStat(d_, "control_clients"), "1");
  EXPECT_EQ(d_.Stop(), 0);
}

TEST_F(InFlightTest, ClientSendingTooMuchAheadIsCut) {
  int fd = Waiting();
  ASSERT_TRUE(SendAll(fd, std::string(64 * 1024, 'x')));  // no newline
  std::optional<std::string> error = ReadLine(fd, 1 << 16);
  ASSERT_TRUE(error) << "the daemon answers (not a receive timeout)";
  EXPECT_NE(error->find("sent while a request was in flight"), std::string::npos) << *error;
  EXPECT_FALSE(ReadLine(fd)) << "and closes";
  close(fd);
  EXPECT_TRUE(WaitsAre("0")) << RootStat(d_, "waits");
  EXPECT_NE(d_.Log().find("bytes ahead of a reply; closing"), std::string::npos) << d_.Log();
  EXPECT_EQ(d_.Stop(), 0);
}

TEST_F(InFlightTest, HalfClosedClientGetsItsReplyOrIsReleasedWhenItCloses) {
  // Half-closes, then leaves later: nothing more is read from it, yet its wait goes.
  int fd = Waiting();
  shutdown(fd, SHUT_WR);
  // (A few of the daemon's checks for a full close, kHangupCheckMs apart.)
  EXPECT_FALSE(WaitsAre("0", 3000)) << "a half-closed client may still read its reply";
  close(fd);
  EXPECT_TRUE(WaitsAre("0")) << RootStat(d_, "waits");

  // Half-closes and stays: the reply comes once the service listens.
  fd = Waiting(20000);
  shutdown(fd, SHUT_WR);
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port_));
  ASSERT_EQ(bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(lfd, 16), 0);
  std::optional<std::string> reply = ReadLine(fd, 1 << 16);
  close(lfd);
  ASSERT_TRUE(reply) << "a half-closed client still gets its reply";
  EXPECT_NE(reply->find("\"ready\":true"), std::string::npos) << *reply;
  close(fd);
  EXPECT_EQ(d_.Stop(), 0);
}

// [registry] max_jobs_per_user: the cap + 1-th save of a user fails with an error naming the
// limit; other users are not affected; replacing and removing work as usual.
TEST_F(LimitsTest, MaxJobsPerUser) {
  uid_t bob = MustUser("bp-bob");
  uid_t alice = MustUser("bp-alice");
  if (!CanRunAs(bob)) GTEST_SKIP() << "bp-bob cannot run programs here";
  Daemon d(dir_, "[registry]\nmax_jobs_per_user = 3\n");
  ASSERT_TRUE(d.Start());
  RunOptions as_bob;
  as_bob.uid = bob;
  // The build tree may sit where bob cannot reach: give him his own copy.
  as_bob.binary = dir_ / "brokerproxy";
  ASSERT_EQ(RunCommand({"install", "-m", "0755", BinaryPath(), as_bob.binary}).exit_code, 0);
  auto bob_save = [&](const std::string& id) {
    return d.Cli({"save", "ssh", "--job-id", id, "--port", "7001"}, as_bob);
  };
  for (const char* id : {"b1", "b2", "b3"}) {
    RunResult r = bob_save(id);
    ASSERT_EQ(r.exit_code, 0) << r;
  }
  RunResult over = bob_save("b4");
  EXPECT_EQ(over.exit_code, 6) << over;
  EXPECT_NE(over.err.find("you already hold 3 jobs"), std::string::npos) << over;
  EXPECT_NE(over.err.find("max_jobs_per_user = 3"), std::string::npos) << over;
  EXPECT_EQ(d.Cli({"load", "b4"}).exit_code, 5) << "nothing saved";

  // Alice is not affected by bob's count.
  for (const char* id : {"a1", "a2", "a3"}) {
    std::string r = ControlRequestAs(alice, d.socket_path(),
                                     std::string(R"({"op":"save","job":")") + id +
                                         R"(","type":"ssh","host":"127.0.0.1","port":7002})");
    EXPECT_NE(r.find("\"ok\":true"), std::string::npos) << id << ": " << r;
  }
  // Replacing an own job is no new job; removing one frees a slot.
  EXPECT_EQ(
      d.Cli({"save", "ssh", "--job-id", "b1", "--port", "7001", "--replace"}, as_bob).exit_code, 0);
  EXPECT_EQ(d.Cli({"remove", "b2"}, as_bob).exit_code, 0);
  RunResult now = bob_save("b4");
  EXPECT_EQ(now.exit_code, 0) << now;
  EXPECT_EQ(bob_save("b5").exit_code, 6);
  // Root is not limited.
  for (const char* id : {"r1", "r2", "r3", "r4"}) {
    EXPECT_EQ(d.Cli({"save", "ssh", "--job-id", id, "--port", "7003"}).exit_code, 0) << id;
  }
  EXPECT_EQ(d.Stop(), 0);
}

// A readiness probe to a port nothing listens on stops after ready_timeout: the job shows as
// down, and a service that starts later sees no probe until someone waits for the job.
TEST_F(LimitsTest, ProbeGivesUpAfterReadyTimeout) {
  Daemon d(dir_, "[registry]\nready_timeout = 2s\n");
  ASSERT_TRUE(d.Start());
  PortReservation idle;
  int port = idle.port();
  ASSERT_EQ(d.Cli({"save", "ssh", "--job-id", "p1", "--port", std::to_string(port), "--pending"})
                .exit_code,
            0);
  EXPECT_EQ(RootStat(d, "probes"), "1");
  ASSERT_TRUE(WaitUntil([&] { return RootStat(d, "probes") == "0"; }, 20000))
      << "still probing: " << d.Log();
  EXPECT_NE(d.Log().find("job p1: nothing accepted connections on 127.0.0.1:" +
                         std::to_string(port) + " within 2s; stopped probing"),
            std::string::npos)
      << d.Log();
  RunResult q = d.Cli({"query"});
  EXPECT_NE(q.out.find("down"), std::string::npos) << q;
  auto qj = ParseOut(d.Cli({"query", "--json"}));
  ASSERT_TRUE(qj);
  const cJSON* down = cJSON_GetObjectItemCaseSensitive(qj.get(), "down");
  ASSERT_TRUE(cJSON_IsArray(down));
  ASSERT_EQ(cJSON_GetArraySize(down), 1);
  EXPECT_STREQ(cJSON_GetArrayItem(down, 0)->valuestring, "p1");

  // The service comes up now: no probe reaches it for several probe intervals (2 s at most).
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ASSERT_EQ(bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(lfd, 16), 0);
  pollfd p{lfd, POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 5000), 0) << "a probe arrived after ready_timeout";
  auto stats = RootStats(d);
  EXPECT_EQ(JsonText(stats.get(), {"stats", "probes"}), "0");

  // A wait arms one probe again, which finds the service.
  RunResult w = d.Cli({"wait", "p1", "--timeout", "20s"});
  EXPECT_EQ(w.exit_code, 0) << w;
  EXPECT_EQ(poll(&p, 1, 0), 1) << "the wait's probe connected";
  close(lfd);
  RunResult ready = d.Cli({"query"});
  EXPECT_NE(ready.out.find("ready"), std::string::npos) << ready;
  EXPECT_EQ(ready.out.find("down"), std::string::npos) << ready;
  EXPECT_EQ(d.Stop(), 0);
}

}  // namespace
}  // namespace brokerproxy::testing
