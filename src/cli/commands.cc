#include "cli/commands.h"

#include <netdb.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <climits>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <iterator>
#include <memory>
#include <set>

#include "loop/address.h"
#include "loop/file.h"
#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/process.h"
#include "loop/signal.h"
#include "loop/timer.h"
#include "loop/work.h"
#include "proxy/tls/certs.h"
#include "registry/control_protocol.h"
#include "registry/json.h"

extern char** environ;

namespace brokerproxy::cli {

using registry::Job;
using registry::JsonPtr;
using registry::Op;
using registry::Request;
using registry::SecretField;

namespace {

constexpr int64_t kCallTimeoutMs = 30000;

std::string FormatTime(int64_t unix_seconds) {
  if (unix_seconds == 0) return "never";
  time_t t = static_cast<time_t>(unix_seconds);
  tm utc{};
  gmtime_r(&t, &utc);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

// How far off `unix_seconds` is from `now`, coarsely: "in 2d 3h", "in 5m 10s", "expired".
std::string FormatRemaining(int64_t unix_seconds, int64_t now) {
  int64_t left = unix_seconds - now;
  if (left <= 0) return "expired";
  struct Unit {
    int64_t seconds;
    const char* suffix;
  };
  static constexpr Unit kUnits[] = {{86400, "d"}, {3600, "h"}, {60, "m"}, {1, "s"}};
  std::string out = "in";
  int shown = 0;
  for (const Unit& u : kUnits) {
    // The two largest units that are not zero: enough to read at a glance.
    if (left >= u.seconds && shown < 2) {
      out += " " + std::to_string(left / u.seconds) + u.suffix;
      left %= u.seconds;
      ++shown;
    } else if (shown > 0) {
      ++shown;  // a zero unit after the first ends the form: "in 2d", not "in 2d 5m"
    }
  }
  return out;
}

// "never", or the UTC time, how far off it is and the unix seconds.
std::string DescribeExpiry(int64_t expires) {
  if (expires == 0) return "never";
  return FormatTime(expires) + " (" + FormatRemaining(expires, ::time(nullptr)) + "; unix " +
         std::to_string(expires) + ")";
}

struct ShownJob {
  Job job;
  registry::JobState state = registry::JobState::kReady;
};

Result<ShownJob> JobFromReply(const cJSON* reply, const char* member, SecretField secret) {
  const cJSON* j = cJSON_GetObjectItemCaseSensitive(reply, member);
  if (!j) return Status::IOError(std::string("reply has no '") + member + "'");
  ShownJob shown;
  Status s = registry::JobFromJson(j, secret, &shown.job, &shown.state);
  if (!s.ok()) return Status::IOError("malformed reply: " + s.message());
  return shown;
}

void PrintJob(const ShownJob& shown, OutputFormat format) {
  const Job& job = shown.job;
  if (format == OutputFormat::kEnv) {
    std::printf("BROKER_JOB_ID=%s\nBROKER_TYPE=%s\nBROKER_HOST=%s\nBROKER_PORT=%d\n",
                job.id.c_str(), registry::JobTypeName(job.type), job.host.c_str(), job.port);
    if (!job.secret.empty()) std::printf("BROKER_SECRET=%s\n", job.secret.c_str());
    if (!job.cert_path.empty()) {
      std::printf("BROKER_CERT=%s\nBROKER_CERTKEY=%s\n", job.cert_path.c_str(),
                  job.key_path.c_str());
    }
    return;
  }
  std::printf("job:      %s\ntype:     %s\nbackend:  %s:%d\n", job.id.c_str(),
              registry::JobTypeName(job.type), job.host.c_str(), job.port);
  if (!job.secret.empty()) std::printf("secret:   %s\n", job.secret.c_str());
  if (!job.cert_path.empty()) {
    std::printf("cert:     %s\ncertkey:  %s\n", job.cert_path.c_str(), job.key_path.c_str());
  }
  std::printf("state:    %s\nexpires:  %s\n", registry::JobStateName(shown.state),
              DescribeExpiry(job.expires).c_str());
}

// Can a service on this host bind `port`? A port of the range may be held here by anything
// (another program, an outgoing connection) even though no job holds it.
bool PortFreeHere(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return true;  // cannot tell: let the service try
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool free =
      ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 || errno != EADDRINUSE;
  ::close(fd);
  return free;
}

void PrintRaw(const cJSON* reply) { std::printf("%s\n", registry::PrintJson(reply).c_str()); }

Request MakeRequest(Op op, const std::string& job = std::string()) {
  Request req;
  req.op = op;
  req.job = job;
  return req;
}

// Sends `req`. With --json the reply is printed as it came and nullptr returned (nothing left
// to do); otherwise the reply is returned for the caller to print.
Result<JsonPtr> Ask(BrokerClient* client, const Request& req, OutputFormat format,
                    int64_t timeout_ms = kCallTimeoutMs) {
  auto reply = client->Call(req, timeout_ms);
  if (!reply.ok() || format != OutputFormat::kJson) return reply;
  PrintRaw(reply->get());
  return JsonPtr();
}

// mkdir -p; directories it creates get mode 0700 (they hold private keys).
Status MakePrivateDirs(const std::string& path) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) {
      return PosixError("cannot create directory " + prefix, errno);
    }
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::IOError(path + " is not a directory");
  }
  return Status::OK();
}

