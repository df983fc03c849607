// The layers layer: model configurations, the parameter table and nn::model.
#pragma once

#include "ctformer/nn/config.hpp"
#include "ctformer/nn/model.hpp"
#include "ctformer/nn/parameters.hpp"
