// The scheduler's outputs (registry/scheduler.h): hostlist expressions, `squeue --json`,
// `sinfo --json` and `qstat -f -F json`, which the daemon reads to decide who owns a job and
// where it runs. The first byte picks the parser, the rest is its input. Checked: a hostlist
// expands within its bounds to names that expand again to themselves; a listing that parses
// names every job uniquely (Find() of each id and alias is that job) with lower-case hosts.

#include <string>
#include <vector>

#include "fuzz.h"
#include "registry/scheduler.h"

using brokerproxy::registry::ExpandHostlist;
using brokerproxy::registry::JobTable;
using brokerproxy::registry::kMaxHostlistNames;
using brokerproxy::registry::kMaxHostNameBytes;
using brokerproxy::registry::ParsePbsJobs;
using brokerproxy::registry::ParseSlurmJobs;
using brokerproxy::registry::ParseSlurmNodes;
using brokerproxy::registry::SlurmNode;
using brokerproxy::registry::SlurmNodes;

namespace {

bool HostChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '-' || c == '_' || c == ':';
}

void CheckTable(const JobTable& table) {
  for (const auto& job : table.jobs()) {
    FUZZ_CHECK(!job.id.empty());
    FUZZ_CHECK(table.Find(job.id) == &job);
    for (const std::string& alias : job.aliases) {
      const auto* found = table.Find(alias);
      FUZZ_CHECK(found != nullptr);
      // An alias that equals another job's printed id would be ambiguous: the parsers refuse.
      FUZZ_CHECK(found == &job);
    }
    for (const std::string& host : job.hosts) {
      FUZZ_CHECK(!host.empty() && host.size() <= kMaxHostNameBytes);
      for (char c : host) FUZZ_CHECK(HostChar(c) && !(c >= 'A' && c <= 'Z'));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view text = brokerproxy::fuzz::AsText(data + 1, size - 1);
  switch (data[0] % 4) {
    case 0: {
      auto names = ExpandHostlist(text);
      if (!names.ok()) return 0;
      FUZZ_CHECK(names->size() <= kMaxHostlistNames);
      std::string joined;
      for (const std::string& name : *names) {
        FUZZ_CHECK(!name.empty() && name.size() <= kMaxHostNameBytes);
        for (char c : name) FUZZ_CHECK(HostChar(c) && c != ':');
        joined += (joined.empty() ? "" : ",") + name;
      }
      auto again = ExpandHostlist(joined);
      FUZZ_CHECK(again.ok() && *again == *names);
      break;
    }
    case 1: {
      SlurmNodes nodes;
      nodes["n1"] = SlurmNode{"n1", "vm", "127.0.0.1"};
      nodes["n2"] = SlurmNode{"n2", "VM", "127.0.0.2"};
      std::vector<std::string> unknown;
      auto table = ParseSlurmJobs(text, nodes, &unknown);
      if (table.ok()) CheckTable(*table);
      break;
    }
    case 2: {
      auto nodes = ParseSlurmNodes(text);
      if (nodes.ok()) {
        for (const auto& [name, node] : *nodes) FUZZ_CHECK(!name.empty() && name == node.name);
      }
      break;
    }
    case 3: {
      auto table = ParsePbsJobs(text, [](const std::string& user) -> std::optional<uid_t> {
        if (user == "bp-alice") return 1001;
        return std::nullopt;
      });
      if (table.ok()) CheckTable(*table);
      break;
    }
  }
  return 0;
}
