#include "cli/connect.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "cli/ca_trust.h"
#include "cli/commands.h"
#include "loop/address.h"
#include "loop/handle.h"
#include "loop/log.h"
#include "loop/loop.h"
#include "loop/poll.h"
#include "loop/signal.h"
#include "loop/sock_diag.h"
#include "loop/stream.h"
#include "loop/work.h"
#include "proxy/client/tls_path.h"
#include "proxy/client/tunnel.h"
#include "proxy/server/listener.h"
#include "proxy/transport/relay.h"
#include "registry/control_protocol.h"
#include "registry/json.h"
#include "registry/snapshot.h"

namespace brokerproxy::cli {

using proxy::client::NewDirectPath;
using proxy::client::NewSshPath;
using proxy::client::NewTlsPath;
using proxy::client::ProxyPath;
using proxy::client::Refused;
using proxy::client::Tunnel;

namespace {

constexpr int64_t kHandshakeTimeoutMs = 30000;
constexpr int64_t kLoadTimeoutMs = 30000;

// What `load` says about a job, for `connect`.
struct LoadedJob {
  std::string secret;
  std::vector<std::string> proxies;  // where the broker's proxy listens, as it sees it
  std::string ca_sha256;             // its CA's fingerprint (hex); empty if not reported
};

Result<LoadedJob> LoadJob(BrokerClient* client, const std::string& job) {
  registry::Request req;
  req.op = registry::Op::kLoad;
  req.job = job;
  auto reply = client->Call(req, kLoadTimeoutMs);
  if (!reply.ok()) return reply.status();
  const cJSON* j = cJSON_GetObjectItemCaseSensitive(reply->get(), "job");
  registry::Job loaded;
  registry::JobState state;  // a reply's job has one; any state is connected to
  if (!j) return Status::IOError("malformed reply: no job");
  Status s = registry::JobFromJson(j, registry::SecretField::kInclude, &loaded, &state);
  if (!s.ok()) return Status::IOError("malformed reply: " + s.message());
  LoadedJob out;
  out.secret = loaded.secret;
  // Older daemons send neither; the caller falls back then.
  const cJSON* list = cJSON_GetObjectItemCaseSensitive(reply->get(), "proxy");
  for (const cJSON* a = cJSON_IsArray(list) ? list->child : nullptr; a; a = a->next) {
    if (cJSON_IsString(a)) out.proxies.push_back(a->valuestring);
  }
  const cJSON* fp = cJSON_GetObjectItemCaseSensitive(reply->get(), "ca_fingerprint");
  if (cJSON_IsString(fp)) {
    auto hex = ParseCaFingerprint(fp->valuestring);
    if (!hex.ok()) return Status::IOError("malformed reply: " + hex.status().message());
    out.ca_sha256 = *hex;
  }
  return out;
}

// Fetches the secret again, for a retry after "ERR denied"; runs on a pool thread.
using SecretLoader = std::function<Result<std::string>()>;

constexpr size_t kMaxSecret = 8192;

// The secret in the first line of `text` (trailing blanks and CR dropped).
Result<std::string> SecretFromText(std::string_view text, const std::string& where) {
  std::string_view line = text.substr(0, text.find('\n'));
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) {
    line.remove_suffix(1);
  }
  if (line.empty()) return Status::InvalidArgument("no secret in " + where);
  if (line.size() > kMaxSecret)
    return Status::InvalidArgument("the secret in " + where + " is too long");
  return std::string(line);
}

// `--secret-file PATH`: a file only its owner can read (like an ssh key), read afresh each time;
// "-": one line of stdin.
Result<std::string> ReadSecretFile(const std::string& path) {
  int fd = path == "-" ? ::dup(STDIN_FILENO) : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  std::string where = path == "-" ? "stdin" : path;
  if (fd < 0) return PosixError("--secret-file " + where, errno);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && path != "-" && (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return Status::PermissionDenied("--secret-file " + path +
                                    " can be read or changed by other users (mode " + mode +
                                    "); chmod 600 " + path);
  }
  std::string text;
  char buf[1024];
  // Up to the first newline (stdin may stay open), at most one secret's worth.
  while (text.find('\n') == std::string::npos && text.size() <= kMaxSecret) {
    ssize_t n = ::read(fd, buf, path == "-" ? 1 : sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError("reading --secret-file " + where, errno);
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  return SecretFromText(text, where);
}

// "unreserved" characters stay; everything else is %-encoded, for a URL's query.
std::string UrlEncode(std::string_view text) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char c : text) {
    unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += c;
    } else {
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 15];
    }
  }
  return out;
}

