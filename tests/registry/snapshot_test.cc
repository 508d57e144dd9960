#include "registry/snapshot.h"

#include <cJSON.h>
#include <gtest/gtest.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "loop/file.h"
#include "registry/registry.h"

namespace brokerproxy::registry {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kNow = 1'700'000'000;

std::vector<Job> SampleJobs() {
  std::vector<Job> jobs(4);
  jobs[0].id = "1234567";
  jobs[0].owner = 1000;
  jobs[0].host = "node17";
  jobs[0].port = 41007;
  jobs[0].port_allocated = true;
  jobs[0].secret = std::string(64, 'a');
  jobs[0].created = kNow;

  jobs[1].id = "1234568.jupyter";
  jobs[1].type = JobType::kSsl;
  jobs[1].owner = 4294967294u;
  jobs[1].host = "fe80::1";
  jobs[1].port = 8888;
  jobs[1].secret = "0123456789abcdef0123456789abcdef";
  // Quotes, backslashes and UTF-8 must survive JSON escaping.
  jobs[1].cert_path = "/var/lib/brokerproxy/certs/\"q\"\\caf\xc3\xa9.crt";
  jobs[1].key_path = "/var/lib/brokerproxy/certs/1234568.key";
  jobs[1].created = kNow + 1;
  jobs[1].expires = kMaxJobTime;

  jobs[2].id = "waiting";
  jobs[2].owner = 0;
  jobs[2].host = "10.0.0.1";
  jobs[2].port = 65535;
  jobs[2].secret = std::string(1024, 'f');
  jobs[2].created = 0;
  jobs[2].expires = kNow + 3600;
  jobs[2].ready = false;

  jobs[3].id = "ssl-without-cert";
  jobs[3].type = JobType::kSsl;
  jobs[3].owner = 1;
  jobs[3].host = "n1";
  jobs[3].port = 1;
  jobs[3].secret = std::string(32, '9');
  jobs[3].created = kNow;
  return jobs;
}

std::vector<const Job*> Pointers(const std::vector<Job>& jobs) {
  std::vector<const Job*> out;
  for (const Job& job : jobs) {
    out.push_back(&job);
  }
  return out;
}

// Wraps a hand-written "jobs" array in a document with a correct checksum, so tests can reach
// the per-field checks behind it.
std::string Seal(const std::string& jobs_json, const std::string& format = "1") {
  std::unique_ptr<cJSON, decltype(&cJSON_Delete)> jobs(cJSON_Parse(jobs_json.c_str()),
                                                       &cJSON_Delete);
  EXPECT_NE(jobs, nullptr) << jobs_json;
  if (jobs == nullptr) {
    return "";
  }
  std::unique_ptr<char, decltype(&cJSON_free)> compact(cJSON_PrintUnformatted(jobs.get()),
                                                       &cJSON_free);
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(compact.get()), strlen(compact.get()), digest);
  std::string hex;
  for (unsigned char b : digest) {
    char buf[3];
    std::snprintf(buf, sizeof(buf), "%02x", b);
    hex += buf;
  }
  return "{\"format\": " + format + ", \"checksum\": \"" + hex + "\", \"jobs\": " + jobs_json + "}";
}

using Fields = std::vector<std::pair<std::string, std::string>>;
constexpr const char* kDrop = "<drop>";

// One job object in JSON, valid unless `changes` say otherwise: each change replaces a field's
// JSON text, drops it (kDrop), or appends a new field.
std::string JobJson(const Fields& changes = {}) {
  Fields fields = {{"id", "\"a\""},
                   {"type", "\"ssh\""},
                   {"owner", "1000"},
                   {"host", "\"node1\""},
                   {"port", "41000"},
                   {"port_allocated", "true"},
                   {"secret", "\"" + std::string(32, 'b') + "\""},
                   {"created", "1700000000"},
                   {"expires", "0"},
                   {"ready", "true"}};
  for (const auto& [name, value] : changes) {
    auto it = std::find_if(fields.begin(), fields.end(),
                           [&name](const auto& field) { return field.first == name; });
    if (it == fields.end()) {
      fields.emplace_back(name, value);
    } else if (value == kDrop) {
      fields.erase(it);
    } else {
      it->second = value;
    }
  }
  std::string out = "{";
  for (const auto& [name, value] : fields) {
    out += (out.size() > 1 ? ", \"" : "\"") + name + "\": " + value;
  }
  return out + "}";
}

