// softmax_forward into a read-only view: the output must be writable.
// expect: writable_view
#include "ctformer/ctformer.hpp"

int main() {
  ctformer::buffer<float> x(8);
  const ctformer::buffer<float>& read_only = x;
  ctformer::ops::softmax_forward(ctformer::cpu::par, x.view(1, 2, 4), read_only.view(1, 2, 4));
}
