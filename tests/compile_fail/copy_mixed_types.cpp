// ops::copy between different number types (convert is the operation for that).
// expect: copy needs the same number type on both sides
#include "ctformer/ctformer.hpp"

int main() {
  ctformer::buffer<float> a(4);
  ctformer::buffer<ctformer::bf16> b(4);
  ctformer::ops::copy(ctformer::cpu::par, a.view(4), b.view(4));
}
