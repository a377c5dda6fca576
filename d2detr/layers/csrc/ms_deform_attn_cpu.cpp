// CPU kernels of d2detr::ms_deform_attn (float32 / float64; other floating dtypes are
// converted to float32 and back).
//
// Forward: tasks are ranges of the head-major (batch, head, query); for every level and
// point the four bilinear corners are accumulated straight into the output
// row (D contiguous channels, vectorised), so nothing of size N*Q*M*L*P*D is
// ever materialised.
// Backward: value gradients are scattered (many queries hit one pixel), so the
// work is split by (batch, head): each task owns grad_value[n, :, m, :] and
// needs no atomics. When there are fewer (batch, head) pairs than threads the
// queries are split too and every thread scatters into its own buffer.
// Location / weight gradients are per query and written exactly once.
//
// The hot loops are compiled twice: for the baseline ISA and, on x86-64 with
// GCC/Clang, for AVX2+FMA, chosen at run time.
#include "ms_deform_attn.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__GNUC__)
#define D2DETR_INLINE inline __attribute__((always_inline))
#define D2DETR_PREFETCH(p) __builtin_prefetch(p)
#else
#define D2DETR_INLINE inline
#define D2DETR_PREFETCH(p) ((void)0)
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define D2DETR_X86_DISPATCH 1
#endif


