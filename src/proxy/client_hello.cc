#include "proxy/client_hello.h"

#include <cstdint>

namespace brokerproxy::proxy {
namespace {

constexpr uint8_t kContentHandshake = 22;
constexpr uint8_t kHandshakeClientHello = 1;
constexpr size_t kRecordHeader = 5;
constexpr size_t kMaxRecordPayload = 16384;  // 2^14, RFC 8446 5.1
constexpr size_t kHandshakeHeader = 4;
constexpr uint16_t kExtServerName = 0;
constexpr uint8_t kNameTypeHostName = 0;
constexpr size_t kMaxHostName = 253;

// A cursor over a byte range that refuses to read past its end.
class Reader {
 public:
  explicit Reader(std::string_view d) : data_(d) {}
  size_t left() const { return data_.size() - pos_; }
  bool U8(uint8_t* v) {
    if (left() < 1) return false;
    *v = static_cast<uint8_t>(data_[pos_++]);
    return true;
  }
  bool U16(uint16_t* v) {
    if (left() < 2) return false;
    *v = static_cast<uint16_t>((static_cast<uint8_t>(data_[pos_]) << 8) |
                               static_cast<uint8_t>(data_[pos_ + 1]));
    pos_ += 2;
    return true;
  }
  bool Skip(size_t n) {
    if (left() < n) return false;
    pos_ += n;
    return true;
  }
  // A sub-range of `n` bytes.
  bool Take(size_t n, std::string_view* out) {
    if (left() < n) return false;
    *out = data_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  // A vector with a 1- or 2-byte length prefix.
  bool Vector8(std::string_view* out) {
    uint8_t n;
    return U8(&n) && Take(n, out);
  }
  bool Vector16(std::string_view* out) {
    uint16_t n;
    return U16(&n) && Take(n, out);
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

ClientHello Malformed(const char* why) {
  ClientHello h;
  h.state = ClientHello::State::kMalformed;
  h.error = why;
  return h;
}

// RFC 6066: "HostName" is a DNS host name in ASCII, without a trailing dot. We accept the
// characters job ids and host names use, and fold case.
bool ToHostName(std::string_view raw, std::string* out) {
  if (raw.empty() || raw.size() > kMaxHostName) return false;
  out->clear();
  for (char c : raw) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
    if (!ok) return false;
    out->push_back(c);
  }
  return out->front() != '.' && out->back() != '.';
}

// `body` is the complete ClientHello body (after the 4-byte handshake header).
ClientHello ParseBody(std::string_view body) {
  Reader r(body);
  std::string_view session_id, suites, compression;
  if (!r.Skip(2 + 32)) return Malformed("ClientHello shorter than version and random");
  if (!r.Vector8(&session_id) || session_id.size() > 32) return Malformed("bad session_id");
  if (!r.Vector16(&suites) || suites.size() < 2 || suites.size() % 2 != 0) {
    return Malformed("bad cipher_suites");
  }
  if (!r.Vector8(&compression) || compression.empty()) return Malformed("bad compression_methods");
  ClientHello out;
  out.state = ClientHello::State::kNoSni;
  if (r.left() == 0) return out;  // no extensions at all (allowed before TLS 1.3)
  std::string_view extensions;
  if (!r.Vector16(&extensions) || r.left() != 0) return Malformed("bad extensions length");
  Reader ext(extensions);
  bool seen_sni = false;
  while (ext.left() > 0) {
    uint16_t type;
    std::string_view data;
    if (!ext.U16(&type) || !ext.Vector16(&data)) return Malformed("truncated extension");
    if (type != kExtServerName) continue;
    if (seen_sni) return Malformed("duplicate server_name extension");
    seen_sni = true;
    Reader sn(data);
    std::string_view list;
    if (!sn.Vector16(&list) || sn.left() != 0 || list.empty()) {
      return Malformed("bad server_name list");
    }
    Reader names(list);
    while (names.left() > 0) {
      uint8_t name_type;
      std::string_view name;
      if (!names.U8(&name_type) || !names.Vector16(&name)) return Malformed("bad server_name");
      if (name_type != kNameTypeHostName || out.state == ClientHello::State::kSni) continue;
      if (!ToHostName(name, &out.sni)) return Malformed("server name is not a DNS name");
      out.state = ClientHello::State::kSni;
    }
  }
  return out;
}

}  // namespace

ClientHello ParseClientHello(std::string_view data) {
  // Reassemble the handshake stream from the records that are complete so far; stop as soon as
  // it holds the whole ClientHello.
  std::string handshake;
  size_t pos = 0;
  size_t need = 0;  // handshake bytes needed in total, once the header is known
  while (pos < data.size()) {
    size_t left = data.size() - pos;
    const auto* rec = reinterpret_cast<const uint8_t*>(data.data() + pos);
    // Check what has arrived of the header at once, so garbage fails without waiting.
    if (rec[0] != kContentHandshake) return Malformed("not a TLS handshake record");
    if (left >= 2 && rec[1] != 3) return Malformed("bad record version");
    if (left >= 3 && rec[2] > 4) return Malformed("bad record version");
    if (left < kRecordHeader) break;
    size_t len = (size_t{rec[3]} << 8) | rec[4];
    if (len == 0) return Malformed("empty handshake record");
    if (len > kMaxRecordPayload) return Malformed("record longer than 2^14 bytes");
    if (left - kRecordHeader < len) break;  // record incomplete
    handshake.append(data.substr(pos + kRecordHeader, len));
    pos += kRecordHeader + len;
    if (need == 0 && handshake.size() >= 1 &&
        static_cast<uint8_t>(handshake[0]) != kHandshakeClientHello) {
      return Malformed("first handshake message is not a ClientHello");
    }
    if (need == 0 && handshake.size() >= kHandshakeHeader) {
      size_t body = (size_t{static_cast<uint8_t>(handshake[1])} << 16) |
                    (size_t{static_cast<uint8_t>(handshake[2])} << 8) |
                    static_cast<uint8_t>(handshake[3]);
      need = kHandshakeHeader + body;
      // It must fit the buffer with at least one record header.
      if (need + kRecordHeader > kMaxClientHelloBuffer) return Malformed("ClientHello too large");
      if (body < 2 + 32 + 1 + 2 + 2 + 1) return Malformed("ClientHello too short");
    }
    if (need != 0 && handshake.size() >= need) {
      return ParseBody(
          std::string_view(handshake).substr(kHandshakeHeader, need - kHandshakeHeader));
    }
  }
  if (data.size() >= kMaxClientHelloBuffer) return Malformed("ClientHello too large");
  return ClientHello{};
}

}  // namespace brokerproxy::proxy
