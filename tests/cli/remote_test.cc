// The pure parts of --via: target parsing, shell quoting, the remote command line for each
// request, and reading the remote command's outcome.

#include "cli/remote.h"

#include <gtest/gtest.h>

#include "cli/ssh_client.h"
#include "registry/control_protocol.h"

namespace brokerproxy::cli {
namespace {

TEST(SshTargetTest, Parses) {
  struct {
    const char* text;
    const char* user;
    const char* host;
    int port;
  } cases[] = {
      {"login", "", "login", 0},
      {"alice@login.example.org", "alice", "login.example.org", 0},
      {"login:2222", "", "login", 2222},
      {"bob@10.0.0.1:22", "bob", "10.0.0.1", 22},
      {"[::1]:2200", "", "::1", 2200},
      {"carol@[fe80::1]", "carol", "fe80::1", 0},
      {"::1", "", "::1", 0},
      {"a@b@host", "a@b", "host", 0},  // the last '@' separates the user
  };
  for (const auto& c : cases) {
    auto t = ParseSshTarget(c.text);
    ASSERT_TRUE(t.ok()) << c.text << ": " << t.status().ToString();
    EXPECT_EQ(t->user, c.user) << c.text;
    EXPECT_EQ(t->host, c.host) << c.text;
    EXPECT_EQ(t->port, c.port) << c.text;
  }
  EXPECT_EQ(ParseSshTarget("bob@[::1]:2200")->ToString(), "bob@[::1]:2200");
  EXPECT_EQ(ParseSshTarget("login")->ToString(), "login");
}

TEST(SshTargetTest, Rejects) {
  for (const char* text : {"", "@host", "user@", "host:", "host:0", "host:65536", "host:x", "[::1",
                           "[::1]x", "ho st", "host;rm", "a/b", "it's"}) {
    auto t = ParseSshTarget(text);
    if (std::string_view(text) == "host;rm") {
      // ';' is harmless here: the host never reaches a shell. Only blanks, quotes, '/' and
      // control characters are refused.
      EXPECT_TRUE(t.ok()) << text;
      continue;
    }
    EXPECT_FALSE(t.ok()) << text;
    if (!t.ok()) {
      EXPECT_EQ(t.status().code(), Status::Code::kInvalidArgument);
    }
  }
}

TEST(ShellQuoteTest, QuotesOnlyWhatNeedsIt) {
  EXPECT_EQ(ShellQuote("save"), "save");
  EXPECT_EQ(ShellQuote("--job-id"), "--job-id");
  EXPECT_EQ(ShellQuote("node7.cluster:80"), "node7.cluster:80");
  EXPECT_EQ(ShellQuote(""), "''");
  EXPECT_EQ(ShellQuote("a b"), "'a b'");
  EXPECT_EQ(ShellQuote("it's"), "'it'\\''s'");
  EXPECT_EQ(ShellQuote("$(reboot)"), "'$(reboot)'");
  EXPECT_EQ(ShellQuote("`x`;|&><*?\n"), "'`x`;|&><*?\n'");
}

registry::Request Req(registry::Op op, const std::string& job = "") {
  registry::Request r;
  r.op = op;
  r.job = job;
  return r;
}

TEST(RemoteCommandTest, EachOpIsItsSubcommandWithJson) {
  const std::string cmd = "/opt/bp/bin/brokerproxy";
  EXPECT_EQ(RemoteCommandFor(cmd, Req(registry::Op::kLoad, "j1")).command,
            "/opt/bp/bin/brokerproxy load j1 --via '' --json");
  EXPECT_EQ(RemoteCommandFor(cmd, Req(registry::Op::kQuery)).command,
            "/opt/bp/bin/brokerproxy query --via '' --json");
  EXPECT_EQ(RemoteCommandFor(cmd, Req(registry::Op::kStats)).command,
            "/opt/bp/bin/brokerproxy stats --via '' --json");
  EXPECT_EQ(RemoteCommandFor(cmd, Req(registry::Op::kRemove, "j.1_x-y")).command,
            "/opt/bp/bin/brokerproxy remove j.1_x-y --via '' --json");
  // A conditional remove: the secret travels on stdin, not in the remote `ps`.
  registry::Request remove = Req(registry::Op::kRemove, "j1");
  remove.secret = "00ff";
  RemoteInvocation conditional = RemoteCommandFor(cmd, remove);
  EXPECT_EQ(conditional.command, "/opt/bp/bin/brokerproxy remove j1 --if-secret - --via '' --json");
  EXPECT_EQ(conditional.input, "00ff\n");
  registry::Request wait = Req(registry::Op::kWait, "j1");
  wait.timeout_ms = 120000;
  EXPECT_EQ(RemoteCommandFor(cmd, wait).command,
            "/opt/bp/bin/brokerproxy wait j1 --timeout 120000ms --via '' --json");

  registry::Request save = Req(registry::Op::kSave, "j1");
  save.save.id = "j1";
  save.save.type = registry::JobType::kSsl;
  save.save.host = "node7";
  save.save.port = 8888;
  save.save.ttl = 3600;
  save.save.ready = false;
  EXPECT_EQ(RemoteCommandFor(cmd, save).command,
            "/opt/bp/bin/brokerproxy save ssl --job-id j1 --host node7 --port 8888 --ttl 3600s "
            "--pending --via '' --json");
  save.save.port = 0;
  save.save.ttl = -1;
  save.save.ready = true;
  EXPECT_EQ(RemoteCommandFor(cmd, save).command,
            "/opt/bp/bin/brokerproxy save ssl --job-id j1 --host node7 --via '' --json");
  save.save.replace = true;
  EXPECT_EQ(RemoteCommandFor(cmd, save).command,
            "/opt/bp/bin/brokerproxy save ssl --job-id j1 --host node7 --replace --via '' --json");
  save.save.replace = false;

  // ssl with its CSR: the key stays here, the CSR goes on stdin, the paths on the command line.
  save.csr = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n";
  save.save.cert_path = "/home/u/certs/j1.crt";
  save.save.key_path = "/home/u/certs/j1.key";
  RemoteInvocation inv = RemoteCommandFor(cmd, save);
  EXPECT_EQ(inv.command,
            "/opt/bp/bin/brokerproxy save ssl --job-id j1 --host node7 --csr-stdin --cert-path "
            "/home/u/certs/j1.crt --key-path /home/u/certs/j1.key --via '' --json");
  EXPECT_EQ(inv.input, save.csr);
}

TEST(RemoteCommandTest, TheSecretGoesToStdinNotTheCommandLine) {
  registry::Request verify = Req(registry::Op::kVerify, "j1");
  verify.secret = "0123abcd";
  RemoteInvocation inv = RemoteCommandFor("brokerproxy", verify);
  EXPECT_EQ(inv.command, "brokerproxy verify j1 - --via '' --json");
  EXPECT_EQ(inv.input, "0123abcd\n");
  EXPECT_EQ(inv.command.find("0123abcd"), std::string::npos);
}

TEST(RemoteCommandTest, RemoteCommandIsUsedAsWritten) {
  EXPECT_EQ(RemoteCommandFor("env BROKERPROXY_CONFIG=/etc/bp.ini /usr/bin/brokerproxy",
                             Req(registry::Op::kQuery))
                .command,
            "env BROKERPROXY_CONFIG=/etc/bp.ini /usr/bin/brokerproxy query --via '' --json");
}

TEST(RemoteReplyTest, ReadsTheReplyObjectOrExplains) {
  ExecResult ok;
  ok.exit_status = 0;
  ok.out = "motd line\n{\"ok\":true,\"jobs\":[]}\n";
  auto r = ParseRemoteReply(ok, "login");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(r->get(), "jobs")));

  ExecResult err;
  err.exit_status = 5;
  err.out = "{\"ok\":false,\"error\":\"no job \\\"x\\\"\",\"code\":\"not_found\"}\n";
  auto e = ParseRemoteReply(err, "login");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), Status::Code::kNotFound);
  EXPECT_EQ(e.status().message(), "no job \"x\"");

  ExecResult missing;
  missing.exit_status = 127;
  missing.err = "bash: brokerproxy: command not found\n";
  auto m = ParseRemoteReply(missing, "login");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Status::Code::kUnavailable);
  EXPECT_NE(m.status().message().find("remote_command"), std::string::npos);
  EXPECT_NE(m.status().message().find("command not found"), std::string::npos);

  ExecResult usage;
  usage.exit_status = 2;
  usage.err = "The following arguments were not expected: --pending\n";
  EXPECT_EQ(ParseRemoteReply(usage, "login").status().code(), Status::Code::kInvalidArgument);

  ExecResult garbage;
  garbage.exit_status = 0;
  garbage.out = "{not json\n";
  EXPECT_EQ(ParseRemoteReply(garbage, "login").status().code(), Status::Code::kIOError);
}

}  // namespace
}  // namespace brokerproxy::cli
