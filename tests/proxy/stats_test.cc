// The proxy's counters (proxy/server/stats.h): byte totals added once each, per-job counters
// pruned when their job is gone and idle, and the JSON `brokerproxy stats` shows.

#include "proxy/server/stats.h"

#include <gtest/gtest.h>

#include <ctime>
#include <set>
#include <string>
#include <vector>

#include "registry/json.h"

namespace brokerproxy::proxy {
namespace {

double Number(const cJSON* obj, const char* a, const char* b) {
  const cJSON* outer = cJSON_GetObjectItemCaseSensitive(obj, a);
  const cJSON* v = cJSON_GetObjectItemCaseSensitive(outer, b);
  return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

std::vector<std::string> Keys(const cJSON* obj) {
  std::vector<std::string> out;
  const cJSON* item = nullptr;
  cJSON_ArrayForEach(item, obj) out.push_back(item->string);
  return out;
}

TEST(StatsTest, ByteReportAddsEachByteOnce) {
  Stats stats;
  ByteReport a;
  ByteReport b;
  EXPECT_EQ(a.Flush(&stats, "web", 10, 100), std::make_pair(uint64_t{10}, uint64_t{100}));
  EXPECT_EQ(a.Flush(&stats, "web", 10, 100), std::make_pair(uint64_t{0}, uint64_t{0}));
  EXPECT_EQ(a.Flush(&stats, "web", 15, 150), std::make_pair(uint64_t{5}, uint64_t{50}));
  // Another connection's totals start from zero and add to the same counters.
  EXPECT_EQ(b.Flush(&stats, "db", 1, 2), std::make_pair(uint64_t{1}, uint64_t{2}));
  EXPECT_EQ(stats.global().bytes_up, 16u);
  EXPECT_EQ(stats.global().bytes_down, 152u);
  EXPECT_EQ(stats.job("web").bytes_up, 15u);
  EXPECT_EQ(stats.job("web").bytes_down, 150u);
  EXPECT_EQ(stats.job("db").bytes_up, 1u);
  EXPECT_EQ(stats.job("db").bytes_down, 2u);
}

TEST(StatsTest, ByteReportWithNothingNewMakesNoJobEntry) {
  Stats stats;
  ByteReport r;
  r.Flush(&stats, "web", 0, 0);
  registry::JsonPtr out = registry::NewObject();
  stats.AddToJson(out.get(), [](const std::string&) { return true; });
  EXPECT_TRUE(Keys(cJSON_GetObjectItemCaseSensitive(out.get(), "per_job")).empty());
}

TEST(StatsTest, PruneDropsGoneJobsWithoutActiveSessions) {
  Stats stats;
  stats.job("gone").connections = 3;
  stats.job("busy").active = 1;  // gone from the registry, but a session still runs
  stats.job("kept").connections = 1;
  std::set<std::string> existing = {"kept"};
  stats.Prune([&](const std::string& id) { return existing.count(id) != 0; });
  registry::JsonPtr out = registry::NewObject();
  stats.AddToJson(out.get(), [](const std::string&) { return true; });
  EXPECT_EQ(Keys(cJSON_GetObjectItemCaseSensitive(out.get(), "per_job")),
            (std::vector<std::string>{"busy", "kept"}));
  // Once its session ends, the job's counters go at the next prune.
  stats.job("busy").active = 0;
  stats.Prune([&](const std::string& id) { return existing.count(id) != 0; });
  out = registry::NewObject();
  stats.AddToJson(out.get(), [](const std::string&) { return true; });
  EXPECT_EQ(Keys(cJSON_GetObjectItemCaseSensitive(out.get(), "per_job")),
            (std::vector<std::string>{"kept"}));
}

TEST(StatsTest, JsonHasEveryGlobalCounterAndOnlyVisibleJobsInNaturalOrder) {
  Stats stats;
  GlobalCounters& g = stats.global();
  g.accepted = 1;
  g.active = 2;
  g.spliced = 3;
  g.denied = 4;
  g.bad_request = 5;
  g.timeouts = 6;
  g.unavailable = 7;
  g.busy = 8;
  g.throttled = 9;
  g.idle_closed = 10;
  g.tls_failures = 11;
  g.ssh_failures = 12;
  g.bytes_up = 13;
  g.bytes_down = 14;
  for (const char* id : {"job10", "job9", "job1", "secret-job"}) stats.job(id).connections = 1;
  stats.job("job9").denied = 2;
  registry::JsonPtr out = registry::NewObject();
  stats.AddToJson(out.get(), [](const std::string& id) { return id != "secret-job"; });
  const char* names[] = {"accepted",     "active",       "spliced",  "denied",    "bad_request",
                         "timeouts",     "unavailable",  "busy",     "throttled", "idle_closed",
                         "tls_failures", "ssh_failures", "bytes_up", "bytes_down"};
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); ++i) {
    EXPECT_EQ(Number(out.get(), "connections", names[i]), static_cast<double>(i + 1)) << names[i];
  }
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(out.get(), "per_job");
  EXPECT_EQ(Keys(jobs), (std::vector<std::string>{"job1", "job9", "job10"}));
  EXPECT_EQ(Number(jobs, "job9", "denied"), 2);
  EXPECT_EQ(Number(jobs, "job9", "connections"), 1);
  for (const char* field : {"active", "bytes_up", "bytes_down"}) {
    EXPECT_EQ(Number(jobs, "job9", field), 0) << field;
  }
}

}  // namespace
}  // namespace brokerproxy::proxy

namespace brokerproxy::proxy {
namespace {

TEST(StatsTest, SessionsCountTheJobTimeTheirHandshakeAndDurationAndMarkActivity) {
  Stats stats;
  int64_t before = static_cast<int64_t>(::time(nullptr));
  stats.SessionStarted("web", SessionKind::kTls, 0.003);
  stats.SessionStarted("web", SessionKind::kSsh, 0.2);
  EXPECT_EQ(stats.global().spliced, 2u);
  EXPECT_EQ(stats.job("web").connections, 2u);
  EXPECT_EQ(stats.job("web").active, 2u);
  EXPECT_GE(stats.job("web").last_active, before);
  EXPECT_EQ(stats.handshake_seconds(SessionKind::kTls).count(), 1u);
  EXPECT_EQ(stats.handshake_seconds(SessionKind::kSsh).count(), 1u);
  EXPECT_EQ(stats.handshake_seconds(SessionKind::kPlain).count(), 0u);
  stats.SessionEnded("web", 42);
  EXPECT_EQ(stats.job("web").active, 1u);
  EXPECT_EQ(stats.session_seconds().count(), 1u);
  EXPECT_DOUBLE_EQ(stats.session_seconds().sum(), 42);
  // Bytes mark activity too, and the JSON shows it.
  stats.job("db");
  ByteReport r;
  r.Flush(&stats, "db", 1, 0);
  EXPECT_GE(stats.job("db").last_active, before);
  registry::JsonPtr out(cJSON_CreateObject());
  stats.AddToJson(out.get(), [](const std::string&) { return true; });
  const cJSON* db = cJSON_GetObjectItemCaseSensitive(
      cJSON_GetObjectItemCaseSensitive(out.get(), "per_job"), "db");
  EXPECT_TRUE(cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(db, "last_active")));
}

}  // namespace
}  // namespace brokerproxy::proxy
