#include "registry/broker.h"

#include <algorithm>
#include <vector>

#include "loop/address.h"
#include "loop/log.h"
#include "registry/secret.h"

namespace brokerproxy::registry {

struct Broker::Probe {
  std::string id;
  std::string host;
  int port = 0;
  uid_t owner = 0;  // name look-ups count against the job's owner (loop::Resolve's group)
  bool refusal_logged = false;  // one log line per probe for a refused backend
  bool recheck = false;         // one look at a ready job (StartProbe)
  int64_t delay_ms = 0;
  uint64_t give_up_at = 0;  // loop time (ms); 0: never
  size_t attempt = 0;
  loop::Pending resolve;
  loop::HandlePtr<loop::Tcp> conn;
  loop::HandlePtr<loop::Timer> timer;
};

namespace {

JsonPtr JobBody(const Job& job, SecretField secret, JobState state) {
  JsonPtr body = NewObject();
  Adopt(body.get(), "job", JobToJson(job, secret, state));
  return body;
}

// The job of the scheduler an entry belongs to: its id up to the first '.' ("12.web": 12).
std::string_view SchedulerJobPart(std::string_view id) { return id.substr(0, id.find('.')); }

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// "n1, 127.0.0.1, vm", at most 8 names: the message is a line, not a node list.
std::string HostList(const std::vector<std::string>& hosts) {
  constexpr size_t kMaxShown = 8;
  std::string out;
  for (size_t i = 0; i < hosts.size() && i < kMaxShown; ++i) {
    out += (i ? ", " : "") + hosts[i];
  }
  if (hosts.size() > kMaxShown) out += ", ... (" + std::to_string(hosts.size()) + " in all)";
  return out.empty() ? "(none)" : out;
}

// Why the scheduler's job `sj` no longer carries an entry of `owner`, or "" if it does.
std::string UnboundReason(const SchedulerJob* sj, std::string_view base, uid_t owner,
                          const char* scheduler) {
  if (sj == nullptr) {
    return "job " + std::string(base) + " is not a job of " + scheduler + " (any more)";
  }
  if (!sj->running)
    return "job " + sj->id + " is " + (sj->state.empty() ? "not running" : sj->state);
  // Root's entries stand for any job (root may save for any job).
  if (owner != 0 && sj->owner != owner) {
    return "job " + sj->id + " belongs to uid " + std::to_string(sj->owner) + ", not to uid " +
           std::to_string(owner);
  }
  return "";
}

// The moment an entry of job `sj` ends: its end time plus the grace; 0 if the scheduler knows
// no end.
int64_t JobDeadline(const SchedulerJob& sj, int64_t end_grace_s) {
  if (sj.end_time <= 0) return 0;
  return std::min(sj.end_time + std::max<int64_t>(end_grace_s, 0), kMaxJobTime);
}

}  // namespace

Broker::Broker(loop::Loop* loop, Registry* registry, Store* store, Options options, Clock clock)
    : loop_(loop), registry_(registry), store_(store), options_(options), clock_(std::move(clock)) {
  // Another login node removed or replaced a job: this node's probe and waiters of it go.
  store_->set_remote_observer(lifetime_.Guard([this](const std::string& id) {
    job_deadlines_.erase(id);
    Forget(id, Status::NotFound("job " + id + " was removed or replaced on another login node"));
  }));
}

Broker::~Broker() { lifetime_.End(); }

Status Broker::Start() {
  auto t = loop::Timer::Create(*loop_);
  if (!t.ok()) return t.status();
  expiry_timer_ = std::move(t).value();
  expiry_timer_->Start(options_.expiry_check_ms, options_.expiry_check_ms,
                       [this] { SweepExpired(); });
  if (scheduler_ != nullptr) {
    auto r = loop::Timer::Create(*loop_);
    if (!r.ok()) return r.status();
    reconcile_timer_ = std::move(r).value();
    // The first pass at once: entries saved before the scheduler was configured, or while
    // the daemon was down, are held to their jobs from the start.
    uint64_t interval = static_cast<uint64_t>(std::max<int64_t>(options_.reconcile_interval_ms, 1));
    reconcile_timer_->Start(0, interval, [this] { Reconcile(); });
  }
  for (const Job* job : registry_->All()) {
    if (!job->ready) StartProbe(*job);
  }
  if (options_.recheck_interval_ms > 0) {
    auto r = loop::Timer::Create(*loop_);
    if (!r.ok()) return r.status();
    recheck_timer_ = std::move(r).value();
    recheck_timer_->Start(options_.recheck_interval_ms, [this] { RecheckNext(); });
  }
  return Status::OK();
}

JobState Broker::StateOf(const Job& job) const {
  if (down_.contains(job.id)) return JobState::kDown;
  return job.ready ? JobState::kReady : JobState::kWaiting;
}

void Broker::ReplyLater(Reply reply, std::string line) {
  loop_->Defer([reply = std::move(reply), line = std::move(line)] { reply(line); });
}

Broker::Cancel Broker::Handle(Request req, uid_t caller, Reply reply) {
  // One spelling from here on: probes, waiters and replies agree with the registry's ids.
  req.job = CanonicalJobId(req.job);
  req.save.id = CanonicalJobId(req.save.id);
  switch (req.op) {
    case Op::kSave: {
      if (Status s = CheckSaveId(req, caller); !s.ok()) {
        ReplyLater(std::move(reply), EncodeError(s));
        return nullptr;
      }
      BindToJob(std::move(req), caller, std::move(reply));
      return nullptr;
    }
    case Op::kEpilog:
      Epilog(req.job, caller, std::move(reply));
      return nullptr;
    case Op::kLoad: {
      auto job = registry_->Get(req.job, caller);
      if (!job.ok()) {
        ReplyLater(std::move(reply), EncodeError(job.status()));
        return nullptr;
      }
      JsonPtr body = JobBody(**job, SecretField::kInclude, StateOf(**job));
      if (load_info_provider_) load_info_provider_(body.get());
      ReplyLater(std::move(reply), EncodeOk(std::move(body)));
      return nullptr;
    }
    case Op::kVerify: {
      auto job = registry_->Get(req.job, caller);
      if (!job.ok()) {
        ReplyLater(std::move(reply), EncodeError(job.status()));
        return nullptr;
      }
      JsonPtr body = NewObject();
      cJSON_AddBoolToObject(body.get(), "match", SecretMatches((*job)->secret, req.secret));
      ReplyLater(std::move(reply), EncodeOk(std::move(body)));
      return nullptr;
    }
    case Op::kQuery: {
      JsonPtr body = NewObject();
      cJSON* jobs = cJSON_AddArrayToObject(body.get(), "jobs");
      // "down" repeats the down jobs' ids for clients that predate "state".
      cJSON* down = cJSON_AddArrayToObject(body.get(), "down");
      int64_t now = clock_();
      for (const Job* job : registry_->List(caller)) {
        JobState state = StateOf(*job);
        JsonPtr item = JobToJson(*job, SecretField::kOmit, state);
        if (activity_provider_) {
          int64_t last = activity_provider_(*job);
          cJSON_AddNumberToObject(item.get(), "last_active", static_cast<double>(last));
          cJSON_AddNumberToObject(item.get(), "idle",
                                  static_cast<double>(std::max<int64_t>(0, now - last)));
        }
        Adopt(jobs, nullptr, std::move(item));
        if (state == JobState::kDown) {
          cJSON_AddItemToArray(down, cJSON_CreateString(job->id.c_str()));
        }
      }
      ReplyLater(std::move(reply), EncodeOk(std::move(body)));
      return nullptr;
    }
    case Op::kRemove:
      Remove(req.job, req.secret, caller, std::move(reply));
      return nullptr;
    case Op::kStats: {
      JsonPtr body = NewObject();
      cJSON* stats = cJSON_AddObjectToObject(body.get(), "stats");
      cJSON_AddNumberToObject(stats, "jobs", static_cast<double>(registry_->List(caller).size()));
      AddStats(stats, caller);
      if (stats_provider_) stats_provider_(stats, caller);
      ReplyLater(std::move(reply), EncodeOk(std::move(body)));
      return nullptr;
    }
    case Op::kWait:
      return Wait(req.job, caller, req.timeout_ms, std::move(reply));
    case Op::kCa: {
      auto pem = ca_provider_ ? ca_provider_()
                              : Result<std::string>(Status::Unavailable(
                                    "this broker has no TLS certificate authority set up"));
      if (!pem.ok()) {
        ReplyLater(std::move(reply), EncodeError(pem.status()));
        return nullptr;
      }
      JsonPtr body = NewObject();
      cJSON_AddStringToObject(body.get(), "ca_cert", pem->c_str());
      ReplyLater(std::move(reply), EncodeOk(std::move(body)));
      return nullptr;
    }
  }
  return nullptr;
}

Status Broker::CheckSaveId(const Request& req, uid_t caller) const {
  if (id_check_) BP_RETURN_IF_ERROR(id_check_(req.job));
  if (req.save.type == JobType::kSsl && !DnsSafeJobId(req.job)) {
    return Status::InvalidArgument("job " + req.job +
                                   " cannot be an ssl job: its id is not a DNS name (a '+' "
                                   "cannot be part of a TLS server name); save it as ssh");
  }
  // Refuse early what the commit would refuse anyway, before issuing a certificate.
  const Job* existing = registry_->Find(req.job);
  if (existing && existing->owner != caller && caller != 0) {
    return Status::PermissionDenied("job " + req.job + " belongs to another user");
  }
  if (existing && !req.save.replace) {
    return Status::AlreadyExists(AlreadySavedMessage(req.job));
  }
  return Status::OK();
}

void Broker::BindToJob(Request req, uid_t caller, Reply reply) {
  if (scheduler_ == nullptr) {
    CheckBackend(std::move(req), caller, std::move(reply));
    return;
  }
  uint64_t key = next_cert_job_++;
  auto bind = [this, key, req = std::move(req), caller,
               reply = std::move(reply)](Result<Scheduler::Table> table) mutable {
    // Out of the captures first: erasing the token may destroy this callback.
    Request r = std::move(req);
    Reply rep = std::move(reply);
    cert_jobs_.erase(key);
    const char* name = SchedulerTypeName(scheduler_->type());
    if (!table.ok()) {
      // Never admitted unchecked: the scheduler alone says whose job this is.
      LOG_WARN("refused to save job %s for uid %u: cannot ask %s: %s", r.job.c_str(),
               static_cast<unsigned>(caller), name, table.status().message().c_str());
      rep(EncodeError(Status::Unavailable("job " + r.job + " cannot be checked against " + name +
                                          ", so it is not saved: " + table.status().message())));
      return;
    }
    // The longest part before a '.' that names a job: PBS's printed ids carry the server
    // ("123.server", $PBS_JOBID), so "123.server.web" is service "web" of job 123.
    std::string base(SchedulerJobPart(r.job));
    const SchedulerJob* sj = nullptr;
    for (size_t end = r.job.size(); end != std::string::npos && end > 0;
         end = r.job.rfind('.', end - 1)) {
      if ((sj = (*table)->Find(std::string_view(r.job).substr(0, end))) != nullptr) {
        base = r.job.substr(0, end);
        break;
      }
    }
    std::string suffix = r.job.substr(base.size());
    Status refused;
    if (sj == nullptr) {
      refused = Status::NotFound("job " + base + " is not a job of " + name);
    } else if (!sj->running) {
      refused = Status::InvalidArgument("job " + sj->id + " is " +
                                        (sj->state.empty() ? "not running" : sj->state));
    } else if (caller != 0 && sj->owner != caller) {
      refused = Status::PermissionDenied("job " + sj->id + " belongs to another user");
    } else if (std::find(sj->hosts.begin(), sj->hosts.end(), Lower(r.save.host)) ==
               sj->hosts.end()) {
      refused = Status::PermissionDenied("backend " + r.save.host + " is not one of job " + sj->id +
                                         "'s nodes: " + HostList(sj->hosts));
    }
    if (!refused.ok()) {
      LOG_WARN("refused to save job %s for uid %u: %s", r.job.c_str(),
               static_cast<unsigned>(caller), refused.message().c_str());
      rep(EncodeError(refused));
      return;
    }
    // The scheduler's printed id: a raw id of an array task or a component saves "A_T".
    std::string id = CanonicalJobId(sj->id + suffix);
    if (id != r.job) {
      if (!ValidJobId(id)) {
        rep(EncodeError(Status::InvalidArgument("job " + r.job + " would be saved as '" +
                                                id.substr(0, 80) +
                                                "', which is not a valid job id")));
        return;
      }
      r.job = id;
      r.save.id = id;
      if (Status s = CheckSaveId(r, caller); !s.ok()) {
        rep(EncodeError(s));
        return;
      }
    }
    // The entry ends with its job: at its end time plus the grace, or earlier if asked to.
    if (int64_t deadline = JobDeadline(*sj, options_.end_grace_s); deadline > 0) {
      int64_t now = clock_();
      int64_t ttl =
          r.save.ttl == -1 ? std::max<int64_t>(registry_->options().default_ttl, 0) : r.save.ttl;
      int64_t bound = std::max<int64_t>(deadline - now, 1);
      if (ttl == 0 || ttl >= bound) {
        r.save.ttl = bound;
        job_deadlines_[id] = now + bound;
      } else {
        job_deadlines_.erase(id);
      }
    }
    CheckBackend(std::move(r), caller, std::move(rep));
  };
  cert_jobs_[key] = scheduler_->List(options_.scheduler_cache_ms, std::move(bind));
}

void Broker::CheckBackend(Request req, uid_t caller, Reply reply) {
  // An invalid host is left to the registry's own message.
  if (!backend_check_ || !ValidHost(req.save.host)) {
    SaveChecked(std::move(req), caller, std::move(reply));
    return;
  }
  uint64_t key = next_cert_job_++;
  std::string host = req.save.host;
  int port = req.save.port;
  // Checked on what the name resolves to now; the dial checks again on what it resolves to
  // then. A port still to be allocated (0) skips the comparison with the proxy's own ports.
  auto checked = [this, key, req = std::move(req), caller,
                  reply = std::move(reply)](Result<std::vector<sockaddr_storage>> addrs) mutable {
    cert_jobs_.erase(key);
    if (!addrs.ok()) {
      // Nothing to check yet (a node's name may resolve only once it boots): every dial checks
      // what the name resolves to then.
      SaveChecked(std::move(req), caller, std::move(reply));
      return;
    }
    for (const sockaddr_storage& a : *addrs) {
      Status s = backend_check_(a, caller, /*dialling=*/false);
      if (!s.ok()) {
        LOG_WARN("refused to save job %s for uid %u: %s", req.job.c_str(),
                 static_cast<unsigned>(caller), s.message().c_str());
        reply(EncodeError(s.WithContext("job " + req.job)));
        return;
      }
    }
    SaveChecked(std::move(req), caller, std::move(reply));
  };
  cert_jobs_[key] = loop::Resolve(*loop_, host, port, std::move(checked), caller);
}

void Broker::SaveChecked(Request req, uid_t caller, Reply reply) {
  if (req.save.type != JobType::kSsl) {
    Save(std::move(req), caller, std::move(reply), std::nullopt);
    return;
  }
  if (!cert_issuer_) {
    ReplyLater(std::move(reply),
               EncodeError(Status::Unavailable("this broker has no TLS certificate authority "
                                               "set up, so it cannot save ssl jobs")));
    return;
  }
  Job draft;
  draft.id = req.job;
  draft.type = JobType::kSsl;
  draft.owner = caller;
  draft.host = req.save.host;
  uint64_t key = next_cert_job_++;
  std::string csr = req.csr;
  cert_jobs_[key] =
      cert_issuer_(draft, csr,
                   // Signing reports even after the broker went: guarded.
                   lifetime_.Guard([this, key, req = std::move(req), caller,
                                    reply](Result<IssuedCert> cert) mutable {
                     cert_jobs_.erase(key);
                     if (!cert.ok()) {
                       reply(EncodeError(cert.status().WithContext("cannot issue a certificate")));
                       return;
                     }
                     Save(std::move(req), caller, std::move(reply), std::move(cert).value());
                   }));
}

void Broker::Save(Request req, uid_t caller, Reply reply, std::optional<IssuedCert> cert) {
  // Every job starts waiting, whether or not the client waits for it: it is ready only once
  // something of its owner's listens on its backend.
  req.save.ready = false;
  auto saved = std::make_shared<Job>();
  auto replaced = std::make_shared<std::optional<Job>>();
  store_->Commit(
      [this, req, caller, saved, replaced]() -> Result<Store::Undo> {
        auto job = registry_->Save(req.save, caller, clock_(), replaced.get());
        if (!job.ok()) return job.status();
        *saved = *job;
        return Store::Undo([this, id = job->id, replaced] {
          registry_->Erase(id);
          if (replaced->has_value()) registry_->Put(**replaced);
        });
      },
      lifetime_.Guard([this, saved, replaced, caller, cert = std::move(cert),
                       reply = std::move(reply)](Status s) {
        if (!s.ok()) {
          reply(EncodeError(s));
          return;
        }
        if (replaced->has_value()) {
          Forget(saved->id, Status::NotFound("job " + saved->id + " was replaced"));
        }
        LOG_INFO("saved job %s (%s, backend %s:%d%s) for uid %u%s", saved->id.c_str(),
                 JobTypeName(saved->type), saved->host.c_str(), saved->port,
                 saved->ready ? "" : ", waiting for a listener", static_cast<unsigned>(caller),
                 replaced->has_value() ? ", replacing the previous entry" : "");
        StartProbe(*saved);
        JsonPtr body = JobBody(*saved, SecretField::kInclude, StateOf(*saved));
        if (cert) {
          cJSON_AddStringToObject(body.get(), "cert_pem", cert->cert_pem.c_str());
          cJSON_AddStringToObject(body.get(), "ca_pem", cert->ca_pem.c_str());
        }
        reply(EncodeOk(std::move(body)));
      }));
}

void Broker::Remove(const std::string& id, const std::string& if_secret, uid_t caller,
                    Reply reply) {
  auto removed = std::make_shared<Job>();
  store_->Commit(
      // The secret is checked in the same step as the removal: no save can come in between.
      [this, id, if_secret, caller, removed]() -> Result<Store::Undo> {
        auto job = registry_->Remove(
            id, caller,
            if_secret.empty() ? std::nullopt : std::optional<std::string_view>(if_secret));
        if (!job.ok()) return job.status();
        *removed = *job;
        return Store::Undo([this, removed] { registry_->Put(*removed); });
      },
      lifetime_.Guard([this, removed, caller, reply = std::move(reply)](Status s) {
        if (!s.ok()) {
          reply(EncodeError(s));
          return;
        }
        LOG_INFO("removed job %s for uid %u", removed->id.c_str(), static_cast<unsigned>(caller));
        job_deadlines_.erase(removed->id);
        Forget(removed->id, Status::NotFound("job " + removed->id + " was removed"));
        reply(EncodeOk(JobBody(*removed, SecretField::kOmit, StateOf(*removed))));
      }));
}

Broker::Cancel Broker::Wait(const std::string& id, uid_t caller, int64_t timeout_ms, Reply reply) {
  auto job = registry_->Get(id, caller);
  if (!job.ok()) {
    ReplyLater(std::move(reply), EncodeError(job.status()));
    return nullptr;
  }
  if (StateOf(**job) == JobState::kReady) {
    ReplyLater(std::move(reply), EncodeOk(JobBody(**job, SecretField::kInclude, JobState::kReady)));
    return nullptr;
  }
  size_t& mine = waits_per_uid_[caller];
  if (mine >= options_.max_waits_per_user) {
    ReplyLater(std::move(reply),
               EncodeError(Status::ResourceExhausted(
                   "you already have " + std::to_string(mine) +
                   " waits pending, the most one user may have ([broker] max_waits_per_user = " +
                   std::to_string(options_.max_waits_per_user) + ")")));
    if (mine == 0) waits_per_uid_.erase(caller);
    return nullptr;
  }
  auto timer = loop::Timer::Create(*loop_);
  if (!timer.ok()) {
    if (mine == 0) waits_per_uid_.erase(caller);
    ReplyLater(std::move(reply), EncodeError(timer.status()));
    return nullptr;
  }
  ++mine;
  // A job whose probe gave up is probed again for as long as someone waits for it; one never
  // seen listening is waiting again meanwhile (one that went down from ready stays down).
  if (!probes_.contains(id)) {
    if (!(*job)->ready) down_.erase(id);
    StartProbe(**job);
  }
  auto waiter = std::make_unique<Waiter>();
  Waiter* w = waiter.get();
  w->serial = next_waiter_++;
  w->uid = caller;
  w->reply = std::move(reply);
  w->timer = std::move(timer).value();
  std::string what = "job " + id + ": nothing accepted connections on " + (*job)->host + ":" +
                     std::to_string((*job)->port) + " within " + std::to_string(timeout_ms / 1000) +
                     "s";
  w->timer->Start(timeout_ms, [this, id, serial = w->serial, what] {
    std::unique_ptr<Waiter> self = TakeWaiter(id, serial);
    if (self) self->reply(EncodeError(Status::Timeout(what)));
    // `self` (and the running timer's owner) dies here; nothing touches it after
  });
  waiters_.emplace(id, std::move(waiter));
  return lifetime_.Guard([this, id, serial = w->serial] {
    if (TakeWaiter(id, serial)) {
      LOG_DEBUG("job %s: a wait was cancelled: its client went away", id.c_str());
    }
  });
}

std::unique_ptr<Broker::Waiter> Broker::TakeWaiter(const std::string& id, uint64_t serial) {
  auto range = waiters_.equal_range(id);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second->serial != serial) continue;
    std::unique_ptr<Waiter> w = std::move(it->second);
    waiters_.erase(it);
    auto count = waits_per_uid_.find(w->uid);
    if (count != waits_per_uid_.end() && --count->second == 0) waits_per_uid_.erase(count);
    return w;
  }
  return nullptr;
}

