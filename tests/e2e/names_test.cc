// One name is one job, end to end: job ids fold case in every op, on every proxy path and in
// certificates, between two real Unix users; the proxy's own names are never a job's.

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>

#include "e2e/harness.h"
#include "proxy/tls/certs.h"
#include "registry/json.h"
#include "registry/snapshot.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

bool Listening(int port) {
  int fd = ConnectTcp(port, "127.0.0.1", 2000);
  if (fd < 0) return false;
  close(fd);
  return true;
}

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

RunOptions As(uid_t uid) {
  RunOptions o;
  o.uid = uid;
  return o;
}

class NamesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }

  // A certificate directory of `uid`'s own (0700), inside the test's directory.
  std::string CertDirOf(uid_t uid, const std::string& name) {
    std::string path = dir_ / name;
    EXPECT_EQ(mkdir(path.c_str(), 0700), 0);
    EXPECT_EQ(chown(path.c_str(), uid, PrimaryGid(uid)), 0);
    return path;
  }
  // `curl https://<name>:<proxy port>/` with only the broker's CA trusted.
  RunResult Curl(const std::string& ca, const std::string& name, int port) {
    return RunCommand({"curl", "-sS", "--max-time", "15", "--cacert", ca, "--resolve",
                       name + ":" + std::to_string(port) + ":127.0.0.1",
                       "https://" + name + ":" + std::to_string(port) + "/?token=alices-token"});
  }

  TempDir dir_;
};

