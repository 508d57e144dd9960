// The configuration: one option table drives config.ini, the command-line overrides, the
// help text and config.ini.example, so they never drift apart.
//
// Precedence, lowest first: built-in defaults (which work for a single user with no file at
// all), then the file (-c FILE, else $BROKERPROXY_CONFIG, else /etc/brokerproxy/config.ini if it
// exists), then command-line flags (`--set section.key=value`, and the per-option flags the
// table names, e.g. `run --listen`).
//
// Errors name the file, the line and the key: "/etc/brokerproxy/config.ini:12: [proxy]
// max_connections: 'many' is not an integer".

#ifndef BROKERPROXY_CLI_OPTIONS_H_
#define BROKERPROXY_CLI_OPTIONS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/address.h"
#include "loop/log.h"
#include "loop/status.h"
#include "registry/registry.h"

namespace CLI {
class App;
}

namespace brokerproxy::cli {

struct Config {
  // [broker]
  std::string state_dir;       // default: /var/lib/brokerproxy (root), else
                               // ${XDG_STATE_HOME:-~/.local/state}/brokerproxy
  std::string control_socket;  // default: <state_dir>/control.sock
  LogLevel log_level = LogLevel::kInfo;
  std::string log_format = "text";
  int core_dumps = 0;                     // 1: leave the process dumpable (debugging)
  int max_control_clients = 1024;         // control connections of non-root users, together
  int max_control_clients_per_user = 64;  // control connections of one uid
  int max_waits_per_user = 32;            // pending `wait` requests of one uid

  // [registry]
  registry::PortRange port_range;       // 28000-28999
  int secret_bits = 256;                // 128..4096, multiple of 8
  int64_t default_ttl_ms = 0;           // 0: jobs do not expire
  int64_t ready_timeout_ms = 120000;    // how long `save --wait` and exec mode wait for a listener
                                        // and the daemon probes for one
  int64_t recheck_interval_ms = 60000;  // each ready job's backend is dialled once per this; 0: off
  int max_jobs_per_user = 64;           // jobs one uid other than root may hold; 0: no limit
  std::vector<std::string> backend_allow{"0.0.0.0/0", "::/0"};  // each a valid Cidr
  std::string store = "file";                                   // file | redis (docs/redis.md)
  std::string store_address;        // redis: unix:PATH, host:port, or Sentinels' host:port,...
  std::string store_master_name;    // redis: non-empty: store_address lists Sentinels
  std::string store_password_file;  // redis: AUTH password (first line); empty: none
  std::string store_prefix = "brokerproxy";  // redis: key prefix (one per cluster)
  std::string store_key_file;                // redis: 32-byte sealing key, mode 0600
  int store_replicas = 0;                    // redis: WAIT for this many replicas; 0: off
  int64_t store_max_view_age_ms = 300000;    // redis: serve an unsynced view this long

  // [proxy]
  std::vector<HostPort> listen{{"127.0.0.1", 7000}};
  std::vector<std::string> plain_allow{"127.0.0.0/8", "::1"};  // each a valid Cidr
  int max_connections = 4096;
  int64_t handshake_timeout_ms = 10000;
  int64_t connect_timeout_ms = 10000;
  int64_t idle_timeout_ms = 0;  // 0: off (notebooks and VNC sit idle for hours)
  int64_t half_close_timeout_ms = 300000;
  int64_t keepalive_ms = 60000;  // TCP keepalive idle time; 0: off
  int throttle_failures = 10;    // failed handshakes per window before throttling
  int64_t throttle_window_ms = 60000;
  int max_handshakes_per_source = 64;  // unauthenticated handshakes per source at once
  int handshake_share = 50;            // percent of max_connections for handshakes

  // [tls]
  std::string tls_domain = "localhost";  // SNI <job_id>.<tls_domain>
  std::string ca_cert;                   // default: <state_dir>/ca.pem
  std::string ca_key;                    // default: <state_dir>/ca-key.pem
  int cert_days = 365;

  // [ssh]
  std::string host_key;           // default: <state_dir>/ssh_host_ed25519_key
  int64_t banner_delay_ms = 300;  // silence after which a client is taken for SSH; 0: never

