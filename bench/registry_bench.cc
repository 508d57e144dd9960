// Micro-benchmarks of the secret check on the proxy's accept path: Registry::Authenticate (a
// hash lookup plus two SHA-256 digests and a constant-time compare), Registry::Find, and
// SecretMatches alone, with 10 and 100,000 registered jobs. Lookups walk the job ids with a
// large stride so that big registries pay their cache misses, as a busy proxy would.

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "registry/registry.h"
#include "registry/secret.h"

namespace brokerproxy::registry {
namespace {

struct Fixture {
  std::unique_ptr<Registry> registry;
  std::vector<std::string> ids;
  std::vector<std::string> secrets;
};

// Registries are built once per size and shared by the benchmarks: 100,000 Save() calls would
// otherwise dominate the run time.
const Fixture& RegistryOf(int jobs) {
  static std::map<int, std::unique_ptr<Fixture>> cache;
  auto it = cache.find(jobs);
  if (it != cache.end()) return *it->second;
  auto f = std::make_unique<Fixture>();
  f->registry = std::make_unique<Registry>(Registry::Options{});
  for (int i = 0; i < jobs; ++i) {
    SaveRequest req;
    req.id = "job-" + std::to_string(1000000 + i);
    req.host = "node" + std::to_string(i % 512) + ".cluster";
    req.port = 1024 + i % 60000;  // explicit: the default range has only 1000 ports
    Result<Job> job = f->registry->Save(req, /*caller=*/1000, /*now=*/1700000000, nullptr);
    if (!job.ok()) std::abort();  // a broken fixture must not produce numbers
    f->ids.push_back(job->id);
    f->secrets.push_back(job->secret);
  }
  return *cache.emplace(jobs, std::move(f)).first->second;
}

// The next index in a walk over all jobs with a stride coprime to any size used here.
size_t Next(size_t i, size_t n) { return (i + 7919) % n; }

void BM_Registry_Authenticate_RightSecret(benchmark::State& state) {
  const Fixture& f = RegistryOf(static_cast<int>(state.range(0)));
  size_t i = 0;
  for (auto _ : state) {
    const Job* job = f.registry->Authenticate(f.ids[i], f.secrets[i]);
    if (job == nullptr || job->id != f.ids[i]) {
      state.SkipWithError("right secret refused");
      break;
    }
    i = Next(i, f.ids.size());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_Registry_Authenticate_RightSecret)->Arg(10)->Arg(100000);

void BM_Registry_Authenticate_WrongSecret(benchmark::State& state) {
  const Fixture& f = RegistryOf(static_cast<int>(state.range(0)));
  // Same length as a real secret, differing only in the last digit: what a guesser sends.
  std::vector<std::string> wrong = f.secrets;
  for (std::string& s : wrong) s.back() = s.back() == '0' ? '1' : '0';
  size_t i = 0;
  for (auto _ : state) {
    const Job* job = f.registry->Authenticate(f.ids[i], wrong[i]);
    if (job != nullptr) {
      state.SkipWithError("wrong secret accepted");
      break;
    }
    i = Next(i, f.ids.size());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_Registry_Authenticate_WrongSecret)->Arg(10)->Arg(100000);

void BM_Registry_Authenticate_UnknownId(benchmark::State& state) {
  const Fixture& f = RegistryOf(static_cast<int>(state.range(0)));
  std::vector<std::string> unknown;
  for (size_t k = 0; k < 1024; ++k) unknown.push_back("nojob-" + std::to_string(k));
  size_t i = 0;
  for (auto _ : state) {
    const Job* job = f.registry->Authenticate(unknown[i % unknown.size()], f.secrets[0]);
    if (job != nullptr) {
      state.SkipWithError("unknown id accepted");
      break;
    }
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_Registry_Authenticate_UnknownId)->Arg(10)->Arg(100000);

void BM_Registry_Find_Hit(benchmark::State& state) {
  const Fixture& f = RegistryOf(static_cast<int>(state.range(0)));
  size_t i = 0;
  for (auto _ : state) {
    const Job* job = f.registry->Find(f.ids[i]);
    if (job == nullptr) {
      state.SkipWithError("registered job not found");
      break;
    }
    benchmark::DoNotOptimize(job);
    i = Next(i, f.ids.size());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_Registry_Find_Hit)->Arg(10)->Arg(100000);

void BM_Registry_Find_Miss(benchmark::State& state) {
  const Fixture& f = RegistryOf(static_cast<int>(state.range(0)));
  const std::string id = "nojob-42";
  for (auto _ : state) {
    const Job* job = f.registry->Find(id);
    if (job != nullptr) {
      state.SkipWithError("unknown job found");
      break;
    }
    benchmark::DoNotOptimize(job);
  }
}
BENCHMARK(BM_Registry_Find_Miss)->Arg(10)->Arg(100000);

// SecretMatches alone: two SHA-256 digests of `given`'s and the expected secret's length.
// Arg = length of the secret in hex digits (64 = the default 256 bits, 1024 = the maximum 4096
// bits).
void BM_SecretMatches_Equal(benchmark::State& state) {
  Result<std::string> secret = GenerateSecret(static_cast<int>(state.range(0)) * 4);
  if (!secret.ok()) {
    state.SkipWithError("GenerateSecret failed");
    return;
  }
  const std::string given = *secret;
  for (auto _ : state) {
    if (!SecretMatches(*secret, given)) {
      state.SkipWithError("equal secrets do not match");
      break;
    }
  }
}
BENCHMARK(BM_SecretMatches_Equal)->Arg(64)->Arg(1024);

void BM_SecretMatches_Different(benchmark::State& state) {
  Result<std::string> secret = GenerateSecret(static_cast<int>(state.range(0)) * 4);
  if (!secret.ok()) {
    state.SkipWithError("GenerateSecret failed");
    return;
  }
  std::string given = *secret;
  given[0] = given[0] == 'a' ? 'b' : 'a';
  for (auto _ : state) {
    if (SecretMatches(*secret, given)) {
      state.SkipWithError("different secrets match");
      break;
    }
  }
}
BENCHMARK(BM_SecretMatches_Different)->Arg(64)->Arg(1024);

// A client sending the longest secret the preamble allows (close to kMaxPreambleBytes) against
// a default-length one: the cost an attacker can force per handshake.
void BM_SecretMatches_LongGiven(benchmark::State& state) {
  Result<std::string> secret = GenerateSecret(kDefaultSecretBits);
  if (!secret.ok()) {
    state.SkipWithError("GenerateSecret failed");
    return;
  }
  const std::string given(2000, 'a');
  for (auto _ : state) {
    if (SecretMatches(*secret, given)) {
      state.SkipWithError("long secret matches");
      break;
    }
  }
}
BENCHMARK(BM_SecretMatches_LongGiven);

}  // namespace
}  // namespace brokerproxy::registry
