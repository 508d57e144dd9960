// TLS on the proxy port end to end (issue 5's acceptance): the real daemon and CLI, real TLS
// peers (openssl s_server, curl, headless Chromium, socat, OpenSSL in-process), loopback only.

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

#include "e2e/harness.h"
#include "proxy/tls/certs.h"
#include "registry/json.h"
#include "support/tls_samples.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

int64_t MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

// CPU seconds (user + system) a process has used so far.
double CpuSeconds(pid_t pid) {
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  size_t close_paren = stat.rfind(')');
  if (close_paren == std::string::npos) return 0;
  std::istringstream in(stat.substr(close_paren + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// Transfer sizes may be raised for measurements: BROKERPROXY_TLS_BYTES=1073741824.
uint64_t TransferBytes(uint64_t fallback) {
  const char* env = std::getenv("BROKERPROXY_TLS_BYTES");
  return env && *env ? std::stoull(env) : fallback;
}

mode_t ModeOf(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return 0;
  return st.st_mode & 07777;
}

bool JobReady(const Daemon& d, const std::string& id) {
  auto j = ParseOut(d.Cli({"load", id, "--json"}));
  return j && JsonText(j.get(), {"job", "ready"}) == "true";
}

uint64_t GlobalStat(const Daemon& d, const char* name) {
  auto j = ParseOut(d.Cli({"stats", "--json"}));
  if (!j) return 0;
  const cJSON* stats = cJSON_GetObjectItemCaseSensitive(j.get(), "stats");
  std::string v = JsonText(cJSON_GetObjectItemCaseSensitive(stats, "connections"), {name});
  return v.empty() ? 0 : std::stoull(v);
}

// Reads until EOF or error; returns how long that took, or -1 if the peer kept the
// connection open past `timeout_ms`.
int64_t MsUntilClosed(int fd, int timeout_ms) {
  auto start = Clock::now();
  char buf[4096];
  for (;;) {
    int left = timeout_ms - static_cast<int>(MsSince(start));
    if (left <= 0) return -1;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, left) <= 0) continue;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return MsSince(start);
  }
}

// `brokerproxy connect JOB --tls --listen 127.0.0.1:0` in the background.
class TlsConnect {
 public:
  TlsConnect(const Daemon& d, const TempDir& dir, const std::string& job,
             std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {
        BinaryPath(), "connect",      job,       "--tls",
        "--listen",   "127.0.0.1:0",  "--proxy", "127.0.0.1:" + std::to_string(d.proxy_port()),
        "-c",         d.config_path()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    static int serial = 0;
    child_ = Child::Spawn(argv, dir / ("connect-" + job + "-" + std::to_string(++serial) + ".log"));
    auto line = child_ ? child_->WaitFor("listening on 127.0.0.1:") : std::nullopt;
    if (line) port_ = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  }
  int port() const { return port_; }
  std::string Output() const { return child_ ? child_->Output() : ""; }

 private:
  std::unique_ptr<Child> child_;
  int port_ = 0;
};

class TlsTest : public ::testing::Test {
 protected:
  // A peer that goes away must fail a test, not kill the test binary.
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }
  // The broker CA as `brokerproxy ca` prints it, saved to a file.
  std::string SaveCa(const Daemon& d) {
    RunResult r = d.Cli({"ca"});
    EXPECT_EQ(r.exit_code, 0) << r;
    EXPECT_NE(r.out.find("BEGIN CERTIFICATE"), std::string::npos) << r;
    std::string path = dir_ / "ca-from-cli.pem";
    WriteFile(path, r.out);
    return path;
  }
  RunResult Curl(const std::string& ca, const std::string& name, int port,
                 const std::string& path = "/") {
    return RunCommand({"curl", "-sS", "--max-time", "15", "--cacert", ca, "--resolve",
                       name + ":" + std::to_string(port) + ":127.0.0.1",
                       "https://" + name + ":" + std::to_string(port) + path});
  }
  TempDir dir_;
};

TEST_F(TlsTest, CaCommandPrintsTheCaAndARestartKeepsIt) {
  std::string first;
  {
    Daemon d(dir_);
    ASSERT_TRUE(d.Start());
    RunResult r = d.Cli({"ca"});
    ASSERT_EQ(r.exit_code, 0) << r;
    first = r.out;
    RunResult json = d.Cli({"ca", "--json"});
    ASSERT_EQ(json.exit_code, 0) << json;
    EXPECT_EQ(JsonText(ParseOut(json).get(), {"ca_cert"}), first);
    // Every user can read it (through the control socket, not the 0711 state dir).
    auto reply = ParseOut(ControlRequestAs(65534, d.socket_path(), R"({"op":"ca"})"));
    EXPECT_EQ(JsonText(reply.get(), {"ca_cert"}), first);
    EXPECT_EQ(ModeOf(d.state_dir() + "/ca-key.pem"), 0600u);
    EXPECT_EQ(ModeOf(d.state_dir() + "/server-key.pem"), 0600u);
    EXPECT_EQ(d.Stop(), 0);
  }
  Daemon again(dir_);
  ASSERT_TRUE(again.Start());
  RunResult r = again.Cli({"ca"});
  ASSERT_EQ(r.exit_code, 0) << r;
  auto a = proxy::ParseCertificatePem(first);
  auto b = proxy::ParseCertificatePem(r.out);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(X509_cmp(a->get(), b->get()), 0) << "a restart must keep the same CA";
  EXPECT_EQ(again.Log().find("created a new TLS certificate authority"), std::string::npos);
}

// The CA files of an older version have no name constraints: such a CA could vouch for any
// name in every browser that trusts it, so the daemon replaces it at start, says so, and no
// longer hands it out.
TEST_F(TlsTest, ACaWithoutNameConstraintsIsReplacedAtStart) {
  Daemon d(dir_);
  auto old = proxy::CertificateAuthority::Create("brokerproxy CA of an older version");
  ASSERT_TRUE(old.ok());
  ASSERT_EQ(mkdir(d.state_dir().c_str(), 0711), 0);
  WriteFile(d.state_dir() + "/ca.pem", (*old)->cert_pem());
  WriteFile(d.state_dir() + "/ca-key.pem", (*old)->key_pem(), 0600);
  ASSERT_TRUE(d.Start());
  EXPECT_NE(d.Log().find("the CA has no name constraints; clients that trust it must fetch the "
                         "new one"),
            std::string::npos)
      << d.Log();
  RunResult r = d.Cli({"ca"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out.find((*old)->cert_pem()), std::string::npos) << "the old CA is still handed out";
  auto ca = proxy::ParseCertificatePem(r.out);
  ASSERT_TRUE(ca.ok());
  EXPECT_NE(X509_cmp(ca->get(), (*old)->cert()), 0);
  auto subtrees = proxy::PermittedSubtrees(ca->get());
  ASSERT_TRUE(subtrees.has_value());
  EXPECT_NE(std::find(subtrees->begin(), subtrees->end(), "DNS:.localhost"), subtrees->end());
  // The proxy's certificate comes from the new CA: connect --tls with the new bundle works.
  Backend backend;
  ASSERT_FALSE(d.SaveJob("j", backend.port()).empty());
  RunResult c = d.Cli({"connect", "j", "--tls", "--stdio", "--proxy",
                       "127.0.0.1:" + std::to_string(d.proxy_port())},
                      RunOptions{"echo\nhi\n", std::nullopt, 20000, {}, ""});
  EXPECT_EQ(c.exit_code, 0) << c;
  EXPECT_EQ(c.out, "hi\n") << c;
}

TEST_F(TlsTest, SaveSslIssuesACertificateForAKeyThatStaysWithTheUser) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string certs = dir_ / "certs";
  RunResult r = d.Cli({"save", "ssl", "--job-id", "web1", "--port", "8443", "--host", "localhost",
                       "--cert-dir", certs, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  auto reply = ParseOut(r);
  ASSERT_TRUE(reply);
  std::string cert_path = JsonText(reply.get(), {"job", "cert_path"});
  std::string key_path = JsonText(reply.get(), {"job", "key_path"});
  EXPECT_EQ(cert_path, certs + "/web1.crt");
  EXPECT_EQ(key_path, certs + "/web1.key");
  EXPECT_EQ(ModeOf(key_path), 0600u);
  EXPECT_EQ(ModeOf(certs), 0700u);
  EXPECT_EQ(JsonText(reply.get(), {"cert_pem"}), ReadFile(cert_path));
  // The key never went to the daemon: nothing in its state dir, the reply or its log.
  std::string key_pem = ReadFile(key_path);
  ASSERT_NE(key_pem.find("PRIVATE KEY"), std::string::npos);
  EXPECT_EQ(r.out.find("PRIVATE KEY"), std::string::npos);
  // `load` returns the paths.
  auto load = ParseOut(d.Cli({"load", "web1", "--json"}));
  EXPECT_EQ(JsonText(load.get(), {"job", "cert_path"}), cert_path);
  EXPECT_EQ(JsonText(load.get(), {"job", "key_path"}), key_path);

  // Verify in-process against the CA the CLI prints.
  auto ca = proxy::ParseCertificatePem(d.Cli({"ca"}).out);
  auto cert = proxy::ParseCertificatePem(ReadFile(cert_path));
  ASSERT_TRUE(ca.ok() && cert.ok());
  EXPECT_TRUE(proxy::VerifyAgainstCa(cert->get(), ca->get()).ok());
  // The job's own name and nothing else: not its backend host, nor what that resolves to.
  EXPECT_EQ(proxy::SubjectAltNames(cert->get()), std::vector<std::string>{"DNS:web1.localhost"});
  int64_t left = proxy::SecondsLeft(cert->get());
  EXPECT_GT(left, 364 * 86400);  // [tls] cert_days = 365
  EXPECT_LE(left, 365 * 86400);
  auto key = proxy::ParsePrivateKeyPem(key_pem);
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(X509_check_private_key(cert->get(), key->get()), 1);

  // A backend host that is another job's name is never put into a certificate.
  RunResult sneaky = d.Cli({"save", "ssl", "--job-id", "evil", "--port", "8444", "--host",
                            "web1.localhost", "--cert-dir", certs, "--json"});
  ASSERT_EQ(sneaky.exit_code, 0) << sneaky;
  auto evil = proxy::ParseCertificatePem(ReadFile(certs + "/evil.crt"));
  EXPECT_EQ(proxy::SubjectAltNames(evil->get()), std::vector<std::string>{"DNS:evil.localhost"});

  // The certificates survive a restart of the daemon (same CA).
  EXPECT_EQ(d.Stop(), 0);
  ASSERT_TRUE(d.Start());
  auto ca2 = proxy::ParseCertificatePem(d.Cli({"ca"}).out);
  EXPECT_TRUE(proxy::VerifyAgainstCa(cert->get(), ca2->get()).ok());
  EXPECT_EQ(d.Log().find("PRIVATE KEY"), std::string::npos);

  // A save the broker refuses (here: no daemon) leaves the job's key as it was, and no
  // temporary file behind.
  EXPECT_EQ(d.Stop(), 0);
  RunResult refused =
      d.Cli({"save", "ssl", "--job-id", "web1", "--port", "8443", "--cert-dir", certs});
  EXPECT_EQ(refused.exit_code, 3) << refused;  // not running
  EXPECT_EQ(ReadFile(key_path), key_pem);
  RunResult ls = RunCommand({"ls", "-A", certs});
  EXPECT_EQ(ls.out, "evil.crt\nevil.key\nweb1.crt\nweb1.key\n") << ls;
}

TEST_F(TlsTest, PassthroughToAnHttpsBackendStartedByExecMode) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ca = SaveCa(d);
  // No --port: the save picks a free one from the port range and gives it to the command.
  auto server =
      Child::Spawn({BinaryPath(), "save", "ssl", "--job-id", "web", "--cert-dir", dir_ / "certs",
                    "-c", d.config_path(), "--", "openssl", "s_server", "-accept",
                    "127.0.0.1:{port}", "-cert", "{cert}", "-key", "{certkey}", "-www"},
                   dir_ / "s_server.log");
  ASSERT_TRUE(server);
  ASSERT_TRUE(WaitUntil([&] { return JobReady(d, "web"); })) << server->Output();

  RunResult ok = Curl(ca, "web.localhost", d.proxy_port());
  EXPECT_EQ(ok.exit_code, 0) << ok << "\n" << server->Output();
  EXPECT_NE(ok.out.find("s_server"), std::string::npos) << ok;  // the backend's own page

  // Wrong SNI (no such job) and a job of the wrong type fail cleanly, at the TLS level.
  d.SaveJob("plain", 9);
  for (const char* name : {"nosuchjob.localhost", "plain.localhost"}) {
    RunResult bad = Curl(ca, name, d.proxy_port());
    EXPECT_NE(bad.exit_code, 0) << name << ": " << bad;
    EXPECT_FALSE(bad.timed_out) << bad;
  }
  // The proxy's own name: its certificate, not the job's: curl sees "localhost" verified, then
  // the BROKER1 endpoint answers an HTTP request with ERR bad-request.
  RunResult own = RunCommand({"curl", "-sS", "--http0.9", "--max-time", "15", "--cacert", ca,
                              "https://localhost:" + std::to_string(d.proxy_port()) + "/"});
  EXPECT_NE(own.out.find("ERR bad-request"), std::string::npos) << own;
  // Another CA: verification fails.
  auto other = proxy::CertificateAuthority::Create("not the broker");
  WriteFile(dir_ / "other.pem", (*other)->cert_pem());
  RunResult untrusted = Curl(dir_ / "other.pem", "web.localhost", d.proxy_port());
  EXPECT_EQ(untrusted.exit_code, 60) << untrusted;  // peer certificate cannot be authenticated

  // The daemon keeps serving.
  RunResult again = Curl(ca, "web.localhost", d.proxy_port());
  EXPECT_EQ(again.exit_code, 0) << again;
  EXPECT_GE(GlobalStat(d, "tls_failures"), 2u);
  std::string key = dir_ / "certs/web.key";
  EXPECT_EQ(ModeOf(key), 0600u);
  // Stopping exec mode removes the job, and with it the key and certificate files.
  server->Stop(SIGTERM);
  EXPECT_EQ(d.Cli({"load", "web"}).exit_code, 5);
  EXPECT_NE(access(key.c_str(), F_OK), 0) << "the key outlived its job";
  EXPECT_TRUE(d.running());
}

TEST_F(TlsTest, OnlyModernProtocolsAndCiphers) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ca = SaveCa(d);
  std::string addr = "127.0.0.1:" + std::to_string(d.proxy_port());
  auto s_client = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {
        "openssl",    "s_client",  "-connect", addr, "-CAfile", ca, "-verify_return_error",
        "-verify_ip", "127.0.0.1", "-ign_eof"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    RunOptions o;
    o.stdin_data = "BROKER1 nosuch 00\n";
    o.timeout_ms = 20000;
    return RunCommand(argv, o);
  };
  RunResult tls13 = s_client({"-tls1_3"});
  EXPECT_NE(tls13.out.find("New, TLSv1.3"), std::string::npos) << tls13;
  EXPECT_NE(tls13.out.find("Verification: OK"), std::string::npos) << tls13;
  EXPECT_NE(tls13.out.find("ERR denied"), std::string::npos) << tls13;
  RunResult tls12 = s_client({"-tls1_2"});
  EXPECT_NE(tls12.out.find("ECDHE-ECDSA-AES"), std::string::npos) << tls12;
  RunResult chacha = s_client({"-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"});
  EXPECT_NE(chacha.out.find("Cipher is ECDHE-ECDSA-CHACHA20-POLY1305"), std::string::npos)
      << chacha;
  // No TLS 1.1, no CBC, no static key exchange.
  RunResult tls11 = s_client({"-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"});
  EXPECT_EQ(tls11.out.find("ERR denied"), std::string::npos) << tls11;
  EXPECT_NE(tls11.exit_code, 0) << tls11;
  RunResult cbc = s_client({"-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256"});
  EXPECT_NE(cbc.exit_code, 0) << cbc;
  EXPECT_EQ(cbc.out.find("ERR denied"), std::string::npos) << cbc;
  EXPECT_TRUE(d.running());
}

// A page a real browser loads through the proxy port, with the broker CA trusted in its NSS
// database and no certificate-error overrides.
TEST_F(TlsTest, HeadlessChromiumLoadsAPageFromAnSslJob) {
  const char* chromium = "/usr/bin/chromium";
  if (access(chromium, X_OK) != 0 || access("/usr/bin/certutil", X_OK) != 0) {
    GTEST_SKIP() << "needs Debian's chromium and libnss3-tools "
                    "(apt-get install -y chromium libnss3-tools)";
  }
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ca = SaveCa(d);

  // The job's web server: socat terminating TLS with the issued certificate, one process per
  // connection (a browser opens several), answering every request with the page.
  std::string body =
      "<html><head><title>job page</title></head><body><p id=\"t\">hello from job "
      "chrome1 through brokerproxy</p></body></html>";
  std::string script = dir_ / "page.sh";
  WriteFile(script,
            "#!/bin/sh\n"
            "while IFS= read -r line; do\n"
            "  line=$(printf '%s' \"$line\" | tr -d '\\r')\n"
            "  [ -z \"$line\" ] && break\n"
            "done\n"
            "printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/html\\r\\nContent-Length: " +
                std::to_string(body.size()) + "\\r\\nConnection: close\\r\\n\\r\\n%s' '" + body +
                "'\n",
            0755);
  // No --port: the save picks a free one from the port range and gives it to the command.
  auto server = Child::Spawn(
      {BinaryPath(), "save", "ssl", "--job-id", "chrome1", "--cert-dir", dir_ / "certs", "-c",
       d.config_path(), "--", "socat",
       "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={certkey},verify=0",
       "EXEC:" + script},
      dir_ / "socat.log");
  ASSERT_TRUE(server);
  ASSERT_TRUE(WaitUntil([&] { return JobReady(d, "chrome1"); })) << server->Output();

  // Trust the broker CA in an NSS database of a scratch HOME, as a user would.
  std::string home = dir_ / "home";
  ASSERT_EQ(RunCommand({"mkdir", "-p", home + "/.pki/nssdb"}).exit_code, 0);
  std::string db = "sql:" + home + "/.pki/nssdb";
  RunResult init = RunCommand({"certutil", "-d", db, "-N", "--empty-password"});
  ASSERT_EQ(init.exit_code, 0) << init;
  RunResult add =
      RunCommand({"certutil", "-d", db, "-A", "-t", "C,,", "-n", "brokerproxy", "-i", ca});
  ASSERT_EQ(add.exit_code, 0) << add;

  RunOptions env;
  env.env = {"HOME=" + home};
  env.timeout_ms = 60000;
  std::string url = "https://chrome1.localhost:" + std::to_string(d.proxy_port()) + "/";
  RunResult page =
      RunCommand({chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage",
                  "--user-data-dir=" + (dir_ / "chrome-profile"), "--dump-dom", url},
                 env);
  EXPECT_FALSE(page.timed_out) << page;
  EXPECT_NE(page.out.find("hello from job chrome1 through brokerproxy"), std::string::npos)
      << page << "\n"
      << d.Log();
  // A name that is no ssl job does not load (and no certificate error page is offered).
  RunResult bad = RunCommand(
      {chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
       "--disable-background-networking", "--disable-component-update", "--disable-sync",
       "--disable-dev-shm-usage", "--user-data-dir=" + (dir_ / "chrome-profile"), "--dump-dom",
       "https://nosuch.localhost:" + std::to_string(d.proxy_port()) + "/"},
      env);
  EXPECT_EQ(bad.out.find("hello from job"), std::string::npos) << bad;
  server->Stop(SIGTERM);
}

TEST_F(TlsTest, ConnectTlsCarriesAnEchoSessionOf256MiB) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("echo1", backend.port());
  ASSERT_FALSE(secret.empty());
  TlsConnect connect(d, dir_, "echo1");
  ASSERT_GT(connect.port(), 0) << connect.Output();

  int fd = ConnectTcp(connect.port(), "127.0.0.1", 60000);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "echo\n"));
  const uint64_t kBytes = TransferBytes(256ull << 20);
  double cpu_before = CpuSeconds(d.pid());
  auto start = Clock::now();
  EchoResult r = EchoTransfer(fd, kBytes);
  int64_t ms = MsSince(start);
  double cpu = CpuSeconds(d.pid()) - cpu_before;
  close(fd);
  EXPECT_EQ(r.received_bytes, kBytes) << connect.Output() << d.Log();
  EXPECT_EQ(r.received, r.sent);
  EXPECT_EQ(r.received, PatternHash(kBytes));
  std::printf(
      "[ metric ] connect --tls echo %llu MiB each way: %lld ms (%.0f MB/s each way); daemon "
      "CPU %.2f s (%.2f s per GiB moved)\n",
      static_cast<unsigned long long>(kBytes >> 20), static_cast<long long>(ms),
      kBytes / 1e3 / std::max<int64_t>(ms, 1), cpu, cpu / (2.0 * kBytes / (1 << 30)));
  // Counted as a spliced session of the job, over TLS termination.
  std::string up = "mode=terminated up=" + std::to_string(kBytes + 5);  // + "echo\n"
  EXPECT_TRUE(WaitUntil([&] { return d.Log().find(up) != std::string::npos; }, 5000)) << d.Log();
  EXPECT_EQ(d.Log().find(secret), std::string::npos) << "secrets never appear in logs";

  // --ca FILE instead of the fetched CA; and a wrong CA is refused before the secret is sent.
  TlsConnect with_file(d, dir_, "echo1", {"--ca", SaveCa(d)});
  ASSERT_GT(with_file.port(), 0) << with_file.Output();
  int fd2 = ConnectTcp(with_file.port());
  ASSERT_GE(fd2, 0);
  ASSERT_TRUE(SendAll(fd2, "echo\nping\n"));
  EXPECT_EQ(ReadLine(fd2), "ping");
  close(fd2);
  auto other = proxy::CertificateAuthority::Create("not the broker");
  WriteFile(dir_ / "other.pem", (*other)->cert_pem());
  TlsConnect wrong(d, dir_, "echo1", {"--ca", dir_ / "other.pem"});
  ASSERT_GT(wrong.port(), 0) << wrong.Output();
  int fd3 = ConnectTcp(wrong.port());
  ASSERT_GE(fd3, 0);
  SendAll(fd3, "echo\nping\n");
  EXPECT_GE(MsUntilClosed(fd3, 10000), 0);
  close(fd3);
  EXPECT_TRUE(
      WaitUntil([&] { return wrong.Output().find("does not verify") != std::string::npos; }, 5000))
      << wrong.Output();
}

