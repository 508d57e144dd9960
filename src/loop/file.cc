#include "loop/file.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace brokerproxy::loop {
namespace {

// 48 random bits: two writers of one path never pick the same name, and nobody can guess it
// ahead to plant something there (O_EXCL would refuse it anyway).
Result<std::string> TempName(const std::string& path) {
  unsigned char rnd[6];
  size_t got = 0;
  while (got < sizeof(rnd)) {
    ssize_t n = ::getrandom(rnd + got, sizeof(rnd) - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return PosixError("cannot pick a temporary name for " + path, errno);
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string tmp = path + ".tmp-";
  for (unsigned char b : rnd) {
    tmp += kHex[b >> 4];
    tmp += kHex[b & 15];
  }
  return tmp;
}

Status WriteAll(int fd, std::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError("cannot write " + path, errno);
    // A full disk shows as a short write first; a write of nothing would loop for ever.
    if (n == 0) return Status::IOError("cannot write " + path + ": write() wrote nothing");
    data.remove_prefix(static_cast<size_t>(n));
  }
  return Status::OK();
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Makes a rename in `dir` durable.
Status SyncDirectory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return PosixError("cannot open directory " + dir, errno);
  Status status;
  if (::fsync(fd) != 0) status = PosixError("cannot sync directory " + dir, errno);
  ::close(fd);
  return status;
}

}  // namespace

namespace internal {

Status WriteFileAtomicVia(const std::string& path, const std::string& tmp, std::string_view data,
                          mode_t mode) {
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
  // Not ours, whatever it is: nothing to remove.
  if (fd < 0) return PosixError("cannot create " + tmp, errno);
  Status status;
  if (::fchmod(fd, mode) != 0) status = PosixError("cannot chmod " + tmp, errno);  // the umask
  if (status.ok()) status = WriteAll(fd, data, tmp);
  if (status.ok() && ::fsync(fd) != 0) status = PosixError("cannot sync " + tmp, errno);
  if (::close(fd) != 0 && status.ok()) status = PosixError("cannot close " + tmp, errno);
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = PosixError("cannot rename " + tmp + " to " + path, errno);
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  return SyncDirectory(DirName(path)).WithContext(path);
}

}  // namespace internal

Status WriteFileAtomic(const std::string& path, std::string_view data, mode_t mode) {
  // A clash with another writer's name is all but impossible; a few tries make it harmless.
  Status status;
  for (int attempt = 0; attempt < 4; ++attempt) {
    Result<std::string> tmp = TempName(path);
    if (!tmp.ok()) return tmp.status();
    status = internal::WriteFileAtomicVia(path, *tmp, data, mode);
    if (status.code() != Status::Code::kAlreadyExists) break;
  }
  return status;
}

}  // namespace brokerproxy::loop
