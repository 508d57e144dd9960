// The embedded SSH endpoint on the proxy port: a libssh server session per connection that the
// sniffer saw start with "SSH-" (README.md, "How it works").
//
//   user name  = job id; password or keyboard-interactive answer = the job's secret, checked by
//                Proxy::Authorize() (constant time, throttled per job and per source, counted).
//                A user name that is not a valid job id is refused before anything else sees
//                it (counted against the source only, never logged). At most
//                `max_auth_failures` failures per connection, then it is dropped; each failure
//                also pauses reading from that client for a moment.
//   channels   = direct-tcpip only, and only to the authenticated job (the destination host
//                must be the job id; the port is a placeholder: OpenSSH refuses port 0 in -L).
//                Each channel is a fresh backend connection (Dialer, within connect_timeout),
//                spliced by a ChannelSplice (ssh_splice.h) with window backpressure both ways.
//                The backend is dialed first and the channel accepted only once it answered:
//                a job whose service is down gets its channel refused, not opened and closed.
//                Each open first checks that the job is still the record the session
//                authenticated against (Proxy::StillCurrent); replacing or removing the job
//                closes the session with all its channels (OnJobChanged). Everything
//                else (session channels, so shell/exec/subsystem/pty, x11, agent, tcpip-forward)
//                is refused.
//   refusals   = say why. libssh 0.10 sends SSH_MSG_CHANNEL_OPEN_FAILURE with an empty
//                description and offers no way to set one, so the reason goes just before it
//                as an SSH_MSG_DEBUG, which OpenSSH prints with -v ("debug1: Remote: not this
//                job"), while "channel N: open failed" is printed always (and `ssh -W` exits
//                non-zero). That includes a backend that cannot be reached ("the job's service
//                is not accepting connections") or does not answer within connect_timeout.
//   messages   = libssh 0.10 frees a message when its message callback returns, so a channel
//                open could not wait for the dial there. Instead no message callback (and no
//                server callback: with one, libssh answers every message it does not handle
//                itself and queues none) is set: messages queue in the session and are taken
//                with ssh_message_get() after every packet-processing round, outside libssh.
//                A direct-tcpip open that passed every check is kept with its pending channel
//                until the dial ends. Passwords come the same way (SSH_AUTH_METHOD_PASSWORD).
//   prompts    = password is the method to use (the job id's "password" is its secret), so
//                the keyboard-interactive prompt says so too: "Password (job secret): " (what
//                sshpass and similar tools wait for).
//   deadline   = key exchange plus authentication within handshake_timeout.
//
// Fd ownership: the sniffer only peeked, so the "SSH-" banner is still in the kernel. The
// Handoff's IoHandle gives up its fd (Release) to libssh (ssh_bind_accept_fd), which owns it
// from then on and closes it in ssh_free() (or earlier, on the peer's EOF); a duplicate in the
// proxy's reactor drives libssh (SshTransport). Channels' backend sockets stay in the reactor
// where the Dialer registered them. No uv_tcp_t or uv_poll ever watches either.
//
// Ownership: the daemon owns the SshEndpoint and must keep it until the Proxy is destroyed;
// the Proxy owns each SshSession (Connection). Loop-thread only.

#ifndef BROKERPROXY_PROXY_SSH_SSH_SERVER_H_
#define BROKERPROXY_PROXY_SSH_SSH_SERVER_H_

#include <libssh/callbacks.h>
#include <libssh/libssh.h>
#include <libssh/server.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "loop/handle.h"
#include "proxy/server/proxy.h"
#include "proxy/ssh/ssh_common.h"
#include "proxy/transport/dialer.h"
#include "proxy/transport/ssh_splice.h"

namespace brokerproxy::proxy {

struct SshEndpointOptions {
  std::string host_key_path;  // ed25519 private key; created (0600) if missing
  int max_auth_failures = 6;  // per connection, like OpenSSH's MaxAuthTries
  int max_channels = 1024;    // open channels per session (each also takes one of
                              // the proxy's max_connections)
  // Channels of one session still dialing their backend at once (each holds a backend socket
  // being connected and the client's channel open, answered when the dial ends): this bounds
  // what a session can make the daemon hold meanwhile (and connect_timeout bounds for how
  // long).
  int max_dialing_channels = 32;
  int64_t auth_failure_pause_ms = 300;  // reading pauses this long times the failure count
};

class SshEndpoint {
 public:
  // Loads or creates the host key (blocking file I/O: call before the loop serves clients) and
  // prepares the ssh_bind every session is accepted from: modern kex/ciphers/MACs only, our
  // banner, and no /etc/ssh/libssh_server_config.
  static Result<std::unique_ptr<SshEndpoint>> Create(SshEndpointOptions options);

  // "SHA256:..." of the host key.
  const std::string& fingerprint() const { return fingerprint_; }
  // The public host key as in known_hosts: "ssh-ed25519 AAAA...".
  const std::string& public_key() const { return public_key_; }
  // For Proxy::set_frontend(Protocol::kSsh, ...).
  Frontend frontend();

