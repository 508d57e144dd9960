// End-to-end: the daemon (as root, `[scheduler] type = slurm`) binds registrations to the jobs
// of a real, private Slurm (slurm_cluster.h) that two real users submit to with sbatch.

#include <gtest/gtest.h>
#include <pwd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "e2e/harness.h"
#include "e2e/slurm_cluster.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

#define START_SLURM(cluster)                                                            \
  SlurmCluster cluster;                                                                 \
  if (std::string why = SlurmCluster::Unsupported(); !why.empty()) GTEST_SKIP() << why; \
  ASSERT_TRUE(cluster.Start())

// The output a batch job wrote to `path` (renamed into place once complete), or "".
std::string JobOutput(const std::string& path, int timeout_ms = 30000) {
  std::string out;
  WaitUntil(
      [&] {
        if (::access(path.c_str(), R_OK) != 0) return false;
        out = ReadFile(path);
        return true;
      },
      timeout_ms);
  return out;
}

class SlurmBindingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    alice_ = TestUser("bp-alice");
    bob_ = TestUser("bp-bob");
    ASSERT_TRUE(alice_ && bob_);
    as_alice_.uid = *alice_;
    as_bob_.uid = *bob_;
  }

  // The daemon, as root, asking `cluster`'s Slurm through `squeue` (a wrapper that fails while
  // dir/down exists, standing for a controller that does not answer).
  void StartDaemon(const SlurmCluster& cluster, const std::string& extra_config = "") {
    squeue_ = dir_ / "squeue";
    WriteFile(squeue_,
              "#!/bin/sh\n[ -e " + (dir_ / "down") +
                  " ] && { echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; "
                  "exit 1; }\nexec squeue \"$@\"\n",
              0755);
    daemon_ = std::make_unique<Daemon>(
        dir_, "[scheduler]\ntype = slurm\nreconcile_interval = 1s\ncache = 200ms\nsqueue = " +
                  squeue_ + "\nadmin_uids = slurm\n" + extra_config);
    std::vector<std::string> launcher{"env"};
    for (const std::string& e : cluster.env()) launcher.push_back(e);
    daemon_->set_launcher(launcher);
    ASSERT_TRUE(daemon_->Start());
  }

  // A batch script line that saves with `args` (backend `host`: by default the node the job
  // runs on) and leaves the --json reply in jobs_dir/<out>.
  std::string SaveLine(const SlurmCluster& cluster, const std::string& args, const std::string& out,
                       const std::string& host = "$SLURMD_NODENAME") const {
    std::string path = cluster.jobs_dir() + "/" + out;
    return BinaryPath() + " save ssh --host " + host + " " + args + " --json -c " +
           daemon_->config_path() + " > " + path + ".tmp 2>&1; mv " + path + ".tmp " + path;
  }

  // True once `load id` (as root) says there is no such job.
  bool Gone(const std::string& id) const {
    return daemon_->Cli({"load", id}).exit_code == 5;  // kExitNotFound
  }

  TempDir dir_;
  std::optional<uid_t> alice_, bob_;
  RunOptions as_alice_, as_bob_;
  std::string squeue_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_F(SlurmBindingTest, SavesAreBoundToTheCallersRunningJobsAndEndWithThem) {
  START_SLURM(cluster);
  StartDaemon(cluster);
  Backend backend(Backend::OwnedBy(*alice_));
  std::string port = std::to_string(backend.port());

  // The job id comes from the job's environment; --name keeps two services of it apart.
  std::string script = SaveLine(cluster, "--port " + port, "a.json") + "; " +
                       SaveLine(cluster, "--port " + port + " --name web", "a-web.json") +
                       "; sleep 120";
  std::string error;
  std::string a = cluster.Sbatch(*alice_, {"--wrap", script}, &error);
  ASSERT_FALSE(a.empty()) << error;
  std::string a_out = JobOutput(cluster.jobs_dir() + "/a.json");
  std::string a_web_out = JobOutput(cluster.jobs_dir() + "/a-web.json");
  EXPECT_EQ(JsonText(ParseOut(a_out).get(), {"job", "id"}), a) << a_out << daemon_->Log();
  EXPECT_EQ(JsonText(ParseOut(a_web_out).get(), {"job", "id"}), a + ".web") << a_web_out;

  // Bob's running job, a future id and a name that is no job: refused, saying why.
  // (Its sleep is how long the job runs, not a wait.)
  std::string b = cluster.Sbatch(*bob_, {"--wrap", "sleep 120"}, &error);
  ASSERT_FALSE(b.empty()) << error;
  ASSERT_TRUE(cluster.WaitFor(b, "RUNNING")) << cluster.JobState(b);
  RunResult other = daemon_->Cli({"save", "ssh", "--job-id", b, "--port", port}, as_alice_);
  EXPECT_EQ(other.exit_code, 4) << other;
  EXPECT_NE(other.err.find("job " + b + " belongs to another user"), std::string::npos) << other;
  std::string future = std::to_string(std::stoll(b) + 100);
  RunResult ahead = daemon_->Cli({"save", "ssh", "--job-id", future, "--port", port}, as_alice_);
  EXPECT_EQ(ahead.exit_code, 5) << ahead;
  EXPECT_NE(ahead.err.find("job " + future + " is not a job of slurm"), std::string::npos) << ahead;
  RunResult name = daemon_->Cli({"save", "ssh", "--job-id", "notebook", "--port", port}, as_alice_);
  EXPECT_EQ(name.exit_code, 5) << name;
  EXPECT_NE(name.err.find("job notebook is not a job of slurm"), std::string::npos) << name;
  // A backend that is not one of the job's nodes.
  RunResult elsewhere = daemon_->Cli(
      {"save", "ssh", "--job-id", a + ".x", "--host", "10.9.9.9", "--port", port}, as_alice_);
  EXPECT_EQ(elsewhere.exit_code, 4) << elsewhere;
  EXPECT_NE(elsewhere.err.find("backend 10.9.9.9 is not one of job " + a + "'s nodes"),
            std::string::npos)
      << elsewhere;

  // An array task saves by its environment and is found as A_T.
  // (Its sleep is how long the job runs, not a wait.)
  std::string arr = cluster.Sbatch(
      *alice_,
      {"--array=0-1", "--wrap",
       SaveLine(cluster, "--port " + port, "arr-$SLURM_ARRAY_TASK_ID.json") + "; sleep 120"},
      &error);
  ASSERT_FALSE(arr.empty()) << error;
  std::string arr_out = JobOutput(cluster.jobs_dir() + "/arr-1.json");
  EXPECT_EQ(JsonText(ParseOut(arr_out).get(), {"job", "id"}), arr + "_1") << arr_out;
  RunResult found = daemon_->Cli({"load", arr + "_1", "--json"}, as_alice_);
  EXPECT_EQ(found.exit_code, 0) << found;

  // A job that ends normally, and one that is cancelled: their entries go (interval 1s).
  // (Its sleep is how long the job runs, not a wait.)
  std::string shortjob = cluster.Sbatch(
      *alice_, {"--wrap", SaveLine(cluster, "--port " + port, "short.json") + "; sleep 2"}, &error);
  ASSERT_FALSE(shortjob.empty()) << error;
  std::string short_out = JobOutput(cluster.jobs_dir() + "/short.json");
  ASSERT_EQ(JsonText(ParseOut(short_out).get(), {"job", "id"}), shortjob) << short_out;
  ASSERT_TRUE(cluster.Scancel(a));
  EXPECT_TRUE(WaitUntil([&] { return Gone(a) && Gone(a + ".web"); })) << daemon_->Log();
  EXPECT_TRUE(WaitUntil([&] { return Gone(shortjob); })) << daemon_->Log();
  EXPECT_NE(daemon_->Log().find("removed job " + a + ".web"), std::string::npos);
  EXPECT_FALSE(Gone(arr + "_1"));
}

