// A real Jupyter Notebook (Debian 12's 6.4) in a job, reached every documented way, with the
// job's secret kept out of every command line (e2e/notebook.h has the fixture):
//   - exec mode's --secret-env: the secret in the service's environment, a warning for
//     {secret} in its arguments, /proc/*/cmdline of every process scanned while it runs;
//   - one acceptance test per access path: `connect --listen`, `connect --via` through a real
//     sshd, `connect` and `connect --tls` from a laptop with no daemon, stock `ssh -L` with sshpass
//     against the embedded endpoint, an `ssl` job through SNI passthrough (curl, python, headless
//     Chromium);
//   - the README's and docs/tls.md's recipes, read out of the documents and run as written.

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "e2e/harness.h"
#include "e2e/notebook.h"

namespace brokerproxy::testing {
namespace {

std::string Joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

// The children of `pid` (from /proc/*/stat).
std::vector<pid_t> ChildrenOf(pid_t pid) {
  std::vector<pid_t> children;
  RunResult ps = RunCommand({"ps", "-o", "pid=", "--ppid", std::to_string(pid)});
  size_t at = 0;
  while (at < ps.out.size()) {
    size_t end = ps.out.find('\n', at);
    std::string line = ps.out.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (line.find_first_of("0123456789") != std::string::npos) {
      children.push_back(std::atoi(line.c_str()));
    }
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return children;
}

std::string ProcFile(pid_t pid, const char* name) {
  std::string text = ReadFile("/proc/" + std::to_string(pid) + "/" + name);
  for (char& c : text) c = c == '\0' ? '\n' : c;
  return text;
}

// `connect JOB --listen 0` through the daemon's proxy, as `uid`; *port is its local port.
std::unique_ptr<Child> ConnectListen(const Daemon& d, const TempDir& dir, const std::string& job,
                                     std::optional<uid_t> uid, int* port) {
  *port = 0;
  RunOptions o;
  o.uid = uid;
  auto connect = Child::Spawn({BinaryPath(), "connect", job, "--listen", "0", "-c", d.config_path(),
                               "--proxy", "127.0.0.1:" + std::to_string(d.proxy_port())},
                              dir / ("connect-" + job + ".log"), o);
  if (!connect) return connect;
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  if (line) *port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  return connect;
}

class NotebookTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = NotebookMissing();
    if (!missing.empty()) GTEST_SKIP() << missing;
    auto alice = TestUser("bp-alice");
    if (!alice || !CanRunAs(*alice)) GTEST_SKIP() << "needs the test user bp-alice";
    alice_ = *alice;
    ASSERT_TRUE(daemon_.Start());
  }

  // The broker's CA bundle in a file, as a user saves it (`brokerproxy ca > ca.pem`).
  std::string SaveCa() {
    RunResult ca = daemon_.Cli({"ca"});
    EXPECT_EQ(ca.exit_code, 0) << ca;
    WriteFile(dir_ / "ca.pem", ca.out);
    return dir_ / "ca.pem";
  }
  std::string SniUrl(const std::string& job) const {
    return "https://" + job + ".localhost:" + std::to_string(daemon_.proxy_port());
  }

  TempDir dir_;
  Daemon daemon_{dir_};
  uid_t alice_ = 0;
};

// --secret-env: the notebook gets its token from the environment, and no process of the job
// (`save`, the exec wrapper, the notebook, a kernel) nor any other shows it in its command line,
// which every user of the node can read.
TEST_F(NotebookTest, SecretEnvKeepsTheTokenOutOfEveryCommandLine) {
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("env1"));
  ASSERT_EQ(nb.token().size(), 64u);
  // The notebook took the job's secret as its token (straight to its port).
  ASSERT_TRUE(CheckNotebook("http://127.0.0.1:" + std::to_string(nb.port()), nb.token()));

