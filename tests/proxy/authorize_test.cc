// The proxy's secret check (Proxy::Authorize, proxy/server/proxy.h) against a registry the test
// fills in, on a Proxy that is never started: no socket, no listener. The throttle's windows
// are driven with explicit times in throttle_test.cc; here the window is longer than any test,
// so what is checked is the order of the checks and what is counted, and a lock-out ends only
// when the test moves the proxy's throttle clock past it.

#include <netinet/in.h>
#include <sys/socket.h>

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "loop/loop.h"
#include "proxy/server/proxy.h"
#include "registry/registry.h"

namespace brokerproxy::proxy {
namespace {

constexpr uid_t kAlice = 1001;
constexpr int kFailures = 3;

// A connection that owns nothing: Authorize only reads its source and ends its handshake.
class FakeConnection : public Connection {
 public:
  explicit FakeConnection(Proxy* proxy) : Connection(proxy, Loopback()) {}
  void Close(const char*) override {}
  void OnDeadline() override {}

 private:
  static sockaddr_storage Loopback() {
    sockaddr_storage ss{};
    auto* in = reinterpret_cast<sockaddr_in*>(&ss);
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return ss;
  }
};

class AuthorizeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    ProxyOptions o;
    o.throttle_failures = kFailures;
    o.throttle_window_ms = kWindowMs;
    proxy_ = std::make_unique<Proxy>(loop_.get(), &registry_, o);
    now_ms_ = loop_->Now();
    proxy_->set_throttle_clock_for_testing([this] { return now_ms_; });
    conn_ = std::make_unique<FakeConnection>(proxy_.get());
  }
  void TearDown() override {
    conn_.reset();
    proxy_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
  }

  // Saves job `id` for alice and returns its secret.
  std::string Save(const std::string& id, int64_t ttl = 0, int64_t now = ::time(nullptr)) {
    registry::SaveRequest req;
    req.id = id;
    req.host = "127.0.0.1";
    req.port = 8000;
    req.ttl = ttl;
    std::optional<registry::Job> replaced;
    auto job = registry_.Save(req, kAlice, now, &replaced);
    EXPECT_TRUE(job.ok()) << job.status().ToString();
    return job.ok() ? job->secret : "";
  }

  Proxy::Authorization Authorize(const std::string& id, const std::string& secret) {
    return proxy_->Authorize(id, secret, conn_.get());
  }

  static constexpr uint64_t kWindowMs = 3600 * 1000;
  uint64_t now_ms_ = 0;  // the proxy's throttle clock
  std::unique_ptr<loop::Loop> loop_;
  registry::Registry registry_{registry::Registry::Options{}};
  std::unique_ptr<Proxy> proxy_;
  std::unique_ptr<FakeConnection> conn_;
};

TEST_F(AuthorizeTest, TheRightSecretGetsTheJobsTarget) {
  std::string secret = Save("web");
  Proxy::Authorization a = Authorize("web", secret);
  ASSERT_FALSE(a.error.has_value());
  EXPECT_EQ(a.target.job_id, "web");
  EXPECT_EQ(a.target.host, "127.0.0.1");
  EXPECT_EQ(a.target.port, 8000);
  EXPECT_EQ(a.target.owner, kAlice);
  EXPECT_EQ(a.target.generation, registry_.Generation("web"));
  EXPECT_EQ(proxy_->stats().global().denied, 0u);
}

TEST_F(AuthorizeTest, AWrongSecretOrAnUnknownJobIsDeniedAndCounted) {
  std::string secret = Save("web");
  std::string wrong = secret;
  wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
  EXPECT_EQ(Authorize("web", wrong).error, ErrorCode::kDenied);
  EXPECT_EQ(Authorize("web", "").error, ErrorCode::kDenied);
  EXPECT_EQ(Authorize("nosuchjob", secret).error, ErrorCode::kDenied);
  EXPECT_EQ(proxy_->stats().global().denied, 3u);
  // Per-job counters exist for jobs that exist: an unknown id makes no entry.
  EXPECT_EQ(proxy_->stats().job("web").denied, 2u);
  EXPECT_EQ(proxy_->stats().job("nosuchjob").denied, 0u);
}

