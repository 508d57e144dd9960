#include "cli/options.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <variant>

namespace brokerproxy::cli {
namespace {

constexpr size_t kMaxLine = 4096;
constexpr size_t kMaxFile = 1 << 20;
constexpr int kDefaultProxyPort = 7000;
constexpr const char* kSystemConfig = "/etc/brokerproxy/config.ini";

// The Config member an option writes. The member's type picks the parser; OptionType only
// refines it (kPath vs kString) and names the value in help texts.
using Field = std::variant<std::string Config::*, int Config::*, int64_t Config::*,
                           LogLevel Config::*, registry::PortRange Config::*, HostPort Config::*,
                           std::vector<HostPort> Config::*, std::vector<std::string> Config::*>;

struct Entry {
  OptionSpec spec;
  Field field;
};

using T = OptionType;
constexpr FlagScope kNo = FlagScope::kNone;

// The single source of truth: config.ini, --set, the dedicated flags, --help and
// config.ini.example all come from here. Default texts must parse to the Config defaults
// (a test checks it).
const std::vector<Entry>& Entries() {
  static const std::vector<Entry> entries = {
      // [broker]
      {{"broker", "state_dir", T::kPath, "",
        "Directory for the daemon's state: registry.json (the saved jobs), the control socket, "
        "the TLS CA and the SSH host key. Empty means the built-in default: /var/lib/brokerproxy "
        "when running as root, else $XDG_STATE_HOME/brokerproxy, else "
        "$HOME/.local/state/brokerproxy, so a single user needs no configuration at all.",
        "--state-dir", FlagScope::kAll},
       &Config::state_dir},
      {{"broker", "control_socket", T::kPath, "",
        "Unix socket on which the daemon takes control requests (save, load, query, ...) from "
        "the other subcommands on this host. Empty means <state_dir>/control.sock. The path "
        "must be shorter than 108 bytes, a limit of Unix sockets. Its directory, like "
        "state_dir, must belong to the daemon's user or root and be writable by no one else; "
        "clients talk only to a daemon running as root or as the owner of that directory.",
        "--socket", FlagScope::kAll},
       &Config::control_socket},
      {{"broker", "log_level", T::kLogLevel, "info",
        "Least severe messages written to stderr: debug, info, warn or error. info logs job "
        "changes and one line per finished connection; debug adds the detail of every "
        "handshake. Secrets are never logged at any level.",
        "--log-level", FlagScope::kAll},
       &Config::log_level},
      {{"broker", "log_format", T::kString, "text",
        "How the daemon writes its log lines: text (\"TIME level message\") or json (one "
        "object per line with time, level, message and a field for every key=value word of "
        "the message, such as a session's job, peer, up, down, duration and reason). Under "
        "systemd (stderr is the journal) lines carry a priority prefix and no timestamp of "
        "their own, since the journal stamps them.",
        "--log-format", FlagScope::kDaemon},
       &Config::log_format},
      {{"broker", "core_dumps", T::kInt, "0",
        "1 lets the daemon dump core (for debugging). By default it does not, and no other "
        "process of its user may attach to it or read its memory: a core or a debugger would "
        "show the CA key and every job's secret.",
        nullptr, kNo, 0, 1},
       &Config::core_dumps},
      {{"broker", "max_control_clients", T::kInt, "1024",
        "Most connections to the control socket that users other than root may hold at once, "
        "all together (1 to 1000000); beyond that they are told the broker is busy. Root's "
        "connections do not count here: root always has max_control_clients_per_user of its "
        "own.",
        nullptr, kNo, 1, 1000000},
       &Config::max_control_clients},
      {{"broker", "max_control_clients_per_user", T::kInt, "64",
        "Most connections to the control socket one user (root included) may hold at once (1 "
        "to 1000000); further ones get an error naming this limit. Keep it well below "
        "max_control_clients, so that one user cannot lock the others out. A client that goes "
        "away gives its connection back at once, even with a `wait` pending.",
        nullptr, kNo, 1, 1000000},
       &Config::max_control_clients_per_user},
      {{"broker", "max_waits_per_user", T::kInt, "32",
        "Most `wait` requests (save --wait, brokerproxy wait) one user may have pending at "
        "once (1 to 1000000); further ones fail at once with an error naming this limit.",
        nullptr, kNo, 1, 1000000},
       &Config::max_waits_per_user},
      // [registry]
      {{"registry", "port_range", T::kPortRange, "28000-28999",
        "Inclusive range of TCP ports (A-B) handed out to jobs saved without --port; the job's "
        "service listens on its port on the compute node. Choose a range no other service on "
        "the compute nodes uses and outside their ephemeral port range "
        "(/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): a port in it can be "
        "held by any outgoing connection, and the service then fails to bind it. Its size caps "
        "how many jobs can hold an allocated port at once.",
        nullptr, kNo},
       &Config::port_range},
      {{"registry", "secret_bits", T::kInt, "256",
        "Length in bits of the random secret generated for each job: a multiple of 8 from 128 "
        "to 4096. 256 bits cannot be guessed; longer secrets only make the preamble longer.",
        nullptr, kNo, 128, 4096, 8},
       &Config::secret_bits},
      {{"registry", "default_ttl", T::kDuration, "0",
        "How long a job stays registered when `save` does not give its own lifetime, e.g. 12h "
        "(units: ms, s, m, h, d; a bare number is seconds). 0 means jobs never expire and stay "
        "until removed, the default, because the broker cannot know a batch job's time limit.",
        nullptr, kNo},
       &Config::default_ttl_ms},
      {{"registry", "ready_timeout", T::kDuration, "2m",
        "How long `save --wait` and exec mode wait for the job's service to start listening "
        "before giving up (exec mode then warns on stderr, and its command keeps running), "
        "and how long the daemon keeps probing a job saved to wait for its "
        "service: after that it stops (the job shows as down in `query`) until someone waits "
        "for the job or saves it again. 0 means without a limit. Two minutes covers services "
        "that are slow to start, such as notebook servers. At most 24h.",
        nullptr, kNo, 0, 86400},
       &Config::ready_timeout_ms},
      {{"registry", "recheck_interval", T::kDuration, "60s",
        "How often the daemon looks again at each ready job: one TCP connection to its backend "
        "per interval, the jobs spread evenly over it so that hundreds of them are not all "
        "dialled at once. A backend that no longer accepts is shown as down in `query` and "
        "probed again until it listens (or for ready_timeout). A connection through the proxy "
        "that the backend refuses does the same at once. 0 turns the periodic look off. At "
        "most 24h.",
        nullptr, kNo, 0, 86400},
       &Config::recheck_interval_ms},
      {{"registry", "max_jobs_per_user", T::kInt, "64",
        "Most jobs one user may hold at once (0 to 1000000; 0 means no limit); saving one more "
        "fails with an error naming the limit until the user removes one (replacing an own "
        "job is always allowed). This also bounds what a user takes of the port range and of "
        "registry.json: one port and one record (about 300 bytes, at most about 9 KiB) per "
        "job. Root is not limited.",
        nullptr, kNo, 0, 1000000},
       &Config::max_jobs_per_user},
      {{"registry", "backend_allow", T::kCidrList, "0.0.0.0/0, ::/0",
        "Networks of other hosts (CIDR, or single addresses) that job backends may be on; "
        "comma-separated, or repeat the key. Checked at save and again before every connection, "
        "on the addresses the backend host resolves to. Set it to the compute nodes' networks. "
        "Backends on the login node itself (loopback or any of its addresses) are not governed "
        "by this list: the broker connects to them only if the socket listening there belongs "
        "to the job's owner (jobs of root are exempt), and never to the proxy's own port. An "
        "empty value admits no other host.",
        nullptr, kNo},
       &Config::backend_allow},
      {{"registry", "store", T::kString, "file",
        "Where the registry is kept: file (registry.json in state_dir, for one login node; the "
        "default) or redis (one registry shared by the daemons of several login nodes, in the "
        "Redis at store_address; see docs/redis.md). With redis, a job saved on any node is "
        "served by every node within 100 ms, and saves and removes fail (exit code 9) while "
        "Redis cannot be reached.",
        nullptr, kNo},
       &Config::store},
      {{"registry", "store_address", T::kString, "",
        "With store = redis, where Redis listens, unix:/path/to/redis.sock or host:port (a host "
        "name "
        "is resolved once, at start-up); or, with store_master_name, the Sentinels as a "
        "comma-separated list of host:port, asked for the master at every (re)connect so that a "
        "failover is followed without a restart.",
        nullptr, kNo},
       &Config::store_address},
      {{"registry", "store_master_name", T::kString, "",
        "With store = redis and Sentinels, the name the Sentinels monitor the master under (their "
        "`sentinel monitor NAME ...`). Empty: store_address is Redis itself.",
        nullptr, kNo},
       &Config::store_master_name},
      {{"registry", "store_password_file", T::kPath, "",
        "With store = redis, a file (readable by root only) whose first line is Redis's password "
        "(requirepass), sent with AUTH. Empty: no password.",
        nullptr, kNo},
       &Config::store_password_file},
      {{"registry", "store_prefix", T::kString, "brokerproxy",
        "With store = redis, the prefix of every key and of the channel the daemons share, so that "
        "several clusters can use one Redis. Every login node of one cluster uses the same "
        "prefix.",
        nullptr, kNo},
       &Config::store_prefix},
      {{"registry", "store_key_file", T::kPath, "",
        "With store = redis, 32 random bytes (head -c 32 /dev/urandom > FILE; chmod 600 FILE), the "
        "same file on every login node. Every record is sealed with it (AES-256-GCM), so "
        "neither Redis nor the network to it sees a secret. Required with store = redis; a "
        "file others may read, or a key other than the one the store was first sealed with, is "
        "a start-up error.",
        nullptr, kNo},
       &Config::store_key_file},
      {{"registry", "store_replicas", T::kInt, "0",
        "With store = redis, a save or remove is acknowledged once this many replicas confirmed it "
        "(Redis WAIT, 2 s at most; 0 to 16). 0 acknowledges when the master has it: with "
        "appendfsync everysec a crash of the master may lose the last second, and a failover "
        "may lose what the replica had not received.",
        nullptr, kNo, 0, 16},
       &Config::store_replicas},
      {{"registry", "store_max_view_age", T::kDuration, "5m",
        "With store = redis, while Redis cannot be reached, handshakes for known jobs go on from "
        "the "
        "last synced view for this long; after that they are refused (and logged) until the "
        "daemon is back in sync. Established sessions are never ended by it. 0: without limit.",
        nullptr, kNo, 0, 86400},
       &Config::store_max_view_age_ms},
      // [proxy]
      {{"proxy", "listen", T::kHostPortList, "127.0.0.1:7000",
        "Addresses of the proxy port, as host:port or [v6addr]:port; comma-separated, or repeat "
        "the key, for several. Port 0 picks a free port (for tests). The default, loopback "
        "only, serves clients that arrive through an SSH tunnel; listen on the login node's "
        "own address, e.g. 0.0.0.0:7000, to accept TLS and SSH clients directly.",
        "--listen", FlagScope::kDaemon},
       &Config::listen},
      {{"proxy", "plain_allow", T::kCidrList, "127.0.0.0/8, ::1",
        "Client networks (CIDR such as 10.0.0.0/8, or single addresses) that may use the plain, "
        "unencrypted preamble; comma-separated, or repeat the key. Everyone else must use TLS "
        "or SSH. The default, loopback only, admits clients that come through an SSH tunnel; "
        "an empty value admits none. IPv4 networks also match IPv4-mapped IPv6 clients.",
        nullptr, kNo},
       &Config::plain_allow},
      {{"proxy", "max_connections", T::kInt, "4096",
        "Most client connections served at once, including those still in their handshake "
        "(1 to 1000000); further clients are turned away. Each SSH channel counts as one "
        "more, since it holds a backend connection. Each connection uses two file "
        "descriptors, so keep this below half of the daemon's open-file limit (ulimit -n).",
        nullptr, kNo, 1, 1000000},
       &Config::max_connections},
      {{"proxy", "handshake_timeout", T::kDuration, "10s",
        "Time a new connection has to pick its protocol, send its preamble and finish TLS or "
        "SSH authentication before it is closed. 0 means no limit, which lets silent clients "
        "hold connection slots; 10s is ample even on slow links.",
        nullptr, kNo},
       &Config::handshake_timeout_ms},
      {{"proxy", "connect_timeout", T::kDuration, "10s",
        "Time allowed to connect to a job's service on the compute node before the client is "
        "told it is unavailable. 0 means no limit beyond the operating system's own.",
        nullptr, kNo},
       &Config::connect_timeout_ms},
      {{"proxy", "idle_timeout", T::kDuration, "0",
        "Close a connection after this long without data in either direction. 0 means never, "
        "the default, because notebooks and VNC sessions sit idle for hours; keepalive still "
        "detects peers that are gone.",
        nullptr, kNo},
       &Config::idle_timeout_ms},
      {{"proxy", "half_close_timeout", T::kDuration, "5m",
        "Once one direction of a connection (or of a channel of the SSH endpoint) has ended "
        "(its sender shut down writing), how long the other direction may stay silent before "
        "the connection is closed. 0 means wait without a limit.",
        nullptr, kNo},
       &Config::half_close_timeout_ms},
      {{"proxy", "keepalive", T::kDuration, "1m",
        "TCP keepalive idle time on client and backend connections, in whole seconds: the "
        "kernel probes a peer that has been silent this long, so dead peers are found even "
        "when idle_timeout is 0; the probes' interval and count stay the kernel's "
        "(net.ipv4.tcp_keepalive_intvl and tcp_keepalive_probes). Not on a backend at a "
        "loopback address: the kernel answers the probes there for any process, so they would "
        "find nothing. 0 turns keepalive off; at most 32767s (the kernel's limit).",
        nullptr, kNo, 0, 32767},
       &Config::keepalive_ms},
      {{"proxy", "throttle_failures", T::kInt, "10",
        "Failed handshakes (unknown job, wrong secret, malformed preamble, handshake timeout) "
        "allowed from one source within throttle_window, and wrong secrets for one job; "
        "beyond that the source (or job) is throttled until the window has passed: its "
        "failures are answered busy and logged once as \"throttling <HOST>: N failed "
        "handshakes within W\" (for a remote address; \"throttling local user <uid>:\" or "
        "\"throttling job <id>:\" otherwise). A correct secret is always admitted. Loopback "
        "clients are told apart by the uid owning their socket. 0 turns throttling off.",
        nullptr, kNo, 0, 1000000},
       &Config::throttle_failures},
      {{"proxy", "throttle_window", T::kDuration, "1m",
        "Length of the window in which throttle_failures are counted. 0 turns throttling off.",
        nullptr, kNo},
       &Config::throttle_window_ms},
      {{"proxy", "max_handshakes_per_source", T::kInt, "64",
        "Most connections one source may have in their handshake (not yet authenticated) at "
        "once; further ones are turned away with ERR busy. A source is a remote address, or "
        "for loopback clients (everyone behind ssh -L) the uid owning the client socket, so "
        "one local user cannot crowd out the others. 0 means no limit.",
        nullptr, kNo, 0, 1000000},
       &Config::max_handshakes_per_source},
      {{"proxy", "handshake_share", T::kInt, "50",
        "Percentage of max_connections that connections still in their handshake may take "
        "together (1 to 100); past it, a new connection closes the oldest handshake still in "
        "progress, so clients who know a secret always find room.",
        nullptr, kNo, 1, 100},
       &Config::handshake_share},
      // [tls]
      {{"tls", "tls_domain", T::kString, "localhost",
        "Domain of the TLS server names: a client reaches job J with SNI J.<tls_domain>, and "
        "the certificates the broker issues are for names under it. Set it to a domain whose "
        "names resolve to the login node, e.g. broker.example.org.",
        nullptr, kNo},
       &Config::tls_domain},
      {{"tls", "ca_cert", T::kPath, "",
        "CA bundle (PEM): first the current CA, with which the broker issues certificates to "
        "ssl jobs and to its own TLS endpoint, then older CAs not yet expired; clients verify "
        "against it. Made on first start, and kept up to date by the daemon (a CA without name "
        "constraints is replaced). Empty means <state_dir>/ca.pem.",
        nullptr, kNo},
       &Config::ca_cert},
      {{"tls", "ca_key", T::kPath, "",
        "Private key of the current CA (PEM); only the daemon's user may read it. Empty means "
        "<state_dir>/ca-key.pem.",
        nullptr, kNo},
       &Config::ca_key},
      {{"tls", "cert_days", T::kInt, "365",
        "Validity in days of the certificates the broker issues (1 to 397). The broker's CA "
        "lives 730 days and is replaced by a new one once it has less than cert_days + 30 days "
        "left; the old one stays in the `ca` bundle until it expires.",
        nullptr, kNo, 1, 397},
       &Config::cert_days},
      // [ssh]
      {{"ssh", "host_key", T::kPath, "",
        "Private host key (ed25519) of the embedded SSH endpoint, generated on first run. "
        "Clients remember it like any SSH host key, so keep it across restarts. Empty means "
        "<state_dir>/ssh_host_ed25519_key.",
        nullptr, kNo},
       &Config::host_key},
      {{"ssh", "banner_delay", T::kDuration, "300ms",
        "A client on the proxy port that has sent nothing this long after connecting is taken "
        "for an SSH client waiting for the server to speak first (ssh-keyscan, some libraries) "
        "and gets the endpoint's banner. Plain and TLS clients always speak first, so they are "
        "not delayed. 0 turns it off: such clients then wait until handshake_timeout.",
        nullptr, kNo},
       &Config::banner_delay_ms},
      // [scheduler]
      {{"scheduler", "type", T::kString, "none",
        "The batch scheduler whose jobs registrations are bound to: none, slurm or pbs. With "
        "slurm or pbs the daemon (never the client, whose environment its user controls) asks "
        "the scheduler at every save: the job must exist, run, belong to the caller (root may "
        "save for any job) and have the backend host among its nodes; the entry is saved under "
        "the scheduler's own id of the job (an array task as A_T) and ends with the job. If the "
        "scheduler cannot be asked, saves fail; existing entries and connections keep working. "
        "none, the default, binds nothing: any user may save any job id that is free.",
        nullptr, kNo},
       &Config::scheduler_type},
      {{"scheduler", "reconcile_interval", T::kDuration, "30s",
        "How often the daemon lists the scheduler's jobs and removes the entries whose job has "
        "ended (COMPLETING counts as ended), was never a job, or belongs to another user, each "
        "logged with the reason; it also moves expiries to the jobs' current end times. A "
        "listing that fails removes nothing. 1s to 1d.",
        nullptr, kNo, 0, 86400},
       &Config::reconcile_interval_ms},
      {{"scheduler", "end_grace", T::kDuration, "5m",
        "An entry saved under a scheduler expires this long after its job's time limit (an "
        "explicit shorter --ttl stays shorter), a bound for when the reconciler cannot ask the "
        "scheduler. At most 1d.",
        nullptr, kNo, 0, 86400},
       &Config::end_grace_ms},
      {{"scheduler", "admin_uids", T::kString, "",
        "Users besides root who may run `brokerproxy epilog JOB`, which removes every entry of a "
        "job whoever saved it (for Slurm's Epilog or EpilogSlurmctld, PBS's epilogue): uids or "
        "user names, comma-separated; names are resolved when the daemon starts. Empty: root "
        "only.",
        nullptr, kNo},
       &Config::admin_uids},
      {{"scheduler", "call_timeout", T::kDuration, "10s",
        "How long one call of the scheduler's command (squeue, sinfo, qstat) may take before it "
        "is killed and the save that waits for it fails. 1s to 10m.",
        nullptr, kNo, 0, 600},
       &Config::scheduler_call_timeout_ms},
      {{"scheduler", "cache", T::kDuration, "2s",
        "How old a listing of the scheduler's jobs a save accepts, so that a burst of saves "
        "costs one call. A job that ended within this time may still be saved; the reconciler "
        "removes it. At most 1m.",
        nullptr, kNo, 0, 60},
       &Config::scheduler_cache_ms},
      {{"scheduler", "squeue", T::kString, "squeue",
        "Slurm's squeue command (searched in PATH), e.g. an absolute path or a site wrapper.",
        nullptr, kNo},
       &Config::squeue},
      {{"scheduler", "sinfo", T::kString, "sinfo",
        "Slurm's sinfo command (searched in PATH), which names the nodes of the jobs.", nullptr,
        kNo},
       &Config::sinfo},
      {{"scheduler", "qstat", T::kString, "qstat",
        "PBS's qstat command (searched in PATH), e.g. an absolute path or a site wrapper.", nullptr,
        kNo},
       &Config::qstat},
      // [metrics]
      {{"metrics", "listen", T::kHostPortList, "",
        "Addresses of the Prometheus metrics endpoint (GET /metrics, text exposition format), "
        "served by the daemon's event loop: host:port, [v6addr]:port, or a bare port for "
        "127.0.0.1. Empty (the default) serves no metrics. Anyone who can reach it reads "
        "the counters without authenticating: keep it on loopback or a monitoring network.",
        nullptr, kNo},
       &Config::metrics_listen},
      {{"metrics", "per_job", T::kInt, "0",
        "1 adds series per job (sessions, bytes, refusals, last activity), labelled with the "
        "job id and its owner's uid. Off by default: whoever can scrape the endpoint "
        "then sees every user's job ids and when they were used. A removed job's series "
        "disappear from the next scrape.",
        nullptr, kNo, 0, 1},
       &Config::metrics_per_job},
      {{"metrics", "max_job_series", T::kInt, "1000",
        "Most jobs a scrape describes with per_job (1 to 100000), the most recently active "
        "first; brokerproxy_job_series_dropped says how many were left out.",
        nullptr, kNo, 1, 100000},
       &Config::metrics_max_job_series},
      // [client]
      {{"client", "broker", T::kString, "",
        "Login host where the daemon runs, as [user@]host[:port]; client commands started "
        "elsewhere reach it over SSH (ssh-agent or ~/.ssh identities, ~/.ssh/known_hosts, "
        "~/.ssh/config aliases) and run remote_command there. Empty means the daemon on this "
        "host, through control_socket.",
        "--via", FlagScope::kClient},
       &Config::broker},
      {{"client", "proxy", T::kHostPort, "127.0.0.1:7000",
        "The proxy port as clients reach it: host:port, or [v6addr]:port; a bare host means "
        "port 7000. Through --via or broker it is reached from the login node, and `connect` "
        "dials the address the login node's daemon reports instead, unless --proxy is given.",
        "--proxy", FlagScope::kClient},
       &Config::proxy},
      {{"client", "remote_command", T::kString, "brokerproxy",
        "Command run on the login node over SSH for --via or broker; give an absolute path if "
        "brokerproxy is not on the remote PATH.",
        nullptr, kNo},
       &Config::remote_command},
  };
  return entries;
}

bool IsList(OptionType type) { return type == T::kHostPortList || type == T::kCidrList; }

std::string_view Trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

std::string Quote(std::string_view s) {
  constexpr size_t kMax = 80;
  if (s.size() > kMax) return "'" + std::string(s.substr(0, kMax)) + "...'";
  return "'" + std::string(s) + "'";
}

// Index of the entry for section/key, or -1.
int Find(std::string_view section, std::string_view key) {
  const auto& entries = Entries();
  for (size_t i = 0; i < entries.size(); ++i) {
    if (section == entries[i].spec.section && key == entries[i].spec.key) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

std::vector<std::string_view> Sections() {
  std::vector<std::string_view> out;
  for (const Entry& e : Entries()) {
    if (out.empty() || out.back() != e.spec.section) out.push_back(e.spec.section);
  }
  return out;
}

// "unknown key", with a hint: where the key does belong, or the keys this section has.
std::string UnknownKey(std::string_view section, std::string_view key) {
  std::string msg = "unknown key";
  for (const Entry& e : Entries()) {
    if (key == e.spec.key) return msg + "; it belongs in [" + e.spec.section + "]";
  }
  std::string known;
  for (const Entry& e : Entries()) {
    if (section == e.spec.section) known += (known.empty() ? "" : ", ") + std::string(e.spec.key);
  }
  return msg + " (known: " + known + ")";
}

std::string UnknownSection(std::string_view section) {
  std::string msg = "unknown section [" + std::string(section) + "] (known:";
  for (std::string_view s : Sections()) msg += " [" + std::string(s) + "]";
  return msg + ")";
}

Status Bad(std::string msg) { return Status::InvalidArgument(msg); }

Status ParseInt(const OptionSpec& spec, std::string_view v, int* out) {
  long long n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec == std::errc::invalid_argument || end != v.data() + v.size()) {
    return Bad(Quote(v) + " is not an integer");
  }
  if (ec == std::errc::result_out_of_range || n < spec.min || n > spec.max) {
    return Bad(Quote(v) + " is out of range (" + std::to_string(spec.min) + " to " +
               std::to_string(spec.max) + ")");
  }
  if (spec.multiple > 1 && n % spec.multiple != 0) {
    return Bad(Quote(v) + " is not a multiple of " + std::to_string(spec.multiple));
  }
  *out = static_cast<int>(n);
  return Status::OK();
}

// "A-B" with 1 <= A <= B <= 65535, blanks around the numbers allowed. Parsed here rather than
// through registry::PortRange::Parse so the message fits the option layer's format.
Status ParsePortRange(std::string_view v, registry::PortRange* out) {
  size_t dash = v.find('-');
  int bound[2] = {0, 0};
  std::string_view part[2] = {Trim(v.substr(0, dash)),
                              dash == std::string_view::npos ? "" : Trim(v.substr(dash + 1))};
  for (int i = 0; i < 2; ++i) {
    auto [end, ec] = std::from_chars(part[i].data(), part[i].data() + part[i].size(), bound[i]);
    if (part[i].empty() || part[i][0] == '-' || ec != std::errc() ||
        end != part[i].data() + part[i].size()) {
      return Bad(Quote(v) + " is not a port range A-B (e.g. 28000-28999)");
    }
  }
  if (bound[0] < 1 || bound[1] > 65535 || bound[0] > bound[1]) {
    return Bad(Quote(v) + " is not a port range A-B with 1 <= A <= B <= 65535");
  }
  *out = registry::PortRange{bound[0], bound[1]};
  return Status::OK();
}

// Writes `value` into the member `entry` names. For list keys, `append` adds to the list
// instead of replacing it. On error `*config` is unchanged and the message says what is
// wrong with the value (the caller adds where it came from).
Status Assign(const Entry& entry, std::string_view value, bool append, Config* config) {
  const OptionSpec& spec = entry.spec;
  for (char c : value) {
    if ((static_cast<unsigned char>(c) < 0x20 && c != '\t') || c == 0x7f) {
      return Bad("the value contains a control character");
    }
  }
  return std::visit(
      [&](auto member) -> Status {
        auto& field = config->*member;
        using M = std::decay_t<decltype(field)>;
        if constexpr (std::is_same_v<M, std::string>) {
          // Empty means "the built-in default" only where the default is empty.
          if (value.empty() && *spec.default_text != '\0') return Bad("must not be empty");
          if (spec.type == T::kPath && value.starts_with("~")) {
            return Bad(Quote(value) + ": '~' is not expanded; write the full path");
          }
          field = std::string(value);
        } else if constexpr (std::is_same_v<M, int>) {
          return ParseInt(spec, value, &field);
        } else if constexpr (std::is_same_v<M, int64_t>) {
          Result<int64_t> ms = ParseDuration(value);
          if (!ms.ok()) return ms.status();
          if (spec.max > 0 && *ms > int64_t{spec.max} * 1000) {
            return Bad(Quote(value) + " is longer than the maximum of " +
                       FormatDuration(int64_t{spec.max} * 1000));
          }
          field = *ms;
        } else if constexpr (std::is_same_v<M, LogLevel>) {
          std::optional<LogLevel> level = ParseLogLevel(value);
          if (!level) return Bad(Quote(value) + " is not a log level (debug, info, warn, error)");
          field = *level;
        } else if constexpr (std::is_same_v<M, registry::PortRange>) {
          return ParsePortRange(value, &field);
        } else if constexpr (std::is_same_v<M, HostPort>) {
          Result<HostPort> hp = ParseHostPort(value, kDefaultProxyPort);
          if (!hp.ok()) return hp.status();
          field = *hp;
        } else {  // the lists
          Result<std::vector<std::string>> items = SplitList(value);
          if (!items.ok()) return items.status();
          M parsed;
          for (const std::string& item : *items) {
            if constexpr (std::is_same_v<M, std::vector<HostPort>>) {
              // A bare port listens on loopback.
              bool bare = item.find_first_not_of("0123456789") == std::string::npos;
              Result<HostPort> hp = ParseHostPort(bare ? "127.0.0.1:" + item : item, {}, "",
                                                  /*allow_zero=*/true);
              if (!hp.ok()) return hp.status();
              parsed.push_back(*hp);
            } else {
              Result<Cidr> net = Cidr::Parse(item);
              if (!net.ok()) return net.status();
              parsed.push_back(item);
            }
          }
          // A list that is empty by default may be emptied again (turned off).
          if (spec.type == T::kHostPortList && parsed.empty() && *spec.default_text != '\0') {
            return Bad("needs at least one address");
          }
          if (!append) field.clear();
          field.insert(field.end(), parsed.begin(), parsed.end());
        }
        return Status::OK();
      },
      entry.field);
}

// "[section] key: <message>", the common tail of value errors.
std::string KeyContext(const OptionSpec& spec) {
  return "[" + std::string(spec.section) + "] " + spec.key;
}

// An INI value: blanks trimmed already; "..." keeps what is inside the quotes verbatim.
bool Unquote(std::string_view* v) {
  if (v->empty() || v->front() != '"') return true;
  if (v->size() < 2 || v->back() != '"') return false;
  *v = v->substr(1, v->size() - 2);
  return true;
}

// Applies one "section.key=value". `seen` (one flag per entry) makes repeated list keys
// accumulate; without it every assignment replaces.
Status ApplyAssignment(std::string_view assignment, std::vector<bool>* seen, Config* config) {
  size_t eq = assignment.find('=');
  std::string_view name = Trim(assignment.substr(0, eq));
  size_t dot = name.find('.');
  if (eq == std::string_view::npos || dot == std::string_view::npos) {
    return Bad("--set " + Quote(assignment) + ": expected SECTION.KEY=VALUE");
  }
  std::string_view section = name.substr(0, dot), key = name.substr(dot + 1);
  int index = Find(section, key);
  if (index < 0) {
    bool known_section = false;
    for (std::string_view s : Sections()) known_section |= s == section;
    if (!known_section) return Bad("--set: " + UnknownSection(section));
    return Bad("--set: [" + std::string(section) + "] " + std::string(key) + ": " +
               UnknownKey(section, key));
  }
  const Entry& entry = Entries()[index];
  std::string_view value = Trim(assignment.substr(eq + 1));
  if (!Unquote(&value)) {
    return Bad("--set: " + KeyContext(entry.spec) + ": unbalanced double quote");
  }
  bool append = seen != nullptr && (*seen)[index] && IsList(entry.spec.type);
  Status s = Assign(entry, value, append, config);
  if (!s.ok()) return Bad("--set: " + KeyContext(entry.spec) + ": " + s.message());
  if (seen != nullptr) (*seen)[index] = true;
  return Status::OK();
}

std::string DefaultStateDir() {
  if (geteuid() == 0) return "/var/lib/brokerproxy";
  const char* xdg = std::getenv("XDG_STATE_HOME");
  if (xdg != nullptr && xdg[0] == '/')
    return std::string(xdg) + "/brokerproxy";  // XDG: absolute only
  std::string home;
  if (const char* h = std::getenv("HOME"); h != nullptr && h[0] != '\0') {
    home = h;
  } else {
    // No $HOME (cron, some service managers): ask the password database.
    passwd pw;
    passwd* found = nullptr;
    char buf[4096];
    if (getpwuid_r(geteuid(), &pw, buf, sizeof(buf), &found) == 0 && found != nullptr) {
      home = found->pw_dir;
    }
  }
  return home + "/.local/state/brokerproxy";
}

// Word-wraps `text` into "# " comment lines of at most `width` columns.
void AppendComment(std::string_view text, size_t width, std::string* out) {
  std::string line = "#";
  while (!text.empty()) {
    size_t space = text.find(' ');
    std::string_view word = text.substr(0, space);
    text = space == std::string_view::npos ? "" : text.substr(space + 1);
    if (word.empty()) continue;
    if (line.size() > 1 && line.size() + 1 + word.size() > width) {
      *out += line + "\n";
      line = "#";
    }
    line += " ";
    line += word;
  }
  *out += line + "\n";
}

}  // namespace

const char* ScopeText(FlagScope scope) {
  switch (scope) {
    case FlagScope::kDaemon:
      return "run";
    case FlagScope::kClient:
      return "client commands";
    case FlagScope::kAll:
      return "every command";
    case FlagScope::kNone:
      break;
  }
  return "";
}

namespace {

const char* TypeName(OptionType type) {
  switch (type) {
    case T::kString:
      return "TEXT";
    case T::kPath:
      return "PATH";
    case T::kInt:
      return "INT";
    case T::kDuration:
      return "DURATION";
    case T::kPortRange:
      return "FIRST-LAST";
    case T::kHostPort:
    case T::kHostPortList:
      return "HOST:PORT";
    case T::kCidrList:
      return "CIDR";
    case T::kLogLevel:
      return "LEVEL";
  }
  return "VALUE";
}

}  // namespace

const std::vector<OptionSpec>& OptionTable() {
  static const std::vector<OptionSpec> table = [] {
    std::vector<OptionSpec> specs;
    for (const Entry& e : Entries()) specs.push_back(e.spec);
    return specs;
  }();
  return table;
}

Config DefaultConfig() {
  Config config;
  config.state_dir = DefaultStateDir();
  return config;
}

Status ParseConfigText(std::string_view text, const std::string& name, Config* config) {
  if (text.size() > kMaxFile) return Bad(name + ": larger than 1 MiB");
  if (text.starts_with("\xEF\xBB\xBF")) text.remove_prefix(3);  // a UTF-8 byte order mark
  // Work on a copy so a file with an error leaves *config as it was.
  Config result = *config;
  std::vector<int> first_line(Entries().size(), 0);
  std::string section;
  int line_no = 0;
  auto line_error = [&](const std::string& what) {
    return Bad(name + ":" + std::to_string(line_no) + ": " + what);
  };
  while (!text.empty()) {
    ++line_no;
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? "" : text.substr(nl + 1);
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (line.size() > kMaxLine) {
      return line_error("line is longer than " + std::to_string(kMaxLine) + " bytes");
    }
    for (char c : line) {
      if ((static_cast<unsigned char>(c) < 0x20 && c != '\t') || c == 0x7f) {
        return line_error("line contains a control character");
      }
    }
    line = Trim(line);
    if (line.empty() || line.front() == '#' || line.front() == ';') continue;
    if (line.front() == '[') {
      if (line.back() != ']') return line_error("expected ']' at the end of a section header");
      std::string_view s = Trim(line.substr(1, line.size() - 2));
      bool known = false;
      for (std::string_view k : Sections()) known |= k == s;
      if (!known) return line_error(UnknownSection(s));
      section = std::string(s);
      continue;
    }
    size_t eq = line.find('=');
    if (eq == std::string_view::npos) {
      return line_error("expected 'key = value', '[section]' or a comment");
    }
    std::string_view key = Trim(line.substr(0, eq));
    std::string_view value = Trim(line.substr(eq + 1));
    if (key.empty()) return line_error("missing key before '='");
    if (section.empty()) {
      return line_error("key " + Quote(key) + " appears before any [section] header");
    }
    auto key_error = [&](std::string_view what) {
      return line_error("[" + section + "] " + std::string(key) + ": " + std::string(what));
    };
    int index = Find(section, key);
    if (index < 0) return key_error(UnknownKey(section, key));
    const Entry& entry = Entries()[index];
    bool list = IsList(entry.spec.type);
    if (first_line[index] != 0 && !list) {
      return key_error("duplicate key (first set on line " + std::to_string(first_line[index]) +
                       ")");
    }
    if (!Unquote(&value)) return key_error("unbalanced double quote");
    // The first occurrence of a list key replaces the default list, later ones add to it.
    Status s = Assign(entry, value, /*append=*/first_line[index] != 0, &result);
    if (!s.ok()) return key_error(s.message());
    if (first_line[index] == 0) first_line[index] = line_no;
  }
  *config = std::move(result);
  return Status::OK();
}

Status LoadConfigFile(const std::string& path, Config* config) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return PosixError(path, errno);
  std::string text;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return PosixError(path, err);
    }
    if (n == 0) break;
    text.append(buf, n);
    if (text.size() > kMaxFile) {
      ::close(fd);
      return Bad(path + ": larger than 1 MiB");
    }
  }
  ::close(fd);
  return ParseConfigText(text, path, config);
}

