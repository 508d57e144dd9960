#include "registry/scheduler.h"

#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <set>
#include <utility>

#include "registry/json.h"

extern char** environ;

namespace brokerproxy::registry {

namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

bool HostNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '-' || c == '_';
}

// Appends `name` to `list` unless it is empty or already there.
void AddUnique(std::vector<std::string>* list, std::string name) {
  if (name.empty()) return;
  if (std::find(list->begin(), list->end(), name) == list->end()) list->push_back(std::move(name));
}

// ---- hostlists ----

// One bracketed set: the numbers it stands for, as printed (zero padding included).
struct NumberRange {
  uint64_t lo = 0;
  uint64_t hi = 0;
  size_t width = 0;
};

Status ParseNumber(std::string_view digits, uint64_t* out) {
  if (digits.empty() || digits.size() > 18) {
    return Status::InvalidArgument("hostlist: bad number '" + std::string(digits) + "'");
  }
  uint64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') {
      return Status::InvalidArgument("hostlist: bad number '" + std::string(digits) + "'");
    }
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return Status::OK();
}

// "1-3,07" (the inside of brackets) into ranges; `*count` gets how many numbers they hold.
Status ParseBracket(std::string_view inside, std::vector<NumberRange>* ranges, uint64_t* count) {
  *count = 0;
  if (inside.empty()) return Status::InvalidArgument("hostlist: empty []");
  size_t at = 0;
  while (at <= inside.size()) {
    size_t comma = inside.find(',', at);
    if (comma == std::string_view::npos) comma = inside.size();
    std::string_view part = inside.substr(at, comma - at);
    size_t dash = part.find('-');
    NumberRange r;
    std::string_view lo = part.substr(0, dash);
    BP_RETURN_IF_ERROR(ParseNumber(lo, &r.lo));
    r.width = lo.size();
    if (dash == std::string_view::npos) {
      r.hi = r.lo;
    } else {
      BP_RETURN_IF_ERROR(ParseNumber(part.substr(dash + 1), &r.hi));
    }
    if (r.hi < r.lo) {
      return Status::InvalidArgument("hostlist: reversed range '" + std::string(part) + "'");
    }
    *count += r.hi - r.lo + 1;
    if (*count > kMaxHostlistNames) {
      return Status::InvalidArgument("hostlist: more than " + std::to_string(kMaxHostlistNames) +
                                     " names");
    }
    ranges->push_back(r);
    at = comma + 1;
  }
  return Status::OK();
}

std::string Padded(uint64_t v, size_t width) {
  std::string digits = std::to_string(v);
  if (digits.size() < width) digits.insert(0, width - digits.size(), '0');
  return digits;
}

// One name with its bracketed sets ("gpu[01-03]", "r[1-2]n[1-2]", "login1") into `*out`.
Status ExpandOne(std::string_view item, std::vector<std::string>* out) {
  if (item.empty()) return Status::InvalidArgument("hostlist: empty name");
  // Pieces alternate: literal text, then a set (possibly none), ...
  std::vector<std::string> literals;
  std::vector<std::vector<NumberRange>> sets;
  uint64_t total = 1;
  size_t at = 0;
  std::string literal;
  while (at < item.size()) {
    char c = item[at];
    if (c == '[') {
      size_t close = item.find(']', at);
      if (close == std::string_view::npos) return Status::InvalidArgument("hostlist: unbalanced [");
      std::string_view inside = item.substr(at + 1, close - at - 1);
      if (inside.find('[') != std::string_view::npos) {
        return Status::InvalidArgument("hostlist: nested [");
      }
      std::vector<NumberRange> ranges;
      uint64_t count = 0;
      BP_RETURN_IF_ERROR(ParseBracket(inside, &ranges, &count));
      total *= count;  // each factor <= kMaxHostlistNames, so checked before it can overflow
      if (total + out->size() > kMaxHostlistNames) {
        return Status::InvalidArgument("hostlist: more than " + std::to_string(kMaxHostlistNames) +
                                       " names");
      }
      literals.push_back(std::move(literal));
      literal.clear();
      sets.push_back(std::move(ranges));
      at = close + 1;
    } else if (c == ']') {
      return Status::InvalidArgument("hostlist: unbalanced ]");
    } else if (!HostNameChar(c)) {
      return Status::InvalidArgument("hostlist: bad character in '" + std::string(item) + "'");
    } else {
      literal += c;
      ++at;
    }
  }
  literals.push_back(std::move(literal));
  // Every combination, the last set varying fastest (as Slurm prints them).
  std::vector<std::string> names = {literals[0]};
  for (size_t i = 0; i < sets.size(); ++i) {
    std::vector<std::string> next;
    for (const std::string& prefix : names) {
      for (const NumberRange& r : sets[i]) {
        for (uint64_t v = r.lo; v <= r.hi; ++v) {
          next.push_back(prefix + Padded(v, r.width) + literals[i + 1]);
        }
      }
    }
    names = std::move(next);
  }
  for (std::string& name : names) {
    if (name.size() > kMaxHostNameBytes) {
      return Status::InvalidArgument("hostlist: a name longer than " +
                                     std::to_string(kMaxHostNameBytes) + " bytes");
    }
    out->push_back(std::move(name));
  }
  return Status::OK();
}

