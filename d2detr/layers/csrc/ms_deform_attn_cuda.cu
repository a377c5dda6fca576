// CUDA kernels of d2detr::ms_deform_attn (multi-scale deformable attention).
//
// Semantics (identical to the CPU kernels and to ms_deform_attn_reference):
//   out[n, q, m*D + d] = sum_{l, p} a[n,q,m,l,p] * bilinear(value[n, start_l:, m, d], x, y)
//   x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5 (pixel centres at integers),
//   bilinear with zeros outside the level, i.e. exactly
//   F.grid_sample(align_corners=False, padding_mode="zeros") at 2*loc-1.
//
// Design
//   * Forward: one thread per (n, q, m, channel chunk). A chunk is VEC
//     contiguous channels (16 bytes when D and the pointers allow it, else one
//     channel), so the threads of one (n, q, m) read each bilinear corner as
//     one contiguous, coalesced run of D channels. Every thread walks the L*P
//     samples; all threads of a head read the same location/weight addresses,
//     which the memory system broadcasts. Accumulation in float (double for
//     double inputs).
//   * Backward: one group of G lanes (G a power of two <= 32, inside one warp)
//     per (n, q, m); lane j handles chunks j, j+G, ... so any D works. Per
//     sample the lanes accumulate their part of dL/dx, dL/dy, dL/da, reduce
//     them with warp shuffles and lane 0 writes them (no atomics there).
//     grad_value is accumulated with atomicAdd into a float32 (double for
//     double) buffer; on sm_90+ with float2/float4 vector atomics.
//   * 32-bit index math when every tensor has fewer than 2^31 elements,
//     64-bit otherwise. No im2col_step: any N, Q, D.
//   * Levels whose (H, W, start) do not fit in value (S) contribute zeros
//     instead of reading out of bounds (checked on the device, no host sync).
//   * dtypes (ms_deform_attn.h, "Dtypes"): the kernels read value as float32 /
//     float16 / bfloat16 (and float64, for gradcheck; any other floating dtype
//     is converted to float32), attention_weights in value's dtype or float32,
//     sampling_locations in float32 (float64 with a float64 value). Inputs in
//     other dtypes (model.half() gives float16 locations) are converted first;
//     the output has value's dtype, each gradient its input's dtype.
//   * grad_value is summed with atomics, so the backward raises PyTorch's
//     non-determinism alert under torch.use_deterministic_algorithms(True), as
//     grid_sample's CUDA backward does.
//   * A GPU the library has no kernel image for (TORCH_CUDA_ARCH_LIST without
//     its architecture and no PTX that JIT-compiles for it) raises
//     NotImplementedError naming it; the Python wrapper then falls back to the
//     reference with its one-time warning.

#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter
// pulls in cuSPARSE/cuBLAS headers, which a bare CUDA toolkit may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace d2detr {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

__device__ __forceinline__ float floor_(float x) { return floorf(x); }
__device__ __forceinline__ double floor_(double x) { return ::floor(x); }

// Level l as seen by the kernels; `ok` is false when the level is empty or
// does not fit inside the S rows of value (then it contributes zeros).
template <typename index_t>
struct Level {
  index_t H, W, start;
  bool ok;
};

template <typename index_t>
__device__ __forceinline__ Level<index_t> load_level(
    const int64_t* __restrict__ shapes, const int64_t* __restrict__ level_start, int l,
    int64_t S) {
  const int64_t H = shapes[2 * l];
  const int64_t W = shapes[2 * l + 1];
  const int64_t st = level_start[l];
  // start + H*W <= S, written so that nothing overflows.
  const bool ok = H > 0 && W > 0 && st >= 0 && st <= S && H <= (S - st) / W;
  Level<index_t> lv;
  lv.H = ok ? static_cast<index_t>(H) : index_t(0);
  lv.W = ok ? static_cast<index_t>(W) : index_t(0);
  lv.start = ok ? static_cast<index_t>(st) : index_t(0);
  lv.ok = ok;
  return lv;
}

// Bilinear corner setup shared by both kernels. Returns false when the point
// lies entirely outside the level (or is NaN/inf): then all corners are zero.
template <typename acc_t, typename index_t>
struct Corners {
  acc_t lx, ly, hx, hy;
  index_t row0, x0;  // pixel row offset (start + y0*W) and x0
  bool x0ok, x1ok, y0ok, y1ok;
};

