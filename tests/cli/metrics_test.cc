// cli/metrics.h: what a scrape contains (RenderMetrics) and the endpoint's own deadline, on a
// real loop and real sockets. The end-to-end side (promtool, sessions, reload, upgrade) is in
// e2e/metrics_test.cc.

#include "cli/metrics.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "e2e/harness.h"
#include "loop/timer.h"

namespace brokerproxy::cli {
namespace {

TEST(RenderMetricsTest, HistogramsEndInInfAndOnlyPresentPartsAreShown) {
  proxy::Stats stats;
  stats.SessionStarted("7", proxy::SessionKind::kPlain, 0.002);
  MetricsInput in;
  in.version = "1.2.3";
  in.stats = &stats;
  in.jobs = 1;
  std::string text = RenderMetrics(in);
  EXPECT_NE(text.find("brokerproxy_build_info{version=\"1.2.3\"} 1\n"), std::string::npos);
  EXPECT_NE(text.find("brokerproxy_handshake_duration_seconds_bucket{protocol=\"plain\","
                      "le=\"0.0025\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("brokerproxy_handshake_duration_seconds_bucket{protocol=\"plain\","
                      "le=\"+Inf\"} 1\n"),
            std::string::npos);
  EXPECT_NE(text.find("# TYPE brokerproxy_sessions_total counter"), std::string::npos);
  // No store, no scheduler, no per-job series were given: none are made up.
  EXPECT_EQ(text.find("brokerproxy_store_"), std::string::npos);
  EXPECT_EQ(text.find("brokerproxy_scheduler_"), std::string::npos);
  EXPECT_EQ(text.find("brokerproxy_job_"), std::string::npos);

  in.per_job = true;
  in.job_rows.push_back({"7", 1001, 1700000000, &stats.jobs().at("7")});
  in.job_rows.push_back({"8", 1002, 1700000001, nullptr});
  in.job_rows_dropped = 3;
  text = RenderMetrics(in);
  EXPECT_NE(text.find("brokerproxy_job_sessions_active{job=\"7\",owner=\"1001\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("brokerproxy_job_sessions_total{job=\"8\",owner=\"1002\"} 0\n"),
            std::string::npos);
  EXPECT_NE(text.find("brokerproxy_job_last_active_timestamp_seconds{job=\"8\",owner=\"1002\"} "
                      "1700000001\n"),
            std::string::npos);
  EXPECT_NE(text.find("brokerproxy_job_series_dropped 3\n"), std::string::npos);
}

// A client that connects and never finishes its request is closed at the deadline.
TEST(MetricsServerTest, ASilentClientIsClosedAtTheDeadline) {
  auto loop = loop::Loop::Create();
  ASSERT_TRUE(loop.ok());
  MetricsLimits limits;
  limits.timeout_ms = 200;
  auto server = MetricsServer::Create(
      loop->get(), {HostPort{"127.0.0.1", 0}}, {}, [] { return std::string("x 1\n"); }, limits);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  std::string address = (*server)->addresses().at(0);
  int port = std::stoi(address.substr(address.rfind(':') + 1));
  std::atomic<bool> done{false};
  std::string got = "unset";
  std::thread client([&] {
    int fd = testing::ConnectTcp(port);
    if (fd >= 0) {
      testing::SendAll(fd, "GET /metrics HTTP/1.1\r\nHost: x\r\n");  // never ends
      got = testing::ReadToEof(fd);  // returns once the server closes
      ::close(fd);
    }
    done = true;
  });
  auto tick = loop::Timer::Create(**loop);
  ASSERT_TRUE(tick.ok());
  (*tick)->Start(10, 10, [&] {
    if (done) (*loop)->Stop();
  });
  (*loop)->Run();
  client.join();
  EXPECT_EQ(got, "");
  EXPECT_EQ((*server)->clients(), 0u);
  tick->reset();
  server->reset();
  EXPECT_TRUE((*loop)->Close().ok());
}

}  // namespace
}  // namespace brokerproxy::cli
