// BrokerClient: how a short-lived subcommand reaches the broker.
//
// LocalClient talks to the daemon on this machine over its control socket; the SSH client of
// `--via` (remote.h) runs the same request on the login node. Both are blocking, with a
// deadline: a CLI process does one thing at a time and must never hang.

#ifndef BROKERPROXY_CLI_CONTROL_CLIENT_H_
#define BROKERPROXY_CLI_CONTROL_CLIENT_H_

#include <cstdint>
#include <mutex>
#include <string>

#include "loop/status.h"
#include "registry/control_protocol.h"
#include "registry/json.h"

namespace brokerproxy::cli {

class BrokerClient {
 public:
  virtual ~BrokerClient() = default;
  // Sends `request`; returns the reply object when it says "ok", else the Status it carried.
  // Fails with Unavailable when the broker cannot be reached, Timeout after `timeout_ms`.
  virtual Result<registry::JsonPtr> Call(const registry::Request& request, int64_t timeout_ms) = 0;
  // Says where requests go, for messages ("the daemon on /path/control.sock").
  virtual std::string Describe() const = 0;
  // Any thread: a Call() under way on another thread returns promptly (Unavailable), and every
  // later one fails at once. For `connect`, which may stop while a pool thread waits in a call
  // that fetches the secret again: its loop (and the process's exit) waits for that thread.
  virtual void Interrupt() = 0;
};

class LocalClient final : public BrokerClient {
 public:
  explicit LocalClient(std::string socket_path) : path_(std::move(socket_path)) {}
  Result<registry::JsonPtr> Call(const registry::Request& request, int64_t timeout_ms) override;
  std::string Describe() const override { return "the daemon on " + path_; }
  void Interrupt() override;

 private:
  // Registers the socket of the call under way; false once interrupted.
  bool SetActive(int fd);
  bool Interrupted();

  std::string path_;
  std::mutex mu_;
  bool interrupted_ = false;  // guarded by mu_
  int active_fd_ = -1;        // guarded by mu_; shut down by Interrupt()
};

// Sends one line and reads one line back over a connected blocking-or-not socket `fd`, within
// `deadline_ms` (CLOCK_MONOTONIC milliseconds). Shared by the local and test clients.
Result<std::string> ExchangeLine(int fd, const std::string& line, int64_t deadline_ms,
                                 size_t max_reply);
int64_t MonotonicMs();

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_CONTROL_CLIENT_H_
