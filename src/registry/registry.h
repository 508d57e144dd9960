// Registry: the in-memory table of jobs, with the rules for who may do what.
//
// Pure data structure: no I/O, no clock (callers pass `now`, in unix seconds), no loop. The
// daemon keeps one Registry on its loop thread and persists it through registry/store.h;
// tests drive it directly.
//
// Access rules: a user sees and changes only their own jobs; uid 0 sees and changes all. Job
// ids form one namespace shared by all users, so saving an id that another user holds is
// refused (PermissionDenied). Saving an id the caller already holds replaces that entry only
// when the request says so (`replace`; a restarted job script passes it for its own stale
// record); otherwise it is refused (AlreadyExists), so two services of one job cannot silently
// take each other's place. Root saving over another user's entry needs `replace` too.
//
// Ids are case-insensitive (job.h, CanonicalJobId): every method takes any spelling, and the
// registry stores, returns and lists only the canonical (lower-case) one, so "ABC" is the job
// "abc" and belongs to whoever holds "abc".
//
// Per-user limit: a uid other than 0 may hold at most `max_jobs_per_user` jobs. Every port a
// user takes from the range and every record of theirs in the snapshot comes with a job, so
// this also bounds those: at most max_jobs_per_user ports, and records of at most about 9 KiB
// each (two 4 KiB certificate paths; an ssh job's record is about 300 bytes). Root is not
// limited: it administers the broker. Put() (loading a snapshot, undoing) does not check it.
//
// Thread safety: none; loop-thread only.

#ifndef BROKERPROXY_REGISTRY_REGISTRY_H_
#define BROKERPROXY_REGISTRY_REGISTRY_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loop/status.h"
#include "registry/job.h"

namespace brokerproxy::registry {

// An inclusive range of TCP ports, "28000-28999".
struct PortRange {
  // Below Linux's ephemeral range (32768-60999): a port inside it may be held by any outgoing
  // connection on the compute node when the service tries to bind it.
  int first = 28000;
  int last = 28999;

  // Accepts "A-B" with 1 <= A <= B <= 65535 (whitespace around the numbers allowed).
  static Result<PortRange> Parse(std::string_view text);
  std::string ToString() const;
  int size() const { return last - first + 1; }
  bool Contains(int port) const { return port >= first && port <= last; }
  bool operator==(const PortRange&) const = default;
};

struct SaveRequest {
  std::string id;  // REQUIRES: ValidJobId (else InvalidArgument)
  JobType type = JobType::kSsh;
  std::string host;      // REQUIRES: ValidHost (else InvalidArgument)
  int port = 0;          // 0: allocate from the port range; else 1..65535
  int64_t ttl = -1;      // seconds until expiry; -1: the registry's default; 0: never
  bool ready = true;     // false: the job waits for its backend to listen
  bool replace = false;  // an existing entry of this id may be replaced (else AlreadyExists)
  std::string cert_path;
  std::string key_path;
};

// The refusal of a save over an existing entry without `replace`. REQUIRES: ValidJobId(id).
std::string AlreadySavedMessage(std::string_view id);

class Registry {
 public:
  struct Options {
    PortRange ports;               // where Save() allocates ports; default 28000-28999
    int secret_bits = 256;         // length of generated secrets
    int64_t default_ttl = 0;       // seconds; 0 = jobs never expire unless asked to
    size_t max_jobs_per_user = 0;  // jobs one uid other than 0 may hold; 0: no limit
  };

  explicit Registry(Options options);

  // Creates job `req.id` owned by `caller`, or, with `req.replace`, replaces the caller's
  // existing job of that id (a fresh secret; a fresh port unless `req.port` is given). On
  // success `*replaced` holds the previous record, if any, so the caller can undo. Errors:
  // InvalidArgument (bad field), PermissionDenied (the id belongs to another user and
  // caller != 0), AlreadyExists (the id exists, the caller may change it, and `req.replace` is
  // false), ResourceExhausted (no free port in the range, or a new job beyond the caller's
  // max_jobs_per_user).
  Result<Job> Save(const SaveRequest& req, uid_t caller, int64_t now, std::optional<Job>* replaced);

  // The job, if it exists (NotFound) and `caller` may see it (PermissionDenied).
  Result<const Job*> Get(std::string_view id, uid_t caller) const;

