// End-to-end tests against a real, private Slurm (slurm_cluster.h): the harness itself, and
// the scheduler client (registry/scheduler.h) reading that Slurm's jobs.

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>

#include "e2e/harness.h"
#include "e2e/slurm_cluster.h"

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

}  // namespace
}  // namespace brokerproxy::testing
