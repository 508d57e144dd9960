// TlsRelay: one TLS connection driven through memory BIOs, relayed to a plaintext endpoint.
//
// Both ends of brokerproxy's TLS path use it: the proxy terminating a client's TLS (kServer,
// the plaintext side is the job's backend) and `connect --tls` (kClient, the plaintext side is
// the local connection). OpenSSL never touches a socket: ciphertext read from the socket goes
// into the read BIO, and after every SSL call whatever OpenSSL put into the write BIO is moved
// out and sent with non-blocking send(2).
//
// Two phases. Until Attach(), plaintext from the peer collects in inbox() for the owner, who
// speaks the BROKER1 exchange through it (reads the preamble or the "OK" line, Send()s the
// reply). Attach() then relays plaintext both ways between the TLS stream and the plaintext
// side; bytes still in the inbox go there first.
//
// Memory is bounded whatever the peers do (docs/libraries.md, "Memory BIOs": a memory BIO
// never says WANT_WRITE; without watermarks a slow reader made a prototype's RSS reach 816 MB):
//   - ciphertext waiting for the socket (write BIO + send buffer) above kHighWater stops the
//     bulk producer, reads from the plaintext side (so no SSL_write); they resume below
//     kLowWater. Reading the socket and SSL_read go on (see CanReadNet: gating them on our
//     own output deadlocks two relays facing each other) until kMaxNetPending, which only
//     protocol answers (KeyUpdate, alerts) to a peer that sends but never reads can reach;
//   - decrypted plaintext waiting for the plaintext side above kHighWater stops SSL_read and,
//     with it, socket reads; the read BIO never holds more than kMaxReadBio plus one read;
//   - one read of at most kReadChunk bytes from either side per step.
// So a connection holds at most about kMaxNetPending + kHighWater + 2 x kReadChunk +
// kMaxReadBio bytes of buffers, plus OpenSSL's record buffers (released when idle:
// SSL_MODE_RELEASE_BUFFERS).
//
// Half-close (docs/libraries.md, "Memory BIOs"): the peer's close_notify becomes shutdown(SHUT_WR)
// of the plaintext side once everything before it was written there; EOF on the plaintext side
// becomes close_notify, and shutdown(SHUT_WR) of the socket once it is sent. The relay ends
// when both directions have. A TCP EOF without close_notify is an error (a truncation), not an
// end of stream.
//
// Callbacks never run inside a call of this API: work runs from the sockets' events or from a
// next-tick task. Ownership: the owner holds the TlsRelay; it owns the SSL, the socket and,
// after Attach(), the plaintext side's Polls. It may be destroyed at any time, including from
// inside its callbacks. Loop-thread only.

#ifndef BROKERPROXY_PROXY_TRANSPORT_TLS_RELAY_H_
#define BROKERPROXY_PROXY_TRANSPORT_TLS_RELAY_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "loop/handle.h"
#include "loop/poll.h"
#include "loop/status.h"
#include "loop/work.h"
#include "proxy/tls/tls_context.h"
#include "proxy/transport/relay.h"

namespace brokerproxy::proxy {

// A FIFO of bytes in one contiguous buffer, grown on demand and freed when empty (so an idle
// connection holds no buffer). Loop-thread only.
class ByteQueue {
 public:
  size_t size() const { return end_ - begin_; }
  bool empty() const { return begin_ == end_; }
  const char* data() const { return buf_.get() + begin_; }
  // Room for at least `n` more bytes at the tail; fill it and Commit() what was written.
  char* Reserve(size_t n);
  void Commit(size_t n) { end_ += n; }
  void Append(std::string_view bytes);
  void Consume(size_t n);

 private:
  std::unique_ptr<char[]> buf_;
  size_t cap_ = 0;
  size_t begin_ = 0;
  size_t end_ = 0;
};

class TlsRelay {
 public:
  enum class Role { kServer, kClient };

  static constexpr size_t kHighWater = 256 * 1024;
  static constexpr size_t kLowWater = 64 * 1024;
  static constexpr size_t kReadChunk = 64 * 1024;
  static constexpr size_t kMaxReadBio = 64 * 1024;
  // Ciphertext output beyond which even the peer's bytes stop being read. Bulk output stops at
  // kHighWater (plus one read), so only protocol answers to a peer that sends but never reads
  // can get here.
  static constexpr size_t kMaxNetPending = 2 * kHighWater;

  struct Callbacks {
    // The handshake completed (a client has verified the server's certificate chain and name).
    std::function<void()> on_handshake;
    // Before Attach(): inbox() grew, or the peer will send nothing more (peer_done()).
    std::function<void()> on_data;
    // The connection ended: OK once both directions finished cleanly, else why. Runs at most
    // once; the TlsRelay may be destroyed from inside it.
    std::function<void(Status)> on_done;
  };

  // Plaintext bytes delivered so far, per direction.
  struct Counters {
    uint64_t tls_to_plain = 0;  // decrypted and written to the plaintext side
    uint64_t plain_to_tls = 0;  // read from the plaintext side and encrypted
  };

