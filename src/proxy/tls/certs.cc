#include "proxy/tls/certs.h"

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

#include "loop/file.h"
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

Result<ASN1_OCTET_STRING*> IpOctets(const std::string& ip, bool with_mask) {
  unsigned char buf[32];
  size_t len = 0;
  if (inet_pton(AF_INET, ip.c_str(), buf) == 1) {
    len = 4;
  } else if (inet_pton(AF_INET6, ip.c_str(), buf) == 1) {
    len = 16;
  } else {
    return Status::InvalidArgument("not an IP address: " + ip);
  }
  if (with_mask) {
    std::memset(buf + len, 0xff, len);  // exactly this address
    len *= 2;
  }
  ASN1_OCTET_STRING* octets = ASN1_OCTET_STRING_new();
  if (!octets || ASN1_OCTET_STRING_set(octets, buf, static_cast<int>(len)) != 1) {
    ASN1_OCTET_STRING_free(octets);
    return SslError("building an IP name");
  }
  return octets;
}

// nameConstraints with permitted subtrees only, built from GENERAL_NAME objects, critical (RFC
// 5280 requires it, and a client that does not understand it must then refuse the CA).
Status AddNameConstraints(X509* cert, const CaConstraints& c) {
  if (c.empty()) return Status::OK();
  NAME_CONSTRAINTS* nc = NAME_CONSTRAINTS_new();
  if (!nc) return SslError("allocating nameConstraints");
  auto free_nc = [](NAME_CONSTRAINTS* n) { NAME_CONSTRAINTS_free(n); };
  std::unique_ptr<NAME_CONSTRAINTS, decltype(free_nc)> owner(nc, free_nc);
  nc->permittedSubtrees = sk_GENERAL_SUBTREE_new_null();
  if (!nc->permittedSubtrees) return SslError("allocating nameConstraints");
  auto push = [nc](GENERAL_NAME* gn) -> Status {
    GENERAL_SUBTREE* st = GENERAL_SUBTREE_new();
    if (!st) {
      GENERAL_NAME_free(gn);
      return SslError("building nameConstraints");
    }
    GENERAL_NAME_free(st->base);
    st->base = gn;
    if (sk_GENERAL_SUBTREE_push(nc->permittedSubtrees, st) <= 0) {
      GENERAL_SUBTREE_free(st);
      return SslError("building nameConstraints");
    }
    return Status::OK();
  };
  for (const std::string& dns : c.dns) {
    std::string_view bare = dns;
    if (bare.starts_with('.')) bare.remove_prefix(1);
    if (!ValidDnsName(bare)) return Status::InvalidArgument("not a valid DNS name: " + dns);
    ASN1_IA5STRING* ia5 = ASN1_IA5STRING_new();
    GENERAL_NAME* gn = GENERAL_NAME_new();
    if (!ia5 || !gn || ASN1_STRING_set(ia5, dns.data(), static_cast<int>(dns.size())) != 1) {
      ASN1_IA5STRING_free(ia5);
      GENERAL_NAME_free(gn);
      return SslError("building a DNS name");
    }
    GENERAL_NAME_set0_value(gn, GEN_DNS, ia5);
    BP_RETURN_IF_ERROR(push(gn));
  }
  for (const std::string& ip : c.ips) {
    auto octets = IpOctets(ip, /*with_mask=*/true);
    if (!octets.ok()) return octets.status();
    GENERAL_NAME* gn = GENERAL_NAME_new();
    if (!gn) {
      ASN1_OCTET_STRING_free(*octets);
      return SslError("building an IP name");
    }
    GENERAL_NAME_set0_value(gn, GEN_IPADD, *octets);
    BP_RETURN_IF_ERROR(push(gn));
  }
  if (X509_add1_ext_i2d(cert, NID_name_constraints, nc, 1, X509V3_ADD_DEFAULT) != 1) {
    return SslError("adding nameConstraints");
  }
  return Status::OK();
}

// A permitted subtree: a DNS base (lower case) or an IP address + mask.
struct Subtree {
  int type = GEN_DNS;
  std::string value;
};

std::optional<std::vector<Subtree>> ReadSubtrees(X509* ca) {
  auto* nc =
      static_cast<NAME_CONSTRAINTS*>(X509_get_ext_d2i(ca, NID_name_constraints, nullptr, nullptr));
  if (!nc) {
    ERR_clear_error();
    return std::nullopt;
  }
  std::vector<Subtree> out;
  for (int i = 0; i < sk_GENERAL_SUBTREE_num(nc->permittedSubtrees); ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_SUBTREE_value(nc->permittedSubtrees, i)->base;
    if (gn->type != GEN_DNS && gn->type != GEN_IPADD) continue;
    const ASN1_STRING* s = gn->type == GEN_DNS ? gn->d.dNSName : gn->d.iPAddress;
    std::string value(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                      static_cast<size_t>(ASN1_STRING_length(s)));
    out.push_back({gn->type, gn->type == GEN_DNS ? Lower(value) : value});
  }
  NAME_CONSTRAINTS_free(nc);
  if (out.empty()) return std::nullopt;
  return out;
}