void Broker::ReleaseWaiters(const std::string& id, const Status& status) {
  auto range = waiters_.equal_range(id);
  std::vector<std::unique_ptr<Waiter>> released;
  for (auto it = range.first; it != range.second; ++it) released.push_back(std::move(it->second));
  waiters_.erase(range.first, range.second);
  if (released.empty()) return;
  for (const auto& w : released) {
    auto count = waits_per_uid_.find(w->uid);
    if (count != waits_per_uid_.end() && --count->second == 0) waits_per_uid_.erase(count);
  }
  std::string line;
  if (status.ok()) {
    const Job* job = registry_->Find(id);
    line = job ? EncodeOk(JobBody(*job, SecretField::kInclude, StateOf(*job)))
               : EncodeError(Status::NotFound("job " + id + " is gone"));
  } else {
    line = EncodeError(status);
  }
  for (auto& w : released) w->reply(line);
}

void Broker::AddStats(cJSON* stats, uid_t caller) {
  // Root sees the totals; a user sees their own.
  size_t waits = 0;
  size_t probes = 0;
  if (caller == 0) {
    waits = waiters_.size();
    probes = probes_.size();
  } else {
    auto it = waits_per_uid_.find(caller);
    waits = it == waits_per_uid_.end() ? 0 : it->second;
    for (const auto& [id, probe] : probes_) {
      const Job* job = registry_->Find(id);
      if (job && job->owner == caller) ++probes;
    }
  }
  cJSON_AddNumberToObject(stats, "waits", static_cast<double>(waits));
  cJSON_AddNumberToObject(stats, "probes", static_cast<double>(probes));
  store_->AddStats(stats);
}

