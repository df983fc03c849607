// A program built against the installed ctformer package: one policy-templated
// GEMM on the CPU, checked against a loop.
#include <cmath>
#include <cstdio>

#include <ctformer/ctformer.hpp>

int main() {
  using namespace ctformer;
  buffer<float> a(4 * 3), b(3 * 2), c(4 * 2);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(i) * 0.5f;
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = 1.0f - float(i);
  ops::gemm(cpu::par, a.view(4, 3), b.view(3, 2), c.view(4, 2));
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      float expected = 0;
      for (int p = 0; p < 3; ++p) expected += a[i * 3 + p] * b[p * 2 + j];
      if (std::fabs(c[i * 2 + j] - expected) > 1e-5f) {
        std::printf("consumer: gemm mismatch at (%d, %d)\n", i, j);
        return 1;
      }
    }
  std::printf("consumer: ctformer %s works from the installed package\n", "0.1");
  return 0;
}
