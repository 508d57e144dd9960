#include "registry/snapshot.h"

#include <cJSON.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <unordered_map>

namespace brokerproxy::registry {
namespace {

using JsonPtr = std::unique_ptr<cJSON, decltype(&cJSON_Delete)>;
using PrintedPtr = std::unique_ptr<char, decltype(&cJSON_free)>;

JsonPtr Own(cJSON* json) { return JsonPtr(json, &cJSON_Delete); }

// cJSON reports only allocation failures while building; like operator new, we do not continue
// without memory.
[[noreturn]] void OutOfMemory() {
  std::fputs("brokerproxy: out of memory while encoding the registry\n", stderr);
  std::abort();
}

template <typename T>
T* CheckAlloc(T* p) {
  if (p == nullptr) {
    OutOfMemory();
  }
  return p;
}

// Completes a cJSON_AddItemTo*() call: on success the parent owns `*child`.
void Adopted(cJSON_bool added, JsonPtr* child) {
  if (!added) {
    OutOfMemory();
  }
  child->release();
}

std::string Print(const cJSON* json, bool pretty) {
  PrintedPtr text(CheckAlloc(pretty ? cJSON_Print(json) : cJSON_PrintUnformatted(json)),
                  &cJSON_free);
  return std::string(text.get());
}

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
std::string JobsChecksum(const cJSON* jobs) { return Sha256Hex(Print(jobs, /*pretty=*/false)); }

void AddString(cJSON* obj, const char* name, const std::string& value) {
  CheckAlloc(cJSON_AddStringToObject(obj, name, value.c_str()));
}
void AddNumber(cJSON* obj, const char* name, double value) {
  CheckAlloc(cJSON_AddNumberToObject(obj, name, value));
}
void AddBool(cJSON* obj, const char* name, bool value) {
  CheckAlloc(cJSON_AddBoolToObject(obj, name, value));
}

JsonPtr EncodeJob(const Job& job) {
  JsonPtr obj = Own(CheckAlloc(cJSON_CreateObject()));
  AddString(obj.get(), "id", job.id);
  AddString(obj.get(), "type", JobTypeName(job.type));
  AddNumber(obj.get(), "owner", static_cast<double>(job.owner));
  AddString(obj.get(), "host", job.host);
  AddNumber(obj.get(), "port", job.port);
  AddBool(obj.get(), "port_allocated", job.port_allocated);
  AddString(obj.get(), "secret", job.secret);
  if (job.type == JobType::kSsl) {
    AddString(obj.get(), "cert_path", job.cert_path);
    AddString(obj.get(), "key_path", job.key_path);
  }
  AddNumber(obj.get(), "created", static_cast<double>(job.created));
  AddNumber(obj.get(), "expires", static_cast<double>(job.expires));
  AddBool(obj.get(), "ready", job.ready);
  return obj;
}

// ---- Decoding ----

constexpr const char* kTopFields[] = {"format", "checksum", "jobs"};
constexpr const char* kJobFields[] = {"id",       "type",           "owner",   "host",
                                      "port",     "port_allocated", "secret",  "cert_path",
                                      "key_path", "created",        "expires", "ready"};

// A name from the file, made safe to put in a message: short and printable.
std::string Sanitize(const char* text) {
  std::string out;
  for (const char* p = text; *p != '\0' && out.size() < 40; ++p) {
    out += (*p >= 0x20 && *p < 0x7f) ? *p : '?';
  }
  return out;
}

// Every member of `obj` has a name from `known`, and no name appears twice (cJSON would keep
// both and lookups would silently see only the first).
template <size_t N>
Status CheckFieldNames(const cJSON* obj, const char* const (&known)[N]) {
  bool seen[N] = {};
  for (const cJSON* field = obj->child; field != nullptr; field = field->next) {
    size_t i = 0;
    while (i < N && std::strcmp(field->string, known[i]) != 0) {
      ++i;
    }
    if (i == N) {
      return Status::Corruption("unknown field '" + Sanitize(field->string) + "'");
    }
    if (seen[i]) {
      return Status::Corruption("field '" + std::string(known[i]) + "' appears twice");
    }
    seen[i] = true;
  }
  return Status::OK();
}

Status Missing(const char* name) {
  return Status::Corruption("missing field '" + std::string(name) + "'");
}

// `name` is an exact integer (not 1.5, not 1e400) in lo..hi. REQUIRES: |lo|, |hi| < 10^15, so
// that every accepted value is printed exactly, and the checksum covers it.
Status ReadInt(const cJSON* obj, const char* name, int64_t lo, int64_t hi, int64_t* out) {
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr) {
    return Missing(name);
  }
  const double d = item->valuedouble;
  if (!cJSON_IsNumber(item) || !(d >= static_cast<double>(lo) && d <= static_cast<double>(hi)) ||
      d != std::floor(d)) {
    return Status::Corruption("field '" + std::string(name) + "' must be an integer in " +
                              std::to_string(lo) + ".." + std::to_string(hi));
  }
  *out = static_cast<int64_t>(d);
  return Status::OK();
}

// A string field; an absent optional one reads as "".
Status ReadString(const cJSON* obj, const char* name, bool required, std::string* out) {
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr) {
    out->clear();
    return required ? Missing(name) : Status::OK();
  }
  if (!cJSON_IsString(item)) {
    return Status::Corruption("field '" + std::string(name) + "' must be a string");
  }
  *out = item->valuestring;
  return Status::OK();
}

