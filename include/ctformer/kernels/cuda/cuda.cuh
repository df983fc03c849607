// Every CUDA kernel family (compiled only by nvcc): the cuda::par_t hooks
// (`<op>_impl`) that ops/ finds by argument-dependent lookup.
#pragma once

#if !defined(__CUDACC__)
#error "ctformer/kernels/cuda/cuda.cuh needs nvcc: compile this translation unit as CUDA (a .cu file)"
#endif

#include "ctformer/exec/cuda.hpp"
#include "ctformer/kernels/cuda/activation.cuh"
#include "ctformer/kernels/cuda/attention.cuh"
#include "ctformer/kernels/cuda/bias.cuh"
#include "ctformer/kernels/cuda/cached_attention.cuh"
#include "ctformer/kernels/cuda/elementwise.cuh"
#include "ctformer/kernels/cuda/embedding.cuh"
#include "ctformer/kernels/cuda/gemm.cuh"
#include "ctformer/kernels/cuda/kv_write.cuh"
#include "ctformer/kernels/cuda/loss.cuh"
#include "ctformer/kernels/cuda/norm.cuh"
#include "ctformer/kernels/cuda/softmax.cuh"
#include "ctformer/kernels/cuda/swiglu.cuh"
