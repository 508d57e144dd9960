// Exec mode (`save ssh|ssl -- COMMAND`) under a batch system's job control: the command cannot
// outlive `save`, stays where the scheduler tracks it, is deregistered before it is stopped,
// and its cleanup removes only its own entry. Also `save --replace` and `remove --if-secret`.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

using Clock = std::chrono::steady_clock;

// The contents of `path` once it exists and is not empty, without the trailing newline; ""
// after `timeout_ms`.
std::string WaitForFile(const std::string& path, int timeout_ms = 20000) {
  std::string text;
  WaitUntil(
      [&] {
        std::ifstream in(path);
        std::stringstream ss;
        ss << in.rdbuf();
        text = ss.str();
        return !text.empty() && text.back() == '\n';
      },
      timeout_ms);
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

// Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] pgrp, [3] session.
std::vector<std::string> ProcStat(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return {};
  size_t paren = line.rfind(')');
  if (paren == std::string::npos) return {};
  std::istringstream rest(line.substr(paren + 1));
  std::vector<std::string> fields;
  for (std::string f; rest >> f && fields.size() < 4;) fields.push_back(f);
  return fields;
}

// Gone, or a zombie waiting for whoever adopted it.
bool ProcessGone(pid_t pid) {
  std::vector<std::string> stat = ProcStat(pid);
  return stat.empty() || stat[0] == "Z" || stat[0] == "X";
}

class ExecModeTest : public ::testing::Test {
 protected:
  // `save ssh --job-id ID [extra...] -- sh -c SCRIPT` as a long-running child.
  std::unique_ptr<Child> StartSave(const Daemon& d, const std::string& id,
                                   const std::string& script,
                                   const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv = {BinaryPath(), "save", "ssh",          "--job-id",
                                     id,           "-c",   d.config_path()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.insert(argv.end(), {"--", "sh", "-c", script});
    return Child::Spawn(argv, dir_ / ("save-" + id + ".log"));
  }

  TempDir dir_;
};

TEST_F(ExecModeTest, TheCommandDiesWhenSaveIsKilled) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string pid_file = dir_ / "service.pid";
  // `exec`: the service is the process `save` started (it sleeps to stay up: not a wait).
  auto save = StartSave(d, "k1", "echo $$ > " + pid_file + "; exec sleep 600");
  ASSERT_TRUE(save);
  std::string text = WaitForFile(pid_file);
  ASSERT_FALSE(text.empty()) << save->Output();
  pid_t service = static_cast<pid_t>(std::stol(text));
  ASSERT_FALSE(ProcessGone(service));
  // What the scheduler does after KillWait, or the OOM killer: no chance to clean up.
  EXPECT_EQ(save->Stop(SIGKILL), 128 + SIGKILL);
  EXPECT_TRUE(WaitUntil([&] { return ProcessGone(service); }))
      << "the service outlived its save: "
      << (ProcStat(service).empty() ? "" : ProcStat(service)[0]);
  if (!ProcessGone(service)) kill(service, SIGKILL);
}

TEST_F(ExecModeTest, WithoutATerminalTheCommandStaysInTheJobsSessionAndProcessGroup) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string pid_file = dir_ / "service.pid";
  // A service that sleeps to stay up (not a wait).
  auto save = StartSave(d, "k2", "echo $$ > " + pid_file + "; exec sleep 600");
  ASSERT_TRUE(save);
  std::string text = WaitForFile(pid_file);
  ASSERT_FALSE(text.empty()) << save->Output();
  pid_t service = static_cast<pid_t>(std::stol(text));
  std::vector<std::string> mine = ProcStat(service);
  std::vector<std::string> saves = ProcStat(save->pid());
  ASSERT_EQ(mine.size(), 4u);
  ASSERT_EQ(saves.size(), 4u);
  EXPECT_EQ(mine[1], std::to_string(save->pid())) << "the service is save's child";
  EXPECT_EQ(mine[2], saves[2]) << "process group";
  EXPECT_EQ(mine[3], saves[3]) << "session";
  // The scheduler signals the job's process group: the service gets it straight away.
  EXPECT_EQ(save->Stop(SIGTERM), 128 + SIGTERM) << save->Output();
  EXPECT_TRUE(WaitUntil([&] { return ProcessGone(service); }));
}

