// Process: a child process started with uv_spawn, its stdio inherited.
// Loop-thread only; lifetime rules in loop/handle.h (dropping the HandlePtr does not kill the
// child: call Kill() first if that is wanted).

#ifndef BROKERPROXY_LOOP_PROCESS_H_
#define BROKERPROXY_LOOP_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "loop/handle.h"

namespace brokerproxy::loop {

class Process final : public HandleBase {
 public:
  // Exit status, or the signal that ended the child (0 if none).
  using ExitCallback = std::function<void(int64_t exit_status, int term_signal)>;

  // Starts args[0] (searched in PATH) with `args` and exactly the environment `env`
  // ("NAME=value" entries). Stdin, stdout and stderr are inherited. With `new_session` the
  // child gets its own session and process group, so a terminal's ^C reaches only this
  // process, which forwards it once (rather than the child getting it twice).
  static Result<HandlePtr<Process>> Spawn(Loop& loop, const std::vector<std::string>& args,
                                          const std::vector<std::string>& env, ExitCallback cb,
                                          bool new_session = false);

  pid_t pid() const { return process_.pid; }
  bool exited() const { return exited_; }
  Status Kill(int signum);

 private:
  explicit Process(Loop& loop) : HandleBase(loop, reinterpret_cast<uv_handle_t*>(&process_)) {}
  static void OnExit(uv_process_t* p, int64_t exit_status, int term_signal) noexcept;

  uv_process_t process_{};
  ExitCallback cb_;
  bool exited_ = false;
};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_PROCESS_H_
