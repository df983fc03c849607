// test_elementwise.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_elementwise.cpp"