TEST_F(AuthorizeTest, RepeatedFailuresThrottleTheJobButNeverItsSecret) {
  std::string secret = Save("web");
  for (int i = 0; i < kFailures; ++i) {
    EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kDenied) << i;
  }
  // The job is throttled: failures are answered busy, ...
  EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kBusy);
  EXPECT_EQ(proxy_->stats().global().throttled, 1u);
  // ... but whoever knows the secret is admitted all the same.
  Proxy::Authorization a = Authorize("web", secret);
  EXPECT_FALSE(a.error.has_value());
  EXPECT_EQ(a.target.job_id, "web");
  // Other jobs are not throttled (the connection has no source key to count).
  Save("other");
  EXPECT_EQ(Authorize("other", "bad").error, ErrorCode::kDenied);
}

// A lock-out lasts one window from the failure that started it, by the proxy's clock: to its
// last millisecond failures are answered busy, and then denied again, counted afresh.
TEST_F(AuthorizeTest, ALockOutEndsOneWindowAfterItStarted) {
  Save("web");
  for (int i = 0; i < kFailures; ++i) {
    EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kDenied) << i;
  }
  const uint64_t started = now_ms_;
  EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kBusy);
  now_ms_ = started + kWindowMs - 1;
  EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kBusy) << "failures do not extend it";
  EXPECT_EQ(proxy_->stats().global().throttled, 2u);
  now_ms_ = started + kWindowMs;
  EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kDenied) << "the lock-out is over";
  // A new window: it takes kFailures failures again to be locked out.
  for (int i = 1; i < kFailures; ++i) {
    EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kDenied) << i;
  }
  EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kBusy);
  EXPECT_EQ(proxy_->stats().global().throttled, 3u);
}

TEST_F(AuthorizeTest, OneThrottleKeyPerJobHoweverItsIdIsSpelt) {
  std::string secret = Save("web");
  EXPECT_EQ(Authorize("WEB", "bad").error, ErrorCode::kDenied);
  EXPECT_EQ(Authorize("Web", "bad").error, ErrorCode::kDenied);
  EXPECT_EQ(Authorize("web", "bad").error, ErrorCode::kDenied);
  EXPECT_EQ(Authorize("wEb", "bad").error, ErrorCode::kBusy);
  EXPECT_EQ(proxy_->stats().job("web").denied, 4u);
  Proxy::Authorization a = Authorize("WEB", secret);
  ASSERT_FALSE(a.error.has_value());
  EXPECT_EQ(a.target.job_id, "web") << "the registry's one spelling";
}

TEST_F(AuthorizeTest, AnExpiredJobIsDeniedBeforeItsSweep) {
  // Saved two minutes ago with a one-minute ttl: still in the registry, no longer valid.
  std::string secret = Save("old", /*ttl=*/60, ::time(nullptr) - 120);
  ASSERT_NE(registry_.Find("old"), nullptr);
  EXPECT_EQ(Authorize("old", secret).error, ErrorCode::kDenied);
  std::string fresh = Save("new", /*ttl=*/3600);
  EXPECT_FALSE(Authorize("new", fresh).error.has_value());
}

TEST_F(AuthorizeTest, ReplacingAJobRetiresItsOldSecret) {
  std::string first = Save("web");
  uint64_t generation = registry_.Generation("web");
  registry::SaveRequest req;
  req.id = "web";
  req.host = "127.0.0.1";
  req.port = 8001;
  req.replace = true;
  std::optional<registry::Job> replaced;
  auto job = registry_.Save(req, kAlice, ::time(nullptr), &replaced);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(Authorize("web", first).error, ErrorCode::kDenied);
  Proxy::Authorization a = Authorize("web", job->secret);
  ASSERT_FALSE(a.error.has_value());
  EXPECT_EQ(a.target.port, 8001);
  EXPECT_NE(a.target.generation, generation);
}

}  // namespace
}  // namespace brokerproxy::proxy
