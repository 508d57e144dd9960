// Poll: readiness events for a raw file descriptor (uv_poll_t).
//
// This is how brokerproxy drives sockets whose bytes it moves itself (splice(2), MSG_PEEK
// sniffing) and sockets owned by another library (libssh). libuv's rule applies: one active
// poll per fd, and never a poll and a uv_tcp_t on the same fd (docs.libuv.org/en/stable/poll).
//
// Fd ownership is decided at creation: kOwned closes the fd when the Poll is closed (right after
// uv_close(), which libuv documents as safe); kBorrowed leaves it to the caller, who may close
// it only after dropping the Poll. ReleaseFd() turns an owned fd into a borrowed one for a
// hand-over (to uv_tcp_open or to libssh).
//
// Loop-thread only; lifetime rules in loop/handle.h.

#ifndef BROKERPROXY_LOOP_POLL_H_
#define BROKERPROXY_LOOP_POLL_H_

#include <functional>

#include "loop/handle.h"

namespace brokerproxy::loop {

enum class FdOwnership { kOwned, kBorrowed };

class Poll final : public HandleBase {
 public:
  // `status` is 0 or a negative libuv error; `events` is a mask of UV_READABLE, UV_WRITABLE,
  // UV_DISCONNECT. On a socket error (POLLERR) libuv reports UV_EBADF and stops watching;
  // getsockopt(SO_ERROR) tells the real error.
  using Callback = std::function<void(int status, int events)>;

  // On failure an owned fd is closed as well, so the caller never has to.
  static Result<HandlePtr<Poll>> Create(Loop& loop, int fd, FdOwnership ownership);

  int fd() const { return fd_; }
  // Watches `events`; an events mask of 0 stops. The callback is kept until replaced (which
  // may happen from inside the callback itself).
  void Start(int events, Callback cb);
  // Changes the mask, keeping the callback. Cheap when the mask is unchanged.
  void SetEvents(int events);
  int events() const { return events_; }
  void Stop() { SetEvents(0); }
  // Stops watching and gives up ownership: the fd is the caller's from now on.
  // REQUIRES: the fd is owned.
  int ReleaseFd();

 private:
  Poll(Loop& loop, int fd, FdOwnership ownership)
      : HandleBase(loop, reinterpret_cast<uv_handle_t*>(&poll_)),
        fd_(fd),
        owned_(ownership == FdOwnership::kOwned) {}
  void OnClosing() override;
  static void OnPoll(uv_poll_t* p, int status, int events) noexcept;

  uv_poll_t poll_{};
  int fd_;
  bool owned_;
  int events_ = 0;
  Callback cb_;
};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_POLL_H_
