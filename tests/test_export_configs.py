"""The README's export commands, on the shipped R50 configs, with the tool's default flags.

For every ``projects/*/configs/*_r50_*.py``: ``tools/export_model.py --config-file CFG --format
{torchscript, torch_export} --output DIR`` (default ``--min-size``, default sample image, no
checkpoint: random weights), with ``key=value`` overrides that make the model small but keep its
architecture (:func:`shrink_overrides`: ResNet-50 with narrow bottlenecks, 1 encoder / 2 decoder
layers or stages, FFN 64; the number of queries and proposals is *not* reduced, so the two-stage
top-k really meets images with fewer tokens than queries). The files are then run in one fresh
interpreter with only torch and the op library, on the smallest image the export accepts
(its default ``--min-size``) and on a large one, against the eager model; wrong input layouts
(HWC, 4 channels, 2-D) must be refused at run time with a clear error.

Which configs are exported: one per distinct model *architecture*. Configs whose ``model`` differs
only in numbers (epochs, number of queries, patterns, unrolled steps: ``dino_r50_4scale_{12,24,36}ep``,
``rnndet_r50_nf{6,8,12,16,20}``, ``adamixer_r50_{12,36}ep``, ...) build the same graph up to sizes,
so only the first of each group is exported and the others are reported as skipped, naming it;
configs that differ in a class, a flag or a list of feature names (DC5, two-stage, box
refinement, 4 / 5 scales, single-scale) are exported each. Exporting every config would take
about three times as long for no new code path.
"""
import functools
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2detr.layers.ms_deform_attn import get_library_path, native_ms_deform_attn_available  # noqa: E402

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "projects", "*", "configs", "*_r50_*.py")))
LARGE = (576, 832)  # more tokens than queries at every level count; neither export size nor a multiple of 64
BAD_LAYOUTS = {"HWC": (96, 128, 3), "4 channels": (4, 96, 128), "2-D": (96, 128)}

pytestmark = pytest.mark.skipif(
    get_library_path() is None or not native_ms_deform_attn_available("cpu"),
    reason="the native d2detr._C op library is not built (python setup.py build_ext --inplace)",
)


def _walk(node, prefix):
    from omegaconf import DictConfig

    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _walk(node._get_node(key), f"{prefix}.{key}")
    else:
        yield prefix, node


def _leaves(model_cfg):
    """(dotted key, raw value) of every leaf of ``cfg.model``, interpolations unresolved."""
    from omegaconf import ListConfig, ValueNode

    for key, node in _walk(model_cfg, "model"):
        if isinstance(node, ListConfig):
            yield key, [n._value() if isinstance(n, ValueNode) else n for n in node._iter_ex(resolve=False)]
        else:
            yield key, node._value() if isinstance(node, ValueNode) else node


def architecture_key(model_cfg):
    """What makes two model configs the same architecture: every leaf except the numbers (classes,
    flags, feature names and other strings, and the keys themselves)."""
    def strip(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return "<number>"
        if isinstance(v, list):
            return tuple(strip(x) for x in v) if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) else "<numbers>"
        return repr(v)

    return tuple(sorted((k, repr(strip(v))) for k, v in _leaves(model_cfg)))


def shrink_overrides(model_cfg):
    """``key=value`` overrides (as a user types them) that make ``cfg.model`` small without
    changing its architecture."""
    out = []
    for key, value in _leaves(model_cfg):
        last = key.split(".")[-1]
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation follows whatever it points to
        if last in ("num_layers", "num_encoder_layers", "num_decoder_layers") and isinstance(value, int):
            out.append(f"{key}={2 if 'decoder' in key else 1}")
        elif last in ("ffn_dim", "dim_feedforward") and isinstance(value, int):
            out.append(f"{key}=64")
        elif last == "cascade_ratios":  # Focus-DETR: one keep ratio per encoder layer
            out.append(f"{key}=[{value[0]}]")
        elif last == "num_stages" and key == "model.num_stages":  # AdaMixer
            out.append(f"{key}=2")
        elif last in ("refinement_steps", "test_refinement_steps") and key.count(".") == 1:  # RNNDet, DEQDet
            out.append(f"{key}=3")
        elif last == "supervision_steps" and key.count(".") == 1:
            out.append(f"{key}=[1,3]")
    backbone = model_cfg.get("backbone")
    if backbone is not None and str(backbone.get("_target_", "")).endswith("build_resnet"):
        out.append("model.backbone.width_per_group=8")  # ResNet-50, bottlenecks 8..64 wide
    return out


