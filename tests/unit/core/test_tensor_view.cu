// test_tensor_view.cpp compiled by nvcc: the same cases on cuda::par.
#include "test_tensor_view.cpp"