TEST_F(SlurmBindingTest, EpilogIsForAdminsOnly) {
  START_SLURM(cluster);
  StartDaemon(cluster);
  Backend backend(Backend::OwnedBy(*alice_));
  std::string port = std::to_string(backend.port());
  std::string error;
  // (Its sleep is how long the job runs, not a wait.)
  std::string a = cluster.Sbatch(
      *alice_, {"--wrap", SaveLine(cluster, "--port " + port, "e.json") + "; sleep 120"}, &error);
  ASSERT_FALSE(a.empty()) << error;
  std::string out = JobOutput(cluster.jobs_dir() + "/e.json");
  ASSERT_EQ(JsonText(ParseOut(out).get(), {"job", "id"}), a) << out;

  // Neither alice (even for her own job) nor bob may wipe job entries; the `slurm` user, which
  // Slurm's epilogs run as ([scheduler] admin_uids = slurm), may, by the id in the epilog's
  // environment.
  RunResult refused = daemon_->Cli({"epilog", a}, as_alice_);
  EXPECT_EQ(refused.exit_code, 4) << refused;
  EXPECT_EQ(daemon_->Cli({"epilog", a}, as_bob_).exit_code, 4);
  EXPECT_FALSE(Gone(a));
  const passwd* slurm = ::getpwnam("slurm");
  ASSERT_NE(slurm, nullptr) << "Debian's Slurm packages create the slurm user";
  RunOptions epilog_env;
  epilog_env.uid = slurm->pw_uid;
  epilog_env.env = {"SLURM_JOB_ID=" + a};
  RunResult accepted = daemon_->Cli({"epilog"}, epilog_env);
  EXPECT_EQ(accepted.exit_code, 0) << accepted;
  EXPECT_TRUE(Gone(a));
  // Nothing left: still fine.
  EXPECT_EQ(daemon_->Cli({"epilog", a}, epilog_env).exit_code, 0);
}