// Owns the loop-side state of one `connect` run.
class Connector {
 public:
  // `reload` fetches the secret again, where it came from, when the proxy refuses it;
  // `client`'s Interrupt() cuts that short. `token_url`: also print the URL with the secret.
  Connector(loop::Reactor* reactor, std::unique_ptr<ProxyPath> path, bool allow_remote,
            BrokerClient* client, SecretLoader reload, std::string job, std::string secret,
            bool token_url)
      : loop_(&reactor->loop()),
        reactor_(reactor),
        path_(std::move(path)),
        allow_remote_(allow_remote),
        token_url_(token_url),
        client_(client),
        reload_(std::move(reload)),
        job_(std::move(job)),
        secret_(std::move(secret)) {}
  ~Connector() { RemoveUnixSocket(); }
  Connector(const Connector&) = delete;
  Connector& operator=(const Connector&) = delete;

  Status Listen(const HostPort& address, const std::string& job) {
    auto l = proxy::Listener::Create(reactor_, address, 60,
                                     [this](int fd, const sockaddr_storage& peer) {
                                       if (!Admit(fd, peer)) {
                                         ::close(fd);
                                         return;
                                       }
                                       OnLocal(fd);
                                     });
    if (!l.ok()) return l.status();
    listener_ = std::move(l).value();
    std::printf("brokerproxy: listening on %s for job %s (proxy %s)\n",
                listener_->address().c_str(), job.c_str(), path_->Describe().c_str());
    // What to open in a browser; a wildcard address is reached on loopback.
    std::string shown = listener_->address();
    if (shown.starts_with("0.0.0.0:")) shown = "127.0.0.1" + shown.substr(7);
    if (shown.starts_with("[::]:")) shown = "[::1]" + shown.substr(4);
    std::printf("brokerproxy: open http://%s/\n", shown.c_str());
    // The secret goes to stdout only when asked for, never to a log.
    if (token_url_) std::printf("http://%s/?token=%s\n", shown.c_str(), UrlEncode(secret_).c_str());
    std::fflush(stdout);
    return Status::OK();
  }