 private:
  SshEndpoint(SshEndpointOptions options, SshBindPtr bind, std::string fingerprint,
              std::string public_key)
      : options_(std::move(options)),
        bind_(std::move(bind)),
        fingerprint_(std::move(fingerprint)),
        public_key_(std::move(public_key)) {}

  SshEndpointOptions options_;
  SshBindPtr bind_;
  std::string fingerprint_;
  std::string public_key_;
};

// One SSH connection on the proxy port.
//
//   kHandshake --auth ok--> kAuthenticated --(channels come and go)--> closed
//       |  (deadline, too many failures, protocol error, peer gone)      ^
//       +----------------------------------------------------------------+
class SshSession final : public Connection {
 public:
  SshSession(Proxy* proxy, const sockaddr_storage& peer, const SshEndpointOptions* options);
  ~SshSession() override;

  // Hands the client socket to libssh and starts the key exchange. On error nothing is left
  // open (the socket is closed) and the session must just be destroyed (never adopted).
  Status Start(ssh_bind bind, loop::IoHandle client);

  void Close(const char* reason) override;
  void OnDeadline() override;
  void OnSweep(uint64_t now_ms) override;
  void OnJobChanged(const std::string& id) override;

 private:
  enum class State { kHandshake, kAuthenticated, kClosed };
  struct Channel {
    uint64_t id = 0;
    // The client's channel open while the backend is dialed (then answered and freed); the
    // splice exists once the channel was accepted. Channels go before the session (Close(),
    // ~SshSession), so the message is freed while its session still exists.
    SshMessagePtr open;
    std::unique_ptr<ChannelSplice> splice;
    std::unique_ptr<Dialer> dialer;
    bool refused = false;  // the open was answered with a refusal: reap it
    uint64_t dial_started_ms = 0;
    ByteReport bytes;         // what of the splice's counters went to the stats already
    bool counted = false;     // counted as an active connection of the job
    uint64_t started_ns = 0;  // when it was counted (uv_hrtime)
    bool slot = false;        // holds one of the proxy's max_connections
  };

  // Takes and answers the messages queued in the session (see "messages" above); stops while
  // reading is paused, and after kMaxMessages (the rest get a later loop turn: more_timer_).
  // Runs outside libssh (after a packet-processing round).
  void TakeMessages();
  // Each returns 0 if it answered the message (or, for a channel open, took it: then `msg` is
  // empty), 1 to have the default answer sent (a refusal for everything but the ssh-userauth
  // service request).
  int HandleMessage(SshMessagePtr& msg);
  int HandleAuth(ssh_message msg);
  int HandleChannelOpen(SshMessagePtr& msg);
  // Answers a pending channel's open with a refusal that says `reason`, and marks it for reaping.
  void RefusePending(Channel& c, const char* reason);
  // Sends `reason` to the client as SSH_MSG_DEBUG (see "refusals" above).
  void Tell(const char* reason);
  // Tells the client `reason` and returns 1, so that libssh refuses the channel or request.
  int Refuse(const char* reason);
  // Checks an authentication attempt for `user` with `secret`: true if it succeeded. Counts
  // failures, pauses reading after one, and asks to close after too many.
  bool CheckSecret(const std::string& user, const char* secret);

  // Entry points from the loop (reactor edges, dials, timers); each ends with Service().
  void OnSocket();
  void OnBackend(uint64_t channel_id, Result<loop::IoHandle> backend);
  // Runs after every entry point, outside libssh: process packets, move data, reap channels,
  // close if asked.
  void Service();
  // The transport failed or the peer closed it: sets the close reason from the state (counting
  // a failed key exchange), unless one is set already.
  void TransportEnded();
  Channel* FindChannel(uint64_t id);
  void EndChannel(Channel& c);
  void FlushCounters(Channel& c);
  void RequestClose(const char* reason);

  const SshEndpointOptions* options_;
  State state_ = State::kHandshake;
  std::unique_ptr<SshTransport> transport_;
  loop::HandlePtr<loop::Timer> pause_timer_;
  loop::HandlePtr<loop::Timer> more_timer_;  // resumes TakeMessages() on the next loop turn
  std::vector<std::unique_ptr<Channel>> channels_;
  uint64_t next_channel_id_ = 1;
  Target target_;            // the authenticated job (a copy, P9)
  std::string kbdint_user_;  // user name of a keyboard-interactive exchange in progress
  int auth_failures_ = 0;
  bool in_service_ = false;
  const char* close_reason_ = nullptr;  // set by callbacks; acted on in Service()
  uint64_t channels_opened_ = 0;
  uint64_t bytes_up_ = 0;
  uint64_t bytes_down_ = 0;
  uint64_t last_activity_ms_ = 0;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SSH_SSH_SERVER_H_