// ---- JSON fields ----

// An integer member: absent or null -> nullopt; anything but an exact integer in lo..hi is an
// error naming the field.
Status OptionalInt(const cJSON* obj, const char* name, int64_t lo, int64_t hi,
                   std::optional<int64_t>* out) {
  out->reset();
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr || cJSON_IsNull(item)) return Status::OK();
  int64_t v = 0;
  Status s = ReadInt(obj, name, lo, hi, &v);
  if (!s.ok()) return Status::InvalidArgument(s.message());
  *out = v;
  return Status::OK();
}

Status RequiredInt(const cJSON* obj, const char* name, int64_t lo, int64_t hi, int64_t* out) {
  Status s = ReadInt(obj, name, lo, hi, out);
  return s.ok() ? s : Status::InvalidArgument(s.message());
}

Status String(const cJSON* obj, const char* name, bool required, std::string* out) {
  Status s = ReadString(obj, name, required, out);
  return s.ok() ? s : Status::InvalidArgument(s.message());
}

Result<JsonPtr> ParseRoot(std::string_view text) {
  // The command's output is already bounded by max_output_bytes; the parser needs no bound of
  // its own beyond that.
  auto root = ParseJson(text, text.size());
  if (!root.ok()) return Status::InvalidArgument(root.status().message());
  if (!cJSON_IsObject(root->get())) return Status::InvalidArgument("not a JSON object");
  return root;
}

// A Slurm "errors" array that is not empty: the first error's text.
Status SlurmErrors(const cJSON* root) {
  const cJSON* errors = cJSON_GetObjectItemCaseSensitive(root, "errors");
  if (errors == nullptr) return Status::OK();
  if (!cJSON_IsArray(errors)) return Status::InvalidArgument("\"errors\" is not an array");
  const cJSON* first = errors->child;
  if (first == nullptr) return Status::OK();
  std::string text;
  if (cJSON_IsObject(first)) {
    const cJSON* e = cJSON_GetObjectItemCaseSensitive(first, "error");
    if (cJSON_IsString(e)) text = e->valuestring;
  }
  if (text.size() > 200) text.resize(200);
  return Status::Unavailable("reports an error: " + (text.empty() ? "(no text)" : text));
}

// No member name twice: cJSON would keep both and a lookup would see only the first.
Status NoDuplicateNames(const cJSON* obj) {
  std::set<std::string_view> names;
  const cJSON* item = nullptr;
  cJSON_ArrayForEach(item, obj) {
    if (item->string != nullptr && !names.insert(item->string).second) {
      return Status::InvalidArgument("field '" + std::string(item->string).substr(0, 64) +
                                     "' appears twice");
    }
  }
  return Status::OK();
}

