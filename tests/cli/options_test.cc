#include "cli/options.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

namespace brokerproxy::cli {
namespace {

namespace fs = std::filesystem;

void ExpectSameConfig(const Config& a, const Config& b) {
  EXPECT_EQ(a.state_dir, b.state_dir);
  EXPECT_EQ(a.control_socket, b.control_socket);
  EXPECT_EQ(a.log_level, b.log_level);
  EXPECT_EQ(a.port_range, b.port_range);
  EXPECT_EQ(a.secret_bits, b.secret_bits);
  EXPECT_EQ(a.default_ttl_ms, b.default_ttl_ms);
  EXPECT_EQ(a.ready_timeout_ms, b.ready_timeout_ms);
  EXPECT_EQ(a.recheck_interval_ms, b.recheck_interval_ms);
  EXPECT_EQ(a.listen, b.listen);
  EXPECT_EQ(a.plain_allow, b.plain_allow);
  EXPECT_EQ(a.max_connections, b.max_connections);
  EXPECT_EQ(a.handshake_timeout_ms, b.handshake_timeout_ms);
  EXPECT_EQ(a.connect_timeout_ms, b.connect_timeout_ms);
  EXPECT_EQ(a.idle_timeout_ms, b.idle_timeout_ms);
  EXPECT_EQ(a.half_close_timeout_ms, b.half_close_timeout_ms);
  EXPECT_EQ(a.keepalive_ms, b.keepalive_ms);
  EXPECT_EQ(a.throttle_failures, b.throttle_failures);
  EXPECT_EQ(a.throttle_window_ms, b.throttle_window_ms);
  EXPECT_EQ(a.tls_domain, b.tls_domain);
  EXPECT_EQ(a.ca_cert, b.ca_cert);
  EXPECT_EQ(a.ca_key, b.ca_key);
  EXPECT_EQ(a.cert_days, b.cert_days);
  EXPECT_EQ(a.host_key, b.host_key);
  EXPECT_EQ(a.banner_delay_ms, b.banner_delay_ms);
  EXPECT_EQ(a.broker, b.broker);
  EXPECT_EQ(a.proxy, b.proxy);
  EXPECT_EQ(a.remote_command, b.remote_command);
  EXPECT_EQ(a.metrics_listen, b.metrics_listen);
  EXPECT_EQ(a.metrics_per_job, b.metrics_per_job);
  EXPECT_EQ(a.metrics_max_job_series, b.metrics_max_job_series);
}

// Parses `text` on top of the defaults; returns the error message, "" on success.
std::string ParseError(const std::string& text, Config* out = nullptr) {
  Config config = DefaultConfig();
  Status s = ParseConfigText(text, "test.ini", &config);
  if (out != nullptr) *out = config;
  return s.ok() ? "" : s.message();
}

// ---- The table ----

TEST(OptionTableTest, HasEveryConfigFieldWithTheDesignNames) {
  std::vector<std::string> names;
  for (const OptionSpec& spec : OptionTable()) {
    names.push_back(std::string(spec.section) + "." + spec.key);
  }
  std::vector<std::string> expected = {"broker.state_dir",
                                       "broker.control_socket",
                                       "broker.log_level",
                                       "broker.log_format",
                                       "broker.core_dumps",
                                       "broker.max_control_clients",
                                       "broker.max_control_clients_per_user",
                                       "broker.max_waits_per_user",
                                       "registry.port_range",
                                       "registry.secret_bits",
                                       "registry.default_ttl",
                                       "registry.ready_timeout",
                                       "registry.recheck_interval",
                                       "registry.max_jobs_per_user",
                                       "registry.backend_allow",
                                       "registry.store",
                                       "registry.store_address",
                                       "registry.store_master_name",
                                       "registry.store_password_file",
                                       "registry.store_prefix",
                                       "registry.store_key_file",
                                       "registry.store_replicas",
                                       "registry.store_max_view_age",
                                       "proxy.listen",
                                       "proxy.plain_allow",
                                       "proxy.max_connections",
                                       "proxy.handshake_timeout",
                                       "proxy.connect_timeout",
                                       "proxy.idle_timeout",
                                       "proxy.half_close_timeout",
                                       "proxy.keepalive",
                                       "proxy.throttle_failures",
                                       "proxy.throttle_window",
                                       "proxy.max_handshakes_per_source",
                                       "proxy.handshake_share",
                                       "tls.tls_domain",
                                       "tls.ca_cert",
                                       "tls.ca_key",
                                       "tls.cert_days",
                                       "ssh.host_key",
                                       "ssh.banner_delay",
                                       "scheduler.type",
                                       "scheduler.reconcile_interval",
                                       "scheduler.end_grace",
                                       "scheduler.admin_uids",
                                       "scheduler.call_timeout",
                                       "scheduler.cache",
                                       "scheduler.squeue",
                                       "scheduler.sinfo",
                                       "scheduler.qstat",
                                       "metrics.listen",
                                       "metrics.per_job",
                                       "metrics.max_job_series",
                                       "client.broker",
                                       "client.proxy",
                                       "client.remote_command"};
  EXPECT_EQ(names, expected);
}

TEST(OptionTableTest, EntriesAreWellFormed) {
  std::set<std::string> flags;
  for (const OptionSpec& spec : OptionTable()) {
    SCOPED_TRACE(spec.key);
    EXPECT_GT(std::string_view(spec.help).size(), 40u) << "help should explain the option";
    EXPECT_TRUE(std::string_view(spec.help).ends_with(".")) << spec.help;
    if (spec.type == OptionType::kInt) {
      EXPECT_LT(spec.min, spec.max);
    }
    if (spec.flag != nullptr) {
      EXPECT_NE(spec.scope, FlagScope::kNone);
      EXPECT_TRUE(flags.insert(spec.flag).second) << "duplicate flag " << spec.flag;
    } else {
      EXPECT_EQ(spec.scope, FlagScope::kNone);
    }
  }
  auto find = [](std::string_view key) -> const OptionSpec* {
    for (const OptionSpec& spec : OptionTable()) {
      if (key == spec.key) return &spec;
    }
    return nullptr;
  };
  struct {
    const char* key;
    const char* flag;
    FlagScope scope;
  } want[] = {{"listen", "--listen", FlagScope::kDaemon},
              {"state_dir", "--state-dir", FlagScope::kAll},
              {"control_socket", "--socket", FlagScope::kAll},
              {"log_level", "--log-level", FlagScope::kAll},
              {"proxy", "--proxy", FlagScope::kClient},
              {"broker", "--via", FlagScope::kClient}};
  for (const auto& w : want) {
    const OptionSpec* spec = find(w.key);
    ASSERT_NE(spec, nullptr) << w.key;
    ASSERT_NE(spec->flag, nullptr) << w.key;
    EXPECT_STREQ(spec->flag, w.flag);
    EXPECT_EQ(spec->scope, w.scope);
  }
  EXPECT_EQ(find("secret_bits")->min, 128);
  EXPECT_EQ(find("secret_bits")->max, 4096);
  EXPECT_EQ(find("secret_bits")->multiple, 8);
  EXPECT_EQ(find("max_connections")->min, 1);
  EXPECT_EQ(find("max_connections")->max, 1000000);
  EXPECT_EQ(find("cert_days")->min, 1);
  EXPECT_EQ(find("cert_days")->max, 397);
}

// Every default text, written out as a value, gives exactly the built-in default.
TEST(OptionTableTest, DefaultTextsMatchTheDefaults) {
  std::string text;
  std::string section;
  for (const OptionSpec& spec : OptionTable()) {
    if (section != spec.section) text += "[" + (section = spec.section) + "]\n";
    text += std::string(spec.key) + " = " + spec.default_text + "\n";
  }
  Config config;
  ASSERT_EQ(ParseError(text, &config), "");
  Config expected = DefaultConfig();
  Finalize(&config);  // "state_dir =" (empty) is the built-in default once finalized
  Finalize(&expected);
  ExpectSameConfig(config, expected);
}

// ---- Defaults and Finalize ----

// Sets an environment variable for the rest of the scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(DefaultConfigTest, StateDirDependsOnUidAndEnvironment) {
  if (geteuid() == 0) {
    EXPECT_EQ(DefaultConfig().state_dir, "/var/lib/brokerproxy");
  } else {
    ScopedEnv home("HOME", "/home/tester");
    {
      ScopedEnv xdg("XDG_STATE_HOME", "/xdg/state");
      EXPECT_EQ(DefaultConfig().state_dir, "/xdg/state/brokerproxy");
    }
    {
      ScopedEnv xdg("XDG_STATE_HOME", "relative/is/ignored");
      EXPECT_EQ(DefaultConfig().state_dir, "/home/tester/.local/state/brokerproxy");
    }
    ScopedEnv xdg("XDG_STATE_HOME", nullptr);
    EXPECT_EQ(DefaultConfig().state_dir, "/home/tester/.local/state/brokerproxy");
  }
  Config config = DefaultConfig();
  EXPECT_EQ(config.control_socket, "");  // derived paths wait for Finalize
  EXPECT_EQ(config.source, "built-in defaults");
  EXPECT_EQ(config.listen, (std::vector<HostPort>{{"127.0.0.1", 7000}}));
}

TEST(FinalizeTest, DerivesEmptyPathsFromStateDir) {
  Config config = DefaultConfig();
  config.state_dir = "/srv/bp/";
  config.ca_key = "/keys/ca-key.pem";
  Finalize(&config);
  EXPECT_EQ(config.control_socket, "/srv/bp/control.sock");
  EXPECT_EQ(config.ca_cert, "/srv/bp/ca.pem");
  EXPECT_EQ(config.ca_key, "/keys/ca-key.pem");  // set explicitly: kept
  EXPECT_EQ(config.host_key, "/srv/bp/ssh_host_ed25519_key");

  Config empty = DefaultConfig();
  empty.state_dir = "";  // "state_dir =" in a file: back to the built-in default
  Finalize(&empty);
  EXPECT_EQ(empty.state_dir, DefaultConfig().state_dir);
  EXPECT_EQ(empty.control_socket, DefaultConfig().state_dir + "/control.sock");
}

// ---- ParseConfigText ----

TEST(ParseConfigTest, EverySection) {
  const char* text = R"([broker]
state_dir = /srv/bp
control_socket = /run/bp.sock
log_level = debug

[registry]
port_range = 50000-50099
secret_bits = 512
default_ttl = 12h
ready_timeout = 30s

[proxy]
listen = 0.0.0.0:7000, [::]:7000
plain_allow = 10.0.0.0/8
max_connections = 100
handshake_timeout = 5s
connect_timeout = 3s
idle_timeout = 1d
half_close_timeout = 0
keepalive = 30
throttle_failures = 0
throttle_window = 5m

[tls]
tls_domain = broker.example.org
ca_cert = /etc/bp/ca.pem
ca_key = /etc/bp/ca-key.pem
cert_days = 30

[ssh]
host_key = /etc/bp/host_key

[client]
broker = alice@login1:2222
proxy = login1
remote_command = /opt/bp/bin/brokerproxy
)";
  Config c;
  ASSERT_EQ(ParseError(text, &c), "");
  EXPECT_EQ(c.state_dir, "/srv/bp");
  EXPECT_EQ(c.control_socket, "/run/bp.sock");
  EXPECT_EQ(c.log_level, LogLevel::kDebug);
  EXPECT_EQ(c.port_range, (registry::PortRange{50000, 50099}));
  EXPECT_EQ(c.secret_bits, 512);
  EXPECT_EQ(c.default_ttl_ms, 12 * 3600 * 1000);
  EXPECT_EQ(c.ready_timeout_ms, 30000);
  EXPECT_EQ(c.listen, (std::vector<HostPort>{{"0.0.0.0", 7000}, {"::", 7000}}));
  EXPECT_EQ(c.plain_allow, std::vector<std::string>{"10.0.0.0/8"});
  EXPECT_EQ(c.max_connections, 100);
  EXPECT_EQ(c.handshake_timeout_ms, 5000);
  EXPECT_EQ(c.connect_timeout_ms, 3000);
  EXPECT_EQ(c.idle_timeout_ms, 86400000);
  EXPECT_EQ(c.half_close_timeout_ms, 0);
  EXPECT_EQ(c.keepalive_ms, 30000);
  EXPECT_EQ(c.throttle_failures, 0);
  EXPECT_EQ(c.throttle_window_ms, 300000);
  EXPECT_EQ(c.tls_domain, "broker.example.org");
  EXPECT_EQ(c.ca_cert, "/etc/bp/ca.pem");
  EXPECT_EQ(c.ca_key, "/etc/bp/ca-key.pem");
  EXPECT_EQ(c.cert_days, 30);
  EXPECT_EQ(c.host_key, "/etc/bp/host_key");
  EXPECT_EQ(c.broker, "alice@login1:2222");
  EXPECT_EQ(c.proxy, (HostPort{"login1", 7000}));
  EXPECT_EQ(c.remote_command, "/opt/bp/bin/brokerproxy");
}