  // `--listen unix:PATH`: a socket of mode 0600 in a directory that belongs to this user and
  // that only they can reach. The directory is opened once and the socket made through that
  // descriptor, so it cannot be swapped for another between the check and the bind.
  Status ListenUnix(const std::string& path, const std::string& job) {
    size_t slash = path.rfind('/');
    std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    if (name.empty() || name == "." || name == "..") {
      return Status::InvalidArgument("--listen unix:" + path + ": no socket name");
    }
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) return PosixError("--listen unix:" + path + ": " + dir, errno);
    struct stat st {};
    bool private_dir =
        ::fstat(dfd, &st) == 0 && st.st_uid == ::geteuid() && (st.st_mode & 077) == 0;
    std::string pinned = "/proc/self/fd/" + std::to_string(dfd) + "/" + name;
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    Status s;
    if (!private_dir) {
      s = Status::PermissionDenied(dir +
                                   " must be a directory of yours that only you can reach "
                                   "(mkdir -m 700 " +
                                   dir + ")");
    } else if (pinned.size() >= sizeof(sun.sun_path)) {
      s = Status::InvalidArgument("name too long");
    } else {
      std::memcpy(sun.sun_path, pinned.c_str(), pinned.size() + 1);
      s = BindUnix(dfd, name, sun);
    }
    if (!s.ok()) {
      ::close(dfd);
      return s.WithContext("--listen unix:" + path);
    }
    // Kept open, so that the socket is removed from this directory at the end, wherever its
    // path leads by then.
    unix_dir_ = dfd;
    unix_name_ = name;
    unix_path_ = path;
    std::printf("brokerproxy: listening on unix:%s for job %s (proxy %s)\n", path.c_str(),
                job.c_str(), path_->Describe().c_str());
    std::fflush(stdout);
    return Status::OK();
  }

  Status Stdio() {
    // epoll cannot watch regular files; ssh's ProxyCommand gives pipes.
    const char* kHint =
        "--stdio needs stdin and stdout to be pipes, sockets or a terminal "
        "(as ssh ProxyCommand gives them); for a file use `cat FILE | ...`";
    // The reactor closes what it holds at the end: give it copies of stdin and stdout.
    // Copies share their open files with fds 0 and 1 (and a terminal with fd 2).
    auto in = reactor_->Add(::fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3), nullptr,
                            loop::Reactor::Sharing::kShared);
    if (!in.ok()) return Status::InvalidArgument(std::string("stdin: ") + kHint);
    auto out = reactor_->Add(::fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3), nullptr,
                             loop::Reactor::Sharing::kShared);
    if (!out.ok()) return Status::InvalidArgument(std::string("stdout: ") + kHint);
    // The copy of stdout is the last reference to the pipe once the original is closed: closing
    // it is then what tells the reader the stream ended.
    ::close(STDOUT_FILENO);
    ::open("/dev/null", O_WRONLY | O_CLOEXEC);  // fd 1 stays valid for stray writes
    for (loop::IoHandle* io : {&*in, &*out}) {
      int flags = ::fcntl(io->fd(), F_GETFL);
      ::fcntl(io->fd(), F_SETFL, flags | O_NONBLOCK);
    }
    stdio_id_ = next_id_++;
    OpenTunnel(stdio_id_, proxy::Relay::Side{std::move(in).value(), std::move(out).value()}, "",
               /*retried=*/false);
    return Status::OK();
  }

  Status WatchSignals() {
    for (int signum : {SIGINT, SIGTERM, SIGHUP}) {
      auto sig = loop::Signal::Create(*loop_);
      if (!sig.ok()) return sig.status();
      BP_RETURN_IF_ERROR((*sig)->Start(signum, [this](int) { Stop(); }));
      signals_.push_back(std::move(sig).value());
    }
    return Status::OK();
  }

  void Stop() {
    listener_.reset();
    unix_listener_.reset();
    RemoveUnixSocket();
    signals_.clear();
    if (refetch_.active()) {
      // A re-fetch under way blocks a pool thread, and the loop waits for it (up to
      // kLoadTimeoutMs, longer through ssh): cut it short. Its answer is dropped.
      client_->Interrupt();
      refetch_.Detach();
    }
    waiting_.clear();  // closes the connections that waited for the secret
    // Not inline: a tunnel's callback may be what called Stop(). The path goes last: the
    // tunnels use it, and it may hold handles of its own (the SSH session's poll).
    loop_->Defer([this] {
      tunnels_.clear();
      path_.reset();
    });
  }

  const Status& stdio_status() const { return stdio_status_; }
  // Why the connector stopped by itself (the job is gone); OK otherwise.
  const Status& failure() const { return failure_; }

 private:
  void RemoveUnixSocket() {
    if (unix_dir_ < 0) return;
    ::unlinkat(unix_dir_, unix_name_.c_str(), 0);
    ::close(unix_dir_);
    unix_dir_ = -1;
  }

  Status BindUnix(int dfd, const std::string& name, const sockaddr_un& sun) {
    // A socket left by a `connect` that was killed is replaced; anything else is kept.
    struct stat old {};
    if (::fstatat(dfd, name.c_str(), &old, AT_SYMLINK_NOFOLLOW) == 0) {
      if (!S_ISSOCK(old.st_mode)) return Status::AlreadyExists("exists and is not a socket");
      int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      bool live =
          probe >= 0 && ::connect(probe, reinterpret_cast<const sockaddr*>(&sun), sizeof(sun)) == 0;
      if (probe >= 0) ::close(probe);
      if (live) return Status::AlreadyExists("something already listens there");
      ::unlinkat(dfd, name.c_str(), 0);
    }
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return PosixError("socket", errno);
    mode_t mask = ::umask(0177);  // the socket file is created 0600
    int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&sun), sizeof(sun));
    int err = errno;
    ::umask(mask);
    if (rc != 0) {
      ::close(fd);
      return PosixError("bind", err);
    }
    if (::listen(fd, 128) != 0) {
      err = errno;
      ::close(fd);
      ::unlinkat(dfd, name.c_str(), 0);
      return PosixError("listen", err);
    }
    auto io = reactor_->Add(fd, [this](loop::IoWatch* w) { OnUnixReadable(w); });
    if (!io.ok()) {
      ::unlinkat(dfd, name.c_str(), 0);
      return io.status();
    }
    unix_listener_ = std::move(io).value();
    return Status::OK();
  }

  void OnUnixReadable(loop::IoWatch* w) {
    for (int i = 0; i < 64; ++i) {
      int fd = ::accept4(w->fd(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        w->ClearReadable();
        if (errno != EAGAIN) {
          std::fprintf(stderr, "brokerproxy: accept on unix:%s: %s\n", unix_path_.c_str(),
                       std::strerror(errno));
        }
        return;
      }
      // The file mode already keeps others out; root, who passes it, is refused here too.
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != ::geteuid()) {
        std::fprintf(stderr,
                     "brokerproxy: refused a connection on unix:%s: it comes from uid %u, not "
                     "from this user (uid %u)\n",
                     unix_path_.c_str(), static_cast<unsigned>(cred.uid),
                     static_cast<unsigned>(::geteuid()));
        ::close(fd);
        continue;
      }
      OnLocal(fd);
    }
    w->Yield();  // more may wait: on a later turn, so other work runs in between
  }

  // Serves only this user: a connection from this host is traced to its socket's owner. One
  // line on stderr for each refusal.
  bool Admit(int fd, const sockaddr_storage& peer) {
    sockaddr_storage self{};
    socklen_t len = sizeof(self);
    std::string from = loop::FormatAddress(reinterpret_cast<const sockaddr*>(&peer));
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&self), &len) != 0) {
      std::fprintf(stderr, "brokerproxy: refused a connection from %s: getsockname: %s\n",
                   from.c_str(), std::strerror(errno));
      return false;
    }
    uid_t me = ::geteuid();
    auto owner = loop::TcpPeerOwner(reinterpret_cast<const sockaddr*>(&peer),
                                    reinterpret_cast<const sockaddr*>(&self));
    if (owner.ok() && *owner == me) return true;
    if (!owner.ok() && owner.status().code() == Status::Code::kNotFound && allow_remote_ &&
        !IsLoopback(peer)) {
      return true;  // another host's: --allow-remote-clients accepted that it cannot be traced
    }
    std::string why = owner.ok() ? "it belongs to uid " + std::to_string(*owner) +
                                       ", not to this user (uid " + std::to_string(me) + ")"
                                 : owner.status().message();
    std::fprintf(stderr, "brokerproxy: refused a connection from %s: %s\n", from.c_str(),
                 why.c_str());
    return false;
  }

  void OnLocal(int fd) {
    auto io = reactor_->Add(fd, nullptr);
    if (!io.ok()) return;
    OpenTunnel(next_id_++, proxy::Relay::Side{std::move(io).value()}, "", /*retried=*/false);
  }

  // Connection `id` through the proxy; `replay`: bytes its first attempt read already.
  void OpenTunnel(uint64_t id, proxy::Relay::Side local, std::string replay, bool retried) {
    tunnels_[id] = path_->Open(
        std::move(local), std::move(replay),
        [this, id, retried, used = secret_](Status s) { OnTunnelDone(id, retried, used, s); });
  }

  // `used`: the secret the tunnel sent.
  void OnTunnelDone(uint64_t id, bool retried, const std::string& used, const Status& s) {
    // "ERR denied": the job was saved again (a new secret) or is gone. "ERR busy" may mean the
    // same: the proxy answers a wrong secret so while the job is throttled, and the failures of
    // a stale secret (or another user's) throttle it. The connection waits, once, for the secret
    // to be fetched again.
    auto it = tunnels_.find(id);
    std::optional<Refused> refused;
    if (!s.ok() && !retried && it != tunnels_.end()) refused = it->second->TakeRefused();
    if (refused) {
      // The finished tunnel stays in tunnels_[id] (it is on the stack) until the retry
      // replaces it.
      waiting_.push_back(Waiting{id, std::move(*refused), s, used});
      Refetch();
      return;
    }
    Finished(id, s);
  }

  void Finished(uint64_t id, const Status& s) {
    if (!s.ok()) {
      std::fprintf(stderr, "brokerproxy: connection %llu: %s\n",
                   static_cast<unsigned long long>(id), s.message().c_str());
    }
    if (id == stdio_id_) {
      stdio_status_ = s;
      Stop();
      return;
    }
    // The tunnel may be on the stack: drop it on a later turn.
    loop_->Defer([this, id] { tunnels_.erase(id); });
  }

  // Fetches the job's secret again, the way `connect` got it first, on the thread pool (the
  // call blocks, bounded by kLoadTimeoutMs). One at a time: connections refused meanwhile wait
  // for the same answer.
  void Refetch() {
    if (refetch_.active()) return;
    auto result = std::make_shared<Result<std::string>>(Status::Internal("not fetched"));
    refetch_ = loop::QueueWork(
        *loop_, [reload = reload_, result] { *result = reload(); },
        [this, result] { OnRefetched(std::move(*result)); });
  }

  void OnRefetched(Result<std::string> secret) {
    std::vector<Waiting> waiting = std::move(waiting_);
    waiting_.clear();
    if (!secret.ok() && secret.status().code() == Status::Code::kNotFound) {
      // Every later connection would be refused too: stop instead.
      failure_ = Status::NotFound("job " + job_ + " is no longer registered");
      Stop();
      return;
    }
    if (secret.ok() && *secret != secret_) {
      secret_ = *secret;
      path_->SetSecret(*secret);
    }
    for (Waiting& w : waiting) {
      // Another secret than the one this connection was refused with (a connection that went
      // out just before an earlier fetch changed it counts too).
      if (secret.ok() && *secret != w.used) {
        OpenTunnel(w.id, std::move(w.refused.local), std::move(w.refused.early),
                   /*retried=*/true);
        continue;
      }
      // The same secret (or none to be had): the refusal stands, as it was (denied, or busy),
      // and no retry.
      std::string why = secret.ok() ? "the broker still gives the same secret"
                                    : "fetching it again failed: " + secret.status().message();
      w.refused = Refused{};
      Finished(w.id, Status::FromCode(w.denied.code(), w.denied.message() + "; " + why));
    }
  }

  loop::Loop* loop_;
  loop::Reactor* reactor_;
  std::unique_ptr<ProxyPath> path_;
  bool allow_remote_;
  bool token_url_;
  std::unique_ptr<proxy::Listener> listener_;
  loop::IoHandle unix_listener_;
  std::string unix_path_;  // for messages
  int unix_dir_ = -1;      // the socket's directory, where Stop() removes `unix_name_`
  std::string unix_name_;
  std::vector<loop::HandlePtr<loop::Signal>> signals_;
  std::unordered_map<uint64_t, std::unique_ptr<Tunnel>> tunnels_;
  uint64_t stdio_id_ = 0;  // the --stdio tunnel's id in tunnels_; 0: none
  Status stdio_status_;
  uint64_t next_id_ = 1;
  // Re-fetching the secret after "ERR denied" or "ERR busy".
  struct Waiting {
    uint64_t id;
    Refused refused;
    Status denied;
    std::string used;  // the secret it was refused with
  };
  BrokerClient* client_;
  SecretLoader reload_;
  std::string job_;
  std::string secret_;  // the one the path sends
  loop::Pending refetch_;
  std::vector<Waiting> waiting_;
  Status failure_;
};

