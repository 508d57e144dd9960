// config.ini (cli/options.h): read by every command, the daemon included. Bad input must be an
// error naming the file, never a crash.

#include <string>

#include "cli/options.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text = brokerproxy::fuzz::AsText(data, size);
  brokerproxy::cli::Config config = brokerproxy::cli::DefaultConfig();
  brokerproxy::Status s = brokerproxy::cli::ParseConfigText(text, "fuzz.ini", &config);
  if (!s.ok()) {
    FUZZ_CHECK(s.message().find("fuzz.ini") != std::string::npos);
  } else {
    brokerproxy::cli::Finalize(&config);
  }
  return 0;
}
