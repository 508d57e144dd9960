#include "e2e/notebook.h"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

namespace brokerproxy::testing {
namespace {

std::string Quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// "https://HOST:PORT/..." -> "HOST:PORT" ("" if the URL has no explicit port).
std::string HostPort(const std::string& url) {
  size_t start = url.find("://");
  if (start == std::string::npos) return "";
  start += 3;
  size_t end = url.find('/', start);
  std::string hp = url.substr(start, end == std::string::npos ? std::string::npos : end - start);
  return hp.find(':') == std::string::npos ? "" : hp;
}

// A curl run that reads its options (the token's header among them) from stdin, not argv.
RunResult Curl(const std::string& url, const std::string& token, const NotebookCheck& check,
               std::vector<std::string> extra) {
  std::vector<std::string> argv = {"curl", "-sS", "--max-time", "30", "-K", "-"};
  if (!check.ca_file.empty()) argv.insert(argv.end(), {"--cacert", check.ca_file});
  if (!check.connect_to.empty()) {
    argv.insert(argv.end(), {"--resolve", HostPort(url) + ":" + check.connect_to});
  }
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.push_back(url);
  RunOptions o;
  o.stdin_data = "header = \"Authorization: token " + token + "\"\n";
  o.uid = check.uid;
  o.timeout_ms = 40000;
  return RunCommand(argv, o);
}

}  // namespace

std::string NotebookMissing() {
  if (access("/usr/bin/jupyter-notebook", X_OK) != 0) {
    return "needs Debian's jupyter-notebook (scripts/deps.sh --test, or apt-get install -y "
           "jupyter-notebook python3-websocket)";
  }
  RunResult ws = RunCommand({"/usr/bin/python3", "-c", "import websocket"});
  if (ws.exit_code != 0) {
    return "needs python3-websocket (scripts/deps.sh --test, or apt-get install -y "
           "python3-websocket)";
  }
  return "";
}

std::string NotebookCommand(const std::string& type) {
  std::string cmd = "brokerproxy save " + type +
                    " --secret-env JUPYTER_TOKEN -- jupyter notebook --no-browser "
                    "--ip=127.0.0.1 --port={port}";
  if (type == "ssl") {
    cmd +=
        " --NotebookApp.certfile={cert} --NotebookApp.keyfile={certkey} "
        "--NotebookApp.allow_remote_access=True";
  }
  return cmd;
}

Notebook::Notebook(const Daemon& daemon, const TempDir& dir, uid_t owner)
    : daemon_(daemon), owner_(owner), dir_(dir.path()) {}

Notebook::~Notebook() {
  if (save_ && save_->Running()) Stop();
}

::testing::AssertionResult Notebook::Start(const std::string& job,
                                           const std::string& shell_command) {
  job_ = job;
  root_ = dir_ + "/nb-" + job;
  std::string home = dir_ + "/home-" + job;
  gid_t gid = PrimaryGid(owner_);
  if (::mkdir(root_.c_str(), 0755) != 0 || ::chown(root_.c_str(), owner_, gid) != 0 ||
      ::mkdir(home.c_str(), 0700) != 0 || ::chown(home.c_str(), owner_, gid) != 0) {
    return ::testing::AssertionFailure() << "cannot make " << root_ << " and " << home;
  }
  std::string data(kNotebookFileBytes, '\0');
  Pattern(0, data.data(), data.size());
  std::string file = root_ + "/" + kNotebookFile;
  WriteFile(file, data, 0644);
  if (::chown(file.c_str(), owner_, gid) != 0) {
    return ::testing::AssertionFailure() << "cannot chown " << file;
  }

  // A job's environment, nothing of the test's: HOME (where Jupyter keeps its runtime files and
  // `save ssl` its key) is the owner's own; `brokerproxy` is found on PATH as in a job script.
  std::string bin = BinaryPath();
  std::vector<std::string> argv = {"/usr/bin/env",
                                   "-i",
                                   "PATH=" + bin.substr(0, bin.rfind('/')) + ":/usr/bin:/bin",
                                   "HOME=" + home,
                                   "LANG=C.UTF-8",
                                   "BROKERPROXY_CONFIG=" + daemon_.config_path(),
                                   "SLURM_JOB_ID=" + job};
  for (const char* name : {"ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"}) {
    if (const char* v = std::getenv(name)) argv.push_back(std::string(name) + "=" + v);
  }
  argv.insert(argv.end(), {"/bin/sh", "-c", "cd " + Quoted(root_) + " && exec " + shell_command});
  RunOptions o;
  o.uid = owner_;
  save_ = Child::Spawn(argv, dir_ + "/nb-" + job + ".log", o);
  if (!save_) return ::testing::AssertionFailure() << "cannot start " << shell_command;

  // Ready: the owner's notebook accepts on the job's port; then its start-up is complete once it
  // says where it runs.
  registry::JsonPtr loaded;
  bool ready = WaitUntil(
      [&] {
        if (!save_->Running()) return true;
        loaded = ParseOut(daemon_.Cli({"load", job, "--json"}));
        return loaded && JsonText(loaded.get(), {"job", "ready"}) == "true";
      },
      90000);
  if (!ready || !save_->Running()) {
    return ::testing::AssertionFailure() << "the notebook's job did not become ready:\n"
                                         << Output() << "\n"
                                         << daemon_.Log();
  }
  token_ = JsonText(loaded.get(), {"job", "secret"});
  port_ = std::atoi(JsonText(loaded.get(), {"job", "port"}).c_str());
  if (!save_->WaitFor("is running at", 60000)) {
    return ::testing::AssertionFailure() << "the notebook did not say it runs:\n" << Output();
  }
  return ::testing::AssertionSuccess();
}

int Notebook::Stop() {
  if (!save_) return -1;
  return save_->Stop(SIGTERM, 30000);
}

std::string Notebook::Output() const { return ReadFile(dir_ + "/nb-" + job_ + ".log"); }

::testing::AssertionResult CheckNotebook(const std::string& base_url, const std::string& token,
                                         const NotebookCheck& check) {
  std::string file_url = base_url + "/files/" + kNotebookFile;
  RunResult file = Curl(file_url, token, check, {"--fail"});
  if (file.exit_code != 0) {
    return ::testing::AssertionFailure() << "GET " << file_url << " failed: " << file;
  }
  Sha256 got;
  got.Update(file.out.data(), file.out.size());
  if (got.Hex() != PatternHash(kNotebookFileBytes)) {
    return ::testing::AssertionFailure() << "GET " << file_url << ": " << file.out.size()
                                         << " bytes that are not the notebook's file";
  }
  // The file is the notebook's to give, only with the token.
  RunResult denied = Curl(file_url, token + "x", check, {"-o", "/dev/null", "-w", "%{http_code}"});
  if (denied.out == "200" || denied.out.empty()) {
    return ::testing::AssertionFailure() << "a wrong token got " << denied;
  }

  std::vector<std::string> argv = {
      "/usr/bin/python3", std::string(BROKERPROXY_SOURCE_DIR) + "/tests/e2e/notebook_cell.py",
      base_url, "print(6*7)"};
  if (!check.ca_file.empty()) argv.push_back(check.ca_file);
  RunOptions o;
  o.env = {"NOTEBOOK_TOKEN=" + token, "NOTEBOOK_CONNECT=" + check.connect_to};
  o.uid = check.uid;
  o.timeout_ms = 90000;
  RunResult cell = RunCommand(argv, o);
  if (cell.exit_code != 0 || cell.out != "42\n") {
    return ::testing::AssertionFailure() << "the cell through " << base_url << ": " << cell;
  }
  return ::testing::AssertionSuccess();
}

std::string ChromiumMissing() {
  if (access("/usr/bin/chromium", X_OK) != 0 || access("/usr/bin/certutil", X_OK) != 0) {
    return "needs Debian's chromium and libnss3-tools (apt-get install -y chromium "
           "libnss3-tools)";
  }
  return "";
}

RunResult ChromiumDumpDom(const TempDir& dir, const std::string& ca_file, const std::string& url) {
  // Trust the broker CA in an NSS database of a scratch HOME, as a user would.
  std::string home = dir / "chromium-home";
  std::string db = "sql:" + home + "/.pki/nssdb";
  if (access((home + "/.pki/nssdb").c_str(), F_OK) != 0) {
    RunCommand({"mkdir", "-p", home + "/.pki/nssdb"});
    RunResult init = RunCommand({"certutil", "-d", db, "-N", "--empty-password"});
    if (init.exit_code != 0) return init;
    RunResult add =
        RunCommand({"certutil", "-d", db, "-A", "-t", "C,,", "-n", "brokerproxy", "-i", ca_file});
    if (add.exit_code != 0) return add;
  }
  RunOptions env;
  env.env = {"HOME=" + home};
  env.timeout_ms = 60000;
  return RunCommand(
      {"/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
       "--no-first-run", "--disable-background-networking", "--disable-component-update",
       "--disable-sync", "--disable-dev-shm-usage", "--user-data-dir=" + (dir / "chromium-profile"),
       "--virtual-time-budget=10000", "--dump-dom", url},
      env);
}

std::string RecipeFrom(const std::string& markdown, const std::string& name) {
  std::string marker = "<!-- recipe: " + name + " -->";
  size_t at = markdown.find(marker);
  if (at == std::string::npos) return "";
  size_t fence = markdown.find("```", at);
  if (fence == std::string::npos) return "";
  size_t line = markdown.find('\n', fence);
  std::string command;
  while (line != std::string::npos && line + 1 < markdown.size()) {
    size_t next = markdown.find('\n', line + 1);
    std::string text =
        markdown.substr(line + 1, next == std::string::npos ? std::string::npos : next - line - 1);
    line = next;
    if (text.rfind("```", 0) == 0) break;
    size_t first = text.find_first_not_of(' ');
    if (first == std::string::npos || text[first] == '#') continue;  // comments are not run
    text = text.substr(first);
    bool continued = !text.empty() && text.back() == '\\';
    if (continued) text.pop_back();
    command += text;
    if (!continued) break;  // one command per recipe
  }
  // Joined lines keep one space between words.
  std::string out;
  for (char c : command) {
    if (c == ' ' && !out.empty() && out.back() == ' ') continue;
    out += c;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

std::vector<std::string> ProcessesShowing(const std::string& needle) {
  std::vector<std::string> found;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return {"cannot read /proc"};
  while (dirent* e = readdir(proc)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::string cmdline = ReadFile(std::string("/proc/") + e->d_name + "/cmdline");
    for (char& c : cmdline) c = c == '\0' ? ' ' : c;
    if (cmdline.find(needle) != std::string::npos) {
      found.push_back(std::string(e->d_name) + ": " + cmdline);
    }
  }
  closedir(proc);
  return found;
}

}  // namespace brokerproxy::testing
