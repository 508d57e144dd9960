// The broker CA and the certificates it issues: chains, names, validity, key files, restarts.

#include "proxy/certs.h"

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <algorithm>

#include "e2e/harness.h"

namespace brokerproxy::proxy {
namespace {

using brokerproxy::testing::ReadFile;
using brokerproxy::testing::TempDir;
using brokerproxy::testing::WriteFile;

mode_t ModeOf(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return 0;
  return st.st_mode & 07777;
}

std::vector<std::string> Sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// A CSR whose requester asks for names of its own choosing (which must be ignored).
std::string CsrAskingFor(const std::string& san, EVP_PKEY** key_out) {
  EVP_PKEY* key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  X509_REQ* req = X509_REQ_new();
  X509_NAME_add_entry_by_txt(X509_REQ_get_subject_name(req), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("other.localhost"), -1, -1, 0);
  X509_REQ_set_pubkey(req, key);
  STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
  sk_X509_EXTENSION_push(exts,
                         X509V3_EXT_conf_nid(nullptr, nullptr, NID_subject_alt_name, san.c_str()));
  X509_REQ_add_extensions(req, exts);
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  X509_REQ_sign(req, key, EVP_sha256());
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509_REQ(bio, req);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  X509_REQ_free(req);
  if (key_out) {
    *key_out = key;
  } else {
    EVP_PKEY_free(key);
  }
  return pem;
}

class CertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ca = CertificateAuthority::Create("test CA");
    ASSERT_TRUE(ca.ok()) << ca.status().ToString();
    ca_ = std::move(ca).value();
  }
  std::unique_ptr<CertificateAuthority> ca_;
};

TEST_F(CertsTest, CaProfile) {
  X509* ca = ca_->cert();
  EXPECT_EQ(X509_check_ca(ca), 1);
  EXPECT_EQ(X509_verify(ca, X509_get0_pubkey(ca)), 1);  // self-signed
  EXPECT_EQ(X509_check_issued(ca, ca), X509_V_OK);
  BASIC_CONSTRAINTS* bc = static_cast<BASIC_CONSTRAINTS*>(
      X509_get_ext_d2i(ca, NID_basic_constraints, nullptr, nullptr));
  ASSERT_TRUE(bc);
  EXPECT_TRUE(bc->ca);
  EXPECT_EQ(ASN1_INTEGER_get(bc->pathlen), 0);
  BASIC_CONSTRAINTS_free(bc);
  EXPECT_TRUE(X509_get_key_usage(ca) & KU_KEY_CERT_SIGN);
  EXPECT_NE(X509_get0_subject_key_id(ca), nullptr);
  EXPECT_GT(SecondsLeft(ca), int64_t{kCaDays - 1} * 86400);
  EXPECT_EQ(EVP_PKEY_get_base_id(X509_get0_pubkey(ca)), EVP_PKEY_EC);
  EXPECT_EQ(ca_->Fingerprint().size(), 64u);
}

