// Activation checkpointing of one decoder layer (docs/OWNER_GUIDE.md "Memory"): the forward keeps
// only the layer's input; the backward runs the layer again, with a graph, and takes its gradients
// from that. The memory of the activations drops from every layer's to one layer's, for one more
// forward per step. FlexOlmoModel::ForwardHidden uses it when the model's activation checkpointing
// is on.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/model/model.h"

namespace flexfed {

struct CheckpointedLayerOutput {
  at::Tensor hidden;          // [B, T, H], with a graph to the layer's input and trained tensors
  at::Tensor router_logits;   // [N, E] fp32, with a graph (for the router z-loss); undefined when dense
  at::Tensor expert_indices;  // [N, K] int64; undefined when dense
};

// model.DecoderLayer(layer, model.layers()[layer], h, ...) without a KV cache, checkpointed. The
// gradients it gives are the plain layer's (the same operations run again, in the same autocast
// state as the forward). `model` must outlive the backward.
CheckpointedLayerOutput CheckpointedLayer(const FlexOlmoModel& model, int64_t layer, const at::Tensor& h,
                                          const at::Tensor& routing_mask, int64_t top_k);

}  // namespace flexfed
