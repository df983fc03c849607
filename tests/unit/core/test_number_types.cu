// test_number_types.cpp compiled by nvcc: the host conversions as nvcc compiles them (the same header the device uses).
#include "test_number_types.cpp"