Status ApplyOverride(std::string_view assignment, Config* config) {
  return ApplyAssignment(assignment, nullptr, config);
}

void Finalize(Config* config) {
  if (config->state_dir.empty()) config->state_dir = DefaultStateDir();
  std::string dir = config->state_dir;
  if (!dir.ends_with('/')) dir += '/';
  auto derive = [&](std::string* path, const char* file) {
    if (path->empty()) *path = dir + file;
  };
  derive(&config->control_socket, "control.sock");
  derive(&config->ca_cert, "ca.pem");
  derive(&config->ca_key, "ca-key.pem");
  derive(&config->host_key, "ssh_host_ed25519_key");
}

void ConfigFlags::AddTo(CLI::App* app, FlagScope scope) {
  // Capacity for every option, so the pointers CLI11 keeps into flags_ stay valid when AddTo
  // runs for several subcommands (each option gets at most one slot, shared between them).
  flags_.reserve(OptionTable().size());
  try {
    app->add_option("-c,--config", config_path_,
                    "Configuration file (default: $BROKERPROXY_CONFIG, else " +
                        std::string(kSystemConfig) + " if it exists)")
        ->type_name("FILE");
    app->add_option("--set", sets_,
                    "Override one option of the configuration file; repeatable, e.g. --set "
                    "proxy.max_connections=100")
        ->type_name("SECTION.KEY=VALUE")
        ->allow_extra_args(false);
    for (const OptionSpec& spec : OptionTable()) {
      if (spec.flag == nullptr) continue;
      if (spec.scope != FlagScope::kAll && (spec.scope != scope || scope == FlagScope::kNone)) {
        continue;
      }
      FlagValue* slot = nullptr;
      for (FlagValue& f : flags_) {
        if (f.spec == &spec) slot = &f;
      }
      if (slot == nullptr) slot = &flags_.emplace_back(FlagValue{&spec, {}});
      // --help gets the first sentence; config.ini.example has the whole text.
      std::string_view help = spec.help;
      help = help.substr(0, help.find(". ") + 1);
      CLI::Option* opt =
          app->add_option(spec.flag, slot->values,
                          std::string(help) + " Config: [" + spec.section + "] " + spec.key + ".");
      opt->type_name(TypeName(spec.type))->allow_extra_args(false);
      if (!IsList(spec.type))
        opt->expected(1)->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    }
  } catch (const CLI::Error& e) {
    // Only a name clash between our flags and the caller's can get here: a programming error.
    std::fprintf(stderr, "brokerproxy: internal error adding options: %s\n", e.what());
    std::abort();
  }
}

