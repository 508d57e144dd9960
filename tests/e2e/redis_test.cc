// The registry on Redis (`[registry] store = redis`), end to end: a real redis-server (AOF on)
// on a Unix socket in a temp dir, and two daemons standing for two login nodes (their own
// proxy ports, state dirs and control sockets) sharing it. Suites are named Redis* (CTest
// labels e2e and redis); they skip where redis-server is not installed.

#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "e2e/harness.h"
#include "loop/loop.h"
#include "registry/json.h"
#include "registry/redis_store.h"
#include "registry/registry.h"
#include "registry/seal.h"

namespace brokerproxy::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

bool HaveRedis() { return ::access("/usr/bin/redis-server", X_OK) == 0; }

// A redis-server on `dir`/NAME.sock with its data (AOF) in `dir`/NAME; no TCP port.
class RedisServer {
 public:
  RedisServer(const TempDir& dir, const std::string& name)
      : socket_(dir / (name + ".sock")), data_(dir / name), log_(dir / (name + ".log")) {
    ::mkdir(data_.c_str(), 0700);
  }
  // `password` non-empty: requirepass.
  ::testing::AssertionResult Start(const std::string& password = "") {
    std::vector<std::string> argv{"/usr/bin/redis-server",
                                  "--port",
                                  "0",
                                  "--unixsocket",
                                  socket_,
                                  "--unixsocketperm",
                                  "700",
                                  "--dir",
                                  data_,
                                  "--appendonly",
                                  "yes",
                                  "--appendfsync",
                                  "always",
                                  "--save",
                                  "",
                                  "--daemonize",
                                  "no"};
    if (!password.empty()) argv.insert(argv.end(), {"--requirepass", password});
    password_ = password;
    child_ = Child::Spawn(argv, log_);
    if (!child_) return ::testing::AssertionFailure() << "cannot spawn redis-server";
    if (!WaitUntil([&] { return Cli({"PING"}).out == "PONG\n"; }, 20000)) {
      return ::testing::AssertionFailure() << "redis-server did not start:\n" << ReadFile(log_);
    }
    return ::testing::AssertionSuccess();
  }
  void Kill() {
    if (child_) child_->Stop(SIGKILL);
    child_.reset();
  }
  RunResult Cli(std::vector<std::string> args) const {
    std::vector<std::string> argv{"/usr/bin/redis-cli", "-s", socket_};
    argv.insert(argv.end(), args.begin(), args.end());
    RunOptions o;
    o.timeout_ms = 10000;
    if (!password_.empty()) o.env.push_back("REDISCLI_AUTH=" + password_);
    return RunCommand(argv, o);
  }
  std::string address() const { return "unix:" + socket_; }
  const std::string& data_dir() const { return data_; }

 private:
  std::string socket_;
  std::string data_;
  std::string log_;
  std::string password_;
  std::unique_ptr<Child> child_;
};

std::string RegistrySection(const RedisServer& redis, const std::string& key_file,
                            const std::string& ports = "20000-27999") {
  return "[registry]\nstore = redis\nstore_address = " + redis.address() +
         "\nstore_key_file = " + key_file + "\nstore_prefix = t\nport_range = " + ports +
         "\nready_timeout = 1s\n";
}

// One request on the daemon's control socket, in this process; the reply line ("" on error).
std::string Control(const std::string& socket_path, const std::string& line) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  timeval tv{20, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  socket_path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      SendAll(fd, line + "\n")) {
    reply = ReadLine(fd, 1 << 24).value_or("");
  }
  ::close(fd);
  return reply;
}

// Two login nodes on one Redis.
class RedisTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveRedis()) GTEST_SKIP() << "redis-server is not installed (scripts/deps.sh --test)";
    key_file_ = dir_ / "store.key";
    WriteFile(key_file_, std::string(32, '\x5a'), 0600);
    redis_ = std::make_unique<RedisServer>(dir_, "redis");
    ASSERT_TRUE(redis_->Start());
  }
  // Each node has a directory of its own (config, state, control socket, log).
  void StartNodes(int count = 2, const std::string& ports = "20000-27999") {
    for (int i = 0; i < count; ++i) {
      node_dirs_.push_back(std::make_unique<TempDir>());
      nodes_.push_back(
          std::make_unique<Daemon>(*node_dirs_.back(), RegistrySection(*redis_, key_file_, ports)));
      ASSERT_TRUE(nodes_.back()->Start()) << "node " << i + 1;
    }
  }
  bool Sees(const Daemon& d, const std::string& id) {
    return d.Cli({"load", id, "--json"}).exit_code == 0;
  }
  std::string Stats(const Daemon& d) { return d.Cli({"stats", "--json"}).out; }

  TempDir dir_;
  std::string key_file_;
  std::unique_ptr<RedisServer> redis_;
  std::vector<std::unique_ptr<TempDir>> node_dirs_;
  std::vector<std::unique_ptr<Daemon>> nodes_;
};