  // [scheduler]
  std::string scheduler_type = "none";        // none | slurm | pbs
  int64_t reconcile_interval_ms = 30000;      // how often entries are checked against jobs
  int64_t end_grace_ms = 300000;              // entries outlive their job's end by this
  std::string admin_uids;                     // uids or user names that may run `epilog`
  int64_t scheduler_call_timeout_ms = 10000;  // one squeue/sinfo/qstat run
  int64_t scheduler_cache_ms = 2000;          // the listing age a save accepts
  std::string squeue = "squeue";
  std::string sinfo = "sinfo";
  std::string qstat = "qstat";

  // [metrics]
  std::vector<HostPort> metrics_listen;  // empty: no metrics endpoint
  int metrics_per_job = 0;               // 1: series per job, labelled with its id and owner
  int metrics_max_job_series = 1000;     // jobs exposed per scrape, most recently active first

  // [client]
  std::string broker;                 // login host for --via; empty: the local daemon
  HostPort proxy{"127.0.0.1", 7000};  // the proxy port as the client reaches it
  std::string remote_command = "brokerproxy";

  // Where the values came from, for messages ("built-in defaults" or the file path).
  std::string source = "built-in defaults";

  bool operator==(const Config&) const = default;
};

enum class OptionType {
  kString,
  kPath,
  kInt,
  kDuration,
  kPortRange,
  kHostPort,
  kHostPortList,
  kCidrList,
  kLogLevel,
};

// Which subcommands get a dedicated flag for an option (all of them accept --set).
enum class FlagScope { kNone, kDaemon, kClient, kAll };

struct OptionSpec {
  const char* section;
  const char* key;
  OptionType type;
  const char* default_text;  // as shown in config.ini.example
  const char* help;          // one or more sentences for the example file and --help
  const char* flag;          // e.g. "--listen", or nullptr
  FlagScope scope;
  int min = 0;       // kInt bounds
  int max = 0;       // kInt; kDuration: in seconds, if not 0 (every duration is capped anyway)
  int multiple = 1;  // kInt: the value must be a multiple of this (secret_bits: 8)
};

// The table, in the order of config.ini.example.
const std::vector<OptionSpec>& OptionTable();

// Defaults for this user (state_dir depends on the uid and the environment); derived paths
// (control_socket, ca_cert, ...) are left empty until Finalize().
Config DefaultConfig();

// Parses INI text on top of `*config`. `name` is used in error messages. Unknown sections and
// keys, duplicate keys (except list keys, which accumulate), malformed lines and bad values are
// errors naming `name`, the line and the key.
Status ParseConfigText(std::string_view text, const std::string& name, Config* config);
// Reads and parses a file (at most 1 MiB).
Status LoadConfigFile(const std::string& path, Config* config);
// Applies "section.key=value" (as given to --set).
Status ApplyOverride(std::string_view assignment, Config* config);
// Fills the derived paths from state_dir.
void Finalize(Config* config);

// Flags shared by every subcommand: -c/--config, --set, and the table's flags for `scope`.
// Parse with CLI11, then call Resolve().
class ConfigFlags {
 public:
  void AddTo(CLI::App* app, FlagScope scope);
  // Defaults -> file -> flags -> Finalize().
  Result<Config> Resolve() const;

 private:
  struct FlagValue {
    const OptionSpec* spec;
    std::vector<std::string> values;
  };
  std::string config_path_;
  std::vector<std::string> sets_;
  std::vector<FlagValue> flags_;  // reserved up front: CLI11 keeps pointers into it
};

// The text of config.ini.example: every option, commented out, with its default and meaning.
std::string GenerateExampleConfig();

// The options whose values differ between `a` and `b`, in the table's order.
std::vector<const OptionSpec*> ChangedOptions(const Config& a, const Config& b);
// Sets the option `spec` (an element of OptionTable()) of `*to` to its value in `from`.
void CopyOption(const OptionSpec& spec, const Config& from, Config* to);

// Which commands take an option's dedicated flag, in words ("run", "every command", ...).
const char* ScopeText(FlagScope scope);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_OPTIONS_H_
