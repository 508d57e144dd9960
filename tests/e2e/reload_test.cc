// SIGHUP reloads the daemon's configuration without touching a session (cli/daemon.h): what can
// change live is applied, the rest is logged as needing a restart, and a configuration with an
// error is refused as a whole.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"

namespace brokerproxy::testing {
namespace {

// Sends Pattern[offset, offset + bytes) through `fd` (an echo session) and reads it back, leaving
// the session open; true if every byte came back as sent.
bool EchoPart(int fd, uint64_t offset, uint64_t bytes) {
  bool sent = true;
  std::thread writer([&] {
    std::vector<char> buf(64 * 1024);
    for (uint64_t off = 0; off < bytes && sent;) {
      size_t chunk = std::min<uint64_t>(buf.size(), bytes - off);
      Pattern(offset + off, buf.data(), chunk);
      sent = SendAll(fd, buf.data(), chunk);
      off += chunk;
    }
  });
  std::vector<char> got(64 * 1024), want(64 * 1024);
  uint64_t off = 0;
  bool same = true;
  while (off < bytes) {
    ssize_t n = ::recv(fd, got.data(), std::min<uint64_t>(got.size(), bytes - off), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    Pattern(offset + off, want.data(), static_cast<size_t>(n));
    same = same && std::memcmp(got.data(), want.data(), static_cast<size_t>(n)) == 0;
    off += static_cast<uint64_t>(n);
  }
  writer.join();
  return sent && same && off == bytes;
}

class ReloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<Daemon>(dir_);
    ASSERT_TRUE(daemon_->Start());
    secret_ = daemon_->SaveJob("job1", backend_.port());
    ASSERT_FALSE(secret_.empty());
    base_config_ = ReadFile(daemon_->config_path());
  }

