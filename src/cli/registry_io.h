// The registry's store as the configuration names it ([registry] store, docs/redis.md), for the
// daemon and for `brokerproxy registry export | import`, which move jobs between a file store
// and a Redis store.
//
//   brokerproxy registry export [-c CONFIG] > jobs.json
//       prints every job of the configured store, in registry.json's format (secrets included:
//       keep the output private). Root only, like reading registry.json.
//   brokerproxy registry import jobs.json [--replace] [-c CONFIG]
//       adds the jobs of a file in that format to the configured store. With store = redis the
//       jobs go through the same atomic script as the daemons' saves and are published to
//       them, so the daemons may run; with store = file the daemon must be stopped. An id that
//       exists already is refused (AlreadyExists) unless --replace.

#ifndef BROKERPROXY_CLI_REGISTRY_IO_H_
#define BROKERPROXY_CLI_REGISTRY_IO_H_

#include <memory>
#include <string>

#include "cli/options.h"
#include "loop/loop.h"
#include "loop/status.h"
#include "registry/redis_store.h"
#include "registry/registry.h"

namespace brokerproxy::cli {

registry::Registry::Options RegistryOptionsFrom(const Config& config);

// `store = redis`: the key file, the password file, then RedisStore::Open (blocking; loads the
// jobs into `*registry`). Errors name the key they are about.
Result<std::unique_ptr<registry::RedisStore>> OpenRedisStore(const Config& config, loop::Loop* loop,
                                                             registry::Registry* registry);

// REQUIRES: action is "export" or "import" (else InvalidArgument); import needs `path`.
Status RunRegistry(const Config& config, const std::string& action, const std::string& path,
                   bool replace);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_REGISTRY_IO_H_
