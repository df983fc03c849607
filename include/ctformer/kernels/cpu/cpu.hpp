// Every CPU kernel family.
#pragma once

#include "ctformer/kernels/cpu/activation.hpp"
#include "ctformer/kernels/cpu/attention.hpp"
#include "ctformer/kernels/cpu/bias.hpp"
#include "ctformer/kernels/cpu/cached_attention.hpp"
#include "ctformer/kernels/cpu/elementwise.hpp"
#include "ctformer/kernels/cpu/embedding.hpp"
#include "ctformer/kernels/cpu/gemm.hpp"
#include "ctformer/kernels/cpu/loss.hpp"
#include "ctformer/kernels/cpu/norm.hpp"
#include "ctformer/kernels/cpu/optimizer.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/kernels/cpu/quantize_interleaved.hpp"
#include "ctformer/kernels/cpu/rope.hpp"
#include "ctformer/kernels/cpu/softmax.hpp"
#include "ctformer/kernels/cpu/sparse_gemv.hpp"
#include "ctformer/kernels/cpu/swiglu.hpp"