// Decodes `data`, expects Corruption, and returns the message.
std::string CorruptionMessage(const std::string& data) {
  Result<std::vector<Job>> jobs = DecodeSnapshot(data);
  EXPECT_FALSE(jobs.ok()) << data;
  if (jobs.ok()) {
    return "";
  }
  EXPECT_EQ(jobs.status().code(), Status::Code::kCorruption) << jobs.status().ToString();
  return jobs.status().message();
}

// ---- Encoding and decoding ----

TEST(SnapshotTest, EncodeDecodeEncodeIsIdentical) {
  const std::vector<Job> jobs = SampleJobs();
  const std::string encoded = EncodeSnapshot(Pointers(jobs));
  Result<std::vector<Job>> decoded = DecodeSnapshot(encoded);
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString() << "\n" << encoded;
  EXPECT_EQ(*decoded, jobs);
  EXPECT_EQ(EncodeSnapshot(Pointers(*decoded)), encoded);
}

TEST(SnapshotTest, EmptyRegistryRoundTrips) {
  const std::string encoded = EncodeSnapshot({});
  Result<std::vector<Job>> decoded = DecodeSnapshot(encoded);
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  EXPECT_TRUE(decoded->empty());
  EXPECT_EQ(EncodeSnapshot({}), encoded);
}

TEST(SnapshotTest, RegistryRoundTripsThroughPut) {
  Registry::Options options;
  options.default_ttl = 600;
  Registry registry(options);
  for (int i = 0; i < 20; ++i) {
    SaveRequest req;
    req.id = "job" + std::to_string(i);
    req.host = "node" + std::to_string(i % 3);
    req.ready = i % 2 == 0;
    req.port = i % 4 == 0 ? 22 : 0;
    ASSERT_TRUE(registry.Save(req, 1000 + i % 2, kNow, nullptr).ok());
  }
  const std::string encoded = EncodeSnapshot(registry.All());
  Result<std::vector<Job>> decoded = DecodeSnapshot(encoded);
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  Registry loaded(options);
  for (const Job& job : *decoded) {
    ASSERT_TRUE(loaded.Put(job).ok());
  }
  EXPECT_EQ(EncodeSnapshot(loaded.All()), encoded);
}

TEST(SnapshotTest, FileIsReadableJson) {
  const std::vector<Job> jobs = SampleJobs();
  const std::string encoded = EncodeSnapshot(Pointers(jobs));
  EXPECT_NE(encoded.find("\"format\":\t1"), std::string::npos) << encoded;
  EXPECT_NE(encoded.find("\"id\":\t\"waiting\""), std::string::npos) << encoded;
  EXPECT_NE(encoded.find("\"owner\":\t4294967294"), std::string::npos) << encoded;
  EXPECT_NE(encoded.find("\"expires\":\t253402300799"), std::string::npos) << encoded;
  EXPECT_GT(std::count(encoded.begin(), encoded.end(), '\n'), 40);
  // Only the two ssl jobs carry certificate fields.
  size_t cert_fields = 0;
  for (size_t at = 0; (at = encoded.find("\"cert_path\"", at)) != std::string::npos; ++at) {
    ++cert_fields;
  }
  EXPECT_EQ(cert_fields, 2u);
}

TEST(SnapshotTest, EveryTruncationIsCorruption) {
  const std::vector<Job> jobs = SampleJobs();
  const std::string encoded = EncodeSnapshot(Pointers(jobs));
  for (size_t n = 0; n < encoded.size(); ++n) {
    Result<std::vector<Job>> decoded = DecodeSnapshot(std::string_view(encoded).substr(0, n));
    ASSERT_FALSE(decoded.ok()) << "prefix of " << n << " bytes accepted";
    ASSERT_EQ(decoded.status().code(), Status::Code::kCorruption) << n;
  }
}

