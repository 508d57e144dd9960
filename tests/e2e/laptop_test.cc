// `connect` from a laptop: no daemon there and no config.ini. The "laptop" is a CLI run with
// its own empty HOME and a control socket that does not exist; the login node is the daemon of
// the test. The secret comes from a file, stdin or BROKER_SECRET (never argv); `--tls` checks
// the CA against a fingerprint the user gives or one pinned on first use; `load` reports what
// a laptop needs.

#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cctype>
#include <string>
#include <vector>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

// Sends 1 MiB through `port` to an echo backend; true if the same bytes came back.
::testing::AssertionResult EchoesThrough(int port) {
  int fd = ConnectTcp(port, "127.0.0.1", 30000);
  if (fd < 0) return ::testing::AssertionFailure() << "cannot connect to " << port;
  constexpr uint64_t kBytes = 1 << 20;
  bool sent = SendAll(fd, "echo\n");
  EchoResult r = sent ? EchoTransfer(fd, kBytes) : EchoResult{};
  close(fd);
  if (r.received_bytes != kBytes || r.sent != r.received) {
    return ::testing::AssertionFailure()
           << "echo through " << port << ": " << r.received_bytes << " bytes back";
  }
  return ::testing::AssertionSuccess();
}

// The port in "listening on 127.0.0.1:PORT", or 0.
int ListeningPort(Child* c) {
  auto line = c->WaitFor("listening on 127.0.0.1:", 30000);
  if (!line) return 0;
  return std::stoi(line->substr(line->find("127.0.0.1:") + 10));
}

// SHA-256 of the first certificate of PEM `text`, as "SHA256:<lower hex>" (openssl's view).
std::string OpensslFingerprint(const TempDir& dir, const std::string& pem) {
  std::string path = dir / "fp.pem";
  WriteFile(path, pem);
  RunResult r = RunCommand({"openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", path});
  size_t eq = r.out.find('=');
  if (r.exit_code != 0 || eq == std::string::npos) return "";
  std::string hex;
  for (char c : r.out.substr(eq + 1)) {
    if (std::isxdigit(static_cast<unsigned char>(c))) {
      hex += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  return "SHA256:" + hex;
}

// Makes daemon `d` (not started yet) listen on `address` instead of the harness's default.
void ListenOn(const Daemon& d, const std::string& address) {
  std::string config = ReadFile(d.config_path());
  size_t at = config.find("listen = 127.0.0.1:0\n");
  ASSERT_NE(at, std::string::npos) << config;
  config.replace(at, 20, "listen = " + address);
  WriteFile(d.config_path(), config);
}

class LaptopTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }
  LaptopTest() : daemon_(dir_) {
    ::mkdir((dir_ / "home").c_str(), 0700);
    // The laptop's config names only a control socket that does not exist.
    WriteFile(dir_ / "laptop.ini",
              "[broker]\ncontrol_socket = " + (dir_ / "no-daemon/x.sock") + "\n");
  }
  void SetUp() override { ASSERT_TRUE(daemon_.Start()); }

  std::string Home() const { return dir_ / "home"; }
  std::string PinFile() const { return Home() + "/.config/brokerproxy/known_cas"; }
  // `timeout_ms` bounds a run that should fail at once (and would listen if it did not).
  RunOptions Env(std::vector<std::string> extra = {}, int timeout_ms = 60000) const {
    RunOptions o;
    o.timeout_ms = timeout_ms;
    o.env = {"HOME=" + Home(), "XDG_CONFIG_HOME=", "BROKER_SECRET=", "BROKERPROXY_CONFIG="};
    o.env.insert(o.env.end(), extra.begin(), extra.end());
    return o;
  }
  // `brokerproxy connect JOB --listen 127.0.0.1:0 --proxy <daemon> -c laptop.ini ARGS...`
  std::vector<std::string> Connect(const std::string& job, std::vector<std::string> args,
                                   int proxy_port = 0) const {
    std::vector<std::string> argv = {
        BinaryPath(),
        "connect",
        job,
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        "127.0.0.1:" + std::to_string(proxy_port ? proxy_port : daemon_.proxy_port()),
        "-c",
        dir_ / "laptop.ini"};
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  }
  std::unique_ptr<Child> Spawn(const std::vector<std::string>& argv, const RunOptions& o) {
    return Child::Spawn(argv, dir_ / ("connect-" + std::to_string(++spawned_) + ".log"), o);
  }
  std::string CaFingerprint() {
    auto j = ParseOut(daemon_.Cli({"load", job_, "--json"}));
    return j ? JsonText(j.get(), {"ca_fingerprint"}) : "";
  }
  std::string SecretFile(const std::string& secret, int mode = 0600) {
    std::string path = dir_ / ("secret-" + std::to_string(++spawned_));
    WriteFile(path, secret + "\n", mode);
    chmod(path.c_str(), mode);
    return path;
  }

  TempDir dir_;
  Daemon daemon_;
  Backend backend_;
  std::string job_ = "lap";
  int spawned_ = 0;
};

