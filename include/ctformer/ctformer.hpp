// ctformer: everything on the CPU side (every layer from core/ to io/), plus
// the CUDA policy and kernels when the including translation unit is compiled
// by nvcc. Include single layer headers instead to compile faster.
#pragma once

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"
#include "ctformer/quant/quant.hpp"
#include "ctformer/nn/nn.hpp"
#include "ctformer/train/addition_task.hpp"
#include "ctformer/train/clipping.hpp"
#include "ctformer/train/metrics.hpp"
#include "ctformer/train/optimizer.hpp"
#include "ctformer/train/precision.hpp"
#include "ctformer/train/schedule.hpp"
#include "ctformer/train/trainer.hpp"
#include "ctformer/infer/generate.hpp"
#include "ctformer/infer/inference_model.hpp"
#include "ctformer/infer/kv_cache.hpp"
#include "ctformer/infer/sampler.hpp"
#include "ctformer/compress/post_training_quantization.hpp"
#include "ctformer/compress/pruning.hpp"
#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/model_checkpoint.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"
#include "ctformer/io/safetensors.hpp"
#include "ctformer/io/text_dataset.hpp"
#include "ctformer/io/tokenizer.hpp"
