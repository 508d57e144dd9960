// Reading the server name (SNI) from the start of a TLS connection without terminating TLS.
//
// OpenSSL has no parse-only ClientHello API (docs/libraries.md, "Reading the ClientHello without
// terminating TLS"), so this is our own bounded, defensive parser:
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
// The parser is incremental: ClientHelloReader keeps its place in the record layer and in the
// handshake message between reads, so every byte received is examined once (a few steps at
// most), however finely the client splits its records and segments. Re-parsing the whole buffer
// on every read would cost O(n^2): 16 KiB in 1-byte records, read one at a time, is over 10^8
// steps of the single loop's time for one unauthenticated connection. It keeps no copy of the
// bytes (the caller keeps them, to carry them forward), only the server name being read.
//
// Every length is checked against what contains it as soon as it is read, so input that breaks
// the grammar fails at the first wrong byte, not when the hello is complete. Input that does not
// follow the grammar, a hello that does not end within the first kMaxClientHelloBuffer bytes,
// or a server name that is not a DNS name is refused. Bytes after the ClientHello are never
// examined (they are whatever the client sends next, e.g. TLS 1.3 early data).

#ifndef BROKERPROXY_PROXY_TLS_CLIENT_HELLO_H_
#define BROKERPROXY_PROXY_TLS_CLIENT_HELLO_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace brokerproxy::proxy {

// The most the proxy buffers while waiting for a complete ClientHello: one maximal record
// (16 KiB of payload plus its 5-byte header). Post-quantum hybrid hellos from browsers are
// about 1.8 KB; 16 KiB leaves room for records fragmented much finer than any real client.
inline constexpr size_t kMaxClientHelloBuffer = 16 * 1024 + 5;

// Feed bytes -> verdict. Pure (no I/O, no clock), so it is unit-tested and fuzzed on its own.
class ClientHelloReader {
 public:
  enum class Verdict {
    kNeedMore,   // a prefix of a valid ClientHello: feed more
    kSni,        // complete, with a server name in sni()
    kNoSni,      // complete, without a server name
    kNotTls,     // the first record header is not a TLS handshake record's
    kMalformed,  // breaks the grammar (error() says where)
    kTooLarge,   // declares, or needs, more than kMaxClientHelloBuffer bytes
  };

  // Examines `bytes`, the next bytes of the connection after all those fed before, and returns
  // the verdict so far. Once it is not kNeedMore it is final: later calls return it and examine
  // nothing. REQUIRES nothing of `bytes` (any bytes, any length, empty too); never reads past
  // bytes.size() and keeps no pointer into them. Bytes beyond the first kMaxClientHelloBuffer
  // of the connection are never examined: a hello that has not ended there is kTooLarge.
  Verdict Feed(std::string_view bytes);

  Verdict verdict() const { return verdict_; }
  // True for kNotTls, kMalformed and kTooLarge.
  bool failed() const;
  // The server name, lower-case (kSni); empty otherwise.
  const std::string& sni() const { return sni_; }
  // Why it failed, for the debug log (nullptr unless failed()).
  const char* error() const { return error_; }
  // Steps taken so far: at most a small constant per byte fed, plus one per call. Tests bound it
  // to show that the work is linear in the input however it is split.
  uint64_t steps() const { return steps_; }

 private:
  // What the handshake layer is reading: an integer field, bytes it skips, or the server name.
  enum class Kind : uint8_t { kInt, kSkip, kName };
  enum class Field : uint8_t {
    kType,
    kLength,
    kVersionRandom,
    kSessionIdLength,
    kSessionId,
    kSuitesLength,
    kSuites,
    kCompressionLength,
    kCompression,
    kExtensionsLength,
    kExtensionHeader,
    kExtensionBody,
    kNameListLength,
    kNameHeader,
    kNameSkip,
    kName,
  };

  Verdict Fail(Verdict v, const char* why);
  void RecordHeaderByte(uint8_t b);
  void Handshake(std::string_view payload);
  // Reads `width` bytes as a big-endian integer, which must end by `limit` (else `why`).
  void ExpectInt(Field f, size_t width, size_t limit, const char* why);
  void ExpectSkip(Field f, size_t n);
  // The field just read (an integer in value_) or skipped is complete: check it, choose the
  // next one.
  void FieldDone();
  void NextExtension();
  void NextName();

  Verdict verdict_ = Verdict::kNeedMore;
  const char* error_ = nullptr;
  std::string sni_;   // set only with the verdict kSni
  std::string name_;  // the server name being read, or read before the hello ended
  uint64_t steps_ = 0;

  // Record layer.
  size_t fed_ = 0;  // bytes of the connection examined so far
  uint8_t header_[5] = {};
  size_t header_len_ = 0;   // bytes of the current record header read
  size_t record_left_ = 0;  // payload bytes of the current record still to come
  bool first_record_ = true;

  // Handshake layer: offsets are in the reassembled handshake stream.
  Kind kind_ = Kind::kInt;
  Field field_ = Field::kType;
  size_t left_ = 1;     // bytes of the current field still to come
  uint32_t value_ = 0;  // the integer being read
  size_t pos_ = 0;      // handshake bytes consumed
  size_t body_end_ = 0;
  size_t extension_end_ = 0;
  size_t list_end_ = 0;
  bool seen_server_name_ = false;
  bool have_sni_ = false;
};

// The result of parsing a whole buffer at once (tests, benchmarks): kNotTls and kTooLarge are
// folded into kMalformed.
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

// One ClientHelloReader fed `data` at once. REQUIRES nothing of `data`. Inputs of
// kMaxClientHelloBuffer bytes or more that are still incomplete are kMalformed.
ClientHello ParseClientHello(std::string_view data);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TLS_CLIENT_HELLO_H_