TEST_F(CertsTest, IssuesFromCsrWithOnlyTheBrokersNames) {
  auto key = GenerateKeyAndCsr("job7");
  ASSERT_TRUE(key.ok()) << key.status().ToString();
  LeafProfile profile = JobLeafProfile("job7", "localhost", "node7", {"10.1.2.3", "::1"}, 30);
  auto pem = ca_->IssueFromCsr(key->csr_pem, profile);
  ASSERT_TRUE(pem.ok()) << pem.status().ToString();
  auto cert = ParseCertificatePem(*pem);
  ASSERT_TRUE(cert.ok());
  EXPECT_TRUE(VerifyAgainstCa(cert->get(), ca_->cert()).ok());
  EXPECT_EQ(Sorted(SubjectAltNames(cert->get())),
            Sorted({"DNS:job7.localhost", "DNS:node7", "IP:10.1.2.3", "IP:::1"}));
  EXPECT_EQ(X509_check_host(cert->get(), "job7.localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_host(cert->get(), "job8.localhost", 0, 0, nullptr), 0);
  EXPECT_EQ(SubjectUnit(cert->get()), kJobCertUnit);
  EXPECT_FALSE(IsProxyCertificate(cert->get()));
  // Validity: 30 days from now, backdated a few minutes.
  int64_t left = SecondsLeft(cert->get());
  EXPECT_GT(left, 30 * 86400 - 120);
  EXPECT_LE(left, 30 * 86400);
  int days = 0, secs = 0;
  ASSERT_EQ(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(cert->get()), nullptr), 1);
  EXPECT_GE(days * 86400 + secs, kBackdateSeconds - 60);
  // The leaf profile.
  EXPECT_EQ(X509_check_ca(cert->get()), 0);
  EXPECT_TRUE(X509_get_extended_key_usage(cert->get()) & XKU_SSL_SERVER);
  EXPECT_TRUE(X509_get_key_usage(cert->get()) & KU_DIGITAL_SIGNATURE);
  EXPECT_NE(X509_get0_authority_key_id(cert->get()), nullptr);
  const ASN1_INTEGER* serial = X509_get0_serialNumber(cert->get());
  EXPECT_EQ(serial->length, 16);
  // The certificate belongs to the CSR's key.
  auto priv = ParsePrivateKeyPem(key->key_pem);
  ASSERT_TRUE(priv.ok());
  EXPECT_EQ(X509_check_private_key(cert->get(), priv->get()), 1);
  // Two issues never share a serial.
  auto again = ParseCertificatePem(*ca_->IssueFromCsr(key->csr_pem, profile));
  EXPECT_NE(ASN1_INTEGER_cmp(serial, X509_get0_serialNumber(again->get())), 0);
}

TEST_F(CertsTest, NamesInTheCsrAreIgnored) {
  std::string csr = CsrAskingFor("DNS:victim.localhost,DNS:login.example.org", nullptr);
  auto pem = ca_->IssueFromCsr(csr, JobLeafProfile("mine", "localhost", "127.0.0.1", {}, 10));
  ASSERT_TRUE(pem.ok()) << pem.status().ToString();
  auto cert = ParseCertificatePem(*pem);
  EXPECT_EQ(Sorted(SubjectAltNames(cert->get())), Sorted({"DNS:mine.localhost", "IP:127.0.0.1"}));
}

TEST_F(CertsTest, RefusesBadCsrs) {
  auto key = GenerateKeyAndCsr("j");
  ASSERT_TRUE(key.ok());
  LeafProfile p = JobLeafProfile("j", "localhost", "127.0.0.1", {}, 10);
  // A broken signature: no proof of possession.
  std::string pem = key->csr_pem;
  size_t body = pem.find('\n') + 1;
  size_t end = pem.find("-----END");
  ASSERT_NE(end, std::string::npos);
  std::string tampered = pem;
  char& c = tampered[end - 10];
  c = c == 'A' ? 'B' : 'A';
  auto bad = ca_->IssueFromCsr(tampered, p);
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Status::Code::kInvalidArgument);
  (void)body;
  EXPECT_FALSE(ca_->IssueFromCsr("not a csr", p).ok());
  EXPECT_FALSE(ca_->IssueFromCsr("", p).ok());
  EXPECT_FALSE(ca_->IssueFromCsr(std::string(kMaxCsrBytes + 1, 'x'), p).ok());
  // Ed25519: browsers refuse it, so the broker does too.
  EVP_PKEY* ed = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  X509_REQ* req = X509_REQ_new();
  X509_REQ_set_pubkey(req, ed);
  X509_REQ_sign(req, ed, nullptr);
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509_REQ(bio, req);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  auto ed_cert = ca_->IssueFromCsr(std::string(data, static_cast<size_t>(len)), p);
  EXPECT_FALSE(ed_cert.ok());
  EXPECT_NE(ed_cert.status().message().find("ECDSA"), std::string::npos)
      << ed_cert.status().ToString();
  BIO_free(bio);
  X509_REQ_free(req);
  EVP_PKEY_free(ed);
}

