#include "registry/control_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>

#include "loop/log.h"

namespace brokerproxy::registry {

struct ControlServer::Client {
  uint64_t id = 0;
  uid_t uid = 0;
  pid_t pid = 0;
  loop::HandlePtr<loop::Pipe> pipe;
  loop::HandlePtr<loop::Timer> idle;
  std::string buffer;      // bytes received and not yet handled
  bool admitted = false;   // holds a slot (counted in per_uid_)
  bool lingering = false;  // refused, and reading what it still sends (counted in lingering_)
  bool busy = false;       // a request is with the handler, or its reply is still being written
  bool answered = false;   // the handler replied to the request in flight
  bool eof = false;        // the client finished sending
  bool closing = false;
  Cancel cancel;  // of the request with the handler
};

namespace {

// Is something accepting connections on the Unix socket at `path`?
bool SocketIsLive(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return live;
}

// Did the peer close its end entirely (not just shut down its sending side)? On a Unix stream
// socket only a full close (or SHUT_RDWR) raises POLLHUP here; a half-close raises POLLRDHUP.
bool PeerGone(int fd) {
  if (fd < 0) return true;
  pollfd p{fd, 0, 0};
  int n = ::poll(&p, 1, 0);
  return n > 0 && (p.revents & (POLLHUP | POLLERR | POLLNVAL)) != 0;
}

}  // namespace

ControlServer::ControlServer(loop::Loop* loop, Handler handler, Options options)
    : loop_(loop), handler_(std::move(handler)), options_(options) {}

ControlServer::~ControlServer() {
  lifetime_.End();  // closing the clients below must not run their callbacks
  Close();
}

Status ControlServer::Listen(const std::string& path) {
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return Status::InvalidArgument("control socket path is longer than " +
                                   std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
                                   " bytes: " + path);
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::AlreadyExists(path + " exists and is not a socket; not touching it");
    }
    if (SocketIsLive(path)) {
      return Status::AlreadyExists("another brokerproxy daemon is already listening on " + path);
    }
    ::unlink(path.c_str());  // left behind by a daemon that did not exit cleanly
  }
  // Bound here rather than by libuv, which would remove the path whenever its handle closes:
  // on upgrade the socket outlives this process's handle (Release()).
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return PosixError("control socket", errno);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  // Anyone may connect; what they may do is decided per request from SO_PEERCRED. The socket
  // gets mode 0666 from bind() itself, under a umask: a chmod() by name afterwards would follow
  // whatever had replaced the socket in the meantime. (umask is per process; nothing else
  // creates files while the daemon starts.)
  const mode_t old_mask = ::umask(0111);
  int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  int bind_errno = errno;
  ::umask(old_mask);
  if (rc != 0) {
    ::close(fd);
    return PosixError("bind " + path, bind_errno);
  }
  return Adopt(fd, path);
}

Status ControlServer::Adopt(int fd, const std::string& path) {
  auto pipe = loop::Pipe::Create(*loop_);
  if (!pipe.ok()) {
    ::close(fd);
    return pipe.status();
  }
  listener_ = std::move(pipe).value();
  (void)::fcntl(fd, F_SETFD, FD_CLOEXEC);
  Status opened = listener_->Open(fd);
  if (!opened.ok()) {
    ::close(fd);
    listener_.reset();
    return opened;
  }
  path_ = path;
  return listener_->Listen(128, [this](Status s) {
    if (!s.ok()) {
      LOG_WARN("control socket: %s", s.ToString().c_str());
      return;
    }
    OnConnection();
  });
}

int ControlServer::Release() {
  int fd = listener_ && listener_->fd() >= 0 ? ::fcntl(listener_->fd(), F_DUPFD, 3) : -1;
  path_.clear();  // the socket stays for the next process
  Close();
  return fd;
}

void ControlServer::Close() {
  listener_.reset();
  clients_.clear();  // drops every handle: no callback reaches a client after this
  per_uid_.clear();
  admitted_ = 0;
  root_clients_ = 0;
  lingering_ = 0;
  if (!path_.empty()) {
    ::unlink(path_.c_str());
    path_.clear();
  }
}

