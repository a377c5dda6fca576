// d2detr::ms_deform_attn: schema, shared input checks, Meta (fake) kernels,
// autograd and autocast kernels. Device kernels live in ms_deform_attn_cpu.cpp
// and ms_deform_attn_cuda.cu.
//
// Everything is registered with the dispatcher in C++, so the library works in
// any process that loads it (torch.ops.load_library), without d2detr's Python
// code: TorchScript (trace/script), torch.export and torch.compile all see one
// opaque, differentiable op.
#include "ms_deform_attn.h"

#include <ATen/autocast_mode.h>
#include <c10/core/SymInt.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <sstream>
#include <vector>

#ifndef D2DETR_NO_PYTHON_MODULE
#include <Python.h>
#endif

namespace d2detr {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sym_sizes();
  return ss.str();
}

void check_ranks_and_shapes(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* p = "ms_deform_attn: ";
  TORCH_CHECK_VALUE(value.defined() && spatial_shapes.defined() && level_start_index.defined() &&
                        sampling_locations.defined() && attention_weights.defined(),
                    p, "all inputs must be defined tensors");
  TORCH_CHECK_VALUE(value.dim() == 4, p, "value must be 4-D [N, S, M, D], got shape ", shape_str(value));
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.sym_size(1) == 2, p,
                    "spatial_shapes must be [L, 2] (H, W per level), got shape ", shape_str(spatial_shapes));
  const c10::SymInt L = spatial_shapes.sym_size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.sym_size(0) == L, p,
                    "level_start_index must be [L] with L = ", L, " (from spatial_shapes), got shape ",
                    shape_str(level_start_index));
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.sym_size(5) == 2, p,
                    "sampling_locations must be 6-D [N, Q, M, L, P, 2], got shape ", shape_str(sampling_locations));
  TORCH_CHECK_VALUE(attention_weights.dim() == 5, p, "attention_weights must be 5-D [N, Q, M, L, P], got shape ",
                    shape_str(attention_weights));
  const c10::SymInt N = value.sym_size(0);
  const c10::SymInt M = value.sym_size(2);
  TORCH_CHECK_VALUE(sampling_locations.sym_size(0) == N && sampling_locations.sym_size(2) == M &&
                        sampling_locations.sym_size(3) == L,
                    p, "sampling_locations must be [N=", N, ", Q, M=", M, ", L=", L, ", P, 2] to match value ",
                    shape_str(value), " and spatial_shapes ", shape_str(spatial_shapes), ", got ",
                    shape_str(sampling_locations));
  bool weights_ok = true;
  for (int64_t i = 0; i < 5; ++i) {
    weights_ok = weights_ok && attention_weights.sym_size(i) == sampling_locations.sym_size(i);
  }
  TORCH_CHECK_VALUE(weights_ok, p, "attention_weights must be [N, Q, M, L, P] = ",
                    sampling_locations.sym_sizes().slice(0, 5), " (from sampling_locations), got ",
                    shape_str(attention_weights));
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, p, "spatial_shapes must be int64 (torch.long), got ",
                   spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong, p,
                   "level_start_index must be int64 (torch.long), got ", level_start_index.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(value.scalar_type()), p, "value must be a floating-point tensor, got ",
                   value.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(sampling_locations.scalar_type()), p,
                   "sampling_locations must be a floating-point tensor, got ", sampling_locations.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(attention_weights.scalar_type()), p,
                   "attention_weights must be a floating-point tensor, got ", attention_weights.scalar_type());
  const auto dev = value.device();
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"spatial_shapes", &spatial_shapes},
      {"level_start_index", &level_start_index},
      {"sampling_locations", &sampling_locations},
      {"attention_weights", &attention_weights}};
  for (const auto& o : others) {
    TORCH_CHECK_VALUE(o.second->device() == dev, p, "all inputs must be on one device: value is on ", dev, ", ",
                      o.first, " on ", o.second->device());
  }
}

void check_level_values(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index) {
  constexpr const char* p = "ms_deform_attn: ";
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t L = shapes.size(0);
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = sh[2 * l], W = sh[2 * l + 1];
    TORCH_CHECK_VALUE(H > 0 && W > 0, p, "spatial_shapes must be positive, got (H, W) = (", H, ", ", W,
                      ") at level ", l);
    TORCH_CHECK_VALUE(st[l] == total, p, "level_start_index[", l, "] = ", st[l],
                      " does not match spatial_shapes (expected the sum of H*W over the previous levels = ", total,
                      ")");
    TORCH_CHECK_VALUE(H <= (int64_t(1) << 31) && W <= (int64_t(1) << 31), p, "spatial_shapes too large");
    total += H * W;
  }
  TORCH_CHECK_VALUE(total == value.size(1), p, "value has S = ", value.size(1),
                    " tokens but spatial_shapes give sum(H*W) = ", total);
}

}  // namespace

void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool check_values) {
  check_ranks_and_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (check_values) {
    check_level_values(value, spatial_shapes, level_start_index);
  }
}

