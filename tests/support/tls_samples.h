// TLS client flights for tests and micro-benchmarks of the ClientHello parser, captured from
// OpenSSL in-process (a client on memory BIOs: its first flight is the hello).

#ifndef BROKERPROXY_TESTS_SUPPORT_TLS_SAMPLES_H_
#define BROKERPROXY_TESTS_SUPPORT_TLS_SAMPLES_H_

#include <cstddef>
#include <string>

namespace brokerproxy::testing {

// The first flight of an OpenSSL client: one record holding its ClientHello, naming `sni`
// unless it is null. `max_version` caps the protocol (e.g. TLS1_2_VERSION; 0: OpenSSL's own).
std::string CaptureClientHello(const char* sni, int max_version = 0);

// Handshake bytes (a record without its 5-byte header) split into records of at most `size`
// bytes each.
std::string FragmentHandshake(const std::string& handshake, size_t size);

// The handshake bytes of a ClientHello (a single-record flight without its 5-byte header, as
// CaptureClientHello returns it) grown to exactly `size` bytes by a padding extension
// (RFC 7685) at the end of its extensions. REQUIRES size >= hello's handshake bytes + 4.
std::string PadClientHello(const std::string& hello, size_t size);

}  // namespace brokerproxy::testing

#endif  // BROKERPROXY_TESTS_SUPPORT_TLS_SAMPLES_H_