// `connect --tls` sends what the local client says first right behind the preamble, inside
// TLS, without waiting for "OK" (as ProxyTest.ConnectSendsWhatTheClientSaysFirst... shows for
// plain TCP). socat terminates TLS with the proxy's own certificate in front of a stand-in
// proxy that replies only once it has the client's bytes.
TEST_F(TlsTest, ConnectSendsWhatTheClientSaysFirstWithThePreamble) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string secret = d.SaveJob("early", 1);
  ASSERT_FALSE(secret.empty());
  FakeProxy fake(6, 5000);
  // socat cannot listen on port 0: a free port, and another if it was taken meanwhile.
  std::unique_ptr<Child> front;
  int port = 0;
  ASSERT_TRUE(StartOnFreePort(
      [&](int p, std::string* why) {
        size_t from = ReadFile(dir_ / "tls-front.log").size();
        front = Child::Spawn({"socat",
                              "OPENSSL-LISTEN:" + std::to_string(p) +
                                  ",bind=127.0.0.1,reuseaddr,fork,verify=0,cert=" + d.state_dir() +
                                  "/server.pem,key=" + d.state_dir() + "/server-key.pem",
                              "TCP:127.0.0.1:" + std::to_string(fake.port())},
                             dir_ / "tls-front.log");
        return WaitListening(&front, p, why, from);
      },
      &port));
  auto connect =
      Child::Spawn({BinaryPath(), "connect", "early", "--tls", "--listen", "127.0.0.1:0", "--proxy",
                    "127.0.0.1:" + std::to_string(port), "-c", d.config_path()},
                   dir_ / "connect-early.log");
  ExpectConnectSendsFirstBytesEarly(connect.get(), &fake, "BROKER1 early " + secret + "\n");
  front->Stop(SIGTERM);
}

