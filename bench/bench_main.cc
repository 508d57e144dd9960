// The one main() of brokerproxy_bench. Like Google Benchmark's own main, plus a loud warning
// when the numbers cannot mean anything: a build without optimisation, or with assertions on.

#include <benchmark/benchmark.h>

#include <cstdio>

namespace {

void WarnIfUnoptimized() {
#if !defined(__OPTIMIZE__)
  std::fprintf(stderr,
               "WARNING: brokerproxy_bench was built without optimisation; timings are not "
               "meaningful (configure with -DCMAKE_BUILD_TYPE=Release).\n");
  benchmark::AddCustomContext("brokerproxy_build", "unoptimized");
#endif
#if !defined(NDEBUG)
  std::fprintf(stderr,
               "WARNING: brokerproxy_bench was built with assertions enabled (NDEBUG undefined); "
               "timings include debug checks.\n");
  benchmark::AddCustomContext("brokerproxy_asserts", "on");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  WarnIfUnoptimized();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
