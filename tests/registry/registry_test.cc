#include "registry/registry.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "registry/secret.h"

namespace brokerproxy::registry {
namespace {

constexpr uid_t kRoot = 0;
constexpr uid_t kAlice = 1000;
constexpr uid_t kBob = 1001;
constexpr int64_t kNow = 1'700'000'000;

SaveRequest Request(std::string id, int port = 0) {
  SaveRequest req;
  req.id = std::move(id);
  req.host = "node17";
  req.port = port;
  return req;
}

// `req`, allowed to replace an existing entry of its id.
SaveRequest Replacing(SaveRequest req) {
  req.replace = true;
  return req;
}

Registry::Options RangeOptions(int first, int last) {
  Registry::Options options;
  options.ports = PortRange{first, last};
  return options;
}

// Saves `id` for `caller` and returns the job, failing the test on error.
Job MustSave(Registry& registry, const SaveRequest& req, uid_t caller = kAlice) {
  Result<Job> job = registry.Save(req, caller, kNow, nullptr);
  EXPECT_TRUE(job.ok()) << job.status().ToString();
  return job.ok() ? *job : Job{};
}

Job ValidJob(std::string id, int port) {
  Job job;
  job.id = std::move(id);
  job.host = "10.1.2.3";
  job.port = port;
  job.secret = std::string(64, 'a');
  job.owner = kAlice;
  job.created = kNow;
  return job;
}

// ---- Job field rules ----

TEST(RegistryJobTest, JobTypeNamesRoundTrip) {
  EXPECT_STREQ(JobTypeName(JobType::kSsh), "ssh");
  EXPECT_STREQ(JobTypeName(JobType::kSsl), "ssl");
  EXPECT_EQ(ParseJobType("ssh"), JobType::kSsh);
  EXPECT_EQ(ParseJobType("ssl"), JobType::kSsl);
  EXPECT_FALSE(ParseJobType("SSH").has_value());
  EXPECT_FALSE(ParseJobType("").has_value());
  EXPECT_FALSE(ParseJobType("tls").has_value());
}

TEST(RegistryJobTest, ValidJobId) {
  EXPECT_TRUE(ValidJobId("123456"));
  EXPECT_TRUE(ValidJobId("123456.batch-0_a"));
  EXPECT_TRUE(ValidJobId("..."));
  EXPECT_TRUE(ValidJobId(std::string(64, 'x')));
  EXPECT_FALSE(ValidJobId(""));
  EXPECT_FALSE(ValidJobId("."));
  EXPECT_FALSE(ValidJobId(".."));
  EXPECT_FALSE(ValidJobId(std::string(65, 'x')));
  EXPECT_FALSE(ValidJobId("a b"));
  EXPECT_FALSE(ValidJobId("a/b"));
  EXPECT_FALSE(ValidJobId("a\nb"));
  EXPECT_FALSE(ValidJobId(std::string("a\0b", 3)));
  EXPECT_FALSE(ValidJobId("j\xc3\xa9"));
}

TEST(RegistryJobTest, ValidHost) {
  EXPECT_TRUE(ValidHost("node17"));
  EXPECT_TRUE(ValidHost("node17.cluster.example.org"));
  EXPECT_TRUE(ValidHost("10.1.2.3"));
  EXPECT_TRUE(ValidHost("fe80::1"));
  EXPECT_TRUE(ValidHost("under_score"));
  EXPECT_TRUE(ValidHost(std::string(253, 'h')));
  EXPECT_FALSE(ValidHost(""));
  EXPECT_FALSE(ValidHost(std::string(254, 'h')));
  EXPECT_FALSE(ValidHost("[::1]"));
  EXPECT_FALSE(ValidHost("a b"));
  EXPECT_FALSE(ValidHost("host;rm"));
  EXPECT_FALSE(ValidHost("-oProxyCommand=x"));
  EXPECT_FALSE(ValidHost("host\n"));
}

TEST(RegistryJobTest, CheckJobNamesTheBadField) {
  EXPECT_TRUE(CheckJob(ValidJob("a", 80)).ok());
  Job job = ValidJob("a", 0);
  EXPECT_NE(CheckJob(job).message().find("'port'"), std::string::npos);
  job = ValidJob("a", 80);
  job.secret = "not-hex";
  Status status = CheckJob(job);
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(status.message().find("'secret'"), std::string::npos);
  EXPECT_EQ(status.message().find("not-hex"), std::string::npos);  // never echo a secret
}

// ---- PortRange ----

TEST(PortRangeTest, ParsesAndPrints) {
  Result<PortRange> range = PortRange::Parse("41000-41999");
  ASSERT_TRUE(range.ok()) << range.status().ToString();
  EXPECT_EQ(*range, (PortRange{41000, 41999}));
  EXPECT_EQ(range->ToString(), "41000-41999");
  EXPECT_EQ(range->size(), 1000);
  EXPECT_TRUE(range->Contains(41000));
  EXPECT_TRUE(range->Contains(41999));
  EXPECT_FALSE(range->Contains(40999));
  EXPECT_FALSE(range->Contains(42000));

  range = PortRange::Parse(" 1 - 65535 ");
  ASSERT_TRUE(range.ok()) << range.status().ToString();
  EXPECT_EQ(*range, (PortRange{1, 65535}));
  range = PortRange::Parse("7000-7000");
  ASSERT_TRUE(range.ok());
  EXPECT_EQ(range->size(), 1);
}

TEST(PortRangeTest, RejectsMalformedText) {
  for (const char* text :
       {"", "41000", "41000-", "-41999", "a-b", "0-10", "10-5", "1-65536", "+1-5", "1--5", "1-2-3",
        "1 0-20", "99999999999-1", "41000-41999x", "0x10-0x20", " - "}) {
    Result<PortRange> range = PortRange::Parse(text);
    ASSERT_FALSE(range.ok()) << "accepted \"" << text << "\"";
    EXPECT_EQ(range.status().code(), Status::Code::kInvalidArgument);
    EXPECT_NE(range.status().message().find("\"" + std::string(text) + "\""), std::string::npos)
        << range.status().ToString();
  }
}

// ---- Port allocation ----

TEST(RegistryTest, SaveAllocatesDistinctPortsInTheRange) {
  Registry registry(RangeOptions(41000, 41999));
  std::set<int> ports;
  for (int i = 0; i < 600; ++i) {
    Job job = MustSave(registry, Request("job" + std::to_string(i)));
    EXPECT_TRUE(job.port_allocated);
    EXPECT_GE(job.port, 41000);
    EXPECT_LE(job.port, 41999);
    EXPECT_TRUE(ports.insert(job.port).second) << "port " << job.port << " handed out twice";
  }
  EXPECT_EQ(registry.size(), 600u);
}

TEST(RegistryTest, AllocationSkipsPortsHeldByExplicitJobs) {
  // The scan starts at a random offset, so repeat to cover every start.
  for (int round = 0; round < 50; ++round) {
    Registry registry(RangeOptions(100, 102));
    Job fixed = MustSave(registry, Request("fixed", 101));
    EXPECT_FALSE(fixed.port_allocated);
    EXPECT_EQ(fixed.port, 101);
    std::set<int> ports = {MustSave(registry, Request("a")).port,
                           MustSave(registry, Request("b")).port};
    EXPECT_EQ(ports, (std::set<int>{100, 102}));
    Result<Job> full = registry.Save(Request("c"), kAlice, kNow, nullptr);
    ASSERT_FALSE(full.ok());
    EXPECT_EQ(full.status().code(), Status::Code::kResourceExhausted);
    EXPECT_EQ(full.status().message(), "port range 100-102 is exhausted");
    EXPECT_EQ(registry.Find("c"), nullptr);
  }
}

TEST(RegistryTest, ExplicitPortOutsideTheRangeIsNotTracked) {
  Registry registry(RangeOptions(100, 100));
  MustSave(registry, Request("outside", 22));
  EXPECT_EQ(MustSave(registry, Request("a")).port, 100);
}

TEST(RegistryTest, RemovingAJobFreesItsPort) {
  Registry registry(RangeOptions(100, 102));
  MustSave(registry, Request("a"));
  int freed = MustSave(registry, Request("b")).port;
  MustSave(registry, Request("c"));
  EXPECT_EQ(registry.Save(Request("d"), kAlice, kNow, nullptr).status().code(),
            Status::Code::kResourceExhausted);
  ASSERT_TRUE(registry.Remove("b", kAlice).ok());
  EXPECT_EQ(MustSave(registry, Request("d")).port, freed);
}

TEST(RegistryTest, ErasingAJobFreesItsPort) {
  Registry registry(RangeOptions(100, 100));
  MustSave(registry, Request("a"));
  registry.Erase("a");
  registry.Erase("never-there");
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_EQ(MustSave(registry, Request("b")).port, 100);
}

TEST(RegistryTest, ReplacementByTheOwnerFreesThenReallocates) {
  // One port: the replacement can only succeed if the old record's port is freed first.
  Registry registry(RangeOptions(100, 100));
  Job first = MustSave(registry, Request("a"));
  std::optional<Job> replaced;
  Result<Job> second = registry.Save(Replacing(Request("a")), kAlice, kNow + 5, &replaced);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(second->port, 100);
  EXPECT_NE(second->secret, first.secret);
  EXPECT_EQ(second->created, kNow + 5);
  ASSERT_TRUE(replaced.has_value());
  EXPECT_EQ(*replaced, first);
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_EQ(*registry.Find("a"), *second);
}

TEST(RegistryTest, ReplacementWithAnExplicitPortReleasesTheOldOne) {
  Registry registry(RangeOptions(100, 101));
  int a_port = MustSave(registry, Request("a")).port;
  MustSave(registry, Request("b"));
  Job moved = MustSave(registry, Replacing(Request("a", 5000)));
  EXPECT_FALSE(moved.port_allocated);
  EXPECT_EQ(MustSave(registry, Request("c")).port, a_port);
  EXPECT_EQ(registry.Save(Request("d"), kAlice, kNow, nullptr).status().code(),
            Status::Code::kResourceExhausted);
}

TEST(RegistryTest, FailedReplacementKeepsTheOldJobAndItsPort) {
  Registry registry(RangeOptions(100, 100));
  Job first = MustSave(registry, Request("a"));
  SaveRequest bad = Request("a");
  bad.host = "bad host";
  EXPECT_EQ(registry.Save(bad, kAlice, kNow, nullptr).status().code(),
            Status::Code::kInvalidArgument);
  EXPECT_EQ(*registry.Find("a"), first);
  EXPECT_EQ(registry.Save(Request("b"), kAlice, kNow, nullptr).status().code(),
            Status::Code::kResourceExhausted);
}

TEST(RegistryTest, FirstSaveReportsNothingReplaced) {
  Registry registry(RangeOptions(100, 199));
  std::optional<Job> replaced = ValidJob("stale", 1);
  ASSERT_TRUE(registry.Save(Request("a"), kAlice, kNow, &replaced).ok());
  EXPECT_FALSE(replaced.has_value());
}

TEST(RegistryTest, PutKeepsThePortIndexRight) {
  Registry registry(RangeOptions(100, 102));
  ASSERT_TRUE(registry.Put(ValidJob("x", 100)).ok());
  ASSERT_TRUE(registry.Put(ValidJob("y", 101)).ok());
  EXPECT_EQ(MustSave(registry, Request("a")).port, 102);
  EXPECT_EQ(registry.Save(Request("b"), kAlice, kNow, nullptr).status().code(),
            Status::Code::kResourceExhausted);

  // Overwriting x moves it out of the range, which frees 100.
  ASSERT_TRUE(registry.Put(ValidJob("x", 5000)).ok());
  EXPECT_EQ(registry.size(), 3u);
  EXPECT_EQ(MustSave(registry, Request("b")).port, 100);

  // Two loaded jobs may share a port (different hosts); it stays held until both are gone.
  ASSERT_TRUE(registry.Put(ValidJob("z", 101)).ok());
  registry.Erase("y");
  EXPECT_EQ(registry.Save(Request("c"), kAlice, kNow, nullptr).status().code(),
            Status::Code::kResourceExhausted);
  registry.Erase("z");
  EXPECT_EQ(MustSave(registry, Request("c")).port, 101);
}

TEST(RegistryTest, PutRejectsBadFields) {
  Registry registry(RangeOptions(100, 102));
  std::vector<Job> bad;
  bad.push_back(ValidJob("..", 80));
  bad.push_back(ValidJob("a", 0));
  bad.push_back(ValidJob("a", 65536));
  Job job = ValidJob("a", 80);
  job.host = "";
  bad.push_back(job);
  job = ValidJob("a", 80);
  job.secret = std::string(64, 'A');
  bad.push_back(job);
  job = ValidJob("a", 80);
  job.secret = std::string(31, 'a');
  bad.push_back(job);
  job = ValidJob("a", 80);
  job.type = static_cast<JobType>(7);
  bad.push_back(job);
  job = ValidJob("a", 80);
  job.cert_path = "/etc/cert.pem";
  job.key_path = "/etc/key.pem";
  bad.push_back(job);  // paths on an ssh job
  job.type = JobType::kSsl;
  job.key_path = "";
  bad.push_back(job);  // a certificate without its key
  job.key_path = "key.pem";
  bad.push_back(job);  // relative path
  job.key_path = "/etc/key\n.pem";
  bad.push_back(job);
  job = ValidJob("a", 80);
  job.expires = -1;
  bad.push_back(job);
  job = ValidJob("a", 80);
  job.created = kMaxJobTime + 1;
  bad.push_back(job);
  for (const Job& j : bad) {
    EXPECT_EQ(registry.Put(j).code(), Status::Code::kInvalidArgument) << j.id << ":" << j.port;
  }
  EXPECT_EQ(registry.size(), 0u);

  job = ValidJob("a", 80);
  job.type = JobType::kSsl;
  job.cert_path = "/var/lib/brokerproxy/a.crt";
  job.key_path = "/var/lib/brokerproxy/a.key";
  EXPECT_TRUE(registry.Put(job).ok());
  EXPECT_EQ(*registry.Find("a"), job);
}

TEST(RegistryTest, SaveRejectsBadRequestsWithoutSideEffects) {
  Registry registry(RangeOptions(100, 100));
  std::vector<SaveRequest> bad = {Request(""),    Request(".."),    Request(std::string(65, 'a')),
                                  Request("a b"), Request("a", -1), Request("a", 65536)};
  for (const char* host : {"", "-x", "a b", "[::1]"}) {
    bad.push_back(Request("a"));
    bad.back().host = host;
  }
  bad.push_back(Request("a"));
  bad.back().ttl = -2;
  bad.push_back(Request("a"));
  bad.back().ttl = kMaxJobTime;
  bad.push_back(Request("a"));
  bad.back().cert_path = "/x.crt";
  bad.back().key_path = "/x.key";  // on an ssh job
  bad.push_back(Request("a"));
  bad.back().type = JobType::kSsl;
  bad.back().cert_path = "x.crt";
  bad.back().key_path = "/x.key";
  for (const SaveRequest& req : bad) {
    Result<Job> job = registry.Save(req, kAlice, kNow, nullptr);
    ASSERT_FALSE(job.ok()) << req.id << " " << req.host;
    EXPECT_EQ(job.status().code(), Status::Code::kInvalidArgument) << job.status().ToString();
  }
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_EQ(MustSave(registry, Request("a")).port, 100);  // nothing leaked in the port index
}

TEST(RegistryTest, SaveFillsEveryField) {
  Registry::Options options = RangeOptions(100, 199);
  options.secret_bits = 128;
  Registry registry(options);
  SaveRequest req = Request("job.1", 0);
  req.type = JobType::kSsl;
  req.ready = false;
  req.cert_path = "/state/job.1.crt";
  req.key_path = "/state/job.1.key";
  Job job = MustSave(registry, req, kBob);
  EXPECT_EQ(job.id, "job.1");
  EXPECT_EQ(job.type, JobType::kSsl);
  EXPECT_EQ(job.owner, kBob);
  EXPECT_EQ(job.host, "node17");
  EXPECT_TRUE(job.port_allocated);
  EXPECT_EQ(job.secret.size(), 32u);
  EXPECT_TRUE(ValidSecretFormat(job.secret));
  EXPECT_EQ(job.cert_path, "/state/job.1.crt");
  EXPECT_EQ(job.key_path, "/state/job.1.key");
  EXPECT_EQ(job.created, kNow);
  EXPECT_EQ(job.expires, 0);
  EXPECT_FALSE(job.ready);
  EXPECT_EQ(*registry.Find("job.1"), job);
}

TEST(RegistryTest, BadSecretBitsFailSave) {
  Registry::Options options;
  options.secret_bits = 100;
  Registry registry(options);
  EXPECT_EQ(registry.Save(Request("a"), kAlice, kNow, nullptr).status().code(),
            Status::Code::kInvalidArgument);
  EXPECT_EQ(registry.size(), 0u);
}

// ---- Ownership ----

TEST(RegistryTest, OnlyTheOwnerOrRootMayTouchAJob) {
  Registry registry(RangeOptions(100, 199));
  Job job = MustSave(registry, Request("a"), kAlice);

  Result<Job> stolen = registry.Save(Request("a"), kBob, kNow, nullptr);
  EXPECT_EQ(stolen.status().code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(registry.Get("a", kBob).status().code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(registry.Remove("a", kBob).status().code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(*registry.Find("a"), job);

  Result<const Job*> mine = registry.Get("a", kAlice);
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(**mine, job);
  Result<const Job*> as_root = registry.Get("a", kRoot);
  ASSERT_TRUE(as_root.ok());
  EXPECT_EQ(**as_root, job);

  EXPECT_EQ(registry.Get("nope", kAlice).status().code(), Status::Code::kNotFound);
  EXPECT_EQ(registry.Remove("nope", kRoot).status().code(), Status::Code::kNotFound);
  EXPECT_EQ(registry.Get("bad id\n", kAlice).status().code(), Status::Code::kNotFound);
}

TEST(RegistryTest, SavingAnExistingIdNeedsReplace) {
  Registry registry(RangeOptions(100, 199));
  Job first = MustSave(registry, Request("12"), kAlice);
  // Another service of the same job without --name: refused, pointing at --name and --replace.
  Result<Job> second = registry.Save(Request("12"), kAlice, kNow, nullptr);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Status::Code::kAlreadyExists);
  EXPECT_EQ(second.status().message(),
            "job 12 already has a service registered; save another service of the same job "
            "with --name NAME, or replace it with --replace");
  EXPECT_EQ(*registry.Find("12"), first);
  // Root too, over another user's entry; another user is refused with or without it.
  EXPECT_EQ(registry.Save(Request("12"), kRoot, kNow, nullptr).status().code(),
            Status::Code::kAlreadyExists);
  EXPECT_EQ(registry.Save(Replacing(Request("12")), kBob, kNow, nullptr).status().code(),
            Status::Code::kPermissionDenied);
  EXPECT_EQ(*registry.Find("12"), first);
  Job replaced = MustSave(registry, Replacing(Request("12")), kAlice);
  EXPECT_NE(replaced.secret, first.secret);
  // A new id needs no `replace`, and `replace` of an id that does not exist creates it.
  MustSave(registry, Replacing(Request("13")), kAlice);
  EXPECT_EQ(registry.size(), 2u);
}

TEST(RegistryTest, RemoveWithASecretRemovesOnlyThatSave) {
  Registry registry(RangeOptions(100, 199));
  Job first = MustSave(registry, Request("12"), kAlice);
  Job second = MustSave(registry, Replacing(Request("12")), kAlice);
  // The first save's cleanup: the entry is now the second's, and stays.
  Result<Job> stale = registry.Remove("12", kAlice, first.secret);
  ASSERT_FALSE(stale.ok());
  EXPECT_EQ(stale.status().code(), Status::Code::kAlreadyExists);
  EXPECT_NE(stale.status().message().find("saved again"), std::string::npos);
  EXPECT_EQ(stale.status().message().find(first.secret), std::string::npos);
  EXPECT_EQ(stale.status().message().find(second.secret), std::string::npos);
  EXPECT_EQ(*registry.Find("12"), second);
  EXPECT_EQ(registry.Remove("12", kAlice, "").status().code(), Status::Code::kAlreadyExists);
  // Ownership is checked first: another user learns nothing about the secret.
  EXPECT_EQ(registry.Remove("12", kBob, second.secret).status().code(),
            Status::Code::kPermissionDenied);
  Result<Job> removed = registry.Remove("12", kAlice, second.secret);
  ASSERT_TRUE(removed.ok()) << removed.status().ToString();
  EXPECT_EQ(*removed, second);
  EXPECT_EQ(registry.Find("12"), nullptr);
  EXPECT_EQ(registry.Remove("12", kAlice, second.secret).status().code(), Status::Code::kNotFound);
}

TEST(RegistryTest, RootTakesOverWhatItReplaces) {
  Registry registry(RangeOptions(100, 199));
  Job old = MustSave(registry, Request("a"), kAlice);
  std::optional<Job> replaced;
  Result<Job> job = registry.Save(Replacing(Request("a")), kRoot, kNow, &replaced);
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  EXPECT_EQ(job->owner, kRoot);
  ASSERT_TRUE(replaced.has_value());
  EXPECT_EQ(*replaced, old);
  EXPECT_EQ(registry.Get("a", kAlice).status().code(), Status::Code::kPermissionDenied);
}

TEST(RegistryTest, OwnerAndRootMayRemove) {
  Registry registry(RangeOptions(100, 199));
  Job a = MustSave(registry, Request("a"), kAlice);
  MustSave(registry, Request("b"), kBob);
  Result<Job> removed = registry.Remove("a", kAlice);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, a);
  EXPECT_EQ(registry.Find("a"), nullptr);
  EXPECT_TRUE(registry.Remove("b", kRoot).ok());
  EXPECT_EQ(registry.size(), 0u);
}

TEST(RegistryTest, ListFiltersByCallerAndSortsById) {
  Registry registry(RangeOptions(100, 199));
  MustSave(registry, Request("c"), kAlice);
  MustSave(registry, Request("b"), kBob);
  MustSave(registry, Request("a"), kAlice);
  MustSave(registry, Request("D"), kAlice);  // listed as "d"
  auto ids = [](const std::vector<const Job*>& jobs) {
    std::vector<std::string> out;
    for (const Job* job : jobs) {
      out.push_back(job->id);
    }
    return out;
  };
  EXPECT_EQ(ids(registry.List(kAlice)), (std::vector<std::string>{"a", "c", "d"}));
  EXPECT_EQ(ids(registry.List(kBob)), (std::vector<std::string>{"b"}));
  EXPECT_EQ(ids(registry.List(kRoot)), (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_EQ(ids(registry.All()), ids(registry.List(kRoot)));
  EXPECT_TRUE(registry.List(4242).empty());
}

// ---- Natural order ----

// Sorts `ids` with NaturalLess.
std::vector<std::string> Natural(std::vector<std::string> ids) {
  std::sort(ids.begin(), ids.end(),
            [](const std::string& a, const std::string& b) { return NaturalLess(a, b); });
  return ids;
}

TEST(NaturalOrderTest, DigitRunsCompareAsNumbers) {
  EXPECT_EQ(Natural({"11", "7", "9"}), (std::vector<std::string>{"7", "9", "11"}));
  EXPECT_EQ(Natural({"11_2", "11a", "11.web", "11", "9", "100", "10"}),
            (std::vector<std::string>{"9", "10", "11", "11.web", "11_2", "11a", "100"}));
  EXPECT_EQ(Natural({"job10.b", "job9.b", "job10.a", "job", "job2"}),
            (std::vector<std::string>{"job", "job2", "job9.b", "job10.a", "job10.b"}));
  // Every run counts, not just the first.
  EXPECT_EQ(Natural({"1.10", "1.9", "1.1", "2.0"}),
            (std::vector<std::string>{"1.1", "1.9", "1.10", "2.0"}));
  // Everything else is bytewise: a digit is 0x30..0x39 among the other id characters.
  EXPECT_LT(NaturalCompare("a-1", "a.1"), 0);  // '-' < '.'
  EXPECT_LT(NaturalCompare("a.1", "a1"), 0);   // '.' < '0'..'9'
  EXPECT_LT(NaturalCompare("a1", "a_1"), 0);   // digits < '_'
  EXPECT_LT(NaturalCompare("a_1", "ab"), 0);
  EXPECT_EQ(NaturalCompare("", ""), 0);
  EXPECT_LT(NaturalCompare("", "0"), 0);
  EXPECT_EQ(NaturalCompare("abc", "abc"), 0);
  EXPECT_EQ(NaturalCompare("x12y", "x12y"), 0);
}

TEST(NaturalOrderTest, LeadingZerosCompareByValueThenDeterministically) {
  EXPECT_LT(NaturalCompare("007", "9"), 0);
  EXPECT_LT(NaturalCompare("9", "010"), 0);
  EXPECT_GT(NaturalCompare("0011", "9"), 0);
  // Equal numbers: fewer zeros first, decided by the first run where they differ, and only
  // when nothing else differs.
  EXPECT_LT(NaturalCompare("7", "07"), 0);
  EXPECT_GT(NaturalCompare("07", "7"), 0);
  EXPECT_LT(NaturalCompare("07", "007"), 0);
  EXPECT_LT(NaturalCompare("0", "00"), 0);
  EXPECT_GT(NaturalCompare("a07b1", "a7b01"), 0) << "the first run with other zeros decides";
  EXPECT_LT(NaturalCompare("a7b01", "a07b1"), 0);
  EXPECT_LT(NaturalCompare("07a", "7b"), 0) << "zeros matter only if the rest is equal";
  EXPECT_LT(NaturalCompare("007.1", "7.2"), 0);
  EXPECT_EQ(Natural({"07", "7", "007", "6", "8"}),
            (std::vector<std::string>{"6", "7", "07", "007", "8"}));
}

TEST(NaturalOrderTest, LongDigitRunsCompareExactly) {
  // Far beyond any integer type: compared digit by digit, never converted.
  const std::string big(60, '9');                         // 10^60 - 1
  const std::string bigger = "1" + std::string(60, '0');  // 10^60
  EXPECT_LT(NaturalCompare(big, bigger), 0);
  EXPECT_GT(NaturalCompare(bigger, big), 0);
  EXPECT_LT(NaturalCompare("18446744073709551615", "18446744073709551616"), 0);  // 2^64 - 1, 2^64
  EXPECT_LT(NaturalCompare("18446744073709551616", "18446744073709551617"), 0);
  EXPECT_LT(NaturalCompare("9", "18446744073709551616"), 0);
  // Numbers that wrap to the same value modulo 2^64 are still told apart.
  EXPECT_NE(NaturalCompare("1", "18446744073709551617"), 0);
  EXPECT_LT(NaturalCompare("1", "18446744073709551617"), 0);
  // Equal values with long zero prefixes: deterministic, and a tie only for identical text.
  const std::string zeros = std::string(40, '0') + big;
  EXPECT_GT(NaturalCompare(zeros, big), 0);
  EXPECT_LT(NaturalCompare(big, zeros), 0);
  EXPECT_EQ(NaturalCompare(zeros, zeros), 0);
  EXPECT_LT(NaturalCompare(std::string(64, '0'), "1"), 0);
}

TEST(NaturalOrderTest, IsAStrictTotalOrder) {
  // Antisymmetric and transitive over a mix of the cases above; equal only when identical.
  std::vector<std::string> ids = {"",
                                  "0",
                                  "00",
                                  "07",
                                  "7",
                                  "9",
                                  "11",
                                  "011",
                                  "11.web",
                                  "11_2",
                                  "11a",
                                  "a",
                                  "a1",
                                  "a01",
                                  "a1b",
                                  "a-1",
                                  "a.1",
                                  "a_1",
                                  "1.10",
                                  "1.9",
                                  "01.9",
                                  "99999999999999999999999",
                                  "100000000000000000000000"};
  for (const auto& a : ids) {
    for (const auto& b : ids) {
      int ab = NaturalCompare(a, b);
      EXPECT_EQ(ab == 0, a == b) << a << " vs " << b;
      EXPECT_EQ(ab<0, NaturalCompare(b, a)> 0) << a << " vs " << b;
      for (const auto& c : ids) {
        if (ab < 0 && NaturalCompare(b, c) < 0) {
          EXPECT_LT(NaturalCompare(a, c), 0) << a << " < " << b << " < " << c;
        }
      }
    }
  }
}

TEST(RegistryTest, ListIsInNaturalOrder) {
  Registry registry(RangeOptions(100, 199));
  for (const char* id : {"11", "7", "9", "11.web", "100", "11_2"}) {
    MustSave(registry, Request(id), kAlice);
  }
  std::vector<std::string> ids;
  for (const Job* job : registry.List(kAlice)) ids.push_back(job->id);
  EXPECT_EQ(ids, (std::vector<std::string>{"7", "9", "11", "11.web", "11_2", "100"}));
}

// ---- Expiry ----

TEST(RegistryTest, TtlSetsExpiry) {
  Registry registry(RangeOptions(100, 199));  // default_ttl 0: never
  SaveRequest req = Request("default");
  EXPECT_EQ(MustSave(registry, req).expires, 0);
  req = Request("never");
  req.ttl = 0;
  EXPECT_EQ(MustSave(registry, req).expires, 0);
  req = Request("minute");
  req.ttl = 60;
  EXPECT_EQ(MustSave(registry, req).expires, kNow + 60);
}

TEST(RegistryTest, DefaultTtlAppliesOnlyWhenAsked) {
  Registry::Options options = RangeOptions(100, 199);
  options.default_ttl = 3600;
  Registry registry(options);
  EXPECT_EQ(MustSave(registry, Request("default")).expires, kNow + 3600);
  SaveRequest req = Request("never");
  req.ttl = 0;
  EXPECT_EQ(MustSave(registry, req).expires, 0);
  req = Request("short");
  req.ttl = 10;
  EXPECT_EQ(MustSave(registry, req).expires, kNow + 10);
}

TEST(RegistryTest, ExpiredListsDueJobsSorted) {
  Registry registry(RangeOptions(100, 199));
  for (auto [id, ttl] : std::vector<std::pair<std::string, int64_t>>{
           {"z", 60}, {"a", 60}, {"m", 120}, {"never", 0}}) {
    SaveRequest req = Request(id);
    req.ttl = ttl;
    MustSave(registry, req);
  }
  EXPECT_TRUE(registry.Expired(kNow).empty());
  EXPECT_TRUE(registry.Expired(kNow + 59).empty());
  EXPECT_EQ(registry.Expired(kNow + 60), (std::vector<std::string>{"a", "z"}));
  EXPECT_EQ(registry.Expired(kNow + 119), (std::vector<std::string>{"a", "z"}));
  EXPECT_EQ(registry.Expired(kNow + 120), (std::vector<std::string>{"a", "m", "z"}));
  EXPECT_EQ(registry.Expired(kMaxJobTime), (std::vector<std::string>{"a", "m", "z"}));
}

// ---- Readiness and authentication ----

TEST(RegistryTest, SetReady) {
  Registry registry(RangeOptions(100, 199));
  MustSave(registry, Request("a"));
  ASSERT_TRUE(registry.SetReady("a", false).ok());
  EXPECT_FALSE(registry.Find("a")->ready);
  ASSERT_TRUE(registry.SetReady("a", true).ok());
  EXPECT_TRUE(registry.Find("a")->ready);
  EXPECT_EQ(registry.SetReady("b", true).code(), Status::Code::kNotFound);
}

TEST(RegistryJobTest, CanonicalJobIdFoldsAsciiCaseOnly) {
  EXPECT_EQ(CanonicalJobId("ABC.Web_1-x"), "abc.web_1-x");
  EXPECT_EQ(CanonicalJobId("123"), "123");
}

// One name is one job: a DNS name folds case, so ids must too, or "ABC" of one user and "abc"
// of another would share a TLS server name and certificate name.
TEST(RegistryTest, IdsAreCaseInsensitiveAndStoredLowerCase) {
  Registry registry(RangeOptions(40000, 40009));
  Job abc = MustSave(registry, Request("abc"), kAlice);
  for (const char* other : {"ABC", "Abc", "aBC"}) {
    Result<Job> squat = registry.Save(Request(other), kBob, kNow, nullptr);
    ASSERT_FALSE(squat.ok()) << other;
    EXPECT_EQ(squat.status().code(), Status::Code::kPermissionDenied) << other;
    EXPECT_EQ(registry.Get(other, kBob).status().code(), Status::Code::kPermissionDenied);
    EXPECT_EQ(registry.Remove(other, kBob).status().code(), Status::Code::kPermissionDenied);
    // Any spelling reaches the one job, for its owner and for the proxy.
    Result<const Job*> got = registry.Get(other, kAlice);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ((*got)->id, "abc");
    EXPECT_EQ(registry.Authenticate(other, abc.secret), registry.Find("abc"));
  }
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_EQ(registry.Find("abc")->owner, kAlice);
  // A new id is stored in its canonical spelling, and its owner replaces it by any spelling.
  Job upper = MustSave(registry, Request("XYZ"), kBob);
  EXPECT_EQ(upper.id, "xyz");
  std::optional<Job> replaced;
  ASSERT_TRUE(registry.Save(Replacing(Request("xYz")), kBob, kNow, &replaced).ok());
  ASSERT_TRUE(replaced.has_value());
  EXPECT_EQ(registry.size(), 2u);
  EXPECT_TRUE(registry.SetReady("XYZ", false).ok());
  EXPECT_FALSE(registry.Find("xyz")->ready);
  Job put = ValidJob("MiXed", 40005);
  ASSERT_TRUE(registry.Put(put).ok());
  EXPECT_NE(registry.Find("mixed"), nullptr);
  registry.Erase("MIXED");
  EXPECT_EQ(registry.Find("mixed"), nullptr);
  ASSERT_TRUE(registry.Remove("ABC", kAlice).ok());
  EXPECT_EQ(registry.Find("abc"), nullptr);
}

TEST(RegistryTest, AuthenticateNeedsTheExactSecret) {
  Registry registry(RangeOptions(100, 199));
  Job job = MustSave(registry, Request("a"));
  const std::string& secret = job.secret;
  const Job* found = registry.Authenticate("a", secret);
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(*found, job);

  std::string wrong = secret;
  wrong.back() = wrong.back() == '0' ? '1' : '0';
  EXPECT_EQ(registry.Authenticate("a", wrong), nullptr);
  EXPECT_EQ(registry.Authenticate("a", ""), nullptr);
  EXPECT_EQ(registry.Authenticate("a", secret + "0"), nullptr);
  EXPECT_EQ(registry.Authenticate("a", secret.substr(0, secret.size() - 1)), nullptr);
  EXPECT_EQ(registry.Authenticate("b", secret), nullptr);
  EXPECT_EQ(registry.Authenticate("b", ""), nullptr);
  EXPECT_EQ(registry.Authenticate("", secret), nullptr);
}

TEST(RegistryTest, MaxJobsPerUserCountsEachOwner) {
  Registry::Options options;
  options.max_jobs_per_user = 2;
  Registry registry(options);
  MustSave(registry, Request("a1"), kAlice);
  MustSave(registry, Request("a2"), kAlice);
  Result<Job> over = registry.Save(Request("a3"), kAlice, kNow, nullptr);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), Status::Code::kResourceExhausted);
  EXPECT_NE(over.status().message().find("you already hold 2 jobs"), std::string::npos)
      << over.status().ToString();
  EXPECT_NE(over.status().message().find("max_jobs_per_user = 2"), std::string::npos);
  EXPECT_EQ(registry.Find("a3"), nullptr);
  EXPECT_EQ(registry.CountOwnedBy(kAlice), 2u);

  // Another user has a count of their own; replacing an own job adds none; root is exempt.
  MustSave(registry, Request("b1"), kBob);
  MustSave(registry, Replacing(Request("a1")), kAlice);
  for (const char* id : {"r1", "r2", "r3"}) MustSave(registry, Request(id), kRoot);

  // Removing, root taking a job over and erasing each give a slot back.
  ASSERT_TRUE(registry.Remove("a1", kAlice).ok());
  MustSave(registry, Request("a3"), kAlice);
  MustSave(registry, Replacing(Request("a3")), kRoot);  // now root's
  EXPECT_EQ(registry.CountOwnedBy(kAlice), 1u);
  MustSave(registry, Request("a4"), kAlice);
  registry.Erase("a4");
  EXPECT_EQ(registry.CountOwnedBy(kAlice), 1u);
  EXPECT_EQ(registry.CountOwnedBy(kRoot), 4u);
}

TEST(RegistryTest, ZeroMaxJobsPerUserMeansNoLimit) {
  Registry::Options options;
  options.max_jobs_per_user = 0;
  Registry registry(options);
  for (int i = 0; i < 100; ++i) MustSave(registry, Request("j" + std::to_string(i)), kAlice);
  EXPECT_EQ(registry.CountOwnedBy(kAlice), 100u);
}

}  // namespace
}  // namespace brokerproxy::registry

namespace brokerproxy::registry {
namespace {

TEST(RegistryObserverTest, GenerationChangesWithEveryNewRecordAndObserverHearsOfReplacements) {
  Registry r(RangeOptions(100, 199));
  std::vector<std::string> heard;
  r.set_observer([&heard](const std::string& id) { heard.push_back(id); });
  EXPECT_EQ(r.Generation("j1"), 0u);
  ASSERT_TRUE(r.Save(Request("j1"), kAlice, kNow, nullptr).ok());
  uint64_t first = r.Generation("j1");
  EXPECT_NE(first, 0u);
  EXPECT_TRUE(heard.empty()) << "a new job replaces nothing";
  ASSERT_TRUE(r.SetReady("j1", false).ok());
  EXPECT_EQ(r.Generation("j1"), first) << "readiness is not a new record";
  ASSERT_TRUE(r.Save(Replacing(Request("j1")), kAlice, kNow, nullptr).ok());  // a new secret
  uint64_t second = r.Generation("j1");
  EXPECT_NE(second, first);
  EXPECT_EQ(heard, std::vector<std::string>{"j1"});
  Job copy = **r.Get("j1", kAlice);
  ASSERT_TRUE(r.Remove("j1", kAlice).ok());
  EXPECT_EQ(r.Generation("j1"), 0u);
  EXPECT_EQ(heard.size(), 2u);
  ASSERT_TRUE(r.Put(copy).ok());  // undo: the same record, but a new generation
  EXPECT_NE(r.Generation("j1"), second);
  EXPECT_EQ(heard.size(), 2u);
  r.Erase("j1");
  EXPECT_EQ(heard.size(), 3u);
  r.Erase("j1");  // absent: nothing to tell
  EXPECT_EQ(heard.size(), 3u);
}

}  // namespace
}  // namespace brokerproxy::registry