@functools.lru_cache(maxsize=None)
def _representatives():
    """{config: the config exported for its architecture (itself, or the first equal one)}."""
    from detectron2.config import LazyConfig

    first, rep = {}, {}
    for cfg_path in CONFIGS:
        key = architecture_key(LazyConfig.load(os.path.join(REPO, cfg_path)).model)
        rep[cfg_path] = first.setdefault(key, cfg_path)
    return rep


RUNNER = r'''
import json, sys, torch
lib, jobs_path, out_path = sys.argv[1:]
torch.ops.load_library(lib)
torch.set_num_threads(1)
jobs = torch.load(jobs_path)
results = {}
for path, images in jobs.items():
    model = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
    res = {}
    for name, image in images.items():
        try:
            with torch.no_grad():
                res[name] = model(image)
        except Exception as e:
            res[name] = f"{type(e).__name__}: {e}"
    results[path] = res
torch.save(results, out_path)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("d2detr", "detectron2"))
assert not leaked, leaked
'''


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """Exports the representative configs of the selected tests in both formats with the tool's
    defaults and runs all the files in one fresh interpreter. {config: record} with the eager
    outputs next to the fresh ones."""
    import importlib.util

    from d2detr.export import ExportableDetector, read_metadata
    from d2detr.export.cli import build_model, load_config
    from d2detr.export.wrapper import min_image_size

    spec = importlib.util.spec_from_file_location("export_model", os.path.join(REPO, "tools", "export_model.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    root = tmp_path_factory.mktemp("export_configs")
    records, jobs = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        selected = {
            item.callspec.params["config"] for item in request.session.items
            if item.originalname == "test_export_r50_config_default_flags"
        }
        for cfg_path in sorted({_representatives()[c] for c in selected}):
            from detectron2.config import LazyConfig

            overrides = shrink_overrides(LazyConfig.load(os.path.join(REPO, cfg_path)).model)
            rec = {"overrides": overrides, "files": {}, "errors": {}}
            records[cfg_path] = rec
            out = root / os.path.basename(cfg_path)[:-3]
            for fmt in ("torchscript", "torch_export"):
                args = tool.get_parser().parse_args(
                    ["--config-file", os.path.join(REPO, cfg_path), "--format", fmt, "--output", str(out / fmt), *overrides]
                )
                torch.manual_seed(0)
                try:
                    path, diffs = tool.main(args)
                except Exception as e:  # reported by the config's test
                    rec["errors"][fmt] = f"{type(e).__name__}: {e}"
                    continue
                rec["files"][fmt] = path
                rec.setdefault("diffs", {})[fmt] = diffs
                rec.setdefault("meta", {})[fmt] = read_metadata(path)
            if not rec["files"]:
                continue
            torch.manual_seed(0)
            model = build_model(load_config(os.path.join(REPO, cfg_path), overrides), "cpu")
            eager = ExportableDetector(model)
            smallest = rec["meta"].get("torch_export", {}).get("min_size") or min_image_size(model)
            rec["sizes"] = {"smallest": (smallest, smallest), "large": LARGE}
            images = {name: _image(h, w, seed=h) for name, (h, w) in rec["sizes"].items()}
            with torch.no_grad():
                rec["eager"] = {name: eager(img) for name, img in images.items()}
            for name, shape in BAD_LAYOUTS.items():
                images[name] = torch.zeros(shape, dtype=torch.uint8)
            for path in rec["files"].values():
                jobs[path] = images
    finally:
        torch.set_num_threads(threads)

    runner, jobs_path, out_path = root / "run.py", root / "jobs.pt", root / "out.pt"
    runner.write_text(RUNNER)
    torch.save(jobs, jobs_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(runner), get_library_path(), str(jobs_path), str(out_path)],
        cwd=str(root), env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(out_path)
    for rec in records.values():
        rec["fresh"] = {fmt: fresh[path] for fmt, path in rec["files"].items()}
    return records


# `make test` exports the two configs of the command that failed before (plain and two-stage
# Deformable DETR R50: a 4-level model's default --min-size, the encoder top-k on fewer tokens
# than queries); the other architectures run under `-m slow` (about a minute each on 2 cores).
FAST_CONFIGS = {
    "projects/deformable_detr/configs/deformable_detr_r50_50ep.py",
    "projects/deformable_detr/configs/deformable_detr_two_stage_r50_50ep.py",
}


@pytest.mark.parametrize(
    "config", [c if c in FAST_CONFIGS else pytest.param(c, marks=pytest.mark.slow) for c in CONFIGS]
)
def test_export_r50_config_default_flags(exported, config):
    """Both formats export with the default flags; in a fresh interpreter each file gives the
    eager model's detections on the smallest accepted size and on a large one, and refuses
    wrong layouts with an error naming the expected [3, H, W]."""
    rep = _representatives()[config]
    if rep != config:
        pytest.skip(f"same architecture as {rep} (differs only in numbers), exported there")
    rec = exported[config]
    assert not rec["errors"], rec["errors"]
    for fmt, diffs in rec["diffs"].items():
        assert all(d <= 1e-4 for d in diffs.values()), (fmt, diffs)
    meta = rec["meta"]["torch_export"]
    assert meta["min_size"] == rec["sizes"]["smallest"][0] and meta["max_size"] == 4096
    for fmt, results in rec["fresh"].items():
        for name, (h, w) in rec["sizes"].items():
            out = results[name]
            assert not isinstance(out, str), f"{fmt} on {name} {h}x{w}: {out}"
            boxes, scores, classes = out
            ref_boxes, ref_scores, ref_classes = rec["eager"][name]
            k = meta["detections_per_image"]
            assert boxes.shape == (k, 4) and scores.shape == (k,) and classes.shape == (k,)
            assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
            assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
            torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
            torch.testing.assert_close(boxes, ref_boxes, atol=1e-3, rtol=0)
            assert torch.equal(classes, ref_classes)
        for name, shape in BAD_LAYOUTS.items():
            err = results[name]
            assert isinstance(err, str), f"{fmt} accepted a {name} input {shape}"
            if fmt == "torchscript":  # our check, compiled into the traced graph
                assert "expected one image tensor [3, H, W]" in err and str(list(shape)) in err, err
            else:  # the exported program's input guards name the dimension and the expected value,
                # e.g. "Guard failed: image.size()[0] == 3", or the expected rank
                assert "image" in err and ("size()" in err or "shape" in err or "rank" in err or "dim" in err), err


def test_min_size_too_small_is_refused_with_the_reason(tmp_path):
    """--min-size below what the model needs: a ValueError naming the stride and the minimum,
    before torch.export's constraint solver (whose message was the old failure)."""
    from tiny_configs import build_tiny, random_image, write_tiny_config

    from d2detr.export import export_torch_export
    from d2detr.export.wrapper import feature_strides, min_image_size

    model, _ = build_tiny(write_tiny_config(tmp_path, "deformable_detr"))
    strides = feature_strides(model)
    assert min_image_size(model) == max(strides) + 1
    need = min_image_size(model)
    with pytest.raises(ValueError, match=rf"stride {max(strides)}.*at least {need} pixels.*--min-size {need}"):
        export_torch_export(model, random_image(96, 128, 1), str(tmp_path / "m.pt2"), min_size=need - 1)
    with pytest.raises(ValueError, match="outside the exported size range"):
        export_torch_export(model, random_image(need - 1, 128, 1), str(tmp_path / "m.pt2"))


def test_eager_wrapper_refuses_wrong_layouts():
    """ExportableDetector itself (eager) names the shape it got."""
    from d2detr.export.wrapper import check_image

    for shape in BAD_LAYOUTS.values():
        with pytest.raises(ValueError, match=r"expected one image tensor \[3, H, W\].*" + str(list(shape)).replace("[", r"\[").replace("]", r"\]")):
            check_image(torch.zeros(shape, dtype=torch.uint8))
    assert check_image(torch.zeros(3, 5, 7)).shape == (3, 5, 7)
