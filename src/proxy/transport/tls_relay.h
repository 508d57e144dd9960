// TLS on the one byte pump: TlsTransport (OpenSSL driven over a reactor socket) and TlsRelay
// (a TLS connection with its BROKER1 phase, then relayed to a plaintext endpoint).
//
// Both ends of brokerproxy's TLS path use them: the proxy terminating a client's TLS (kServer,
// the plaintext side is the job's backend) and `connect --tls` (kClient, the plaintext side is
// the local connection).
//
// TlsTransport gives OpenSSL a BIO of its own (BIO_meth_new) whose read and write are the
// EdgeSocket's recv and send on the reactor fd (transport.h): a would-block clears the
// IoWatch's readable or writable flag and asks OpenSSL to retry, so the TLS socket follows the
// same edge-triggered rules as a plain one and never changes its epoll registration. OpenSSL
// reads and writes the socket directly: no ciphertext is copied through memory BIOs, and
// ciphertext waiting for a peer that does not read waits in the kernel's send buffer, not in
// ours. SSL_MODE_ENABLE_PARTIAL_WRITE lets SSL_write return after each record, and a write
// that would block keeps at most one record in OpenSSL until the pump retries it with the same
// bytes (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: the pump may have moved them).
//
// Memory is bounded whatever the peers do: the pump (relay.h) holds at most one 64 KiB chunk
// per direction and reads a source only once its chunk is written, so a slow plaintext reader
// stops SSL_read, which stops socket reads, and a slow TLS reader stops SSL_write, which stops
// reads of the plaintext side. Reading the TLS socket is never gated on our own TLS output
// (two relays facing each other, the proxy and `connect --tls`, would each wait for the other
// to read); only an SSL_read that must write a protocol answer (KeyUpdate, an alert) waits for
// the socket to take it, so a peer that sends but never reads gets nothing more read from it
// once its receive window and our send buffer are full. Before Attach, the inbox holds at most
// kMaxInbox bytes (plus one read), and reading stops there until the owner consumes. OpenSSL's
// own record buffers are released when idle (SSL_MODE_RELEASE_BUFFERS).
//
// Half-close, through the pump's rules: the peer's close_notify is the TLS source's end of
// stream and becomes shutdown(SHUT_WR) of the plaintext side once everything before it was
// written there; EOF on the plaintext side becomes close_notify, then shutdown(SHUT_WR) of the
// socket. A TCP EOF without close_notify is an error (a truncation), not an end of stream.
//
// Two phases. Until Attach(), plaintext from the peer collects in inbox() for the owner, who
// speaks the BROKER1 exchange through it (reads the preamble or the "OK" line, Send()s the
// reply). Attach() hands the TlsTransport to a Relay with the plaintext side: bytes still in the
// inbox go to the plaintext side first, and plaintext Send() could not write yet goes first to
// the TLS stream.
//
// Callbacks never run inside a call of this API: work runs from the socket's events or from a
// later loop turn (IoWatch::Yield). Ownership: the owner holds the TlsRelay; it owns the SSL,
// the socket and, after Attach(), the Relay with the plaintext side. It may be destroyed at any
// time, including from inside its callbacks. Loop-thread only.

#ifndef BROKERPROXY_PROXY_TRANSPORT_TLS_RELAY_H_
#define BROKERPROXY_PROXY_TRANSPORT_TLS_RELAY_H_

#include <openssl/ssl.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "loop/lifetime.h"
#include "loop/reactor.h"
#include "loop/status.h"
#include "proxy/tls/tls_context.h"
#include "proxy/transport/relay.h"
#include "proxy/transport/transport.h"

namespace brokerproxy::proxy {

// A FIFO of bytes in one contiguous buffer, taken on demand and given back when empty (so an
// idle connection holds no buffer). Any buffer of up to 64 KiB is one recycled 64 KiB block:
// a TLS connection empties its queues after almost every record, and with malloc and free
// each time the freed block joined the top of the heap, which glibc then gave back to the
// kernel (two brk calls and fresh page faults per connection, measured on the handshake
// benchmark). Each thread keeps up to 16 spare blocks (1 MiB). Loop-thread only.
class ByteQueue {
 public:
  static constexpr size_t kBlockSize = 64 * 1024;
  static constexpr size_t kMaxSpareBlocks = 16;