TEST(JobLeafProfileTest, NoNameOfAnotherJobOrOfTheInternet) {
  // Another job's name is never added.
  LeafProfile p = JobLeafProfile("a", "localhost", "b.localhost", {"127.0.0.1"}, 1);
  EXPECT_EQ(p.dns_names, std::vector<std::string>{"a.localhost"});
  EXPECT_EQ(p.ip_addresses, std::vector<std::string>{"127.0.0.1"});
  // Nor a public name or address, which a browser trusting the CA would then accept.
  p = JobLeafProfile("a", "localhost", "www.example.org", {"93.184.216.34", "10.0.0.9"}, 1);
  EXPECT_EQ(p.dns_names, std::vector<std::string>{"a.localhost"});
  EXPECT_EQ(p.ip_addresses, std::vector<std::string>{"10.0.0.9"});
  p = JobLeafProfile("a", "localhost", "8.8.8.8", {"8.8.8.8"}, 1);
  EXPECT_TRUE(p.ip_addresses.empty());
  // Cluster names and private addresses are kept, lower-cased and without duplicates.
  p = JobLeafProfile("12.web", "hpc.example.org", "Node7", {"10.0.0.7", "10.0.0.7", "fd00::7"}, 1);
  EXPECT_EQ(p.dns_names, (std::vector<std::string>{"12.web.hpc.example.org", "node7"}));
  EXPECT_EQ(p.ip_addresses, (std::vector<std::string>{"10.0.0.7", "fd00::7"}));
  EXPECT_EQ(p.unit, kJobCertUnit);
  p = JobLeafProfile("x", "localhost", "::1", {"::1"}, 1);
  EXPECT_EQ(p.ip_addresses, std::vector<std::string>{"::1"});
  EXPECT_EQ(p.dns_names, std::vector<std::string>{"x.localhost"});
}

TEST(IsGlobalAddressTest, PrivateRangesAreNot) {
  for (const char* a :
       {"10.1.2.3", "127.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
        "169.254.1.1", "0.0.0.0", "::1", "::", "fd12::1", "fe80::1", "::ffff:10.0.0.1"}) {
    EXPECT_FALSE(IsGlobalAddress(a)) << a;
  }
  for (const char* a : {"8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1", "::ffff:8.8.8.8"}) {
    EXPECT_TRUE(IsGlobalAddress(a)) << a;
  }
  EXPECT_FALSE(IsGlobalAddress("node7"));
}

TEST(ValidDnsNameTest, Rules) {
  EXPECT_TRUE(ValidDnsName("a.b-c.example"));
  EXPECT_TRUE(ValidDnsName("job_1.localhost"));
  EXPECT_FALSE(ValidDnsName(""));
  EXPECT_FALSE(ValidDnsName("a..b"));
  EXPECT_FALSE(ValidDnsName(".a"));
  EXPECT_FALSE(ValidDnsName("a."));
  EXPECT_FALSE(ValidDnsName("-a.b"));
  EXPECT_FALSE(ValidDnsName("*.b"));
  EXPECT_FALSE(ValidDnsName("a,DNS:evil"));
  EXPECT_FALSE(ValidDnsName(std::string(64, 'a') + ".b"));
}