namespace d2detr {
namespace {

template <typename scalar_t>
struct KernelArgs {
  const scalar_t* value;      // [N, S, M, D]
  const int64_t* shapes;      // [L, 2]
  const int64_t* starts;      // [L]
  const scalar_t* loc;        // [N, Q, M, L, P, 2]
  const scalar_t* attn;       // [N, Q, M, L, P]
  scalar_t* out;              // [N, Q, M * D]            (forward)
  const scalar_t* grad_out;   // [N, Q, M * D]            (backward)
  scalar_t* grad_loc;         // [N, Q, M, L, P, 2]       (backward)
  scalar_t* grad_attn;        // [N, Q, M, L, P]          (backward)
  int64_t N, S, M, D, Q, L, P;
};

// ---- channel vectors ------------------------------------------------------
// 32-byte vectors through the GCC/Clang vector extension: one ymm register in
// the AVX2 build of the kernels, two xmm registers in the baseline build.
#ifdef __GNUC__
#define D2DETR_HAVE_VEC 1
template <typename T>
struct VecT;
template <>
struct VecT<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int size = 8;
};
template <>
struct VecT<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int size = 4;
};
template <typename T>
D2DETR_INLINE typename VecT<T>::type vload(const T* p) {
  typename VecT<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
D2DETR_INLINE void vstore(T* p, const typename VecT<T>::type& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// Horizontal sum as a tree (halves added pairwise).
D2DETR_INLINE float hsum(const VecT<float>::type& v) {
  typedef float v4 __attribute__((vector_size(16)));
  v4 lo = {v[0], v[1], v[2], v[3]}, hi = {v[4], v[5], v[6], v[7]};
  lo += hi;
  return (lo[0] + lo[2]) + (lo[1] + lo[3]);
}
D2DETR_INLINE double hsum(const VecT<double>::type& v) {
  return (v[0] + v[2]) + (v[1] + v[3]);
}
#endif

// One bilinear corner that lies inside the map: element offset of its
// channel-0 value relative to value[n, 0, m, 0], the weight
// attention * bilinear, and its slot (4 * point + corner) for the backward.
template <typename scalar_t>
struct Entry {
  int64_t off;
  scalar_t w;
  int64_t slot;
};

// Bilinear geometry of one point (grid_sample, align_corners=False); valid == 0
// when no corner is inside the map.
template <typename scalar_t>
struct Geo {
  scalar_t lh, lw, hh, hw;
  bool valid;
};

// Head-major loops read the locations / weights of consecutive queries with a
// stride of M*L*P elements: fetch those of a later query ahead of time.
template <typename scalar_t>
D2DETR_INLINE void prefetch_point_data(const KernelArgs<scalar_t>& a, int64_t nq, int64_t m) {
  if (nq >= a.N * a.Q) {
    return;
  }
  const int64_t LP = a.L * a.P;
  const char* loc = reinterpret_cast<const char*>(a.loc + (nq * a.M + m) * LP * 2);
  const char* attn = reinterpret_cast<const char*>(a.attn + (nq * a.M + m) * LP);
  for (int64_t b = 0; b < LP * 2 * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
    D2DETR_PREFETCH(loc + b);
  }
  for (int64_t b = 0; b < LP * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
    D2DETR_PREFETCH(attn + b);
  }
}

// Appends the in-map corners of the (m, l, p) points of one (n, q, m) to `e`;
// returns how many were written. `geo` (optional) receives per-point geometry.
template <typename scalar_t>
D2DETR_INLINE int64_t build_entries(const KernelArgs<scalar_t>& a, int64_t nq, int64_t m, Entry<scalar_t>* e,
                                    Geo<scalar_t>* geo) {
  const int64_t M = a.M, D = a.D, L = a.L, P = a.P;
  const int64_t MD = M * D;
  const scalar_t* loc = a.loc + (nq * M + m) * L * P * 2;
  const scalar_t* attn = a.attn + (nq * M + m) * L * P;
  int64_t ne = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
    const int64_t level_off = a.starts[l] * MD;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t pt = l * P + p;
      const scalar_t h_im = loc[2 * pt + 1] * static_cast<scalar_t>(H) - scalar_t(0.5);
      const scalar_t w_im = loc[2 * pt] * static_cast<scalar_t>(W) - scalar_t(0.5);
      // Also rejects NaN and keeps the integer conversions below in range.
      const bool valid = h_im >= scalar_t(-1) && w_im >= scalar_t(-1) && h_im < static_cast<scalar_t>(H) &&
                         w_im < static_cast<scalar_t>(W);
      if (!valid) {
        if (geo) {
          geo[pt].valid = false;
        }
        continue;
      }
      const scalar_t h0f = std::floor(h_im), w0f = std::floor(w_im);
      const int64_t h0 = static_cast<int64_t>(h0f), w0 = static_cast<int64_t>(w0f);
      const scalar_t lh = h_im - h0f, lw = w_im - w0f;
      const scalar_t hh = scalar_t(1) - lh, hw = scalar_t(1) - lw;
      if (geo) {
        geo[pt] = Geo<scalar_t>{lh, lw, hh, hw, true};
      }
      const scalar_t aw = attn[pt];
      const bool vh0 = h0 >= 0, vh1 = h0 + 1 < H, vw0 = w0 >= 0, vw1 = w0 + 1 < W;
      const int64_t base = level_off + (h0 * W + w0) * MD;
      if (vh0 && vw0) {
        e[ne++] = Entry<scalar_t>{base, aw * hh * hw, 4 * pt};
      }
      if (vh0 && vw1) {
        e[ne++] = Entry<scalar_t>{base + MD, aw * hh * lw, 4 * pt + 1};
      }
      if (vh1 && vw0) {
        e[ne++] = Entry<scalar_t>{base + W * MD, aw * lh * hw, 4 * pt + 2};
      }
      if (vh1 && vw1) {
        e[ne++] = Entry<scalar_t>{base + (W + 1) * MD, aw * lh * lw, 4 * pt + 3};
      }
    }
  }
  return ne;
}

