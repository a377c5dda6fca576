"""tools/demo.py, visualize_attention.py, analyze_model.py, visualize_data.py and
visualize_json_results.py end to end on CPU with tiny configs: the files they write exist,
have the expected sizes, and hold sane numbers."""
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
import torch
from tiny_configs import REPO, build_tiny, random_image, write_tiny_config

from d2detr.layers.ms_deform_attn import native_ms_deform_attn_available


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_images(folder, sizes, seed=0):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = random_image(h, w, seed + i).permute(1, 2, 0).numpy().copy()
        img[h // 4 : h // 2, w // 4 : w // 2] = (0, 0, 255)
        path = os.path.join(folder, f"img{i}.png")
        cv2.imwrite(path, img)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- demo
def test_demo_images_folder_threshold(tmp_path):
    config = write_tiny_config(tmp_path, "deformable_detr_two_stage", num_classes=1)
    _, weights = build_tiny(config)
    folder = str(tmp_path / "images")
    paths = write_images(folder, [(96, 128), (120, 90)])
    extra = write_images(str(tmp_path / "single"), [(80, 100)], seed=5)[0]
    demo = load_tool("demo")

    def run(out, threshold):
        args = demo.get_parser().parse_args(
            ["--config-file", config, "--input", folder, extra, "--output", out, "--min-size", "0",
             "--confidence-threshold", str(threshold), "--device", "cpu", "--dataset", "toy_tools_ds",
             f"train.init_checkpoint={weights}"]
        )
        return demo.main(args)

    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("toy_tools_ds").set(thing_classes=["tree"])
    drawn = run(str(tmp_path / "all"), 0.0)
    blank = run(str(tmp_path / "none"), 1.01)
    assert [os.path.basename(p) for p in drawn] == ["img0.png", "img1.png", "img0_1.png"]  # no overwrite
    for src, d, b in zip(paths + [extra], drawn, blank):
        original, with_boxes, without = cv2.imread(src), cv2.imread(d), cv2.imread(b)
        assert with_boxes.shape == original.shape == without.shape  # drawn on the original image size
        # threshold 0 draws all 10 detections; above 1 draws nothing
        assert np.abs(with_boxes.astype(int) - original).mean() > np.abs(without.astype(int) - original).mean()
        assert np.abs(without.astype(int) - original).mean() < 2.0


def test_demo_video(tmp_path):
    config = write_tiny_config(tmp_path, "detr")
    _, weights = build_tiny(config)
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 64))
    for i in range(4):
        writer.write(random_image(64, 96, i).permute(1, 2, 0).numpy().copy())
    writer.release()
    demo = load_tool("demo")
    args = demo.get_parser().parse_args(
        ["--config-file", config, "--video-input", video, "--output", str(tmp_path / "out"),
         "--min-size", "0", "--confidence-threshold", "0", f"train.init_checkpoint={weights}"]
    )
    out = demo.main(args)
    assert out == str(tmp_path / "out" / "clip.mp4")
    cap = cv2.VideoCapture(out)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 4 and frames[0].shape == (64, 96, 3)


# ------------------------------------------------------------------ attention pictures
needs_op = pytest.mark.skipif(not native_ms_deform_attn_available("cpu"), reason="d2detr._C not built")


