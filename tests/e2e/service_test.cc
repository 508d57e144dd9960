// The daemon under a service manager (systemd, Type=notify): what it sends on $NOTIFY_SOCKET,
// received here on a datagram socket of the test's own, as systemd would.

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <optional>
#include <sstream>
#include <string>

#include "e2e/harness.h"

namespace brokerproxy::testing {
namespace {

// A datagram socket standing for the manager's notification socket.
class NotifySocket {
 public:
  // A path, or an abstract name after '@' (as $NOTIFY_SOCKET spells them).
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    path.copy(a.sun_path, sizeof(a.sun_path) - 1);
    socklen_t len = sizeof(a);
    if (path[0] == '@') {
      a.sun_path[0] = '\0';
      len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
    }
    ok_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&a), len) == 0;
  }
  ~NotifySocket() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ok() const { return ok_; }
  // The next message, or nullopt after `timeout_ms`.
  std::optional<std::string> Next(int timeout_ms = 10000) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return std::nullopt;
    char buf[4096];
    ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n < 0) return std::nullopt;
    return std::string(buf, static_cast<size_t>(n));
  }

 private:
  std::string path_;
  int fd_ = -1;
  bool ok_ = false;
};

bool Has(const std::string& message, const std::string& line) {
  return ("\n" + message + "\n").find("\n" + line + "\n") != std::string::npos;
}

TEST(ServiceTest, ReadyOnlyOnceEveryListenerAcceptsThenWatchdogAndStopping) {
  TempDir dir;
  NotifySocket notify(dir / "notify");
  ASSERT_TRUE(notify.ok());
  Daemon daemon(dir);
  daemon.set_launcher({"env", "NOTIFY_SOCKET=" + (dir / "notify"), "WATCHDOG_USEC=300000"});
  ASSERT_TRUE(daemon.Start());
  auto first = notify.Next();
  ASSERT_TRUE(first) << "no READY=1";
  EXPECT_TRUE(Has(*first, "READY=1")) << *first;
  EXPECT_NE(first->find("STATUS=0 session(s), 0 job(s)"), std::string::npos) << *first;
  // Ready means served: the proxy port and the control socket answer now.
  int fd = ConnectTcp(daemon.proxy_port(), "127.0.0.1", 2000);
  EXPECT_GE(fd, 0);
  if (fd >= 0) ::close(fd);
  EXPECT_EQ(daemon.Cli({"query", "--json"}).exit_code, 0);

  // Pings at half the period: at least four in 1.2 s (every 150 ms).
  int pings = 0;
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1200);
  while (std::chrono::steady_clock::now() < until) {
    auto m = notify.Next(1000);
    if (m && Has(*m, "WATCHDOG=1")) ++pings;
  }
  EXPECT_GE(pings, 4);

  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  std::optional<std::string> last;
  while (auto m = notify.Next(200)) last = m;
  ASSERT_TRUE(last);
  EXPECT_TRUE(Has(*last, "STOPPING=1")) << *last;
}

TEST(ServiceTest, NoWatchdogPingsUnlessAskedAndNothingWithoutAManager) {
  TempDir dir;
  NotifySocket notify(dir / "notify");
  ASSERT_TRUE(notify.ok());
  Daemon daemon(dir);
  daemon.set_launcher({"env", "NOTIFY_SOCKET=" + (dir / "notify")});
  ASSERT_TRUE(daemon.Start());
  auto first = notify.Next();
  ASSERT_TRUE(first);
  EXPECT_TRUE(Has(*first, "READY=1")) << *first;
  // Nothing else until the status refresh (10 s): no watchdog pings.
  EXPECT_FALSE(notify.Next(700)) << "a message without a watchdog asked for";
  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  auto stopping = notify.Next();
  ASSERT_TRUE(stopping);
  EXPECT_TRUE(Has(*stopping, "STOPPING=1")) << *stopping;

  // Without $NOTIFY_SOCKET the daemon sends nothing anywhere (and runs as usual).
  Daemon plain(dir);
  ASSERT_TRUE(plain.Start());
  EXPECT_FALSE(notify.Next(300));
  EXPECT_EQ(plain.Stop(SIGTERM), 0);
}