TEST(CaFilesTest, CreatedOnceKeptAcrossRestartsPrivateKeys) {
  TempDir dir;
  std::string cert = dir / "ca.pem", key = dir / "ca-key.pem";
  auto first = CertificateAuthority::LoadOrCreate(cert, key);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(ModeOf(key), 0600u);
  EXPECT_EQ(ModeOf(cert), 0644u);
  auto second = CertificateAuthority::LoadOrCreate(cert, key);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ((*first)->Fingerprint(), (*second)->Fingerprint());
  EXPECT_EQ((*second)->cert_pem(), ReadFile(cert));

  // One file without the other is refused with both names.
  std::string key_text = ReadFile(key);
  ASSERT_EQ(::unlink(key.c_str()), 0);
  auto half = CertificateAuthority::LoadOrCreate(cert, key);
  ASSERT_FALSE(half.ok());
  EXPECT_NE(half.status().message().find(key), std::string::npos);
  // A key of another CA does not match.
  auto other = CertificateAuthority::Create("other");
  WriteFile(key, (*other)->key_pem(), 0600);
  auto mismatch = CertificateAuthority::LoadOrCreate(cert, key);
  ASSERT_FALSE(mismatch.ok());
  EXPECT_NE(mismatch.status().message().find("does not match"), std::string::npos)
      << mismatch.status().ToString();
  WriteFile(key, key_text, 0600);
  EXPECT_TRUE(CertificateAuthority::LoadOrCreate(cert, key).ok());
}

// A crash after the key file of a new CA was written and before its certificate file was: the
// next start must not refuse what the first left behind, nor lose the key.
TEST(CaFilesTest, KeyWithoutCertificateAfterACrashIsRestored) {
  TempDir dir;
  std::string cert = dir / "ca.pem", key = dir / "ca-key.pem";
  auto first = CertificateAuthority::LoadOrCreate(cert, key);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_EQ(::unlink(cert.c_str()), 0);
  auto again = CertificateAuthority::LoadOrCreate(cert, key);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*first)->Fingerprint(), (*again)->Fingerprint());
  EXPECT_EQ(ReadFile(cert), (*first)->cert_pem());
  EXPECT_EQ(ModeOf(cert), 0644u);
}

TEST(ServerCertTest, ReusedWhileValidReissuedWhenNamesOrCaChange) {
  TempDir dir;
  auto ca = CertificateAuthority::Create("ca");
  ASSERT_TRUE(ca.ok());
  LeafProfile p;
  p.common_name = "login";
  p.unit = kProxyCertUnit;
  p.dns_names = {"login", "localhost"};
  p.ip_addresses = {"127.0.0.1", "::1"};
  p.days = 90;
  std::string cert = dir / "server.pem", key = dir / "server-key.pem";
  bool reissued = false;
  auto a = LoadOrIssueServerCert(**ca, cert, key, p, 30, &reissued);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_TRUE(reissued);
  EXPECT_EQ(ModeOf(key), 0600u);
  auto parsed = ParseCertificatePem(a->cert_pem);
  EXPECT_TRUE(IsProxyCertificate(parsed->get()));
  EXPECT_TRUE(VerifyAgainstCa(parsed->get(), (*ca)->cert()).ok());

  auto b = LoadOrIssueServerCert(**ca, cert, key, p, 30, &reissued);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(reissued);
  EXPECT_EQ(a->cert_pem, b->cert_pem);
  // Fewer than 100 days left of 90: due.
  auto c = LoadOrIssueServerCert(**ca, cert, key, p, 100, &reissued);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(reissued);
  // Another name.
  p.dns_names.push_back("login.example.org");
  ASSERT_TRUE(LoadOrIssueServerCert(**ca, cert, key, p, 30, &reissued).ok());
  EXPECT_TRUE(reissued);
  // Another CA.
  auto other = CertificateAuthority::Create("other");
  ASSERT_TRUE(LoadOrIssueServerCert(**other, cert, key, p, 30, &reissued).ok());
  EXPECT_TRUE(reissued);
}

TEST(WriteNewFileTest, ExactModeAndReplaces) {
  TempDir dir;
  mode_t old = umask(0);
  std::string path = dir / "k.pem";
  ASSERT_TRUE(WriteNewFile(path, "one", 0600).ok());
  EXPECT_EQ(ModeOf(path), 0600u);
  ASSERT_TRUE(WriteNewFile(path, "two", 0600).ok());
  EXPECT_EQ(ReadFile(path), "two");
  umask(old);
  EXPECT_FALSE(WriteNewFile(dir / "missing/k.pem", "x", 0600).ok());
}

}  // namespace
}  // namespace brokerproxy::proxy
