// The broker commands end to end: the real daemon and the real CLI, as a job script and a user
// run them (issue 2's acceptance).

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "e2e/harness.h"
#include "registry/json.h"

namespace brokerproxy::testing {
namespace {

constexpr uid_t kNobody = 65534;

// Polls `query --json` until `pred` holds for the job list, or the deadline.
bool WaitForJobs(const Daemon& d, const std::function<bool(const cJSON* jobs)>& pred,
                 int timeout_ms = 15000, const RunOptions& opts = {}) {
  return WaitUntil(
      [&] {
        auto j = ParseOut(d.Cli({"query", "--json"}, opts));
        return j && pred(cJSON_GetObjectItemCaseSensitive(j.get(), "jobs"));
      },
      timeout_ms);
}

const cJSON* FindJob(const cJSON* jobs, const std::string& id) {
  for (const cJSON* j = jobs ? jobs->child : nullptr; j; j = j->next) {
    if (JsonText(j, {"id"}) == id) return j;
  }
  return nullptr;
}

class BrokerTest : public ::testing::Test {
 protected:
  TempDir dir_;
};

TEST_F(BrokerTest, SaveLoadVerifyQueryRemove) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());

  RunResult save = d.Cli({"save", "ssh", "--job-id", "4242", "--port", "5555", "--json"});
  ASSERT_EQ(save.exit_code, 0) << save;
  auto saved = ParseOut(save);
  ASSERT_TRUE(saved);
  std::string secret = JsonText(saved.get(), {"job", "secret"});
  EXPECT_EQ(secret.size(), 64u);  // 256 bits in hex
  EXPECT_EQ(JsonText(saved.get(), {"job", "port"}), "5555");
  EXPECT_EQ(JsonText(saved.get(), {"job", "type"}), "ssh");

  RunResult load = d.Cli({"load", "4242", "--json"});
  ASSERT_EQ(load.exit_code, 0) << load;
  EXPECT_EQ(JsonText(ParseOut(load).get(), {"job", "secret"}), secret);
  RunResult human = d.Cli({"load", "4242"});
  EXPECT_NE(human.out.find("secret:   " + secret), std::string::npos) << human;

  RunResult right = d.Cli({"verify", "4242", secret});
  EXPECT_EQ(right.exit_code, 0) << right;
  EXPECT_EQ(right.out, "yes\n");
  std::string wrong_secret = secret;
  wrong_secret[0] = wrong_secret[0] == 'a' ? 'b' : 'a';
  RunResult wrong = d.Cli({"verify", "4242", wrong_secret});
  EXPECT_EQ(wrong.exit_code, 1) << wrong;
  EXPECT_EQ(wrong.out, "no\n");
  RunOptions stdin_secret;
  stdin_secret.stdin_data = secret + "\n";
  EXPECT_EQ(d.Cli({"verify", "4242", "-"}, stdin_secret).exit_code, 0);

  RunResult query = d.Cli({"query", "--json"});
  ASSERT_EQ(query.exit_code, 0) << query;
  EXPECT_EQ(query.out.find(secret), std::string::npos) << "query must not reveal secrets";
  auto q = ParseOut(query);
  ASSERT_TRUE(FindJob(cJSON_GetObjectItemCaseSensitive(q.get(), "jobs"), "4242"));

  RunResult remove = d.Cli({"remove", "4242"});
  EXPECT_EQ(remove.exit_code, 0) << remove;
  RunResult gone = d.Cli({"load", "4242"});
  EXPECT_EQ(gone.exit_code, 5) << gone;  // job not found
  EXPECT_NE(gone.err.find("4242"), std::string::npos);
  EXPECT_EQ(d.Stop(), 0);
  EXPECT_EQ(d.Log().find(secret), std::string::npos) << "secrets never appear in logs";
}

TEST_F(BrokerTest, AllocatesDistinctPortsFromTheRange) {
  Daemon d(dir_, "[registry]\nport_range = 41000-41002\n");
  ASSERT_TRUE(d.Start());
  std::set<std::string> ports;
  for (const char* id : {"a", "b", "c"}) {
    RunResult r = d.Cli({"save", "ssh", "--job-id", id, "--json"});
    ASSERT_EQ(r.exit_code, 0) << r;
    std::string port = JsonText(ParseOut(r).get(), {"job", "port"});
    EXPECT_GE(std::stoi(port), 41000);
    EXPECT_LE(std::stoi(port), 41002);
    ports.insert(port);
  }
  EXPECT_EQ(ports.size(), 3u);
  RunResult full = d.Cli({"save", "ssh", "--job-id", "d"});
  EXPECT_EQ(full.exit_code, 6) << full;  // port range exhausted
  EXPECT_NE(full.err.find("exhausted"), std::string::npos) << full;
  // Saving an existing id again is refused, with the way to save a second service; with
  // --replace it replaces the entry (its port comes back first, so a full range is no obstacle).
  RunResult again = d.Cli({"save", "ssh", "--job-id", "a"});
  EXPECT_EQ(again.exit_code, 8) << again;
  EXPECT_NE(again.err.find("job a already has a service registered; save another service of the "
                           "same job with --name NAME, or replace it with --replace"),
            std::string::npos)
      << again;
  EXPECT_EQ(d.Cli({"save", "ssh", "--job-id", "a", "--replace"}).exit_code, 0);
}

