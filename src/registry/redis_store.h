// RedisStore: one registry shared by the daemons of several login nodes, kept in Redis
// (`[registry] store = redis`; docs/redis.md has the operator's view).
//
// Every daemon keeps the whole registry in memory, as with the file store, and the proxy checks
// secrets against that view: no store round trip per connection. A change is applied locally
// by its mutation (store.h), then sent to Redis in one Lua script per batch that checks, for
// every job the batch touched, that Redis still holds the revision this daemon last saw (so
// ownership and "already saved" were decided on the truth) and that no other job holds an
// allocated port the batch claims. If so the script writes the records, bumps the revision,
// and publishes them; if not, the batch is undone, the view resynced and the mutations run
// again (a few times at most). `done` comes after Redis answered (and, with `replicas` > 0,
// after WAIT saw that many replicas take it).
//
// Every daemon subscribes to the changes and applies them to its Registry; after any
// (re)connect it loads every record again (messages sent while it was away are lost). A record
// is sealed with AES-256-GCM (registry/seal.h) under the job's id: Redis sees ids, revisions
// and allocated ports, never a secret, owner, host or path.
//
// Keys (P = `prefix`): P:jobs (hash: id -> "rev:port:hex(sealed record)"), P:ports (hash:
// allocated port -> id), P:rev (the last revision), P:keycheck (a known text sealed under the
// key, so a daemon with another key refuses to start); channel P:changes.
//
// Failure: while Redis is unreachable, Commit fails at once with StoreUnavailable naming the
// store; the proxy keeps serving from the last synced view for `max_view_age_ms`, then refuses
// handshakes (Registry::set_refusal) until a resync. The daemon reconnects with backoff
// (100 ms doubling to 5 s). With Sentinels, each connect asks them for the master first, so a
// promotion is followed without a restart.
//
// Ownership: the daemon owns the RedisStore; `*loop` and `*registry` must outlive it. Loop-thread
// only; Open() blocks (start-up only).

#ifndef BROKERPROXY_REGISTRY_REDIS_STORE_H_
#define BROKERPROXY_REGISTRY_REDIS_STORE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/status.h"
#include "loop/timer.h"
#include "registry/registry.h"
#include "registry/seal.h"
#include "registry/store.h"

struct redisAsyncContext;
struct redisReply;

namespace brokerproxy::registry {

class RedisStore : public Store {
 public:
  struct Options {
    // "unix:/path", "host:port" (host a numeric address or a name resolved at start-up), or,
    // with `master_name`, a comma-separated list of Sentinels' host:port.
    std::string address;
    std::string master_name;  // non-empty: `address` lists Sentinels
    std::string password;     // AUTH; empty: none
    std::string prefix = "brokerproxy";
    int replicas = 0;                   // WAIT for this many replicas before acknowledging
    int64_t wait_timeout_ms = 2000;     // how long WAIT may take
    int64_t max_view_age_ms = 300000;   // serve from an unsynced view this long at most
    int64_t connect_timeout_ms = 2000;  // each step: a Sentinel's answer, connect + resync
    int64_t ping_interval_ms = 1000;    // a connection silent for 3 intervals is dropped
  };

  // Connects (blocking), checks the key against P:keycheck (setting it on a fresh store) and
  // loads every record into `*registry` (which should be empty). Errors name the store:
  // StoreUnavailable if it cannot be reached, PermissionDenied if the key is not the one the
  // store was sealed with.
  static Result<std::unique_ptr<RedisStore>> Open(loop::Loop* loop, Registry* registry,
                                                  Sealer sealer, Options options);
  ~RedisStore() override;
  RedisStore(const RedisStore&) = delete;
  RedisStore& operator=(const RedisStore&) = delete;

  // Starts the asynchronous connection (subscription, resync, heartbeat) on the loop.
  Status Start();

  void Commit(Mutation mutation, Done done) override;
  bool busy() const override { return writing_ || !queue_.empty(); }
  // "store": {"type": "redis", "address" (as configured), with Sentinels "master_name" and
  // "master" (the address in use), "state": connected|connecting|disconnected, "view_age_ms"
  // (0 while in sync), "refusing_handshakes", "revision" (the newest seen), "commits",
  // "conflicts", "resyncs", and "error" while not connected}.
  void AddStats(cJSON* stats) const override;

  // P:lease:NAME holds this daemon's random id for `ttl_ms` (SET NX PX, renewed by its holder);
  // false while Redis cannot be reached.
  void Lease(const std::string& name, int64_t ttl_ms, std::function<void(bool)> fn) override;

