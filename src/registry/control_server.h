// ControlServer: the control API's transport on a Unix socket.
//
// It frames lines, identifies each client by SO_PEERCRED (the uid is the caller, whatever the
// request says), parses requests with control_protocol.h and passes them to the handler; the
// reply is written back in request order. One request per client is in flight at a time (the
// client's reads pause meanwhile), so a client cannot make the daemon buffer without bound.
// Malformed or oversized input gets an error reply; an oversized line also closes the client.
// Idle clients are closed after a timeout; beyond `max_clients` new clients are turned away.
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
#include "loop/loop.h"
#include "loop/stream.h"
#include "loop/timer.h"
#include "registry/control_protocol.h"

namespace brokerproxy::registry {

class ControlServer {
 public:
  using Reply = std::function<void(std::string line)>;
  using Handler = std::function<void(Request request, uid_t caller, Reply reply)>;

  struct Options {
    size_t max_clients = 1024;
    int64_t idle_timeout_ms = 60000;  // a connected client that sends nothing is closed
  };

  ControlServer(loop::Loop* loop, Handler handler, Options options);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Binds `path` (mode 0666: any local user may connect; SO_PEERCRED decides what they may
  // do). A stale socket left by a crashed daemon is replaced; a live one is an error.
  Status Listen(const std::string& path);
  // Stops listening, closes every client and removes the socket file.
  void Close();

  size_t client_count() const { return clients_.size(); }

 private:
  struct Client;
  void OnConnection();
  void OnData(Client* c, std::string_view data);
  void ProcessLines(Client* c);
  void OnReply(uint64_t id, std::string line);
  void CloseClient(Client* c);
  void MaybeFinish(Client* c);

  loop::Loop* loop_;
  Handler handler_;
  Options options_;
  std::string path_;
  loop::HandlePtr<loop::Pipe> listener_;
  std::unordered_map<uint64_t, std::unique_ptr<Client>> clients_;
  uint64_t next_id_ = 1;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_CONTROL_SERVER_H_
