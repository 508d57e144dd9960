// Session: a connection from accept() until it is handed to a frontend or finishes as a plain
// (BROKER1) session: sniff, read the preamble, check the secret and dial the backend (Admission,
// admission.h), answer OK, splice.
//
//   kSniffing --'B'--> kPreamble --secret ok--> kConnecting --connected--> kSplicing --> closed
//       |                  |                         |
//       +--0x16/'S': handed to the TLS/SSH frontend  +--> ERR unavailable
//       +--silent for ssh_banner_delay: handed to the SSH frontend (it speaks first)
//       +--"GET " etc.: HTTP 400 with a hint         (every state: deadline -> ERR timeout)
//       +--else: ERR bad-request
//
// Ownership: the Proxy owns it (Connection). Loop-thread only.

#ifndef BROKERPROXY_PROXY_SERVER_SESSION_H_
#define BROKERPROXY_PROXY_SERVER_SESSION_H_

#include <optional>
#include <string>

#include "loop/reactor.h"
#include "proxy/server/admission.h"
#include "proxy/server/proxy.h"
#include "proxy/server/sniffer.h"
#include "proxy/transport/dialer.h"
#include "proxy/transport/relay.h"
#include "proxy/wire/broker1.h"

namespace brokerproxy::proxy {

class Session final : public Connection, private Admission::Client {
 public:
  // Takes `client` (the accepted socket, registered in the proxy's reactor).
  Session(Proxy* proxy, loop::IoHandle client, const sockaddr_storage& peer);
  ~Session() override;

  // REQUIRES: the caller touches nothing of this session after the call (it may already have
  // rejected the client and retired itself).
  void Start();
  void Close(const char* reason) override;
  void OnDeadline() override;
  void OnSweep(uint64_t now_ms) override;

 private:
  enum class State { kSniffing, kPreamble, kConnecting, kSplicing, kClosed };

  int handshake_fd() const override { return client_.fd(); }

  // `speculative`: try even though no edge said the socket is readable.
  void OnClientReadable(bool speculative);
  // Admission::Client: the backend is connected (answer OK and relay), or the client is refused
  // (Reject, below).
  void Connected(loop::IoHandle backend) override;
  // Passes the client socket to the TLS or SSH frontend and retires.
  void HandOff(Protocol p);
  // The client has not spoken within ssh_banner_delay: it is an SSH client waiting for our
  // banner, unless its first bytes came in meanwhile.
  void OnBannerDelay();
  // Answers an HTTP request with a 400 and a hint, and closes.
  void RejectHttp();
  // Answers "ERR <code>" and closes.
  void Reject(ErrorCode code, const char* reason) override;
  // Sends an OK that Connected() held back for the backend's first bytes, if it still waits.
  void ReleaseHeldOk();
  // Releases everything, logs the session line and retires.
  void Finish(const char* reason);
  void FlushCounters();

  State state_ = State::kSniffing;
  bool finished_ = false;
  bool banner_pending_ = false;  // the deadline armed is the banner delay, not the handshake's
  // Bytes the client sent behind its preamble, read with it: they lead the relay's way to the
  // backend as its prefix, which the relay does not count, so they are counted here.
  uint16_t early_bytes_ = 0;
  // The client socket while the relay owns it, if its OK is held back (-1: nothing held).
  int held_ok_fd_ = -1;
  loop::IoHandle client_;
  std::string preamble_;  // the preamble line read so far; once parsed, the early bytes
  Target target_;
  Admission admission_;
  std::optional<Relay> relay_;  // in place rather than an allocation of its own
  ByteReport bytes_;            // what of the relay's counters went to the stats already
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_SESSION_H_
