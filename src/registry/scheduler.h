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
// A command runs on the libuv pool (one call in flight per Scheduler, so it holds at most one
// of the pool's threads), with the daemon's environment (SLURM_CONF and the like pass
// through), stdin from /dev/null, in a process group of its own. Its stdout is read up to
// max_output_bytes and the first line of its stderr goes into the error message. At
// call_timeout_ms or past the output limit the whole group is killed (SIGKILL); when the
// command exits, whatever is left of its group is killed too; the child is always reaped.
// sinfo's node names are kept for 60 s, and asked again sooner when a job names a node they
// lack.
//
// Ownership: the daemon owns the Scheduler; `*loop` outlives it. Loop-thread only.

#ifndef BROKERPROXY_REGISTRY_SCHEDULER_H_
#define BROKERPROXY_REGISTRY_SCHEDULER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/histogram.h"
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
  uid_t owner = 0;  // kNoOwner if the scheduler names a user this host does not know
  // True while a service of the job may register: Slurm RUNNING or CONFIGURING (also
  // COMPLETING is false), PBS "R".
  bool running = false;
  std::string state;  // the scheduler's word for the state, for messages: "PENDING", "Q"
  // Unix seconds when the time limit ends the job; 0: no limit known. (Slurm gives a job
  // without a limit that its backfill scheduler starts a limit of 365 days.)
  int64_t end_time = 0;
  // Every name the job's nodes go by, lower case: Slurm NodeName, NodeHostname and NodeAddr of
  // each node; PBS the exec hosts. A backend host must be one of them.
  std::vector<std::string> hosts;
};

// The owner of a job whose user has no uid here: no caller has it, so no one owns the job.
inline constexpr uid_t kNoOwner = static_cast<uid_t>(-1);

// A listing of the scheduler's jobs at one moment.
class JobTable {
 public:
  void Add(SchedulerJob job);
  // The job that `id` names (any case): its printed id or one of its aliases; nullptr if none.
  // The parsers below never build a table in which two jobs share a name.
  const SchedulerJob* Find(std::string_view id) const;
  const std::vector<SchedulerJob>& jobs() const { return jobs_; }

 private:
  std::vector<SchedulerJob> jobs_;
  std::map<std::string, size_t> ids_;      // lower-case id -> index in jobs_
  std::map<std::string, size_t> aliases_;  // lower-case alias -> index in jobs_
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

  // Every job the scheduler knows, younger than `max_age_ms` and `cache_ms` (a cached listing
  // if one is that fresh, else a new call, always for 0; calls made while one is running share
  // it, so a listing may be as old as one call takes). `done` runs on the loop
  // thread, on a later turn than List(). Errors: Unavailable with a message that names the
  // scheduler and what failed ("slurm: squeue --json timed out after 10 s", "slurm: squeue
  // exited 1: ..."), InvalidArgument if its output cannot be read. Dropping the returned token
  // drops `done`; the call itself finishes (or times out) on its own.
  virtual loop::Pending List(int64_t max_age_ms, Done done) = 0;

  // How long each call of the scheduler's command took, and how many failed.
  const loop::Histogram& call_seconds() const { return call_seconds_; }
  uint64_t call_failures() const { return call_failures_; }

 protected:
  loop::Histogram call_seconds_{loop::kLatencyBounds};
  uint64_t call_failures_ = 0;
};

// nullptr for SchedulerType::kNone.
std::unique_ptr<Scheduler> MakeScheduler(loop::Loop* loop, const SchedulerOptions& options);

// ---- The parsers behind Scheduler, pure and bounded (exposed for tests and fuzzing). ----
// Each reads the scheduler's output as untrusted text: a wrong type, a missing field, an id
// that two jobs share or a bound exceeded is InvalidArgument naming what, never a partial or
// empty table.

// Names and length bounds of ExpandHostlist.
inline constexpr size_t kMaxHostlistNames = 100000;
inline constexpr size_t kMaxHostNameBytes = 255;

// Expands a Slurm hostlist expression: comma-separated names, each with bracketed sets of
// numbers and ranges ("n[1-2]", "gpu[01-03,07],login1"; a range keeps its lower bound's zero
// padding: "[08-10]" -> 08 09 10; several sets multiply: "r[1-2]n[1-2]"). "" is no names.
// Refuses (InvalidArgument) nested or unbalanced brackets, empty names or sets, reversed
// ranges, characters other than [A-Za-z0-9._-] in names, more than kMaxHostlistNames names
// (checked before expanding) and names longer than kMaxHostNameBytes.
Result<std::vector<std::string>> ExpandHostlist(std::string_view expression);

// A Slurm node's names as `sinfo --json` reports them (NodeName, NodeHostname, NodeAddr).
struct SlurmNode {
  std::string name;
  std::string hostname;
  std::string address;
};
using SlurmNodes = std::map<std::string, SlurmNode>;  // by NodeName

// `sinfo --json` (openapi v0.0.38): {"nodes":[{"name","hostname","address",...}...]}.
Result<SlurmNodes> ParseSlurmNodes(std::string_view sinfo_json);

// `squeue --json` (openapi v0.0.38): {"errors":[],"jobs":[{...}]}; see SchedulerJob for the
// ids. A job's hosts are each node of its `nodes` hostlist with the names `nodes` gives it;
// a node that `nodes` lacks contributes its NodeName alone and is appended to `*unknown` (if
// given), so the caller can ask sinfo again. end_time is 0 for a job without a time limit.
Result<JobTable> ParseSlurmJobs(std::string_view squeue_json, const SlurmNodes& nodes,
                                std::vector<std::string>* unknown = nullptr);

// The uid of a user name, nullopt if there is none. PBS names users, Slurm numbers them.
using UidLookup = std::function<std::optional<uid_t>(const std::string& user)>;
// getpwnam_r: may block (NSS, LDAP), so never on the loop thread.
std::optional<uid_t> LookUpUid(const std::string& user);

// `qstat -f -F json` (PBS Pro / OpenPBS): {"Jobs":{"123.server":{"job_state":"R","euser":
// "alice","exec_host":"node1/0*2+node2/1","Resource_List":{"walltime":"01:00:00"},"stime":
// "Thu Dec  3 12:00:00 2026",...}}}; no "Jobs" when there are none. The owner is `euser`
// (else Job_Owner's user part) through `uid_of`, kNoOwner if unknown; hosts are exec_host's
// host names; end_time = stime + walltime when both are known.
Result<JobTable> ParsePbsJobs(std::string_view qstat_json, const UidLookup& uid_of);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_SCHEDULER_H_
