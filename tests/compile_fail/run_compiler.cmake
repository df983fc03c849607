# Runs the C++ compiler on one source with -fsyntax-only (cmake -P script).
#   -DCOMPILER=... -DSOURCE=... -DFLAGS="a;b;c" -DMODE=fail|pass
# MODE fail: passes only if compilation fails and the output contains the text
# of the source's "// expect: <text>" line. MODE pass: passes only if it compiles.
separate_arguments(flag_list UNIX_COMMAND "${FLAGS}")
execute_process(COMMAND ${COMPILER} ${flag_list} -fsyntax-only ${SOURCE}
                RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(log "${out}${err}")
if(MODE STREQUAL "pass")
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${SOURCE} does not compile on its own:\n${log}")
  endif()
  return()
endif()
file(STRINGS ${SOURCE} expect_lines REGEX "^// expect: ")
if(NOT expect_lines)
  message(FATAL_ERROR "${SOURCE} has no '// expect: <message>' line")
endif()
list(GET expect_lines 0 expect_line)
string(REGEX REPLACE "^// expect: " "" expected "${expect_line}")
if(result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must fail with: ${expected}")
endif()
string(FIND "${log}" "${expected}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "${SOURCE} failed to compile, but without the expected message '${expected}':\n${log}")
endif()
message(STATUS "${SOURCE}: fails with '${expected}' as expected")
