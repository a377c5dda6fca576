"""Model-zoo style access to the shipped configs, as ``detectron2.model_zoo`` gives its own::

    from d2detr import model_zoo
    cfg = model_zoo.get_config("deformable_detr/deformable_detr_r50_50ep.py")   # a LazyConfig
    model = model_zoo.get("dino/dino_r50_4scale_12ep.py")                         # built, random weights
    model_zoo.get_config_file("neon_trees/dino_mobilenetv2.py")                   # its path

A name is ``<method>/<file>`` for ``projects/<method>/configs/<file>`` or a path under
``configs/`` (``neon_trees/...``, ``common/...``). It works in a source checkout and after a
normal (wheel) install, where the configs are installed as ``d2detr/configs`` and
``d2detr/projects/<method>/configs``: their relative imports (``....configs.common``) resolve the
same way in both layouts.
"""
import os
from typing import Iterator, List, Optional

_PACKAGE = os.path.dirname(os.path.abspath(__file__))

__all__ = ["get_config_file", "get_config", "get", "list_configs"]


def _roots() -> Iterator[str]:
    """Folders holding ``configs/`` and ``projects/``: the installed package, then a checkout."""
    for base in (_PACKAGE, os.path.dirname(_PACKAGE)):
        if os.path.isdir(os.path.join(base, "configs")):
            yield base


def get_config_file(config_path: str) -> str:
    """The absolute path of a shipped config (see the module docstring for names)."""
    rel = config_path.replace("\\", "/").lstrip("/")
    tried: List[str] = []
    for base in _roots():
        method, _, rest = rel.partition("/")
        candidates = [os.path.join(base, "configs", rel)]
        if rest:
            candidates.insert(0, os.path.join(base, "projects", method, "configs", rest))
        for path in candidates:
            tried.append(path)
            if os.path.isfile(path):
                return path
    raise RuntimeError(
        f"{config_path!r} is not a shipped d2detr config (looked for {', '.join(tried) or 'a configs/ folder'}); "
        "d2detr.model_zoo.list_configs() lists them"
    )


def list_configs() -> List[str]:
    """Every shipped config name, as :func:`get_config_file` takes it."""
    names = set()
    for base in _roots():
        projects = os.path.join(base, "projects")
        for method in sorted(os.listdir(projects)) if os.path.isdir(projects) else []:
            folder = os.path.join(projects, method, "configs")
            for dirpath, _, files in os.walk(folder):
                for f in files:
                    if f.endswith(".py") and f != "__init__.py":
                        names.add(f"{method}/" + os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/"))
        for dirpath, _, files in os.walk(os.path.join(base, "configs")):
            for f in files:
                if f.endswith(".py") and f != "__init__.py":
                    names.add(os.path.relpath(os.path.join(dirpath, f), os.path.join(base, "configs")).replace(os.sep, "/"))
    return sorted(names)


def get_config(config_path: str, trained: bool = False):
    """The LazyConfig of a shipped config. ``trained=True`` is refused: d2detr ships no trained
    weights (convert a published checkpoint with ``tools/convert_checkpoint.py``)."""
    from detectron2.config import LazyConfig

    if trained:
        raise ValueError("d2detr ships no trained weights: convert a published checkpoint with "
                         "tools/convert_checkpoint.py and set train.init_checkpoint")
    return LazyConfig.load(get_config_file(config_path))


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """The model of a shipped config, instantiated (random weights unless the config's
    ``train.init_checkpoint`` is loaded by the caller), in eval mode, on ``device``
    (default: the config's ``train.device``, else CUDA when available)."""
    import torch
    from detectron2.config import instantiate

    cfg = get_config(config_path, trained=trained)
    if device is None:
        device = cfg.train.get("device", None) if "train" in cfg else None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return instantiate(cfg.model).to(device).eval()
