// The broker's binding of registrations to the scheduler's jobs (registry/broker.h), against a
// fake Scheduler whose JobTable the test fills in: saves are checked against the job, the
// reconciler removes what ended, and `epilog` is for admins only.

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>

#include "loop/timer.h"
#include "loop/work.h"
#include "registry/broker.h"
#include "registry/control_protocol.h"
#include "registry/scheduler.h"
#include "registry/store.h"

namespace brokerproxy::registry {
namespace {

constexpr uid_t kAlice = 1001;
constexpr uid_t kBob = 1002;
constexpr uid_t kAdmin = 1003;

// Answers List() from `table`, or with `failure` if set, on a later loop turn.
class FakeScheduler : public Scheduler {
 public:
  explicit FakeScheduler(loop::Loop* loop) : loop_(loop) {}
  SchedulerType type() const override { return SchedulerType::kSlurm; }
  loop::Pending List(int64_t, Done done) override {
    ++calls;
    Result<Table> answer = failure.ok() ? Result<Table>(std::make_shared<const JobTable>(table))
                                        : Result<Table>(failure);
    // Like the real one, which answers several callers with one listing: the token stays
    // active after the answer, until it is dropped.
    auto attached = std::make_shared<bool>(true);
    answers_.push_back(loop::Post(*loop_, [done = std::move(done), answer, attached] {
      if (*attached) done(answer);
    }));
    return loop::WatchPending(attached);
  }

  JobTable table;
  Status failure;
  int calls = 0;

 private:
  loop::Loop* loop_;
  std::vector<loop::Pending> answers_;
};

SchedulerJob RunningJob(std::string id, uid_t owner, int64_t end_time = 0) {
  SchedulerJob j;
  j.id = std::move(id);
  j.owner = owner;
  j.running = true;
  j.state = "RUNNING";
  j.end_time = end_time;
  j.hosts = {"n1", "127.0.0.1", "vm"};
  return j;
}

class BindingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bp-binding-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
    scheduler_ = std::make_unique<FakeScheduler>(loop_.get());
    store_ = std::make_unique<FileStore>(loop_.get(), &registry_, dir_ + "/registry.json");
  }
  void TearDown() override {
    broker_.reset();
    store_.reset();
    scheduler_.reset();
    // Whatever is still queued (a store write) finishes; no timer is left.
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
    std::string cmd = "rm -rf " + dir_;
    ASSERT_EQ(system(cmd.c_str()), 0);
  }

  // With `bind` false the broker has no scheduler (type = none).
  void MakeBroker(bool bind = true, bool start = false) {
    Broker::Options o;
    o.reconcile_interval_ms = 20;
    o.end_grace_s = 300;
    o.scheduler_call_timeout_ms = 1000;
    o.admin_uids = {kAdmin};
    broker_ =
        std::make_unique<Broker>(loop_.get(), &registry_, store_.get(), o, [this] { return now_; });
    if (bind) broker_->set_scheduler(scheduler_.get());
    if (start) {
      ASSERT_TRUE(broker_->Start().ok());
    }
  }

  // Runs the loop until `done()` or 10 s have passed.
  bool RunUntil(const std::function<bool()>& done) {
    auto timer = loop::Timer::Create(*loop_);
    if (!timer.ok()) return false;
    bool expired = false;
    (*timer)->Start(10000, [&expired] { expired = true; });
    while (!done() && !expired) loop_->Run(UV_RUN_ONCE);
    return done();
  }

  Result<JsonPtr> Call(Request req, uid_t caller) {
    std::optional<std::string> line;
    broker_->Handle(std::move(req), caller, [&line](std::string l) { line = std::move(l); });
    if (!RunUntil([&] { return line.has_value(); })) return Status::Timeout("no reply");
    return ParseReply(*line);
  }

  Result<JsonPtr> Save(const std::string& id, uid_t caller, const std::string& host = "n1",
                       int64_t ttl = -1, JobType type = JobType::kSsh) {
    Request req;
    req.op = Op::kSave;
    req.job = id;
    req.save.id = id;
    req.save.host = host;
    req.save.port = 8000;
    req.save.ttl = ttl;
    req.save.type = type;
    if (type == JobType::kSsl) {
      req.csr = "csr";
      req.save.cert_path = "/tmp/x.crt";
      req.save.key_path = "/tmp/x.key";
    }
    return Call(std::move(req), caller);
  }

  Result<JsonPtr> Epilog(const std::string& id, uid_t caller) {
    Request req;
    req.op = Op::kEpilog;
    req.job = id;
    return Call(std::move(req), caller);
  }

