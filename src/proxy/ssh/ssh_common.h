// libssh 0.10 plumbing shared by the embedded SSH endpoint (ssh_server.h) and the `--via`
// client (cli/ssh_client.h, cli/remote.h): owning pointers for libssh objects, the one error
// translator, and the host key helpers.
//
// libssh objects are not thread-safe; each one is used by one thread only (the loop thread in
// the daemon, the main thread in a CLI process).

#ifndef BROKERPROXY_PROXY_SSH_SSH_COMMON_H_
#define BROKERPROXY_PROXY_SSH_SSH_COMMON_H_

#include <libssh/libssh.h>
#include <libssh/server.h>

#include <memory>
#include <string>
#include <string_view>
#include <type_traits>

#include "loop/status.h"

namespace brokerproxy::proxy {

struct SshSessionFree {
  void operator()(ssh_session s) const noexcept { ssh_free(s); }
};
struct SshKeyFree {
  void operator()(ssh_key k) const noexcept { ssh_key_free(k); }
};
struct SshBindFree {
  void operator()(ssh_bind b) const noexcept { ssh_bind_free(b); }
};
struct SshMessageFree {
  void operator()(ssh_message m) const noexcept { ssh_message_free(m); }
};
// ssh_free() closes the session's socket, so an SshSessionPtr owns the fd it was given.
using SshSessionPtr = std::unique_ptr<std::remove_pointer_t<ssh_session>, SshSessionFree>;
using SshKeyPtr = std::unique_ptr<std::remove_pointer_t<ssh_key>, SshKeyFree>;
using SshBindPtr = std::unique_ptr<std::remove_pointer_t<ssh_bind>, SshBindFree>;
// A message taken from a session's queue (ssh_message_get); free it before its session.
using SshMessagePtr = std::unique_ptr<std::remove_pointer_t<ssh_message>, SshMessageFree>;

// IOError "<context>: <libssh's last error for `session`>". libssh's messages never contain a
// password: it does not keep them in its error strings.
Status SshError(ssh_session session, std::string_view context);

// "SHA256:<base64>" of a key's public half, as `ssh-keygen -lf` and OpenSSH's prompts print it.
Result<std::string> SshFingerprint(ssh_key key);

// Loads the ed25519 host key at `path`, or generates one there (mode 0600, created
// exclusively, so two daemons racing on first start cannot both write it) if the file does not
// exist. A file that exists but cannot be read or parsed is an error, never replaced.
// Blocking file I/O: call at start-up, before the loop serves clients.
Result<SshKeyPtr> LoadOrCreateHostKey(const std::string& path);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SSH_SSH_COMMON_H_