// Save on node 1, connect through node 2 (data hash-checked); remove on node 2, and node 1
// refuses new sessions within 100 ms.
TEST_F(RedisTest, SaveOnOneNodeServesOnTheOtherAndRemoveEndsItEverywhere) {
  StartNodes();
  Backend backend;
  std::string secret = nodes_[0]->SaveJob("shared", backend.port());
  ASSERT_FALSE(secret.empty()) << nodes_[0]->Log();
  ASSERT_TRUE(WaitUntil([&] { return Sees(*nodes_[1], "shared"); }, 5000)) << nodes_[1]->Log();

  int fd = ConnectTcp(nodes_[1]->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 shared " + secret + "\nupload\n"));
  ASSERT_EQ(ReadLine(fd, 256).value_or("<closed>"), "OK");
  constexpr uint64_t kBytes = 4 << 20;
  Sha256 sha;
  std::vector<char> buf(1 << 16);
  for (uint64_t off = 0; off < kBytes; off += buf.size()) {
    Pattern(off, buf.data(), buf.size());
    sha.Update(buf.data(), buf.size());
    ASSERT_TRUE(SendAll(fd, buf.data(), buf.size()));
  }
  ::shutdown(fd, SHUT_WR);
  EXPECT_EQ(ReadLine(fd, 256).value_or(""), sha.Hex() + " " + std::to_string(kBytes));
  ::close(fd);

  // The same through `connect` on node 2: it loads the secret from node 2's daemon, which has
  // the job only from the shared store, and tunnels to node 2's proxy port.
  std::string upload(256 << 10, '\0');
  Pattern(0, upload.data(), upload.size());
  Sha256 upload_sha;
  upload_sha.Update(upload.data(), upload.size());
  RunOptions stdio;
  stdio.stdin_data = "upload\n" + upload;
  RunResult tunnel =
      RunCommand({BinaryPath(), "connect", "shared", "--stdio", "-c", nodes_[1]->config_path(),
                  "--proxy", "127.0.0.1:" + std::to_string(nodes_[1]->proxy_port())},
                 stdio);
  EXPECT_EQ(tunnel.exit_code, 0) << tunnel;
  EXPECT_EQ(tunnel.out, upload_sha.Hex() + " " + std::to_string(upload.size()) + "\n") << tunnel;

  RunResult removed = nodes_[1]->Cli({"remove", "shared"});
  ASSERT_EQ(removed.exit_code, 0) << removed;
  auto after = steady_clock::now();
  bool refused = false;
  while (steady_clock::now() - after < milliseconds(2000)) {
    int c = ConnectTcp(nodes_[0]->proxy_port());
    ASSERT_GE(c, 0);
    SendAll(c, "BROKER1 shared " + secret + "\n");
    std::string reply = ReadLine(c, 256).value_or("<closed>");
    ::close(c);
    if (reply != "OK") {
      refused = true;
      break;
    }
  }
  auto took = std::chrono::duration_cast<milliseconds>(steady_clock::now() - after).count();
  EXPECT_TRUE(refused);
  EXPECT_LT(took, 100) << "node 1 still served the removed job " << took << " ms later";
}

// A `save --wait` pending on node 1 ends as soon as node 2 removes the job, not at ready_timeout.
TEST_F(RedisTest, RemoveOnAnotherNodeReleasesWaiters) {
  std::string section = RegistrySection(*redis_, key_file_);
  section.replace(section.find("ready_timeout = 1s"), 18, "ready_timeout = 60s");
  for (int i = 0; i < 2; ++i) {
    node_dirs_.push_back(std::make_unique<TempDir>());
    nodes_.push_back(std::make_unique<Daemon>(*node_dirs_.back(), section));
    ASSERT_TRUE(nodes_.back()->Start());
  }
  PortReservation nothing_listens;
  auto waiting = Child::Spawn(
      {BinaryPath(), "save", "ssh", "--job-id", "waited", "--port",
       std::to_string(nothing_listens.port()), "--wait", "-c", nodes_[0]->config_path()},
      dir_ / "wait.out");
  ASSERT_TRUE(waiting);
  ASSERT_TRUE(WaitUntil([&] { return Sees(*nodes_[1], "waited"); }, 10000));
  auto removed_at = steady_clock::now();
  RunResult removed = nodes_[1]->Cli({"remove", "waited"});
  ASSERT_EQ(removed.exit_code, 0) << removed;
  int status = waiting->Wait(20000);
  auto took = std::chrono::duration_cast<milliseconds>(steady_clock::now() - removed_at).count();
  EXPECT_NE(status, 0);
  EXPECT_LT(took, 5000) << ReadFile(dir_ / "wait.out");
  EXPECT_NE(ReadFile(dir_ / "wait.out").find("another login node"), std::string::npos)
      << ReadFile(dir_ / "wait.out");
}

// Two nodes saving 1,000 jobs each at once: every acknowledged save is on both nodes, and no
// allocated port is handed out twice.
TEST_F(RedisTest, ConcurrentSavesOnTwoNodesLoseNothingAndShareNoPort) {
  StartNodes();
  constexpr int kPerNode = 1000;
  constexpr int kThreads = 4;
  std::mutex mu;
  std::map<std::string, std::string> ports;  // id -> port, from the save replies
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int node = 0; node < 2; ++node) {
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, node, t] {
        for (int n = t; n < kPerNode; n += kThreads) {
          std::string id = "n" + std::to_string(node + 1) + "-" + std::to_string(n);
          std::string reply = Control(
              nodes_[node]->socket_path(),
              R"({"op":"save","job":")" + id + R"(","type":"ssh","host":"127.0.0.1","port":0})");
          auto j = ParseOut(reply);
          if (!j || JsonText(j.get(), {"ok"}) != "true") {
            ++failures;
            continue;
          }
          std::lock_guard<std::mutex> lock(mu);
          ports[id] = JsonText(j.get(), {"job", "port"});
        }
      });
    }
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(ports.size(), 2u * kPerNode);
  std::set<std::string> distinct;
  for (const auto& [id, port] : ports) {
    EXPECT_TRUE(distinct.insert(port).second) << "port " << port << " given twice";
  }
  // Every acknowledged save is on every node, with the port it was given.
  for (const auto& node : nodes_) {
    ASSERT_TRUE(WaitUntil(
        [&] {
          auto j = ParseOut(Control(node->socket_path(), R"({"op":"query"})"));
          const cJSON* jobs = j ? cJSON_GetObjectItemCaseSensitive(j.get(), "jobs") : nullptr;
          return jobs != nullptr && cJSON_GetArraySize(jobs) == static_cast<int>(ports.size());
        },
        10000));
    auto j = ParseOut(Control(node->socket_path(), R"({"op":"query"})"));
    const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(j.get(), "jobs");
    std::map<std::string, std::string> seen;
    for (const cJSON* job = jobs->child; job; job = job->next) {
      seen[JsonText(job, {"id"})] = JsonText(job, {"port"});
    }
    EXPECT_EQ(seen, ports);
  }
  // The nodes did race for ports (or not); either way the store's counters say so.
  for (const auto& node : nodes_) std::printf("%s\n", Stats(*node).c_str());
}

