// kernels/cpu/isa.hpp: its constants agree with the compiler's target macros,
// the kernel choices that callers read follow them, and no other header under
// include/ reads the compiler's instruction-set macros itself.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "../../support/test_data.hpp"

namespace isa = ctformer::cpu::isa;
namespace cpu = ctformer::cpu;

TEST_CASE("the isa constants agree with the compiler's target macros", "[ops][isa]") {
#if defined(__AVX2__) && defined(__FMA__)
  constexpr bool avx2 = true;
#else
  constexpr bool avx2 = false;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
  constexpr bool avx512 = avx2;
#else
  constexpr bool avx512 = false;
#endif
#if defined(__AVX512BF16__)
  constexpr bool bf16 = avx512;
#else
  constexpr bool bf16 = false;
#endif
#if defined(__AVX512VNNI__)
  constexpr bool vnni = avx512;
#else
  constexpr bool vnni = false;
#endif
#if defined(__F16C__)
  constexpr bool f16c = true;
#else
  constexpr bool f16c = false;
#endif
  STATIC_REQUIRE(isa::avx2 == avx2);
  STATIC_REQUIRE(isa::avx512 == avx512);
  STATIC_REQUIRE(isa::avx512_bf16 == bf16);
  STATIC_REQUIRE(isa::avx512_vnni == vnni);
  STATIC_REQUIRE(isa::f16c == f16c);
  STATIC_REQUIRE(!isa::name.empty());
  STATIC_REQUIRE((isa::name == "portable") == (!avx2 && !f16c));
  INFO("build: " << isa::name);
  SUCCEED();
}

TEST_CASE("the compile-time kernel choices follow the isa constants", "[ops][isa]") {
  STATIC_REQUIRE(cpu::gemm_bf16_native_impl(nullptr) == isa::avx512_bf16);
  STATIC_REQUIRE(cpu::interleave_q8_0_impl(nullptr) == (isa::avx512_vnni || (isa::avx2 && !isa::avx512)));
  CHECK(cpu::bf16_cache_rounds_query(64) == isa::avx512_bf16);
  CHECK(cpu::int8_cache_rounds_query(64) == isa::avx512_vnni);
  CHECK_FALSE(cpu::int8_cache_rounds_query(48));
}

// The one place that reads __AVX*__, __FMA__ and __F16C__ is isa.hpp; a
// kernel that tested them itself could disagree with the rest on what a
// build has.
TEST_CASE("no header but isa.hpp reads the compiler's instruction-set macros", "[ops][isa]") {
  namespace fs = std::filesystem;
  const fs::path include = fs::path(CTFORMER_TEST_DATA_DIR) / ".." / ".." / "include";
  REQUIRE(fs::is_directory(include / "ctformer"));
  const fs::path decider = fs::canonical(include / "ctformer" / "kernels" / "cpu" / "isa.hpp");
  std::vector<std::string> offenders;
  int headers = 0;
  for (const auto& entry : fs::recursive_directory_iterator(include)) {
    if (!entry.is_regular_file() || fs::canonical(entry.path()) == decider) continue;
    ++headers;
    std::ifstream in(entry.path());
    std::string line;
    for (int number = 1; std::getline(in, line); ++number)
      for (const char* macro : {"__AVX", "__FMA__", "__F16C__"})
        if (line.find(macro) != std::string::npos)
          offenders.push_back(entry.path().lexically_relative(include).string() + ":" + std::to_string(number) + ": " +
                              line);
  }
  CHECK(headers > 50);
  std::ostringstream list;
  for (const std::string& o : offenders) list << o << "\n";
  INFO(list.str());
  CHECK(offenders.empty());
}
