// SlurmCluster: a real, private Slurm on this host for end-to-end tests.
//
// One controller and two compute "nodes" on this one host, with a munged of their own:
//   n1  NodeAddr=127.0.0.1  NodeHostname=<this hostname>
//   n2  NodeAddr=127.0.0.2  NodeHostname=<this hostname>
// in one partition `debug` (the default), each with 4 CPUs whatever the host has, so eight
// one-CPU jobs run at once (a ninth stays PENDING). Everything the cluster writes (slurm.conf,
// munge key and socket, state, spool, logs, pid files, job output) lives in its own temporary
// directory, and its ports are free ones picked at start, so it never touches /etc/slurm, the
// default ports 6817-6819 or a Slurm that may already run on the machine. Clients reach it through
// env() (SLURM_CONF), which jobs inherit from `sbatch` as well; a daemon under test that asks
// Slurm needs env() in its environment. Test suites that use it are named Slurm* (see below).
//
// Use:
//   SlurmCluster cluster;
//   if (std::string why = SlurmCluster::Unsupported(); !why.empty()) GTEST_SKIP() << why;
//   ASSERT_TRUE(cluster.Start());
//   std::string id = cluster.Sbatch(*alice, {"--wrap", "sleep 300"});
//   ASSERT_TRUE(cluster.WaitFor(id, "RUNNING"));
//
// RAII: the destructor cancels every job, stops slurmd, slurmctld and munged by PID, kills any
// process left that carries the cluster's SLURM_CONF in its environment (slurmstepd and job
// processes, which are not our children), and removes the directory. It runs also when a test
// fails, so no Slurm daemon outlives its test.
//
// Start-up takes about a second and shutdown well under one (measured here: 0.3-1.2 s up,
// 0.2-0.4 s down; SlurmClusterTest prints both). Jobs run as the user
// who submitted them; their output goes to a directory every user may write (mode 1777).
// Tests using it must not run concurrently with each other (CTest label `slurm`, serialised in
// tests/CMakeLists.txt): they share the host's CPUs, which the nodes advertise.
//
// Thread safety: one thread.

#ifndef BROKERPROXY_TESTS_E2E_SLURM_CLUSTER_H_
#define BROKERPROXY_TESTS_E2E_SLURM_CLUSTER_H_

#include <gtest/gtest.h>
#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "e2e/harness.h"

namespace brokerproxy::testing {

class SlurmCluster {
 public:
  SlurmCluster() = default;
  ~SlurmCluster();
  SlurmCluster(const SlurmCluster&) = delete;
  SlurmCluster& operator=(const SlurmCluster&) = delete;

  // Why a cluster cannot run here ("" if it can): Slurm or munge binaries missing, not root.
  static std::string Unsupported();

  // Writes the configuration, starts munged, slurmctld and the two slurmd, and waits (bounded)
  // until sinfo reports every node idle. On failure the message carries the daemons' logs.
  ::testing::AssertionResult Start();

  // "SLURM_CONF=<dir>/slurm.conf": what a Slurm client (squeue, sinfo, sbatch, ...) or a
  // process that runs them (the daemon under test) needs in its environment.
  const std::vector<std::string>& env() const { return env_; }
  const std::string& conf_path() const { return conf_path_; }
  // This host's name, which both nodes report as NodeHostname.
  const std::string& hostname() const { return hostname_; }
  // A directory every user may write (mode 1777), where job output goes by default.
  std::string jobs_dir() const;

  // Runs a Slurm client command with env(), as `uid` if given (root otherwise).
  RunResult Run(std::vector<std::string> argv, std::optional<uid_t> uid = std::nullopt,
                int timeout_ms = 30000) const;

  // Submits a batch job as `uid`: `sbatch --parsable` plus --chdir and --output in jobs_dir()
  // plus `args` (e.g. {"--wrap", "sleep 300"}). Returns what sbatch printed as the job's id
  // ("12", or "12" for an array, which squeue shows as "12_0", ...; "12" for a
  // heterogeneous job, shown as "12+0", "12+1"), or "" on failure (the reason added to
  // `error` if given).
  std::string Sbatch(uid_t uid, const std::vector<std::string>& args,
                     std::string* error = nullptr) const;
  // `scancel <id>` as root (or `uid`); true if scancel succeeded.
  bool Scancel(const std::string& id, std::optional<uid_t> uid = std::nullopt) const;
  // The job's state as squeue prints it ("PENDING", "RUNNING", "COMPLETED", "CANCELLED"...),
  // completed jobs included while the controller keeps them (MinJobAge); "" if the controller
  // knows no such job. For an array or a heterogeneous job name one task or component.
  std::string JobState(const std::string& id) const;
  // Waits until JobState(id) is `state` ("" waits until the job is forgotten).
  bool WaitFor(const std::string& id, const std::string& state, int timeout_ms = 30000) const;

  // The tail of the daemons' logs, for failure messages.
  std::string Logs() const;

 private:
  void StopAll();

  std::unique_ptr<TempDir> dir_;
  std::string conf_path_;
  std::string hostname_;
  std::vector<std::string> env_;
  std::unique_ptr<Child> munged_;
  std::unique_ptr<Child> slurmctld_;
  std::vector<std::unique_ptr<Child>> slurmds_;
};

}  // namespace brokerproxy::testing

#endif  // BROKERPROXY_TESTS_E2E_SLURM_CLUSTER_H_