// After bp-alice saved ssl job "abc", bp-bob used to save "ABC", get a CA-signed certificate
// for abc.localhost, listen on alice's idle backend port with it, and read alice's requests
// while curl said "verify ok". Now "ABC" and "Abc" are alice's job for every op, bob gets no
// certificate, and curl through the proxy refuses bob's listener.
TEST_F(NamesTest, AnotherUserGetsNoSpellingOfAJobNorItsCertificate) {
  std::optional<uid_t> alice = TestUser("bp-alice");
  std::optional<uid_t> bob = TestUser("bp-bob");
  if (!alice || !bob || !CanRunAs(*alice) || !CanRunAs(*bob)) {
    GTEST_SKIP() << "needs the real users bp-alice and bp-bob";
  }
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ca = dir_ / "ca.pem";
  WriteFile(ca, d.Cli({"ca"}).out);
  std::string alice_certs = CertDirOf(*alice, "alice-certs");
  std::string bob_certs = CertDirOf(*bob, "bob-certs");
  PortReservation idle;  // alice's service is not up yet: the port is idle
  int alice_port = idle.port();

  RunResult saved = d.Cli({"save", "ssl", "--job-id", "abc", "--port", std::to_string(alice_port),
                           "--cert-dir", alice_certs, "--json"},
                          As(*alice));
  ASSERT_EQ(saved.exit_code, 0) << saved;
  std::string secret = JsonText(ParseOut(saved).get(), {"job", "secret"});
  ASSERT_FALSE(secret.empty());
  // Alice's certificate names her job and nothing else (not its backend 127.0.0.1).
  auto alice_cert = proxy::ParseCertificatePem(ReadFile(alice_certs + "/abc.crt"));
  ASSERT_TRUE(alice_cert.ok());
  EXPECT_EQ(proxy::SubjectAltNames(alice_cert->get()),
            std::vector<std::string>{"DNS:abc.localhost"});

  for (const std::string id : {"ABC", "Abc"}) {
    SCOPED_TRACE(id);
    RunResult ssl = d.Cli({"save", "ssl", "--job-id", id, "--port", std::to_string(alice_port),
                           "--cert-dir", bob_certs},
                          As(*bob));
    EXPECT_EQ(ssl.exit_code, 4) << ssl;  // permission denied
    EXPECT_FALSE(Exists(bob_certs + "/" + id + ".crt")) << "bob got a certificate for " << id;
    RunResult ssh = d.Cli({"save", "ssh", "--job-id", id, "--port", "9"}, As(*bob));
    EXPECT_EQ(ssh.exit_code, 4) << ssh;
    EXPECT_EQ(d.Cli({"load", id}, As(*bob)).exit_code, 4);
    EXPECT_EQ(d.Cli({"verify", id, secret}, As(*bob)).exit_code, 4);
    EXPECT_EQ(d.Cli({"remove", id}, As(*bob)).exit_code, 4);
    RunResult wait = d.Cli(
        {"save", "ssh", "--job-id", id, "--port", "9", "--wait", "--wait-timeout", "1s"}, As(*bob));
    EXPECT_EQ(wait.exit_code, 4) << wait;
    // Alice reaches her job by any spelling, and it is spelt the one way.
    auto load = ParseOut(d.Cli({"load", id, "--json"}, As(*alice)));
    EXPECT_EQ(JsonText(load.get(), {"job", "id"}), "abc");
    EXPECT_EQ(JsonText(load.get(), {"job", "secret"}), secret);
  }
  RunResult query = d.Cli({"query", "--json"}, As(*bob));
  EXPECT_EQ(query.exit_code, 0) << query;
  EXPECT_EQ(query.out.find("abc"), std::string::npos) << query;
  EXPECT_EQ(query.out.find("ABC"), std::string::npos) << query;
  auto all = ParseOut(d.Cli({"query", "--json"}));
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(all.get(), "jobs");
  ASSERT_EQ(cJSON_GetArraySize(jobs), 1);
  EXPECT_EQ(JsonText(cJSON_GetArrayItem(jobs, 0), {"id"}), "abc");
  EXPECT_EQ(JsonText(cJSON_GetArrayItem(jobs, 0), {"owner"}), std::to_string(*alice));

  // The attack itself: bob listens on alice's idle backend port with the best certificate he
  // can get (one for abc.localhost if any spelling got him one, else his own job's).
  RunResult own = d.Cli(
      {"save", "ssl", "--job-id", "bobjob", "--port", "9", "--cert-dir", bob_certs}, As(*bob));
  ASSERT_EQ(own.exit_code, 0) << own;
  std::string best = "bobjob";
  for (const char* id : {"ABC", "Abc"}) {
    if (Exists(bob_certs + "/" + id + ".crt")) best = id;
  }
  auto impostor = Child::Spawn(
      {"openssl", "s_server", "-accept", "127.0.0.1:" + std::to_string(alice_port), "-cert",
       bob_certs + "/" + best + ".crt", "-key", bob_certs + "/" + best + ".key", "-www"},
      dir_ / "impostor.log", As(*bob));
  ASSERT_TRUE(impostor);
  ASSERT_TRUE(WaitUntil([&] { return Listening(alice_port); })) << impostor->Output();
  // Alice's browser or curl, through the proxy (passthrough to "abc"'s backend) and straight.
  for (int port : {d.proxy_port(), alice_port}) {
    RunResult curl = Curl(ca, "abc.localhost", port);
    EXPECT_NE(curl.exit_code, 0) << "alice's request reached bob's listener: " << curl;
    EXPECT_FALSE(curl.timed_out) << curl;
  }
  impostor->Stop(SIGTERM);
  EXPECT_EQ(d.Log().find(secret), std::string::npos) << "secrets never appear in logs";
}