  // Our processes are there: `save` and, below it, the notebook (the exec wrapper exec'd it),
  // which has the token in its environment (readable by its owner and root only).
  std::vector<pid_t> below = ChildrenOf(nb.save_pid());
  ASSERT_EQ(below.size(), 1u) << nb.Output();
  EXPECT_NE(ProcFile(below[0], "cmdline").find("jupyter"), std::string::npos);
  EXPECT_NE(ProcFile(below[0], "environ").find("\nJUPYTER_TOKEN=" + nb.token() + "\n"),
            std::string::npos);
  struct stat st {};
  ASSERT_EQ(::stat(("/proc/" + std::to_string(below[0]) + "/environ").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0077, 0u) << "environ is for its owner only";

  // A kernel that stays up during the scan.
  RunOptions o;
  o.stdin_data = "header = \"Authorization: token " + nb.token() + "\"\n";
  RunResult kernel =
      RunCommand({"curl", "-sS", "--fail", "--max-time", "30", "-K", "-", "-X", "POST", "-d", "{}",
                  "http://127.0.0.1:" + std::to_string(nb.port()) + "/api/kernels"},
                 o);
  ASSERT_EQ(kernel.exit_code, 0) << kernel;
  ASSERT_TRUE(WaitUntil([&] { return !ChildrenOf(below[0]).empty(); }, 30000)) << nb.Output();

  std::vector<std::string> showing = ProcessesShowing(nb.token());
  EXPECT_TRUE(showing.empty()) << "command lines with the secret:\n" << Joined(showing);
  EXPECT_EQ(nb.Output().find(nb.token()), std::string::npos) << "the secret was printed";
  nb.Stop();
}

// The scan above sees a secret that is on a command line: the documentation's old recipe,
// {secret} in the notebook's arguments, shows it to everyone, and `save` says so loudly.
TEST_F(NotebookTest, SecretInTheArgumentsShowsInPsAndIsWarnedAbout) {
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("argv1",
                       "brokerproxy save ssh -- jupyter notebook --no-browser --ip=127.0.0.1 "
                       "--port={port} --NotebookApp.token={secret}"));
  EXPECT_FALSE(ProcessesShowing(nb.token()).empty());
  std::string out = nb.Output();
  EXPECT_NE(out.find("WARNING: {secret} in the command's arguments"), std::string::npos) << out;
  EXPECT_NE(out.find("--secret-env NAME"), std::string::npos) << out;
  nb.Stop();
}

// Path: `connect --listen` on the login node, run by the job's owner.
TEST_F(NotebookTest, ReachedThroughConnectListen) {
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("plain1"));
  int port = 0;
  auto connect = ConnectListen(daemon_, dir_, nb.job(), alice_, &port);
  ASSERT_GT(port, 0) << (connect ? connect->Output() : "");
  NotebookCheck check;
  check.uid = alice_;  // `connect --listen` serves only its own user
  EXPECT_TRUE(CheckNotebook("http://127.0.0.1:" + std::to_string(port), nb.token(), check))
      << connect->Output() << daemon_.Log();
}

// Path: `connect --via` from a laptop that can only ssh to the login node (a real sshd here).
TEST_F(NotebookTest, ReachedThroughConnectVia) {
  LoginSshd sshd(dir_);
  ASSERT_TRUE(sshd.Start());
  WriteFile(dir_ / "client.ini",
            "[client]\nremote_command = env BROKERPROXY_CONFIG=" + daemon_.config_path() + " " +
                BinaryPath() + "\nproxy = 127.0.0.1:" + std::to_string(daemon_.proxy_port()) +
                "\n");
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("via1"));
  RunOptions laptop;
  laptop.env = {"HOME=" + sshd.home(), "SSH_AUTH_SOCK="};
  auto connect = Child::Spawn({BinaryPath(), "connect", nb.job(), "--listen", "0", "-c",
                               dir_ / "client.ini", "--via", sshd.via(), "--accept-new-host-key"},
                              dir_ / "connect-via.log", laptop);
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output() << sshd.Log();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  EXPECT_TRUE(CheckNotebook("http://127.0.0.1:" + std::to_string(port), nb.token()))
      << connect->Output() << daemon_.Log();
  EXPECT_EQ(sshd.Log().find(nb.token()), std::string::npos);

  // The URL the README says to open, in a browser: the token logs it in to Jupyter's file
  // browser.
  std::string missing = ChromiumMissing();
  if (!missing.empty()) GTEST_SKIP() << missing;
  RunResult tree = ChromiumDumpDom(
      dir_, SaveCa(), "http://127.0.0.1:" + std::to_string(port) + "/?token=" + nb.token());
  EXPECT_NE(tree.out.find("Select or create a notebook"), std::string::npos) << tree;
}

// Path: an `ssl` job, its notebook serving TLS with the job's certificate, reached by its name
// through SNI passthrough: curl and python with the broker CA, and headless Chromium with the
// CA in its NSS database loading pages only the notebook serves.
TEST_F(NotebookTest, SslJobThroughSniPassthroughAndChromium) {
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("tls1", NotebookCommand("ssl")));
  std::string ca = SaveCa();
  NotebookCheck check;
  check.ca_file = ca;
  check.connect_to = "127.0.0.1";
  EXPECT_TRUE(CheckNotebook(SniUrl(nb.job()), nb.token(), check)) << nb.Output() << daemon_.Log();

  std::string missing = ChromiumMissing();
  if (!missing.empty()) GTEST_SKIP() << missing;
  // A page of the notebook's directory, opened with the token in the URL as a user does.
  WriteFile(nb.root() + "/page.html",
            "<html><body><p>served by the notebook of job tls1</p></body></html>", 0644);
  RunResult page =
      ChromiumDumpDom(dir_, ca, SniUrl(nb.job()) + "/files/page.html?token=" + nb.token());
  EXPECT_NE(page.out.find("served by the notebook of job tls1"), std::string::npos) << page << "\n"
                                                                                    << nb.Output();
  // Jupyter's own file browser, with the cookie the token gave.
  RunResult tree = ChromiumDumpDom(dir_, ca, SniUrl(nb.job()) + "/tree?token=" + nb.token());
  EXPECT_NE(tree.out.find("Select or create a notebook"), std::string::npos) << tree;
}

