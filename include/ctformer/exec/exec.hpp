// The execution layer: cpu::par always; cuda::par when compiled by nvcc.
#pragma once

#include "ctformer/exec/cpu.hpp"
#include "ctformer/exec/execution_policy.hpp"
#if defined(__CUDACC__)
#include "ctformer/exec/cuda.hpp"
#endif