  static std::string SavedId(const Result<JsonPtr>& reply) {
    if (!reply.ok()) return "(" + reply.status().ToString() + ")";
    const cJSON* job = cJSON_GetObjectItemCaseSensitive(reply->get(), "job");
    const cJSON* id = cJSON_GetObjectItemCaseSensitive(job, "id");
    return cJSON_IsString(id) ? id->valuestring : "(no id)";
  }

  std::string dir_;
  std::unique_ptr<loop::Loop> loop_;
  Registry registry_{Registry::Options{}};
  std::unique_ptr<FakeScheduler> scheduler_;
  std::unique_ptr<FileStore> store_;
  std::unique_ptr<Broker> broker_;
  int64_t now_ = 1'000'000;
};

TEST_F(BindingTest, WithoutASchedulerAnyFreeIdIsSaved) {
  MakeBroker(/*bind=*/false);
  EXPECT_EQ(SavedId(Save("99", kAlice)), "99");
  EXPECT_EQ(SavedId(Save("anything", kAlice, "node9")), "anything");
  EXPECT_EQ(scheduler_->calls, 0);
}

TEST_F(BindingTest, SaveOfAJobTheSchedulerDoesNotKnowIsRefused) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice));
  auto r = Save("99", kAlice);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kNotFound);
  EXPECT_EQ(r.status().message(), "job 99 is not a job of slurm");
  auto name = Save("myservice", kAlice);
  EXPECT_EQ(name.status().message(), "job myservice is not a job of slurm");
  EXPECT_EQ(registry_.size(), 0u);
}

TEST_F(BindingTest, SaveOfAJobThatDoesNotRunIsRefused) {
  MakeBroker();
  SchedulerJob pending = RunningJob("12", kAlice);
  pending.running = false;
  pending.state = "PENDING";
  scheduler_->table.Add(pending);
  SchedulerJob completing = RunningJob("13", kAlice);
  completing.running = false;
  completing.state = "COMPLETING";
  scheduler_->table.Add(completing);
  EXPECT_EQ(Save("12", kAlice).status().message(), "job 12 is PENDING");
  EXPECT_EQ(Save("13.web", kAlice).status().message(), "job 13 is COMPLETING");
  EXPECT_EQ(registry_.size(), 0u);
}

TEST_F(BindingTest, SaveOfAnotherUsersJobIsRefusedExceptForRoot) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kBob));
  auto r = Save("12", kAlice);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(r.status().message(), "job 12 belongs to another user");
  EXPECT_EQ(Save("12.web", kAlice).status().message(), "job 12 belongs to another user");
  EXPECT_EQ(registry_.size(), 0u);
  EXPECT_EQ(SavedId(Save("12", kBob)), "12");
  EXPECT_EQ(SavedId(Save("12.admin", 0)), "12.admin");
}

TEST_F(BindingTest, BackendMustBeOneOfTheJobsNodes) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice));
  auto r = Save("12", kAlice, "node9");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(r.status().message(), "backend node9 is not one of job 12's nodes: n1, 127.0.0.1, vm");
  EXPECT_EQ(registry_.size(), 0u);
  // Names compare in lower case.
  EXPECT_EQ(SavedId(Save("12", kAlice, "N1")), "12");
  EXPECT_EQ(SavedId(Save("12.b", kAlice, "127.0.0.1")), "12.b");
}

TEST_F(BindingTest, SavedUnderTheSchedulersPrintedIdWithTheNameSuffix) {
  MakeBroker();
  SchedulerJob task = RunningJob("3_1", kAlice);
  task.aliases = {"4"};
  scheduler_->table.Add(task);
  EXPECT_EQ(SavedId(Save("4", kAlice)), "3_1");
  EXPECT_EQ(SavedId(Save("4.web", kAlice)), "3_1.web");
  EXPECT_EQ(SavedId(Save("3_1.db", kAlice)), "3_1.db");
  EXPECT_NE(registry_.Find("3_1"), nullptr);
  EXPECT_EQ(registry_.Find("4"), nullptr);
}

TEST_F(BindingTest, PbsIdsWithTheServerNameSaveUnderThePrintedId) {
  MakeBroker();
  SchedulerJob job = RunningJob("123", kAlice);
  job.aliases = {"123.server"};
  scheduler_->table.Add(job);
  EXPECT_EQ(SavedId(Save("123.server", kAlice)), "123");
  EXPECT_EQ(SavedId(Save("123.server.web", kAlice)), "123.web");
  EXPECT_EQ(SavedId(Save("123.db", kAlice)), "123.db");
  EXPECT_EQ(Save("124.server", kAlice).status().message(), "job 124 is not a job of slurm");
}

