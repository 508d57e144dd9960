#include "cli/remote.h"

#include <sys/socket.h>

#include <mutex>
#include <vector>

#include "registry/control_protocol.h"

namespace brokerproxy::cli {

using registry::Op;
using registry::Request;

namespace {

// Replies can list many jobs; stderr is only for messages.
constexpr size_t kMaxOutput = registry::kMaxReplyBytes;

// A session idle longer than this is replaced before the next call.
constexpr int64_t kIdleReconnectMs = 60000;

// Exit codes of a shell that could not run the command at all.
constexpr int kShellNotFound = 127;
constexpr int kShellNotExecutable = 126;

std::string FirstLines(const std::string& text, size_t max) {
  std::string out = text.substr(0, max);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  for (char& c : out) {
    if (c == '\n') c = ' ';
  }
  return out;
}

}  // namespace

RemoteInvocation RemoteCommandFor(const std::string& remote_command, const Request& request) {
  std::vector<std::string> args;
  RemoteInvocation inv;
  switch (request.op) {
    case Op::kSave:
      args = {"save",     registry::JobTypeName(request.save.type),
              "--job-id", request.job,
              "--host",   request.save.host};
      if (request.save.port != 0) {
        args.push_back("--port");
        args.push_back(std::to_string(request.save.port));
      }
      if (request.save.ttl >= 0) {
        args.push_back("--ttl");
        args.push_back(std::to_string(request.save.ttl) + "s");
      }
      // Registered as waiting for its service, without waiting here: the local side waits
      // (save --wait) or starts the service (exec mode).
      if (!request.save.ready) args.push_back("--pending");
      if (request.save.replace) args.push_back("--replace");
      if (!request.csr.empty()) {
        // ssl: the key stays here; only the CSR (on stdin) and the paths travel.
        args.insert(args.end(), {"--csr-stdin", "--cert-path", request.save.cert_path, "--key-path",
                                 request.save.key_path});
        inv.input = request.csr;
      }
      break;
    case Op::kLoad:
      args = {"load", request.job};
      break;
    case Op::kVerify:
      args = {"verify", request.job, "-"};  // the secret on stdin: not in the remote `ps`
      inv.input = request.secret + "\n";
      break;
    case Op::kQuery:
      args = {"query"};
      break;
    case Op::kRemove:
      args = {"remove", request.job};
      if (!request.secret.empty()) {
        args.insert(args.end(), {"--if-secret", "-"});  // on stdin: not in the remote `ps`
        inv.input = request.secret + "\n";
      }
      break;
    case Op::kStats:
      args = {"stats"};
      break;
    case Op::kWait:
      args = {"wait", request.job, "--timeout", std::to_string(request.timeout_ms) + "ms"};
      break;
    case Op::kCa:
      args = {"ca"};
      break;
    case Op::kEpilog:
      args = {"epilog", request.job};
      break;
  }
  // On the login node the daemon is local: a shared config.ini that names a broker must not
  // send the command over SSH again.
  args.push_back("--via");
  args.push_back("");
  args.push_back("--json");
  // remote_command is the site's shell fragment (e.g. an absolute path, or "env X=Y path"),
  // used as written; every argument we add is quoted.
  inv.command = remote_command;
  for (const std::string& a : args) {
    inv.command += ' ';
    inv.command += ShellQuote(a);
  }
  return inv;
}

Result<registry::JsonPtr> ParseRemoteReply(const ExecResult& result, const std::string& where) {
  // The reply is the last non-empty line (a login script could print something first).
  std::string_view out = result.out;
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.remove_suffix(1);
  size_t nl = out.rfind('\n');
  std::string_view line = nl == std::string_view::npos ? out : out.substr(nl + 1);
  if (!line.empty() && line.front() == '{') {
    auto reply = registry::ParseReply(line);
    if (reply.ok() || reply.status().message().rfind("malformed reply", 0) != 0) return reply;
  }
  std::string err = FirstLines(result.err, 400);
  std::string suffix = err.empty() ? "" : ": " + err;
  if (result.exit_status == kShellNotFound || result.exit_status == kShellNotExecutable) {
    return Status::Unavailable("brokerproxy cannot be run on " + where + " (exit " +
                               std::to_string(result.exit_status) +
                               "); set [client] remote_command to its path there" + suffix);
  }
  if (result.exit_status == 2) {
    return Status::InvalidArgument("the brokerproxy on " + where +
                                   " did not accept the command (an older version?)" + suffix);
  }
  return Status::IOError("no reply from brokerproxy on " + where + " (exit " +
                         std::to_string(result.exit_status) + ")" + suffix);
}

std::string RemoteClient::Describe() const { return target_.ToString() + " over ssh"; }

Status RemoteClient::EnsureConnected() {
  // A session left idle for long (exec mode holds the client while its command runs, maybe for
  // hours) may have been dropped by the server or a firewall: start a fresh one then.
  if (session_ &&
      (MonotonicMs() - last_used_ms_ > kIdleReconnectMs || !ssh_is_connected(session_.get()))) {
    session_.reset();
  }
  if (session_) return Status::OK();
  auto s = SshConnect(target_, options_);
  if (!s.ok()) return s.status();
  session_ = std::move(s).value();
  return Status::OK();
}

bool RemoteClient::SetActive(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  active_fd_ = fd;
  return !interrupted_;
}

void RemoteClient::Interrupt() {
  std::lock_guard<std::mutex> lock(mu_);
  interrupted_ = true;
  // libssh polls the socket: it reads EOF now, and every blocking call fails.
  if (active_fd_ >= 0) ::shutdown(active_fd_, SHUT_RDWR);
}

Result<registry::JsonPtr> RemoteClient::Call(const Request& request, int64_t timeout_ms) {
  if (!SetActive(-1)) return Status::Unavailable("interrupted");
  BP_RETURN_IF_ERROR(EnsureConnected());
  // The session's socket stays open until session_ is freed, after SetActive(-1) below.
  if (!SetActive(ssh_get_fd(session_.get()))) {
    SetActive(-1);
    session_.reset();
    return Status::Unavailable("interrupted");
  }
  RemoteInvocation inv = RemoteCommandFor(remote_command_, request);
  auto result = SshExec(session_.get(), inv.command, inv.input, timeout_ms, kMaxOutput);
  bool interrupted = !SetActive(-1);
  last_used_ms_ = MonotonicMs();
  if (interrupted) {
    session_.reset();  // its socket is shut down
    return Status::Unavailable("interrupted");
  }
  if (!result.ok()) {
    // A session that failed mid-call is not reused.
    session_.reset();
    if (result.status().code() == Status::Code::kTimeout) {
      return Status::Timeout("no reply from " + target_.ToString() + " within " +
                             std::to_string(timeout_ms / 1000) + "s");
    }
    return Status::Unavailable(result.status().message() + " (on " + target_.ToString() + ")");
  }
  return ParseRemoteReply(*result, target_.ToString());
}

std::string RemoteClient::ConnectedHost() {
  if (!session_) return target_.host;
  char* host = nullptr;
  if (ssh_options_get(session_.get(), SSH_OPTIONS_HOST, &host) != SSH_OK || host == nullptr) {
    return target_.host;
  }
  std::string out = host;
  ssh_string_free_char(host);
  return out;
}

Result<proxy::SshSessionPtr> RemoteClient::TakeSession() {
  BP_RETURN_IF_ERROR(EnsureConnected());
  return std::move(session_);
}

}  // namespace brokerproxy::cli
