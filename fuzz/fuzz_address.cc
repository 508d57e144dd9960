// Address and duration text (loop/address.h): host:port endpoints, CIDR lists and durations,
// from config.ini, --set and command-line flags. What parses must print back to text that
// parses to the same value.

#include <netinet/in.h>

#include <string>

#include "fuzz.h"
#include "loop/address.h"

using brokerproxy::Cidr;
using brokerproxy::FormatDuration;
using brokerproxy::HostPort;
using brokerproxy::ParseDuration;
using brokerproxy::ParseHostPort;
using brokerproxy::SplitList;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text = brokerproxy::fuzz::AsText(data, size);

  auto hp = ParseHostPort(text, std::nullopt, "127.0.0.1", /*allow_zero=*/true);
  if (hp.ok()) {
    FUZZ_CHECK(hp->port >= 0 && hp->port <= 65535 && !hp->host.empty());
    auto again = ParseHostPort(hp->ToString(), std::nullopt, "127.0.0.1", true);
    FUZZ_CHECK(again.ok() && *again == *hp);
  }
  auto with_default = ParseHostPort(text, 7000);
  if (with_default.ok()) FUZZ_CHECK(with_default->port >= 1 && with_default->port <= 65535);

  auto list = SplitList(text);
  if (list.ok()) {
    for (const std::string& item : *list) {
      FUZZ_CHECK(!item.empty() && item.front() != ' ' && item.back() != ' ');
    }
  }

  auto cidr = Cidr::Parse(text);
  if (cidr.ok()) {
    auto again = Cidr::Parse(cidr->ToString());
    FUZZ_CHECK(again.ok() && again->ToString() == cidr->ToString());
    sockaddr_in v4{};
    v4.sin_family = AF_INET;
    v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sockaddr_in6 v6{};
    v6.sin6_family = AF_INET6;
    v6.sin6_addr = in6addr_loopback;
    cidr->Contains(reinterpret_cast<const sockaddr*>(&v4));
    cidr->Contains(reinterpret_cast<const sockaddr*>(&v6));
  }

  auto ms = ParseDuration(text);
  if (ms.ok()) {
    FUZZ_CHECK(*ms >= 0);
    auto again = ParseDuration(FormatDuration(*ms));
    FUZZ_CHECK(again.ok() && *again == *ms);
  }
  return 0;
}