TEST(SnapshotTest, FlippedBytesAreRejectedOrHarmlessWhitespace) {
  const std::vector<Job> jobs = SampleJobs();
  const std::string encoded = EncodeSnapshot(Pointers(jobs));
  size_t accepted = 0;
  for (size_t i = 0; i < encoded.size(); ++i) {
    std::string damaged = encoded;
    damaged[i] = static_cast<char>(damaged[i] ^ 0x01);
    Result<std::vector<Job>> decoded = DecodeSnapshot(damaged);
    if (decoded.ok()) {
      ++accepted;
      const char original = encoded[i];
      EXPECT_TRUE(original == ' ' || original == '\t' || original == '\n' || original == '\r')
          << "flip at " << i << " of '" << original << "' was accepted";
      EXPECT_EQ(*decoded, jobs) << "flip at " << i << " changed the jobs";
    } else {
      ASSERT_EQ(decoded.status().code(), Status::Code::kCorruption) << i;
    }
  }
  // Tab <-> backspace and newline <-> vertical tab are still whitespace to cJSON.
  EXPECT_GT(accepted, 0u);
}

TEST(SnapshotTest, TrailingWhitespaceIsFineTrailingGarbageIsNot) {
  const std::string encoded = EncodeSnapshot({});
  EXPECT_TRUE(DecodeSnapshot(encoded + "\n").ok());
  EXPECT_TRUE(DecodeSnapshot(" \n" + encoded + "\n\n").ok());
  CorruptionMessage(encoded + "x");
  CorruptionMessage(encoded + "{}");
  EXPECT_NE(CorruptionMessage(encoded + std::string(1, '\0')).find("NUL"), std::string::npos);
}

TEST(SnapshotTest, HandWrittenJobDecodes) {
  Result<std::vector<Job>> decoded = DecodeSnapshot(Seal("[" + JobJson() + "]"));
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  ASSERT_EQ(decoded->size(), 1u);
  EXPECT_EQ((*decoded)[0].id, "a");
  EXPECT_EQ((*decoded)[0].port, 41000);
  // Absent certificate fields of an ssh job read as empty; an integer may be written 41000.0.
  decoded = DecodeSnapshot(Seal("[" + JobJson({{"port", "4.1e4"}}) + "]"));
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  EXPECT_EQ((*decoded)[0].port, 41000);
  decoded =
      DecodeSnapshot(Seal("[" + JobJson({{"cert_path", "\"\""}, {"key_path", "\"\""}}) + "]"));
  EXPECT_TRUE(decoded.ok()) << decoded.status().ToString();
}

// cJSON would end a string at \u0000 and silently drop the rest.
TEST(SnapshotTest, EscapedNulInAStringIsCorruption) {
  Result<std::vector<Job>> decoded =
      DecodeSnapshot(Seal("[" + JobJson({{"host", "\"node1\\u0000.evil\""}}) + "]"));
  ASSERT_FALSE(decoded.ok());
  EXPECT_EQ(decoded.status().code(), Status::Code::kCorruption);
  EXPECT_NE(decoded.status().message().find("NUL"), std::string::npos)
      << decoded.status().ToString();
}

TEST(SnapshotTest, FormatIsChecked) {
  const std::string jobs = "[" + JobJson() + "]";
  EXPECT_NE(CorruptionMessage(Seal(jobs, "2")).find("format 2 is newer"), std::string::npos);
  EXPECT_NE(CorruptionMessage(Seal(jobs, "0")).find("unsupported format 0"), std::string::npos);
  EXPECT_NE(CorruptionMessage(Seal(jobs, "\"1\"")).find("'format'"), std::string::npos);
  EXPECT_NE(CorruptionMessage(Seal(jobs, "1.5")).find("'format'"), std::string::npos);
  // A newer file may carry fields this version does not know; the format wins.
  std::string newer = Seal(jobs, "2");
  newer.insert(1, "\"extra\": 1, ");
  EXPECT_NE(CorruptionMessage(newer).find("newer"), std::string::npos);
  EXPECT_NE(CorruptionMessage("{\"checksum\": \"\", \"jobs\": []}").find("missing field 'format'"),
            std::string::npos);
}

TEST(SnapshotTest, TopLevelIsChecked) {
  EXPECT_NE(CorruptionMessage("").find("not valid JSON"), std::string::npos);
  EXPECT_NE(CorruptionMessage("{\"format\": 1,").find("not valid JSON"), std::string::npos);
  EXPECT_NE(CorruptionMessage("[]").find("JSON object"), std::string::npos);
  EXPECT_NE(CorruptionMessage("{\"format\": 1, \"jobs\": []}").find("missing field 'checksum'"),
            std::string::npos);
  std::string sealed = Seal("[]");
  EXPECT_NE(CorruptionMessage(sealed.substr(0, sealed.find(", \"jobs\"")) + "}")
                .find("missing field 'jobs'"),
            std::string::npos);
  EXPECT_NE(CorruptionMessage(Seal("{}")).find("'jobs' must be an array"), std::string::npos);
  sealed.insert(1, "\"jobz\": [], ");
  EXPECT_NE(CorruptionMessage(sealed).find("unknown field 'jobz'"), std::string::npos);
  sealed = Seal("[]");
  sealed.insert(1, "\"format\": 1, ");
  EXPECT_NE(CorruptionMessage(sealed).find("'format' appears twice"), std::string::npos);
}