// The key and certificate files of an ssl job, on the client side. The new key waits in memory
// until the broker accepted the job, so a refused save (another user's id, a daemon that is
// down) leaves the key of an earlier save of the same job in place; each file is then written
// with loop::WriteFileAtomic.
struct JobKeyFiles {
  std::string cert_path;
  std::string key_path;
  std::string pending_key_pem;
  std::string csr_pem;

  // Writes the new key into place.
  Status Commit() {
    BP_RETURN_IF_ERROR(loop::WriteFileAtomic(key_path, pending_key_pem, 0600));
    Discard();
    return Status::OK();
  }
  // Forgets the new key (its bytes too: it is a private key).
  void Discard() {
    OPENSSL_cleanse(pending_key_pem.data(), pending_key_pem.size());
    pending_key_pem.clear();
  }
  void Remove() {
    Discard();
    ::unlink(key_path.c_str());
    ::unlink(cert_path.c_str());
  }
};

// Creates the job's key and a CSR for it, and checks that `dir` can take the files. The key never
// leaves this machine.
Result<JobKeyFiles> PrepareJobKey(const std::string& dir_arg, const std::string& job_id) {
  std::string dir = dir_arg.empty() ? DefaultCertDir() : dir_arg;
  if (dir.empty()) return Status::InvalidArgument("no certificate directory: pass --cert-dir");
  BP_RETURN_IF_ERROR(MakePrivateDirs(dir));
  char real[PATH_MAX];
  if (::realpath(dir.c_str(), real) == nullptr) return PosixError("cannot resolve " + dir, errno);
  // A directory the files cannot go to is refused before anything is saved.
  if (::access(real, W_OK | X_OK) != 0)
    return PosixError("cannot write to " + std::string(real), errno);
  auto key = proxy::GenerateKeyAndCsr(job_id);
  if (!key.ok()) return key.status();
  JobKeyFiles files;
  files.key_path = std::string(real) + "/" + job_id + ".key";
  files.cert_path = std::string(real) + "/" + job_id + ".crt";
  files.pending_key_pem = std::move(key->key_pem);
  files.csr_pem = std::move(key->csr_pem);
  return files;
}

std::string StringField(const cJSON* obj, const char* name) {
  const cJSON* v = cJSON_GetObjectItemCaseSensitive(obj, name);
  return cJSON_IsString(v) ? v->valuestring : "";
}

// Does anything accept TCP connections on `host`:`port`? At most `timeout_ms` per address (a
// host that drops packets); false if the name does not resolve.
bool SomethingListens(const std::string& host, int port, int timeout_ms) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return false;
  bool listens = false;
  for (addrinfo* ai = res; ai && !listens; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) continue;
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      listens = true;
    } else if (errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof(err);
      listens = ::poll(&p, 1, timeout_ms) == 1 &&
                ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
    }
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return listens;
}

// Exec mode with an explicit --port: the command is about to listen there, so the port must
// be free now. Bound here, like the command would (a listener of anyone on any local address
// holds it), and dialled at the job's host (which may name another address of this host, or a
// host where binding here proves nothing): a port someone listens on would route this job's
// connections to their service, not to the command.
Status CheckExplicitPortFree(const std::string& host, int port) {
  if (!PortFreeHere(port) || SomethingListens(host, port, 1000)) {
    return Status::AlreadyExists(
        "port " + std::to_string(port) + " is already in use on " + host +
        " (something listens there or holds it): the command could not listen there, and "
        "connections to this job would reach whatever does; pick another --port, or leave it "
        "out to get a free one");
  }
  return Status::OK();
}

bool IsDirectory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Where execvp would find `cmd`: "" (and *exit_code 127) if nowhere, else the path; *exit_code
// 126 if what is there cannot be executed (a directory, no x bit), as the shell tells them.
std::string FindCommand(const std::string& cmd, int* exit_code) {
  auto executable = [](const std::string& path, int* code) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return false;
    *code = S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0 ? 0 : 126;
    return true;
  };
  *exit_code = 127;
  if (cmd.empty()) return "";
  if (cmd.find('/') != std::string::npos) return executable(cmd, exit_code) ? cmd : "";
  const char* env = std::getenv("PATH");
  std::string path = env ? env : "/usr/local/bin:/usr/bin:/bin";
  std::string found;
  int found_code = 127;
  for (size_t start = 0; start <= path.size();) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    std::string candidate = (dir.empty() ? "." : dir) + "/" + cmd;
    int code = 127;
    if (executable(candidate, &code)) {
      if (code == 0) {
        *exit_code = 0;
        return candidate;
      }
      // execvp goes on past one it may not run, and reports EACCES if nothing else is found.
      if (found.empty()) {
        found = candidate;
        found_code = code;
      }
    }
    start = end + 1;
  }
  *exit_code = found_code;
  return found;
}

// The placeholders SubstitutePlaceholders knows.
constexpr const char* kPlaceholders[] = {"{port}", "{job}",     "{host}",
                                         "{cert}", "{certkey}", "{secret}"};