// Every name in `job` (its id and aliases, lower case) not yet in `seen`; else an error.
Status CheckUnique(const SchedulerJob& job, std::set<std::string>* seen) {
  std::set<std::string> own;
  own.insert(Lower(job.id));
  for (const std::string& a : job.aliases) own.insert(Lower(a));
  for (const std::string& name : own) {
    if (!seen->insert(name).second) {
      return Status::InvalidArgument("two jobs are named '" + name + "'");
    }
  }
  return Status::OK();
}

constexpr int64_t kMaxJobNumber = 0xffffffffLL;

Status ParseSlurmJob(const cJSON* j, const SlurmNodes& nodes, std::vector<std::string>* unknown,
                     SchedulerJob* job) {
  if (!cJSON_IsObject(j)) return Status::InvalidArgument("a job is not an object");
  BP_RETURN_IF_ERROR(NoDuplicateNames(j));
  int64_t job_id = 0, user_id = 0;
  BP_RETURN_IF_ERROR(RequiredInt(j, "job_id", 1, kMaxJobNumber, &job_id));
  BP_RETURN_IF_ERROR(RequiredInt(j, "user_id", 0, kMaxJobNumber - 1, &user_id));
  std::optional<int64_t> array_job_id, array_task_id, het_job_id, het_job_offset, end_time,
      time_limit;
  BP_RETURN_IF_ERROR(OptionalInt(j, "array_job_id", 0, kMaxJobNumber, &array_job_id));
  BP_RETURN_IF_ERROR(OptionalInt(j, "array_task_id", 0, kMaxJobNumber, &array_task_id));
  BP_RETURN_IF_ERROR(OptionalInt(j, "het_job_id", 0, kMaxJobNumber, &het_job_id));
  BP_RETURN_IF_ERROR(OptionalInt(j, "het_job_offset", 0, kMaxJobNumber, &het_job_offset));
  BP_RETURN_IF_ERROR(OptionalInt(j, "end_time", 0, kMaxJobTime, &end_time));
  BP_RETURN_IF_ERROR(OptionalInt(j, "time_limit", 0, kMaxJobNumber, &time_limit));
  std::string state, node_list;
  BP_RETURN_IF_ERROR(String(j, "job_state", true, &state));
  BP_RETURN_IF_ERROR(String(j, "nodes", false, &node_list));
  if (state.empty() || state.size() > 64) return Status::InvalidArgument("bad job_state");

  const std::string raw = std::to_string(job_id);
  if (het_job_id.value_or(0) != 0) {
    // A heterogeneous job's component "L+O"; sbatch printed "L", the leader's (offset 0) id.
    const std::string leader = std::to_string(*het_job_id);
    job->id = leader + "+" + std::to_string(het_job_offset.value_or(0));
    AddUnique(&job->aliases, raw);
    if (het_job_offset.value_or(0) == 0) AddUnique(&job->aliases, leader);
  } else if (array_job_id.value_or(0) != 0 && array_task_id) {
    job->id = std::to_string(*array_job_id) + "_" + std::to_string(*array_task_id);
    AddUnique(&job->aliases, raw);
  } else {
    // A plain job, or the pending rest of an array that has no task of its own yet.
    job->id = raw;
  }
  job->owner = static_cast<uid_t>(user_id);
  job->state = state;
  job->running = state == "RUNNING" || state == "CONFIGURING";
  // Without a time limit squeue still prints an end_time (about a year ahead): not a limit.
  // No limit is null, or Slurm's INFINITE (0xffffffff) or NO_VAL (0xfffffffe) printed raw.
  const bool limited = time_limit && *time_limit < 0xfffffffeLL;
  job->end_time = limited && end_time ? *end_time : 0;

  auto names = ExpandHostlist(node_list);
  if (!names.ok()) return names.status().WithContext("job " + job->id + " nodes");
  for (const std::string& name : *names) {
    AddUnique(&job->hosts, Lower(name));
    auto node = nodes.find(name);
    if (node == nodes.end()) {
      if (unknown != nullptr) AddUnique(unknown, name);
      continue;
    }
    AddUnique(&job->hosts, Lower(node->second.hostname));
    AddUnique(&job->hosts, Lower(node->second.address));
  }
  return Status::OK();
}

// ---- PBS ----

