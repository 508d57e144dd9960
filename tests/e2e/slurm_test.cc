// End-to-end tests against a real, private Slurm (slurm_cluster.h): the harness itself, and
// the scheduler client (registry/scheduler.h) reading that Slurm's jobs.

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <sstream>

#include "e2e/harness.h"
#include "e2e/slurm_cluster.h"
#include "loop/loop.h"
#include "registry/scheduler.h"

namespace brokerproxy::testing {
namespace {

#define START_SLURM(cluster)                                                            \
  SlurmCluster cluster;                                                                 \
  if (std::string why = SlurmCluster::Unsupported(); !why.empty()) GTEST_SKIP() << why; \
  ASSERT_TRUE(cluster.Start())

// The harness starts a cluster, runs a job as a test user on it, and leaves no process of it
// behind when it goes.
TEST(SlurmClusterTest, RunsJobsOfTestUsersAndStopsEverything) {
  std::optional<uid_t> alice = TestUser("bp-alice");
  ASSERT_TRUE(alice);
  std::string conf;
  auto start = std::chrono::steady_clock::now();
  {
    START_SLURM(cluster);
    auto up = std::chrono::steady_clock::now();
    std::printf("slurm cluster up in %.2f s\n", std::chrono::duration<double>(up - start).count());
    conf = cluster.conf_path();
    std::string error;
    // (Its sleep is how long the job runs, not a wait.)
    std::string id = cluster.Sbatch(*alice, {"--wrap", "sleep 300"}, &error);
    ASSERT_FALSE(id.empty()) << error;
    ASSERT_TRUE(cluster.WaitFor(id, "RUNNING")) << cluster.JobState(id) << cluster.Logs();
    RunResult r = cluster.Run({"squeue", "-h", "-j", id, "-o", "%u %N"});
    EXPECT_EQ(r.out, "bp-alice n1\n") << r;
    start = std::chrono::steady_clock::now();
  }
  std::printf("slurm cluster down in %.2f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  // Nothing that ran under this cluster's configuration is left: daemons, slurmstepd, job.
  RunResult ps =
      RunCommand({"sh", "-c", "grep -lsF 'SLURM_CONF=" + conf + "' /proc/[0-9]*/environ"});
  EXPECT_EQ(ps.out, "") << ps;
}

// squeue's FORMAT for the job it prints as `id` (squeue -j L+O lists every component of L, so
// the line is picked by %i), "" if none.
std::string Squeue(const SlurmCluster& cluster, const std::string& id, const std::string& format) {
  RunResult r = cluster.Run({"squeue", "-h", "--states=all", "-o", "%i|" + format});
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.compare(0, id.size() + 1, id + "|") == 0) return line.substr(id.size() + 1);
  }
  return "";
}

// Scheduler::List through MakeScheduler on a real loop, with the cluster's SLURM_CONF in the
// process environment (which the scheduler's commands inherit, as the daemon's do).
TEST(SlurmSchedulerTest, ListSeesOwnersStatesHostsAndArrayTasks) {
  std::optional<uid_t> alice = TestUser("bp-alice");
  std::optional<uid_t> bob = TestUser("bp-bob");
  ASSERT_TRUE(alice && bob);
  START_SLURM(cluster);
  std::string error;
  // Cancelled first, so the jobs below never wait for its CPU.
  // (Its sleep is how long the job runs, not a wait.)
  std::string cancelled = cluster.Sbatch(*alice, {"--wrap", "sleep 300"}, &error);
  ASSERT_FALSE(cancelled.empty()) << error;
  ASSERT_TRUE(cluster.WaitFor(cancelled, "RUNNING")) << cluster.JobState(cancelled);
  ASSERT_TRUE(cluster.Scancel(cancelled));
  ASSERT_TRUE(cluster.WaitFor(cancelled, "CANCELLED")) << cluster.JobState(cancelled);
  // A heterogeneous job of two components, L+0 and L+1. (Here and below, a job's sleep is how
  // long it runs, not a wait.)
  std::string het = cluster.Sbatch(*bob, {"-N1", "--wrap", "sleep 300", ":", "-N1"}, &error);
  ASSERT_FALSE(het.empty()) << error;
  std::string a = cluster.Sbatch(*alice, {"--wrap", "sleep 300"}, &error);
  std::string b = cluster.Sbatch(*bob, {"--wrap", "sleep 300"}, &error);
  std::string array = cluster.Sbatch(*alice, {"--array=1-2", "--wrap", "sleep 300"}, &error);
  std::string pending = cluster.Sbatch(*bob, {"--begin=now+1hour", "--wrap", "sleep 300"}, &error);
  ASSERT_TRUE(!a.empty() && !b.empty() && !array.empty() && !pending.empty()) << error;
  for (const std::string& id : {het + "+0", het + "+1", a, b, array + "_1", array + "_2"}) {
    ASSERT_TRUE(cluster.WaitFor(id, "RUNNING", 60000))
        << id << ": " << cluster.JobState(id) << " " << Squeue(cluster, id, "%r");
  }
  ASSERT_EQ(cluster.JobState(pending), "PENDING");

  const char* old_conf = getenv("SLURM_CONF");
  std::string saved = old_conf != nullptr ? old_conf : "";
  setenv("SLURM_CONF", cluster.conf_path().c_str(), 1);
  auto loop = loop::Loop::Create();
  ASSERT_TRUE(loop.ok());
  registry::SchedulerOptions options;
  options.type = registry::SchedulerType::kSlurm;
  auto scheduler = registry::MakeScheduler(loop->get(), options);
  std::optional<Result<registry::Scheduler::Table>> got;
  auto token = scheduler->List(0, [&](Result<registry::Scheduler::Table> r) { got = r; });
  while (!got) (*loop)->Run(UV_RUN_ONCE);  // bounded by call_timeout_ms
  if (old_conf != nullptr) {
    setenv("SLURM_CONF", saved.c_str(), 1);
  } else {
    unsetenv("SLURM_CONF");
  }
  ASSERT_TRUE(got->ok()) << got->status().ToString();
  const registry::JobTable& table = ***got;

  // A job's hosts: its node's NodeName, this host's name (NodeHostname) and NodeAddr.
  auto hosts_of = [&](const std::string& id) {
    std::string node = Squeue(cluster, id, "%N");
    return std::vector<std::string>{node, cluster.hostname(), "127.0.0." + node.substr(1)};
  };
  const registry::SchedulerJob* job = table.Find(a);
  ASSERT_NE(job, nullptr);
  EXPECT_EQ(job->owner, *alice);
  EXPECT_TRUE(job->running);
  EXPECT_EQ(job->state, "RUNNING");
  EXPECT_EQ(job->hosts, hosts_of(a));
  // No time limit: none known, or, when the backfill scheduler started the job, the year that
  // Slurm then gives it ("365-00:00:00").
  EXPECT_TRUE(job->end_time == 0 || job->end_time > time(nullptr) + 300 * 86400)
      << job->end_time << " " << Squeue(cluster, a, "%l %e");
  job = table.Find(b);
  ASSERT_NE(job, nullptr);
  EXPECT_EQ(job->owner, *bob);
  EXPECT_TRUE(job->running);
  EXPECT_EQ(job->hosts, hosts_of(b));
  for (const char* task : {"_1", "_2"}) {
    std::string id = array + task;
    job = table.Find(id);
    ASSERT_NE(job, nullptr) << id;
    EXPECT_EQ(job->id, id);
    EXPECT_EQ(job->owner, *alice);
    EXPECT_TRUE(job->running);
    EXPECT_EQ(job->hosts, hosts_of(id));
    std::string raw = Squeue(cluster, id, "%A");  // the task's own numeric job id
    EXPECT_EQ(job->aliases, std::vector<std::string>{raw}) << id;
    EXPECT_EQ(table.Find(raw), job) << raw;
  }
  for (const char* offset : {"+0", "+1"}) {
    std::string id = het + offset;
    job = table.Find(id);
    ASSERT_NE(job, nullptr) << id;
    EXPECT_EQ(job->id, id);
    EXPECT_EQ(job->owner, *bob);
    EXPECT_TRUE(job->running);
    EXPECT_EQ(job->hosts, hosts_of(id));
    std::string raw = Squeue(cluster, id, "%A");
    EXPECT_EQ(table.Find(raw), job) << raw;
  }
  // What sbatch printed names the first component.
  EXPECT_EQ(table.Find(het)->id, het + "+0");
  job = table.Find(pending);
  ASSERT_NE(job, nullptr);
  EXPECT_FALSE(job->running);
  EXPECT_EQ(job->state, "PENDING");
  EXPECT_EQ(job->hosts, std::vector<std::string>{});
  job = table.Find(cancelled);
  EXPECT_TRUE(job == nullptr || !job->running);
  scheduler.reset();
  token.Detach();
  EXPECT_TRUE((*loop)->Close().ok());
}

}  // namespace
}  // namespace brokerproxy::testing