// Two nodes filling a range of 100 ports at once: they race for the same ports, the losers
// are told by the store and take others, every port is handed out once, and the 101st save is
// refused as exhausted (exit code 6).
TEST_F(RedisTest, ContendedPortRangeHandsOutEveryPortOnce) {
  StartNodes(2, "20000-20099");
  std::mutex mu;
  std::map<std::string, std::string> ports;
  std::vector<std::string> errors;
  std::vector<std::thread> threads;
  for (int node = 0; node < 2; ++node) {
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, node, t] {
        for (int n = t; n < 50; n += 4) {
          std::string id = "c" + std::to_string(node + 1) + "-" + std::to_string(n);
          std::string reply = Control(
              nodes_[node]->socket_path(),
              R"({"op":"save","job":")" + id + R"(","type":"ssh","host":"127.0.0.1","port":0})");
          auto j = ParseOut(reply);
          std::lock_guard<std::mutex> lock(mu);
          if (!j || JsonText(j.get(), {"ok"}) != "true") {
            errors.push_back(id + ": " + reply);
            continue;
          }
          ports[id] = JsonText(j.get(), {"job", "port"});
        }
      });
    }
  }
  for (auto& t : threads) t.join();
  EXPECT_TRUE(errors.empty()) << errors.front();
  std::set<std::string> distinct;
  for (const auto& [id, port] : ports) distinct.insert(port);
  EXPECT_EQ(distinct.size(), 100u);
  EXPECT_EQ(ports.size(), 100u);
  RunResult full = nodes_[1]->Cli({"save", "ssh", "--job-id", "one-more"});
  EXPECT_EQ(full.exit_code, 6) << full;
  for (const auto& node : nodes_) std::printf("%s\n", Stats(*node).substr(0, 300).c_str());
}

