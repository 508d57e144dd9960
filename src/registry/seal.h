// Sealing: what the registry puts into a shared store (registry/redis_store.h) is encrypted and
// authenticated with AES-256-GCM (OpenSSL EVP) under a key that only the login nodes hold.
//
// A sealed value is nonce (12 random bytes, fresh for every seal) || ciphertext || tag (16
// bytes). The associated data binds it to its place (a job's canonical id), so a value moved to
// another id does not open. Open() tells a wrong key, a wrong place and tampered bytes apart
// from nothing: each is Corruption.
//
// The key file holds exactly 32 bytes (`head -c 32 /dev/urandom`) and must be readable by its
// owner only (mode 0600 or stricter): anything else is a startup error naming the file.
//
// Thread safety: a Sealer is immutable after construction; Seal and Open may run on any thread.

#ifndef BROKERPROXY_REGISTRY_SEAL_H_
#define BROKERPROXY_REGISTRY_SEAL_H_

#include <string>
#include <string_view>

#include "loop/status.h"

namespace brokerproxy::registry {

class Sealer {
 public:
  static constexpr size_t kKeyBytes = 32;
  static constexpr size_t kNonceBytes = 12;
  static constexpr size_t kTagBytes = 16;

  // REQUIRES: key.size() == kKeyBytes (else InvalidArgument).
  static Result<Sealer> FromKey(std::string_view key);
  // Reads a key file (blocking: for start-up). InvalidArgument naming `path` if it is not a
  // regular file of 32 bytes, PermissionDenied if group or others may read or write it.
  static Result<Sealer> FromKeyFile(const std::string& path);

  Sealer(const Sealer&) = default;
  Sealer& operator=(const Sealer&) = default;
  Sealer(Sealer&&) = default;
  Sealer& operator=(Sealer&&) = default;
  ~Sealer();

  // Binary: nonce || ciphertext || tag. Internal only if OpenSSL fails.
  Result<std::string> Seal(std::string_view plaintext, std::string_view aad) const;
  // The plaintext, or Corruption if `sealed` is short, was sealed under another key or `aad`,
  // or was changed.
  Result<std::string> Open(std::string_view sealed, std::string_view aad) const;

 private:
  explicit Sealer(std::string key) : key_(std::move(key)) {}
  std::string key_;
};

// Lower-case hex of `bytes`, and back (nullopt-free: Corruption on a bad digit or odd length).
std::string HexEncode(std::string_view bytes);
Result<std::string> HexDecode(std::string_view hex);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_SEAL_H_
