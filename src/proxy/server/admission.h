// Admission: the server's one step from a parsed BROKER1 preamble to a connected backend,
// shared by every connection that reads a preamble (plain sessions, session.h; TLS
// termination, tls/tls_frontend.cc):
//
//   preamble --(plain: source in plain_allow)--> Authorize (secret, then throttle)
//            --> dial the job's backend under connect_timeout --> connected(backend)
//   any refusal --> reject(code, reason): denied, busy (throttled, or out of fds),
//                   unavailable (refused, unreachable, or the connect deadline passed)
//
// The connection keeps what differs: how bytes reach the client (a plain socket, or inside TLS),
// hence how "OK" and "ERR <code>" are sent, and its own log line. Admission counts what every
// admitted connection counts (denied, unavailable, busy, spliced, per-job connections and
// active), in the same order for both, and logs a failed dial at debug level as
// "<what> <id>: backend of job <job>: <why>".
//
// Ownership: a member of its Connection, which outlives it; callbacks run on the loop thread and
// may end the connection (Stop() the Admission), but must not destroy it. Admission touches
// nothing after calling one.

#ifndef BROKERPROXY_PROXY_SERVER_ADMISSION_H_
#define BROKERPROXY_PROXY_SERVER_ADMISSION_H_

#include <functional>
#include <memory>

#include "loop/reactor.h"
#include "proxy/server/proxy.h"
#include "proxy/transport/dialer.h"
#include "proxy/wire/broker1.h"

namespace brokerproxy::proxy {

class Admission {
 public:
  // How the preamble came: a plain one carries the secret in clear, so it is taken only from
  // sources in plain_allow; inside TLS any source may send it.
  enum class Channel { kPlain, kTls };
  struct Callbacks {
    // Answer "ERR <code>" and close; `reason` ends the connection's log line.
    std::function<void(ErrorCode code, const char* reason)> reject;
    // The backend is connected (and tuned); the deadline is cleared. Answer "OK" and start
    // relaying, then call Admitted().
    std::function<void(loop::IoHandle backend)> connected;
  };

  // `what` names the connection kind in the debug log ("session", "tls"); `kind` labels its
  // handshake time in the metrics. `*target`: where
  // the connection keeps what it reaches (its job id is set as soon as the preamble names one,
  // for the log line, even when refused).
  Admission(Proxy* proxy, Connection* conn, const char* what, SessionKind kind, Target* target,
            Callbacks callbacks);
  ~Admission();
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  // Checks `preamble` (kDone) and starts the dial. With `may_complete_inline`, the dial may
  // call back before this returns (Dialer::Dial): then the caller must touch nothing after.
  void Start(const Preamble& preamble, Channel channel, bool may_complete_inline);
  // True between Start() with an authorised secret and the dial's outcome.
  bool dialing() const { return dialing_; }
  // The connection's deadline passed while dialing(): counts and rejects (unavailable).
  void OnDialDeadline();
  // The connection relays bytes for its job now: counts it (Stats::SessionStarted). Once.
  void Admitted();
  bool admitted() const { return admitted_; }
  // Ends the count (Stats::SessionEnded, if admitted) and drops a dial in progress. Idempotent.
  void Stop();

 private:
  void OnBackend(Result<loop::IoHandle> backend);

  Proxy* proxy_;
  Connection* conn_;
  const char* what_;
  SessionKind kind_;
  Target* target_;
  Callbacks cb_;
  std::unique_ptr<Dialer> dialer_;
  bool dialing_ = false;
  bool admitted_ = false;
  uint64_t admitted_ns_ = 0;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_ADMISSION_H_
