// The quant layer: weight formats (q8_0, q4_0, int8_rowwise, bf16, fp32), the
// weight_format concept, packed matrices, and the operations on them.
#pragma once

#include "ctformer/ops/ops.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "ctformer/quant/matrix_storage.hpp"
#include "ctformer/quant/packed_matrix.hpp"
#include "ctformer/quant/sparse_formats.hpp"
