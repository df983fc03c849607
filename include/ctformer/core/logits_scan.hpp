// logits_scan: what one pass over a row of logits finds (the sampler's input
// checks and its greedy answer); shared by kernels and ops.
#pragma once

#include <limits>

#include "ctformer/core/tensor_view.hpp"

namespace ctformer {

/// The largest logit and where it first occurs, the lowest finite logit, and
/// whether any logit is NaN or +inf (which no distribution can be built from).
/// Where the row has a NaN, the other fields are unspecified.
struct logits_scan {
  index_t argmax = 0;  ///< the first index holding `max` (0 for a row of -inf)
  float max = -std::numeric_limits<float>::infinity();
  float lowest_finite = std::numeric_limits<float>::infinity();  ///< +inf when no logit is finite
  bool nan_or_positive_infinity = false;
};

}  // namespace ctformer
