// What the broker (registry/broker.h) decides from its Clock, driven by a fake one: when a
// job's ttl counts from, when the sweep removes it, what happens to a wait on a job that
// expires, and a replacement restarting the ttl. No sleeping: the test moves the clock and
// runs the loop until the sweep (every few milliseconds of loop time) has acted.

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "loop/timer.h"
#include "registry/broker.h"
#include "registry/control_protocol.h"
#include "registry/store.h"

namespace brokerproxy::registry {
namespace {

constexpr uid_t kAlice = 1001;
constexpr int64_t kStart = 1'700'000'000;

class BrokerClockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bp-brokerclock-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    // The backend port: bound, never listening, so probes are refused at once and nothing
    // else can listen there meanwhile.
    refusing_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(refusing_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    socklen_t len = sizeof(a);
    ASSERT_EQ(::getsockname(refusing_fd_, reinterpret_cast<sockaddr*>(&a), &len), 0);
    backend_port_ = ntohs(a.sin_port);
    store_ = std::make_unique<FileStore>(loop_.get(), &registry_, dir_ + "/registry.json");
    Broker::Options o;
    o.expiry_check_ms = 2;
    o.recheck_interval_ms = 0;
    o.probe_min_ms = 50;
    o.probe_max_ms = 1000;
    broker_ =
        std::make_unique<Broker>(loop_.get(), &registry_, store_.get(), o, [this] { return now_; });
    ASSERT_TRUE(broker_->Start().ok());
  }
  void TearDown() override {
    broker_.reset();
    store_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
    ::close(refusing_fd_);
    std::string cmd = "rm -rf " + dir_;
    ASSERT_EQ(system(cmd.c_str()), 0);
  }

  // Runs the loop until `done()` or 10 s (loop time) have passed; returns done().
  bool RunUntil(const std::function<bool()>& done) {
    auto timer = loop::Timer::Create(*loop_);
    if (!timer.ok()) return false;
    bool expired = false;
    (*timer)->Start(10000, [&expired] { expired = true; });
    while (!done() && !expired) loop_->Run(UV_RUN_ONCE);
    return done();
  }

  Result<JsonPtr> Call(Request req) {
    std::optional<std::string> line;
    broker_->Handle(std::move(req), kAlice, [&line](std::string l) { line = std::move(l); });
    if (!RunUntil([&] { return line.has_value(); })) return Status::Timeout("no reply");
    return ParseReply(*line);
  }

  Status Save(const std::string& id, int64_t ttl, bool replace = false) {
    Request req;
    req.op = Op::kSave;
    req.job = id;
    req.save.id = id;
    req.save.host = "127.0.0.1";
    req.save.port = backend_port_;
    req.save.ttl = ttl;
    req.save.replace = replace;
    auto r = Call(std::move(req));
    return r.ok() ? Status::OK() : r.status();
  }

  Status Load(const std::string& id) {
    Request req;
    req.op = Op::kLoad;
    req.job = id;
    auto r = Call(std::move(req));
    return r.ok() ? Status::OK() : r.status();
  }

  bool Gone(const std::string& id) { return registry_.Find(id) == nullptr; }