// half_close_timeout ends a terminated TLS session that one side finished with while the other
// stays silent, as it does a plain one.
TEST_F(TlsTest, HalfClosedTerminatedSessionTimesOut) {
  Daemon d(dir_, "", "half_close_timeout = 1s\n");
  ASSERT_TRUE(d.Start());
  Backend backend;
  ASSERT_FALSE(d.SaveJob("half", backend.port()).empty());
  TlsConnect connect(d, dir_, "half");
  ASSERT_GT(connect.port(), 0) << connect.Output();
  int fd = ConnectTcp(connect.port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "download 5\n"));  // 5 bytes, then the backend shuts down writing
  EXPECT_EQ(ReadToEof(fd).size(), 5u);
  auto eof_at = std::chrono::steady_clock::now();
  auto timed_out = [&] {  // one session line says both
    std::istringstream lines(d.Log());
    for (std::string l; std::getline(lines, l);) {
      if (l.find("mode=terminated") != std::string::npos &&
          l.find("reason=half-close timeout") != std::string::npos) {
        return true;
      }
    }
    return false;
  };
  EXPECT_TRUE(WaitUntil(timed_out, 10000)) << d.Log();
  EXPECT_GE(std::chrono::steady_clock::now() - eof_at, std::chrono::milliseconds(1000));
  close(fd);
  EXPECT_EQ(GlobalStat(d, "idle_closed"), 1u);
}