TEST_F(BrokerTest, RestartKeepsEveryJobAndTheFileIsPrivate) {
  std::map<std::string, std::string> secrets;
  {
    Daemon d(dir_);
    ASSERT_TRUE(d.Start());
    for (const char* id : {"r1", "r2", "r3"}) {
      secrets[id] = d.SaveJob(id, 6000);
      ASSERT_FALSE(secrets[id].empty());
    }
    EXPECT_EQ(d.Stop(SIGINT), 0);
  }
  struct stat st {};
  ASSERT_EQ(stat((dir_ / "state/registry.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  Daemon again(dir_);
  ASSERT_TRUE(again.Start());
  for (const auto& [id, secret] : secrets) {
    RunResult r = again.Cli({"verify", id, secret});
    EXPECT_EQ(r.exit_code, 0) << id << ": " << r;
  }
}

TEST_F(BrokerTest, DamagedRegistryIsRefusedWithAClearMessage) {
  {
    Daemon d(dir_);
    ASSERT_TRUE(d.Start());
    ASSERT_FALSE(d.SaveJob("x1", 6000).empty());
    d.Stop();
  }
  std::string path = dir_ / "state/registry.json";
  std::string data = ReadFile(path);
  for (const std::string& damaged : {data.substr(0, data.size() / 2), [&] {
                                       std::string d = data;
                                       size_t at = d.find("6000");
                                       d[at] = '7';
                                       return d;
                                     }()}) {
    WriteFile(path, damaged, 0600);
    RunResult r = RunCommand({BinaryPath(), "run", "-c", dir_ / "config.ini"});
    EXPECT_NE(r.exit_code, 0) << r;
    EXPECT_NE(r.err.find(path), std::string::npos) << r;
    EXPECT_NE(r.err.find("refusing to start"), std::string::npos) << r;
  }
}

TEST_F(BrokerTest, UsersAreIsolated) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_FALSE(d.SaveJob("root-job", 6001).empty());

  // `nobody` on the control socket: the daemon knows it from SO_PEERCRED, whatever it claims.
  auto as_nobody = [&](const std::string& line) {
    auto reply = ParseOut(ControlRequestAs(kNobody, d.socket_path(), line));
    EXPECT_TRUE(reply) << line;
    return reply;
  };
  auto saved =
      as_nobody(R"({"op":"save","job":"nobody-job","type":"ssh","host":"127.0.0.1","port":6002})");
  std::string their = JsonText(saved.get(), {"job", "secret"});
  ASSERT_FALSE(their.empty());
  EXPECT_EQ(JsonText(saved.get(), {"job", "owner"}), "65534");
  auto list = as_nobody(R"({"op":"query"})");
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(list.get(), "jobs");
  EXPECT_TRUE(FindJob(jobs, "nobody-job"));
  EXPECT_FALSE(FindJob(jobs, "root-job")) << "another user's job is invisible";
  for (const char* line :
       {R"({"op":"load","job":"root-job"})", R"({"op":"remove","job":"root-job"})",
        R"({"op":"verify","job":"root-job","secret":"00"})",
        R"({"op":"save","job":"root-job","type":"ssh","host":"127.0.0.1"})"}) {
    EXPECT_EQ(JsonText(as_nobody(line).get(), {"code"}), "permission_denied") << line;
  }

  // The same through the CLI and its exit codes, where `nobody` can run programs (a bare
  // chroot whose / is mode 0700 lets it run nothing at all).
  if (CanRunAs(kNobody)) {
    RunOptions nobody;
    nobody.uid = kNobody;
    // The build tree may sit where `nobody` cannot reach (/root): give it its own copy.
    nobody.binary = dir_ / "brokerproxy";
    ASSERT_EQ(RunCommand({"install", "-m", "0755", BinaryPath(), nobody.binary}).exit_code, 0);
    RunResult q = d.Cli({"query", "--json"}, nobody);
    ASSERT_EQ(q.exit_code, 0) << q;
    EXPECT_TRUE(FindJob(cJSON_GetObjectItemCaseSensitive(ParseOut(q).get(), "jobs"), "nobody-job"));
    EXPECT_EQ(d.Cli({"load", "root-job"}, nobody).exit_code, 4);  // permission denied
    EXPECT_EQ(d.Cli({"remove", "root-job"}, nobody).exit_code, 4);
    EXPECT_EQ(d.Cli({"save", "ssh", "--job-id", "root-job"}, nobody).exit_code, 4);
    EXPECT_EQ(d.Cli({"verify", "root-job", "00"}, nobody).exit_code, 4);
  }

  // Root sees and manages everyone's jobs.
  auto all = ParseOut(d.Cli({"query", "--json"}));
  EXPECT_TRUE(FindJob(cJSON_GetObjectItemCaseSensitive(all.get(), "jobs"), "nobody-job"));
  EXPECT_EQ(d.Cli({"verify", "nobody-job", their}).exit_code, 0);
  EXPECT_EQ(d.Cli({"remove", "nobody-job"}).exit_code, 0);
  EXPECT_EQ(d.Cli({"load", "root-job"}).exit_code, 0);
}

TEST_F(BrokerTest, ExecModeSubstitutesRunsAndRemovesTheJob) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  std::string out = dir_ / "exec.out";
  RunResult r = d.Cli({"save", "ssh", "--job-id", "77", "--", "sh", "-c",
                       "echo port={port} job={job} env=$BROKER_PORT secret=${#BROKER_SECRET} > " +
                           out + "; exit 3"});
  EXPECT_EQ(r.exit_code, 3) << r;  // the command's status
  std::string text = ReadFile(out);
  size_t at = text.find("port=");
  ASSERT_NE(at, std::string::npos) << text;
  std::string port = text.substr(at + 5, text.find(' ', at) - at - 5);
  EXPECT_GE(std::stoi(port), 28000);
  EXPECT_LE(std::stoi(port), 28999);
  EXPECT_NE(text.find("job=77 env=" + port + " secret=64"), std::string::npos) << text;
  EXPECT_EQ(d.Cli({"load", "77"}).exit_code, 5) << "the job is removed when the command exits";
}

TEST_F(BrokerTest, ExecModeWaitsForTheListenerAndForwardsSignals) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  auto child = Child::Spawn(
      {BinaryPath(), "save", "ssh", "--job-id", "srv", "-c", d.config_path(), "--", "socat",
       "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", "SYSTEM:echo hello"},
      dir_ / "exec.log");
  ASSERT_TRUE(child);
  // First it waits, then it is ready once socat listens.
  EXPECT_TRUE(WaitForJobs(d, [](const cJSON* jobs) {
    const cJSON* j = FindJob(jobs, "srv");
    return j && JsonText(j, {"ready"}) == "true";
  })) << child->Output();
  // SIGTERM to `save` reaches socat; the job goes with it.
  int rc = child->Stop(SIGTERM);
  EXPECT_EQ(rc, 143) << child->Output();  // socat died of the forwarded SIGTERM
  EXPECT_EQ(d.Cli({"load", "srv"}).exit_code, 5);
}