TEST(SnapshotTest, ChecksumIsChecked) {
  std::string sealed = Seal("[" + JobJson() + "]");
  size_t port = sealed.find("41000");
  ASSERT_NE(port, std::string::npos);
  std::string changed = sealed;
  changed[port + 4] = '1';  // a valid job, but not the one the checksum covers
  EXPECT_NE(CorruptionMessage(changed).find("checksum mismatch"), std::string::npos);
  changed = sealed;
  changed.replace(changed.find("\"checksum\": \"") + 13, 1, "x");
  EXPECT_NE(CorruptionMessage(changed).find("checksum mismatch"), std::string::npos);
}

TEST(SnapshotTest, FieldsAreCheckedWithSpecificMessages) {
  struct Case {
    Fields changes;
    const char* message;
  };
  const std::vector<Case> cases = {
      {{{"port", "\"41000\""}}, "job 1 (id \"a\"): field 'port' must be an integer in 1..65535"},
      {{{"port", "1.5"}}, "field 'port' must be an integer in 1..65535"},
      {{{"port", "0"}}, "field 'port' must be an integer in 1..65535"},
      {{{"port", "65536"}}, "field 'port' must be an integer in 1..65535"},
      {{{"port", "1e400"}}, "field 'port' must be an integer"},
      {{{"port", "null"}}, "field 'port' must be an integer"},
      {{{"owner", "-1"}}, "field 'owner' must be an integer in 0..4294967294"},
      {{{"owner", "4294967295"}}, "field 'owner' must be an integer"},
      {{{"created", "1.5"}}, "field 'created' must be an integer"},
      {{{"expires", "-1"}}, "field 'expires' must be an integer"},
      {{{"expires", "253402300800"}}, "field 'expires' must be an integer"},
      {{{"ready", "\"yes\""}}, "field 'ready' must be true or false"},
      {{{"port_allocated", "1"}}, "field 'port_allocated' must be true or false"},
      {{{"id", "5"}}, "job 1: field 'id' must be a string"},
      {{{"id", "\"bad id\""}}, "job 1: field 'id' must be 1..64 characters"},
      {{{"id", "\"..\""}}, "job 1: field 'id'"},
      {{{"host", "\"-oProxyCommand=x\""}}, "field 'host'"},
      {{{"host", "\"\""}}, "field 'host'"},
      {{{"secret", "\"" + std::string(32, 'B') + "\""}}, "field 'secret' must be lower-case hex"},
      {{{"secret", "\"abc\""}}, "field 'secret'"},
      {{{"type", "\"tcp\""}}, "field 'type' must be \"ssh\" or \"ssl\""},
      {{{"type", "\"SSH\""}}, "field 'type'"},
      {{{"secret", kDrop}}, "job 1 (id \"a\"): missing field 'secret'"},
      {{{"ready", kDrop}}, "missing field 'ready'"},
      {{{"id", kDrop}}, "job 1: missing field 'id'"},
      {{{"colour", "\"blue\""}}, "unknown field 'colour'"},
      {{{"port_allocated", "true"}, {"port", "1"}, {"Port", "2"}}, "unknown field 'Port'"},
      {{{"cert_path", "\"/x.crt\""}, {"key_path", "\"/x.key\""}}, "only for ssl jobs"},
      {{{"type", "\"ssl\""}, {"cert_path", "\"/x.crt\""}}, "must be given together"},
      {{{"type", "\"ssl\""}, {"cert_path", "\"x.crt\""}, {"key_path", "\"/x.key\""}},
       "field 'cert_path' must be an absolute path"},
      {{{"type", "\"ssl\""}, {"cert_path", "1"}, {"key_path", "\"/x.key\""}},
       "field 'cert_path' must be a string"},
  };
  for (const Case& c : cases) {
    const std::string job = JobJson(c.changes);
    const std::string message = CorruptionMessage(Seal("[" + job + "]"));
    EXPECT_NE(message.find(c.message), std::string::npos)
        << job << "\n  gave: " << message << "\n  want: " << c.message;
  }
  // The secret itself never appears in a message.
  const std::string secret = "\"" + std::string(30, 'c') + "\"";
  EXPECT_EQ(CorruptionMessage(Seal("[" + JobJson({{"secret", secret}}) + "]")).find("ccc"),
            std::string::npos);
}