TEST_F(SlurmBindingTest, SchedulerDownRefusesSavesWhileSessionsFlow) {
  START_SLURM(cluster);
  StartDaemon(cluster);
  Backend backend(Backend::OwnedBy(*alice_));
  std::string port = std::to_string(backend.port());
  std::string error;
  // (Its sleep is how long the job runs, not a wait.)
  std::string a =
      cluster.Sbatch(*alice_,
                     {"-w", "n1", "--wrap",
                      SaveLine(cluster, "--port " + port, "d.json", "127.0.0.1") + "; sleep 120"},
                     &error);
  ASSERT_FALSE(a.empty()) << error;
  std::string out = JobOutput(cluster.jobs_dir() + "/d.json");
  std::string secret = JsonText(ParseOut(out).get(), {"job", "secret"});
  ASSERT_FALSE(secret.empty()) << out;

  int fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 " + a + " " + secret + "\necho\n"));
  ASSERT_EQ(ReadLine(fd).value_or("(closed)"), "OK");

  WriteFile(dir_ / "down", "");
  // Once a reconciler pass has failed, no listing from before is fresh enough for a save.
  ASSERT_TRUE(WaitUntil([&] {
    return daemon_->Log().find("cannot check the registry against slurm") != std::string::npos;
  })) << daemon_->Log();
  RunResult refused =
      daemon_->Cli({"save", "ssh", "--job-id", a, "--name", "more", "--port", port}, as_alice_);
  EXPECT_EQ(refused.exit_code, 3) << refused;  // kExitNotRunning: Unavailable
  EXPECT_NE(refused.err.find("slurm"), std::string::npos) << refused;
  EXPECT_TRUE(Gone(a + ".more"));
  // The failed passes removed nothing, and bytes keep flowing.
  EchoResult echo = EchoTransfer(fd, 100000);
  EXPECT_EQ(echo.received, echo.sent);
  EXPECT_FALSE(Gone(a));
  close(fd);
  ::unlink((dir_ / "down").c_str());
}

// A service of exec mode (`save -- COMMAND`) on node n1 (127.0.0.1) that ignores SIGTERM, as a
// slow-to-stop service does: it answers "service of <user>" to every connection.
std::string ServiceLine(const SlurmCluster& cluster, const std::string& config,
                        const std::string& name) {
  std::string log = cluster.jobs_dir() + "/" + name;
  return BinaryPath() + " save ssh --host 127.0.0.1 -c " + config +
         " -- perl -MIO::Socket::INET -e '$SIG{TERM} = \"IGNORE\"; "
         "my $s = IO::Socket::INET->new(LocalAddr => \"127.0.0.1\", "
         "LocalPort => $ENV{BROKER_PORT}, Listen => 16, ReuseAddr => 1) or die; "
         "while (my $c = $s->accept) { print $c \"service of \" . getpwuid($<) . \"\\n\"; "
         "close $c }' 2> " +
         log + ".err & echo $! > " + log + ".pid; wait";
}

