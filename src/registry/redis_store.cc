#include "registry/redis_store.h"

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <netdb.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "loop/log.h"
#include "registry/snapshot.h"

namespace brokerproxy::registry {
namespace {

// The one write: checks every touched job's revision and every claimed port, then writes,
// bumps P:rev and publishes. KEYS: P:jobs, P:ports, P:rev. ARGV: channel, first and last port
// of the range, n, then n groups of (op "P"/"D", id, expected revision ("0": absent), claimed
// port ("0": none), hex sealed record).
constexpr char kCommitScript[] = R"lua(
local jobs, ports, revkey = KEYS[1], KEYS[2], KEYS[3]
local first, last, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function current(id)
  local v = redis.call('HGET', jobs, id)
  if not v then return '0', nil end
  local rev, port = string.match(v, '^(%d+):(%d+):')
  return rev, tonumber(port)
end
local changed, claims, conflicts = {}, {}, {}
for k = 0, n - 1 do changed[ARGV[5 + 5 * k + 1]] = true end
for k = 0, n - 1 do
  local b = 5 + 5 * k
  local op, id, expected, port = ARGV[b], ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  if current(id) ~= expected then table.insert(conflicts, id) end
  if op == 'P' and port >= first and port <= last then
    local holder = redis.call('HGET', ports, tostring(port))
    if claims[port] or (holder and holder ~= id and not changed[holder]) then
      table.insert(conflicts, id)
    end
    claims[port] = true
  end
end
if #conflicts > 0 then return {'conflict', unpack(conflicts)} end
local rev = redis.call('INCR', revkey)
local msg = {tostring(rev)}
for k = 0, n - 1 do
  local id = ARGV[5 + 5 * k + 1]
  local _, old = current(id)
  if old and old > 0 and redis.call('HGET', ports, tostring(old)) == id then
    redis.call('HDEL', ports, tostring(old))
  end
end
for k = 0, n - 1 do
  local b = 5 + 5 * k
  local op, id, port, blob = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 3]), ARGV[b + 4]
  if op == 'P' then
    local v = tostring(rev) .. ':' .. tostring(port) .. ':' .. blob
    redis.call('HSET', jobs, id, v)
    if port >= first and port <= last then redis.call('HSET', ports, tostring(port), id) end
    table.insert(msg, 'P ' .. id .. ' ' .. v)
  else
    redis.call('HDEL', jobs, id)
    table.insert(msg, 'D ' .. id)
  end
end
redis.call('PUBLISH', ARGV[1], table.concat(msg, '\n'))
return {'ok', rev}
)lua";

// Everything at one instant: {revision, {id, value, ...}, key check ("" if unset)}.
// KEYS: P:rev, P:jobs, P:keycheck.
constexpr char kDumpScript[] =
    "return {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[2]), "
    "redis.call('GET', KEYS[3]) or ''}";