void Broker::Forget(const std::string& id, const Status& waiter_status) {
  probes_.erase(id);
  down_.erase(id);
  reprobe_not_before_.erase(id);
  ReleaseWaiters(id, waiter_status);
}

void Broker::SweepExpired() {
  if (sweeping_) return;
  std::vector<std::string> ids = registry_->Expired(clock_());
  if (ids.empty()) return;
  sweeping_ = true;
  auto removed = std::make_shared<std::vector<Job>>();
  store_->Commit(
      [this, ids, removed]() -> Result<Store::Undo> {
        removed->clear();  // a shared store may run this again
        int64_t now = clock_();
        for (const auto& id : ids) {
          const Job* job = registry_->Find(id);
          if (!job || job->expires == 0 || job->expires > now) continue;  // changed meanwhile
          removed->push_back(*job);
          registry_->Erase(id);
        }
        return Store::Undo([this, removed] {
          for (const auto& job : *removed) registry_->Put(job);
        });
      },
      lifetime_.Guard([this, removed](Status s) {
        sweeping_ = false;
        if (!s.ok()) return;  // logged by the store; retried on the next sweep
        for (const auto& job : *removed) {
          LOG_INFO("job %s expired", job.id.c_str());
          job_deadlines_.erase(job.id);
          Forget(job.id, Status::NotFound("job " + job.id + " expired"));
        }
      }));
}

