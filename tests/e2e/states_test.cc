// Job states end to end: what `save`, `load`, `wait` and `query` say about a job must be what its
// backend does. A job is waiting until something listens, ready while it does, and down once the
// probe gave up or the backend refused a connection after it was ready; jobs are listed in
// natural order, with their expiry.

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"
#include "registry/json.h"
#include "support/socket_as.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

// A listening socket of the test process (root: no owner check applies to root's jobs) on
// 127.0.0.1:`port`; nothing is accepted (the kernel completes the handshakes). Closed on
// destruction.
class PortListener {
 public:
  explicit PortListener(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd_, 64) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  ~PortListener() {
    if (fd_ >= 0) close(fd_);
  }
  PortListener(const PortListener&) = delete;
  PortListener& operator=(const PortListener&) = delete;
  bool ok() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

class StatesTest : public ::testing::Test {
 protected:
  // The job's "state" in `query --json`, "" if it is not listed.
  static std::string QueryState(const Daemon& d, const std::string& id) {
    auto q = ParseOut(d.Cli({"query", "--json"}));
    const cJSON* jobs = q ? cJSON_GetObjectItemCaseSensitive(q.get(), "jobs") : nullptr;
    for (const cJSON* j = cJSON_IsArray(jobs) ? jobs->child : nullptr; j; j = j->next) {
      if (JsonText(j, {"id"}) != id) continue;
      // "ready" is kept for older clients, and always agrees.
      EXPECT_EQ(JsonText(j, {"ready"}), JsonText(j, {"state"}) == "ready" ? "true" : "false");
      return JsonText(j, {"state"});
    }
    return "";
  }
  // The job's "state" in `load --json`.
  static std::string LoadState(const Daemon& d, const std::string& id) {
    auto l = ParseOut(d.Cli({"load", id, "--json"}));
    return l ? JsonText(l.get(), {"job", "state"}) : "";
  }
  // The state column of the job's row in the text of `query`.
  static std::string QueryTextState(const Daemon& d, const std::string& id) {
    RunResult q = d.Cli({"query"});
    size_t at = q.out.find("\n" + id + " ");
    if (at == std::string::npos) return "";
    std::string row = q.out.substr(at + 1, q.out.find('\n', at + 1) - at - 1);
    for (const char* s : {"ready", "waiting", "down"}) {
      if (row.find(std::string(" ") + s + " ") != std::string::npos) return s;
    }
    return row;
  }
  // The secret of a job saved with `save ... --json`.
  static std::string Secret(const RunResult& save) {
    auto j = ParseOut(save);
    return j ? JsonText(j.get(), {"job", "secret"}) : "";
  }
  // One client through the proxy's plain preamble; the reply line.
  static std::string ProxyReply(const Daemon& d, const std::string& id, const std::string& secret) {
    int fd = ConnectTcp(d.proxy_port());
    if (fd < 0) return "<no connection>";
    SendAll(fd, "BROKER1 " + id + " " + secret + "\n");
    std::string reply = ReadLine(fd, 256).value_or("<closed>");
    close(fd);
    return reply;
  }

  TempDir dir_;
};

// `save` without --wait while nothing listens: waiting (in save's reply, load and query), and
// probed like a waited-for job, so it turns ready once a service listens.
TEST_F(StatesTest, SaveWithoutWaitIsWaitingUntilSomethingListens) {
  Daemon d(dir_, "[registry]\nrecheck_interval = 0\n");
  ASSERT_TRUE(d.Start());
  PortReservation reserved;  // refused until the test listens on it
  const int port = reserved.port();
  RunResult save =
      d.Cli({"save", "ssh", "--job-id", "w1", "--port", std::to_string(port), "--json"});
  ASSERT_EQ(save.exit_code, 0) << save;
  auto reply = ParseOut(save);
  ASSERT_TRUE(reply);
  EXPECT_EQ(JsonText(reply.get(), {"job", "state"}), "waiting") << save;
  EXPECT_EQ(JsonText(reply.get(), {"job", "ready"}), "false") << save;
  EXPECT_EQ(QueryState(d, "w1"), "waiting");
  EXPECT_EQ(LoadState(d, "w1"), "waiting");
  RunResult text = d.Cli({"save", "ssh", "--job-id", "w2", "--port", std::to_string(port)});
  EXPECT_NE(text.out.find("state:    waiting"), std::string::npos) << text;
  EXPECT_EQ(QueryTextState(d, "w2"), "waiting");

  PortListener service(port);
  ASSERT_TRUE(service.ok());
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "w1") == "ready"; })) << d.Log();
  EXPECT_EQ(LoadState(d, "w1"), "ready");
  EXPECT_TRUE(WaitUntil([&] { return QueryTextState(d, "w2") == "ready"; })) << d.Log();
  RunResult load = d.Cli({"load", "w2"});
  EXPECT_NE(load.out.find("state:    ready"), std::string::npos) << load;
  EXPECT_EQ(d.Stop(), 0);
}