size_t ControlServer::client_count(uid_t uid) const {
  auto it = per_uid_.find(uid);
  return it == per_uid_.end() ? 0 : it->second;
}

void ControlServer::OnConnection() {
  auto pipe = listener_->Accept();
  if (!pipe.ok()) {
    LOG_WARN("control socket: %s", pipe.status().ToString().c_str());
    return;
  }
  auto c = std::make_unique<Client>();
  c->id = next_id_++;
  c->pipe = std::move(pipe).value();
  c->pipe->SetReadBufferSize(4096);
  Status s = c->pipe->PeerCredentials(&c->uid, nullptr, &c->pid);
  auto idle = loop::Timer::Create(*loop_);
  if (!s.ok() || !idle.ok()) {
    LOG_WARN("control socket: cannot identify a client: %s",
             (s.ok() ? idle.status() : s).ToString().c_str());
    return;  // `c` drops the connection
  }
  c->idle = std::move(idle).value();
  Client* raw = c.get();
  clients_[raw->id] = std::move(c);
  const size_t mine = client_count(raw->uid);
  if (mine >= options_.max_clients_per_user) {
    // Per uid first: whoever fills their own share hears about their share, not about others.
    if (ShouldLogRefusal(raw->uid)) {
      LOG_WARN(
          "control socket: uid %u holds %zu connections, its limit; turning it away "
          "(logged once a minute)",
          static_cast<unsigned>(raw->uid), mine);
    }
    Refuse(raw, Status::ResourceExhausted(
                    "you already have " + std::to_string(mine) +
                    " connections to the broker open, the most one user may have ([broker] "
                    "max_control_clients_per_user = " +
                    std::to_string(options_.max_clients_per_user) + ")"));
    return;
  }
  if (raw->uid != 0 && admitted_ >= options_.max_clients) {
    if (ShouldLogRefusal(static_cast<uid_t>(-1))) {
      LOG_WARN("control socket: %zu clients; turning uid %u away (logged once a minute)", admitted_,
               static_cast<unsigned>(raw->uid));
    }
    Refuse(raw, Status::ResourceExhausted("the broker is busy: " + std::to_string(admitted_) +
                                          " connections of other users are open ([broker] "
                                          "max_control_clients = " +
                                          std::to_string(options_.max_clients) + ")"));
    return;
  }
  raw->admitted = true;
  ++per_uid_[raw->uid];
  ++(raw->uid == 0 ? root_clients_ : admitted_);
  if (!StartReading(raw).ok()) {
    CloseClient(raw);
    return;
  }
  raw->idle->Start(options_.idle_timeout_ms, [this, raw] { CloseClient(raw); });
}

bool ControlServer::ShouldLogRefusal(uid_t key) {
  const uint64_t now = loop_->Now();
  auto [it, fresh] = last_refusal_log_.try_emplace(key, now);
  if (!fresh && now - it->second < kRefusalLogIntervalMs) return false;
  it->second = now;
  return true;
}

void ControlServer::Refuse(Client* c, const Status& why) {
  // The client may still be sending its request. Closing now could fail its send before it
  // reads why (or reset the connection under the answer), so what it sends is read and dropped
  // until it closes, for at most kRefuseLingerMs and kMaxRequestBytes; and for at most
  // kMaxLingering clients at a time, so a flood of refused connections holds few descriptors.
  Status s = c->pipe->Write(EncodeError(why) + "\n");
  if (s.ok() && lingering_ >= kMaxLingering) {
    CloseClient(c);
    return;
  }
  if (s.ok()) s = c->pipe->Shutdown();
  if (s.ok()) {
    s = c->pipe->ReadStart(
        [this, c, dropped = size_t{0}](std::string_view d) mutable {
          dropped += d.size();
          if (dropped > kMaxRequestBytes) CloseClient(c);
        },
        [this, c](Status) { CloseClient(c); });
  }
  if (!s.ok()) {
    CloseClient(c);
    return;
  }
  c->lingering = true;
  ++lingering_;
  c->idle->Start(kRefuseLingerMs, [this, c] { CloseClient(c); });
}

