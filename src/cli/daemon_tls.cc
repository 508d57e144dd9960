#include "cli/daemon_tls.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <ctime>

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

proxy::CaConstraints CaConstraintsFor(const Config& config, const proxy::LeafProfile& proxy) {
  proxy::CaConstraints c;
  c.dns.push_back("." + Lower(config.tls_domain));
  for (const std::string& name : proxy.dns_names) {
    if (std::find(c.dns.begin(), c.dns.end(), name) == c.dns.end()) c.dns.push_back(name);
  }
  c.ips = proxy.ip_addresses;
  return c;
}

Result<DaemonTls> SetUpDaemonTls(const Config& config) {
  if (!proxy::ValidDnsName(config.tls_domain)) {
    return Status::InvalidArgument("[tls] tls_domain: '" + config.tls_domain +
                                   "' is not a DNS name");
  }
  proxy::LeafProfile profile = ProxyCertProfile(config);
  proxy::CaSet::Options options;
  options.cert_path = config.ca_cert;
  options.key_path = config.ca_key;
  options.common_name = "brokerproxy CA on " + profile.common_name;
  options.constraints = CaConstraintsFor(config, profile);
  options.cert_days = config.cert_days;
  auto cas = proxy::CaSet::LoadOrCreate(std::move(options), ::time(nullptr));
  if (!cas.ok()) return cas.status().WithContext("TLS certificate authority");
  bool reissued = false;
  auto server =
      proxy::LoadOrIssueServerCert(*(*cas)->current(), ServerCertPath(config),
                                   ServerKeyPath(config), profile, config.cert_days / 3, &reissued);
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
  out.cas = std::move(cas).value();
  out.server = std::move(server).value();
  return out;
}

Result<std::optional<proxy::KeyAndCert>> RenewServerCertIfDue(const Config& config,
                                                              proxy::CaSet* cas) {
  proxy::LeafProfile profile = ProxyCertProfile(config);
  // A new CA first (if due), so that the proxy's certificate below is reissued by it.
  auto rotated = cas->Maintain(::time(nullptr), CaConstraintsFor(config, profile));
  if (!rotated.ok()) return rotated.status().WithContext("TLS certificate authority");
  bool reissued = false;
  auto server =
      proxy::LoadOrIssueServerCert(*cas->current(), ServerCertPath(config), ServerKeyPath(config),
                                   profile, config.cert_days / 3, &reissued);
  if (!server.ok()) return server.status();
  if (!reissued) return std::optional<proxy::KeyAndCert>();
  return std::optional<proxy::KeyAndCert>(std::move(server).value());
}

Status CheckJobIdAgainstProxyNames(const std::string& id, const std::string& domain,
                                   const std::vector<std::string>& proxy_names) {
  std::string name = Lower(id + "." + domain);
  if (std::find(proxy_names.begin(), proxy_names.end(), name) != proxy_names.end()) {
    return Status::InvalidArgument("job id '" + id + "' is refused: " + name +
                                   " is a name of the proxy itself");
  }
  return Status::OK();
}

registry::Broker::CertIssuer MakeCertIssuer(loop::Loop* loop, std::shared_ptr<proxy::CaSet> cas,
                                            std::string domain, int days) {
  return [loop, cas, domain, days](const registry::Job& job, const std::string& csr,
                                   std::function<void(Result<registry::Broker::IssuedCert>)> done) {
    using Issued = registry::Broker::IssuedCert;
    // The work function owns copies of everything: a detached job still runs to its end.
    auto result = std::make_shared<Result<Issued>>(Status::Internal("not issued"));
    auto names = std::make_shared<std::vector<std::string>>();
    return loop::QueueWork(
        *loop,
        [cas, domain, days, csr, result, names, id = job.id] {
          proxy::LeafProfile profile = proxy::JobLeafProfile(id, domain, days);
          auto pem = cas->current()->IssueFromCsr(csr, profile);
          if (!pem.ok()) {
            *result = pem.status();
            return;
          }
          for (const auto& d : profile.dns_names) names->push_back("DNS:" + d);
          for (const auto& a : profile.ip_addresses) names->push_back("IP:" + a);
          *result = Issued{std::move(pem).value(), cas->bundle_pem()};
        },
        [result, names, id = job.id, done = std::move(done)] {
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
  };
}

}  // namespace brokerproxy::cli
