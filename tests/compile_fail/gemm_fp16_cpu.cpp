// ops::gemm with fp16 inputs on the CPU: only float and bf16 inputs exist there.
// expect: gemm has no implementation for this execution policy and these number types
#include "ctformer/ctformer.hpp"

int main() {
  ctformer::buffer<ctformer::fp16> a(4), b(4);
  ctformer::buffer<float> c(4);
  ctformer::ops::gemm(ctformer::cpu::par, a.view(2, 2), b.view(2, 2), c.view(2, 2));
}
