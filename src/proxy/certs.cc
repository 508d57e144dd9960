#include "proxy/certs.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <set>

#include "loop/log.h"
#include "registry/snapshot.h"

namespace brokerproxy::proxy {
namespace {

constexpr size_t kMaxPemFileBytes = 1 << 20;

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;

int NoPassword(char*, int, int, void*) { return 0; }

std::string BioText(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string();
}

Result<std::string> KeyToPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return SslError("writing a private key");
  }
  return BioText(bio.get());
}

Result<EvpPkeyPtr> NewP256Key() {
  EvpPkeyPtr key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!key) return SslError("generating an ECDSA P-256 key");
  return key;
}

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

Status AddNameEntry(X509_NAME* name, const char* field, const std::string& value) {
  if (value.empty()) return Status::OK();
  if (X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(value.data()),
                                 static_cast<int>(value.size()), -1, 0) != 1) {
    return SslError(std::string("setting the subject ") + field);
  }
  return Status::OK();
}

Status AddExtension(X509* cert, X509V3_CTX* ctx, int nid, const char* value) {
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, ctx, nid, value);
  if (!ext) return SslError(std::string("building extension ") + OBJ_nid2sn(nid));
  int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (ok != 1) return SslError(std::string("adding extension ") + OBJ_nid2sn(nid));
  return Status::OK();
}

// subjectAltName built from GENERAL_NAME objects, not from a "DNS:a,IP:b" config string, so no
// name can smuggle in a second entry.
Status AddSubjectAltNames(X509* cert, const LeafProfile& p) {
  if (p.dns_names.empty() && p.ip_addresses.empty()) return Status::OK();
  GENERAL_NAMES* names = sk_GENERAL_NAME_new_null();
  if (!names) return SslError("allocating subjectAltName");
  auto free_names = [](GENERAL_NAMES* n) { GENERAL_NAMES_free(n); };
  std::unique_ptr<GENERAL_NAMES, decltype(free_names)> owner(names, free_names);
  for (const std::string& dns : p.dns_names) {
    if (!ValidDnsName(dns)) return Status::InvalidArgument("not a valid DNS name: " + dns);
    ASN1_IA5STRING* ia5 = ASN1_IA5STRING_new();
    if (!ia5 || ASN1_STRING_set(ia5, dns.data(), static_cast<int>(dns.size())) != 1) {
      ASN1_IA5STRING_free(ia5);
      return SslError("building a DNS name");
    }
    GENERAL_NAME* gn = GENERAL_NAME_new();
    if (!gn) {
      ASN1_IA5STRING_free(ia5);
      return SslError("building a DNS name");
    }
    GENERAL_NAME_set0_value(gn, GEN_DNS, ia5);
    if (sk_GENERAL_NAME_push(names, gn) <= 0) {
      GENERAL_NAME_free(gn);
      return SslError("building subjectAltName");
    }
  }
  for (const std::string& ip : p.ip_addresses) {
    ASN1_OCTET_STRING* octets = a2i_IPADDRESS(ip.c_str());
    if (!octets) return Status::InvalidArgument("not an IP address: " + ip);
    GENERAL_NAME* gn = GENERAL_NAME_new();
    if (!gn) {
      ASN1_OCTET_STRING_free(octets);
      return SslError("building an IP name");
    }
    GENERAL_NAME_set0_value(gn, GEN_IPADD, octets);
    if (sk_GENERAL_NAME_push(names, gn) <= 0) {
      GENERAL_NAME_free(gn);
      return SslError("building subjectAltName");
    }
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names, 0, X509V3_ADD_DEFAULT) != 1) {
    return SslError("adding subjectAltName");
  }
  return Status::OK();
}

Status SetRandomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return SslError("random serial");
  bytes[0] &= 0x7f;  // positive
  bytes[0] |= 0x01;  // and a full 16 bytes, never zero
  BIGNUM* bn = BN_bin2bn(bytes, sizeof(bytes), nullptr);
  if (!bn) return SslError("serial number");
  ASN1_INTEGER* serial = BN_to_ASN1_INTEGER(bn, nullptr);
  BN_free(bn);
  if (!serial) return SslError("serial number");
  int ok = X509_set_serialNumber(cert, serial);
  ASN1_INTEGER_free(serial);
  return ok == 1 ? Status::OK() : SslError("serial number");
}