// KEYS: P:lease:NAME. ARGV: this daemon's id, ttl in ms. 1 if the lease is (now) this daemon's.
constexpr char kLeaseScript[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end "
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
    "return 0";

constexpr char kKeyCheckText[] = "brokerproxy store key check";
constexpr char kKeyCheckAad[] = "keycheck";
constexpr int kMaxAttempts = 32;
constexpr int64_t kMaxBackoffMs = 5000;
constexpr size_t kMaxMessageBytes = 64u << 20;

std::string Sha1Hex(std::string_view text) {
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest);
  return HexEncode(std::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

bool ParseU64(std::string_view s, uint64_t* out) {
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

std::string_view ReplyText(const redisReply* r) {
  if (r == nullptr || r->str == nullptr) return {};
  return std::string_view(r->str, r->len);
}

bool IsString(const redisReply* r) {
  return r != nullptr && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS);
}

// "unix:/path" or "host:port" (the last ':' splits; "[v6]:port" loses its brackets).
struct Endpoint {
  std::string unix_path;
  std::string host;
  int port = 0;
};

Result<Endpoint> ParseEndpoint(std::string_view address) {
  Endpoint e;
  if (address.starts_with("unix:")) {
    e.unix_path = std::string(address.substr(5));
    if (e.unix_path.empty()) return Status::InvalidArgument("empty unix socket path");
    return e;
  }
  size_t colon = address.rfind(':');
  if (colon == std::string_view::npos || colon == 0) {
    return Status::InvalidArgument("\"" + std::string(address) +
                                   "\" is neither unix:PATH nor host:port");
  }
  std::string_view host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  uint64_t port = 0;
  if (!ParseU64(address.substr(colon + 1), &port) || port == 0 || port > 65535) {
    return Status::InvalidArgument("bad port in \"" + std::string(address) + "\"");
  }
  e.host = std::string(host);
  e.port = static_cast<int>(port);
  return e;
}

// A host name becomes its first address (blocking: start-up only), since hiredis would
// resolve it on the loop thread at every connect.
Result<std::string> ResolveEndpoint(const std::string& address) {
  auto e = ParseEndpoint(address);
  if (!e.ok()) return e.status();
  if (!e->unix_path.empty()) return address;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(e->host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Status::InvalidArgument("cannot resolve " + e->host + ": " + gai_strerror(rc));
  }
  char ip[NI_MAXHOST];
  rc = ::getnameinfo(res->ai_addr, res->ai_addrlen, ip, sizeof(ip), nullptr, 0, NI_NUMERICHOST);
  ::freeaddrinfo(res);
  if (rc != 0) return Status::InvalidArgument("cannot resolve " + e->host);
  return std::string(ip) + ":" + std::to_string(e->port);
}

// Start-up only: a blocking connection with timeouts.
using SyncContext = std::unique_ptr<redisContext, decltype(&redisFree)>;
using SyncReply = std::unique_ptr<redisReply, decltype(&freeReplyObject)>;

Result<SyncContext> SyncConnect(const std::string& address, int64_t timeout_ms) {
  auto e = ParseEndpoint(address);
  if (!e.ok()) return e.status();
  timeval tv{static_cast<time_t>(timeout_ms / 1000),
             static_cast<suseconds_t>(timeout_ms % 1000 * 1000)};
  redisContext* c = e->unix_path.empty() ? redisConnectWithTimeout(e->host.c_str(), e->port, tv)
                                         : redisConnectUnixWithTimeout(e->unix_path.c_str(), tv);
  SyncContext ctx(c, &redisFree);
  if (c == nullptr) return Status::StoreUnavailable("out of memory");
  if (c->err != 0) return Status::StoreUnavailable(c->errstr);
  redisSetTimeout(c, tv);
  return ctx;
}

SyncReply SyncCommand(redisContext* c, const std::vector<std::string>& argv) {
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  for (const auto& a : argv) {
    ptrs.push_back(a.data());
    lens.push_back(a.size());
  }
  void* r = redisCommandArgv(c, static_cast<int>(argv.size()), ptrs.data(), lens.data());
  return SyncReply(static_cast<redisReply*>(r), &freeReplyObject);
}

Status ReplyError(const redisContext* c, const redisReply* r) {
  if (r == nullptr) return Status::StoreUnavailable(c->err != 0 ? c->errstr : "no reply");
  if (r->type == REDIS_REPLY_ERROR) return Status::StoreUnavailable(std::string(ReplyText(r)));
  return Status::OK();
}

// The job as it is, ready and expiry aside (those change without making it another job).
bool SameIdentity(const Job& a, Job b) {
  b.ready = a.ready;
  b.expires = a.expires;
  return a == b;
}

}  // namespace

// A pending reply: whom to tell, for which connection epoch.
struct RedisStore::Call {
  RedisStore* store = nullptr;
  uint64_t epoch = 0;
  bool persistent = false;  // the subscription: called for every message, owned by the store
  std::function<void(redisReply*)> fn;
};

RedisStore::RedisStore(loop::Loop* loop, Registry* registry, Sealer sealer, Options options)
    : loop_(loop),
      registry_(registry),
      sealer_(std::move(sealer)),
      options_(std::move(options)),
      script_sha_(Sha1Hex(kCommitScript)) {
  unsigned char id[12];
  if (RAND_bytes(id, sizeof(id)) == 1) {
    node_id_ = HexEncode(std::string_view(reinterpret_cast<const char*>(id), sizeof(id)));
  } else {
    node_id_ = std::to_string(::getpid()) + "-" + std::to_string(::time(nullptr));
  }
  sub_call_ = std::make_unique<Call>();
  sub_call_->store = this;
  sub_call_->persistent = true;
}

RedisStore::~RedisStore() {
  closing_ = true;
  for (redisAsyncContext** c : {&cmd_, &sub_, &sentinel_}) {
    redisAsyncContext* ctx = std::exchange(*c, nullptr);
    if (ctx != nullptr) redisAsyncFree(ctx);
  }
  registry_->set_track_changes(false);
}

std::string RedisStore::Name() const {
  if (!options_.master_name.empty()) {
    return "redis master \"" + options_.master_name + "\" (Sentinels " + options_.address + ")";
  }
  return "redis at " + options_.address;
}

Result<std::unique_ptr<RedisStore>> RedisStore::Open(loop::Loop* loop, Registry* registry,
                                                     Sealer sealer, Options options) {
  std::string name = options.master_name.empty() ? "redis at " + options.address
                                                 : "redis master \"" + options.master_name +
                                                       "\" (Sentinels " + options.address + ")";
  auto fail = [&name](const Status& s) {
    return Status::FromCode(s.code(), "registry store " + name + ": " + s.message());
  };
  std::vector<std::string> targets;
  {
    std::string_view rest = options.address;
    while (!rest.empty()) {
      size_t comma = rest.find(',');
      std::string_view part = rest.substr(0, comma);
      while (!part.empty() && part.front() == ' ') part.remove_prefix(1);
      while (!part.empty() && part.back() == ' ') part.remove_suffix(1);
      if (!part.empty()) {
        auto resolved = ResolveEndpoint(std::string(part));
        if (!resolved.ok()) return fail(resolved.status());
        targets.push_back(*resolved);
      }
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
  }
  if (targets.empty()) return fail(Status::InvalidArgument("store_address is empty"));
  if (options.master_name.empty() && targets.size() > 1) {
    return fail(Status::InvalidArgument(
        "store_address lists several addresses: set store_master_name to use them as Sentinels"));
  }
  std::unique_ptr<RedisStore> store(
      new RedisStore(loop, registry, std::move(sealer), std::move(options)));
  if (!store->options_.master_name.empty()) {
    store->sentinels_ = targets;
  } else {
    store->options_.address = targets.front();
  }

  // Find the master (through the Sentinels), connect, check the key, load the jobs.
  std::string master = targets.front();
  if (!store->sentinels_.empty()) {
    master.clear();
    std::string errors;
    for (const std::string& s : store->sentinels_) {
      auto ctx = SyncConnect(s, store->options_.connect_timeout_ms);
      if (!ctx.ok()) {
        errors += " " + s + ": " + ctx.status().message() + ";";
        continue;
      }
      SyncReply r = SyncCommand(
          ctx->get(), {"SENTINEL", "get-master-addr-by-name", store->options_.master_name});
      if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && IsString(r->element[0]) &&
          IsString(r->element[1])) {
        master =
            std::string(ReplyText(r->element[0])) + ":" + std::string(ReplyText(r->element[1]));
        break;
      }
      errors += " " + s + ": names no master \"" + store->options_.master_name + "\";";
    }
    if (master.empty()) return fail(Status::StoreUnavailable("no Sentinel answered:" + errors));
  }
  auto ctx = SyncConnect(master, store->options_.connect_timeout_ms);
  if (!ctx.ok()) return fail(ctx.status());
  redisContext* c = ctx->get();
  if (!store->options_.password.empty()) {
    SyncReply r = SyncCommand(c, {"AUTH", store->options_.password});
    Status s = ReplyError(c, r.get());
    if (!s.ok()) return fail(s.WithContext("AUTH (store_password_file)"));
  }
  const std::string& p = store->options_.prefix;
  SyncReply dump =
      SyncCommand(c, {"EVAL", kDumpScript, "3", p + ":rev", p + ":jobs", p + ":keycheck"});
  BP_RETURN_IF_ERROR(fail(ReplyError(c, dump.get())));
  if (dump->type != REDIS_REPLY_ARRAY || dump->elements != 3) {
    return fail(Status::Corruption("unexpected reply to the load script"));
  }
  if (ReplyText(dump->element[2]).empty()) {
    // A fresh store: this key seals it. SET NX, then read back what won (two first nodes).
    auto check = store->sealer_.Seal(kKeyCheckText, kKeyCheckAad);
    if (!check.ok()) return check.status();
    SyncReply set = SyncCommand(c, {"SET", p + ":keycheck", HexEncode(*check), "NX"});
    BP_RETURN_IF_ERROR(fail(ReplyError(c, set.get())));
    dump = SyncCommand(c, {"EVAL", kDumpScript, "3", p + ":rev", p + ":jobs", p + ":keycheck"});
    BP_RETURN_IF_ERROR(fail(ReplyError(c, dump.get())));
    if (dump->type != REDIS_REPLY_ARRAY || dump->elements != 3) {
      return fail(Status::Corruption("unexpected reply to the load script"));
    }
  }
  Status s = store->ApplyDump(dump.get());
  if (!s.ok()) return fail(s);
  store->current_address_ = master;
  store->registry_->set_track_changes(true);
  return store;
}

Status RedisStore::CheckKey(const redisReply* keycheck) const {
  std::string_view hex = ReplyText(keycheck);
  if (hex.empty()) return Status::OK();  // an emptied store: set again on the next start
  auto sealed = HexDecode(hex);
  if (sealed.ok()) {
    auto text = sealer_.Open(*sealed, kKeyCheckAad);
    if (text.ok() && *text == kKeyCheckText) return Status::OK();
  }
  return Status::PermissionDenied(
      "store_key_file is not the key this store's jobs are sealed with (" + options_.prefix +
      ":keycheck does not open under it); every login node must use the same key file");
}

Status RedisStore::Start() {
  auto reconnect = loop::Timer::Create(*loop_);
  if (!reconnect.ok()) return reconnect.status();
  reconnect_timer_ = std::move(reconnect).value();
  auto step = loop::Timer::Create(*loop_);
  if (!step.ok()) return step.status();
  step_timer_ = std::move(step).value();
  auto tick = loop::Timer::Create(*loop_);
  if (!tick.ok()) return tick.status();
  tick_timer_ = std::move(tick).value();
  auto interval = static_cast<uint64_t>(options_.ping_interval_ms);
  tick_timer_->Start(interval, interval, [this] { Tick(); });
  Connect();
  return Status::OK();
}

// ---- Connections ----

void RedisStore::Connect() {
  ++epoch_;
  state_ = State::kConnecting;
  if (sentinels_.empty()) {
    ConnectTo(options_.address);
  } else {
    AskSentinel(0);
  }
}

void RedisStore::AskSentinel(size_t index) {
  if (index >= sentinels_.size()) {
    Lost("no Sentinel named a master \"" + options_.master_name + "\"");
    return;
  }
  sentinel_index_ = index;
  LOG_DEBUG("registry store: asking Sentinel %s for the master", sentinels_[index].c_str());
  auto e = ParseEndpoint(sentinels_[index]);
  if (!e.ok()) {
    AskSentinel(index + 1);
    return;
  }
  redisAsyncContext* c = e->unix_path.empty() ? redisAsyncConnect(e->host.c_str(), e->port)
                                              : redisAsyncConnectUnix(e->unix_path.c_str());
  if (c == nullptr || c->err != 0 || redisLibuvAttach(c, loop_->get()) != REDIS_OK) {
    if (c != nullptr) redisAsyncFree(c);
    AskSentinel(index + 1);
    return;
  }
  c->data = this;
  redisAsyncSetConnectCallback(c, &RedisStore::OnConnect);
  redisAsyncSetDisconnectCallback(c, &RedisStore::OnDisconnect);
  sentinel_ = c;
  Send(c, {"SENTINEL", "get-master-addr-by-name", options_.master_name},
       [this, index](redisReply* r) {
         step_timer_->Stop();
         redisAsyncContext* done = std::exchange(sentinel_, nullptr);
         if (done != nullptr) redisAsyncFree(done);  // inside its callback: freed after it
         if (r != nullptr && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
             IsString(r->element[0]) && IsString(r->element[1])) {
           ConnectTo(std::string(ReplyText(r->element[0])) + ":" +
                     std::string(ReplyText(r->element[1])));
           return;
         }
         AskSentinel(index + 1);
       });
  // hiredis's libuv adapter drops a poll error (a refused connection) without telling the
  // context, so every step of a connection has a deadline of its own.
  step_timer_->Start(static_cast<uint64_t>(options_.connect_timeout_ms), [this, index] {
    ++epoch_;  // the freed context's callbacks must not move on a second time
    redisAsyncContext* c = std::exchange(sentinel_, nullptr);
    if (c != nullptr) redisAsyncFree(c);
    AskSentinel(index + 1);
  });
}

void RedisStore::ConnectTo(const std::string& address) {
  LOG_DEBUG("registry store: connecting to %s", address.c_str());
  current_address_ = address;
  auto e = ParseEndpoint(address);
  if (!e.ok()) {
    Lost(e.status().message());
    return;
  }
  for (redisAsyncContext** slot : {&cmd_, &sub_}) {
    redisAsyncContext* c = e->unix_path.empty() ? redisAsyncConnect(e->host.c_str(), e->port)
                                                : redisAsyncConnectUnix(e->unix_path.c_str());
    if (c == nullptr || c->err != 0 || redisLibuvAttach(c, loop_->get()) != REDIS_OK) {
      std::string why = c != nullptr && c->err != 0 ? c->errstr : "cannot create a connection";
      if (c != nullptr) redisAsyncFree(c);
      Lost(why);
      return;
    }
    c->data = this;
    redisAsyncSetConnectCallback(c, &RedisStore::OnConnect);
    redisAsyncSetDisconnectCallback(c, &RedisStore::OnDisconnect);
    *slot = c;
    if (!options_.password.empty()) {
      Send(c, {"AUTH", options_.password}, [this](redisReply* r) {
        if (r == nullptr || r->type == REDIS_REPLY_ERROR) {
          Lost("AUTH refused (store_password_file): " + std::string(ReplyText(r)));
        }
      });
    }
  }
  // The subscription first: once it stands, a dump misses nothing.
  sub_call_->epoch = epoch_;
  sub_call_->fn = [this](redisReply* r) {
    if (r == nullptr || r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
    std::string_view kind = ReplyText(r->element[0]);
    if (kind == "subscribe") {
      Resync([this](Status s) {
        if (!s.ok()) {
          if (s.code() == Status::Code::kPermissionDenied) LOG_ERROR("%s", s.message().c_str());
          Lost(s.message());
          return;
        }
        bool was_stale = !registry_->refusal().empty();
        step_timer_->Stop();
        state_ = State::kConnected;
        lost_at_ = 0;
        stale_logged_ = false;
        backoff_ms_ = 100;
        registry_->set_refusal("");
        std::string where = sentinels_.empty() ? "" : ", master at " + current_address_;
        LOG_INFO("registry store %s: in sync (%zu job(s), revision %llu%s)%s", Name().c_str(),
                 registry_->size(), static_cast<unsigned long long>(synced_rev_), where.c_str(),
                 was_stale ? "; handshakes are served again" : "");
        DrainMessages();
        StartBatch();
      });
    } else if (kind == "message") {
      OnMessage(std::string(ReplyText(r->element[2])));
    }
  };
  std::string channel = options_.prefix + ":changes";
  const char* argv[] = {"SUBSCRIBE", channel.c_str()};
  size_t lens[] = {9, channel.size()};
  redisAsyncCommandArgv(sub_, &RedisStore::OnReply, sub_call_.get(), 2, argv, lens);
  step_timer_->Start(static_cast<uint64_t>(options_.connect_timeout_ms), [this] {
    Lost("no connection to " + current_address_ + " within " +
         std::to_string(options_.connect_timeout_ms) + " ms");
  });
}

void RedisStore::Send(redisAsyncContext* c, const std::vector<std::string>& argv,
                      std::function<void(redisReply*)> fn) {
  auto call = std::make_unique<Call>();
  call->store = this;
  call->epoch = epoch_;
  call->fn = std::move(fn);
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  for (const auto& a : argv) {
    ptrs.push_back(a.data());
    lens.push_back(a.size());
  }
  if (redisAsyncCommandArgv(c, &RedisStore::OnReply, call.get(), static_cast<int>(argv.size()),
                            ptrs.data(), lens.data()) != REDIS_OK) {
    // Not queued (the connection is going away): answer on a later turn, never inside.
    loop_->Defer([this, e = epoch_, fn = std::move(call->fn)] {
      if (e == epoch_) fn(nullptr);
    });
    return;
  }
  call.release();  // owned by hiredis until OnReply
}

void RedisStore::Command(const std::vector<std::string>& argv,
                         std::function<void(redisReply*)> fn) {
  if (cmd_ == nullptr) {
    loop_->Defer([this, e = epoch_, fn = std::move(fn)] {
      if (e == epoch_) fn(nullptr);
    });
    return;
  }
  Send(cmd_, argv, std::move(fn));
}

void RedisStore::OnReply(redisAsyncContext* /*c*/, void* reply, void* privdata) {
  auto* call = static_cast<Call*>(privdata);
  std::unique_ptr<Call> owned(call->persistent ? nullptr : call);
  RedisStore* self = call->store;
  if (self->closing_ || call->epoch != self->epoch_) return;
  call->fn(static_cast<redisReply*>(reply));
}

void RedisStore::OnConnect(const redisAsyncContext* c, int status) {
  auto* self = static_cast<RedisStore*>(c->data);
  if (status == REDIS_OK || self->closing_) return;
  // hiredis frees `c` after this callback.
  std::string why = c->errstr;
  if (c == self->sentinel_) {
    self->sentinel_ = nullptr;
    ++self->epoch_;  // its pending question is answered with nothing next: ignore that
    self->AskSentinel(self->sentinel_index_ + 1);
    return;
  }
  if (c == self->cmd_) self->cmd_ = nullptr;
  if (c == self->sub_) self->sub_ = nullptr;
  self->Lost("cannot connect to " + self->current_address_ + ": " + why);
}

void RedisStore::OnDisconnect(const redisAsyncContext* c, int /*status*/) {
  auto* self = static_cast<RedisStore*>(c->data);
  if (self->closing_) return;
  if (c == self->sentinel_) {
    self->sentinel_ = nullptr;
    return;
  }
  if (c != self->cmd_ && c != self->sub_) return;  // one we let go of
  if (c == self->cmd_) self->cmd_ = nullptr;
  if (c == self->sub_) self->sub_ = nullptr;
  self->Lost("the connection to " + self->current_address_ + " closed");
}

void RedisStore::Lost(const std::string& why) {
  if (closing_) return;
  ++epoch_;
  bool was_connected = state_ == State::kConnected;
  if (state_ != State::kDisconnected) {
    if (was_connected) {
      LOG_WARN(
          "registry store %s: %s; reconnecting. Saves and removes fail until it is back; "
          "handshakes go on from the last synced view for up to %llds",
          Name().c_str(), why.c_str(), static_cast<long long>(options_.max_view_age_ms / 1000));
    } else {
      LOG_DEBUG("registry store %s: %s", Name().c_str(), why.c_str());
    }
  }
  last_error_ = why;
  state_ = State::kDisconnected;
  if (lost_at_ == 0) lost_at_ = loop_->Now();
  ping_sent_at_ = 0;
  held_messages_.clear();
  if (step_timer_) step_timer_->Stop();
  for (auto& [serial, answer] : leases_) {
    loop_->Defer([answer = std::move(answer)] { answer(false); });
  }
  leases_.clear();
  for (redisAsyncContext** slot : {&cmd_, &sub_, &sentinel_}) {
    redisAsyncContext* c = std::exchange(*slot, nullptr);
    if (c != nullptr) redisAsyncFree(c);
  }
  Status unavailable = Status::StoreUnavailable("registry store " + Name() + " is unreachable (" +
                                                why + "); nothing was changed");
  if (!in_flight_.empty()) {
    // The script may or may not have run: the resync after reconnecting shows which.
    FinishBatch(unavailable, /*undo=*/true);
  }
  writing_ = false;
  std::deque<Entry> waiting;
  waiting.swap(queue_);
  for (auto& e : waiting) {
    loop_->Defer([done = std::move(e.done), unavailable] { done(unavailable); });
  }
  ScheduleReconnect();
}

void RedisStore::ScheduleReconnect() {
  if (!reconnect_timer_) return;  // not started (Open failed half-way)
  int64_t delay = backoff_ms_;
  backoff_ms_ = std::min(backoff_ms_ * 2, kMaxBackoffMs);
  reconnect_timer_->Start(static_cast<uint64_t>(delay), [this] { Connect(); });
}

void RedisStore::Tick() {
  uint64_t now = loop_->Now();
  if (state_ == State::kConnected) {
    auto interval = static_cast<uint64_t>(options_.ping_interval_ms);
    if (ping_sent_at_ != 0 && now - ping_sent_at_ > 3 * interval) {
      Lost("no answer to PING for " + std::to_string(now - ping_sent_at_) + " ms");
      return;
    }
    if (ping_sent_at_ == 0) {
      ping_sent_at_ = now;
      Command({"PING"}, [this](redisReply* r) {
        if (r != nullptr) ping_sent_at_ = 0;
      });
    }
    return;
  }
  if (lost_at_ != 0 && options_.max_view_age_ms > 0 &&
      now - lost_at_ > static_cast<uint64_t>(options_.max_view_age_ms) && !stale_logged_) {
    stale_logged_ = true;
    std::string why = "the registry view is older than store_max_view_age (" +
                      std::to_string(options_.max_view_age_ms / 1000) + "s): registry store " +
                      Name() + " has been unreachable since then";
    LOG_WARN("%s; new connections are refused until it is back", why.c_str());
    registry_->set_refusal(why);
  }
}

void RedisStore::Resync(std::function<void(Status)> then) {
  ++resyncs_;
  const std::string& p = options_.prefix;
  Command({"EVAL", kDumpScript, "3", p + ":rev", p + ":jobs", p + ":keycheck"},
          [this, then = std::move(then)](redisReply* r) {
            if (r == nullptr) {
              then(Status::StoreUnavailable("the connection closed during a resync"));
              return;
            }
            if (r->type == REDIS_REPLY_ERROR) {
              then(Status::StoreUnavailable(std::string(ReplyText(r))));
              return;
            }
            then(ApplyDump(r));
          });
}

// ---- The view ----

Result<Job> RedisStore::OpenRecord(const std::string& id, std::string_view value,
                                   uint64_t* rev) const {
  size_t a = value.find(':');
  size_t b = a == std::string_view::npos ? a : value.find(':', a + 1);
  if (b == std::string_view::npos || !ParseU64(value.substr(0, a), rev)) {
    return Status::Corruption("record of " + id + " is malformed");
  }
  auto sealed = HexDecode(value.substr(b + 1));
  if (!sealed.ok()) return Status::Corruption("record of " + id + " is malformed");
  auto plain = sealer_.Open(*sealed, id);
  if (!plain.ok()) return plain.status().WithContext("record of " + id);
  auto jobs = DecodeSnapshot(*plain);
  if (!jobs.ok()) return jobs.status().WithContext("record of " + id);
  if (jobs->size() != 1 || (*jobs)[0].id != id) {
    return Status::Corruption("record of " + id + " holds another job");
  }
  return std::move((*jobs)[0]);
}

Status RedisStore::ApplyDump(const redisReply* r) {
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
      r->element[1]->type != REDIS_REPLY_ARRAY || r->element[1]->elements % 2 != 0) {
    return Status::Corruption("unexpected reply to the load script");
  }
  BP_RETURN_IF_ERROR(CheckKey(r->element[2]));
  if (ReplyText(r->element[2]).empty() && cmd_ != nullptr) {
    // The store lost its data (no AOF?): mark it with this key again.
    auto check = sealer_.Seal(kKeyCheckText, kKeyCheckAad);
    if (check.ok()) {
      Command({"SET", options_.prefix + ":keycheck", HexEncode(*check), "NX"}, [](redisReply*) {});
    }
  }
  uint64_t rev = 0;
  if (!ParseU64(ReplyText(r->element[0]), &rev)) {
    return Status::Corruption(options_.prefix + ":rev is not a number");
  }
  const redisReply* pairs = r->element[1];
  std::unordered_map<std::string, Rev> fresh;
  for (size_t i = 0; i + 1 < pairs->elements; i += 2) {
    std::string id(ReplyText(pairs->element[i]));
    std::string_view value = ReplyText(pairs->element[i + 1]);
    uint64_t job_rev = 0;
    size_t colon = value.find(':');
    if (colon == std::string_view::npos || !ParseU64(value.substr(0, colon), &job_rev)) {
      LOG_ERROR("registry store %s: record of %s is malformed; ignored", Name().c_str(),
                id.c_str());
      continue;
    }
    fresh[id] = {job_rev, true};
    auto known = revs_.find(id);
    if (known != revs_.end() && known->second.present && known->second.rev == job_rev &&
        registry_->Find(id) != nullptr) {
      continue;  // unchanged
    }
    auto job = OpenRecord(id, value, &job_rev);
    if (!job.ok()) {
      // A wrong key was refused above: this record alone is damaged.
      LOG_ERROR("registry store %s: %s; ignored", Name().c_str(), job.status().ToString().c_str());
      fresh.erase(id);
      continue;
    }
    (void)ApplyJob(std::move(job).value());
  }
  for (const Job* job : registry_->All()) {
    if (!fresh.contains(job->id)) RemoveJob(std::string(job->id));
  }
  revs_.swap(fresh);
  synced_rev_ = rev;
  last_rev_ = std::max(last_rev_, rev);
  (void)registry_->TakeTouched();
  return Status::OK();
}

void RedisStore::ApplyRecord(const std::string& id, uint64_t rev, const std::string* value) {
  if (rev <= synced_rev_) return;  // the last dump had it already
  last_rev_ = std::max(last_rev_, rev);
  Rev& known = revs_[id];
  if (rev <= known.rev) return;  // this daemon's own change, or older than what it holds
  if (value == nullptr) {
    RemoveJob(id);
    known = {rev, false};
    return;
  }
  uint64_t job_rev = 0;
  auto job = OpenRecord(id, *value, &job_rev);
  if (!job.ok()) {
    LOG_ERROR("registry store %s: %s; ignored", Name().c_str(), job.status().ToString().c_str());
    return;
  }
  if (ApplyJob(std::move(job).value())) known = {rev, true};
}

bool RedisStore::ApplyJob(Job job) {
  std::string id = job.id;
  const Job* current = registry_->Find(id);
  if (current != nullptr && SameIdentity(*current, job)) {
    (void)registry_->SetReady(id, job.ready);
    (void)registry_->SetExpires(id, job.expires);
    return true;
  }
  bool replaced = current != nullptr;
  Status s = registry_->Put(std::move(job));
  if (!s.ok()) {
    LOG_ERROR("registry store %s: %s", Name().c_str(), s.ToString().c_str());
    return false;
  }
  if (replaced) NotifyRemote(id);
  return true;
}

void RedisStore::RemoveJob(const std::string& id) {
  if (registry_->Find(id) == nullptr) return;
  registry_->Erase(id);
  NotifyRemote(id);
}

void RedisStore::NotifyRemote(const std::string& id) {
  if (!remote_observer_) return;
  // Later, never inside: the observer may look at the registry, which is mid-update here.
  loop_->Defer([observer = remote_observer_, id] { observer(id); });
}

void RedisStore::OnMessage(const std::string& payload) {
  if (writing_ || state_ != State::kConnected) {
    held_messages_.push_back(payload);
    return;
  }
  if (payload.size() > kMaxMessageBytes) return;
  std::string_view rest = payload;
  size_t nl = rest.find('\n');
  uint64_t rev = 0;
  if (!ParseU64(rest.substr(0, nl), &rev)) return;
  while (nl != std::string_view::npos) {
    rest.remove_prefix(nl + 1);
    nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    if (line.size() < 3 || line[1] != ' ') continue;
    std::string_view body = line.substr(2);
    size_t sp = body.find(' ');
    std::string id(body.substr(0, sp));
    if (line[0] == 'D') {
      ApplyRecord(id, rev, nullptr);
    } else if (line[0] == 'P' && sp != std::string_view::npos) {
      std::string value(body.substr(sp + 1));
      ApplyRecord(id, rev, &value);
    }
  }
  (void)registry_->TakeTouched();
}

void RedisStore::DrainMessages() {
  std::vector<std::string> held;
  held.swap(held_messages_);
  for (const std::string& m : held) OnMessage(m);
}

// ---- Commits ----

void RedisStore::Commit(Mutation mutation, Done done) {
  // Right after start-up the view is fresh (Open loaded it) while the connection is still
  // being made: such changes wait for it. Once it was lost, they fail at once.
  bool first_connect = state_ == State::kConnecting && lost_at_ == 0;
  if (state_ != State::kConnected && !writing_ && !first_connect) {
    Status s = Status::StoreUnavailable("registry store " + Name() + " is unreachable (" +
                                        last_error_ + "); nothing was changed");
    loop_->Defer([done = std::move(done), s] { done(s); });
    return;
  }
  queue_.push_back({std::move(mutation), std::move(done), 0});
  StartBatch();
}

void RedisStore::StartBatch() {
  if (writing_ || queue_.empty()) return;
  if (state_ != State::kConnected) return;  // Lost() answered them
  (void)registry_->TakeTouched();
  while (!queue_.empty()) {
    Entry e = std::move(queue_.front());
    queue_.pop_front();
    Result<Undo> undo = e.mutation();
    if (!undo.ok()) {
      loop_->Defer([done = std::move(e.done), s = undo.status()] { done(s); });
      continue;
    }
    in_flight_.push_back({std::move(e), std::move(undo).value()});
  }
  std::vector<std::string> ids = registry_->TakeTouched();
  if (in_flight_.empty()) return;
  if (ids.empty()) {  // nothing changed (e.g. already ready): nothing to write
    std::vector<Applied> batch;
    batch.swap(in_flight_);
    for (auto& a : batch) loop_->Defer([done = std::move(a.entry.done)] { done(Status::OK()); });
    return;
  }
  const std::string& p = options_.prefix;
  const PortRange& range = registry_->options().ports;
  std::vector<std::string> argv{"EVALSHA",
                                script_sha_,
                                "3",
                                p + ":jobs",
                                p + ":ports",
                                p + ":rev",
                                p + ":changes",
                                std::to_string(range.first),
                                std::to_string(range.last),
                                std::to_string(ids.size())};
  batch_revs_.clear();
  for (const std::string& id : ids) {
    auto known = revs_.find(id);
    bool present = known != revs_.end() && known->second.present;
    std::string expected = present ? std::to_string(known->second.rev) : "0";
    const Job* job = registry_->Find(id);
    if (job == nullptr) {
      argv.insert(argv.end(), {"D", id, expected, "0", ""});
    } else {
      auto sealed = sealer_.Seal(EncodeSnapshot({job}), id);
      if (!sealed.ok()) {
        writing_ = true;
        FinishBatch(sealed.status(), /*undo=*/true);
        return;
      }
      argv.insert(argv.end(),
                  {"P", id, expected, std::to_string(job->port_allocated ? job->port : 0),
                   HexEncode(*sealed)});
    }
    batch_revs_.push_back({id, {0, job != nullptr}});
  }
  writing_ = true;
  write_started_ns_ = uv_hrtime();
  SendBatch(std::move(argv), /*use_eval=*/false);
}

void RedisStore::SendBatch(std::vector<std::string> argv, bool use_eval) {
  if (use_eval) {
    argv[0] = "EVAL";
    argv[1] = kCommitScript;
  }
  auto shared = std::make_shared<std::vector<std::string>>(std::move(argv));
  Command(*shared, [this, shared](redisReply* r) {
    if (r != nullptr && r->type == REDIS_REPLY_ERROR && ReplyText(r).starts_with("NOSCRIPT") &&
        (*shared)[0] == "EVALSHA") {
      SendBatch(std::move(*shared), /*use_eval=*/true);
      return;
    }
    OnBatchReply(r);
  });
}

void RedisStore::OnBatchReply(redisReply* r) {
  if (r == nullptr) {
    Lost("the connection closed during a change");
    return;
  }
  if (r->type == REDIS_REPLY_ERROR) {
    std::string msg(ReplyText(r));
    if (msg.starts_with("READONLY")) {
      Lost("the server is a read-only replica now");  // fails the batch
      return;
    }
    FinishBatch(
        Status::StoreUnavailable("registry store " + Name() + " refused the change: " + msg),
        /*undo=*/true);
    return;
  }
  if (r->type != REDIS_REPLY_ARRAY || r->elements < 1) {
    FinishBatch(Status::Internal("unexpected reply from the registry store"), /*undo=*/true);
    return;
  }
  std::string_view kind = ReplyText(r->element[0]);
  if (kind == "ok" && r->elements == 2 && r->element[1]->type == REDIS_REPLY_INTEGER) {
    auto rev = static_cast<uint64_t>(r->element[1]->integer);
    for (auto& [id, known] : batch_revs_) revs_[id] = {rev, known.present};
    last_rev_ = std::max(last_rev_, rev);
    ++commits_;
    if (options_.replicas <= 0) {
      FinishBatch(Status::OK(), /*undo=*/false);
      return;
    }
    Command({"WAIT", std::to_string(options_.replicas), std::to_string(options_.wait_timeout_ms)},
            [this](redisReply* w) {
              if (w == nullptr) return;  // Lost() answered the batch
              long long got = w->type == REDIS_REPLY_INTEGER ? w->integer : -1;
              if (got >= options_.replicas) {
                FinishBatch(Status::OK(), /*undo=*/false);
                return;
              }
              // Applied on the master (and published), but not yet as durable as asked.
              FinishBatch(Status::StoreUnavailable(
                              "registry store " + Name() + " took the change but only " +
                              std::to_string(std::max(got, 0LL)) + " of " +
                              std::to_string(options_.replicas) +
                              " replica(s) (store_replicas) confirmed it in time: a failover "
                              "now could lose it"),
                          /*undo=*/false);
            });
    return;
  }
  if (kind == "conflict") {
    // Another node changed these jobs (or took a port) since this view saw them: undo, load
    // the truth, run the same mutations again.
    ++conflicts_;
    std::vector<Applied> batch;
    batch.swap(in_flight_);
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) it->undo();
    (void)registry_->TakeTouched();
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
      Entry e = std::move(it->entry);
      if (++e.attempts >= kMaxAttempts) {
        loop_->Defer([done = std::move(e.done)] {
          done(Status::Unavailable(
              "the jobs kept changing on other login nodes during this change; try again"));
        });
        continue;
      }
      queue_.push_front(std::move(e));
    }
    Resync([this](Status s) {
      writing_ = false;
      if (!s.ok()) {
        Lost(s.message());
        return;
      }
      DrainMessages();
      StartBatch();
    });
    return;
  }
  FinishBatch(Status::Internal("unexpected reply from the registry store"), /*undo=*/true);
}

