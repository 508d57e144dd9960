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
// "session <id>: backend of job <job>: <why>" (or "tls <id>: ...").
//
// Ownership: a member of its Connection, which outlives it, as does the Client; the Client's
// calls run on the loop thread and may end the connection (Stop() the Admission), but must not
// destroy it. Admission touches nothing after calling one.

#ifndef BROKERPROXY_PROXY_SERVER_ADMISSION_H_
#define BROKERPROXY_PROXY_SERVER_ADMISSION_H_

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
  // What the connection does with the outcome; Admission calls one of these as its last act.
  // An interface the connection implements rather than callbacks it stores: nothing to
  // allocate, and a pointer per connection instead of two std::function.
  class Client {
   public:
    // Answer "ERR <code>" and close; `reason` ends the connection's log line.
    virtual void Reject(ErrorCode code, const char* reason) = 0;
    // The backend is connected (and tuned); the deadline is cleared. Answer "OK" and start
    // relaying, then call Admitted().
    virtual void Connected(loop::IoHandle backend) = 0;

   protected:
    ~Client() = default;
  };

  // `client` is told the outcome (usually `conn` itself). `kind` labels the handshake time in
  // the metrics and names the connection in the debug log ("session" for plain, "tls").
  // `*target`: where the connection keeps what it reaches (its job id is set as soon as the
  // preamble names one, for the log line, even when refused).
  Admission(Connection* conn, Client* client, SessionKind kind, Target* target);
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

  Proxy* proxy() const { return conn_->proxy(); }

  Connection* conn_;
  Client* client_;
  Target* target_;
  std::unique_ptr<Dialer> dialer_;
  uint64_t admitted_ns_ = 0;
  SessionKind kind_;
  bool dialing_ = false;
  bool admitted_ = false;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_ADMISSION_H_