  // `ssl`: a new SSL of a server or client context (the BIOs are set here). `socket`: the
  // connected TCP socket for the TLS stream (no events requested yet). `initial_ciphertext`:
  // bytes already read from it (the buffered ClientHello). `tls_name`/`plain_name` label
  // errors ("client", "backend"); they must be string literals.
  TlsRelay(Role role, SslPtr ssl, loop::HandlePtr<loop::Poll> socket,
           std::string initial_ciphertext, const char* tls_name, Callbacks callbacks);
  ~TlsRelay();
  TlsRelay(const TlsRelay&) = delete;
  TlsRelay& operator=(const TlsRelay&) = delete;

  // Starts the handshake.
  void Start();

  bool handshake_done() const { return handshake_done_; }
  SSL* ssl() const { return ssl_.get(); }

  // ---- before Attach() ----
  // Plaintext received and not yet consumed (at most about kHighWater + 16 KiB).
  std::string_view inbox() const { return std::string_view(app_.data(), app_.size()); }
  void Consume(size_t n);
  // The peer sent close_notify (or closed the socket): inbox() will not grow any more.
  bool peer_done() const { return peer_closed_ || net_eof_; }
  // Encrypts `plaintext` into the TLS stream. REQUIRES: handshake_done().
  Status Send(std::string_view plaintext);
  // Relays between the TLS stream and `plain` from now on. Use `plain_name` in errors.
  void Attach(PollSide plain, const char* plain_name);
  // Ends the connection at once: sends `last` (may be empty) and close_notify as far as the
  // socket takes them right now, then closes the socket gracefully. No callback runs after.
  void Abort(std::string_view last);

  // ---- while relaying ----
  const Counters& counters() const { return counters_; }
  // True once one direction has finished.
  bool half_closed() const { return down_done_ || up_done_; }
  uint64_t last_activity_ms() const { return last_activity_ms_; }
  // Pauses taken because a buffer crossed kHighWater (for tests and stats).
  uint64_t pauses() const { return pauses_; }
  // Bytes held in this relay's buffers and memory BIOs right now.
  size_t buffered() const;

 private:
  void Kick();
  void Pump();
  Status Work(bool* progress);
  Status FlushNet(bool* progress);
  Status ReadNet(bool* progress);
  Status Advance(bool* progress);
  Status FlushPlain(bool* progress);
  Status ReadPlain(bool* progress);
  Status WritePlainToTls(std::string_view data, bool* accepted);
  void DrainWriteBio();
  void UpdateWatermarks();
  bool CanReadNet() const;
  bool CanReadPlain() const;
  void UpdateInterest();
  // Ends with `status` (flushing a pending alert best-effort first). May destroy this.
  void Finish(Status status);
  // Runs `cb` and says whether this object still exists and is not finished.
  bool Call(const std::function<void()>& cb);
  size_t NetPending() const;
  Status NetError(const char* what, int err) const;
  Status PlainError(const char* what, int err) const;
  Status HandshakeError();

  Role role_;
  SslPtr ssl_;
  BIO* rbio_ = nullptr;  // owned by ssl_
  BIO* wbio_ = nullptr;  // owned by ssl_
  loop::HandlePtr<loop::Poll> socket_;
  loop::HandlePtr<loop::Poll> plain_in_;
  loop::HandlePtr<loop::Poll> plain_out_;  // null: same as plain_in_
  loop::Poll* plain_out_raw_ = nullptr;
  bool plain_out_is_socket_ = true;
  const char* tls_name_;
  const char* plain_name_ = "plaintext side";
  Callbacks cb_;

  ByteQueue net_out_;        // ciphertext for the socket
  ByteQueue app_;            // plaintext for the plaintext side (the inbox before Attach)
  std::string plain_retry_;  // plaintext SSL_write did not take yet (renegotiation-free: rare)

  bool started_ = false;
  bool handshake_done_ = false;
  bool handshake_reported_ = false;
  bool attached_ = false;
  bool inbox_grew_ = false;
  bool peer_done_reported_ = false;
  bool net_eof_ = false;      // the socket's read side reached EOF
  bool peer_closed_ = false;  // close_notify received
  bool plain_eof_ = false;    // the plaintext side's read side reached EOF
  bool close_notify_sent_ = false;
  bool net_shut_ = false;    // shutdown(SHUT_WR) done on the socket
  bool down_done_ = false;   // TLS -> plaintext finished (plaintext side shut down)
  bool up_done_ = false;     // plaintext -> TLS finished (close_notify sent and flushed)
  bool net_paused_ = false;  // ciphertext output above the high watermark
  bool app_paused_ = false;  // plaintext output above the high watermark
  bool finished_ = false;
  Counters counters_;
  uint64_t last_activity_ms_ = 0;
  uint64_t pauses_ = 0;
  loop::Pending kick_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TRANSPORT_TLS_RELAY_H_
