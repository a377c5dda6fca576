"""Converters from other checkpoint formats to d2detr state dicts.

A small registry keyed by the Hugging Face config's ``model_type``
(``"detr"``, ``"deformable_detr"``, ``"conditional_detr"``, ``"dab-detr"``), plus
sources outside Hugging Face (``"torchvision_resnet"`` ImageNet backbones,
``"detr_official"`` facebookresearch/detr checkpoints, ``"adamixer_mmdet"`` /
``"deqdet_mmdet"`` official AdaMixer / DEQDet checkpoints).
Each entry holds

- ``convert(hf_state_dict, hf_config, **options) -> d2detr state_dict``
- ``overrides(hf_config, **options) -> {"model.num_queries": 100, ...}``: the
  LazyConfig overrides (dotted keys, as on the ``train_net.py`` command line)
  that make our method config build the model the checkpoint belongs to.
- ``detect(keys) -> bool`` (optional): recognises a bare state dict, for
  single files that come without their ``config.json``.

A converter module registers itself on import with :func:`register_converter`;
the modules of the built-in model types are imported on first use, so adding a
method only needs a module and a line in ``_BUILTIN_MODULES``.

Typical use (what ``tools/convert_checkpoint.py`` does)::

    sd, cfg = load_hf_checkpoint("detr-resnet-50/")          # folder or single file
    state_dict, overrides = convert_hf_checkpoint(sd, cfg)
    save_checkpoint("detr_r50.pth", state_dict, overrides=overrides)

The saved file is ``{"model": state_dict, ...}``, loadable with Detectron2's
``DetectionCheckpointer(model).load(path)``.
"""
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Converter",
    "register_converter",
    "get_converter",
    "registered_model_types",
    "load_hf_checkpoint",
    "detect_model_type",
    "convert_hf_checkpoint",
    "save_checkpoint",
    "convert_hf_resnet_backbone",
    "concat_qkv",
    "num_indexed",
    "StateDictMapper",
    "coco91_to_contiguous_rows",
    "select_class_rows",
    "resolve_classes_option",
    "apply_overrides",
    "overrides_to_cli",
    "overrides_to_shell",
    "DetrCheckpointer",
    "apply_checkpoint_overrides",
    "read_checkpoint_overrides",
    "use_ema_weights",
]

StateDict = Dict[str, torch.Tensor]


@dataclass
class Converter:
    model_type: str
    convert: Callable[..., StateDict]
    overrides: Callable[..., Dict[str, Any]]
    detect: Optional[Callable[[Iterable[str]], bool]] = None


_REGISTRY: Dict[str, Converter] = {}
# model_type -> module that registers it (imported lazily)
_BUILTIN_MODULES = {
    "detr": "d2detr.checkpoint.hf_detr",
    "deformable_detr": "d2detr.checkpoint.hf_deformable_detr",
    "conditional_detr": "d2detr.checkpoint.hf_conditional_detr",
    "dab-detr": "d2detr.checkpoint.hf_dab_detr",
    # not Hugging Face: ImageNet backbones and the official DETR release
    "torchvision_resnet": "d2detr.checkpoint.official",
    "detr_official": "d2detr.checkpoint.official",
    "dino_official": "d2detr.checkpoint.dino_official",
    "focus_detr_official": "d2detr.checkpoint.focus_detr_official",
    # official mmdet checkpoints of AdaMixer (mmdet 2) and DEQDet (mmdet 3)
    "adamixer_mmdet": "d2detr.checkpoint.mmdet_adamixer",
    "deqdet_mmdet": "d2detr.checkpoint.mmdet_adamixer",
}


def register_converter(
    model_type: str,
    convert: Callable[..., StateDict],
    overrides: Callable[..., Dict[str, Any]],
    detect: Optional[Callable[[Iterable[str]], bool]] = None,
) -> Converter:
    conv = Converter(model_type, convert, overrides, detect)
    _REGISTRY[model_type] = conv
    return conv


def _import_builtin(model_type: str) -> None:
    module = _BUILTIN_MODULES.get(model_type)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a real import error inside an existing module
            raise


def get_converter(model_type: str) -> Converter:
    if model_type not in _REGISTRY:
        _import_builtin(model_type)
    if model_type not in _REGISTRY:
        raise KeyError(
            f"No checkpoint converter for model_type {model_type!r}; "
            f"available: {registered_model_types()}"
        )
    return _REGISTRY[model_type]


