#include "loop/process.h"

namespace brokerproxy::loop {

Result<HandlePtr<Process>> Process::Spawn(Loop& loop, const std::vector<std::string>& args,
                                          const std::vector<std::string>& env, ExitCallback cb,
                                          bool new_session) {
  if (args.empty()) return Status::InvalidArgument("no command to run");
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  uv_stdio_container_t stdio[3];
  for (int i = 0; i < 3; ++i) {
    stdio[i].flags = UV_INHERIT_FD;
    stdio[i].data.fd = i;
  }
  uv_process_options_t options{};
  options.exit_cb = &Process::OnExit;
  options.file = argv[0];
  options.args = argv.data();
  options.env = envp.data();
  options.stdio_count = 3;
  options.stdio = stdio;
  if (new_session) options.flags |= UV_PROCESS_DETACHED;

  HandlePtr<Process> p(new Process(loop));
  p->cb_ = std::move(cb);
  // uv_spawn initialises the handle even when it fails, so it must be closed either way.
  int rc = uv_spawn(loop.get(), &p->process_, &options);
  p->MarkInitialized();
  if (rc != 0) return UvError("cannot run " + args[0], rc);
  return p;
}

Status Process::Kill(int signum) {
  if (exited_) return Status::OK();
  int rc = uv_process_kill(&process_, signum);
  return rc == 0 || rc == UV_ESRCH ? Status::OK() : UvError("kill", rc);
}

void Process::OnExit(uv_process_t* p, int64_t exit_status, int term_signal) noexcept {
  auto* self = static_cast<Process*>(p->data);
  self->exited_ = true;
  if (self->closing() || !self->cb_) return;
  ExitCallback cb = self->cb_;
  cb(exit_status, term_signal);
}

}  // namespace brokerproxy::loop
