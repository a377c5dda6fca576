// Multi-scale deformable attention: shared declarations for the CPU (.cpp) and
// CUDA (.cu) kernels of the d2detr::ms_deform_attn operator.
//
// Schema (registered in ms_deform_attn_op.cpp):
//   d2detr::ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index,
//                          Tensor sampling_locations, Tensor attention_weights) -> Tensor
//   d2detr::ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index,
//                          Tensor sampling_locations, Tensor attention_weights, Tensor grad_output)
//                          -> (Tensor grad_value, Tensor grad_sampling_locations, Tensor grad_attention_weights)
//
//   value               [N, S, M, D]          S = sum_l H_l * W_l
//   spatial_shapes      [L, 2]  int64         (H_l, W_l)
//   level_start_index   [L]     int64         exclusive cumsum of H_l * W_l
//   sampling_locations  [N, Q, M, L, P, 2]    (x, y) in [0, 1]
//   attention_weights   [N, Q, M, L, P]
//   output              [N, Q, M * D]
//
// Sampling: pixel (x * W - 0.5, y * H - 0.5), bilinear, zeros outside (grid_sample with
// align_corners=False, padding_mode="zeros"); a point is inside the sampling support
// when -1 <= x < W and -1 <= y < H, so the location gradient at x = -1 or y = -1
// (one corner in the map, with weight 0) is not lost. d(output)/d(location)
// includes the W / H factor.
//
// Dtypes (every backend and the Meta kernels alike, so that what traces also runs):
// value, sampling_locations, attention_weights and grad_output may be any floating
// dtypes, mixed. The op computes in float64 when value is float64 and otherwise
// accumulates in float32 with float32 locations (CPU: value, weights too; CUDA reads
// float16 / bfloat16 value, and weights in value's dtype, as they are). The output
// has value's dtype; each gradient has the dtype of its input.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace d2detr {

// Validates the forward inputs; throws c10::ValueError / c10::TypeError (Python
// ValueError / TypeError) with a clear message. Checks ranks and shapes (N, M, L, P
// consistent), int64 spatial_shapes / level_start_index, floating-point
// value / locations / weights, all tensors on one device. With check_values it
// also reads spatial_shapes and level_start_index (copying them to the CPU if
// needed, which synchronises a CUDA stream) and checks H, W > 0,
// level_start_index == exclusive cumsum(H * W) and S == sum(H * W).
void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool check_values = true);

// check_ms_deform_attn_inputs plus grad_output: [N, Q, M * D], floating point, same device.
void check_ms_deform_attn_backward_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    bool check_values = true);

// Dispatcher entry points (go through torch's dispatcher: autograd, autocast, device).
at::Tensor ms_deform_attn(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// CPU kernels (ms_deform_attn_cpu.cpp).
at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

}  // namespace d2detr
