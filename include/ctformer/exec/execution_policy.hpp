// The execution_policy concept every policy (cpu::par, cuda::par) satisfies.
#pragma once

#include <concepts>

#include "ctformer/core/buffer.hpp"

namespace ctformer {

/// An execution policy names where operations run and which memory space
/// their tensors live in. Operations take it as first argument and pick
/// their kernel by overload resolution on its type.
template <class P>
concept execution_policy = requires(const P& exec) {
  typename P::memory_space;
  requires memory_space<typename P::memory_space>;
  exec.synchronize();
};

/// The buffer type that holds T in the memory space of policy P.
template <class T, execution_policy P>
using buffer_for = buffer<T, typename P::memory_space>;

}  // namespace ctformer