TEST_F(ExecModeTest, SigtermDeregistersTheJobBeforeTheCommandSeesIt) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ready = dir_ / "ready";
  std::string seen = dir_ / "seen";
  // The service asks the broker for its own job when its TERM trap runs; it sleeps in a loop
  // to stay up, which is not a wait.
  std::string load = BinaryPath() + " load k3 -c " + d.config_path() + " >/dev/null 2>&1";
  auto save =
      StartSave(d, "k3",
                "trap '" + load + "; echo load=$? > " + seen + "; exit 0' TERM; echo up > " +
                    ready + "; while :; do sleep 0.05; done");
  ASSERT_TRUE(save);
  ASSERT_EQ(WaitForFile(ready), "up") << save->Output();
  EXPECT_EQ(d.Cli({"load", "k3"}).exit_code, 0);
  EXPECT_EQ(save->Stop(SIGTERM, 30000), 0) << save->Output();
  // 5: not found. The entry was gone before the service heard of the signal.
  EXPECT_EQ(WaitForFile(seen), "load=5") << save->Output();
  EXPECT_EQ(d.Cli({"load", "k3"}).exit_code, 5);
}

TEST_F(ExecModeTest, SigtermReachesTheCommandEvenWhenTheBrokerDoesNotAnswer) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ready = dir_ / "ready";
  std::string seen = dir_ / "seen";
  // A service that sleeps in a loop to stay up (not a wait).
  auto save = StartSave(d, "k7",
                        "trap 'echo term > " + seen + "; exit 0' TERM; echo up > " + ready +
                            "; while :; do sleep 0.05; done");
  ASSERT_TRUE(save);
  ASSERT_EQ(WaitForFile(ready), "up") << save->Output();
  // A broker that hangs: the deregistration cannot finish, the signal goes on anyway.
  ASSERT_EQ(kill(d.pid(), SIGSTOP), 0);
  ASSERT_EQ(kill(save->pid(), SIGTERM), 0);
  std::string got = WaitForFile(seen, 20000);
  ASSERT_EQ(kill(d.pid(), SIGCONT), 0);
  EXPECT_EQ(got, "term") << save->Output();
  // Once the command exited, the deregistration is tried again, and the broker answers now.
  EXPECT_EQ(save->Wait(60000), 0) << save->Output();
  EXPECT_EQ(d.Cli({"load", "k7"}).exit_code, 5) << save->Output();
}

TEST_F(ExecModeTest, ADeregistrationThatFailedOnSigtermIsTriedAgainAtTheEnd) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ready = dir_ / "ready";
  std::string seen = dir_ / "seen";
  std::string go = dir_ / "go";
  // The service's trap holds its exit until the test makes `go` (its own bounded poll, in the
  // child); otherwise it sleeps in a loop to stay up. Neither is a wait of the test's.
  auto save = StartSave(d, "k8",
                        "trap 'echo term > " + seen + "; while [ ! -e " + go +
                            " ]; do sleep 0.05; done; exit 0' TERM; echo up > " + ready +
                            "; while :; do sleep 0.05; done");
  ASSERT_TRUE(save);
  ASSERT_EQ(WaitForFile(ready), "up") << save->Output();
  // The broker is down when the job is stopped, and back before the service has finished.
  d.Stop(SIGKILL);
  ASSERT_EQ(kill(save->pid(), SIGTERM), 0);
  EXPECT_EQ(WaitForFile(seen), "term") << save->Output();
  ASSERT_TRUE(d.Start());
  ASSERT_EQ(d.Cli({"load", "k8"}).exit_code, 0) << "kept across the restart";
  WriteFile(go, "");
  EXPECT_EQ(save->Wait(60000), 0) << save->Output();
  EXPECT_EQ(d.Cli({"load", "k8"}).exit_code, 5) << save->Output();
}

