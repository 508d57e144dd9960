#include "cli/ssh_client.h"

#include <poll.h>
#include <pwd.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>

#include "cli/control_client.h"

namespace brokerproxy::cli {

using proxy::SshError;
using proxy::SshSessionPtr;

namespace {

std::string HomeDir() {
  if (const char* h = std::getenv("HOME"); h != nullptr && h[0] == '/') return h;
  passwd pw;
  passwd* found = nullptr;
  char buf[4096];
  if (getpwuid_r(getuid(), &pw, buf, sizeof(buf), &found) == 0 && found != nullptr) {
    return found->pw_dir;
  }
  return "/";
}

std::string OptionString(ssh_session s, ssh_options_e option, const std::string& fallback) {
  char* value = nullptr;
  if (ssh_options_get(s, option, &value) != SSH_OK || value == nullptr) return fallback;
  std::string out = value;
  ssh_string_free_char(value);
  return out;
}

std::string ServerFingerprint(ssh_session s) {
  ssh_key key = nullptr;
  if (ssh_get_server_publickey(s, &key) != SSH_OK) return "?";
  proxy::SshKeyPtr owned(key);
  auto fp = proxy::SshFingerprint(key);
  return fp.ok() ? *fp : "?";
}

Status CheckHostKey(ssh_session s, const std::string& name, const std::string& known_hosts,
                    bool accept_new) {
  switch (ssh_session_is_known_server(s)) {
    case SSH_KNOWN_HOSTS_OK:
      return Status::OK();
    case SSH_KNOWN_HOSTS_CHANGED:
      return Status::PermissionDenied(
          "the host key of " + name + " has CHANGED (it is now " + ServerFingerprint(s) +
          ") and does not match the one recorded in " + known_hosts +
          ". Someone may be intercepting the connection; if the login node's key was replaced "
          "on purpose, remove the old entry (ssh-keygen -R HOST -f " +
          known_hosts + ") and try again");
    case SSH_KNOWN_HOSTS_OTHER:
      return Status::PermissionDenied(
          "the host key of " + name + " is of another type than the one recorded in " +
          known_hosts + " (" + ServerFingerprint(s) +
          "); refusing to connect. If this is expected, remove the old entry from that file");
    case SSH_KNOWN_HOSTS_NOT_FOUND:
    case SSH_KNOWN_HOSTS_UNKNOWN:
      if (!accept_new) {
        return Status::PermissionDenied(
            "the host key of " + name + " (" + ServerFingerprint(s) + ") is not in " + known_hosts +
            "; check the fingerprint and run again with --accept-new-host-key to add it "
            "(or connect once with ssh)");
      }
      if (ssh_session_update_known_hosts(s) != SSH_OK) {
        return SshError(s, "cannot add the host key of " + name + " to " + known_hosts);
      }
      std::fprintf(stderr, "brokerproxy: added the host key of %s (%s) to %s\n", name.c_str(),
                   ServerFingerprint(s).c_str(), known_hosts.c_str());
      return Status::OK();
    case SSH_KNOWN_HOSTS_ERROR:
      break;
  }
  return SshError(s, "cannot check the host key of " + name + " against " + known_hosts);
}

Status Authenticate(ssh_session s, const std::string& name) {
  // The agent first, as OpenSSH does; then the identity files (publickey_auto would try the
  // agent again, which is harmless).
  if (const char* sock = std::getenv("SSH_AUTH_SOCK"); sock != nullptr && *sock) {
    int rc = ssh_userauth_agent(s, nullptr);
    if (rc == SSH_AUTH_SUCCESS) return Status::OK();
    if (rc == SSH_AUTH_ERROR) return SshError(s, "authentication to " + name + " failed");
  }
  int rc = ssh_userauth_publickey_auto(s, nullptr, nullptr);
  if (rc == SSH_AUTH_SUCCESS) return Status::OK();
  if (rc == SSH_AUTH_ERROR) return SshError(s, "authentication to " + name + " failed");
  std::string user = OptionString(s, SSH_OPTIONS_USER, "?");
  return Status::PermissionDenied("cannot log in to " + name + " as " + user +
                                  ": neither ssh-agent nor the identity files in ~/.ssh were "
                                  "accepted (only public-key authentication is used)");
}

}  // namespace

std::string SshTarget::ToString() const {
  // Appends only: GCC 12 warns (-Wrestrict, a false positive) on "literal" + std::string&&.
  std::string out;
  if (!user.empty()) out.append(user).append("@");
  bool brackets = port != 0 && host.find(':') != std::string::npos;
  if (brackets) out.append("[");
  out.append(host);
  if (brackets) out.append("]");
  if (port) out.append(":").append(std::to_string(port));
  return out;
}

Result<SshTarget> ParseSshTarget(std::string_view text) {
  SshTarget t;
  auto bad = [&](const char* why) {
    return Status::InvalidArgument("--via '" + std::string(text.substr(0, 100)) + "': " + why +
                                   " (expected [user@]host[:port])");
  };
  std::string_view rest = text;
  size_t at = rest.rfind('@');
  if (at != std::string_view::npos) {
    t.user = std::string(rest.substr(0, at));
    rest.remove_prefix(at + 1);
    if (t.user.empty()) return bad("empty user name");
  }
  std::string_view port_text;
  if (!rest.empty() && rest.front() == '[') {
    size_t close = rest.find(']');
    if (close == std::string_view::npos) return bad("missing ']'");
    t.host = std::string(rest.substr(1, close - 1));
    std::string_view after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return bad("unexpected text after ']'");
      port_text = after.substr(1);
      if (port_text.empty()) return bad("empty port");
    }
  } else {
    size_t colon = rest.find(':');
    if (colon != std::string_view::npos && rest.find(':', colon + 1) == std::string_view::npos) {
      t.host = std::string(rest.substr(0, colon));
      port_text = rest.substr(colon + 1);
      if (port_text.empty()) return bad("empty port");
    } else {
      t.host = std::string(rest);  // a name, or an IPv6 literal without a port
    }
  }
  if (t.host.empty()) return bad("empty host");
  for (char c : t.host + t.user) {
    if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f || c == '/' || c == '\'' || c == '"') {
      return bad("invalid character");
    }
  }
  if (!port_text.empty()) {
    int port = 0;
    for (char c : port_text) {
      if (c < '0' || c > '9' || port > 65535) return bad("invalid port");
      port = port * 10 + (c - '0');
    }
    if (port < 1 || port > 65535) return bad("invalid port");
    t.port = port;
  }
  return t;
}

