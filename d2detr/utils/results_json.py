"""The per-method results JSON of ``tools/compare_convergence.py`` and
``tools/compare_detectron2_baselines.py``: ``{"dataset", "metric", "methods": {name: ...}}``,
shared by several processes given disjoint ``--methods``."""
import json
import os
from typing import Dict, Optional

__all__ = ["base_method", "command_line", "display_label", "is_seed_run", "load_results", "save_results"]


def base_method(key: str) -> str:
    """The method of a results key ``method@tag`` (``tools/compare_detectron2_baselines.py --tag``)."""
    return key.split("@", 1)[0]


def display_label(entry: Dict) -> str:
    """An entry's label, marked when its final metrics come from a later eval-only run
    (``entry["reevaluated"]``: the config's inference changed after the training run)."""
    return entry.get("label", "?") + (" (re-evaluated)" if "reevaluated" in entry else "")


def is_seed_run(key: str, method: Optional[str] = None) -> bool:
    """Whether the results key ``method@tag`` (``tools/compare_detectron2_baselines.py --tag``) is a
    run of the config as it stands: no tag, or a ``seedN`` tag; other tags are variants (a
    changed setting, or a run of an earlier version of the config). With ``method``: also that
    the key is that method's."""
    tag = key.partition("@")[2]
    return (method is None or base_method(key) == method) and (not tag or (tag.startswith("seed") and tag[4:].isdigit()))


def load_results(path: str) -> Dict:
    """What ``path`` holds, or an empty results dict for ``neon_trees_val``."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"dataset": "neon_trees_val", "metric": "COCO bbox AP (x100)", "methods": {}}


def save_results(results: Dict, path: str, method: Optional[str] = None) -> Dict:
    """Writes ``results`` to ``path``. With ``method``, only that method's entry is merged into
    what the file holds now (under a lock), so several processes given disjoint ``--methods``
    can share one JSON. Returns what was written."""
    import fcntl
    import hashlib
    import tempfile

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The lock file lives in the temp folder (keyed by the JSON's path), not beside the JSON.
    key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"d2detr-results-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if method is not None:
            merged = load_results(path)
            merged["methods"][method] = results["methods"][method]
            merged.update({k: v for k, v in results.items() if k != "methods"})
            results = merged
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)
    return results


def command_line(tool: str, argv) -> str:
    """``python tools/<tool> ARGS``, each argument shell-quoted, as recorded in the results JSON
    so that the stored command can be pasted back into a shell."""
    import shlex

    return " ".join(["python", f"tools/{tool}", *(shlex.quote(a) for a in argv)])
