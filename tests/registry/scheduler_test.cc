// registry/scheduler.h: the hostlist, squeue/sinfo and qstat parsers on recorded outputs
// (tests/data/README.md) and on malformed ones, and the command runner with fake scheduler
// commands (shell scripts written by the tests): timeouts, output limits, failures, and one
// call shared by concurrent List() calls.

#include "registry/scheduler.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <time.h>

#include <chrono>
#include <fstream>
#include <optional>
#include <sstream>

#include "e2e/harness.h"
#include "loop/loop.h"

namespace brokerproxy::registry {
namespace {

using ::brokerproxy::testing::ReadFile;
using ::brokerproxy::testing::TempDir;
using ::brokerproxy::testing::WriteFile;
using Names = std::vector<std::string>;

std::string Data(const std::string& name) {
  return ReadFile(std::string(BROKERPROXY_SOURCE_DIR) + "/tests/data/" + name);
}

// ---- hostlists ----

TEST(SchedulerHostlistTest, ExpandsRangesListsAndPadding) {
  EXPECT_EQ(*ExpandHostlist("n[1-2]"), (Names{"n1", "n2"}));
  EXPECT_EQ(*ExpandHostlist("n1"), (Names{"n1"}));
  EXPECT_EQ(*ExpandHostlist(""), Names{});
  EXPECT_EQ(*ExpandHostlist("gpu[01-03,07],login1"),
            (Names{"gpu01", "gpu02", "gpu03", "gpu07", "login1"}));
  EXPECT_EQ(*ExpandHostlist("n[8-10]"), (Names{"n8", "n9", "n10"}));
  EXPECT_EQ(*ExpandHostlist("n[08-10]"), (Names{"n08", "n09", "n10"}));
  EXPECT_EQ(*ExpandHostlist("a[1,3],b[2-3].x,c"), (Names{"a1", "a3", "b2.x", "b3.x", "c"}));
  EXPECT_EQ(*ExpandHostlist("r[1-2]n[1-2]"), (Names{"r1n1", "r1n2", "r2n1", "r2n2"}));
  EXPECT_EQ(*ExpandHostlist("[1-2]"), (Names{"1", "2"}));
}

TEST(SchedulerHostlistTest, RefusesGarbage) {
  for (const char* bad : {"n[",     "n]",    "n[1-2",   "n[[1]]",   "n[1-[2]]",
                          "n[2-1]", "n[]",   "n[a]",    "n[1-]",    "n[-1]",
                          "n[1,]",  "n,,m",  "n[1-2],", ",n",       "n 1",
                          "n;rm",   "n[1]]", "n\n",     "n[1-2]x[", "n[1234567890123456789]"}) {
    auto r = ExpandHostlist(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "'";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument) << bad;
    }
  }
}

TEST(SchedulerHostlistTest, RefusesHugeExpansionsBeforeExpanding) {
  // The bound itself is accepted...
  auto most = ExpandHostlist("n[1-100000]");
  ASSERT_TRUE(most.ok()) << most.status().ToString();
  EXPECT_EQ(most->size(), kMaxHostlistNames);
  // ...one more name, in one range, in a product or spread over a list, is not.
  for (std::string bad :
       {"n[0-100000]", "n[0-99999999999]", "a[1-1000]b[1-1000]",
        "a[1-1000]b[1-1000]c[1-1000]d[1-1000]", "n[1-99999],m[1-2]", "n[1-50000,1-50001]"}) {
    auto r = ExpandHostlist(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_NE(r.status().message().find("more than"), std::string::npos) << bad;
    }
  }
  EXPECT_FALSE(ExpandHostlist(std::string(300, 'a')).ok());
  EXPECT_FALSE(ExpandHostlist(std::string(250, 'a') + "[1000000-1000001]").ok());
}

// ---- Slurm ----

SlurmNodes FixtureNodes() {
  auto nodes = ParseSlurmNodes(Data("slurm-sinfo.json"));
  EXPECT_TRUE(nodes.ok()) << nodes.status().ToString();
  return nodes.ok() ? *nodes : SlurmNodes{};
}

TEST(SchedulerSlurmTest, ParsesNodes) {
  SlurmNodes nodes = FixtureNodes();
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes["n1"].hostname, "vm");
  EXPECT_EQ(nodes["n1"].address, "127.0.0.1");
  EXPECT_EQ(nodes["n2"].address, "127.0.0.2");
}

