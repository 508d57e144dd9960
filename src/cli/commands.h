// The short-lived subcommands: save (plain and exec mode), load, verify, query, remove, stats,
// ca.
//
// `save ssl` keeps the job's private key on the machine where it runs (proxy/tls/certs.h explains
// the CSR model): it creates an ECDSA P-256 key, writes it to <cert_dir>/<job>.key (mode 0600,
// a new file renamed into place), sends only a CSR with the save request, and writes the
// certificate the broker returns to <cert_dir>/<job>.crt. The job records both absolute paths;
// `load` shows them and exec mode passes them as {cert} and {certkey}. Exec mode deletes both
// files when the command ends.
//
// Each takes the resolved Config and a BrokerClient (the local daemon, or the login node with
// --via), prints its result to stdout and returns a Status that main() maps to an exit code.

#ifndef BROKERPROXY_CLI_COMMANDS_H_
#define BROKERPROXY_CLI_COMMANDS_H_

#include <string>
#include <vector>

#include "cli/control_client.h"
#include "cli/options.h"
#include "loop/status.h"

namespace brokerproxy::cli {

enum class OutputFormat { kHuman, kJson, kEnv };

struct SaveArgs {
  std::string type;          // "ssh" | "ssl"
  std::string job_id;        // empty: $SLURM_JOB_ID / $PBS_JOBID
  std::string name;          // optional suffix: "<job>.<name>", for several services per job
  std::string host;          // empty: 127.0.0.1 here, the node's host name with --via
  int port = 0;              // 0: allocate
  std::string ttl;           // duration text; empty: the broker's default
  bool wait = false;         // wait until the backend listens
  bool pending = false;      // register as not ready, return at once (what --via sends)
  bool replace = false;      // the caller's existing entry of this id may be replaced
  std::string wait_timeout;  // duration text; empty: [registry] ready_timeout
  OutputFormat format = OutputFormat::kHuman;
  std::vector<std::string> command;  // exec mode: what follows "--"
  // Exec mode: the command also gets the job's secret in its environment under this name
  // (e.g. JUPYTER_TOKEN), where other users of the node cannot read it, unlike its arguments.
  std::string secret_env;
  std::string cert_dir;  // ssl: where the key and certificate go; empty: DefaultCertDir()
  // ssl through --via: the node where the service runs made the key and sends its CSR (on
  // stdin) and the paths it will write; this side only registers and prints the reply.
  bool csr_on_stdin = false;
  std::string cert_path;
  std::string key_path;
};

// ${XDG_STATE_HOME:-$HOME/.local/state}/brokerproxy/certs
std::string DefaultCertDir();

// Picks the job id from the flags and the batch system's environment.
Result<std::string> ResolveJobId(const std::string& job_id, const std::string& name);

Status RunSave(const Config& config, BrokerClient* client, const SaveArgs& args, int* exit_code);
Status RunLoad(BrokerClient* client, const std::string& job, OutputFormat format);
// `secret` "-" reads it from stdin. Sets *match.
Status RunVerify(BrokerClient* client, const std::string& job, const std::string& secret,
                 OutputFormat format, bool* match);
// Lists the caller's jobs with how long each has been idle (no session open, no bytes moving);
// `idle_for_ms` > 0 keeps only the jobs idle at least that long.
Status RunQuery(BrokerClient* client, OutputFormat format, int64_t idle_for_ms = 0);
// With `if_secret` ("-": read from stdin), only if the job still has that secret: a newer
// save of the id is left in place (AlreadyExists).
Status RunRemove(BrokerClient* client, const std::string& job, const std::string& if_secret,
                 OutputFormat format);
Status RunStats(BrokerClient* client, OutputFormat format);
// Removes job `job` and its services `job.*` (EpilogJobId() if empty); root and [scheduler]
// admin_uids only. Nothing there is not an error.
Status RunEpilog(BrokerClient* client, const std::string& job, OutputFormat format);
// The job an epilog runs for, from its environment: $SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID
// for an array task (the id its entries are saved under), else $SLURM_JOB_ID, else $PBS_JOBID.
Result<std::string> EpilogJobId();
// Waits until the job's service listens (at most `timeout_ms`), then shows the job.
Status RunWait(BrokerClient* client, const std::string& job, int64_t timeout_ms,
               OutputFormat format);
// Prints the broker's CA certificate (PEM), for browsers and `connect --tls --ca`.
Status RunCa(BrokerClient* client, OutputFormat format);
// The broker's CA certificate (PEM) through the control API.
Result<std::string> FetchCaPem(BrokerClient* client);

// Checks --secret-env (exec mode only; a portable variable name, not BROKER_*), and warns on
// stderr when {secret} appears in the command's arguments, where every user of the node can
// read it. An error leaves nothing to undo: it comes before the save.
Status CheckSecretEnv(const SaveArgs& args);

// {port} {secret} {cert} {certkey} {job} {host} in `arg`, replaced by the job's values.
std::string SubstitutePlaceholders(const std::string& arg, const registry::Job& job);

// Exec mode's wrapper: `brokerproxy --exec-child PARENT_PID -- COMMAND ARGS...` arms
// PR_SET_PDEATHSIG(SIGKILL), checks that PARENT_PID is still its parent, and execs COMMAND;
// returns an exit code only if that fails. IsExecChild() tells main() to call it.
bool IsExecChild(int argc, char** argv);
int ExecChildMain(int argc, char** argv);

// With --json, an error is printed to stdout as the reply object {"ok":false,...}.
void PrintJsonError(const Status& status);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_COMMANDS_H_
