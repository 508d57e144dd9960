// Certificates: the broker's CA, the certificates it issues, and the client side's key + CSR.
//
// Who holds a job's private key (issue 5): the job's user, never the daemon. `save ssl` runs
// where the service runs (a compute node, possibly reaching the login node over SSH), so the
// CLI creates an ECDSA P-256 key there, writes it itself (mode 0600, owned by the user) and
// sends only a certificate signing request. The daemon checks the CSR's signature (proof that
// the sender holds the key) and signs a certificate for the CSR's *public key only*: subject
// and subjectAltNames come from the daemon (JobLeafProfile), never from the CSR, so nobody
// can obtain a certificate for another job's name. The key never crosses a socket, the
// daemon (root on a login node) never writes files into a user's directory, and no file
// ownership has to be arranged.
//
// Certificate profiles (LIBRARIES.md section 2.4; ECDSA P-256 everywhere, because browsers
// refuse Ed25519 certificates):
//   CA     self-signed, CA:TRUE pathlen:0, keyCertSign+cRLSign, SKI; 10 years.
//   proxy  the daemon's own TLS endpoint: OU "brokerproxy proxy"; serverAuth; SANs for the
//          names the proxy port is reached by.
//   job    OU "brokerproxy job"; serverAuth; SANs from JobLeafProfile.
// Every leaf: CA:FALSE, digitalSignature, EKU serverAuth, SKI/AKI, a 128-bit random serial,
// notBefore backdated 5 minutes (clock skew), validity `days`.
//
// The two leaf kinds share the CA, and a job's SANs include its backend host (which its user
// chooses), so a job certificate may well name the login host. `connect --tls` therefore
// accepts a proxy certificate only if its OU is kProxyCertUnit, which the daemon never puts
// into a job certificate (IsProxyCertificate).
//
// Everything here blocks (key generation, signing, files): the daemon runs it on the thread
// pool (loop::QueueWork), never on the loop thread. Nothing here resolves names: a blocking
// look-up would hold a pool thread as long as DNS takes, so callers resolve through the loop's
// bounded resolver (loop/work.h) first. A CertificateAuthority is immutable after loading and
// may be used from several pool threads at once.

#ifndef BROKERPROXY_PROXY_CERTS_H_
#define BROKERPROXY_PROXY_CERTS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "loop/status.h"
#include "proxy/tls_context.h"

namespace brokerproxy::proxy {

inline constexpr const char* kProxyCertUnit = "brokerproxy proxy";
inline constexpr const char* kJobCertUnit = "brokerproxy job";
// A P-256 CSR in PEM is about 450 bytes; an RSA-8192 one about 2.2 KiB.
inline constexpr size_t kMaxCsrBytes = 8192;
inline constexpr int kCaDays = 3650;
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

// The profile of job `job_id`'s certificate. SANs: DNS:<job_id>.<domain>; the backend `host`
// (IP: for a literal, else DNS:); each of `host_addresses`. Users choose backend hosts, and the
// CA is trusted by their browsers, so a backend name or address goes into the certificate only
// where no one outside the cluster can be impersonated with it:
//   - DNS names only if single-label ("node7", "localhost"): a dotted name such as
//     "www.example.org" would let any user mint a browser-trusted certificate for it;
//   - never a name under `domain` other than the job's own (names there belong to jobs);
//   - IP addresses only if not globally routable (loopback, RFC 1918, CGNAT, link-local,
//     unique-local IPv6).
// Duplicates are dropped, order kept.
LeafProfile JobLeafProfile(const std::string& job_id, const std::string& domain,
                           const std::string& host, const std::vector<std::string>& host_addresses,
                           int days);

struct KeyAndCert {
  std::string key_pem;
  std::string cert_pem;
};

class CertificateAuthority {
 public:
  // Loads the CA from `cert_path` and `key_path`, or, when neither file exists, creates a new
  // CA and writes it there (key 0600 first, followed by a copy of the certificate, then the
  // certificate 0644; each written to a new temp file and renamed into place). A key file
  // without its certificate file (a crash between the two) gets the certificate back from that
  // copy. Otherwise one file without the other, an unreadable or mismatched pair, or a
  // certificate that is not a CA is an error naming the file.
  static Result<std::unique_ptr<CertificateAuthority>> LoadOrCreate(const std::string& cert_path,
                                                                    const std::string& key_path);
  // An in-memory CA (tests).
  static Result<std::unique_ptr<CertificateAuthority>> Create(const std::string& common_name);
  static Result<std::unique_ptr<CertificateAuthority>> FromPem(const std::string& cert_pem,
                                                               const std::string& key_pem);

  // Issues a certificate for the public key in `csr_pem`, after checking that the CSR is well
  // formed, at most kMaxCsrBytes, signed by that key (proof of possession), and that the key
  // is EC P-256/P-384 or RSA 2048..8192. Everything but the key is ignored. InvalidArgument
  // for a bad CSR. Returns the certificate in PEM.
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
// Seconds from now until notAfter (negative once expired).
int64_t SecondsLeft(X509* cert);
// Full chain verification of `leaf` against the single trusted `ca` (X509_verify_cert), for
// the purpose sslserver. OK or PermissionDenied with the verifier's reason.
Status VerifyAgainstCa(X509* leaf, X509* ca);

// Writes `data` to `path` through a new file in the same directory (O_CREAT|O_EXCL|O_NOFOLLOW,
// `mode`), fsync, rename over `path`. So a key file is never readable by others for even a
// moment, and a symlink planted at the temp name cannot redirect it.
Status WriteNewFile(const std::string& path, std::string_view data, mode_t mode);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_CERTS_H_