// out[0:nc] = sum_e e.w * v[e.off : e.off + nc]; v and out already offset to the channel block.
#ifdef D2DETR_HAVE_VEC
template <typename scalar_t, int NV>
D2DETR_INLINE void gather_block(const scalar_t* v, const Entry<scalar_t>* e, int64_t ne, scalar_t* out) {
  using V = typename VecT<scalar_t>::type;
  constexpr int VW = VecT<scalar_t>::size;
  V acc[NV];
  for (int j = 0; j < NV; ++j) {
    acc[j] = V{};
  }
  for (int64_t i = 0; i < ne; ++i) {
    const scalar_t* src = v + e[i].off;
    const scalar_t w = e[i].w;
    for (int j = 0; j < NV; ++j) {
      acc[j] += w * vload(src + j * VW);
    }
  }
  for (int j = 0; j < NV; ++j) {
    vstore(out + j * VW, acc[j]);
  }
}

// dots[e.slot] += dot(g, v[e.off:]) and gv[e.off:] += e.w * g over one channel block.
template <typename scalar_t, int NV>
D2DETR_INLINE void scatter_block(const scalar_t* v, scalar_t* gv, const scalar_t* g, const Entry<scalar_t>* e,
                                 int64_t ne, scalar_t* dots) {
  using V = typename VecT<scalar_t>::type;
  constexpr int VW = VecT<scalar_t>::size;
  V gr[NV];
  for (int j = 0; j < NV; ++j) {
    gr[j] = vload(g + j * VW);
  }
  for (int64_t i = 0; i < ne; ++i) {
    const scalar_t* src = v + e[i].off;
    scalar_t* dst = gv + e[i].off;
    const scalar_t w = e[i].w;
    V s = gr[0] * vload(src);
    for (int j = 1; j < NV; ++j) {
      s += gr[j] * vload(src + j * VW);
    }
    dots[e[i].slot] += hsum(s);
    for (int j = 0; j < NV; ++j) {
      vstore(dst + j * VW, vload(dst + j * VW) + w * gr[j]);
    }
  }
}
#endif

template <typename scalar_t>
D2DETR_INLINE void gather_scalar(const scalar_t* v, const Entry<scalar_t>* e, int64_t ne, scalar_t* out, int64_t nc) {
  for (int64_t d = 0; d < nc; ++d) {
    out[d] = scalar_t(0);
  }
  for (int64_t i = 0; i < ne; ++i) {
    const scalar_t* src = v + e[i].off;
    const scalar_t w = e[i].w;
    for (int64_t d = 0; d < nc; ++d) {
      out[d] += w * src[d];
    }
  }
}

template <typename scalar_t>
D2DETR_INLINE void scatter_scalar(const scalar_t* v, scalar_t* gv, const scalar_t* g, const Entry<scalar_t>* e,
                                  int64_t ne, scalar_t* dots, int64_t nc) {
  for (int64_t i = 0; i < ne; ++i) {
    const scalar_t* src = v + e[i].off;
    scalar_t* dst = gv + e[i].off;
    const scalar_t w = e[i].w;
    scalar_t s = 0;
    for (int64_t d = 0; d < nc; ++d) {
      s += g[d] * src[d];
      dst[d] += w * g[d];
    }
    dots[e[i].slot] += s;
  }
}

// Channel blocking: blocks of 4 vectors, then single vectors, then scalars.
template <typename scalar_t>
D2DETR_INLINE void gather_channels(const scalar_t* v, const Entry<scalar_t>* e, int64_t ne, scalar_t* out,
                                   int64_t D) {
  int64_t d = 0;
#ifdef D2DETR_HAVE_VEC
  constexpr int VW = VecT<scalar_t>::size;
  for (; d + 4 * VW <= D; d += 4 * VW) {
    gather_block<scalar_t, 4>(v + d, e, ne, out + d);
  }
  for (; d + VW <= D; d += VW) {
    gather_block<scalar_t, 1>(v + d, e, ne, out + d);
  }
#endif
  if (d < D) {
    gather_scalar(v + d, e, ne, out + d, D - d);
  }
}

