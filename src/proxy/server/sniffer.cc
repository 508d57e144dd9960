#include "proxy/server/sniffer.h"

#include "proxy/wire/broker1.h"

namespace brokerproxy::proxy {
namespace {

// Request methods of RFC 9110 (and PATCH), each with the space after it.
constexpr std::string_view kHttpMethods[] = {"GET ",     "HEAD ",    "POST ",  "PUT ",  "DELETE ",
                                             "OPTIONS ", "CONNECT ", "TRACE ", "PATCH "};

// kHttp, kNeedMore while `b` may still become a method, else kUnknown.
Protocol SniffHttp(std::string_view b) {
  bool prefix = false;
  for (std::string_view m : kHttpMethods) {
    if (b.substr(0, m.size()) == m) return Protocol::kHttp;
    if (b.size() < m.size() && m.substr(0, b.size()) == b) prefix = true;
  }
  return prefix ? Protocol::kNeedMore : Protocol::kUnknown;
}

}  // namespace

Protocol Sniff(std::string_view b) {
  if (b.empty()) return Protocol::kNeedMore;
  switch (static_cast<unsigned char>(b[0])) {
    case static_cast<unsigned char>(kPreambleMagic[0]):
      return Protocol::kPlain;
    case 0x16:  // TLS ContentType handshake
      return Protocol::kTls;
    case 'S':
      return Protocol::kSsh;
    default:
      return SniffHttp(b);
  }
}

const char* ProtocolName(Protocol p) {
  switch (p) {
    case Protocol::kNeedMore:
      return "need-more";
    case Protocol::kPlain:
      return "plain";
    case Protocol::kTls:
      return "tls";
    case Protocol::kSsh:
      return "ssh";
    case Protocol::kHttp:
      return "http";
    case Protocol::kUnknown:
      return "unknown";
  }
  return "?";
}

std::string HttpBadRequest(std::string_view tls_domain, int port) {
  std::string p = std::to_string(port);
  std::string body =
      "This is the brokerproxy port, not a web server. Reach a job with `brokerproxy connect JOB "
      "--listen 8888` and open http://127.0.0.1:8888/, or, for an ssl job, open https://JOB." +
      std::string(tls_domain) + ":" + p + "/ (TLS with the server name JOB." +
      std::string(tls_domain) + ").\n";
  return "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
         "Content-Length: " +
         std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
}

}  // namespace brokerproxy::proxy