  bool connected() const { return state_ == State::kConnected; }
  // A human name of the store for messages: "redis at ADDRESS".
  std::string Name() const;

 private:
  enum class State { kDisconnected, kConnecting, kConnected };
  struct Entry {
    Mutation mutation;
    Done done;
    int attempts = 0;
  };
  struct Applied {
    Entry entry;
    Undo undo;
  };
  struct Rev {
    uint64_t rev = 0;
    bool present = false;
  };
  struct Call;

  RedisStore(loop::Loop* loop, Registry* registry, Sealer sealer, Options options);

  // Sends a command on the command connection; `fn` gets the reply, or nullptr if the
  // connection went away first.
  void Command(const std::vector<std::string>& argv, std::function<void(redisReply*)> fn);
  void Send(redisAsyncContext* c, const std::vector<std::string>& argv,
            std::function<void(redisReply*)> fn);
  static void OnReply(redisAsyncContext* c, void* reply, void* privdata);
  static void OnConnect(const redisAsyncContext* c, int status);
  static void OnDisconnect(const redisAsyncContext* c, int status);

  void Connect();
  void ConnectTo(const std::string& address);
  void AskSentinel(size_t index);
  void Lost(const std::string& why);
  void ScheduleReconnect();
  void Tick();
  void Resync(std::function<void(Status)> then);

  // Applies an atomic dump {rev, {id, value, ...}, keycheck} to the registry.
  Status ApplyDump(const redisReply* reply);
  // Applies one record (nullopt value: removed) if newer than what the view holds.
  void ApplyRecord(const std::string& id, uint64_t rev, const std::string* value);
  // Puts `job` (or only its readiness and expiry, if it is the same job); false on a bad record.
  bool ApplyJob(Job job);
  void RemoveJob(const std::string& id);
  // Tells the remote observer (store.h) that `id` was replaced or removed elsewhere.
  void NotifyRemote(const std::string& id);
  void OnMessage(const std::string& payload);
  Result<Job> OpenRecord(const std::string& id, std::string_view value, uint64_t* rev) const;
  Status CheckKey(const redisReply* keycheck) const;

  void StartBatch();
  void SendBatch(std::vector<std::string> argv, bool use_eval);
  void OnBatchReply(redisReply* reply);
  void FinishBatch(Status status, bool undo);
  void DrainMessages();

  loop::Loop* loop_;
  Registry* registry_;
  Sealer sealer_;
  Options options_;
  std::string script_sha_;
  std::string node_id_;                                             // random, for leases
  std::unordered_map<uint64_t, std::function<void(bool)>> leases_;  // asked, not answered
  uint64_t next_lease_ = 0;
  std::vector<std::string> sentinels_;

  State state_ = State::kDisconnected;
  redisAsyncContext* cmd_ = nullptr;
  redisAsyncContext* sub_ = nullptr;
  redisAsyncContext* sentinel_ = nullptr;  // while asking one where the master is
  size_t sentinel_index_ = 0;
  std::unique_ptr<Call> sub_call_;  // the subscription's callback, for every connection
  std::string last_error_;          // why the store is not connected
  uint64_t epoch_ = 0;  // bumped on every (re)connect: replies of an older one are dropped
  bool closing_ = false;
  std::string current_address_;
  loop::HandlePtr<loop::Timer> reconnect_timer_;
  loop::HandlePtr<loop::Timer> step_timer_;  // the deadline of the connection's current step
  loop::HandlePtr<loop::Timer> tick_timer_;
  int64_t backoff_ms_ = 100;
  uint64_t ping_sent_at_ = 0;  // loop time of the unanswered PING; 0: none
  uint64_t lost_at_ = 0;       // loop time the view stopped being synced; 0: synced
  bool stale_logged_ = false;

  std::unordered_map<std::string, Rev> revs_;  // the revision of each id the view holds
  uint64_t synced_rev_ = 0;                    // the store's revision at the last resync
  uint64_t last_rev_ = 0;                      // the newest revision seen
  std::deque<Entry> queue_;
  std::vector<Applied> in_flight_;
  std::vector<std::pair<std::string, Rev>> batch_revs_;  // ids of the batch in flight
  bool writing_ = false;
  uint64_t write_started_ns_ = 0;           // uv_hrtime() when the batch in flight was sent
  std::vector<std::string> held_messages_;  // arrived while a batch was in flight
  uint64_t commits_ = 0;
  uint64_t conflicts_ = 0;
  uint64_t resyncs_ = 0;
};

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_REDIS_STORE_H_
