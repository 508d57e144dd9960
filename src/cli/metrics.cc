#include "cli/metrics.h"

#include <http_parser.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>
#include <unistd.h>

#include <fcntl.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "loop/log.h"
#include "loop/timer.h"
#include "proxy/server/listener.h"

namespace brokerproxy::cli {
namespace {

using Family = prometheus::MetricFamily;
using Metric = prometheus::ClientMetric;
using Labels = std::vector<Metric::Label>;

// The new family, valid until the next one is added.
Family& AddFamily(std::vector<Family>* out, const char* name, const char* help,
                  prometheus::MetricType type) {
  out->push_back(Family{name, help, type, {}});
  return out->back();
}

void AddValue(Family* f, double value, Labels labels = {}) {
  Metric m;
  m.label = std::move(labels);
  if (f->type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f->metric.push_back(std::move(m));
}

void Counter(std::vector<Family>* out, const char* name, const char* help, uint64_t value) {
  AddValue(&AddFamily(out, name, help, prometheus::MetricType::Counter),
           static_cast<double>(value));
}

void Gauge(std::vector<Family>* out, const char* name, const char* help, double value) {
  AddValue(&AddFamily(out, name, help, prometheus::MetricType::Gauge), value);
}

void AddHistogram(Family* f, const loop::Histogram& h, Labels labels = {}) {
  Metric m;
  m.label = std::move(labels);
  m.histogram.sample_count = h.count();
  m.histogram.sample_sum = h.sum();
  for (size_t i = 0; i < h.bounds().size(); ++i) {
    m.histogram.bucket.push_back({h.CumulativeCount(i), h.bounds()[i]});
  }
  m.histogram.bucket.push_back({h.count(), std::numeric_limits<double>::infinity()});
  f->metric.push_back(std::move(m));
}

Family NewFamily(const char* name, const char* help, prometheus::MetricType type) {
  return Family{name, help, type, {}};
}

void AddJobSeries(const MetricsInput& in, std::vector<Family>* out) {
  using T = prometheus::MetricType;
  // Filled side by side, appended at the end (a reference into `out` would not survive).
  Family sessions = NewFamily("brokerproxy_job_sessions_total",
                              "Sessions of the job that reached its backend.", T::Counter);
  Family active =
      NewFamily("brokerproxy_job_sessions_active", "Sessions of the job open now.", T::Gauge);
  Family refused = NewFamily("brokerproxy_job_refused_total",
                             "Handshakes naming the job that were refused (wrong secret, "
                             "throttled).",
                             T::Counter);
  Family bytes =
      NewFamily("brokerproxy_job_relayed_bytes_total",
                "Bytes relayed for the job, by direction (up: client to backend).", T::Counter);
  Family last = NewFamily("brokerproxy_job_last_active_timestamp_seconds",
                          "When the job last had a session open or bytes moving (unix time; "
                          "never earlier than its save or the daemon's start).",
                          T::Gauge);
  static const proxy::JobCounters kNone;
  for (const MetricsInput::JobRow& row : in.job_rows) {
    const proxy::JobCounters& c = row.counters ? *row.counters : kNone;
    Labels labels = {{"job", row.id}, {"owner", std::to_string(row.owner)}};
    AddValue(&sessions, static_cast<double>(c.connections), labels);
    AddValue(&active, static_cast<double>(c.active), labels);
    AddValue(&refused, static_cast<double>(c.denied), labels);
    Labels up = labels, down = labels;
    up.push_back({"direction", "up"});
    down.push_back({"direction", "down"});
    AddValue(&bytes, static_cast<double>(c.bytes_up), std::move(up));
    AddValue(&bytes, static_cast<double>(c.bytes_down), std::move(down));
    AddValue(&last, static_cast<double>(row.last_active), std::move(labels));
  }
  for (Family* f : {&sessions, &active, &refused, &bytes, &last}) out->push_back(std::move(*f));
  Gauge(out, "brokerproxy_job_series_dropped",
        "Jobs left out of this scrape's per-job series by [metrics] max_job_series.",
        static_cast<double>(in.job_rows_dropped));
}

}  // namespace

std::string RenderMetrics(const MetricsInput& in) {
  using T = prometheus::MetricType;
  std::vector<Family> out;
  AddValue(
      &AddFamily(&out, "brokerproxy_build_info", "The running brokerproxy's version.", T::Gauge), 1,
      {{"version", in.version}});
  Gauge(&out, "brokerproxy_start_time_seconds", "When this daemon process started (unix time).",
        static_cast<double>(in.start_time));
  Gauge(&out, "brokerproxy_registry_jobs", "Jobs in the registry.", static_cast<double>(in.jobs));
  Gauge(&out, "brokerproxy_control_clients", "Connections to the control socket open now.",
        static_cast<double>(in.control_clients));
  if (in.stats) {
    const proxy::GlobalCounters& g = in.stats->global();
    Counter(&out, "brokerproxy_connections_accepted_total",
            "TCP connections accepted on the proxy ports.", g.accepted);
    Gauge(&out, "brokerproxy_connections_active",
          "Connections open now on the proxy ports, in any state.", static_cast<double>(g.active));
    Counter(&out, "brokerproxy_sessions_total",
            "Sessions that reached their backend (a plain or TLS connection, or an SSH channel).",
            g.spliced);
    uint64_t active = 0;
    for (const auto& [id, c] : in.stats->jobs()) active += c.active;
    Gauge(&out, "brokerproxy_sessions_active", "Sessions relaying bytes now.",
          static_cast<double>(active));
    Family& refused = AddFamily(&out, "brokerproxy_connections_refused_total",
                                "Connections turned away, by reason.", T::Counter);
    const std::pair<const char*, uint64_t> reasons[] = {
        {"denied", g.denied},    {"bad_request", g.bad_request},
        {"timeout", g.timeouts}, {"unavailable", g.unavailable},
        {"busy", g.busy},        {"throttled", g.throttled}};
    for (const auto& [reason, n] : reasons) {
      AddValue(&refused, static_cast<double>(n), {{"reason", reason}});
    }
    Counter(&out, "brokerproxy_idle_closed_total",
            "Sessions closed by idle_timeout or half_close_timeout.", g.idle_closed);
    Family& failures = AddFamily(&out, "brokerproxy_handshake_failures_total",
                                 "TLS handshakes and SSH key exchanges or authentications that "
                                 "failed.",
                                 T::Counter);
    AddValue(&failures, static_cast<double>(g.tls_failures), {{"protocol", "tls"}});
    AddValue(&failures, static_cast<double>(g.ssh_failures), {{"protocol", "ssh"}});
    Counter(&out, "brokerproxy_throttle_episodes_total",
            "Times a source or a job id started being throttled for failed handshakes.",
            g.throttled_episodes);
    Family& bytes = AddFamily(&out, "brokerproxy_relayed_bytes_total",
                              "Bytes relayed, by direction (up: client to backend).", T::Counter);
    AddValue(&bytes, static_cast<double>(g.bytes_up), {{"direction", "up"}});
    AddValue(&bytes, static_cast<double>(g.bytes_down), {{"direction", "down"}});
    Family& handshake = AddFamily(&out, "brokerproxy_handshake_duration_seconds",
                                  "From a client's TCP accept until its session's backend was "
                                  "connected (for SSH: each channel's).",
                                  T::Histogram);
    for (proxy::SessionKind kind :
         {proxy::SessionKind::kPlain, proxy::SessionKind::kTls, proxy::SessionKind::kSsh}) {
      AddHistogram(&handshake, in.stats->handshake_seconds(kind),
                   {{"protocol", proxy::SessionKindName(kind)}});
    }
    AddHistogram(&AddFamily(&out, "brokerproxy_session_duration_seconds",
                            "How long sessions relayed, measured when they end.", T::Histogram),
                 in.stats->session_seconds());
  }
  if (in.store_write_seconds) {
    AddHistogram(&AddFamily(&out, "brokerproxy_store_write_duration_seconds",
                            "Making a batch of registry changes durable (registry.json, or Redis).",
                            T::Histogram),
                 *in.store_write_seconds);
    Counter(&out, "brokerproxy_store_write_failures_total",
            "Registry batches that failed (undone, or not confirmed by the replicas).",
            in.store_write_failures);
  }
  if (in.scheduler_call_seconds) {
    AddHistogram(
        &AddFamily(&out, "brokerproxy_scheduler_call_duration_seconds",
                   "One run of the scheduler's listing command (squeue, qstat).", T::Histogram),
        *in.scheduler_call_seconds);
    Counter(&out, "brokerproxy_scheduler_call_failures_total",
            "Scheduler listings that failed or timed out.", in.scheduler_call_failures);
  }
  if (in.per_job) AddJobSeries(in, &out);
  return prometheus::TextSerializer().Serialize(out);
}

// ---- MetricsServer ----

struct MetricsServer::Client {
  MetricsServer* server = nullptr;
  loop::HandlePtr<loop::Tcp> tcp;
  loop::HandlePtr<loop::Timer> timer;
  http_parser parser{};
  std::string url;
  size_t head_bytes = 0;
  size_t headers = 0;
  bool in_field = false;  // the parser is inside a header field's name
  bool complete = false;
  bool answered = false;
  std::list<std::unique_ptr<Client>>::iterator self;
};

namespace {

MetricsServer::Client* ClientOf(http_parser* p) {
  return static_cast<MetricsServer::Client*>(p->data);
}

}  // namespace

// The request is read into the Client: its URL, how many header fields it has, and whether it
// is complete. A callback's non-zero return stops the parser with an error.
const http_parser_settings& MetricsServer::ParserSettings() {
  static const http_parser_settings settings = [] {
    http_parser_settings s;
    http_parser_settings_init(&s);
    s.on_url = [](http_parser* p, const char* at, size_t len) {
      ClientOf(p)->url.append(at, len);
      return 0;
    };
    s.on_header_field = [](http_parser* p, const char*, size_t) {
      Client* c = ClientOf(p);
      if (!c->in_field) ++c->headers;
      c->in_field = true;
      return c->headers > c->server->limits_.max_headers ? 1 : 0;
    };
    s.on_header_value = [](http_parser* p, const char*, size_t) {
      ClientOf(p)->in_field = false;
      return 0;
    };
    s.on_message_complete = [](http_parser* p) {
      ClientOf(p)->complete = true;
      return 1;  // one request per connection: stop here
    };
    return s;
  }();
  return settings;
}

Result<std::unique_ptr<MetricsServer>> MetricsServer::Create(
    loop::Loop* loop, const std::vector<HostPort>& listen,
    std::vector<std::pair<HostPort, int>> inherited, Render render, Limits limits) {
  std::unique_ptr<MetricsServer> server(new MetricsServer(loop, std::move(render), limits));
  Status status;
  for (const HostPort& address : listen) {
    int fd = -1;
    for (auto& [hp, inherited_fd] : inherited) {
      if (hp == address && inherited_fd >= 0) std::swap(fd, inherited_fd);
    }
    if (fd < 0) {
      Result<int> opened = proxy::OpenListeningSocket(address);
      if (!opened.ok()) {
        status = opened.status().WithContext("[metrics] listen");
        break;
      }
      fd = *opened;
    }
    status = server->AddListener(address, fd);
    if (!status.ok()) break;
  }
  for (const auto& [hp, fd] : inherited) {
    if (fd >= 0) ::close(fd);  // no longer configured
  }
  if (!status.ok()) return status;
  return server;
}

MetricsServer::MetricsServer(loop::Loop* loop, Render render, Limits limits)
    : loop_(loop), render_(std::move(render)), limits_(limits) {}

MetricsServer::~MetricsServer() = default;

Status MetricsServer::AddListener(const HostPort& address, int fd) {
  auto tcp = loop::Tcp::Create(*loop_);
  if (!tcp.ok()) {
    ::close(fd);
    return tcp.status();
  }
  if (Status s = (*tcp)->Open(fd); !s.ok()) {
    ::close(fd);  // not the handle's yet
    return s;
  }
  loop::Tcp* raw = tcp->get();
  BP_RETURN_IF_ERROR(raw->Listen(SOMAXCONN, [this, raw](Status s) {
    if (s.ok()) OnConnection(raw);
  }));
  auto name = raw->SockName();
  addresses_.push_back(name.ok() ? loop::FormatAddress(reinterpret_cast<sockaddr*>(&*name))
                                 : address.ToString());
  configured_.push_back(address);
  listeners_.push_back(std::move(tcp).value());
  return Status::OK();
}

std::vector<std::pair<HostPort, int>> MetricsServer::DupListeners() const {
  std::vector<std::pair<HostPort, int>> out;
  for (size_t i = 0; i < listeners_.size(); ++i) {
    int fd = ::fcntl(listeners_[i]->fd(), F_DUPFD_CLOEXEC, 3);
    if (fd >= 0) out.emplace_back(configured_[i], fd);
  }
  return out;
}

void MetricsServer::StopListening() { listeners_.clear(); }

void MetricsServer::OnConnection(loop::Tcp* listener) {
  auto accepted = listener->Accept();
  if (!accepted.ok()) return;
  if (clients_.size() >= limits_.max_clients) return;  // dropping the handle closes it
  auto timer = loop::Timer::Create(*loop_);
  if (!timer.ok()) return;
  auto client = std::make_unique<Client>();
  Client* c = client.get();
  c->server = this;
  c->tcp = std::move(accepted).value();
  c->timer = std::move(timer).value();
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  clients_.push_back(std::move(client));
  c->self = std::prev(clients_.end());
  c->timer->Start(limits_.timeout_ms, [this, c] { Drop(c); });
  c->tcp->SetReadBufferSize(4096);
  Status s = c->tcp->ReadStart([this, c](std::string_view data) { Feed(c, data); },
                               [this, c](Status) {
                                 if (!c->answered) Drop(c);  // gone before asking
                               });
  if (!s.ok()) Drop(c);
}

void MetricsServer::Feed(Client* c, std::string_view data) {
  if (c->answered) return;  // anything after the request is ignored
  c->head_bytes += data.size();
  if (c->head_bytes > limits_.max_head) {
    Answer(c, 431, "Request Header Fields Too Large", "", "request head too large\n", false);
    return;
  }
  http_parser_execute(&c->parser, &ParserSettings(), data.data(), data.size());
  if (c->complete) {
    Respond(c);
  } else if (c->headers > limits_.max_headers) {
    Answer(c, 431, "Request Header Fields Too Large", "", "too many header fields\n", false);
  } else if (HTTP_PARSER_ERRNO(&c->parser) != HPE_OK) {
    Answer(c, 400, "Bad Request", "", "malformed request\n", false);
  }
}

void MetricsServer::Respond(Client* c) {
  http_parser_url u;
  http_parser_url_init(&u);
  std::string_view path;
  if (http_parser_parse_url(c->url.data(), c->url.size(), 0, &u) == 0 &&
      (u.field_set & (1 << UF_PATH))) {
    path = std::string_view(c->url).substr(u.field_data[UF_PATH].off, u.field_data[UF_PATH].len);
  }
  auto method = static_cast<http_method>(c->parser.method);
  if (path != "/metrics") {
    Answer(c, 404, "Not Found", "", "only /metrics is served here\n", method == HTTP_HEAD);
  } else if (method != HTTP_GET && method != HTTP_HEAD) {
    Answer(c, 405, "Method Not Allowed", "Allow: GET, HEAD\r\n", "use GET\n", false);
  } else {
    Answer(c, 200, "OK", "", render_(), method == HTTP_HEAD);
  }
}

void MetricsServer::Answer(Client* c, int status, const char* reason, const char* extra_headers,
                           std::string body, bool head_only) {
  c->answered = true;
  c->tcp->ReadStop();
  std::string response = "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\n";
  response += status == 200 ? "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                            : "Content-Type: text/plain; charset=utf-8\r\n";
  response += extra_headers;
  response += "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
  if (!head_only) response += body;
  Status s = c->tcp->Write(std::move(response), [this, c](Status) {
    Status shut = c->tcp->Shutdown([this, c](Status) { Drop(c); });
    if (!shut.ok()) Drop(c);
  });
  if (!s.ok()) Drop(c);
}

void MetricsServer::Drop(Client* c) { clients_.erase(c->self); }

}  // namespace brokerproxy::cli
