#include "e2e/slurm_cluster.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

namespace brokerproxy::testing {

namespace {

constexpr int kNodes = 2;
constexpr int kCpusPerNode = 4;

bool Executable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
  size_t start = s.find_first_not_of(" \n");
  return start == std::string::npos ? "" : s.substr(start);
}

std::string Tail(const std::string& path, size_t max = 3000) {
  std::string text = ReadFile(path);
  return text.size() > max ? "..." + text.substr(text.size() - max) : text;
}

// PIDs of the processes whose environment holds exactly `entry` ("NAME=value").
std::vector<pid_t> ProcessesWithEnv(const std::string& entry) {
  std::vector<pid_t> pids;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return pids;
  while (dirent* d = readdir(proc)) {
    char* end = nullptr;
    long pid = strtol(d->d_name, &end, 10);
    if (*end != '\0' || pid <= 1 || pid == getpid()) continue;
    std::string environ = ReadFile("/proc/" + std::string(d->d_name) + "/environ");
    size_t at = 0;
    while (at < environ.size()) {
      size_t zero = environ.find('\0', at);
      if (zero == std::string::npos) zero = environ.size();
      if (environ.compare(at, zero - at, entry) == 0) {
        pids.push_back(static_cast<pid_t>(pid));
        break;
      }
      at = zero + 1;
    }
  }
  closedir(proc);
  return pids;
}

}  // namespace

std::string SlurmCluster::Unsupported() {
  if (geteuid() != 0) return "a private Slurm needs root (slurmd runs jobs as their users)";
  for (const char* bin : {"/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"}) {
    if (!Executable(bin)) return std::string(bin) + " is missing (scripts/deps.sh --test)";
  }
  for (const char* bin : {"/usr/bin/sbatch", "/usr/bin/squeue", "/usr/bin/sinfo"}) {
    if (!Executable(bin)) return std::string(bin) + " is missing (scripts/deps.sh --test)";
  }
  // munged refuses a socket that not everyone can reach, and jobs run as other users: both need
  // "/" searchable by all (a bare chroot made with mktemp -d has mode 0700).
  struct stat root {};
  if (::stat("/", &root) != 0 || (root.st_mode & S_IXOTH) == 0) {
    return "/ is not searchable by other users: munged and the jobs of test users cannot run";
  }
  return "";
}

std::string SlurmCluster::jobs_dir() const { return *dir_ / "jobs"; }