TEST(SnapshotTest, JobsAreCountedAndTheBadOneNamed) {
  const std::string jobs = "[" + JobJson({{"id", "\"first\""}}) + ", " +
                           JobJson({{"id", "\"second\""}, {"port", "-5"}}) + "]";
  EXPECT_NE(CorruptionMessage(Seal(jobs)).find("job 2 (id \"second\"): field 'port'"),
            std::string::npos);
  EXPECT_NE(CorruptionMessage(Seal("[" + JobJson() + ", 7]")).find("job 2: must be a JSON object"),
            std::string::npos);
}

TEST(SnapshotTest, DuplicateIdsAreRejected) {
  const std::string jobs = "[" + JobJson({{"id", "\"x\""}}) + ", " + JobJson({{"id", "\"y\""}}) +
                           ", " + JobJson({{"id", "\"x\""}}) + "]";
  EXPECT_NE(
      CorruptionMessage(Seal(jobs)).find("job 3 (id \"x\"): duplicate id, also job 1 (id \"x\")"),
      std::string::npos);
  // The same field twice in one job.
  std::string twice = JobJson();
  twice.insert(1, "\"port\": 41001, ");
  EXPECT_NE(CorruptionMessage(Seal("[" + twice + "]")).find("'port' appears twice"),
            std::string::npos);
}

TEST(SnapshotTest, OversizedInputIsRejectedUnread) {
  const std::string huge(kMaxSnapshotBytes + 1, ' ');
  EXPECT_NE(CorruptionMessage(huge).find("more than the limit"), std::string::npos);
}

// ---- Files ----

class SnapshotFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bp_snapshot_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/registry.json";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::vector<std::string> Entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  std::string Read(const std::string& path) const {
    Result<std::optional<std::string>> data = ReadFileIfExists(path, 1 << 20);
    EXPECT_TRUE(data.ok()) << data.status().ToString();
    return data.ok() && data->has_value() ? **data : "<missing>";
  }

  static mode_t Mode(const std::string& path) {
    struct stat st {};
    EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
  }

  std::string dir_;
  std::string path_;
};

TEST_F(SnapshotFileTest, ReadMissingFileIsNullopt) {
  Result<std::optional<std::string>> data = ReadFileIfExists(path_, 100);
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  EXPECT_FALSE(data->has_value());
}

TEST_F(SnapshotFileTest, ReadReturnsTheWholeFileUpToTheLimit) {
  std::string content(200'000, 'x');
  content[123'456] = '\0';  // binary-safe
  ASSERT_TRUE(loop::WriteFileAtomic(path_, content, 0600).ok());
  Result<std::optional<std::string>> data = ReadFileIfExists(path_, content.size());
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  ASSERT_TRUE(data->has_value());
  EXPECT_EQ(**data, content);

  data = ReadFileIfExists(path_, content.size() - 1);
  ASSERT_FALSE(data.ok());
  EXPECT_NE(data.status().message().find(path_), std::string::npos);
}

TEST_F(SnapshotFileTest, ReadDirectoryIsAnError) {
  Result<std::optional<std::string>> data = ReadFileIfExists(dir_, 100);
  EXPECT_FALSE(data.ok());
}

TEST_F(SnapshotFileTest, SnapshotSurvivesTheDisk) {
  const std::vector<Job> jobs = SampleJobs();
  ASSERT_TRUE(loop::WriteFileAtomic(path_, EncodeSnapshot(Pointers(jobs)), 0600).ok());
  Result<std::optional<std::string>> data = ReadFileIfExists(path_, kMaxSnapshotBytes);
  ASSERT_TRUE(data.ok() && data->has_value());
  Result<std::vector<Job>> decoded = DecodeSnapshot(**data);
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  EXPECT_EQ(*decoded, jobs);
}

}  // namespace
}  // namespace brokerproxy::registry
