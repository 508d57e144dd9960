#include "registry/store.h"

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "loop/file.h"
#include "registry/snapshot.h"

namespace brokerproxy::registry {
namespace {

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bp-store-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto l = loop::Loop::Create();
    ASSERT_TRUE(l.ok());
    loop_ = std::move(l).value();
  }
  void TearDown() override {
    store_.reset();
    loop_->Run();
    EXPECT_TRUE(loop_->Close().ok());
    std::string cmd = "rm -rf " + dir_;
    ASSERT_EQ(system(cmd.c_str()), 0);
  }
  Store::Mutation SaveJob(const std::string& id) {
    return [this, id]() -> Result<Store::Undo> {
      SaveRequest req;
      req.id = id;
      req.host = "127.0.0.1";
      std::optional<Job> replaced;
      auto job = registry_.Save(req, 1000, 1, &replaced);
      if (!job.ok()) return job.status();
      return Store::Undo([this, id] { registry_.Erase(id); });
    };
  }

  std::string dir_;
  std::unique_ptr<loop::Loop> loop_;
  Registry registry_{Registry::Options{}};
  std::unique_ptr<FileStore> store_;
};

TEST_F(StoreTest, DurableBeforeDoneAndGroupCommits) {
  std::string path = dir_ + "/registry.json";
  store_ = std::make_unique<FileStore>(loop_.get(), &registry_, path);
  std::vector<std::string> order;
  for (const char* id : {"a", "b", "c"}) {
    store_->Commit(SaveJob(id), [&, id](Status s) {
      EXPECT_TRUE(s.ok()) << s.ToString();
      order.push_back(id);
      // Durable before the answer: the file on disk already holds this job.
      auto data = ReadFileIfExists(path, kMaxSnapshotBytes);
      ASSERT_TRUE(data.ok() && data->has_value());
      auto decoded = DecodeSnapshot(**data);
      ASSERT_TRUE(decoded.ok());
      bool found = false;
      for (const Job& j : *decoded) found = found || j.id == id;
      EXPECT_TRUE(found) << id;
    });
  }
  EXPECT_TRUE(order.empty()) << "never answered inside Commit()";
  loop_->Run();
  EXPECT_EQ(order, (std::vector<std::string>{"a", "b", "c"}));
  // "a" went alone; "b" and "c" queued behind it and were written together.
  EXPECT_EQ(store_->writes(), 2u);
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  Registry reloaded{Registry::Options{}};
  ASSERT_TRUE(FileStore::Load(path, &reloaded).ok());
  EXPECT_EQ(reloaded.size(), 3u);
}

TEST_F(StoreTest, FailedWriteUndoesTheChangeAndReportsIt) {
  store_ = std::make_unique<FileStore>(loop_.get(), &registry_, dir_ + "/missing/registry.json");
  Status result;
  store_->Commit(SaveJob("x"), [&](Status s) { result = s; });
  loop_->Run();
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(registry_.size(), 0u) << "memory must not claim what the disk does not hold";
  EXPECT_EQ(registry_.Find("x"), nullptr);
}

TEST_F(StoreTest, InvalidMutationIsAnsweredAndSkipped) {
  store_ = std::make_unique<FileStore>(loop_.get(), &registry_, dir_ + "/registry.json");
  Status bad, good;
  store_->Commit([]() -> Result<Store::Undo> { return Status::InvalidArgument("nope"); },
                 [&](Status s) { bad = s; });
  store_->Commit(SaveJob("y"), [&](Status s) { good = s; });
  loop_->Run();
  EXPECT_EQ(bad.code(), Status::Code::kInvalidArgument);
  EXPECT_TRUE(good.ok());
  EXPECT_NE(registry_.Find("y"), nullptr);
}

TEST_F(StoreTest, MissingFileIsAnEmptyRegistryDamagedOneIsRefused) {
  EXPECT_TRUE(FileStore::Load(dir_ + "/none.json", &registry_).ok());
  std::string path = dir_ + "/bad.json";
  ASSERT_TRUE(loop::WriteFileAtomic(path, "{\"format\":1,", 0600).ok());
  Status s = FileStore::Load(path, &registry_);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_NE(s.message().find(path), std::string::npos);
}

// A file from before ids were case-insensitive may hold "abc" of one user and "ABC" of
// another: the daemon must start, and the name stays with the job saved first.
TEST_F(StoreTest, IdsThatDifferOnlyInCaseLoadAsOneJobTheEarliest) {
  auto job = [](std::string id, uid_t owner, int64_t created, char secret) {
    Job j;
    j.id = std::move(id);
    j.owner = owner;
    j.host = "127.0.0.1";
    j.port = 41000 + static_cast<int>(created);
    j.secret = std::string(64, secret);
    j.created = created;
    return j;
  };
  // The squatter sorts first in the file ("ABC" < "abc") and is the later one.
  Job squatter = job("ABC", 1001, 200, 'b');
  Job owner = job("abc", 1000, 100, 'a');
  Job late_upper = job("Xy", 1000, 50, 'c');  // here the upper-case one came first
  Job late_lower = job("xy", 1001, 60, 'd');
  Job other = job("other", 1001, 10, 'e');
  std::string path = dir_ + "/old.json";
  ASSERT_TRUE(loop::WriteFileAtomic(
                  path, EncodeSnapshot({&squatter, &late_upper, &owner, &other, &late_lower}), 0600)
                  .ok());
  Status s = FileStore::Load(path, &registry_);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(registry_.size(), 3u);
  ASSERT_NE(registry_.Find("abc"), nullptr);
  EXPECT_EQ(registry_.Find("ABC")->owner, 1000u);
  EXPECT_EQ(registry_.Find("abc")->secret, owner.secret);
  EXPECT_EQ(registry_.Find("abc")->id, "abc");
  ASSERT_NE(registry_.Find("xy"), nullptr);
  EXPECT_EQ(registry_.Find("xy")->owner, 1000u);
  EXPECT_EQ(registry_.Find("xy")->secret, late_upper.secret);
  EXPECT_EQ(registry_.Find("xy")->id, "xy");
  EXPECT_NE(registry_.Find("other"), nullptr);
}

TEST_F(StoreTest, DestroyingTheStoreMidWriteDropsTheCallbacks) {
  store_ = std::make_unique<FileStore>(loop_.get(), &registry_, dir_ + "/registry.json");
  bool called = false;
  store_->Commit(SaveJob("z"), [&](Status) { called = true; });
  store_.reset();
  loop_->Run();
  EXPECT_FALSE(called);
}

}  // namespace
}  // namespace brokerproxy::registry
