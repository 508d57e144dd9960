#include "support/tcp_segments.h"

// The kernel's tcp_info: glibc's copy in <netinet/tcp.h> stops before the segment counters,
// and the two headers cannot be included together, so this file has the kernel's alone.
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>

namespace brokerproxy::testing {

uint32_t DataSegmentsIn(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return 0;
  if (len < offsetof(tcp_info, tcpi_data_segs_in) + sizeof(info.tcpi_data_segs_in)) return 0;
  return info.tcpi_data_segs_in;
}

}  // namespace brokerproxy::testing
