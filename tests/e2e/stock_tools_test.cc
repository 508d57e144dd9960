// Every documented way to reach a job from a laptop, with the stock tools users have there:
//   - sshpass and ssh against the embedded SSH endpoint (the prompt says "Password");
//   - ssh-keyscan, which waits for the server's banner (the proxy sends it after a short
//     silence), and the known_hosts line `stats` prints;
//   - channel refusals that say why (ssh -v);
//   - `connect %n --stdio` as an OpenSSH ProxyCommand with a numeric job id;
//   - curl sent to the proxy port by mistake (an HTTP 400 with a hint).

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "e2e/harness.h"

namespace brokerproxy::testing {
namespace {

// Connects to 127.0.0.1:port, retrying until something listens there.
int ConnectWhenReady(int port, int timeout_ms = 15000) {
  int fd = -1;
  WaitUntil(
      [&] {
        fd = ConnectTcp(port);
        return fd >= 0;
      },
      timeout_ms);
  return fd;
}

bool Contains(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

class StockToolsTest : public ::testing::Test {
 protected:
  // The stock client: no config files, no keys; `extra` goes before the defaults (ssh takes
  // the first value of an option).
  std::vector<std::string> Ssh(const std::string& user, const std::vector<std::string>& extra,
                               const std::vector<std::string>& command = {}) const {
    std::vector<std::string> argv = {"ssh", "-F", "/dev/null", "-p",
                                     std::to_string(daemon_->proxy_port())};
    argv.insert(argv.end(), extra.begin(), extra.end());
    for (const char* o :
         {"StrictHostKeyChecking=no", "PubkeyAuthentication=no", "NumberOfPasswordPrompts=1",
          "ExitOnForwardFailure=yes", "ConnectTimeout=10"}) {
      argv.push_back("-o");
      argv.push_back(o);
    }
    argv.push_back("-o");
    argv.push_back("UserKnownHostsFile=" + (dir_ / "known_hosts"));
    argv.push_back(user + "@127.0.0.1");
    argv.insert(argv.end(), command.begin(), command.end());
    return argv;
  }
  // The secret from an askpass script.
  RunOptions SecretEnv(const std::string& secret) {
    std::string script = dir_ / ("askpass" + std::to_string(++scripts_));
    WriteFile(script, "#!/bin/sh\necho '" + secret + "'\n", 0755);
    RunOptions o;
    o.env = {"SSH_ASKPASS=" + script, "SSH_ASKPASS_REQUIRE=force", "DISPLAY=:0",
             "HOME=" + (dir_ / "nohome"), "SSH_AUTH_SOCK="};
    o.timeout_ms = 30000;
    return o;
  }
  void StartDaemon(const std::string& proxy_extra = "", const std::string& extra = "") {
    daemon_ = std::make_unique<Daemon>(dir_, extra, proxy_extra);
    ASSERT_TRUE(daemon_->Start());
  }
  // A line through a forward's local port comes back from the echo backend.
  void ExpectEcho(int local_port) {
    int fd = ConnectWhenReady(local_port);
    ASSERT_GE(fd, 0) << daemon_->Log();
    ASSERT_TRUE(SendAll(fd, "echo\nhello\n"));
    EXPECT_EQ(ReadLine(fd), "hello") << daemon_->Log();
    close(fd);
  }

  TempDir dir_;
  int scripts_ = 0;
  std::unique_ptr<Daemon> daemon_;
  Backend backend_;
};

// ---- password first: sshpass types the secret ----

TEST_F(StockToolsTest, SshpassLogsInWithTheSecret) {
  if (access("/usr/bin/sshpass", X_OK) != 0) GTEST_SKIP() << "sshpass is not installed";
  StartDaemon();
  std::string secret = daemon_->SaveJob("5001", backend_.port());
  ASSERT_FALSE(secret.empty());
  // sshpass waits for a prompt containing "assword", whichever of password and
  // keyboard-interactive OpenSSH picks (it prefers keyboard-interactive): both ways.
  for (const char* method : {"keyboard-interactive", "password"}) {
    SCOPED_TRACE(method);
    // ssh -L cannot listen on port 0: a free port, and another if it was taken meanwhile.
    std::unique_ptr<Child> child;
    int port = 0;
    ASSERT_TRUE(StartOnFreePort(
        [&](int p, std::string* why) {
          std::vector<std::string> argv = {"sshpass", "-p", secret};
          std::vector<std::string> ssh =
              Ssh("5001", {"-o", std::string("PreferredAuthentications=") + method, "-N", "-L",
                           std::to_string(p) + ":5001:1"});
          argv.insert(argv.end(), ssh.begin(), ssh.end());
          RunOptions o;
          o.env = {"HOME=" + (dir_ / "nohome"), "SSH_AUTH_SOCK="};
          std::string log = dir_ / (std::string("sshpass-") + method + ".log");
          size_t from = ReadFile(log).size();
          child = Child::Spawn(argv, log, o);
          return WaitListening(&child, p, why, from);
        },
        &port))
        << daemon_->Log();
    ExpectEcho(port);
    child->Stop(SIGKILL);
    if (HasFailure()) {
      ADD_FAILURE() << ReadFile(dir_ / (std::string("sshpass-") + method + ".log"));
      return;
    }
  }
  // A wrong secret still goes through the same check (counted, never logged).
  std::string wrong = secret;
  wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
  std::vector<std::string> argv = {"sshpass", "-p", wrong};
  std::vector<std::string> ssh = Ssh("5001", {"-N"});
  argv.insert(argv.end(), ssh.begin(), ssh.end());
  RunOptions o;
  o.env = {"HOME=" + (dir_ / "nohome"), "SSH_AUTH_SOCK="};
  o.timeout_ms = 30000;
  RunResult bad = RunCommand(argv, o);
  EXPECT_NE(bad.exit_code, 0) << bad;
  EXPECT_FALSE(bad.timed_out) << bad;
  RunResult stats = daemon_->Cli({"stats", "--json"});
  EXPECT_GE(std::stoi(JsonText(ParseOut(stats).get(), {"stats", "connections", "denied"})), 1)
      << stats;
  EXPECT_FALSE(Contains(daemon_->Log(), secret));
  EXPECT_FALSE(Contains(daemon_->Log(), wrong));
}

// ---- the banner first, after a short silence: ssh-keyscan, and the known_hosts line ----

TEST_F(StockToolsTest, KeyscanGetsTheKeyThatStatsPrintsAndSshPinsIt) {
  StartDaemon();
  std::string secret = daemon_->SaveJob("5002", backend_.port());
  ASSERT_FALSE(secret.empty());
  std::string port = std::to_string(daemon_->proxy_port());

  RunResult scan =
      RunCommand({"ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", port, "127.0.0.1"});
  ASSERT_EQ(scan.exit_code, 0) << scan << daemon_->Log();
  std::string scanned = scan.out.substr(0, scan.out.find('\n'));
  EXPECT_EQ(scanned.rfind("[127.0.0.1]:" + port + " ssh-ed25519 AAAA", 0), 0u) << scan;

  // The key file's public half, and what stats prints, are the same line.
  RunResult pub =
      RunCommand({"ssh-keygen", "-y", "-f", daemon_->state_dir() + "/ssh_host_ed25519_key"});
  ASSERT_EQ(pub.exit_code, 0) << pub;
  std::string key = pub.out.substr(0, pub.out.find('\n'));
  key = key.substr(0, key.find(' ', key.find(' ') + 1));  // without a comment
  EXPECT_EQ(scanned, "[127.0.0.1]:" + port + " " + key);
  RunResult stats = daemon_->Cli({"stats", "--json"});
  auto sj = ParseOut(stats);
  const cJSON* lines = cJSON_GetObjectItemCaseSensitive(
      cJSON_GetObjectItemCaseSensitive(sj.get(), "stats"), "ssh_known_hosts");
  ASSERT_TRUE(cJSON_IsArray(lines)) << stats;
  ASSERT_EQ(cJSON_GetArraySize(lines), 1) << stats;
  EXPECT_EQ(std::string(cJSON_GetArrayItem(lines, 0)->valuestring), scanned);
  RunResult human = daemon_->Cli({"stats"});
  EXPECT_TRUE(Contains(human.out, "\n  " + scanned + "\n")) << human;

  // Pinned with that line alone, the stock client connects with strict checking.
  WriteFile(dir_ / "pinned", scanned + "\n", 0600);
  std::unique_ptr<Child> ssh;
  int local = 0;
  ASSERT_TRUE(StartOnFreePort(
      [&](int p, std::string* why) {
        std::vector<std::string> argv = {"ssh",
                                         "-F",
                                         "/dev/null",
                                         "-p",
                                         port,
                                         "-o",
                                         "StrictHostKeyChecking=yes",
                                         "-o",
                                         "UserKnownHostsFile=" + (dir_ / "pinned"),
                                         "-o",
                                         "PubkeyAuthentication=no",
                                         "-o",
                                         "ExitOnForwardFailure=yes",
                                         "-N",
                                         "-L",
                                         std::to_string(p) + ":5002:1",
                                         "5002@127.0.0.1"};
        size_t from = ReadFile(dir_ / "pinned.log").size();
        ssh = Child::Spawn(argv, dir_ / "pinned.log", SecretEnv(secret));
        return WaitListening(&ssh, p, why, from);
      },
      &local))
      << daemon_->Log();
  ExpectEcho(local);
  ssh->Stop(SIGKILL);
  if (HasFailure()) ADD_FAILURE() << ReadFile(dir_ / "pinned.log");
}

// After the banner went out the connection is SSH: a preamble arriving late is not a plain
// session (nothing reaches the job), and a client silent after the banner still meets the
// handshake deadline.
TEST_F(StockToolsTest, AfterTheBannerItIsSshWithTheHandshakeDeadline) {
  StartDaemon("handshake_timeout = 2s\n");
  std::string secret = daemon_->SaveJob("5004", backend_.port());
  ASSERT_FALSE(secret.empty());

  int fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  auto banner = ReadLine(fd);
  ASSERT_TRUE(banner) << daemon_->Log();
  EXPECT_EQ(banner->rfind("SSH-2.0-brokerproxy", 0), 0u) << *banner;
  ASSERT_TRUE(SendAll(fd, "BROKER1 5004 " + secret + "\n"));
  std::string rest = ReadToEof(fd);
  close(fd);
  EXPECT_FALSE(Contains(rest, "OK")) << rest;
  EXPECT_EQ(backend_.connections(), 0);
  // libssh's error names the line it got instead of a banner: it must not reach the log.
  EXPECT_TRUE(WaitUntil([&] { return Contains(daemon_->Log(), "reason=key exchange"); }))
      << daemon_->Log();
  EXPECT_FALSE(Contains(daemon_->Log(), secret));

  auto start = std::chrono::steady_clock::now();
  fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(ReadLine(fd));
  ReadToEof(fd);  // closed by the daemon at the handshake deadline
  close(fd);
  auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::steady_clock::now() - start)
                    .count();
  std::printf("silent client after the banner closed after %lld ms\n",
              static_cast<long long>(waited));
  EXPECT_TRUE(WaitUntil([&] { return Contains(daemon_->Log(), "reason=handshake timeout"); }))
      << daemon_->Log();

  // Plain clients, which speak at once, are served as before.
  fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "BROKER1 5004 " + secret + "\necho\nplain\n"));
  EXPECT_EQ(ReadLine(fd), "OK");
  EXPECT_EQ(ReadLine(fd), "plain");
  close(fd);
}

