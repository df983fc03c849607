// ops::gemm with an execution policy type that no backend implements.
// expect: gemm has no implementation for this execution policy
#include "ctformer/ctformer.hpp"

namespace elsewhere {
struct my_policy {
  using memory_space = ctformer::host_space;
  void synchronize() const {}
};
}  // namespace elsewhere

int main() {
  ctformer::buffer<float> a(4), b(4), c(4);
  ctformer::ops::gemm(elsewhere::my_policy{}, a.view(2, 2), b.view(2, 2), c.view(2, 2));
}