TEST_F(BindingTest, HeterogeneousComponentIdsAreValidButNeverSslJobs) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12+1", kAlice));
  EXPECT_TRUE(ValidJobId("12+1"));
  EXPECT_FALSE(DnsSafeJobId("12+1"));
  EXPECT_EQ(SavedId(Save("12+1", kAlice)), "12+1");
  auto ssl = Save("12+1.web", kAlice, "n1", -1, JobType::kSsl);
  ASSERT_FALSE(ssl.ok());
  EXPECT_EQ(ssl.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(ssl.status().message().find("cannot be an ssl job"), std::string::npos);
  // Also when only the printed id has the '+': a raw component id saved as "12+1".
  SchedulerJob component = RunningJob("20+1", kAlice);
  component.aliases = {"21"};
  scheduler_->table.Add(component);
  auto mapped = Save("21", kAlice, "n1", -1, JobType::kSsl);
  ASSERT_FALSE(mapped.ok());
  EXPECT_NE(mapped.status().message().find("job 20+1 cannot be an ssl job"), std::string::npos);
}

TEST_F(BindingTest, SchedulerDownRefusesSavesAndKeepsEntries) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice));
  ASSERT_EQ(SavedId(Save("12", kAlice)), "12");
  scheduler_->failure = Status::Unavailable("slurm: squeue exited 1: cannot reach slurmctld");
  auto r = Save("12.web", kAlice);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kUnavailable);
  EXPECT_NE(r.status().message().find("slurm"), std::string::npos) << r.status().message();
  // Unreadable output is no reason to admit either.
  scheduler_->failure = Status::InvalidArgument("slurm: squeue --json: not JSON");
  auto unreadable = Save("12.db", kAlice);
  EXPECT_EQ(unreadable.status().code(), Status::Code::kUnavailable);
  EXPECT_EQ(registry_.size(), 1u);
  EXPECT_NE(registry_.Find("12"), nullptr);
}

TEST_F(BindingTest, EntryExpiresAtTheJobsEndPlusGrace) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice, now_ + 3600));
  ASSERT_EQ(SavedId(Save("12", kAlice)), "12");
  EXPECT_EQ(registry_.Find("12")->expires, now_ + 3600 + 300);
  // A shorter ttl stays; a longer one is cut to the job's end.
  ASSERT_EQ(SavedId(Save("12.short", kAlice, "n1", 60)), "12.short");
  EXPECT_EQ(registry_.Find("12.short")->expires, now_ + 60);
  ASSERT_EQ(SavedId(Save("12.long", kAlice, "n1", 86400)), "12.long");
  EXPECT_EQ(registry_.Find("12.long")->expires, now_ + 3600 + 300);
}

TEST_F(BindingTest, ReconcilerRemovesEntriesWhoseJobEndedAndKeepsTheRest) {
  MakeBroker(/*bind=*/true, /*start=*/false);
  scheduler_->table.Add(RunningJob("12", kAlice, now_ + 3600));
  scheduler_->table.Add(RunningJob("13", kAlice));
  scheduler_->table.Add(RunningJob("14", kBob));
  ASSERT_EQ(SavedId(Save("12", kAlice)), "12");
  ASSERT_EQ(SavedId(Save("12.web", kAlice)), "12.web");
  ASSERT_EQ(SavedId(Save("13", kAlice)), "13");
  ASSERT_EQ(SavedId(Save("14", kBob)), "14");
  // An entry from before the scheduler was configured, and one whose job changed owner.
  Job old;
  old.id = "myservice";
  old.owner = kAlice;
  old.host = "n1";
  old.port = 9000;
  old.secret = std::string(64, 'a');
  old.created = now_ - 100;
  ASSERT_TRUE(registry_.Put(old).ok());

  JobTable table;
  SchedulerJob ended = RunningJob("12", kAlice, now_ + 3600);
  ended.running = false;
  ended.state = "COMPLETING";
  table.Add(ended);
  table.Add(RunningJob("14", kAlice));  // now someone else's: bob's entry goes
  SchedulerJob still = RunningJob("13", kAlice, now_ + 600);  // its end time is known now
  table.Add(still);
  scheduler_->table = table;
  now_ += 10;  // the entries are older than the listing
  ASSERT_TRUE(broker_->Start().ok());
  ASSERT_TRUE(RunUntil([&] { return registry_.size() == 1; })) << registry_.size();
  ASSERT_NE(registry_.Find("13"), nullptr);
  EXPECT_EQ(registry_.Find("13")->expires, now_ - 10 + 600 + 300);

  // The job's time limit grows: so does its entry's expiry. It shrinks: so does the expiry.
  JobTable longer;
  longer.Add(RunningJob("13", kAlice, now_ + 7200));
  scheduler_->table = longer;
  ASSERT_TRUE(RunUntil([&] { return registry_.Find("13")->expires == now_ + 7200 + 300; }))
      << registry_.Find("13")->expires;
  JobTable shorter;
  shorter.Add(RunningJob("13", kAlice, now_ + 60));
  scheduler_->table = shorter;
  ASSERT_TRUE(RunUntil([&] { return registry_.Find("13")->expires == now_ + 60 + 300; }))
      << registry_.Find("13")->expires;
}

