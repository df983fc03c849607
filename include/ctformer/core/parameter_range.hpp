// What an optimizer is told about the flat parameter buffer: which ranges get
// weight decay, named views for checkpoints, and the per-step coefficients the
// fused update kernels take (shared by every backend, so it lives in core).
#pragma once

#include <cstdint>
#include <string>

#include "ctformer/core/tensor_view.hpp"

namespace ctformer {

/// One contiguous slice of the flat parameter buffer (a whole tensor, or
/// several adjacent tensors of the same kind) and whether weight decay
/// applies to it. nn/ produces a list of these, sorted by offset and
/// non-overlapping; elements covered by no range are updated without decay.
struct parameter_range {
  index_t offset = 0;  ///< first element, in elements from the buffer start
  index_t size = 0;    ///< number of elements
  bool decay = true;   ///< false for norms, biases and embeddings (by default)
};

/// A named, flat float tensor: how optimizer state (and anything else that is
/// one contiguous float buffer) is handed to checkpoints without the layers
/// above knowing each other.
struct named_tensor {
  std::string name;
  tensor_view<float, 1> data;  // (n)
};

/// The scalars of one AdamW update, as the kernels take them.
/// PyTorch's formula: p *= 1 - lr*wd (decay ranges only);
/// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
struct adamw_coefficients {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  std::int64_t step = 1;    ///< 1-based step count t used for bias correction
  float grad_scale = 1.0f;  ///< every gradient is multiplied by this first (clipping, 1/loss-scale) in the same pass
  bool decay_all = false;   ///< true: decay every element, ignoring the ranges' flags
};

/// The scalars of one SGD-with-momentum update (PyTorch's formula, dampening 0):
/// g = grad_scale*grad + wd*p (decay ranges only; L2, coupled as in torch.optim.SGD);
/// buf = momentum*buf + g; p -= lr * (nesterov ? g + momentum*buf : buf).
struct sgd_coefficients {
  float lr = 1e-2f;
  float momentum = 0.9f;
  float weight_decay = 0.0f;
  bool nesterov = false;
  float grad_scale = 1.0f;
  bool decay_all = false;
};

}  // namespace ctformer
