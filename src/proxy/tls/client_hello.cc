#include "proxy/tls/client_hello.h"

#include <algorithm>

namespace brokerproxy::proxy {
namespace {

constexpr uint8_t kContentHandshake = 22;
constexpr uint8_t kHandshakeClientHello = 1;
constexpr size_t kRecordHeader = 5;
constexpr size_t kMaxRecordPayload = 16384;  // 2^14, RFC 8446 5.1
constexpr size_t kHandshakeHeader = 4;
constexpr size_t kVersionRandom = 2 + 32;
// version, random, session_id<0>, one suite, one compression method.
constexpr size_t kMinBody = kVersionRandom + 1 + 2 + 2 + 1 + 1;
constexpr uint16_t kExtServerName = 0;
constexpr uint8_t kNameTypeHostName = 0;
constexpr size_t kMaxHostName = 253;

// RFC 6066: "HostName" is a DNS host name in ASCII, without a trailing dot. We accept the
// characters job ids and host names use, and fold case. 0 if `c` is none of them.
char HostNameChar(char c) {
  if (c >= 'A' && c <= 'Z') return static_cast<char>(c - 'A' + 'a');
  bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
  return ok ? c : 0;
}

}  // namespace

bool ClientHelloReader::failed() const {
  return verdict_ == Verdict::kNotTls || verdict_ == Verdict::kMalformed ||
         verdict_ == Verdict::kTooLarge;
}

ClientHelloReader::Verdict ClientHelloReader::Fail(Verdict v, const char* why) {
  verdict_ = v;
  error_ = why;
  name_.clear();
  return v;
}

ClientHelloReader::Verdict ClientHelloReader::Feed(std::string_view bytes) {
  if (verdict_ != Verdict::kNeedMore) return verdict_;
  ++steps_;
  // Nothing past the buffer bound is looked at, so the verdict does not depend on how the
  // input was split.
  std::string_view in = bytes.substr(0, kMaxClientHelloBuffer - fed_);
  size_t i = 0;
  while (i < in.size() && verdict_ == Verdict::kNeedMore) {
    if (record_left_ == 0) {
      ++steps_;
      RecordHeaderByte(static_cast<uint8_t>(in[i++]));
      continue;
    }
    // A record's payload goes to the handshake layer as it arrives, whole or in pieces.
    size_t take = std::min(record_left_, in.size() - i);
    Handshake(in.substr(i, take));
    i += take;
    record_left_ -= take;
  }
  fed_ += i;
  if (verdict_ == Verdict::kNeedMore && fed_ >= kMaxClientHelloBuffer) {
    Fail(Verdict::kTooLarge, "ClientHello too large");
  }
  return verdict_;
}

void ClientHelloReader::RecordHeaderByte(uint8_t b) {
  header_[header_len_++] = b;
  // Each header byte is checked as it arrives, so garbage fails without waiting for more. A
  // first record that is no handshake record is not TLS at all; a later one breaks the hello.
  Verdict bad = first_record_ ? Verdict::kNotTls : Verdict::kMalformed;
  switch (header_len_) {
    case 1:
      if (b != kContentHandshake) Fail(bad, "not a TLS handshake record");
      return;
    case 2:
      if (b != 3) Fail(bad, "bad record version");
      return;
    case 3:
      if (b > 4) Fail(bad, "bad record version");
      return;
    case 4:
      return;
    default:
      break;
  }
  size_t len = (size_t{header_[3]} << 8) | header_[4];
  header_len_ = 0;
  first_record_ = false;
  if (len == 0) {
    Fail(Verdict::kMalformed, "empty handshake record");
  } else if (len > kMaxRecordPayload) {
    Fail(Verdict::kMalformed, "record longer than 2^14 bytes");
  } else {
    record_left_ = len;
  }
}

void ClientHelloReader::Handshake(std::string_view payload) {
  size_t i = 0;
  // A field of zero bytes completes without input, so the loop also runs once it is all read.
  while (verdict_ == Verdict::kNeedMore && (left_ == 0 || i < payload.size())) {
    ++steps_;
    if (left_ == 0) {
      FieldDone();
      continue;
    }
    switch (kind_) {
      case Kind::kInt:
        value_ = (value_ << 8) | static_cast<uint8_t>(payload[i]);
        ++i;
        ++pos_;
        --left_;
        break;
      case Kind::kSkip: {
        size_t n = std::min(left_, payload.size() - i);
        i += n;
        pos_ += n;
        left_ -= n;
        break;
      }
      case Kind::kName: {
        char c = HostNameChar(payload[i]);
        if (c == 0) {
          Fail(Verdict::kMalformed, "server name is not a DNS name");
          return;
        }
        name_.push_back(c);
        ++i;
        ++pos_;
        --left_;
        break;
      }
    }
  }
}

void ClientHelloReader::ExpectInt(Field f, size_t width, size_t limit, const char* why) {
  if (pos_ + width > limit) {
    Fail(Verdict::kMalformed, why);
    return;
  }
  kind_ = Kind::kInt;
  field_ = f;
  left_ = width;
  value_ = 0;
}

void ClientHelloReader::ExpectSkip(Field f, size_t n) {
  kind_ = Kind::kSkip;
  field_ = f;
  left_ = n;
}

void ClientHelloReader::NextExtension() {
  if (pos_ == body_end_) {
    // The end of the ClientHello: every byte of it has been checked.
    verdict_ = have_sni_ ? Verdict::kSni : Verdict::kNoSni;
    sni_ = std::move(name_);
    return;
  }
  ExpectInt(Field::kExtensionHeader, 4, body_end_, "truncated extension");
}

void ClientHelloReader::NextName() {
  if (pos_ == list_end_) {
    NextExtension();
    return;
  }
  ExpectInt(Field::kNameHeader, 3, list_end_, "bad server_name");
}

void ClientHelloReader::FieldDone() {
  const size_t v = value_;
  switch (field_) {
    case Field::kType:
      if (v != kHandshakeClientHello) {
        Fail(Verdict::kMalformed, "first handshake message is not a ClientHello");
        return;
      }
      ExpectInt(Field::kLength, 3, SIZE_MAX, nullptr);
      return;
    case Field::kLength:
      // It must fit the buffer with at least one record header.
      if (kHandshakeHeader + v + kRecordHeader > kMaxClientHelloBuffer) {
        Fail(Verdict::kTooLarge, "ClientHello too large");
        return;
      }
      if (v < kMinBody) {
        Fail(Verdict::kMalformed, "ClientHello too short");
        return;
      }
      body_end_ = kHandshakeHeader + v;
      ExpectSkip(Field::kVersionRandom, kVersionRandom);
      return;
    case Field::kVersionRandom:
      ExpectInt(Field::kSessionIdLength, 1, body_end_, "bad session_id");
      return;
    case Field::kSessionIdLength:
      if (v > 32 || pos_ + v > body_end_) {
        Fail(Verdict::kMalformed, "bad session_id");
        return;
      }
      ExpectSkip(Field::kSessionId, v);
      return;
    case Field::kSessionId:
      ExpectInt(Field::kSuitesLength, 2, body_end_, "bad cipher_suites");
      return;
    case Field::kSuitesLength:
      if (v < 2 || v % 2 != 0 || pos_ + v > body_end_) {
        Fail(Verdict::kMalformed, "bad cipher_suites");
        return;
      }
      ExpectSkip(Field::kSuites, v);
      return;
    case Field::kSuites:
      ExpectInt(Field::kCompressionLength, 1, body_end_, "bad compression_methods");
      return;
    case Field::kCompressionLength:
      if (v == 0 || pos_ + v > body_end_) {
        Fail(Verdict::kMalformed, "bad compression_methods");
        return;
      }
      ExpectSkip(Field::kCompression, v);
      return;
    case Field::kCompression:
      if (pos_ == body_end_) {
        verdict_ = Verdict::kNoSni;  // no extensions at all (allowed before TLS 1.3)
        return;
      }
      ExpectInt(Field::kExtensionsLength, 2, body_end_, "bad extensions length");
      return;
    case Field::kExtensionsLength:
      if (pos_ + v != body_end_) {
        Fail(Verdict::kMalformed, "bad extensions length");
        return;
      }
      NextExtension();
      return;
    case Field::kExtensionHeader: {
      size_t type = v >> 16, len = v & 0xffff;
      if (pos_ + len > body_end_) {
        Fail(Verdict::kMalformed, "truncated extension");
        return;
      }
      if (type != kExtServerName) {
        ExpectSkip(Field::kExtensionBody, len);
        return;
      }
      if (seen_server_name_) {
        Fail(Verdict::kMalformed, "duplicate server_name extension");
        return;
      }
      seen_server_name_ = true;
      extension_end_ = pos_ + len;
      ExpectInt(Field::kNameListLength, 2, extension_end_, "bad server_name list");
      return;
    }
    case Field::kExtensionBody:
      NextExtension();
      return;
    case Field::kNameListLength:
      if (v == 0 || pos_ + v != extension_end_) {
        Fail(Verdict::kMalformed, "bad server_name list");
        return;
      }
      list_end_ = extension_end_;
      NextName();
      return;
    case Field::kNameHeader: {
      size_t type = v >> 16, len = v & 0xffff;
      if (pos_ + len > list_end_) {
        Fail(Verdict::kMalformed, "bad server_name");
        return;
      }
      // Only the first host_name entry counts; others are skipped unread.
      if (type != kNameTypeHostName || have_sni_) {
        ExpectSkip(Field::kNameSkip, len);
        return;
      }
      if (len == 0 || len > kMaxHostName) {
        Fail(Verdict::kMalformed, "server name is not a DNS name");
        return;
      }
      kind_ = Kind::kName;
      field_ = Field::kName;
      left_ = len;
      return;
    }
    case Field::kNameSkip:
      NextName();
      return;
    case Field::kName:
      if (name_.front() == '.' || name_.back() == '.') {
        Fail(Verdict::kMalformed, "server name is not a DNS name");
        return;
      }
      have_sni_ = true;
      NextName();
      return;
  }
}

ClientHello ParseClientHello(std::string_view data) {
  ClientHelloReader reader;
  ClientHello out;
  switch (reader.Feed(data)) {
    case ClientHelloReader::Verdict::kNeedMore:
      break;
    case ClientHelloReader::Verdict::kSni:
      out.state = ClientHello::State::kSni;
      out.sni = reader.sni();
      break;
    case ClientHelloReader::Verdict::kNoSni:
      out.state = ClientHello::State::kNoSni;
      break;
    case ClientHelloReader::Verdict::kNotTls:
    case ClientHelloReader::Verdict::kMalformed:
    case ClientHelloReader::Verdict::kTooLarge:
      out.state = ClientHello::State::kMalformed;
      out.error = reader.error();
      break;
  }
  return out;
}

}  // namespace brokerproxy::proxy