TEST_F(BindingTest, AShorterTtlIsKeptWhenTheJobsLimitGrows) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice, now_ + 3600));
  ASSERT_EQ(SavedId(Save("12", kAlice, "n1", 60)), "12");
  ASSERT_EQ(registry_.Find("12")->expires, now_ + 60);
  JobTable longer;
  longer.Add(RunningJob("12", kAlice, now_ + 7200));
  scheduler_->table = longer;
  now_ += 20;
  ASSERT_TRUE(broker_->Start().ok());
  int before = scheduler_->calls;
  ASSERT_TRUE(RunUntil([&] { return scheduler_->calls >= before + 3; }));
  EXPECT_EQ(registry_.Find("12")->expires, now_ - 20 + 60);
}

TEST_F(BindingTest, ReconcilerRemovesNothingWhenTheListingFails) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice));
  ASSERT_EQ(SavedId(Save("12", kAlice)), "12");
  scheduler_->table = JobTable();  // job 12 is gone ...
  scheduler_->failure = Status::Unavailable("slurm: squeue timed out after 10 s");  // ... or not
  now_ += 10;
  ASSERT_TRUE(broker_->Start().ok());
  int before = scheduler_->calls;
  ASSERT_TRUE(RunUntil([&] { return scheduler_->calls >= before + 3; }));
  EXPECT_NE(registry_.Find("12"), nullptr);
  // Once the scheduler answers again, the entry goes.
  scheduler_->failure = Status::OK();
  ASSERT_TRUE(RunUntil([&] { return registry_.Find("12") == nullptr; }));
}

TEST_F(BindingTest, AFreshSaveIsNotRemovedOnAnOlderListing) {
  MakeBroker();
  scheduler_->table.Add(RunningJob("12", kAlice));
  ASSERT_EQ(SavedId(Save("12", kAlice)), "12");
  scheduler_->table = JobTable();  // a listing that does not show the job yet
  ASSERT_TRUE(broker_->Start().ok());
  int before = scheduler_->calls;
  ASSERT_TRUE(RunUntil([&] { return scheduler_->calls >= before + 3; }));
  EXPECT_NE(registry_.Find("12"), nullptr);
}

TEST_F(BindingTest, EpilogIsForRootAndAdminsAndRemovesTheJobAndItsServices) {
  MakeBroker();
  SchedulerJob task = RunningJob("3_1", kAlice);
  task.aliases = {"4"};
  scheduler_->table.Add(task);
  scheduler_->table.Add(RunningJob("12", kAlice));
  scheduler_->table.Add(RunningJob("123", kBob));
  ASSERT_EQ(SavedId(Save("12", kAlice)), "12");
  ASSERT_EQ(SavedId(Save("12.web", kAlice)), "12.web");
  ASSERT_EQ(SavedId(Save("123", kBob)), "123");
  ASSERT_EQ(SavedId(Save("4.x", kAlice)), "3_1.x");

  // A user may not wipe a job's entries, not even of their own job.
  for (uid_t user : {kAlice, kBob}) {
    auto r = Epilog("12", user);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kPermissionDenied);
  }
  EXPECT_EQ(registry_.size(), 4u);

  auto r = Epilog("12", kAdmin);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(registry_.Find("12"), nullptr);
  EXPECT_EQ(registry_.Find("12.web"), nullptr);
  EXPECT_NE(registry_.Find("123"), nullptr);
  // The raw id of an array task removes the entries saved under "A_T".
  ASSERT_TRUE(Epilog("4", 0).ok());
  EXPECT_EQ(registry_.Find("3_1.x"), nullptr);
  // Nothing there: still fine.
  ASSERT_TRUE(Epilog("77", kAdmin).ok());
  EXPECT_EQ(registry_.size(), 1u);
}

}  // namespace
}  // namespace brokerproxy::registry