template <typename acc_t, typename index_t>
__device__ __forceinline__ bool make_corners(acc_t x, acc_t y, const Level<index_t>& lv,
                                             Corners<acc_t, index_t>& c) {
  const acc_t Wf = static_cast<acc_t>(lv.W);
  const acc_t Hf = static_cast<acc_t>(lv.H);
  // Written so that NaN fails the test. Outside [-1, W) x [-1, H) every corner
  // is out of bounds, exactly as grid_sample's zero padding. x = -1 (or y = -1)
  // itself is inside, as in grid_sample and the CPU kernel: the forward is 0
  // there (the in-map corner has weight 0) but dL/dx is not.
  if (!(lv.ok && x >= acc_t(-1) && y >= acc_t(-1) && x < Wf && y < Hf)) return false;
  const acc_t xf = floor_(x);
  const acc_t yf = floor_(y);
  const index_t x0 = static_cast<index_t>(xf);  // in [-1, W-1]
  const index_t y0 = static_cast<index_t>(yf);  // in [-1, H-1]
  c.lx = x - xf;
  c.ly = y - yf;
  c.hx = acc_t(1) - c.lx;
  c.hy = acc_t(1) - c.ly;
  c.x0 = x0;
  c.row0 = lv.start + y0 * lv.W;  // may be < 0 when y0 == -1 (then unused)
  c.x0ok = x0 >= 0;
  c.x1ok = x0 + 1 < lv.W;
  c.y0ok = y0 >= 0;
  c.y1ok = y0 + 1 < lv.H;
  return true;
}

template <typename scalar_t, typename weight_t, typename loc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value,        // [N, S, M, D]
    const int64_t* __restrict__ shapes,        // [L, 2] (H, W)
    const int64_t* __restrict__ level_start,   // [L]
    const loc_t* __restrict__ loc,             // [N, Q, M, L, P, 2] (x, y)
    const weight_t* __restrict__ attn,         // [N, Q, M, L, P]
    scalar_t* __restrict__ out,                // [N, Q, M, D]
    const index_t Q, const index_t S, const index_t M, const index_t D, const int L,
    const int P, const index_t chunks,  // D / VEC
    const int64_t total) {              // N * Q * M * chunks
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const index_t tt = static_cast<index_t>(t);
    const index_t g = tt / chunks;  // (n * Q + q) * M + m
    const index_t c = tt - g * chunks;
    const index_t m = g % M;
    const index_t n = g / (Q * M);
    const index_t pix_stride = M * D;
    const scalar_t* __restrict__ vbase = value + n * S * pix_stride + m * D + c * VEC;
    const index_t LP = static_cast<index_t>(L) * P;
    const loc_t* __restrict__ gl = loc + g * LP * 2;
    const weight_t* __restrict__ ga = attn + g * LP;

    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);

    int k = 0;
    for (int l = 0; l < L; ++l) {
      const Level<index_t> lv = load_level<index_t>(shapes, level_start, l, S);
      const acc_t Wf = static_cast<acc_t>(lv.W);
      const acc_t Hf = static_cast<acc_t>(lv.H);
      for (int p = 0; p < P; ++p, ++k) {
        const acc_t x = static_cast<acc_t>(gl[2 * k]) * Wf - acc_t(0.5);
        const acc_t y = static_cast<acc_t>(gl[2 * k + 1]) * Hf - acc_t(0.5);
        Corners<acc_t, index_t> cr;
        if (!make_corners(x, y, lv, cr)) continue;
        const acc_t a = static_cast<acc_t>(ga[k]);
        const index_t row1 = cr.row0 + lv.W;
        auto add = [&](index_t pix, acc_t w) {
          const vec_t v = *reinterpret_cast<const vec_t*>(vbase + pix * pix_stride);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += w * static_cast<acc_t>(v.v[i]);
        };
        if (cr.y0ok && cr.x0ok) add(cr.row0 + cr.x0, a * cr.hy * cr.hx);
        if (cr.y0ok && cr.x1ok) add(cr.row0 + cr.x0 + 1, a * cr.hy * cr.lx);
        if (cr.y1ok && cr.x0ok) add(row1 + cr.x0, a * cr.ly * cr.hx);
        if (cr.y1ok && cr.x1ok) add(row1 + cr.x0 + 1, a * cr.ly * cr.lx);
      }
    }
    vec_t o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<vec_t*>(out + g * D + c * VEC) = o;
  }
}

