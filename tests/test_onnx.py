"""ONNX export (``tools/export_model.py --format onnx``, ``d2detr.export.onnx``).

* The lowering of ``d2detr::ms_deform_attn`` to standard operators (GridSample) alone, run in
  onnxruntime, against the native op on random inputs: non-square levels, points outside the
  map, other level sizes and batch/query counts than the exported ones (1e-5).
* The TensorRT variant: one ``MultiscaleDeformableAttnPlugin_TRT`` node per attention with the
  plugin's five inputs (int32 shapes), checked by reading the graph and by running the graph in
  ``onnx``'s reference evaluator with the plugin's semantics supplied (onnxruntime has no kernel).
* Every method of ``tests/tiny_configs.py``: the tool's ONNX file passes ``onnx.checker`` and, run
  in a fresh interpreter with only onnxruntime and numpy on two image sizes other than the export
  size, gives Detectron2's eager detections (1e-4 on scores and boxes).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from detectron2.structures import Boxes  # noqa: E402

from d2detr.layers.ms_deform_attn import MultiScaleDeformableAttention, native_ms_deform_attn_available  # noqa: E402
from test_export import _load_tool, one_thread  # noqa: E402,F401  (one_thread: autouse fixture)
from tiny_configs import TINY_METHODS, build_tiny, random_image, write_tiny_config  # noqa: E402

needs_op = pytest.mark.skipif(
    not native_ms_deform_attn_available("cpu"),
    reason="the native d2detr._C op library is not built (python setup.py build_ext --inplace)",
)
# `make test` exports four methods whose graphs together hold every ONNX lowering we write
# (DETR: dense attention and softmax post-processing; two-stage Deformable DETR: the op's
# GridSample lowering, encoder proposals and the dynamic top-k; DINO: mixed query selection and
# look-forward-twice; AdaMixer: the op used for 3D sampling, no encoder). One dynamo export with
# dynamic H, W costs 25-100 s of CPU, so the other methods run under `-m slow` (every method is
# covered there: `make test PYTEST_ARGS="-m slow"`).
FAST_METHODS = ("detr", "deformable_detr_two_stage", "dino", "adamixer")
# Every method is exported padding to a multiple of 32 (generic DETRBase setting), so the padding
# and its mask are computed inside the ONNX graph for the test images (150x100 -> 160x128, 97x161 ->
# 128x192) while the 96x128 export sample needs none.
PADDED = "model.size_divisibility = 32\n"


def ort_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- the op alone
class DeformAttnOp(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return torch.ops.d2detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )


def op_inputs(shapes, n=2, q=5, heads=2, channels=4, points=3, seed=0):
    """Random op inputs; sampling locations in [-0.2, 1.2] so that some fall outside the map."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    levels = len(shapes)
    value = torch.randn(n, int(sizes.sum()), heads, channels, generator=g)
    locations = torch.rand(n, q, heads, levels, points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(n, q, heads, levels, points, generator=g)
    return value, spatial_shapes, torch.cumsum(sizes, 0) - sizes, locations, weights


def export_op(path, lowering):
    from torch.export import Dim

    from d2detr.export.onnx import DEFORM_ATTN_LOWERINGS

    n, s, q = Dim("n"), Dim("s"), Dim("q")
    dynamic = ({0: n, 1: s}, None, None, {0: n, 1: q}, {0: n, 1: q})
    program = torch.onnx.export(
        DeformAttnOp().eval(), op_inputs([[5, 7], [3, 2], [1, 4]]), dynamo=True, dynamic_shapes=dynamic,
        custom_translation_table={torch.ops.d2detr.ms_deform_attn.default: DEFORM_ATTN_LOWERINGS[lowering]},
        input_names=["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"],
        opset_version=18, verbose=False,
    )
    program.save(path)
    return onnx.load(path)


@needs_op
def test_grid_sample_lowering_matches_op(tmp_path):
    """Standard operators only, and the op's numbers on inputs of other sizes than the exported
    ones: non-square levels, points outside the map, other level sizes, batch and queries."""
    path = str(tmp_path / "op.onnx")
    model = export_op(path, "grid_sample")
    onnx.checker.check_model(model, full_check=True)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("", "GridSample") in ops and all(domain == "" for domain, _ in ops), ops
    session = ort_session(path)
    for shapes, n, q in (([[5, 7], [3, 2], [1, 4]], 2, 5), ([[9, 4], [2, 6], [3, 3]], 1, 11), ([[1, 1], [4, 1], [2, 8]], 3, 2)):
        inputs = op_inputs(shapes, n=n, q=q, seed=q)
        assert ((inputs[3] < 0) | (inputs[3] > 1)).any()
        (got,) = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
        expected = torch.ops.d2detr.ms_deform_attn(*inputs)
        assert got.shape == (n, q, 2 * 4)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=0)


