// Scheduler: what the batch scheduler (Slurm, PBS) says about its jobs, asked by the daemon.
//
// With `[scheduler] type = slurm|pbs` the daemon binds every registration to a job of the
// scheduler: a save names a job that exists, runs, belongs to the caller and has the backend
// host among its nodes; the registration ends when the job does. The daemon asks, never the
// CLI: the CLI runs in the user's environment, which the user controls.
//
// The scheduler is asked through its own command-line interfaces (Slurm: `squeue --json` for
// the jobs, `sinfo --json` for the names of the nodes; PBS: `qstat -f -F json`), run as child
// processes off the loop thread, each bounded by a timeout and an output limit. One call lists
// every job; its answer is cached, so a burst of saves and the reconciler share one call.
//
// Ownership: the daemon owns the Scheduler; `*loop` outlives it. Loop-thread only.

#ifndef BROKERPROXY_REGISTRY_SCHEDULER_H_
#define BROKERPROXY_REGISTRY_SCHEDULER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "loop/loop.h"
#include "loop/status.h"
#include "loop/work.h"

namespace brokerproxy::registry {

enum class SchedulerType { kNone, kSlurm, kPbs };
const char* SchedulerTypeName(SchedulerType type);  // "none" | "slurm" | "pbs"

// One job as the scheduler reports it.
struct SchedulerJob {
  // The job's name as the scheduler prints it, which is the id it is registered under: Slurm
  // "12", an array task "12_3", a heterogeneous job's component "12+1"; PBS "123", an array
  // subjob "123_4" (PBS prints "123[4].server"; the server suffix is dropped and the brackets,
  // which a DNS name cannot carry, become "_"). A ValidJobId().
  std::string id;
  // Other ids the job answers to: Slurm's numeric job id of an array task or a component
  // ("15" for "12_3"), the printed form of a PBS id ("123.server"). May be empty.
  std::vector<std::string> aliases;
  uid_t owner = 0;
  // True while a service of the job may register: Slurm RUNNING or CONFIGURING (also
  // COMPLETING is false), PBS "R".
  bool running = false;
  std::string state;     // the scheduler's word for the state, for messages: "PENDING", "Q"
  int64_t end_time = 0;  // unix seconds when the time limit ends the job; 0: no limit known
  // Every name the job's nodes go by, lower case: Slurm NodeName, NodeHostname and NodeAddr of
  // each node; PBS the exec hosts. A backend host must be one of them.
  std::vector<std::string> hosts;
};

// A listing of the scheduler's jobs at one moment.
class JobTable {
 public:
  void Add(SchedulerJob job);
  // The job that `id` names (any case): its printed id or one of its aliases; nullptr if none.
  const SchedulerJob* Find(std::string_view id) const;
  const std::vector<SchedulerJob>& jobs() const { return jobs_; }

 private:
  std::vector<SchedulerJob> jobs_;
};

struct SchedulerOptions {
  SchedulerType type = SchedulerType::kNone;
  int64_t call_timeout_ms = 10000;  // one command; killed (SIGKILL) after this
  int64_t cache_ms = 2000;          // a listing younger than this answers List()
  size_t max_output_bytes = 256u << 20;
  // The commands (PATH is searched); tests and sites with wrappers may point elsewhere.
  std::string squeue = "squeue";
  std::string sinfo = "sinfo";
  std::string qstat = "qstat";
};

class Scheduler {
 public:
  using Table = std::shared_ptr<const JobTable>;
  using Done = std::function<void(Result<Table>)>;

  virtual ~Scheduler() = default;
  virtual SchedulerType type() const = 0;

  // Every job the scheduler knows, at most `max_age_ms` old (a cached listing if one is that
  // fresh, else a new call; calls made while one is running share it). `done` runs on the loop
  // thread, on a later turn than List(). Errors: Unavailable with a message that names the
  // scheduler and what failed ("slurm: squeue --json timed out after 10 s", "slurm: squeue
  // exited 1: ..."), InvalidArgument if its output cannot be read. Dropping the returned token
  // drops `done`; the call itself finishes (or times out) on its own.
  virtual loop::Pending List(int64_t max_age_ms, Done done) = 0;
};

// nullptr for SchedulerType::kNone.
std::unique_ptr<Scheduler> MakeScheduler(loop::Loop* loop, const SchedulerOptions& options);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_SCHEDULER_H_
