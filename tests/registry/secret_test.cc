#include "registry/secret.h"

#include <gtest/gtest.h>

#include <cctype>
#include <string>

namespace brokerproxy::registry {
namespace {

bool IsLowerHex(const std::string& s) {
  return s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

TEST(SecretTest, GeneratesLowerCaseHexOfTheRequestedLength) {
  for (int bits : {kMinSecretBits, kDefaultSecretBits, kMaxSecretBits, 136}) {
    Result<std::string> secret = GenerateSecret(bits);
    ASSERT_TRUE(secret.ok()) << bits << ": " << secret.status().ToString();
    EXPECT_EQ(secret->size(), static_cast<size_t>(bits / 4));
    EXPECT_TRUE(IsLowerHex(*secret)) << *secret;
    EXPECT_TRUE(ValidSecretFormat(*secret));
  }
  EXPECT_EQ(GenerateSecret(128)->size(), 32u);
  EXPECT_EQ(GenerateSecret(256)->size(), 64u);
  EXPECT_EQ(GenerateSecret(4096)->size(), 1024u);
}

TEST(SecretTest, RejectsBadBitCounts) {
  for (int bits : {-8, 0, 8, 120, 127, 129, 130, 4095, 4097, 4104, 1 << 20}) {
    Result<std::string> secret = GenerateSecret(bits);
    ASSERT_FALSE(secret.ok()) << bits;
    EXPECT_EQ(secret.status().code(), Status::Code::kInvalidArgument);
  }
}

TEST(SecretTest, SecretsDiffer) {
  Result<std::string> a = GenerateSecret(kDefaultSecretBits);
  Result<std::string> b = GenerateSecret(kDefaultSecretBits);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, *b);
  // Every hex digit shows up in a long secret: the encoding covers the whole alphabet.
  Result<std::string> c = GenerateSecret(kMaxSecretBits);
  ASSERT_TRUE(c.ok());
  for (char digit : std::string("0123456789abcdef")) {
    EXPECT_NE(c->find(digit), std::string::npos) << digit;
  }
}

TEST(SecretTest, MatchesOnlyTheExactString) {
  const std::string secret = *GenerateSecret(kDefaultSecretBits);
  EXPECT_TRUE(SecretMatches(secret, secret));
  EXPECT_TRUE(SecretMatches(secret, std::string(secret)));
  EXPECT_FALSE(SecretMatches(secret, ""));
  EXPECT_FALSE(SecretMatches(secret, secret.substr(0, secret.size() - 1)));
  EXPECT_FALSE(SecretMatches(secret, secret + "0"));
  EXPECT_FALSE(SecretMatches(secret, secret + std::string(1, '\0')));
  std::string upper = secret;
  for (char& c : upper) {
    c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  if (upper != secret) {
    EXPECT_FALSE(SecretMatches(secret, upper));
  }
  for (size_t i = 0; i < secret.size(); ++i) {
    std::string changed = secret;
    changed[i] = changed[i] == 'f' ? '0' : 'f';
    EXPECT_FALSE(SecretMatches(secret, changed)) << i;
  }
  EXPECT_FALSE(SecretMatches("", secret));
  EXPECT_TRUE(SecretMatches("", ""));
}

TEST(SecretTest, ValidSecretFormat) {
  EXPECT_TRUE(ValidSecretFormat(std::string(32, 'a')));
  EXPECT_TRUE(ValidSecretFormat(std::string(1024, '0')));
  EXPECT_TRUE(ValidSecretFormat("0123456789abcdef0123456789abcdef"));
  EXPECT_FALSE(ValidSecretFormat(""));
  EXPECT_FALSE(ValidSecretFormat(std::string(30, 'a')));
  EXPECT_FALSE(ValidSecretFormat(std::string(33, 'a')));  // odd
  EXPECT_FALSE(ValidSecretFormat(std::string(1026, 'a')));
  EXPECT_FALSE(ValidSecretFormat("0123456789ABCDEF0123456789abcdef"));
  EXPECT_FALSE(ValidSecretFormat("0123456789abcdeg0123456789abcdef"));
  EXPECT_FALSE(ValidSecretFormat("0123456789abcdef 123456789abcdef"));
}

}  // namespace
}  // namespace brokerproxy::registry