Status ControlServer::StartReading(Client* c) {
  return c->pipe->ReadStart([this, c](std::string_view d) { OnData(c, d); },
                            [this, c](Status end) { OnEnd(c, std::move(end)); });
}

void ControlServer::OnEnd(Client* c, Status end) {
  if (!end.ok()) {
    CloseClient(c);
    return;
  }
  c->eof = true;
  if (!c->busy) {
    ProcessLines(c);
    return;
  }
  // EOF with a request in flight: a client that closed is gone, so its request is cancelled
  // now rather than held until it completes (a `wait` may take hours). One that only shut
  // down its sending side may still read the reply; it is checked until then, since no further
  // read will tell when it closes.
  WatchHangup(c);
}

void ControlServer::WatchHangup(Client* c) {
  if (PeerGone(c->pipe->fd())) {
    CloseClient(c);
    return;
  }
  c->idle->Start(kHangupCheckMs, kHangupCheckMs, [this, c] {
    if (PeerGone(c->pipe->fd())) CloseClient(c);
  });
}

void ControlServer::OnData(Client* c, std::string_view data) {
  c->buffer.append(data);
  if (c->busy) {
    // Requests sent ahead wait for the one in flight; one more full line is all that may wait.
    if (c->buffer.size() > kMaxRequestBytes + 1) {
      LOG_WARN("control socket: uid %u sent more than %zu bytes ahead of a reply; closing",
               static_cast<unsigned>(c->uid), kMaxRequestBytes + 1);
      c->buffer.clear();
      CancelRequest(c);  // its reply will not be written: this error is the last line
      FinishWithError(c, Status::InvalidArgument(
                             "more than " + std::to_string(kMaxRequestBytes + 1) +
                             " bytes sent while a request was in flight; send the next request "
                             "after its reply"));
    }
    return;
  }
  if (c->buffer.find('\n') == std::string::npos && c->buffer.size() > kMaxRequestBytes) {
    LOG_WARN("control socket: uid %u sent a line longer than %zu bytes; closing",
             static_cast<unsigned>(c->uid), kMaxRequestBytes);
    c->buffer.clear();
    c->pipe->ReadStop();
    FinishWithError(c, Status::InvalidArgument("request line longer than " +
                                               std::to_string(kMaxRequestBytes) + " bytes"));
    return;
  }
  ProcessLines(c);
}

void ControlServer::FinishWithError(Client* c, const Status& status) {
  Status written = c->pipe->Write(EncodeError(status) + "\n");
  c->eof = true;  // nothing more is read from this client
  if (written.ok()) {
    MaybeFinish(c);
  } else {
    CloseClient(c);
  }
}

