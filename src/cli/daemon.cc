#include "cli/daemon.h"

#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/daemon_tls.h"
#include "cli/metrics.h"
#include "cli/registry_io.h"
#include "cli/service.h"
#include "loop/handle.h"
#include "loop/log.h"
#include "loop/loop.h"
#include "loop/poll.h"
#include "loop/signal.h"
#include "loop/timer.h"
#include "loop/work.h"
#include "proxy/server/proxy.h"
#include "proxy/ssh/ssh_server.h"
#include "proxy/tls/tls_frontend.h"
#include "registry/broker.h"
#include "registry/control_server.h"
#include "registry/redis_store.h"
#include "registry/registry.h"
#include "registry/seal.h"
#include "registry/snapshot.h"
#include "registry/store.h"

namespace brokerproxy::cli {

Result<SchedulerSettings> ResolveSchedulerSettings(const Config& c) {
  SchedulerSettings out;
  registry::SchedulerOptions& o = out.options;
  if (c.scheduler_type == "none") {
    o.type = registry::SchedulerType::kNone;
  } else if (c.scheduler_type == "slurm") {
    o.type = registry::SchedulerType::kSlurm;
  } else if (c.scheduler_type == "pbs") {
    o.type = registry::SchedulerType::kPbs;
  } else {
    return Status::InvalidArgument("[scheduler] type: '" + c.scheduler_type.substr(0, 40) +
                                   "' is not none, slurm or pbs");
  }
  if (c.reconcile_interval_ms < 1000) {
    return Status::InvalidArgument("[scheduler] reconcile_interval: must be at least 1s");
  }
  if (c.scheduler_call_timeout_ms < 1000) {
    return Status::InvalidArgument("[scheduler] call_timeout: must be at least 1s");
  }
  o.call_timeout_ms = c.scheduler_call_timeout_ms;
  o.cache_ms = c.scheduler_cache_ms;
  o.squeue = c.squeue;
  o.sinfo = c.sinfo;
  o.qstat = c.qstat;
  for (const auto& [key, command] :
       {std::pair<const char*, const std::string*>{"squeue", &c.squeue},
        {"sinfo", &c.sinfo},
        {"qstat", &c.qstat}}) {
    // Run without a shell; a leading '-' would be read as an option by whatever runs it.
    if (command->empty() || command->front() == '-' ||
        command->find_first_of(" \t") != std::string::npos) {
      return Status::InvalidArgument(std::string("[scheduler] ") + key + ": '" +
                                     command->substr(0, 80) +
                                     "' is not a command (a name or path, without blanks)");
    }
  }
  // "0, 1001, alice": uids or user names.
  std::string_view rest = c.admin_uids;
  while (!rest.empty()) {
    size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? "" : rest.substr(comma + 1);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (item.empty()) continue;
    uint32_t uid = 0;
    auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), uid);
    if (ec == std::errc() && end == item.data() + item.size()) {
      out.admin_uids.push_back(static_cast<uid_t>(uid));
      continue;
    }
    passwd pw;
    passwd* found = nullptr;
    char buf[4096];
    std::string name(item);
    if (getpwnam_r(name.c_str(), &pw, buf, sizeof(buf), &found) != 0 || found == nullptr) {
      return Status::InvalidArgument("[scheduler] admin_uids: '" + name.substr(0, 40) +
                                     "' is neither a uid nor a user name known here");
    }
    out.admin_uids.push_back(found->pw_uid);
  }
  return out;
}

namespace {

// mkdir -p with `mode` for the directories it creates.
Status MakeDirs(const std::string& path, mode_t mode) {
  if (path.empty()) return Status::InvalidArgument("empty directory path");
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), mode) != 0 && errno != EEXIST) {
      return PosixError("cannot create directory " + prefix, errno);
    }
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::IOError(path + " is not a directory");
  }
  return Status::OK();
}

// A directory the daemon keeps files in (state_dir, the control socket's) must be its own or
// root's and writable by no one else: whoever can write there can plant a symlink where the
// daemon writes, or replace the registry or the socket.
Status CheckPrivateDirectory(const std::string& path, const char* what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return PosixError("cannot stat " + path, errno);
  const uid_t me = ::geteuid();
  if (st.st_uid != me && st.st_uid != 0) {
    return Status::PermissionDenied(std::string(what) + " " + path + " belongs to uid " +
                                    std::to_string(st.st_uid) + ", not to the daemon's user (uid " +
                                    std::to_string(me) + ") or root; chown it");
  }
  if ((st.st_mode & 022) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%03o", static_cast<unsigned>(st.st_mode & 0777));
    return Status::PermissionDenied(std::string(what) + " " + path +
                                    " is writable by other users (mode " + mode +
                                    "); chmod go-w it");
  }
  return Status::OK();
}

// A core dump, or a debugger attached by another process of the same user, would show the CA
// key and every secret: neither, unless `core_dumps` asks for it.
Status HardenProcess(const Config& c) {
  if (c.core_dumps != 0) return Status::OK();
  rlimit none{0, 0};
  if (::setrlimit(RLIMIT_CORE, &none) != 0) return PosixError("setrlimit(RLIMIT_CORE)", errno);
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return PosixError("prctl(PR_SET_DUMPABLE)", errno);
  return Status::OK();
}

