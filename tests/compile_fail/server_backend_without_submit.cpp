// serve::server over a backend type that cannot submit a request.
// expect: Backend must provide encode(text), token_text(token), context_length()
#include <string>
#include <vector>

#include "ctformer/serve/server.hpp"

struct tokenizer_only {
  std::vector<std::int32_t> encode(const std::string&) const { return {}; }
  std::string token_text(std::int32_t) const { return {}; }
  std::int64_t context_length() const { return 0; }
};

int main() { ctformer::serve::server<tokenizer_only> http; }
