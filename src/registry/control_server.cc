#include "registry/control_server.h"

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
  std::string buffer;  // bytes received and not yet handled
  bool busy = false;   // a request is with the handler
  bool eof = false;    // the client finished sending
  bool closing = false;
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

}  // namespace

ControlServer::ControlServer(loop::Loop* loop, Handler handler, Options options)
    : loop_(loop), handler_(std::move(handler)), options_(options) {}

ControlServer::~ControlServer() {
  *alive_ = false;
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
  auto pipe = loop::Pipe::Create(*loop_);
  if (!pipe.ok()) return pipe.status();
  listener_ = std::move(pipe).value();
  // Anyone may connect; what they may do is decided per request from SO_PEERCRED. The socket
  // gets mode 0666 from bind() itself, under a umask: a chmod() by name afterwards would follow
  // whatever had replaced the socket in the meantime. (umask is per process; nothing else
  // creates files while the daemon starts.)
  const mode_t old_mask = ::umask(0111);
  Status bound = listener_->Bind(path);
  ::umask(old_mask);
  BP_RETURN_IF_ERROR(bound);
  path_ = path;
  return listener_->Listen(128, [this](Status s) {
    if (!s.ok()) {
      LOG_WARN("control socket: %s", s.ToString().c_str());
      return;
    }
    OnConnection();
  });
}

void ControlServer::Close() {
  listener_.reset();
  clients_.clear();  // drops every handle: no callback reaches a client after this
  if (!path_.empty()) {
    ::unlink(path_.c_str());
    path_.clear();
  }
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
  if (clients_.size() > options_.max_clients) {
    LOG_WARN("control socket: more than %zu clients; turning uid %u away", options_.max_clients,
             static_cast<unsigned>(raw->uid));
    if (raw->pipe->Write(EncodeError(Status::ResourceExhausted("the broker is busy")) + "\n")
            .ok()) {
      raw->eof = true;
      MaybeFinish(raw);
    } else {
      CloseClient(raw);
    }
    return;
  }
  Status rs = raw->pipe->ReadStart([this, raw](std::string_view d) { OnData(raw, d); },
                                   [this, raw](Status end) {
                                     if (!end.ok()) {
                                       CloseClient(raw);
                                       return;
                                     }
                                     raw->eof = true;
                                     ProcessLines(raw);
                                   });
  if (!rs.ok()) {
    CloseClient(raw);
    return;
  }
  raw->idle->Start(options_.idle_timeout_ms, [this, raw] { CloseClient(raw); });
}

void ControlServer::OnData(Client* c, std::string_view data) {
  c->buffer.append(data);
  if (c->buffer.find('\n') == std::string::npos && c->buffer.size() > kMaxRequestBytes) {
    LOG_WARN("control socket: uid %u sent a line longer than %zu bytes; closing",
             static_cast<unsigned>(c->uid), kMaxRequestBytes);
    c->buffer.clear();
    c->pipe->ReadStop();
    Status s = c->pipe->Write(
        EncodeError(Status::InvalidArgument("request line longer than " +
                                            std::to_string(kMaxRequestBytes) + " bytes")) +
        "\n");
    c->eof = true;
    if (s.ok()) {
      MaybeFinish(c);
    } else {
      CloseClient(c);
    }
    return;
  }
  ProcessLines(c);
}

void ControlServer::ProcessLines(Client* c) {
  while (!c->busy && !c->closing) {
    size_t nl = c->buffer.find('\n');
    if (nl == std::string::npos) break;
    std::string line = c->buffer.substr(0, nl);
    c->buffer.erase(0, nl + 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
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
    c->idle->Stop();  // a "wait" may legitimately take long
    c->pipe->ReadStop();
    std::weak_ptr<bool> alive = alive_;
    handler_(std::move(req).value(), c->uid, [this, alive, id = c->id](std::string reply) {
      if (!alive.expired()) OnReply(id, std::move(reply));
    });
    return;
  }
  if (c->busy || c->closing) return;
  if (c->eof) {
    MaybeFinish(c);
    return;
  }
  if (!c->pipe->reading()) {
    Status s = c->pipe->ReadStart([this, c](std::string_view d) { OnData(c, d); },
                                  [this, c](Status end) {
                                    if (!end.ok()) {
                                      CloseClient(c);
                                      return;
                                    }
                                    c->eof = true;
                                    ProcessLines(c);
                                  });
    if (!s.ok()) {
      CloseClient(c);
      return;
    }
  }
  c->idle->Start(options_.idle_timeout_ms, [this, c] { CloseClient(c); });
}

void ControlServer::OnReply(uint64_t id, std::string line) {
  auto it = clients_.find(id);
  if (it == clients_.end() || it->second->closing) return;
  Client* c = it->second.get();
  c->busy = false;
  line += '\n';
  if (!c->pipe->Write(std::move(line)).ok()) {
    CloseClient(c);
    return;
  }
  ProcessLines(c);
}

void ControlServer::MaybeFinish(Client* c) {
  // Everything is answered: half-close once the replies are flushed, then drop the client.
  if (c->closing) return;
  c->closing = true;
  c->idle->Stop();
  std::weak_ptr<bool> alive = alive_;
  Status s = c->pipe->Shutdown([this, alive, id = c->id](Status) {
    if (alive.expired()) return;
    clients_.erase(id);
  });
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
  // Not inline: the caller may be a callback of this client still on the stack (P8).
  std::weak_ptr<bool> alive = alive_;
  loop_->Defer([this, alive, id = c->id] {
    if (!alive.expired()) clients_.erase(id);
  });
}

}  // namespace brokerproxy::registry
