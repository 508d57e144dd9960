// The broker CA and the certificates it issues: chains, names, validity, key files, restarts.

#include "proxy/tls/certs.h"

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
  LeafProfile profile = JobLeafProfile("job7", "localhost", 30);
  auto pem = ca_->IssueFromCsr(key->csr_pem, profile);
  ASSERT_TRUE(pem.ok()) << pem.status().ToString();
  auto cert = ParseCertificatePem(*pem);
  ASSERT_TRUE(cert.ok());
  EXPECT_TRUE(VerifyAgainstCa(cert->get(), ca_->cert()).ok());
  // Exactly one name: the job's own.
  EXPECT_EQ(SubjectAltNames(cert->get()), std::vector<std::string>{"DNS:job7.localhost"});
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
  auto pem = ca_->IssueFromCsr(csr, JobLeafProfile("mine", "localhost", 10));
  ASSERT_TRUE(pem.ok()) << pem.status().ToString();
  auto cert = ParseCertificatePem(*pem);
  EXPECT_EQ(SubjectAltNames(cert->get()), std::vector<std::string>{"DNS:mine.localhost"});
}

TEST_F(CertsTest, RefusesBadCsrs) {
  auto key = GenerateKeyAndCsr("j");
  ASSERT_TRUE(key.ok());
  LeafProfile p = JobLeafProfile("j", "localhost", 10);
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

TEST(JobLeafProfileTest, OnlyTheJobsOwnName) {
  // No backend name or address, however harmless it looks: the id is the only input.
  LeafProfile p = JobLeafProfile("12.web", "hpc.example.org", 1);
  EXPECT_EQ(p.dns_names, std::vector<std::string>{"12.web.hpc.example.org"});
  EXPECT_TRUE(p.ip_addresses.empty());
  EXPECT_EQ(p.unit, kJobCertUnit);
  EXPECT_EQ(p.common_name, "12.web.hpc.example.org");
  // Lower case, as SNI arrives and as the registry spells ids.
  p = JobLeafProfile("ABC", "Broker.Example.org", 1);
  EXPECT_EQ(p.dns_names, std::vector<std::string>{"abc.broker.example.org"});
}

TEST_F(CertsTest, AJobIdThatIsNoDnsLabelGetsNoCertificate) {
  auto key = GenerateKeyAndCsr("x");
  ASSERT_TRUE(key.ok());
  for (const char* id : {"a..b", "-x", "x-", ".x"}) {
    auto pem = ca_->IssueFromCsr(key->csr_pem, JobLeafProfile(id, "localhost", 1));
    EXPECT_FALSE(pem.ok()) << id;
  }
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

CaConstraints TestConstraints() {
  CaConstraints c;
  c.dns = {".broker.test", "broker.test", "login.example.org", "localhost"};
  c.ips = {"127.0.0.1", "::1"};
  return c;
}

CaSet::Options FileOptions(const TempDir& dir) {
  CaSet::Options o;
  o.cert_path = dir / "ca.pem";
  o.key_path = dir / "ca-key.pem";
  o.common_name = "test CA";
  o.constraints = TestConstraints();
  o.cert_days = 90;
  return o;
}

constexpr int64_t kDay = 86400;

int64_t Now() { return static_cast<int64_t>(::time(nullptr)); }

TEST(CaFilesTest, CreatedOnceKeptAcrossRestartsPrivateKeys) {
  TempDir dir;
  CaSet::Options o = FileOptions(dir);
  const std::string cert = o.cert_path, key = o.key_path;
  auto first = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(ModeOf(key), 0600u);
  EXPECT_EQ(ModeOf(cert), 0644u);
  auto second = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ((*first)->current()->Fingerprint(), (*second)->current()->Fingerprint());
  EXPECT_EQ((*second)->bundle_pem(), ReadFile(cert));
  EXPECT_EQ((*second)->bundle_size(), 1u);

  // One file without the other is refused with both names.
  std::string key_text = ReadFile(key);
  ASSERT_EQ(::unlink(key.c_str()), 0);
  auto half = CaSet::LoadOrCreate(o, Now());
  ASSERT_FALSE(half.ok());
  EXPECT_NE(half.status().message().find(key), std::string::npos);
  // A key of another CA does not match.
  auto other = CertificateAuthority::Create("other");
  WriteFile(key, (*other)->key_pem(), 0600);
  auto mismatch = CaSet::LoadOrCreate(o, Now());
  ASSERT_FALSE(mismatch.ok());
  EXPECT_NE(mismatch.status().message().find("does not match"), std::string::npos)
      << mismatch.status().ToString();
  WriteFile(key, key_text, 0600);
  EXPECT_TRUE(CaSet::LoadOrCreate(o, Now()).ok());
}

// A certificate signed by the CA key for a name outside the constraints, as a stolen CA key
// or a bug in issuance would produce it: every client verifying the chain refuses it.
TEST(CaConstraintsTest, TheCaVouchesOnlyForItsDomainAndTheProxysNames) {
  TempDir dir;
  auto set = CaSet::LoadOrCreate(FileOptions(dir), Now());
  ASSERT_TRUE(set.ok()) << set.status().ToString();
  auto ca = (*set)->current();
  auto subtrees = PermittedSubtrees(ca->cert());
  ASSERT_TRUE(subtrees.has_value());
  EXPECT_EQ(*subtrees, (std::vector<std::string>{"DNS:.broker.test", "DNS:broker.test",
                                                 "DNS:login.example.org", "DNS:localhost",
                                                 "IP:7f000001/ffffffff",
                                                 "IP:00000000000000000000000000000001/"
                                                 "ffffffffffffffffffffffffffffffff"}));
  int at = X509_get_ext_by_NID(ca->cert(), NID_name_constraints, -1);
  ASSERT_GE(at, 0);
  EXPECT_EQ(X509_EXTENSION_get_critical(X509_get_ext(ca->cert(), at)), 1);

  auto issue = [&](std::vector<std::string> dns, std::vector<std::string> ips) {
    LeafProfile p;
    p.common_name = "x";
    p.unit = kJobCertUnit;
    p.dns_names = std::move(dns);
    p.ip_addresses = std::move(ips);
    p.days = 1;
    auto issued = ca->IssueWithNewKey(p);
    EXPECT_TRUE(issued.ok()) << issued.status().ToString();
    auto cert = ParseCertificatePem(issued->cert_pem);
    EXPECT_TRUE(cert.ok());
    return VerifyAgainstCa(cert->get(), ca->cert());
  };
  // Inside: jobs under the domain, and the proxy's own names.
  EXPECT_TRUE(issue({"abc.broker.test"}, {}).ok());
  EXPECT_TRUE(issue({"login.example.org", "localhost"}, {"127.0.0.1", "::1"}).ok());
  // Outside: a name on the Internet, the login node's neighbours, another address.
  for (auto [dns, ip] :
       std::vector<std::pair<std::string, std::string>>{{"www.example.org", ""},
                                                        {"example.org", ""},
                                                        {"broker.test.evil.org", ""},
                                                        {"xbroker.test", ""},
                                                        {"abc.broker.test", "10.0.0.7"},
                                                        {"abc.broker.test", "127.0.0.2"}}) {
    Status s = issue({dns}, ip.empty() ? std::vector<std::string>{} : std::vector{ip});
    EXPECT_FALSE(s.ok()) << dns << " " << ip;
    EXPECT_NE(s.message().find("permitted subtree violation"), std::string::npos) << s.ToString();
  }
  CaConstraints more = TestConstraints();
  EXPECT_TRUE(PermitsAll(ca->cert(), more));
  more.ips.push_back("10.0.0.1");
  EXPECT_FALSE(PermitsAll(ca->cert(), more));
  more = TestConstraints();
  more.dns.push_back("other.example.org");
  EXPECT_FALSE(PermitsAll(ca->cert(), more));
}

// A CA from before name constraints existed (or one an administrator made) is replaced at
// start, and leaves the bundle at once: it could vouch for any name.
TEST(CaConstraintsTest, AnUnconstrainedCaIsReplacedAndDropped) {
  TempDir dir;
  CaSet::Options o = FileOptions(dir);
  auto old = CertificateAuthority::Create("old unconstrained CA");
  ASSERT_TRUE(old.ok());
  WriteFile(o.cert_path, (*old)->cert_pem());
  WriteFile(o.key_path, (*old)->key_pem(), 0600);
  auto set = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(set.ok()) << set.status().ToString();
  EXPECT_NE((*set)->current()->Fingerprint(), (*old)->Fingerprint());
  EXPECT_TRUE(PermittedSubtrees((*set)->current()->cert()).has_value());
  EXPECT_EQ((*set)->bundle_size(), 1u);
  EXPECT_EQ(ReadFile(o.cert_path).find((*old)->cert_pem()), std::string::npos);
  EXPECT_EQ(ReadFile(o.key_path), (*set)->current()->key_pem());
  // A changed domain (constraints that do not cover it) makes a new CA too, but the old one,
  // constrained, stays trusted until it expires.
  const std::string before = (*set)->current()->Fingerprint();
  o.constraints.dns.push_back(".other.test");
  auto again = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(again.ok());
  EXPECT_NE((*again)->current()->Fingerprint(), before);
  EXPECT_EQ((*again)->bundle_size(), 2u);
}

// Rotation on an injected clock: a new CA well before the old one expires, both in the bundle
// meanwhile, new certificates from the new CA, and the old one gone once expired.
TEST(CaRotationTest, NewCaAheadOfExpiryOldOneKeptUntilItExpires) {
  TempDir dir;
  CaSet::Options o = FileOptions(dir);  // cert_days 90
  const int64_t t0 = Now();
  auto set = CaSet::LoadOrCreate(o, t0);
  ASSERT_TRUE(set.ok()) << set.status().ToString();
  CaSet& cas = **set;
  auto first = cas.current();
  EXPECT_LE(SecondsLeftAt(first->cert(), t0), int64_t{kCaDays} * kDay);
  EXPECT_GT(SecondsLeftAt(first->cert(), t0), int64_t{kCaDays - 1} * kDay);
  // Not due while more than cert_days + margin are left.
  const int64_t due = t0 + int64_t{kCaDays - 90 - kCaRenewMarginDays} * kDay;
  auto r = cas.Maintain(due - kDay, o.constraints);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  EXPECT_EQ(cas.current(), first);
  // Due: a new CA signs from now on; the bundle (and the file) holds both.
  r = cas.Maintain(due + kDay, o.constraints);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(*r);
  auto second = cas.current();
  ASSERT_NE(second, first);
  EXPECT_GT(SecondsLeftAt(second->cert(), due + kDay), int64_t{kCaDays - 1} * kDay);
  EXPECT_EQ(cas.bundle_size(), 2u);
  EXPECT_EQ(cas.bundle_pem(), second->cert_pem() + first->cert_pem());
  EXPECT_EQ(ReadFile(o.cert_path), cas.bundle_pem());
  EXPECT_EQ(ReadFile(o.key_path), second->key_pem());
  auto key = GenerateKeyAndCsr("j");
  ASSERT_TRUE(key.ok());
  auto pem = cas.current()->IssueFromCsr(key->csr_pem, JobLeafProfile("j", "broker.test", 90));
  ASSERT_TRUE(pem.ok()) << pem.status().ToString();
  auto leaf = ParseCertificatePem(*pem);
  ASSERT_TRUE(leaf.ok());
  EXPECT_EQ(X509_check_issued(second->cert(), leaf->get()), X509_V_OK);
  EXPECT_NE(X509_check_issued(first->cert(), leaf->get()), X509_V_OK);
  // Every certificate the first CA signed before the rotation expires before it does.
  EXPECT_GT(SecondsLeftAt(first->cert(), due), int64_t{90} * kDay);
  // A restart keeps the pair and the bundle.
  auto reloaded = CaSet::LoadOrCreate(o, due + 2 * kDay);
  ASSERT_TRUE(reloaded.ok()) << reloaded.status().ToString();
  EXPECT_EQ((*reloaded)->current()->Fingerprint(), second->Fingerprint());
  EXPECT_EQ((*reloaded)->bundle_size(), 2u);
  // Once the first CA has expired it leaves the bundle; the second is not due yet.
  r = cas.Maintain(t0 + int64_t{kCaDays + 1} * kDay, o.constraints);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  EXPECT_EQ(cas.current(), second);
  EXPECT_EQ(cas.bundle_size(), 1u);
  EXPECT_EQ(cas.bundle_pem(), second->cert_pem());
  EXPECT_EQ(ReadFile(o.cert_path), second->cert_pem());
}

// Each change of the proxy's names makes a new CA and keeps the old one: the bundle stays
// bounded however often that happens.
TEST(CaRotationTest, TheBundleIsBounded) {
  CaSet::Options o;
  o.common_name = "test CA";
  o.constraints = TestConstraints();
  auto set = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(set.ok());
  for (int i = 1; i <= 12; ++i) {
    o.constraints.ips.push_back("10.0.0." + std::to_string(i));  // a new interface address
    auto r = (*set)->Maintain(Now(), o.constraints);
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE(*r);
    EXPECT_TRUE(PermitsAll((*set)->current()->cert(), o.constraints));
  }
  EXPECT_EQ((*set)->bundle_size(), kMaxBundleCas);
}

TEST(CaRotationTest, CertificatesNeverOutliveTheCa) {
  CaConstraints c = TestConstraints();
  // A CA with 10 days left signs a "90-day" certificate: it ends with the CA.
  auto ca = CertificateAuthority::Create("short", c, Now() - int64_t{kCaDays - 10} * kDay);
  ASSERT_TRUE(ca.ok());
  auto key = GenerateKeyAndCsr("j");
  auto pem = (*ca)->IssueFromCsr(key->csr_pem, JobLeafProfile("j", "broker.test", 90));
  ASSERT_TRUE(pem.ok()) << pem.status().ToString();
  auto leaf = ParseCertificatePem(*pem);
  EXPECT_LE(SecondsLeft(leaf->get()), SecondsLeft((*ca)->cert()));
  EXPECT_GT(SecondsLeft(leaf->get()), 9 * kDay);
  EXPECT_TRUE(VerifyAgainstCa(leaf->get(), (*ca)->cert()).ok());
}

// A crash after the key file of a new CA was written and before its certificate file was: the
// next start must not refuse what the first left behind, nor lose the key.
TEST(CaFilesTest, KeyWithoutCertificateAfterACrashIsRestored) {
  TempDir dir;
  CaSet::Options o = FileOptions(dir);
  auto first = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  // A crash between the key file and the bundle of the first CA.
  ASSERT_EQ(::unlink(o.cert_path.c_str()), 0);
  auto again = CaSet::LoadOrCreate(o, Now());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*first)->current()->Fingerprint(), (*again)->current()->Fingerprint());
  EXPECT_EQ(ReadFile(o.cert_path), (*first)->current()->cert_pem());
  EXPECT_EQ(ModeOf(o.cert_path), 0644u);
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

}  // namespace
}  // namespace brokerproxy::proxy
