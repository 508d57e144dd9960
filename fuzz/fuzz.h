// Shared by the libFuzzer targets in this directory.
//
// Each target defines LLVMFuzzerTestOneInput over one parser of untrusted input and checks the
// parser's contract with FUZZ_CHECK, so a wrong answer fails like a crash. The same source is
// linked two ways (fuzz/CMakeLists.txt): with libFuzzer for scripts/fuzz.sh (clang), and with
// replay_main.cc into the normal test build, where CTest replays the seed corpus
// fuzz/corpus/<target>/ through it under ASan and UBSan.

#ifndef BROKERPROXY_FUZZ_FUZZ_H_
#define BROKERPROXY_FUZZ_FUZZ_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace brokerproxy::fuzz {

inline std::string_view AsText(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

}  // namespace brokerproxy::fuzz

#endif  // BROKERPROXY_FUZZ_FUZZ_H_
