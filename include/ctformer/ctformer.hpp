// ctformer: everything on the CPU side, plus the CUDA side when compiled by nvcc.
#pragma once

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"