def test_recorded_sampling_reproduces_module_output(tmp_path):
    """The sampling locations and weights rebuilt from the hooks are the module's own: fed back
    through ms_deform_attn they give the module's output."""
    from d2detr.export.attention_maps import AttentionRecorder, deformable_sampling
    from d2detr.layers.ms_deform_attn import ms_deform_attn

    for method in ("deformable_detr", "deformable_detr_two_stage"):  # 2-d and 4-d reference points
        model, _ = build_tiny(write_tiny_config(tmp_path, method))
        with torch.no_grad(), AttentionRecorder(model) as rec:
            model([{"image": random_image(96, 128, 0)}])
        deformable = [r for r in rec.records if r.kind == "deformable"]
        assert [r.name.split(".")[1] for r in deformable] == ["encoder", "decoder", "decoder"]
        assert len(rec.records) == 3 + 2  # + the decoder's query self-attention (dense)
        for r in deformable:
            m, d = r.module, r.data
            loc, w = deformable_sampling(m, r)
            v = m.value_proj(d["value"]).masked_fill(d["value_padding_mask"][..., None], 0.0)
            v = v.view(*v.shape[:2], m.num_heads, m.head_dim)
            out = m.output_proj(ms_deform_attn(v, d["spatial_shapes"], d["level_start_index"], loc, w))
            torch.testing.assert_close(out, d["output"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w.sum((-1, -2)), torch.ones_like(w.sum((-1, -2))))


@pytest.mark.parametrize("method", ["deformable_detr", "dab_deformable_detr", "dino", "detr", "conditional_detr", "dab_detr"])
def test_visualize_attention(tmp_path, method):
    deformable = method in ("deformable_detr", "dab_deformable_detr", "dino")
    if deformable and not native_ms_deform_attn_available("cpu"):
        pytest.skip("d2detr._C not built")
    config = write_tiny_config(tmp_path, method)
    _, weights = build_tiny(config)
    paths = write_images(str(tmp_path / "images"), [(96, 128)])
    tool = load_tool("visualize_attention")
    args = tool.get_parser().parse_args(
        ["--config-file", config, "--input", paths[0], "--output", str(tmp_path / "out"), "--min-size", "0",
         "--topk", "2", "--save-data", f"train.init_checkpoint={weights}"]
    )
    (png,) = tool.main(args)
    picture = cv2.imread(png)
    data = np.load(png[:-4] + ".npz")
    assert len(data["queries"]) == 2 and str(data["layer"]).split(".")[-3:-1] == ["layers", "1"]  # last layer
    assert np.all(np.diff(data["scores"]) <= 0)  # top-scoring queries first
    if deformable:
        levels = 3
        assert picture.shape == (96, 128 * levels, 3)  # one panel per level
        w, loc = data["attention_weights"], data["sampling_locations"]  # [2,M,L,P], [2,M,L,P,2]
        assert w.shape[:1] + w.shape[2:3] == (2, levels) and loc.shape[-1] == 2
        np.testing.assert_allclose(w.sum((2, 3)), 1.0, atol=1e-5)  # softmax over levels x points per head
        assert np.isfinite(loc).all()
        assert (data["spatial_shapes"] == [[12, 16], [6, 8], [3, 4]]).all()
    else:
        assert picture.shape == (96, 128 * 2, 3)  # one panel per query
        maps = data["attention_maps"]  # [2, h, w]: stride-32 map of a 96x128 input
        assert maps.shape == (2, 3, 4)
        np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-5)


def test_visualize_attention_resizes_as_evaluation_does(tmp_path):
    """Without --min-size the image is resized by the config's test mapper (here: shortest edge 80,
    longest 160), as tools/demo.py and COCOEvaluator do; it used to be resized to 800 / 1333
    whatever the model was trained at."""
    test_loader = """
from omegaconf import OmegaConf
from detectron2.data import transforms as T
dataloader = OmegaConf.create()
dataloader.test = dict(mapper=dict(augmentation=[L(T.ResizeShortestEdge)(short_edge_length=80, max_size=160)]))
"""
    config = write_tiny_config(tmp_path, "detr", extra=test_loader)
    _, weights = build_tiny(config)
    paths = write_images(str(tmp_path / "images"), [(96, 128)])
    tool = load_tool("visualize_attention")
    args = tool.get_parser().parse_args(
        ["--config-file", config, "--input", paths[0], "--output", str(tmp_path / "out"), "--topk", "2",
         f"train.init_checkpoint={weights}"])
    (png,) = tool.main(args)
    assert cv2.imread(png).shape == (80, 107 * 2, 3)  # 96x128 -> 80x107, one panel per query


# --------------------------------------------------------------------------- analyze
@needs_op
def test_analyze_model_counts(tmp_path):
    from d2detr.export.attention_maps import AttentionRecorder

    config = write_tiny_config(tmp_path, "deformable_detr")
    tool = load_tool("analyze_model")
    out = str(tmp_path / "stats.json")
    stats = tool.main(tool.get_parser().parse_args(["--config-file", config, "--input-size", "96", "128", "--json", out]))
    with open(out) as f:
        assert json.load(f)["flops"] == stats["flops"]
    model, _ = build_tiny(config)
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    assert stats["input_size"] == [96, 128]
    # deformable attention counted as N*Q*M*D*L*P*5 per call
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model([{"image": random_image(96, 128, 0)}])
    expected = 0
    for r in (r for r in rec.records if r.kind == "deformable"):
        N, Q, _ = r.data["query"].shape
        m = r.module
        expected += N * Q * m.num_heads * m.head_dim * m.num_levels * m.num_points * 5
    assert stats["flops_by_operator"]["ms_deform_attn"] == expected
    assert 0 < stats["flops"] < 1e10 and stats["activations"] > 0
    assert sum(v["params"] for v in stats["by_module"].values()) == stats["params"]
    # twice the pixels: more work
    bigger = tool.main(tool.get_parser().parse_args(["--config-file", config, "--input-size", "192", "128"]))
    assert 1.5 * stats["flops"] < bigger["flops"] < 2.5 * stats["flops"]