// `localhost` or a loopback literal: an address whose traffic never leaves this host.
bool IsLoopbackHost(const std::string& host) {
  if (host == "localhost") return true;
  std::optional<sockaddr_storage> addr = loop::ParseNumericAddress(host, 0);
  return addr && IsLoopback(*addr);
}

bool IsWildcardHost(const std::string& host) {
  return host.empty() || host == "0.0.0.0" || host == "::";
}

// Of the addresses the login node's proxy listens on (its `load` reply), the one a tunnel
// through the SSH session dials from the login node: a loopback one, else a wildcard one
// (reached on loopback there), else the first. nullopt if none parses (an older daemon).
std::optional<HostPort> ProxySeenFromLoginNode(const std::vector<std::string>& addresses) {
  std::optional<HostPort> first, wildcard;
  for (const std::string& a : addresses) {
    auto hp = ParseHostPort(a);
    if (!hp.ok()) continue;
    if (IsLoopbackHost(hp->host)) return *hp;
    if (IsWildcardHost(hp->host) && !wildcard) {
      wildcard = HostPort{hp->host == "::" ? "::1" : "127.0.0.1", hp->port};
    }
    if (!first) first = *hp;
  }
  return wildcard ? wildcard : first;
}

// The one `--tls --via` dials from here: a wildcard address is the login host itself (the one
// reached by SSH), another non-loopback address is dialled as it is; a proxy that listens on
// loopback only cannot be reached from here.
Result<HostPort> ProxySeenFromHere(const std::vector<std::string>& addresses,
                                   const std::string& login_host, const std::string& via) {
  std::optional<HostPort> other;
  for (const std::string& a : addresses) {
    auto hp = ParseHostPort(a);
    if (!hp.ok()) continue;
    if (IsWildcardHost(hp->host)) return HostPort{login_host, hp->port};
    if (!IsLoopbackHost(hp->host) && !other) other = *hp;
  }
  if (other) return *other;
  std::string list;
  for (const std::string& a : addresses) list += (list.empty() ? "" : " ") + a;
  return Status::InvalidArgument("the proxy on " + via + " listens only on " + list +
                                 ", which cannot be reached from here over TLS; use --via "
                                 "without --tls (the SSH session encrypts the tunnel)");
}