// "01:00:00", "1:00", "3600" (PBS walltime forms) in seconds; nullopt if unreadable.
std::optional<int64_t> PbsDuration(std::string_view text) {
  if (text.empty() || text.size() > 32) return std::nullopt;
  int64_t total = 0;
  int fields = 0;
  size_t at = 0;
  while (at <= text.size()) {
    size_t colon = text.find(':', at);
    if (colon == std::string_view::npos) colon = text.size();
    uint64_t v = 0;
    if (!ParseNumber(text.substr(at, colon - at), &v).ok() || v > 1'000'000'000) {
      return std::nullopt;
    }
    total = total * 60 + static_cast<int64_t>(v);
    if (++fields > 3) return std::nullopt;
    at = colon + 1;
  }
  return total;
}

// A PBS time attribute: a ctime string ("Thu Dec  3 12:00:00 2026", local time) or seconds.
std::optional<int64_t> PbsTime(const cJSON* item) {
  if (item == nullptr) return std::nullopt;
  if (cJSON_IsNumber(item)) {
    double v = item->valuedouble;
    if (v < 0 || v > static_cast<double>(kMaxJobTime)) return std::nullopt;
    return static_cast<int64_t>(v);
  }
  if (!cJSON_IsString(item)) return std::nullopt;
  struct tm tm {};
  const char* end = strptime(item->valuestring, "%a %b %d %H:%M:%S %Y", &tm);
  if (end == nullptr || *end != '\0') return std::nullopt;
  tm.tm_isdst = -1;
  time_t t = mktime(&tm);
  if (t < 0) return std::nullopt;
  return static_cast<int64_t>(t);
}

// "123.server" -> "123"; "123[4].server" -> "123_4"; "123[].server" (an array's parent) ->
// "123". Empty if the name has no such shape.
std::string PbsJobId(std::string_view name) {
  size_t dot = name.find('.');
  std::string_view head = name.substr(0, dot);
  size_t open = head.find('[');
  std::string_view number = head.substr(0, open);
  if (number.empty() || number.size() > 18 ||
      number.find_first_not_of("0123456789") != std::string_view::npos) {
    return "";
  }
  if (open == std::string_view::npos) return std::string(number);
  if (head.back() != ']') return "";
  std::string_view index = head.substr(open + 1, head.size() - open - 2);
  if (index.empty()) return std::string(number);
  if (index.size() > 18 || index.find_first_not_of("0123456789") != std::string_view::npos) {
    return "";
  }
  return std::string(number) + "_" + std::string(index);
}

Status ParsePbsJob(const cJSON* j, const UidLookup& uid_of, SchedulerJob* job) {
  if (!cJSON_IsObject(j)) return Status::InvalidArgument("job " + job->id + " is not an object");
  BP_RETURN_IF_ERROR(NoDuplicateNames(j));
  std::string state, euser, owner, exec_host;
  BP_RETURN_IF_ERROR(String(j, "job_state", true, &state));
  BP_RETURN_IF_ERROR(String(j, "euser", false, &euser));
  BP_RETURN_IF_ERROR(String(j, "Job_Owner", false, &owner));
  BP_RETURN_IF_ERROR(String(j, "exec_host", false, &exec_host));
  if (state.empty() || state.size() > 64) return Status::InvalidArgument("bad job_state");
  job->state = state;
  job->running = state == "R";
  std::string user = !euser.empty() ? euser : owner.substr(0, owner.find('@'));
  if (user.empty()) return Status::InvalidArgument("job " + job->id + " names no user");
  job->owner = uid_of(user).value_or(kNoOwner);
  // "node1/0*2+node2/1": hosts with their cpu slots.
  size_t at = 0;
  while (!exec_host.empty() && at <= exec_host.size()) {
    size_t plus = exec_host.find('+', at);
    if (plus == std::string::npos) plus = exec_host.size();
    std::string_view part = std::string_view(exec_host).substr(at, plus - at);
    std::string_view host = part.substr(0, part.find('/'));
    if (host.empty() || host.size() > kMaxHostNameBytes ||
        !std::all_of(host.begin(), host.end(), HostNameChar)) {
      return Status::InvalidArgument("job " + job->id + ": bad exec_host");
    }
    AddUnique(&job->hosts, Lower(host));
    at = plus + 1;
  }
  const cJSON* resources = cJSON_GetObjectItemCaseSensitive(j, "Resource_List");
  std::optional<int64_t> walltime;
  if (resources != nullptr) {
    if (!cJSON_IsObject(resources)) return Status::InvalidArgument("Resource_List not an object");
    const cJSON* w = cJSON_GetObjectItemCaseSensitive(resources, "walltime");
    if (cJSON_IsString(w)) walltime = PbsDuration(w->valuestring);
  }
  std::optional<int64_t> start = PbsTime(cJSON_GetObjectItemCaseSensitive(j, "stime"));
  job->end_time = walltime && start && *start + *walltime <= kMaxJobTime ? *start + *walltime : 0;
  return Status::OK();
}