::testing::AssertionResult SlurmCluster::Start() {
  dir_ = std::make_unique<TempDir>();
  const TempDir& d = *dir_;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  hostname_ = host;

  // The state, spool and log directories belong to SlurmUser/SlurmdUser, root here; the job
  // output directory is for everyone, sticky like /tmp.
  mkdir((d / "state").c_str(), 0700);
  for (int i = 1; i <= kNodes; ++i) mkdir((d / ("spool-n" + std::to_string(i))).c_str(), 0755);
  mkdir(jobs_dir().c_str(), 0777);
  chmod(jobs_dir().c_str(), 01777);

  // munge: a key of our own (munged wants it private to its user), a socket every user can
  // reach (the temp dir is 0711, the socket 0777).
  std::string key(1024, '\0');
  {
    std::ifstream urandom("/dev/urandom", std::ios::binary);
    urandom.read(key.data(), static_cast<std::streamsize>(key.size()));
  }
  WriteFile(d / "munge.key", key, 0400);
  std::string munge_socket = d / "munge.sock";
  munged_ = Child::Spawn({"/usr/sbin/munged", "--foreground", "--socket=" + munge_socket,
                          "--key-file=" + (d / "munge.key"), "--pid-file=" + (d / "munged.pid"),
                          "--log-file=" + (d / "munged.log"), "--seed-file=" + (d / "munged.seed")},
                         d / "munged.out");
  if (munged_ == nullptr) return ::testing::AssertionFailure() << "cannot spawn munged";

  // Ports: Slurm cannot be given port 0, since every client and daemon finds the others by
  // the ports written in slurm.conf, and slurmctld/slurmd cannot report a port the kernel
  // picked. So the test holds ports the kernel picked (bound, all distinct while held) until
  // right before the daemons start: while held, no other process is handed one of them.
  std::vector<std::unique_ptr<PortReservation>> reserved;
  std::vector<int> port;
  while (port.size() < 1 + kNodes) {
    reserved.push_back(std::make_unique<PortReservation>());
    port.push_back(reserved.back()->port());
  }

  std::ostringstream conf;
  conf << "ClusterName=bptest\n"
       // With its address: clients then need no name service to find the controller (a
       // bare container may not resolve its own host name).
       << "SlurmctldHost=" << hostname_ << "(127.0.0.1)\n"
       << "SlurmctldPort=" << port[0] << "\n"
       << "SlurmUser=root\n"
       << "SlurmdUser=root\n"
       << "AuthType=auth/munge\n"
       << "CredType=cred/munge\n"
       << "AuthInfo=socket=" << munge_socket << "\n"
       << "MpiDefault=none\n"
       // No cgroups or systemd in the test environment.
       << "ProctrackType=proctrack/linuxproc\n"
       << "TaskPlugin=task/none\n"
       << "JobAcctGatherType=jobacct_gather/none\n"
       << "AccountingStorageType=accounting_storage/none\n"
       << "SchedulerType=sched/backfill\n"
       // Heterogeneous jobs start only in a backfill pass: one a second, not every 30 s.
       << "SchedulerParameters=bf_interval=1\n"
       << "SelectType=select/cons_tres\n"
       << "SelectTypeParameters=CR_Core\n"
       << "ReturnToService=2\n"
       << "StateSaveLocation=" << (d / "state") << "\n"
       << "SlurmdSpoolDir=" << (d / "spool-%n") << "\n"
       << "SlurmctldPidFile=" << (d / "slurmctld.pid") << "\n"
       << "SlurmdPidFile=" << (d / "slurmd-%n.pid") << "\n"
       << "SlurmctldLogFile=" << (d / "slurmctld.log") << "\n"
       << "SlurmdLogFile=" << (d / "slurmd-%n.log")
       << "\n"
       // Cancelled jobs die fast; finished ones stay visible for half a minute.
       << "KillWait=2\n"
       << "MinJobAge=30\n"
       << "InactiveLimit=0\n"
       // The nodes claim more CPUs than the host may have (room for many sleeping jobs):
       // trust slurm.conf rather than drain them.
       << "SlurmdParameters=config_overrides\n";
  std::string nodes;
  for (int i = 1; i <= kNodes; ++i) {
    conf << "NodeName=n" << i << " NodeHostname=" << hostname_ << " NodeAddr=127.0.0." << i
         << " Port=" << port[i] << " CPUs=" << kCpusPerNode << " RealMemory=2000 State=UNKNOWN\n";
    nodes += (i > 1 ? ",n" : "n") + std::to_string(i);
  }
  conf << "PartitionName=debug Nodes=" << nodes << " Default=YES MaxTime=INFINITE State=UP\n";
  conf_path_ = d / "slurm.conf";
  WriteFile(conf_path_, conf.str(), 0644);
  env_ = {"SLURM_CONF=" + conf_path_};

  // munged creates its socket shortly after it starts.
  auto munge_up = [&] { return access(munge_socket.c_str(), F_OK) == 0; };
  WaitUntil([&] { return munge_up() || !munged_->Running(); }, 10000);
  if (!munge_up()) return ::testing::AssertionFailure() << "munged did not start:\n" << Logs();

  reserved.clear();  // slurmctld and slurmd bind them themselves
  RunOptions options;
  options.env = env_;
  slurmctld_ =
      Child::Spawn({"/usr/sbin/slurmctld", "-D", "-f", conf_path_}, d / "slurmctld.out", options);
  for (int i = 1; i <= kNodes; ++i) {
    std::string node = "n" + std::to_string(i);
    slurmds_.push_back(Child::Spawn({"/usr/sbin/slurmd", "-D", "-N", node, "-f", conf_path_},
                                    d / ("slurmd-" + node + ".out"), options));
  }

  RunResult r;
  bool idle = false, alive = true;
  WaitUntil(
      [&] {
        r = Run({"sinfo", "-h", "-N", "-o", "%N %t"}, std::nullopt, 5000);
        if (r.exit_code == 0) {
          int idle_nodes = 0;
          std::istringstream lines(r.out);
          std::string name, state;
          while (lines >> name >> state) idle_nodes += state == "idle";
          idle = idle_nodes == kNodes;
        }
        alive = slurmctld_ && slurmctld_->Running();
        for (auto& s : slurmds_) alive = alive && s && s->Running();
        return idle || !alive;
      },
      30000);
  if (idle) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "the Slurm nodes did not become idle (" << r.out << r.err << "):\n"
         << Logs();
}

