// TlsRelay on a real loop with socket pairs: a server relay and a client relay talk TLS to each
// other, each relaying to a plaintext socket driven by a test thread. Checks the handshake,
// the pre-Attach line exchange, half-close mapping, truncation, and the buffer bound under a
// stalled or slow reader; and that plain and TLS transports half-close the same way through
// the one pump.

#include "proxy/transport/tls_relay.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "e2e/harness.h"
#include "loop/loop.h"
#include "loop/timer.h"
#include "proxy/tls/certs.h"
#include "support/tcp_segments.h"

namespace brokerproxy::proxy {
namespace {

using brokerproxy::testing::Pattern;
using brokerproxy::testing::PatternHash;
using brokerproxy::testing::Sha256;

// Everything a relay may hold (tls_relay.h): the pump's chunk per direction, the transport's
// read-ahead and write buffers, and slack for one record's overhead.
constexpr size_t kBound = 2 * PipePool::kBufferSize + 2 * TlsTransport::kBufferSize + 64 * 1024;

struct Pair {
  int relay_fd = -1;  // non-blocking, for the relay
  int test_fd = -1;   // blocking, for a test thread
};

Pair SocketPair() {
  int fds[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  int flags = fcntl(fds[0], F_GETFL);
  fcntl(fds[0], F_SETFL, flags | O_NONBLOCK);
  return Pair{fds[0], fds[1]};
}

void WritePattern(int fd, uint64_t bytes, bool shutdown_after) {
  std::vector<char> buf(256 * 1024);
  for (uint64_t off = 0; off < bytes;) {
    size_t chunk = std::min<uint64_t>(buf.size(), bytes - off);
    Pattern(off, buf.data(), chunk);
    if (!brokerproxy::testing::SendAll(fd, buf.data(), chunk)) return;
    off += chunk;
  }
  if (shutdown_after) shutdown(fd, SHUT_WR);
}

// Reads to EOF; returns {bytes, hash}.
std::pair<uint64_t, std::string> ReadAll(int fd) {
  Sha256 sha;
  uint64_t total = 0;
  std::vector<char> buf(256 * 1024);
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    sha.Update(buf.data(), n);
    total += n;
  }
  return {total, sha.Hex()};
}

class TlsRelayTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }
  void SetUp() override {
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    auto r = loop::Reactor::Create(*loop_);
    ASSERT_TRUE(r.ok());
    reactor_ = std::move(r).value();
    auto ca = CertificateAuthority::Create("relay test CA");
    ASSERT_TRUE(ca.ok());
    LeafProfile p;
    p.common_name = "localhost";
    p.unit = kProxyCertUnit;
    p.dns_names = {"localhost"};
    p.days = 1;
    auto server = (*ca)->IssueWithNewKey(p);
    ASSERT_TRUE(server.ok());
    auto sctx = NewServerContext(server->cert_pem, server->key_pem);
    ASSERT_TRUE(sctx.ok()) << sctx.status().ToString();
    server_ctx_ = std::move(sctx).value();
    auto cctx = NewClientContext((*ca)->cert_pem());
    ASSERT_TRUE(cctx.ok());
    client_ctx_ = std::move(cctx).value();
    auto tick = loop::Timer::Create(*loop_);
    ASSERT_TRUE(tick.ok());
    tick_ = std::move(tick).value();
    tick_->Start(10, 10, [] {});
  }
  void TearDown() override {
    server_.reset();
    client_.reset();
    reactor_.reset();
    tick_.reset();
    loop_->Run(UV_RUN_NOWAIT);
    EXPECT_TRUE(loop_->Close().ok());
  }

  loop::IoHandle IoOf(int fd) {
    auto p = reactor_->Add(fd, nullptr);
    EXPECT_TRUE(p.ok());
    return std::move(p).value();
  }

  bool RunUntil(const std::function<bool()>& pred, uint64_t ms = 20000) {
    uint64_t deadline = loop_->Now() + ms;
    while (!pred()) {
      if (loop_->Now() > deadline) return false;
      loop_->Run(UV_RUN_ONCE);
    }
    return true;
  }