void Broker::RecheckNext() {
  const auto interval = static_cast<uint64_t>(options_.recheck_interval_ms);
  if (recheck_next_ >= recheck_round_.size()) {
    // A new round: the jobs ready now, one every interval / count, so hundreds of jobs do not
    // all see a connection at once. Jobs saved meanwhile wait for the next round.
    recheck_round_.clear();
    recheck_next_ = 0;
    for (const Job* job : registry_->All()) {
      if (StateOf(*job) == JobState::kReady) recheck_round_.push_back(job->id);
    }
    if (recheck_round_.empty()) {
      recheck_timer_->Start(interval, [this] { RecheckNext(); });
      return;
    }
  }
  const std::string id = recheck_round_[recheck_next_++];
  const Job* job = registry_->Find(id);
  if (job && StateOf(*job) == JobState::kReady && !probes_.contains(id)) {
    StartProbe(*job, /*recheck=*/true);
  }
  uint64_t step = std::max<uint64_t>(interval / recheck_round_.size(), 1);
  recheck_timer_->Start(step, [this] { RecheckNext(); });
}

void Broker::OnBackendDial(const std::string& id, uint64_t generation, bool connected) {
  const Job* job = registry_->Find(id);
  if (!job || registry_->Generation(id) != generation) return;  // another record now
  if (connected) {
    // As good as a probe: the dial passed the same owner check. OnProbeResult() drops the
    // probe and the down mark at once, so a flood of connections acts once.
    if (down_.contains(id) || (!job->ready && probes_.contains(id))) {
      LOG_INFO("job %s: a proxied connection reached its backend", id.c_str());
      OnProbeResult(id, true);
    }
    return;
  }
  if (StateOf(*job) != JobState::kReady) return;  // already probed, or given up on
  MarkDown(*job, "refused a proxied connection");
}