std::string ShellQuote(std::string_view arg) {
  bool plain = !arg.empty();
  for (char c : arg) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              std::string_view("_./:=@%+,-").find(c) != std::string_view::npos;
    if (!ok) plain = false;
  }
  if (plain) return std::string(arg);
  std::string out = "'";
  for (char c : arg) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

Result<SshSessionPtr> SshConnect(const SshTarget& target, const SshClientOptions& options) {
  SshSessionPtr session(ssh_new());
  if (!session) return Status::Internal("ssh_new failed");
  ssh_session s = session.get();
  std::string ssh_dir = HomeDir() + "/.ssh";
  std::string known_hosts = ssh_dir + "/known_hosts";
  long timeout_s = static_cast<long>((options.timeout_ms + 999) / 1000);
  static const int kNoDelay = 1;
  // The alias first: ~/.ssh/config is matched against it and may replace it (HostName).
  if (ssh_options_set(s, SSH_OPTIONS_HOST, target.host.c_str()) != SSH_OK ||
      ssh_options_set(s, SSH_OPTIONS_SSH_DIR, ssh_dir.c_str()) != SSH_OK ||
      ssh_options_set(s, SSH_OPTIONS_KNOWNHOSTS, known_hosts.c_str()) != SSH_OK ||
      ssh_options_set(s, SSH_OPTIONS_TIMEOUT, &timeout_s) != SSH_OK ||
      // Tunnels send small messages (a preamble, a request) and wait for the answer: without
      // TCP_NODELAY, Nagle holds each one back until the previous segment is acknowledged
      // (40 ms of delayed ACK per new connection through --via).
      ssh_options_set(s, SSH_OPTIONS_NODELAY, &kNoDelay) != SSH_OK) {
    return SshError(s, "ssh options for " + target.ToString());
  }
  // ~/.ssh/config (found through SSH_DIR) and /etc/ssh/ssh_config.
  if (ssh_options_parse_config(s, nullptr) != SSH_OK) {
    return SshError(s, "reading the ssh configuration for " + target.host);
  }
  // What the user typed wins over the config file.
  if (!target.user.empty() && ssh_options_set(s, SSH_OPTIONS_USER, target.user.c_str()) != SSH_OK) {
    return SshError(s, "ssh user");
  }
  if (target.port != 0) {
    unsigned int port = static_cast<unsigned int>(target.port);
    if (ssh_options_set(s, SSH_OPTIONS_PORT, &port) != SSH_OK) return SshError(s, "ssh port");
  }
  known_hosts = OptionString(s, SSH_OPTIONS_KNOWNHOSTS, known_hosts);
  std::string name = target.ToString();
  if (ssh_connect(s) != SSH_OK) {
    return Status::Unavailable("cannot reach " + name + " over ssh: " + ssh_get_error(s));
  }
  Status hk = CheckHostKey(s, name, known_hosts, options.accept_new_host_key);
  if (!hk.ok()) {
    ssh_disconnect(s);
    return hk;
  }
  Status auth = Authenticate(s, name);
  if (!auth.ok()) {
    ssh_disconnect(s);
    return auth;
  }
  return session;
}

