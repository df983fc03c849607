// Precision policies for training: the number type the forward and backward
// passes compute in; master weights, gradients and optimizer state stay fp32.
#pragma once

#include <concepts>
#include <string_view>
#include <type_traits>

#include "ctformer/core/number_types.hpp"

namespace ctformer::train {

/// Everything in fp32.
struct fp32 {
  using compute_type = float;  ///< what GEMMs read weights and activations as
  using master_type = float;   ///< what the optimizer updates
  static constexpr std::string_view name = "fp32";
  /// No bf16/fp16 copy of the weights to refresh after each step.
  static constexpr bool needs_compute_copy = false;
};

/// bf16 compute with fp32 master weights: after each optimizer step the fp32
/// parameters are converted (ops::convert, round to nearest even) into a bf16
/// copy that the forward and backward GEMMs read. bf16 has fp32's exponent
/// range, so no loss scaling is needed (fp16 would need it).
struct bf16_mixed {
  using compute_type = ctformer::bf16;
  using master_type = float;
  static constexpr std::string_view name = "bf16";
  static constexpr bool needs_compute_copy = true;
};

/// A precision policy: a compute number type and fp32 master weights.
template <class P>
concept precision_policy = requires {
  typename P::compute_type;
  typename P::master_type;
  { P::name } -> std::convertible_to<std::string_view>;
  { P::needs_compute_copy } -> std::convertible_to<bool>;
} && number_type<typename P::compute_type> && std::is_same_v<typename P::master_type, float> &&
                           (P::needs_compute_copy == !std::is_same_v<typename P::compute_type, float>);

static_assert(precision_policy<fp32> && precision_policy<bf16_mixed>);

}  // namespace ctformer::train