void Broker::MarkDown(const Job& job, const char* why) {
  LOG_INFO("job %s: its backend %s:%d %s; down until it listens again", job.id.c_str(),
           job.host.c_str(), job.port, why);
  down_.insert(job.id);
  Probe* current = probes_.contains(job.id) ? probes_[job.id].get() : nullptr;
  if (current != nullptr && !current->recheck) return;  // already probing
  if (current != nullptr) {
    current->recheck = false;  // its result now decides; it goes on as a readiness probe
    return;
  }
  // Rate limit: whatever refuses how often, this job's probe starts at most once per holdoff.
  uint64_t now = loop_->Now();
  uint64_t& not_before = reprobe_not_before_[job.id];
  uint64_t delay = not_before > now ? not_before - now : 0;
  not_before = now + delay + static_cast<uint64_t>(options_.refusal_holdoff_ms);
  StartProbe(job, /*recheck=*/false, static_cast<int64_t>(delay));
}

void Broker::Reconcile() {
  // One pass at a time. Not listing_.active(): a token may stay active after its answer.
  if (reconciling_) return;
  reconciling_ = true;
  // Daemons sharing a store (several login nodes) take turns: one lease holder lists, for two
  // intervals, renewing it each pass; another takes over once the holder stops renewing.
  store_->Lease("reconcile", options_.reconcile_interval_ms * 2, lifetime_.Guard([this](bool mine) {
    if (!mine) {
      reconciling_ = false;
      return;
    }
    int64_t asked = clock_();
    int64_t max_age = options_.reconcile_interval_ms / 2;
    listing_ = scheduler_->List(max_age, [this, asked](Result<Scheduler::Table> table) {
      reconciling_ = false;
      OnListing(asked, std::move(table));
    });
  }));
}

