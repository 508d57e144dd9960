// The libssh client of `--via`: reaching the login node the way the user's OpenSSH would.
//
//   - the target is [user@]host[:port]; `host` may be an alias from ~/.ssh/config (HostName,
//     User, Port, IdentityFile, ... as far as libssh's config parser supports them);
//   - the host key is checked against ~/.ssh/known_hosts (and the global file): an unknown key
//     is refused unless the caller accepts new keys (then it is added), a changed key is always
//     refused, naming the file;
//   - authentication: ssh-agent first ($SSH_AUTH_SOCK), then the default identity files
//     (~/.ssh/id_ed25519, id_ecdsa, id_rsa) and those the config names.
//
// "~" is $HOME when set (so a test or a wrapper can point it elsewhere), else the home
// directory of the password database.
//
// Everything here blocks, with a deadline: a CLI process does one thing at a time. The tunnel
// of `connect --via` switches the session to nonblocking mode afterwards and drives it on the
// loop (tunnel.h).

#ifndef BROKERPROXY_CLI_SSH_CLIENT_H_
#define BROKERPROXY_CLI_SSH_CLIENT_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "loop/status.h"
#include "proxy/ssh/ssh_common.h"

namespace brokerproxy::cli {

struct SshTarget {
  std::string user;  // empty: from ~/.ssh/config, else the local user name
  std::string host;  // a name, an alias or an address (no brackets)
  int port = 0;      // 0: from ~/.ssh/config, else 22
  std::string ToString() const;
};

// Parses "[user@]host[:port]" ("[v6addr]:port" for IPv6 with a port).
Result<SshTarget> ParseSshTarget(std::string_view text);

struct SshClientOptions {
  bool accept_new_host_key = false;
  int64_t timeout_ms = 20000;  // connect, key exchange, authentication
};

// Connects, checks the host key and logs in. Errors say what to do: Unavailable when the host
// cannot be reached, PermissionDenied for host key and authentication problems.
Result<proxy::SshSessionPtr> SshConnect(const SshTarget& target, const SshClientOptions& options);

struct ExecResult {
  int exit_status = -1;  // -1 if the server sent none
  std::string out;
  std::string err;
};

// Runs `command` through the remote user's shell over an exec channel of a connected, blocking
// session; writes `input` to its stdin, then EOF; collects stdout and stderr (each at most
// `max_output` bytes) until the command ends or `timeout_ms` passes (Timeout).
Result<ExecResult> SshExec(ssh_session session, const std::string& command,
                           const std::string& input, int64_t timeout_ms, size_t max_output);

// Quotes one argument for a POSIX shell: 'it'\''s'. Plain words ([A-Za-z0-9_./:=@%+,-]) stay
// as they are.
std::string ShellQuote(std::string_view arg);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_SSH_CLIENT_H_