Result<proxy::ProxyOptions> ProxyOptionsFrom(const Config& c) {
  proxy::ProxyOptions o;
  o.listen = c.listen;
  for (const std::string& net : c.plain_allow) {
    auto cidr = Cidr::Parse(net);
    if (!cidr.ok()) return cidr.status().WithContext("[proxy] plain_allow");
    o.plain_allow.push_back(*cidr);
  }
  o.backend_allow.emplace();
  for (const std::string& net : c.backend_allow) {
    auto cidr = Cidr::Parse(net);
    if (!cidr.ok()) return cidr.status().WithContext("[registry] backend_allow");
    o.backend_allow->push_back(*cidr);
  }
  o.max_connections = c.max_connections;
  o.handshake_timeout_ms = c.handshake_timeout_ms;
  o.connect_timeout_ms = c.connect_timeout_ms;
  o.idle_timeout_ms = c.idle_timeout_ms;
  o.half_close_timeout_ms = c.half_close_timeout_ms;
  o.keepalive_s = static_cast<int>((c.keepalive_ms + 999) / 1000);
  o.throttle_failures = c.throttle_failures;
  o.throttle_window_ms = c.throttle_window_ms;
  o.max_handshakes_per_source = c.max_handshakes_per_source;
  o.handshake_share = c.handshake_share;
  o.ssh_banner_delay_ms = c.banner_delay_ms;
  o.tls_domain = c.tls_domain;
  return o;
}

// A proxied connection holds two fds (more while a pipe carries its bytes): raise the soft
// limit to the hard one, and say so at start if max_connections cannot fit.
void RaiseFileLimit(int max_connections) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &rl);
    ::getrlimit(RLIMIT_NOFILE, &rl);
  }
  // Two sockets per connection, plus the pipe pool, listeners, control clients and logs.
  rlim_t needed = 2 * static_cast<rlim_t>(max_connections) + 256;
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < needed) {
    LOG_WARN(
        "max_connections = %d needs about %llu file descriptors but the limit is %llu; "
        "beyond that new connections are turned away with ERR busy (lower "
        "max_connections or raise the limit, e.g. LimitNOFILE= in the service unit)",
        max_connections, static_cast<unsigned long long>(needed),
        static_cast<unsigned long long>(rl.rlim_cur));
  }
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// "[127.0.0.1]:7000 ssh-ed25519 AAAA..." for a proxy listening on `address` ("host:port",
// "[v6]:port"): the host as clients name it in known_hosts (bare for port 22). A wildcard
// address is named by this node's host name, which is what clients elsewhere connect to.
std::string KnownHostsLine(const std::string& address, const std::string& public_key) {
  size_t colon = address.rfind(':');
  std::string host = address.substr(0, colon);
  std::string port = colon == std::string::npos ? "22" : address.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host == "0.0.0.0" || host == "::" || host.empty()) {
    char name[256] = {0};
    if (::gethostname(name, sizeof(name) - 1) == 0 && name[0] != '\0') host = name;
  }
  std::string shown = port == "22" ? host : "[" + host + "]:" + port;
  return shown + " " + public_key;
}

// How often the proxy's certificate is checked for renewal.
constexpr uint64_t kRenewCheckMs = 6 * 3600 * 1000;

// What an old process hands a new one on upgrade, in $BROKERPROXY_HANDOVER:
// "ready:FD;control:FD;listen:FD=HOST:PORT;metrics:FD=HOST:PORT;..." (the fds are inherited
// across exec).
constexpr const char* kHandoverEnv = "BROKERPROXY_HANDOVER";

struct Handover {
  int ready = -1;                                 // written "ready\n" once the new process serves
  int control = -1;                               // the control socket, listening
  std::vector<std::pair<HostPort, int>> listen;   // the proxy's listening sockets
  std::vector<std::pair<HostPort, int>> metrics;  // the metrics endpoint's
};

// Reads (and removes from the environment, so that no child sees it) what an old process handed
// over; nothing if this process was started otherwise. A malformed value is an error.
Result<Handover> TakeHandover() {
  Handover h;
  const char* env = std::getenv(kHandoverEnv);
  if (env == nullptr) return h;
  std::string text = env;
  ::unsetenv(kHandoverEnv);
  auto bad = [&] { return Status::InvalidArgument(std::string(kHandoverEnv) + ": malformed"); };
  size_t start = 0;
  while (start < text.size() && h.listen.size() + h.metrics.size() < 128) {
    size_t end = text.find(';', start);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(start, end - start);
    start = end + 1;
    size_t colon = item.find(':');
    if (colon == std::string::npos) return bad();
    std::string kind = item.substr(0, colon), rest = item.substr(colon + 1);
    std::string spec;
    if (size_t eq = rest.find('='); eq != std::string::npos) {
      spec = rest.substr(eq + 1);
      rest = rest.substr(0, eq);
    }
    int fd = -1;
    auto [ptr, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), fd);
    if (ec != std::errc() || ptr != rest.data() + rest.size() || fd < 3 ||
        ::fcntl(fd, F_GETFD) < 0) {
      return bad();
    }
    (void)::fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (kind == "ready") {
      h.ready = fd;
    } else if (kind == "control") {
      h.control = fd;
    } else if (kind == "listen" || kind == "metrics") {
      auto hp = ParseHostPort(spec, std::nullopt, "", /*allow_zero=*/true);
      if (!hp.ok()) return bad();
      (kind == "listen" ? h.listen : h.metrics).emplace_back(*hp, fd);
    } else {
      return bad();
    }
  }
  return h;
}

// The options a reload applies (see daemon.h); every other change waits for a restart. [client]
// options do not concern the daemon.
bool AppliedLive(const OptionSpec& spec) {
  std::string_view section = spec.section, key = spec.key;
  if (section == "proxy" || section == "client" || section == "metrics") return true;
  if (section == "broker") return key == "log_level" || key == "log_format";
  if (section == "registry") return key == "backend_allow";
  if (section == "tls") return key == "tls_domain" || key == "ca_cert" || key == "ca_key";
  if (section == "ssh") return key == "banner_delay";
  return false;
}