TEST_F(ExecModeTest, ASecondSaveOfTheSameIdNeedsNameOrReplace) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string first_up = dir_ / "first.up";
  std::string first_go = dir_ / "first.go";
  // A service that stays up until the test makes `first_go` (the child polls; not a wait).
  auto first = StartSave(
      d, "t4", "echo up > " + first_up + "; while [ ! -e " + first_go + " ]; do sleep 0.05; done");
  ASSERT_TRUE(first);
  ASSERT_EQ(WaitForFile(first_up), "up") << first->Output();

  // A second service of the job without --name: refused, with the way out.
  RunResult clash = d.Cli({"save", "ssh", "--job-id", "t4", "--", "true"});
  EXPECT_EQ(clash.exit_code, 8) << clash;
  EXPECT_NE(clash.err.find("job t4 already has a service registered; save another service of "
                           "the same job with --name NAME, or replace it with --replace"),
            std::string::npos)
      << clash;
  // With --name it is a job of its own, and both are registered.
  std::string named = dir_ / "named";
  RunResult with_name = d.Cli({"save", "ssh", "--job-id", "t4", "--name", "web", "--", "sh", "-c",
                               "echo $BROKER_JOB_ID > " + named});
  EXPECT_EQ(with_name.exit_code, 0) << with_name;
  EXPECT_EQ(WaitForFile(named), "t4.web");
  EXPECT_EQ(d.Cli({"load", "t4"}).exit_code, 0) << "the first one's entry is untouched";

  // With --replace the second takes the id over; the first one's exit leaves it alone.
  std::string second_secret = dir_ / "second.secret";
  // A service that sleeps in a loop to stay up (not a wait).
  auto second = StartSave(
      d, "t4", "echo $BROKER_SECRET > " + second_secret + "; while :; do sleep 0.05; done",
      {"--replace"});
  ASSERT_TRUE(second);
  std::string secret = WaitForFile(second_secret);
  ASSERT_EQ(secret.size(), 64u) << second->Output();
  WriteFile(first_go, "");
  // The first exits by itself.
  EXPECT_EQ(first->Wait(30000), 0) << first->Output();
  EXPECT_NE(first->Output().find("job t4 was saved again since; leaving it registered"),
            std::string::npos)
      << first->Output();
  RunResult load = d.Cli({"load", "t4", "--json"});
  ASSERT_EQ(load.exit_code, 0) << "the first one's exit removed the second one's entry: " << load;
  EXPECT_EQ(JsonText(ParseOut(load).get(), {"job", "secret"}), secret);
  // And the second's own exit removes it.
  EXPECT_EQ(second->Stop(SIGTERM, 30000), 128 + SIGTERM) << second->Output();
  EXPECT_EQ(d.Cli({"load", "t4"}).exit_code, 5);
}

