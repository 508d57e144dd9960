// The Prometheus endpoint: `[metrics] listen` serves GET /metrics in the text exposition format
// from the daemon's own event loop.
//
// MetricsServer speaks just enough HTTP/1.1 for a scraper, through libhttp-parser: one request
// per connection, answered with "Connection: close". Whoever can reach the port is a stranger, so
// everything is bounded: a request head of at most 8 KiB and 64 header fields, 16 connections
// at once (more are closed on accept), 10 s from accept to the last byte of the answer, and no
// request body. GET and HEAD of /metrics are answered; another path is 404, another method
// 405. Rendering happens per scrape on the loop: a few dozen families plus the jobs' series.
//
// RenderMetrics turns a MetricsInput (what the daemon's parts count) into the exposition text
// through prometheus-cpp's TextSerializer, which owns the format's escaping and number
// spelling; the counters themselves stay plain integers in the proxy and the registry, so
// counting costs the data path nothing.
//
// Ownership: the daemon owns the server; `*loop` must outlive it. Loop-thread only.

#ifndef BROKERPROXY_CLI_METRICS_H_
#define BROKERPROXY_CLI_METRICS_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/histogram.h"
#include "loop/loop.h"
#include "loop/stream.h"
#include "proxy/server/stats.h"
#include "registry/job.h"

struct http_parser_settings;

namespace brokerproxy::cli {

// What one scrape reports. Pointers are borrowed for the call; null ones are left out.
struct MetricsInput {
  std::string version;
  int64_t start_time = 0;  // unix seconds
  const proxy::Stats* stats = nullptr;
  size_t jobs = 0;
  size_t control_clients = 0;
  const loop::Histogram* store_write_seconds = nullptr;
  uint64_t store_write_failures = 0;
  const loop::Histogram* scheduler_call_seconds = nullptr;
  uint64_t scheduler_call_failures = 0;
  // Per-job series, when [metrics] per_job is on: each job's id, owner and last activity.
  struct JobRow {
    std::string id;
    uid_t owner = 0;
    int64_t last_active = 0;
    const proxy::JobCounters* counters = nullptr;  // null: no session yet
  };
  bool per_job = false;
  std::vector<JobRow> job_rows;  // already capped to max_job_series
  size_t job_rows_dropped = 0;
};

std::string RenderMetrics(const MetricsInput& in);

// What one scrape may take (MetricsServer).
struct MetricsLimits {
  size_t max_head = 8192;
  size_t max_headers = 64;
  size_t max_clients = 16;
  uint64_t timeout_ms = 10000;
};

class MetricsServer {
 public:
  struct Client;

  using Render = std::function<std::string()>;

  using Limits = MetricsLimits;

  // Listens on every address, or adopts `inherited` sockets (fd, address) an old process handed
  // over for the addresses they match. Errors name the address.
  static Result<std::unique_ptr<MetricsServer>> Create(
      loop::Loop* loop, const std::vector<HostPort>& listen,
      std::vector<std::pair<HostPort, int>> inherited, Render render, Limits limits = {});
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // "127.0.0.1:9470", with the real port.
  const std::vector<std::string>& addresses() const { return addresses_; }
  // The configured addresses, in the order of addresses().
  const std::vector<HostPort>& configured() const { return configured_; }
  // Duplicates (close-on-exec) of the listening sockets with their configured addresses, for a
  // new endpoint or, with FD_CLOEXEC cleared, a new process.
  std::vector<std::pair<HostPort, int>> DupListeners() const;
  // Closes the listening sockets; connections being answered finish.
  void StopListening();
  size_t clients() const { return clients_.size(); }

 private:
  MetricsServer(loop::Loop* loop, Render render, Limits limits);
  Status AddListener(const HostPort& address, int fd);
  void OnConnection(loop::Tcp* listener);
  void Feed(Client* c, std::string_view data);
  void Respond(Client* c);
  static const http_parser_settings& ParserSettings();
  void Answer(Client* c, int status, const char* reason, const char* extra_headers,
              std::string body, bool head_only);
  void Drop(Client* c);

  loop::Loop* loop_;
  Render render_;
  Limits limits_;
  std::vector<loop::HandlePtr<loop::Tcp>> listeners_;
  std::vector<std::string> addresses_;
  std::vector<HostPort> configured_;
  std::list<std::unique_ptr<Client>> clients_;
};

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_METRICS_H_