TEST(ParseConfigTest, CommentsBlanksQuotesAndWhitespace) {
  const char* text =
      "# a comment\n"
      "; another comment\n"
      "\n"
      "   \t\n"
      "  [ tls ]  \n"
      "\t# indented comment\n"
      "  tls_domain\t=   bp.example.org   \r\n"
      "[client]\n"
      "remote_command = \"  spaced # not a comment  \"\n"
      "broker = \"\"\n"
      "proxy=[::1]:7100\n"
      "[tls]\n"  // a section may be reopened
      "cert_days = \"90\"\n";
  Config c;
  ASSERT_EQ(ParseError(text, &c), "");
  EXPECT_EQ(c.tls_domain, "bp.example.org");
  EXPECT_EQ(c.remote_command, "  spaced # not a comment  ");
  EXPECT_EQ(c.broker, "");
  EXPECT_EQ(c.proxy, (HostPort{"::1", 7100}));
  EXPECT_EQ(c.cert_days, 90);
}

TEST(ParseConfigTest, EmptyTextChangesNothing) {
  Config c;
  ASSERT_EQ(ParseError("", &c), "");
  ExpectSameConfig(c, DefaultConfig());
  ASSERT_EQ(ParseError("\n\n# nothing\n[proxy]\n", &c), "");
  ExpectSameConfig(c, DefaultConfig());
  // A UTF-8 byte order mark, as some editors write, is skipped.
  ASSERT_EQ(ParseError("\xEF\xBB\xBF[proxy]\nmax_connections = 5\n", &c), "");
  EXPECT_EQ(c.max_connections, 5);
}

