// Counting what TCP did on a test's socket, for tests about segments rather than bytes.

#ifndef BROKERPROXY_TESTS_SUPPORT_TCP_SEGMENTS_H_
#define BROKERPROXY_TESTS_SUPPORT_TCP_SEGMENTS_H_

#include <cstdint>

namespace brokerproxy::testing {

// Segments carrying data that the connected TCP socket `fd` has received (TCP_INFO's
// tcpi_data_segs_in); 0 if it cannot be read.
uint32_t DataSegmentsIn(int fd);

}  // namespace brokerproxy::testing

#endif  // BROKERPROXY_TESTS_SUPPORT_TCP_SEGMENTS_H_