// ---- running a command ----

int64_t MonotonicMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr size_t kMaxStderrBytes = 4096;

// Runs argv (PATH searched, the daemon's environment) with stdin from /dev/null, collects
// stdout (at most `max_out` bytes) and the start of stderr. The child leads a process group of
// its own, which is killed (SIGKILL) on timeout or overflow, so a wrapper script's children
// go too; the child is always reaped. Blocks: call it off the loop thread.
Status RunCommand(const std::vector<std::string>& argv, int64_t timeout_ms, size_t max_out,
                  std::string* out) {
  const std::string what = argv[0] + (argv.size() > 1 ? " " + argv[1] : "");
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return PosixError(what + ": pipe", errno);
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    int err = errno;
    close(out_pipe[0]);
    close(out_pipe[1]);
    return PosixError(what + ": pipe", err);
  }
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  posix_spawnattr_init(&attr);
  // Default signal dispositions (the daemon ignores SIGPIPE) and an empty mask for the
  // child, and a process group of its own that a timeout can kill whole.
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (rc != 0) {
    close(out_pipe[0]);
    close(err_pipe[0]);
    return Status::Unavailable(what + ": cannot run: " + std::strerror(rc));
  }

  std::string err_text;
  bool out_open = true, err_open = true, too_much = false, timed_out = false;
  const int64_t deadline = MonotonicMs() + timeout_ms;
  while (out_open || err_open) {
    int64_t left = deadline - MonotonicMs();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd fds[2] = {{out_open ? out_pipe[0] : -1, POLLIN, 0},
                     {err_open ? err_pipe[0] : -1, POLLIN, 0}};
    int n = poll(fds, 2, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (n < 0 && errno != EINTR) break;
    char buf[65536];
    for (int i = 0; i < 2; ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t got = read(fds[i].fd, buf, sizeof(buf));
      if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (got <= 0) {
        (i == 0 ? out_open : err_open) = false;
        continue;
      }
      if (i == 0) {
        if (out->size() + static_cast<size_t>(got) > max_out) {
          too_much = true;
          break;
        }
        out->append(buf, static_cast<size_t>(got));
      } else if (err_text.size() < kMaxStderrBytes) {
        err_text.append(buf, std::min(static_cast<size_t>(got), kMaxStderrBytes - err_text.size()));
      }
    }
    if (too_much) break;
  }
  close(out_pipe[0]);
  close(err_pipe[0]);
  if (timed_out || too_much) kill(-pid, SIGKILL);
  // The output ended: wait (until the deadline) for the child to exit, without reaping it.
  while (!timed_out && !too_much) {
    siginfo_t info{};
    int rc = waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
    if (rc == 0 && info.si_pid == pid) break;
    if (rc < 0 && errno != EINTR) break;
    if (MonotonicMs() >= deadline) {
      timed_out = true;
      break;
    }
    usleep(2000);
  }
  // Whatever is left of its process group (a wrapper's children) goes too. Only now, with the
  // child exited but not yet reaped: its pid, and so the group's id, cannot have been reused
  // by then (as root, a stale -pid could kill another user's process group).
  kill(-pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }

  if (timed_out) {
    return Status::Unavailable(what + " timed out after " + std::to_string(timeout_ms) + " ms");
  }
  if (too_much) {
    return Status::Unavailable(what + " printed more than " + std::to_string(max_out) + " bytes");
  }
  // The first line of stderr, printable, for the message.
  std::string first = err_text.substr(0, err_text.find('\n'));
  for (char& c : first) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
  }
  if (WIFSIGNALED(status)) {
    return Status::Unavailable(what + " killed by signal " + std::to_string(WTERMSIG(status)) +
                               (first.empty() ? "" : ": " + first));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (code == 127 && first.empty()) first = "not found";
    return Status::Unavailable(what + " exited " + std::to_string(code) +
                               (first.empty() ? "" : ": " + first));
  }
  return Status::OK();
}

