// test_embedding.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_embedding.cpp"
