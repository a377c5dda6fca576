"""What a user does with a trained model, on a real one: a tiny Deformable DETR (MobileNetV2)
trained for a few iterations with a weight EMA through ``d2detr.engine.main`` (the loop of
``tools/train_net.py``), then

* every entry point that uses the trained model -- ``train_net.py --eval-only`` (with and
  without ``--resume``), ``export_model.py``, ``demo.py`` and ``visualize_attention.py`` -- runs
  the checkpoint's EMA weights, and its raw weights with ``train.model_ema.use_for_eval=False``;
* ``demo.py`` with its defaults, in a fresh process, resizes as the config's test mapper does,
  takes its threshold from the config's ``demo.score_threshold`` and draws the boxes that
  evaluation predicts, in the input image's pixels, printing how many;
* the training printed its progress line (iteration/max, s/it, ETA, loss) with logging off.
"""
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from test_tools import load_tool, one_thread  # noqa: F401  (one_thread: autouse, one intra-op thread)
from test_train_net import _args

from d2detr.engine import main, unwrap_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ITER = 12
PROGRESS_PERIOD = 4
DEMO_SCALE = 4  # the demo input is a validation tile upscaled 4x (192 x 256 px)


def _write_config(tmp_path):
    """test_train_net's real Deformable DETR config (configs/common data, optimizer, train) on
    the toy data, with a weight EMA, a test resize that is neither demo.py's old 800/1333 nor the
    identity, and a progress line every PROGRESS_PERIOD iterations."""
    from test_train_net import _write_real_config

    path = _write_real_config(tmp_path)
    with open(path, "a") as f:
        f.write(f"""
model.select_box_nums_for_evaluation = 10
dataloader.train.mapper.augmentation.update(min_sizes=[64], max_size=128)
dataloader.test.mapper.augmentation.update(min_size=80, max_size=160)
optimizer.lr = 1e-3
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0], milestones=[], num_updates={MAX_ITER})
train.update(max_iter={MAX_ITER}, log_period=1, progress_period={PROGRESS_PERIOD})
train.model_ema.update(enabled=True, decay=0.6)
""")
    return path


