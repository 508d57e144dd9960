// RemoteClient: the BrokerClient of `--via [user@]host[:port]` (or `[client] broker`).
//
// Each request runs on the login node as the matching subcommand with --json, through
// `[client] remote_command` (default `brokerproxy`), over an SSH exec channel; the reply
// object it prints is the same one the daemon sent it (control_protocol.h), so the local side
// prints it exactly as if it had asked its own daemon, with the same exit codes. Arguments are
// shell-quoted; the secret of `verify` goes through the command's stdin, never its command
// line.
//
// One SSH session (ssh_client.h) is opened on the first call and reused by later ones (a new
// one replaces it after a minute idle); `connect --via` takes it over for its tunnel
// (TakeSession). The remote command gets `--via ''`, so a config.ini shared with the login
// node that names a broker does not send it over SSH once more.
//
// Blocking, with deadlines. One call at a time (`connect` makes its later ones on a pool thread);
// Interrupt() from any thread.

#ifndef BROKERPROXY_CLI_REMOTE_H_
#define BROKERPROXY_CLI_REMOTE_H_

#include <mutex>
#include <string>

#include "cli/control_client.h"
#include "cli/ssh_client.h"
#include "proxy/ssh/ssh_common.h"

namespace brokerproxy::cli {

// What runs on the login node for `request`: the command line (remote_command, verbatim, then
// the quoted arguments) and what is written to its stdin. Pure, for tests.
struct RemoteInvocation {
  std::string command;
  std::string input;  // never logged (the secret of verify)
};
RemoteInvocation RemoteCommandFor(const std::string& remote_command,
                                  const registry::Request& request);

// Turns the remote command's outcome into the reply, or the Status a local call would give.
Result<registry::JsonPtr> ParseRemoteReply(const ExecResult& result, const std::string& where);

class RemoteClient final : public BrokerClient {
 public:
  RemoteClient(SshTarget target, std::string remote_command, SshClientOptions options)
      : target_(std::move(target)), remote_command_(std::move(remote_command)), options_(options) {}

  Result<registry::JsonPtr> Call(const registry::Request& request, int64_t timeout_ms) override;
  std::string Describe() const override;
  // Shuts the session's socket down under a call in flight, so that libssh's blocking reads
  // fail at once. A call still connecting finds out when its connection is made (bounded by
  // the ssh timeout).
  void Interrupt() override;
  const SshTarget& target() const { return target_; }
  // The host the session reached: the target's host after ~/.ssh/config (HostName); the
  // target's own host when there is no session.
  std::string ConnectedHost();

  // The connected session (connecting now if needed), for `connect --via`; this client has
  // none afterwards.
  Result<proxy::SshSessionPtr> TakeSession();

 private:
  Status EnsureConnected();
  // Registers the socket of the call under way (-1: none); false once interrupted.
  bool SetActive(int fd);

  SshTarget target_;
  std::string remote_command_;
  SshClientOptions options_;
  proxy::SshSessionPtr session_;
  int64_t last_used_ms_ = 0;
  std::mutex mu_;
  bool interrupted_ = false;  // guarded by mu_
  int active_fd_ = -1;        // guarded by mu_
};

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_REMOTE_H_