def registered_model_types():
    for t in _BUILTIN_MODULES:
        _import_builtin(t)
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------- IO
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_weight_file(path: str) -> StateDict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import argparse

    # official DETR-family checkpoints carry their argparse "args" beside the weights
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # {"model": ...} wrappers (official DETR, Lightning)
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def load_hf_checkpoint(path: str, config_path: Optional[str] = None) -> Tuple[StateDict, Optional[dict]]:
    """Reads a Hugging Face checkpoint.

    ``path`` is a folder (``config.json`` + ``model.safetensors`` /
    ``pytorch_model.bin``, sharded ones with their ``*.index.json`` included) or
    a single weight file (``.safetensors``, ``.bin``, ``.pth``). The config is
    read from ``config_path``, else from ``config.json`` beside the weights;
    ``None`` when there is none. Returns ``(state_dict, config_dict)``.
    """
    if os.path.isdir(path):
        folder = path
        sd = None
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                sd = _load_weight_file(os.path.join(folder, name))
                break
        if sd is None:
            for name in _INDEX_FILES:
                index = os.path.join(folder, name)
                if os.path.isfile(index):
                    with open(index) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                    sd = {}
                    for shard in shards:
                        sd.update(_load_weight_file(os.path.join(folder, shard)))
                    break
        if sd is None:
            raise FileNotFoundError(
                f"{path}: no {' / '.join(_WEIGHT_FILES + _INDEX_FILES)} in this folder"
            )
    elif os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        sd = _load_weight_file(path)
    else:
        raise FileNotFoundError(path)
    if config_path is None and os.path.isfile(os.path.join(folder, "config.json")):
        config_path = os.path.join(folder, "config.json")
    config = None
    if config_path is not None:
        with open(config_path) as f:
            config = json.load(f)
    return sd, config


def detect_model_type(state_dict: StateDict, config: Optional[dict] = None) -> str:
    """``config["model_type"]`` when known, else the first converter whose
    ``detect`` recognises the keys."""
    if config is not None and "model_type" in config:
        return config["model_type"]
    keys = list(state_dict.keys())
    for t in registered_model_types():
        det = _REGISTRY[t].detect
        if det is not None and det(keys):
            return t
    raise ValueError("Cannot tell which model this state dict belongs to; pass its config.json or --model-type")


def _config_to_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError(f"config must be a dict or a transformers config, got {type(config)}")


def convert_hf_checkpoint(
    state_dict: StateDict, config=None, model_type: Optional[str] = None, **options
) -> Tuple[StateDict, Dict[str, Any]]:
    """Converts a Hugging Face state dict; returns ``(d2detr_state_dict, overrides)``.

    ``config`` is the model's ``config.json`` as a dict (or a transformers
    config object); ``options`` go to the converter (e.g. ``classes="keep"``).
    """
    config = _config_to_dict(config)
    model_type = model_type or detect_model_type(state_dict, config or None)
    conv = get_converter(model_type)
    new_sd = conv.convert(state_dict, config, **options)
    return new_sd, conv.overrides(config, state_dict=state_dict, **options)