TEST_F(LaptopTest, LoadReportsTheProxyAddressDomainAndCaFingerprint) {
  ASSERT_FALSE(daemon_.SaveJob(job_, backend_.port()).empty());
  RunResult r = daemon_.Cli({"load", job_, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  auto j = ParseOut(r.out);
  ASSERT_TRUE(j) << r;
  const cJSON* proxies = cJSON_GetObjectItemCaseSensitive(j.get(), "proxy");
  ASSERT_TRUE(cJSON_IsArray(proxies)) << r;
  ASSERT_EQ(cJSON_GetArraySize(proxies), 1) << r;
  EXPECT_EQ(std::string(cJSON_GetArrayItem(proxies, 0)->valuestring),
            "127.0.0.1:" + std::to_string(daemon_.proxy_port()));
  EXPECT_EQ(JsonText(j.get(), {"tls_domain"}), "localhost");
  // The current CA: the first certificate `brokerproxy ca` prints.
  RunResult ca = daemon_.Cli({"ca"});
  ASSERT_EQ(ca.exit_code, 0) << ca;
  std::string expected = OpensslFingerprint(dir_, ca.out);
  ASSERT_EQ(expected.size(), 7u + 64u);
  EXPECT_EQ(JsonText(j.get(), {"ca_fingerprint"}), expected);

  RunResult human = daemon_.Cli({"load", job_});
  ASSERT_EQ(human.exit_code, 0) << human;
  EXPECT_NE(human.out.find("proxy:    127.0.0.1:" + std::to_string(daemon_.proxy_port())),
            std::string::npos)
      << human;
  EXPECT_NE(human.out.find("ca:       " + expected), std::string::npos) << human;
}

TEST_F(LaptopTest, PlainConnectTakesTheSecretFromAFileStdinOrTheEnvironment) {
  std::string secret = daemon_.SaveJob(job_, backend_.port());
  ASSERT_FALSE(secret.empty());

  // A file only its owner can read; the URL with the token only when asked.
  std::string file = SecretFile(secret);
  auto from_file = Spawn(Connect(job_, {"--secret-file", file, "--token-url"}), Env());
  int port = ListeningPort(from_file.get());
  ASSERT_GT(port, 0) << from_file->Output();
  EXPECT_TRUE(EchoesThrough(port));
  std::string base = "http://127.0.0.1:" + std::to_string(port) + "/";
  EXPECT_TRUE(from_file->WaitFor("brokerproxy: open " + base)) << from_file->Output();
  EXPECT_TRUE(from_file->WaitFor(base + "?token=" + secret)) << from_file->Output();
  EXPECT_EQ(from_file->Stop(), 0) << from_file->Output();

  // stdin.
  std::vector<std::string> argv = Connect(job_, {"--secret-file", "-"});
  std::vector<std::string> sh = {"/bin/sh", "-c", "exec \"$0\" \"$@\" < " + file};
  sh.insert(sh.end(), argv.begin(), argv.end());
  auto from_stdin = Spawn(sh, Env());
  port = ListeningPort(from_stdin.get());
  ASSERT_GT(port, 0) << from_stdin->Output();
  EXPECT_TRUE(EchoesThrough(port));
  // No token URL unless asked: the secret is nowhere in the output.
  EXPECT_EQ(from_stdin->Output().find(secret), std::string::npos) << from_stdin->Output();
  EXPECT_EQ(from_stdin->Stop(), 0) << from_stdin->Output();

  // The environment.
  auto from_env = Spawn(Connect(job_, {}), Env({"BROKER_SECRET=" + secret}));
  port = ListeningPort(from_env.get());
  ASSERT_GT(port, 0) << from_env->Output();
  EXPECT_TRUE(EchoesThrough(port));
  EXPECT_EQ(from_env->Stop(), 0) << from_env->Output();
}

TEST_F(LaptopTest, WithoutASecretOrADaemonTheErrorSaysTheWays) {
  RunResult r = RunCommand(Connect(job_, {}), Env({}, 20000));
  EXPECT_EQ(r.exit_code, 3) << r;
  for (const char* way : {"--secret-file PATH", "--secret-file -", "BROKER_SECRET", "--via"}) {
    EXPECT_NE(r.err.find(way), std::string::npos) << way << "\n" << r;
  }
}

TEST_F(LaptopTest, TheSecretCannotBeGivenOnTheCommandLine) {
  std::string secret = daemon_.SaveJob(job_, backend_.port());
  ASSERT_FALSE(secret.empty());
  // Neither as an option nor as an extra argument: the command line is in everyone's `ps`.
  for (std::vector<std::string> extra :
       {std::vector<std::string>{"--secret", secret}, {secret}, {"--secret=" + secret}}) {
    RunResult r = RunCommand(Connect(job_, extra), Env({}, 20000));
    EXPECT_EQ(r.exit_code, 2) << r;
  }
}

TEST_F(LaptopTest, ASecretFileOthersCanReadIsRefused) {
  std::string secret = daemon_.SaveJob(job_, backend_.port());
  ASSERT_FALSE(secret.empty());
  std::string file = SecretFile(secret, 0644);
  RunResult r = RunCommand(Connect(job_, {"--secret-file", file}), Env({}, 20000));
  EXPECT_EQ(r.exit_code, 4) << r;
  EXPECT_NE(r.err.find("chmod 600 " + file), std::string::npos) << r;
  EXPECT_EQ(r.err.find(secret), std::string::npos) << r;
}

// --tls with nothing but the secret: the CA the proxy presents is pinned on first use, used
// again later, and another CA at the same address is refused loudly.
TEST_F(LaptopTest, TlsPinsTheCaOnFirstUseAndRefusesAnotherLater) {
  std::string secret = daemon_.SaveJob(job_, backend_.port());
  ASSERT_FALSE(secret.empty());
  std::string fingerprint = CaFingerprint();
  ASSERT_FALSE(fingerprint.empty());
  std::string file = SecretFile(secret);
  std::string address = "127.0.0.1:" + std::to_string(daemon_.proxy_port());

  auto first = Spawn(Connect(job_, {"--tls", "--secret-file", file}), Env());
  int port = ListeningPort(first.get());
  ASSERT_GT(port, 0) << first->Output();
  EXPECT_TRUE(EchoesThrough(port));
  EXPECT_NE(first->Output().find("pinned its CA " + fingerprint), std::string::npos)
      << first->Output();
  EXPECT_EQ(first->Stop(), 0) << first->Output();
  struct stat st {};
  ASSERT_EQ(stat(PinFile().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(ReadFile(PinFile()), address + " " + fingerprint + "\n");

  auto second = Spawn(Connect(job_, {"--tls", "--secret-file", file}), Env());
  port = ListeningPort(second.get());
  ASSERT_GT(port, 0) << second->Output();
  EXPECT_TRUE(EchoesThrough(port));
  EXPECT_EQ(second->Output().find("pinned"), std::string::npos) << second->Output();
  EXPECT_EQ(second->Stop(), 0) << second->Output();

  // Another broker (another CA) on the same address.
  int proxy_port = daemon_.proxy_port();
  daemon_.Stop();
  TempDir other_dir;
  Daemon other(other_dir);
  ListenOn(other, "127.0.0.1:" + std::to_string(proxy_port));
  ASSERT_TRUE(other.Start());
  Backend other_backend;
  ASSERT_FALSE(other.SaveJob(job_, other_backend.port()).empty());
  auto j = ParseOut(other.Cli({"load", job_, "--json"}));
  ASSERT_TRUE(j);
  std::string other_fingerprint = JsonText(j.get(), {"ca_fingerprint"});
  ASSERT_NE(other_fingerprint, fingerprint);
  RunResult refused = RunCommand(Connect(job_, {"--tls", "--secret-file", file}), Env({}, 20000));
  EXPECT_EQ(refused.exit_code, 4) << refused;
  EXPECT_NE(refused.err.find("HAS CHANGED"), std::string::npos) << refused;
  EXPECT_NE(refused.err.find(PinFile()), std::string::npos) << refused;
  EXPECT_NE(refused.err.find(fingerprint), std::string::npos) << refused;
  EXPECT_NE(refused.err.find(other_fingerprint), std::string::npos) << refused;
  EXPECT_EQ(ReadFile(PinFile()), address + " " + fingerprint + "\n") << "the pin stays";
  EXPECT_EQ(other_backend.connections(), 0) << "nothing reached the other broker's job";
}

TEST_F(LaptopTest, TlsChecksTheCaAgainstAGivenFingerprint) {
  std::string secret = daemon_.SaveJob(job_, backend_.port());
  ASSERT_FALSE(secret.empty());
  std::string fingerprint = CaFingerprint();
  ASSERT_EQ(fingerprint.size(), 7u + 64u);
  std::string file = SecretFile(secret);

  // As `load` prints it, and as openssl prints it (upper case, colons).
  std::string colons;
  for (size_t i = 7; i < fingerprint.size(); i += 2) {
    colons += (colons.empty() ? "" : ":") + fingerprint.substr(i, 2);
  }
  for (char& c : colons) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const std::string& given : {fingerprint, colons}) {
    auto c =
        Spawn(Connect(job_, {"--tls", "--secret-file", file, "--ca-fingerprint", given}), Env());
    int port = ListeningPort(c.get());
    ASSERT_GT(port, 0) << c->Output();
    EXPECT_TRUE(EchoesThrough(port));
    EXPECT_EQ(c->Stop(), 0) << c->Output();
  }
  struct stat st {};
  EXPECT_NE(stat(PinFile().c_str(), &st), 0) << "a given fingerprint pins nothing";

  std::string wrong = "SHA256:" + std::string(64, 'a');
  RunResult r = RunCommand(
      Connect(job_, {"--tls", "--secret-file", file, "--ca-fingerprint", wrong}), Env({}, 20000));
  EXPECT_EQ(r.exit_code, 4) << r;
  EXPECT_NE(r.err.find("not the expected " + wrong), std::string::npos) << r;
  EXPECT_NE(r.err.find(fingerprint), std::string::npos) << r;
  EXPECT_EQ(backend_.connections(), 2) << "only the two good runs reached the job";

  RunResult bad = RunCommand(
      Connect(job_, {"--tls", "--secret-file", file, "--ca-fingerprint", "SHA256:xyz"}), Env());
  EXPECT_EQ(bad.exit_code, 2) << bad;
}

// A real service behind it: Jupyter Notebook started with the job's secret as its token. The
// URL that `connect --token-url` prints opens it (curl, as a browser would); without the token
// Jupyter refuses.
TEST_F(LaptopTest, TheTokenUrlOpensJupyter) {
  if (access("/usr/bin/jupyter-notebook", X_OK) != 0) {
    GTEST_SKIP() << "jupyter-notebook is not installed (apt-get install jupyter-notebook)";
  }
  RunResult save = daemon_.Cli({"save", "ssh", "--job-id", "nb", "--json"});
  ASSERT_EQ(save.exit_code, 0) << save;
  auto saved = ParseOut(save.out);
  ASSERT_TRUE(saved) << save;
  std::string secret = JsonText(saved.get(), {"job", "secret"});
  std::string backend_port = JsonText(saved.get(), {"job", "port"});
  ::mkdir((dir_ / "nbhome").c_str(), 0700);
  RunOptions nb_env;
  nb_env.env = {"HOME=" + (dir_ / "nbhome"), "JUPYTER_TOKEN=" + secret};
  auto notebook = Child::Spawn(
      {"/usr/bin/jupyter-notebook", "--no-browser", "--allow-root", "--ip=127.0.0.1",
       "--port=" + backend_port, "--port-retries=0", "--notebook-dir=" + (dir_ / "nbhome")},
      dir_ / "notebook.log", nb_env);
  ASSERT_TRUE(notebook);
  ASSERT_TRUE(WaitUntil(
      [&] {
        int fd = ConnectTcp(std::stoi(backend_port));
        if (fd >= 0) close(fd);
        return fd >= 0;
      },
      60000))
      << notebook->Output();

  std::string file = SecretFile(secret);
  auto c = Spawn(Connect("nb", {"--secret-file", file, "--token-url"}), Env());
  int port = ListeningPort(c.get());
  ASSERT_GT(port, 0) << c->Output();
  std::string base = "http://127.0.0.1:" + std::to_string(port) + "/";
  auto url = c->WaitFor(base + "?token=");
  ASSERT_TRUE(url) << c->Output();
  std::string token_url = url->substr(url->find(base));
  while (!token_url.empty() && std::isspace(static_cast<unsigned char>(token_url.back()))) {
    token_url.pop_back();
  }
  // The printed URL logs in (a redirect into the notebook with a session cookie); the API
  // answers with the token and refuses without it.
  std::string jar = dir_ / "cookies";
  RunResult opened =
      RunCommand({"curl", "-sS", "-L", "--max-time", "30", "-c", jar, "-b", jar, "-o", "/dev/null",
                  "-w", "%{http_code} %{url_effective}", token_url});
  EXPECT_EQ(opened.exit_code, 0) << opened;
  EXPECT_EQ(opened.out.substr(0, 4), "200 ") << opened;
  EXPECT_NE(opened.out.find("/tree"), std::string::npos) << opened;
  std::string api = base + "api/status";
  RunResult with = RunCommand({"curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w",
                               "%{http_code}", api + "?token=" + secret});
  EXPECT_EQ(with.out, "200") << with;
  RunResult without =
      RunCommand({"curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}", api});
  EXPECT_EQ(without.out, "403") << without;
  EXPECT_EQ(c->Stop(), 0) << c->Output();
  notebook->Stop(SIGTERM, 20000);
}

}  // namespace
}  // namespace brokerproxy::testing