RunResult SlurmCluster::Run(std::vector<std::string> argv, std::optional<uid_t> uid,
                            int timeout_ms) const {
  RunOptions options;
  options.env = env_;
  options.uid = uid;
  options.timeout_ms = timeout_ms;
  return RunCommand(argv, options);
}

std::string SlurmCluster::Sbatch(uid_t uid, const std::vector<std::string>& args,
                                 std::string* error) const {
  std::vector<std::string> argv = {"sbatch", "--parsable", "--chdir=" + jobs_dir(),
                                   "--output=" + jobs_dir() + "/slurm-%j.out"};
  argv.insert(argv.end(), args.begin(), args.end());
  RunResult r = Run(argv, uid);
  // --parsable prints "<id>" or "<id>;<cluster>".
  std::string id = Trim(r.out.substr(0, r.out.find(';')));
  if (r.exit_code != 0 || id.empty() || id.find_first_not_of("0123456789") != std::string::npos) {
    if (error != nullptr) {
      std::ostringstream why;
      why << "sbatch failed: " << r;
      *error += why.str();
    }
    return "";
  }
  return id;
}

bool SlurmCluster::Scancel(const std::string& id, std::optional<uid_t> uid) const {
  return Run({"scancel", id}, uid).exit_code == 0;
}

std::string SlurmCluster::JobState(const std::string& id) const {
  RunResult r = Run({"squeue", "-h", "--states=all", "-j", id, "-o", "%T"}, std::nullopt, 10000);
  if (r.exit_code != 0) return "";
  return Trim(r.out.substr(0, r.out.find('\n')));
}

bool SlurmCluster::WaitFor(const std::string& id, const std::string& state, int timeout_ms) const {
  return WaitUntil([&] { return JobState(id) == state; }, timeout_ms);
}

std::string SlurmCluster::Logs() const {
  if (dir_ == nullptr) return "";
  std::string out;
  for (const std::string& name :
       {std::string("munged.log"), std::string("munged.out"), std::string("slurmctld.log"),
        std::string("slurmctld.out"), std::string("slurmd-n1.log"), std::string("slurmd-n2.log")}) {
    out += "--- " + name + "\n" + Tail(*dir_ / name);
  }
  return out;
}

void SlurmCluster::StopAll() {
  if (dir_ == nullptr) return;
  // Jobs first, while the controller and the nodes can still end them (KillWait=2).
  if (slurmctld_ && slurmctld_->Running()) {
    Run({"scancel", "--partition=debug"}, std::nullopt, 10000);
    WaitUntil(
        [&] {
          RunResult r = Run({"squeue", "-h", "-o", "%i"}, std::nullopt, 5000);
          return r.exit_code != 0 || Trim(r.out).empty();
        },
        10000);
  }
  for (auto& s : slurmds_) {
    if (s) s->Stop(SIGTERM, 5000);
  }
  if (slurmctld_) slurmctld_->Stop(SIGTERM, 5000);
  if (munged_) munged_->Stop(SIGTERM, 5000);
  // slurmstepd and the jobs' processes are not our children (slurmd forks them away), but
  // they all inherited SLURM_CONF naming this cluster: whatever is left of them dies here.
  if (!env_.empty()) {
    WaitUntil(
        [&] {
          std::vector<pid_t> left = ProcessesWithEnv(env_[0]);
          for (pid_t pid : left) kill(pid, SIGKILL);
          return left.empty();
        },
        5000);
  }
  slurmds_.clear();
  slurmctld_.reset();
  munged_.reset();
  dir_.reset();
}

SlurmCluster::~SlurmCluster() { StopAll(); }

}  // namespace brokerproxy::testing
