// Every CUDA kernel family (compiled only by nvcc).
#pragma once

#include "ctformer/exec/cuda.hpp"
