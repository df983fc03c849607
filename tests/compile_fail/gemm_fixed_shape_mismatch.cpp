// Multiplying fixed_views whose inner dimensions differ: caught while compiling.
// expect: the columns of a (M, K) must equal the rows of b (K, N)
#include "ctformer/ctformer.hpp"

int main() {
  float a[6], b[8], c[8];
  ctformer::ops::gemm(ctformer::cpu::par, ctformer::fixed_view<float, 2, 3>(a), ctformer::fixed_view<float, 4, 2>(b),
                      ctformer::fixed_view<float, 2, 4>(c));
}
