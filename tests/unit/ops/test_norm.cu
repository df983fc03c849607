// test_norm.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_norm.cpp"