  // A server and a client relay over a socket pair: the client sends "HELLO\n" after the
  // handshake, the server answers "WELCOME\n" and attaches `server_plain`; the client attaches
  // `client_plain` once it read the answer.
  void Connect(int server_plain, int client_plain) {
    Pair tls = SocketPair();
    int flags = fcntl(tls.test_fd, F_GETFL);
    fcntl(tls.test_fd, F_SETFL, flags | O_NONBLOCK);
    TlsRelay::Callbacks s;
    s.on_data = [this, server_plain] {
      if (server_->inbox().substr(0, 6) != "HELLO\n") return;
      server_->Consume(6);
      ASSERT_TRUE(server_->Send("WELCOME\n").ok());
      server_->Attach(Relay::Side(IoOf(server_plain)), "backend", &pool_);
    };
    s.on_done = [this](Status st) {
      server_status_ = st;
      server_done_ = true;
    };
    server_ =
        std::make_unique<TlsRelay>(TlsRelay::Role::kServer, SslPtr(SSL_new(server_ctx_.get())),
                                   IoOf(tls.relay_fd), std::string(), "client", s);
    SslPtr cssl(SSL_new(client_ctx_.get()));
    ASSERT_TRUE(SetClientPeerName(cssl.get(), "localhost").ok());
    TlsRelay::Callbacks c;
    c.on_handshake = [this] { ASSERT_TRUE(client_->Send("HELLO\n").ok()); };
    c.on_data = [this, client_plain] {
      if (client_->inbox().substr(0, 8) != "WELCOME\n") return;
      client_->Consume(8);
      client_->Attach(Relay::Side(IoOf(client_plain)), "local");
    };
    c.on_done = [this](Status st) {
      client_status_ = st;
      client_done_ = true;
    };
    client_ = std::make_unique<TlsRelay>(TlsRelay::Role::kClient, std::move(cssl),
                                         IoOf(tls.test_fd), std::string(), "proxy", c);
    server_->Start();
    client_->Start();
  }

