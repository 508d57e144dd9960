// Reading the server name (SNI) from the start of a TLS connection without terminating TLS.
//
// OpenSSL has no parse-only ClientHello API (LIBRARIES.md 2.3), so this is our own bounded,
// defensive parser, a pure function over the bytes received so far:
//
//   TLSPlaintext records (RFC 8446 5.1): type 22 (handshake), version 0x03xx, length 1..16384.
//   The handshake stream they carry is reassembled across records (a ClientHello may be split
//   into many records, and each record into many TCP segments). It must start with a
//   ClientHello (type 1, 3-byte length), which is walked field by field:
//   legacy_version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
//   compression_methods<1..2^8-1> [extensions<0..2^16-1>], the extensions exactly filling the
//   rest; server_name (type 0, RFC 6066 section 3) holds a list whose first host_name entry
//   (type 0) is the SNI.
//
// Every length is checked against what contains it before it is used. Input that does not
// follow the grammar, a hello larger than kMaxClientHelloBuffer can hold, or a server name
// that is not a DNS name is kMalformed. Bytes after the ClientHello are ignored (they are
// whatever the client sends next, e.g. TLS 1.3 early data).

#ifndef BROKERPROXY_PROXY_CLIENT_HELLO_H_
#define BROKERPROXY_PROXY_CLIENT_HELLO_H_

#include <cstddef>
#include <string>
#include <string_view>

namespace brokerproxy::proxy {

// The most the proxy buffers while waiting for a complete ClientHello: one maximal record
// (16 KiB of payload plus its 5-byte header). Post-quantum hybrid hellos from browsers are
// about 1.8 KB; 16 KiB leaves room for records fragmented much finer than any real client.
inline constexpr size_t kMaxClientHelloBuffer = 16 * 1024 + 5;

struct ClientHello {
  enum class State {
    kNeedMore,   // a prefix of a valid ClientHello: read more (bounded by kMaxClientHelloBuffer)
    kSni,        // complete, with a server name in `sni`
    kNoSni,      // complete, without a server name
    kMalformed,  // not a TLS ClientHello, or too large
  };
  State state = State::kNeedMore;
  std::string sni;              // lower-case DNS name (kSni)
  const char* error = nullptr;  // why kMalformed, for the debug log
};

// REQUIRES nothing of `data`: any bytes, any length. Never reads past data.size(). Inputs of
// kMaxClientHelloBuffer bytes or more that are still incomplete are kMalformed.
ClientHello ParseClientHello(std::string_view data);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_CLIENT_HELLO_H_