// Every "{name}" in the command (a lowercase word in braces, as every placeholder is) must be
// one of kPlaceholders: a misspelt one would reach the command as it is (a service told to
// listen on "{prot}" fails late, or listens elsewhere). Braces right after a name or a "$" are
// code, not placeholders: a shell's ${NAME}, Perl's $ENV{PORT} or $h{key}.
Status CheckPlaceholders(const std::vector<std::string>& command) {
  auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (const std::string& arg : command) {
    for (size_t open = arg.find('{'); open != std::string::npos; open = arg.find('{', open + 1)) {
      if (open > 0 && (arg[open - 1] == '$' || is_word(arg[open - 1]))) continue;
      size_t end = open + 1;
      while (end < arg.size() && arg[end] >= 'a' && arg[end] <= 'z') ++end;
      if (end == open + 1 || end >= arg.size() || arg[end] != '}') continue;
      std::string name = arg.substr(open, end - open + 1);
      bool known = false;
      for (const char* k : kPlaceholders) known = known || name == k;
      if (known) continue;
      std::string list;
      for (const char* k : kPlaceholders) list += std::string(list.empty() ? "" : " ") + k;
      return Status::InvalidArgument("unknown placeholder " + name + " in the command; known: " +
                                     list + " (code with such braces goes in a script file)");
    }
  }
  return Status::OK();
}

// How long exec mode's deregistration on SIGTERM may hold back the signal: the scheduler's
// KillWait (30 s by default in Slurm) must remain for the service to stop.
constexpr int64_t kDeregisterTimeoutMs = 3000;

// The hidden first argument with which this binary runs as the exec wrapper (ExecChildMain).
constexpr const char* kExecChildFlag = "--exec-child";

// Runs `cmd` with the job's values, forwarding signals, and returns its exit code.
// `on_first_term` runs once, on the first SIGTERM, on the thread pool: that SIGTERM is forwarded
// once it returned, or after kDeregisterTimeoutMs, whichever comes first (signals meanwhile are
// forwarded at once). It must touch nothing the loop thread uses until RunCommand returns.
//
// The command dies with this process: it is started through this binary's exec wrapper
// (ExecChildMain), which sets PR_SET_PDEATHSIG(SIGKILL) between fork and exec. uv_spawn offers
// no hook there, and a fork/exec of our own would have to take SIGCHLD and reaping away from
// libuv; re-executing /proc/self/exe (the binary that runs now, even if replaced on disk) keeps
// loop::Process as it is at the cost of one exec. Without this, a `save` killed with SIGKILL
// (the scheduler after KillWait, the OOM killer) would leave the service running unregistered
// after the job ended, on a port that the registry hands out again.
Result<int> RunCommand(const std::vector<std::string>& command, const Job& job,
                       const std::string& secret_env, int64_t ready_timeout_ms,
                       const std::function<void()>& on_first_term) {
  std::vector<std::string> args = {"/proc/self/exe", kExecChildFlag, std::to_string(::getpid()),
                                   "--"};
  for (const auto& a : command) args.push_back(SubstitutePlaceholders(a, job));
  std::vector<std::string> env;
  const std::string secret_prefix = secret_env + "=";
  for (char** e = environ; *e; ++e) {
    std::string_view entry(*e);
    if (entry.substr(0, 7) == "BROKER_") continue;
    // Ours replaces an inherited one (a token of an earlier run of the same shell).
    if (!secret_env.empty() && entry.substr(0, secret_prefix.size()) == secret_prefix) continue;
    env.emplace_back(entry);
  }
  // The environment, unlike the arguments, is readable only by the process's own user (and
  // root): /proc/PID/environ is mode 0400 where /proc/PID/cmdline is world-readable.
  if (!secret_env.empty()) env.push_back(secret_prefix + job.secret);
  env.push_back("BROKER_JOB_ID=" + job.id);
  env.push_back(std::string("BROKER_TYPE=") + registry::JobTypeName(job.type));
  env.push_back("BROKER_HOST=" + job.host);
  env.push_back("BROKER_PORT=" + std::to_string(job.port));
  env.push_back("BROKER_SECRET=" + job.secret);
  if (!job.cert_path.empty()) {
    env.push_back("BROKER_CERT=" + job.cert_path);
    env.push_back("BROKER_CERTKEY=" + job.key_path);
  }

  auto loop = loop::Loop::Create();
  if (!loop.ok()) return loop.status();
  int exit_code = 0;
  bool terminating = false;
  std::vector<loop::HandlePtr<loop::Signal>> signals;
  loop::HandlePtr<loop::Process> child;
  // The first SIGTERM, held back while on_first_term runs (the loop waits for it to finish).
  loop::Pending term_work;
  loop::HandlePtr<loop::Timer> term_timer;
  bool term_held = false;
  // After ready_timeout, one look at the job's port (on the thread pool: a host that drops
  // packets blocks for a moment).
  loop::HandlePtr<loop::Timer> ready_timer;
  loop::Pending ready_probe;
  auto release_term = [&] {
    if (!term_held) return;
    term_held = false;
    term_timer.reset();
    if (child) child->Kill(SIGTERM);
  };
  // Watched before the child starts, so that no signal finds this process unprepared.
  for (int signum : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2}) {
    auto sig = loop::Signal::Create(**loop);
    if (!sig.ok()) return sig.status();
    Status s = (*sig)->Start(signum, [&](int n) {
      if (n == SIGTERM && !terminating && on_first_term && child) {
        terminating = true;
        auto timer = loop::Timer::Create(**loop);
        if (timer.ok()) {
          term_held = true;
          term_timer = std::move(timer).value();
          term_timer->Start(static_cast<uint64_t>(kDeregisterTimeoutMs), release_term);
          term_work = loop::QueueWork(**loop, on_first_term, release_term);
          return;
        }
        // No timer to bound the wait: forward now (the deregistration follows at the end).
      }
      if (child) child->Kill(n);
    });
    if (!s.ok()) return s;
    signals.push_back(std::move(sig).value());
  }
  {
    // Its own session only on a terminal, where a ^C would otherwise reach the command twice
    // (from the terminal and forwarded). Otherwise it stays in this process group and session,
    // which the batch system tracks and signals as the job's.
    auto proc = loop::Process::Spawn(
        **loop, args, env,
        [&](int64_t status, int term_signal) {
          exit_code = term_signal ? 128 + term_signal : static_cast<int>(status);
          signals.clear();
          term_timer.reset();
          term_held = false;
          ready_timer.reset();
          ready_probe.Detach();
          child.reset();
        },
        /*new_session=*/::isatty(STDIN_FILENO) == 1);
    if (!proc.ok()) {
      signals.clear();
      (*loop)->Run();
      (void)(*loop)->Close();
      return Status::InvalidArgument("cannot run " + command[0] + ": " + proc.status().message());
    }
    child = std::move(proc).value();
  }
  if (auto timer = loop::Timer::Create(**loop); timer.ok() && ready_timeout_ms > 0) {
    ready_timer = std::move(timer).value();
    ready_timer->Start(static_cast<uint64_t>(ready_timeout_ms), [&] {
      ready_timer.reset();
      auto listens = std::make_shared<bool>(false);
      ready_probe = loop::QueueWork(
          **loop,
          [host = job.host, port = job.port, listens] {
            *listens = SomethingListens(host, port, 1000);
          },
          [&, listens] {
            if (*listens || !child) return;
            // Loud: the daemon gives up probing now, and nobody may be watching the job.
            std::fprintf(stderr,
                         "brokerproxy: WARNING: nothing listens on %s:%d after %s (ready_timeout): "
                         "%s has not started its service there, or listens on another port (pass "
                         "it {port}). Job %s stays registered, and %s keeps running.\n",
                         job.host.c_str(), job.port, FormatDuration(ready_timeout_ms).c_str(),
                         command[0].c_str(), job.id.c_str(), command[0].c_str());
          });
    });
  }
  (*loop)->Run();  // returns once the child exited and a deregistration under way finished
  signals.clear();
  term_timer.reset();
  ready_timer.reset();
  child.reset();
  Status closed = (*loop)->Close();
  if (!closed.ok()) return closed;
  return exit_code;
}

}  // namespace