struct Want {
  std::string id;
  Names aliases;
  uid_t owner;
  bool running;
  std::string state;
  int64_t end_time;
  Names hosts;
};

// Every job of `table`, in order, is the one `want` describes.
void ExpectJobs(const JobTable& table, const std::vector<Want>& want) {
  ASSERT_EQ(table.jobs().size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const SchedulerJob& job = table.jobs()[i];
    SCOPED_TRACE(want[i].id);
    EXPECT_EQ(job.id, want[i].id);
    EXPECT_EQ(job.aliases, want[i].aliases);
    EXPECT_EQ(job.owner, want[i].owner);
    EXPECT_EQ(job.running, want[i].running);
    EXPECT_EQ(job.state, want[i].state);
    EXPECT_EQ(job.end_time, want[i].end_time);
    EXPECT_EQ(job.hosts, want[i].hosts);
  }
}

TEST(SchedulerSlurmTest, ParsesEveryJobOfTheRecordedListing) {
  std::vector<std::string> unknown;
  auto table = ParseSlurmJobs(Data("slurm-squeue.json"), FixtureNodes(), &unknown);
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ(unknown, Names{});
  const Names both = {"n1", "vm", "127.0.0.1", "n2", "127.0.0.2"};
  const Names n1 = {"n1", "vm", "127.0.0.1"};
  const Names n2 = {"n2", "vm", "127.0.0.2"};
  const std::vector<Want> want = {
      {"1", {}, 0, false, "COMPLETED", 0, both},
      {"2", {}, 1001, true, "RUNNING", 0, n1},
      {"3_1", {"4"}, 1001, true, "RUNNING", 0, n1},
      {"3_2", {"3"}, 1001, true, "RUNNING", 0, n2},
      {"5", {}, 1002, true, "RUNNING", 1796301930, n2},
      {"6", {}, 1002, false, "PENDING", 0, {}},
      {"7+0", {"7"}, 1001, false, "PENDING", 0, {}},
      {"7+1", {"8"}, 1001, false, "PENDING", 0, {}},
      {"9+0", {"9"}, 1001, false, "PENDING", 0, {}},
      {"9+1", {"10"}, 1001, false, "PENDING", 0, {}},
  };
  ExpectJobs(*table, want);
  // Names as sbatch printed them, as squeue shows them, and the raw ids.
  EXPECT_EQ(table->Find("3")->id, "3_2");
  EXPECT_EQ(table->Find("4")->id, "3_1");
  EXPECT_EQ(table->Find("3_1")->id, "3_1");
  EXPECT_EQ(table->Find("7")->id, "7+0");
  EXPECT_EQ(table->Find("8")->id, "7+1");
  EXPECT_EQ(table->Find("7+1")->id, "7+1");
  EXPECT_EQ(table->Find("11"), nullptr);
  EXPECT_EQ(table->Find("3_3"), nullptr);
}

TEST(SchedulerSlurmTest, NodesMissingFromSinfoAreReportedAndKeepTheirNodeName) {
  std::vector<std::string> unknown;
  auto table = ParseSlurmJobs(Data("slurm-squeue.json"), SlurmNodes{}, &unknown);
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ(unknown, (Names{"n1", "n2"}));
  EXPECT_EQ(table->Find("2")->hosts, Names{"n1"});
}

std::string OneJob(const std::string& fields) {
  return R"({"errors":[],"jobs":[{"job_id":2,"user_id":1001,"job_state":"RUNNING",)"
         R"("nodes":"n1")" +
         fields + "}]}";
}

TEST(SchedulerSlurmTest, EndTimeOnlyForAJobWithATimeLimit) {
  SlurmNodes nodes = FixtureNodes();
  auto end = [&](const std::string& fields) -> int64_t {
    auto t = ParseSlurmJobs(OneJob(R"(,"end_time":1000)" + fields), nodes);
    EXPECT_TRUE(t.ok()) << fields;
    return t.ok() ? t->jobs()[0].end_time : -1;
  };
  EXPECT_EQ(end(R"(,"time_limit":5)"), 1000);
  EXPECT_EQ(end(""), 0);
  EXPECT_EQ(end(R"(,"time_limit":null)"), 0);
  EXPECT_EQ(end(R"(,"time_limit":4294967295)"), 0);  // INFINITE
  EXPECT_EQ(end(R"(,"time_limit":4294967294)"), 0);  // NO_VAL
}