// kill -9 of redis-server during traffic: established sessions go on, known jobs still
// connect, saves fail with the store's exit code (9) naming the store; after Redis restarts
// from its AOF, every node resyncs and saves work again.
TEST_F(RedisTest, RedisKilledSessionsGoOnSavesFailThenResync) {
  StartNodes();
  Backend backend;
  std::string secret = nodes_[0]->SaveJob("steady", backend.port());
  ASSERT_FALSE(secret.empty());
  ASSERT_TRUE(WaitUntil([&] { return Sees(*nodes_[1], "steady"); }, 5000));
  int session = ConnectTcp(nodes_[1]->proxy_port());
  ASSERT_GE(session, 0);
  ASSERT_TRUE(SendAll(session, "BROKER1 steady " + secret + "\necho\n"));
  ASSERT_EQ(ReadLine(session, 256).value_or(""), "OK");
  // Saves stream into both nodes while Redis dies: every failure names the store's code, and
  // every acknowledged save is there after the restart (the test's Redis fsyncs every write).
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<std::string> acked;
  std::set<std::string> failure_codes;
  std::vector<std::thread> traffic;
  for (int node = 0; node < 2; ++node) {
    traffic.emplace_back([&, node] {
      for (int n = 0; !stop.load(); ++n) {
        std::string id = "t" + std::to_string(node) + "-" + std::to_string(n);
        auto j = ParseOut(Control(
            nodes_[node]->socket_path(),
            R"({"op":"save","job":")" + id + R"(","type":"ssh","host":"127.0.0.1","port":0})"));
        std::lock_guard<std::mutex> lock(mu);
        if (j && JsonText(j.get(), {"ok"}) == "true") {
          acked.push_back(id);
        } else {
          failure_codes.insert(j ? JsonText(j.get(), {"code"}) : "<no reply>");
        }
      }
    });
  }
  ASSERT_TRUE(WaitUntil([&] {
    std::lock_guard<std::mutex> lock(mu);
    return acked.size() >= 20;
  }));

  redis_->Kill();
  for (const auto& node : nodes_) {
    ASSERT_TRUE(WaitUntil(
        [&] { return Stats(*node).find("\"disconnected\"") != std::string::npos; }, 10000))
        << Stats(*node);
  }
  ASSERT_TRUE(WaitUntil([&] {
    std::lock_guard<std::mutex> lock(mu);
    return !failure_codes.empty();
  }));
  stop = true;
  for (auto& t : traffic) t.join();
  EXPECT_EQ(failure_codes, std::set<std::string>{"store_unavailable"});
  // The established session carries on.
  ASSERT_TRUE(SendAll(session, "still here\n"));
  EXPECT_EQ(ReadLine(session, 256).value_or(""), "still here");
  // A known job still connects, through either node.
  for (const auto& node : nodes_) {
    int c = ConnectTcp(node->proxy_port());
    ASSERT_GE(c, 0);
    SendAll(c, "BROKER1 steady " + secret + "\necho\nping\n");
    EXPECT_EQ(ReadLine(c, 256).value_or(""), "OK");
    EXPECT_EQ(ReadLine(c, 256).value_or(""), "ping");
    ::close(c);
  }
  // Saves and removes fail at once, with the documented exit code and the store named.
  RunResult save = nodes_[0]->Cli({"save", "ssh", "--job-id", "during", "--port", "5000"});
  EXPECT_EQ(save.exit_code, 9) << save;
  EXPECT_NE(save.err.find("redis at " + redis_->address()), std::string::npos) << save;
  RunResult remove = nodes_[1]->Cli({"remove", "steady"});
  EXPECT_EQ(remove.exit_code, 9) << remove;

  ASSERT_TRUE(redis_->Start());
  for (const auto& node : nodes_) {
    ASSERT_TRUE(WaitUntil(
        [&] {
          return node->Cli({"save", "ssh", "--job-id", "after-" + std::to_string(node->pid()),
                            "--port", "5000"})
                     .exit_code == 0;
        },
        15000))
        << node->Log();
  }
  for (const auto& node : nodes_) {
    EXPECT_TRUE(WaitUntil(
        [&] {
          return Sees(*node, "after-" + std::to_string(nodes_[0]->pid())) &&
                 Sees(*node, "after-" + std::to_string(nodes_[1]->pid())) && Sees(*node, "steady");
        },
        5000));
  }
  EXPECT_GE(acked.size(), 20u);
  for (const auto& node : nodes_) {
    auto j = ParseOut(Control(node->socket_path(), R"({"op":"query"})"));
    const cJSON* jobs = j ? cJSON_GetObjectItemCaseSensitive(j.get(), "jobs") : nullptr;
    std::set<std::string> present;
    for (const cJSON* job = jobs ? jobs->child : nullptr; job; job = job->next) {
      present.insert(JsonText(job, {"id"}));
    }
    for (const std::string& id : acked) EXPECT_TRUE(present.count(id)) << id << " lost";
  }
  ASSERT_TRUE(SendAll(session, "after\n"));
  EXPECT_EQ(ReadLine(session, 256).value_or(""), "after");
  ::close(session);
}