// A registry.json from before ids were case-insensitive, holding alice's "abc" and the "ABC"
// bob saved later: the daemon starts, the name stays alice's, and the log says what was
// dropped without a secret.
TEST_F(NamesTest, AnOldRegistryWithIdsThatDifferInCaseKeepsTheFirstJob) {
  std::optional<uid_t> alice = TestUser("bp-alice");
  std::optional<uid_t> bob = TestUser("bp-bob");
  if (!alice || !bob || !CanRunAs(*alice) || !CanRunAs(*bob)) {
    GTEST_SKIP() << "needs the real users bp-alice and bp-bob";
  }
  Daemon d(dir_);
  auto job = [](std::string id, uid_t owner, int64_t created, char secret) {
    registry::Job j;
    j.id = std::move(id);
    j.owner = owner;
    j.host = "127.0.0.1";
    j.port = 9;
    j.secret = std::string(64, secret);
    j.created = created;
    return j;
  };
  registry::Job squatter = job("ABC", *bob, 1'700'000'100, 'b');
  registry::Job owner = job("abc", *alice, 1'700'000'000, 'a');
  ASSERT_EQ(mkdir(d.state_dir().c_str(), 0711), 0);
  WriteFile(d.state_dir() + "/registry.json", registry::EncodeSnapshot({&squatter, &owner}), 0600);
  ASSERT_TRUE(d.Start());
  EXPECT_NE(d.Log().find("dropped job \"ABC\" of uid " + std::to_string(*bob)), std::string::npos)
      << d.Log();
  EXPECT_EQ(d.Log().find(squatter.secret), std::string::npos);
  EXPECT_EQ(d.Log().find(owner.secret), std::string::npos);
  for (const char* id : {"abc", "ABC"}) {
    auto load = ParseOut(d.Cli({"load", id, "--json"}, As(*alice)));
    EXPECT_EQ(JsonText(load.get(), {"job", "id"}), "abc") << id;
    EXPECT_EQ(JsonText(load.get(), {"job", "secret"}), owner.secret) << id;
    EXPECT_EQ(d.Cli({"load", id}, As(*bob)).exit_code, 4) << id;
  }
  int fd = ConnectTcp(d.proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 ABC " + squatter.secret + "\n"));
  EXPECT_EQ(ReadLine(fd), "ERR denied");
  close(fd);
}

// Whatever the spelling in the request, the preamble and SNI reach the one job.
TEST_F(NamesTest, PreambleAndServerNameInAnyCaseReachTheJob) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  Backend backend;
  std::string secret = d.SaveJob("abc", backend.port());
  ASSERT_FALSE(secret.empty());
  int fd = ConnectTcp(d.proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 ABC " + secret + "\necho\nhello\n"));
  EXPECT_EQ(ReadLine(fd), "OK");
  EXPECT_EQ(ReadLine(fd), "hello");
  close(fd);

  // An ssl job saved as "WEB" is job "web": SNI arrives lower-cased and must find it.
  std::string ca = dir_ / "ca.pem";
  WriteFile(ca, d.Cli({"ca"}).out);
  // No --port: the save picks a free one from the port range and gives it to the command.
  auto server =
      Child::Spawn({BinaryPath(), "save", "ssl", "--job-id", "WEB", "--cert-dir", dir_ / "certs",
                    "-c", d.config_path(), "--", "openssl", "s_server", "-accept",
                    "127.0.0.1:{port}", "-cert", "{cert}", "-key", "{certkey}", "-www"},
                   dir_ / "s_server.log");
  ASSERT_TRUE(server);
  ASSERT_TRUE(WaitUntil([&] {
    auto j = ParseOut(d.Cli({"load", "web", "--json"}));
    return j && JsonText(j.get(), {"job", "ready"}) == "true";
  })) << server->Output()
      << d.Log();
  for (const char* name : {"web.localhost", "WEB.localhost"}) {
    RunResult curl = Curl(ca, name, d.proxy_port());
    EXPECT_EQ(curl.exit_code, 0) << name << ": " << curl << "\n" << d.Log();
    EXPECT_NE(curl.out.find("s_server"), std::string::npos) << curl;
  }
  server->Stop(SIGTERM);
}

// Certificates used to name the backend host's addresses, looked up with a blocking
// getaddrinfo on the daemon's thread pool: with slow DNS, a few `save ssl` calls held every
// pool thread, and everyone's saves (whose registry writes use the same pool) waited. Here the
// daemon's getaddrinfo takes 20 s for names containing "slow-dns"; issuing resolves nothing, so
// eight `save ssl` with such backend hosts and a plain save beside them finish at once.
TEST_F(NamesTest, IssuingACertificateResolvesNothing) {
  std::string src = dir_ / "slow_dns.c";
  WriteFile(src, R"(#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <string.h>
#include <unistd.h>
int getaddrinfo(const char* node, const char* service, const struct addrinfo* hints,
                struct addrinfo** res) {
  int (*real)(const char*, const char*, const struct addrinfo*, struct addrinfo**) =
      dlsym(RTLD_NEXT, "getaddrinfo");
  if (node && strstr(node, "slow-dns")) sleep(20); /* a slow name service, not a wait */
  return real(node, service, hints, res);
}
)");
  std::string shim = dir_ / "slow_dns.so";
  RunResult cc = RunCommand({"cc", "-shared", "-fPIC", "-o", shim, src, "-ldl"});
  if (cc.exit_code != 0) GTEST_SKIP() << "cannot build the slow getaddrinfo: " << cc;
  Daemon d(dir_);
  const char* asan = std::getenv("ASAN_OPTIONS");
  // The sanitizer runtime wants to come first among preloaded libraries; the shim comes first.
  d.set_launcher({"env", "LD_PRELOAD=" + shim,
                  std::string("ASAN_OPTIONS=") + (asan ? asan : "") + ":verify_asan_link_order=0"});
  ASSERT_TRUE(d.Start());
  ASSERT_NE(ReadFile("/proc/" + std::to_string(d.pid()) + "/maps").find("slow_dns.so"),
            std::string::npos)
      << "the daemon runs without the slow getaddrinfo, so this test could not fail";

  auto start = Clock::now();
  std::vector<std::unique_ptr<Child>> saves;
  for (int i = 0; i < 8; ++i) {
    std::string id = "s" + std::to_string(i);
    saves.push_back(
        Child::Spawn({BinaryPath(), "save", "ssl", "--job-id", id, "--host", "node-slow-dns-" + id,
                      "--port", "9", "--cert-dir", dir_ / "certs", "-c", d.config_path()},
                     dir_ / (id + ".log")));
  }
  saves.push_back(Child::Spawn(
      {BinaryPath(), "save", "ssh", "--job-id", "plain", "--port", "9", "-c", d.config_path()},
      dir_ / "plain.log"));
  ASSERT_TRUE(WaitUntil(
      [&] {
        for (auto& c : saves) {
          if (c && c->Running()) return false;
        }
        return true;
      },
      60000));
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
  for (auto& c : saves) {
    ASSERT_TRUE(c);
    EXPECT_EQ(c->Stop(), 0) << c->Output();
  }
  // Generous for an ASan build on a loaded machine; one slow look-up alone takes 20 s.
  EXPECT_LT(elapsed.count(), 15000) << "saves waited for DNS";
  auto cert = proxy::ParseCertificatePem(ReadFile(dir_ / "certs/s0.crt"));
  ASSERT_TRUE(cert.ok());
  EXPECT_EQ(proxy::SubjectAltNames(cert->get()), std::vector<std::string>{"DNS:s0.localhost"});
}

// A job named so that <job>.<tls_domain> is one of the proxy's own names would capture the
// proxy's TLS connections and get a certificate for the proxy's name: refused at save.
TEST_F(NamesTest, AJobCannotBeNamedLikeTheProxy) {
  // The proxy is known to clients as login1.localhost ([client] proxy), under the domain.
  Daemon d(dir_, "[client]\nproxy = login1.localhost:7000\n");
  ASSERT_TRUE(d.Start());
  for (const char* id : {"login1", "LOGIN1"}) {
    for (const char* type : {"ssh", "ssl"}) {
      RunResult r =
          d.Cli({"save", type, "--job-id", id, "--port", "9", "--cert-dir", dir_ / "certs"});
      EXPECT_EQ(r.exit_code, 2) << id << " " << type << ": " << r;
      EXPECT_NE(r.err.find("login1.localhost is a name of the proxy itself"), std::string::npos)
          << r;
    }
  }
  EXPECT_EQ(d.Cli({"load", "login1"}).exit_code, 5);
  EXPECT_FALSE(Exists(dir_ / "certs/login1.crt"));
  RunResult fine =
      d.Cli({"save", "ssl", "--job-id", "login2", "--port", "9", "--cert-dir", dir_ / "certs"});
  EXPECT_EQ(fine.exit_code, 0) << fine;
}

}  // namespace
}  // namespace brokerproxy::testing
