// Certificates: the broker's CA, the certificates it issues, and the client side's key + CSR.
//
// Who holds a job's private key: the job's user, never the daemon. `save ssl` runs
// where the service runs (a compute node, possibly reaching the login node over SSH), so the
// CLI creates an ECDSA P-256 key there, writes it itself (mode 0600, owned by the user) and
// sends only a certificate signing request. The daemon checks the CSR's signature (proof that
// the sender holds the key) and signs a certificate for the CSR's *public key only*: subject
// and subjectAltNames come from the daemon (JobLeafProfile: the job's own name and nothing
// else), never from the CSR, so nobody can obtain a certificate for another job's name. The key
// never crosses a socket, the daemon (root on a login node) never writes files into a user's
// directory, and no file ownership has to be arranged (docs/ARCHITECTURE.md, "The daemon holds
// no job's private key").
//
// Certificate profiles (docs/libraries.md, "Keys and certificates"; ECDSA P-256 everywhere,
// because browsers refuse Ed25519 certificates):
//   CA     self-signed, CA:TRUE pathlen:0, keyCertSign+cRLSign, SKI, critical nameConstraints
//          (CaConstraints: DNS names under the TLS domain plus the proxy's own names and
//          addresses, nothing else, so that even the CA key cannot vouch for a name on the
//          Internet); kCaDays, replaced by a new CA well before it expires (CaSet).
//   proxy  the daemon's own TLS endpoint: OU "brokerproxy proxy"; serverAuth; SANs for the
//          names the proxy port is reached by.
//   job    OU "brokerproxy job"; serverAuth; SANs from JobLeafProfile.
// Every leaf: CA:FALSE, digitalSignature, EKU serverAuth, SKI/AKI, a 128-bit random serial,
// notBefore backdated 5 minutes (clock skew), validity `days`.
//
// The two leaf kinds share the CA. A job certificate names only <job>.<tls_domain>, and ids
// that spell one of the proxy's own names are refused at save; `connect --tls` still accepts a
// proxy certificate only if its OU is kProxyCertUnit, which the daemon never puts into a job
// certificate (IsProxyCertificate), so a job certificate can never stand in for the proxy's.
//
// Everything here blocks (key generation, signing, files): the daemon runs it on the
// thread pool (loop::QueueWork), never on the loop thread. A CertificateAuthority is immutable
// after loading and may be used from several pool threads at once.

#ifndef BROKERPROXY_PROXY_TLS_CERTS_H_
#define BROKERPROXY_PROXY_TLS_CERTS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/status.h"
#include "proxy/tls/tls_context.h"

namespace brokerproxy::proxy {

inline constexpr const char* kProxyCertUnit = "brokerproxy proxy";
inline constexpr const char* kJobCertUnit = "brokerproxy job";
// A P-256 CSR in PEM is about 450 bytes; an RSA-8192 one about 2.2 KiB.
inline constexpr size_t kMaxCsrBytes = 8192;
// A CA lives about two years and is replaced by a new one once it has less than
// cert_days + kCaRenewMarginDays left (CaSet::Maintain), so every certificate it signs expires
// before it does; cert_days is at most kMaxCertDays (what browsers accept for a leaf).
inline constexpr int kCaDays = 730;
inline constexpr int kCaRenewMarginDays = 30;
inline constexpr int kMaxCertDays = 397;
// The CA bundle holds at most this many certificates (the current CA included).
inline constexpr size_t kMaxBundleCas = 8;
inline constexpr int kBackdateSeconds = 300;

struct KeyAndCsr {
  std::string key_pem;  // PKCS#8, unencrypted: the caller writes it 0600
  std::string csr_pem;
};

// A new ECDSA P-256 key and a CSR signed with it, subject CN=`common_name` (at most 64
// characters), no extensions (the CA decides every name).
Result<KeyAndCsr> GenerateKeyAndCsr(const std::string& common_name);

// What a leaf certificate says.
struct LeafProfile {
  std::string common_name;                // at most 64 characters
  std::string unit;                       // OU: kProxyCertUnit or kJobCertUnit
  std::vector<std::string> dns_names;     // subjectAltName DNS entries
  std::vector<std::string> ip_addresses;  // subjectAltName IP entries, textual IPv4/IPv6
  int days = 365;

