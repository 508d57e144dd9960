# Included by CTest after the tests that gtest_discover_tests found for the Slurm filter are
# added (tests/CMakeLists.txt): gives each of them the labels slurm and e2e, a list that
# gtest_discover_tests' PROPERTIES would split into separate arguments.
file(STRINGS "${BP_SLURM_TESTS_FILE}" bp_lines REGEX "^add_test")
foreach(bp_line IN LISTS bp_lines)
  if(bp_line MATCHES "^add_test\\(\\[=\\[([A-Za-z0-9_./]+)\\]=\\]")
    set(bp_test "${CMAKE_MATCH_1}")
    # A test that waits for Slurm's own clock (a time limit) takes minutes: also `slow`.
    if(bp_test MATCHES "TimeLimit")
      set_tests_properties("${bp_test}" PROPERTIES LABELS "slurm;e2e;slow")
    else()
      set_tests_properties("${bp_test}" PROPERTIES LABELS "slurm;e2e")
    endif()
  endif()
endforeach()
