#include "loop/stream.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

namespace brokerproxy::loop {
namespace {

struct WriteReq {
  uv_write_t req{};
  std::string data;
  Stream::DoneCallback cb;
};

struct ShutdownReq {
  uv_shutdown_t req{};
  Stream::DoneCallback cb;
};

struct ConnectReq {
  uv_connect_t req{};
  Stream::DoneCallback cb;
};

// Runs a request's completion: the request is freed in any case, and the callback runs only if
// the handle is still open (its owner may be gone otherwise).
template <typename Req>
void Complete(Req* raw, uv_handle_t* handle, int status, const char* what) {
  std::unique_ptr<Req> req(raw);
  auto* owner = static_cast<HandleBase*>(handle->data);
  if (owner->closing() || !req->cb) return;
  req->cb(status == 0 ? Status::OK() : UvError(what, status));
}

}  // namespace

Status Stream::ReadStart(DataCallback on_data, EndCallback on_end) {
  on_data_ = std::move(on_data);
  on_end_ = std::move(on_end);
  if (!read_buffer_) read_buffer_.reset(new char[read_buffer_size_]);
  int rc = uv_read_start(stream_, &Stream::OnAlloc, &Stream::OnRead);
  if (rc != 0) return UvError("uv_read_start", rc);
  reading_ = true;
  return Status::OK();
}

void Stream::ReadStop() {
  uv_read_stop(stream_);
  reading_ = false;
}

void Stream::OnAlloc(uv_handle_t* h, size_t, uv_buf_t* buf) noexcept {
  auto* self = static_cast<Stream*>(h->data);
  // The read callback consumes the bytes before returning, so one buffer serves every read.
  *buf = uv_buf_init(self->read_buffer_.get(), static_cast<unsigned>(self->read_buffer_size_));
}

void Stream::OnRead(uv_stream_t* s, ssize_t nread, const uv_buf_t*) noexcept {
  auto* self = static_cast<Stream*>(s->data);
  if (self->closing()) return;
  if (nread > 0) {
    if (self->on_data_) self->on_data_(std::string_view(self->read_buffer_.get(), nread));
    return;
  }
  if (nread == 0) return;  // EAGAIN: libuv reports it as 0, nothing to do.
  // EOF or error: libuv has stopped reading (for EOF) or will error on every retry.
  uv_read_stop(s);
  self->reading_ = false;
  if (self->on_end_) {
    self->on_end_(nread == UV_EOF ? Status::OK() : UvError("read", static_cast<int>(nread)));
  }
}

Status Stream::Write(std::string data, DoneCallback cb) {
  auto* req = new WriteReq;
  req->data = std::move(data);
  req->cb = std::move(cb);
  uv_buf_t buf = uv_buf_init(req->data.data(), static_cast<unsigned>(req->data.size()));
  int rc = uv_write(&req->req, stream_, &buf, 1, [](uv_write_t* r, int status) noexcept {
    Complete(reinterpret_cast<WriteReq*>(r), reinterpret_cast<uv_handle_t*>(r->handle), status,
             "write");
  });
  if (rc != 0) {
    delete req;
    return UvError("write", rc);
  }
  return Status::OK();
}

Result<size_t> Stream::TryWrite(std::string_view data) {
  if (data.empty()) return size_t{0};
  uv_buf_t buf = uv_buf_init(const_cast<char*>(data.data()), static_cast<unsigned>(data.size()));
  int rc = uv_try_write(stream_, &buf, 1);
  if (rc == UV_EAGAIN) return size_t{0};
  if (rc < 0) return UvError("write", rc);
  return static_cast<size_t>(rc);
}

Status Stream::Shutdown(DoneCallback cb) {
  auto* req = new ShutdownReq;
  req->cb = std::move(cb);
  int rc = uv_shutdown(&req->req, stream_, [](uv_shutdown_t* r, int status) noexcept {
    Complete(reinterpret_cast<ShutdownReq*>(r), reinterpret_cast<uv_handle_t*>(r->handle), status,
             "shutdown");
  });
  if (rc != 0) {
    delete req;
    return UvError("shutdown", rc);
  }
  return Status::OK();
}

Status Stream::Listen(int backlog, DoneCallback cb) {
  on_connection_ = std::move(cb);
  int rc = uv_listen(stream_, backlog, &Stream::OnConnection);
  return rc == 0 ? Status::OK() : UvError("listen", rc);
}

void Stream::OnConnection(uv_stream_t* s, int status) noexcept {
  auto* self = static_cast<Stream*>(s->data);
  if (self->closing() || !self->on_connection_) return;
  self->on_connection_(status == 0 ? Status::OK() : UvError("accept", status));
}

int Stream::fd() const {
  uv_os_fd_t fd = -1;
  if (uv_fileno(reinterpret_cast<const uv_handle_t*>(stream_), &fd) != 0) return -1;
  return fd;
}

void Stream::OnClosing() {
  if (reading_) uv_read_stop(stream_);
  reading_ = false;
}

// ---- Tcp ----

Result<HandlePtr<Tcp>> Tcp::Create(Loop& loop) {
  HandlePtr<Tcp> t(new Tcp(loop));
  int rc = uv_tcp_init(loop.get(), &t->tcp_);
  if (rc != 0) return UvError("uv_tcp_init", rc);
  t->MarkInitialized();
  return t;
}

Status Tcp::Bind(const sockaddr* addr, unsigned flags) {
  int rc = uv_tcp_bind(&tcp_, addr, flags);
  return rc == 0 ? Status::OK() : UvError("bind " + FormatAddress(addr), rc);
}

Status Tcp::Open(int fd) {
  int rc = uv_tcp_open(&tcp_, fd);
  return rc == 0 ? Status::OK() : UvError("uv_tcp_open", rc);
}

Result<HandlePtr<Tcp>> Tcp::Accept() {
  auto client = Tcp::Create(loop());
  if (!client.ok()) return client.status();
  int rc = uv_accept(stream_, reinterpret_cast<uv_stream_t*>(&(*client)->tcp_));
  if (rc != 0) return UvError("accept", rc);
  return client;
}

Status Tcp::Connect(const sockaddr* addr, DoneCallback cb) {
  auto* req = new ConnectReq;
  req->cb = std::move(cb);
  int rc = uv_tcp_connect(&req->req, &tcp_, addr, [](uv_connect_t* r, int status) noexcept {
    Complete(reinterpret_cast<ConnectReq*>(r), reinterpret_cast<uv_handle_t*>(r->handle), status,
             "connect");
  });
  if (rc != 0) {
    delete req;
    return UvError("connect " + FormatAddress(addr), rc);
  }
  return Status::OK();
}

Status Tcp::NoDelay(bool enable) {
  int rc = uv_tcp_nodelay(&tcp_, enable ? 1 : 0);
  return rc == 0 ? Status::OK() : UvError("TCP_NODELAY", rc);
}

Status Tcp::KeepAlive(bool enable, unsigned delay_s) {
  int rc = uv_tcp_keepalive(&tcp_, enable ? 1 : 0, delay_s);
  return rc == 0 ? Status::OK() : UvError("SO_KEEPALIVE", rc);
}

Result<sockaddr_storage> Tcp::SockName() const {
  sockaddr_storage ss{};
  int len = sizeof(ss);
  int rc = uv_tcp_getsockname(&tcp_, reinterpret_cast<sockaddr*>(&ss), &len);
  if (rc != 0) return UvError("getsockname", rc);
  return ss;
}

Result<sockaddr_storage> Tcp::PeerName() const {
  sockaddr_storage ss{};
  int len = sizeof(ss);
  int rc = uv_tcp_getpeername(&tcp_, reinterpret_cast<sockaddr*>(&ss), &len);
  if (rc != 0) return UvError("getpeername", rc);
  return ss;
}

// ---- Pipe ----

Result<HandlePtr<Pipe>> Pipe::Create(Loop& loop) {
  HandlePtr<Pipe> p(new Pipe(loop));
  int rc = uv_pipe_init(loop.get(), &p->pipe_, 0);
  if (rc != 0) return UvError("uv_pipe_init", rc);
  p->MarkInitialized();
  return p;
}

Status Pipe::Bind(const std::string& path) {
  int rc = uv_pipe_bind(&pipe_, path.c_str());
  return rc == 0 ? Status::OK() : UvError("bind " + path, rc);
}

Status Pipe::Open(int fd) {
  int rc = uv_pipe_open(&pipe_, fd);
  return rc == 0 ? Status::OK() : UvError("uv_pipe_open", rc);
}

Result<HandlePtr<Pipe>> Pipe::Accept() {
  auto client = Pipe::Create(loop());
  if (!client.ok()) return client.status();
  int rc = uv_accept(stream_, reinterpret_cast<uv_stream_t*>(&(*client)->pipe_));
  if (rc != 0) return UvError("accept", rc);
  return client;
}

Status Pipe::Connect(const std::string& path, DoneCallback cb) {
  auto* req = new ConnectReq;
  req->cb = std::move(cb);
  // uv_pipe_connect reports every failure through the callback.
  uv_pipe_connect(&req->req, &pipe_, path.c_str(), [](uv_connect_t* r, int status) noexcept {
    Complete(reinterpret_cast<ConnectReq*>(r), reinterpret_cast<uv_handle_t*>(r->handle), status,
             "connect");
  });
  return Status::OK();
}

Status Pipe::PeerCredentials(uid_t* uid, gid_t* gid, pid_t* pid) const {
  int s = fd();
  if (s < 0) return Status::IOError("peer credentials: not connected");
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return PosixError("SO_PEERCRED", errno);
  }
  if (uid) *uid = cred.uid;
  if (gid) *gid = cred.gid;
  if (pid) *pid = cred.pid;
  return Status::OK();
}

std::string FormatAddress(const sockaddr* addr) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (addr->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(addr);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (addr->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(addr);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  if (addr->sa_family == AF_UNIX) return "unix";
  return "?";
}

}  // namespace brokerproxy::loop
