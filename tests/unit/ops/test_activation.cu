// test_activation.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_activation.cpp"