// The fields every certificate shares: version 3, serial, validity, subject, public key.
Status FillCommon(X509* cert, EVP_PKEY* subject_key, const std::string& common_name,
                  const std::string& unit, int days) {
  if (X509_set_version(cert, 2) != 1) return SslError("certificate version");
  BP_RETURN_IF_ERROR(SetRandomSerial(cert));
  if (!X509_gmtime_adj(X509_getm_notBefore(cert), -kBackdateSeconds) ||
      !X509_gmtime_adj(X509_getm_notAfter(cert), static_cast<long>(days) * 86400L)) {
    return SslError("certificate validity");
  }
  X509_NAME* name = X509_get_subject_name(cert);
  BP_RETURN_IF_ERROR(AddNameEntry(name, "O", "brokerproxy"));
  BP_RETURN_IF_ERROR(AddNameEntry(name, "OU", unit));
  BP_RETURN_IF_ERROR(AddNameEntry(name, "CN", common_name.substr(0, 64)));
  if (X509_set_pubkey(cert, subject_key) != 1) return SslError("certificate public key");
  return Status::OK();
}

// Only keys a browser and OpenSSL accept for a TLS server.
Status CheckCsrKey(EVP_PKEY* key) {
  int id = EVP_PKEY_get_base_id(key);
  if (id == EVP_PKEY_EC) {
    char group[64] = {};
    if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                       nullptr) != 1) {
      ERR_clear_error();
      return Status::InvalidArgument("CSR: EC key without a named curve");
    }
    std::string g = group;
    if (g == "prime256v1" || g == "P-256" || g == "secp384r1" || g == "P-384") {
      return Status::OK();
    }
    return Status::InvalidArgument("CSR: EC curve " + g + " is not accepted (P-256 or P-384)");
  }
  if (id == EVP_PKEY_RSA) {
    int bits = EVP_PKEY_get_bits(key);
    if (bits >= 2048 && bits <= 8192) return Status::OK();
    return Status::InvalidArgument("CSR: RSA keys must have 2048..8192 bits");
  }
  return Status::InvalidArgument("CSR: only ECDSA P-256/P-384 and RSA keys are accepted");
}

std::set<std::string> ProfileNames(const LeafProfile& p) {
  std::set<std::string> out;
  for (const auto& d : p.dns_names) out.insert(Lower("DNS:" + d));
  for (const auto& ip : p.ip_addresses) {
    // Canonical text (e.g. "::1" for "0:0::1") so the comparison with a parsed cert holds.
    unsigned char buf[16];
    char text[INET6_ADDRSTRLEN] = "";
    if (inet_pton(AF_INET, ip.c_str(), buf) == 1) {
      inet_ntop(AF_INET, buf, text, sizeof(text));
    } else if (inet_pton(AF_INET6, ip.c_str(), buf) == 1) {
      inet_ntop(AF_INET6, buf, text, sizeof(text));
    }
    out.insert(Lower("IP:" + std::string(text)));
  }
  return out;
}

Result<std::optional<std::string>> ReadPem(const std::string& path) {
  return registry::ReadFileIfExists(path, kMaxPemFileBytes);
}

}  // namespace

// ---- key and CSR (client side) ----

Result<KeyAndCsr> GenerateKeyAndCsr(const std::string& common_name) {
  ERR_clear_error();
  auto key = NewP256Key();
  if (!key.ok()) return key.status();
  X509ReqPtr req(X509_REQ_new());
  if (!req || X509_REQ_set_version(req.get(), 0) != 1) return SslError("X509_REQ_new");
  BP_RETURN_IF_ERROR(
      AddNameEntry(X509_REQ_get_subject_name(req.get()), "CN", common_name.substr(0, 64)));
  if (X509_REQ_set_pubkey(req.get(), key->get()) != 1) return SslError("CSR public key");
  if (X509_REQ_sign(req.get(), key->get(), EVP_sha256()) <= 0) return SslError("signing the CSR");
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509_REQ(bio.get(), req.get()) != 1) return SslError("writing CSR");
  KeyAndCsr out;
  out.csr_pem = BioText(bio.get());
  auto pem = KeyToPem(key->get());
  if (!pem.ok()) return pem.status();
  out.key_pem = std::move(pem).value();
  return out;
}

