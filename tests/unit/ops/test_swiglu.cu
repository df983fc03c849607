// test_swiglu.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_swiglu.cpp"