struct BadConfig {
  const char* text;
  const char* message;  // the whole expected message
};

// The row's name, for CTest: the expected message without "test.ini:N: ", as [A-Za-z0-9_].
void PrintTo(const BadConfig& c, std::ostream* os) {
  std::string_view m = c.message;
  m.remove_prefix(std::min(m.size(), m.find(": ") + 2));
  for (char ch : m.substr(0, 48)) *os << (std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_');
}

class ParseConfigErrorTest : public testing::TestWithParam<BadConfig> {};

TEST_P(ParseConfigErrorTest, NamesFileLineAndKey) {
  Config before = DefaultConfig();
  before.max_connections = 77;
  Config config = before;
  Status s = ParseConfigText(GetParam().text, "test.ini", &config);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(s.message(), GetParam().message);
  ExpectSameConfig(config, before);  // an error leaves the config untouched
}

INSTANTIATE_TEST_SUITE_P(
    Table, ParseConfigErrorTest,
    testing::Values(
        // Structure.
        BadConfig{"[proxy]\nmax_connections = 5\nbogus = 1\n",
                  "test.ini:3: [proxy] bogus: unknown key (known: listen, plain_allow, "
                  "max_connections, handshake_timeout, connect_timeout, idle_timeout, "
                  "half_close_timeout, keepalive, throttle_failures, throttle_window, "
                  "max_handshakes_per_source, handshake_share)"},
        BadConfig{"[proxy]\nsecret_bits = 256\n",
                  "test.ini:2: [proxy] secret_bits: unknown key; it belongs in [registry]"},
        BadConfig{"[proxy]\nmax_connections = 1\n[daemon]\n",
                  "test.ini:3: unknown section [daemon] (known: [broker] [registry] [proxy] "
                  "[tls] [ssh] [scheduler] [metrics] [client])"},
        BadConfig{"# header\nlisten = 127.0.0.1:1\n",
                  "test.ini:2: key 'listen' appears before any [section] header"},
        BadConfig{"[proxy]\nlisten 127.0.0.1:1\n",
                  "test.ini:2: expected 'key = value', '[section]' or a comment"},
        BadConfig{"[proxy\n", "test.ini:1: expected ']' at the end of a section header"},
        BadConfig{"[proxy]\n = 5\n", "test.ini:2: missing key before '='"},
        BadConfig{"[proxy]\nmax_connections = 5\n\nmax_connections = 6\n",
                  "test.ini:4: [proxy] max_connections: duplicate key (first set on line 2)"},
        BadConfig{"[tls]\ntls_domain = \"example.org\n",
                  "test.ini:2: [tls] tls_domain: unbalanced double quote"},
        BadConfig{"[tls]\ntls_domain = a\001b\n", "test.ini:2: line contains a control character"},
        // Integers and their bounds.
        BadConfig{"[proxy]\nmax_connections = many\n",
                  "test.ini:2: [proxy] max_connections: 'many' is not an integer"},
        BadConfig{"[proxy]\nmax_connections = 10 # ten\n",
                  "test.ini:2: [proxy] max_connections: '10 # ten' is not an integer"},
        BadConfig{"[proxy]\nmax_connections =\n",
                  "test.ini:2: [proxy] max_connections: '' is not an integer"},
        BadConfig{"[proxy]\nmax_connections = 0\n",
                  "test.ini:2: [proxy] max_connections: '0' is out of range (1 to 1000000)"},
        BadConfig{"[proxy]\nmax_connections = 99999999999999999999\n",
                  "test.ini:2: [proxy] max_connections: '99999999999999999999' is out of "
                  "range (1 to 1000000)"},
        BadConfig{"[registry]\nsecret_bits = 64\n",
                  "test.ini:2: [registry] secret_bits: '64' is out of range (128 to 4096)"},
        BadConfig{"[registry]\nsecret_bits = -256\n",
                  "test.ini:2: [registry] secret_bits: '-256' is out of range (128 to 4096)"},
        BadConfig{"[registry]\nsecret_bits = 260\n",
                  "test.ini:2: [registry] secret_bits: '260' is not a multiple of 8"},
        BadConfig{"[tls]\ncert_days = 398\n",
                  "test.ini:2: [tls] cert_days: '398' is out of range (1 to 397)"},
        BadConfig{"[tls]\ncert_days = 1.5\n",
                  "test.ini:2: [tls] cert_days: '1.5' is not an integer"},
        // Durations.
        BadConfig{"[proxy]\nhandshake_timeout = 10 sec\n",
                  "test.ini:2: [proxy] handshake_timeout: '10 sec' is not a duration (a whole "
                  "number with unit ms, s, m, h or d, e.g. 30s)"},
        BadConfig{"[registry]\ndefault_ttl = -1\n",
                  "test.ini:2: [registry] default_ttl: '-1' is not a duration (a whole number "
                  "with unit ms, s, m, h or d, e.g. 30s)"},
        BadConfig{"[proxy]\nidle_timeout = 999999999999999d\n",
                  "test.ini:2: [proxy] idle_timeout: '999999999999999d' is too long a duration (at "
                  "most 3650d)"},
        // Port ranges.
        BadConfig{"[registry]\nport_range = 42000-41000\n",
                  "test.ini:2: [registry] port_range: '42000-41000' is not a port range A-B "
                  "with 1 <= A <= B <= 65535"},
        BadConfig{"[registry]\nport_range = 0-100\n",
                  "test.ini:2: [registry] port_range: '0-100' is not a port range A-B with 1 "
                  "<= A <= B <= 65535"},
        BadConfig{"[registry]\nport_range = 1-65536\n",
                  "test.ini:2: [registry] port_range: '1-65536' is not a port range A-B with 1 "
                  "<= A <= B <= 65535"},
        BadConfig{"[registry]\nport_range = 41000\n",
                  "test.ini:2: [registry] port_range: '41000' is not a port range A-B (e.g. "
                  "28000-28999)"},
        BadConfig{"[registry]\nport_range = 1--5\n",
                  "test.ini:2: [registry] port_range: '1--5' is not a port range A-B (e.g. "
                  "28000-28999)"},
        // Addresses.
        BadConfig{"[proxy]\nlisten = 127.0.0.1\n",
                  "test.ini:2: [proxy] listen: '127.0.0.1': missing port; expected host:port"},
        BadConfig{"[proxy]\nlisten = 127.0.0.1:7000, ::1:7000\n",
                  "test.ini:2: [proxy] listen: '::1:7000': an IPv6 address needs brackets, "
                  "e.g. [::1]:7000"},
        BadConfig{"[proxy]\nlisten =\n", "test.ini:2: [proxy] listen: needs at least one address"},
        BadConfig{"[proxy]\nlisten = a:1,,b:2\n",
                  "test.ini:2: [proxy] listen: empty item in list 'a:1,,b:2'"},
        BadConfig{"[client]\nproxy = login1:http\n",
                  "test.ini:2: [client] proxy: 'login1:http': port 'http' is not a number from "
                  "1 to 65535"},
        BadConfig{"[client]\nproxy = login1:0\n",
                  "test.ini:2: [client] proxy: 'login1:0': port 0 is not allowed here"},
        BadConfig{"[proxy]\nplain_allow = 127.0.0.0/8, 10.0.0.0/33\n",
                  "test.ini:2: [proxy] plain_allow: '10.0.0.0/33': prefix length '33' is not a "
                  "number from 0 to 32"},
        BadConfig{"[proxy]\nplain_allow = 10.0.0.1/8\n",
                  "test.ini:2: [proxy] plain_allow: '10.0.0.1/8': host bits are set below the "
                  "/8 prefix; did you mean 10.0.0.0/8?"},
        // Log level and strings.
        BadConfig{"[broker]\nlog_level = loud\n",
                  "test.ini:2: [broker] log_level: 'loud' is not a log level (debug, info, "
                  "warn, error)"},
        BadConfig{"[tls]\ntls_domain =\n", "test.ini:2: [tls] tls_domain: must not be empty"},
        BadConfig{"[broker]\nstate_dir = ~/bp\n",
                  "test.ini:2: [broker] state_dir: '~/bp': '~' is not expanded; write the full "
                  "path"}));

TEST(ParseConfigTest, LongLinesAndFilesAreRefused) {
  std::string line(4096, '#');
  EXPECT_EQ(ParseError("[proxy]\n" + line + "\n"), "");
  EXPECT_EQ(ParseError("[proxy]\n" + line + "#\n"), "test.ini:2: line is longer than 4096 bytes");
  EXPECT_EQ(ParseError("[tls]\ntls_domain = " + std::string(5000, 'a')),
            "test.ini:2: line is longer than 4096 bytes");
  std::string big;
  while (big.size() <= (1 << 20)) big += "# filler filler filler filler filler filler\n";
  EXPECT_EQ(ParseError(big), "test.ini: larger than 1 MiB");
}

TEST(ParseConfigTest, ListKeysAccumulateAndReplaceTheDefault) {
  Config c;
  ASSERT_EQ(ParseError("[proxy]\n"
                       "listen = 10.0.0.1:7000\n"
                       "plain_allow = 192.168.0.0/16\n"
                       "listen = [::]:0, 0.0.0.0:0\n"
                       "plain_allow = ::1, 127.0.0.1\n",
                       &c),
            "");
  EXPECT_EQ(c.listen, (std::vector<HostPort>{{"10.0.0.1", 7000}, {"::", 0}, {"0.0.0.0", 0}}));
  EXPECT_EQ(c.plain_allow, (std::vector<std::string>{"192.168.0.0/16", "::1", "127.0.0.1"}));

  // An empty plain_allow admits nobody.
  ASSERT_EQ(ParseError("[proxy]\nplain_allow =\n", &c), "");
  EXPECT_TRUE(c.plain_allow.empty());

  // A second file replaces the first file's list again.
  ASSERT_EQ(ParseError("[proxy]\nlisten = 10.0.0.1:1\n", &c), "");
  ASSERT_TRUE(ParseConfigText("[proxy]\nlisten = 10.0.0.2:2\n", "second.ini", &c).ok());
  EXPECT_EQ(c.listen, (std::vector<HostPort>{{"10.0.0.2", 2}}));
}

TEST(ParseConfigTest, ABarePortListensOnLoopbackAndMetricsMayBeOff) {
  Config c;
  ASSERT_EQ(ParseError("[metrics]\nlisten = 9470, [::1]:9471\nper_job = 1\n", &c), "");
  EXPECT_EQ(c.metrics_listen, (std::vector<HostPort>{{"127.0.0.1", 9470}, {"::1", 9471}}));
  EXPECT_EQ(c.metrics_per_job, 1);
  // A list that is empty by default may be emptied again; the proxy's may not.
  ASSERT_EQ(ParseError("[metrics]\nlisten =\n", &c), "");
  EXPECT_TRUE(c.metrics_listen.empty());
  EXPECT_NE(ParseError("[proxy]\nlisten =\n", &c), "");
  EXPECT_NE(ParseError("[metrics]\nper_job = 2\n", &c), "");
  EXPECT_NE(ParseError("[metrics]\nmax_job_series = 0\n", &c), "");
}

// ---- Files, overrides, flags ----

class ConfigFileTest : public testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = testing::TempDir() + "bpoptXXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::string& text) {
    std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }

  // Builds a CLI11 app with subcommands run (daemon) and connect (client), parses `args`
  // after "brokerproxy", and resolves the flags of the subcommand that ran.
  Result<Config> ParseArgs(std::vector<std::string> args) {
    CLI::App app{"brokerproxy"};
    CLI::App* run = app.add_subcommand("run");
    CLI::App* connect = app.add_subcommand("connect");
    ConfigFlags run_flags, connect_flags;
    run_flags.AddTo(run, FlagScope::kDaemon);
    connect_flags.AddTo(connect, FlagScope::kClient);
    args.insert(args.begin(), "brokerproxy");
    std::vector<const char*> argv;
    for (const std::string& a : args) argv.push_back(a.c_str());
    try {
      app.parse(static_cast<int>(argv.size()), argv.data());
    } catch (const CLI::ParseError& e) {
      return Status::InvalidArgument(std::string("CLI11: ") + e.what());
    }
    return run->parsed() ? run_flags.Resolve() : connect_flags.Resolve();
  }

  std::string dir_;
  ScopedEnv no_env_{"BROKERPROXY_CONFIG", nullptr};  // tests set it when they need it
};

