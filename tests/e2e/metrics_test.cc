// The Prometheus endpoint ([metrics], cli/metrics.h) and the activity `query` reports: scraped
// with curl and checked with Debian's promtool, moved by real sessions, bounded against a
// stranger on the port, and carried across a reload and a binary upgrade.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <regex>
#include <string>
#include <vector>

#include "e2e/harness.h"

namespace brokerproxy::testing {
namespace {

constexpr char kMetricsConfig[] = "[metrics]\nlisten = 127.0.0.1:0\nper_job = 1\n";

// `promtool check metrics` on `scrape`: format and naming lints.
RunResult Promtool(const std::string& scrape) {
  RunOptions options;
  options.stdin_data = scrape;
  return RunCommand({"promtool", "check", "metrics"}, options);
}

// The value of the sample spelled exactly `series` ("name{labels}" as the exposition writes it),
// or -1 if the scrape has no such line.
double Sample(const std::string& scrape, const std::string& series) {
  size_t at = 0;
  while ((at = scrape.find(series + " ", at)) != std::string::npos) {
    if (at == 0 || scrape[at - 1] == '\n') return std::stod(scrape.substr(at + series.size() + 1));
    at += series.size();
  }
  return -1;
}

class MetricsTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::string& extra = kMetricsConfig) {
    daemon_ = std::make_unique<Daemon>(dir_, extra);
    ASSERT_TRUE(daemon_->Start());
    if (extra.empty()) return;
    ASSERT_TRUE(WaitUntil([&] { return !MetricsUrl().empty(); })) << daemon_->Log();
    url_ = MetricsUrl();
  }

  // The endpoint the daemon announced last ("" if none).
  std::string MetricsUrl() const {
    std::string log = daemon_->Log();
    size_t at = log.rfind("metrics: http://");
    if (at == std::string::npos) return "";
    at += std::string("metrics: ").size();
    return log.substr(at, log.find('\n', at) - at);
  }