// Past store_max_view_age without Redis, handshakes are refused (and logged, with the reason);
// established sessions go on; back in sync, handshakes are served again.
TEST_F(RedisTest, StaleViewRefusesHandshakesUntilResynced) {
  node_dirs_.push_back(std::make_unique<TempDir>());
  nodes_.push_back(std::make_unique<Daemon>(
      *node_dirs_.back(), RegistrySection(*redis_, key_file_) + "store_max_view_age = 1s\n"));
  ASSERT_TRUE(nodes_.back()->Start());
  Daemon& node = *nodes_.back();
  Backend backend;
  std::string secret = node.SaveJob("aging", backend.port());
  ASSERT_FALSE(secret.empty());
  auto handshake = [&] {
    int c = ConnectTcp(node.proxy_port());
    if (c < 0) return std::string("<no connection>");
    SendAll(c, "BROKER1 aging " + secret + "\necho\n");
    std::string reply = ReadLine(c, 256).value_or("<closed>");
    ::close(c);
    return reply;
  };
  int session = ConnectTcp(node.proxy_port());
  ASSERT_GE(session, 0);
  ASSERT_TRUE(SendAll(session, "BROKER1 aging " + secret + "\necho\n"));
  ASSERT_EQ(ReadLine(session, 256).value_or(""), "OK");

  redis_->Kill();
  ASSERT_TRUE(WaitUntil([&] { return handshake() != "OK"; }, 10000));
  // Refused as unavailable, not denied, and not counted toward the throttle: more handshakes
  // than throttle_failures (10) now do not lock the job's owner out later.
  for (int i = 0; i < 12; ++i) EXPECT_EQ(handshake(), "ERR unavailable");
  EXPECT_NE(Stats(node).find("\"refusing_handshakes\":true"), std::string::npos) << Stats(node);
  EXPECT_NE(node.Log().find("older than store_max_view_age"), std::string::npos) << node.Log();
  EXPECT_NE(node.Log().find("handshake(s) (the last for job aging)"), std::string::npos)
      << node.Log();
  ASSERT_TRUE(SendAll(session, "still\n"));
  EXPECT_EQ(ReadLine(session, 256).value_or(""), "still");

  ASSERT_TRUE(redis_->Start());
  EXPECT_TRUE(WaitUntil([&] { return handshake() == "OK"; }, 15000)) << node.Log();
  ::close(session);
}

// Neither the keys nor the AOF show a secret, an owner's host, or anything in clear but ids,
// revisions and allocated ports.
TEST_F(RedisTest, NoSecretInClearInRedis) {
  StartNodes();
  std::vector<std::string> secrets;
  for (int n = 0; n < 5; ++n) {
    std::string s = nodes_[n % 2]->SaveJob("clear-" + std::to_string(n), 5000);
    ASSERT_FALSE(s.empty());
    secrets.push_back(s);
  }
  std::string dump;
  RunResult keys = redis_->Cli({"--scan", "--pattern", "*"});
  ASSERT_EQ(keys.exit_code, 0) << keys;
  dump += keys.out;
  EXPECT_NE(keys.out.find("t:jobs"), std::string::npos) << keys.out;
  for (const char* key : {"t:jobs", "t:ports"}) dump += redis_->Cli({"HGETALL", key}).out;
  dump += redis_->Cli({"GET", "t:keycheck"}).out;
  std::string aof;
  for (const char* f : {"appendonlydir/appendonly.aof.1.incr.aof", "appendonly.aof"}) {
    aof += ReadFile(redis_->data_dir() + "/" + f);
  }
  EXPECT_NE(dump.find("clear-3"), std::string::npos);
  EXPECT_NE(aof.find("clear-3"), std::string::npos) << "no AOF read";
  for (const std::string& s : secrets) {
    EXPECT_EQ(dump.find(s), std::string::npos) << "a secret is in clear in Redis";
    EXPECT_EQ(aof.find(s), std::string::npos) << "a secret is in clear in the AOF";
  }
}

// A daemon with another key than the store was sealed with, or with a key file others may
// read, refuses to start with a message saying so.
TEST_F(RedisTest, WrongKeyFileRefusesToStart) {
  StartNodes();
  ASSERT_FALSE(nodes_[0]->SaveJob("sealed", 5000).empty());
  std::string other = dir_ / "other.key";
  WriteFile(other, std::string(32, '\x33'), 0600);
  TempDir third;
  Daemon wrong(third, RegistrySection(*redis_, other));
  EXPECT_FALSE(wrong.Start());
  EXPECT_NE(wrong.Log().find("not the key this store's jobs are sealed with"), std::string::npos)
      << wrong.Log();

  std::string loose = dir_ / "loose.key";
  WriteFile(loose, std::string(32, '\x5a'), 0644);
  TempDir fourth;
  Daemon readable(fourth, RegistrySection(*redis_, loose));
  EXPECT_FALSE(readable.Start());
  EXPECT_NE(readable.Log().find("must be readable by its owner only"), std::string::npos)
      << readable.Log();
}

