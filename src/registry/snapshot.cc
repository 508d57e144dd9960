#include "registry/snapshot.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <limits>
#include <unordered_map>

#include "registry/json.h"

namespace brokerproxy::registry {
namespace {

std::string Sha256Hex(std::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr) != 1) {
    return "";  // never matches a stored checksum
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) {
    hex += kHex[digest[i] >> 4];
    hex += kHex[digest[i] & 0xf];
  }
  return hex;
}

// The checksum covers the compact form, which the decoder reproduces from the parsed tree: it
// is independent of the file's whitespace and detects any change of a value or a name.
std::string JobsChecksum(const cJSON* jobs) { return Sha256Hex(PrintJson(jobs)); }

// "job 3 (id \"abc\")", counting from 1; the id only if it is one (it may be any bytes).
std::string JobLabel(size_t index, const std::string& id) {
  std::string label = "job " + std::to_string(index + 1);
  if (ValidJobId(id)) {
    label += " (id \"" + id + "\")";
  }
  return label;
}

}  // namespace

std::string EncodeSnapshot(const std::vector<const Job*>& jobs) {
  JsonPtr array = NewArray();
  for (const Job* job : jobs) Adopt(array.get(), nullptr, JobToJson(*job, SecretField::kInclude));
  const std::string checksum = JobsChecksum(array.get());
  JsonPtr root = NewObject();
  cJSON_AddNumberToObject(root.get(), "format", kSnapshotFormat);
  cJSON_AddStringToObject(root.get(), "checksum", checksum.c_str());
  Adopt(root.get(), "jobs", std::move(array));
  // Pretty-printed for administrators. No trailing newline: then every truncation of the file
  // is incomplete JSON.
  return PrintJson(root.get(), /*pretty=*/true);
}

Result<std::vector<Job>> DecodeSnapshot(std::string_view data) {
  if (data.size() > kMaxSnapshotBytes) {
    return Status::Corruption("snapshot is " + std::to_string(data.size()) +
                              " bytes, more than the limit of " +
                              std::to_string(kMaxSnapshotBytes));
  }
  auto parsed = ParseJson(data, kMaxSnapshotBytes);
  if (!parsed.ok()) return parsed.status();
  JsonPtr root = std::move(parsed).value();
  if (!cJSON_IsObject(root.get())) {
    return Status::Corruption("the top level must be a JSON object");
  }
  // The format first: a newer file may well have fields this version does not know.
  int64_t format = 0;
  BP_RETURN_IF_ERROR(ReadInt(root.get(), "format", 0, std::numeric_limits<int>::max(), &format));
  if (format > kSnapshotFormat) {
    return Status::Corruption("format " + std::to_string(format) +
                              " is newer than this brokerproxy reads (format " +
                              std::to_string(kSnapshotFormat) + "); upgrade brokerproxy");
  }
  if (format != kSnapshotFormat) {
    return Status::Corruption("unsupported format " + std::to_string(format));
  }
  BP_RETURN_IF_ERROR(CheckFieldNames(root.get(), {"format", "checksum", "jobs"}));
  std::string checksum;
  BP_RETURN_IF_ERROR(ReadString(root.get(), "checksum", /*required=*/true, &checksum));
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(root.get(), "jobs");
  if (jobs == nullptr) {
    return Status::Corruption("missing field 'jobs'");
  }
  if (!cJSON_IsArray(jobs)) {
    return Status::Corruption("field 'jobs' must be an array");
  }
  if (checksum != JobsChecksum(jobs)) {
    return Status::Corruption("checksum mismatch: the jobs were changed or damaged");
  }

  std::vector<Job> out;
  std::unordered_map<std::string, size_t> index_of;
  for (const cJSON* item = jobs->child; item != nullptr; item = item->next) {
    const size_t index = out.size();
    Job job;
    Status status = JobFromJson(item, SecretField::kInclude, &job);
    if (!status.ok()) {
      return status.WithContext(JobLabel(index, job.id));
    }
    auto [it, inserted] = index_of.emplace(job.id, index);
    if (!inserted) {
      return Status::Corruption(JobLabel(index, job.id) + ": duplicate id, also " +
                                JobLabel(it->second, job.id));
    }
    out.push_back(std::move(job));
  }
  return out;
}

Result<std::optional<std::string>> ReadFileIfExists(const std::string& path, size_t max_bytes) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return std::optional<std::string>();
    }
    return PosixError("cannot open " + path, errno);
  }
  std::string data;
  Status status;
  char buffer[64 * 1024];
  for (;;) {
    ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      status = PosixError("cannot read " + path, errno);
      break;
    }
    if (n == 0) {
      break;
    }
    if (static_cast<size_t>(n) > max_bytes - data.size()) {
      status = Status::IOError(path + " is larger than " + std::to_string(max_bytes) + " bytes");
      break;
    }
    data.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  if (!status.ok()) {
    return status;
  }
  return std::optional<std::string>(std::move(data));
}

}  // namespace brokerproxy::registry