template <typename scalar_t>
D2DETR_INLINE void scatter_channels(const scalar_t* v, scalar_t* gv, const scalar_t* g, const Entry<scalar_t>* e,
                                    int64_t ne, scalar_t* dots, int64_t D) {
  int64_t d = 0;
#ifdef D2DETR_HAVE_VEC
  constexpr int VW = VecT<scalar_t>::size;
  for (; d + 4 * VW <= D; d += 4 * VW) {
    scatter_block<scalar_t, 4>(v + d, gv + d, g + d, e, ne, dots);
  }
  for (; d + VW <= D; d += VW) {
    scatter_block<scalar_t, 1>(v + d, gv + d, g + d, e, ne, dots);
  }
#endif
  if (d < D) {
    scatter_scalar(v + d, gv + d, g + d, e, ne, dots, D - d);
  }
}

// Per-task scratch: the corner list (and for the backward geometry and dots).
template <typename scalar_t>
struct Scratch {
  std::vector<Entry<scalar_t>> entries;
  std::vector<Geo<scalar_t>> geo;
  std::vector<scalar_t> dots;
  explicit Scratch(int64_t LP, bool backward) : entries(4 * LP) {
    if (backward) {
      geo.resize(LP);
      dots.resize(4 * LP);
    }
  }
};

// Forward over [begin, end) of the flattened (n, m, q): head-major, so that a
// thread's gathers stay within one head's slice of value (S * D elements,
// ~0.7 MB for the Deformable DETR encoder) and hit the cache.
template <typename scalar_t>
D2DETR_INLINE void forward_range_impl(const KernelArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t M = a.M, D = a.D, S = a.S, Q = a.Q;
  const int64_t MD = M * D;
  Scratch<scalar_t> scratch(a.L * a.P, false);
  Entry<scalar_t>* e = scratch.entries.data();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t q = i % Q, nm = i / Q;
    const int64_t n = nm / M, m = nm % M;
    const int64_t nq = n * Q + q;
    prefetch_point_data(a, nq + 2, m);
    const int64_t ne = build_entries(a, nq, m, e, static_cast<Geo<scalar_t>*>(nullptr));
    gather_channels(a.value + n * S * MD + m * D, e, ne, a.out + nq * MD + m * D, D);
  }
}

// Backward for head m of batch n, queries [q_begin, q_end); grad_value points
// at a [N, S, M, D] buffer this call may write to without synchronisation.
template <typename scalar_t>
D2DETR_INLINE void backward_block_impl(const KernelArgs<scalar_t>& a, scalar_t* grad_value, int64_t n, int64_t m,
                                       int64_t q_begin, int64_t q_end) {
  const int64_t M = a.M, D = a.D, L = a.L, P = a.P, S = a.S, Q = a.Q;
  const int64_t MD = M * D, LP = L * P;
  Scratch<scalar_t> scratch(LP, true);
  Entry<scalar_t>* e = scratch.entries.data();
  Geo<scalar_t>* geo = scratch.geo.data();
  scalar_t* dots = scratch.dots.data();
  const int64_t head_off = n * S * MD + m * D;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t nq = n * Q + q;
    if (q + 2 < q_end) {
      prefetch_point_data(a, nq + 2, m);
      D2DETR_PREFETCH(a.grad_out + (nq + 2) * MD + m * D);
    }
    const int64_t ne = build_entries(a, nq, m, e, geo);
    std::fill(dots, dots + 4 * LP, scalar_t(0));
    scatter_channels(a.value + head_off, grad_value + head_off, a.grad_out + nq * MD + m * D, e, ne, dots, D);
    const int64_t pt_off = (nq * M + m) * LP;
    const scalar_t* attn = a.attn + pt_off;
    scalar_t* grad_attn = a.grad_attn + pt_off;
    scalar_t* grad_loc = a.grad_loc + 2 * pt_off;
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t H = static_cast<scalar_t>(a.shapes[2 * l]), W = static_cast<scalar_t>(a.shapes[2 * l + 1]);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t pt = l * P + p;
        if (!geo[pt].valid) {
          grad_attn[pt] = scalar_t(0);
          grad_loc[2 * pt] = scalar_t(0);
          grad_loc[2 * pt + 1] = scalar_t(0);
          continue;
        }
        const Geo<scalar_t>& c = geo[pt];
        const scalar_t* dt = dots + 4 * pt;
        // corners: 0 (h0, w0), 1 (h0, w1), 2 (h1, w0), 3 (h1, w1)
        const scalar_t d_w = c.hh * (dt[1] - dt[0]) + c.lh * (dt[3] - dt[2]);
        const scalar_t d_h = c.hw * (dt[2] - dt[0]) + c.lw * (dt[3] - dt[1]);
        grad_attn[pt] = c.hh * c.hw * dt[0] + c.hh * c.lw * dt[1] + c.lh * c.hw * dt[2] + c.lh * c.lw * dt[3];
        grad_loc[2 * pt] = attn[pt] * W * d_w;
        grad_loc[2 * pt + 1] = attn[pt] * H * d_h;
      }
    }
  }
}

