#include "registry/secret.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <vector>

namespace brokerproxy::registry {
namespace {

constexpr char kHexDigits[] = "0123456789abcdef";

bool IsLowerHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

// SHA-256, fetched from the provider once: EVP_sha256() in EVP_Digest() would look it up (a
// locked table) at every call, and a handshake makes two.
const EVP_MD* Sha256() {
  static const EVP_MD* md = [] {
    const EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    return fetched != nullptr ? fetched : EVP_sha256();
  }();
  return md;
}

}  // namespace

Result<std::string> GenerateSecret(int bits) {
  if (bits < kMinSecretBits || bits > kMaxSecretBits || bits % 8 != 0) {
    return Status::InvalidArgument(
        "secret_bits must be a multiple of 8 in " + std::to_string(kMinSecretBits) + ".." +
        std::to_string(kMaxSecretBits) + ", not " + std::to_string(bits));
  }
  std::vector<unsigned char> bytes(bits / 8);
  if (RAND_bytes(bytes.data(), static_cast<int>(bytes.size())) != 1) {
    return Status::Internal("RAND_bytes failed: the random generator is not seeded");
  }
  std::string hex;
  hex.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) {
    hex += kHexDigits[b >> 4];
    hex += kHexDigits[b & 0xf];
  }
  OPENSSL_cleanse(bytes.data(), bytes.size());
  return hex;
}

bool SecretMatches(std::string_view expected, std::string_view given) {
  // Comparing fixed-size digests hides both where the inputs first differ and how their lengths
  // differ; the hashing time depends only on lengths, which an attacker already knows (its own
  // input) or which are public (secret_bits).
  unsigned char want[EVP_MAX_MD_SIZE];
  unsigned char got[EVP_MAX_MD_SIZE];
  unsigned int want_len = 0;
  unsigned int got_len = 0;
  bool hashed =
      EVP_Digest(expected.data(), expected.size(), want, &want_len, Sha256(), nullptr) == 1;
  hashed &= EVP_Digest(given.data(), given.size(), got, &got_len, Sha256(), nullptr) == 1;
  // Fail closed: a hashing failure never authenticates.
  return hashed && want_len == got_len && CRYPTO_memcmp(want, got, want_len) == 0;
}

bool ValidSecretFormat(std::string_view secret) {
  if (secret.size() < kMinSecretBits / 4 || secret.size() > kMaxSecretBits / 4 ||
      secret.size() % 2 != 0) {
    return false;
  }
  for (char c : secret) {
    if (!IsLowerHex(c)) {
      return false;
    }
  }
  return true;
}

}  // namespace brokerproxy::registry
