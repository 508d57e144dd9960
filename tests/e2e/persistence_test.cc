// Crash consistency and a full disk, end to end: the real daemon killed with SIGKILL at random
// points, and its state directory on a tiny tmpfs.

#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

std::set<std::string> JobIds(const Daemon& d) {
  std::set<std::string> ids;
  RunResult r = d.Cli({"query", "--json"});
  auto j = ParseOut(r);
  const cJSON* jobs = j ? cJSON_GetObjectItemCaseSensitive(j.get(), "jobs") : nullptr;
  for (const cJSON* job = jobs ? jobs->child : nullptr; job; job = job->next) {
    ids.insert(JsonText(job, {"id"}));
  }
  return ids;
}

// Saves jobs "<prefix>-<n>" from `threads` threads until `stop`; returns the ids whose save
// was acknowledged (exit 0).
class SaveStream {
 public:
  SaveStream(const Daemon& d, std::string prefix, int threads) {
    for (int t = 0; t < threads; ++t) {
      threads_.emplace_back([this, &d, prefix, t] {
        for (int n = 0; !stop_.load(); ++n) {
          std::string id = prefix + "-" + std::to_string(t) + "-" + std::to_string(n);
          RunOptions o;
          o.timeout_ms = 20000;
          RunResult r = d.Cli({"save", "ssh", "--job-id", id, "--port", "5000"}, o);
          if (r.exit_code == 0) {
            std::lock_guard<std::mutex> lock(mu_);
            acked_.push_back(id);
          }
        }
      });
    }
  }
  // Stops and joins; the acknowledged ids.
  std::vector<std::string> Finish() {
    stop_ = true;
    for (auto& t : threads_) t.join();
    threads_.clear();
    return acked_;
  }
  size_t acked() {
    std::lock_guard<std::mutex> lock(mu_);
    return acked_.size();
  }
  ~SaveStream() { Finish(); }

 private:
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<std::string> acked_;
  std::vector<std::thread> threads_;
};

// SIGKILL at random points of a stream of saves (and of start-up, while the CA and the SSH host
// key are being created): every acknowledged save survives, and the daemon always starts again
// on what it left behind.
TEST(PersistenceTest, KillDashNineLosesNoAcknowledgedSave) {
  TempDir dir;
  Daemon d(dir);
  std::mt19937 rng(std::random_device{}());
  // Kills during start-up: the files made on first run must never be left half made.
  for (int round = 0; round < 8; ++round) {
    auto child = Child::Spawn({BinaryPath(), "run", "-c", d.config_path()}, dir / "early.log");
    ASSERT_TRUE(child);
    // A random moment of start-up to kill it at, not a wait for anything.
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 400));
    child->Stop(SIGKILL);
  }
  std::vector<std::string> acked_total;
  for (int round = 0; round < 6; ++round) {
    ASSERT_TRUE(d.Start()) << "round " << round;
    std::set<std::string> present = JobIds(d);
    for (const std::string& id : acked_total) {
      ASSERT_TRUE(present.count(id)) << "acknowledged save of " << id << " lost in round " << round;
    }
    SaveStream stream(d, "r" + std::to_string(round), 3);
    // Some saves acknowledged, then a kill at a random moment of the stream.
    WaitUntil([&] { return stream.acked() >= 3; }, 30000);
    // A random moment of the stream to kill it at, not a wait for anything.
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 300));
    d.Stop(SIGKILL);
    std::vector<std::string> acked = stream.Finish();
    EXPECT_GE(acked.size(), 3u);
    acked_total.insert(acked_total.end(), acked.begin(), acked.end());
  }
  ASSERT_TRUE(d.Start());
  std::set<std::string> present = JobIds(d);
  for (const std::string& id : acked_total) EXPECT_TRUE(present.count(id)) << id;
  d.Stop();
}

// A full disk fails saves with a clear error, and nothing saved before is lost, in memory or
// on disk; once there is room again, saves work.
TEST(PersistenceTest, FullDiskFailsSavesClearlyAndLosesNothing) {
  TempDir dir;
  std::string state = dir / "state";
  ASSERT_EQ(::mkdir(state.c_str(), 0711), 0);
  if (::mount("tmpfs", state.c_str(), "tmpfs", 0, "size=96k,mode=0711") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here: " << std::strerror(errno);
  }
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{state};
  // Room to hand back later.
  WriteFile(state + "/filler", std::string(16 << 10, 'f'), 0600);
  Daemon d(dir);
  ASSERT_TRUE(d.Start());
  // Leave room for a registry of a few dozen jobs only (each save costs the suite a process
  // start), once the daemon's keys and certificates are written.
  struct statvfs fs {};
  ASSERT_EQ(::statvfs(state.c_str(), &fs), 0);
  uint64_t free_bytes = uint64_t{fs.f_bavail} * fs.f_frsize;
  if (free_bytes > (24u << 10)) {
    WriteFile(state + "/padding", std::string(free_bytes - (24u << 10), 'p'), 0600);
  }
  // Fill the disk with the registry itself: each save rewrites it whole.
  const std::string label(60, 'n');
  const std::string long_host = label + "." + label + "." + label;
  std::vector<std::string> saved;
  RunResult failed;
  for (int n = 0; n < 2000; ++n) {
    std::string id = "full-" + std::to_string(n);
    RunResult r = d.Cli({"save", "ssh", "--job-id", id, "--port", "5000", "--host", long_host});
    if (r.exit_code != 0) {
      failed = r;
      break;
    }
    saved.push_back(id);
  }
  ASSERT_FALSE(saved.empty()) << failed;
  ASSERT_NE(failed.exit_code, 0) << "the tmpfs never filled up";
  EXPECT_NE(failed.err.find("No space left on device"), std::string::npos) << failed;
  // Nothing lost in memory...
  std::set<std::string> present = JobIds(d);
  for (const std::string& id : saved) EXPECT_TRUE(present.count(id)) << id;
  EXPECT_EQ(present.size(), saved.size());
  // ...nor on disk, and no temporary file left to take the space.
  d.Stop();
  for (const auto& entry : std::filesystem::directory_iterator(state)) {
    EXPECT_EQ(entry.path().filename().string().find("registry.json.tmp"), std::string::npos)
        << entry.path();
  }
  ASSERT_TRUE(d.Start());
  present = JobIds(d);
  for (const std::string& id : saved) EXPECT_TRUE(present.count(id)) << id;
  // Room again: saves work.
  ASSERT_EQ(::unlink((state + "/filler").c_str()), 0);
  RunResult again = d.Cli({"save", "ssh", "--job-id", "after", "--port", "5000"});
  EXPECT_EQ(again.exit_code, 0) << again;
}

}  // namespace
}  // namespace brokerproxy::testing
