"""tools/export_model.py end to end, for every method: export (TorchScript trace and
torch.export), load the file in a fresh process with only torch and the op library (no d2detr
Python code), run it on an image of another size than the export one, and compare with the
eager Detectron2 model (1e-4).

The tiny LazyConfig files of each method come from ``tests/tiny_configs.py``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.structures import Boxes  # noqa: E402

from d2detr.layers.ms_deform_attn import get_library_path, native_ms_deform_attn_available  # noqa: E402
from tiny_configs import TINY_METHODS, build_tiny, random_image, write_tiny_config  # noqa: E402,F401

def _load_tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The README's example, run in a fresh interpreter: only torch and the op library.
RUNNER = '''
import sys, torch
lib, image_path, out_path, *model_paths = sys.argv[1:]
torch.ops.load_library(lib)
image = torch.load(image_path)
outputs = {}
for model_path in model_paths:
    if model_path.endswith(".pt2"):
        model = torch.export.load(model_path).module()
    else:
        model = torch.jit.load(model_path)
    with torch.no_grad():
        boxes, scores, classes = model(image)
    outputs[model_path] = {"boxes": boxes, "scores": scores, "classes": classes}
torch.save(outputs, out_path)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("d2detr", "detectron2"))
assert not leaked, leaked
'''


def run_in_fresh_process(tmp_path, model_paths, image):
    """{model_path: outputs} of the exported files run on ``image`` in a new interpreter."""
    runner = os.path.join(str(tmp_path), "run_exported.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    image_path = os.path.join(str(tmp_path), "image.pt")
    out_path = os.path.join(str(tmp_path), "out.pt")
    torch.save(image, image_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, runner, get_library_path(), image_path, out_path, *model_paths],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_path)


def assert_matches_eager(model, image, out, atol=1e-4):
    """Exported (boxes, scores, classes) == Detectron2 eager inference, box for box (the eager
    path also drops boxes that are empty after clipping)."""
    with torch.no_grad():
        inst = model([{"image": image}])[0]["instances"]
    h, w = image.shape[1:]
    assert inst.image_size == (h, w)
    assert out["boxes"].shape == (10, 4) and out["scores"].shape == (10,) and out["classes"].shape == (10,)
    keep = Boxes(out["boxes"]).nonempty()
    torch.testing.assert_close(out["boxes"][keep], inst.pred_boxes.tensor, atol=atol, rtol=0)
    torch.testing.assert_close(out["scores"][keep], inst.scores, atol=atol, rtol=0)
    assert torch.equal(out["classes"][keep], inst.pred_classes)
    # image coordinates of the new image: inside it
    assert (out["boxes"] >= 0).all() and (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread avoids oversubscription (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_op = pytest.mark.skipif(
    get_library_path() is None or not native_ms_deform_attn_available("cpu"),
    reason="the native d2detr._C op library is not built (python setup.py build_ext --inplace)",
)


@needs_op
@pytest.mark.parametrize(
    "method",
    # variants whose code paths the others cover (box refinement: two-stage refines too; DAB's
    # two-stage: Deformable DETR's two-stage + DAB's decoder; RNNDet's inference is DEQDet's)
    # are marked slow
    [
        pytest.param(m, marks=pytest.mark.slow)
        if m in ("deformable_detr_refine", "dab_deformable_detr_two_stage", "rnndet") else m
        for m in sorted(TINY_METHODS)
    ],
)
def test_export_tool_fresh_process_other_size(tmp_path, method):
    """TorchScript (trace) and torch.export files from tools/export_model.py, run without d2detr
    on an image of another size and aspect ratio, give Detectron2's eager detections."""
    import cv2

    from d2detr.export import read_metadata

    config = write_tiny_config(tmp_path, method)
    model, weights = build_tiny(config)
    sample = random_image(96, 128, seed=1)
    sample_path = os.path.join(str(tmp_path), "sample.png")
    cv2.imwrite(sample_path, sample.permute(1, 2, 0).numpy()[:, :, ::-1].copy())  # RGB -> BGR file
    export_model = _load_tool("export_model")
    paths = []
    for fmt, name in (("torchscript", "model.ts"), ("torch_export", "model.pt2")):
        args = export_model.get_parser().parse_args(
            ["--config-file", config, "--format", fmt, "--output", str(tmp_path / fmt),
             "--sample-image", sample_path, f"train.init_checkpoint={weights}"]
        )
        path, diffs = export_model.main(args)
        assert os.path.basename(path) == name
        assert all(d <= 1e-4 for d in diffs.values()), diffs
        meta = read_metadata(path)
        assert meta["num_classes"] == 3 and meta["detections_per_image"] == 10
        assert meta["class_names"] == ["0", "1", "2"]  # a model-only config names no dataset
        paths.append(path)

    other = random_image(150, 100, seed=2)
    outputs = run_in_fresh_process(tmp_path, paths, other)
    for path in paths:
        assert_matches_eager(model, other, outputs[path])