TEST_F(BrokerTest, SaveWaitTimesOutAndLeavesNothingBehind) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunResult r =
      d.Cli({"save", "ssh", "--job-id", "w1", "--port", "1", "--wait", "--wait-timeout", "1s"});
  EXPECT_EQ(r.exit_code, 7) << r;  // timeout
  EXPECT_NE(r.err.find("within"), std::string::npos) << r;
  EXPECT_EQ(d.Cli({"load", "w1"}).exit_code, 5);

  Backend backend;
  RunResult ok = d.Cli({"save", "ssh", "--job-id", "w2", "--port", std::to_string(backend.port()),
                        "--wait", "--json"});
  EXPECT_EQ(ok.exit_code, 0) << ok;
  EXPECT_EQ(JsonText(ParseOut(ok).get(), {"job", "ready"}), "true");
}

TEST_F(BrokerTest, EnvFormatIsReadyForEval) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunResult r = RunCommand(
      {"sh", "-c",
       "eval \"$(" + BinaryPath() + " save ssh --job-id e1 --port 7001 --format env -c " +
           d.config_path() + ")\" && echo \"$BROKER_JOB_ID:$BROKER_PORT:${#BROKER_SECRET}\""});
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out, "e1:7001:64\n");
}

TEST_F(BrokerTest, JobIdComesFromTheBatchSystem) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunOptions slurm;
  slurm.env = {"SLURM_JOB_ID=998877"};
  RunResult r = d.Cli({"save", "ssh", "--port", "7002", "--name", "lab", "--json"}, slurm);
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(JsonText(ParseOut(r).get(), {"job", "id"}), "998877.lab");
  RunOptions none;
  none.env = {"SLURM_JOB_ID=", "PBS_JOBID="};
  EXPECT_EQ(d.Cli({"save", "ssh", "--port", "7002"}, none).exit_code, 2);
}

