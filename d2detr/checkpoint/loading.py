"""Loading a trained or converted checkpoint for inference: one place for every entry point.

``tools/train_net.py --eval-only``, ``tools/export_model.py``, ``tools/demo.py`` and the
visualisation tools (through :func:`d2detr.export.cli.build_model`) all load weights with
:class:`DetrCheckpointer` and configs with :func:`apply_checkpoint_overrides`:

* **EMA weights.** A checkpoint written by a run with ``train.model_ema.enabled=True`` holds the
  raw weights (``"model"``) and their EMA (``"model_ema"``, see :class:`d2detr.engine.ModelEMA`).
  Inference uses the EMA weights when the checkpoint has them, as the periodic evaluation during
  training does, and says so in the log. ``train.model_ema.use_for_eval=False`` (a config key, so
  it is given like every other override, on every tool's command line) selects the raw weights.
* **Stored overrides.** ``tools/convert_checkpoint.py`` stores the config overrides that build
  the checkpoint's model (``"overrides": {"model.num_queries": 300, ...}``) in the file.
  When ``train.init_checkpoint`` names such a file, the overrides are applied to the config before
  the model is built (logged); a key given on the command line keeps the command line's value.
"""
import inspect
import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

__all__ = [
    "DetrCheckpointer",
    "use_ema_weights",
    "read_checkpoint_overrides",
    "apply_checkpoint_overrides",
]

logger = logging.getLogger("d2detr")

#: The config key that chooses between a checkpoint's EMA weights (default) and its raw weights.
USE_EMA_KEY = "train.model_ema.use_for_eval"


def use_ema_weights(cfg) -> bool:
    """``train.model_ema.use_for_eval`` of ``cfg`` (default ``True``)."""
    value = OmegaConf.select(cfg, USE_EMA_KEY, default=True)
    if not isinstance(value, bool):
        raise ValueError(f"{USE_EMA_KEY} must be True or False, got {value!r}")
    return value


class DetrCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that loads a checkpoint's EMA weights into the model
    when the file has them (``"model_ema"``) and ``use_ema`` is true.

    Everything else is Detectron2's: file formats (d2detr/Detectron2 ``.pth``, model-zoo
    ``.pkl``, URLs), ``module.`` prefixes, shape checks and the incompatible-keys report.
    ``use_ema=None`` for training and ``--resume``: they load the raw weights and restore the EMA
    as a checkpointable (``model_ema=...``).

    After :meth:`load`, :attr:`loaded_weights` is ``"ema"`` or ``"model"``. ``overrides``
    (``{"model.num_queries": 300, ...}``) are written into every checkpoint it saves, as
    ``tools/convert_checkpoint.py`` does: ``tools/train_net.py`` passes on those of its
    ``train.init_checkpoint``, so a model fine-tuned from a converted checkpoint loads as that one.
    """

    def __init__(self, model, save_dir: str = "", *, use_ema: Optional[bool] = True,
                 overrides: Optional[Dict[str, Any]] = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.use_ema = use_ema  # None: the raw weights, silently (training and --resume)
        self.overrides = dict(overrides or {})
        self.loaded_weights: Optional[str] = None

    def save(self, name: str, **kwargs) -> None:
        if self.overrides:
            kwargs.setdefault("overrides", self.overrides)
        super().save(name, **kwargs)

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        ema = loaded.get("model_ema", None) if isinstance(loaded, dict) else None
        if isinstance(ema, dict) and isinstance(ema.get("state", None), dict):
            updates = ema.get("num_updates", "?")
            if self.use_ema:
                logger.info(
                    f"{filename}: using its EMA weights ({updates} updates; "
                    f"{USE_EMA_KEY}=False for the raw weights)"
                )
                loaded = dict(loaded)
                loaded["model"] = ema["state"]
                self.loaded_weights = "ema"
                return loaded
            if self.use_ema is not None:
                logger.info(f"{filename}: using its raw weights ({USE_EMA_KEY}=False; it has EMA weights too)")
        self.loaded_weights = "model"
        return loaded


# ------------------------------------------------------------------ stored overrides
def read_checkpoint_overrides(path: str) -> Dict[str, Any]:
    """The ``"overrides"`` stored in the local checkpoint file ``path`` (``{}`` when it stores none,
    is not a torch file, e.g. a Detectron2 model-zoo ``.pkl``, or is a URL: converted checkpoints
    are local files)."""
    local = str(path)
    if not os.path.isfile(local) or local.endswith(".pkl"):
        return {}
    try:
        loaded = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  not a zip-format torch file, or holds pickled objects
        try:
            loaded = torch.load(local, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001  not a torch file: Detectron2's loader will say so
            return {}
    overrides = loaded.get("overrides", None) if isinstance(loaded, dict) else None
    if overrides is None:
        return {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ValueError(f"{path}: 'overrides' must map dotted config keys to values, got {type(overrides)}")
    return dict(overrides)


def _user_keys(opts: Sequence[str]):
    keys = []
    for opt in opts or ():
        if "=" in opt:
            keys.append(opt.split("=", 1)[0].strip())
    return keys


def _overlaps(key: str, user_key: str) -> bool:
    return key == user_key or key.startswith(user_key + ".") or user_key.startswith(key + ".")


def _accepts(node, leaf: str) -> bool:
    """Whether config node ``node`` has ``leaf``, or is a ``LazyCall`` whose target takes it."""
    if node is None or not OmegaConf.is_config(node):
        return False
    if leaf in node:
        return True
    target = node.get("_target_", None)
    if target is None:
        return False
    try:
        target = locate(target) if isinstance(target, str) else target
        params = inspect.signature(target).parameters
    except (TypeError, ValueError, ImportError):
        return True  # cannot tell: let instantiate decide
    return leaf in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def apply_checkpoint_overrides(
    cfg, opts: Sequence[str] = (), checkpoint: Optional[str] = None, log: bool = True
) -> Dict[str, Any]:
    """Applies the overrides stored in ``checkpoint`` (default: ``cfg.train.init_checkpoint``) to
    ``cfg`` in place, except keys that the command line ``opts`` (``["key=value", ...]``, already
    applied to ``cfg``) set themselves, or a parent or child of. Returns what was applied; logs it
    (``log=False``: the caller does, e.g. once its logger is set up).

    Raises ``KeyError`` when a stored key does not exist in the config: the config then builds
    another model than the checkpoint's."""
    from . import overrides_to_shell as _shell

    if checkpoint is None:
        checkpoint = OmegaConf.select(cfg, "train.init_checkpoint", default="") or ""
    stored = read_checkpoint_overrides(str(checkpoint)) if checkpoint else {}
    if not stored:
        return {}
    user = _user_keys(opts)
    applied, kept = {}, []
    for key, value in stored.items():
        if any(_overlaps(key, u) for u in user):
            kept.append(key)
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not _accepts(node, leaf):
            raise KeyError(
                f"{checkpoint} stores the config override {key}={value!r}, but the config has no "
                f"{key}: it builds another model than the checkpoint's (use the config of the "
                f"checkpoint's method, e.g. the one tools/convert_checkpoint.py was given)"
            )
        OmegaConf.update(cfg, key, value, merge=False)
        applied[key] = value
    message = f"{checkpoint}: applied {len(applied)} config overrides stored in the checkpoint"
    if kept:
        message += f" (the command line's value kept for {', '.join(kept)})"
    if log:
        logger.info(message + ": " + _shell(applied))
    return applied
