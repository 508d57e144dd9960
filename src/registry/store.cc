#include "registry/store.h"

#include <memory>
#include <unordered_map>

#include "loop/file.h"
#include "loop/log.h"
#include "registry/snapshot.h"

namespace brokerproxy::registry {

FileStore::FileStore(loop::Loop* loop, Registry* registry, std::string path)
    : loop_(loop), registry_(registry), path_(std::move(path)) {}

Status FileStore::Load(const std::string& path, Registry* registry) {
  auto data = ReadFileIfExists(path, kMaxSnapshotBytes);
  if (!data.ok()) return data.status();
  if (!data->has_value()) return Status::OK();  // first start
  auto jobs = DecodeSnapshot(**data);
  if (!jobs.ok()) {
    return Status::Corruption(path + " is damaged (" + jobs.status().message() +
                              "); refusing to start rather than lose jobs. Restore it from a "
                              "backup or move it away to start empty");
  }
  // Ids were case-sensitive once, so an old file may hold "abc" and "ABC" of two users. They
  // name one job now: the one saved first keeps it (the other most likely squatted on its
  // name), and the rest are dropped with a warning rather than failing the start.
  std::unordered_map<std::string, size_t> kept;  // canonical id -> index in *jobs
  std::vector<bool> dropped(jobs->size(), false);
  for (size_t i = 0; i < jobs->size(); ++i) {
    auto [it, fresh] = kept.emplace(CanonicalJobId((*jobs)[i].id), i);
    if (fresh) continue;
    size_t loser = i;
    if ((*jobs)[i].created < (*jobs)[it->second].created) {
      loser = it->second;
      it->second = i;
    }
    dropped[loser] = true;
    const Job& lost = (*jobs)[loser];
    const Job& won = (*jobs)[it->second];
    LOG_WARN(
        "%s: dropped job \"%s\" of uid %u: it names the same job as \"%s\" of uid %u, "
        "saved earlier (job ids are case-insensitive)",
        path.c_str(), lost.id.c_str(), static_cast<unsigned>(lost.owner), won.id.c_str(),
        static_cast<unsigned>(won.owner));
  }
  for (size_t i = 0; i < jobs->size(); ++i) {
    if (dropped[i]) continue;
    Status s = registry->Put(std::move((*jobs)[i]));
    if (!s.ok()) return Status::Corruption(path + ": " + s.message());
  }
  return Status::OK();
}

void FileStore::Commit(Mutation mutation, Done done) {
  queue_.push_back({std::move(mutation), std::move(done)});
  if (!writing_) StartBatch();
}

void FileStore::StartBatch() {
  while (!queue_.empty()) {
    Entry e = std::move(queue_.front());
    queue_.pop_front();
    Result<Undo> undo = e.mutation();
    if (!undo.ok()) {
      // Answer on a later turn: never re-enter the caller of Commit().
      loop_->Defer([done = std::move(e.done), s = undo.status()] { done(s); });
      continue;
    }
    in_flight_.push_back({std::move(undo).value(), std::move(e.done)});
  }
  if (in_flight_.empty()) return;
  writing_ = true;
  ++writes_;
  write_started_ns_ = uv_hrtime();
  // Encode on the loop (fast, and the registry is loop-only); write on the pool.
  auto data = std::make_shared<std::string>(EncodeSnapshot(registry_->All()));
  auto result = std::make_shared<Status>();
  write_ = loop::QueueWork(
      *loop_, [path = path_, data, result] { *result = loop::WriteFileAtomic(path, *data, 0600); },
      [this, result] { FinishBatch(*result); });
}

void FileStore::FinishBatch(Status status) {
  std::vector<Applied> batch;
  batch.swap(in_flight_);
  writing_ = false;
  write_seconds_.Observe(static_cast<double>(uv_hrtime() - write_started_ns_) / 1e9);
  if (!status.ok()) {
    ++write_failures_;
    LOG_ERROR("cannot write the registry to %s: %s; %zu change(s) undone", path_.c_str(),
              status.ToString().c_str(), batch.size());
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) it->undo();
  }
  // Start the next batch before answering, so that mutations queued meanwhile are not delayed
  // by whatever the callbacks do.
  StartBatch();
  for (auto& a : batch) a.done(status);
}

}  // namespace brokerproxy::registry