TEST_F(ExecModeTest, ABusyAllocatedPortIsSavedAgainOverItsOwnFreshEntry) {
  // The range's only port is held on this host: exec mode saves again (replacing its own entry
  // of a moment ago) in the hope of another port, gives up after a few tries, and runs the
  // command all the same.
  int held = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(held, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::bind(held, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(held, 1), 0);
  ASSERT_EQ(::getsockname(held, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  std::string port = std::to_string(ntohs(addr.sin_port));
  Daemon d(dir_, "[registry]\nport_range = " + port + "-" + port + "\n");
  ASSERT_TRUE(d.Start());
  std::string out = dir_ / "port";
  RunResult r = d.Cli({"save", "ssh", "--job-id", "b6", "--", "sh", "-c", "echo {port} > " + out});
  ::close(held);
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(WaitForFile(out, 1000), port) << r;
  EXPECT_EQ(d.Cli({"load", "b6"}).exit_code, 5);
}

TEST_F(ExecModeTest, RemoveWithASecretRemovesOnlyThatSave) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string old_secret = d.SaveJob("c5", 6000);
  ASSERT_FALSE(old_secret.empty());
  RunResult again =
      d.Cli({"save", "ssh", "--job-id", "c5", "--port", "6000", "--replace", "--json"});
  ASSERT_EQ(again.exit_code, 0) << again;
  std::string new_secret = JsonText(ParseOut(again).get(), {"job", "secret"});
  ASSERT_NE(new_secret, old_secret);

  // The old save's secret no longer names the entry: it stays, and the error says why.
  RunResult stale = d.Cli({"remove", "c5", "--if-secret", old_secret});
  EXPECT_EQ(stale.exit_code, 8) << stale;
  EXPECT_NE(stale.err.find("saved again"), std::string::npos) << stale;
  EXPECT_EQ(stale.err.find(old_secret), std::string::npos) << "no secret in messages";
  EXPECT_EQ(d.Log().find(old_secret), std::string::npos) << "no secret in the log";
  RunResult load = d.Cli({"load", "c5", "--json"});
  ASSERT_EQ(load.exit_code, 0) << load;
  EXPECT_EQ(JsonText(ParseOut(load).get(), {"job", "secret"}), new_secret);
  // Another user learns nothing from a guess: the job is not theirs.
  std::optional<uid_t> bob = TestUser("bp-bob");
  ASSERT_TRUE(bob);
  std::string reply = ControlRequestAs(
      *bob, d.socket_path(), R"({"op":"remove","job":"c5","secret":")" + new_secret + R"("})");
  EXPECT_NE(reply.find("\"permission_denied\""), std::string::npos) << reply;
  // The current secret (on stdin, out of `ps`) removes it.
  RunOptions on_stdin;
  on_stdin.stdin_data = new_secret + "\n";
  RunResult current = d.Cli({"remove", "c5", "--if-secret", "-"}, on_stdin);
  EXPECT_EQ(current.exit_code, 0) << current;
  EXPECT_EQ(d.Cli({"load", "c5"}).exit_code, 5);
}

// `connect` holds the secret it loaded at its start. When the job is saved again (a requeue, a
// restarted service: a new secret), the next connection is refused with "ERR denied"; `connect`
// then loads the secret again and retries that connection. When the job is gone, it stops.
void ExpectConnectFollowsAResaveAndStopsWhenTheJobIsRemoved(const TempDir& dir, bool tls) {
  Daemon d(dir);
  ASSERT_TRUE(d.Start());
  Backend backend;
  ASSERT_FALSE(d.SaveJob("cj", backend.port()).empty());
  std::vector<std::string> argv = {
      BinaryPath(),    "connect", "cj",
      "--listen",      "0",       "-c",
      d.config_path(), "--proxy", "127.0.0.1:" + std::to_string(d.proxy_port())};
  if (tls) argv.push_back("--tls");
  auto connect = Child::Spawn(argv, dir / "connect.log");
  ASSERT_TRUE(connect);
  auto line = connect->WaitFor("listening on 127.0.0.1:");
  ASSERT_TRUE(line) << connect->Output();
  int port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  // A client that speaks first: its bytes go out before the proxy's answer, and must survive a
  // refusal.
  auto echoes = [&](const std::string& text) {
    int fd = ConnectTcp(port);
    if (fd < 0) return std::string("cannot connect");
    SendAll(fd, "echo\n" + text + "\n");
    std::string got = ReadLine(fd).value_or("(closed)");
    ::close(fd);
    return got;
  };
  EXPECT_EQ(echoes("before"), "before") << connect->Output();

  RunResult again = d.Cli(
      {"save", "ssh", "--job-id", "cj", "--port", std::to_string(backend.port()), "--replace"});
  ASSERT_EQ(again.exit_code, 0) << again;
  EXPECT_EQ(echoes("after the re-save"), "after the re-save") << connect->Output();
  EXPECT_EQ(echoes("and the next"), "and the next") << connect->Output();
  EXPECT_TRUE(connect->Running()) << connect->Output();

  ASSERT_EQ(d.Cli({"remove", "cj"}).exit_code, 0);
  EXPECT_EQ(echoes("after the remove"), "(closed)");
  EXPECT_TRUE(connect->WaitFor("job cj is no longer registered")) << connect->Output();
  // It stops by itself, with "not found".
  EXPECT_EQ(connect->Wait(20000), 5) << connect->Output();
}

TEST_F(ExecModeTest, ConnectFollowsAResaveAndStopsWhenTheJobIsRemoved) {
  ExpectConnectFollowsAResaveAndStopsWhenTheJobIsRemoved(dir_, /*tls=*/false);
}

TEST_F(ExecModeTest, ConnectTlsFollowsAResaveAndStopsWhenTheJobIsRemoved) {
  ExpectConnectFollowsAResaveAndStopsWhenTheJobIsRemoved(dir_, /*tls=*/true);
}

// `connect JOB --listen 0` with `d`'s config, through the proxy on `proxy_port`, logging to
// `log`; `*port` is its local port once it listens, else 0.
std::unique_ptr<Child> ConnectListening(const Daemon& d, const std::string& job, int proxy_port,
                                        const std::string& log, int* port) {
  *port = 0;
  auto connect = Child::Spawn({BinaryPath(), "connect", job, "--listen", "0", "-c", d.config_path(),
                               "--proxy", "127.0.0.1:" + std::to_string(proxy_port)},
                              log);
  if (!connect) return connect;
  auto line = connect->WaitFor("listening on 127.0.0.1:");
  if (line) *port = std::stoi(line->substr(line->find("127.0.0.1:") + 10));
  return connect;
}

TEST_F(ExecModeTest, ConnectDeniedWithTheSameSecretReportsItOnceAndKeepsServing) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_FALSE(d.SaveJob("cd", 6000).empty());
  DenyingProxy proxy;
  ASSERT_NE(proxy.port(), 0);
  int port = 0;
  auto connect = ConnectListening(d, "cd", proxy.port(), dir_ / "connect.log", &port);
  ASSERT_GT(port, 0) << (connect ? connect->Output() : "connect did not start");
  for (int i = 1; i <= 2; ++i) {
    int fd = ConnectTcp(port);
    ASSERT_GE(fd, 0);
    EXPECT_EQ(ReadLine(fd), std::nullopt) << "closed";
    ::close(fd);
    // The secret was fetched again, it is the same: no retry, the refusal reported.
    EXPECT_TRUE(connect->WaitFor("connection " + std::to_string(i) + ": ")) << connect->Output();
    EXPECT_EQ(proxy.handshakes(), i) << connect->Output();
  }
  EXPECT_NE(connect->Output().find("the broker still gives the same secret"), std::string::npos)
      << connect->Output();
  EXPECT_TRUE(connect->Running()) << connect->Output();
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

// `connect` told to stop while it fetches the secret again from a broker that does not answer
// (a stopped daemon here; a hung login node through --via): the call in flight is cut short
// and `connect` exits at once, not when that call times out (30 s).
TEST_F(ExecModeTest, ConnectStopsAtOnceWhileTheSecretIsFetchedAgain) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_FALSE(d.SaveJob("cs", 6000).empty());
  DenyingProxy proxy;
  ASSERT_NE(proxy.port(), 0);
  int port = 0;
  auto connect = ConnectListening(d, "cs", proxy.port(), dir_ / "connect.log", &port);
  ASSERT_GT(port, 0) << (connect ? connect->Output() : "connect did not start");

  std::string control = dir_ / "control.sock";
  ASSERT_EQ(PendingOnUnixSocket(control), 0);
  ASSERT_EQ(kill(d.pid(), SIGSTOP), 0);
  int fd = ConnectTcp(port);
  ASSERT_GE(fd, 0);
  // Denied, so `connect` asks the (stopped) daemon for the secret: its request waits in the
  // control socket's backlog.
  int pending = 0;
  WaitUntil([&] { return (pending = PendingOnUnixSocket(control)) != 0; });
  EXPECT_EQ(pending, 1) << connect->Output();
  EXPECT_EQ(proxy.handshakes(), 1);
  auto start = Clock::now();
  // Well below the call's own 30 s timeout.
  EXPECT_EQ(connect->Stop(SIGTERM, 10000), 0) << connect->Output();
  std::printf(
      "connect exited %lld ms after SIGTERM\n",
      static_cast<long long>(
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()));
  ::close(fd);
  ASSERT_EQ(kill(d.pid(), SIGCONT), 0);
}

// ---- what would go wrong once the command runs is caught before anything is saved ----

TEST_F(ExecModeTest, AnUnknownPlaceholderIsAnErrorBeforeAnythingIsSaved) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string ran = dir_ / "ran";
  RunResult r = d.Cli(
      {"save", "ssh", "--job-id", "ph", "--", "sh", "-c", "touch " + ran + "; echo --port={prot}"});
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("unknown placeholder {prot}"), std::string::npos) << r;
  EXPECT_NE(r.err.find("known: {port} {job} {host} {cert} {certkey} {secret}"), std::string::npos)
      << r;
  EXPECT_EQ(d.Cli({"load", "ph"}).exit_code, 5) << "nothing saved";
  EXPECT_EQ(::access(ran.c_str(), F_OK), -1) << "the command did not run";
  // Braces right after a name or a "$" are code (a shell's ${X}, Perl's $ENV{X}), not
  // placeholders; the known ones are substituted.
  std::string out = dir_ / "out";
  RunResult ok = d.Cli({"save", "ssh", "--job-id", "ph", "--", "sh", "-c",
                        "X=x; echo ${X} {job} > " + out, "$ENV{HOME}", "$h{key}"});
  EXPECT_EQ(ok.exit_code, 0) << ok;
  EXPECT_EQ(WaitForFile(out), "x ph");
}

