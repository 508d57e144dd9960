#include "cli/daemon_tls.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>

#include "loop/log.h"
#include "loop/work.h"

namespace brokerproxy::cli {
namespace {

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool IsWildcard(const std::string& host) {
  return host == "*" || host == "0.0.0.0" || host == "::" || host.empty();
}

void AddName(proxy::LeafProfile* p, const std::string& raw) {
  std::string name = Lower(raw);
  if (proxy::IsIpLiteral(name)) {
    if (IsWildcard(name)) return;
    if (std::find(p->ip_addresses.begin(), p->ip_addresses.end(), name) == p->ip_addresses.end())
      p->ip_addresses.push_back(name);
    return;
  }
  if (!proxy::ValidDnsName(name)) return;
  if (std::find(p->dns_names.begin(), p->dns_names.end(), name) == p->dns_names.end())
    p->dns_names.push_back(name);
}

std::string CanonicalName(const std::string& host) {
  addrinfo hints{};
  hints.ai_flags = AI_CANONNAME;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0) return "";
  std::string out = res && res->ai_canonname ? res->ai_canonname : "";
  freeaddrinfo(res);
  return out;
}

void AddInterfaceAddresses(proxy::LeafProfile* p) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return;
  for (ifaddrs* i = list; i; i = i->ifa_next) {
    if (!i->ifa_addr) continue;
    char text[INET6_ADDRSTRLEN] = "";
    if (i->ifa_addr->sa_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text,
                sizeof(text));
    } else if (i->ifa_addr->sa_family == AF_INET6) {
      auto* in6 = reinterpret_cast<sockaddr_in6*>(i->ifa_addr);
      if (IN6_IS_ADDR_LINKLOCAL(&in6->sin6_addr)) continue;  // needs a scope: useless in a cert
      inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
    } else {
      continue;
    }
    AddName(p, text);
  }
  freeifaddrs(list);
}

std::string ServerCertPath(const Config& c) { return c.state_dir + "/server.pem"; }
std::string ServerKeyPath(const Config& c) { return c.state_dir + "/server-key.pem"; }

}  // namespace

proxy::LeafProfile ProxyCertProfile(const Config& config) {
  proxy::LeafProfile p;
  p.unit = proxy::kProxyCertUnit;
  p.days = config.cert_days;
  char host[256] = {};
  std::string hostname =
      gethostname(host, sizeof(host) - 1) == 0 && host[0] != '\0' ? host : "localhost";
  p.common_name = Lower(hostname);
  AddName(&p, hostname);
  AddName(&p, CanonicalName(hostname));
  AddName(&p, "localhost");
  AddName(&p, "127.0.0.1");
  AddName(&p, "::1");
  AddName(&p, config.tls_domain);
  bool wildcard = false;
  for (const HostPort& l : config.listen) {
    if (IsWildcard(l.host)) {
      wildcard = true;
    } else {
      AddName(&p, l.host);
    }
  }
  if (wildcard) AddInterfaceAddresses(&p);
  AddName(&p, config.proxy.host);
  return p;
}

Result<DaemonTls> SetUpDaemonTls(const Config& config) {
  if (!proxy::ValidDnsName(config.tls_domain)) {
    return Status::InvalidArgument("[tls] tls_domain: '" + config.tls_domain +
                                   "' is not a DNS name");
  }
  auto ca = proxy::CertificateAuthority::LoadOrCreate(config.ca_cert, config.ca_key);
  if (!ca.ok()) return ca.status().WithContext("TLS certificate authority");
  proxy::LeafProfile profile = ProxyCertProfile(config);
  bool reissued = false;
  auto server = proxy::LoadOrIssueServerCert(**ca, ServerCertPath(config), ServerKeyPath(config),
                                             profile, config.cert_days / 3, &reissued);
  if (!server.ok()) return server.status().WithContext("the proxy's TLS certificate");
  auto cert = proxy::ParseCertificatePem(server->cert_pem);
  if (!cert.ok()) return cert.status();
  DaemonTls out;
  out.server_seconds_left = proxy::SecondsLeft(cert->get());
  if (reissued) {
    std::string names;
    for (const std::string& n : proxy::SubjectAltNames(cert->get())) {
      names += (names.empty() ? "" : " ") + n;
    }
    LOG_INFO("issued the proxy's TLS certificate %s for %s", ServerCertPath(config).c_str(),
             names.c_str());
  }
  out.ca = std::move(ca).value();
  out.server = std::move(server).value();
  return out;
}