int ExecChildMain(int argc, char** argv) {
  // argv: brokerproxy --exec-child PARENT_PID -- COMMAND ARGS...
  if (argc < 5 || std::string_view(argv[1]) != kExecChildFlag ||
      std::string_view(argv[3]) != "--") {
    std::fprintf(stderr, "brokerproxy: %s is internal to exec mode\n", kExecChildFlag);
    return 2;
  }
  char* end = nullptr;
  long parent = std::strtol(argv[2], &end, 10);
  if (end == argv[2] || *end != '\0' || parent <= 1) {
    std::fprintf(stderr, "brokerproxy: %s: bad parent pid\n", kExecChildFlag);
    return 2;
  }
  // Kept across execvp (not for a set-user-ID command, which the kernel exempts). It fires when
  // the thread that forked this process ends: `save`'s loop thread, which lives as long as it.
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) {
    std::fprintf(stderr, "brokerproxy: prctl(PR_SET_PDEATHSIG): %s\n", std::strerror(errno));
    return 126;
  }
  // The parent may have died before the death signal was armed: then nobody would send it.
  if (::getppid() != static_cast<pid_t>(parent)) return 128 + SIGKILL;
  ::execvp(argv[4], argv + 4);
  // As the shell says it (`save` checked before saving; this is for a command gone since).
  int err = errno;
  std::fprintf(stderr, "brokerproxy: %s: %s\n", argv[4],
               err == ENOENT ? "command not found" : std::strerror(err));
  return err == ENOENT ? 127 : 126;
}

bool IsExecChild(int argc, char** argv) {
  return argc > 1 && std::string_view(argv[1]) == kExecChildFlag;
}

void PrintJsonError(const Status& status) {
  std::printf("%s\n", registry::EncodeError(status).c_str());
}

Result<std::string> ResolveJobId(const std::string& job_id, const std::string& name) {
  std::string id = job_id;
  if (id.empty()) {
    for (const char* var : {"SLURM_JOB_ID", "PBS_JOBID"}) {
      const char* v = std::getenv(var);
      if (v && *v) {
        id = v;
        break;
      }
    }
  }
  if (id.empty()) {
    return Status::InvalidArgument(
        "no job id: pass --job-id, or run inside a Slurm or PBS job ($SLURM_JOB_ID, $PBS_JOBID)");
  }
  if (!name.empty()) id += "." + name;
  if (!registry::ValidJobId(id)) {
    return Status::InvalidArgument("'" + id +
                                   "' is not a valid job id (1-64 of A-Z a-z 0-9 . _ + -)");
  }
  return id;
}

