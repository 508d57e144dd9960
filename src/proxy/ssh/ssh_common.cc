#include "proxy/ssh/ssh_common.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace brokerproxy::proxy {

Status SshError(ssh_session session, std::string_view context) {
  const char* err = session ? ssh_get_error(session) : nullptr;
  std::string msg(context);
  if (err && *err) msg += std::string(": ") + err;
  return Status::IOError(msg);
}

Result<std::string> SshFingerprint(ssh_key key) {
  ssh_key pub = nullptr;
  if (ssh_key_is_private(key)) {
    if (ssh_pki_export_privkey_to_pubkey(key, &pub) != SSH_OK) {
      return Status::Internal("cannot derive the public key");
    }
  }
  SshKeyPtr owned_pub(pub);
  unsigned char* hash = nullptr;
  size_t len = 0;
  if (ssh_get_publickey_hash(pub ? pub : key, SSH_PUBLICKEY_HASH_SHA256, &hash, &len) != 0) {
    return Status::Internal("cannot hash the public key");
  }
  char* text = ssh_get_fingerprint_hash(SSH_PUBLICKEY_HASH_SHA256, hash, len);
  ssh_clean_pubkey_hash(&hash);
  if (text == nullptr) return Status::Internal("cannot format the key fingerprint");
  std::string out = text;
  ssh_string_free_char(text);
  return out;
}

Result<SshKeyPtr> LoadOrCreateHostKey(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) return PosixError("ssh host key " + path, errno);
    ssh_key generated = nullptr;
    if (ssh_pki_generate(SSH_KEYTYPE_ED25519, 0, &generated) != SSH_OK) {
      return Status::Internal("cannot generate an ed25519 host key");
    }
    SshKeyPtr key(generated);
    char* pem = nullptr;
    if (ssh_pki_export_privkey_base64(key.get(), nullptr, nullptr, nullptr, &pem) != SSH_OK) {
      return Status::Internal("cannot encode the new host key");
    }
    std::string text = pem;
    std::memset(pem, 0, std::strlen(pem));
    ssh_string_free_char(pem);
    // Written under a temporary name and linked into place, so a crash never leaves a
    // truncated key behind, and O_EXCL on the final name (link fails if it exists) lets only one
    // of two racing daemons win.
    std::string tmp = path + ".tmp." + std::to_string(::getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return PosixError("cannot create ssh host key " + tmp, errno);
    size_t off = 0;
    int err = 0;
    while (off < text.size()) {
      ssize_t n = ::write(fd, text.data() + off, text.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        err = errno ? errno : EIO;
        break;
      }
      off += n;
    }
    if (err == 0 && ::fsync(fd) != 0) err = errno;
    ::close(fd);
    std::fill(text.begin(), text.end(), '\0');
    if (err == 0 && ::link(tmp.c_str(), path.c_str()) != 0) err = errno;
    ::unlink(tmp.c_str());
    if (err != 0) return PosixError("cannot write ssh host key " + path, err);
    return key;
  }
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(path + " is not a regular file");
  if ((st.st_mode & 077) != 0) {
    return Status::PermissionDenied("ssh host key " + path +
                                    " is readable by others; chmod 600 it");
  }
  ssh_key loaded = nullptr;
  if (ssh_pki_import_privkey_file(path.c_str(), nullptr, nullptr, nullptr, &loaded) != SSH_OK) {
    return Status::Corruption("cannot read the ssh host key " + path +
                              " (not an unencrypted OpenSSH private key?)");
  }
  SshKeyPtr key(loaded);
  if (ssh_key_type(key.get()) != SSH_KEYTYPE_ED25519) {
    return Status::InvalidArgument("ssh host key " + path + " is not an ed25519 key");
  }
  return key;
}

}  // namespace brokerproxy::proxy
