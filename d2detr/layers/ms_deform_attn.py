"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

``ms_deform_attn`` runs the native operator ``torch.ops.d2detr.ms_deform_attn``
(C++ CPU kernels, CUDA kernels when built with them; autograd, Meta/fake and
autocast kernels registered in C++, so the op traces, scripts, exports and
compiles). Where the native library is not available (not built, or no kernel
for the tensors' device) it falls back, with a one-time warning, to
``ms_deform_attn_reference``, a pure-PyTorch version built on ``grid_sample``.

Semantics (identical to the official ``MSDeformAttnFunction``)::

    value               [N, S, M, D]        S = sum_l H_l * W_l, levels concatenated
    spatial_shapes      [L, 2]   int64      (H_l, W_l)
    level_start_index   [L]      int64      exclusive cumsum of H_l * W_l
    sampling_locations  [N, Q, M, L, P, 2]  (x, y) normalised to [0, 1]
    attention_weights   [N, Q, M, L, P]
    -> output           [N, Q, M * D]

A location (x, y) on level l is sampled bilinearly at pixel
(x * W_l - 0.5, y * H_l - 0.5), with zeros outside the feature map, i.e. exactly
``F.grid_sample(align_corners=False, padding_mode="zeros")`` on ``2 * loc - 1``
(gradients included: at pixel -1 the value is 0 but the location gradient is not).

Dtypes, alike on every device, in the Meta kernel and in the reference: any
floating dtypes, mixed (``model.half()`` gives float16 locations). The op computes
in float64 when ``value`` is float64, otherwise it accumulates in float32 with
float32 locations; the output has ``value``'s dtype, each gradient its input's.
Under ``torch.autocast`` the locations and weights are cast to float32 and
``value`` keeps its dtype (the autocast dtype, since it comes out of
``value_proj``), so mixed-precision training runs the float16 / bfloat16 CUDA
kernels; ``MultiScaleDeformableAttention(compute_in_float32=True)`` restores
Deformable DETR's policy of running the whole op in float32.
"""
import importlib.util
import math
import os
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "MultiScaleDeformableAttention",
    "native_ms_deform_attn_available",
    "get_library_path",
    "set_compute_in_float32_default",
]

_NATIVE_LOAD_ERROR: Optional[str] = None


def get_library_path() -> Optional[str]:
    """Path of the compiled ``d2detr._C`` library (for ``torch.ops.load_library``
    in processes that only need the operator, e.g. to run an exported model),
    or None when it has not been built."""
    try:
        spec = importlib.util.find_spec("d2detr._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def _has_kernel(key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("d2detr::ms_deform_attn", key)
    except Exception:  # the op is not registered at all
        return False


def _load_native() -> bool:
    global _NATIVE_LOAD_ERROR
    if _has_kernel("CPU"):  # loaded already (e.g. torch.ops.load_library)
        return True
    try:
        import d2detr._C  # noqa: F401  registers torch.ops.d2detr.*
    except ImportError as e:
        _NATIVE_LOAD_ERROR = f"{type(e).__name__}: {e}"
        return False
    return _has_kernel("CPU")


_NATIVE = _load_native()
_NATIVE_CUDA = _NATIVE and _has_kernel("CUDA")
_WARNED = False
# Devices (str(torch.device)) the library has no CUDA kernel image for; the C++
# error says "... has no CUDA kernel image for this GPU ..." (check_launch in
# ms_deform_attn_cuda.cu).
_NO_KERNEL_IMAGE = set()
_NO_KERNEL_IMAGE_MESSAGE = "has no CUDA kernel image for this GPU"


def native_ms_deform_attn_available(device: str = "cpu") -> bool:
    """Whether the native operator has a kernel for ``device`` ("cpu" or "cuda")."""
    device = torch.device(device).type
    if device == "cpu":
        return _NATIVE
    if device == "cuda":
        return _NATIVE_CUDA
    return False


# --------------------------------------------------------------------------- #
# Input validation (the native op does the same checks in C++)                  #
# --------------------------------------------------------------------------- #
def _shape(t: Tensor) -> List[int]:
    return list(t.shape)


def check_ms_deform_attn_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    check_values: bool = True,
) -> None:
    """Raises ValueError/TypeError with a clear message on malformed inputs."""
    p = "ms_deform_attn: "
    for name, t in (
        ("value", value),
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{p}{name} must be a Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{p}value must be 4-D [N, S, M, D], got shape {_shape(value)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"{p}spatial_shapes must be [L, 2] (H, W per level), got shape {_shape(spatial_shapes)}")
    L = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != L:
        raise ValueError(
            f"{p}level_start_index must be [L] with L = {L} (from spatial_shapes), got shape {_shape(level_start_index)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"{p}sampling_locations must be 6-D [N, Q, M, L, P, 2], got shape {_shape(sampling_locations)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(f"{p}attention_weights must be 5-D [N, Q, M, L, P], got shape {_shape(attention_weights)}")
    N, S, M, D = value.shape
    _, Q, _, _, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M or sampling_locations.shape[3] != L:
        raise ValueError(
            f"{p}sampling_locations must be [N={N}, Q, M={M}, L={L}, P, 2] to match value {_shape(value)} and "
            f"spatial_shapes {_shape(spatial_shapes)}, got {_shape(sampling_locations)}"
        )
    if _shape(attention_weights) != [N, Q, M, L, P]:
        raise ValueError(
            f"{p}attention_weights must be [N, Q, M, L, P] = {[N, Q, M, L, P]} (from sampling_locations), "
            f"got {_shape(attention_weights)}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"{p}{name} must be int64 (torch.long), got {t.dtype}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"{p}{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(f"{p}all inputs must be on one device: value is on {value.device}, {name} on {t.device}")
    if check_values and L > 0:
        shapes = spatial_shapes.detach().cpu()
        if bool((shapes <= 0).any()):
            raise ValueError(f"{p}spatial_shapes must be positive, got {shapes.tolist()}")
        sizes = shapes[:, 0] * shapes[:, 1]
        total = int(sizes.sum())
        if total != S:
            raise ValueError(
                f"{p}value has S = {S} tokens but spatial_shapes {shapes.tolist()} give sum(H*W) = {total}"
            )
        expected = torch.cumsum(sizes, 0) - sizes
        starts = level_start_index.detach().cpu()
        if not torch.equal(starts, expected):
            raise ValueError(
                f"{p}level_start_index {starts.tolist()} does not match spatial_shapes {shapes.tolist()} "
                f"(expected {expected.tolist()})"
            )
    elif check_values and S != 0:
        raise ValueError(f"{p}value has S = {S} tokens but spatial_shapes has no levels")


# --------------------------------------------------------------------------- #
# Reference implementation                                                     #
# --------------------------------------------------------------------------- #
def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention (``F.grid_sample``).

    Same arguments and result as :func:`ms_deform_attn`; slow and memory hungry
    (it materialises every sampled value), kept as the numeric reference and
    the fallback where the native operator is unavailable."""
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # The native op's dtype policy: float64 for a float64 value, else float32; the
    # result in value's dtype (autograd returns each gradient in its input's dtype).
    out_dtype = value.dtype
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)
    shapes: List[List[int]] = spatial_shapes.tolist()
    starts: List[int] = level_start_index.tolist()
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lid in range(L):
        H, W = shapes[lid][0], shapes[lid][1]
        start = starts[lid]
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value[:, start : start + H * W].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        # [N, Q, M, P, 2] -> [N*M, Q, P, 2]
        grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        # [N*M, D, Q, P]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Q, M, L, P] -> [N*M, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L * P)
    if L == 0:
        return value.new_zeros((N, Q, M * D), dtype=out_dtype)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Q)
    return out.transpose(1, 2).contiguous().to(out_dtype)


