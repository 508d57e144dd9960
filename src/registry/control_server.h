// ControlServer: the control API's transport on a Unix socket.
//
// It frames lines, identifies each client by SO_PEERCRED (the uid is the caller, whatever the
// request says), parses requests with control_protocol.h and passes them to the handler; the
// reply is written back in request order. One request per client is in flight at a time, and
// the next one starts only once the previous reply was handed to the kernel, so a client holds
// at most one reply in the daemon's memory. Reading goes on meanwhile, so a client that goes
// away is noticed at once: its request is cancelled (a `wait` releases its slot) and the client
// is dropped. What it may send ahead while a request is in flight is bounded
// (kMaxRequestBytes + 1: one more full line); more cancels the request and closes the client
// with an error line. A client that only half-closed (shutdown(SHUT_WR), still able to read)
// still gets its reply; until then it is checked every kHangupCheckMs for a full close.
// Malformed or oversized input gets an error reply; an oversized line also closes the client.
// Clients idle (or not reading a reply) for `idle_timeout_ms` are closed.
//
// Admission: a uid may hold `max_clients_per_user` connections at once, so one user cannot take
// every slot; users other than root together may hold `max_clients`. Root's connections do not
// count against `max_clients`: root always has its own `max_clients_per_user` slots, however
// many other users connected. Clients beyond a limit get one error line (ResourceExhausted,
// naming the limit); what they still send is read and dropped until they close, for at most
// kRefuseLingerMs (and for at most kMaxLingering of them at once), so their own send does not
// fail before they can read why.
//
// Ownership: the daemon owns it; `*loop` must outlive it. Reply callbacks handed to the
// handler stay safe to call after the client or the server are gone (they do nothing then).
// Loop-thread only.

#ifndef BROKERPROXY_REGISTRY_CONTROL_SERVER_H_
#define BROKERPROXY_REGISTRY_CONTROL_SERVER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "loop/handle.h"
#include "loop/lifetime.h"
#include "loop/loop.h"
#include "loop/stream.h"
#include "loop/timer.h"
#include "registry/control_protocol.h"

namespace brokerproxy::registry {

class ControlServer {
 public:
  using Reply = std::function<void(std::string line)>;
  // Called at most once, when the client went away before its reply; it must not call the
  // reply. Empty: nothing to cancel.
  using Cancel = std::function<void()>;
  using Handler = std::function<Cancel(Request request, uid_t caller, Reply reply)>;

  struct Options {
    size_t max_clients = 1024;         // connections of users other than root, together
    size_t max_clients_per_user = 64;  // connections of one uid (root included)
    int64_t idle_timeout_ms = 60000;   // a connected client that sends nothing is closed
  };

  // How often a half-closed client with a request in flight is checked for a full close.
  static constexpr int64_t kHangupCheckMs = 1000;
  // How long a client turned away may take to read why before it is closed.
  static constexpr int64_t kRefuseLingerMs = 2000;
  // Refused clients given that time at once; more are closed right after their error line.
  static constexpr size_t kMaxLingering = 64;
  // Refusals are logged once per this interval per uid (and once for the overall limit).
  static constexpr uint64_t kRefusalLogIntervalMs = 60000;

  ControlServer(loop::Loop* loop, Handler handler, Options options);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Binds `path` (mode 0666: any local user may connect; SO_PEERCRED decides what they may
  // do). A stale socket left by a crashed daemon is replaced; a live one is an error.
  Status Listen(const std::string& path);
  // The same on `fd`, a listening socket bound at `path` that this process was handed (an
  // upgrade); owned from here, also on failure.
  Status Adopt(int fd, const std::string& path);
  // Stops taking connections and closes every client, but leaves the socket in place for
  // another process: returns a duplicate of the listening socket (without close-on-exec; the
  // caller owns it), or -1. Close() afterwards no longer removes the path.
  int Release();
  // Stops listening, closes every client and removes the socket file.
  void Close();

  // Admitted clients: all of them, and those of `uid`.
  size_t client_count() const { return admitted_ + root_clients_; }
  size_t client_count(uid_t uid) const;

 private:
  struct Client;
  void OnConnection();
  void OnData(Client* c, std::string_view data);
  void ProcessLines(Client* c);
  // Writes `status` as the client's last reply line and closes it once that is written.
  void FinishWithError(Client* c, const Status& status);
  void OnReply(uint64_t id, std::string line);
  void CloseClient(Client* c);
  void MaybeFinish(Client* c);
  void OnEnd(Client* c, Status end);
  // Closes the client if its peer closed; else checks again every kHangupCheckMs.
  void WatchHangup(Client* c);
  Status StartReading(Client* c);
  // Turns a client away with one error line, before it was admitted.
  void Refuse(Client* c, const Status& why);
  // Rate-limits the log line about refusals of `key` (a uid, or -1 for the overall limit).
  bool ShouldLogRefusal(uid_t key);
  // Cancels the request with the handler, if any; its reply, should it come, is dropped.
  void CancelRequest(Client* c);
  // Removes the client and gives its slot back.
  void Drop(uint64_t id);

  loop::Loop* loop_;
  Handler handler_;
  Options options_;
  std::string path_;
  loop::HandlePtr<loop::Pipe> listener_;
  std::unordered_map<uint64_t, std::unique_ptr<Client>> clients_;
  std::unordered_map<uid_t, size_t> per_uid_;  // admitted clients per uid
  size_t admitted_ = 0;                        // admitted clients of uids other than 0
  size_t root_clients_ = 0;
  size_t lingering_ = 0;
  std::unordered_map<uid_t, uint64_t> last_refusal_log_;  // loop time of the last log line
  uint64_t next_id_ = 1;
  loop::Lifetime lifetime_;  // guards the callbacks handed out; last member: ends first
};

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_CONTROL_SERVER_H_