// A ready job whose backend refuses a proxied connection is down at once (no periodic re-check
// here), is probed again, and is ready again when its port listens again.
TEST_F(StatesTest, RefusedProxiedConnectionMakesAReadyJobDownUntilItListensAgain) {
  Daemon d(dir_, "[registry]\nrecheck_interval = 0\n");
  ASSERT_TRUE(d.Start());
  PortReservation reserved;  // refused until the test listens on it
  const int port = reserved.port();
  std::string secret;
  {
    PortListener service(port);
    ASSERT_TRUE(service.ok());
    RunResult save = d.Cli(
        {"save", "ssh", "--job-id", "r1", "--port", std::to_string(port), "--wait", "--json"});
    ASSERT_EQ(save.exit_code, 0) << save;
    secret = Secret(save);
    ASSERT_FALSE(secret.empty());
    EXPECT_EQ(QueryState(d, "r1"), "ready");
  }
  // Nothing listens any more; until a client is refused the daemon has no reason to know.
  EXPECT_EQ(QueryState(d, "r1"), "ready");
  std::string reply = ProxyReply(d, "r1", secret);
  EXPECT_EQ(reply.rfind("ERR", 0), 0u) << reply;
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "r1") == "down"; }, 5000)) << d.Log();
  EXPECT_EQ(LoadState(d, "r1"), "down");
  EXPECT_EQ(QueryTextState(d, "r1"), "down");
  // A flood of refused clients: still one probe for the job.
  for (int i = 0; i < 20; ++i) ProxyReply(d, "r1", secret);
  auto stats = ParseOut(d.Cli({"stats", "--json"}));
  ASSERT_TRUE(stats);
  EXPECT_EQ(JsonText(stats.get(), {"stats", "probes"}), "1");
  // `wait` on a down job waits for it to come back.
  RunResult wait = d.Cli({"wait", "r1", "--timeout", "1s"});
  EXPECT_NE(wait.exit_code, 0) << wait;

  PortListener again(port);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "r1") == "ready"; })) << d.Log();
  EXPECT_EQ(ProxyReply(d, "r1", secret), "OK");
  EXPECT_EQ(QueryState(d, "r1"), "ready");
  EXPECT_NE(d.Log().find("job r1: its backend 127.0.0.1:" + std::to_string(port) +
                         " refused a proxied connection"),
            std::string::npos)
      << d.Log();
  EXPECT_EQ(d.Stop(), 0);
}