// The CA for --tls when no file names it: the one in the proxy's chain whose fingerprint is
// `want` (hex), or with none, the one pinned for the proxy address, or on first use the
// chain's own CA, pinned now (tls_path.h).
Result<std::string> CaFromProxy(const HostPort& proxy, std::string want, int64_t timeout_ms) {
  const std::string key = proxy.ToString();
  std::optional<CaPins> pins;
  std::optional<std::string> pinned;
  if (want.empty()) {
    std::string path = CaPins::DefaultPath();
    if (path.empty()) {
      return Status::InvalidArgument(
          "no place to pin the broker's CA (neither $XDG_CONFIG_HOME nor $HOME is set): pass "
          "--ca-fingerprint SHA256:... (`brokerproxy load JOB` on the login node shows it) or "
          "--ca FILE");
    }
    pins.emplace(path);
    auto found = pins->Lookup(key);
    if (!found.ok()) return found.status();
    pinned = *found;
    if (pinned) want = *pinned;
  }
  auto chain = FetchProxyChain(proxy.host, proxy.port, timeout_ms);
  if (!chain.ok()) return chain.status();
  std::string got;
  auto ca = ProxyCaFromChain(*chain, proxy.host, want, &got);
  if (!ca.ok()) {
    if (pinned && !got.empty() && got != *pinned) {
      return Status::PermissionDenied(
          "\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
          "@    WARNING: THE BROKER CA OF " +
          key +
          " HAS CHANGED!\n"
          "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
          "The proxy at " +
          key + " presents the CA SHA256:" + got + ",\nbut " + pins->path() +
          " pins SHA256:" + *pinned +
          " for it.\nSomeone may be impersonating the proxy to take the job's secret, or the "
          "broker's CA was replaced.\nCompare with `brokerproxy load JOB` on the login node; if "
          "the CA was replaced, remove the line of " +
          key + " from " + pins->path() + ".\nRefusing to connect.");
    }
    return ca.status();
  }
  if (pins && !pinned) {
    BP_RETURN_IF_ERROR(pins->Add(key, got).WithContext("pinning the broker's CA"));
    std::fprintf(stderr,
                 "brokerproxy: first use of the proxy at %s: pinned its CA SHA256:%s in %s "
                 "(compare with `brokerproxy load JOB` on the login node)\n",
                 key.c_str(), got.c_str(), pins->path().c_str());
  }
  return ca;
}

}  // namespace

