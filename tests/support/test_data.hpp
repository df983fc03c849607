// Where the test programs find their data: the build passes each folder
// relative to the test program's own folder (so that every clone compiles
// the same flags, and ccache's objects serve them all); these macros give
// the absolute path, from wherever the program is started.
#pragma once

#include <filesystem>
#include <string>
#include <system_error>

namespace ctformer::testing {

/// `relative` resolved against the folder of the running program.
inline std::string beside_executable(const char* relative) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return relative;
  return (self.parent_path() / relative).lexically_normal().string();
}

}  // namespace ctformer::testing

/// tests/data: the references the tests compare with.
#define CTFORMER_TEST_DATA_DIR ::ctformer::testing::beside_executable(CTFORMER_TEST_DATA_RELATIVE)
/// data/: tiny Shakespeare.
#define CTFORMER_DATA_DIR ::ctformer::testing::beside_executable(CTFORMER_DATA_RELATIVE)
/// ../shared/data: optional larger data (checks that need it say when they skip).
#define CTFORMER_SHARED_DATA_DIR ::ctformer::testing::beside_executable(CTFORMER_SHARED_DATA_RELATIVE)