TEST(SchedulerSlurmTest, RefusesMalformedListings) {
  SlurmNodes nodes = FixtureNodes();
  ASSERT_TRUE(ParseSlurmJobs(OneJob(""), nodes).ok());
  for (const std::string& bad : Names{
           std::string(""),
           std::string("not json"),
           std::string("[]"),
           std::string(R"({"errors":[]})"),
           std::string(R"({"jobs":{}})"),
           std::string(R"({"jobs":[1]})"),
           std::string(R"({"jobs":[]} trailing)"),
           std::string(R"({"errors":[{"error":"slurm_load_jobs: boom"}],"jobs":[]})"),
           std::string(R"({"errors":{},"jobs":[]})"),
           std::string(R"({"jobs":[{"user_id":1,"job_state":"RUNNING","nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":2,"job_state":"RUNNING","nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":2,"user_id":1,"nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":"2","user_id":1,"job_state":"R","nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":2.5,"user_id":1,"job_state":"R","nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":-2,"user_id":1,"job_state":"R","nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":2,"user_id":-1,"job_state":"R","nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":2,"user_id":1,"job_state":7,"nodes":""}]})"),
           std::string(R"({"jobs":[{"job_id":2,"user_id":1,"job_state":"","nodes":""}]})"),
           OneJob(R"(,"user_id":1002)"),  // a field twice: cJSON would see the first only
           OneJob(R"(,"nodes":5)"),
           OneJob(R"(,"nodes":"n[")"),
           OneJob(R"(,"array_task_id":"1")"),
           OneJob(R"(,"het_job_id":true)"),
           OneJob(R"(,"time_limit":{"number":5})"),
           OneJob(R"(,"end_time":1e400)"),
           // Two jobs with one name.
           R"({"jobs":[{"job_id":2,"user_id":1,"job_state":"R","nodes":""},)"
           R"({"job_id":2,"user_id":2,"job_state":"R","nodes":""}]})",
           R"({"jobs":[{"job_id":3,"array_job_id":3,"array_task_id":1,"user_id":1,)"
           R"("job_state":"R","nodes":""},{"job_id":4,"array_job_id":3,"array_task_id":1,)"
           R"("user_id":2,"job_state":"R","nodes":""}]})",
       }) {
    auto r = ParseSlurmJobs(bad, nodes);
    EXPECT_FALSE(r.ok()) << bad;
  }
  EXPECT_FALSE(ParseSlurmNodes(R"({"nodes":[{"name":"n1","hostname":7}]})").ok());
  EXPECT_FALSE(ParseSlurmNodes(R"({"nodes":[{"hostname":"x"}]})").ok());
  EXPECT_FALSE(ParseSlurmNodes(R"({"nodes":[{"name":"n1"},{"name":"n1"}]})").ok());
  EXPECT_FALSE(ParseSlurmNodes(R"({"nodes":[{"name":"n1","hostname":"a b"}]})").ok());
  EXPECT_FALSE(ParseSlurmNodes(R"({"nodes":{}})").ok());
}

// ---- PBS ----

std::optional<uid_t> FakeUids(const std::string& user) {
  if (user == "bp-alice") return 1001;
  if (user == "bp-bob") return 1002;
  return std::nullopt;
}

int64_t LocalTime(int year, int mon, int day, int h, int m, int s) {
  struct tm tm {};
  tm.tm_year = year - 1900;
  tm.tm_mon = mon - 1;
  tm.tm_mday = day;
  tm.tm_hour = h;
  tm.tm_min = m;
  tm.tm_sec = s;
  tm.tm_isdst = -1;
  return mktime(&tm);
}

TEST(SchedulerPbsTest, ParsesTheRecordedListing) {
  auto table = ParsePbsJobs(Data("pbs-qstat.json"), FakeUids);
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  const std::vector<Want> want = {
      {"123",
       {"123.pbsserver"},
       1001,
       true,
       "R",
       LocalTime(2026, 12, 3, 12, 0, 0) + 3600,
       {"node1", "node2"}},
      {"124", {"124.pbsserver"}, 1002, false, "Q", 0, {}},
      {"125", {"125[].pbsserver"}, 1002, false, "B", 0, {}},
      {"125_4",
       {"125[4].pbsserver"},
       1002,
       true,
       "R",
       LocalTime(2026, 12, 3, 12, 10, 0) + 7200,
       {"node3"}},
      {"126", {"126.pbsserver"}, kNoOwner, true, "R", 0, {"node4"}},
  };
  ExpectJobs(*table, want);
  EXPECT_EQ(table->Find("125_4")->id, "125_4");
  EXPECT_EQ(table->Find("123.PBSSERVER")->id, "123");
  EXPECT_EQ(table->Find("125[4].pbsserver")->id, "125_4");
}

TEST(SchedulerPbsTest, RefusesMalformedListings) {
  EXPECT_EQ(ParsePbsJobs(R"({"pbs_server":"s"})", FakeUids)->jobs().size(), 0u);
  auto job = [](const std::string& name, const std::string& fields) {
    return R"({"Jobs":{")" + name + R"(":{"job_state":"R","euser":"bp-bob")" + fields + "}}}";
  };
  ASSERT_TRUE(ParsePbsJobs(job("1.s", ""), FakeUids).ok());
  for (const std::string& bad : Names{
           std::string("[]"),
           std::string(R"({"Jobs":[]})"),
           std::string(R"({"Jobs":{"1.s":[]}})"),
           std::string(R"({"Jobs":{"1.s":{"euser":"bp-bob"}}})"),
           std::string(R"({"Jobs":{"1.s":{"job_state":"R"}}})"),
           job("abc.s", ""),
           job("", ""),
           job("1[x].s", ""),
           job("1[2.s", ""),
           job("1.s", R"(,"exec_host":"node1/0+no de/1")"),
           job("1.s", R"(,"exec_host":"node1/0++node2")"),
           job("1.s", R"(,"exec_host":7)"),
           job("1.s", R"(,"Resource_List":"walltime=1:00:00")"),
           R"({"Jobs":{"1.s":{"job_state":"R","euser":"a"},"1.t":{"job_state":"R","euser":"b"}}})",
       }) {
    EXPECT_FALSE(ParsePbsJobs(bad, FakeUids).ok()) << bad;
  }
}

// ---- the command runner, with fake commands ----

class SchedulerListTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = loop::Loop::Create();
    ASSERT_TRUE(loop.ok());
    loop_ = std::move(*loop);
    WriteFile(dir_ / "squeue.json", Data("slurm-squeue.json"));
    WriteFile(dir_ / "sinfo.json", Data("slurm-sinfo.json"));
    // Each fake command counts its runs in a file of its own.
    Script("sinfo", "cat " + (dir_ / "sinfo.json"));
    Script("squeue", "cat " + (dir_ / "squeue.json"));
    options_.type = SchedulerType::kSlurm;
    options_.sinfo = dir_ / "sinfo";
    options_.squeue = dir_ / "squeue";
    options_.call_timeout_ms = 10000;
  }
  void TearDown() override {
    scheduler_.reset();
    if (loop_) {
      // Let calls on the pool come back before the loop goes.
      ::brokerproxy::testing::WaitUntil([&] { return loop_->Run(UV_RUN_NOWAIT) == 0; }, 30000);
      EXPECT_TRUE(loop_->Close().ok());
    }
  }

  void Script(const std::string& name, const std::string& body) {
    WriteFile(dir_ / name,
              "#!/bin/sh\necho run >> " + (dir_ / (name + ".count")) + "\n" + body + "\n", 0755);
  }
  int Runs(const std::string& name) {
    std::string text = ReadFile(dir_ / (name + ".count"));
    return static_cast<int>(std::count(text.begin(), text.end(), '\n'));
  }
  Scheduler* Make() {
    scheduler_ = MakeScheduler(loop_.get(), options_);
    return scheduler_.get();
  }
  // One List() call, the loop run until it answers (the scheduler's timeout bounds it).
  Result<Scheduler::Table> List(int64_t max_age_ms = 0) {
    std::optional<Result<Scheduler::Table>> got;
    auto token = scheduler_->List(max_age_ms, [&](Result<Scheduler::Table> r) { got = r; });
    while (!got) loop_->Run(UV_RUN_ONCE);
    return *got;
  }

  TempDir dir_;
  std::unique_ptr<loop::Loop> loop_;
  SchedulerOptions options_;
  std::unique_ptr<Scheduler> scheduler_;
};

