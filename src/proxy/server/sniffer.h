// Protocol sniffing and the plain preamble, as pure functions over bytes.
//
// The proxy port serves three protocols; the first byte decides (README.md, "How it works"):
//
//   'B'  BROKER1 preamble  "BROKER1 <job_id> <secret>\n"  (at most kMaxPreambleBytes)
//   0x16 TLS handshake record (ClientHello)
//   'S'  SSH identification string "SSH-2.0-..." (RFC 4253 section 4.2)
//
// An HTTP request line ("GET ", "POST ", ...: a client pointed at the port by mistake) is told
// apart from other garbage only to answer it in HTTP (a 400 with a hint) instead of ERR.
//
// How sniffed bytes are kept, so that none is lost, per protocol:
//   - SSH: peeked only (MSG_PEEK). libssh reads the socket itself and has no API to inject bytes
//     already read, so the banner must stay in the kernel.
//   - Plain: the preamble line is consumed exactly up to its newline (peek to find it, then read
//     that many bytes), so bytes the client pipelined after it stay in the kernel and are
//     spliced to the backend first, in order; no user-space carry buffer is needed.
//   - TLS: the ClientHello is consumed into a buffer (a partial record cannot be left in a
//     level-triggered socket without busy-looping) and carried forward: replayed to the backend
//     for passthrough, or fed to OpenSSL for termination.

#ifndef BROKERPROXY_PROXY_SERVER_SNIFFER_H_
#define BROKERPROXY_PROXY_SERVER_SNIFFER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace brokerproxy::proxy {

enum class Protocol { kNeedMore, kPlain, kTls, kSsh, kHttp, kUnknown };

// Decides from the first byte(s): kNeedMore for empty input, and for a proper prefix of an HTTP
// method and its space ("GE", "POST"), at most kMaxHttpMethodBytes bytes.
Protocol Sniff(std::string_view first_bytes);
inline constexpr size_t kMaxHttpMethodBytes = 8;  // "OPTIONS ", "CONNECT "
const char* ProtocolName(Protocol p);

inline constexpr size_t kMaxPreambleBytes = 2048;
inline constexpr std::string_view kPreambleMagic = "BROKER1 ";

struct Preamble {
  enum class State { kNeedMore, kDone, kBad };
  State state = State::kNeedMore;
  std::string job_id;
  std::string secret;           // never logged
  size_t length = 0;            // bytes of the line, newline included (kDone)
  const char* error = nullptr;  // why kBad, for the debug log
};

// Reads "BROKER1 <job_id> <secret>\n" (an optional '\r' before the newline is accepted) from the
// start of a byte stream fed in pieces of any size: feed bytes -> verdict. Incremental: each
// byte is examined once, however the line is split, and nothing after the newline is examined.
// Fails as early as possible: a wrong magic, a character outside the job id or secret
// alphabets, or kMaxPreambleBytes without a newline is kBad at once. Pure (no I/O), so it is
// unit-tested and fuzzed on its own.
class PreambleReader {
 public:
  // Examines `bytes`, the next bytes of the stream after all those fed before, and returns the
  // verdict so far. Once it is not kNeedMore it is final: later calls return it and examine
  // nothing. REQUIRES nothing of `bytes`; keeps no pointer into them.
  Preamble::State Feed(std::string_view bytes);
  Preamble::State state() const { return result_.state; }
  // The verdict: job_id, secret and length are set for kDone only, error for kBad only.
  const Preamble& result() const { return result_; }
  // Moves the result out (job_id and secret are left empty here).
  Preamble Take() { return std::move(result_); }

 private:
  enum class Part : uint8_t { kMagic, kJobId, kSecret, kCarriageReturn };
  void Bad(const char* why);

  Preamble result_;
  Part part_ = Part::kMagic;
  size_t pos_ = 0;  // bytes of the stream examined
  std::string job_id_, secret_;
};

// One PreambleReader fed `data` at once: `data` may hold only part of the line, or the line and
// payload after it.
Preamble ParsePreamble(std::string_view data);

// The proxy's one-line replies.
inline constexpr std::string_view kReplyOk = "OK\n";
enum class ErrorCode { kDenied, kUnavailable, kBusy, kTimeout, kBadRequest };
// "ERR denied\n", ...
std::string_view ErrorReply(ErrorCode code);
const char* ErrorCodeName(ErrorCode code);

// The answer to an HTTP request on the proxy port: "HTTP/1.1 400 Bad Request" with
// Connection: close and a plain-text body saying how to reach a job, with `tls_domain` and the
// proxy's `port` in the TLS example.
std::string HttpBadRequest(std::string_view tls_domain, int port);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_SNIFFER_H_
