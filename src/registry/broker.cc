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

}  // namespace

Broker::Broker(loop::Loop* loop, Registry* registry, Store* store, Options options, Clock clock)
    : loop_(loop),
      registry_(registry),
      store_(store),
      options_(options),
      clock_(std::move(clock)) {}

Broker::~Broker() { *alive_ = false; }

Status Broker::Start() {
  auto t = loop::Timer::Create(*loop_);
  if (!t.ok()) return t.status();
  expiry_timer_ = std::move(t).value();
  expiry_timer_->Start(options_.expiry_check_ms, options_.expiry_check_ms,
                       [this] { SweepExpired(); });
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
      if (id_check_) {
        if (Status s = id_check_(req.job); !s.ok()) {
          ReplyLater(std::move(reply), EncodeError(s));
          return nullptr;
        }
      }
      // Refuse early what the commit would refuse anyway, before issuing a certificate.
      const Job* existing = registry_->Find(req.job);
      if (existing && existing->owner != caller && caller != 0) {
        ReplyLater(
            std::move(reply),
            EncodeError(Status::PermissionDenied("job " + req.job + " belongs to another user")));
        return nullptr;
      }
      if (existing && !req.save.replace) {
        ReplyLater(std::move(reply),
                   EncodeError(Status::AlreadyExists(AlreadySavedMessage(req.job))));
        return nullptr;
      }
      CheckBackend(std::move(req), caller, std::move(reply));
      return nullptr;
    }
    case Op::kLoad: {
      auto job = registry_->Get(req.job, caller);
      ReplyLater(std::move(reply),
                 job.ok() ? EncodeOk(JobBody(**job, SecretField::kInclude, StateOf(**job)))
                          : EncodeError(job.status()));
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
      for (const Job* job : registry_->List(caller)) {
        JobState state = StateOf(*job);
        Adopt(jobs, nullptr, JobToJson(*job, SecretField::kOmit, state));
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
                   [this, alive = std::weak_ptr<bool>(alive_), key, req = std::move(req), caller,
                    reply](Result<IssuedCert> cert) mutable {
                     if (alive.expired()) return;  // signing reports even after the broker went
                     cert_jobs_.erase(key);
                     if (!cert.ok()) {
                       reply(EncodeError(cert.status().WithContext("cannot issue a certificate")));
                       return;
                     }
                     Save(std::move(req), caller, std::move(reply), std::move(cert).value());
                   });
}

void Broker::Save(Request req, uid_t caller, Reply reply, std::optional<IssuedCert> cert) {
  // Every job starts waiting, whether or not the client waits for it: it is ready only once
  // something of its owner's listens on its backend.
  req.save.ready = false;
  auto saved = std::make_shared<Job>();
  auto replaced = std::make_shared<std::optional<Job>>();
  std::weak_ptr<bool> alive = alive_;
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
      [this, alive, saved, replaced, caller, cert = std::move(cert),
       reply = std::move(reply)](Status s) {
        if (alive.expired()) return;
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
      });
}

void Broker::Remove(const std::string& id, const std::string& if_secret, uid_t caller,
                    Reply reply) {
  auto removed = std::make_shared<Job>();
  std::weak_ptr<bool> alive = alive_;
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
      [this, alive, removed, caller, reply = std::move(reply)](Status s) {
        if (alive.expired()) return;
        if (!s.ok()) {
          reply(EncodeError(s));
          return;
        }
        LOG_INFO("removed job %s for uid %u", removed->id.c_str(), static_cast<unsigned>(caller));
        Forget(removed->id, Status::NotFound("job " + removed->id + " was removed"));
        reply(EncodeOk(JobBody(*removed, SecretField::kOmit, StateOf(*removed))));
      });
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
  std::weak_ptr<bool> alive = alive_;
  return [this, alive, id, serial = w->serial] {
    if (alive.expired()) return;
    if (TakeWaiter(id, serial)) {
      LOG_DEBUG("job %s: a wait was cancelled: its client went away", id.c_str());
    }
  };
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
  std::weak_ptr<bool> alive = alive_;
  store_->Commit(
      [this, ids, removed]() -> Result<Store::Undo> {
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
      [this, alive, removed](Status s) {
        if (alive.expired()) return;
        sweeping_ = false;
        if (!s.ok()) return;  // logged by the store; retried on the next sweep
        for (const auto& job : *removed) {
          LOG_INFO("job %s expired", job.id.c_str());
          Forget(job.id, Status::NotFound("job " + job.id + " expired"));
        }
      });
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
  std::weak_ptr<bool> alive = alive_;
  store_->Commit(
      [this, id]() -> Result<Store::Undo> {
        const Job* job = registry_->Find(id);
        if (!job) return Status::NotFound("job " + id + " is gone");
        if (job->ready) return Store::Undo([] {});
        BP_RETURN_IF_ERROR(registry_->SetReady(id, true));
        return Store::Undo([this, id] { registry_->SetReady(id, false); });
      },
      [this, alive, id](Status s) {
        if (alive.expired()) return;
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
      });
}

}  // namespace brokerproxy::registry
