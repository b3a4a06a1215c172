#pragma once

/// StyleInject: parameter-efficient fine-tuning of LibTorch models with
/// multi-branch, style-routed low-rank adapters and a variance gate.
/// Including this header gives the whole library.

#include <styleinject/conv2d.h>
#include <styleinject/functional.h>
#include <styleinject/inject.h>
#include <styleinject/layer.h>
#include <styleinject/linear.h>
#include <styleinject/lora_files.h>
#include <styleinject/options.h>
#include <styleinject/safetensors.h>
#include <styleinject/serialize.h>
#include <styleinject/version.h>