// ---- names ----

bool ValidDnsName(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  size_t label = 0;
  for (size_t i = 0; i <= name.size(); ++i) {
    if (i == name.size() || name[i] == '.') {
      if (label == 0 || label > 63) return false;
      if (name[i - 1] == '-' || name[i - label] == '-') return false;
      label = 0;
      continue;
    }
    char c = name[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_';
    if (!ok) return false;
    ++label;
  }
  return true;
}

bool IsIpLiteral(std::string_view text) {
  std::string s(text);
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

bool IsGlobalAddress(std::string_view text) {
  std::string s(text);
  unsigned char a[16];
  if (inet_pton(AF_INET, s.c_str(), a) == 1) {
    if (a[0] == 0 || a[0] == 10 || a[0] == 127) return false;
    if (a[0] == 100 && (a[1] & 0xc0) == 64) return false;
    if (a[0] == 169 && a[1] == 254) return false;
    if (a[0] == 172 && (a[1] & 0xf0) == 16) return false;
    if (a[0] == 192 && a[1] == 168) return false;
    return true;
  }
  if (inet_pton(AF_INET6, s.c_str(), a) != 1) return false;
  static const unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::memcmp(a, kMapped, 12) == 0) {
    char v4[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, a + 12, v4, sizeof(v4));
    return IsGlobalAddress(v4);
  }
  static const unsigned char kZero[15] = {};
  if (std::memcmp(a, kZero, 15) == 0 && (a[15] == 0 || a[15] == 1)) return false;  // :: and ::1
  if ((a[0] & 0xfe) == 0xfc) return false;                                         // fc00::/7
  if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) return false;                         // fe80::/10
  return true;
}

LeafProfile JobLeafProfile(const std::string& job_id, const std::string& domain,
                           const std::string& host, const std::vector<std::string>& host_addresses,
                           int days) {
  LeafProfile p;
  std::string own = Lower(job_id + "." + domain);
  p.common_name = own.size() <= 64 ? own : job_id;
  p.unit = kJobCertUnit;
  p.days = days;
  auto add_dns = [&p](const std::string& name) {
    std::string n = Lower(name);
    if (ValidDnsName(n) &&
        std::find(p.dns_names.begin(), p.dns_names.end(), n) == p.dns_names.end())
      p.dns_names.push_back(n);
  };
  auto add_ip = [&p](const std::string& ip) {
    if (IsIpLiteral(ip) && !IsGlobalAddress(ip) &&
        std::find(p.ip_addresses.begin(), p.ip_addresses.end(), ip) == p.ip_addresses.end())
      p.ip_addresses.push_back(ip);
  };
  add_dns(own);
  if (IsIpLiteral(host)) {
    add_ip(host);
  } else if (host.find('.') == std::string::npos) {
    // A single-label name ("node7"): meaningful inside the cluster only. Dotted names are left
    // out: under the domain they are other jobs' names (save ssl --host other.<domain>), and
    // elsewhere they may be anyone's (save ssl --host www.example.org).
    add_dns(host);
  }
  for (const std::string& a : host_addresses) add_ip(a);
  return p;
}

// ---- the CA ----

Result<std::unique_ptr<CertificateAuthority>> CertificateAuthority::Create(
    const std::string& common_name) {
  ERR_clear_error();
  auto key = NewP256Key();
  if (!key.ok()) return key.status();
  X509Ptr cert(X509_new());
  if (!cert) return SslError("X509_new");
  BP_RETURN_IF_ERROR(FillCommon(cert.get(), key->get(), common_name, "", kCaDays));
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get())) != 1) {
    return SslError("CA issuer");
  }
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
  BP_RETURN_IF_ERROR(
      AddExtension(cert.get(), &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_key_usage, "critical,keyCertSign,cRLSign"));
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_subject_key_identifier, "hash"));
  if (X509_sign(cert.get(), key->get(), EVP_sha256()) <= 0) return SslError("signing the CA");
  auto cert_pem = CertificateToPem(cert.get());
  if (!cert_pem.ok()) return cert_pem.status();
  auto key_pem = KeyToPem(key->get());
  if (!key_pem.ok()) return key_pem.status();
  std::unique_ptr<CertificateAuthority> ca(new CertificateAuthority());
  ca->cert_ = std::move(cert);
  ca->key_ = std::move(key).value();
  ca->cert_pem_ = std::move(cert_pem).value();
  ca->key_pem_ = std::move(key_pem).value();
  return ca;
}