// The owner check counts as a refusal: once another user's socket listens on the port of
// alice's ready job, a proxied connection is not made and the job is down; it is ready again when
// alice's service listens there again.
TEST_F(StatesTest, AnotherUsersListenerMakesAReadyJobDown) {
  std::optional<uid_t> alice = TestUser("bp-alice");
  std::optional<uid_t> bob = TestUser("bp-bob");
  ASSERT_TRUE(alice && bob);
  Daemon d(dir_, "[registry]\nrecheck_interval = 0\n");
  ASSERT_TRUE(d.Start());
  PortReservation reserved;  // refused until the test listens on it
  const int port = reserved.port();
  int alices = ListenAs(*alice, "127.0.0.1", port);
  ASSERT_GE(alices, 0);
  std::string reply = ControlRequestAs(*alice, d.socket_path(),
                                       R"({"op":"save","job":"o1","type":"ssh","host":"127.0.0.1",)"
                                       R"("port":)" +
                                           std::to_string(port) + "}");
  auto saved = ParseOut(reply);
  ASSERT_TRUE(saved) << reply;
  std::string secret = JsonText(saved.get(), {"job", "secret"});
  ASSERT_FALSE(secret.empty()) << reply;
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "o1") == "ready"; })) << d.Log();

  close(alices);
  int bobs = ListenAs(*bob, "127.0.0.1", port);
  ASSERT_GE(bobs, 0);
  EXPECT_EQ(ProxyReply(d, "o1", secret), "ERR unavailable");
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "o1") == "down"; }, 5000)) << d.Log();
  EXPECT_NE(d.Log().find("job o1: its backend 127.0.0.1:" + std::to_string(port) +
                         " refused a proxied connection"),
            std::string::npos)
      << d.Log();
  // Bob's listener does not make it ready.
  EXPECT_EQ(QueryState(d, "o1"), "down");

  close(bobs);
  alices = ListenAs(*alice, "127.0.0.1", port);
  ASSERT_GE(alices, 0);
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "o1") == "ready"; })) << d.Log();
  close(alices);
  EXPECT_EQ(d.Stop(), 0);
}

// The periodic re-check finds a backend that stopped without any client noticing, and the job
// comes back when it listens again.
TEST_F(StatesTest, PeriodicRecheckFindsAStoppedBackend) {
  Daemon d(dir_, "[registry]\nrecheck_interval = 1s\n");
  ASSERT_TRUE(d.Start());
  PortReservation reserved;  // refused until the test listens on it
  const int port = reserved.port();
  {
    PortListener service(port);
    ASSERT_TRUE(service.ok());
    RunResult save =
        d.Cli({"save", "ssh", "--job-id", "c1", "--port", std::to_string(port), "--wait"});
    ASSERT_EQ(save.exit_code, 0) << save;
  }
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "c1") == "down"; })) << d.Log();
  EXPECT_NE(d.Log().find("job c1: its backend 127.0.0.1:" + std::to_string(port) +
                         " did not accept the periodic re-check"),
            std::string::npos)
      << d.Log();
  PortListener again(port);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "c1") == "ready"; })) << d.Log();
  EXPECT_EQ(d.Stop(), 0);
}

// A probe that gives up leaves the job down in query AND load (text and JSON).
TEST_F(StatesTest, ProbeGivingUpIsDownInQueryAndLoad) {
  Daemon d(dir_, "[registry]\nready_timeout = 1s\n");
  ASSERT_TRUE(d.Start());
  PortReservation reserved;  // refused until the test listens on it
  const int port = reserved.port();
  ASSERT_EQ(d.Cli({"save", "ssh", "--job-id", "g1", "--port", std::to_string(port)}).exit_code, 0);
  EXPECT_TRUE(WaitUntil([&] { return QueryState(d, "g1") == "down"; })) << d.Log();
  EXPECT_EQ(LoadState(d, "g1"), "down");
  EXPECT_EQ(QueryTextState(d, "g1"), "down");
  RunResult load = d.Cli({"load", "g1"});
  EXPECT_NE(load.out.find("state:    down"), std::string::npos) << load;
  EXPECT_EQ(d.Stop(), 0);
}