  RunResult Curl(const std::vector<std::string>& extra, const std::string& url) {
    std::vector<std::string> argv = {"curl", "-sS", "--max-time", "10"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back(url);
    return RunCommand(argv);
  }

  std::string Scrape() {
    RunResult r = Curl({"--fail"}, url_);
    EXPECT_EQ(r.exit_code, 0) << r;
    return r.out;
  }

  // An echo session to `job`, -1 unless it got OK.
  int Open(const std::string& job, const std::string& secret) {
    int fd = ConnectTcp(daemon_->proxy_port());
    if (fd < 0) return -1;
    SendAll(fd, "BROKER1 " + job + " " + secret + "\necho\n");
    if (ReadLine(fd, 256).value_or("") != "OK") {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  TempDir dir_;
  Backend backend_;
  std::unique_ptr<Daemon> daemon_;
  std::string url_;
};

TEST_F(MetricsTest, ScrapesPassPromtoolCountSessionsAndForgetRemovedJobs) {
  StartDaemon();
  std::string secret = daemon_->SaveJob("job1", backend_.port());
  ASSERT_FALSE(secret.empty());
  std::string before = Scrape();
  RunResult check = Promtool(before);
  ASSERT_EQ(check.exit_code, 0) << check << before;
  EXPECT_EQ(Sample(before, "brokerproxy_registry_jobs"), 1);
  EXPECT_EQ(Sample(before, "brokerproxy_sessions_total"), 0);
  EXPECT_EQ(Sample(before, "brokerproxy_job_sessions_total{job=\"job1\",owner=\"0\"}"), 0);
  EXPECT_NE(before.find("brokerproxy_build_info{version=\""), std::string::npos);

  for (int i = 0; i < 3; ++i) {
    int fd = Open("job1", secret);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(SendAll(fd, "0123456789"));
    ::shutdown(fd, SHUT_WR);
    EXPECT_EQ(ReadToEof(fd), "0123456789");
    ::close(fd);
  }
  int wrong = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(wrong, 0);
  SendAll(wrong, "BROKER1 job1 " + std::string(secret.size(), '0') + "\n");
  EXPECT_EQ(ReadLine(wrong, 256).value_or(""), "ERR denied");
  ::close(wrong);

  std::string after;
  ASSERT_TRUE(WaitUntil([&] {
    after = Scrape();
    return Sample(after, "brokerproxy_session_duration_seconds_count") == 3;
  })) << after;
  check = Promtool(after);
  EXPECT_EQ(check.exit_code, 0) << check << after;
  EXPECT_EQ(Sample(after, "brokerproxy_sessions_total"), 3);
  EXPECT_EQ(Sample(after, "brokerproxy_sessions_active"), 0);
  EXPECT_EQ(Sample(after, "brokerproxy_connections_refused_total{reason=\"denied\"}"), 1);
  EXPECT_EQ(Sample(after, "brokerproxy_handshake_duration_seconds_count{protocol=\"plain\"}"), 3);
  EXPECT_EQ(Sample(after,
                   "brokerproxy_handshake_duration_seconds_bucket{protocol=\"plain\","
                   "le=\"+Inf\"}"),
            3);
  EXPECT_EQ(Sample(after, "brokerproxy_job_sessions_total{job=\"job1\",owner=\"0\"}"), 3);
  EXPECT_EQ(Sample(after, "brokerproxy_job_refused_total{job=\"job1\",owner=\"0\"}"), 1);
  // "echo\n" and ten bytes each way per session, at least.
  EXPECT_GE(
      Sample(after,
             "brokerproxy_job_relayed_bytes_total{job=\"job1\",owner=\"0\",direction=\"up\"}"),
      3 * 15);
  EXPECT_GE(Sample(after, "brokerproxy_relayed_bytes_total{direction=\"down\"}"), 3 * 10);
  EXPECT_GE(Sample(after, "brokerproxy_store_write_duration_seconds_count"), 1);

  ASSERT_EQ(daemon_->Cli({"remove", "job1"}).exit_code, 0);
  std::string removed = Scrape();
  EXPECT_EQ(removed.find("job=\"job1\""), std::string::npos) << removed;
  EXPECT_EQ(Sample(removed, "brokerproxy_registry_jobs"), 0);
  EXPECT_EQ(Sample(removed, "brokerproxy_sessions_total"), 3) << "global counters stay";
}

TEST_F(MetricsTest, PerJobSeriesAreOffByDefaultAndCapped) {
  StartDaemon("[metrics]\nlisten = 127.0.0.1:0\n");
  ASSERT_FALSE(daemon_->SaveJob("job1", backend_.port()).empty());
  EXPECT_EQ(Scrape().find("job=\"job1\""), std::string::npos);
  daemon_->Stop();

  StartDaemon("[metrics]\nlisten = 127.0.0.1:0\nper_job = 1\nmax_job_series = 1\n");
  ASSERT_FALSE(daemon_->SaveJob("job2", backend_.port()).empty());
  std::string scrape = Scrape();
  EXPECT_EQ(Sample(scrape, "brokerproxy_job_series_dropped"), 1) << scrape;
  EXPECT_NE(scrape.find("brokerproxy_job_sessions_total{job="), std::string::npos);
}

// What a stranger on the port can send: other paths and methods, oversized or endless heads,
// junk, and more connections than the endpoint serves at once. Each is answered or closed and
// the endpoint goes on serving.
TEST_F(MetricsTest, TheEndpointBoundsWhatAStrangerSends) {
  StartDaemon();
  std::string base = url_.substr(0, url_.size() - std::string("/metrics").size());
  int port = std::stoi(base.substr(base.rfind(':') + 1));
  auto status_of = [&](const std::vector<std::string>& extra, const std::string& url) {
    RunResult r = Curl(extra, url);
    size_t at = r.out.find("HTTP/1.1 ");
    return at == std::string::npos ? std::string("none: ") + r.err : r.out.substr(at + 9, 3);
  };
  EXPECT_EQ(status_of({"-i"}, base + "/"), "404");
  EXPECT_EQ(status_of({"-i", "-X", "POST"}, url_), "405");
  EXPECT_EQ(status_of({"-i", "-H", "X-Pad: " + std::string(9000, 'a')}, url_), "431");
  std::vector<std::string> many = {"-i"};
  for (int i = 0; i < 70; ++i) many.insert(many.end(), {"-H", "X-" + std::to_string(i) + ": 1"});
  EXPECT_EQ(status_of(many, url_), "431");
  EXPECT_EQ(status_of({"-I"}, url_), "200");

  int junk = ConnectTcp(port);
  ASSERT_GE(junk, 0);
  SendAll(junk, "\x16\x03\x01 not http\r\n\r\n");
  EXPECT_NE(ReadToEof(junk).find("400 Bad Request"), std::string::npos);
  ::close(junk);

  // Sixteen silent connections hold every slot: a seventeenth is closed at once, unanswered.
  std::vector<int> held;
  for (int i = 0; i < 16; ++i) {
    int fd = ConnectTcp(port);
    ASSERT_GE(fd, 0);
    SendAll(fd, "GET /metrics HTTP/1.1\r\n");  // an unfinished head
    held.push_back(fd);
  }
  ASSERT_TRUE(WaitUntil([&] {
    int extra = ConnectTcp(port);
    if (extra < 0) return false;
    SendAll(extra, "GET /metrics HTTP/1.1\r\n\r\n");
    bool closed = ReadToEof(extra).empty();
    ::close(extra);
    return closed;
  }));
  for (int fd : held) ::close(fd);
  ASSERT_TRUE(WaitUntil([&] { return Curl({"--fail"}, url_).exit_code == 0; }));
}

TEST_F(MetricsTest, QueryShowsIdleTimeAndIdleForKeepsTheIdleJobs) {
  StartDaemon("");
  std::string secret = daemon_->SaveJob("busy", backend_.port());
  ASSERT_FALSE(daemon_->SaveJob("quiet", backend_.port()).empty());
  int fd = Open("busy", secret);
  ASSERT_GE(fd, 0);
  // "quiet" is idle from its save on; "busy" has a session open, so it is not idle at all.
  RunResult idle;
  ASSERT_TRUE(WaitUntil([&] {
    idle = daemon_->Cli({"query", "--idle-for", "2s", "--json"});
    return idle.out.find("\"quiet\"") != std::string::npos;
  })) << idle;
  EXPECT_EQ(idle.out.find("\"busy\""), std::string::npos) << idle;
  registry::JsonPtr all = ParseOut(daemon_->Cli({"query", "--json"}));
  ASSERT_TRUE(all);
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(all.get(), "jobs");
  for (const cJSON* j = jobs ? jobs->child : nullptr; j; j = j->next) {
    std::string id = JsonText(j, {"id"});
    double idle_s = cJSON_GetObjectItemCaseSensitive(j, "idle")->valuedouble;
    if (id == "busy") {
      EXPECT_EQ(idle_s, 0);
    } else {
      EXPECT_GE(idle_s, 2) << id;
    }
  }
  RunResult table = daemon_->Cli({"query"});
  EXPECT_NE(table.out.find("IDLE"), std::string::npos) << table;

  // Once its session ends, "busy" becomes idle too, counted from then.
  ::close(fd);
  RunResult both;
  ASSERT_TRUE(WaitUntil([&] {
    both = daemon_->Cli({"query", "--idle-for", "1s"});
    return both.out.find("busy") != std::string::npos;
  })) << both;
  EXPECT_NE(both.out.find("quiet"), std::string::npos) << both;
  RunResult bad = daemon_->Cli({"query", "--idle-for", "soon"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--idle-for"), std::string::npos) << bad;
}

TEST_F(MetricsTest, AReloadStartsAndStopsTheEndpointAndAnUpgradeKeepsItsPort) {
  StartDaemon("");
  std::string config = ReadFile(daemon_->config_path());
  auto reload = [&](const std::string& extra) {
    WriteFile(daemon_->config_path(), config + "\n" + extra);
    size_t from = daemon_->Log().size();
    ::kill(daemon_->pid(), SIGHUP);
    EXPECT_TRUE(WaitUntil([&] {
      return daemon_->Log().substr(from).find("reload: configuration applied") != std::string::npos;
    })) << daemon_->Log().substr(from);
  };
  reload(kMetricsConfig);
  ASSERT_TRUE(WaitUntil([&] { return !MetricsUrl().empty(); })) << daemon_->Log();
  url_ = MetricsUrl();
  EXPECT_EQ(Sample(Scrape(), "brokerproxy_registry_jobs"), 0);
  reload("");
  EXPECT_TRUE(WaitUntil([&] { return Curl({}, url_).exit_code != 0; }));
  size_t announced = daemon_->Log().size();
  reload(kMetricsConfig);
  ASSERT_TRUE(WaitUntil(
      [&] { return daemon_->Log().find("metrics: http://", announced) != std::string::npos; }));
  url_ = MetricsUrl();
  ASSERT_FALSE(Scrape().empty());

  // The binary upgrade hands the endpoint's socket over: the same URL answers throughout, and
  // then from the new process alone.
  pid_t old_pid = daemon_->pid();
  size_t from = daemon_->Log().size();
  ::kill(old_pid, SIGUSR2);
  int failed = 0;
  pid_t successor = -1;
  ASSERT_TRUE(WaitUntil([&] {
    if (Curl({"--fail", "-o", "/dev/null"}, url_).exit_code != 0) failed++;
    return (successor = daemon_->Successor(from)) > 0;
  })) << daemon_->Log().substr(from);
  EXPECT_TRUE(WaitUntil([&] { return Exited(old_pid); }));
  EXPECT_EQ(failed, 0);
  EXPECT_FALSE(Scrape().empty());
  std::string port = url_.substr(url_.rfind(':') + 1);
  port = port.substr(0, port.find('/'));
  RunResult owner = RunCommand({"ss", "-Htlnp", "sport = :" + port});
  EXPECT_NE(owner.out.find("pid=" + std::to_string(successor) + ","), std::string::npos) << owner;
  EXPECT_EQ(owner.out.find("pid=" + std::to_string(old_pid) + ","), std::string::npos) << owner;
  daemon_->Stop(SIGTERM);  // reaps the old process
  ::kill(successor, SIGTERM);
  EXPECT_TRUE(WaitUntil([&] { return Exited(successor); }));
}

}  // namespace
}  // namespace brokerproxy::testing