TEST_F(ConfigFileTest, LoadsAFile) {
  std::string path = Write("a.ini", "[proxy]\nmax_connections = 12\n");
  Config c = DefaultConfig();
  ASSERT_TRUE(LoadConfigFile(path, &c).ok());
  EXPECT_EQ(c.max_connections, 12);
}

TEST_F(ConfigFileTest, ErrorsNameThePath) {
  std::string path = Write("bad.ini", "[proxy]\n\nmax_connections = x\n");
  Config c = DefaultConfig();
  Status s = LoadConfigFile(path, &c);
  EXPECT_EQ(s.message(), path + ":3: [proxy] max_connections: 'x' is not an integer");

  std::string missing = dir_ + "/missing.ini";
  s = LoadConfigFile(missing, &c);
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_NE(s.message().find(missing), std::string::npos) << s.message();

  std::string big = Write("big.ini", std::string((1 << 20) + 1, '\n'));
  s = LoadConfigFile(big, &c);
  EXPECT_EQ(s.message(), big + ": larger than 1 MiB");
}

TEST(ApplyOverrideTest, SetsOneOption) {
  Config c = DefaultConfig();
  ASSERT_TRUE(ApplyOverride("proxy.max_connections=100", &c).ok());
  ASSERT_TRUE(ApplyOverride(" tls.tls_domain = \"x.example.org\" ", &c).ok());
  ASSERT_TRUE(ApplyOverride("proxy.listen=[::1]:0,127.0.0.1:0", &c).ok());
  ASSERT_TRUE(ApplyOverride("proxy.listen=127.0.0.1:9", &c).ok());  // replaces
  EXPECT_EQ(c.max_connections, 100);
  EXPECT_EQ(c.tls_domain, "x.example.org");
  EXPECT_EQ(c.listen, (std::vector<HostPort>{{"127.0.0.1", 9}}));
}