Result<ExecResult> SshExec(ssh_session session, const std::string& command,
                           const std::string& input, int64_t timeout_ms, size_t max_output) {
  int64_t deadline = MonotonicMs() + timeout_ms;
  ssh_channel ch = ssh_channel_new(session);
  if (ch == nullptr) return SshError(session, "cannot create an ssh channel");
  struct ChannelFree {
    ssh_channel ch;
    ~ChannelFree() {
      ssh_channel_close(ch);
      ssh_channel_free(ch);
    }
  } guard{ch};
  if (ssh_channel_open_session(ch) != SSH_OK) {
    return SshError(session, "cannot open an ssh session channel");
  }
  if (ssh_channel_request_exec(ch, command.c_str()) != SSH_OK) {
    return SshError(session, "the login node refused to run a command");
  }
  if (!input.empty() && ssh_channel_write(ch, input.data(), static_cast<uint32_t>(input.size())) !=
                            static_cast<int>(input.size())) {
    return SshError(session, "writing the command's input");
  }
  if (ssh_channel_send_eof(ch) != SSH_OK) return SshError(session, "closing the command's input");
  ExecResult r;
  char buf[16384];
  for (;;) {
    int64_t left = deadline - MonotonicMs();
    if (left <= 0) return Status::Timeout("the remote command did not finish in time");
    int n = ssh_channel_read_timeout(ch, buf, sizeof(buf), 0,
                                     static_cast<int>(std::min<int64_t>(left, 200)));
    if (n == SSH_ERROR) return SshError(session, "reading the command's output");
    if (n > 0 && r.out.size() < max_output) r.out.append(buf, n);
    // stderr is buffered by libssh meanwhile; drain what is there.
    for (;;) {
      int e = ssh_channel_read_nonblocking(ch, buf, sizeof(buf), 1);
      if (e <= 0) break;
      if (r.err.size() < max_output) r.err.append(buf, e);
    }
    if (n <= 0 && ssh_channel_is_eof(ch)) break;
  }
  // Both streams ended; the exit status usually arrived with them (blocking wait bounded by the
  // session timeout otherwise).
  r.exit_status = ssh_channel_get_exit_status(ch);
  return r;
}

}  // namespace brokerproxy::cli