void ControlServer::ProcessLines(Client* c) {
  while (!c->busy && !c->closing) {
    size_t nl = c->buffer.find('\n');
    if (nl == std::string::npos) break;
    std::string line = c->buffer.substr(0, nl);
    c->buffer.erase(0, nl + 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (line.size() > kMaxRequestBytes) {
      // Only a line sent ahead of a reply can get here (OnData bounds the others).
      LOG_WARN("control socket: uid %u sent a line longer than %zu bytes; closing",
               static_cast<unsigned>(c->uid), kMaxRequestBytes);
      CloseClient(c);
      return;
    }
    auto req = ParseRequest(line);
    if (!req.ok()) {
      LOG_DEBUG("control socket: bad request from uid %u: %s", static_cast<unsigned>(c->uid),
                req.status().ToString().c_str());
      if (!c->pipe->Write(EncodeError(req.status()) + "\n").ok()) {
        CloseClient(c);
        return;
      }
      continue;
    }
    LOG_DEBUG("control socket: uid %u pid %d: %s %s", static_cast<unsigned>(c->uid),
              static_cast<int>(c->pid), OpName(req->op), req->job.c_str());
    c->busy = true;
    c->answered = false;
    c->idle->Stop();  // a "wait" may legitimately take long
    const uint64_t id = c->id;
    Cancel cancel =
        handler_(std::move(req).value(), c->uid,
                 lifetime_.Guard([this, id](std::string reply) { OnReply(id, std::move(reply)); }));
    auto it = clients_.find(id);
    if (it == clients_.end() || it->second->closing) {
      if (cancel) cancel();  // gone meanwhile
      return;
    }
    c = it->second.get();
    if (!c->answered) c->cancel = std::move(cancel);  // else the handler answered at once
    // A client that finished sending is no longer read, so nothing else would tell it left.
    if (c->eof && !c->answered) WatchHangup(c);
    return;
  }
  if (c->busy || c->closing) return;
  if (c->eof) {
    MaybeFinish(c);
    return;
  }
  c->idle->Start(options_.idle_timeout_ms, [this, c] { CloseClient(c); });
}

void ControlServer::OnReply(uint64_t id, std::string line) {
  auto it = clients_.find(id);
  if (it == clients_.end() || it->second->closing || !it->second->busy) return;
  Client* c = it->second.get();
  if (c->answered) return;  // one reply per request
  c->answered = true;
  c->cancel = nullptr;
  line += '\n';
  // The next request starts once this reply is with the kernel: a client that does not read
  // its replies holds one of them, not one per request it sends. Not reading it for the idle
  // timeout closes the client.
  c->idle->Start(options_.idle_timeout_ms, [this, c] { CloseClient(c); });
  Status s = c->pipe->Write(std::move(line), lifetime_.Guard([this, id](Status written) {
    auto it = clients_.find(id);
    if (it == clients_.end() || it->second->closing) return;
    Client* c = it->second.get();
    if (!written.ok()) {
      CloseClient(c);
      return;
    }
    c->busy = false;
    c->idle->Stop();
    ProcessLines(c);
  }));
  if (!s.ok()) CloseClient(c);
}

void ControlServer::MaybeFinish(Client* c) {
  // Everything is answered: half-close once the replies are flushed, then drop the client. One
  // that does not read them is closed at the idle timeout.
  if (c->closing) return;
  c->closing = true;
  c->pipe->ReadStop();
  c->idle->Start(options_.idle_timeout_ms,
                 [this, id = c->id] { loop_->Defer(lifetime_.Guard([this, id] { Drop(id); })); });
  Status s = c->pipe->Shutdown(lifetime_.Guard([this, id = c->id](Status) { Drop(id); }));
  if (!s.ok()) {
    c->closing = false;
    CloseClient(c);
  }
}

void ControlServer::CloseClient(Client* c) {
  if (c->closing) return;
  c->closing = true;
  c->pipe->ReadStop();
  c->idle->Stop();
  CancelRequest(c);
  // Not inline: the caller may be a callback of this client still on the stack
  // (docs/ARCHITECTURE.md, "Later, never inside").
  loop_->Defer(lifetime_.Guard([this, id = c->id] { Drop(id); }));
}

void ControlServer::CancelRequest(Client* c) {
  if (!c->busy || c->answered) return;
  c->answered = true;  // a reply that comes anyway is dropped
  if (!c->cancel) return;
  LOG_DEBUG("control socket: cancelling the request of uid %u pid %d",
            static_cast<unsigned>(c->uid), static_cast<int>(c->pid));
  Cancel cancel = std::move(c->cancel);
  c->cancel = nullptr;
  cancel();
}

void ControlServer::Drop(uint64_t id) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client* c = it->second.get();
  if (c->admitted) {
    auto u = per_uid_.find(c->uid);
    if (u != per_uid_.end() && --u->second == 0) per_uid_.erase(u);
    --(c->uid == 0 ? root_clients_ : admitted_);
  }
  if (c->lingering) --lingering_;
  clients_.erase(it);
}

}  // namespace brokerproxy::registry