def save_checkpoint(path: str, state_dict: StateDict, overrides: Optional[dict] = None, **meta) -> None:
    """Writes ``{"model": state_dict, "__author__": "d2detr", "overrides": ..., **meta}``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"model": {k: v.contiguous() for k, v in state_dict.items()}, "__author__": "d2detr"}
    if overrides:
        payload["overrides"] = dict(overrides)
    payload.update(meta)
    torch.save(payload, path)


# ------------------------------------------------------------ shared conversions
def _strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def convert_hf_resnet_backbone(state_dict: StateDict, prefix: str) -> StateDict:
    """Renames the ResNet under ``prefix`` to Detectron2's ResNet names
    (``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean`` ...).

    Handles both backbones HF DETR-style models carry: timm's (torchvision
    names: ``conv1``, ``bn1``, ``layer1.0.downsample.1``) and transformers' own
    ``ResNetBackbone`` (``embedder.embedder.convolution``,
    ``encoder.stages.0.layers.0.layer.1.normalization`` ...).
    """
    sd = {k: v for k, v in _strip_prefix(state_dict, prefix).items()
          if not k.endswith("num_batches_tracked")}
    if any(k.startswith("embedder.") for k in sd):
        out = {}
        for k, v in sd.items():
            m = re.match(r"embedder\.embedder\.(convolution|normalization)\.(.+)$", k)
            if m:
                out["stem.conv1" + ("" if m.group(1) == "convolution" else ".norm") + "." + m.group(2)] = v
                continue
            m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$", k)
            if not m:
                raise KeyError(f"unexpected ResNet key {prefix}{k}")
            stage, block, rest = int(m.group(1)) + 2, m.group(2), m.group(3)
            rest = re.sub(r"^shortcut\.convolution", "shortcut", rest)
            rest = re.sub(r"^shortcut\.normalization", "shortcut.norm", rest)
            rest = re.sub(r"^layer\.(\d+)\.convolution", lambda n: f"conv{int(n.group(1)) + 1}", rest)
            rest = re.sub(r"^layer\.(\d+)\.normalization", lambda n: f"conv{int(n.group(1)) + 1}.norm", rest)
            out[f"res{stage}.{block}.{rest}"] = v
        return out
    from d2detr.modeling.backbone.resnet import convert_torchvision_resnet_state_dict

    return convert_torchvision_resnet_state_dict(sd)


def concat_qkv(state_dict: StateDict, src: str, dst: str) -> StateDict:
    """``src.{q,k,v}_proj.{weight,bias}`` + ``src.{out_proj|o_proj}`` ->
    ``nn.MultiheadAttention`` names under ``dst`` (``in_proj_weight`` ...)."""
    out = {}
    for p in ("weight", "bias"):
        out[f"{dst}.in_proj_{p}"] = torch.cat(
            [state_dict[f"{src}.{n}_proj.{p}"] for n in ("q", "k", "v")], dim=0
        )
        o = f"{src}.o_proj.{p}" if f"{src}.o_proj.{p}" in state_dict else f"{src}.out_proj.{p}"
        out[f"{dst}.out_proj.{p}"] = state_dict[o]
    return out


def coco91_to_contiguous_rows():
    """Rows to keep from a 91-way (COCO category id indexed) class head to get
    Detectron2's 80 contiguous COCO classes, in Detectron2's order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"] == 1]


def select_class_rows(weight: torch.Tensor, rows, extra_last: bool) -> torch.Tensor:
    """Keeps ``rows`` of a class head's weight/bias (plus its last row, the
    no-object class, when ``extra_last``)."""
    idx = list(rows) + ([weight.shape[0] - 1] if extra_last else [])
    return weight[torch.as_tensor(idx, dtype=torch.long)].clone()


def resolve_classes_option(classes: str, config: dict, num_labels: int) -> str:
    """``"auto"`` -> ``"coco80"`` for a 91-label COCO head (COCO ids as indices,
    what facebook/detr-* ship), else ``"keep"``."""
    if classes not in ("auto", "keep", "coco80"):
        raise ValueError(f"classes must be auto, keep or coco80, not {classes!r}")
    if classes != "auto":
        if classes == "coco80" and num_labels != 91:
            raise ValueError(f"coco80 needs a 91-label COCO head, this one has {num_labels} labels")
        return classes
    id2label = {str(k): v for k, v in (config.get("id2label") or {}).items()}
    if num_labels == 91 and id2label.get("1", "person").lower() == "person":
        return "coco80"
    return "keep"