void check_ms_deform_attn_backward_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    bool check_values) {
  check_ranks_and_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  constexpr const char* p = "ms_deform_attn_backward: ";
  TORCH_CHECK_VALUE(grad_output.defined(), p, "grad_output must be a defined tensor");
  const bool ok = grad_output.dim() == 3 && grad_output.sym_size(0) == value.sym_size(0) &&
                  grad_output.sym_size(1) == sampling_locations.sym_size(1) &&
                  grad_output.sym_size(2) == value.sym_size(2) * value.sym_size(3);
  TORCH_CHECK_VALUE(ok, p, "grad_output must be [N, Q, M * D] = [", value.sym_size(0), ", ",
                    sampling_locations.sym_size(1), ", ", value.sym_size(2) * value.sym_size(3), "], got ",
                    shape_str(grad_output));
  TORCH_CHECK_TYPE(at::isFloatingType(grad_output.scalar_type()), p,
                   "grad_output must be a floating-point tensor, got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), p,
                    "all inputs must be on one device: value is on ", value.device(), ", grad_output on ",
                    grad_output.device());
  if (check_values) {
    check_level_values(value, spatial_shapes, level_start_index);
  }
}

// ---------------------------------------------------------------------------
// Dispatcher entry points
// ---------------------------------------------------------------------------
at::Tensor ms_deform_attn(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2detr::ms_deform_attn", "")
                       .typed<decltype(ms_deform_attn)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2detr::ms_deform_attn_backward", "")
                       .typed<decltype(ms_deform_attn_backward)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
}

namespace {

// ---------------------------------------------------------------------------
// Meta kernels (shape inference for FakeTensor: torch.compile, torch.export).
// Symbolic sizes throughout, so dynamic shapes work. Dtypes follow the policy
// every backend implements (ms_deform_attn.h): any floating dtypes, the output
// in value's dtype, each gradient in its input's dtype.
// ---------------------------------------------------------------------------
at::Tensor ms_deform_attn_meta(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ranks_and_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return at::empty_symint({value.sym_size(0), sampling_locations.sym_size(1), value.sym_size(2) * value.sym_size(3)},
                          value.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_meta(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_ms_deform_attn_backward_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, grad_output, /*check_values=*/false);
  return std::make_tuple(at::empty_symint(value.sym_sizes(), value.options()),
                         at::empty_symint(sampling_locations.sym_sizes(), sampling_locations.options()),
                         at::empty_symint(attention_weights.sym_sizes(), attention_weights.options()));
}

// ---------------------------------------------------------------------------
// Autograd
// ---------------------------------------------------------------------------
class MSDeformAttnFunction : public torch::autograd::Function<MSDeformAttnFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const torch::autograd::Variable& value,
      const torch::autograd::Variable& spatial_shapes,
      const torch::autograd::Variable& level_start_index,
      const torch::autograd::Variable& sampling_locations,
      const torch::autograd::Variable& attention_weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    return {output};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto grads = ms_deform_attn_backward(saved[0], saved[1], saved[2], saved[3], saved[4], grad_outputs[0]);
    return {std::get<0>(grads), torch::autograd::Variable(), torch::autograd::Variable(), std::get<1>(grads),
            std::get<2>(grads)};
  }
};

at::Tensor ms_deform_attn_autograd(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  return MSDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)[0];
}

// ---------------------------------------------------------------------------
// Autocast: sampling_locations and attention_weights are cast to float32 (a
// float16 location is off by up to 1/16 pixel on a 128-pixel level), value keeps
// its dtype: under autocast it is value_proj's output, already float16 /
// bfloat16, so the kernels read half the bytes and autograd saves a half-size
// value; they accumulate in float32 and return value's dtype. float64 inputs are
// left alone (autocast never touches them). Deformable DETR's own policy (the
// whole op in float32) is MultiScaleDeformableAttention(compute_in_float32=True).
// ---------------------------------------------------------------------------
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor ms_deform_attn_autocast(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return ms_deform_attn(value, spatial_shapes, level_start_index,
                        at::autocast::cached_cast(at::kFloat, sampling_locations, device_type),
                        at::autocast::cached_cast(at::kFloat, attention_weights, device_type));
}

}  // namespace

TORCH_LIBRARY(d2detr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(d2detr, CPU, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_forward_cpu));
  m.impl("ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_cpu));
}

TORCH_LIBRARY_IMPL(d2detr, Meta, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_meta));
  m.impl("ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_meta));
}

TORCH_LIBRARY_IMPL(d2detr, Autograd, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_autograd));
}

TORCH_LIBRARY_IMPL(d2detr, AutocastCPU, m) {
  m.impl("ms_deform_attn",
         TORCH_FN((ms_deform_attn_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(d2detr, AutocastCUDA, m) {
  m.impl("ms_deform_attn",
         TORCH_FN((ms_deform_attn_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace d2detr

#ifndef D2DETR_NO_PYTHON_MODULE
// `import d2detr._C` loads this library (and so registers the ops). It has no
// Python API of its own; torch.ops.load_library(path) works just as well.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "d2detr native operators (registered in torch.ops.d2detr)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
#endif
