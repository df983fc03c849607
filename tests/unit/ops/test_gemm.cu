// test_gemm.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_gemm.cpp"
