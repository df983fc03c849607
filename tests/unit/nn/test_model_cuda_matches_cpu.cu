// The whole model on cuda::par against the same model on cpu::par: the same
// seed gives the same parameters, and one forward + backward gives the same
// loss, logits and gradients within stated tolerances, for a GPT-2-style and
// a LLaMA-style configuration, fp32 and bf16 compute. The CUDA step is also
// deterministic (no atomics in its kernels): two runs give the same bits.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ctformer/nn/nn.hpp"

using namespace ctformer;

namespace {

struct gpt_small_test {  // layer_norm, GELU, learned positions, biases, tied head
  static constexpr int vocab = 97, d_model = 64, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 160, max_seq = 40;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
struct llama_small_test {  // rms_norm, SwiGLU, RoPE, GQA (4 query heads on 2), untied head
  static constexpr int vocab = 83, d_model = 64, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 96, max_seq = 40;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

template <class T>
std::vector<T> to_host(tensor_view<const T, 1> device_values) {
  std::vector<T> host(std::size_t(device_values.extent(0)));
  ops::copy(ctformer::cuda::par, device_values, tensor_view<T, 1>(host.data(), {device_values.extent(0)}));
  ctformer::cuda::par.synchronize();
  return host;
}

/// Largest |a - b| over one parameter tensor, divided by the largest |b| in it:
/// a tensor's error measured against its own scale, so tiny gradients of one
/// tensor are not judged by the size of another's.
double worst_scaled_difference(const std::vector<float>& a, const std::vector<float>& b, index_t offset, index_t size) {
  double largest = 0, worst = 0;
  for (index_t i = offset; i < offset + size; ++i) largest = std::max(largest, std::fabs(double(b[std::size_t(i)])));
  for (index_t i = offset; i < offset + size; ++i)
    worst = std::max(worst, std::fabs(double(a[std::size_t(i)]) - double(b[std::size_t(i)])));
  return largest > 0 ? worst / largest : worst;
}

/// Checks every parameter's gradient tensor of the two models against each
/// other, each within `tolerance` of its own largest host value.
template <class HostModel, class DeviceModel>
void check_gradients(HostModel& host_model, DeviceModel& device_model, double tolerance) {
  const index_t count = host_model.gradient_count();
  REQUIRE(device_model.gradient_count() == count);
  const std::vector<float> host_gradients(host_model.gradients().data(), host_model.gradients().data() + count);
  const std::vector<float> device_gradients = to_host(as_const(device_model.gradients()));
  for (std::size_t i = 0; i < host_model.parameter_table().size(); ++i) {
    const auto& p = host_model.parameter_table()[i];
    INFO("gradient of " << p.name);
    REQUIRE(device_model.gradient_offset(i) == host_model.gradient_offset(i));
    if (host_model.gradient_offset(i) < 0) continue;  // frozen: no gradient on either side
    CHECK(worst_scaled_difference(device_gradients, host_gradients, host_model.gradient_offset(i), p.size()) <=
          tolerance);
  }
}

// LoRA on the fused q/k/v rows, the output projection and a gated MLP's gate
// and down rows, base frozen as an adapted model starts: the adapters' strided
// products and the backward that skips frozen weights, on both policies.
using llama_lora_test =
    nn::with_lora<llama_small_test, nn::lora<4, nn::lora_target::q | nn::lora_target::v | nn::lora_target::o |
                                                    nn::lora_target::gate | nn::lora_target::down,
                                                8.0f>>;

}  // namespace

TEMPLATE_TEST_CASE("the model on cuda::par matches the model on cpu::par", "[nn][model][cuda]", gpt_small_test,
                   llama_small_test, llama_lora_test) {
  using Cfg = TestType;
  nn::model<Cfg, cpu::par_t> host_model(cpu::par.with_threads(1), 11);
  nn::model<Cfg, ctformer::cuda::par_t> device_model(ctformer::cuda::par, 11);
  if constexpr (nn::config_traits<Cfg>::has_adapters) {
    // B starts at zero, which would leave A's gradient zero: give B values
    // (the same on both sides) so every adapter product is checked.
    std::vector<float> values(host_model.parameters().data(),
                              host_model.parameters().data() + host_model.parameter_count());
    for (const auto& p : host_model.parameter_table())
      if (p.name.ends_with(".b"))
        for (index_t i = 0; i < p.size(); ++i) values[std::size_t(p.offset + i)] = 0.01f * float((i * 7) % 13) - 0.06f;
    std::copy(values.begin(), values.end(), host_model.parameters().data());
    ops::copy(ctformer::cuda::par, tensor_view<const float, 1>(values.data(), {host_model.parameter_count()}),
              device_model.parameters());
    ctformer::cuda::par.synchronize();
    host_model.parameters_changed();
    device_model.parameters_changed();
  }
  REQUIRE(device_model.parameter_count() == host_model.parameter_count());
  const index_t count = host_model.parameter_count();
  const std::vector<float> host_parameters(host_model.parameters().data(), host_model.parameters().data() + count);
  CHECK(to_host(as_const(device_model.parameters())) == host_parameters);  // same seed, same host RNG, copied up

  // A ragged batch: 3 sequences of 37 positions (not a multiple of any tile),
  // with a few targets of -1 that the loss must skip.
  const index_t b = 3, t = 37;
  std::vector<std::int32_t> inputs(std::size_t(b * t)), targets(std::size_t(b * t));
  std::mt19937 rng(5);
  for (auto& x : inputs) x = std::int32_t(rng() % Cfg::vocab);
  for (auto& x : targets) x = std::int32_t(rng() % Cfg::vocab);
  targets[4] = targets[40] = targets[100] = -1;
  const tensor_view<const std::int32_t, 2> in(inputs.data(), {b, t}), tgt(targets.data(), {b, t});

  SECTION("fp32 compute: loss, logits and every gradient tensor") {
    // Tolerance: both sides accumulate in fp32, in different orders (cuBLASLt
    // tiles against the CPU micro-kernel; warp reductions against sequential
    // sums) over at most d_ff = 160 terms per product, about 160 * 2^-24 =
    // 1e-5 relative in the worst case; the backward chains a dozen such steps.
    // 1e-4 of each tensor's own largest value leaves that a 10x margin and
    // still catches a wrong index, a missed scale or a dropped term (>= 1e-2).
    const float host_loss = host_model.template forward_backward<float>(in, tgt);
    const float device_loss = device_model.template forward_backward<float>(in, tgt);
    CHECK(device_loss == Approx(host_loss).epsilon(1e-5));
    check_gradients(host_model, device_model, 1e-4);

    const auto host_logits = host_model.template logits<float>(in);
    const auto device_logits = device_model.template logits<float>(in);
    const index_t n = b * t * Cfg::vocab;
    const std::vector<float> host_values(host_logits.data(), host_logits.data() + n);
    const std::vector<float> device_values = to_host(tensor_view<const float, 1>(device_logits.data(), {n}));
    CHECK(worst_scaled_difference(device_values, host_values, 0, n) <= 1e-5);
  }

  SECTION("bf16 compute: loss and gradients") {
    // Both sides round the same GEMM operands to bf16 (round to nearest even)
    // and accumulate in fp32, but an activation that lands on the other side
    // of a bf16 rounding boundary moves by one bf16 step (2^-8 relative) and
    // carries that through the later layers. 2e-2 of each tensor's scale
    // covers a few such steps; the loss, an average, agrees to 1e-3.
    const float host_loss = host_model.template forward_backward<bf16>(in, tgt);
    const float device_loss = device_model.template forward_backward<bf16>(in, tgt);
    CHECK(device_loss == Approx(host_loss).epsilon(1e-3));
    check_gradients(host_model, device_model, 2e-2);
  }

  SECTION("the CUDA step is deterministic: the same batch twice gives the same bits") {
    device_model.zero_gradients();
    const float first_loss = device_model.template forward_backward<float>(in, tgt);
    const std::vector<float> first = to_host(as_const(device_model.gradients()));
    device_model.zero_gradients();
    const float second_loss = device_model.template forward_backward<float>(in, tgt);
    const std::vector<float> second = to_host(as_const(device_model.gradients()));
    CHECK(first_loss == second_loss);
    CHECK(first == second);
  }
}
