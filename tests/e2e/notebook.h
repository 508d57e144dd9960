// A real Jupyter Notebook (Debian 12's jupyter-notebook 6.4) as a job's service, started the way
// a user starts it: `brokerproxy save ... --secret-env JUPYTER_TOKEN -- jupyter notebook ...`
// run by /bin/sh as a real test user, with its own HOME and Jupyter directories in a temporary
// directory. CheckNotebook() then proves that a base URL reaches that notebook: a file of the
// notebook's directory downloads with the right SHA-256, and a cell runs on a kernel through the
// kernel websocket.
//
// An access path is a few lines: start a Notebook, open the path (a local port from `connect`,
// an SNI name on the proxy port, a browser), and call CheckNotebook with its base URL and
// token().

#ifndef BROKERPROXY_TESTS_E2E_NOTEBOOK_H_
#define BROKERPROXY_TESTS_E2E_NOTEBOOK_H_

#include <gtest/gtest.h>
#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "e2e/harness.h"

namespace brokerproxy::testing {

// Why the notebook tests cannot run here ("" if they can): jupyter-notebook or
// python3-websocket missing (scripts/deps.sh --test installs them).
std::string NotebookMissing();

// The fixture's own command line (run by /bin/sh in the notebook's directory, with
// `brokerproxy` on PATH): a notebook on 127.0.0.1:{port} whose token is the job's secret,
// passed in the environment. For `ssl` it also serves TLS with the job's certificate and admits
// the Host header of SNI passthrough (`<job>.<tls_domain>`).
std::string NotebookCommand(const std::string& type);

class Notebook {
 public:
  // A notebook of `owner` for `daemon` (whose config the save finds in $BROKERPROXY_CONFIG), in
  // a directory under `dir`.
  Notebook(const Daemon& daemon, const TempDir& dir, uid_t owner);
  ~Notebook();  // stops the save (and with it the notebook) if still running
  Notebook(const Notebook&) = delete;
  Notebook& operator=(const Notebook&) = delete;

  // Runs `shell_command` with $SLURM_JOB_ID = `job`, the way a job script would, and waits
  // until the job is ready and the notebook answers; token() is then the job's secret.
  ::testing::AssertionResult Start(const std::string& job,
                                   const std::string& shell_command = NotebookCommand("ssh"));
  // SIGTERM to the save (which forwards it); its exit status.
  int Stop();

  const std::string& job() const { return job_; }
  const std::string& token() const { return token_; }
  uid_t owner() const { return owner_; }
  // The backend port of the job (where the notebook listens).
  int port() const { return port_; }
  // The `save` process (the notebook is its child).
  pid_t save_pid() const { return save_ ? save_->pid() : -1; }
  // What the save and the notebook wrote (stdout and stderr).
  std::string Output() const;
  // The directory the notebook serves, and the file CheckNotebook downloads from it.
  const std::string& root() const { return root_; }

 private:
  const Daemon& daemon_;
  uid_t owner_;
  std::string dir_;
  std::string root_;
  std::string job_;
  std::string token_;
  int port_ = 0;
  std::unique_ptr<Child> save_;
};

// The file in every notebook's directory that CheckNotebook downloads (Pattern bytes).
inline constexpr const char* kNotebookFile = "data.bin";
inline constexpr uint64_t kNotebookFileBytes = 256 * 1024;

struct NotebookCheck {
  // https: the CA bundle (PEM file) to verify the server with, and the address the host name
  // of the URL is connected to (e.g. "127.0.0.1" for `<job>.localhost`).
  std::string ca_file;
  std::string connect_to;
  // Runs curl and python as this user (a `connect --listen` serves only its own user).
  std::optional<uid_t> uid;
};

// Through `base_url` (http(s)://HOST:PORT, no trailing slash): downloads kNotebookFile with
// `token` and compares its SHA-256; checks that a wrong token gets no file; starts a kernel
// over REST and runs `print(6*7)` through the kernel websocket (tests/e2e/notebook_cell.py),
// expecting 42. The token goes in headers and environments, never in a command line.
::testing::AssertionResult CheckNotebook(const std::string& base_url, const std::string& token,
                                         const NotebookCheck& check = {});

// Headless Chromium (skip if absent: ChromiumMissing()) with the CA in `ca_file` trusted in an
// NSS database of a scratch HOME under `dir`, no certificate-error overrides; returns what
// `--dump-dom URL` printed.
std::string ChromiumMissing();
RunResult ChromiumDumpDom(const TempDir& dir, const std::string& ca_file, const std::string& url);

// The command of the shell code block that follows the line `<!-- recipe: NAME -->` in
// `markdown`, with its backslash-continued lines joined ("" if there is none): what the recipe
// tests run, so the documentation cannot drift from what works.
std::string RecipeFrom(const std::string& markdown, const std::string& name);

// Every process whose command line (/proc/PID/cmdline) contains `needle`, as "PID: argv".
std::vector<std::string> ProcessesShowing(const std::string& needle);

}  // namespace brokerproxy::testing

#endif  // BROKERPROXY_TESTS_E2E_NOTEBOOK_H_