Result<std::unique_ptr<CertificateAuthority>> CertificateAuthority::FromPem(
    const std::string& cert_pem, const std::string& key_pem) {
  auto cert = ParseCertificatePem(cert_pem);
  if (!cert.ok()) return cert.status();
  auto key = ParsePrivateKeyPem(key_pem);
  if (!key.ok()) return key.status();
  ERR_clear_error();
  if (X509_check_private_key(cert->get(), key->get()) != 1) {
    return SslError("the CA key does not match the CA certificate");
  }
  if (X509_check_ca(cert->get()) < 1) {
    return Status::InvalidArgument("the CA certificate is not a CA (basicConstraints CA:TRUE)");
  }
  if (SecondsLeft(cert->get()) <= 0) return Status::InvalidArgument("the CA certificate expired");
  std::unique_ptr<CertificateAuthority> ca(new CertificateAuthority());
  ca->cert_ = std::move(cert).value();
  ca->key_ = std::move(key).value();
  ca->cert_pem_ = cert_pem;
  ca->key_pem_ = key_pem;
  return ca;
}

Result<std::unique_ptr<CertificateAuthority>> CertificateAuthority::LoadOrCreate(
    const std::string& cert_path, const std::string& key_path) {
  auto cert_text = ReadPem(cert_path);
  if (!cert_text.ok()) return cert_text.status();
  auto key_text = ReadPem(key_path);
  if (!key_text.ok()) return key_text.status();
  if (key_text->has_value() && !cert_text->has_value()) {
    // A crash between the two writes of a new CA (below) leaves the key alone, and the key file
    // also carries the certificate: restore it.
    const std::string& key_file = **key_text;
    size_t at = key_file.find("-----BEGIN CERTIFICATE-----");
    if (at != std::string::npos) {
      auto ca = FromPem(key_file.substr(at), key_file);
      if (ca.ok()) {
        BP_RETURN_IF_ERROR(WriteNewFile(cert_path, (*ca)->cert_pem(), 0644));
        LOG_WARN("restored the CA certificate %s from the copy in %s", cert_path.c_str(),
                 key_path.c_str());
        return ca;
      }
    }
  }
  if (cert_text->has_value() != key_text->has_value()) {
    const std::string& found = cert_text->has_value() ? cert_path : key_path;
    const std::string& missing = cert_text->has_value() ? key_path : cert_path;
    return Status::InvalidArgument("found the CA file " + found + " but not " + missing +
                                   "; restore it, or remove both to create a new CA");
  }
  if (cert_text->has_value()) {
    struct stat st {};
    if (stat(key_path.c_str(), &st) == 0 && (st.st_mode & 0077) != 0) {
      LOG_WARN("the CA key %s is accessible by other users (mode %03o); chmod 600 it",
               key_path.c_str(), static_cast<unsigned>(st.st_mode & 0777));
    }
    auto ca = FromPem(**cert_text, **key_text);
    if (!ca.ok()) return ca.status().WithContext(cert_path + " / " + key_path);
    return ca;
  }
  auto ca = Create("brokerproxy CA on " + HostName());
  if (!ca.ok()) return ca.status();
  // The key file first, with a copy of the certificate behind the key: a crash before the
  // certificate file is written never leaves a key whose certificate is lost.
  BP_RETURN_IF_ERROR(WriteNewFile(key_path, (*ca)->key_pem() + (*ca)->cert_pem(), 0600));
  Status s = WriteNewFile(cert_path, (*ca)->cert_pem(), 0644);
  if (!s.ok()) {
    ::unlink(key_path.c_str());  // never leave a key without its certificate
    return s;
  }
  LOG_INFO("created a new TLS certificate authority: %s (key %s)", cert_path.c_str(),
           key_path.c_str());
  return ca;
}