// dst[0:VEC] += src[0:VEC] atomically per element.
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&src)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // sm_90+: vector atomics (atomic per element); dst is VEC*4-byte aligned.
  constexpr bool kVector = VEC % 2 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector && VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j)
      atomicAdd(reinterpret_cast<float4*>(dst) + j,
                make_float4(src[4 * j], src[4 * j + 1], src[4 * j + 2], src[4 * j + 3]));
  } else if constexpr (kVector) {
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j)
      atomicAdd(reinterpret_cast<float2*>(dst) + j, make_float2(src[2 * j], src[2 * j + 1]));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, src[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double (&src)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, src[i]);
}

template <typename scalar_t, typename weight_t, typename loc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads, 3) ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ value,        // [N, S, M, D]
    const int64_t* __restrict__ shapes,        // [L, 2]
    const int64_t* __restrict__ level_start,   // [L]
    const loc_t* __restrict__ loc,             // [N, Q, M, L, P, 2]
    const weight_t* __restrict__ attn,         // [N, Q, M, L, P]
    const scalar_t* __restrict__ grad_out,     // [N, Q, M, D]
    at::opmath_type<scalar_t>* __restrict__ grad_value,  // [N, S, M, D], zero-initialised
    loc_t* __restrict__ grad_loc,              // [N, Q, M, L, P, 2], fully written
    weight_t* __restrict__ grad_attn,          // [N, Q, M, L, P], fully written
    const index_t Q, const index_t S, const index_t M, const index_t D, const int L,
    const int P, const index_t chunks,  // D / VEC
    const int group_log2,               // G = 1 << group_log2 lanes per (n, q, m), G <= 32
    const int64_t total) {              // N * Q * M * G
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int G = 1 << group_log2;
  // The G lanes of a group are consecutive threads of one warp, aligned to G
  // (blockDim and the grid stride are multiples of 32), so they always take the
  // same loop iterations and branches; `gmask` names exactly them.
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned gmask =
      G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane & ~static_cast<unsigned>(G - 1)));
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const index_t tt = static_cast<index_t>(t);
    const index_t g = tt >> group_log2;  // (n * Q + q) * M + m
    const index_t lane = tt & static_cast<index_t>(G - 1);
    const index_t m = g % M;
    const index_t n = g / (Q * M);
    const index_t pix_stride = M * D;
    const index_t vofs = n * S * pix_stride + m * D;
    const scalar_t* __restrict__ vbase = value + vofs;
    acc_t* __restrict__ gvbase = grad_value + vofs;
    const scalar_t* __restrict__ gobase = grad_out + g * D;
    const index_t LP = static_cast<index_t>(L) * P;
    const loc_t* __restrict__ gl = loc + g * LP * 2;
    const weight_t* __restrict__ ga = attn + g * LP;
    loc_t* __restrict__ ggl = grad_loc + g * LP * 2;
    weight_t* __restrict__ gga = grad_attn + g * LP;

    // Common case (D <= G * VEC): each lane owns at most one chunk, keep its
    // grad_output in registers for all samples.
    const bool single = chunks <= G;
    acc_t go_cached[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) go_cached[i] = acc_t(0);
    if (single && lane < chunks) {
      const vec_t v = *reinterpret_cast<const vec_t*>(gobase + lane * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) go_cached[i] = static_cast<acc_t>(v.v[i]);
    }

    int k = 0;
    for (int l = 0; l < L; ++l) {
      const Level<index_t> lv = load_level<index_t>(shapes, level_start, l, S);
      const acc_t Wf = static_cast<acc_t>(lv.W);
      const acc_t Hf = static_cast<acc_t>(lv.H);
      for (int p = 0; p < P; ++p, ++k) {
        const acc_t x = static_cast<acc_t>(gl[2 * k]) * Wf - acc_t(0.5);
        const acc_t y = static_cast<acc_t>(gl[2 * k + 1]) * Hf - acc_t(0.5);
        const acc_t a = static_cast<acc_t>(ga[k]);
        acc_t gx = acc_t(0), gy = acc_t(0), gw = acc_t(0);
        Corners<acc_t, index_t> cr;
        if (make_corners(x, y, lv, cr)) {
          const index_t p00 = cr.row0 + cr.x0;
          const index_t p01 = p00 + 1;
          const index_t p10 = p00 + lv.W;
          const index_t p11 = p10 + 1;
          const acc_t w00 = cr.hy * cr.hx, w01 = cr.hy * cr.lx;
          const acc_t w10 = cr.ly * cr.hx, w11 = cr.ly * cr.lx;
          // dot_c = <grad_out, value at corner c> over this lane's channels. With
          // val = sum_c w_c v_c:  dL/da = sum_c w_c dot_c,
          //   dL/dx = a * (hy (dot01 - dot00) + ly (dot11 - dot10)),
          //   dL/dy = a * (hx (dot10 - dot00) + lx (dot11 - dot01)),
          // and dL/dv_c = a * w_c * grad_out. One corner at a time: few registers.
          acc_t dot00 = acc_t(0), dot01 = acc_t(0), dot10 = acc_t(0), dot11 = acc_t(0);
          for (index_t c = lane; c < chunks; c += G) {
            acc_t go[VEC];
            if (single) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) go[i] = go_cached[i];
            } else {
              const vec_t v = *reinterpret_cast<const vec_t*>(gobase + c * VEC);
#pragma unroll
              for (int i = 0; i < VEC; ++i) go[i] = static_cast<acc_t>(v.v[i]);
            }
            const index_t cofs = c * VEC;
            auto corner = [&](bool ok, index_t pix, acc_t w, acc_t& dot) {
              if (!ok) return;
              const index_t ofs = pix * pix_stride + cofs;
              const vec_t v = *reinterpret_cast<const vec_t*>(vbase + ofs);
              acc_t upd[VEC];
              const acc_t aw = a * w;
#pragma unroll
              for (int i = 0; i < VEC; ++i) {
                dot += go[i] * static_cast<acc_t>(v.v[i]);
                upd[i] = aw * go[i];
              }
              atomic_add_vec<VEC>(gvbase + ofs, upd);
            };
            corner(cr.y0ok && cr.x0ok, p00, w00, dot00);
            corner(cr.y0ok && cr.x1ok, p01, w01, dot01);
            corner(cr.y1ok && cr.x0ok, p10, w10, dot10);
            corner(cr.y1ok && cr.x1ok, p11, w11, dot11);
          }
          gw = w00 * dot00 + w01 * dot01 + w10 * dot10 + w11 * dot11;
          gx = cr.hy * (dot01 - dot00) + cr.ly * (dot11 - dot10);
          gy = cr.hx * (dot10 - dot00) + cr.lx * (dot11 - dot01);
        }
        // Sum the lanes' partial sums (every lane of the group is here).
        for (int off = G >> 1; off > 0; off >>= 1) {
          gx += __shfl_xor_sync(gmask, gx, off, G);
          gy += __shfl_xor_sync(gmask, gy, off, G);
          gw += __shfl_xor_sync(gmask, gw, off, G);
        }
        if (lane == 0) {
          // x = loc_x * W - 0.5  =>  dx/dloc_x = W (likewise y with H).
          ggl[2 * k] = static_cast<loc_t>(gx * a * Wf);
          ggl[2 * k + 1] = static_cast<loc_t>(gy * a * Hf);
          gga[k] = static_cast<weight_t>(gw);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Shapes, ranks, devices and index dtypes are checked by the shared
// check_ms_deform_attn_inputs (ms_deform_attn.h). check_values=false: reading
// spatial_shapes / level_start_index back would synchronise the stream on every
// call; instead the kernels treat a level that does not fit in value as zeros
// (no out-of-bounds access whatever the values).
void check_cuda_device(const at::Tensor& value, const char* name) {
  TORCH_CHECK_VALUE(value.is_cuda(), name, ": CUDA kernel called with tensors on ", value.device());
}

// The dtypes the kernels read (ms_deform_attn.h, "Dtypes").
at::ScalarType kernel_value_type(at::ScalarType vt) {
  return (vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16 || vt == at::kDouble) ? vt : at::kFloat;
}
at::ScalarType kernel_loc_type(at::ScalarType kvt) { return kvt == at::kDouble ? at::kDouble : at::kFloat; }
at::ScalarType kernel_weight_type(at::ScalarType kvt, at::ScalarType wt) {
  return kvt == at::kDouble ? at::kDouble : (wt == kvt ? kvt : at::kFloat);
}

// Checks a kernel launch. A library built without this GPU's architecture (and
// without PTX the driver can compile for it) fails every launch with "no kernel
// image": say so as NotImplementedError, which ms_deform_attn (Python) turns into
// a fallback to the reference. The message is matched there: keep them in sync.
void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    const int dev = c10::cuda::current_device();
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    TORCH_CHECK_NOT_IMPLEMENTED(false, name, ": d2detr._C has no CUDA kernel image for this GPU (compute capability ",
                                major, ".", minor, ", ", cudaGetErrorString(err),
                                "); rebuild it with TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
                                "\" (or unset, to build for the visible GPU)");
  }
  C10_CUDA_CHECK(err);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Dims {
  int64_t N, S, M, D, Q, L, P;
};