  std::string dir_;
  std::unique_ptr<loop::Loop> loop_;
  Registry registry_{Registry::Options{}};
  std::unique_ptr<FileStore> store_;
  std::unique_ptr<Broker> broker_;
  int refusing_fd_ = -1;
  int backend_port_ = 0;
  int64_t now_ = kStart;
};

TEST_F(BrokerClockTest, TheTtlCountsFromTheClockAtTheSave) {
  ASSERT_TRUE(Save("short", 30).ok());
  ASSERT_TRUE(Save("forever", 0).ok());
  EXPECT_EQ(registry_.Find("short")->created, kStart);
  EXPECT_EQ(registry_.Find("short")->expires, kStart + 30);
  EXPECT_EQ(registry_.Find("forever")->expires, 0);
  now_ += 100;
  ASSERT_TRUE(Save("later", 30).ok());
  EXPECT_EQ(registry_.Find("later")->created, kStart + 100);
  EXPECT_EQ(registry_.Find("later")->expires, kStart + 130);
}

TEST_F(BrokerClockTest, TheSweepRemovesAJobOnceTheClockReachesItsExpiry) {
  ASSERT_TRUE(Save("a", 30).ok());
  ASSERT_TRUE(Save("b", 60).ok());
  ASSERT_TRUE(Save("forever", 0).ok());
  // One second before "b" expires: "a" goes, and the same sweep leaves "b".
  now_ = kStart + 59;
  ASSERT_TRUE(RunUntil([&] { return Gone("a"); }));
  EXPECT_FALSE(Gone("b"));
  EXPECT_EQ(Load("a").code(), Status::Code::kNotFound);
  EXPECT_TRUE(Load("b").ok());
  // At its expiry second it goes too.
  now_ = kStart + 60;
  ASSERT_TRUE(RunUntil([&] { return Gone("b"); }));
  EXPECT_EQ(Load("b").code(), Status::Code::kNotFound);
  // A job without a ttl stays, however late it gets: a marker saved now and expiring first
  // shows that sweeps ran.
  now_ = kStart + 10 * 365 * 86400;
  ASSERT_TRUE(Save("marker", 1).ok());
  now_ += 1;
  ASSERT_TRUE(RunUntil([&] { return Gone("marker"); }));
  EXPECT_FALSE(Gone("forever"));
  EXPECT_TRUE(Load("forever").ok());
}

TEST_F(BrokerClockTest, AnExpiryIsPersisted) {
  ASSERT_TRUE(Save("a", 30).ok());
  ASSERT_TRUE(Save("b", 90).ok());
  now_ = kStart + 31;
  ASSERT_TRUE(RunUntil([&] { return Gone("a"); }));
  // The registry's file no longer has it once the sweep's write landed.
  ASSERT_TRUE(RunUntil([&] { return !store_->busy(); }));
  Registry reloaded{Registry::Options{}};
  Status s = FileStore::Load(dir_ + "/registry.json", &reloaded);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(reloaded.Find("a"), nullptr);
  EXPECT_NE(reloaded.Find("b"), nullptr);
}

TEST_F(BrokerClockTest, AWaitOnAJobThatExpiresIsAnsweredAtOnce) {
  ASSERT_TRUE(Save("w", 30).ok());
  Request req;
  req.op = Op::kWait;
  req.job = "w";
  req.timeout_ms = 600000;  // far longer than the test: only the expiry can answer it
  std::optional<std::string> line;
  broker_->Handle(std::move(req), kAlice, [&line](std::string l) { line = std::move(l); });
  // A sweep that removes another job leaves the wait pending ...
  ASSERT_TRUE(Save("marker", 10).ok());
  now_ = kStart + 10;
  ASSERT_TRUE(RunUntil([&] { return Gone("marker"); }));
  EXPECT_FALSE(line.has_value()) << *line;
  // ... and the one that removes its job answers it.
  now_ = kStart + 30;
  ASSERT_TRUE(RunUntil([&] { return line.has_value(); }));
  auto reply = ParseReply(*line);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), Status::Code::kNotFound) << reply.status().ToString();
  EXPECT_NE(reply.status().message().find("expired"), std::string::npos)
      << reply.status().ToString();
  EXPECT_TRUE(Gone("w"));
}

TEST_F(BrokerClockTest, ReplacingAJobRestartsItsTtl) {
  ASSERT_TRUE(Save("web", 30).ok());
  now_ = kStart + 20;
  ASSERT_TRUE(Save("web", 30, /*replace=*/true).ok());
  EXPECT_EQ(registry_.Find("web")->created, kStart + 20);
  EXPECT_EQ(registry_.Find("web")->expires, kStart + 50);
  // Past the first record's expiry, the replacement stays; a marker that expires then shows
  // that a sweep ran.
  ASSERT_TRUE(Save("marker", 15).ok());
  now_ = kStart + 40;
  ASSERT_TRUE(RunUntil([&] { return Gone("marker"); }));
  EXPECT_FALSE(Gone("web"));
  now_ = kStart + 50;
  ASSERT_TRUE(RunUntil([&] { return Gone("web"); }));
}

}  // namespace
}  // namespace brokerproxy::registry