  // A server and a client relay over a TCP connection on loopback (TCP_NODELAY on the server's
  // end, as the proxy's client sockets have it): the client sends "HELLO\n" after the
  // handshake, the server runs `on_hello` when it has read it, and what the client receives
  // collects in client_got_. Returns the client's socket, for TCP_INFO.
  int HelloOverTcp(std::function<void()> on_hello) {
    int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    EXPECT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(::listen(listener, 1), 0);
    EXPECT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len), 0);
    int client_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_EQ(::connect(client_fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    int server_fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    ::close(listener);
    fcntl(client_fd, F_SETFL, fcntl(client_fd, F_GETFL) | O_NONBLOCK);
    int one = 1;
    ::setsockopt(server_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    TlsRelay::Callbacks s;
    s.on_data = [this, on_hello] {
      if (server_->inbox().substr(0, 6) != "HELLO\n") return;
      server_->Consume(6);
      on_hello();
    };
    s.on_done = [this](Status st) { server_status_ = st; };
    server_ =
        std::make_unique<TlsRelay>(TlsRelay::Role::kServer, SslPtr(SSL_new(server_ctx_.get())),
                                   IoOf(server_fd), std::string(), "client", s);
    SslPtr cssl(SSL_new(client_ctx_.get()));
    EXPECT_TRUE(SetClientPeerName(cssl.get(), "localhost").ok());
    TlsRelay::Callbacks c;
    c.on_handshake = [this] { ASSERT_TRUE(client_->Send("HELLO\n").ok()); };
    c.on_data = [this] {
      client_got_.append(client_->inbox());
      client_->Consume(client_->inbox().size());
    };
    c.on_done = [this](Status st) { client_status_ = st; };
    client_ = std::make_unique<TlsRelay>(TlsRelay::Role::kClient, std::move(cssl), IoOf(client_fd),
                                         std::string(), "proxy", c);
    server_->Start();
    client_->Start();
    return client_fd;
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<loop::Reactor> reactor_;
  PipePool pool_{1 << 20, 4};
  loop::HandlePtr<loop::Timer> tick_;
  SslCtxPtr server_ctx_;
  SslCtxPtr client_ctx_;
  std::unique_ptr<TlsRelay> server_;
  std::unique_ptr<TlsRelay> client_;
  Status server_status_, client_status_;
  bool server_done_ = false, client_done_ = false;
  std::string client_got_;  // HelloOverTcp()
};

// Each check runs on a thread of its own: the spare blocks are per thread, and other tests on
// the main thread leave some behind.
template <typename F>
void OnFreshThread(F f) {
  std::thread t(f);
  t.join();
}

TEST(ByteQueueTest, AnEmptiedQueueGivesItsBlockToTheNextOne) {
  OnFreshThread([] {
    EXPECT_EQ(ByteQueue::SpareBlocks(), 0u);
    ByteQueue a;
    a.Append("abc");
    const char* block = a.data();
    a.Consume(3);
    EXPECT_TRUE(a.empty());
    EXPECT_EQ(ByteQueue::SpareBlocks(), 1u);
    ByteQueue b;
    b.Append("x");
    EXPECT_EQ(b.data(), block);  // the same 64 KiB, not a new allocation
    EXPECT_EQ(ByteQueue::SpareBlocks(), 0u);
  });
}

TEST(ByteQueueTest, SpareBlocksAreBoundedAndBiggerBuffersAreFreed) {
  OnFreshThread([] {
    {
      std::vector<ByteQueue> queues(ByteQueue::kMaxSpareBlocks + 4);
      for (ByteQueue& q : queues) q.Append("x");
    }  // every block given back; those over the bound are freed
    EXPECT_EQ(ByteQueue::SpareBlocks(), ByteQueue::kMaxSpareBlocks);

    ByteQueue q;
    std::string first(ByteQueue::kBlockSize - 10, 'a');
    q.Append(first);  // one spare block
    EXPECT_EQ(ByteQueue::SpareBlocks(), ByteQueue::kMaxSpareBlocks - 1);
    q.Append(std::string(100, 'b'));  // outgrows it: the block goes back, the bytes move
    EXPECT_EQ(ByteQueue::SpareBlocks(), ByteQueue::kMaxSpareBlocks);
    ASSERT_EQ(q.size(), first.size() + 100);
    EXPECT_EQ(std::string(q.data(), first.size()), first);
    EXPECT_EQ(std::string(q.data() + first.size(), 100), std::string(100, 'b'));
    q.Consume(q.size());  // a bigger buffer is freed, not kept
    EXPECT_EQ(ByteQueue::SpareBlocks(), ByteQueue::kMaxSpareBlocks);
  });
}

// A held answer (the proxy's OK to a client that pipelined its request) leaves in one TCP
// segment with the records written after it.
TEST_F(TlsRelayTest, HeldRecordsLeaveInOneSegmentWithTheNextOnes) {
  uint32_t before = 0;
  int client_fd = -1;
  client_fd = HelloOverTcp([&] {
    before = testing::DataSegmentsIn(client_fd);
    ASSERT_TRUE(server_->Send("OK\n", /*hold=*/true).ok());
    ASSERT_TRUE(server_->Send("pong").ok());
  });
  ASSERT_TRUE(RunUntil([&] { return client_got_.size() >= 7; })) << client_got_;
  EXPECT_EQ(client_got_, "OK\npong");
  EXPECT_EQ(testing::DataSegmentsIn(client_fd) - before, 1u);
}

// ReleaseHeld() sends a held answer that nothing followed, well before the kernel would (a
// retransmission timeout: 200 ms or more).
TEST_F(TlsRelayTest, ReleaseHeldSendsWhatNothingFollowed) {
  std::chrono::steady_clock::time_point sent;
  HelloOverTcp([&] {
    sent = std::chrono::steady_clock::now();
    ASSERT_TRUE(server_->Send("OK\n", /*hold=*/true).ok());
    server_->ReleaseHeld();
  });
  ASSERT_TRUE(RunUntil([&] { return client_got_.size() >= 3; })) << client_got_;
  EXPECT_EQ(client_got_, "OK\n");
  EXPECT_LT(std::chrono::steady_clock::now() - sent, std::chrono::milliseconds(150));
}

TEST_F(TlsRelayTest, RelaysBothWaysAndMapsHalfCloses) {
  Pair backend = SocketPair();
  Pair local = SocketPair();
  Connect(backend.relay_fd, local.relay_fd);
  constexpr uint64_t kBytes = 8 << 20;
  std::pair<uint64_t, std::string> at_backend, at_local;
  // Local -> backend, then EOF; the backend answers after it saw EOF (needs the half-close).
  std::thread local_writer([&] { WritePattern(local.test_fd, kBytes, true); });
  std::thread backend_side([&] {
    at_backend = ReadAll(backend.test_fd);
    WritePattern(backend.test_fd, kBytes / 2, true);
  });
  std::thread local_reader([&] { at_local = ReadAll(local.test_fd); });
  EXPECT_TRUE(RunUntil([&] { return server_done_ && client_done_; }));
  local_writer.join();
  backend_side.join();
  local_reader.join();
  EXPECT_TRUE(server_status_.ok()) << server_status_.ToString();
  EXPECT_TRUE(client_status_.ok()) << client_status_.ToString();
  EXPECT_EQ(at_backend.first, kBytes);
  EXPECT_EQ(at_backend.second, PatternHash(kBytes));
  EXPECT_EQ(at_local.first, kBytes / 2);
  EXPECT_EQ(at_local.second, PatternHash(kBytes / 2));
  EXPECT_EQ(server_->counters().tls_to_plain, kBytes);
  EXPECT_EQ(server_->counters().plain_to_tls, kBytes / 2);
  EXPECT_EQ(client_->counters().plain_to_tls, kBytes);
  EXPECT_EQ(server_->buffered(), 0u);
  close(backend.test_fd);
  close(local.test_fd);
}

// Both sides push bulk at once while reading: two relays facing each other must not each wait
// for the other to read (regression: gating socket reads on our own TLS output deadlocked a
// 2 GiB echo through connect --tls).
TEST_F(TlsRelayTest, FullDuplexBulkNeverDeadlocks) {
  Pair backend = SocketPair();
  Pair local = SocketPair();
  Connect(backend.relay_fd, local.relay_fd);
  constexpr uint64_t kBytes = 48 << 20;
  std::pair<uint64_t, std::string> at_backend, at_local;
  std::thread local_writer([&] { WritePattern(local.test_fd, kBytes, true); });
  std::thread backend_writer([&] { WritePattern(backend.test_fd, kBytes, true); });
  std::thread local_reader([&] { at_local = ReadAll(local.test_fd); });
  std::thread backend_reader([&] { at_backend = ReadAll(backend.test_fd); });
  EXPECT_TRUE(RunUntil([&] { return server_done_ && client_done_; }, 30000))
      << "server buffered " << server_->buffered() << ", client buffered " << client_->buffered();
  if (!(server_done_ && client_done_)) {
    shutdown(backend.test_fd, SHUT_RDWR);
    shutdown(local.test_fd, SHUT_RDWR);
  }
  local_writer.join();
  backend_writer.join();
  local_reader.join();
  backend_reader.join();
  EXPECT_TRUE(server_status_.ok()) << server_status_.ToString();
  EXPECT_TRUE(client_status_.ok()) << client_status_.ToString();
  EXPECT_EQ(at_backend.second, PatternHash(kBytes));
  EXPECT_EQ(at_local.second, PatternHash(kBytes));
  close(backend.test_fd);
  close(local.test_fd);
}

TEST_F(TlsRelayTest, AStalledReaderBoundsEveryBuffer) {
  Pair backend = SocketPair();
  Pair local = SocketPair();
  int small = 64 * 1024;
  setsockopt(local.test_fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  Connect(backend.relay_fd, local.relay_fd);
  std::atomic<bool> stop{false};
  std::thread backend_writer([&] { WritePattern(backend.test_fd, 256u << 20, false); });
  // Nobody reads local.test_fd: the backend pushes until every buffer is full.
  size_t peak_server = 0, peak_client = 0;
  uint64_t until = loop_->Now() + 1500;
  RunUntil([&] {
    peak_server = std::max(peak_server, server_ ? server_->buffered() : 0);
    peak_client = std::max(peak_client, client_ ? client_->buffered() : 0);
    return loop_->Now() > until || server_done_ || client_done_;
  });
  EXPECT_FALSE(server_done_ || client_done_)
      << server_status_.ToString() << client_status_.ToString();
  EXPECT_GT(server_->pauses() + client_->pauses(), 0u);
  EXPECT_LT(peak_server, kBound);
  EXPECT_LT(peak_client, kBound);
  std::printf("[ metric ] stalled reader: peak buffered %zu KiB (server), %zu KiB (client)\n",
              peak_server / 1024, peak_client / 1024);
  EXPECT_LT(server_->counters().plain_to_tls, 64u << 20) << "the backend was not held back";
  // Unblock the writer and tear down.
  shutdown(backend.test_fd, SHUT_RDWR);
  backend_writer.join();
  stop = true;
  close(backend.test_fd);
  close(local.test_fd);
}

TEST_F(TlsRelayTest, EofWithoutCloseNotifyIsATruncation) {
  Pair backend = SocketPair();
  Pair local = SocketPair();
  Connect(backend.relay_fd, local.relay_fd);
  ASSERT_TRUE(RunUntil([&] { return server_->handshake_done() && client_->handshake_done(); }));
  // Let the line exchange finish, then drop the client without close_notify.
  RunUntil([] { return false; }, 200);
  ASSERT_FALSE(server_done_);
  client_.reset();
  EXPECT_TRUE(RunUntil([&] { return server_done_; }));
  EXPECT_FALSE(server_status_.ok());
  EXPECT_NE(server_status_.message().find("close_notify"), std::string::npos)
      << server_status_.ToString();
  close(backend.test_fd);
  close(local.test_fd);
}

// A TLS peer that keeps asking for KeyUpdates and never reads: every request makes an answer,
// which waits in the socket, then in the transport's write buffer up to its bound; then the
// relay stops reading that peer instead of buffering more answers.
TEST_F(TlsRelayTest, APeerThatNeverReadsCannotGrowTheProtocolAnswers) {
  Pair tls = SocketPair();
  TlsRelay::Callbacks s;
  s.on_done = [this](Status st) {
    server_status_ = st;
    server_done_ = true;
  };
  server_ = std::make_unique<TlsRelay>(TlsRelay::Role::kServer, SslPtr(SSL_new(server_ctx_.get())),
                                       IoOf(tls.relay_fd), std::string(), "client", s);
  server_->Start();
  timeval timeout{1, 0};  // the attacker's send gives up once the relay stops reading
  setsockopt(tls.test_fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  std::atomic<bool> attacker_done{false};
  std::atomic<int> requests{0};
  constexpr int kRequests = 100000;  // ~2.7 MB of answers if they were all buffered
  std::thread attacker([&] {
    SslPtr c(SSL_new(client_ctx_.get()));
    if (SetClientPeerName(c.get(), "localhost").ok() && SSL_set_fd(c.get(), tls.test_fd) == 1 &&
        SSL_connect(c.get()) == 1) {
      int i = 0;
      for (; i < kRequests; ++i) {
        if (SSL_key_update(c.get(), SSL_KEY_UPDATE_REQUESTED) != 1) break;
        if (SSL_do_handshake(c.get()) != 1) break;  // sends it; never reads the answers
      }
      requests = i;
    }
    attacker_done = true;
  });
  size_t peak = 0;
  bool ok = RunUntil([&] {
    if (server_) peak = std::max(peak, server_->buffered());
    return attacker_done.load();
  });
  if (!ok) shutdown(tls.test_fd, SHUT_RDWR);
  attacker.join();
  EXPECT_TRUE(ok);
  EXPECT_TRUE(server_->handshake_done());
  EXPECT_GT(requests.load(), 0);
  EXPECT_LT(requests.load(), kRequests) << "the relay read every request";
  EXPECT_LT(peak, kBound);
  std::printf("[ metric ] KeyUpdate flood: %d requests sent, peak buffered %zu KiB\n",
              requests.load(), peak / 1024);
  close(tls.test_fd);
}

// A slow plaintext reader behind TLS <-> plain pumps: everything arrives, intact, and neither
// relay ever holds more than its bound meanwhile (the pump stops reading TLS, which stops the
// peer's writes).
TEST_F(TlsRelayTest, ASlowReaderBehindTlsKeepsEveryBufferBounded) {
  Pair backend = SocketPair();
  Pair local = SocketPair();
  int small = 32 * 1024;
  setsockopt(local.test_fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  Connect(backend.relay_fd, local.relay_fd);
  constexpr uint64_t kBytes = 16 << 20;
  std::atomic<bool> read_all{false};
  std::pair<uint64_t, std::string> at_local;
  std::thread backend_writer([&] { WritePattern(backend.test_fd, kBytes, true); });
  std::thread slow_reader([&] {
    Sha256 sha;
    uint64_t total = 0;
    std::vector<char> buf(16 * 1024);
    for (;;) {
      ssize_t n = recv(local.test_fd, buf.data(), buf.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      sha.Update(buf.data(), n);
      total += n;
      // Slower than the relays: a throttle, not a wait for anything.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    at_local = {total, sha.Hex()};
    read_all = true;
  });
  size_t peak_server = 0, peak_client = 0;
  bool ok = RunUntil(
      [&] {
        if (server_) peak_server = std::max(peak_server, server_->buffered());
        if (client_) peak_client = std::max(peak_client, client_->buffered());
        return read_all.load();
      },
      60000);
  if (!ok) {
    shutdown(backend.test_fd, SHUT_RDWR);
    shutdown(local.test_fd, SHUT_RDWR);
  }
  backend_writer.join();
  slow_reader.join();
  EXPECT_TRUE(ok);
  EXPECT_EQ(at_local.first, kBytes);
  EXPECT_EQ(at_local.second, PatternHash(kBytes));
  EXPECT_GT(server_->pauses() + client_->pauses(), 0u);
  EXPECT_LT(peak_server, kBound);
  EXPECT_LT(peak_client, kBound);
  std::printf("[ metric ] slow reader: peak buffered %zu KiB (server), %zu KiB (client)\n",
              peak_server / 1024, peak_client / 1024);
  close(backend.test_fd);
  close(local.test_fd);
}

// Half-close each way, through the same pump, for a plain relay and for a TLS pair: the side
// that ends first gets the other side's answer, which is only sent once the end arrived.
enum class Kind { kPlain, kTls };
struct HalfCloseCase {
  Kind kind;
  bool local_first;
};

class PumpHalfCloseTest : public TlsRelayTest,
                          public ::testing::WithParamInterface<HalfCloseCase> {};

TEST_P(PumpHalfCloseTest, EachWay) {
  const HalfCloseCase c = GetParam();
  Pair backend = SocketPair();
  Pair local = SocketPair();
  std::unique_ptr<Relay> plain;
  Status plain_status;
  bool plain_done = false;
  if (c.kind == Kind::kTls) {
    Connect(backend.relay_fd, local.relay_fd);
  } else {
    plain = std::make_unique<Relay>(&pool_, Relay::Side(IoOf(local.relay_fd)),
                                    Relay::Side(IoOf(backend.relay_fd)), "local", "backend",
                                    std::string(), std::string(), [&](Status st) {
                                      plain_status = st;
                                      plain_done = true;
                                    });
    plain->Start();
  }
  constexpr uint64_t kFirst = 3 << 20, kAnswer = 1 << 20;
  int first = c.local_first ? local.test_fd : backend.test_fd;
  int second = c.local_first ? backend.test_fd : local.test_fd;
  std::pair<uint64_t, std::string> at_second, at_first;
  std::thread first_writer([&] { WritePattern(first, kFirst, true); });
  std::thread first_reader([&] { at_first = ReadAll(first); });
  std::thread second_side([&] {
    at_second = ReadAll(second);  // to the end: the answer needs the half-close
    WritePattern(second, kAnswer, true);
  });
  bool ok =
      RunUntil([&] { return c.kind == Kind::kTls ? server_done_ && client_done_ : plain_done; });
  if (!ok) {
    shutdown(first, SHUT_RDWR);
    shutdown(second, SHUT_RDWR);
  }
  first_writer.join();
  first_reader.join();
  second_side.join();
  EXPECT_TRUE(ok);
  if (c.kind == Kind::kTls) {
    EXPECT_TRUE(server_status_.ok()) << server_status_.ToString();
    EXPECT_TRUE(client_status_.ok()) << client_status_.ToString();
  } else {
    EXPECT_TRUE(plain_status.ok()) << plain_status.ToString();
    EXPECT_EQ(plain->buffered(), 0u);
  }
  EXPECT_EQ(at_second.first, kFirst);
  EXPECT_EQ(at_second.second, PatternHash(kFirst));
  EXPECT_EQ(at_first.first, kAnswer);
  EXPECT_EQ(at_first.second, PatternHash(kAnswer));
  close(backend.test_fd);
  close(local.test_fd);
}

INSTANTIATE_TEST_SUITE_P(PlainAndTls, PumpHalfCloseTest,
                         ::testing::Values(HalfCloseCase{Kind::kPlain, true},
                                           HalfCloseCase{Kind::kPlain, false},
                                           HalfCloseCase{Kind::kTls, true},
                                           HalfCloseCase{Kind::kTls, false}),
                         [](const ::testing::TestParamInfo<HalfCloseCase>& info) {
                           return std::string(info.param.kind == Kind::kTls ? "Tls" : "Plain") +
                                  (info.param.local_first ? "LocalEndsFirst" : "BackendEndsFirst");
                         });

}  // namespace
}  // namespace brokerproxy::proxy