class Daemon {
 public:
  Daemon(const Config& config, std::function<Result<Config>()> reread,
         std::vector<std::string> argv)
      : config_(config), reread_(std::move(reread)), argv_(std::move(argv)) {}

  Status Start() {
    auto handover = TakeHandover();
    if (!handover.ok()) return handover.status();
    handover_ = std::move(handover).value();
    // The binary to run on upgrade: this path, whatever file is there by then.
    char exe[4096];
    ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) exe_.assign(exe, static_cast<size_t>(n));
    RaiseFileLimit(config_.max_connections);
    // The state dir holds the registry and keys (each 0600); others may traverse it to reach
    // the control socket and their own certificate directory, but not list it.
    BP_RETURN_IF_ERROR(HardenProcess(config_));
    BP_RETURN_IF_ERROR(MakeDirs(config_.state_dir, 0711));
    BP_RETURN_IF_ERROR(MakeDirs(DirName(config_.control_socket), 0755));
    BP_RETURN_IF_ERROR(CheckPrivateDirectory(config_.state_dir, "[broker] state_dir"));
    BP_RETURN_IF_ERROR(
        CheckPrivateDirectory(DirName(config_.control_socket), "the control socket's directory"));

    registry_ = std::make_unique<registry::Registry>(RegistryOptionsFrom(config_));
    std::string snapshot = config_.state_dir + "/registry.json";
    if (config_.store == "file") {
      BP_RETURN_IF_ERROR(registry::FileStore::Load(snapshot, registry_.get()));
    } else if (config_.store != "redis") {
      return Status::InvalidArgument("[registry] store: '" + config_.store.substr(0, 40) +
                                     "' is neither file nor redis");
    }

    auto scheduler = ResolveSchedulerSettings(config_);
    if (!scheduler.ok()) return scheduler.status();

    auto loop = loop::Loop::Create();
    if (!loop.ok()) return loop.status();
    loop_ = std::move(loop).value();
    scheduler_ = registry::MakeScheduler(loop_.get(), scheduler->options);
    if (config_.store == "redis") {
      auto redis = OpenRedisStore(config_, loop_.get(), registry_.get());
      if (!redis.ok()) return redis.status();
      BP_RETURN_IF_ERROR((*redis)->Start());
      snapshot = (*redis)->Name();
      store_ = std::move(redis).value();
    } else {
      store_ = std::make_unique<registry::FileStore>(loop_.get(), registry_.get(), snapshot);
    }
    registry::Broker::Options bo;
    bo.ready_timeout_ms = config_.ready_timeout_ms;
    bo.max_waits_per_user = static_cast<size_t>(config_.max_waits_per_user);
    bo.recheck_interval_ms = config_.recheck_interval_ms;
    bo.reconcile_interval_ms = config_.reconcile_interval_ms;
    bo.end_grace_s = config_.end_grace_ms / 1000;
    bo.scheduler_cache_ms = config_.scheduler_cache_ms;
    bo.scheduler_call_timeout_ms = config_.scheduler_call_timeout_ms;
    bo.admin_uids = scheduler->admin_uids;
    broker_ =
        std::make_unique<registry::Broker>(loop_.get(), registry_.get(), store_.get(), bo,
                                           [] { return static_cast<int64_t>(::time(nullptr)); });
    // Saves and readiness probes obey the proxy's backend policy (the proxy knows its own
    // ports); probes that run before the proxy started wait for it.
    broker_->set_backend_check(
        [this](const sockaddr_storage& addr, uid_t owner, bool dialling) -> Status {
          if (!proxy_) return Status::Unavailable("the proxy is not running");
          const proxy::BackendPolicy& policy = proxy_->backend_policy();
          return dialling ? policy.CheckDial(addr, owner) : policy.CheckAddress(addr);
        });
    if (scheduler_) {
      broker_->set_scheduler(scheduler_.get());
      LOG_INFO("registrations are bound to the jobs of %s (checked every %llds)",
               registry::SchedulerTypeName(scheduler_->type()),
               static_cast<long long>(config_.reconcile_interval_ms / 1000));
    }
    BP_RETURN_IF_ERROR(broker_->Start());
    BP_RETURN_IF_ERROR(StartTls());

    registry::ControlServer::Options co;
    co.max_clients = static_cast<size_t>(config_.max_control_clients);
    co.max_clients_per_user = static_cast<size_t>(config_.max_control_clients_per_user);
    control_ = std::make_unique<registry::ControlServer>(
        loop_.get(),
        [this](registry::Request req, uid_t caller,
               registry::ControlServer::Reply reply) -> registry::ControlServer::Cancel {
          if (!broker_) {
            reply(registry::EncodeError(Status::Unavailable("the daemon is shutting down")));
            return nullptr;
          }
          return broker_->Handle(std::move(req), caller, std::move(reply));
        },
        co);
    if (handover_.control >= 0) {
      BP_RETURN_IF_ERROR(control_->Adopt(handover_.control, config_.control_socket));
      handover_.control = -1;
    } else {
      BP_RETURN_IF_ERROR(control_->Listen(config_.control_socket));
    }

