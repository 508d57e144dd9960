#include "registry/seal.h"

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

namespace brokerproxy::registry {
namespace {

Sealer MakeSealer(char fill) {
  return Sealer::FromKey(std::string(Sealer::kKeyBytes, fill)).value();
}

TEST(SealTest, RoundTripsAndUsesAFreshNonceEachTime) {
  Sealer sealer = MakeSealer('k');
  for (std::string plain : {std::string(), std::string("x"), std::string(5000, 's')}) {
    auto a = sealer.Seal(plain, "job-1");
    auto b = sealer.Seal(plain, "job-1");
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->size(), plain.size() + Sealer::kNonceBytes + Sealer::kTagBytes);
    EXPECT_NE(*a, *b);  // random nonces
    auto opened = sealer.Open(*a, "job-1");
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    EXPECT_EQ(*opened, plain);
  }
  auto sealed = sealer.Seal("secret-value", "job-1");
  EXPECT_EQ(sealed->find("secret-value"), std::string::npos);
}

TEST(SealTest, WrongKeyDoesNotOpen) {
  auto sealed = MakeSealer('k').Seal("secret", "job-1");
  auto opened = MakeSealer('j').Open(*sealed, "job-1");
  EXPECT_EQ(opened.status().code(), Status::Code::kCorruption);
}

TEST(SealTest, WrongAssociatedDataDoesNotOpen) {
  Sealer sealer = MakeSealer('k');
  auto sealed = sealer.Seal("secret", "job-1");
  EXPECT_EQ(sealer.Open(*sealed, "job-2").status().code(), Status::Code::kCorruption);
  EXPECT_EQ(sealer.Open(*sealed, "").status().code(), Status::Code::kCorruption);
}

TEST(SealTest, TamperedOrTruncatedValuesDoNotOpen) {
  Sealer sealer = MakeSealer('k');
  std::string sealed = sealer.Seal("a secret of some length", "job-1").value();
  for (size_t i = 0; i < sealed.size(); ++i) {
    std::string bad = sealed;
    bad[i] = static_cast<char>(bad[i] ^ 0x01);
    EXPECT_EQ(sealer.Open(bad, "job-1").status().code(), Status::Code::kCorruption) << i;
  }
  for (size_t n = 0; n < sealed.size(); n += 7) {
    EXPECT_FALSE(sealer.Open(sealed.substr(0, n), "job-1").ok()) << n;
  }
}

TEST(SealTest, KeysMustHave32Bytes) {
  EXPECT_FALSE(Sealer::FromKey(std::string(31, 'k')).ok());
  EXPECT_FALSE(Sealer::FromKey(std::string(33, 'k')).ok());
  EXPECT_TRUE(Sealer::FromKey(std::string(32, 'k')).ok());
}

class SealKeyFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bp-seal-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/key";
  }
  void TearDown() override {
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  void Write(const std::string& data, mode_t mode) {
    ::unlink(path_.c_str());
    std::ofstream(path_) << data;
    ::chmod(path_.c_str(), mode);
  }
  std::string dir_;
  std::string path_;
};

TEST_F(SealKeyFileTest, AcceptsAPrivate32ByteFile) {
  Write(std::string(32, 'k'), 0600);
  auto sealer = Sealer::FromKeyFile(path_);
  ASSERT_TRUE(sealer.ok()) << sealer.status().ToString();
  auto sealed = sealer->Seal("x", "id");
  EXPECT_EQ(*MakeSealer('k').Open(*sealed, "id"), "x");
  Write(std::string(32, 'k'), 0400);
  EXPECT_TRUE(Sealer::FromKeyFile(path_).ok());
}

TEST_F(SealKeyFileTest, RefusesReadableByOthersWrongSizeAndMissing) {
  Write(std::string(32, 'k'), 0644);
  auto loose = Sealer::FromKeyFile(path_);
  EXPECT_EQ(loose.status().code(), Status::Code::kPermissionDenied);
  EXPECT_NE(loose.status().message().find("0644"), std::string::npos);
  Write(std::string(32, 'k'), 0640);
  EXPECT_EQ(Sealer::FromKeyFile(path_).status().code(), Status::Code::kPermissionDenied);
  for (size_t n : {0, 16, 31, 33, 64}) {
    Write(std::string(n, 'k'), 0600);
    EXPECT_EQ(Sealer::FromKeyFile(path_).status().code(), Status::Code::kInvalidArgument) << n;
  }
  EXPECT_FALSE(Sealer::FromKeyFile(dir_ + "/none").ok());
  EXPECT_FALSE(Sealer::FromKeyFile(dir_).ok());
}

TEST(SealTest, HexRoundTrips) {
  std::string bytes;
  for (int i = 0; i < 256; ++i) bytes.push_back(static_cast<char>(i));
  EXPECT_EQ(*HexDecode(HexEncode(bytes)), bytes);
  EXPECT_FALSE(HexDecode("abc").ok());
  EXPECT_FALSE(HexDecode("zz").ok());
  EXPECT_FALSE(HexDecode("AB").ok());
}

}  // namespace
}  // namespace brokerproxy::registry