// `registry export | import` moves jobs, secrets included, from Redis to a file store and back;
// jobs imported into Redis reach every node.
TEST_F(RedisTest, ExportAndImportMoveJobsBetweenFileAndRedis) {
  StartNodes();
  auto secret_of = [](const Daemon& d, const std::string& id) {
    auto j = ParseOut(d.Cli({"load", id, "--json"}));
    return j ? JsonText(j.get(), {"job", "secret"}) : std::string();
  };
  std::map<std::string, std::string> secrets;
  for (const char* id : {"move-1", "move-2", "move-3"}) {
    secrets[id] = nodes_[0]->SaveJob(id, 5000);
    ASSERT_FALSE(secrets[id].empty());
  }
  RunResult exported = nodes_[1]->Cli({"registry", "export"});
  ASSERT_EQ(exported.exit_code, 0) << exported;
  std::string dump = dir_ / "from-redis.json";
  WriteFile(dump, exported.out, 0600);

  TempDir file_dir;
  Daemon single(file_dir, "[registry]\nport_range = 20000-27999\n");
  RunResult imported = single.Cli({"registry", "import", dump});
  ASSERT_EQ(imported.exit_code, 0) << imported;
  ASSERT_TRUE(single.Start());
  for (const auto& [id, secret] : secrets) EXPECT_EQ(secret_of(single, id), secret) << id;
  // Importing into a running file store is refused.
  EXPECT_NE(single.Cli({"registry", "import", dump}).exit_code, 0);

  std::string own = single.SaveJob("from-file", 5000);
  ASSERT_FALSE(own.empty());
  single.Stop();
  RunResult back = single.Cli({"registry", "export"});
  ASSERT_EQ(back.exit_code, 0) << back;
  std::string dump2 = dir_ / "from-file.json";
  WriteFile(dump2, back.out, 0600);
  // The three jobs are in Redis already: refused without --replace, taken with it.
  RunResult refused = nodes_[0]->Cli({"registry", "import", dump2});
  EXPECT_EQ(refused.exit_code, 8) << refused;
  RunResult replaced = nodes_[0]->Cli({"registry", "import", dump2, "--replace"});
  ASSERT_EQ(replaced.exit_code, 0) << replaced;
  for (const auto& node : nodes_) {
    EXPECT_TRUE(WaitUntil([&] { return secret_of(*node, "from-file") == own; }, 5000));
    EXPECT_EQ(secret_of(*node, "move-2"), secrets["move-2"]);
  }
}

// With requirepass, the daemons authenticate with store_password_file (on the command and the
// subscription connection alike); a wrong password is a start-up error naming the key.
TEST(RedisAuthTest, PasswordFileAuthenticatesBothConnections) {
  if (!HaveRedis()) GTEST_SKIP() << "redis-server is not installed (scripts/deps.sh --test)";
  TempDir dir;
  RedisServer redis(dir, "redis");
  ASSERT_TRUE(redis.Start("s3cret-pass"));
  std::string key = dir / "store.key";
  WriteFile(key, std::string(32, '\x11'), 0600);
  WriteFile(dir / "pass", "s3cret-pass\n", 0600);
  WriteFile(dir / "wrong", "nope\n", 0600);
  std::string section = RegistrySection(redis, key);
  std::vector<std::unique_ptr<TempDir>> dirs;
  std::vector<std::unique_ptr<Daemon>> nodes;
  for (int i = 0; i < 2; ++i) {
    dirs.push_back(std::make_unique<TempDir>());
    nodes.push_back(std::make_unique<Daemon>(
        *dirs.back(), section + "store_password_file = " + (dir / "pass") + "\n"));
    ASSERT_TRUE(nodes.back()->Start());
  }
  ASSERT_FALSE(nodes[0]->SaveJob("authed", 5000).empty()) << nodes[0]->Log();
  EXPECT_TRUE(WaitUntil([&] { return nodes[1]->Cli({"load", "authed"}).exit_code == 0; }, 5000));
  EXPECT_EQ(nodes[0]->Log().find("s3cret-pass"), std::string::npos);

  TempDir third;
  Daemon wrong(third, section + "store_password_file = " + (dir / "wrong") + "\n");
  EXPECT_FALSE(wrong.Start());
  EXPECT_NE(wrong.Log().find("store_password_file"), std::string::npos) << wrong.Log();
  EXPECT_EQ(wrong.Log().find("nope"), std::string::npos);
}

