// test_softmax.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_softmax.cpp"
