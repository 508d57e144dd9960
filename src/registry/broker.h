// Broker: carries out control requests against the registry.
//
// It owns the policies around the bare Registry: persistence before acknowledging (Store),
// expiry, readiness and the "wait" op. Certificates for `ssl` jobs, proxy statistics and the CA
// certificate come from hooks the daemon installs, so this layer does not depend on the proxy.
//
// States: every reply that shows a job (save, load, wait, query) gives it one JobState (job.h)
// in "state", with "ready" equal to state == ready:
//   - waiting: every job starts so (with or without "wait" in the save) and is probed: the
//     daemon connects to its backend host:port, from where the proxy will connect, with the
//     backend policy's owner check, backing off from probe_min_ms to probe_max_ms;
//   - ready: a probe connected, or a proxied client's dial did (OnBackendDial); persisted;
//   - down: the probe gave up (`ready_timeout_ms`), or the backend of a ready job refused a
//     proxied connection (OnBackendDial) or a periodic re-check (`recheck_interval_ms`: one
//     connect to each ready job per interval, spread evenly over it). A job that goes down
//     from ready is probed again at once, as a waiting one is, and is ready again when its
//     backend listens. Down is not persisted: after a restart a job is ready if it was ready
//     (the first round of re-checks looks again), otherwise waiting and probed.
// The proxy dials a job in any state: a client may connect right after its save, and what the
// dial finds feeds the state.
//
// Replies come on a later loop turn than Handle() (docs/ARCHITECTURE.md, "Later, never inside").
//
// Job ids in requests may be spelt in any case; Handle() makes them canonical (job.h) before
// anything else, so every op acts on, and every reply shows, the registry's one spelling.
//
// Limits, so one user cannot make the daemon work for them without end: a uid may have
// `max_waits_per_user` waits pending (more are refused with ResourceExhausted), and a
// readiness probe gives up after `ready_timeout_ms` unless a wait is still pending on the job:
// the job is then *down* (`query` also lists it under "down") until a later wait or save arms
// one probe again. A job has at most one probe (a re-check is one), so a user's probes are
// bounded by their jobs ([registry] max_jobs_per_user); a refused dial starts one at most every
// `refusal_holdoff_ms` per job, however many clients are refused.
//
// Binding to the batch scheduler (set_scheduler, registry/scheduler.h): a save names a job of
// the scheduler by the longest part of its id before a '.' that names one ("12.web" is service
// "web" of job 12; PBS's "123.server.web" of job 123); it is refused unless that job exists, runs,
// belongs to the caller (root may save for any job) and has the backend host among its nodes, and
// is stored under the scheduler's printed id plus the suffix (a raw Slurm id of an array task saves
// "A_T"). It expires at the job's end time plus `end_grace_s` (or earlier, if its ttl says so). A
// save the scheduler cannot answer is refused (Unavailable): never admitted unchecked. Every
// `reconcile_interval_ms` one listing removes the entries whose job is gone, no longer runs
// or has another owner, each logged with the reason, and moves expiries to the jobs' end
// times; a listing that fails removes nothing. Daemons that share a store (several login nodes,
// registry/redis_store.h) take turns: only the holder of the store's "reconcile" lease lists. The
// "epilog" op, for root and `admin_uids` only, removes a job's entries when the scheduler ends it.
//
// Ownership: the daemon owns the Broker; `*loop`, `*registry` and `*store` must outlive it.
// Destroying it drops pending probes, waits and replies. Loop-thread only.

#ifndef BROKERPROXY_REGISTRY_BROKER_H_
#define BROKERPROXY_REGISTRY_BROKER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "loop/handle.h"
#include "loop/lifetime.h"
#include "loop/loop.h"
#include "loop/stream.h"
#include "loop/timer.h"
#include "loop/work.h"
#include "registry/control_protocol.h"
#include "registry/json.h"
#include "registry/registry.h"
#include "registry/scheduler.h"
#include "registry/store.h"

