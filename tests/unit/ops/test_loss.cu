// test_loss.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_loss.cpp"