// Silent clients handed to the SSH endpoint are still handshakes of their source: one local
// user's silent connections cannot grow past max_handshakes_per_source by waiting for the
// banner.
TEST_F(StockToolsTest, SilentClientsGivenTheBannerStillCountAgainstTheirSource) {
  StartDaemon("max_handshakes_per_source = 2\n");
  std::vector<int> fds;
  for (int i = 0; i < 2; ++i) {
    int fd = ConnectTcp(daemon_->proxy_port());
    ASSERT_GE(fd, 0);
    auto banner = ReadLine(fd);  // handed to the SSH endpoint
    ASSERT_TRUE(banner);
    EXPECT_EQ(banner->rfind("SSH-2.0-", 0), 0u) << *banner;
    fds.push_back(fd);
  }
  int third = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(third, 0);
  EXPECT_EQ(ReadLine(third), "ERR busy") << daemon_->Log();
  close(third);
  for (int fd : fds) close(fd);
}

// ---- channel refusals say why (as SSH_MSG_DEBUG, which ssh -v prints) ----

TEST_F(StockToolsTest, ChannelRefusalsSayWhy) {
  StartDaemon();
  std::string secret = daemon_->SaveJob("5005", backend_.port());
  ASSERT_FALSE(secret.empty());
  // A job whose service is not running: nothing listens on its port.
  PortReservation idle;
  std::string down_secret = daemon_->SaveJob("5006", idle.port());
  ASSERT_FALSE(down_secret.empty());

  RunResult other = RunCommand(Ssh("5005", {"-v", "-W", "127.0.0.1:22"}), SecretEnv(secret));
  EXPECT_NE(other.exit_code, 0) << other;
  EXPECT_TRUE(Contains(other.err, "Remote: not this job")) << other;
  EXPECT_TRUE(Contains(other.err, "open failed")) << other;

  RunResult shell = RunCommand(Ssh("5005", {"-v"}, {"true"}), SecretEnv(secret));
  EXPECT_EQ(shell.exit_code, 255) << shell;
  EXPECT_TRUE(Contains(shell.err, "Remote: shell refused")) << shell;

  // The backend is dialed before the channel is answered: a service that is down gets the
  // channel refused (not opened, then closed), so -W fails, and -v says why.
  RunResult down = RunCommand(Ssh("5006", {"-v", "-W", "5006:1"}), SecretEnv(down_secret));
  EXPECT_FALSE(down.timed_out) << down;
  EXPECT_NE(down.exit_code, 0) << down;
  EXPECT_TRUE(Contains(down.err, "open failed")) << down;
  EXPECT_TRUE(Contains(down.err, "Remote: the job's service is not accepting connections"))
      << down << daemon_->Log();

  // The job's own service is still reached through the same kind of channel.
  RunResult ok = RunCommand(Ssh("5005", {"-W", "5005:1"}), [&] {
    RunOptions o = SecretEnv(secret);
    o.stdin_data = "echo\nthrough -W\n";
    return o;
  }());
  EXPECT_EQ(ok.out, "through -W\n") << ok;
  EXPECT_EQ(backend_.connections(), 1);
}