// Polls the job's entry (as root) until its state is ready; its secret, or "" on timeout.
std::string ReadySecret(Daemon& daemon, const std::string& id) {
  std::string secret;
  WaitUntil([&] {
    RunResult r = daemon.Cli({"load", id, "--json"});
    if (r.exit_code != 0) return false;
    auto reply = ParseOut(r.out);
    if (JsonText(reply.get(), {"job", "state"}) != "ready") return false;
    secret = JsonText(reply.get(), {"job", "secret"});
    return true;
  });
  return secret;
}

// What the proxy answers to the preamble for `id` with `secret`: its first line.
std::string ProxyAnswer(const Daemon& daemon, const std::string& id, const std::string& secret) {
  int fd = ConnectTcp(daemon.proxy_port());
  if (fd < 0) return "cannot connect";
  SendAll(fd, "BROKER1 " + id + " " + secret + "\nhello\n");
  std::string line = ReadLine(fd).value_or("(closed)");
  std::string next = line == "OK" ? ReadLine(fd).value_or("(closed)") : "";
  close(fd);
  return next.empty() ? line : line + " " + next;
}

// The hijack: exec mode's `save` is SIGKILLed (the OOM killer, a KillWait that ran out) while
// its job runs on. The service dies with it (PR_SET_PDEATHSIG), the entry stays (the job still
// runs), and another user binds the freed port: the proxy refuses to connect to a listener that
// is not the job owner's, so bob's listener never sees a connection. When the job ends, the
// entry goes.
TEST_F(SlurmBindingTest, AnotherUsersListenerOnAKilledServicesPortGetsNothing) {
  START_SLURM(cluster);
  StartDaemon(cluster);
  std::string error;
  std::string a = cluster.Sbatch(
      *alice_, {"-w", "n1", "--wrap", ServiceLine(cluster, daemon_->config_path(), "k")}, &error);
  ASSERT_FALSE(a.empty()) << error;
  std::string secret = ReadySecret(*daemon_, a);
  ASSERT_FALSE(secret.empty()) << daemon_->Cli({"load", a}) << daemon_->Log();
  EXPECT_EQ(ProxyAnswer(*daemon_, a, secret), "OK service of bp-alice");
  int port =
      std::stoi(JsonText(ParseOut(daemon_->Cli({"load", a, "--json"}).out).get(), {"job", "port"}));

  std::string save_pid = JobOutput(cluster.jobs_dir() + "/k.pid");
  ASSERT_FALSE(save_pid.empty());
  ASSERT_EQ(::kill(std::stoi(save_pid), SIGKILL), 0);
  // The service went with its save: nothing listens on the port any more.
  ASSERT_TRUE(WaitUntil([&] {
    int fd = ConnectTcp(port, "127.0.0.1", 200);
    if (fd >= 0) close(fd);
    return fd < 0;
  })) << "the service outlived its save";
  EXPECT_FALSE(Gone(a)) << "the job still runs";

  Backend::Options as_bob = Backend::OwnedBy(*bob_);
  as_bob.port = port;
  as_bob.banner = "service of bp-bob\n";
  Backend bob(as_bob);
  EXPECT_EQ(ProxyAnswer(*daemon_, a, secret), "ERR unavailable");
  EXPECT_NE(daemon_->Log().find("not to the job's owner"), std::string::npos) << daemon_->Log();
  EXPECT_EQ(bob.connections(), 0);

  ASSERT_TRUE(cluster.Scancel(a));
  EXPECT_TRUE(WaitUntil([&] { return Gone(a); })) << daemon_->Log();
  EXPECT_EQ(bob.connections(), 0);
}