def _trt_plugin_reference():
    """The TensorRT plugin's semantics for onnx's reference evaluator: int32 shapes in,
    ``[N, Q, M, D]`` out."""
    from onnx.reference.op_run import OpRun

    class MultiscaleDeformableAttnPlugin_TRT(OpRun):
        op_domain = "trt"

        def _run(self, value, spatial_shapes, level_start_index, locations, weights, plugin_version=None):
            assert spatial_shapes.dtype == np.int32 and level_start_index.dtype == np.int32
            assert plugin_version == "1"
            out = torch.ops.d2detr.ms_deform_attn(
                torch.from_numpy(value), torch.from_numpy(spatial_shapes.astype(np.int64)),
                torch.from_numpy(level_start_index.astype(np.int64)), torch.from_numpy(locations),
                torch.from_numpy(weights),
            )
            return (out.view(*locations.shape[:3], value.shape[-1]).numpy(),)

    return MultiscaleDeformableAttnPlugin_TRT


def assert_trt_plugin_nodes(model, count):
    """``count`` plugin nodes with the plugin's five inputs (shapes and start index cast to int32)
    and no GridSample left."""
    from d2detr.export.onnx import TRT_PLUGIN

    domain, op_type, version = TRT_PLUGIN
    producers = {out: node for node in model.graph.node for out in node.output}
    plugins = [n for n in model.graph.node if n.op_type == op_type]
    assert len(plugins) == count
    assert not [n for n in model.graph.node if n.op_type == "GridSample"]
    assert {(o.domain, o.version) for o in model.opset_import} >= {(domain, 1)}
    for node in plugins:
        assert node.domain == domain and len(node.input) == 5 and len(node.output) == 1
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {"plugin_version": version.encode()}
        for i in (1, 2):  # spatial shapes, level start index: int32
            cast = producers[node.input[i]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.INT32


@needs_op
def test_tensorrt_lowering_is_one_plugin_node(tmp_path):
    """One plugin node with the plugin's inputs; the graph around it (int32 casts, reshape of the
    plugin's [N, Q, M, D] output) gives the op's numbers when the plugin's semantics are plugged
    into onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    model = export_op(str(tmp_path / "op_trt.onnx"), "tensorrt")
    onnx.checker.check_model(model, full_check=True)
    assert_trt_plugin_nodes(model, 1)
    evaluator = ReferenceEvaluator(model, new_ops=[_trt_plugin_reference()])
    inputs = op_inputs([[9, 4], [2, 6], [3, 3]], n=1, q=11, seed=1)
    (got,) = evaluator.run(None, {i.name: x.numpy() for i, x in zip(model.graph.input, inputs)})
    torch.testing.assert_close(torch.from_numpy(got), torch.ops.d2detr.ms_deform_attn(*inputs), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- whole models
def calibrate_frozen_bn(model, image):
    """Sets every FrozenBatchNorm2d's statistics to those of its input on ``image``. An untrained
    backbone with identity BN saturates to spatially constant features, so all queries of a tiny
    DETR predict the same scores and top-k order is a tie that runtimes break differently;
    calibrated, the detections are distinct and comparable one to one."""
    from d2detr.export import ExportableDetector

    def set_stats(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    with torch.no_grad():
        ExportableDetector(model)(image)
    for hook in hooks:
        hook.remove()


def tiny_model(tmp_path, method, extra=""):
    """(config path, model, weights path) of ``method``'s tiny config, with calibrated BN."""
    config = write_tiny_config(tmp_path, method, extra=extra)
    model, weights = build_tiny(config)
    calibrate_frozen_bn(model, random_image(96, 128, seed=0))
    torch.save(model.state_dict(), weights)
    return config, model.eval(), weights


def assert_matches_eager(model, image, boxes, scores, classes, atol=1e-4):
    """ONNX (boxes, scores, classes) == Detectron2 eager inference (which also drops boxes that
    are empty after clipping). Detections whose scores differ by < 1e-5 may come in either order."""
    with torch.no_grad():
        inst = model([{"image": image}])[0]["instances"]
    boxes, scores, classes = (torch.from_numpy(np.asarray(x)) for x in (boxes, scores, classes))
    assert boxes.shape == (10, 4) and scores.shape == (10,) and classes.shape == (10,)
    keep = Boxes(boxes).nonempty()
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    assert len(scores) == len(inst)
    torch.testing.assert_close(scores, inst.scores, atol=atol, rtol=0)
    unmatched = list(range(len(inst)))
    for i in range(len(scores)):
        match = [
            j for j in unmatched
            if (j == i or abs(inst.scores[j] - scores[i]) < 1e-5) and classes[i] == inst.pred_classes[j]
            and (boxes[i] - inst.pred_boxes.tensor[j]).abs().max() <= atol
        ]
        assert match, f"detection {i} (score {scores[i]:.6f}, class {classes[i]}, box {boxes[i].tolist()}) not in eager's"
        unmatched.remove(match[0])
    h, w = image.shape[1:]
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()


# Run in a fresh interpreter: only onnxruntime and numpy (the docs/tools.md example).
RUNNER = '''
import json, sys
import numpy as np
import onnxruntime as ort
model_path, out_path, *image_paths = sys.argv[1:]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["d2detr.json"])
outputs = {"class_names": np.array(meta["class_names"])}
for i, image_path in enumerate(image_paths):
    image = np.load(image_path)  # [3, H, W] uint8 RGB
    boxes, scores, classes = session.run(None, {"image": image})
    outputs.update({f"boxes{i}": boxes, f"scores{i}": scores, f"classes{i}": classes})
np.savez(out_path, **outputs)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "d2detr", "detectron2", "onnx"))
assert not leaked, leaked
'''


def run_in_fresh_process(tmp_path, model_path, images):
    runner = tmp_path / "run_onnx.py"
    runner.write_text(RUNNER)
    image_paths = []
    for i, image in enumerate(images):
        image_paths.append(str(tmp_path / f"image{i}.npy"))
        np.save(image_paths[-1], image.numpy())
    out = str(tmp_path / "out.npz")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(runner), model_path, out, *image_paths],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@needs_op