// The reconciliation lease, between two stores in this process: one holder at a time, which
// renews it; once the holder stops renewing, the other takes it when it expires.
TEST_F(RedisTest, LeaseIsHeldByOneDaemonAtATime) {
  auto loop = loop::Loop::Create();
  ASSERT_TRUE(loop.ok());
  registry::Registry reg_a({}), reg_b({});
  auto sealer = registry::Sealer::FromKey(std::string(32, '\x5a'));
  ASSERT_TRUE(sealer.ok());
  registry::RedisStore::Options o;
  o.address = redis_->address();
  o.prefix = "lease";
  auto a = registry::RedisStore::Open(loop->get(), &reg_a, *sealer, o);
  auto b = registry::RedisStore::Open(loop->get(), &reg_b, *sealer, o);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_TRUE((*a)->Start().ok());
  ASSERT_TRUE((*b)->Start().ok());
  // Runs the loop until `done` or 10 s passed.
  auto run_until = [&](const std::function<bool()>& done) {
    auto deadline = steady_clock::now() + std::chrono::seconds(10);
    while (!done() && steady_clock::now() < deadline) (*loop)->Run(UV_RUN_ONCE);
    return done();
  };
  ASSERT_TRUE(run_until([&] { return (*a)->connected() && (*b)->connected(); }));
  auto ask = [&](registry::RedisStore* s) {
    std::optional<bool> mine;
    s->Lease("reconcile", 300, [&](bool m) { mine = m; });
    run_until([&] { return mine.has_value(); });
    return mine.value_or(false);
  };
  EXPECT_TRUE(ask(a->get()));
  EXPECT_FALSE(ask(b->get()));
  EXPECT_TRUE(ask(a->get()));  // renewed
  EXPECT_FALSE(ask(b->get()));
  // `a` stops asking: its lease runs out and `b` gets it.
  bool taken = false;
  auto deadline = steady_clock::now() + std::chrono::seconds(5);
  while (!taken && steady_clock::now() < deadline) taken = ask(b->get());
  EXPECT_TRUE(taken);
  EXPECT_FALSE(ask(a->get()));
  a->reset();
  b->reset();
  EXPECT_TRUE((*loop)->Close().ok());
}

// A Redis process on a loopback TCP port (a master, a replica or a Sentinel), started on a port
// it is given (Redis cannot listen on port 0 and report it).
class RedisProcess {
 public:
  // `args` follow the binary; "--port N" is added. `config` non-empty: written to
  // `dir`/NAME.conf and passed first (Sentinels need a config file they can rewrite).
  ::testing::AssertionResult Start(const TempDir& dir, const std::string& name,
                                   const std::string& binary, std::vector<std::string> args,
                                   const std::string& config = "") {
    log_ = dir / (name + ".log");
    std::string data = dir / name;
    ::mkdir(data.c_str(), 0700);
    return StartOnFreePort(
        [&](int port, std::string* why) {
          std::vector<std::string> argv{binary};
          if (!config.empty()) {
            std::string conf = dir / (name + ".conf");
            WriteFile(conf, "port " + std::to_string(port) + "\n" + config, 0600);
            argv.push_back(conf);
          }
          argv.insert(argv.end(), {"--port", std::to_string(port), "--bind", "127.0.0.1", "--dir",
                                   data, "--daemonize", "no"});
          argv.insert(argv.end(), args.begin(), args.end());
          size_t from = ReadFile(log_).size();
          child_ = Child::Spawn(argv, log_);
          if (!child_) {
            *why = "cannot spawn " + binary;
            return PortStart::kFailed;
          }
          return WaitListening(&child_, port, why, from);
        },
        &port_);
  }
  void Kill() {
    if (child_) child_->Stop(SIGKILL);
    child_.reset();
  }
  int port() const { return port_; }
  RunResult Cli(std::vector<std::string> args) const {
    std::vector<std::string> argv{"/usr/bin/redis-cli", "-p", std::to_string(port_)};
    argv.insert(argv.end(), args.begin(), args.end());
    RunOptions o;
    o.timeout_ms = 10000;
    return RunCommand(argv, o);
  }

 private:
  std::string log_;
  int port_ = 0;
  std::unique_ptr<Child> child_;
};

