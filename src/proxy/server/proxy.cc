#include "proxy/server/proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>

#include "loop/log.h"
#include "loop/sock_diag.h"
#include "loop/stream.h"
#include "loop/work.h"
#include "proxy/server/session.h"

namespace brokerproxy::proxy {
namespace {

// The address part of `peer` ("1.2.3.4", "::1"), IPv4-mapped IPv6 shown as IPv4.
std::string HostOf(const sockaddr_storage& peer) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (peer.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&peer)->sin_addr, buf, sizeof(buf));
  } else if (peer.ss_family == AF_INET6) {
    const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(&peer)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(&a)) {
      inet_ntop(AF_INET, &a.s6_addr[12], buf, sizeof(buf));
    } else {
      inet_ntop(AF_INET6, &a, buf, sizeof(buf));
    }
  }
  return buf;
}

}  // namespace

// ---- Connection ----

Connection::Connection(Proxy* proxy, const sockaddr_storage& peer)
    : proxy_(proxy), peer_{}, started_ms_(proxy->loop()->Now()), accepted_ns_(uv_hrtime()) {
  // The listeners are TCP: IPv4 or IPv6.
  std::memcpy(&peer_, &peer,
              peer.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
}

double Connection::SecondsSinceAccept() const {
  return static_cast<double>(uv_hrtime() - accepted_ns_) / 1e9;
}

std::string Connection::PeerString() const { return loop::FormatAddress(peer()); }

// ---- Proxy ----

Proxy::Proxy(loop::Loop* loop, const registry::Registry* registry, ProxyOptions options)
    : loop_(loop),
      registry_(registry),
      options_(std::move(options)),
      throttle_(options_.throttle_failures, static_cast<uint64_t>(options_.throttle_window_ms)),
      pipes_(options_.pipe_size, options_.pipe_pool),
      resolver_(loop, 30000),
      policy_(options_.backend_allow) {}

Proxy::~Proxy() {
  for (const auto& [addr, fd] : inherited_) ::close(fd);
  lifetime_.End();
  Stop();
  graveyard_.clear();
}

Status Proxy::Start() {
  auto reactor = loop::Reactor::Create(*loop_);
  if (!reactor.ok()) return reactor.status();
  reactor_ = std::move(reactor).value();
  auto dt = loop::Timer::Create(*loop_);
  if (!dt.ok()) return dt.status();
  deadline_timer_ = std::move(dt).value();
  auto st = loop::Timer::Create(*loop_);
  if (!st.ok()) return st.status();
  sweep_timer_ = std::move(st).value();
  sweep_timer_->Start(options_.sweep_interval_ms, options_.sweep_interval_ms, [this] { Sweep(); });
  // Local clients are told apart by sock_diag at every connection (SourceKey); its socket is
  // taken now. Without it they all share one source, which is not a reason not to serve.
  if (Status s = loop::OpenSockDiag(); !s.ok()) LOG_WARN("proxy: %s", s.ToString().c_str());
  std::vector<std::pair<HostPort, int>> inherited = std::move(inherited_);
  inherited_.clear();
  Status status;
  for (const HostPort& addr : options_.listen) {
    if (std::find(listener_specs_.begin(), listener_specs_.end(), addr) != listener_specs_.end()) {
      continue;  // listed twice
    }
    auto it = std::find_if(inherited.begin(), inherited.end(),
                           [&](const auto& p) { return p.first == addr; });
    Result<std::unique_ptr<Listener>> l = Status::Internal("not listening");
    if (it != inherited.end()) {
      l = Listener::Adopt(
          reactor_.get(), it->second, options_.keepalive_s,
          [this](int fd, const sockaddr_storage& peer) { OnAccept(fd, peer); },
          [this] { stats_.global().busy++; }, std::string(ErrorReply(ErrorCode::kBusy)));
      inherited.erase(it);
      if (l.ok()) LOG_INFO("proxy listening on %s (handed over)", (*l)->address().c_str());
    } else {
      l = Listen(addr, options_.keepalive_s);
    }
    if (!l.ok()) {
      status = l.status();
      break;
    }
    listeners_.push_back(std::move(l).value());
    listener_specs_.push_back(addr);
  }
  for (const auto& [addr, fd] : inherited) {
    LOG_INFO("proxy: %s is no longer listed; its handed-over socket is closed",
             addr.ToString().c_str());
    ::close(fd);
  }
  BP_RETURN_IF_ERROR(status);
  return UpdateOwnListeners();
}

std::vector<std::pair<HostPort, int>> Proxy::DupListeners() const {
  std::vector<std::pair<HostPort, int>> out;
  for (size_t i = 0; i < listeners_.size(); ++i) {
    int fd = ::fcntl(listeners_[i]->fd(), F_DUPFD, 3);  // without FD_CLOEXEC
    if (fd >= 0) out.emplace_back(listener_specs_[i], fd);
  }
  return out;
}

void Proxy::StopListening() {
  listeners_.clear();
  listener_specs_.clear();
}

Result<std::unique_ptr<Listener>> Proxy::Listen(const HostPort& addr, int keepalive_s) {
  auto l = Listener::Create(
      reactor_.get(), addr, keepalive_s,
      [this](int fd, const sockaddr_storage& peer) { OnAccept(fd, peer); },
      [this] { stats_.global().busy++; }, std::string(ErrorReply(ErrorCode::kBusy)));
  if (l.ok()) LOG_INFO("proxy listening on %s", (*l)->address().c_str());
  return l;
}

Status Proxy::UpdateOwnListeners() {
  std::vector<sockaddr_storage> bound;
  for (const auto& l : listeners_) {
    auto hp = ParseHostPort(l->address());
    auto addr = hp.ok() ? loop::ParseNumericAddress(hp->host, hp->port) : std::nullopt;
    if (!addr) return Status::Internal("cannot parse the bound address " + l->address());
    bound.push_back(*addr);
  }
  policy_.set_own_listeners(std::move(bound));
  return Status::OK();
}

Status Proxy::Reconfigure(ProxyOptions o) {
  auto listed = [](const std::vector<HostPort>& list, const HostPort& a) {
    return std::find(list.begin(), list.end(), a) != list.end();
  };
  // New addresses first: if one cannot be bound, nothing has changed yet.
  std::vector<std::unique_ptr<Listener>> added;
  std::vector<HostPort> added_specs;
  for (const HostPort& addr : o.listen) {
    if (listed(listener_specs_, addr) || listed(added_specs, addr)) continue;
    auto l = Listen(addr, o.keepalive_s);
    if (!l.ok()) return l.status().WithContext("listen " + addr.ToString());
    added.push_back(std::move(l).value());
    added_specs.push_back(addr);
  }
  for (size_t i = listeners_.size(); i-- > 0;) {
    if (listed(o.listen, listener_specs_[i])) {
      listeners_[i]->SetKeepalive(o.keepalive_s);
      continue;
    }
    LOG_INFO("proxy no longer listening on %s", listeners_[i]->address().c_str());
    listeners_.erase(listeners_.begin() + static_cast<std::ptrdiff_t>(i));
    listener_specs_.erase(listener_specs_.begin() + static_cast<std::ptrdiff_t>(i));
  }
  for (size_t i = 0; i < added.size(); ++i) {
    listeners_.push_back(std::move(added[i]));
    listener_specs_.push_back(added_specs[i]);
  }
  o.pipe_size = options_.pipe_size;
  o.pipe_pool = options_.pipe_pool;
  options_ = std::move(o);
  throttle_.set_limits(options_.throttle_failures,
                       static_cast<uint64_t>(options_.throttle_window_ms));
  policy_ = BackendPolicy(options_.backend_allow);
  return UpdateOwnListeners();
}

void Proxy::Stop() {
  listeners_.clear();
  listener_specs_.clear();
  std::vector<Connection*> open;
  for (auto& [id, c] : connections_) open.push_back(c.get());
  for (Connection* c : open) c->Close("shutdown");
  sweep_timer_.reset();
  deadline_timer_.reset();
}

std::vector<std::string> Proxy::addresses() const {
  std::vector<std::string> out;
  for (const auto& l : listeners_) out.push_back(l->address());
  return out;
}

void Proxy::set_frontend(Protocol protocol, Frontend frontend) {
  frontends_[static_cast<int>(protocol)] = std::move(frontend);
}

void Proxy::OnAccept(int fd, const sockaddr_storage& peer) {
  GlobalCounters& g = stats_.global();
  g.accepted++;
  auto refuse = [&] {
    g.busy++;
    SendBestEffort(fd, ErrorReply(ErrorCode::kBusy));
    CloseGracefully(fd);
  };
  if (connections_.size() + channel_slots_ >= static_cast<size_t>(options_.max_connections)) {
    refuse();
    return;
  }
  // Every `ssh -L` user arrives from 127.0.0.1: the owner of the client socket tells them
  // apart, so that one local user's failures or handshakes never count against another's. That
  // takes a sock_diag round trip, made only when an answer depends on it: a failure to count,
  // or this cap, which no source can reach while fewer handshakes than it are in progress at
  // all. From there on every local client is looked up at once, as are those still unknown.
  std::string source;
  bool unknown = false;
  if (!IsLoopback(peer)) {
    source = "addr:" + HostOf(peer);
  } else if (options_.max_handshakes_per_source > 0 &&
             handshakes_.size() >= static_cast<size_t>(options_.max_handshakes_per_source)) {
    LookUpHandshakeSources();
    if (std::optional<uid_t> uid = LoopbackPeerUid(fd, &peer))
      source = "uid:" + std::to_string(*uid);
  } else {
    unknown = true;
  }
  if (!source.empty() && options_.max_handshakes_per_source > 0) {
    auto it = handshakes_by_source_.find(source);
    if (it != handshakes_by_source_.end() && it->second >= options_.max_handshakes_per_source) {
      // This source's own handshakes fill its share: only it waits.
      refuse();
      return;
    }
  }
  // All handshakes together never take more than their share of max_connections: the oldest
  // one still in progress makes room (with handshake_timeout, a silent one was doomed anyway).
  size_t share = std::max<size_t>(
      1, static_cast<size_t>(options_.max_connections) * options_.handshake_share / 100);
  if (handshakes_.size() >= share) {
    g.busy++;
    handshakes_.begin()->second->Close("handshake evicted: too many handshakes in progress");
  }
  auto io = reactor_->Add(fd, nullptr);
  if (!io.ok()) {
    LOG_WARN("proxy: %s", io.status().ToString().c_str());
    return;
  }
  auto session = std::make_unique<Session>(this, std::move(io).value(), peer);
  Session* raw = session.get();
  raw->source_ = std::move(source);
  raw->source_unknown_ = unknown;
  Adopt(std::move(session));
  StartHandshake(raw);
  raw->Start();
}

const std::string& Proxy::Source(Connection* conn, int fd) {
  if (!conn->source_unknown_) return conn->source_;
  conn->source_unknown_ = false;
  if (conn->pending_) --handshakes_unknown_;
  if (fd < 0) fd = conn->handshake_fd();
  sockaddr_storage peer{};
  std::memcpy(&peer, conn->peer(), sizeof(Connection::Peer));
  std::optional<uid_t> uid = fd >= 0 ? LoopbackPeerUid(fd, &peer) : std::nullopt;
  if (!uid) return conn->source_;  // unknown after all (e.g. the client closed already)
  conn->source_ = "uid:" + std::to_string(*uid);
  if (conn->pending_) ++handshakes_by_source_[conn->source_];
  return conn->source_;
}

void Proxy::LookUpHandshakeSources() {
  if (handshakes_unknown_ == 0) return;
  for (const auto& [id, conn] : handshakes_) Source(conn);
}

void Proxy::StartHandshake(Connection* conn) {
  if (conn->pending_) return;
  conn->pending_ = true;
  handshakes_.emplace(conn->id_, conn);
  if (conn->source_unknown_) ++handshakes_unknown_;
  if (!conn->source_.empty()) ++handshakes_by_source_[conn->source_];
}

void Proxy::EndHandshake(Connection* conn) {
  if (!conn->pending_) return;
  conn->pending_ = false;
  handshakes_.erase(conn->id_);
  if (conn->source_unknown_) --handshakes_unknown_;
  if (conn->source_.empty()) return;
  auto it = handshakes_by_source_.find(conn->source_);
  if (it != handshakes_by_source_.end() && --it->second <= 0) handshakes_by_source_.erase(it);
}

bool Proxy::TakeChannelSlot() {
  if (connections_.size() + channel_slots_ >= static_cast<size_t>(options_.max_connections)) {
    stats_.global().busy++;
    return false;
  }
  ++channel_slots_;
  return true;
}

void Proxy::ReturnChannelSlot() {
  if (channel_slots_ > 0) --channel_slots_;
}

Connection* Proxy::Adopt(std::unique_ptr<Connection> conn) {
  Connection* raw = conn.get();
  raw->id_ = next_id_++;
  connections_.emplace(raw->id_, std::move(conn));
  stats_.global().active = connections_.size();
  return raw;
}

void Proxy::Retire(Connection* conn) {
  if (conn->retired_) return;
  conn->retired_ = true;
  ClearDeadline(conn);
  EndHandshake(conn);
  auto it = connections_.find(conn->id_);
  if (it == connections_.end()) return;
  graveyard_.push_back(std::move(it->second));
  connections_.erase(it);
  stats_.global().active = connections_.size();
  if (reap_scheduled_) return;
  reap_scheduled_ = true;
  loop_->Defer(lifetime_.Guard([this] {
    reap_scheduled_ = false;
    graveyard_.clear();
  }));
}

bool Proxy::HandOff(Protocol protocol, loop::IoHandle client, Connection& from) {
  // The frontends hold the socket their own way: their source is settled before they start.
  Source(&from, client.fd());
  sockaddr_storage peer{};
  std::memcpy(&peer, from.peer(), sizeof(Connection::Peer));
  auto it = frontends_.find(static_cast<int>(protocol));
  if (it == frontends_.end()) {
    // Not enabled: best-effort answer in the only language every client shares here.
    int fd = client.Release();
    SendBestEffort(fd, ErrorReply(ErrorCode::kBadRequest));
    CloseGracefully(fd);
    return false;
  }
  client->SetCallback(nullptr);
  std::unique_ptr<Connection> conn =
      it->second(this, Handoff{std::move(client), peer, from.accepted_ns()});
  if (conn) {
    conn->source_ = from.source_;
    Connection* raw = Adopt(std::move(conn));
    StartHandshake(raw);  // `from` stops counting when it retires, right after this
  }
  return true;
}

Proxy::Authorization Proxy::Authorize(const std::string& requested_id, const std::string& secret,
                                      Connection* conn) {
  Authorization out;
  uint64_t now = ThrottleNow();
  // "ABC" is job "abc": one throttle key and one counter per job, however it is spelt.
  const std::string job_id = registry::CanonicalJobId(requested_id);
  // Callers pass only well-formed ids (the preamble parser, the SSH endpoint check first); this
  // keeps a throttle key from ever being made of anything else.
  bool valid_id = registry::ValidJobId(job_id);
  const registry::Job* known = valid_id ? registry_->Find(job_id) : nullptr;
  const registry::Job* job = registry_->Authenticate(job_id, secret);
  if (!registry_->refusal().empty()) {
    // The view of a shared registry is too old to trust (registry/redis_store.h): nobody is
    // admitted and nobody is counted as failing, so the throttle does not lock out the owners
    // of jobs once the view is current again.
    ++stale_refusals_;
    uint64_t now_ms = loop_->Now();
    if (stale_logged_at_ == 0 || now_ms - stale_logged_at_ >= 10000) {
      LOG_WARN("refused %llu handshake(s) (the last for job %s): %s",
               static_cast<unsigned long long>(stale_refusals_), LogSafe(job_id).c_str(),
               registry_->refusal().c_str());
      stale_refusals_ = 0;
      stale_logged_at_ = now_ms;
    }
    out.error = ErrorCode::kUnavailable;
    return out;
  }
  if (job && job->expires != 0 && job->expires <= static_cast<int64_t>(::time(nullptr))) {
    job = nullptr;  // expired, about to be swept
  }
  if (job) {
    // The secret is checked before the throttle: whoever knows it is never turned away, so
    // nobody can lock a job's owner out by failing on purpose.
    EndHandshake(conn);
    out.target.job_id = job->id;
    out.target.type = job->type;
    out.target.host = job->host;
    out.target.port = job->port;
    out.target.owner = job->owner;
    out.target.generation = registry_->Generation(job->id);
    return out;
  }
  std::string job_key = valid_id ? "job:" + job_id : std::string();
  const std::string& source = Source(conn);
  bool throttled = (!job_key.empty() && throttle_.Blocked(job_key, now)) ||
                   (!source.empty() && throttle_.Blocked(source, now));
  if (throttled) {
    stats_.global().throttled++;
  } else {
    stats_.global().denied++;
  }
  if (known) stats_.job(job_id).denied++;
  if (!job_key.empty() && throttle_.RecordFailure(job_key, now)) {
    stats_.global().throttled_episodes++;
    LOG_WARN("throttling job %s: %d failed handshakes within %s", LogSafe(job_id).c_str(),
             options_.throttle_failures, FormatDuration(options_.throttle_window_ms).c_str());
  }
  if (!source.empty() && throttle_.RecordFailure(source, now)) LogThrottled(source);
  out.error = throttled ? ErrorCode::kBusy : ErrorCode::kDenied;
  return out;
}

void Proxy::RecordSourceFailure(Connection& conn, const char* what) {
  LOG_DEBUG("proxy: failed handshake from %s: %s", conn.PeerString().c_str(), what);
  const std::string& source = Source(&conn);
  if (source.empty()) return;
  if (throttle_.RecordFailure(source, ThrottleNow())) LogThrottled(source);
}

void Proxy::LogThrottled(const std::string& source_key) {
  stats_.global().throttled_episodes++;
  std::string window = FormatDuration(options_.throttle_window_ms);
  if (source_key.starts_with("addr:")) {
    // One line per episode, in a form fail2ban can match: "throttling <HOST>: ...". Nothing a
    // peer sends can produce this phrase: every peer-chosen string is logged through LogSafe,
    // which leaves no spaces or line breaks in it.
    LOG_WARN("throttling %s: %d failed handshakes within %s", source_key.c_str() + 5,
             options_.throttle_failures, window.c_str());
  } else {
    // A local user: not an address a firewall could ban.
    LOG_WARN("throttling local user %s: %d failed handshakes within %s",
             source_key.c_str() + source_key.find(':') + 1, options_.throttle_failures,
             window.c_str());
  }
}

bool Proxy::StillCurrent(const Target& target) const {
  const registry::Job* job = registry_->Find(target.job_id);
  return job != nullptr && job->owner == target.owner &&
         registry_->Generation(target.job_id) == target.generation;
}

void Proxy::OnJobChanged(const std::string& id) {
  std::vector<Connection*> open;
  for (auto& [cid, c] : connections_) open.push_back(c.get());
  for (Connection* c : open) {
    if (!c->retired_) c->OnJobChanged(id);
  }
}

void Proxy::SetDeadline(Connection* conn, uint64_t at_ms) {
  if (conn->has_deadline_) deadlines_.erase(conn->deadline_);
  conn->deadline_ = deadlines_.emplace(at_ms, conn);
  conn->has_deadline_ = true;
  RearmDeadlineTimer();
}

void Proxy::DialBackend(Connection* conn, const Target& target, std::unique_ptr<Dialer>* dialer,
                        Dialer::Callback cb, bool may_complete_inline) {
  ArmDeadline(conn, options_.connect_timeout_ms);
  *dialer = NewDialer(target);
  (*dialer)->Dial(target.host, target.port, std::move(cb), may_complete_inline);
}

std::unique_ptr<Dialer> Proxy::NewDialer(const Target& target) {
  auto dialer = std::make_unique<Dialer>(reactor(), resolver());
  dialer->set_resolve_group(target.owner);
  dialer->set_tuning(options_.keepalive_s);  // a client socket inherits the listener's
  // One log line per dial, even if the name resolved to several refused addresses.
  dialer->set_check([this, job = target.job_id, owner = target.owner,
                     logged = false](const sockaddr_storage& a) mutable {
    Status s = policy_.CheckDial(a, owner);
    if (!s.ok() && !logged) {
      logged = true;
      LOG_WARN("job %s: refused to connect to its backend: %s", job.c_str(), s.message().c_str());
    }
    return s;
  });
  dialer->set_observer(
      [this, job = target.job_id, generation = target.generation](bool connected, bool refused) {
        if (dial_observer_ && (connected || refused)) dial_observer_(job, generation, connected);
      });
  return dialer;
}

ErrorCode Proxy::DialFailed(const Status& status) {
  if (status.code() == Status::Code::kResourceExhausted) {
    stats_.global().busy++;
    return ErrorCode::kBusy;
  }
  stats_.global().unavailable++;
  return ErrorCode::kUnavailable;
}

void Proxy::ArmDeadline(Connection* conn, int64_t timeout_ms) {
  if (timeout_ms > 0) {
    SetDeadline(conn, loop_->Now() + static_cast<uint64_t>(timeout_ms));
  } else {
    ClearDeadline(conn);
  }
}

void Proxy::ClearDeadline(Connection* conn) {
  if (!conn->has_deadline_) return;
  deadlines_.erase(conn->deadline_);
  conn->has_deadline_ = false;
}

void Proxy::RearmDeadlineTimer() {
  if (deadlines_.empty() || !deadline_timer_) return;
  uint64_t first = deadlines_.begin()->first;
  if (deadline_timer_->active() && deadline_timer_at_ <= first) return;
  uint64_t now = loop_->Now();
  deadline_timer_at_ = first;
  deadline_timer_->Start(first > now ? first - now : 0, [this] { OnDeadlineTimer(); });
}

void Proxy::OnDeadlineTimer() {
  uint64_t now = loop_->Now();
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    Connection* c = deadlines_.begin()->second;
    deadlines_.erase(deadlines_.begin());
    c->has_deadline_ = false;
    c->OnDeadline();
  }
  RearmDeadlineTimer();
}

void Proxy::Sweep() {
  uint64_t now = loop_->Now();
  std::vector<Connection*> open;
  open.reserve(connections_.size());
  for (auto& [id, c] : connections_) open.push_back(c.get());
  for (Connection* c : open) {
    if (!c->retired_) c->OnSweep(now);
  }
  throttle_.Sweep(ThrottleNow());
  stats_.Prune([this](const std::string& id) { return registry_->Find(id) != nullptr; });
}

void Proxy::AddStats(cJSON* stats, uid_t caller) {
  stats_.AddToJson(stats, [this, caller](const std::string& id) {
    if (caller == 0) return true;
    const registry::Job* job = registry_->Find(id);
    return job && job->owner == caller;
  });
}

}  // namespace brokerproxy::proxy