Status CheckSecretEnv(const SaveArgs& args) {
  if (!args.secret_env.empty()) {
    if (args.command.empty()) {
      return Status::InvalidArgument("--secret-env is for exec mode: save ... --secret-env " +
                                     args.secret_env + " -- CMD ARGS...");
    }
    // A portable name (POSIX: letters, digits and '_', not starting with a digit), of a
    // bounded length, and none of ours: exec mode sets BROKER_* itself.
    const std::string& name = args.secret_env;
    bool valid =
        name.size() <= 128 && !(name[0] >= '0' && name[0] <= '9') && name.rfind("BROKER_", 0) != 0;
    for (char c : name) {
      valid = valid && (c == '_' || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                        (c >= '0' && c <= '9'));
    }
    if (!valid) {
      return Status::InvalidArgument(
          "--secret-env: '" + name +
          "' is not an environment variable name (letters, digits and _, not starting with a "
          "digit, at most 128) or is one of exec mode's own BROKER_*");
    }
  }
  for (const auto& a : args.command) {
    if (a.find("{secret}") == std::string::npos) continue;
    // Not an error: some services take a token only as an argument. But every user of the node
    // reads it there, so it is said loudly, with the way out.
    std::fprintf(stderr,
                 "brokerproxy: WARNING: {secret} in the command's arguments puts the job's "
                 "secret where every user of this node can read it (ps, /proc/PID/cmdline) and "
                 "use it to reach your service. Pass it in the environment instead: "
                 "--secret-env NAME (e.g. --secret-env JUPYTER_TOKEN for Jupyter); "
                 "$BROKER_SECRET holds it too.\n");
    break;
  }
  return Status::OK();
}

std::string SubstitutePlaceholders(const std::string& arg, const Job& job) {
  const std::pair<const char*, std::string> vars[] = {
      {"{port}", std::to_string(job.port)}, {"{secret}", job.secret}, {"{cert}", job.cert_path},
      {"{certkey}", job.key_path},          {"{job}", job.id},        {"{host}", job.host},
  };
  std::string out;
  for (size_t i = 0; i < arg.size();) {
    bool replaced = false;
    for (const auto& [name, value] : vars) {
      std::string_view n(name);
      if (arg.compare(i, n.size(), n) == 0) {
        out += value;
        i += n.size();
        replaced = true;
        break;
      }
    }
    if (!replaced) out += arg[i++];
  }
  return out;
}