Result<Config> ConfigFlags::Resolve() const {
  Config config = DefaultConfig();
  std::string path = config_path_;
  if (path.empty()) {
    const char* env = std::getenv("BROKERPROXY_CONFIG");
    if (env != nullptr && env[0] != '\0') {
      path = env;
    } else if (struct stat st; ::stat(kSystemConfig, &st) == 0) {
      path = kSystemConfig;
    }
  }
  if (!path.empty()) {
    BP_RETURN_IF_ERROR(LoadConfigFile(path, &config));
    config.source = path;
  }
  std::vector<bool> seen(Entries().size(), false);
  for (const std::string& set : sets_) BP_RETURN_IF_ERROR(ApplyAssignment(set, &seen, &config));
  for (const FlagValue& flag : flags_) {
    if (flag.values.empty()) continue;
    const Entry& entry = Entries()[flag.spec - OptionTable().data()];
    // A list flag collects every occurrence; any other flag takes the last one.
    bool list = IsList(flag.spec->type);
    size_t first = list ? 0 : flag.values.size() - 1;
    for (size_t i = first; i < flag.values.size(); ++i) {
      Status s = Assign(entry, flag.values[i], /*append=*/i > first, &config);
      if (!s.ok()) return Bad(std::string(flag.spec->flag) + ": " + s.message());
    }
  }
  Finalize(&config);
  return config;
}