TEST_F(TlsTest, AJobCertificateCannotImpersonateTheProxy) {
  // A job's certificate is CA-signed too: `connect --tls` only sends the secret to a
  // certificate with the proxy's profile. The broker now issues job certificates for
  // <job>.<tls_domain> only, so this one, naming the proxy's address as job certificates
  // once could (their backend host), is made with the CA key directly.
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string certs = dir_ / "certs";
  ASSERT_EQ(mkdir(certs.c_str(), 0700), 0);
  auto ca = proxy::CertificateAuthority::FromPem(ReadFile(d.state_dir() + "/ca.pem"),
                                                 ReadFile(d.state_dir() + "/ca-key.pem"));
  ASSERT_TRUE(ca.ok()) << ca.status().ToString();
  proxy::LeafProfile job_profile;
  job_profile.common_name = "mitm.localhost";
  job_profile.unit = proxy::kJobCertUnit;
  job_profile.dns_names = {"mitm.localhost"};
  job_profile.ip_addresses = {"127.0.0.1"};
  job_profile.days = 1;
  auto mitm = (*ca)->IssueWithNewKey(job_profile);
  ASSERT_TRUE(mitm.ok()) << mitm.status().ToString();
  WriteFile(certs + "/mitm.crt", mitm->cert_pem);
  WriteFile(certs + "/mitm.key", mitm->key_pem, 0600);
  // A fake proxy with that certificate, where the client expects the proxy.
  std::string received = dir_ / "fake-received";
  WriteFile(received, "");
  // socat cannot listen on port 0: a free port, and another if it was taken meanwhile.
  std::unique_ptr<Child> fake;
  int port = 0;
  ASSERT_TRUE(StartOnFreePort(
      [&](int p, std::string* why) {
        size_t from = ReadFile(dir_ / "fake.log").size();
        fake = Child::Spawn({"socat",
                             "OPENSSL-LISTEN:" + std::to_string(p) +
                                 ",bind=127.0.0.1,reuseaddr,fork,cert=" + certs +
                                 "/mitm.crt,key=" + certs + "/mitm.key,verify=0",
                             "SYSTEM:cat >> " + received},
                            dir_ / "fake.log");
        return WaitListening(&fake, p, why, from);
      },
      &port));
  Backend backend;
  ASSERT_FALSE(d.SaveJob("victim", backend.port()).empty());
  RunResult c = d.Cli(
      {"connect", "victim", "--tls", "--stdio", "--proxy", "127.0.0.1:" + std::to_string(port)},
      RunOptions{"echo\n", std::nullopt, 20000, {}, ""});
  EXPECT_NE(c.exit_code, 0) << c;
  EXPECT_NE(c.err.find("not the proxy's"), std::string::npos) << c;
  fake->Stop(SIGTERM);
  EXPECT_EQ(ReadFile(received), "") << "the secret must not reach an impostor";
}