TEST(ApplyOverrideTest, ErrorsNameSet) {
  struct {
    const char* assignment;
    const char* message;
  } cases[] = {
      {"proxy.max_connections=many", "--set: [proxy] max_connections: 'many' is not an integer"},
      {"max_connections=5", "--set 'max_connections=5': expected SECTION.KEY=VALUE"},
      {"proxy.max_connections", "--set 'proxy.max_connections': expected SECTION.KEY=VALUE"},
      {"daemon.x=1",
       "--set: unknown section [daemon] (known: [broker] [registry] [proxy] [tls] [ssh] "
       "[scheduler] [metrics] [client])"},
      {"proxy.port_range=1-2", "--set: [proxy] port_range: unknown key; it belongs in [registry]"},
      {"tls.tls_domain=\"x", "--set: [tls] tls_domain: unbalanced double quote"},
      {"tls.tls_domain=a\nb", "--set: [tls] tls_domain: the value contains a control character"},
  };
  for (const auto& c : cases) {
    Config config = DefaultConfig();
    Status s = ApplyOverride(c.assignment, &config);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << c.assignment;
    EXPECT_EQ(s.message(), c.message);
    ExpectSameConfig(config, DefaultConfig());
  }
}

TEST_F(ConfigFileTest, PrecedenceIsFileThenSetThenFlags) {
  std::string path = Write("p.ini",
                           "[broker]\n"
                           "state_dir = /from/file\n"
                           "log_level = warn\n"
                           "[proxy]\n"
                           "max_connections = 10\n"
                           "idle_timeout = 1h\n"
                           "listen = 10.0.0.1:7000\n");
  Result<Config> c = ParseArgs({"run", "-c", path, "--set", "proxy.max_connections=20", "--set",
                                "broker.log_level=debug", "--log-level", "error", "--listen",
                                "127.0.0.1:0", "--listen=[::1]:0"});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->source, path);
  EXPECT_EQ(c->state_dir, "/from/file");                    // file
  EXPECT_EQ(c->control_socket, "/from/file/control.sock");  // derived after everything
  EXPECT_EQ(c->idle_timeout_ms, 3600000);                   // file
  EXPECT_EQ(c->max_connections, 20);                        // --set beats the file
  EXPECT_EQ(c->log_level, LogLevel::kError);                // the flag beats --set
  EXPECT_EQ(c->listen, (std::vector<HostPort>{{"127.0.0.1", 0}, {"::1", 0}}));
  EXPECT_EQ(c->handshake_timeout_ms, 10000);  // default
}