Result<std::optional<proxy::KeyAndCert>> RenewServerCertIfDue(
    const Config& config, const proxy::CertificateAuthority& ca) {
  bool reissued = false;
  auto server =
      proxy::LoadOrIssueServerCert(ca, ServerCertPath(config), ServerKeyPath(config),
                                   ProxyCertProfile(config), config.cert_days / 3, &reissued);
  if (!server.ok()) return server.status();
  if (!reissued) return std::optional<proxy::KeyAndCert>();
  return std::optional<proxy::KeyAndCert>(std::move(server).value());
}

namespace {

// Signs on the pool and reports to `done` on the loop. The token is kept by the request itself
// (in its own completion), so the signing always reports; its caller (the Broker) ignores a
// report that comes after it went.
void SignOnPool(loop::Loop* loop, std::shared_ptr<const proxy::CertificateAuthority> ca,
                std::string domain, int days, std::string csr, std::string id, std::string host,
                std::vector<std::string> addresses,
                std::function<void(Result<registry::Broker::IssuedCert>)> done) {
  using Issued = registry::Broker::IssuedCert;
  // The work function owns copies of everything: it runs to its end whatever happens.
  auto result = std::make_shared<Result<Issued>>(Status::Internal("not issued"));
  auto names = std::make_shared<std::vector<std::string>>();
  auto token = std::make_shared<loop::Pending>();
  *token = loop::QueueWork(
      *loop,
      [ca, domain, days, csr, result, names, id, host, addresses] {
        proxy::LeafProfile profile = proxy::JobLeafProfile(id, domain, host, addresses, days);
        auto pem = ca->IssueFromCsr(csr, profile);
        if (!pem.ok()) {
          *result = pem.status();
          return;
        }
        for (const auto& d : profile.dns_names) names->push_back("DNS:" + d);
        for (const auto& a : profile.ip_addresses) names->push_back("IP:" + a);
        *result = Issued{std::move(pem).value(), ca->cert_pem()};
      },
      [token, result, names, id, done = std::move(done)] {
        if (result->ok()) {
          std::string list;
          for (const auto& n : *names) list += (list.empty() ? "" : " ") + n;
          LOG_INFO("issued a TLS certificate to job %s for %s", id.c_str(), list.c_str());
        } else {
          LOG_INFO("refused a certificate to job %s: %s", id.c_str(),
                   result->status().ToString().c_str());
        }
        done(std::move(*result));
      });
}

}  // namespace

registry::Broker::CertIssuer MakeCertIssuer(loop::Loop* loop,
                                            std::shared_ptr<const proxy::CertificateAuthority> ca,
                                            std::string domain, int days) {
  return [loop, ca, domain, days](const registry::Job& job, const std::string& csr,
                                  std::function<void(Result<registry::Broker::IssuedCert>)> done) {
    // The host's addresses come from the loop's resolver, bounded in time and in look-ups at
    // once (loop/work.h): a blocking getaddrinfo inside the signing work would hold a pool
    // thread for as long as DNS takes, and enough ssl saves of names that never resolve would
    // take every thread from the registry's writes. A name that does not resolve (in time)
    // gets a certificate without addresses.
    return loop::Resolve(
        *loop, job.host, 0,
        [loop, ca, domain, days, csr, id = job.id, host = job.host,
         done = std::move(done)](Result<std::vector<sockaddr_storage>> resolved) mutable {
          std::vector<std::string> addresses;
          if (resolved.ok()) {
            for (const sockaddr_storage& ss : *resolved) {
              char text[INET6_ADDRSTRLEN] = "";
              const void* in = ss.ss_family == AF_INET
                                   ? static_cast<const void*>(
                                         &reinterpret_cast<const sockaddr_in*>(&ss)->sin_addr)
                                   : static_cast<const void*>(
                                         &reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_addr);
              if (inet_ntop(ss.ss_family, in, text, sizeof(text)) == nullptr) continue;
              if (std::find(addresses.begin(), addresses.end(), text) == addresses.end()) {
                addresses.push_back(text);
              }
            }
          }
          SignOnPool(loop, ca, domain, days, csr, id, host, std::move(addresses), std::move(done));
        },
        job.owner);
  };
}

}  // namespace brokerproxy::cli
