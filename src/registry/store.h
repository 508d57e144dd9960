// Store: makes registry changes durable before they are acknowledged. Two kinds: FileStore
// (below: registry.json in the state dir, the default) and RedisStore (registry/redis_store.h:
// one registry shared by several login nodes). The Broker sees only this interface.
//
// FileStore: Commit(mutation, done) applies `mutation` to the in-memory Registry on the loop
// thread, writes the whole registry to disk on the thread pool (loop/file.h: temp file, fsync,
// rename, fsync dir) and then calls `done(OK)`. If the write fails, the change is undone and `done`
// gets the error, so the registry in memory never claims what the disk does not hold.
//
// Group commit: while one write is in flight, further mutations wait; when it lands they are
// applied together and written once. Each waits for its own batch. A mutation that fails
// validation is answered at once (on a later loop turn) and takes no part in the batch.
// While a batch is in flight its changes are already visible in memory (the proxy may route to
// a job whose save is being written); an undo removes them again.
//
// Ownership: the caller owns the Store; `*loop` and `*registry` must outlive it. Destroying
// the Store while a write is in flight detaches its callbacks (the write itself completes on
// the pool). Loop-thread only.

#ifndef BROKERPROXY_REGISTRY_STORE_H_
#define BROKERPROXY_REGISTRY_STORE_H_

#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "loop/histogram.h"
#include "loop/loop.h"
#include "loop/status.h"
#include "loop/work.h"
#include "registry/json.h"
#include "registry/registry.h"

namespace brokerproxy::registry {

// What every store does: apply a mutation to the in-memory Registry at once and call `done`
// (always on a later loop turn) once the change is durable, or undo it and pass the error.
// A mutation may be run more than once (a shared store runs it again, undone in between, when
// another node changed the same jobs meanwhile): it must start from what it finds each time.
class Store {
 public:
  // Changes the registry and returns how to undo that change, or an error (nothing changed).
  using Undo = std::function<void()>;
  using Mutation = std::function<Result<Undo>()>;
  using Done = std::function<void(Status)>;

  virtual ~Store() = default;
  virtual void Commit(Mutation mutation, Done done) = 0;
  // True while a change is in flight or waits.
  virtual bool busy() const = 0;
  // Adds the store's members to a "stats" reply (nothing for the file store).
  virtual void AddStats(cJSON* /*stats*/) const {}
  // Periodic work that one daemon at a time should do among those sharing the store (the
  // scheduler reconciliation): `fn(true)` if this daemon holds, or now takes, the lease `name`
  // for the next `ttl_ms`, else `fn(false)`. Always on a later loop turn. A store of one daemon
  // always grants it.
  virtual void Lease(const std::string& name, int64_t ttl_ms, std::function<void(bool)> fn) = 0;

  // Called (on a later loop turn) with a job's id after another daemon sharing the store
  // replaced or removed it; the registry shows the change already. Never called by a store of
  // one daemon. Set it once; nullptr clears it.
  using RemoteObserver = std::function<void(const std::string& id)>;
  void set_remote_observer(RemoteObserver observer) { remote_observer_ = std::move(observer); }

  // How long each batch took to become durable (written to disk, or answered by Redis), and how
  // many batches failed.
  const loop::Histogram& write_seconds() const { return write_seconds_; }
  uint64_t write_failures() const { return write_failures_; }

 protected:
  RemoteObserver remote_observer_;
  loop::Histogram write_seconds_{loop::kLatencyBounds};
  uint64_t write_failures_ = 0;
};

class FileStore : public Store {
 public:
  FileStore(loop::Loop* loop, Registry* registry, std::string path);
  FileStore(const FileStore&) = delete;
  FileStore& operator=(const FileStore&) = delete;

  // Reads `path` into `*registry` (blocking: for start-up, before the loop serves anyone).
  // A missing file is an empty registry; a damaged one is Corruption naming the file. Jobs
  // whose ids differ only in case (files written before ids were case-insensitive) are one
  // job: the one with the earliest `created` is loaded, each other one is dropped with a
  // warning naming both ids and owners.
  static Status Load(const std::string& path, Registry* registry);

  void Commit(Mutation mutation, Done done) override;

  // True while a write is in flight or mutations wait.
  bool busy() const override { return writing_ || !queue_.empty(); }
  void Lease(const std::string& /*name*/, int64_t /*ttl_ms*/,
             std::function<void(bool)> fn) override {
    loop_->Defer([fn = std::move(fn)] { fn(true); });
  }
  // Snapshot writes started so far (one per batch).
  uint64_t writes() const { return writes_; }
  const std::string& path() const { return path_; }

 private:
  struct Entry {
    Mutation mutation;
    Done done;
  };
  struct Applied {
    Undo undo;
    Done done;
  };
  void StartBatch();
  void FinishBatch(Status status);

  loop::Loop* loop_;
  Registry* registry_;
  std::string path_;
  std::deque<Entry> queue_;
  std::vector<Applied> in_flight_;
  bool writing_ = false;
  uint64_t writes_ = 0;
  uint64_t write_started_ns_ = 0;
  loop::Pending write_;
};

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_STORE_H_