  bool operator==(const LeafProfile&) const = default;
};

// True for a syntactically valid DNS name for a certificate: 1..253 characters, labels of
// 1..63 of [A-Za-z0-9_-] (not starting or ending with '-'), no empty label. No wildcards.
bool ValidDnsName(std::string_view name);
// True for a textual IPv4 or IPv6 address.
bool IsIpLiteral(std::string_view text);
// True for an address reachable on the public Internet: anything but 0/8, 10/8, 100.64/10,
// 127/8, 169.254/16, 172.16/12, 192.168/16, ::, ::1, fc00::/7, fe80::/10 (IPv4-mapped IPv6
// judged as IPv4). False for text that is no address.
bool IsGlobalAddress(std::string_view text);

// The profile of job `job_id`'s certificate: exactly one SAN, DNS:<job_id>.<domain>, lower
// case. Nothing the job's user chooses besides the id goes in: a backend host name or address
// would let any user mint a certificate, trusted by every browser that trusts the CA, for
// `localhost`, the login node, a private address another user's service listens on, or another
// job's name. Needs no DNS, so issuing never waits for a resolver.
LeafProfile JobLeafProfile(const std::string& job_id, const std::string& domain, int days);

struct KeyAndCert {
  std::string key_pem;
  std::string cert_pem;
};

// The permitted subtrees of a CA's nameConstraints. A DNS entry "example.org" permits that
// name and every name under it, ".example.org" only names under it; an IP entry is one address
// (a /32 or /128 subtree). A type with no entry is not constrained at all (RFC 5280), so the
// daemon's CA always has both (the proxy's certificate names 127.0.0.1 and ::1).
struct CaConstraints {
  std::vector<std::string> dns;
  std::vector<std::string> ips;  // textual IPv4/IPv6

  bool empty() const { return dns.empty() && ips.empty(); }
};

// nameConstraints permitted subtrees of `ca` as "DNS:base" / "IP:<hex address>/<hex mask>";
// nullopt if it has no nameConstraints extension (or one with excluded subtrees only).
std::optional<std::vector<std::string>> PermittedSubtrees(X509* ca);
// True if `ca` has nameConstraints that permit every entry of `want` (as a subtree).
bool PermitsAll(X509* ca, const CaConstraints& want);

class CertificateAuthority {
 public:
  // A new in-memory CA valid from `now` (unix seconds, backdated kBackdateSeconds) for `days`,
  // with nameConstraints `constraints` (none if empty: tests only).
  static Result<std::unique_ptr<CertificateAuthority>> Create(const std::string& common_name,
                                                              const CaConstraints& constraints = {},
                                                              int64_t now = -1, int days = kCaDays);
  static Result<std::unique_ptr<CertificateAuthority>> FromPem(const std::string& cert_pem,
                                                               const std::string& key_pem);

  // Issues a certificate for the public key in `csr_pem`, after checking that the CSR is well
  // formed, at most kMaxCsrBytes, signed by that key (proof of possession), and that the key
  // is EC P-256/P-384 or RSA 2048..8192. Everything but the key is ignored. InvalidArgument
  // for a bad CSR. Returns the certificate in PEM. Every issued certificate expires no later
  // than the CA: `profile.days` is cut to the CA's remaining life.
  Result<std::string> IssueFromCsr(std::string_view csr_pem, const LeafProfile& profile) const;
  // A new ECDSA P-256 key and its certificate.
  Result<KeyAndCert> IssueWithNewKey(const LeafProfile& profile) const;

  const std::string& cert_pem() const { return cert_pem_; }
  X509* cert() const { return cert_.get(); }
  const std::string& key_pem() const { return key_pem_; }
  // SHA-256 of the DER certificate, lower-case hex.
  std::string Fingerprint() const;

 private:
  CertificateAuthority() = default;
  Result<std::string> Sign(EVP_PKEY* subject_key, const LeafProfile& profile) const;