def spy_evaluated_weights(monkeypatch):
    """A list that gets the state dict of every model ``d2detr.engine.do_test`` evaluates."""
    import d2detr.engine.defaults as defaults

    seen = []
    original = defaults.inference_on_dataset

    def spy(model, data_loader, evaluator):
        seen.append({k: v.clone() for k, v in unwrap_model(model).state_dict().items()})
        return original(model, data_loader, evaluator)

    monkeypatch.setattr(defaults, "inference_on_dataset", spy)
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, output dir, checkpoint dict, the training's stdout) of a short EMA run, trained
    with logging disabled: no log line reaches stdout then, the progress lines still do."""
    tmp_path = tmp_path_factory.mktemp("ema_run")
    config = _write_config(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stdout = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(stdout):
            main(_args(config))
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)
    out = str(tmp_path / "output")
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["model_ema"]["num_updates"] == MAX_ITER
    ema, raw = ckpt["model_ema"]["state"], ckpt["model"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point()), "EMA == raw weights"
    return config, out, ckpt, stdout.getvalue()


def _assert_state(model, expected, where):
    got = unwrap_model(model).state_dict()
    assert set(got) == set(expected), where
    for k, v in expected.items():
        assert torch.equal(got[k], v), f"{where}: {k} is not the expected weight"


# -------------------------------------------------------------------------- progress
def test_training_prints_progress_with_logging_off(trained):
    _, out, _, stdout = trained
    pattern = re.compile(
        r"^\[d2detr\] iter (\d+)/(\d+) \((\d+)%\)  ([0-9.]+) s/it  ETA (\d+):(\d\d):(\d\d)  total_loss (\S+)$"
    )
    lines = [line for line in stdout.splitlines() if line.startswith("[d2detr]")]  # (pycocotools prints too)
    matches = [pattern.match(line) for line in lines]
    assert lines and all(matches), f"malformed progress lines: {lines}"
    done = [int(m.group(1)) for m in matches]
    assert done == [1] + list(range(PROGRESS_PERIOD, MAX_ITER + 1, PROGRESS_PERIOD))
    for m in matches:
        it, total, pct, spi = int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))
        eta = int(m.group(5)) * 3600 + int(m.group(6)) * 60 + int(m.group(7))
        assert total == MAX_ITER and pct == round(100 * it / MAX_ITER)
        assert spi > 0 and abs(eta - (MAX_ITER - it) * spi) <= 1.0
    # the loss printed after iteration 1 is that iteration's total loss in metrics.json
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    first = next(r for r in rows if r.get("iteration") == 0 and "total_loss" in r)
    assert float(matches[0].group(8)) == pytest.approx(first["total_loss"], rel=1e-3)


def test_progress_hook_rejects_bad_period():
    from d2detr.engine.progress import ProgressHook

    with pytest.raises(ValueError, match="period must be > 0"):
        ProgressHook(max_iter=10, period=0)


# ------------------------------------------------------------------- EMA everywhere
@pytest.mark.parametrize("resume", [False, True])
def test_eval_only_uses_ema_weights(trained, monkeypatch, caplog, resume):
    """train_net.py --eval-only train.init_checkpoint=model_final.pth (and --resume, which reads
    last_checkpoint) evaluates the EMA weights; train.model_ema.use_for_eval=False the raw ones."""
    config, out, ckpt, _ = trained
    seen = spy_evaluated_weights(monkeypatch)
    init = [] if resume else [f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"]
    with caplog.at_level(logging.INFO, logger="d2detr"):
        results = main(_args(config, *init, resume=resume, eval_only=True))
    assert "bbox" in results
    assert "using its EMA weights (12 updates" in caplog.text
    main(_args(config, *init, "train.model_ema.use_for_eval=False", resume=resume, eval_only=True))
    assert len(seen) == 2
    for state, expected, name in ((seen[0], ckpt["model_ema"]["state"], "EMA"), (seen[1], ckpt["model"], "raw")):
        assert set(state) == set(expected)
        for k, v in expected.items():
            assert torch.equal(state[k], v), f"{name} evaluation: {k}"


def test_build_model_and_visualize_attention_use_ema(trained, monkeypatch, tmp_path):
    """The tools' loader (export, demo, visualize_attention, ...): EMA weights by default."""
    from d2detr.export.cli import build_model, load_config

    config, out, ckpt, _ = trained
    init = f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"
    _assert_state(build_model(load_config(config, [init])), ckpt["model_ema"]["state"], "build_model")
    raw = build_model(load_config(config, [init, "train.model_ema.use_for_eval=False"]))
    _assert_state(raw, ckpt["model"], "build_model raw")
    with pytest.raises(ValueError, match="use_for_eval must be True or False"):
        build_model(load_config(config, [init, "train.model_ema.use_for_eval=0.5"]))

    tool = load_tool("visualize_attention")
    built = []

    def spy(*a, **k):
        built.append(build_model(*a, **k))
        return built[-1]

    monkeypatch.setattr(tool, "build_model", spy)
    image = os.path.join(os.path.dirname(out), "data", "toy_val", "000.png")
    args = tool.get_parser().parse_args(
        ["--config-file", config, "--input", image, "--output", str(tmp_path / "vis"), "--topk", "2",
         "--min-size", "96", init]
    )
    written = tool.main(args)
    assert len(written) == 1 and os.path.isfile(written[0])
    _assert_state(built[0], ckpt["model_ema"]["state"], "visualize_attention")


