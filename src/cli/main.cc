// brokerproxy: the command line. Subcommands are thin: parse flags with CLI11, resolve the
// configuration, call a Run* function, map its Status to an exit code.

#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/connect.h"
#include "cli/control_client.h"
#include "cli/daemon.h"
#include "cli/exit_codes.h"
#include "cli/manpage.h"
#include "cli/options.h"
#include "cli/registry_io.h"
#include "cli/remote.h"
#include "cli/ssh_client.h"
#include "loop/address.h"

namespace brokerproxy::cli {
namespace {

constexpr const char* kVersion = BROKERPROXY_VERSION;

struct ClientFlags {
  bool json = false;
};

OutputFormat FormatOf(const ClientFlags& f) {
  return f.json ? OutputFormat::kJson : OutputFormat::kHuman;
}

// This machine's host name: the backend host that `save --via` registers from a compute node.
std::string LocalHostName() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "";
  return buf;
}

// --accept-new-host-key on every subcommand that may go through --via.
void AddSshFlags(CLI::App* app, bool* accept_new_host_key) {
  app->add_flag("--accept-new-host-key", *accept_new_host_key,
                "With --via: add the login node's host key to ~/.ssh/known_hosts if it is not "
                "there yet (a changed key is always refused)");
}

int Main(int argc, char** argv) {
  // Exec mode: everything after the first "--" is the command to run, untouched by CLI11.
  std::vector<std::string> command;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--") {
      for (int j = i + 1; j < argc; ++j) command.emplace_back(argv[j]);
      break;
    }
    args.push_back(argv[i]);
  }

  CLI::App app{"brokerproxy: reach services running inside batch jobs through one proxy port"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("brokerproxy ") + kVersion);

  ConfigFlags run_cfg;
  CLI::App* run = app.add_subcommand("run", "Run the daemon: registry, control socket and proxy");
  run_cfg.AddTo(run, FlagScope::kDaemon);

  ConfigFlags save_cfg;
  SaveArgs save_args;
  ClientFlags save_flags;
  std::string save_format = "human";
  CLI::App* save = app.add_subcommand(
      "save", "Register a service of this job: ssh|ssl [flags] [-- CMD ARGS...]");
  save->add_option("type", save_args.type, "ssh or ssl")
      ->required()
      ->check(CLI::IsMember({"ssh", "ssl"}));
  save->add_option("--job-id", save_args.job_id, "Job id (default: $SLURM_JOB_ID or $PBS_JOBID)");
  save->add_option("--name", save_args.name,
                   "Suffix for several services in one job: the id becomes JOB.NAME");
  save->add_option("--host", save_args.host,
                   "Backend host the proxy connects to (default: 127.0.0.1)");
  save->add_option("--port", save_args.port,
                   "Backend port the service already has (default: "
                   "allocate one from [registry] port_range)")
      ->check(CLI::Range(1, 65535));
  save->add_option("--ttl", save_args.ttl, "Remove the job after this long (e.g. 12h)");
  save->add_flag("--wait", save_args.wait,
                 "Return only once something listens on the backend port");
  save->add_flag("--replace", save_args.replace,
                 "Replace this job's existing entry (a restarted or requeued job); without it "
                 "saving an id that is registered fails");
  save->add_option("--wait-timeout", save_args.wait_timeout,
                   "How long --wait waits (default: [registry] ready_timeout)");
  save->add_option("--format", save_format, "Output: human, json or env")
      ->check(CLI::IsMember({"human", "json", "env"}));
  save->add_flag("--json", save_flags.json, "Same as --format json");
  // What `--via` sends for exec mode and --wait (which wait on this side): register the job as
  // waiting for its service, and return at once. Internal, hence hidden.
  save->add_flag("--pending", save_args.pending,
                 "Register the job as not ready yet and return without waiting")
      ->group("");
  // What `--via` sends for `save ssl`: the key stays on the node where the service runs.
  save->add_flag("--csr-stdin", save_args.csr_on_stdin,
                 "Read the job's CSR (PEM) from stdin instead of making a key here")
      ->group("");
  save->add_option("--cert-path", save_args.cert_path, "Where the caller writes the certificate")
      ->group("");
  save->add_option("--key-path", save_args.key_path, "Where the caller keeps the key")->group("");
  save->add_option("--secret-env", save_args.secret_env,
                   "Exec mode: put the job's secret in CMD's environment as NAME (e.g. "
                   "JUPYTER_TOKEN), where other users cannot read it, unlike {secret} in its "
                   "arguments")
      ->type_name("NAME")
      ->check([](const std::string& v) { return v.empty() ? "a name is needed" : ""; });
  save->add_option("--cert-dir", save_args.cert_dir,
                   "ssl: directory for the job's key (0600) and certificate (default: "
                   "${XDG_STATE_HOME:-~/.local/state}/brokerproxy/certs)");
  save->footer(
      "Exec mode: brokerproxy save ssh [flags] -- CMD ARGS... registers the job, runs CMD with\n"
      "{port} {secret} {cert} {certkey} {job} {host} replaced in its arguments and BROKER_*\n"
      "in its environment, forwards signals to it, removes the job when it exits and exits\n"
      "with its status.\n"
      "ssl jobs: the key is made here and never leaves this machine; the broker signs a\n"
      "certificate for https://JOB.<tls_domain>:<proxy port>/ (the proxy passes TLS through\n"
      "to the service, which should take the secret as its access token), e.g.\n"
      "  brokerproxy save ssl --secret-env JUPYTER_TOKEN -- jupyter notebook --no-browser \\\n"
      "      --ip={host} --port={port} --NotebookApp.certfile={cert} \\\n"
      "      --NotebookApp.keyfile={certkey} --NotebookApp.allow_remote_access=True\n"
      "{secret} in CMD's arguments is visible to every user of the node (ps): prefer\n"
      "--secret-env NAME, which puts the secret in CMD's environment only.");
  save_cfg.AddTo(save, FlagScope::kClient);
  bool accept_new_host_key = false;
  AddSshFlags(save, &accept_new_host_key);

  ConfigFlags load_cfg;
  ClientFlags load_flags;
  std::string load_job;
  std::string load_format = "human";
  CLI::App* load = app.add_subcommand("load", "Show a job: port, secret, type");
  load->add_option("job", load_job, "Job id")->required();
  load->add_flag("--json", load_flags.json, "Print the reply as JSON");
  load->add_option("--format", load_format, "Output: human, json or env")
      ->check(CLI::IsMember({"human", "json", "env"}));
  load_cfg.AddTo(load, FlagScope::kClient);
  AddSshFlags(load, &accept_new_host_key);

  ConfigFlags verify_cfg;
  ClientFlags verify_flags;
  std::string verify_job, verify_secret;
  CLI::App* verify = app.add_subcommand("verify", "Check a secret: exit 0 if it matches, 1 if not");
  verify->add_option("job", verify_job, "Job id")->required();
  verify->add_option("secret", verify_secret, "The secret, or - to read it from stdin")->required();
  verify->add_flag("--json", verify_flags.json, "Print the reply as JSON");
  verify_cfg.AddTo(verify, FlagScope::kClient);
  AddSshFlags(verify, &accept_new_host_key);

  ConfigFlags query_cfg;
  ClientFlags query_flags;
  CLI::App* query = app.add_subcommand("query", "List your jobs");
  query->add_flag("--json", query_flags.json, "Print the reply as JSON");
  std::string idle_for;
  query->add_option("--idle-for", idle_for,
                    "Only jobs idle at least this long: no session open and no bytes moved (e.g. "
                    "2h; counted from the job's save or the daemon's start, whichever is later)");
  query_cfg.AddTo(query, FlagScope::kClient);
  AddSshFlags(query, &accept_new_host_key);

  ConfigFlags remove_cfg;
  ClientFlags remove_flags;
  std::string remove_job, remove_if_secret;
  CLI::App* remove = app.add_subcommand("remove", "Remove a job");
  remove->add_option("job", remove_job, "Job id")->required();
  remove->add_option("--if-secret", remove_if_secret,
                     "Remove only if the job still has this secret (not saved again since); "
                     "- reads it from stdin");
  remove->add_flag("--json", remove_flags.json, "Print the reply as JSON");
  remove_cfg.AddTo(remove, FlagScope::kClient);
  AddSshFlags(remove, &accept_new_host_key);

  ConfigFlags epilog_cfg;
  ClientFlags epilog_flags;
  std::string epilog_job;
  CLI::App* epilog = app.add_subcommand(
      "epilog",
      "Remove every entry of a job that ended (root and [scheduler] admin_uids only; for "
      "Slurm's Epilog or EpilogSlurmctld)");
  epilog->add_option("job", epilog_job,
                     "Job id (default: $SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID of an array task, "
                     "else $SLURM_JOB_ID, else $PBS_JOBID)");
  epilog->add_flag("--json", epilog_flags.json, "Print the reply as JSON");
  epilog_cfg.AddTo(epilog, FlagScope::kClient);
  AddSshFlags(epilog, &accept_new_host_key);

  ConfigFlags stats_cfg;
  ClientFlags stats_flags;
  CLI::App* stats = app.add_subcommand("stats", "Show counters of the daemon and your jobs");
  stats->add_flag("--json", stats_flags.json, "Print the reply as JSON");
  stats_cfg.AddTo(stats, FlagScope::kClient);
  AddSshFlags(stats, &accept_new_host_key);

  // `wait`: what `save --wait` sends through --via. Internal, hence hidden.
  ConfigFlags wait_cfg;
  ClientFlags wait_flags;
  std::string wait_job, wait_timeout = "2m";
  CLI::App* wait = app.add_subcommand("wait", "Wait until a job's service listens");
  wait->group("");
  wait->add_option("job", wait_job, "Job id")->required();
  wait->add_option("--timeout", wait_timeout, "How long to wait");
  wait->add_flag("--json", wait_flags.json, "Print the reply as JSON");
  wait_cfg.AddTo(wait, FlagScope::kClient);
  AddSshFlags(wait, &accept_new_host_key);

  ConfigFlags ca_cfg;
  ClientFlags ca_flags;
  CLI::App* ca = app.add_subcommand(
      "ca", "Print the broker's CA certificate (PEM), to trust in browsers and `connect --tls`");
  ca->add_flag("--json", ca_flags.json, "Print the reply as JSON");
  ca_cfg.AddTo(ca, FlagScope::kClient);

  ConfigFlags registry_cfg;
  std::string registry_action;
  std::string registry_file;
  bool registry_replace = false;
  CLI::App* registry_cmd = app.add_subcommand(
      "registry",
      "Move jobs between stores (docs/redis.md): `registry export > FILE` prints the configured "
      "store's jobs in registry.json's format (secrets included); `registry import FILE` adds "
      "them to the configured store (with store = file, the daemon must be stopped)");
  registry_cmd->add_option("action", registry_action, "export or import")
      ->required()
      ->check(CLI::IsMember({"export", "import"}));
  registry_cmd->add_option("file", registry_file, "import: the file to read");
  registry_cmd->add_flag("--replace", registry_replace,
                         "import: replace jobs of the same id (else the import is refused)");
  registry_cfg.AddTo(registry_cmd, FlagScope::kDaemon);

  ConfigFlags connect_cfg;
  ConnectArgs connect_args;
  CLI::App* connect = app.add_subcommand(
      "connect",
      "Reach a job's service from here: a local port (--listen) or stdin/stdout (--stdio)");
  connect->add_option("job", connect_args.job, "Job id")->required();
  connect->add_option(
      "--listen", connect_args.listen,
      "Local [ADDR:]PORT to listen on (ADDR defaults to 127.0.0.1; 0 = any free port), or "
      "unix:PATH (a socket of mode 0600 in a directory only you can reach). Only your own "
      "connections are served: others' are closed");
  connect->add_flag("--allow-remote-clients", connect_args.allow_remote,
                    "Allow a --listen address other hosts can reach; their connections cannot "
                    "be traced to a user, so anyone who reaches it may use the tunnel");
  connect->add_flag("--insecure-plain", connect_args.insecure_plain,
                    "Allow the plain path to a --proxy address that is not loopback (the job's "
                    "secret crosses the network in clear); prefer --tls or --via");
  connect->add_flag("--stdio", connect_args.stdio,
                    "Use stdin/stdout (for ssh -o ProxyCommand='brokerproxy connect JOB --stdio')");
  connect->add_flag("--tls", connect_args.tls, "Reach the proxy port over TLS");
  connect->add_option("--ca", connect_args.ca,
                      "CA certificate for --tls (default: the daemon's here; else the CA the proxy "
                      "presents, checked against --ca-fingerprint, the login node's with --via, "
                      "or pinned on first use)");
  connect->add_option("--ca-fingerprint", connect_args.ca_fingerprint,
                      "SHA-256 fingerprint the broker's CA must have for --tls (SHA256:<hex>, as "
                      "`brokerproxy load` shows it)");
  connect->add_option("--secret-file", connect_args.secret_file,
                      "Read the job's secret from this file (only you may read it), or from stdin "
                      "with '-'; default: $BROKER_SECRET, else the daemon here (never argv)");
  connect->add_flag("--token-url", connect_args.token_url,
                    "Also print the URL with ?token=<the job's secret> once listening (for a "
                    "service that uses the secret as its token, e.g. Jupyter)");
  connect->footer(
      "Examples:\n"
      "  brokerproxy connect 12345 --listen 8888      # then open http://127.0.0.1:8888/\n"
      "  ssh -o ProxyCommand='brokerproxy connect %h --stdio' user@12345\n"
      "  brokerproxy connect 12345 --listen 8888 --via login.example.org\n"
      "  brokerproxy connect 12345 --listen 8888 --tls --via login.example.org\n"
      "  brokerproxy connect 12345 --listen 8888 --tls --proxy login.example.org:7000 "
      "--secret-file ~/.bp/12345");
  connect_cfg.AddTo(connect, FlagScope::kClient);
  AddSshFlags(connect, &accept_new_host_key);

  ConfigFlags config_cfg;
  bool config_example = false;
  CLI::App* config_cmd =
      app.add_subcommand("config",
                         "Print config.ini.example (every option, its default and "
                         "meaning)");
  config_cmd->add_flag("--example", config_example, "Print the annotated example (default)");
  int config_man = 0;
  config_cmd
      ->add_option("--man", config_man,
                   "Print a manual page instead: 1 for brokerproxy(1), the commands; 5 for "
                   "brokerproxy.ini(5), the options")
      ->check(CLI::IsMember({1, 5}));
  (void)config_cfg;

  try {
    app.parse(static_cast<int>(args.size()), args.data());
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }
  if (!command.empty() && !save->parsed()) {
    std::fprintf(stderr, "brokerproxy: '--' and a command are only valid with 'save'\n");
    return kExitUsage;
  }

  // Every subcommand below needs the configuration.
  auto resolve = [](const ConfigFlags& flags) { return flags.Resolve(); };
  bool json = false;
  Status status;
  int exit_code = kExitOk;
  // The client for the resolved configuration: the login node over SSH when --via (or
  // [client] broker) names one, else the daemon on this host.
  RemoteClient* remote = nullptr;
  auto with_client = [&](const ConfigFlags& flags, bool as_json, auto fn) {
    json = as_json;
    auto config = resolve(flags);
    if (!config.ok()) {
      status = config.status();
      return;
    }
    if (!config->broker.empty()) {
      auto target = ParseSshTarget(config->broker);
      if (!target.ok()) {
        status = target.status();
        return;
      }
      SshClientOptions ssh_options;
      ssh_options.accept_new_host_key = accept_new_host_key;
      RemoteClient client(std::move(target).value(), config->remote_command, ssh_options);
      remote = &client;
      status = fn(*config, &client);
      remote = nullptr;
      return;
    }
    LocalClient client(config->control_socket);
    status = fn(*config, &client);
  };

  if (run->parsed()) {
    auto config = resolve(run_cfg);
    status = config.ok() ? RunDaemon(
                               *config, [&] { return resolve(run_cfg); },
                               std::vector<std::string>(argv, argv + argc))
                         : config.status();
  } else if (save->parsed()) {
    save_args.format = save_flags.json || save_format == "json" ? OutputFormat::kJson
                       : save_format == "env"                   ? OutputFormat::kEnv
                                                                : OutputFormat::kHuman;
    save_args.command = command;
    with_client(save_cfg, save_args.format == OutputFormat::kJson,
                [&](const Config& c, BrokerClient* cl) {
                  // From a compute node, the proxy on the login node must connect back here.
                  if (save_args.host.empty() && remote) save_args.host = LocalHostName();
                  return RunSave(c, cl, save_args, &exit_code);
                });
  } else if (load->parsed()) {
    OutputFormat f = load_flags.json || load_format == "json" ? OutputFormat::kJson
                     : load_format == "env"                   ? OutputFormat::kEnv
                                                              : OutputFormat::kHuman;
    with_client(load_cfg, f == OutputFormat::kJson,
                [&](const Config&, BrokerClient* cl) { return RunLoad(cl, load_job, f); });
  } else if (verify->parsed()) {
    bool match = false;
    with_client(verify_cfg, verify_flags.json, [&](const Config&, BrokerClient* cl) {
      return RunVerify(cl, verify_job, verify_secret, FormatOf(verify_flags), &match);
    });
    if (status.ok() && !match) exit_code = kExitNoMatch;
  } else if (query->parsed()) {
    with_client(query_cfg, query_flags.json, [&](const Config&, BrokerClient* cl) {
      int64_t idle_for_ms = 0;
      if (!idle_for.empty()) {
        Result<int64_t> ms = ParseDuration(idle_for);
        if (!ms.ok()) return ms.status().WithContext("--idle-for");
        idle_for_ms = std::max<int64_t>(*ms, 1000);
      }
      return RunQuery(cl, FormatOf(query_flags), idle_for_ms);
    });
  } else if (remove->parsed()) {
    with_client(remove_cfg, remove_flags.json, [&](const Config&, BrokerClient* cl) {
      return RunRemove(cl, remove_job, remove_if_secret, FormatOf(remove_flags));
    });
  } else if (epilog->parsed()) {
    with_client(epilog_cfg, epilog_flags.json, [&](const Config&, BrokerClient* cl) {
      return RunEpilog(cl, epilog_job, FormatOf(epilog_flags));
    });
  } else if (stats->parsed()) {
    with_client(stats_cfg, stats_flags.json, [&](const Config&, BrokerClient* cl) {
      return RunStats(cl, FormatOf(stats_flags));
    });
  } else if (wait->parsed()) {
    with_client(wait_cfg, wait_flags.json, [&](const Config&, BrokerClient* cl) {
      auto timeout = ParseDuration(wait_timeout);
      if (!timeout.ok()) return timeout.status().WithContext("--timeout");
      return RunWait(cl, wait_job, *timeout, FormatOf(wait_flags));
    });
  } else if (ca->parsed()) {
    with_client(ca_cfg, ca_flags.json,
                [&](const Config&, BrokerClient* cl) { return RunCa(cl, FormatOf(ca_flags)); });
  } else if (connect->parsed()) {
    with_client(connect_cfg, false, [&](const Config& c, BrokerClient* cl) {
      connect_args.proxy_given = connect->count("--proxy") > 0;
      if (connect_args.proxy.empty()) connect_args.proxy = c.proxy.ToString();
      return RunConnect(c, cl, remote, connect_args);
    });
  } else if (registry_cmd->parsed()) {
    auto config = resolve(registry_cfg);
    status = config.ok() ? RunRegistry(*config, registry_action, registry_file, registry_replace)
                         : config.status();
  } else if (config_cmd->parsed()) {
    std::string text = config_man == 1   ? ManPageCommands(app, kVersion)
                       : config_man == 5 ? ManPageConfig(kVersion)
                                         : GenerateExampleConfig();
    std::fputs(text.c_str(), stdout);
  }

  if (!status.ok()) {
    if (json) {
      PrintJsonError(status);
    } else {
      std::fprintf(stderr, "brokerproxy: %s\n", status.message().c_str());
    }
    return ExitCodeFor(status);
  }
  return exit_code;
}

}  // namespace
}  // namespace brokerproxy::cli

int main(int argc, char** argv) {
  // Writes to a peer that went away must fail with EPIPE, not kill the process.
  signal(SIGPIPE, SIG_IGN);
  // Exec mode's wrapper around the command: before CLI11, which would not take its arguments.
  if (brokerproxy::cli::IsExecChild(argc, argv)) return brokerproxy::cli::ExecChildMain(argc, argv);
  return brokerproxy::cli::Main(argc, argv);
}
