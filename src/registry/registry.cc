#include "registry/registry.h"

#include <openssl/rand.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <utility>

#include "registry/secret.h"

namespace brokerproxy::registry {
namespace {

std::string_view TrimSpace(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

// A port number of digits only (no sign, no spaces inside), 1..65535.
std::optional<int> ParsePort(std::string_view s) {
  s = TrimSpace(s);
  if (s.empty() || s.size() > 5) {
    return std::nullopt;
  }
  int value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || value < 1 || value > 65535) {
    return std::nullopt;
  }
  return value;
}

}  // namespace

std::string AlreadySavedMessage(std::string_view id) {
  return "job " + std::string(id) +
         " already has a service registered; save another service of the same job with "
         "--name NAME, or replace it with --replace";
}

namespace {

// Ids reach error messages, and so logs: quote only ones that cannot forge a log line.
std::string DescribeId(std::string_view id) {
  if (!ValidJobId(id)) {
    return "an invalid job id";
  }
  return "job \"" + std::string(id) + "\"";
}

bool MayAccess(const Job& job, uid_t caller) { return caller == 0 || job.owner == caller; }

bool HasUpperCase(std::string_view id) {
  return std::any_of(id.begin(), id.end(), [](char c) { return c >= 'A' && c <= 'Z'; });
}

}  // namespace

Result<PortRange> PortRange::Parse(std::string_view text) {
  auto invalid = [text] {
    return Status::InvalidArgument("port range \"" + std::string(text) +
                                   "\" is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535");
  };
  size_t dash = text.find('-');
  if (dash == std::string_view::npos) {
    return invalid();
  }
  std::optional<int> first = ParsePort(text.substr(0, dash));
  std::optional<int> last = ParsePort(text.substr(dash + 1));
  if (!first || !last || *first > *last) {
    return invalid();
  }
  return PortRange{*first, *last};
}

std::string PortRange::ToString() const {
  return std::to_string(first) + "-" + std::to_string(last);
}

Registry::Registry(Options options) : options_(std::move(options)) {
  // The dummy only has to cost what a real comparison costs; it never authenticates anyone, so
  // a failed generation may fall back to a fixed value.
  Result<std::string> dummy = GenerateSecret(kDefaultSecretBits);
  dummy_secret_ = dummy.ok() ? std::move(dummy).value() : std::string(kDefaultSecretBits / 4, '0');
}

Result<Job> Registry::Save(const SaveRequest& req, uid_t caller, int64_t now,
                           std::optional<Job>* replaced) {
  if (req.port < 0 || req.port > 65535) {
    return Status::InvalidArgument("field 'port' must be in 1..65535, or 0 to allocate one");
  }
  if (req.ttl < -1) {
    return Status::InvalidArgument("field 'ttl' must be >= 0, or -1 for the default");
  }
  const int64_t ttl = req.ttl == -1 ? std::max<int64_t>(options_.default_ttl, 0) : req.ttl;
  if (ttl > 0 && (ttl > kMaxJobTime || now > kMaxJobTime - ttl)) {
    return Status::InvalidArgument("field 'ttl' is too large");
  }

  Job job;
  job.id = CanonicalJobId(req.id);
  job.type = req.type;
  job.owner = caller;  // root replacing a user's job takes it over
  job.host = req.host;
  job.port = req.port;
  job.port_allocated = req.port == 0;
  job.cert_path = req.cert_path;
  job.key_path = req.key_path;
  job.created = now;
  job.expires = ttl > 0 ? now + ttl : 0;
  job.ready = req.ready;
  {
    // Check every field before any side effect; the secret and the port are placeholders
    // replaced below.
    Job probe = job;
    probe.secret = dummy_secret_;
    probe.port = job.port_allocated ? 1 : job.port;
    BP_RETURN_IF_ERROR(CheckJob(probe));
  }

  // One name is one job: "ABC" finds the "abc" of whoever saved it first.
  auto it = jobs_.find(job.id);
  if (it != jobs_.end() && !MayAccess(it->second, caller)) {
    return Status::PermissionDenied(DescribeId(job.id) + " belongs to another user");
  }
  if (it != jobs_.end() && !req.replace) {
    return Status::AlreadyExists(AlreadySavedMessage(job.id));
  }
  // Replacing one's own job does not add one.
  const size_t max_jobs = options_.max_jobs_per_user;
  if (caller != 0 && max_jobs > 0 && it == jobs_.end()) {
    const size_t held = CountOwnedBy(caller);
    if (held >= max_jobs) {
      return Status::ResourceExhausted(
          "you already hold " + std::to_string(held) + " jobs, the most one user may hold " +
          "([registry] max_jobs_per_user = " + std::to_string(max_jobs) +
          "); remove one first (`brokerproxy query` lists them)");
    }
  }

  Result<std::string> secret = GenerateSecret(options_.secret_bits);
  if (!secret.ok()) {
    return secret.status();
  }
  job.secret = std::move(secret).value();

  // The owner's old record frees its port first, so replacing a job in a full range works.
  if (it != jobs_.end()) {
    Index(it->second, -1);
  }
  if (job.port_allocated) {
    Result<int> port = AllocatePort();
    if (!port.ok()) {
      if (it != jobs_.end()) {
        Index(it->second, +1);
      }
      return port.status();
    }
    job.port = *port;
  }

  std::optional<Job> previous;
  if (it != jobs_.end()) {
    previous = std::exchange(it->second, job);
  } else {
    jobs_.emplace(job.id, job);
  }
  Index(job, +1);
  bool existed = previous.has_value();
  if (replaced != nullptr) {
    *replaced = std::move(previous);
  }
  Changed(job.id, existed, /*removed=*/false);
  return job;
}

Result<const Job*> Registry::Get(std::string_view id, uid_t caller) const {
  const Job* job = Find(id);
  if (job == nullptr) {
    return Status::NotFound("no " + DescribeId(CanonicalJobId(id)));
  }
  if (!MayAccess(*job, caller)) {
    return Status::PermissionDenied(DescribeId(job->id) + " belongs to another user");
  }
  return job;
}

Result<Job> Registry::Remove(std::string_view id, uid_t caller,
                             std::optional<std::string_view> if_secret) {
  Result<const Job*> found = Get(id, caller);
  if (!found.ok()) {
    return found.status();
  }
  if (if_secret.has_value() && !SecretMatches((*found)->secret, *if_secret)) {
    return Status::AlreadyExists(DescribeId((*found)->id) +
                                 " was saved again since (its secret is not the one given): "
                                 "left in place");
  }
  auto it = jobs_.find((*found)->id);
  Job job = std::move(it->second);
  jobs_.erase(it);
  Index(job, -1);
  Changed(job.id, /*existed=*/true, /*removed=*/true);
  return job;
}

const Job* Registry::Authenticate(std::string_view id, std::string_view secret) const {
  const Job* job = Find(id);
  // Hash and compare on both paths, so an unknown id answers in the time a wrong secret does.
  const bool match = SecretMatches(job != nullptr ? job->secret : dummy_secret_, secret);
  return match && refusal_.empty() ? job : nullptr;
}

const Job* Registry::Find(std::string_view id) const {
  // Ids are stored in canonical form; most lookups already are, and need no copy.
  auto it = HasUpperCase(id) ? jobs_.find(CanonicalJobId(id)) : jobs_.find(id);
  return it == jobs_.end() ? nullptr : &it->second;
}

std::vector<const Job*> Registry::List(uid_t caller) const {
  std::vector<const Job*> out;
  for (const auto& [id, job] : jobs_) {
    if (MayAccess(job, caller)) {
      out.push_back(&job);
    }
  }
  std::sort(out.begin(), out.end(),
            [](const Job* a, const Job* b) { return NaturalLess(a->id, b->id); });
  return out;
}

std::vector<std::string> Registry::Expired(int64_t now) const {
  std::vector<std::string> out;
  for (const auto& [id, job] : jobs_) {
    if (job.expires > 0 && job.expires <= now) {
      out.push_back(id);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status Registry::SetReady(std::string_view id, bool ready) {
  auto it = jobs_.find(CanonicalJobId(id));
  if (it == jobs_.end()) {
    return Status::NotFound("no " + DescribeId(CanonicalJobId(id)));
  }
  it->second.ready = ready;
  if (track_changes_) touched_.push_back(it->first);
  return Status::OK();
}

Status Registry::SetExpires(std::string_view id, int64_t expires) {
  if (expires < 0 || expires > kMaxJobTime) {
    return Status::InvalidArgument("expiry must be in 0.." + std::to_string(kMaxJobTime));
  }
  auto it = jobs_.find(CanonicalJobId(id));
  if (it == jobs_.end()) {
    return Status::NotFound("no " + DescribeId(CanonicalJobId(id)));
  }
  it->second.expires = expires;
  if (track_changes_) touched_.push_back(it->first);
  return Status::OK();
}

Status Registry::Put(Job job) {
  BP_RETURN_IF_ERROR(CheckJob(job));
  job.id = CanonicalJobId(job.id);
  std::string id = job.id;
  auto it = jobs_.find(job.id);
  bool existed = it != jobs_.end();
  if (existed) {
    Index(it->second, -1);
    it->second = std::move(job);
    Index(it->second, +1);
  } else {
    auto [inserted, unused] = jobs_.emplace(job.id, std::move(job));
    Index(inserted->second, +1);
  }
  Changed(id, existed, /*removed=*/false);
  return Status::OK();
}

void Registry::Erase(std::string_view id) {
  auto it = jobs_.find(CanonicalJobId(id));
  if (it != jobs_.end()) {
    std::string erased = it->first;
    Index(it->second, -1);
    jobs_.erase(it);
    Changed(erased, /*existed=*/true, /*removed=*/true);
  }
}

size_t Registry::CountOwnedBy(uid_t uid) const {
  auto it = jobs_per_owner_.find(uid);
  return it == jobs_per_owner_.end() ? 0 : it->second;
}

void Registry::Index(const Job& job, int delta) {
  IndexPort(job, delta);
  if (delta > 0) {
    ++jobs_per_owner_[job.owner];
  } else if (auto it = jobs_per_owner_.find(job.owner); it != jobs_per_owner_.end()) {
    if (--it->second == 0) jobs_per_owner_.erase(it);
  }
}

uint64_t Registry::Generation(std::string_view id) const {
  auto it = generations_.find(CanonicalJobId(id));
  return it == generations_.end() ? 0 : it->second;
}

std::vector<std::string> Registry::TakeTouched() {
  std::vector<std::string> ids;
  ids.swap(touched_);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

void Registry::Changed(const std::string& id, bool existed, bool removed) {
  if (track_changes_) touched_.push_back(id);
  if (removed) {
    generations_.erase(id);
  } else {
    generations_[id] = next_generation_++;
  }
  if (existed && observer_) observer_(id);
}

Result<int> Registry::AllocatePort() const {
  const PortRange& range = options_.ports;
  const int size = range.size();
  if (size <= 0 || ports_in_use_.size() >= static_cast<size_t>(size)) {
    return Status::ResourceExhausted("port range " + range.ToString() + " is exhausted");
  }
  // A random start spreads jobs over the range, so a port freed a moment ago (whose old backend
  // may still linger) is not the next one handed out.
  uint32_t offset = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&offset), sizeof(offset)) != 1) {
    return Status::Internal("RAND_bytes failed: the random generator is not seeded");
  }
  const int start = static_cast<int>(offset % static_cast<uint32_t>(size));
  for (int i = 0; i < size; ++i) {
    int port = range.first + (start + i) % size;
    if (!ports_in_use_.contains(port)) {
      return port;
    }
  }
  return Status::ResourceExhausted("port range " + range.ToString() + " is exhausted");
}

void Registry::IndexPort(const Job& job, int delta) {
  if (!options_.ports.Contains(job.port)) {
    return;
  }
  int& holders = ports_in_use_[job.port];
  holders += delta;
  if (holders <= 0) {
    ports_in_use_.erase(job.port);
  }
}

}  // namespace brokerproxy::registry
