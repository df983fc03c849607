// embedding_forward with int64 token ids.
// expect: token ids are int32
#include <cstdint>

#include "ctformer/ctformer.hpp"

int main() {
  ctformer::buffer<std::int64_t> tokens(2);
  ctformer::buffer<float> table(6), out(6);
  ctformer::ops::embedding_forward(ctformer::cpu::par, tokens.view(2), table.view(2, 3), out.view(2, 3));
}