# --------------------------------------------------------------------------- #
# Public entry point                                                           #
# --------------------------------------------------------------------------- #
def _warn_fallback(reason: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"d2detr: native ms_deform_attn unavailable ({reason}); using the slow pure-PyTorch "
            "reference (grid_sample). Build the extension with "
            "`python setup.py build_ext --inplace` (or `make install`).",
            RuntimeWarning,
            stacklevel=4,
        )


def _native_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    return torch.ops.d2detr.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@torch.jit.unused
def _ms_deform_attn_eager(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device = value.device
    native = _NATIVE and (device.type == "cpu" or (device.type == "cuda" and _NATIVE_CUDA))
    if native and str(device) not in _NO_KERNEL_IMAGE:
        if torch.compiler.is_compiling():  # traced once; a missing kernel image then fails loudly
            return _native_op(*args)
        try:
            return _native_op(*args)
        except NotImplementedError as e:  # built without this GPU's architecture
            if _NO_KERNEL_IMAGE_MESSAGE not in str(e):
                raise
            _NO_KERNEL_IMAGE.add(str(device))
            _warn_fallback(str(e).splitlines()[0])
    elif not _NATIVE:
        _warn_fallback(f"d2detr._C could not be loaded: {_NATIVE_LOAD_ERROR}")
    elif not native:
        _warn_fallback(f"d2detr._C has no kernel for device '{device.type}'")
    check_ms_deform_attn_inputs(*args)
    return ms_deform_attn_reference(*args)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: [N, S, M, D] per-head values of all levels, concatenated.
        spatial_shapes: [L, 2] int64, (H, W) of each level.
        level_start_index: [L] int64, offset of each level in S.
        sampling_locations: [N, Q, M, L, P, 2], (x, y) in [0, 1] (outside reads zeros).
        attention_weights: [N, Q, M, L, P].

    Any floating dtypes (module docstring, "Dtypes"). Falls back, with a one-time
    warning, to :func:`ms_deform_attn_reference` where the library is not built,
    has no kernel for the device, or has no CUDA kernel image for the GPU.

    Returns:
        [N, Q, M * D] in value's dtype
    """
    if torch.jit.is_scripting():
        return torch.ops.d2detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return _ms_deform_attn_eager(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


# --------------------------------------------------------------------------- #
# Module                                                                       #
# --------------------------------------------------------------------------- #
_COMPUTE_IN_FLOAT32_DEFAULT = False


def set_compute_in_float32_default(enabled: bool) -> None:
    """Default of ``MultiScaleDeformableAttention(compute_in_float32=None)`` for
    modules built afterwards (e.g. call it before building a model from a config)."""
    global _COMPUTE_IN_FLOAT32_DEFAULT
    _COMPUTE_IN_FLOAT32_DEFAULT = bool(enabled)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's ``MSDeformAttn``: projections + :func:`ms_deform_attn`.

    Submodule names and initialisation follow the official code
    (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``), so official checkpoints load unchanged. No residual and no
    dropout inside, as in the official module.

    Args:
        compute_in_float32: run the deformable-attention core on float32 copies
            of a float16 / bfloat16 ``value`` (and of the locations and weights),
            the result cast back to ``value``'s dtype: the official code's policy
            under mixed precision. False (the default): under ``torch.autocast``
            ``value`` stays in the autocast dtype (half the memory traffic, and
            the float16 / bfloat16 CUDA kernels, which accumulate in float32)
            while locations and weights are cast to float32. None: the value of
            :func:`set_compute_in_float32_default` when the module is built.
            A plain attribute, so it can also be flipped on a built model.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        compute_in_float32: Optional[bool] = None,
    ):
        super().__init__()
        self.compute_in_float32: bool = (
            _COMPUTE_IN_FLOAT32_DEFAULT if compute_in_float32 is None else bool(compute_in_float32)
        )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                "MultiScaleDeformableAttention: a per-head dimension that is a power of 2 is the most efficient "
                f"(got embed_dim / num_heads = {head_dim})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.head_dim = head_dim
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(self.num_heads, 1, 1, 2)
            .repeat(1, self.num_levels, self.num_points, 1)
        )
        for i in range(self.num_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        value_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: [N, Q, C] (position embedding already added).
            reference_points: [N, Q, L, 2] normalised (x, y), or [N, Q, L, 4]
                normalised (cx, cy, w, h) boxes: offsets are then scaled by
                w, h * 0.5 / num_points.
            value: [N, S, C] flattened multi-scale features.
            spatial_shapes: [L, 2] int64 (H, W).
            level_start_index: [L] int64.
            value_padding_mask: [N, S] bool, True at padding, or None.

        Returns:
            [N, Q, C]
        """
        N, Q, _ = query.shape
        S = value.shape[1]
        M, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.head_dim)
        sampling_offsets = self.sampling_offsets(query).view(N, Q, M, L, P, 2)
        attention_weights = self.attention_weights(query).view(N, Q, M, L * P)
        attention_weights = F.softmax(attention_weights, -1).view(N, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(
                sampling_offsets.dtype
            )
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError("reference_points must have 2 (x, y) or 4 (cx, cy, w, h) values in the last dimension")
        if self.compute_in_float32 and (value.dtype == torch.float16 or value.dtype == torch.bfloat16):
            output = ms_deform_attn(
                value.float(), spatial_shapes, level_start_index, sampling_locations.float(), attention_weights.float()
            ).to(value.dtype)
        else:
            output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return self.output_proj(output)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}"
            + (", compute_in_float32=True" if self.compute_in_float32 else "")
        )
