# Included by CTest after the tests that gtest_discover_tests found for the Redis filter are
# added (tests/CMakeLists.txt): gives each of them the labels e2e and redis, a list that
# gtest_discover_tests' PROPERTIES would split into separate arguments.
file(STRINGS "${BP_REDIS_TESTS_FILE}" bp_lines REGEX "^add_test")
foreach(bp_line IN LISTS bp_lines)
  if(bp_line MATCHES "^add_test\\(\\[=\\[([A-Za-z0-9_./]+)\\]=\\]")
    set_tests_properties("${CMAKE_MATCH_1}" PROPERTIES LABELS "e2e;redis")
  endif()
endforeach()