// Jobs are listed in natural order: 7, 9, 11, not 11, 7, 9.
TEST_F(StatesTest, QueryListsJobsInNaturalOrder) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  for (const char* id : {"11", "7", "9", "11.web", "100"}) {
    ASSERT_EQ(d.Cli({"save", "ssh", "--job-id", id, "--port", "7001"}).exit_code, 0) << id;
  }
  const std::vector<std::string> want = {"7", "9", "11", "11.web", "100"};
  auto q = ParseOut(d.Cli({"query", "--json"}));
  ASSERT_TRUE(q);
  std::vector<std::string> ids;
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(q.get(), "jobs");
  for (const cJSON* j = cJSON_IsArray(jobs) ? jobs->child : nullptr; j; j = j->next) {
    ids.push_back(JsonText(j, {"id"}));
  }
  EXPECT_EQ(ids, want);
  RunResult text = d.Cli({"query"});
  std::vector<std::string> rows;
  for (size_t at = text.out.find('\n'); at != std::string::npos && at + 1 < text.out.size();
       at = text.out.find('\n', at + 1)) {
    rows.push_back(text.out.substr(at + 1, text.out.find(' ', at + 1) - at - 1));
  }
  EXPECT_EQ(rows, want) << text;

  // `stats` lists its per-job counters in the same order (a wrong secret makes an entry).
  for (const char* id : {"11", "100", "7", "11.web", "9"}) {
    EXPECT_EQ(ProxyReply(d, id, std::string(64, '0')), "ERR denied") << id;
  }
  auto stats = ParseOut(d.Cli({"stats", "--json"}));
  ASSERT_TRUE(stats);
  const cJSON* per_job = cJSON_GetObjectItemCaseSensitive(
      cJSON_GetObjectItemCaseSensitive(stats.get(), "stats"), "per_job");
  std::vector<std::string> counted;
  for (const cJSON* j = cJSON_IsObject(per_job) ? per_job->child : nullptr; j; j = j->next) {
    counted.push_back(j->string);
  }
  EXPECT_EQ(counted, want) << registry::PrintJson(stats.get());
  EXPECT_EQ(d.Stop(), 0);
}

// Expiry in load and query: unix seconds in JSON; a UTC time, how far off and the unix seconds
// in text; "never" for a job without one.
TEST_F(StatesTest, ExpiryIsShown) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_EQ(d.Cli({"save", "ssh", "--job-id", "e1", "--port", "7001", "--ttl", "3h"}).exit_code, 0);
  ASSERT_EQ(d.Cli({"save", "ssh", "--job-id", "e2", "--port", "7001"}).exit_code, 0);
  auto l = ParseOut(d.Cli({"load", "e1", "--json"}));
  ASSERT_TRUE(l);
  const int64_t created = std::stoll(JsonText(l.get(), {"job", "created"}));
  const int64_t expires = std::stoll(JsonText(l.get(), {"job", "expires"}));
  EXPECT_EQ(expires, created + 3 * 3600);
  time_t t = static_cast<time_t>(expires);
  tm utc{};
  gmtime_r(&t, &utc);
  char iso[32];
  std::strftime(iso, sizeof(iso), "%Y-%m-%dT%H:%M:%SZ", &utc);

  RunResult load = d.Cli({"load", "e1"});
  EXPECT_NE(load.out.find(std::string("expires:  ") + iso + " (in "), std::string::npos) << load;
  EXPECT_TRUE(load.out.find("(in 3h; ") != std::string::npos ||
              load.out.find("(in 2h 59m; ") != std::string::npos)
      << load;
  EXPECT_NE(load.out.find("; unix " + std::to_string(expires) + ")"), std::string::npos) << load;
  RunResult never = d.Cli({"load", "e2"});
  EXPECT_NE(never.out.find("expires:  never\n"), std::string::npos) << never;
  RunResult q = d.Cli({"query"});
  EXPECT_NE(q.out.find(iso), std::string::npos) << q;
  EXPECT_NE(q.out.find("never"), std::string::npos) << q;
  auto qj = ParseOut(d.Cli({"query", "--json"}));
  ASSERT_TRUE(qj);
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(qj.get(), "jobs");
  ASSERT_EQ(cJSON_GetArraySize(jobs), 2);
  EXPECT_EQ(JsonText(cJSON_GetArrayItem(jobs, 0), {"expires"}), std::to_string(expires));
  EXPECT_EQ(JsonText(cJSON_GetArrayItem(jobs, 1), {"expires"}), "0");
  EXPECT_EQ(d.Stop(), 0);
}

}  // namespace
}  // namespace brokerproxy::testing