TEST_F(ConfigFileTest, FlagsBeatSetsForPaths) {
  Result<Config> c =
      ParseArgs({"connect", "--set", "broker.state_dir=/a", "--state-dir", "/b", "--socket",
                 "/tmp/s.sock", "--set", "client.proxy=h:1", "--proxy", "h2", "--via", "bob@login2",
                 "--set", "broker.control_socket=/tmp/other.sock"});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->state_dir, "/b");
  EXPECT_EQ(c->control_socket, "/tmp/s.sock");
  EXPECT_EQ(c->ca_cert, "/b/ca.pem");
  EXPECT_EQ(c->proxy, (HostPort{"h2", 7000}));
  EXPECT_EQ(c->broker, "bob@login2");
}

TEST_F(ConfigFileTest, RepeatedSetsOfAListAccumulateAndScalarFlagsTakeTheLast) {
  Result<Config> c =
      ParseArgs({"run", "--set", "proxy.listen=127.0.0.1:1", "--set", "proxy.listen=127.0.0.1:2",
                 "--log-level", "debug", "--log-level", "warn"});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->listen, (std::vector<HostPort>{{"127.0.0.1", 1}, {"127.0.0.1", 2}}));
  EXPECT_EQ(c->log_level, LogLevel::kWarn);
}