Status ReadBool(const cJSON* obj, const char* name, bool* out) {
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr) {
    return Missing(name);
  }
  if (!cJSON_IsBool(item)) {
    return Status::Corruption("field '" + std::string(name) + "' must be true or false");
  }
  *out = cJSON_IsTrue(item);
  return Status::OK();
}

// Fills `*job` field by field, so that on failure `job->id` holds whatever id was read.
Status DecodeJob(const cJSON* obj, Job* job) {
  if (!cJSON_IsObject(obj)) {
    return Status::Corruption("must be a JSON object");
  }
  BP_RETURN_IF_ERROR(CheckFieldNames(obj, kJobFields));
  BP_RETURN_IF_ERROR(ReadString(obj, "id", /*required=*/true, &job->id));
  std::string type;
  BP_RETURN_IF_ERROR(ReadString(obj, "type", /*required=*/true, &type));
  std::optional<JobType> parsed_type = ParseJobType(type);
  if (!parsed_type) {
    return Status::Corruption("field 'type' must be \"ssh\" or \"ssl\"");
  }
  job->type = *parsed_type;
  int64_t owner = 0;
  // uid_t(-1) means "no user" to the kernel, so no job can belong to it.
  BP_RETURN_IF_ERROR(
      ReadInt(obj, "owner", 0, std::numeric_limits<uid_t>::max() - int64_t{1}, &owner));
  job->owner = static_cast<uid_t>(owner);
  BP_RETURN_IF_ERROR(ReadString(obj, "host", /*required=*/true, &job->host));
  int64_t port = 0;
  BP_RETURN_IF_ERROR(ReadInt(obj, "port", 1, 65535, &port));
  job->port = static_cast<int>(port);
  BP_RETURN_IF_ERROR(ReadBool(obj, "port_allocated", &job->port_allocated));
  BP_RETURN_IF_ERROR(ReadString(obj, "secret", /*required=*/true, &job->secret));
  BP_RETURN_IF_ERROR(ReadString(obj, "cert_path", /*required=*/false, &job->cert_path));
  BP_RETURN_IF_ERROR(ReadString(obj, "key_path", /*required=*/false, &job->key_path));
  BP_RETURN_IF_ERROR(ReadInt(obj, "created", 0, kMaxJobTime, &job->created));
  BP_RETURN_IF_ERROR(ReadInt(obj, "expires", 0, kMaxJobTime, &job->expires));
  BP_RETURN_IF_ERROR(ReadBool(obj, "ready", &job->ready));
  Status valid = CheckJob(*job);
  if (!valid.ok()) {
    return Status::Corruption(valid.message());
  }
  return Status::OK();
}