Status RunSave(const Config& config, BrokerClient* client, const SaveArgs& args, int* exit_code) {
  *exit_code = 0;
  Request req;
  req.op = Op::kSave;
  auto id = ResolveJobId(args.job_id, args.name);
  if (!id.ok()) return id.status();
  req.job = *id;
  req.save.id = *id;
  auto type = registry::ParseJobType(args.type);
  if (!type) return Status::InvalidArgument("type must be ssh or ssl, not '" + args.type + "'");
  req.save.type = *type;
  if (req.save.type == registry::JobType::kSsl && !registry::DnsSafeJobId(req.job)) {
    return Status::InvalidArgument("job " + req.job +
                                   " cannot be an ssl job: its id is not a DNS name (a '+' "
                                   "cannot be part of a TLS server name); save it as ssh");
  }
  req.save.host = args.host.empty() ? "127.0.0.1" : args.host;
  if (!registry::ValidHost(req.save.host)) {
    return Status::InvalidArgument("'" + req.save.host + "' is not a valid host");
  }
  req.save.port = args.port;
  if (!args.ttl.empty()) {
    auto ttl = ParseDuration(args.ttl);
    if (!ttl.ok()) return ttl.status().WithContext("--ttl");
    if (*ttl > registry::kMaxTtlSeconds * 1000) {
      return Status::InvalidArgument("--ttl: " + args.ttl + " is longer than the maximum of " +
                                     FormatDuration(registry::kMaxTtlSeconds * 1000));
    }
    req.save.ttl = (*ttl + 999) / 1000;
  }
  bool exec_mode = !args.command.empty();
  BP_RETURN_IF_ERROR(CheckSecretEnv(args));
  if (exec_mode) {
    // What would fail once the command runs fails here instead, before anything is saved.
    Status placeholders = CheckPlaceholders(args.command);
    if (!placeholders.ok()) return placeholders;
    int not_runnable = 0;
    std::string found = FindCommand(args.command[0], &not_runnable);
    if (not_runnable != 0) {
      std::fprintf(stderr, "brokerproxy: %s: %s\n", args.command[0].c_str(),
                   found.empty()        ? "command not found"
                   : IsDirectory(found) ? "Is a directory"
                                        : "Permission denied");
      *exit_code = not_runnable;
      return Status::OK();
    }
    if (args.port != 0) {
      Status free = CheckExplicitPortFree(req.save.host, args.port);
      if (!free.ok()) return free;
    }
  }
  // Exec mode always waits: the command is what will listen.
  req.save.ready = !(args.wait || exec_mode || args.pending);
  int64_t wait_ms = config.ready_timeout_ms;
  if (!args.wait_timeout.empty()) {
    auto t = ParseDuration(args.wait_timeout);
    if (!t.ok()) return t.status().WithContext("--wait-timeout");
    if (*t > registry::kMaxWaitMs) {
      return Status::InvalidArgument("--wait-timeout: " + args.wait_timeout +
                                     " is longer than the maximum of " +
                                     FormatDuration(registry::kMaxWaitMs));
    }
    wait_ms = *t;
  }

  std::optional<JobKeyFiles> key_files;
  if (args.csr_on_stdin) {
    // The far side of `save ssl --via`: it keeps the key and writes the files; this side only
    // registers the job and hands back the reply with the certificate.
    if (req.save.type != registry::JobType::kSsl || !args.command.empty() || args.wait) {
      return Status::InvalidArgument("--csr-stdin is only for a plain save ssl");
    }
    constexpr size_t kMaxCsr = 64 * 1024;
    std::string csr(kMaxCsr + 1, '\0');  // one more, to tell "too long" from "just fits"
    std::cin.read(csr.data(), static_cast<std::streamsize>(csr.size()));
    csr.resize(static_cast<size_t>(std::cin.gcount()));
    if (csr.empty() || csr.size() > kMaxCsr) {
      return Status::InvalidArgument("--csr-stdin: no CSR (or more than 64 KiB) on stdin");
    }
    req.csr = std::move(csr);
    req.save.cert_path = args.cert_path;
    req.save.key_path = args.key_path;
  } else if (req.save.type == registry::JobType::kSsl) {
    auto files = PrepareJobKey(args.cert_dir, req.job);
    if (!files.ok()) return files.status().WithContext("the job's TLS key");
    key_files = std::move(files).value();
    req.csr = key_files->csr_pem;
    req.save.cert_path = key_files->cert_path;
    req.save.key_path = key_files->key_path;
  }
  req.save.replace = args.replace;
  // Removes what this run saved and nothing newer: only while the job still has our secret.
  auto remove_job = [&](const Job& saved, int64_t timeout_ms = kCallTimeoutMs) {
    Request remove = MakeRequest(Op::kRemove, saved.id);
    remove.secret = saved.secret;
    return client->Call(remove, timeout_ms);
  };

  auto reply = client->Call(req, kCallTimeoutMs);
  if (!reply.ok()) {
    if (key_files) key_files->Discard();
    return reply.status();
  }
  auto job = JobFromReply(reply->get(), "job", SecretField::kInclude);
  // The command runs here and binds the port: if something here already holds it, saving
  // again replaces the job with a fresh port (the same key; a fresh certificate).
  for (int attempt = 0; job.ok() && exec_mode && job->job.port_allocated &&
                        !PortFreeHere(job->job.port) && attempt < 8;
       ++attempt) {
    req.save.replace = true;  // our own entry of a moment ago
    reply = client->Call(req, kCallTimeoutMs);
    if (!reply.ok()) {
      (void)remove_job(job->job);  // the entry of the previous try, if it is still ours
      if (key_files) key_files->Discard();
      return reply.status();
    }
    job = JobFromReply(reply->get(), "job", SecretField::kInclude);
  }
  if (!job.ok()) {
    if (key_files) key_files->Discard();
    return job.status();
  }
  if (key_files) {
    std::string cert_pem = StringField(reply->get(), "cert_pem");
    Status s = cert_pem.empty() ? Status::IOError("the broker's reply has no certificate")
                                : key_files->Commit();
    if (s.ok()) s = loop::WriteFileAtomic(key_files->cert_path, cert_pem, 0644);
    if (!s.ok()) {
      (void)remove_job(job->job);  // nothing may point at files that are not there
      key_files->Remove();
      return s;
    }
  }

  if (args.wait && !exec_mode) {
    Request wait = MakeRequest(Op::kWait, job->job.id);
    wait.timeout_ms = wait_ms;
    auto ready = client->Call(wait, wait_ms + kCallTimeoutMs);
    if (!ready.ok()) {
      // Leave nothing behind that points at a service that never came up.
      (void)remove_job(job->job);
      if (key_files) key_files->Remove();
      return ready.status();
    }
    reply = std::move(ready);
    job = JobFromReply(reply->get(), "job", SecretField::kInclude);
    if (!job.ok()) return job.status();
  }

  if (!exec_mode) {
    if (args.format == OutputFormat::kJson) {
      PrintRaw(reply->get());
    } else {
      PrintJob(*job, args.format);
    }
    return Status::OK();
  }

  std::fprintf(stderr, "brokerproxy: job %s saved (backend %s:%d); running %s\n",
               job->job.id.c_str(), job->job.host.c_str(), job->job.port, args.command[0].c_str());
  std::fflush(stdout);
  // Whether our entry is gone already (removed on SIGTERM), or left to a newer save. Written on
  // the thread pool while RunCommand runs, read after it returned.
  bool deregistered = false;
  bool replaced = false;
  // `last`: no later try (a failed try on SIGTERM is repeated once the command exited).
  auto deregister = [&](int64_t timeout_ms, bool last) {
    auto removed = remove_job(job->job, timeout_ms);
    if (removed.ok() || removed.status().code() == Status::Code::kNotFound) {
      deregistered = true;
      return;
    }
    if (removed.status().code() == Status::Code::kAlreadyExists) {
      deregistered = true;
      replaced = true;
      std::fprintf(stderr, "brokerproxy: job %s was saved again since; leaving it registered\n",
                   job->job.id.c_str());
      return;
    }
    std::fprintf(stderr, "brokerproxy: %s: could not remove job %s: %s\n",
                 last ? "warning" : "SIGTERM", job->job.id.c_str(),
                 removed.status().message().c_str());
  };
  // When the job is being stopped the entry goes first, so that no new connection is routed to
  // a service that is shutting down; bounded, so the signal is forwarded anyway.
  auto code = RunCommand(args.command, job->job, args.secret_env, wait_ms,
                         [&] { deregister(kDeregisterTimeoutMs, false); });
  if (!deregistered) deregister(kCallTimeoutMs, true);
  // The service is gone: so is its key, unless a newer save of the id now keeps its own there.
  if (key_files && !replaced) key_files->Remove();
  if (!code.ok()) return code.status();
  *exit_code = *code;
  return Status::OK();
}