    auto po = ProxyOptionsFrom(config_);
    if (!po.ok()) return po.status();
    // The SSH endpoint's host key: loaded, or generated on first run (blocking, before the loop
    // serves anyone), and printed so users can check what their ssh client shows.
    proxy::SshEndpointOptions so;
    so.host_key_path = config_.host_key;
    auto ssh = proxy::SshEndpoint::Create(so);
    if (!ssh.ok()) return ssh.status().WithContext("[ssh] host_key");
    ssh_ = std::move(ssh).value();
    LOG_INFO("ssh host key %s (ED25519) from %s", ssh_->fingerprint().c_str(),
             config_.host_key.c_str());
    proxy_ = std::make_unique<proxy::Proxy>(loop_.get(), registry_.get(), std::move(po).value());
    proxy_->set_frontend(proxy::Protocol::kSsh, ssh_->frontend());
    // An SSH session follows its job: replacing or removing the job ends it.
    registry_->set_observer([this](const std::string& id) {
      if (proxy_) proxy_->OnJobChanged(id);
    });
    proxy_->set_frontend(proxy::Protocol::kTls, proxy::NewTlsFrontend(tls_settings_));
    // What the proxy's dials find feeds the jobs' states (ready, down).
    proxy_->set_dial_observer([this](const std::string& id, uint64_t generation, bool connected) {
      if (broker_) broker_->OnBackendDial(id, generation, connected);
    });
    proxy_->set_inherited(std::move(handover_.listen));
    handover_.listen.clear();
    BP_RETURN_IF_ERROR(proxy_->Start());
    // What a laptop needs from `load` to reach the proxy without a daemon of its own: the
    // addresses it listens on, the TLS domain, and the current CA's fingerprint to check the
    // proxy's chain against.
    broker_->set_load_info_provider([this](cJSON* body) {
      cJSON* addresses = cJSON_AddArrayToObject(body, "proxy");
      if (proxy_) {
        for (const std::string& a : proxy_->addresses()) {
          cJSON_AddItemToArray(addresses, cJSON_CreateString(a.c_str()));
        }
      }
      if (tls_settings_) cJSON_AddStringToObject(body, "tls_domain", tls_settings_->domain.c_str());
      if (cas_) {
        cJSON_AddStringToObject(body, "ca_fingerprint",
                                ("SHA256:" + cas_->current()->Fingerprint()).c_str());
      }
    });
    broker_->set_stats_provider([this](cJSON* stats, uid_t caller) {
      if (control_) {
        // Root sees every connection to the control socket; a user sees their own.
        size_t clients = caller == 0 ? control_->client_count() : control_->client_count(caller);
        cJSON_AddNumberToObject(stats, "control_clients", static_cast<double>(clients));
      }
      if (proxy_) proxy_->AddStats(stats, caller);
      if (ssh_) {
        cJSON_AddStringToObject(stats, "ssh_host_key", ssh_->fingerprint().c_str());
        // Ready to append to ~/.ssh/known_hosts: the key pinned without ssh-keyscan.
        cJSON* lines = cJSON_AddArrayToObject(stats, "ssh_known_hosts");
        for (const std::string& a : proxy_ ? proxy_->addresses() : std::vector<std::string>()) {
          std::string line = KnownHostsLine(a, ssh_->public_key());
          cJSON_AddItemToArray(lines, cJSON_CreateString(line.c_str()));
        }
      }
    });

    broker_->set_activity_provider([this](const registry::Job& job) { return LastActive(job); });
    auto metrics = NewMetrics(config_.metrics_listen, std::move(handover_.metrics));
    handover_.metrics.clear();
    if (!metrics.ok()) return metrics.status();
    metrics_ = std::move(metrics).value();

