// A buffer of a type that is not trivially copyable.
// expect: buffer holds trivially copyable elements only
#include <string>

#include "ctformer/ctformer.hpp"

int main() { ctformer::buffer<std::string> names(3); }