void Broker::OnListing(int64_t asked, Result<std::shared_ptr<const JobTable>> table) {
  const char* name = SchedulerTypeName(scheduler_->type());
  if (!table.ok()) {
    // Nothing is removed on what the scheduler did not say; one line a minute at most.
    constexpr uint64_t kLogEveryMs = 60000;
    uint64_t now = loop_->Now();
    if (last_listing_error_log_ == 0 || now - last_listing_error_log_ >= kLogEveryMs) {
      last_listing_error_log_ = now;
      LOG_WARN("cannot check the registry against %s (nothing removed): %s", name,
               table.status().message().c_str());
    }
    return;
  }
  last_listing_error_log_ = 0;
  // A listing may be up to max_age old, plus the time of the call it joined: an entry saved
  // since then may have been checked on a newer one (its job started meanwhile), so it waits
  // for a later pass.
  int64_t listed_after =
      asked - (options_.reconcile_interval_ms / 2 + options_.scheduler_call_timeout_ms) / 1000 - 1;
  int64_t now = clock_();
  Changes changes;
  for (const Job* job : registry_->All()) {
    if (job->created >= listed_after) continue;
    std::string_view base = SchedulerJobPart(job->id);
    const SchedulerJob* sj = (*table)->Find(base);
    std::string reason = UnboundReason(sj, base, job->owner, name);
    if (!reason.empty()) {
      changes.gone.emplace_back(job->id, reason);
      changes.generations[job->id] = registry_->Generation(job->id);
      continue;
    }
    int64_t deadline = JobDeadline(*sj, options_.end_grace_s);
    if (deadline == 0) continue;
    // Lowered to the job's end; raised only where the expiry came from an earlier end (a
    // shorter --ttl stays).
    auto known = job_deadlines_.find(job->id);
    // (The registry counts the ttl from its commit, a moment after the deadline was noted.)
    bool from_deadline = known != job_deadlines_.end() && job->expires >= known->second &&
                         job->expires - known->second <= 60;
    bool lower = job->expires == 0 || job->expires > deadline;
    bool raise = from_deadline && job->expires < deadline;
    if ((lower || raise) && deadline > now) {
      changes.expires.emplace_back(job->id, deadline);
      changes.generations[job->id] = registry_->Generation(job->id);
    }
  }
  if (changes.gone.empty() && changes.expires.empty()) return;
  Apply(std::move(changes), nullptr);
}