Status RunConnect(const Config& config, BrokerClient* client, RemoteClient* remote,
                  const ConnectArgs& args) {
  if (args.stdio == !args.listen.empty()) {
    return Status::InvalidArgument("connect needs exactly one of --listen [ADDR:]PORT or --stdio");
  }
  if (!registry::ValidJobId(args.job)) {
    return Status::InvalidArgument("'" + args.job + "' is not a valid job id");
  }
  HostPort proxy_addr = config.proxy;
  if (!args.proxy.empty()) {
    auto p = ParseHostPort(args.proxy, 7000);
    if (!p.ok()) return p.status().WithContext("--proxy");
    proxy_addr = *p;
  }
  std::optional<HostPort> listen;
  std::optional<std::string> listen_unix;
  if (args.listen.starts_with("unix:")) {
    listen_unix = args.listen.substr(5);
    if (listen_unix->empty()) return Status::InvalidArgument("--listen unix: needs a path");
  } else if (!args.listen.empty()) {
    auto l = ParseHostPort(args.listen, 0, "127.0.0.1", /*allow_zero=*/true);
    if (!l.ok()) return l.status().WithContext("--listen");
    listen = *l;
    // Only loopback connections can be traced to their user.
    auto numeric = loop::ParseNumericAddress(listen->host, 0);
    bool loopback = listen->host == "localhost" || (numeric && IsLoopback(*numeric));
    if (!loopback && !args.allow_remote) {
      return Status::InvalidArgument(
          "--listen " + listen->ToString() +
          ": connections from other hosts cannot be traced to a user, so anyone who reaches "
          "this address would use your tunnel; listen on loopback (127.0.0.1, the default) or "
          "add --allow-remote-clients");
    }
  }
  if (!args.ca.empty() && !args.tls) return Status::InvalidArgument("--ca is only for --tls");
  if (!args.ca_fingerprint.empty() && !args.tls) {
    return Status::InvalidArgument("--ca-fingerprint is only for --tls");
  }
  if (!args.ca.empty() && !args.ca_fingerprint.empty()) {
    return Status::InvalidArgument("give --ca FILE or --ca-fingerprint, not both");
  }
  std::string want_ca;
  if (!args.ca_fingerprint.empty()) {
    auto fp = ParseCaFingerprint(args.ca_fingerprint);
    if (!fp.ok()) return fp.status().WithContext("--ca-fingerprint");
    want_ca = *fp;
  }
  if (remote && !args.secret_file.empty()) {
    return Status::InvalidArgument(
        "--secret-file and --via do not combine: with --via the secret comes from the login "
        "node");
  }
  if (args.stdio && args.secret_file == "-") {
    return Status::InvalidArgument(
        "--secret-file - reads stdin, which --stdio carries: give a file or BROKER_SECRET");
  }

  // The secret, from where the user said, and how to fetch it again after "ERR denied".
  LoadedJob loaded;
  SecretLoader reload;
  bool from_daemon = false;
  const char* env_secret = std::getenv("BROKER_SECRET");
  auto load_from = [job = args.job](BrokerClient* c) -> SecretLoader {
    return [c, job]() -> Result<std::string> {
      auto l = LoadJob(c, job);
      if (!l.ok()) return l.status();
      return l->secret;
    };
  };
  if (remote) {
    auto l = LoadJob(remote, args.job);
    if (!l.ok()) return l.status();
    loaded = std::move(l).value();
    reload = load_from(remote);
  } else if (!args.secret_file.empty()) {
    auto secret = ReadSecretFile(args.secret_file);
    if (!secret.ok()) return secret.status();
    loaded.secret = std::move(secret).value();
    if (args.secret_file == "-") {
      reload = [] { return Result<std::string>(Status::Unavailable("it was read from stdin")); };
    } else {
      reload = [path = args.secret_file] { return ReadSecretFile(path); };  // it may be updated
    }
  } else if (env_secret != nullptr && env_secret[0] != '\0') {
    auto secret = SecretFromText(env_secret, "BROKER_SECRET");
    if (!secret.ok()) return secret.status();
    loaded.secret = std::move(secret).value();
    reload = [] { return Result<std::string>(Status::Unavailable("it came from BROKER_SECRET")); };
  } else {
    auto l = LoadJob(client, args.job);
    if (!l.ok()) {
      if (l.status().code() != Status::Code::kUnavailable) return l.status();
      return Status::Unavailable(
          l.status().message() +
          ". Without a daemon here, give the job's secret (`brokerproxy load JOB` on the login "
          "node shows it) with --secret-file PATH, on stdin with --secret-file -, or in the "
          "environment as BROKER_SECRET; or let --via LOGIN fetch it over SSH");
    }
    loaded = std::move(l).value();
    reload = load_from(client);
    from_daemon = true;
  }

  // Through the login node: the proxy address it reported, as it sees it (the laptop's idea
  // of the proxy address means nothing there). An older daemon reports none.
  if (remote && !args.tls && !args.proxy_given) {
    if (auto p = ProxySeenFromLoginNode(loaded.proxies)) proxy_addr = *p;
  }
  if (remote && args.tls && !args.proxy_given && !loaded.proxies.empty()) {
    auto p =
        ProxySeenFromHere(loaded.proxies, remote->ConnectedHost(), remote->target().ToString());
    if (!p.ok()) return p.status();
    proxy_addr = *p;
  }
  if (!remote && !args.tls && !args.insecure_plain && !IsLoopbackHost(proxy_addr.host)) {
    return Status::InvalidArgument(
        "the proxy address " + proxy_addr.ToString() +
        " is not loopback, and the plain path would send the job's secret across the network "
        "in clear: use --tls, or --via LOGIN, or --insecure-plain inside a network you trust");
  }

  proxy::SslCtxPtr tls_ctx;
  if (args.tls) {
    // The CA the proxy's certificate must chain to (tls_path.h): a file; the CA in the proxy's
    // chain with a fingerprint given here or by the login node; the daemon's own; or pinned.
    std::string ca_pem;
    std::string what = args.ca.empty() ? "the broker's CA" : args.ca;
    if (!args.ca.empty()) {
      auto text = registry::ReadFileIfExists(args.ca, 1 << 20);
      if (!text.ok()) return text.status().WithContext("--ca");
      if (!text->has_value()) return Status::NotFound("--ca: no such file: " + args.ca);
      ca_pem = std::move(**text);
    } else {
      if (want_ca.empty() && remote) want_ca = loaded.ca_sha256;
      if (want_ca.empty() && (from_daemon || remote)) {
        // The daemon here, or an older one on the login node that reports no fingerprint:
        // its bundle, kept in memory only.
        auto fetched = FetchCaPem(client);
        if (!fetched.ok()) return fetched.status().WithContext("fetching the broker's CA");
        ca_pem = std::move(fetched).value();
      } else {
        auto ca = CaFromProxy(proxy_addr, want_ca, kHandshakeTimeoutMs);
        if (!ca.ok()) return ca.status();
        ca_pem = std::move(ca).value();
      }
    }
    auto ctx = proxy::NewClientContext(ca_pem);
    if (!ctx.ok()) return ctx.status().WithContext(what);
    tls_ctx = std::move(ctx).value();
  }

  const std::string secret_copy = loaded.secret;
  // Through the login node without TLS: the session that loaded the secret carries the
  // tunnels.
  proxy::SshSessionPtr session;
  if (remote && !args.tls) {
    auto s = remote->TakeSession();
    if (!s.ok()) return s.status();
    session = std::move(s).value();
  }

  auto loop = loop::Loop::Create();
  if (!loop.ok()) return loop.status();
  Status result;
  {
    auto reactor = loop::Reactor::Create(**loop);
    if (!reactor.ok()) return reactor.status();
    proxy::PipePool pipes(1 << 20, 16);
    Connector* connector_ptr = nullptr;
    Status lost;
    std::unique_ptr<ProxyPath> path;
    if (session) {
      auto p = NewSshPath(reactor->get(), std::move(session), remote->target().ToString(),
                          proxy_addr.host, proxy_addr.port, args.job, loaded.secret,
                          kHandshakeTimeoutMs, [&](Status s) {
                            lost = std::move(s);
                            if (connector_ptr) connector_ptr->Stop();
                          });
      if (!p.ok()) return p.status();
      path = std::move(p).value();
    } else if (args.tls) {
      path = NewTlsPath(reactor->get(), std::move(tls_ctx), proxy_addr.host, proxy_addr.port,
                        args.job, loaded.secret, kHandshakeTimeoutMs);
    } else {
      path = NewDirectPath(reactor->get(), &pipes, proxy_addr.host, proxy_addr.port, args.job,
                           loaded.secret, kHandshakeTimeoutMs);
    }
    Connector connector(reactor->get(), std::move(path), args.allow_remote, client,
                        std::move(reload), args.job, secret_copy, args.token_url);
    connector_ptr = &connector;
    result = connector.WatchSignals();
    if (result.ok()) {
      result = listen_unix ? connector.ListenUnix(*listen_unix, args.job)
               : listen    ? connector.Listen(*listen, args.job)
                           : connector.Stdio();
    }
    if (!result.ok()) {
      connector.Stop();
    }
    (*reactor)->Run();  // one wait per turn: nearly every wake-up is a tunnel's socket
    if (result.ok()) result = connector.failure();
    if (result.ok() && args.stdio) result = connector.stdio_status();
    if (result.ok() && !lost.ok()) result = lost;
    connector_ptr = nullptr;
  }
  (*loop)->Run();  // let close callbacks run
  Status closed = (*loop)->Close();
  if (!closed.ok()) LOG_ERROR("%s", closed.ToString().c_str());
  return result;
}

}  // namespace brokerproxy::cli