TEST_F(TlsTest, BadClientHellosAndStalledHandshakesAreClosedAndTheDaemonKeepsServing) {
  Daemon d(dir_, "", "handshake_timeout = 1s\n");
  ASSERT_TRUE(d.Start());
  int port = d.proxy_port();
  uint64_t failures_before = GlobalStat(d, "tls_failures");
  std::string hello = CaptureClientHello("x.example.org");
  struct Case {
    std::string name;
    std::string bytes;
    bool expect_timeout;  // closed by the handshake timeout rather than at once
  };
  std::string huge_header("\x16\x03\x01\x00\x04\x01\xff\xff\xff", 9);
  std::string many_records;
  for (size_t i = 0; many_records.size() < 17 * 1024; ++i) {
    many_records += std::string("\x16\x03\x01\x00\x01", 5);
    many_records += i == 0 ? '\x01' : (i < 4 ? (i == 2 ? '\x30' : '\x00') : 'p');
  }
  std::vector<Case> cases = {
      {"garbage after a record header",
       std::string("\x16\x03\x01\x00\x20", 5) + std::string(32, 'A'), false},
      {"not a handshake version", std::string("\x16\x07\x07garbage garbage", 17), false},
      {"handshake longer than the buffer", huge_header, false},
      {"oversized through tiny records", many_records, false},
      {"truncated ClientHello, then silence", hello.substr(0, hello.size() / 2), true},
      {"a record header only", std::string("\x16\x03\x01\x02\x00", 5), true},
      {"complete ClientHello, then a stalled handshake", hello, true},
  };
  for (const Case& c : cases) {
    int fd = ConnectTcp(port);
    ASSERT_GE(fd, 0) << c.name;
    ASSERT_TRUE(SendAll(fd, c.bytes)) << c.name;
    int64_t ms = MsUntilClosed(fd, 8000);
    close(fd);
    EXPECT_GE(ms, 0) << c.name << ": not closed";
    if (c.expect_timeout) {
      EXPECT_GE(ms, 700) << c.name << ": closed before the handshake timeout";
    } else {
      EXPECT_LT(ms, 700) << c.name << ": should be refused at once";
    }
  }
  // A client that sends half a hello and closes.
  int fd = ConnectTcp(port);
  SendAll(fd, hello.substr(0, 40));
  close(fd);
  // An in-process TLS client that completes the handshake with the proxy, then stalls instead
  // of sending the preamble: answered "ERR timeout" inside TLS.
  {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    SSL* ssl = SSL_new(ctx);
    int s = ConnectTcp(port);
    SSL_set_fd(ssl, s);
    ASSERT_EQ(SSL_connect(ssl), 1);
    char buf[64] = {};
    int n = SSL_read(ssl, buf, sizeof(buf) - 1);
    EXPECT_GT(n, 0);
    EXPECT_STREQ(buf, "ERR timeout\n");
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(s);
  }
  EXPECT_TRUE(WaitUntil(
      [&] { return GlobalStat(d, "tls_failures") >= failures_before + cases.size() + 1; }, 5000))
      << GlobalStat(d, "tls_failures");
  EXPECT_EQ(GlobalStat(d, "active"), 0u);

  // The daemon still serves a normal session.
  Backend backend;
  ASSERT_FALSE(d.SaveJob("after", backend.port()).empty());
  RunResult r = d.Cli(
      {"connect", "after", "--tls", "--stdio", "--proxy", "127.0.0.1:" + std::to_string(port)},
      RunOptions{"echo\nstill here\n", std::nullopt, 20000, {}, ""});
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out, "still here\n") << r;
  EXPECT_TRUE(d.running());
}

