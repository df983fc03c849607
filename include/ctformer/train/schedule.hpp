// Learning-rate schedules: constant, and linear warmup + cosine decay to a
// floor (nanoGPT's get_lr). A schedule is a callable: step -> learning rate.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>

namespace ctformer::train {

/// Anything that maps a 0-based step to a learning rate.
template <class S>
concept lr_schedule = requires(const S& s, std::int64_t step) {
  { s(step) } -> std::convertible_to<float>;
};

/// The same learning rate at every step.
struct constant_schedule {
  float lr = 1e-3f;
  float operator()(std::int64_t) const { return lr; }
};

/// nanoGPT's schedule (train.py, get_lr), for 0-based step `it`:
///   it < warmup:        max_lr * (it + 1) / (warmup + 1)
///   it > decay_steps:   min_lr
///   otherwise:          min_lr + 0.5 (1 + cos(pi r)) (max_lr - min_lr),
///                       r = (it - warmup) / (decay_steps - warmup)
/// so the first step already has a non-zero rate and the rate reaches max_lr
/// at it = warmup and min_lr at it = decay_steps (nanoGPT sets decay_steps to
/// the number of iterations). Computed in double, returned as float.
struct warmup_cosine_schedule {
  float max_lr = 1e-3f;
  float min_lr = 1e-4f;
  std::int64_t warmup_steps = 100;
  std::int64_t decay_steps = 2000;  ///< step at which min_lr is reached (nanoGPT's lr_decay_iters)

  float operator()(std::int64_t it) const {
    if (it < warmup_steps) return float(double(max_lr) * double(it + 1) / double(warmup_steps + 1));
    if (it > decay_steps || decay_steps <= warmup_steps) return min_lr;
    const double ratio = double(it - warmup_steps) / double(decay_steps - warmup_steps);
    const double coefficient = 0.5 * (1.0 + std::cos(std::numbers::pi * ratio));
    return float(double(min_lr) + coefficient * (double(max_lr) - double(min_lr)));
  }
};

static_assert(lr_schedule<constant_schedule> && lr_schedule<warmup_cosine_schedule>);

}  // namespace ctformer::train