@needs_op
def test_script_or_clear_error(tmp_path):
    """--script: scripting either works or fails with a message that points to tracing."""
    from d2detr.export import export_torchscript

    model, _ = build_tiny(write_tiny_config(tmp_path, "deformable_detr"))
    image = random_image(96, 128, seed=1)
    try:
        scripted = export_torchscript(model, image, str(tmp_path / "m.ts"), method="script")
    except RuntimeError as e:
        assert "cannot be scripted" in str(e) and "trace" in str(e)
    else:
        out = scripted(random_image(80, 112, seed=3))
        assert out[0].shape == (10, 4)


def test_export_refuses_deformable_model_without_native_op(tmp_path, monkeypatch):
    """The grid_sample fallback would freeze level sizes into the graph: refuse clearly."""
    import d2detr.export.api as api

    model, _ = build_tiny(write_tiny_config(tmp_path, "deformable_detr"))
    monkeypatch.setattr(api, "native_ms_deform_attn_available", lambda device="cpu": False)
    with pytest.raises(RuntimeError, match="native d2detr._C"):
        api.export_torchscript(model, random_image(64, 64, 0), str(tmp_path / "m.ts"))


@needs_op
def test_padding_mask_inside_the_graph(tmp_path):
    """With size_divisibility the graph pads and masks like Detectron2's ImageList: a trace and
    an export made at one size match eager inference at sizes that pad differently."""
    from d2detr.export import export_torch_export, export_torchscript

    config = write_tiny_config(tmp_path, "deformable_detr", extra="model.size_divisibility = 32\n")
    model, _ = build_tiny(config)
    assert model.size_divisibility == 32
    sample = random_image(96, 128, seed=1)  # no padding needed
    traced = export_torchscript(model, sample, str(tmp_path / "m.ts"))
    program = export_torch_export(model, sample, str(tmp_path / "m.pt2")).module()
    from d2detr.export import load_exported

    loaded = load_exported(str(tmp_path / "m.ts"))
    for h, w in ((150, 100), (97, 161)):  # padded to 160x128, 128x192
        image = random_image(h, w, seed=h)
        for exported in (traced, program, loaded):
            with torch.no_grad():
                boxes, scores, classes = exported(image)
            assert_matches_eager(model, image, {"boxes": boxes, "scores": scores, "classes": classes})


@needs_op
def test_exported_outputs_plus_nms_match_eager_inference_with_test_nms_thresh(tmp_path, caplog):
    """A model with ``test_nms_thresh`` applies NMS eagerly; the graph keeps all K detections and
    says so, and ``torchvision.ops.batched_nms`` on its outputs gives the eager boxes (README)."""
    import logging

    from torchvision.ops import batched_nms

    from d2detr.export import export_torchscript

    config = write_tiny_config(tmp_path, "deformable_detr", extra="model.test_nms_thresh = 0.5\n")
    model, _ = build_tiny(config)
    with caplog.at_level(logging.WARNING, logger="d2detr.export.wrapper"):
        traced = export_torchscript(model, random_image(96, 128, seed=1), str(tmp_path / "m.ts"))
    assert any("test_nms_thresh=0.5" in r.getMessage() for r in caplog.records)
    image = random_image(112, 144, seed=2)
    with torch.no_grad():
        boxes, scores, classes = traced(image)
        inst = model([{"image": image}])[0]["instances"]
    keep = batched_nms(boxes, scores, classes, 0.5)
    assert boxes.shape[0] == 10 and len(keep) < 10  # NMS removed something: the check has teeth
    keep = keep[Boxes(boxes[keep]).nonempty()]  # eager also drops boxes empty after clipping
    torch.testing.assert_close(boxes[keep], inst.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores[keep], inst.scores, atol=1e-4, rtol=0)
    assert torch.equal(classes[keep], inst.pred_classes)


@needs_op
def test_exported_candidates_plus_nms_match_eager_inference_with_test_topk_candidates(tmp_path):
    """``test_topk_candidates``: eager NMS runs over the top 20 and keeps the best 10. The README's
    recipe for export: the same weights exported with ``select_box_nums_for_evaluation`` = 20,
    ``batched_nms`` on the graph's outputs, the first 10 kept, gives the eager boxes."""
    from torchvision.ops import batched_nms

    from d2detr.export import export_torchscript

    config = write_tiny_config(tmp_path, "deformable_detr",
                               extra="model.test_nms_thresh = 0.5\nmodel.test_topk_candidates = 20\n")
    model, _ = build_tiny(config)
    candidates = build_tiny(write_tiny_config(tmp_path, "deformable_detr",
                                              extra="model.select_box_nums_for_evaluation = 20\n"))[0]
    candidates.load_state_dict(model.state_dict())
    traced = export_torchscript(candidates, random_image(96, 128, seed=1), str(tmp_path / "m.ts"))
    image = random_image(112, 144, seed=2)
    with torch.no_grad():
        boxes, scores, classes = traced(image)
        inst = model([{"image": image}])[0]["instances"]
    keep = batched_nms(boxes, scores, classes, 0.5)
    assert boxes.shape[0] == 20 and len(keep) > 10  # NMS leaves more than K: the cap is what is tested
    keep = keep[:10]
    keep = keep[Boxes(boxes[keep]).nonempty()]
    torch.testing.assert_close(boxes[keep], inst.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores[keep], inst.scores, atol=1e-4, rtol=0)
