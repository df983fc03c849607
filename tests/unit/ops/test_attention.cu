// test_attention.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_attention.cpp"
