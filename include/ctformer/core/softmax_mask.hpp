// softmax_mask: which keys a query may attend to; shared by kernels and ops.
#pragma once

namespace ctformer {

/// Which keys a query may see.
enum class softmax_mask {
  none,    ///< every key
  causal,  ///< query i (of Tq) sees keys j <= i + (Tk - Tq): the last query sees every key
};

}  // namespace ctformer
