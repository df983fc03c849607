// The core layer: errors, number types, tensor views and owning buffers.
#pragma once

#include "ctformer/core/buffer.hpp"
#include "ctformer/core/error.hpp"
#include "ctformer/core/fixed_view.hpp"
#include "ctformer/core/logits_scan.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/core/parameter_range.hpp"
#include "ctformer/core/softmax_mask.hpp"
#include "ctformer/core/tensor_view.hpp"