Status RunLoad(BrokerClient* client, const std::string& job_id, OutputFormat format) {
  auto reply = Ask(client, MakeRequest(Op::kLoad, job_id), format);
  if (!reply.ok() || !*reply) return reply.status();
  auto job = JobFromReply(reply->get(), "job", SecretField::kInclude);
  if (!job.ok()) return job.status();
  PrintJob(*job, format);
  if (format != OutputFormat::kHuman) return Status::OK();
  // Where a laptop reaches the proxy, and the CA fingerprint `connect --tls` checks.
  std::string proxies;
  const cJSON* list = cJSON_GetObjectItemCaseSensitive(reply->get(), "proxy");
  for (const cJSON* a = cJSON_IsArray(list) ? list->child : nullptr; a; a = a->next) {
    if (cJSON_IsString(a)) proxies += (proxies.empty() ? "" : " ") + std::string(a->valuestring);
  }
  if (!proxies.empty()) std::printf("proxy:    %s\n", proxies.c_str());
  if (std::string d = StringField(reply->get(), "tls_domain"); !d.empty()) {
    std::printf("domain:   %s\n", d.c_str());
  }
  if (std::string fp = StringField(reply->get(), "ca_fingerprint"); !fp.empty()) {
    std::printf("ca:       %s\n", fp.c_str());
  }
  return Status::OK();
}

Status RunVerify(BrokerClient* client, const std::string& job_id, const std::string& secret,
                 OutputFormat format, bool* match) {
  *match = false;
  Request req;
  req.op = Op::kVerify;
  req.job = job_id;
  req.secret = secret;
  if (secret == "-") {
    // From stdin, so the secret need not appear in `ps`.
    std::string line;
    if (!std::getline(std::cin, line)) return Status::InvalidArgument("no secret on stdin");
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    req.secret = line;
  }
  if (req.secret.size() > 8192) return Status::InvalidArgument("secret too long");
  auto reply = client->Call(req, kCallTimeoutMs);
  if (!reply.ok()) return reply.status();
  const cJSON* m = cJSON_GetObjectItemCaseSensitive(reply->get(), "match");
  if (!cJSON_IsBool(m)) return Status::IOError("reply has no 'match'");
  *match = cJSON_IsTrue(m);
  if (format == OutputFormat::kJson) {
    PrintRaw(reply->get());
  } else {
    std::printf("%s\n", *match ? "yes" : "no");
  }
  return Status::OK();
}

// "42s", "17m", "3h05m", "2d04h": two units at most, for a column.
std::string FormatIdle(int64_t s) {
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof(buf), "%llds", static_cast<long long>(s));
  } else if (s < 3600) {
    std::snprintf(buf, sizeof(buf), "%lldm", static_cast<long long>(s / 60));
  } else if (s < 86400) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>(s % 3600 / 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lldd%02lldh", static_cast<long long>(s / 86400),
                  static_cast<long long>(s % 86400 / 3600));
  }
  return buf;
}

Status RunQuery(BrokerClient* client, OutputFormat format, int64_t idle_for_ms) {
  auto reply = client->Call(MakeRequest(Op::kQuery), kCallTimeoutMs);
  if (!reply.ok()) return reply.status();
  cJSON* jobs = cJSON_GetObjectItemCaseSensitive(reply->get(), "jobs");
  if (!cJSON_IsArray(jobs)) return Status::IOError("reply has no 'jobs'");
  // How long a job has been idle, in seconds; -1 if the daemon does not say.
  auto idle_of = [](const cJSON* j) -> int64_t {
    const cJSON* idle = cJSON_GetObjectItemCaseSensitive(j, "idle");
    return cJSON_IsNumber(idle) && idle->valuedouble >= 0 ? static_cast<int64_t>(idle->valuedouble)
                                                          : -1;
  };
  if (idle_for_ms > 0) {
    // Only the jobs idle at least that long (both outputs); the daemon's "down" list follows.
    for (cJSON* j = jobs->child; j != nullptr;) {
      cJSON* next = j->next;
      if (idle_of(j) < idle_for_ms / 1000) cJSON_Delete(cJSON_DetachItemViaPointer(jobs, j));
      j = next;
    }
  }
  if (format == OutputFormat::kJson) {
    PrintRaw(reply->get());
    return Status::OK();
  }
  if (cJSON_GetArraySize(jobs) == 0) {
    std::printf(idle_for_ms > 0 ? "no jobs idle that long\n" : "no jobs\n");
    return Status::OK();
  }
  // Older daemons give no "state": their "down" list, else "ready", decides.
  std::set<std::string> down;
  const cJSON* down_list = cJSON_GetObjectItemCaseSensitive(reply->get(), "down");
  for (const cJSON* d = cJSON_IsArray(down_list) ? down_list->child : nullptr; d; d = d->next) {
    if (cJSON_IsString(d)) down.insert(d->valuestring);
  }
  std::printf("%-24s %-4s %-28s %-8s %-8s %s\n", "JOB", "TYPE", "BACKEND", "STATE", "IDLE",
              "EXPIRES");
  for (const cJSON* j = jobs->child; j; j = j->next) {
    Job job;
    registry::JobState state = registry::JobState::kReady;
    Status js = registry::JobFromJson(j, SecretField::kOmit, &job, &state);
    if (!js.ok()) return Status::IOError("malformed reply: " + js.message());
    if (!cJSON_GetObjectItemCaseSensitive(j, "state") && down.contains(job.id)) {
      state = registry::JobState::kDown;
    }
    std::string backend = job.host + ":" + std::to_string(job.port);
    int64_t idle = idle_of(j);
    std::string idle_text = idle < 0 ? "-" : FormatIdle(idle);
    std::printf("%-24s %-4s %-28s %-8s %-8s %s\n", job.id.c_str(), registry::JobTypeName(job.type),
                backend.c_str(), registry::JobStateName(state), idle_text.c_str(),
                FormatTime(job.expires).c_str());
  }
  return Status::OK();
}