// Path: `connect` from a laptop, which has no daemon and no config.ini: the job's owner, with a
// HOME of her own, gives the proxy address and the secret in a file of mode 0600 (as the README
// shows). Plain, as behind her own `ssh -L` to the login node (a loopback proxy address), and
// with --tls, where the broker CA comes with the proxy's certificate and is pinned on first use.
TEST_F(NotebookTest, ReachedThroughConnectFromALaptopPlainAndTls) {
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("tls2"));
  std::string home = dir_ / "laptop-home";
  ASSERT_EQ(::mkdir(home.c_str(), 0700), 0);
  ASSERT_EQ(::chown(home.c_str(), alice_, static_cast<gid_t>(-1)), 0);
  WriteFile(home + "/secret", nb.token() + "\n", 0600);
  ASSERT_EQ(::chown((home + "/secret").c_str(), alice_, static_cast<gid_t>(-1)), 0);
  RunOptions laptop;
  laptop.uid = alice_;
  // No config file anywhere it is looked for, and no daemon at the default control socket.
  laptop.env = {"HOME=" + home,
                "BROKERPROXY_CONFIG=", "XDG_CONFIG_HOME=", "XDG_STATE_HOME=", "BROKER_SECRET="};
  for (bool tls : {false, true}) {
    SCOPED_TRACE(tls ? "--tls" : "plain");
    std::vector<std::string> argv = {BinaryPath(),
                                     "connect",
                                     nb.job(),
                                     "--listen",
                                     "0",
                                     "--proxy",
                                     "127.0.0.1:" + std::to_string(daemon_.proxy_port()),
                                     "--secret-file",
                                     home + "/secret"};
    if (tls) argv.push_back("--tls");
    auto connect = Child::Spawn(argv, dir_ / (tls ? "laptop-tls.log" : "laptop-plain.log"), laptop);
    ASSERT_TRUE(connect);
    auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
    ASSERT_TRUE(line) << connect->Output() << daemon_.Log();
    int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
    NotebookCheck check;
    check.uid = alice_;
    EXPECT_TRUE(CheckNotebook("http://127.0.0.1:" + std::to_string(port), nb.token(), check))
        << connect->Output() << daemon_.Log();
  }
  EXPECT_NE(ReadFile(home + "/.config/brokerproxy/known_cas").find("127.0.0.1:"), std::string::npos)
      << "the CA was pinned on first use";
}

// Path: stock OpenSSH against the proxy port's SSH endpoint, the secret typed by sshpass (from
// its environment, not its arguments), the endpoint's key pinned from the known_hosts line that
// `brokerproxy stats` prints.
TEST_F(NotebookTest, ReachedThroughStockSshLWithSshpass) {
  if (::access("/usr/bin/sshpass", X_OK) != 0) GTEST_SKIP() << "sshpass is not installed";
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("5004"));
  RunResult stats = daemon_.Cli({"stats"});
  size_t at = stats.out.find("[127.0.0.1]:" + std::to_string(daemon_.proxy_port()) + " ssh-");
  ASSERT_NE(at, std::string::npos) << stats;
  WriteFile(dir_ / "known_hosts", stats.out.substr(at, stats.out.find('\n', at) - at) + "\n", 0644);
  // ssh -L cannot listen on port 0: a free port, and another if it was taken meanwhile. It
  // listens once logged in (ExitOnForwardFailure): a probe connection, closed at once.
  RunOptions o;
  o.uid = alice_;
  o.env = {"HOME=" + (dir_ / "nohome"), "SSH_AUTH_SOCK=", "SSHPASS=" + nb.token()};
  std::unique_ptr<Child> ssh;
  int port = 0;
  ASSERT_TRUE(StartOnFreePort(
      [&](int p, std::string* why) {
        size_t from = ReadFile(dir_ / "sshpass.log").size();
        ssh = Child::Spawn(
            {"sshpass", "-e", "ssh", "-F", "/dev/null", "-N", "-L",
             std::to_string(p) + ":" + nb.job() + ":1", "-p", std::to_string(daemon_.proxy_port()),
             "-o", "StrictHostKeyChecking=yes", "-o",
             "UserKnownHostsFile=" + (dir_ / "known_hosts"), "-o", "PubkeyAuthentication=no", "-o",
             "ExitOnForwardFailure=yes", nb.job() + "@127.0.0.1"},
            dir_ / "sshpass.log", o);
        return WaitListening(&ssh, p, why, from);
      },
      &port))
      << daemon_.Log();
  NotebookCheck check;
  check.uid = alice_;
  EXPECT_TRUE(CheckNotebook("http://127.0.0.1:" + std::to_string(port), nb.token(), check))
      << ssh->Output() << daemon_.Log();
  EXPECT_TRUE(ProcessesShowing(nb.token()).empty());
}