// "job 3 (id \"abc\")", counting from 1; the id only if it is one (it may be any bytes).
std::string JobLabel(size_t index, const std::string& id) {
  std::string label = "job " + std::to_string(index + 1);
  if (ValidJobId(id)) {
    label += " (id \"" + id + "\")";
  }
  return label;
}

// ---- Files ----

Status WriteAll(int fd, std::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return PosixError("cannot write " + path, errno);
    }
    if (n == 0) {
      return Status::IOError("cannot write " + path + ": write() wrote nothing");
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return Status::OK();
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) {
    return ".";
  }
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Makes a rename in `dir` durable.
Status SyncDirectory(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return PosixError("cannot open directory " + dir, errno);
  }
  Status status;
  if (fsync(fd) != 0) {
    status = PosixError("cannot sync directory " + dir, errno);
  }
  close(fd);
  return status;
}

}  // namespace

std::string EncodeSnapshot(const std::vector<const Job*>& jobs) {
  JsonPtr array = Own(CheckAlloc(cJSON_CreateArray()));
  for (const Job* job : jobs) {
    JsonPtr obj = EncodeJob(*job);
    Adopted(cJSON_AddItemToArray(array.get(), obj.get()), &obj);
  }
  const std::string checksum = JobsChecksum(array.get());

  JsonPtr root = Own(CheckAlloc(cJSON_CreateObject()));
  AddNumber(root.get(), "format", kSnapshotFormat);
  AddString(root.get(), "checksum", checksum);
  Adopted(cJSON_AddItemToObject(root.get(), "jobs", array.get()), &array);
  // Pretty-printed for administrators. No trailing newline: then every truncation of the file
  // is incomplete JSON.
  return Print(root.get(), /*pretty=*/true);
}

Result<std::vector<Job>> DecodeSnapshot(std::string_view data) {
  if (data.size() > kMaxSnapshotBytes) {
    return Status::Corruption("snapshot is " + std::to_string(data.size()) +
                              " bytes, more than the limit of " +
                              std::to_string(kMaxSnapshotBytes));
  }
  if (const void* nul = std::memchr(data.data(), '\0', data.size()); nul != nullptr) {
    return Status::Corruption("NUL byte at offset " +
                              std::to_string(static_cast<const char*>(nul) - data.data()));
  }
  // cJSON rejects trailing garbage only when it sees the terminating NUL inside the buffer.
  const std::string text(data);
  const char* end = nullptr;
  JsonPtr root = Own(cJSON_ParseWithLengthOpts(text.c_str(), text.size() + 1, &end,
                                               /*require_null_terminated=*/true));
  if (root == nullptr) {
    std::string where = end != nullptr ? " near byte " + std::to_string(end - text.c_str()) : "";
    return Status::Corruption("not valid JSON" + where);
  }
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
  BP_RETURN_IF_ERROR(CheckFieldNames(root.get(), kTopFields));
  std::string checksum;
  BP_RETURN_IF_ERROR(ReadString(root.get(), "checksum", /*required=*/true, &checksum));
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(root.get(), "jobs");
  if (jobs == nullptr) {
    return Missing("jobs");
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
    Status status = DecodeJob(item, &job);
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

Status WriteFileAtomic(const std::string& path, std::string_view data, mode_t mode) {
  const std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) {
    return PosixError("cannot create " + tmp, errno);
  }
  // open() applied the umask, and an old temp file keeps its old mode: set it exactly.
  Status status;
  if (fchmod(fd, mode) != 0) {
    status = PosixError("cannot chmod " + tmp, errno);
  }
  if (status.ok()) {
    status = WriteAll(fd, data, tmp);
  }
  if (status.ok() && fsync(fd) != 0) {
    status = PosixError("cannot sync " + tmp, errno);
  }
  if (close(fd) != 0 && status.ok()) {
    status = PosixError("cannot close " + tmp, errno);
  }
  if (status.ok() && rename(tmp.c_str(), path.c_str()) != 0) {
    status = PosixError("cannot rename " + tmp + " to " + path, errno);
  }
  if (!status.ok()) {
    unlink(tmp.c_str());
    return status;
  }
  return SyncDirectory(DirName(path)).WithContext(path);
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
