#include "cli/ca_trust.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>

#include "cli/control_client.h"
#include "loop/address.h"
#include "loop/file.h"
#include "proxy/tls/certs.h"
#include "registry/snapshot.h"

namespace brokerproxy::cli {
namespace {

struct AddrInfoFree {
  void operator()(addrinfo* a) const { freeaddrinfo(a); }
};

// A blocking TCP connection to `host`:`port` by `deadline` (MonotonicMs), trying each address.
Result<int> ConnectBy(const std::string& host, int port, int64_t deadline) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  std::string service = std::to_string(port);
  int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
  if (rc != 0) return Status::Unavailable("cannot resolve " + host + ": " + gai_strerror(rc));
  std::unique_ptr<addrinfo, AddrInfoFree> list(found);
  Status last = Status::Unavailable("no address for " + host);
  for (addrinfo* a = list.get(); a; a = a->ai_next) {
    int fd = ::socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last = PosixError("connect", errno);
      ::close(fd);
      continue;
    }
    pollfd p{fd, POLLOUT, 0};
    int left = static_cast<int>(std::max<int64_t>(0, deadline - MonotonicMs()));
    int err = 0;
    socklen_t len = sizeof(err);
    if (::poll(&p, 1, left) != 1 || ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 ||
        err != 0) {
      last = err != 0 ? PosixError("connect", err) : Status::Timeout("connect timed out");
      ::close(fd);
      continue;
    }
    return fd;
  }
  return last;
}

std::string Lower(std::string_view text) {
  std::string out;
  for (char c : text) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

Result<std::string> ParseCaFingerprint(std::string_view text) {
  std::string_view rest = text;
  if (rest.size() >= 7 && Lower(rest.substr(0, 7)) == "sha256:") rest.remove_prefix(7);
  std::string hex;
  for (char c : rest) {
    if (c == ':') continue;
    if (!std::isxdigit(static_cast<unsigned char>(c))) {
      hex.clear();
      break;
    }
    hex += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  if (hex.size() != 64) {
    return Status::InvalidArgument(
        "'" + std::string(text.substr(0, 120)) +
        "' is not a SHA-256 fingerprint (SHA256:<64 hex digits>, as `brokerproxy load` shows)");
  }
  return hex;
}

Result<std::vector<proxy::X509Ptr>> FetchProxyChain(const std::string& host, int port,
                                                    int64_t timeout_ms) {
  const std::string where = HostPort{host, port}.ToString();
  int64_t deadline = MonotonicMs() + timeout_ms;
  auto fd = ConnectBy(host, port, deadline);
  if (!fd.ok())
    return Status::Unavailable("cannot reach the proxy at " + where + ": " + fd.status().message());
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{*fd};
  ERR_clear_error();
  proxy::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx || SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1) {
    return proxy::SslError("SSL_CTX_new");
  }
  // Nothing is trusted yet: the chain is only read here, and checked by the caller.
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
  proxy::SslPtr ssl(SSL_new(ctx.get()));
  if (!ssl) return proxy::SslError("SSL_new");
  BP_RETURN_IF_ERROR(proxy::SetClientPeerName(ssl.get(), host));  // the same SNI as tunnels
  SSL_set_fd(ssl.get(), *fd);
  for (;;) {
    int rc = SSL_connect(ssl.get());
    if (rc == 1) break;
    int err = SSL_get_error(ssl.get(), rc);
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
      return proxy::SslError("TLS handshake with the proxy at " + where);
    }
    int left = static_cast<int>(deadline - MonotonicMs());
    pollfd p{*fd, static_cast<short>(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT), 0};
    if (left <= 0 || ::poll(&p, 1, left) != 1) {
      return Status::Timeout("no TLS handshake with the proxy at " + where + " within " +
                             std::to_string(timeout_ms / 1000) + "s");
    }
  }
  std::vector<proxy::X509Ptr> chain;
  STACK_OF(X509)* peer = SSL_get_peer_cert_chain(ssl.get());
  for (int i = 0; peer && i < sk_X509_num(peer); ++i) {
    X509* c = sk_X509_value(peer, i);
    X509_up_ref(c);
    chain.emplace_back(c);
  }
  if (chain.empty()) return Status::IOError("the proxy at " + where + " sent no certificate");
  return chain;
}