// Master, two replicas and three Sentinels on loopback; two daemons find the master through the
// Sentinels and wait for one replica (store_replicas = 1). Killing the master: within the
// Sentinels' failover time plus a few seconds, saves work again on every node, and no save
// acknowledged before is lost.
TEST(RedisSentinelTest, FailoverKeepsEveryAcknowledgedSaveAndSavesWorkAgain) {
  if (!HaveRedis() || ::access("/usr/bin/redis-sentinel", X_OK) != 0) {
    GTEST_SKIP() << "redis-server or redis-sentinel is not installed (scripts/deps.sh --test)";
  }
  TempDir dir;
  std::string key_file = dir / "store.key";
  WriteFile(key_file, std::string(32, '\x42'), 0600);
  RedisProcess master;
  ASSERT_TRUE(
      master.Start(dir, "master", "/usr/bin/redis-server", {"--appendonly", "yes", "--save", ""}));
  // Two replicas, so that the promoted one still has a replica to confirm WAIT 1.
  std::vector<std::unique_ptr<RedisProcess>> replicas;
  for (int i = 0; i < 2; ++i) {
    replicas.push_back(std::make_unique<RedisProcess>());
    ASSERT_TRUE(replicas.back()->Start(dir, "replica" + std::to_string(i), "/usr/bin/redis-server",
                                       {"--appendonly", "yes", "--save", "", "--replicaof",
                                        "127.0.0.1", std::to_string(master.port())}));
    ASSERT_TRUE(WaitUntil([&] {
      return replicas.back()->Cli({"INFO", "replication"}).out.find("master_link_status:up") !=
             std::string::npos;
    }));
  }
  std::vector<std::unique_ptr<RedisProcess>> sentinels;
  std::string sentinel_list;
  for (int i = 0; i < 3; ++i) {
    sentinels.push_back(std::make_unique<RedisProcess>());
    std::string config = "sentinel monitor bp 127.0.0.1 " + std::to_string(master.port()) +
                         " 2\nsentinel down-after-milliseconds bp 1000\n"
                         "sentinel failover-timeout bp 5000\n";
    ASSERT_TRUE(sentinels.back()->Start(dir, "sentinel" + std::to_string(i),
                                        "/usr/bin/redis-sentinel", {}, config));
    sentinel_list +=
        (i ? "," : "") + std::string("127.0.0.1:") + std::to_string(sentinels.back()->port());
  }
  // Every Sentinel knows the replicas and the other Sentinels before the master goes.
  for (auto& s : sentinels) {
    ASSERT_TRUE(WaitUntil(
        [&] {
          std::string out = s->Cli({"SENTINEL", "master", "bp"}).out;
          return out.find("num-slaves\n2") != std::string::npos &&
                 out.find("num-other-sentinels\n2") != std::string::npos;
        },
        30000))
        << s->Cli({"SENTINEL", "master", "bp"}).out;
  }
  std::string section =
      "[registry]\nstore = redis\nstore_address = " + sentinel_list +
      "\nstore_master_name = bp\nstore_replicas = 1\nstore_key_file = " + key_file +
      "\nready_timeout = 1s\n";
  std::vector<std::unique_ptr<TempDir>> node_dirs;
  std::vector<std::unique_ptr<Daemon>> nodes;
  for (int i = 0; i < 2; ++i) {
    node_dirs.push_back(std::make_unique<TempDir>());
    nodes.push_back(std::make_unique<Daemon>(*node_dirs.back(), section));
    ASSERT_TRUE(nodes.back()->Start()) << "node " << i + 1;
  }
  std::vector<std::string> acked;
  for (int n = 0; n < 20; ++n) {
    std::string id = "before-" + std::to_string(n);
    RunResult r = nodes[n % 2]->Cli({"save", "ssh", "--job-id", id, "--port", "5000"});
    ASSERT_EQ(r.exit_code, 0) << r;
    acked.push_back(id);
  }

  master.Kill();
  auto killed = steady_clock::now();
  for (size_t i = 0; i < nodes.size(); ++i) {
    // A save refused for want of a replica's confirmation may still be on the master: each
    // attempt uses a fresh id.
    int attempt = 0;
    std::string id;
    ASSERT_TRUE(WaitUntil(
        [&] {
          id = "after-" + std::to_string(i) + "-" + std::to_string(attempt++);
          return nodes[i]->Cli({"save", "ssh", "--job-id", id, "--port", "5000"}).exit_code == 0;
        },
        30000))
        << nodes[i]->Log();
    acked.push_back(id);
  }
  auto took = std::chrono::duration_cast<milliseconds>(steady_clock::now() - killed).count();
  // down-after-milliseconds (1 s) plus the election, plus a few seconds.
  EXPECT_LT(took, 15000);
  for (const auto& node : nodes) {
    for (const std::string& id : acked) {
      EXPECT_TRUE(WaitUntil(
          [&] {
            return node->Cli({"load", id}).exit_code == 0;
          },
          5000))
          << id << " lost";
    }
  }
}

}  // namespace
}  // namespace brokerproxy::testing