void Broker::Apply(Changes changes, std::function<void(Status, std::vector<std::string>)> done) {
  auto shared = std::make_shared<Changes>(std::move(changes));
  auto removed = std::make_shared<std::vector<Job>>();
  auto old_expires = std::make_shared<std::vector<std::pair<std::string, int64_t>>>();
  store_->Commit(
      [this, shared, removed, old_expires]() -> Result<Store::Undo> {
        removed->clear();
        old_expires->clear();
        // Only what is still the entry that was decided on (a save may have replaced it).
        auto same = [&](const std::string& id) {
          auto g = shared->generations.find(id);
          return g == shared->generations.end() || registry_->Generation(id) == g->second;
        };
        for (const auto& [id, reason] : shared->gone) {
          const Job* job = registry_->Find(id);
          if (!job || !same(id)) continue;
          removed->push_back(*job);
          registry_->Erase(id);
        }
        for (const auto& [id, expires] : shared->expires) {
          const Job* job = registry_->Find(id);
          if (!job || !same(id)) continue;
          old_expires->emplace_back(id, job->expires);
          (void)registry_->SetExpires(id, expires);
        }
        return Store::Undo([this, removed, old_expires] {
          for (const auto& [id, expires] : *old_expires) (void)registry_->SetExpires(id, expires);
          for (const auto& job : *removed) registry_->Put(job);
        });
      },
      lifetime_.Guard([this, shared, removed, old_expires, done = std::move(done)](Status s) {
        std::vector<std::string> ids;
        if (!s.ok()) {
          // Logged by the store; the reconciler tries again on its next pass.
          if (done) done(s, std::move(ids));
          return;
        }
        std::unordered_map<std::string, std::string> reasons(shared->gone.begin(),
                                                             shared->gone.end());
        for (const auto& job : *removed) {
          LOG_INFO("removed job %s of uid %u: %s", job.id.c_str(), static_cast<unsigned>(job.owner),
                   reasons[job.id].c_str());
          job_deadlines_.erase(job.id);
          Forget(job.id, Status::NotFound("job " + job.id + " was removed: " + reasons[job.id]));
          ids.push_back(job.id);
        }
        for (const auto& [id, old] : *old_expires) {
          for (const auto& [id2, expires] : shared->expires) {
            if (id2 != id) continue;
            job_deadlines_[id] = expires;
            LOG_INFO("job %s now expires at %lld (its job's end time changed)", id.c_str(),
                     static_cast<long long>(expires));
          }
        }
        if (done) done(Status::OK(), std::move(ids));
      }));
}

void Broker::Epilog(const std::string& job_id, uid_t caller, Reply reply) {
  bool admin = caller == 0 || std::find(options_.admin_uids.begin(), options_.admin_uids.end(),
                                        caller) != options_.admin_uids.end();
  if (!admin) {
    LOG_WARN("refused epilog of job %s for uid %u: not an admin", job_id.c_str(),
             static_cast<unsigned>(caller));
    ReplyLater(std::move(reply),
               EncodeError(Status::PermissionDenied(
                   "only root and [scheduler] admin_uids may run epilog (it removes every "
                   "user's entries of a job)")));
    return;
  }
  // The job and its services ("12", "12.web"), under each name the scheduler knows it by.
  auto finish = [this, caller, reply = std::move(reply)](std::vector<std::string> bases) {
    Changes changes;
    for (const Job* job : registry_->All()) {
      for (const std::string& base : bases) {
        if (job->id == base || job->id.starts_with(base + ".")) {
          changes.gone.emplace_back(job->id,
                                    "its job ended (epilog by uid " + std::to_string(caller) + ")");
          changes.generations[job->id] = registry_->Generation(job->id);
          break;
        }
      }
    }
    if (changes.gone.empty()) {
      JsonPtr body = NewObject();
      cJSON_AddArrayToObject(body.get(), "removed");
      reply(EncodeOk(std::move(body)));
      return;
    }
    Apply(std::move(changes), [reply](Status s, std::vector<std::string> ids) {
      if (!s.ok()) {
        reply(EncodeError(s));
        return;
      }
      JsonPtr body = NewObject();
      cJSON* list = cJSON_AddArrayToObject(body.get(), "removed");
      for (const std::string& id : ids) cJSON_AddItemToArray(list, cJSON_CreateString(id.c_str()));
      reply(EncodeOk(std::move(body)));
    });
  };
  std::vector<std::string> bases{job_id};
  if (scheduler_ == nullptr) {
    loop_->Defer([finish = std::move(finish), bases]() mutable { finish(bases); });
    return;
  }
  uint64_t key = next_cert_job_++;
  // Any listing will do, however old: the job's names do not change. If there is none and the
  // scheduler cannot answer, the id as given is still removed.
  cert_jobs_[key] = scheduler_->List(
      options_.reconcile_interval_ms * 4,
      [this, key, bases, finish = std::move(finish)](Result<Scheduler::Table> table) mutable {
        auto f = std::move(finish);
        std::vector<std::string> names = std::move(bases);
        cert_jobs_.erase(key);
        if (table.ok()) {
          if (const SchedulerJob* sj = (*table)->Find(names.front())) {
            names.push_back(CanonicalJobId(sj->id));
            for (const std::string& a : sj->aliases) names.push_back(CanonicalJobId(a));
          }
        }
        f(std::move(names));
      });
}