Result<std::string> ProxyCaFromChain(const std::vector<proxy::X509Ptr>& chain,
                                     const std::string& host, const std::string& want_sha256,
                                     std::string* got_sha256) {
  got_sha256->clear();
  X509* ca = nullptr;
  // The chain's self-signed CAs, last first (the root ends a chain).
  for (size_t i = chain.size(); i-- > 1;) {
    X509* c = chain[i].get();
    if (X509_check_ca(c) <= 0 || X509_check_issued(c, c) != X509_V_OK) continue;
    std::string fp = proxy::CertificateSha256(c);
    if (got_sha256->empty()) *got_sha256 = fp;
    if (want_sha256.empty() || fp == want_sha256) {
      ca = c;
      *got_sha256 = fp;
      break;
    }
  }
  if (!ca) {
    if (got_sha256->empty()) {
      return Status::PermissionDenied(
          "the proxy's TLS chain carries no CA certificate (a brokerproxy older than this "
          "client?); pass the broker's CA with --ca FILE (`brokerproxy ca` on the login node)");
    }
    return Status::PermissionDenied("the proxy presents the CA SHA256:" + *got_sha256 +
                                    ", not the expected SHA256:" + want_sha256 +
                                    "; refusing to send the job's secret");
  }
  // The proxy's certificate must be signed by that CA and name `host`, as for every tunnel.
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(), X509_STORE_free);
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> vctx(X509_STORE_CTX_new(),
                                                                       X509_STORE_CTX_free);
  if (!store || !vctx || X509_STORE_add_cert(store.get(), ca) != 1 ||
      X509_STORE_CTX_init(vctx.get(), store.get(), chain[0].get(), nullptr) != 1) {
    return proxy::SslError("checking the proxy's certificate");
  }
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(vctx.get());
  unsigned char addr[16];
  bool is_ip =
      inet_pton(AF_INET, host.c_str(), addr) == 1 || inet_pton(AF_INET6, host.c_str(), addr) == 1;
  if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str()) != 1
            : X509_VERIFY_PARAM_set1_host(param, host.c_str(), 0) != 1) {
    return proxy::SslError("setting the expected server name");
  }
  if (X509_verify_cert(vctx.get()) != 1) {
    return Status::PermissionDenied(
        "the proxy's certificate does not verify against the CA SHA256:" + *got_sha256 + " (" +
        X509_verify_cert_error_string(X509_STORE_CTX_get_error(vctx.get())) +
        "); refusing to send the job's secret");
  }
  if (!proxy::IsProxyCertificate(chain[0].get())) {
    return Status::PermissionDenied("the certificate at " + host +
                                    " is signed by the broker CA but is not the proxy's; "
                                    "refusing to send the job's secret");
  }
  return proxy::CertificateToPem(ca);
}

std::string CaPins::DefaultPath() {
  const char* xdg = std::getenv("XDG_CONFIG_HOME");
  if (xdg != nullptr && xdg[0] == '/') return std::string(xdg) + "/brokerproxy/known_cas";
  const char* home = std::getenv("HOME");
  if (home == nullptr || home[0] != '/') return "";
  return std::string(home) + "/.config/brokerproxy/known_cas";
}

Result<std::optional<std::string>> CaPins::Lookup(const std::string& address) const {
  auto text = registry::ReadFileIfExists(path_, 1 << 20);
  if (!text.ok()) return text.status();
  if (!text->has_value()) return std::optional<std::string>();
  std::string_view rest = **text;
  while (!rest.empty()) {
    size_t nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? "" : rest.substr(nl + 1);
    size_t sp = line.find(' ');
    if (line.empty() || line[0] == '#' || sp == std::string_view::npos) continue;
    if (line.substr(0, sp) != address) continue;
    auto fp = ParseCaFingerprint(line.substr(sp + 1));
    if (!fp.ok()) return fp.status().WithContext(path_ + ": the line of " + address);
    return std::optional<std::string>(*fp);
  }
  return std::optional<std::string>();
}

Status CaPins::Add(const std::string& address, const std::string& sha256) const {
  // mkdir -p, 0700 for what it creates.
  size_t slash = path_.rfind('/');
  std::string dir = slash == std::string::npos || slash == 0 ? "/" : path_.substr(0, slash);
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) {
      return PosixError("cannot create directory " + prefix, errno);
    }
  }
  auto text = registry::ReadFileIfExists(path_, 1 << 20);
  if (!text.ok()) return text.status();
  std::string data = text->value_or("");
  if (!data.empty() && data.back() != '\n') data += '\n';
  data += address + " SHA256:" + sha256 + "\n";
  return loop::WriteFileAtomic(path_, data, 0600);
}

}  // namespace brokerproxy::cli
