// The [scheduler] section as the daemon resolves it at start (cli/daemon.h): bad values are
// refused with a message naming the key, user names become uids.

#include <gtest/gtest.h>
#include <pwd.h>
#include <unistd.h>

#include "cli/daemon.h"
#include "cli/options.h"
#include "e2e/harness.h"

namespace brokerproxy::cli {
namespace {

Result<SchedulerSettings> Resolve(const std::string& ini) {
  Config c = DefaultConfig();
  Status s = ParseConfigText(ini, "test.ini", &c);
  if (!s.ok()) return s;
  return ResolveSchedulerSettings(c);
}

TEST(SchedulerSettingsTest, DefaultsBindNothing) {
  auto s = Resolve("");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->options.type, registry::SchedulerType::kNone);
  EXPECT_TRUE(s->admin_uids.empty());
}

TEST(SchedulerSettingsTest, ReadsTypeCommandsAndAdmins) {
  // A user name every system has (no test user to create: that would need root).
  const passwd* nobody = ::getpwnam("nobody");
  ASSERT_NE(nobody, nullptr);
  auto s = Resolve(
      "[scheduler]\ntype = slurm\ncall_timeout = 3s\ncache = 500ms\nsqueue = "
      "/opt/slurm/bin/squeue\n"
      "admin_uids = 0, 4242, nobody\n");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->options.type, registry::SchedulerType::kSlurm);
  EXPECT_EQ(s->options.call_timeout_ms, 3000);
  EXPECT_EQ(s->options.cache_ms, 500);
  EXPECT_EQ(s->options.squeue, "/opt/slurm/bin/squeue");
  EXPECT_EQ(s->admin_uids, (std::vector<uid_t>{0, 4242, nobody->pw_uid}));
  EXPECT_EQ(Resolve("[scheduler]\ntype = pbs\n")->options.type, registry::SchedulerType::kPbs);
}

TEST(SchedulerSettingsTest, BadValuesAreRefusedNamingTheKey) {
  struct Case {
    const char* ini;
    const char* message;
  };
  for (const Case& c : {
           Case{"[scheduler]\ntype = lsf\n", "[scheduler] type: 'lsf' is not none, slurm or pbs"},
           Case{"[scheduler]\ntype = Slurm\n",
                "[scheduler] type: 'Slurm' is not none, slurm or pbs"},
           Case{"[scheduler]\nreconcile_interval = 0\n",
                "[scheduler] reconcile_interval: must be at least 1s"},
           Case{"[scheduler]\ncall_timeout = 10ms\n",
                "[scheduler] call_timeout: must be at least 1s"},
           Case{"[scheduler]\nadmin_uids = 0, no-such-user-here\n",
                "[scheduler] admin_uids: 'no-such-user-here' is neither a uid nor a user name "
                "known here"},
           Case{"[scheduler]\nsqueue = -x\n",
                "[scheduler] squeue: '-x' is not a command (a name or path, without blanks)"},
           Case{"[scheduler]\nsinfo = \"sinfo --all\"\n",
                "[scheduler] sinfo: 'sinfo --all' is not a command (a name or path, without "
                "blanks)"},
       }) {
    auto s = Resolve(c.ini);
    ASSERT_FALSE(s.ok()) << c.ini;
    EXPECT_EQ(s.status().code(), Status::Code::kInvalidArgument);
    EXPECT_EQ(s.status().message(), c.message);
  }
  // Durations beyond their bounds are refused by the option table already.
  Config c = DefaultConfig();
  EXPECT_FALSE(ParseConfigText("[scheduler]\nreconcile_interval = 2d\n", "t", &c).ok());
  EXPECT_FALSE(ParseConfigText("[scheduler]\ncache = 5m\n", "t", &c).ok());
}

}  // namespace
}  // namespace brokerproxy::cli

namespace brokerproxy::cli {
namespace {

// A '+' (a Slurm heterogeneous component, "12+1") cannot be part of a TLS server name: `save
// ssl` refuses such an id at once, before it makes a key or asks the daemon.
TEST(SaveSslIdTest, IdWithPlusIsRefusedBeforeAnyKeyIsMade) {
  testing::TempDir dir;
  testing::RunOptions o;
  o.env = {"XDG_STATE_HOME=" + dir.path()};
  testing::RunResult r =
      testing::RunCommand({testing::BinaryPath(), "save", "ssl", "--job-id", "12+1", "--port",
                           "8000", "--socket", dir / "none.sock"},
                          o);
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("job 12+1 cannot be an ssl job"), std::string::npos) << r;
  EXPECT_NE(::access((dir / "brokerproxy").c_str(), F_OK), 0) << "a key directory was made";
}

}  // namespace
}  // namespace brokerproxy::cli