// ---- curl pointed at the proxy port ----

TEST_F(StockToolsTest, HttpGetsA400WithAHint) {
  if (access("/usr/bin/curl", X_OK) != 0) GTEST_SKIP() << "curl is not installed";
  StartDaemon("throttle_failures = 3\n");
  std::string url = "http://127.0.0.1:" + std::to_string(daemon_->proxy_port()) + "/tree";
  RunResult fail = RunCommand({"curl", "-sS", "--fail", "--max-time", "10", url});
  EXPECT_EQ(fail.exit_code, 22) << fail;
  RunResult r = RunCommand({"curl", "-sS", "-i", "--max-time", "10", url});
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out.rfind("HTTP/1.1 400 Bad Request\r\n", 0), 0u) << r;
  EXPECT_TRUE(Contains(r.out, "\r\nConnection: close\r\n")) << r;
  EXPECT_TRUE(Contains(r.out, "brokerproxy connect JOB")) << r;
  EXPECT_TRUE(Contains(r.out, "https://JOB.localhost:" + std::to_string(daemon_->proxy_port())))
      << r;
  // Content-Length is that of the body.
  size_t body_at = r.out.find("\r\n\r\n");
  ASSERT_NE(body_at, std::string::npos);
  size_t cl = r.out.find("Content-Length: ");
  ASSERT_NE(cl, std::string::npos);
  EXPECT_EQ(std::stoul(r.out.substr(cl + 16)), r.out.size() - body_at - 4) << r;
  RunResult post = RunCommand({"curl", "-sS", "--fail", "--max-time", "10", "-d", "x=1", url});
  EXPECT_EQ(post.exit_code, 22) << post;

  // A method split across segments is still HTTP; anything else bad is still ERR bad-request.
  int fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "GE"));
  // The start of a method is not refused: the proxy waits for the rest (no answer meanwhile).
  pollfd pfd{fd, POLLIN, 0};
  EXPECT_EQ(poll(&pfd, 1, 200), 0) << "answered a method prefix: " << ReadToEof(fd);
  ASSERT_TRUE(SendAll(fd, "T / HTTP/1.0\r\n\r\n"));
  EXPECT_EQ(ReadLine(fd), "HTTP/1.1 400 Bad Request\r");
  close(fd);
  fd = ConnectTcp(daemon_->proxy_port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "GEX / HTTP/1.0\r\n\r\n"));
  EXPECT_EQ(ReadToEof(fd), "ERR bad-request\n");
  close(fd);

  // Each one is a failed handshake of this source, like any bad preamble.
  EXPECT_TRUE(WaitUntil([&] { return Contains(daemon_->Log(), "throttling local user 0:"); }))
      << daemon_->Log();
  RunResult stats = daemon_->Cli({"stats", "--json"});
  EXPECT_EQ(JsonText(ParseOut(stats).get(), {"stats", "connections", "bad_request"}), "5") << stats;
}