TEST_F(SchedulerListTest, ListsJobsThroughTheCommandsAndCaches) {
  EXPECT_EQ(MakeScheduler(loop_.get(), SchedulerOptions{}), nullptr);
  ASSERT_EQ(Make()->type(), SchedulerType::kSlurm);
  auto table = List();
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  const SchedulerJob* job = (*table)->Find("3_2");
  ASSERT_NE(job, nullptr);
  EXPECT_EQ(job->hosts, (Names{"n2", "vm", "127.0.0.2"}));
  EXPECT_EQ(Runs("squeue"), 1);
  // Fresh enough: the cached listing answers, on a later turn.
  auto again = List(60000);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), table->get());
  EXPECT_EQ(Runs("squeue"), 1);
  // Too old for the caller: a new call (the node names stay cached).
  ASSERT_TRUE(List(0).ok());
  EXPECT_EQ(Runs("squeue"), 2);
  EXPECT_EQ(Runs("sinfo"), 1);
}

TEST_F(SchedulerListTest, ConcurrentListCallsShareTheCallInFlight) {
  // A slow command (not a wait): the calls must overlap it.
  Script("squeue", "sleep 0.5\ncat " + (dir_ / "squeue.json"));
  Make();
  int answered = 0, dropped_called = 0;
  std::vector<loop::Pending> tokens;
  for (int i = 0; i < 5; ++i) {
    tokens.push_back(scheduler_->List(0, [&](Result<Scheduler::Table> r) {
      EXPECT_TRUE(r.ok()) << r.status().ToString();
      ++answered;
    }));
  }
  // A caller that goes away is not called back.
  auto dropped = scheduler_->List(0, [&](Result<Scheduler::Table>) { ++dropped_called; });
  dropped.Detach();
  while (answered < 5) loop_->Run(UV_RUN_ONCE);
  EXPECT_EQ(dropped_called, 0);
  EXPECT_EQ(Runs("squeue"), 1);
}

