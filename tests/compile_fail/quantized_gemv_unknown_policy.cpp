// ops::quantized_gemv with a policy that has no packed-weight kernel (as
// cuda::par has none yet: see test_cuda_policy's CPU-only case).
// expect: quantized_gemv has no implementation for this execution policy and weight format
#include "ctformer/ctformer.hpp"

namespace elsewhere {
struct my_policy {
  using memory_space = ctformer::host_space;
  void synchronize() const {}
};
}  // namespace elsewhere

int main() {
  ctformer::quant::packed_matrix<ctformer::quant::q8_0> w(4, 32);
  ctformer::buffer<float> x(32), y(4);
  ctformer::ops::quantized_gemv(elsewhere::my_policy{}, w, ctformer::as_const(x.view(32)), y.view(4));
}
