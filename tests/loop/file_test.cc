#include "loop/file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace brokerproxy::loop {
namespace {

namespace fs = std::filesystem;

class FileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bp_file_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/registry.json";
  }
  void TearDown() override {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // A tmpfs of `size` on dir_, for disks that are full or read-only. Needs root (the suite's
  // e2e tests run as root); skipped otherwise.
  bool MountTmpfs(const char* size) {
    std::string options = std::string("size=") + size + ",mode=0700";
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, options.c_str()) != 0) return false;
    mounted_ = true;
    return true;
  }

  std::vector<std::string> Entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return in ? s.str() : "<missing>";
  }

  static mode_t Mode(const std::string& path) {
    struct stat st {};
    EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
  }

  std::string dir_;
  std::string path_;
  bool mounted_ = false;
};

TEST_F(FileTest, ReplacesContentAndLeavesNoTempFile) {
  ASSERT_TRUE(WriteFileAtomic(path_, "one", 0600).ok());
  EXPECT_EQ(Read(path_), "one");
  ASSERT_TRUE(WriteFileAtomic(path_, "two, longer", 0600).ok());
  EXPECT_EQ(Read(path_), "two, longer");
  ASSERT_TRUE(WriteFileAtomic(path_, "", 0600).ok());
  EXPECT_EQ(Read(path_), "");
  EXPECT_EQ(Entries(), (std::vector<std::string>{"registry.json"}));
}

TEST_F(FileTest, ModeIsExactWhateverTheUmask) {
  for (mode_t mask : {mode_t{0}, mode_t{077}, mode_t{022}}) {
    const mode_t old_mask = ::umask(mask);
    Status status = WriteFileAtomic(path_, "data", 0600);
    Status wide = WriteFileAtomic(path_ + ".wide", "data", 0644);
    ::umask(old_mask);
    ASSERT_TRUE(status.ok()) << status.ToString();
    ASSERT_TRUE(wide.ok()) << wide.ToString();
    EXPECT_EQ(Mode(path_), 0600u) << "umask " << mask;
    EXPECT_EQ(Mode(path_ + ".wide"), 0644u) << "umask " << mask;
  }
}

// Another user who could create files in the directory must not make the writer write through
// what they planted at the temp name: the write fails, the symlink's target and the old file
// are untouched, and the planted link (not the writer's) stays.
TEST_F(FileTest, PlantedTempSymlinkIsNotFollowed) {
  const std::string victim = dir_ + "/victim";
  ASSERT_TRUE(WriteFileAtomic(victim, "precious", 0644).ok());
  ASSERT_TRUE(WriteFileAtomic(path_, "old", 0600).ok());
  const std::string tmp = path_ + ".tmp-planted";
  ASSERT_EQ(::symlink(victim.c_str(), tmp.c_str()), 0);
  Status status = internal::WriteFileAtomicVia(path_, tmp, "new", 0600);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find(tmp), std::string::npos) << status.ToString();
  EXPECT_EQ(Read(victim), "precious");
  EXPECT_EQ(Mode(victim), 0644u);
  EXPECT_EQ(Read(path_), "old");
  struct stat st {};
  ASSERT_EQ(::lstat(tmp.c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  // The public writer picks a fresh name and succeeds next to it.
  ASSERT_TRUE(WriteFileAtomic(path_, "new", 0600).ok());
  EXPECT_EQ(Read(path_), "new");
  EXPECT_EQ(Read(victim), "precious");
}

// A symlink at the destination itself is replaced by the file, its target left alone.
TEST_F(FileTest, SymlinkAtTheDestinationIsReplacedNotFollowed) {
  const std::string victim = dir_ + "/victim";
  ASSERT_TRUE(WriteFileAtomic(victim, "precious", 0644).ok());
  ASSERT_EQ(::symlink(victim.c_str(), path_.c_str()), 0);
  ASSERT_TRUE(WriteFileAtomic(path_, "new", 0600).ok());
  EXPECT_EQ(Read(victim), "precious");
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(Read(path_), "new");
}

TEST_F(FileTest, MissingDirectoryFailsAndLeavesNothing) {
  const std::string path = dir_ + "/missing/registry.json";
  Status status = WriteFileAtomic(path, "data", 0600);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(path), std::string::npos) << status.ToString();
  EXPECT_TRUE(Entries().empty());
}

TEST_F(FileTest, FailedRenameRemovesTheTempFile) {
  // A non-empty directory where the file should go: the rename fails after the write.
  ASSERT_TRUE(fs::create_directory(path_));
  ASSERT_TRUE(WriteFileAtomic(path_ + "/inside", "x", 0600).ok());
  Status status = WriteFileAtomic(path_, "data", 0600);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(path_), std::string::npos) << status.ToString();
  EXPECT_EQ(Entries(), (std::vector<std::string>{"registry.json"}));
  EXPECT_TRUE(fs::is_directory(path_));
}

// A full disk fails the write part-way (a short write, then ENOSPC): the old content stays and
// the partial temp file is gone, so it does not keep the space.
TEST_F(FileTest, FullDiskKeepsTheOldFileAndLeavesNoTempFile) {
  if (!MountTmpfs("16k")) GTEST_SKIP() << "cannot mount a tmpfs: " << std::strerror(errno);
  ASSERT_TRUE(WriteFileAtomic(path_, "old", 0600).ok());
  Status status = WriteFileAtomic(path_, std::string(1 << 20, 'x'), 0600);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("No space left on device"), std::string::npos)
      << status.ToString();
  EXPECT_EQ(Read(path_), "old");
  EXPECT_EQ(Entries(), (std::vector<std::string>{"registry.json"}));
}

// A directory the writer may not write to (here read-only for everyone, root included): the
// temp file cannot be created, and the old content stays.
TEST_F(FileTest, UnwritableDirectoryKeepsTheOldFile) {
  if (!MountTmpfs("64k")) GTEST_SKIP() << "cannot mount a tmpfs: " << std::strerror(errno);
  ASSERT_TRUE(WriteFileAtomic(path_, "old", 0600).ok());
  ASSERT_EQ(::mount(nullptr, dir_.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr), 0)
      << std::strerror(errno);
  Status status = WriteFileAtomic(path_, "new", 0600);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("cannot create " + path_ + ".tmp-"), std::string::npos)
      << status.ToString();
  EXPECT_EQ(Read(path_), "old");
  EXPECT_EQ(Entries(), (std::vector<std::string>{"registry.json"}));
}

}  // namespace
}  // namespace brokerproxy::loop