TEST_F(SchedulerListTest, AskesSinfoAgainForANodeItDoesNotKnow) {
  // sinfo knows n1 only at first; n2 joins the cluster later.
  std::string sinfo = Data("slurm-sinfo.json");
  auto one = ParseSlurmNodes(sinfo);
  ASSERT_TRUE(one.ok());
  WriteFile(dir_ / "sinfo.json",
            R"({"errors":[],"nodes":[{"name":"n1","hostname":"vm","address":"127.0.0.1"}]})");
  Make();
  auto first = List();
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ((*first)->Find("3_2")->hosts, Names{"n2"});
  EXPECT_EQ(Runs("sinfo"), 1);
  WriteFile(dir_ / "sinfo.json", sinfo);
  auto second = List();
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ((*second)->Find("3_2")->hosts, (Names{"n2", "vm", "127.0.0.2"}));
  EXPECT_EQ(Runs("sinfo"), 2);
}

TEST_F(SchedulerListTest, ACallbackMayListAgainOrDestroyTheScheduler) {
  Make();
  std::optional<Result<Scheduler::Table>> second;
  loop::Pending again;
  bool first_called = false;
  auto first = scheduler_->List(0, [&](Result<Scheduler::Table> r) {
    first_called = true;
    EXPECT_TRUE(r.ok());
    again = scheduler_->List(0, [&](Result<Scheduler::Table> r2) { second = r2; });
  });
  while (!second) loop_->Run(UV_RUN_ONCE);
  EXPECT_TRUE(first_called);
  EXPECT_TRUE(second->ok());
  EXPECT_EQ(Runs("squeue"), 2);
  // The owner goes from inside its own callback, and with a call in flight: no callback later.
  bool destroyed = false;
  auto last = scheduler_->List(0, [&](Result<Scheduler::Table>) {
    scheduler_.reset();
    destroyed = true;
  });
  while (!destroyed) loop_->Run(UV_RUN_ONCE);
  Make();
  int late = 0;
  auto dropped = scheduler_->List(0, [&](Result<Scheduler::Table>) { ++late; });
  scheduler_.reset();
  // Until the call on the pool came back (the loop has nothing left then).
  ::brokerproxy::testing::WaitUntil([&] { return loop_->Run(UV_RUN_NOWAIT) == 0; }, 30000);
  EXPECT_EQ(late, 0);
}

// True once `pid` is gone or a zombie (whose reaping is its parent's business).
bool Gone(pid_t pid) {
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  size_t paren = stat.rfind(')');
  return stat.empty() || (paren != std::string::npos && stat.substr(paren + 2, 1) == "Z");
}