// ---- the schedulers ----

// What one call on the pool works with: the options, and (Slurm) the node map it keeps
// between calls. Only the one call in flight touches it.
struct CallState {
  SchedulerOptions options;
  SlurmNodes nodes;
  int64_t nodes_at_ms = -1;  // MonotonicMs() of the last sinfo; -1: never
};

// How long sinfo's node names are trusted; a job naming an unknown node asks again sooner.
constexpr int64_t kNodeCacheMs = 60000;

Result<JobTable> ListSlurm(CallState* st) {
  const SchedulerOptions& o = st->options;
  auto refresh_nodes = [st, &o]() -> Status {
    std::string out;
    BP_RETURN_IF_ERROR(
        RunCommand({o.sinfo, "--json"}, o.call_timeout_ms, o.max_output_bytes, &out));
    auto nodes = ParseSlurmNodes(out);
    if (!nodes.ok()) return nodes.status().WithContext("sinfo --json");
    st->nodes = std::move(*nodes);
    st->nodes_at_ms = MonotonicMs();
    return Status::OK();
  };
  bool fresh_nodes = false;
  if (st->nodes_at_ms < 0 || MonotonicMs() - st->nodes_at_ms > kNodeCacheMs) {
    BP_RETURN_IF_ERROR(refresh_nodes());
    fresh_nodes = true;
  }
  std::string out;
  BP_RETURN_IF_ERROR(RunCommand({o.squeue, "--json"}, o.call_timeout_ms, o.max_output_bytes, &out));
  std::vector<std::string> unknown;
  auto table = ParseSlurmJobs(out, st->nodes, &unknown);
  if (!table.ok()) return table.status().WithContext("squeue --json");
  if (!unknown.empty() && !fresh_nodes) {
    // A node added since the last sinfo: learn its names, then read the same listing again.
    BP_RETURN_IF_ERROR(refresh_nodes());
    table = ParseSlurmJobs(out, st->nodes, nullptr);
    if (!table.ok()) return table.status().WithContext("squeue --json");
  }
  return table;
}

Result<JobTable> ListPbs(CallState* st) {
  const SchedulerOptions& o = st->options;
  std::string out;
  BP_RETURN_IF_ERROR(
      RunCommand({o.qstat, "-f", "-F", "json"}, o.call_timeout_ms, o.max_output_bytes, &out));
  // One look-up per user, not per job: a user may have thousands.
  std::map<std::string, std::optional<uid_t>> uids;
  auto table = ParsePbsJobs(out, [&uids](const std::string& user) {
    auto it = uids.find(user);
    if (it == uids.end()) it = uids.emplace(user, LookUpUid(user)).first;
    return it->second;
  });
  if (!table.ok()) return table.status().WithContext("qstat -f -F json");
  return table;
}

class CommandScheduler final : public Scheduler {
 public:
  CommandScheduler(loop::Loop* loop, const SchedulerOptions& options)
      : loop_(loop), state_(std::make_shared<CallState>()) {
    state_->options = options;
  }

  SchedulerType type() const override { return state_->options.type; }

