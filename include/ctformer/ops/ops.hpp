// The public operations with every kernel they dispatch to: include this
// (or ctformer.hpp) rather than a single ops/ header, so the CPU and (under
// nvcc) CUDA hooks are visible when an operation is instantiated.
#pragma once

#include "ctformer/kernels/cpu/cpu.hpp"
#if defined(__CUDACC__)
#include "ctformer/kernels/cuda/cuda.cuh"
#endif
#include "ctformer/ops/activation.hpp"
#include "ctformer/ops/attention.hpp"
#include "ctformer/ops/bias.hpp"
#include "ctformer/ops/cached_attention.hpp"
#include "ctformer/ops/elementwise.hpp"
#include "ctformer/ops/embedding.hpp"
#include "ctformer/ops/gemm.hpp"
#include "ctformer/ops/kv_write.hpp"
#include "ctformer/ops/linear.hpp"
#include "ctformer/ops/loss.hpp"
#include "ctformer/ops/norm.hpp"
#include "ctformer/ops/optimizer.hpp"
#include "ctformer/ops/quantize.hpp"
#include "ctformer/ops/softmax.hpp"
#include "ctformer/ops/swiglu.hpp"