  X509Ptr cert_;
  EvpPkeyPtr key_;
  std::string cert_pem_;
  std::string key_pem_;
  mutable std::mutex mu_;  // signing: OpenSSL 3.0 keys are safest used by one thread at a time
};

// The proxy's own certificate: reuses `cert_path`/`key_path` if both exist, the certificate
// was issued by `ca`, matches the key, has exactly `profile`'s names and is valid for at
// least `min_days_left` more days; else issues a new pair and writes it there (key 0600).
// `*reissued` says which happened.
Result<KeyAndCert> LoadOrIssueServerCert(const CertificateAuthority& ca,
                                         const std::string& cert_path, const std::string& key_path,
                                         const LeafProfile& profile, int min_days_left,
                                         bool* reissued);

// ---- inspection (checks and tests) ----

// The subjectAltNames, as "DNS:name" and "IP:address".
std::vector<std::string> SubjectAltNames(X509* cert);
// The first OU of the subject, or "".
std::string SubjectUnit(X509* cert);
// True if `cert` is a brokerproxy proxy certificate (OU kProxyCertUnit).
bool IsProxyCertificate(X509* cert);
// SHA-256 of `cert`'s DER encoding, 64 lower-case hex digits ("" if it cannot be encoded).
std::string CertificateSha256(X509* cert);
// Seconds from now until notAfter (negative once expired).
int64_t SecondsLeft(X509* cert);
// Seconds from `now` (unix seconds) until notAfter.
int64_t SecondsLeftAt(X509* cert, int64_t now);
// Full chain verification of `leaf` against the single trusted `ca` (X509_verify_cert), for
// the purpose sslserver, name constraints included. OK or PermissionDenied with the
// verifier's reason.
Status VerifyAgainstCa(X509* leaf, X509* ca);

// The broker's CAs: the current one, which signs everything, and older ones that are kept in
// the trust bundle until they expire, so certificates they signed stay valid for clients that
// fetched the bundle. Persisted as [tls] ca_cert (the bundle, current CA first) and ca_key (the
// current CA's key, 0600).
//
// A new current CA is made (Maintain) when the current one
//   - has less than cert_days + kCaRenewMarginDays left (rotation; the old one stays in the
//     bundle until it expires),
//   - has no nameConstraints (a CA from before they existed: it is dropped from the bundle at
//     once, since it could vouch for any name; clients must fetch the CA again), or
//   - has constraints that do not permit `constraints` (the domain or the proxy's names
//     changed; the old one stays in the bundle).
// Expired CAs leave the bundle, and it holds at most kMaxBundleCas (the oldest go first, should
// the proxy's names keep changing). Thread-safe: current() and bundle_pem() may be called from any
// thread while Maintain() runs on another.
class CaSet {
 public:
  struct Options {
    std::string cert_path;  // empty: in memory only (tests)
    std::string key_path;
    std::string common_name;  // of new CAs
    CaConstraints constraints;
    int cert_days = 365;
  };
  // Loads the set from the files (a certificate file without its key, or a key matching no
  // certificate of the bundle, is an error naming the files), then Maintain(now,
  // options.constraints).
  static Result<std::unique_ptr<CaSet>> LoadOrCreate(Options options, int64_t now);

  // Makes a new current CA (valid from `now`, with `constraints`) if one of the reasons above
  // holds, drops expired ones, and writes the files if anything changed (blocking). True if a
  // new CA was made. Calls must not overlap (the daemon makes them one at a time).
  Result<bool> Maintain(int64_t now, const CaConstraints& constraints);

  std::shared_ptr<const CertificateAuthority> current() const;
  // Every CA certificate not yet expired, current first, PEM.
  std::string bundle_pem() const;
  // Number of certificates in the bundle.
  size_t bundle_size() const;

 private:
  explicit CaSet(Options options) : options_(std::move(options)) {}
  Status Write() const;

  Options options_;
  mutable std::mutex mu_;
  std::shared_ptr<const CertificateAuthority> current_;
  std::vector<std::string> older_pem_;  // not current, not expired, newest first
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TLS_CERTS_H_
