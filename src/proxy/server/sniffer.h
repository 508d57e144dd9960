// Protocol sniffing, as pure functions over bytes (the BROKER1 preamble itself is read by
// proxy/wire/broker1.h).
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
//   - Plain: what was peeked is read at once, the line and the bytes a client pipelined behind
//     it (at most kMaxPreambleBytes in all); those bytes are written to the backend first, in
//     order, as soon as it is connected, and anything later stays in the kernel for the relay.
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

// The answer to an HTTP request on the proxy port: "HTTP/1.1 400 Bad Request" with
// Connection: close and a plain-text body saying how to reach a job, with `tls_domain` and the
// proxy's `port` in the TLS example.
std::string HttpBadRequest(std::string_view tls_domain, int port);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_SNIFFER_H_