TEST_F(ConfigFileTest, FlagErrorsNameTheFlag) {
  Result<Config> c = ParseArgs({"run", "--listen", "nowhere"});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().message(), "--listen: 'nowhere': missing port; expected host:port");
  c = ParseArgs({"run", "--log-level", "loud"});
  EXPECT_EQ(c.status().message(),
            "--log-level: 'loud' is not a log level (debug, info, warn, error)");
  c = ParseArgs({"run", "--set", "proxy.max_connections=0"});
  EXPECT_EQ(c.status().message(),
            "--set: [proxy] max_connections: '0' is out of range (1 to 1000000)");
}

TEST_F(ConfigFileTest, FlagsFollowTheScope) {
  // --listen is the daemon's; --proxy and --broker are the clients'.
  EXPECT_FALSE(ParseArgs({"connect", "--listen", "127.0.0.1:1"}).ok());
  EXPECT_FALSE(ParseArgs({"run", "--proxy", "h:1"}).ok());
  EXPECT_FALSE(ParseArgs({"run", "--broker", "h"}).ok());
  EXPECT_TRUE(ParseArgs({"run", "--state-dir", "/x", "--socket", "/x/s", "--log-level", "info",
                         "-c", Write("empty.ini", "")})
                  .ok());
  // Any subcommand still reaches every option through --set.
  Result<Config> c = ParseArgs({"connect", "--set", "proxy.listen=127.0.0.1:5"});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->listen, (std::vector<HostPort>{{"127.0.0.1", 5}}));
}

