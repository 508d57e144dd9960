#include "cli/registry_io.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "loop/file.h"
#include "registry/seal.h"
#include "registry/snapshot.h"
#include "registry/store.h"

namespace brokerproxy::cli {
namespace {

// True if something accepts connections on the unix socket `path` (a running daemon).
bool SocketAnswers(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

// Puts `jobs` into the registry in one mutation (undone as a whole).
registry::Store::Mutation PutAll(registry::Registry* reg, const std::vector<registry::Job>& jobs,
                                 bool replace) {
  return [reg, &jobs, replace]() -> Result<registry::Store::Undo> {
    auto previous = std::make_shared<std::vector<registry::Job>>();
    auto added = std::make_shared<std::vector<std::string>>();
    auto undo = [reg, previous, added] {
      for (const std::string& id : *added) reg->Erase(id);
      for (const registry::Job& job : *previous) (void)reg->Put(job);
    };
    for (const registry::Job& job : jobs) {
      const registry::Job* existing = reg->Find(job.id);
      if (existing != nullptr && !replace) {
        undo();
        return Status::AlreadyExists("job " + job.id +
                                     " exists in the store already (--replace replaces it)");
      }
      if (existing != nullptr) previous->push_back(*existing);
      Status s = reg->Put(job);
      if (!s.ok()) {
        undo();
        return s.WithContext("job " + job.id);
      }
      if (existing == nullptr) added->push_back(registry::CanonicalJobId(job.id));
    }
    return registry::Store::Undo(undo);
  };
}

Status Export(const Config& config) {
  registry::Registry reg(RegistryOptionsFrom(config));
  if (config.store == "redis") {
    auto loop = loop::Loop::Create();
    if (!loop.ok()) return loop.status();
    {
      auto store = OpenRedisStore(config, loop->get(), &reg);
      if (!store.ok()) return store.status();
    }
    BP_RETURN_IF_ERROR((*loop)->Close());
  } else {
    BP_RETURN_IF_ERROR(registry::FileStore::Load(config.state_dir + "/registry.json", &reg));
  }
  std::string text = registry::EncodeSnapshot(reg.All());
  std::fputs(text.c_str(), stdout);
  std::fputs("\n", stdout);
  std::fprintf(stderr, "brokerproxy: exported %zu job(s)\n", reg.size());
  return Status::OK();
}

Status Import(const Config& config, const std::string& path, bool replace) {
  auto text = registry::ReadFileIfExists(path, registry::kMaxSnapshotBytes);
  if (!text.ok()) return text.status();
  if (!text->has_value()) return Status::NotFound(path + " does not exist");
  auto jobs = registry::DecodeSnapshot(**text);
  if (!jobs.ok()) return jobs.status().WithContext(path);
  registry::Registry reg(RegistryOptionsFrom(config));
  if (config.store != "redis") {
    if (SocketAnswers(config.control_socket)) {
      return Status::AlreadyExists("the daemon is running (" + config.control_socket +
                                   "): stop it before importing into its registry.json");
    }
    std::string file = config.state_dir + "/registry.json";
    // Before the daemon's first start the state dir does not exist yet (the daemon makes it
    // with this mode, too).
    if (::mkdir(config.state_dir.c_str(), 0711) != 0 && errno != EEXIST) {
      return PosixError("cannot create " + config.state_dir, errno);
    }
    BP_RETURN_IF_ERROR(registry::FileStore::Load(file, &reg));
    auto undo = PutAll(&reg, *jobs, replace)();
    if (!undo.ok()) return undo.status();
    BP_RETURN_IF_ERROR(loop::WriteFileAtomic(file, registry::EncodeSnapshot(reg.All()), 0600));
    std::fprintf(stderr, "brokerproxy: imported %zu job(s) into %s\n", jobs->size(), file.c_str());
    return Status::OK();
  }
  auto loop = loop::Loop::Create();
  if (!loop.ok()) return loop.status();
  Status result = Status::Internal("the import did not finish");
  {
    auto store = OpenRedisStore(config, loop->get(), &reg);
    if (!store.ok()) return store.status();
    BP_RETURN_IF_ERROR((*store)->Start());
    (*store)->Commit(PutAll(&reg, *jobs, replace), [&](Status s) {
      result = s;
      (*loop)->Stop();
    });
    (*loop)->Run();
  }
  BP_RETURN_IF_ERROR((*loop)->Close());
  if (result.ok()) {
    std::fprintf(stderr, "brokerproxy: imported %zu job(s) into the registry store\n",
                 jobs->size());
  }
  return result;
}

}  // namespace

registry::Registry::Options RegistryOptionsFrom(const Config& config) {
  registry::Registry::Options ro;
  ro.ports = config.port_range;
  ro.secret_bits = config.secret_bits;
  ro.default_ttl = config.default_ttl_ms / 1000;
  ro.max_jobs_per_user = static_cast<size_t>(config.max_jobs_per_user);
  return ro;
}

Result<std::unique_ptr<registry::RedisStore>> OpenRedisStore(const Config& config, loop::Loop* loop,
                                                             registry::Registry* registry) {
  if (config.store_address.empty()) {
    return Status::InvalidArgument("[registry] store = redis needs store_address");
  }
  if (config.store_key_file.empty()) {
    return Status::InvalidArgument(
        "[registry] store = redis needs store_key_file (32 random bytes, mode 0600, the same "
        "on every login node)");
  }
  auto sealer = registry::Sealer::FromKeyFile(config.store_key_file);
  if (!sealer.ok()) return sealer.status().WithContext("[registry] store_key_file");
  registry::RedisStore::Options o;
  o.address = config.store_address;
  o.master_name = config.store_master_name;
  o.prefix = config.store_prefix;
  o.replicas = config.store_replicas;
  o.max_view_age_ms = config.store_max_view_age_ms;
  if (!config.store_password_file.empty()) {
    auto text = registry::ReadFileIfExists(config.store_password_file, 4096);
    if (!text.ok()) return text.status().WithContext("[registry] store_password_file");
    if (!text->has_value()) {
      return Status::InvalidArgument("[registry] store_password_file " +
                                     config.store_password_file + " does not exist");
    }
    std::string& password = **text;
    password = password.substr(0, password.find('\n'));
    if (!password.empty() && password.back() == '\r') password.pop_back();
    o.password = password;
  }
  return registry::RedisStore::Open(loop, registry, std::move(sealer).value(), o);
}

Status RunRegistry(const Config& config, const std::string& action, const std::string& path,
                   bool replace) {
  if (config.store != "file" && config.store != "redis") {
    return Status::InvalidArgument("[registry] store: '" + config.store.substr(0, 40) +
                                   "' is neither file nor redis");
  }
  if (action == "export") return Export(config);
  if (action == "import") {
    if (path.empty()) return Status::InvalidArgument("registry import needs a FILE");
    return Import(config, path, replace);
  }
  return Status::InvalidArgument("registry: the action is export or import, not '" +
                                 action.substr(0, 40) + "'");
}

}  // namespace brokerproxy::cli