// A ClientHello of 16 KiB in 1-byte records, each read by the daemon on its own (the client
// paces them like a slow sender), on several connections at once: every hello is read to its
// end and answered. The cost of such a hello is linear in its size (ClientHelloReader's steps
// are bounded in client_hello_test.cc; bench/client_hello_bench.cc measures the same shape);
// the daemon's CPU here is printed as a metric, never asserted: a time bound in a test fails on
// a slow or busy machine without any change in the code.
TEST_F(TlsTest, AClientHelloInOneByteRecordsOnSeveralConnectionsIsReadToItsEnd) {
  Daemon d(dir_, "", "handshake_timeout = 2m\n");
  ASSERT_TRUE(d.Start());
  // A name under tls_domain with no job: refused with an alert once the hello is read, so the
  // daemon does no TLS work that would blur the metric.
  std::string hs = PadClientHello(CaptureClientHello("nojob.localhost"), 2730);
  std::string stream = FragmentHandshake(hs, 1);
  ASSERT_GE(stream.size(), 16000u);
  constexpr int kConnections = 4;
  std::vector<int> fds;
  for (int i = 0; i < kConnections; ++i) {
    fds.push_back(ConnectTcp(d.proxy_port()));
    ASSERT_GE(fds.back(), 0);
  }
  double cpu_before = CpuSeconds(d.pid());
  // One record to each connection per round, a round every millisecond.
  auto start = Clock::now();
  for (size_t off = 0, round = 0; off < stream.size(); off += 6, ++round) {
    // The slow sender's pace, not a wait.
    std::this_thread::sleep_until(start + std::chrono::microseconds(1000 * round));
    for (int fd : fds) ASSERT_TRUE(SendAll(fd, stream.data() + off, 6));
  }
  // Each connection gets its alert (unrecognized_name) and is closed: the hello was read.
  for (int fd : fds) {
    std::string reply = ReadToEof(fd, 64);
    EXPECT_EQ(reply, std::string("\x15\x03\x03\x00\x02\x02\x70", 7));
    close(fd);
  }
  double per_connection = (CpuSeconds(d.pid()) - cpu_before) / kConnections;
  std::printf("[ metric ] daemon CPU per 16 KiB ClientHello in 1-byte records: %.1f ms (%lld ms)\n",
              per_connection * 1e3, static_cast<long long>(MsSince(start)));
  EXPECT_TRUE(d.running());
}