namespace brokerproxy::registry {

class Broker {
 public:
  // One reply line, without the newline.
  using Reply = std::function<void(std::string line)>;
  // Adds members to the "stats" reply for `caller` (uid 0 sees every job).
  using StatsProvider = std::function<void(cJSON* stats, uid_t caller)>;
  // Adds members to a "load" reply for a laptop: where the proxy listens, how to check it.
  using LoadInfoProvider = std::function<void(cJSON* body)>;
  // When `job` was last in use (unix seconds): a session open or bytes moving. `query` shows
  // it, and how long ago that was.
  using ActivityProvider = std::function<int64_t(const Job& job)>;
  // The broker CA certificate (PEM), or an error if TLS is not set up.
  using CaProvider = std::function<Result<std::string>()>;
  // Issues the certificate of ssl job `job` (its id, owner and backend host are set) for the
  // public key in `csr_pem`, off the loop, and reports it with the CA certificate. The key
  // stays with the client (proxy/tls/certs.h explains the CSR model). Dropping the returned token
  // cancels what has not started; signing that has started still reports.
  struct IssuedCert {
    std::string cert_pem;
    std::string ca_pem;
  };
  using CertIssuer = std::function<loop::Pending(const Job& job, const std::string& csr_pem,
                                                 std::function<void(Result<IssuedCert>)> done)>;
  // The backend policy (proxy/server/backend_policy.h) for one resolved address of `owner`'s job:
  // with `dialling` false, what can be checked before the service listens (at save, where a
  // port of 0 means not allocated yet); with `dialling` true, everything, as before a
  // connection (readiness probes).
  using BackendCheck =
      std::function<Status(const sockaddr_storage& addr, uid_t owner, bool dialling)>;
  // Unix seconds.
  using Clock = std::function<int64_t()>;
  // Says whether canonical job id `id` may be saved at all (any type), e.g. not an id whose
  // TLS name is one of the proxy's own; an error (InvalidArgument) is the reply to the save.
  using IdCheck = std::function<Status(const std::string& id)>;
  // Drops a pending request whose client went away, without replying. Safe to call at any
  // time, also after the reply or after the Broker is gone (it does nothing then).
  using Cancel = std::function<void()>;

  struct Options {
    int64_t expiry_check_ms = 1000;  // how often expired jobs are swept
    int64_t probe_min_ms = 100;      // readiness probe backoff, doubling ...
    int64_t probe_max_ms = 2000;     // ... up to this
    int64_t probe_connect_timeout_ms = 2000;
    int64_t ready_timeout_ms = 120000;    // a probe gives up after this; 0: never
    size_t max_waits_per_user = 32;       // pending waits of one uid (root included)
    int64_t recheck_interval_ms = 60000;  // each ready job is connected to once per this; 0: never
    int64_t refusal_holdoff_ms = 1000;    // a refused dial starts a job's probe at most this often
    // With a scheduler only:
    int64_t reconcile_interval_ms = 30000;      // how often entries are checked against the jobs
    int64_t end_grace_s = 300;                  // an entry expires this long after its job's end
    int64_t scheduler_cache_ms = 2000;          // the listing age a save accepts
    int64_t scheduler_call_timeout_ms = 10000;  // a listing may be this much older still
    std::vector<uid_t> admin_uids;              // may run "epilog", besides root
  };

  Broker(loop::Loop* loop, Registry* registry, Store* store, Options options, Clock clock);
  ~Broker();
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  // Starts the expiry sweep (and the reconciler, with a scheduler) and probes jobs that were
  // loaded while not ready.
  Status Start();

  // Carries out `request`; the returned Cancel (empty if there is nothing to cancel) drops it.
  Cancel Handle(Request request, uid_t caller, Reply reply);

  // What the proxy's dial to job `id`'s backend found, for the record of `generation`
  // (Registry::Generation; a dial for an older record is ignored): `connected` (the backend
  // policy's owner check passed and the connection was made), or else refused (connection
  // refused, or the owner check failed). A connection makes a waiting or down job ready; a
  // refusal makes a ready job down and probes it again (at most one probe start per job every
  // refusal_holdoff_ms). Loop thread; does not call back into the proxy.
  void OnBackendDial(const std::string& id, uint64_t generation, bool connected);

  // The state clients are shown for `job` (a job of this broker's registry).
  JobState StateOf(const Job& job) const;

  void set_stats_provider(StatsProvider p) { stats_provider_ = std::move(p); }
  void set_activity_provider(ActivityProvider p) { activity_provider_ = std::move(p); }
  void set_ca_provider(CaProvider p) { ca_provider_ = std::move(p); }
  void set_load_info_provider(LoadInfoProvider p) { load_info_provider_ = std::move(p); }
  void set_cert_issuer(CertIssuer i) { cert_issuer_ = std::move(i); }
  void set_id_check(IdCheck c) { id_check_ = std::move(c); }
  // Without one, every backend is admitted. With one, a save resolves the backend host (on the
  // thread pool) and is refused if any address fails (a name that does not resolve is left to
  // the checks at dial); probes connect only where it admits.
  void set_backend_check(BackendCheck c) { backend_check_ = std::move(c); }
  // Binds every save to a job of `scheduler` (see above); nullptr (the default): no binding.
  // `*scheduler` must outlive the Broker. Call before Start().
  void set_scheduler(Scheduler* scheduler) { scheduler_ = scheduler; }

 private:
  struct Probe;
  struct Waiter {
    uint64_t serial = 0;
    uid_t uid = 0;
    Reply reply;
    loop::HandlePtr<loop::Timer> timer;
  };