@pytest.mark.parametrize(
    "method", [m if m in FAST_METHODS else pytest.param(m, marks=pytest.mark.slow) for m in sorted(TINY_METHODS)]
)
def test_export_tool_onnx_fresh_process(tmp_path, method):
    """tools/export_model.py --format onnx: a valid ONNX file of standard operators whose outputs,
    in onnxruntime without torch or d2detr, are Detectron2's eager detections on two image sizes
    (and padded sizes) other than the export size; class names in its metadata."""
    import cv2

    from d2detr.export import read_metadata

    config, model, weights = tiny_model(tmp_path, method, extra=PADDED)
    assert model.size_divisibility == 32
    sample = random_image(96, 128, seed=1)
    sample_path = str(tmp_path / "sample.png")
    cv2.imwrite(sample_path, sample.permute(1, 2, 0).numpy()[:, :, ::-1].copy())  # RGB -> BGR file
    args = _load_tool("export_model").get_parser().parse_args(
        ["--config-file", config, "--format", "onnx", "--output", str(tmp_path / "onnx"),
         "--sample-image", sample_path, f"train.init_checkpoint={weights}"]
    )
    path, diffs = _load_tool("export_model").main(args)
    assert os.path.basename(path) == "model.onnx"
    assert len(diffs) == 2 and all(d <= 1e-4 for d in diffs.values()), diffs  # the tool's own check
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} == {""}  # standard operators only
    if any(isinstance(m, MultiScaleDeformableAttention) for m in model.modules()):
        assert any(n.op_type == "GridSample" for n in proto.graph.node)  # the op, lowered
    meta = read_metadata(path)
    assert meta["format"] == "onnx-grid_sample" and meta["class_names"] == ["0", "1", "2"]
    assert meta["num_classes"] == 3 and meta["detections_per_image"] == 10

    images = [random_image(150, 100, seed=2), random_image(97, 161, seed=3)]
    out = run_in_fresh_process(tmp_path, path, images)
    assert out["class_names"].tolist() == ["0", "1", "2"]
    for i, image in enumerate(images):
        assert_matches_eager(model, image, out[f"boxes{i}"], out[f"scores{i}"], out[f"classes{i}"])


@needs_op
@pytest.mark.slow
def test_export_tool_tensorrt_variant(tmp_path):
    """--deform-attn tensorrt: every deformable attention of the model is one plugin node."""
    config, model, weights = tiny_model(tmp_path, "deformable_detr")
    args = _load_tool("export_model").get_parser().parse_args(
        ["--config-file", config, "--format", "onnx", "--deform-attn", "tensorrt", "--output", str(tmp_path),
         f"train.init_checkpoint={weights}"]
    )
    path, diffs = _load_tool("export_model").main(args)
    assert diffs == {}  # onnxruntime cannot run the plugin: no check
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert_trt_plugin_nodes(proto, sum(isinstance(m, MultiScaleDeformableAttention) for m in model.modules()))
    assert json.loads(proto.metadata_props[0].value)["format"] == "onnx-tensorrt"


# ----------------------------------------------------------------------------- bad input
def test_export_onnx_rejects_bad_arguments(tmp_path):
    from d2detr.export.onnx import export_onnx, read_onnx_metadata

    _, model, _ = tiny_model(tmp_path, "detr")
    image = random_image(96, 128, seed=1)
    with pytest.raises(ValueError, match="deform_attn must be one of"):
        export_onnx(model, image, str(tmp_path / "m.onnx"), deform_attn="cuda")
    with pytest.raises(ValueError, match="opset must be >= 16"):
        export_onnx(model, image, str(tmp_path / "m.onnx"), opset=13)
    with pytest.raises(ValueError, match="outside the exported size range"):
        export_onnx(model, image, str(tmp_path / "m.onnx"), min_size=128)
    plain = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(KeyError, match="no d2detr.json metadata"):
        read_onnx_metadata(str(tmp_path / "plain.onnx"))