  ByteQueue() = default;
  ~ByteQueue() { Release(); }
  ByteQueue(const ByteQueue&) = delete;
  ByteQueue& operator=(const ByteQueue&) = delete;

  size_t size() const { return end_ - begin_; }
  bool empty() const { return begin_ == end_; }
  const char* data() const { return buf_ + begin_; }
  // Room for at least `n` more bytes at the tail; fill it and Commit() what was written.
  char* Reserve(size_t n);
  void Commit(size_t n) { end_ += n; }
  void Append(std::string_view bytes);
  void Consume(size_t n);

  // Spare blocks this thread holds (for tests).
  static size_t SpareBlocks();

 private:
  void Release();

  char* buf_ = nullptr;
  size_t cap_ = 0;  // kBlockSize: a recycled block; more: from new[]
  size_t begin_ = 0;
  size_t end_ = 0;
};

// A TLS stream over a reactor socket, as a transport of the pump. Read() is SSL_read (kEof
// on close_notify; an EOF without it is an error), Write() is SSL_write, ShutdownWrite() sends
// close_notify, then shuts the socket down. Errors name the peer (`peer_name`, a string
// literal: "client", "proxy").
class TlsTransport final : public Transport {
 public:
  enum class Role { kServer, kClient };

  // `ssl`: a new SSL of a server or client context (its BIO is set here). `socket`: the
  // connected TCP socket, in the reactor. `initial_ciphertext`: bytes already read from it (a
  // buffered ClientHello), which OpenSSL reads first.
  TlsTransport(Role role, SslPtr ssl, loop::IoHandle socket, std::string initial_ciphertext,
               const char* peer_name);
  ~TlsTransport() override;
  TlsTransport(const TlsTransport&) = delete;
  TlsTransport& operator=(const TlsTransport&) = delete;

  // One step of the handshake: kBytes (with n == 0) once it is complete, kAgain while it waits
  // for the socket, kError if it failed (a client's certificate check included).
  IoResult Handshake();

  IoResult Read(char* buf, size_t cap) override;
  IoResult Write(const char* data, size_t len) override;
  bool readable() const override;
  bool writable() const override;
  IoResult ShutdownWrite(bool last) override;
  void SetCallback(const loop::IoWatch::Callback& cb) override;
  void Yield() override;
  loop::Loop& loop() const override { return sock_.watch()->reactor().loop(); }

  // Ends at once: writes `last` (may be empty) and close_notify as far as the socket takes
  // them right now, then closes the socket gracefully.
  void Abort(std::string_view last);

  // While on, what is sent waits in the kernel (MSG_MORE) for the next send to take it along.
  void set_hold(bool on) { hold_ = on; }
  // Sends what the kernel holds back now (TCP_NODELAY pushes it).
  void PushHeld();

  // Ciphertext read ahead from the socket (one recv feeds several records), and ciphertext
  // collected from SSL_write before one send: each holds at most this much (plus one record).
  static constexpr size_t kBufferSize = 64 * 1024;

  SSL* ssl() const { return ssl_.get(); }
  bool handshake_done() const { return handshake_done_; }
  // Ciphertext held in this transport's buffers.
  size_t buffered() const { return rbuf_.size() + wbuf_.size(); }
  bool close_notify_sent() const { return close_notify_sent_; }
  // The socket reached EOF (with or without close_notify).
  bool net_eof() const { return net_eof_; }

 private:
  static BIO_METHOD* Method();
  static int BioRead(BIO* bio, char* buf, int len);
  static int BioWrite(BIO* bio, const char* data, int len);
  static long BioCtrl(BIO* bio, int cmd, long num, void* ptr);
  Status HandshakeError();
  Status NetError(const char* what, int err) const;
  // The failure of an SSL call, as a status: a truncation, a socket error or OpenSSL's.
  Status Failure(const char* what, bool reading);
  // Sends what wbuf_ holds, as far as the socket takes it.
  Status FlushOut();

