// test_cuda_policy.cpp compiled by nvcc: the same cases on cuda::par, plus the CUDA-only ones.
#include "test_cuda_policy.cpp"