void RedisStore::FinishBatch(Status status, bool undo) {
  std::vector<Applied> batch;
  batch.swap(in_flight_);
  writing_ = false;
  if (write_started_ns_ != 0) {
    write_seconds_.Observe(static_cast<double>(uv_hrtime() - write_started_ns_) / 1e9);
    write_started_ns_ = 0;
  }
  if (undo) {
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) it->undo();
    (void)registry_->TakeTouched();
  }
  if (!status.ok()) {
    ++write_failures_;
    LOG_WARN("registry store: %zu change(s) %s: %s", batch.size(),
             undo ? "undone" : "not confirmed", status.message().c_str());
  }
  DrainMessages();
  StartBatch();
  for (auto& a : batch) a.entry.done(status);
}

void RedisStore::Lease(const std::string& name, int64_t ttl_ms, std::function<void(bool)> fn) {
  if (state_ != State::kConnected) {
    loop_->Defer([fn = std::move(fn)] { fn(false); });
    return;
  }
  // Kept here until answered: a connection lost first answers it with false (Lost()).
  uint64_t serial = next_lease_++;
  leases_.emplace(serial, std::move(fn));
  Command({"EVAL", kLeaseScript, "1", options_.prefix + ":lease:" + name, node_id_,
           std::to_string(ttl_ms)},
          [this, serial](redisReply* r) {
            auto it = leases_.find(serial);
            if (it == leases_.end()) return;
            auto answer = std::move(it->second);
            leases_.erase(it);
            answer(r != nullptr && r->type == REDIS_REPLY_INTEGER && r->integer == 1);
          });
}