  loop::Pending List(int64_t max_age_ms, Done done) override {
    // Younger than both the caller's bound and cache_ms; 0 always asks the scheduler.
    int64_t max_age = std::min(max_age_ms, state_->options.cache_ms);
    if (table_ && static_cast<int64_t>(loop_->Now() - table_at_) < max_age) {
      return loop::Post(*loop_, [done = std::move(done), table = table_] { done(table); });
    }
    auto attached = std::make_shared<bool>(true);
    waiters_.push_back(Waiter{attached, std::move(done)});
    if (!call_.active()) Start();
    return loop::WatchPending(std::move(attached));
  }

 private:
  struct Waiter {
    std::shared_ptr<bool> attached;
    Done done;
  };

  void Start() {
    auto state = state_;
    auto result = std::make_shared<std::optional<Result<JobTable>>>();
    call_started_ns_ = uv_hrtime();
    call_ = loop::QueueWork(
        *loop_,
        [state, result] {
          *result = state->options.type == SchedulerType::kPbs ? ListPbs(state.get())
                                                               : ListSlurm(state.get());
        },
        [this, result] { Finish(std::move(**result)); });
  }

  void Finish(Result<JobTable> result) {
    const char* name = SchedulerTypeName(type());
    Result<Table> answer = Status::Internal("unset");
    call_seconds_.Observe(static_cast<double>(uv_hrtime() - call_started_ns_) / 1e9);
    if (!result.ok()) ++call_failures_;
    if (result.ok()) {
      table_ = std::make_shared<const JobTable>(std::move(*result));
      table_at_ = loop_->Now();
      answer = table_;
    } else {
      answer = result.status().WithContext(name);
    }
    // Callers may call List() again from their callback: take the list first.
    std::vector<Waiter> waiters = std::move(waiters_);
    waiters_.clear();
    for (Waiter& w : waiters) {
      if (*w.attached) w.done(answer);
    }
  }

  loop::Loop* loop_;
  std::shared_ptr<CallState> state_;
  loop::Pending call_;
  std::vector<Waiter> waiters_;
  Table table_;
  uint64_t table_at_ = 0;
  uint64_t call_started_ns_ = 0;
};

}  // namespace

const char* SchedulerTypeName(SchedulerType type) {
  switch (type) {
    case SchedulerType::kNone:
      return "none";
    case SchedulerType::kSlurm:
      return "slurm";
    case SchedulerType::kPbs:
      return "pbs";
  }
  return "none";
}

void JobTable::Add(SchedulerJob job) {
  // A printed id wins over an alias of the same spelling, whichever came first.
  ids_.emplace(Lower(job.id), jobs_.size());
  for (const std::string& alias : job.aliases) aliases_.emplace(Lower(alias), jobs_.size());
  jobs_.push_back(std::move(job));
}

const SchedulerJob* JobTable::Find(std::string_view id) const {
  const std::string want = Lower(id);
  if (auto it = ids_.find(want); it != ids_.end()) return &jobs_[it->second];
  if (auto it = aliases_.find(want); it != aliases_.end()) return &jobs_[it->second];
  return nullptr;
}

std::unique_ptr<Scheduler> MakeScheduler(loop::Loop* loop, const SchedulerOptions& options) {
  if (options.type == SchedulerType::kNone) return nullptr;
  return std::make_unique<CommandScheduler>(loop, options);
}

Result<std::vector<std::string>> ExpandHostlist(std::string_view expression) {
  std::vector<std::string> names;
  size_t at = 0, depth = 0, start = 0;
  if (expression.empty()) return names;
  for (at = 0; at <= expression.size(); ++at) {
    char c = at < expression.size() ? expression[at] : ',';
    if (c == '[') ++depth;
    if (c == ']' && depth > 0) --depth;
    if (c != ',' || depth > 0) continue;
    BP_RETURN_IF_ERROR(ExpandOne(expression.substr(start, at - start), &names));
    start = at + 1;
  }
  if (depth > 0) return Status::InvalidArgument("hostlist: unbalanced [");
  return names;
}