TEST_F(ExecModeTest, AMissingOrNonExecutableCommandExitsLikeTheShellAndSavesNothing) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunResult missing = d.Cli({"save", "ssh", "--job-id", "nc", "--", "no-such-command-here", "x"});
  EXPECT_EQ(missing.exit_code, 127) << missing;
  EXPECT_NE(missing.err.find("brokerproxy: no-such-command-here: command not found"),
            std::string::npos)
      << missing;
  EXPECT_EQ(d.Cli({"load", "nc"}).exit_code, 5) << "no entry left";

  std::string script = dir_ / "not-executable.sh";
  WriteFile(script, "#!/bin/sh\nexit 0\n", 0644);
  RunResult denied = d.Cli({"save", "ssh", "--job-id", "nc", "--", script});
  EXPECT_EQ(denied.exit_code, 126) << denied;
  EXPECT_NE(denied.err.find("brokerproxy: " + script + ": Permission denied"), std::string::npos)
      << denied;
  EXPECT_EQ(d.Cli({"load", "nc"}).exit_code, 5) << "no entry left";

  // The same command by a path that does not exist.
  RunResult gone = d.Cli({"save", "ssh", "--job-id", "nc", "--", dir_ / "gone"});
  EXPECT_EQ(gone.exit_code, 127) << gone;
  EXPECT_NE(gone.err.find(": command not found"), std::string::npos) << gone;
  EXPECT_EQ(d.Cli({"load", "nc"}).exit_code, 5) << "no entry left";
}