    for (int signum : {SIGTERM, SIGINT, SIGHUP, SIGUSR2}) {
      auto sig = loop::Signal::Create(*loop_);
      if (!sig.ok()) return sig.status();
      BP_RETURN_IF_ERROR((*sig)->Start(signum, [this](int s) {
        if (s == SIGHUP) {
          Reload();
        } else if (s == SIGUSR2) {
          Upgrade();
        } else {
          Shutdown(s);
        }
      }));
      signals_.push_back(std::move(sig).value());
    }
    std::string addresses;
    for (const std::string& a : proxy_->addresses())
      addresses += (addresses.empty() ? "" : " ") + a;
    LOG_INFO("brokerproxy started: %zu job(s) loaded from %s; control socket %s; proxy port %s",
             registry_->size(), snapshot.c_str(), config_.control_socket.c_str(),
             addresses.c_str());
    if (metrics_) LogMetrics();
    // Every listener is bound and listening: a connection made from now on is accepted.
    auto service = ServiceNotifier::Create(loop_.get(), [this] {
      size_t sessions = proxy_ ? proxy_->stats().global().active : 0;
      return std::to_string(sessions) + " session(s), " + std::to_string(registry_->size()) +
             " job(s)";
    });
    if (!service.ok()) return service.status();
    service_ = std::move(service).value();
    service_->Ready();
    if (handover_.ready >= 0) {
      // The old process hands over to this one now (it stops accepting and drains).
      static constexpr char kReady[] = "ready\n";
      ssize_t w = ::write(handover_.ready, kReady, sizeof(kReady) - 1);
      (void)w;
      ::close(handover_.ready);
      handover_.ready = -1;
    }
    return Status::OK();
  }

  // Most of the daemon's wake-ups are the proxy's sockets: its reactor drives the loop.
  void Run() {
    if (proxy_) {
      proxy_->reactor()->Run();
    } else {
      loop_->Run();
    }
  }

  // Releases everything in dependency order, then closes the loop.
  Status Finish() {
    ready_poll_.reset();
    upgrade_timer_.reset();
    drain_check_.reset();
    if (upgrade_pid_ > 0) {  // stopped in the middle of an upgrade: the successor goes too
      ::kill(upgrade_pid_, SIGKILL);
      ::waitpid(upgrade_pid_, nullptr, 0);
    }
    if (control_fd_ >= 0) ::close(control_fd_);
    if (handover_.ready >= 0) ::close(handover_.ready);
    for (const auto& [addr, fd] : handover_.listen) ::close(fd);
    for (const auto& [addr, fd] : handover_.metrics) ::close(fd);
    reloading_ = loop::Pending();
    metrics_.reset();
    service_.reset();
    renew_timer_.reset();
    renewal_ = loop::Pending();
    broker_.reset();
    scheduler_.reset();  // after the broker, which holds calls of it
    control_.reset();
    proxy_.reset();
    ssh_.reset();  // after the proxy: its sessions were accepted from this endpoint's bind
    signals_.clear();
    drain_timer_.reset();
    store_.reset();
    if (!loop_) return Status::OK();
    WaitForResolves();
    Status s = loop_->Close();
    if (s.ok()) loop_.reset();
    return s;
  }

 private:
  // When `job` was last in use: now while a session is open, else its last session's end or
  // bytes, but never before its save or this process's start (idleness before is unknown).
  int64_t LastActive(const registry::Job& job) const {
    int64_t last = std::max(job.created, start_time_);
    if (!proxy_) return last;
    const auto& jobs = proxy_->stats().jobs();
    auto it = jobs.find(job.id);
    if (it == jobs.end()) return last;
    if (it->second.active > 0) return static_cast<int64_t>(::time(nullptr));
    return std::max(last, it->second.last_active);
  }

  // A metrics endpoint on `listen` (none: nullptr), taking over `sockets` (fd with its
  // configured address: what an old process handed over, or the running endpoint's own on
  // reload) where they match; the others are closed.
  Result<std::unique_ptr<MetricsServer>> NewMetrics(const std::vector<HostPort>& listen,
                                                    std::vector<std::pair<HostPort, int>> sockets) {
    if (listen.empty()) {
      for (const auto& [addr, fd] : sockets) ::close(fd);
      return std::unique_ptr<MetricsServer>();
    }
    return MetricsServer::Create(loop_.get(), listen, std::move(sockets),
                                 [this] { return RenderMetrics(MetricsNow()); });
  }

  // Where scrapes go now, one line per address.
  void LogMetrics() const {
    if (!metrics_) {
      LOG_INFO("metrics: off");
      return;
    }
    for (const std::string& a : metrics_->addresses())
      LOG_INFO("metrics: http://%s/metrics", a.c_str());
  }

  MetricsInput MetricsNow() const {
    MetricsInput in;
    in.version = BROKERPROXY_VERSION;
    in.start_time = start_time_;
    in.jobs = registry_->size();
    if (control_) in.control_clients = control_->client_count();
    if (proxy_) in.stats = &proxy_->stats();
    in.store_write_seconds = &store_->write_seconds();
    in.store_write_failures = store_->write_failures();
    if (scheduler_) {
      in.scheduler_call_seconds = &scheduler_->call_seconds();
      in.scheduler_call_failures = scheduler_->call_failures();
    }
    in.per_job = config_.metrics_per_job != 0;
    if (!in.per_job) return in;
    const auto* counters = proxy_ ? &proxy_->stats().jobs() : nullptr;
    for (const registry::Job* job : registry_->All()) {
      MetricsInput::JobRow row{job->id, job->owner, LastActive(*job), nullptr};
      if (counters) {
        auto it = counters->find(job->id);
        if (it != counters->end()) row.counters = &it->second;
      }
      in.job_rows.push_back(std::move(row));
    }
    // The most recently active first, so that a cap leaves out the jobs least worth watching.
    auto cap = static_cast<size_t>(config_.metrics_max_job_series);
    if (in.job_rows.size() > cap) {
      std::nth_element(in.job_rows.begin(), in.job_rows.begin() + static_cast<long>(cap),
                       in.job_rows.end(),
                       [](const auto& a, const auto& b) { return a.last_active > b.last_active; });
      in.job_rows_dropped = in.job_rows.size() - cap;
      in.job_rows.resize(cap);
    }
    return in;
  }

  // The CA, the proxy's certificate, the `ca` op and `save ssl`'s issuer. Keys and signatures
  // are made on the thread pool even here, before anything else runs on the loop.
  Status StartTls() {
    Result<DaemonTls> tls = Status::Internal("TLS set-up did not run");
    bool done = false;
    loop::Pending work = loop::QueueWork(
        *loop_, [this, &tls] { tls = SetUpDaemonTls(config_); }, [&done] { done = true; });
    while (!done) loop_->Run(UV_RUN_ONCE);
    if (!tls.ok()) return tls.status();
    tls_settings_ = std::make_shared<proxy::TlsSettings>();
    BP_RETURN_IF_ERROR(InstallTls(*tls, config_));
    broker_->set_id_check([settings = tls_settings_](const std::string& id) {
      return CheckJobIdAgainstProxyNames(id, settings->domain, settings->proxy_names);
    });
    auto timer = loop::Timer::Create(*loop_);
    if (!timer.ok()) return timer.status();
    renew_timer_ = std::move(timer).value();
    renew_timer_->Start(kRenewCheckMs, kRenewCheckMs, [this] { RenewServerCert(); });
    LOG_INFO("TLS: CA %s (SHA-256 %s); server names under %s go to ssl jobs",
             config_.ca_cert.c_str(), cas_->current()->Fingerprint().c_str(),
             tls_settings_->domain.c_str());
    return Status::OK();
  }

  // Puts the CA and the proxy's certificate in `tls` into service for what comes next: new TLS
  // connections, `ca` answers, certificates issued by `save ssl`. Nothing is changed on error.
  Status InstallTls(const DaemonTls& tls, const Config& config) {
    // The chain carries the CA that signed the proxy's certificate, so a client without a
    // copy of it (a laptop) can check it against a fingerprint it was given or pinned.
    auto ctx = proxy::NewServerContext(tls.server.cert_pem + tls.cas->current()->cert_pem(),
                                       tls.server.key_pem);
    if (!ctx.ok()) return ctx.status().WithContext("the proxy's TLS certificate");
    cas_ = tls.cas;
    std::string domain;
    for (char c : config.tls_domain) {
      domain += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    tls_settings_->domain = domain;
    tls_settings_->server_ctx = std::move(ctx).value();
    tls_settings_->proxy_names.clear();
    if (auto cert = proxy::ParseCertificatePem(tls.server.cert_pem); cert.ok()) {
      for (const std::string& name : proxy::SubjectAltNames(cert->get())) {
        if (name.starts_with("DNS:")) tls_settings_->proxy_names.push_back(name.substr(4));
      }
    }
    broker_->set_ca_provider([cas = cas_]() -> Result<std::string> { return cas->bundle_pem(); });
    broker_->set_cert_issuer(MakeCertIssuer(loop_.get(), cas_, domain, config.cert_days));
    return Status::OK();
  }

  // SIGUSR2 (see daemon.h): the control socket is released first, so that no request changes
  // the registry while the new process loads it; once the registry file is written, the new
  // process starts with every listening socket.
  void Upgrade() {
    if (stopping_ || draining_ || upgrade_pid_ > 0 || control_fd_ >= 0) {
      LOG_WARN("upgrade: %s; this signal is ignored",
               draining_ ? "this process has handed over already" : "one is in progress");
      return;
    }
    if (exe_.empty() || argv_.empty()) {
      LOG_ERROR("upgrade: this process does not know how it was started; not upgrading");
      return;
    }
    control_fd_ = control_->Release();
    if (control_fd_ < 0) {
      LOG_ERROR("upgrade: cannot hand over the control socket; not upgrading");
      Status s = control_->Listen(config_.control_socket);
      if (!s.ok()) LOG_ERROR("upgrade: control socket: %s", s.ToString().c_str());
      return;
    }
    LOG_INFO("upgrade: starting %s with this process's sockets", exe_.c_str());
    WhenStoreIdle([this] { SpawnSuccessor(); });
  }

  // Runs `fn` once no registry write is in flight (checked every 10 ms).
  void WhenStoreIdle(std::function<void()> fn) {
    if (!store_->busy()) {
      fn();
      return;
    }
    auto t = loop::Timer::Create(*loop_);
    if (!t.ok()) {
      fn();
      return;
    }
    upgrade_timer_ = std::move(t).value();
    upgrade_timer_->Start(10,
                          [this, fn = std::move(fn)]() mutable { WhenStoreIdle(std::move(fn)); });
  }

  void SpawnSuccessor() {
    int ready[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) {
      UpgradeFailed("pipe: " + std::string(std::strerror(errno)));
      return;
    }
    std::vector<int> passed = {ready[1], control_fd_};
    std::string env = std::string(kHandoverEnv) + "=ready:" + std::to_string(ready[1]) +
                      ";control:" + std::to_string(control_fd_);
    for (const auto& [addr, fd] : proxy_->DupListeners()) {
      env += ";listen:" + std::to_string(fd) + "=" + addr.ToString();
      passed.push_back(fd);
    }
    for (const auto& [addr, fd] :
         metrics_ ? metrics_->DupListeners() : std::vector<std::pair<HostPort, int>>()) {
      env += ";metrics:" + std::to_string(fd) + "=" + addr.ToString();
      (void)::fcntl(fd, F_SETFD, 0);  // inherited across exec
      passed.push_back(fd);
    }
    (void)::fcntl(ready[1], F_SETFD, 0);
    (void)::fcntl(control_fd_, F_SETFD, 0);
    // Everything the child needs is built before fork(): after it, only exec.
    std::vector<std::string> envs;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::string_view(*e).starts_with(std::string(kHandoverEnv) + "=")) continue;
      envs.emplace_back(*e);
    }
    envs.push_back(env);
    std::vector<char*> envp, argv;
    for (std::string& e : envs) envp.push_back(e.data());
    envp.push_back(nullptr);
    for (std::string& a : argv_) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = ::fork();
    if (pid == 0) {
      ::execve(exe_.c_str(), argv.data(), envp.data());
      ::_exit(127);
    }
    (void)::fcntl(control_fd_, F_SETFD, FD_CLOEXEC);
    for (int fd : passed) {
      if (fd != control_fd_) ::close(fd);
    }
    if (pid < 0) {
      ::close(ready[0]);
      UpgradeFailed("fork: " + std::string(std::strerror(errno)));
      return;
    }
    upgrade_pid_ = pid;
    auto poll = loop::Poll::Create(*loop_, ready[0], loop::FdOwnership::kOwned);
    if (!poll.ok()) {
      UpgradeFailed(poll.status().ToString());
      return;
    }
    ready_poll_ = std::move(poll).value();
    ready_poll_->Start(UV_READABLE, [this](int, int) {
      char buf[16];
      ssize_t n = ::read(ready_poll_->fd(), buf, sizeof(buf));
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      if (n > 0 && std::string_view(buf, static_cast<size_t>(n)).starts_with("ready")) {
        HandedOver();
      } else {
        UpgradeFailed("the new process exited before it served (see its lines above)");
      }
    });
    auto t = loop::Timer::Create(*loop_);
    if (t.ok()) {
      upgrade_timer_ = std::move(t).value();
      upgrade_timer_->Start(kUpgradeTimeoutMs, [this] {
        UpgradeFailed("the new process did not serve within " +
                      std::to_string(kUpgradeTimeoutMs / 1000) + "s");
      });
    }
  }

  // The new process serves: this one stops accepting and writing the registry, and exits once
  // its last session ends.
  void HandedOver() {
    ready_poll_.reset();
    upgrade_timer_.reset();
    pid_t successor = upgrade_pid_;
    upgrade_pid_ = -1;
    ::close(control_fd_);
    control_fd_ = -1;
    draining_ = true;
    if (service_) service_->HandOver(successor);
    proxy_->StopListening();
    if (metrics_) metrics_->StopListening();
    renew_timer_.reset();
    reloading_ = loop::Pending();
    broker_.reset();  // no expiry, reconciliation or probe writes from this process any more
    LOG_INFO("upgrade: process %d serves now; this one finishes its %llu session(s), then exits",
             static_cast<int>(successor),
             static_cast<unsigned long long>(proxy_->stats().global().active));
    auto t = loop::Timer::Create(*loop_);
    if (!t.ok()) return;
    drain_check_ = std::move(t).value();
    drain_check_->Start(0, kDrainCheckMs, [this] {
      if (proxy_->stats().global().active > 0) return;
      drain_check_->Stop();
      LOG_INFO("upgrade: the last session of the old process ended");
      stopping_ = true;
      WaitForStore();
    });
  }

  void UpgradeFailed(const std::string& why) {
    ready_poll_.reset();
    upgrade_timer_.reset();
    if (upgrade_pid_ > 0) {
      ::kill(upgrade_pid_, SIGKILL);
      ::waitpid(upgrade_pid_, nullptr, 0);
      upgrade_pid_ = -1;
    }
    LOG_ERROR("upgrade: %s; this process goes on serving", why.c_str());
    Status s = control_->Adopt(control_fd_, config_.control_socket);
    control_fd_ = -1;
    if (!s.ok()) LOG_ERROR("upgrade: control socket: %s", s.ToString().c_str());
  }

  static constexpr uint64_t kUpgradeTimeoutMs = 60000;
  static constexpr uint64_t kDrainCheckMs = 250;

  // SIGHUP (see daemon.h).
  void Reload() {
    if (stopping_) return;
    if (reloading_.active()) {
      LOG_WARN("reload: one is already in progress; this signal is ignored");
      return;
    }
    if (service_) service_->Reloading();
    Result<Config> next = reread_ ? reread_() : Result<Config>(config_);
    Status s = next.ok() ? CheckConfig(*next) : next.status();
    if (!s.ok()) {
      LOG_ERROR("reload: the configuration has errors; the running one stays: %s",
                s.message().c_str());
      if (service_) service_->Reloaded();
      return;
    }
    // The TLS material is read on the pool, as at start; the rest is applied when it is back,
    // all at once.
    auto tls = std::make_shared<Result<DaemonTls>>(Status::Internal("TLS set-up did not run"));
    auto config = std::make_shared<const Config>(std::move(next).value());
    reloading_ = loop::QueueWork(
        *loop_, [tls, config] { *tls = SetUpDaemonTls(*config); },
        [this, tls, config] {
          if (!stopping_) ApplyConfig(*config, *tls);
          if (service_) service_->Reloaded();
        });
  }

  // Everything a reload could refuse, before anything is applied.
  static Status CheckConfig(const Config& c) {
    if (!ParseLogFormat(c.log_format)) {
      return Status::InvalidArgument("[broker] log_format: '" + c.log_format.substr(0, 40) +
                                     "' is neither text nor json");
    }
    BP_RETURN_IF_ERROR(ProxyOptionsFrom(c).status());
    return ResolveSchedulerSettings(c).status();
  }

  void ApplyConfig(const Config& next, const Result<DaemonTls>& tls) {
    if (!tls.ok()) {
      LOG_ERROR("reload: the TLS material cannot be loaded; the running configuration stays: %s",
                tls.status().message().c_str());
      return;
    }
    std::vector<const OptionSpec*> changed = ChangedOptions(config_, next);
    // Binding new addresses is what can still fail: the metrics endpoint is bound aside (it
    // replaces the running one only once everything worked), then the proxy.
    bool metrics_moved = next.metrics_listen != config_.metrics_listen;
    Result<std::unique_ptr<MetricsServer>> metrics = std::unique_ptr<MetricsServer>();
    if (metrics_moved) {
      metrics = NewMetrics(next.metrics_listen, metrics_ ? metrics_->DupListeners()
                                                         : std::vector<std::pair<HostPort, int>>());
    }
    Status s = metrics.status();
    auto po = ProxyOptionsFrom(next);
    if (s.ok()) s = po.ok() ? proxy_->Reconfigure(std::move(po).value()) : po.status();
    if (s.ok()) s = InstallTls(*tls, next);
    if (!s.ok()) {
      LOG_ERROR("reload: %s; the running configuration stays", s.message().c_str());
      return;
    }
    if (metrics_moved) {
      metrics_ = std::move(metrics).value();
      LogMetrics();
    }
    SetLogLevel(next.log_level);
    SetLogFormat(*ParseLogFormat(next.log_format));
    std::string applied, waiting;
    Config kept = next;  // what the daemon now runs: `next`, minus what waits for a restart
    for (const OptionSpec* spec : changed) {
      std::string name = std::string(spec->section) + "." + spec->key;
      if (AppliedLive(*spec)) {
        applied += (applied.empty() ? "" : ", ") + name;
        continue;
      }
      waiting += (waiting.empty() ? "" : ", ") + name;
      CopyOption(*spec, config_, &kept);
    }
    config_ = std::move(kept);
    LOG_INFO("reload: configuration applied (changed: %s); TLS material read again",
             applied.empty() ? "nothing" : applied.c_str());
    if (!waiting.empty()) {
      LOG_WARN("reload: not applied, needs a restart: %s", waiting.c_str());
    }
  }

  void RenewServerCert() {
    if (renewal_.active()) return;
    auto result =
        std::make_shared<Result<std::optional<proxy::KeyAndCert>>>(Status::Internal("not run"));
    renewal_ = loop::QueueWork(
        *loop_,
        [config = config_, cas = cas_, result] {
          *result = RenewServerCertIfDue(config, cas.get());
        },
        [this, result] {
          if (!result->ok()) {
            LOG_WARN("renewing the proxy's TLS certificate: %s",
                     result->status().ToString().c_str());
            return;
          }
          if (!result->value()) return;
          auto ctx =
              proxy::NewServerContext((*result)->value().cert_pem + cas_->current()->cert_pem(),
                                      (*result)->value().key_pem);
          if (!ctx.ok()) {
            LOG_WARN("renewed TLS certificate unusable: %s", ctx.status().ToString().c_str());
            return;
          }
          tls_settings_->server_ctx = std::move(ctx).value();  // for new connections
          // Its names may have changed: routing and the id check at save follow them.
          if (auto cert = proxy::ParseCertificatePem((*result)->value().cert_pem); cert.ok()) {
            tls_settings_->proxy_names.clear();
            for (const std::string& name : proxy::SubjectAltNames(cert->get())) {
              if (name.starts_with("DNS:")) tls_settings_->proxy_names.push_back(name.substr(4));
            }
          }
          LOG_INFO("renewed the proxy's TLS certificate");
        });
  }

  void Shutdown(int signum) {
    if (stopping_) return;
    stopping_ = true;
    LOG_INFO("received signal %d; shutting down", signum);
    if (service_ && !draining_) service_->Stopping();
    control_->Close();
    renew_timer_.reset();
    reloading_ = loop::Pending();
    metrics_.reset();
    if (proxy_) proxy_->Stop();
    broker_.reset();  // drops probes, waits, the expiry timer
    WaitForStore();
  }

  // Lets a registry write in flight land before the loop stops.
  void WaitForStore() {
    if (!store_->busy()) {
      loop_->Stop();
      return;
    }
    if (!drain_timer_) {
      auto t = loop::Timer::Create(*loop_);
      if (!t.ok()) {
        loop_->Stop();
        return;
      }
      drain_timer_ = std::move(t).value();
    }
    drain_timer_->Start(10, [this] { WaitForStore(); });
  }

  // A name look-up on the pool (DNS that does not answer) keeps the loop from closing until
  // getaddrinfo gives up, which the resolver's own timeouts bound; this wait is bounded too.
  void WaitForResolves() {
    if (loop::ResolvesOnPool() == 0) return;
    LOG_INFO("waiting for %d DNS look-up(s) to return", loop::ResolvesOnPool());
    auto timer = loop::Timer::Create(*loop_);
    if (!timer.ok()) return;
    bool expired = false;
    (*timer)->Start(kResolveDrainMs, [&expired] { expired = true; });
    while (loop::ResolvesOnPool() > 0 && !expired) loop_->Run(UV_RUN_ONCE);
  }

  static constexpr uint64_t kResolveDrainMs = 30000;

  Config config_;
  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<registry::Registry> registry_;
  std::unique_ptr<registry::Store> store_;
  std::unique_ptr<registry::Scheduler> scheduler_;
  std::unique_ptr<registry::Broker> broker_;
  std::unique_ptr<registry::ControlServer> control_;
  std::unique_ptr<proxy::SshEndpoint> ssh_;
  std::unique_ptr<proxy::Proxy> proxy_;
  std::vector<loop::HandlePtr<loop::Signal>> signals_;
  loop::HandlePtr<loop::Timer> drain_timer_;
  std::shared_ptr<proxy::CaSet> cas_;
  std::shared_ptr<proxy::TlsSettings> tls_settings_;
  loop::HandlePtr<loop::Timer> renew_timer_;
  loop::Pending renewal_;
  std::unique_ptr<ServiceNotifier> service_;
  std::unique_ptr<MetricsServer> metrics_;
  int64_t start_time_ = static_cast<int64_t>(::time(nullptr));
  std::function<Result<Config>()> reread_;
  loop::Pending reloading_;
  std::vector<std::string> argv_;  // to start the successor with
  std::string exe_;                // this binary's path (the file there may have been replaced)
  Handover handover_;              // what a predecessor handed this process
  int control_fd_ = -1;            // the control socket, during an upgrade
  pid_t upgrade_pid_ = -1;         // the successor, until it serves
  bool draining_ = false;          // handed over: only sessions are left
  loop::HandlePtr<loop::Poll> ready_poll_;
  loop::HandlePtr<loop::Timer> upgrade_timer_;
  loop::HandlePtr<loop::Timer> drain_check_;
  bool stopping_ = false;
};

}  // namespace

Status RunDaemon(const Config& config, std::function<Result<Config>()> reread,
                 std::vector<std::string> argv) {
  SetLogLevel(config.log_level);
  std::optional<LogFormat> format = ParseLogFormat(config.log_format);
  if (!format) {
    return Status::InvalidArgument("[broker] log_format: '" + config.log_format.substr(0, 40) +
                                   "' is neither text nor json");
  }
  SetLogFormat(*format);
  SetLogToJournal(StderrIsJournal());
  // Before anything uses the pool: DNS look-ups must never take every thread from disk writes.
  loop::ReserveThreadPool();
  Daemon daemon(config, std::move(reread), std::move(argv));
  Status s = daemon.Start();
  if (s.ok()) daemon.Run();
  Status f = daemon.Finish();
  if (!s.ok()) return s;
  if (!f.ok()) LOG_ERROR("shutdown: %s", f.ToString().c_str());
  LOG_INFO("brokerproxy stopped");
  return Status::OK();
}

}  // namespace brokerproxy::cli