Result<SlurmNodes> ParseSlurmNodes(std::string_view sinfo_json) {
  auto root = ParseRoot(sinfo_json);
  if (!root.ok()) return root.status();
  BP_RETURN_IF_ERROR(SlurmErrors(root->get()));
  const cJSON* list = cJSON_GetObjectItemCaseSensitive(root->get(), "nodes");
  if (!cJSON_IsArray(list)) return Status::InvalidArgument("no \"nodes\" array");
  SlurmNodes nodes;
  const cJSON* n = nullptr;
  cJSON_ArrayForEach(n, list) {
    if (!cJSON_IsObject(n)) return Status::InvalidArgument("a node is not an object");
    BP_RETURN_IF_ERROR(NoDuplicateNames(n));
    SlurmNode node;
    BP_RETURN_IF_ERROR(String(n, "name", true, &node.name));
    BP_RETURN_IF_ERROR(String(n, "hostname", false, &node.hostname));
    BP_RETURN_IF_ERROR(String(n, "address", false, &node.address));
    for (const std::string* s : {&node.name, &node.hostname, &node.address}) {
      if (s->size() > kMaxHostNameBytes || !std::all_of(s->begin(), s->end(), [](char c) {
            return HostNameChar(c) || c == ':';  // NodeAddr may be IPv6
          })) {
        return Status::InvalidArgument("node '" + node.name.substr(0, 64) + "': bad name");
      }
    }
    if (node.name.empty()) return Status::InvalidArgument("a node without a name");
    std::string name = node.name;
    if (!nodes.emplace(name, std::move(node)).second) {
      return Status::InvalidArgument("node '" + name + "' listed twice");
    }
  }
  return nodes;
}

Result<JobTable> ParseSlurmJobs(std::string_view squeue_json, const SlurmNodes& nodes,
                                std::vector<std::string>* unknown) {
  auto root = ParseRoot(squeue_json);
  if (!root.ok()) return root.status();
  BP_RETURN_IF_ERROR(SlurmErrors(root->get()));
  const cJSON* list = cJSON_GetObjectItemCaseSensitive(root->get(), "jobs");
  if (!cJSON_IsArray(list)) return Status::InvalidArgument("no \"jobs\" array");
  JobTable table;
  std::set<std::string> seen;
  const cJSON* j = nullptr;
  cJSON_ArrayForEach(j, list) {
    SchedulerJob job;
    BP_RETURN_IF_ERROR(ParseSlurmJob(j, nodes, unknown, &job));
    BP_RETURN_IF_ERROR(CheckUnique(job, &seen));
    table.Add(std::move(job));
  }
  return table;
}

std::optional<uid_t> LookUpUid(const std::string& user) {
  passwd pw{};
  passwd* found = nullptr;
  std::vector<char> buf(16384);
  for (;;) {
    int rc = getpwnam_r(user.c_str(), &pw, buf.data(), buf.size(), &found);
    if (rc == ERANGE && buf.size() < (1u << 20)) {
      buf.resize(buf.size() * 2);
      continue;
    }
    if (rc != 0 || found == nullptr) return std::nullopt;
    return pw.pw_uid;
  }
}

Result<JobTable> ParsePbsJobs(std::string_view qstat_json, const UidLookup& uid_of) {
  auto root = ParseRoot(qstat_json);
  if (!root.ok()) return root.status();
  JobTable table;
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(root->get(), "Jobs");
  if (jobs == nullptr) return table;  // qstat prints no "Jobs" when there are none
  if (!cJSON_IsObject(jobs)) return Status::InvalidArgument("\"Jobs\" is not an object");
  std::set<std::string> seen;
  const cJSON* j = nullptr;
  cJSON_ArrayForEach(j, jobs) {
    std::string printed = j->string != nullptr ? j->string : "";
    SchedulerJob job;
    job.id = PbsJobId(printed);
    if (job.id.empty() || printed.size() > 255) {
      return Status::InvalidArgument("bad job name '" + printed.substr(0, 64) + "'");
    }
    if (printed != job.id) job.aliases.push_back(printed);
    BP_RETURN_IF_ERROR(ParsePbsJob(j, uid_of, &job));
    BP_RETURN_IF_ERROR(CheckUnique(job, &seen));
    table.Add(std::move(job));
  }
  return table;
}

}  // namespace brokerproxy::registry