  // A save that passed the ownership check: with a scheduler, binds it to its job (its id
  // becomes the job's printed id, its ttl ends with the job), then CheckBackend().
  void BindToJob(Request request, uid_t caller, Reply reply);
  // The checks of a save's id that do not depend on the scheduler: the id check, ssl ids that
  // must be DNS names, another user's entry.
  Status CheckSaveId(const Request& request, uid_t caller) const;
  // A save that passed the ownership check: the backend policy, then SaveChecked().
  void CheckBackend(Request request, uid_t caller, Reply reply);
  // A save whose backend passed: issue the certificate of an ssl job, then Save().
  void SaveChecked(Request request, uid_t caller, Reply reply);
  void Save(Request request, uid_t caller, Reply reply, std::optional<IssuedCert> cert);
  // `if_secret` non-empty: only if the job still has this secret (Registry::Remove).
  void Remove(const std::string& id, const std::string& if_secret, uid_t caller, Reply reply);
  Cancel Wait(const std::string& id, uid_t caller, int64_t timeout_ms, Reply reply);
  // Removes waiter `serial` of job `id` (if still there) and returns it.
  std::unique_ptr<Waiter> TakeWaiter(const std::string& id, uint64_t serial);
  void AddStats(cJSON* stats, uid_t caller);
  void SweepExpired();
  void Reconcile();
  void OnListing(int64_t asked, Result<std::shared_ptr<const JobTable>> table);
  // Removes `changes.gone` (id, reason) and sets `changes.expires` (id, time) in one commit.
  struct Changes {
    std::vector<std::pair<std::string, std::string>> gone;
    std::vector<std::pair<std::string, int64_t>> expires;
    std::unordered_map<std::string, uint64_t> generations;  // as decided on
  };
  // `done` (may be empty) gets the commit's status and the ids removed.
  void Apply(Changes changes, std::function<void(Status, std::vector<std::string> removed)> done);
  void Epilog(const std::string& id, uid_t caller, Reply reply);

  // Probes `job` (replacing any probe it has) after `delay_ms`. A `recheck` is one cheap
  // connect to a ready job: success changes nothing, failure makes the job down and turns the
  // probe into a readiness probe.
  void StartProbe(const Job& job, bool recheck = false, int64_t delay_ms = 0);
  void ProbeOnce(Probe* probe);
  // Re-checks the next ready job of the current round, and arms the timer for the one after.
  void RecheckNext();
  // A ready job's backend stopped listening: down, and probed again (rate-limited).
  void MarkDown(const Job& job, const char* why);
  void OnProbeResult(const std::string& id, bool listening);
  // The job changed identity (removed or replaced): stop its probe and release its waiters.
  void Forget(const std::string& id, const Status& waiter_status);
  void ReleaseWaiters(const std::string& id, const Status& status);

  void ReplyLater(Reply reply, std::string line);

  loop::Loop* loop_;
  Registry* registry_;
  Store* store_;
  Options options_;
  Clock clock_;
  StatsProvider stats_provider_;
  ActivityProvider activity_provider_;
  CaProvider ca_provider_;
  LoadInfoProvider load_info_provider_;
  CertIssuer cert_issuer_;
  IdCheck id_check_;
  BackendCheck backend_check_;
  Scheduler* scheduler_ = nullptr;
  loop::HandlePtr<loop::Timer> reconcile_timer_;
  loop::Pending listing_;                // the reconciler's
  bool reconciling_ = false;             // its listing has not answered yet
  uint64_t last_listing_error_log_ = 0;  // loop time (ms); 0: none yet
  // The deadline (end time + grace) each entry's expiry was last set from, so that a job whose
  // time limit grows keeps its entry; entries missing here only have their expiry lowered.
  std::unordered_map<std::string, int64_t> job_deadlines_;

  loop::HandlePtr<loop::Timer> expiry_timer_;
  bool sweeping_ = false;
  std::unordered_map<std::string, std::unique_ptr<Probe>> probes_;
  std::unordered_multimap<std::string, std::unique_ptr<Waiter>> waiters_;
  std::unordered_map<uid_t, size_t> waits_per_uid_;
  uint64_t next_waiter_ = 0;
  // Jobs that are down (see above); not persisted.
  std::unordered_set<std::string> down_;
  // Per job, the loop time (ms) before which a refused dial starts no probe.
  std::unordered_map<std::string, uint64_t> reprobe_not_before_;
  // The periodic re-check: the ready jobs of the current round, and the next to look at.
  loop::HandlePtr<loop::Timer> recheck_timer_;
  std::vector<std::string> recheck_round_;
  size_t recheck_next_ = 0;
  std::unordered_map<uint64_t, loop::Pending> cert_jobs_;  // also save-time resolutions
  uint64_t next_cert_job_ = 0;
  // Guards the callbacks that may outlive this object (store commits, signing, cancels); the
  // last member, so it ends first.
  loop::Lifetime lifetime_;
};

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_BROKER_H_