def test_export_uses_ema_weights(trained, tmp_path):
    from d2detr.export import ExportableDetector
    from d2detr.export.cli import build_model, load_config
    from tiny_configs import random_image

    config, out, ckpt, _ = trained
    init = f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"
    tool = load_tool("export_model")
    path, diffs = tool.main(tool.get_parser().parse_args(
        ["--config-file", config, "--format", "torchscript", "--output", str(tmp_path / "ts"), init]))
    exported = torch.jit.load(path)
    ema_model = build_model(load_config(config, [init]))
    raw_model = build_model(load_config(config, [init, "train.model_ema.use_for_eval=False"]))
    image = random_image(72, 100, seed=4)
    with torch.no_grad():
        got = exported(image)
        ema = ExportableDetector(ema_model)(image)
        raw = ExportableDetector(raw_model)(image)
    for a, b in zip(got, ema):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # the raw weights give visibly other scores: the file holds the EMA model, not the raw one
    assert (got[1] - raw[1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- demo
def _expected_detections(config, init, image_path):
    """What evaluation predicts for image_path: the config's test mapper, the EMA model,
    boxes in the image's pixels."""
    from detectron2.config import instantiate

    from d2detr.export.cli import build_model, load_config

    cfg = load_config(config, [init])
    model = build_model(cfg)
    mapper = instantiate(cfg.dataloader.test.mapper)
    h, w = cv2.imread(image_path).shape[:2]
    inputs = mapper({"file_name": image_path, "height": h, "width": w, "image_id": 0})
    assert tuple(inputs["image"].shape[1:]) == (80, 107)  # the config's test resize (80, at most 160)
    with torch.no_grad():
        return model([inputs])[0]["instances"]


def test_demo_defaults_draw_what_evaluation_predicts(trained, tmp_path):
    config, out, _, _ = trained
    init = f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"
    tile = cv2.imread(os.path.join(os.path.dirname(out), "data", "toy_val", "000.png"))
    image_path = str(tmp_path / "tile.png")
    big = cv2.resize(tile, None, fx=DEMO_SCALE, fy=DEMO_SCALE, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(image_path, big)
    inst = _expected_detections(config, init, image_path)
    scores = inst.scores.sort(descending=True).values
    # the config's threshold: in the widest gap among the best 4 scores (a short run's scores are low)
    gaps = scores[:3] - scores[1:4]
    k = int(gaps.argmax())
    assert gaps[k] > 1e-4
    threshold = float(scores[k + 1] + gaps[k] / 2)
    demo_config = tmp_path / "with_threshold.py"
    demo_config.write_text(open(config).read() + f"\ndemo = dict(score_threshold={threshold!r})\n")

    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--config-file", str(demo_config),
         "--input", image_path, "--output", str(tmp_path / "out"), "--device", "cpu", init],
        capture_output=True, text=True, cwd=str(tmp_path), env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"score threshold {threshold:g} (the config's demo.score_threshold)" in res.stderr
    assert "ResizeShortestEdge" in res.stderr and "the config's test mapper" in res.stderr
    expected = inst[inst.scores >= threshold]
    assert len(expected) == k + 1
    assert f"{image_path}: {len(expected)} detections drawn (score >= {threshold:g})" in res.stdout

    drawn = cv2.imread(str(tmp_path / "out" / "tile.png"))
    assert drawn.shape == big.shape  # drawn on the input image, at its size
    changed = np.abs(drawn.astype(int) - big.astype(int)).sum(-1) > 3
    h, w = changed.shape
    for x0, y0, x1, y1 in expected.pred_boxes.tensor.tolist():
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        ys = np.arange(int(y0) + 3, int(y1) - 2)
        if len(ys) < 3:
            continue
        for x in (x0, x1):  # the box's vertical edges are drawn where the box is, in input pixels
            cols = np.clip([int(round(x)) - 1, int(round(x)), int(round(x)) + 1], 0, w - 1)
            hit = changed[ys][:, cols].any(axis=1)
            assert hit.mean() > 0.9, f"edge x={x:.1f} of box {(x0, y0, x1, y1)} not drawn ({hit.mean():.2f})"


def test_demo_threshold_and_resize_defaults(trained):
    """Without a config threshold: Detectron2's 0.5; a model-only config: 800/1333; flags win."""
    from detectron2.data import transforms as T

    from d2detr.export.cli import load_config

    demo = load_tool("demo")
    config, _, _, _ = trained
    cfg = load_config(config)
    assert demo.score_threshold(cfg) == (0.5, "Detectron2's default")
    assert demo.score_threshold(cfg, 0.2)[0] == 0.2
    cfg.demo = {"score_threshold": 0.3}
    assert demo.score_threshold(cfg) == (0.3, "the config's demo.score_threshold")
    cfg.demo.score_threshold = "high"
    with pytest.raises(ValueError, match="must be a number"):
        demo.score_threshold(cfg)
    augs, _ = demo.test_time_augmentations(cfg)
    assert [(type(a), a.short_edge_length, a.max_size) for a in augs] == [(T.ResizeShortestEdge, (80, 80), 160)]
    augs, _ = demo.test_time_augmentations(load_config(os.path.join(
        REPO, "projects/deformable_detr/configs/models/deformable_detr_mobilenetv2.py")))
    assert [(a.short_edge_length, a.max_size) for a in augs] == [((800, 800), 1333)]
    # a config listing its test augmentations (the NEON-trees demo's: shortest edge 416)
    augs, _ = demo.test_time_augmentations(load_config(os.path.join(
        REPO, "projects/deformable_detr/configs/deformable_detr_mobilenetv2_neon_trees.py")))
    assert [(type(a), a.short_edge_length, a.max_size) for a in augs] == [(T.ResizeShortestEdge, (416, 416), 800)]
    assert demo.test_time_augmentations(cfg, 0)[0] == []
    augs, _ = demo.test_time_augmentations(cfg, 64, 100)
    assert [(a.short_edge_length, a.max_size) for a in augs] == [((64, 64), 100)]
