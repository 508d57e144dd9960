// End-to-end tests against a real, private Slurm (slurm_cluster.h): the harness itself, and
// the scheduler client (registry/scheduler.h) reading that Slurm's jobs.

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>

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

// The first line of a Slurm client's output for one job (squeue -o FORMAT).
std::string Squeue(const SlurmCluster& cluster, const std::string& id, const std::string& format) {
  RunResult r = cluster.Run({"squeue", "-h", "--states=all", "-j", id, "-o", format});
  return r.out.substr(0, r.out.find('\n'));
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
  std::string cancelled = cluster.Sbatch(*alice, {"--wrap", "sleep 300"}, &error);
  ASSERT_FALSE(cancelled.empty()) << error;
  ASSERT_TRUE(cluster.WaitFor(cancelled, "RUNNING")) << cluster.JobState(cancelled);
  ASSERT_TRUE(cluster.Scancel(cancelled));
  ASSERT_TRUE(cluster.WaitFor(cancelled, "CANCELLED")) << cluster.JobState(cancelled);
  std::string a = cluster.Sbatch(*alice, {"--wrap", "sleep 300"}, &error);
  std::string b = cluster.Sbatch(*bob, {"--wrap", "sleep 300"}, &error);
  std::string array = cluster.Sbatch(*alice, {"--array=1-2", "--wrap", "sleep 300"}, &error);
  std::string pending = cluster.Sbatch(*bob, {"--begin=now+1hour", "--wrap", "sleep 300"}, &error);
  ASSERT_TRUE(!a.empty() && !b.empty() && !array.empty() && !pending.empty()) << error;
  for (const std::string& id : {a, b, array + "_1", array + "_2"}) {
    ASSERT_TRUE(cluster.WaitFor(id, "RUNNING")) << id << ": " << cluster.JobState(id);
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
  EXPECT_EQ(job->end_time, 0);  // no time limit
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
