// The client's BROKER1 state machine (ClientHandshake) against a fake proxy on a socketpair:
// the preamble goes first with the local client's bytes pipelined behind it, and each reply
// code is classified: OK relays (the backend's bytes after the line are left to the tunnel),
// denied and busy give the local side and its bytes back for a retry, anything else fails.

#include "proxy/client/tunnel.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "loop/loop.h"
#include "loop/reactor.h"

namespace brokerproxy::proxy::client {
namespace {

const std::string kSecret(64, 'c');

class ClientHandshakeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    auto r = loop::Reactor::Create(*loop_);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(r).value();
    int sv[2];
    // The local client: local_ is the tunnel's end, app_ the application's.
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    auto io = reactor_->Add(sv[0], nullptr);
    ASSERT_TRUE(io.ok());
    local_ = proxy::Relay::Side{std::move(io).value()};
    app_ = sv[1];
    // The way to the proxy: upstream_ is the tunnel's end, proxy_ the fake proxy's.
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    upstream_ = sv[0];
    proxy_ = sv[1];
  }
  void TearDown() override {
    local_ = proxy::Relay::Side{};
    reactor_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
    ::close(app_);
    ::close(upstream_);
    ::close(proxy_);
  }

  // Runs the loop until `done` holds, for at most 5 s.
  bool SpinUntil(const std::function<bool()>& done) {
    for (int i = 0; i < 500 && !done(); ++i) {
      loop_->Run(UV_RUN_NOWAIT);
      pollfd p{proxy_, POLLIN, 0};
      ::poll(&p, 1, 10);
    }
    return done();
  }

  // What the fake proxy has received so far, appended to `*got`.
  void Drain(int fd, std::string* got) {
    char buf[4096];
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) got->append(buf, static_cast<size_t>(n));
  }

  // The tunnel's side up to the reply: the preamble, then `replayed` (the handshake's replay)
  // and `early` from the application pumped behind it while the fake proxy reads them.
  void SendPreambleAndEarlyBytes(ClientHandshake& hs, const std::string& early,
                                 const std::string& replayed = "") {
    std::string line = hs.Preamble(kSecret);
    ASSERT_EQ(::send(upstream_, line.data(), line.size(), 0), static_cast<ssize_t>(line.size()));
    auto pump = [&] {
      Status s = hs.early().Pump([&](std::string_view data) -> size_t {
        ssize_t n = ::send(upstream_, data.data(), data.size(), MSG_NOSIGNAL);
        return n > 0 ? static_cast<size_t>(n) : 0;
      });
      EXPECT_TRUE(s.ok()) << s.ToString();
    };
    hs.early().Watch(local_, pump);
    ASSERT_EQ(::send(app_, early.data(), early.size(), 0), static_cast<ssize_t>(early.size()));
    std::string want = line + replayed + early;
    std::string got;
    EXPECT_TRUE(SpinUntil([&] {
      Drain(proxy_, &got);
      return got.size() >= want.size();
    })) << got;
    EXPECT_EQ(got, want);  // the preamble first, then the early bytes, in order
  }

  // The fake proxy answers `reply` and the backend's first bytes; the tunnel feeds what it
  // reads until the reply is done. Returns what it fed the handshake's reader.
  std::string Answer(ClientHandshake& hs, const std::string& reply, std::string* rest) {
    std::string sent = reply + "BACKEND";
    EXPECT_EQ(::send(proxy_, sent.data(), sent.size(), 0), static_cast<ssize_t>(sent.size()));
    std::string got;
    Drain(upstream_, &got);
    size_t took = hs.Feed(got);
    *rest = got.substr(took);
    return got.substr(0, took);
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<loop::Reactor> reactor_;
  proxy::Relay::Side local_;
  int app_ = -1;
  int upstream_ = -1;
  int proxy_ = -1;
};

TEST_F(ClientHandshakeTest, OkRelaysWithTheBackendsBytesLeftOver) {
  ClientHandshake hs("job1", "");
  SendPreambleAndEarlyBytes(hs, "GET / HTTP/1.1\r\n");
  std::string rest;
  EXPECT_EQ(Answer(hs, "OK\n", &rest), "OK\n");
  EXPECT_EQ(rest, "BACKEND");  // not the handshake's: the tunnel relays it
  ASSERT_TRUE(hs.done());
  std::string unsent = "x";
  std::optional<Refused> refused;
  Status s = hs.Conclude(local_, &unsent, &refused);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(unsent, "");  // every early byte went out before the reply
  EXPECT_FALSE(refused.has_value());
  EXPECT_TRUE(local_.in);  // still the tunnel's, for the relay
}

TEST_F(ClientHandshakeTest, RefusalsWorthANewSecretGiveTheLocalSideAndItsBytesBack) {
  for (std::string code : {"denied", "busy"}) {
    SCOPED_TRACE(code);
    ClientHandshake hs("job1", "replayed ");
    SendPreambleAndEarlyBytes(hs, "first bytes", "replayed ");
    std::string rest;
    Answer(hs, "ERR " + code + "\n", &rest);
    ASSERT_TRUE(hs.done());
    std::string unsent;
    std::optional<Refused> refused;
    Status s = hs.Conclude(local_, &unsent, &refused);
    EXPECT_EQ(s.code(), code == "denied" ? Status::Code::kPermissionDenied
                                         : Status::Code::kResourceExhausted);
    EXPECT_NE(s.message().find("job1"), std::string::npos) << s.ToString();
    ASSERT_TRUE(refused.has_value());
    EXPECT_EQ(refused->early, "replayed first bytes");  // all of it, for the retry
    EXPECT_TRUE(refused->local.in);
    local_ = std::move(refused->local);  // the next round uses it again
  }
}

TEST_F(ClientHandshakeTest, OtherRepliesFailWithoutARetry) {
  struct Case {
    std::string reply;
    Status::Code code;
  } cases[] = {{"ERR unavailable\n", Status::Code::kUnavailable},
               {"ERR timeout\n", Status::Code::kTimeout},
               {"ERR bad-request\n", Status::Code::kInvalidArgument},
               {"HTTP/1.1 400 Bad Request\r\n", Status::Code::kIOError},
               {std::string(proxy::kMaxReplyLine + 10, 'x') + "\n", Status::Code::kIOError}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.reply.substr(0, 20));
    ClientHandshake hs("job1", "");
    SendPreambleAndEarlyBytes(hs, "early");
    std::string rest;
    std::string fed = Answer(hs, c.reply, &rest);
    EXPECT_LE(fed.size(), proxy::kMaxReplyLine);  // bounded, however long the line
    ASSERT_TRUE(hs.done());
    std::string unsent;
    std::optional<Refused> refused;
    Status s = hs.Conclude(local_, &unsent, &refused);
    EXPECT_EQ(s.code(), c.code) << s.ToString();
    EXPECT_FALSE(refused.has_value());
  }
}

TEST_F(ClientHandshakeTest, AReplyInPiecesIsReadUpToItsNewlineOnly) {
  ClientHandshake hs("job1", "");
  std::string stream = "ERR busy\nnot the reply";
  size_t took = 0;
  for (char c : stream) {
    took += hs.Feed(std::string_view(&c, 1));
  }
  EXPECT_EQ(took, 9u);
  ASSERT_TRUE(hs.done());
  std::string unsent;
  std::optional<Refused> refused;
  EXPECT_EQ(hs.Conclude(local_, &unsent, &refused).code(), Status::Code::kResourceExhausted);
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->early, "");
}

}  // namespace
}  // namespace brokerproxy::proxy::client