Result<std::string> CertificateAuthority::Sign(EVP_PKEY* subject_key,
                                               const LeafProfile& profile) const {
  if (profile.days < 1) return Status::InvalidArgument("certificate validity must be >= 1 day");
  X509Ptr cert(X509_new());
  if (!cert) return SslError("X509_new");
  BP_RETURN_IF_ERROR(
      FillCommon(cert.get(), subject_key, profile.common_name, profile.unit, profile.days));
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(cert_.get())) != 1) {
    return SslError("certificate issuer");
  }
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, cert_.get(), cert.get(), nullptr, nullptr, 0);
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_basic_constraints, "critical,CA:FALSE"));
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_key_usage, "critical,digitalSignature"));
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_ext_key_usage, "serverAuth"));
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_subject_key_identifier, "hash"));
  BP_RETURN_IF_ERROR(AddExtension(cert.get(), &ctx, NID_authority_key_identifier, "keyid:always"));
  BP_RETURN_IF_ERROR(AddSubjectAltNames(cert.get(), profile));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (X509_sign(cert.get(), key_.get(), EVP_sha256()) <= 0) {
      return SslError("signing the certificate");
    }
  }
  return CertificateToPem(cert.get());
}

Result<std::string> CertificateAuthority::IssueFromCsr(std::string_view csr_pem,
                                                       const LeafProfile& profile) const {
  ERR_clear_error();
  if (csr_pem.size() > kMaxCsrBytes) {
    return Status::InvalidArgument("CSR longer than " + std::to_string(kMaxCsrBytes) + " bytes");
  }
  BioPtr bio(BIO_new_mem_buf(csr_pem.data(), static_cast<int>(csr_pem.size())));
  X509ReqPtr req(bio ? PEM_read_bio_X509_REQ(bio.get(), nullptr, NoPassword, nullptr) : nullptr);
  if (!req) {
    ERR_clear_error();
    return Status::InvalidArgument("CSR: not a PEM certificate signing request");
  }
  EVP_PKEY* key = X509_REQ_get0_pubkey(req.get());
  if (!key) {
    ERR_clear_error();
    return Status::InvalidArgument("CSR: no public key");
  }
  // Proof of possession: the requester signed the CSR with the private key of this public key.
  if (X509_REQ_verify(req.get(), key) != 1) {
    ERR_clear_error();
    return Status::InvalidArgument("CSR: the signature does not verify");
  }
  BP_RETURN_IF_ERROR(CheckCsrKey(key));
  return Sign(key, profile);
}

Result<KeyAndCert> CertificateAuthority::IssueWithNewKey(const LeafProfile& profile) const {
  ERR_clear_error();
  auto key = NewP256Key();
  if (!key.ok()) return key.status();
  auto cert = Sign(key->get(), profile);
  if (!cert.ok()) return cert.status();
  auto key_pem = KeyToPem(key->get());
  if (!key_pem.ok()) return key_pem.status();
  return KeyAndCert{std::move(key_pem).value(), std::move(cert).value()};
}

std::string CertificateAuthority::Fingerprint() const {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert_.get(), EVP_sha256(), md, &len) != 1) return "";
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += kHex[md[i] >> 4];
    out += kHex[md[i] & 15];
  }
  return out;
}

// ---- the proxy's certificate ----

Result<KeyAndCert> LoadOrIssueServerCert(const CertificateAuthority& ca,
                                         const std::string& cert_path, const std::string& key_path,
                                         const LeafProfile& profile, int min_days_left,
                                         bool* reissued) {
  *reissued = false;
  auto cert_text = ReadPem(cert_path);
  if (!cert_text.ok()) return cert_text.status();
  auto key_text = ReadPem(key_path);
  if (!key_text.ok()) return key_text.status();
  if (cert_text->has_value() && key_text->has_value()) {
    auto cert = ParseCertificatePem(**cert_text);
    auto key = ParsePrivateKeyPem(**key_text);
    ERR_clear_error();
    bool usable = cert.ok() && key.ok() && X509_check_private_key(cert->get(), key->get()) == 1 &&
                  VerifyAgainstCa(cert->get(), ca.cert()).ok() && IsProxyCertificate(cert->get()) &&
                  SecondsLeft(cert->get()) > int64_t{min_days_left} * 86400;
    if (usable) {
      auto names = SubjectAltNames(cert->get());
      std::set<std::string> have;
      for (const auto& n : names) have.insert(Lower(n));
      usable = have == ProfileNames(profile);
    }
    ERR_clear_error();
    if (usable) return KeyAndCert{**key_text, **cert_text};
  }
  auto issued = ca.IssueWithNewKey(profile);
  if (!issued.ok()) return issued.status();
  BP_RETURN_IF_ERROR(WriteNewFile(key_path, issued->key_pem, 0600));
  BP_RETURN_IF_ERROR(WriteNewFile(cert_path, issued->cert_pem, 0644));
  *reissued = true;
  return issued;
}