// RFC 5280 / OpenSSL's rule: `base` permits `name` if equal, or if `name` ends with `base` and
// either `base` starts with '.' or the character before the match is one.
bool DnsPermits(std::string_view base, std::string_view name) {
  if (name.size() < base.size() || !name.ends_with(base)) return false;
  if (name.size() == base.size()) return true;
  return base.starts_with('.') || name[name.size() - base.size() - 1] == '.';
}

bool IpPermits(const std::string& base, const std::string& address) {
  if (base.size() != 2 * address.size()) return false;
  for (size_t i = 0; i < address.size(); ++i) {
    unsigned char mask = static_cast<unsigned char>(base[address.size() + i]);
    if ((static_cast<unsigned char>(base[i]) & mask) !=
        (static_cast<unsigned char>(address[i]) & mask)) {
      return false;
    }
  }
  return true;
}

std::string Hex(std::string_view bytes) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (char c : bytes) {
    auto b = static_cast<unsigned char>(c);
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
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

// The fields every certificate shares: version 3, serial, validity (from `now` backdated,
// for `valid_seconds`), subject, public key.
Status FillCommon(X509* cert, EVP_PKEY* subject_key, const std::string& common_name,
                  const std::string& unit, int64_t now, int64_t valid_seconds) {
  if (X509_set_version(cert, 2) != 1) return SslError("certificate version");
  BP_RETURN_IF_ERROR(SetRandomSerial(cert));
  time_t t = static_cast<time_t>(now);
  if (!X509_time_adj_ex(X509_getm_notBefore(cert), 0, -kBackdateSeconds, &t) ||
      !X509_time_adj_ex(X509_getm_notAfter(cert), 0, static_cast<long>(valid_seconds), &t)) {
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

LeafProfile JobLeafProfile(const std::string& job_id, const std::string& domain, int days) {
  LeafProfile p;
  std::string own = Lower(job_id + "." + domain);
  p.common_name = own.size() <= 64 ? own : Lower(job_id);
  p.unit = kJobCertUnit;
  p.days = days;
  p.dns_names.push_back(own);  // Sign() refuses it if it is no DNS name ("a..b", "-x")
  return p;
}

// ---- the CA ----

Result<std::unique_ptr<CertificateAuthority>> CertificateAuthority::Create(
    const std::string& common_name, const CaConstraints& constraints, int64_t now, int days) {
  ERR_clear_error();
  if (now < 0) now = static_cast<int64_t>(::time(nullptr));
  auto key = NewP256Key();
  if (!key.ok()) return key.status();
  X509Ptr cert(X509_new());
  if (!cert) return SslError("X509_new");
  BP_RETURN_IF_ERROR(
      FillCommon(cert.get(), key->get(), common_name, "", now, int64_t{days} * 86400));
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
  BP_RETURN_IF_ERROR(AddNameConstraints(cert.get(), constraints));
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

Result<std::string> CertificateAuthority::Sign(EVP_PKEY* subject_key,
                                               const LeafProfile& profile) const {
  if (profile.days < 1) return Status::InvalidArgument("certificate validity must be >= 1 day");
  int64_t now = static_cast<int64_t>(::time(nullptr));
  int64_t ca_left = SecondsLeftAt(cert_.get(), now);
  if (ca_left <= kBackdateSeconds) return Status::Unavailable("the CA has expired");
  // Never beyond the CA: a client would reject the chain before the leaf expires.
  int64_t valid = std::min<int64_t>(int64_t{profile.days} * 86400, ca_left);
  X509Ptr cert(X509_new());
  if (!cert) return SslError("X509_new");
  BP_RETURN_IF_ERROR(
      FillCommon(cert.get(), subject_key, profile.common_name, profile.unit, now, valid));
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

std::string CertificateAuthority::Fingerprint() const { return CertificateSha256(cert_.get()); }

// ---- the set of CAs ----

namespace {

Result<std::vector<X509Ptr>> ParseBundle(const std::string& pem) {
  std::vector<X509Ptr> out;
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return SslError("reading certificates");
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, NoPassword, nullptr)) {
    out.emplace_back(cert);
  }
  ERR_clear_error();  // the end of the input
  if (out.empty()) return Status::InvalidArgument("no certificate in it");
  return out;
}

}  // namespace

Result<std::unique_ptr<CaSet>> CaSet::LoadOrCreate(Options options, int64_t now) {
  std::unique_ptr<CaSet> set(new CaSet(options));
  if (!options.cert_path.empty()) {
    const std::string& cert_path = options.cert_path;
    const std::string& key_path = options.key_path;
    auto cert_text = ReadPem(cert_path);
    if (!cert_text.ok()) return cert_text.status();
    auto key_text = ReadPem(key_path);
    if (!key_text.ok()) return key_text.status();
    if (key_text->has_value() && !cert_text->has_value()) {
      // A crash between the two writes of the first CA (Maintain) leaves the key alone, and
      // the key file also carries the certificate: restore it.
      size_t at = (*key_text)->find("-----BEGIN CERTIFICATE-----");
      if (at != std::string::npos) {
        std::string copy = (*key_text)->substr(at);
        BP_RETURN_IF_ERROR(loop::WriteFileAtomic(cert_path, copy, 0644));
        LOG_WARN("restored the CA certificate %s from the copy in %s", cert_path.c_str(),
                 key_path.c_str());
        *cert_text = std::move(copy);
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
      const std::string where = cert_path + " / " + key_path;
      auto bundle = ParseBundle(**cert_text);
      if (!bundle.ok()) return bundle.status().WithContext(where);
      auto key = ParsePrivateKeyPem(**key_text);
      if (!key.ok()) return key.status().WithContext(where);
      // The key's certificate is the current CA; a write cut short by a crash may have left
      // a newer certificate first whose key never landed: it stays a mere bundle member.
      bool found = false;
      for (X509Ptr& cert : *bundle) {
        auto pem = CertificateToPem(cert.get());
        if (!pem.ok()) return pem.status();
        ERR_clear_error();
        if (!found && X509_check_private_key(cert.get(), key->get()) == 1) {
          found = true;
          if (SecondsLeftAt(cert.get(), now) <= 0) {
            LOG_WARN("the TLS CA in %s has expired; a new one replaces it", cert_path.c_str());
            continue;
          }
          auto ca = CertificateAuthority::FromPem(*pem, **key_text);
          if (!ca.ok()) return ca.status().WithContext(where);
          set->current_ = std::move(ca).value();
          continue;
        }
        // Unconstrained or expired older CAs are not trusted any longer.
        if (PermittedSubtrees(cert.get()) && SecondsLeftAt(cert.get(), now) > 0) {
          set->older_pem_.push_back(std::move(pem).value());
        }
      }
      ERR_clear_error();
      if (!found) {
        return Status::InvalidArgument(where +
                                       ": the CA key does not match the CA certificate; restore "
                                       "the pair, or remove both to create a new CA");
      }
    }
  }
  auto maintained = set->Maintain(now, options.constraints);
  if (!maintained.ok()) return maintained.status();
  return set;
}

Result<bool> CaSet::Maintain(int64_t now, const CaConstraints& constraints) {
  std::shared_ptr<const CertificateAuthority> current;
  std::vector<std::string> older;
  {
    std::lock_guard<std::mutex> lock(mu_);
    current = current_;
    older = older_pem_;
  }
  const bool had_current = current != nullptr;
  std::string reason;
  bool keep_old = true;
  if (!current) {
    reason = "no CA yet";
  } else if (!PermittedSubtrees(current->cert())) {
    // It could vouch for any name: it leaves the bundle at once.
    reason = "the CA has no name constraints; clients that trust it must fetch the new one";
    keep_old = false;
  } else if (!PermitsAll(current->cert(), constraints)) {
    reason = "the CA's name constraints do not cover the TLS domain and the proxy's names";
  } else if (SecondsLeftAt(current->cert(), now) <
             int64_t{options_.cert_days + kCaRenewMarginDays} * 86400) {
    reason =
        "the CA expires in less than cert_days + " + std::to_string(kCaRenewMarginDays) + " days";
  }
  size_t before = older.size();
  std::erase_if(older, [now](const std::string& pem) {
    auto cert = ParseCertificatePem(pem);
    return !cert.ok() || SecondsLeftAt(cert->get(), now) <= 0;
  });
  bool changed = older.size() != before;
  if (reason.empty() && !changed) return false;
  if (!reason.empty()) {
    auto made = CertificateAuthority::Create(options_.common_name, constraints, now);
    if (!made.ok()) return made.status();
    if (current && keep_old) older.insert(older.begin(), current->cert_pem());
    // Bounded, should the proxy's names keep changing: the oldest go first.
    while (older.size() >= kMaxBundleCas) {
      LOG_WARN("dropping the oldest TLS CA from the bundle: it holds at most %zu", kMaxBundleCas);
      older.pop_back();
    }
    if (current && keep_old) {
      LOG_INFO("replacing the TLS CA (SHA-256 %s): %s; it stays in the CA bundle until it expires",
               current->Fingerprint().c_str(), reason.c_str());
    } else if (current) {
      LOG_WARN("replacing the TLS CA (SHA-256 %s): %s", current->Fingerprint().c_str(),
               reason.c_str());
    }
    current = std::move(made).value();
  }
  if (!options_.cert_path.empty()) {
    std::string bundle = current->cert_pem();
    for (const std::string& pem : older) bundle += pem;
    const bool first = !had_current;
    // The first CA: its key first, followed by a copy of its certificate, so a crash before
    // the bundle is written leaves a key whose certificate LoadOrCreate restores. A new CA: the
    // bundle first, so a crash before the key lands leaves the old key, which still finds its
    // certificate in the new bundle.
    if (first) {
      BP_RETURN_IF_ERROR(
          loop::WriteFileAtomic(options_.key_path, current->key_pem() + current->cert_pem(), 0600));
    }
    Status s = loop::WriteFileAtomic(options_.cert_path, bundle, 0644);
    if (!s.ok()) {
      if (first) ::unlink(options_.key_path.c_str());
      return s;
    }
    if (!first && !reason.empty()) {
      BP_RETURN_IF_ERROR(loop::WriteFileAtomic(options_.key_path, current->key_pem(), 0600));
    }
  }
  if (!reason.empty()) {
    LOG_INFO("created a new TLS certificate authority (SHA-256 %s)%s%s; the bundle has %zu CA(s)",
             current->Fingerprint().c_str(), options_.cert_path.empty() ? "" : ": ",
             options_.cert_path.c_str(), older.size() + 1);
  }
  std::lock_guard<std::mutex> lock(mu_);
  current_ = std::move(current);
  older_pem_ = std::move(older);
  return !reason.empty();
}

std::shared_ptr<const CertificateAuthority> CaSet::current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

std::string CaSet::bundle_pem() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out = current_ ? current_->cert_pem() : "";
  for (const std::string& pem : older_pem_) out += pem;
  return out;
}

size_t CaSet::bundle_size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return (current_ ? 1 : 0) + older_pem_.size();
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
  BP_RETURN_IF_ERROR(loop::WriteFileAtomic(key_path, issued->key_pem, 0600));
  BP_RETURN_IF_ERROR(loop::WriteFileAtomic(cert_path, issued->cert_pem, 0644));
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

std::string CertificateSha256(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &len) != 1) return "";
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += kHex[md[i] >> 4];
    out += kHex[md[i] & 15];
  }
  return out;
}