TEST_F(BrokerTest, TtlExpiresJobs) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  ASSERT_EQ(d.Cli({"save", "ssh", "--job-id", "t1", "--port", "7003", "--ttl", "1s"}).exit_code, 0);
  EXPECT_TRUE(WaitForJobs(d, [](const cJSON* jobs) { return !FindJob(jobs, "t1"); }));
  EXPECT_NE(d.Log().find("job t1 expired"), std::string::npos);
}

TEST_F(BrokerTest, ClearErrorsWhenTheDaemonIsNotRunning) {
  Daemon d(dir_);  // never started
  RunResult r = d.Cli({"query"});
  EXPECT_EQ(r.exit_code, 3) << r;
  EXPECT_NE(r.err.find("not running"), std::string::npos) << r;
  EXPECT_NE(r.err.find(d.socket_path()), std::string::npos) << r;
}

TEST_F(BrokerTest, BadConfigNamesFileLineAndKey) {
  std::string path = dir_ / "bad.ini";
  WriteFile(path, "[proxy]\nmax_connections = lots\n");
  RunResult r = RunCommand({BinaryPath(), "query", "-c", path});
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find(path + ":2"), std::string::npos) << r;
  EXPECT_NE(r.err.find("max_connections"), std::string::npos) << r;
  WriteFile(path, "[proxy]\nmax_conections = 5\n");
  r = RunCommand({BinaryPath(), "run", "-c", path});
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("max_conections"), std::string::npos) << r;
}

TEST_F(BrokerTest, SecondDaemonOnTheSameSocketIsRefused) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  RunOptions quick;
  quick.timeout_ms = 10000;
  RunResult r = RunCommand({BinaryPath(), "run", "-c", d.config_path()}, quick);
  EXPECT_EQ(r.exit_code, 8) << r;
  EXPECT_NE(r.err.find("already listening"), std::string::npos) << r;
  EXPECT_EQ(d.Cli({"query"}).exit_code, 0) << "the first daemon keeps serving";
}

// ---- the control socket under bad input ----

int ConnectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

TEST_F(BrokerTest, ControlSocketSurvivesBadInput) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  int fd = ConnectUnix(d.socket_path());
  ASSERT_GE(fd, 0);
  struct Case {
    std::string line;
    std::string code;
  } cases[] = {
      {"garbage", "invalid_argument"},
      {"{\"op\":\"load\",\"job\":5}", "invalid_argument"},
      {"{\"op\":\"fly\"}", "invalid_argument"},
      {"{\"op\":\"load\"}", "invalid_argument"},
      {"{\"op\":\"load\",\"job\":\"../etc\"}", "invalid_argument"},
      {"[1,2,3]", "invalid_argument"},
      {"{\"op\":\"query\",\"op\":\"query\"}", "invalid_argument"},
      {"{\"op\":\"load\",\"job\":\"nope\"}", "not_found"},
  };
  for (const auto& c : cases) {
    ASSERT_TRUE(SendAll(fd, c.line + "\n"));
    auto reply = ReadLine(fd, 1 << 16);
    ASSERT_TRUE(reply) << c.line;
    auto j = registry::ParseJson(*reply, 1 << 16);
    ASSERT_TRUE(j.ok()) << *reply;
    EXPECT_EQ(JsonText(j->get(), {"ok"}), "false") << c.line;
    EXPECT_EQ(JsonText(j->get(), {"code"}), c.code) << c.line << " -> " << *reply;
  }
  // Still serving on the same connection after all that.
  ASSERT_TRUE(SendAll(fd, "{\"op\":\"query\"}\n"));
  auto ok = ReadLine(fd, 1 << 16);
  ASSERT_TRUE(ok);
  EXPECT_NE(ok->find("\"ok\":true"), std::string::npos) << *ok;
  close(fd);

  // An oversized line: an error reply, then the daemon closes this client.
  fd = ConnectUnix(d.socket_path());
  ASSERT_GE(fd, 0);
  std::string huge(64 * 1024, 'x');
  SendAll(fd, huge);
  auto reply = ReadLine(fd, 1 << 16);
  ASSERT_TRUE(reply);
  EXPECT_NE(reply->find("longer than"), std::string::npos) << *reply;
  EXPECT_EQ(ReadToEof(fd), "");
  close(fd);

  // A client that disconnects mid-line.
  fd = ConnectUnix(d.socket_path());
  ASSERT_GE(fd, 0);
  SendAll(fd, "{\"op\":\"sa");
  close(fd);

  EXPECT_EQ(d.Cli({"query"}).exit_code, 0) << "the daemon keeps serving";
  EXPECT_EQ(d.Stop(), 0);
}

}  // namespace
}  // namespace brokerproxy::testing