TEST_F(ExecModeTest, AnExplicitPortSomeoneListensOnIsRefused) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  // Another job's service (bob's notebook, say) listens on the port the user names.
  Backend taken;
  std::string ran = dir_ / "ran";
  RunResult r = d.Cli({"save", "ssh", "--job-id", "pt", "--port", std::to_string(taken.port()),
                       "--", "sh", "-c", "touch " + ran});
  EXPECT_EQ(r.exit_code, 8) << r;
  EXPECT_NE(r.err.find("port " + std::to_string(taken.port()) + " is already in use"),
            std::string::npos)
      << r;
  EXPECT_EQ(d.Cli({"load", "pt"}).exit_code, 5) << "nothing saved";
  EXPECT_EQ(::access(ran.c_str(), F_OK), -1) << "the command did not run";
  // A free port is taken as given, and the command gets it.
  PortReservation idle;  // bound by the test, listened on by nothing
  int free = idle.port();
  std::string out = dir_ / "out";
  RunResult ok = d.Cli({"save", "ssh", "--job-id", "pt", "--port", std::to_string(free), "--", "sh",
                        "-c", "echo {port} > " + out});
  EXPECT_EQ(ok.exit_code, 0) << ok;
  EXPECT_EQ(WaitForFile(out), std::to_string(free));
}

TEST_F(ExecModeTest, NothingListeningAfterReadyTimeoutIsWarnedAboutLoudly) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  // A command that never listens on its port (a misspelt flag, a service on its own default);
  // it sleeps in a loop to stay up, which is not a wait.
  auto save = StartSave(d, "rt", "while :; do sleep 0.05; done", {"--wait-timeout", "1s"});
  ASSERT_TRUE(save);
  auto warning = save->WaitFor("WARNING: nothing listens on 127.0.0.1:");
  ASSERT_TRUE(warning) << save->Output();
  EXPECT_NE(warning->find("after 1s (ready_timeout)"), std::string::npos) << *warning;
  EXPECT_NE(warning->find("Job rt stays registered"), std::string::npos) << *warning;
  // The job stays registered and the command keeps running.
  EXPECT_TRUE(save->Running()) << save->Output();
  EXPECT_EQ(d.Cli({"load", "rt"}).exit_code, 0);
  EXPECT_EQ(save->Stop(SIGTERM, 30000), 128 + SIGTERM) << save->Output();

  // A command that listens in time gets no warning, even well past the timeout: its sleeps
  // keep it running past the timeout, and then up (not waits).
  std::string done = dir_ / "done";
  auto listening = StartSave(d, "rt2",
                             "exec /usr/bin/python3 -c \"import socket,time; s=socket.socket(); "
                             "s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(3); open('" +
                                 done + "','w').write('done\\n'); time.sleep(60)\"",
                             {"--wait-timeout", "1s"});
  ASSERT_TRUE(listening);
  EXPECT_EQ(WaitForFile(done), "done") << listening->Output();
  EXPECT_EQ(listening->Output().find("WARNING"), std::string::npos) << listening->Output();
  EXPECT_EQ(listening->Stop(SIGTERM, 30000), 128 + SIGTERM) << listening->Output();
}

}  // namespace
}  // namespace brokerproxy::testing