def num_indexed(state_dict, prefix: str) -> int:
    """How many ``prefix{i}.`` entries (layers, MLP layers ...) the keys hold: ``max(i) + 1``, 0 if none."""
    idx = {int(m.group(1)) for k in state_dict for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


class StateDictMapper:
    """Builds a converted state dict (``out``) from a source one (``sd``), remembering which
    source keys were used so that :meth:`check_all_used` can refuse tensors nobody converted."""

    def __init__(self, sd: StateDict):
        self.sd = sd
        self.out: StateDict = {}
        self.used = set()

    def take(self, src: str, dst: str) -> None:
        self.out[dst] = self.sd[src]
        self.used.add(src)

    def take_weight_bias(self, src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            self.take(f"{src}.{p}", f"{dst}.{p}")

    def take_mlp(self, src: str, dst: str) -> None:
        """``src.layers.{i}.{weight,bias}`` -> ``dst.layers.{i}...`` (our ``MLP``)."""
        for i in range(num_indexed(self.sd, f"{src}.layers.")):
            self.take_weight_bias(f"{src}.layers.{i}", f"{dst}.layers.{i}")

    def take_resnet_backbone(self, prefix: str, dst: str = "backbone.") -> None:
        """Every tensor under ``prefix`` via :func:`convert_hf_resnet_backbone`."""
        for k, v in convert_hf_resnet_backbone(self.sd, prefix).items():
            self.out[dst + k] = v
        self.used.update(k for k in self.sd if k.startswith(prefix))

    def take_attention(self, src: str, dst: str) -> None:
        """HF ``q/k/v_proj`` + ``out_proj`` (or ``o_proj``) -> ``nn.MultiheadAttention`` names."""
        self.out.update(concat_qkv(self.sd, f"{src}", f"{dst}"))
        self.used.update(f"{src}.{n}_proj.{p}" for n in ("q", "k", "v", "o", "out") for p in ("weight", "bias"))

    def take_detr_encoder_layers(self, src: str, dst: str, fc: str = "fc", extra=()) -> None:
        """HF DETR-style encoder layers ``{src}{i}`` (``self_attn``, ``self_attn_layer_norm``,
        ``final_layer_norm``, ``{fc}1/2``) -> DETR's ``TransformerEncoderLayer`` names
        (``self_attn``, ``norm1/2``, ``linear1/2``) under ``{dst}{i}``; ``extra`` adds
        ``(hf_name, our_name)`` pairs taken when present."""
        for i in range(num_indexed(self.sd, src)):
            s, d = f"{src}{i}", f"{dst}{i}"
            self.take_attention(f"{s}.self_attn", f"{d}.self_attn")
            for a, b in (("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"),
                         (f"{fc}1", "linear1"), (f"{fc}2", "linear2")):
                self.take_weight_bias(f"{s}.{a}", f"{d}.{b}")
            for a, b in extra:
                if f"{s}.{a}" in self.sd:
                    self.take(f"{s}.{a}", f"{d}.{b}")

    def take_class_head(self, src: str, dst: str, mode: str, extra_last: bool) -> None:
        """A class head, reduced to Detectron2's 80 COCO classes when ``mode == "coco80"``
        (see :func:`select_class_rows`)."""
        for p in ("weight", "bias"):
            w = self.sd[f"{src}.{p}"]
            if mode == "coco80":
                w = select_class_rows(w, coco91_to_contiguous_rows(), extra_last=extra_last)
            self.out[f"{dst}.{p}"] = w
            self.used.add(f"{src}.{p}")

    def check_all_used(self, what: str) -> StateDict:
        """Raises ``KeyError`` naming the source tensors not converted; returns ``out``."""
        left = sorted(set(self.sd) - self.used)
        if left:
            raise KeyError(f"{len(left)} {what} tensors were not converted, e.g. {left[:5]}")
        return self.out


def apply_overrides(cfg, overrides: Dict[str, Any]):
    """Sets dotted-key ``overrides`` (as returned by a converter) on a LazyConfig."""
    from omegaconf import OmegaConf

    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def overrides_to_cli(overrides: Dict[str, Any]):
    """``{"model.num_queries": 100}`` -> ``["model.num_queries=100"]``: ``train_net.py``'s argv
    items in the override grammar ``LazyConfig.apply_overrides`` parses (Hydra's: strings in
    double quotes, ``[...]`` lists, ``true``/``false``/``null``); each is one argument,
    :func:`overrides_to_shell` quotes them for a shell."""
    return [f"{k}={_override_value(v)}" for k, v in overrides.items()]


def _override_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):  # Hydra has no tuples: the config gets a list either way
        return "[" + ", ".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value != value:
        return "nan"
    return repr(value)


def overrides_to_shell(overrides: Dict[str, Any]) -> str:
    """The overrides as one shell-safe string: ``model.backbone.out_features=['res3', 'res4']``
    is quoted so that a shell passes it as one argument."""
    import shlex

    return " ".join(shlex.quote(item) for item in overrides_to_cli(overrides))


from .loading import (  # noqa: E402  (uses nothing above; re-exported for d2detr.checkpoint users)
    DetrCheckpointer,
    apply_checkpoint_overrides,
    read_checkpoint_overrides,
    use_ema_weights,
)