// A TLS reader that stalls: the daemon stops reading the backend once its TLS output waits
// (the relay's watermarks), so the backend is held back: it gets rid of no more than the
// buffers on the way hold, where a daemon that read on would buffer the whole download
// (docs/libraries.md: 816 MB without watermarks). So again after a slow stretch; then
// everything arrives intact. (The daemon's memory itself is measured in bench/, never bounded
// in a test.)
TEST_F(TlsTest, SlowReaderHoldsTheBackendBack) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  ASSERT_FALSE(d.SaveJob("slow", backend.port()).empty());
  TlsConnect connect(d, dir_, "slow");
  ASSERT_GT(connect.port(), 0) << connect.Output();
  const uint64_t kBytes = TransferBytes(256ull << 20);
  // Far more than the buffers on the way (sockets, TLS records, `connect`) hold.
  constexpr uint64_t kOnTheWay = 64ull << 20;
  int fd = ConnectTcp(connect.port(), "127.0.0.1", 60000);
  ASSERT_GE(fd, 0);
  int small = 64 * 1024;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  ASSERT_TRUE(SendAll(fd, "download " + std::to_string(kBytes) + "\n"));
  uint64_t got = 0;
  auto backend_held_back = [&] {
    uint64_t sent = WaitUntilStill([&] { return backend.sent(); });
    if (sent < got + kOnTheWay && sent < kBytes) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "the daemon kept reading the backend: " << sent << " bytes sent, " << got << " read";
  };
  // Read the first MiB, then stop reading: the backend keeps pushing.
  Sha256 sha;
  std::vector<char> buf(256 * 1024);
  while (got < (1u << 20)) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    ASSERT_GT(n, 0);
    sha.Update(buf.data(), n);
    got += n;
  }
  EXPECT_TRUE(backend_held_back());
  // Then read slowly for a while, stall once more, and read the rest at full speed.
  for (int i = 0; i < 50; ++i) {
    ssize_t n = recv(fd, buf.data(), 16 * 1024, 0);
    ASSERT_GT(n, 0);
    sha.Update(buf.data(), n);
    got += n;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // a slow reader's pace
  }
  EXPECT_TRUE(backend_held_back());
  double cpu_before = CpuSeconds(d.pid());
  uint64_t fast_from = got;
  auto start = Clock::now();
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n <= 0) break;
    sha.Update(buf.data(), n);
    got += n;
  }
  int64_t ms = MsSince(start);
  double cpu = CpuSeconds(d.pid()) - cpu_before;
  std::printf(
      "[ metric ] connect --tls download of %llu MiB at full speed: %.0f MB/s; daemon CPU "
      "%.2f s per GiB\n",
      static_cast<unsigned long long>((got - fast_from) >> 20),
      (got - fast_from) / 1e3 / std::max<int64_t>(ms, 1),
      cpu / (static_cast<double>(got - fast_from) / (1 << 30)));
  close(fd);
  EXPECT_EQ(got, kBytes);
  EXPECT_EQ(sha.Hex(), PatternHash(kBytes));
}

}  // namespace
}  // namespace brokerproxy::testing