// `scancel` of a job whose service ignores SIGTERM: save deregisters on the SIGTERM, Slurm
// SIGKILLs what is left after KillWait; and `scancel --batch -s KILL`, which kills only the
// batch shell (its children leave the job): the job ends, and the reconciler removes the entry.
TEST_F(SlurmBindingTest, EntriesGoWhenTheJobIsKilledHoweverItIsKilled) {
  START_SLURM(cluster);
  StartDaemon(cluster);
  std::string error;
  std::string a = cluster.Sbatch(
      *alice_, {"-w", "n1", "--wrap", ServiceLine(cluster, daemon_->config_path(), "t")}, &error);
  ASSERT_FALSE(a.empty()) << error;
  std::string b = cluster.Sbatch(
      *alice_, {"-w", "n1", "--wrap", ServiceLine(cluster, daemon_->config_path(), "b")}, &error);
  ASSERT_FALSE(b.empty()) << error;
  std::string secret_a = ReadySecret(*daemon_, a);
  std::string secret_b = ReadySecret(*daemon_, b);
  ASSERT_FALSE(secret_a.empty() || secret_b.empty()) << daemon_->Log();

  ASSERT_TRUE(cluster.Scancel(a));
  ASSERT_TRUE(cluster.Run({"scancel", "--batch", "-s", "KILL", b}).exit_code == 0);
  EXPECT_TRUE(WaitUntil([&] { return Gone(a); })) << daemon_->Log();
  EXPECT_TRUE(WaitUntil([&] { return Gone(b); })) << daemon_->Log();
  EXPECT_EQ(ProxyAnswer(*daemon_, a, secret_a), "ERR denied");
  EXPECT_EQ(ProxyAnswer(*daemon_, b, secret_b), "ERR denied");
  // Whatever of job b escaped the job is not the registry's concern any more; stop it here.
  std::string pid = JobOutput(cluster.jobs_dir() + "/b.pid");
  if (!pid.empty()) ::kill(std::stoi(pid), SIGKILL);
}

// The per-user quota holds under a scheduler too: services of one job count one by one.
TEST_F(SlurmBindingTest, TheQuotaBoundsTheServicesOfAUser) {
  START_SLURM(cluster);
  StartDaemon(cluster, "[registry]\nmax_jobs_per_user = 2\n");
  Backend backend(Backend::OwnedBy(*alice_));
  std::string port = std::to_string(backend.port());
  std::string error;
  // (Its sleep is how long the job runs, not a wait.)
  std::string a = cluster.Sbatch(*alice_, {"-w", "n1", "--wrap", "sleep 120"}, &error);
  ASSERT_FALSE(a.empty()) << error;
  ASSERT_TRUE(cluster.WaitFor(a, "RUNNING")) << cluster.JobState(a);
  for (const char* name : {"one", "two"}) {
    RunResult r = daemon_->Cli(
        {"save", "ssh", "--job-id", a, "--name", name, "--host", "127.0.0.1", "--port", port},
        as_alice_);
    ASSERT_EQ(r.exit_code, 0) << r;
  }
  RunResult third = daemon_->Cli(
      {"save", "ssh", "--job-id", a, "--name", "three", "--host", "127.0.0.1", "--port", port},
      as_alice_);
  EXPECT_NE(third.exit_code, 0) << third;
  EXPECT_NE(third.err.find("max_jobs_per_user"), std::string::npos) << third;
  EXPECT_TRUE(Gone(a + ".three"));
}

// A job that reaches its time limit (one minute; Slurm checks limits about every 30 s, so it
// ends 60-100 s after it started): the entry goes with it.
TEST_F(SlurmBindingTest, EntryGoesWhenTheJobHitsItsTimeLimit) {
  START_SLURM(cluster);
  StartDaemon(cluster);
  Backend backend(Backend::OwnedBy(*alice_));
  std::string error;
  // (Its sleep is how long the job runs, not a wait.)
  std::string a = cluster.Sbatch(
      *alice_,
      {"-w", "n1", "--time=1", "--wrap",
       SaveLine(cluster, "--port " + std::to_string(backend.port()), "tl.json", "127.0.0.1") +
           "; sleep 600"},
      &error);
  ASSERT_FALSE(a.empty()) << error;
  std::string out = JobOutput(cluster.jobs_dir() + "/tl.json");
  ASSERT_EQ(JsonText(ParseOut(out).get(), {"job", "id"}), a) << out;
  // Its expiry is the job's end plus end_grace: set, not "never".
  EXPECT_NE(JsonText(ParseOut(daemon_->Cli({"load", a, "--json"}).out).get(), {"job", "expires"}),
            "0");
  EXPECT_TRUE(WaitUntil([&] { return Gone(a); }, 150000)) << daemon_->Log();
  EXPECT_NE(cluster.JobState(a), "RUNNING");
}

}  // namespace
}  // namespace brokerproxy::testing