std::string GenerateExampleConfig() {
  constexpr size_t kWidth = 90;
  std::string out;
  AppendComment(
      "brokerproxy configuration. This file is generated from the option table in "
      "src/cli/options.cc; every option is shown commented out with its built-in default, so "
      "uncomment only what you change.",
      kWidth, &out);
  out += "#\n";
  AppendComment(
      "Precedence, lowest first: built-in defaults; this file (-c FILE, else "
      "$BROKERPROXY_CONFIG, else /etc/brokerproxy/config.ini if it exists); --set "
      "section.key=value on the command line; dedicated flags such as `run --listen`.",
      kWidth, &out);
  out += "#\n";
  AppendComment(
      "Syntax: [section] headers, key = value lines, and comment lines that start with # or "
      "semicolon; a # after a value is part of the value. Double quotes keep blanks around a "
      "value. "
      "Durations take a unit: 250ms, 30s, 5m, 2h, 1d; a bare number means seconds. List "
      "options take comma-separated values and may be repeated; the first occurrence replaces "
      "the default list.",
      kWidth, &out);
  std::string_view section;
  for (const OptionSpec& spec : OptionTable()) {
    if (section != spec.section) {
      section = spec.section;
      out += "\n[" + std::string(section) + "]\n";
    }
    out += "\n";
    AppendComment(spec.help, kWidth, &out);
    if (spec.flag != nullptr) {
      out += "# flag: " + std::string(spec.flag) + " (" + ScopeText(spec.scope) + ")\n";
    }
    std::string def = spec.default_text;
    out += "# default: " + (def.empty() ? std::string("(empty)") : def) + "\n";
    out += "# " + std::string(spec.key) + " =" + (def.empty() ? "" : " " + def) + "\n";
  }
  return out;
}

std::vector<const OptionSpec*> ChangedOptions(const Config& a, const Config& b) {
  std::vector<const OptionSpec*> out;
  for (size_t i = 0; i < Entries().size(); ++i) {
    bool differs =
        std::visit([&](auto member) { return !(a.*member == b.*member); }, Entries()[i].field);
    if (differs) out.push_back(&OptionTable()[i]);
  }
  return out;
}

void CopyOption(const OptionSpec& spec, const Config& from, Config* to) {
  size_t i = static_cast<size_t>(&spec - OptionTable().data());
  if (i >= Entries().size()) return;
  std::visit([&](auto member) { to->*member = from.*member; }, Entries()[i].field);
}

}  // namespace brokerproxy::cli