// systemd names its socket by an abstract address too ("@..."); a watchdog period meant for
// another process ($WATCHDOG_PID) is not this daemon's to keep.
TEST(ServiceTest, AbstractSocketAndAWatchdogForAnotherProcess) {
  TempDir dir;
  std::string name = "@brokerproxy-test-notify-" + std::to_string(::getpid());
  NotifySocket notify(name);
  ASSERT_TRUE(notify.ok());
  Daemon daemon(dir);
  daemon.set_launcher({"env", "NOTIFY_SOCKET=" + name, "WATCHDOG_USEC=100000", "WATCHDOG_PID=1"});
  ASSERT_TRUE(daemon.Start());
  auto first = notify.Next();
  ASSERT_TRUE(first) << "no READY=1 on the abstract socket";
  EXPECT_TRUE(Has(*first, "READY=1")) << *first;
  EXPECT_FALSE(notify.Next(600)) << "watchdog pings for a period meant for pid 1";
  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  auto stopping = notify.Next();
  ASSERT_TRUE(stopping);
  EXPECT_TRUE(Has(*stopping, "STOPPING=1")) << *stopping;
}

// log_format = json: every line is one JSON object, and a session's close line carries its job,
// peer, bytes, duration and reason as fields.
TEST(ServiceTest, JsonLogLinesCarryTheSessionAsFields) {
  TempDir dir;
  Backend backend;
  Daemon daemon(dir, "[broker]\nlog_format = json\n");
  ASSERT_TRUE(daemon.Start());
  std::string secret = daemon.SaveJob("job1", backend.port());
  ASSERT_FALSE(secret.empty());
  int fd = ConnectTcp(daemon.proxy_port());
  ASSERT_GE(fd, 0);
  SendAll(fd, "BROKER1 job1 " + secret + "\necho\n");
  ASSERT_EQ(ReadLine(fd, 256).value_or("<closed>"), "OK");
  EchoResult r = EchoTransfer(fd, 1000);
  EXPECT_EQ(r.received, r.sent);
  ::close(fd);
  ASSERT_TRUE(WaitUntil([&] { return daemon.Log().find("\"reason\":") != std::string::npos; }));
  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  std::istringstream lines(daemon.Log());
  std::string line;
  int objects = 0;
  bool session_seen = false;
  while (std::getline(lines, line)) {
    registry::JsonPtr j = ParseOut(line);
    ASSERT_TRUE(j) << "not JSON: " << line;
    ++objects;
    EXPECT_FALSE(JsonText(j.get(), {"time"}).empty()) << line;
    EXPECT_FALSE(JsonText(j.get(), {"level"}).empty()) << line;
    if (JsonText(j.get(), {"reason"}).empty()) continue;
    session_seen = true;
    EXPECT_EQ(JsonText(j.get(), {"job"}), "job1") << line;
    EXPECT_EQ(JsonText(j.get(), {"reason"}), "done") << line;
    EXPECT_EQ(JsonText(j.get(), {"peer"}).rfind("127.0.0.1:", 0), 0u) << line;
    EXPECT_FALSE(JsonText(j.get(), {"duration"}).empty()) << line;
    const cJSON* up = cJSON_GetObjectItemCaseSensitive(j.get(), "up");
    ASSERT_TRUE(cJSON_IsNumber(up)) << line;
    EXPECT_GE(up->valuedouble, 1000 + 5);  // "echo\n" and the payload
  }
  EXPECT_GE(objects, 3);
  EXPECT_TRUE(session_seen);
}

// Under systemd, stderr is the journal ($JOURNAL_STREAM names it): priority prefixes, and no
// timestamp of our own since journald stamps every line.
TEST(ServiceTest, JournalLinesHavePrioritiesAndNoTimestamps) {
  TempDir dir;
  Daemon daemon(dir);
  ASSERT_TRUE(daemon.Start());  // creates the log file the daemon's stderr goes to
  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  struct stat st {};
  ASSERT_EQ(::stat((dir / "daemon.log").c_str(), &st), 0);
  daemon.set_launcher(
      {"env", "JOURNAL_STREAM=" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino)});
  ASSERT_TRUE(daemon.Start());
  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  std::istringstream lines(daemon.Log());
  std::string line;
  int count = 0;
  while (std::getline(lines, line)) {
    ++count;
    EXPECT_EQ(line.rfind("<6>info  ", 0), 0u) << line;
  }
  EXPECT_GE(count, 2);
  // Another stream in $JOURNAL_STREAM (stderr is not the journal): timestamps as usual.
  daemon.set_launcher({"env", "JOURNAL_STREAM=1:2"});
  ASSERT_TRUE(daemon.Start());
  EXPECT_EQ(daemon.Stop(SIGTERM), 0);
  std::string first = daemon.Log().substr(0, daemon.Log().find('\n'));
  EXPECT_EQ(first.rfind("20", 0), 0u) << first;
}

}  // namespace
}  // namespace brokerproxy::testing