void Broker::StartProbe(const Job& job, bool recheck, int64_t delay_ms) {
  auto timer = loop::Timer::Create(*loop_);
  if (!timer.ok()) {
    LOG_ERROR("cannot probe job %s: %s", job.id.c_str(), timer.status().ToString().c_str());
    return;
  }
  auto probe = std::make_unique<Probe>();
  probe->id = job.id;
  probe->host = job.host;
  probe->port = job.port;
  probe->owner = job.owner;
  probe->delay_ms = options_.probe_min_ms;
  if (options_.ready_timeout_ms > 0) {
    probe->give_up_at = loop_->Now() + static_cast<uint64_t>(options_.ready_timeout_ms);
  }
  probe->recheck = recheck;
  probe->timer = std::move(timer).value();
  Probe* p = probe.get();
  probes_[job.id] = std::move(probe);
  if (delay_ms > 0) {
    p->timer->Start(delay_ms, [this, p] { ProbeOnce(p); });
    return;
  }
  ProbeOnce(p);
}

void Broker::ProbeOnce(Probe* p) {
  auto retry = [this, p] {
    if (p->recheck) {
      // The one look at a ready job found nothing listening: the job is down and probed as a
      // waiting one is, from now on.
      const Job* job = registry_->Find(p->id);
      if (job == nullptr) {
        probes_.erase(p->id);  // frees *p: nothing may follow
        return;
      }
      p->recheck = false;
      if (options_.ready_timeout_ms > 0) {
        p->give_up_at = loop_->Now() + static_cast<uint64_t>(options_.ready_timeout_ms);
      }
      LOG_INFO(
          "job %s: its backend %s:%d did not accept the periodic re-check; down until it "
          "listens again",
          p->id.c_str(), p->host.c_str(), p->port);
      down_.insert(p->id);
    }
    // Past ready_timeout, and nobody waits for the job: stop dialling a backend that does not
    // come up (a user could otherwise keep the daemon dialling any host:port forever).
    if (p->give_up_at != 0 && loop_->Now() >= p->give_up_at && !waiters_.contains(p->id)) {
      std::string id = p->id;
      LOG_INFO(
          "job %s: nothing accepted connections on %s:%d within %llds; stopped probing "
          "(a wait or a new save probes again)",
          id.c_str(), p->host.c_str(), p->port,
          static_cast<long long>(options_.ready_timeout_ms / 1000));
      down_.insert(id);
      probes_.erase(id);  // frees *p: nothing may follow
      return;
    }
    p->conn.reset();
    p->timer->Start(p->delay_ms, [this, p] { ProbeOnce(p); });
    p->delay_ms = std::min(p->delay_ms * 2, options_.probe_max_ms);
  };
  p->resolve = loop::Resolve(
      *loop_, p->host, p->port,
      [this, p, retry](Result<std::vector<sockaddr_storage>> addrs) {
        if (!addrs.ok()) {
          retry();
          return;
        }
        const sockaddr_storage& addr = (*addrs)[p->attempt++ % addrs->size()];
        // A probe is a connection like any other: the policy holds, and until the right
        // user's service listens there, the job is not ready.
        if (backend_check_) {
          Status allowed = backend_check_(addr, p->owner, /*dialling=*/true);
          if (!allowed.ok()) {
            if (allowed.code() == Status::Code::kPermissionDenied && !p->refusal_logged) {
              p->refusal_logged = true;
              LOG_WARN("job %s: refused to probe its backend: %s", p->id.c_str(),
                       allowed.message().c_str());
            }
            retry();
            return;
          }
        }
        auto conn = loop::Tcp::Create(*loop_);
        if (!conn.ok()) {
          retry();
          return;
        }
        p->conn = std::move(conn).value();
        Status s =
            p->conn->Connect(reinterpret_cast<const sockaddr*>(&addr), [this, p, retry](Status s) {
              if (s.ok()) {
                OnProbeResult(p->id, true);  // frees *p: nothing may follow
                return;
              }
              retry();
            });
        if (!s.ok()) {
          retry();
          return;
        }
        // A backend that silently drops SYNs must not stall the probe forever.
        p->timer->Start(options_.probe_connect_timeout_ms, retry);
      },
      p->owner);
}

void Broker::OnProbeResult(const std::string& id_ref, bool listening) {
  std::string id = id_ref;  // the probe owning `id_ref` is about to go
  if (!listening) return;
  probes_.erase(id);
  bool was_down = down_.erase(id) > 0;
  const Job* current = registry_->Find(id);
  if (current != nullptr && current->ready) {
    // Seen listening before (a re-check, or a job back from down): nothing to persist.
    if (was_down) LOG_INFO("job %s is ready again", id.c_str());
    ReleaseWaiters(id, Status::OK());
    return;
  }
  store_->Commit(
      [this, id]() -> Result<Store::Undo> {
        const Job* job = registry_->Find(id);
        if (!job) return Status::NotFound("job " + id + " is gone");
        if (job->ready) return Store::Undo([] {});
        BP_RETURN_IF_ERROR(registry_->SetReady(id, true));
        return Store::Undo([this, id] { registry_->SetReady(id, false); });
      },
      lifetime_.Guard([this, id](Status s) {
        if (!s.ok()) {
          if (s.code() != Status::Code::kNotFound) {
            // Not durable yet: look again shortly rather than report a state we lost.
            const Job* job = registry_->Find(id);
            if (job && !job->ready) StartProbe(*job);
          }
          return;
        }
        LOG_INFO("job %s is ready", id.c_str());
        ReleaseWaiters(id, Status::OK());
      }));
}

}  // namespace brokerproxy::registry