// ---- inspection ----

std::vector<std::string> SubjectAltNames(X509* cert) {
  std::vector<std::string> out;
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (!names) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names, i);
    if (gn->type == GEN_DNS) {
      const ASN1_STRING* s = gn->d.dNSName;
      out.push_back("DNS:" + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                         ASN1_STRING_length(s)));
    } else if (gn->type == GEN_IPADD) {
      const ASN1_STRING* s = gn->d.iPAddress;
      char text[INET6_ADDRSTRLEN] = "?";
      int len = ASN1_STRING_length(s);
      if (len == 4 || len == 16) {
        inet_ntop(len == 4 ? AF_INET : AF_INET6, ASN1_STRING_get0_data(s), text, sizeof(text));
      }
      out.push_back(std::string("IP:") + text);
    }
  }
  GENERAL_NAMES_free(names);
  return out;
}

std::string SubjectUnit(X509* cert) {
  X509_NAME* name = X509_get_subject_name(cert);
  int at = X509_NAME_get_index_by_NID(name, NID_organizationalUnitName, -1);
  if (at < 0) return "";
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, at));
  unsigned char* utf8 = nullptr;
  int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len < 0) return "";
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(len));
  OPENSSL_free(utf8);
  return out;
}

bool IsProxyCertificate(X509* cert) { return SubjectUnit(cert) == kProxyCertUnit; }

int64_t SecondsLeft(X509* cert) {
  int days = 0, secs = 0;
  if (ASN1_TIME_diff(&days, &secs, nullptr, X509_get0_notAfter(cert)) != 1) return -1;
  return int64_t{days} * 86400 + secs;
}

Status VerifyAgainstCa(X509* leaf, X509* ca) {
  ERR_clear_error();
  X509_STORE* store = X509_STORE_new();
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  Status result;
  if (!store || !ctx || X509_STORE_add_cert(store, ca) != 1 ||
      X509_STORE_CTX_init(ctx, store, leaf, nullptr) != 1) {
    result = SslError("setting up verification");
  } else {
    X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_SERVER);
    if (X509_verify_cert(ctx) != 1) {
      result =
          Status::PermissionDenied(std::string("certificate does not verify: ") +
                                   X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
    }
  }
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  ERR_clear_error();
  return result;
}

Status WriteNewFile(const std::string& path, std::string_view data, mode_t mode) {
  unsigned char rnd[6];
  if (RAND_bytes(rnd, sizeof(rnd)) != 1) return SslError("random file name");
  std::string tmp = path + ".tmp-";
  static const char kHex[] = "0123456789abcdef";
  for (unsigned char b : rnd) {
    tmp += kHex[b >> 4];
    tmp += kHex[b & 15];
  }
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd < 0) return PosixError("cannot create " + tmp, errno);
  Status status;
  if (::fchmod(fd, mode) != 0) status = PosixError("cannot chmod " + tmp, errno);  // umask
  size_t off = 0;
  while (status.ok() && off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      status = PosixError("cannot write " + tmp, errno);
      break;
    }
    off += static_cast<size_t>(n);
  }
  if (status.ok() && ::fsync(fd) != 0) status = PosixError("cannot sync " + tmp, errno);
  if (::close(fd) != 0 && status.ok()) status = PosixError("cannot close " + tmp, errno);
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = PosixError("cannot rename " + tmp + " to " + path, errno);
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  int dir = ::open(DirName(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
  return Status::OK();
}

}  // namespace brokerproxy::proxy