// ---- `connect %n --stdio` as a ProxyCommand, with a numeric job id ----

TEST_F(StockToolsTest, ProxyCommandWithANumericJobIdUsesPercentN) {
  if (access("/usr/sbin/sshd", X_OK) != 0) GTEST_SKIP() << "openssh-server is not installed";
  StartDaemon();
  std::string keys = dir_ / "keys";
  ASSERT_EQ(::mkdir(keys.c_str(), 0700), 0);
  for (const char* k : {"host", "user"}) {
    ASSERT_EQ(
        RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys + "/" + k}).exit_code,
        0);
  }
  WriteFile(keys + "/authorized_keys", ReadFile(keys + "/user.pub"), 0600);
  ::mkdir("/run/sshd", 0755);
  // sshd cannot listen on port 0: a free port, and another if it was taken meanwhile.
  std::unique_ptr<Child> sshd;
  int sshd_port = 0;
  ASSERT_TRUE(StartOnFreePort(
      [&](int port, std::string* why) {
        WriteFile(dir_ / "sshd_config",
                  "ListenAddress 127.0.0.1\nPort " + std::to_string(port) + "\nHostKey " + keys +
                      "/host\nAuthorizedKeysFile " + keys +
                      "/authorized_keys\nPidFile none\nUsePAM no\nStrictModes no\n"
                      "PermitRootLogin prohibit-password\nPasswordAuthentication no\n");
        size_t from = ReadFile(dir_ / "sshd.log").size();
        sshd = Child::Spawn({"/usr/sbin/sshd", "-D", "-e", "-f", dir_ / "sshd_config"},
                            dir_ / "sshd.log");
        return WaitListening(&sshd, port, why, from,
                             "Server listening on 127.0.0.1 port " + std::to_string(port) + ".");
      },
      &sshd_port));
  ASSERT_FALSE(daemon_->SaveJob("5003", sshd_port).empty());

  auto ssh_through = [&](const char* token) {
    std::string proxy_command = BinaryPath() + " connect " + token + " --stdio -c " +
                                daemon_->config_path() +
                                " --proxy 127.0.0.1:" + std::to_string(daemon_->proxy_port());
    return RunCommand({"ssh", "-F", "/dev/null", "-i", keys + "/user", "-o",
                       "ProxyCommand=" + proxy_command, "-o", "StrictHostKeyChecking=no", "-o",
                       "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                       "ConnectTimeout=20", "root@5003", "echo", "hello-from-5003"});
  };
  RunResult n = ssh_through("%n");
  EXPECT_EQ(n.exit_code, 0) << n << "\nsshd: " << sshd->Output();
  EXPECT_EQ(n.out, "hello-from-5003\n");
  // %h is the host as OpenSSH canonicalised it: 5003 became the address 0.0.19.139, which is
  // no job (this is why the README says %n).
  RunResult h = ssh_through("%h");
  EXPECT_EQ(h.exit_code, 255) << h;
  EXPECT_TRUE(Contains(h.err, "0.0.19.139")) << h;
  sshd->Stop();
}

}  // namespace
}  // namespace brokerproxy::testing