def test_analyze_model_counts_dense_attention(tmp_path):
    config = write_tiny_config(tmp_path, "detr")
    tool = load_tool("analyze_model")
    stats = tool.main(tool.get_parser().parse_args(["--config-file", config, "--input-size", "96", "128"]))
    ops = stats["flops_by_operator"]
    assert any(k in ops for k in ("scaled_dot_product_attention", "aten::scaled_dot_product_attention",
                                  "_native_multi_head_attention", "aten::_native_multi_head_attention")), ops
    assert not any("attention" in k for k in stats["unsupported_ops"]), stats["unsupported_ops"]


# -------------------------------------------------- Detectron2's data visualisation workflows
def test_visualize_data_annotation_and_dataloader(tmp_path):
    from test_train_toy import TOY_IMAGE_SIZE, write_toy_config

    config = write_toy_config(tmp_path)
    tool = load_tool("visualize_data")
    out = str(tmp_path / "annotation")
    written = tool.main(tool.parse_args(["--source", "annotation", "--config-file", config, "--output-dir", out]))
    assert len(written) == 2  # toy_train has 2 images
    for p in written:
        assert cv2.imread(p).shape[:2] == TOY_IMAGE_SIZE
    out = str(tmp_path / "loader")
    written = tool.main(
        tool.parse_args(["--source", "dataloader", "--config-file", config, "--output-dir", out, "--num-images", "3"])
    )
    assert len(written) == 3 and all(cv2.imread(p).shape[:2] == TOY_IMAGE_SIZE for p in written)


def _results_from_ground_truth(dicts, id_of):
    results = []
    for d in dicts:
        for a in d["annotations"]:
            from detectron2.structures import BoxMode

            x0, y0, x1, y1 = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
            results.append({"image_id": d["image_id"], "category_id": id_of(a["category_id"]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9})
    return results


def test_visualize_json_results_on_neon_trees(tmp_path):
    """On d2detr's real dataset: predictions (COCOEvaluator's format) next to the ground truth."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import d2detr.data.datasets  # noqa: F401

    try:
        dicts = DatasetCatalog.get("neon_trees_val")
    except Exception as e:  # deepforest's data not installed
        pytest.skip(f"neon_trees_val unavailable: {e}")
    inverse = {v: k for k, v in MetadataCatalog.get("neon_trees_val").thing_dataset_id_to_contiguous_id.items()}
    results = str(tmp_path / "coco_instances_results.json")
    with open(results, "w") as f:
        json.dump(_results_from_ground_truth(dicts, inverse.get), f)
    tool = load_tool("visualize_json_results")

    def run(out, threshold):
        args = ["--input", results, "--output", out, "--dataset", "neon_trees_val", "--conf-threshold", str(threshold)]
        return tool.main(tool.parse_args(args))

    shown, hidden = run(str(tmp_path / "shown"), 0.5), run(str(tmp_path / "hidden"), 0.95)
    assert len(shown) == len(hidden) == len(dicts)
    for d, p, q in zip(dicts, shown, hidden):
        raw = cv2.imread(d["file_name"]).astype(int)
        a, b = cv2.imread(p), cv2.imread(q)
        assert a.shape[:2] == (d["height"], 2 * d["width"])  # predictions | ground truth
        w = d["width"]
        assert np.abs(a[:, w:] - raw).mean() > 1.0  # ground-truth boxes drawn
        assert np.abs(a[:, :w] - raw).mean() > 1.0  # score 0.9 > 0.5: predictions drawn
        assert np.abs(b[:, :w] - raw).mean() < 1.0  # 0.9 < 0.95: nothing drawn