Dims get_dims(const at::Tensor& value, const at::Tensor& loc) {
  return Dims{value.size(0), value.size(1), value.size(2), value.size(3),
              loc.size(1),   loc.size(3),   loc.size(4)};
}

int64_t grid_for(int64_t total) {
  const int dev = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, threads_per_sm / kThreads);
  const int64_t needed = (total + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, resident * 8));
}

// Calls f(weight_t*{}, loc_t*{}) with the C++ types of the weights and locations.
// float64 (a testing dtype) runs with float64 weights and locations only: the
// callers upcast them, which is exact.
template <typename scalar_t, typename F>
void dispatch_weight_loc(at::ScalarType wt, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
  } else if (wt == c10::CppTypeToScalarType<scalar_t>::value) {
    f(static_cast<scalar_t*>(nullptr), static_cast<float*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
  }
}

// Runs launch(vec_tag, index_tag) with the vector width (VMAX elements = 16 bytes
// or 1) and the index type (int32 when everything fits, else int64).
template <typename scalar_t, typename F>
void dispatch_vec_index(bool vec, bool small, F&& launch) {
  constexpr int VMAX = static_cast<int>(16 / sizeof(scalar_t));
  using VecMax = std::integral_constant<int, VMAX>;
  using Vec1 = std::integral_constant<int, 1>;
  if constexpr (std::is_same_v<scalar_t, double>) {
    launch(Vec1{}, int64_t{});  // float64 is for testing: one instantiation
  } else if (vec) {
    small ? launch(VecMax{}, int32_t{}) : launch(VecMax{}, int64_t{});
  } else {
    small ? launch(Vec1{}, int32_t{}) : launch(Vec1{}, int64_t{});
  }
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, /*check_values=*/false);
  check_cuda_device(value, "ms_deform_attn");
  c10::cuda::CUDAGuard device_guard(value.device());
  const Dims d = get_dims(value, sampling_locations);
  const auto kvt = kernel_value_type(value.scalar_type());
  auto out = at::empty({d.N, d.Q, d.M * d.D}, value.options().dtype(kvt));
  if (out.numel() == 0) return out.to(value.scalar_type());
  if (value.numel() == 0 || d.L * d.P == 0) return out.zero_().to(value.scalar_type());
  TORCH_CHECK(d.L * d.P * 2 <= std::numeric_limits<int>::max(),
              "ms_deform_attn: too many levels x points");

  const auto value_c = value.to(kvt).contiguous();
  const auto shapes_c = spatial_shapes.to(value.device()).contiguous();
  const auto start_c = level_start_index.to(value.device()).contiguous();
  const auto loc_c = sampling_locations.to(kernel_loc_type(kvt)).contiguous();
  const auto attn_c =
      attention_weights.to(kernel_weight_type(kvt, attention_weights.scalar_type())).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, kvt,
      "ms_deform_attn_forward_cuda", [&] {
        dispatch_weight_loc<scalar_t>(
            attn_c.scalar_type(), [&](auto wtag, auto ltag) {
              using weight_t = std::remove_pointer_t<decltype(wtag)>;
              using loc_t = std::remove_pointer_t<decltype(ltag)>;
              constexpr int VMAX = static_cast<int>(16 / sizeof(scalar_t));
              const bool vec = !std::is_same_v<scalar_t, double> && d.D % VMAX == 0 &&
                               aligned16(value_c.data_ptr());
              const bool small = std::max({value_c.numel(), out.numel(), loc_c.numel()}) <
                                 std::numeric_limits<int32_t>::max();
              auto launch = [&](auto vec_tag, auto index_tag) {
                constexpr int VEC = decltype(vec_tag)::value;
                using index_t = decltype(index_tag);
                const int64_t chunks = d.D / VEC;
                const int64_t total = d.N * d.Q * d.M * chunks;
                ms_deform_attn_forward_kernel<scalar_t, weight_t, loc_t, VEC, index_t>
                    <<<grid_for(total), kThreads, 0, stream>>>(
                        value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
                        start_c.const_data_ptr<int64_t>(), loc_c.const_data_ptr<loc_t>(),
                        attn_c.const_data_ptr<weight_t>(), out.mutable_data_ptr<scalar_t>(),
                        static_cast<index_t>(d.Q), static_cast<index_t>(d.S),
                        static_cast<index_t>(d.M), static_cast<index_t>(d.D),
                        static_cast<int>(d.L), static_cast<int>(d.P),
                        static_cast<index_t>(chunks), total);
                check_launch("ms_deform_attn");
              };
              dispatch_vec_index<scalar_t>(vec, small, launch);
            });
      });
  return out.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  check_ms_deform_attn_backward_inputs(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights, grad_output,
                                       /*check_values=*/false);
  check_cuda_device(value, "ms_deform_attn_backward");
  // grad_value is summed with atomicAdd: the order (so the last bits) varies.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  c10::cuda::CUDAGuard device_guard(value.device());
  const Dims d = get_dims(value, sampling_locations);

  const auto kvt = kernel_value_type(value.scalar_type());
  const bool f64 = kvt == at::kDouble;
  const auto value_c = value.to(kvt).contiguous();
  const auto loc_c = sampling_locations.to(kernel_loc_type(kvt)).contiguous();
  const auto attn_c =
      attention_weights.to(kernel_weight_type(kvt, attention_weights.scalar_type())).contiguous();
  auto grad_loc = at::empty(loc_c.sizes(), loc_c.options());
  auto grad_attn = at::empty(attn_c.sizes(), attn_c.options());
  auto grad_value_acc =
      at::zeros(value_c.sizes(), value_c.options().dtype(f64 ? at::kDouble : at::kFloat));
  // Every gradient comes back in the dtype of its input.
  auto finish = [&]() {
    return std::make_tuple(grad_value_acc.to(value.scalar_type()),
                           grad_loc.to(sampling_locations.scalar_type()),
                           grad_attn.to(attention_weights.scalar_type()));
  };
  if (d.N * d.Q * d.M == 0 || d.L * d.P == 0) {
    return finish();  // grad_loc / grad_attn have no elements
  }
  if (value.numel() == 0) {  // D == 0 or S == 0: the output does not depend on anything
    grad_loc.zero_();
    grad_attn.zero_();
    return finish();
  }
  TORCH_CHECK(d.L * d.P * 2 <= std::numeric_limits<int>::max(),
              "ms_deform_attn: too many levels x points");

  const auto go_c = grad_output.to(kvt).contiguous();
  const auto shapes_c = spatial_shapes.to(value.device()).contiguous();
  const auto start_c = level_start_index.to(value.device()).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, kvt,
      "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_weight_loc<scalar_t>(
            attn_c.scalar_type(), [&](auto wtag, auto ltag) {
              using weight_t = std::remove_pointer_t<decltype(wtag)>;
              using loc_t = std::remove_pointer_t<decltype(ltag)>;
              constexpr int VMAX = static_cast<int>(16 / sizeof(scalar_t));
              const bool vec = !std::is_same_v<scalar_t, double> && d.D % VMAX == 0 &&
                               aligned16(value_c.data_ptr()) && aligned16(go_c.data_ptr());
              const int vec_width = vec ? VMAX : 1;
              const int64_t chunks = d.D / vec_width;
              int group_log2 = 0;  // G = smallest power of two >= chunks, at most 32
              while (group_log2 < 5 && (int64_t{1} << group_log2) < chunks) ++group_log2;
              const int64_t total = d.N * d.Q * d.M * (int64_t{1} << group_log2);
              const bool small =
                  std::max({value_c.numel(), go_c.numel(), loc_c.numel(), total}) <
                  std::numeric_limits<int32_t>::max();
              auto launch = [&](auto vec_tag, auto index_tag) {
                constexpr int VEC = decltype(vec_tag)::value;
                using index_t = decltype(index_tag);
                ms_deform_attn_backward_kernel<scalar_t, weight_t, loc_t, VEC, index_t>
                    <<<grid_for(total), kThreads, 0, stream>>>(
                        value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
                        start_c.const_data_ptr<int64_t>(), loc_c.const_data_ptr<loc_t>(),
                        attn_c.const_data_ptr<weight_t>(), go_c.const_data_ptr<scalar_t>(),
                        grad_value_acc.mutable_data_ptr<acc_t>(),
                        grad_loc.mutable_data_ptr<loc_t>(), grad_attn.mutable_data_ptr<weight_t>(),
                        static_cast<index_t>(d.Q), static_cast<index_t>(d.S),
                        static_cast<index_t>(d.M), static_cast<index_t>(d.D),
                        static_cast<int>(d.L), static_cast<int>(d.P),
                        static_cast<index_t>(chunks), group_log2, total);
                check_launch("ms_deform_attn_backward");
              };
              dispatch_vec_index<scalar_t>(vec, small, launch);
            });
      });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(d2detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace d2detr