// ---- ISA variants ----------------------------------------------------------
template <typename scalar_t>
void forward_range_base(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_range_impl(a, b, e);
}
template <typename scalar_t>
void backward_block_base(const KernelArgs<scalar_t>& a, scalar_t* gv, int64_t n, int64_t m, int64_t qb, int64_t qe) {
  backward_block_impl(a, gv, n, m, qb, qe);
}

#ifdef D2DETR_X86_DISPATCH
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_range_impl(a, b, e);
}
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_block_avx2(const KernelArgs<scalar_t>& a, scalar_t* gv, int64_t n,
                                                             int64_t m, int64_t qb, int64_t qe) {
  backward_block_impl(a, gv, n, m, qb, qe);
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

template <typename scalar_t>
void forward_range(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {
#ifdef D2DETR_X86_DISPATCH
  if (cpu_has_avx2()) {
    return forward_range_avx2(a, b, e);
  }
#endif
  forward_range_base(a, b, e);
}

template <typename scalar_t>
void backward_block(const KernelArgs<scalar_t>& a, scalar_t* gv, int64_t n, int64_t m, int64_t qb, int64_t qe) {
#ifdef D2DETR_X86_DISPATCH
  if (cpu_has_avx2()) {
    return backward_block_avx2(a, gv, n, m, qb, qe);
  }
#endif
  backward_block_base(a, gv, n, m, qb, qe);
}

// ---- checks ----------------------------------------------------------------
void check_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
               const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const char* name) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              /*check_values=*/true);
  TORCH_CHECK_VALUE(value.device().is_cpu(), name, ": CPU kernel called with tensors on ", value.device());
}

// The kernels run in float64 when value is float64, else in float32: float16 /
// bfloat16 inputs (model.half(), autocast) and mixed dtypes are converted to it,
// and the results converted back (ms_deform_attn.h, "Dtypes").
at::ScalarType compute_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.to(ct).contiguous();
}

