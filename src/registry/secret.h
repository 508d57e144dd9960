// Secrets ("magic keys"): generated from the OS CSPRNG, compared in constant time.

#ifndef BROKERPROXY_REGISTRY_SECRET_H_
#define BROKERPROXY_REGISTRY_SECRET_H_

#include <string>
#include <string_view>

#include "loop/status.h"

namespace brokerproxy::registry {

inline constexpr int kDefaultSecretBits = 256;
inline constexpr int kMinSecretBits = 128;
inline constexpr int kMaxSecretBits = 4096;

// `bits` random bits (OpenSSL RAND_bytes, seeded by the OS CSPRNG) as lower-case hex.
// REQUIRES: kMinSecretBits <= bits <= kMaxSecretBits and bits % 8 == 0 (else InvalidArgument).
Result<std::string> GenerateSecret(int bits);

// True iff `given` equals `expected`. Takes the same time whatever the inputs' contents and
// whatever the length of `given`: both sides are hashed (SHA-256) and the digests compared with
// CRYPTO_memcmp, so neither a matching prefix nor a length difference is observable.
bool SecretMatches(std::string_view expected, std::string_view given);

// A secret is lower-case hex of an even length between kMinSecretBits/4 and kMaxSecretBits/4.
bool ValidSecretFormat(std::string_view secret);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_SECRET_H_
