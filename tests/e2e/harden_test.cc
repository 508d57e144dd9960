// Defences against other users of the login node, end to end: slow DNS.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

int64_t MsSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
}

// A UDP socket on 127.0.0.x:53 that reads queries and never answers.
class DnsBlackhole {
 public:
  DnsBlackhole() {
    fd_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    for (int last = 153; fd_ >= 0 && last < 250; ++last) {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(53);
      address_ = "127.0.0." + std::to_string(last);
      inet_pton(AF_INET, address_.c_str(), &a.sin_addr);
      if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
        timeval tv{0, 100 * 1000};
        setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        thread_ = std::thread([this] {
          char buf[2048];
          while (!stop_) {
            if (::recv(fd_, buf, sizeof(buf), 0) > 0) ++queries_;
          }
        });
        return;
      }
    }
    address_.clear();
  }
  ~DnsBlackhole() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) ::close(fd_);
  }
  const std::string& address() const { return address_; }  // "" if no port 53 was free
  int queries() const { return queries_.load(); }

 private:
  int fd_ = -1;
  std::string address_;
  std::atomic<bool> stop_{false};
  std::atomic<int> queries_{0};
  std::thread thread_;
};

// Jobs whose backend names never resolve (DNS does not answer) are dialled by many clients at
// once; meanwhile another user's saves stay fast (registry writes share the thread pool with
// look-ups) and a job with a numeric backend is still reached. The daemon runs in a private
// mount namespace whose /etc/resolv.conf names the blackhole.
TEST(HardenTest, SlowDnsStarvesNeitherSavesNorNumericDials) {
  if (RunCommand({"unshare", "-m", "true"}).exit_code != 0) {
    GTEST_SKIP() << "unshare -m is not permitted here";
  }
  auto alice = TestUser("bp-alice");
  auto bob = TestUser("bp-bob");
  if (!alice || !bob || !CanRunAs(*alice)) GTEST_SKIP() << "no test users";
  DnsBlackhole dns;
  if (dns.address().empty()) GTEST_SKIP() << "no free 127.0.0.x:53";
  TempDir dir;
  // One attempt of 10 s per look-up: long enough that the daemon's own timeout answers first.
  WriteFile(dir / "resolv.conf",
            "nameserver " + dns.address() + "\noptions timeout:10 attempts:1\n");
  Daemon d(dir);
  d.set_launcher({"unshare", "-m", "--propagation", "private", "sh", "-c",
                  "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"", dir / "resolv.conf"});
  ASSERT_TRUE(d.Start());
  Backend backend;

  RunOptions as_alice;
  as_alice.uid = *alice;
  RunOptions as_bob;
  as_bob.uid = *bob;
  constexpr int kNames = 10;
  std::vector<std::string> secrets;
  for (int i = 0; i < kNames; ++i) {
    RunResult r = d.Cli({"save", "ssh", "--job-id", "dns" + std::to_string(i), "--host",
                         "nx" + std::to_string(i) + ".invalid", "--port", "5000", "--json"},
                        as_alice);
    ASSERT_EQ(r.exit_code, 0) << r;
    secrets.push_back(JsonText(ParseOut(r).get(), {"job", "secret"}));
  }
  std::string numeric_secret = d.SaveJob("numeric", backend.port(), "ssh", as_alice);
  ASSERT_FALSE(numeric_secret.empty());

  // Every name dialled at once, each by two clients.
  std::vector<std::thread> clients;
  std::vector<std::string> replies(2 * kNames);
  std::vector<int64_t> reply_ms(2 * kNames, -1);
  auto start = Clock::now();
  for (int c = 0; c < 2 * kNames; ++c) {
    clients.emplace_back([&, c] {
      int fd = ConnectTcp(d.proxy_port(), "127.0.0.1", 30000);
      if (fd < 0) return;
      int i = c % kNames;
      if (SendAll(fd, "BROKER1 dns" + std::to_string(i) + " " + secrets[i] + "\n")) {
        replies[c] = ReadLine(fd).value_or("(closed)");
        reply_ms[c] = MsSince(start);
      }
      ::close(fd);
    });
  }
  // The look-ups are under way once the blackhole hears them.
  auto deadline = Clock::now() + std::chrono::seconds(10);
  while (dns.queries() < 4 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(dns.queries(), 4);

  // Another user's saves: each a registry write on the pool.
  int64_t slowest_save = 0;
  for (int i = 0; i < 3; ++i) {
    auto t0 = Clock::now();
    RunResult r =
        d.Cli({"save", "ssh", "--job-id", "bob" + std::to_string(i), "--port", "5000"}, as_bob);
    EXPECT_EQ(r.exit_code, 0) << r;
    slowest_save = std::max(slowest_save, MsSince(t0));
  }
  // Generous for an ASan build on a loaded machine; starved writes wait for the look-ups (10 s
  // each, a pool thread apiece).
  EXPECT_LT(slowest_save, 4000) << "a save waited behind DNS look-ups";

  // A numeric backend is reached at once.
  auto t0 = Clock::now();
  int fd = ConnectTcp(d.proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 numeric " + numeric_secret + "\necho\nping\n"));
  EXPECT_EQ(ReadLine(fd).value_or("(closed)"), "OK");
  EXPECT_EQ(ReadLine(fd).value_or("(closed)"), "ping");
  ::close(fd);
  EXPECT_LT(MsSince(t0), 4000);

  for (auto& t : clients) t.join();
  for (int c = 0; c < 2 * kNames; ++c) {
    // A clear answer, bounded by the resolver's timeout (5 s) plus a margin for the ASan build.
    EXPECT_TRUE(replies[c] == "ERR unavailable" || replies[c] == "ERR timeout")
        << "client " << c << ": " << replies[c];
    EXPECT_GE(reply_ms[c], 0);
    EXPECT_LT(reply_ms[c], 12000) << "client " << c;
  }
  EXPECT_EQ(d.Stop(), 0);
}

}  // namespace
}  // namespace brokerproxy::testing