TEST_F(ConfigFileTest, EnvironmentNamesTheFileUnlessDashC) {
  std::string env_file = Write("env.ini", "[proxy]\nmax_connections = 33\n");
  std::string c_file = Write("c.ini", "[proxy]\nmax_connections = 44\n");
  setenv("BROKERPROXY_CONFIG", env_file.c_str(), 1);
  Result<Config> c = ParseArgs({"run"});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->max_connections, 33);
  EXPECT_EQ(c->source, env_file);

  c = ParseArgs({"run", "--config", c_file});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->max_connections, 44);
  EXPECT_EQ(c->source, c_file);

  setenv("BROKERPROXY_CONFIG", (dir_ + "/nope.ini").c_str(), 1);
  c = ParseArgs({"run"});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Status::Code::kNotFound);
  EXPECT_NE(c.status().message().find(dir_ + "/nope.ini"), std::string::npos);
}

TEST_F(ConfigFileTest, NoFileMeansBuiltInDefaults) {
  struct stat st;
  if (::stat("/etc/brokerproxy/config.ini", &st) == 0) {
    GTEST_SKIP() << "/etc/brokerproxy/config.ini exists on this machine";
  }
  Result<Config> c = ParseArgs({"run"});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->source, "built-in defaults");
  Config expected = DefaultConfig();
  Finalize(&expected);
  ExpectSameConfig(*c, expected);
}

TEST_F(ConfigFileTest, MissingDashCFileIsAnError) {
  Result<Config> c = ParseArgs({"run", "-c", dir_ + "/missing.ini"});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Status::Code::kNotFound);
}

// ---- config.ini.example ----

TEST(ExampleConfigTest, ParsesBackToTheDefaults) {
  std::string text = GenerateExampleConfig();
  Config c;
  ASSERT_EQ(ParseError(text, &c), "");
  ExpectSameConfig(c, DefaultConfig());

  // Uncommenting every assignment also gives the defaults.
  std::istringstream in(text);
  std::string line, uncommented;
  int assignments = 0;
  while (std::getline(in, line)) {
    for (const OptionSpec& spec : OptionTable()) {
      std::string prefix = "# " + std::string(spec.key) + " =";
      if (line.starts_with(prefix)) {
        line = line.substr(2);
        ++assignments;
      }
    }
    uncommented += line + "\n";
  }
  EXPECT_EQ(assignments, static_cast<int>(OptionTable().size()));
  ASSERT_EQ(ParseError(uncommented, &c), "");
  Config expected = DefaultConfig();
  Finalize(&c);
  Finalize(&expected);
  ExpectSameConfig(c, expected);
}

TEST(ExampleConfigTest, DocumentsEveryOptionWithinNinetyColumns) {
  std::string text = GenerateExampleConfig();
  for (const OptionSpec& spec : OptionTable()) {
    std::string def = *spec.default_text ? spec.default_text : "(empty)";
    EXPECT_NE(text.find("# default: " + def + "\n# " + spec.key + " ="), std::string::npos)
        << spec.key;
  }
  EXPECT_NE(text.find("$BROKERPROXY_CONFIG"), std::string::npos);
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) EXPECT_LE(line.size(), 90u) << line;
}

// The committed config.ini.example must be what the table generates. To refresh it, run this
// test with BROKERPROXY_UPDATE_EXAMPLE=1.
TEST(ExampleConfigTest, CommittedFileIsUpToDate) {
  std::string path = std::string(BROKERPROXY_SOURCE_DIR) + "/config.ini.example";
  std::string generated = GenerateExampleConfig();
  if (const char* update = std::getenv("BROKERPROXY_UPDATE_EXAMPLE"); update && *update == '1') {
    std::ofstream(path, std::ios::binary) << generated;
  }
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << "cannot read " << path;
  std::stringstream committed;
  committed << in.rdbuf();
  EXPECT_EQ(committed.str(), generated)
      << path << " is stale; rerun this test with BROKERPROXY_UPDATE_EXAMPLE=1";
}

TEST(ChangedOptionsTest, NamesExactlyTheOptionsThatDifferAndCopiesOne) {
  Config a = DefaultConfig();
  Config b = a;
  EXPECT_TRUE(ChangedOptions(a, b).empty());
  b.log_level = LogLevel::kDebug;
  b.listen.push_back({"127.0.0.2", 0});
  b.port_range = {29000, 29999};
  std::vector<std::string> names;
  for (const OptionSpec* spec : ChangedOptions(a, b)) {
    names.push_back(std::string(spec->section) + "." + spec->key);
  }
  EXPECT_EQ(names,
            (std::vector<std::string>{"broker.log_level", "registry.port_range", "proxy.listen"}));
  CopyOption(*ChangedOptions(a, b)[1], a, &b);  // port_range back
  EXPECT_EQ(b.port_range, a.port_range);
  EXPECT_EQ(ChangedOptions(a, b).size(), 2u);
}

}  // namespace
}  // namespace brokerproxy::cli