  // A session to job1 through `port` that asked the backend to echo; -1 unless it got OK.
  int Echo(int port, const std::string& host = "127.0.0.1") {
    int fd = ConnectTcp(port, host, 5000);
    if (fd < 0) return -1;
    SendAll(fd, "BROKER1 job1 " + secret_ + "\necho\n");
    if (ReadLine(fd, 256).value_or("") != "OK") {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  // Rewrites the config (the generated one plus `extra` sections), sends SIGHUP and waits for
  // the reload's outcome line; returns the log written since.
  std::string Reload(const std::string& extra) {
    WriteFile(daemon_->config_path(), base_config_ + "\n" + extra);
    size_t from = daemon_->Log().size();
    ::kill(daemon_->pid(), SIGHUP);
    std::string since;
    WaitUntil([&] {
      since = daemon_->Log().substr(from);
      return since.find("reload: configuration applied") != std::string::npos ||
             since.find("the running one stays") != std::string::npos ||
             since.find("the running configuration stays") != std::string::npos;
    });
    return since;
  }

  TempDir dir_;
  Backend backend_;
  std::unique_ptr<Daemon> daemon_;
  std::string secret_;
  std::string base_config_;
};

// 100 sessions streaming (hash-checked) across a reload that changes limits and the log level,
// and new connections while it happens: none broken, none refused.
TEST_F(ReloadTest, SessionsStreamAcrossAReloadAndNewOnesAreServed) {
  constexpr int kSessions = 100;
  constexpr uint64_t kHalf = 256 * 1024;
  std::mutex mu;
  std::condition_variable cv;
  int at_middle = 0;
  bool reloaded = false;
  std::atomic<int> broken{0};
  std::vector<std::thread> sessions;
  for (int i = 0; i < kSessions; ++i) {
    sessions.emplace_back([&] {
      int fd = Echo(daemon_->proxy_port());
      if (fd < 0) {
        broken++;
        std::lock_guard<std::mutex> lock(mu);
        ++at_middle;
        cv.notify_all();
        return;
      }
      if (!EchoPart(fd, 0, kHalf)) broken++;
      {
        std::unique_lock<std::mutex> lock(mu);
        ++at_middle;
        cv.notify_all();
        cv.wait_for(lock, std::chrono::seconds(60), [&] { return reloaded; });
      }
      if (!EchoPart(fd, kHalf, kHalf)) broken++;
      ::close(fd);
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(
        cv.wait_for(lock, std::chrono::seconds(120), [&] { return at_middle == kSessions; }));
  }
  // New connections keep coming while the reload runs.
  std::atomic<bool> stop{false};
  std::atomic<int> fresh{0}, refused{0};
  std::thread newcomer([&] {
    while (!stop) {
      int fd = Echo(daemon_->proxy_port());
      if (fd < 0) {
        refused++;
        continue;
      }
      EchoResult r = EchoTransfer(fd, 1000);
      if (r.received == r.sent) fresh++;
      ::close(fd);
    }
  });
  std::string debug = base_config_;
  debug.replace(debug.find("log_level = info"), 16, "log_level = debug");
  base_config_ = debug;
  std::string log =
      Reload("[proxy]\nmax_connections = 3000\nidle_timeout = 1h\nhandshake_timeout = 20s\n");
  EXPECT_NE(log.find("reload: configuration applied (changed: broker.log_level, "
                     "proxy.max_connections, proxy.handshake_timeout, proxy.idle_timeout)"),
            std::string::npos)
      << log;
  {
    std::lock_guard<std::mutex> lock(mu);
    reloaded = true;
    cv.notify_all();
  }
  for (auto& t : sessions) t.join();
  // A few more newcomers after the reload, then stop.
  int after = fresh.load();
  WaitUntil([&] { return fresh.load() >= after + 5; }, 20000);
  stop = true;
  newcomer.join();
  EXPECT_EQ(broken.load(), 0);
  EXPECT_EQ(refused.load(), 0);
  EXPECT_GE(fresh.load(), after + 5);
  // The new log level is in force.
  size_t from = daemon_->Log().size();
  int fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  SendAll(fd, "BROKER1 job1\n");  // a bad preamble: logged at debug level
  ReadLine(fd, 256);
  ::close(fd);
  EXPECT_TRUE(
      WaitUntil([&] { return daemon_->Log().find(" debug ", from) != std::string::npos; }, 10000))
      << daemon_->Log().substr(from > 2000 ? from - 2000 : 0);
  auto stats = ParseOut(daemon_->Cli({"stats", "--json"}));
  ASSERT_TRUE(stats);
  EXPECT_EQ(daemon_->Stop(SIGTERM), 0);
}

// An address added to listen is served after the reload; one removed stops accepting, while
// the sessions that came through it go on.
TEST_F(ReloadTest, ListenAddressesComeAndGoWithoutDroppingTheirSessions) {
  std::string log = Reload("[proxy]\nlisten = 127.0.0.1:0\nlisten = 127.0.0.2:0\n");
  ASSERT_NE(log.find("changed: proxy.listen"), std::string::npos) << log;
  size_t at = log.find("proxy listening on 127.0.0.2:");
  ASSERT_NE(at, std::string::npos) << log;
  int second_port =
      std::atoi(log.c_str() + at + std::string("proxy listening on 127.0.0.2:").size());
  int through_second = Echo(second_port, "127.0.0.2");
  ASSERT_GE(through_second, 0);
  EXPECT_TRUE(EchoPart(through_second, 0, 100000));

  // The second address goes again.
  log = Reload("");
  ASSERT_NE(log.find("proxy no longer listening on 127.0.0.2:"), std::string::npos) << log;
  EXPECT_LT(ConnectTcp(second_port, "127.0.0.2", 1000), 0) << "still accepting";
  EXPECT_TRUE(EchoPart(through_second, 100000, 100000));  // its session goes on
  ::close(through_second);
  int fd = Echo(daemon_->proxy_port());  // the first address never stopped
  EXPECT_GE(fd, 0);
  if (fd >= 0) ::close(fd);
}

// A configuration with an error is refused as a whole: nothing of it applies, not even its valid
// changes. Changes that need a restart are named, and not applied.
TEST_F(ReloadTest, ABadConfigChangesNothingAndRestartOnlyChangesAreNamed) {
  std::string log = Reload("[proxy]\nlisten = 127.0.0.2:0\n[broker]\nlog_level = loud\n");
  EXPECT_NE(log.find("the running one stays"), std::string::npos) << log;
  EXPECT_NE(log.find("log_level"), std::string::npos) << log;
  EXPECT_EQ(log.find("127.0.0.2"), std::string::npos) << "a refused config bound an address";
  // An address that cannot be bound (not this host's) refuses the reload too, with nothing
  // else applied.
  log = Reload("[proxy]\nlisten = 127.0.0.1:0\nlisten = 192.0.2.1:7000\nmax_connections = 5\n");
  EXPECT_NE(log.find("the running configuration stays"), std::string::npos) << log;
  for (int i = 0; i < 8; ++i) {  // max_connections = 5 would refuse some of these
    int fd = Echo(daemon_->proxy_port());
    EXPECT_GE(fd, 0) << i;
    if (fd >= 0) ::close(fd);
  }
  log = Reload("[registry]\nport_range = 29000-29999\n");
  EXPECT_NE(log.find("configuration applied (changed: nothing)"), std::string::npos) << log;
  EXPECT_NE(log.find("not applied, needs a restart: registry.port_range"), std::string::npos)
      << log;
  // Still the old range: a new job's port is in 28000-28999.
  Backend other;
  auto r = daemon_->Cli({"save", "ssh", "--job-id", "job2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  int port = std::atoi(JsonText(ParseOut(r).get(), {"job", "port"}).c_str());
  EXPECT_GE(port, 28000);
  EXPECT_LE(port, 28999);
  // And it is named again at the next reload, since it still differs.
  log = Reload("[registry]\nport_range = 29000-29999\n");
  EXPECT_NE(log.find("needs a restart: registry.port_range"), std::string::npos) << log;
  EXPECT_EQ(daemon_->Stop(SIGTERM), 0);
}

// SIGUSR2: a new process takes the listening sockets over while 100 sessions stream through
// the old one and new connections keep coming; none is broken or refused, the old process
// exits by itself once its sessions end, and the new one serves the registry and the port.
TEST_F(ReloadTest, UpgradeHandsTheSocketsOverWithoutBreakingOrRefusingAnything) {
  constexpr int kSessions = 100;
  constexpr uint64_t kHalf = 128 * 1024;
  std::mutex mu;
  std::condition_variable cv;
  int at_middle = 0;
  bool handed_over = false;
  std::atomic<int> broken{0};
  std::vector<std::thread> sessions;
  for (int i = 0; i < kSessions; ++i) {
    sessions.emplace_back([&] {
      int fd = Echo(daemon_->proxy_port());
      bool ok = fd >= 0 && EchoPart(fd, 0, kHalf);
      {
        std::unique_lock<std::mutex> lock(mu);
        ++at_middle;
        cv.notify_all();
        cv.wait_for(lock, std::chrono::seconds(60), [&] { return handed_over; });
      }
      ok = ok && EchoPart(fd, kHalf, kHalf);
      if (!ok) broken++;
      if (fd >= 0) ::close(fd);
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(
        cv.wait_for(lock, std::chrono::seconds(120), [&] { return at_middle == kSessions; }));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> fresh{0}, refused{0};
  std::thread newcomer([&] {
    while (!stop) {
      int fd = Echo(daemon_->proxy_port());
      if (fd < 0) {
        refused++;
        continue;
      }
      if (EchoPart(fd, 0, 1000)) fresh++;
      ::close(fd);
    }
  });
  pid_t old_pid = daemon_->pid();
  size_t from = daemon_->Log().size();
  ::kill(old_pid, SIGUSR2);
  pid_t successor = -1;
  ASSERT_TRUE(WaitUntil([&] { return (successor = daemon_->Successor(from)) > 0; }))
      << daemon_->Log().substr(from);
  ASSERT_NE(successor, old_pid);
  struct Reaper {
    pid_t pid;
    ~Reaper() {
      ::kill(pid, SIGTERM);
      WaitUntil([&] { return Exited(pid); }, 20000);
    }
  } reaper{successor};
  // The registry is the successor's now: control requests are its.
  auto q = daemon_->Cli({"query", "--json"});
  EXPECT_EQ(q.exit_code, 0) << q;
  EXPECT_NE(q.out.find("job1"), std::string::npos) << q;
  {
    std::lock_guard<std::mutex> lock(mu);
    handed_over = true;
    cv.notify_all();
  }
  for (auto& t : sessions) t.join();
  int after = fresh.load();
  WaitUntil([&] { return fresh.load() >= after + 5; }, 20000);
  stop = true;
  newcomer.join();
  EXPECT_EQ(broken.load(), 0);
  EXPECT_EQ(refused.load(), 0);
  EXPECT_GE(fresh.load(), after + 5);
  // Its sessions over, the old process exits by itself, and the successor goes on serving.
  EXPECT_TRUE(WaitUntil([&] { return Exited(old_pid); }, 20000)) << daemon_->Log().substr(from);
  EXPECT_NE(daemon_->Log().find("the last session of the old process ended", from),
            std::string::npos);
  EXPECT_EQ(daemon_->Stop(SIGTERM), 0);  // reaps the old process
  int fd = Echo(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  EXPECT_TRUE(EchoPart(fd, 0, 100000));
  ::close(fd);
  EXPECT_EQ(daemon_->Cli({"save", "ssh", "--job-id", "job2", "--port", "28999"}).exit_code, 0);
}

// A successor that cannot start (here: the configuration has an error by now) changes nothing:
// it is gone, and this process serves control requests and the port as before.
TEST_F(ReloadTest, AnUpgradeThatCannotStartLeavesTheOldProcessServing) {
  WriteFile(daemon_->config_path(), base_config_ + "\n[broker]\nlog_level = loud\n");
  size_t from = daemon_->Log().size();
  ::kill(daemon_->pid(), SIGUSR2);
  ASSERT_TRUE(WaitUntil([&] {
    return daemon_->Log().find("this process goes on serving", from) != std::string::npos;
  })) << daemon_->Log().substr(from);
  WriteFile(daemon_->config_path(), base_config_);
  auto q = daemon_->Cli({"query", "--json"});
  EXPECT_EQ(q.exit_code, 0) << q;
  EXPECT_NE(q.out.find("job1"), std::string::npos) << q;
  int fd = Echo(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  EXPECT_TRUE(EchoPart(fd, 0, 10000));
  ::close(fd);
  EXPECT_EQ(daemon_->Stop(SIGTERM), 0);
}

}  // namespace
}  // namespace brokerproxy::testing