template <typename scalar_t>
KernelArgs<scalar_t> make_args(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                               const at::Tensor& loc, const at::Tensor& attn) {
  KernelArgs<scalar_t> a{};
  a.value = value.data_ptr<scalar_t>();
  a.shapes = shapes.data_ptr<int64_t>();
  a.starts = starts.data_ptr<int64_t>();
  a.loc = loc.data_ptr<scalar_t>();
  a.attn = attn.data_ptr<scalar_t>();
  a.N = value.size(0);
  a.S = value.size(1);
  a.M = value.size(2);
  a.D = value.size(3);
  a.Q = loc.size(1);
  a.L = loc.size(3);
  a.P = loc.size(4);
  return a;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value_,
    const at::Tensor& spatial_shapes_,
    const at::Tensor& level_start_index_,
    const at::Tensor& sampling_locations_,
    const at::Tensor& attention_weights_) {
  check_cpu(value_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_, "ms_deform_attn");
  const auto ct = compute_type(value_);
  const auto value = as_compute(value_, ct);
  const auto spatial_shapes = spatial_shapes_.contiguous();
  const auto level_start_index = level_start_index_.contiguous();
  const auto sampling_locations = as_compute(sampling_locations_, ct);
  const auto attention_weights = as_compute(attention_weights_, ct);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Q = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  auto output = at::empty({N, Q, M * D}, value.options());
  if (output.numel() == 0) {
    return output.to(value_.scalar_type());
  }
  if (L == 0 || P == 0) {
    return output.zero_().to(value_.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    auto a = make_args<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    a.out = output.data_ptr<scalar_t>();
    // ~ L*P*4*D multiply-adds per (n, m, q); aim for >= ~32k per task.
    const int64_t work = std::max<int64_t>(1, L * P * 4 * D);
    const int64_t grain = std::max<int64_t>(1, 32768 / work);
    at::parallel_for(0, N * M * Q, grain, [&](int64_t b, int64_t e) { forward_range(a, b, e); });
  });
  return output.to(value_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value_,
    const at::Tensor& spatial_shapes_,
    const at::Tensor& level_start_index_,
    const at::Tensor& sampling_locations_,
    const at::Tensor& attention_weights_,
    const at::Tensor& grad_output_) {
  check_cpu(value_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_,
            "ms_deform_attn_backward");
  check_ms_deform_attn_backward_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
                                       attention_weights_, grad_output_, /*check_values=*/false);
  const auto ct = compute_type(value_);
  const auto value = as_compute(value_, ct);
  const auto spatial_shapes = spatial_shapes_.contiguous();
  const auto level_start_index = level_start_index_.contiguous();
  const auto sampling_locations = as_compute(sampling_locations_, ct);
  const auto attention_weights = as_compute(attention_weights_, ct);
  const auto grad_output = as_compute(grad_output_, ct);
  const int64_t N = value.size(0), M = value.size(2);
  const int64_t Q = sampling_locations.size(1);

  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  // Every gradient comes back in the dtype of its input.
  auto finish = [&]() {
    return std::make_tuple(grad_value.to(value_.scalar_type()), grad_loc.to(sampling_locations_.scalar_type()),
                           grad_attn.to(attention_weights_.scalar_type()));
  };
  if (grad_attn.numel() == 0 || value.numel() == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return finish();
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    auto a = make_args<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    a.grad_out = grad_output.data_ptr<scalar_t>();
    a.grad_loc = grad_loc.data_ptr<scalar_t>();
    a.grad_attn = grad_attn.data_ptr<scalar_t>();
    const int64_t NM = N * M;
    const int64_t threads = at::get_num_threads();
    if (NM >= threads || at::in_parallel_region() || Q < 2 * threads) {
      // Each task owns grad_value[n, :, m, :]: no races, no extra memory.
      scalar_t* gv = grad_value.data_ptr<scalar_t>();
      at::parallel_for(0, NM, 1, [&](int64_t b, int64_t e) {
        for (int64_t nm = b; nm < e; ++nm) {
          backward_block(a, gv, nm / M, nm % M, 0, Q);
        }
      });
    } else {
      // Few (batch, head) pairs: split queries as well; one grad_value buffer per thread.
      auto buffers = at::zeros({threads, value.size(0), value.size(1), value.size(2), value.size(3)},
                               value.options());
      scalar_t* buf = buffers.data_ptr<scalar_t>();
      const int64_t stride = value.numel();
      at::parallel_for(0, NM * Q, 1, [&](int64_t b, int64_t e) {
        scalar_t* gv = buf + at::get_thread_num() * stride;
        for (int64_t i = b; i < e;) {
          const int64_t nm = i / Q, q0 = i % Q;
          const int64_t q1 = std::min(Q, q0 + (e - i));
          backward_block(a, gv, nm / M, nm % M, q0, q1);
          i += q1 - q0;
        }
      });
      at::sum_out(grad_value, buffers, {0});
    }
  });
  return finish();
}

}  // namespace d2detr