  Role role_;
  SslPtr ssl_;
  EdgeSocket sock_;
  ByteQueue rbuf_;  // ciphertext read, not yet taken by OpenSSL (first: the ClientHello)
  ByteQueue wbuf_;  // ciphertext from OpenSSL, not yet sent
  const char* peer_name_;
  Status error_;  // a failure found while the pump was not asking: reported by the next call
  bool handshake_done_ = false;
  bool net_eof_ = false;
  int net_errno_ = 0;              // the socket call that failed, for error messages
  bool read_wants_write_ = false;  // SSL_read must write first (a protocol answer)
  bool write_wants_read_ = false;  // SSL_write must read first
  bool close_notify_sent_ = false;
  bool hold_ = false;  // see set_hold()
};

class TlsRelay {
 public:
  using Role = TlsTransport::Role;

  // What the inbox holds before reading stops until the owner consumes (plus one read).
  static constexpr size_t kMaxInbox = 256 * 1024;

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

  // `ssl`: a new SSL of a server or client context. `socket`: the connected TCP socket for the
  // TLS stream, in the reactor. `initial_ciphertext`: bytes already read from it (the buffered
  // ClientHello). `tls_name` labels errors ("client", "proxy"); a string literal.
  TlsRelay(Role role, SslPtr ssl, loop::IoHandle socket, std::string initial_ciphertext,
           const char* tls_name, Callbacks callbacks);
  ~TlsRelay();
  TlsRelay(const TlsRelay&) = delete;
  TlsRelay& operator=(const TlsRelay&) = delete;

  // Starts the handshake.
  void Start();

  bool handshake_done() const { return handshake_done_; }
  // Null once the relay finished.
  SSL* ssl() const { return tls_raw_ ? tls_raw_->ssl() : nullptr; }

  // ---- before Attach() ----
  // Plaintext received and not yet consumed (at most about kMaxInbox + 64 KiB).
  std::string_view inbox() const { return std::string_view(inbox_.data(), inbox_.size()); }
  void Consume(size_t n);
  // The peer sent close_notify: inbox() will not grow any more.
  bool peer_done() const { return peer_closed_; }
  // Encrypts `plaintext` into the TLS stream (what the socket does not take yet waits, in
  // order). With `hold`, its records wait in the kernel to leave in one segment with the next
  // bytes written to the stream, or when ReleaseHeld() is called. REQUIRES: handshake_done().
  Status Send(std::string_view plaintext, bool hold = false);
  // Sends records that Send(..., hold) left in the kernel, if they are still there.
  void ReleaseHeld();
  // Relays between the TLS stream and `plain` from now on, with the pump's buffers from `pool`
  // (null: a small pool of the relay's own). Use `plain_name` in errors (a string literal).
  void Attach(Relay::Side plain, const char* plain_name, PipePool* pool = nullptr);
  // Ends the connection at once: sends `last` (may be empty) and close_notify as far as the
  // socket takes them right now, then closes the socket gracefully. No callback runs after.
  void Abort(std::string_view last);

  // ---- while relaying ----
  const Counters& counters() const;
  // True once one direction has finished.
  bool half_closed() const { return relay_ && relay_->half_closed(); }
  uint64_t last_activity_ms() const;
  // Pauses taken because a sink was full (for tests and stats).
  uint64_t pauses() const { return relay_ ? relay_->pauses() : 0; }
  // Bytes held in this relay's buffers right now (OpenSSL's record buffers aside).
  size_t buffered() const;

 private:
  void OnEvent();
  Status Work(bool* progress);
  // Ends with `status`. May destroy this.
  void Finish(Status status);
  // Runs `cb` and says whether this object still exists and is not finished.
  bool Call(const std::function<void()>& cb);

  std::unique_ptr<TlsTransport> tls_;  // until Attach()
  TlsTransport* tls_raw_ = nullptr;    // the transport, wherever it is; null once closed
  const char* tls_name_;
  Callbacks cb_;
  ByteQueue inbox_;  // plaintext for the owner (then the plaintext side)
  ByteQueue out_;    // plaintext Send() could not write yet
  std::unique_ptr<PipePool> own_pool_;
  std::unique_ptr<Relay> relay_;
  mutable Counters counters_;
  uint64_t inbox_at_attach_ = 0;  // payload handed to the relay as its prefix

  bool started_ = false;
  bool handshake_done_ = false;
  bool handshake_reported_ = false;
  bool inbox_grew_ = false;
  bool peer_closed_ = false;  // close_notify received before Attach
  bool peer_done_reported_ = false;
  bool finished_ = false;
  uint64_t last_activity_ms_ = 0;
  loop::Lifetime lifetime_;  // last
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TRANSPORT_TLS_RELAY_H_