// The README's recipes, read out of README.md and run as written by the job's owner (only
// `brokerproxy` is found on PATH and $SLURM_JOB_ID names the job): the notebook is reached, and
// its secret is on no command line while it runs.
std::string Recipe(const std::string& document, const std::string& name) {
  return RecipeFrom(ReadFile(std::string(BROKERPROXY_SOURCE_DIR) + "/" + document), name);
}

TEST_F(NotebookTest, ReadmeNotebookRecipeWorksAsWritten) {
  std::string recipe = Recipe("README.md", "notebook");
  ASSERT_NE(recipe.find("brokerproxy save ssh"), std::string::npos) << recipe;
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("readme1", recipe));
  int port = 0;
  auto connect = ConnectListen(daemon_, dir_, nb.job(), alice_, &port);
  ASSERT_GT(port, 0) << (connect ? connect->Output() : "");
  NotebookCheck as_alice;
  as_alice.uid = alice_;
  EXPECT_TRUE(CheckNotebook("http://127.0.0.1:" + std::to_string(port), nb.token(), as_alice))
      << nb.Output();
  std::vector<std::string> showing = ProcessesShowing(nb.token());
  EXPECT_TRUE(showing.empty()) << Joined(showing);
}

TEST_F(NotebookTest, ReadmeSslNotebookRecipeWorksAsWritten) {
  std::string recipe = Recipe("README.md", "notebook-ssl");
  ASSERT_NE(recipe.find("brokerproxy save ssl"), std::string::npos) << recipe;
  EXPECT_EQ(Recipe("docs/tls.md", "notebook-ssl"), recipe) << "docs/tls.md's is README.md's";
  Notebook nb(daemon_, dir_, alice_);
  ASSERT_TRUE(nb.Start("readme2", recipe));
  NotebookCheck check;
  check.ca_file = SaveCa();
  check.connect_to = "127.0.0.1";
  EXPECT_TRUE(CheckNotebook(SniUrl(nb.job()), nb.token(), check)) << nb.Output();
  std::vector<std::string> showing = ProcessesShowing(nb.token());
  EXPECT_TRUE(showing.empty()) << Joined(showing);
}

// --secret-env without a notebook: the command gets the secret under that name (replacing an
// inherited one), and bad names are refused before anything is saved.
class SecretEnvTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(daemon_.Start()); }
  TempDir dir_;
  Daemon daemon_{dir_};
};

TEST_F(SecretEnvTest, TheCommandGetsTheSecretUnderThatName) {
  RunOptions o;
  o.env = {"MY_TOKEN=inherited"};
  RunResult r = daemon_.Cli({"save", "ssh", "--job-id", "se1", "--port", "6001", "--secret-env",
                             "MY_TOKEN", "--", "sh", "-c",
                             "test -n \"$MY_TOKEN\" && test \"$MY_TOKEN\" = \"$BROKER_SECRET\" "
                             "&& test ${#MY_TOKEN} -eq 64 && echo same"},
                            o);
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out, "same\n") << r;
  EXPECT_EQ(r.err.find("WARNING"), std::string::npos) << r;
}

TEST_F(SecretEnvTest, BadNamesAndNoCommandAreRefusedBeforeSaving) {
  for (const char* name : {"1TOKEN", "MY-TOKEN", "A=B", "BROKER_SECRET", ""}) {
    RunResult r = daemon_.Cli(
        {"save", "ssh", "--job-id", "se2", "--port", "6002", "--secret-env", name, "--", "true"});
    EXPECT_EQ(r.exit_code, 2) << name << ": " << r;
  }
  RunResult no_command =
      daemon_.Cli({"save", "ssh", "--job-id", "se2", "--port", "6002", "--secret-env", "T"});
  EXPECT_EQ(no_command.exit_code, 2) << no_command;
  EXPECT_NE(no_command.err.find("exec mode"), std::string::npos) << no_command;
  RunResult load = daemon_.Cli({"load", "se2"});
  EXPECT_EQ(load.exit_code, 5) << "nothing was saved: " << load;
}

}  // namespace
}  // namespace brokerproxy::testing