  // Removes the job and returns it; same errors as Get(). With `if_secret`, only if the stored
  // secret still equals it (compared in constant time), i.e. the entry is the one whose save
  // returned that secret and not a newer save of the same id: otherwise AlreadyExists and the
  // entry stays.
  Result<Job> Remove(std::string_view id, uid_t caller,
                     std::optional<std::string_view> if_secret = std::nullopt);

  // The proxy's check: the job if `id` exists and `secret` matches, else nullptr. Unknown ids
  // are compared against a dummy secret, so both failures take the same time.
  const Job* Authenticate(std::string_view id, std::string_view secret) const;

  // Unchecked lookup (no caller): nullptr if absent. The pointer is valid until the next
  // mutation of the registry.
  const Job* Find(std::string_view id) const;

  // Jobs `caller` may see (all for uid 0), in natural order of ids (NaturalLess, job.h).
  std::vector<const Job*> List(uid_t caller) const;
  // Every job, in the same order (for snapshots).
  std::vector<const Job*> All() const { return List(0); }

  // Ids of jobs with 0 < expires <= now, sorted.
  std::vector<std::string> Expired(int64_t now) const;

  // NotFound if absent.
  Status SetReady(std::string_view id, bool ready);
  // Sets the job's expiry (unix seconds, 0..kMaxJobTime; 0: never). Like SetReady, the job
  // stays the same job: its generation does not change and the observer is not called.
  // NotFound if absent, InvalidArgument if out of range.
  Status SetExpires(std::string_view id, int64_t expires);

  // Inserts or overwrites this record, its id made canonical (loading a snapshot, undoing a
  // change). Checks every field (InvalidArgument); keeps the port index right.
  Status Put(Job job);
  // Removes `id` if present.
  void Erase(std::string_view id);

  size_t size() const { return jobs_.size(); }
  // Jobs owned by `uid`.
  size_t CountOwnedBy(uid_t uid) const;
  const Options& options() const { return options_; }

  // A number that changes whenever job `id` is stored anew (Save, Put) or removed, and stays
  // the same otherwise (SetReady does not change it); 0 if absent. Whoever authenticated with a
  // job's secret can later tell whether that secret, owner and backend still hold: the
  // generation is the same. Not persisted: numbers restart on each run.
  uint64_t Generation(std::string_view id) const;

  // Called with the id after a job was replaced (Save or Put over an existing record) or
  // removed (Remove, Erase), so that holders of the old record (the proxy's SSH sessions) can
  // act on it. Not called for new jobs or for SetReady. The observer must not change the
  // registry. Set it once; nullptr clears it.
  using Observer = std::function<void(const std::string& id)>;
  void set_observer(Observer observer) { observer_ = std::move(observer); }

  // Change tracking, for stores that write changes rather than snapshots (registry/
  // redis_store.h). While on, every method that changes a job (Save, Remove, SetReady,
  // SetExpires, Put, Erase) notes its canonical id; TakeTouched() returns the ids noted since
  // the last call (each once, sorted) and forgets them. Off by default.
  void set_track_changes(bool on) {
    track_changes_ = on;
    touched_.clear();
  }
  std::vector<std::string> TakeTouched();

  // Non-empty: Authenticate() refuses every secret (the view of a shared store is too old to
  // trust, registry/redis_store.h). The reason is for logs; empty: normal.
  void set_refusal(std::string reason) { refusal_ = std::move(reason); }
  const std::string& refusal() const { return refusal_; }

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  Result<int> AllocatePort() const;
  void IndexPort(const Job& job, int delta);
  // Keeps ports_in_use_ and jobs_per_owner_ right as `job` comes (+1) or goes (-1).
  void Index(const Job& job, int delta);
  // Gives `id` a new generation; `existed`: tell the observer.
  void Changed(const std::string& id, bool existed, bool removed);

  Options options_;
  std::unordered_map<std::string, Job, Hash, std::equal_to<>> jobs_;
  // Jobs holding each port of the range (ports outside it are not tracked).
  std::unordered_map<int, int> ports_in_use_;
  std::unordered_map<uid_t, size_t> jobs_per_owner_;
  std::string dummy_secret_;  // compared against for unknown ids
  std::unordered_map<std::string, uint64_t, Hash, std::equal_to<>> generations_;
  uint64_t next_generation_ = 1;
  Observer observer_;
  bool track_changes_ = false;
  std::vector<std::string> touched_;
  std::string refusal_;
};

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_REGISTRY_H_