bool IsProxyCertificate(X509* cert) { return SubjectUnit(cert) == kProxyCertUnit; }

int64_t SecondsLeft(X509* cert) {
  return SecondsLeftAt(cert, static_cast<int64_t>(::time(nullptr)));
}

int64_t SecondsLeftAt(X509* cert, int64_t now) {
  ASN1_TIME* at = ASN1_TIME_set(nullptr, static_cast<time_t>(now));
  if (!at) return -1;
  int days = 0, secs = 0;
  int ok = ASN1_TIME_diff(&days, &secs, at, X509_get0_notAfter(cert));
  ASN1_TIME_free(at);
  if (ok != 1) return -1;
  return int64_t{days} * 86400 + secs;
}

std::optional<std::vector<std::string>> PermittedSubtrees(X509* ca) {
  auto subtrees = ReadSubtrees(ca);
  if (!subtrees) return std::nullopt;
  std::vector<std::string> out;
  for (const Subtree& t : *subtrees) {
    if (t.type == GEN_DNS) {
      out.push_back("DNS:" + t.value);
    } else {
      std::string_view v = t.value;
      out.push_back("IP:" + Hex(v.substr(0, v.size() / 2)) + "/" + Hex(v.substr(v.size() / 2)));
    }
  }
  return out;
}

bool PermitsAll(X509* ca, const CaConstraints& want) {
  auto subtrees = ReadSubtrees(ca);
  if (!subtrees) return false;
  for (const std::string& dns : want.dns) {
    std::string name = Lower(dns);
    bool ok = std::any_of(subtrees->begin(), subtrees->end(), [&](const Subtree& t) {
      return t.type == GEN_DNS && DnsPermits(t.value, name);
    });
    if (!ok) return false;
  }
  for (const std::string& ip : want.ips) {
    auto octets = IpOctets(ip, /*with_mask=*/false);
    if (!octets.ok()) return false;
    std::string address(reinterpret_cast<const char*>(ASN1_STRING_get0_data(*octets)),
                        static_cast<size_t>(ASN1_STRING_length(*octets)));
    ASN1_OCTET_STRING_free(*octets);
    bool ok = std::any_of(subtrees->begin(), subtrees->end(), [&](const Subtree& t) {
      return t.type == GEN_IPADD && IpPermits(t.value, address);
    });
    if (!ok) return false;
  }
  return true;
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

}  // namespace brokerproxy::proxy