Status RunRemove(BrokerClient* client, const std::string& job_id, const std::string& if_secret,
                 OutputFormat format) {
  Request req = MakeRequest(Op::kRemove, job_id);
  req.secret = if_secret;
  if (if_secret == "-") {
    // From stdin, so the secret need not appear in `ps`.
    std::string line;
    if (!std::getline(std::cin, line)) return Status::InvalidArgument("no secret on stdin");
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty()) return Status::InvalidArgument("no secret on stdin");
    req.secret = line;
  }
  if (req.secret.size() > 8192) return Status::InvalidArgument("secret too long");
  auto reply = Ask(client, req, format);
  if (!reply.ok() || !*reply) return reply.status();
  std::printf("removed job %s\n", job_id.c_str());
  return Status::OK();
}

Result<std::string> EpilogJobId() {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v ? v : "";
  };
  std::string id;
  std::string array_job = env("SLURM_ARRAY_JOB_ID"), array_task = env("SLURM_ARRAY_TASK_ID");
  if (!array_job.empty() && !array_task.empty()) {
    id = array_job + "_" + array_task;
  } else if (!env("SLURM_JOB_ID").empty()) {
    id = env("SLURM_JOB_ID");
  } else {
    id = env("PBS_JOBID");
  }
  if (id.empty()) {
    return Status::InvalidArgument(
        "no job id: pass JOB, or run as a Slurm or PBS epilog ($SLURM_JOB_ID, $PBS_JOBID)");
  }
  if (!registry::ValidJobId(id)) {
    return Status::InvalidArgument("'" + id.substr(0, 80) + "' is not a valid job id");
  }
  return id;
}

Status RunEpilog(BrokerClient* client, const std::string& job_arg, OutputFormat format) {
  std::string job = job_arg;
  if (job.empty()) {
    auto id = EpilogJobId();
    if (!id.ok()) return id.status();
    job = *id;
  }
  auto reply = Ask(client, MakeRequest(Op::kEpilog, job), format);
  if (!reply.ok() || !*reply) return reply.status();
  const cJSON* removed = cJSON_GetObjectItemCaseSensitive(reply->get(), "removed");
  int n = cJSON_IsArray(removed) ? cJSON_GetArraySize(removed) : 0;
  std::printf("job %s: removed %d entr%s\n", job.c_str(), n, n == 1 ? "y" : "ies");
  return Status::OK();
}

Status RunWait(BrokerClient* client, const std::string& job_id, int64_t timeout_ms,
               OutputFormat format) {
  Request req = MakeRequest(Op::kWait, job_id);
  req.timeout_ms = timeout_ms;
  auto reply = Ask(client, req, format, timeout_ms + kCallTimeoutMs);
  if (!reply.ok() || !*reply) return reply.status();
  auto job = JobFromReply(reply->get(), "job", SecretField::kInclude);
  if (!job.ok()) return job.status();
  PrintJob(*job, format);
  return Status::OK();
}

Status RunStats(BrokerClient* client, OutputFormat format) {
  auto reply = Ask(client, MakeRequest(Op::kStats), format);
  if (!reply.ok() || !*reply) return reply.status();
  const cJSON* stats = cJSON_GetObjectItemCaseSensitive(reply->get(), "stats");
  if (!cJSON_IsObject(stats)) return Status::IOError("reply has no 'stats'");
  // Flat members as "name: value"; nested objects indented under their name.
  std::function<void(const cJSON*, int)> print = [&](const cJSON* obj, int depth) {
    for (const cJSON* m = obj->child; m; m = m->next) {
      std::string pad(depth * 2, ' ');
      if (cJSON_IsObject(m) || cJSON_IsArray(m)) {
        std::printf("%s%s:\n", pad.c_str(), m->string ? m->string : "-");
        print(m, depth + 1);
      } else if (cJSON_IsString(m) && !m->string) {
        std::printf("%s%s\n", pad.c_str(), m->valuestring);  // a line of a list
      } else if (cJSON_IsString(m)) {
        std::printf("%s%s: %s\n", pad.c_str(), m->string ? m->string : "-", m->valuestring);
      } else {
        std::printf("%s%s: %s\n", pad.c_str(), m->string ? m->string : "-",
                    registry::PrintJson(m).c_str());
      }
    }
  };
  print(stats, 0);
  return Status::OK();
}

std::string DefaultCertDir() {
  const char* xdg = std::getenv("XDG_STATE_HOME");
  if (xdg != nullptr && xdg[0] == '/') return std::string(xdg) + "/brokerproxy/certs";
  const char* home = std::getenv("HOME");
  if (home == nullptr || home[0] != '/') return "";
  return std::string(home) + "/.local/state/brokerproxy/certs";
}

Result<std::string> FetchCaPem(BrokerClient* client) {
  auto reply = client->Call(MakeRequest(Op::kCa), kCallTimeoutMs);
  if (!reply.ok()) return reply.status();
  std::string pem = StringField(reply->get(), "ca_cert");
  if (pem.empty()) return Status::IOError("the broker's reply has no 'ca_cert'");
  return pem;
}

Status RunCa(BrokerClient* client, OutputFormat format) {
  if (format == OutputFormat::kJson) return Ask(client, MakeRequest(Op::kCa), format).status();
  auto pem = FetchCaPem(client);
  if (!pem.ok()) return pem.status();
  std::fputs(pem->c_str(), stdout);
  return Status::OK();
}

}  // namespace brokerproxy::cli