void RedisStore::AddStats(cJSON* stats) const {
  cJSON* s = cJSON_AddObjectToObject(stats, "store");
  cJSON_AddStringToObject(s, "type", "redis");
  cJSON_AddStringToObject(s, "address", options_.address.c_str());
  if (!sentinels_.empty()) {
    cJSON_AddStringToObject(s, "master_name", options_.master_name.c_str());
    cJSON_AddStringToObject(s, "master", current_address_.c_str());
  }
  const char* state = state_ == State::kConnected    ? "connected"
                      : state_ == State::kConnecting ? "connecting"
                                                     : "disconnected";
  cJSON_AddStringToObject(s, "state", state);
  uint64_t age = lost_at_ == 0 ? 0 : loop_->Now() - lost_at_;
  cJSON_AddNumberToObject(s, "view_age_ms", static_cast<double>(age));
  cJSON_AddBoolToObject(s, "refusing_handshakes", !registry_->refusal().empty());
  cJSON_AddNumberToObject(s, "revision", static_cast<double>(last_rev_));
  cJSON_AddNumberToObject(s, "commits", static_cast<double>(commits_));
  cJSON_AddNumberToObject(s, "conflicts", static_cast<double>(conflicts_));
  cJSON_AddNumberToObject(s, "resyncs", static_cast<double>(resyncs_));
  if (state_ != State::kConnected && !last_error_.empty()) {
    cJSON_AddStringToObject(s, "error", last_error_.c_str());
  }
}

}  // namespace brokerproxy::registry