TEST_F(SchedulerListTest, ACommandPastItsTimeoutIsKilledWithItsChildren) {
  // The script and a child of it both hold the pipe: killing the script alone would leave
  // the read waiting for the child. (Its sleep is the command being slow, not a wait.)
  Script("squeue", "echo $$ > " + (dir_ / "sh.pid") + "\nsleep 60 &\necho $! > " +
                       (dir_ / "sleep.pid") + "\nwait");
  options_.call_timeout_ms = 500;
  Make();
  auto start = std::chrono::steady_clock::now();
  auto r = List();
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("timed-out call answered after %.2f s\n", took);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kUnavailable);
  EXPECT_NE(r.status().message().find("slurm: "), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find("timed out after 500 ms"), std::string::npos)
      << r.status().ToString();
  EXPECT_LT(took, 30.0);  // a generous deadline: the sleep would take 60 s
  for (const char* file : {"sh.pid", "sleep.pid"}) {
    pid_t pid = std::atoi(ReadFile(dir_ / file).c_str());
    ASSERT_GT(pid, 1) << file;
    EXPECT_TRUE(::brokerproxy::testing::WaitUntil([&] { return Gone(pid); }, 10000))
        << file << " " << pid;
  }
}

TEST_F(SchedulerListTest, ACommandsLeftoverChildrenAreKilledWhenItExits) {
  // A wrapper that leaves a child behind, holding none of the pipes (a sleep: a child that
  // would outlive it, not a wait).
  Script("squeue", "sleep 60 </dev/null >/dev/null 2>&1 &\necho $! > " + (dir_ / "sleep.pid") +
                       "\ncat " + (dir_ / "squeue.json"));
  Make();
  auto r = List();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  pid_t pid = std::atoi(ReadFile(dir_ / "sleep.pid").c_str());
  ASSERT_GT(pid, 1);
  EXPECT_TRUE(::brokerproxy::testing::WaitUntil([&] { return Gone(pid); }, 10000)) << pid;
}

TEST_F(SchedulerListTest, TooMuchOutputIsAnError) {
  Script("squeue", "head -c 3000000 /dev/zero");
  options_.max_output_bytes = 1 << 20;
  Make();
  auto r = List();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("more than 1048576 bytes"), std::string::npos)
      << r.status().ToString();
}

TEST_F(SchedulerListTest, AFailedCommandsMessageIsInTheError) {
  Script("squeue", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1");
  Make();
  auto r = List();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kUnavailable);
  EXPECT_NE(r.status().message().find(
                "slurm: " + options_.squeue +
                " --json exited 1: slurm_load_jobs error: Unable to contact slurm controller"),
            std::string::npos)
      << r.status().ToString();
  options_.squeue = dir_ / "no-such-command";
  Make();
  r = List();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kUnavailable) << r.status().ToString();
}

TEST_F(SchedulerListTest, UnreadableOutputIsAnErrorNotAnEmptyTable) {
  for (const char* out : {"", "not json", R"({"errors":[],"jobs":[{"job_id":"x"}]})"}) {
    WriteFile(dir_ / "squeue.json", out);
    Make();
    auto r = List();
    ASSERT_FALSE(r.ok()) << out;
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument) << r.status().ToString();
    EXPECT_NE(r.status().message().find("slurm: squeue --json"), std::string::npos)
        << r.status().ToString();
  }
}

TEST_F(SchedulerListTest, PbsThroughQstat) {
  WriteFile(dir_ / "qstat.json", Data("pbs-qstat.json"));
  Script("qstat", "[ \"$*\" = '-f -F json' ] || exit 2\ncat " + (dir_ / "qstat.json"));
  options_.type = SchedulerType::kPbs;
  options_.qstat = dir_ / "qstat";
  Make();
  auto r = List();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_NE((*r)->Find("125_4"), nullptr);
  EXPECT_EQ((*r)->Find("123")->hosts, (Names{"node1", "node2"}));
  // Owners through the password database (bp-alice exists once an e2e test made it).
  EXPECT_EQ((*r)->Find("123")->owner, LookUpUid("bp-alice").value_or(kNoOwner));
  EXPECT_EQ((*r)->Find("126")->owner, kNoOwner);
  EXPECT_EQ(LookUpUid("root"), std::optional<uid_t>(0));
  EXPECT_EQ(std::string(SchedulerTypeName(SchedulerType::kPbs)), "pbs");
}

}  // namespace
}  // namespace brokerproxy::registry
