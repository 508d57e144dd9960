#include "proxy/server/stats.h"

#include <algorithm>
#include <ctime>
#include <utility>
#include <vector>

#include "registry/job.h"

namespace brokerproxy::proxy {

const char* SessionKindName(SessionKind kind) {
  switch (kind) {
    case SessionKind::kPlain:
      return "plain";
    case SessionKind::kTls:
      return "tls";
    case SessionKind::kSsh:
      return "ssh";
  }
  return "plain";
}

std::pair<uint64_t, uint64_t> ByteReport::Flush(Stats* stats, const std::string& job, uint64_t up,
                                                uint64_t down) {
  uint64_t new_up = up - up_;
  uint64_t new_down = down - down_;
  if (new_up == 0 && new_down == 0) return {0, 0};
  up_ = up;
  down_ = down;
  GlobalCounters& g = stats->global();
  g.bytes_up += new_up;
  g.bytes_down += new_down;
  JobCounters& j = stats->job(job);
  j.bytes_up += new_up;
  j.bytes_down += new_down;
  stats->Touch(job);
  return {new_up, new_down};
}

Stats::Stats()
    : handshake_{loop::Histogram(loop::kLatencyBounds), loop::Histogram(loop::kLatencyBounds),
                 loop::Histogram(loop::kLatencyBounds)},
      duration_(loop::kDurationBounds) {}

int64_t Stats::Now() { return static_cast<int64_t>(::time(nullptr)); }

void Stats::SessionStarted(const std::string& job, SessionKind kind, double handshake_s) {
  global_.spliced++;
  JobCounters& j = jobs_[job];
  j.connections++;
  j.active++;
  j.last_active = Now();
  handshake_[static_cast<size_t>(kind)].Observe(handshake_s);
}

void Stats::SessionEnded(const std::string& job, double duration_s) {
  JobCounters& j = jobs_[job];
  if (j.active > 0) j.active--;
  j.last_active = Now();
  duration_.Observe(duration_s);
}

void Stats::Prune(const std::function<bool(const std::string&)>& exists) {
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (it->second.active == 0 && !exists(it->first)) {
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
}

void Stats::AddToJson(cJSON* out, const std::function<bool(const std::string&)>& visible) const {
  auto num = [](cJSON* o, const char* name, uint64_t v) {
    cJSON_AddNumberToObject(o, name, static_cast<double>(v));
  };
  const GlobalCounters& g = global_;
  cJSON* c = cJSON_AddObjectToObject(out, "connections");
  num(c, "accepted", g.accepted);
  num(c, "active", g.active);
  num(c, "spliced", g.spliced);
  num(c, "denied", g.denied);
  num(c, "bad_request", g.bad_request);
  num(c, "timeouts", g.timeouts);
  num(c, "unavailable", g.unavailable);
  num(c, "busy", g.busy);
  num(c, "throttled", g.throttled);
  num(c, "throttled_episodes", g.throttled_episodes);
  num(c, "idle_closed", g.idle_closed);
  num(c, "tls_failures", g.tls_failures);
  num(c, "ssh_failures", g.ssh_failures);
  num(c, "bytes_up", g.bytes_up);
  num(c, "bytes_down", g.bytes_down);
  cJSON* jobs = cJSON_AddObjectToObject(out, "per_job");
  // In the natural order of ids, as `query` lists jobs.
  std::vector<const std::pair<const std::string, JobCounters>*> listed;
  for (const auto& entry : jobs_) {
    if (visible(entry.first)) listed.push_back(&entry);
  }
  std::sort(listed.begin(), listed.end(),
            [](const auto* a, const auto* b) { return registry::NaturalLess(a->first, b->first); });
  for (const auto* entry : listed) {
    const std::string& id = entry->first;
    const JobCounters& j = entry->second;
    cJSON* o = cJSON_AddObjectToObject(jobs, id.c_str());
    num(o, "connections", j.connections);
    num(o, "active", j.active);
    num(o, "denied", j.denied);
    num(o, "bytes_up", j.bytes_up);
    num(o, "bytes_down", j.bytes_down);
    if (j.last_active > 0) num(o, "last_active", static_cast<uint64_t>(j.last_active));
  }
}

}  // namespace brokerproxy::proxy
