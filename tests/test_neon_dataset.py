"""The built-in NEON tree-crown datasets: registration, the region split, tiling and
clear errors on bad annotation files. The numbers are the ones in docs/datasets.md."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from d2detr.data.datasets import neon_trees as N

HAS_DEEPFOREST = importlib.util.find_spec("deepforest") is not None
needs_data = pytest.mark.skipif(
    not HAS_DEEPFOREST,
    reason="deepforest (the NEON sample data) is not installed; run `make install`",
)

YELL1 = "2019_YELL_2_528000_4978000_image_crop2.png"
YELL2 = "2019_YELL_2_541000_4977000_image_crop.png"

# docs/datasets.md, "Counts". boxes = tile-level annotations (a crown cut by the overlap
# of training tiles is counted once per tile), trees = distinct crowns.
EXPECTED = {
    "train": {"images": 66, "boxes": 1247, "trees": 746, "empty_images": 3},
    "val": {"images": 8, "boxes": 197, "trees": 197, "empty_images": 0},
}
EXPECTED_PER_SOURCE = {  # split -> source -> (tiles, boxes, trees)
    "train": {
        YELL1: (56, 887, 478),
        YELL2: (8, 262, 170),
        "OSBS_029.png": (1, 61, 61),
        "SOAP_061.png": (1, 37, 37),
    },
    "val": {YELL1: (5, 89, 89), YELL2: (3, 108, 108)},
}
SOURCE_TREES = {YELL1: 574, YELL2: 279, "OSBS_029.png": 61, "SOAP_061.png": 37}


def _intersection_area(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Tiles built once into a temporary D2DETR_DATASETS (never the user's cache)."""
    if not HAS_DEEPFOREST:
        pytest.skip("deepforest is not installed")
    base = tmp_path_factory.mktemp("d2detr_datasets")
    mp = pytest.MonkeyPatch()
    mp.setenv("D2DETR_DATASETS", str(base))
    folder = N.prepare_neon_trees()
    yield {"base": base, "folder": folder}
    mp.undo()


@pytest.fixture(scope="module")
def dicts(cache):
    return {split: N.load_neon_trees(split) for split in N.SPLITS}


@pytest.fixture(scope="module")
def sources():
    root = N.locate_deepforest_data()
    out = {}
    for src in N.SOURCES:
        boxes, labels = N.read_box_annotations(
            os.path.join(root, src.annotations), src.image, src.width, src.height
        )
        out[src.image] = (src, boxes, labels)
    return out


def test_builtin_registration():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import d2detr.data.datasets  # noqa: F401  (registers on import)

    for name in ("neon_trees_train", "neon_trees_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["tree"]
        assert meta.evaluator_type == "coco"
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0}


@needs_data
def test_registered_loader_uses_cache_and_sets_json_file(cache):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = N.register_neon_trees(prefix="neon_trees_t1")
    assert names == ["neon_trees_t1_train", "neon_trees_t1_val"]
    val = DatasetCatalog.get("neon_trees_t1_val")
    assert all(r["file_name"].startswith(cache["folder"]) for r in val)
    json_file = MetadataCatalog.get("neon_trees_t1_val").json_file
    assert json_file == os.path.join(cache["folder"], "val_coco.json")
    with open(json_file) as f:
        coco = json.load(f)
    assert len(coco["images"]) == EXPECTED["val"]["images"]
    assert len(coco["annotations"]) == EXPECTED["val"]["boxes"]
    assert min(a["id"] for a in coco["annotations"]) == 1
    # Re-registering replaces the old entries instead of failing.
    N.register_neon_trees(prefix="neon_trees_t1")
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


@needs_data
def test_counts_as_documented(cache, dicts):
    with open(os.path.join(cache["folder"], "index.json")) as f:
        assert json.load(f)["counts"] == EXPECTED
    for split, recs in dicts.items():
        trees = {(r["source_image"], a["tree_id"]) for r in recs for a in r["annotations"]}
        got = {
            "images": len(recs),
            "boxes": sum(len(r["annotations"]) for r in recs),
            "trees": len(trees),
            "empty_images": sum(1 for r in recs if not r["annotations"]),
        }
        assert got == EXPECTED[split]
        per = {}
        for r in recs:
            entry = per.setdefault(r["source_image"], [0, 0, set()])
            entry[0] += 1
            entry[1] += len(r["annotations"])
            entry[2].update(a["tree_id"] for a in r["annotations"])
        assert {k: (v[0], v[1], len(v[2])) for k, v in per.items()} == EXPECTED_PER_SOURCE[split]
    ids = [r["image_id"] for recs in dicts.values() for r in recs]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)


@needs_data
def test_source_annotations(sources):
    assert {k: len(v[1]) for k, v in sources.items()} == SOURCE_TREES
    assert sorted(set(sources["SOAP_061.png"][2])) == ["Alive", "Dead"]
    root = N.locate_deepforest_data()
    # deepforest's CSVs hold the same boxes as its XMLs (the CSV names OSBS_029.tif).
    for csv_name, image in (
        ("OSBS_029.csv", "OSBS_029.png"),
        ("testfile_multi.csv", "SOAP_061.png"),
    ):
        boxes, labels = N.read_box_annotations(os.path.join(root, csv_name), image, 400, 400)
        src, xml_boxes, xml_labels = sources[image]
        assert sorted(map(tuple, boxes)) == sorted(map(tuple, xml_boxes))
        assert sorted(labels) == sorted(xml_labels)


def test_split_regions_are_disjoint():
    for src in N.SOURCES:
        assert src.train_region is not None
        for region in (src.train_region, src.val_region):
            if region is not None:
                x0, y0, x1, y1 = region
                assert 0 <= x0 < x1 <= src.width and 0 <= y0 < y1 <= src.height
        if src.val_region is not None:
            assert _intersection_area(src.train_region, src.val_region) == 0
            # val regions hold whole 400x400 tiles
            x0, y0, x1, y1 = src.val_region
            assert (x1 - x0) % N.TILE_SIZE == 0 and (y1 - y0) % N.TILE_SIZE == 0


@needs_data
def test_no_train_tile_touches_validation(dicts):
    val_regions = {s.image: s.val_region for s in N.SOURCES if s.val_region is not None}
    for r in dicts["train"]:
        if r["source_image"] in val_regions:
            assert _intersection_area(r["crop_box"], val_regions[r["source_image"]]) == 0
        for v in dicts["val"]:
            if v["source_image"] == r["source_image"]:
                assert _intersection_area(r["crop_box"], v["crop_box"]) == 0
    for v in dicts["val"]:
        x0, y0, x1, y1 = val_regions[v["source_image"]]
        c = v["crop_box"]
        assert x0 <= c[0] < c[2] <= x1 and y0 <= c[1] < c[3] <= y1
    # no crown is annotated in both splits
    train_trees = {
        (r["source_image"], a["tree_id"]) for r in dicts["train"] for a in r["annotations"]
    }
    val_trees = {(r["source_image"], a["tree_id"]) for r in dicts["val"] for a in r["annotations"]}
    assert not train_trees & val_trees
    # val tiles do not overlap each other: each crown is scored once
    val = dicts["val"]
    for i in range(len(val)):
        for j in range(i + 1, len(val)):
            if val[i]["source_image"] == val[j]["source_image"]:
                assert _intersection_area(val[i]["crop_box"], val[j]["crop_box"]) == 0


@needs_data
def test_boxes_inside_tiles_and_faithful(dicts, sources):
    from detectron2.structures import BoxMode

    for split, recs in dicts.items():
        for r in recs:
            assert (r["height"], r["width"]) == (N.TILE_SIZE, N.TILE_SIZE)
            x0, y0, x1, y1 = r["crop_box"]
            assert (x1 - x0, y1 - y0) == (r["width"], r["height"])
            src, boxes, _ = sources[r["source_image"]]
            for a in r["annotations"]:
                assert a["bbox_mode"] == BoxMode.XYXY_ABS and a["category_id"] == 0
                bx0, by0, bx1, by1 = a["bbox"]
                assert 0 <= bx0 < bx1 <= r["width"] and 0 <= by0 < by1 <= r["height"]
                # the tile box is the source box clipped to the tile, >= half visible
                ox0, oy0, ox1, oy1 = boxes[a["tree_id"]]
                expect = [
                    max(ox0, x0) - x0,
                    max(oy0, y0) - y0,
                    min(ox1, x1) - x0,
                    min(oy1, y1) - y0,
                ]
                assert a["bbox"] == pytest.approx(expect)
                visible = (bx1 - bx0) * (by1 - by0) / ((ox1 - ox0) * (oy1 - oy0))
                assert visible >= N.MIN_VISIBLE_FRACTION


@needs_data
def test_tile_pixels_match_source(dicts):
    root = N.locate_deepforest_data()
    picks = [dicts["train"][0], dicts["train"][-3], dicts["val"][0], dicts["val"][-1]]
    for r in picks:
        x0, y0, x1, y1 = r["crop_box"]
        with Image.open(os.path.join(root, r["source_image"])) as im:
            expect = np.asarray(im.convert("RGB"))[y0:y1, x0:x1]
        with Image.open(r["file_name"]) as im:
            assert np.array_equal(np.asarray(im), expect)


@needs_data
def test_coco_evaluator_perfect_predictions(cache, tmp_path):
    """The registered val json works with COCOEvaluator: ground truth as predictions -> AP 100."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    name_train, name_val = N.register_neon_trees(prefix="neon_trees_t2")
    recs = DatasetCatalog.get(name_val)  # builds / loads and sets json_file
    assert MetadataCatalog.get(name_val).json_file.endswith("val_coco.json")
    ev = COCOEvaluator(name_val, output_dir=str(tmp_path), use_fast_impl=False)
    ev.reset()
    for r in recs:
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in r["annotations"]]).reshape(-1, 4))
        inst.scores = torch.ones(len(r["annotations"]))
        inst.pred_classes = torch.zeros(len(r["annotations"]), dtype=torch.int64)
        ev.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    res = ev.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    for n in (name_train, name_val):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


# ----------------------------------------------------------------------------- pure geometry


def test_tile_grid():
    tiles = N.tile_grid((0, 0, 1249, 635), 400, 300)
    assert [t[0] for t in tiles[:4]] == [0, 300, 600, 849]
    assert sorted({t[1] for t in tiles}) == [0, 235]
    assert all(t[2] - t[0] == 400 and t[3] - t[1] == 400 for t in tiles)
    assert N.tile_grid((299, 2072, 2299, 2472), 400, 400) == [
        (x, 2072, x + 400, 2472) for x in (299, 699, 1099, 1499, 1899)
    ]
    assert N.tile_grid((0, 0, 250, 120), 400, 300) == [(0, 0, 250, 120)]


def test_crop_boxes_visible_fraction():
    boxes = np.array(
        [
            [10, 10, 50, 50],  # inside
            [380, 10, 420, 50],  # half inside: kept, clipped
            [390, 10, 430, 50],  # a quarter inside: dropped
            [500, 500, 540, 540],
        ]
    )  # outside
    out, keep = N.crop_boxes(boxes, (0, 0, 400, 400))
    assert keep.tolist() == [0, 1]
    assert out.tolist() == [[10, 10, 50, 50], [380, 10, 400, 50]]
    out, keep = N.crop_boxes(boxes, (300, 0, 700, 400))
    assert keep.tolist() == [1, 2]
    assert out.tolist() == [[80, 10, 120, 50], [90, 10, 130, 50]]


# ----------------------------------------------------------------------------- errors


def _write(path, text):
    path.write_text(text)
    return str(path)


HEADER = "image_path,xmin,ymin,xmax,ymax,label\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("image_path,xmin,ymin,xmax,label\na.png,1,2,3,Tree\n", r"missing column\(s\) \['ymax'\]"),
        (
            HEADER + "a.png,1,2,30,40,Tree\na.png,50,20,40,60,Tree\n",
            r"row 3: empty or inverted box",
        ),
        (
            HEADER + "a.png,1,2,30,40,Tree\na.png,5,x,40,60,Tree\n",
            r"row 3: ymin='x' is not a number",
        ),
        (HEADER + "a.png,1,2,30,40,Bird\n", r"row 2: unknown label 'Bird'"),
        (HEADER + "a.png,1,2,300,40,Tree\n", r"row 2: .*outside the 100x100 image"),
        (HEADER + "a.png,1,2,30\n", r"row 2: .*malformed row"),
        (HEADER + "b.png,1,2,30,40,Tree\n", r"no row refers to image 'a.png'"),
        ("", r"empty CSV file"),
    ],
)
def test_malformed_csv(tmp_path, text, message):
    path = _write(tmp_path / "a.csv", text)
    with pytest.raises(ValueError, match=message) as e:
        N.read_box_annotations(path, "a.png", 100, 100)
    assert path in str(e.value)


def test_csv_rows_and_empty_marker(tmp_path):
    path = _write(
        tmp_path / "a.csv",
        HEADER + "a.tif,1,2,30,40,Dead\nother.png,0,0,5,5,Tree\n"
        "a.png,0,0,0,0,Tree\n a.png ,10,20,30,40.5,alive\n",
    )
    boxes, labels = N.read_box_annotations(path, "a.png", 100, 100)
    assert boxes.tolist() == [[1, 2, 30, 40], [10, 20, 30, 40.5]]
    assert labels == ["Dead", "alive"]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "<annotation><object><name>Tree</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>9</xmax></bndbox></object></annotation>",
            r"<object> #1: <bndbox> has no <ymax>",
        ),
        (
            "<annotation><object><name>Tree</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>9</xmax><ymax>9</ymax></bndbox></object><object><name>Tree</name><bndbox>"
            "<xmin>9</xmin><ymin>1</ymin><xmax>1</xmax><ymax>9</ymax></bndbox></object></annotation>",
            r"<object> #2: empty or inverted box",
        ),
        (
            "<annotation><size><width>50</width><height>100</height></size></annotation>",
            r"<size> says 50x100",
        ),
        ("<annotation><object>", r"malformed XML"),
        ("<notvoc/>", r"not a Pascal VOC annotation"),
    ],
)
def test_malformed_xml(tmp_path, body, message):
    path = _write(tmp_path / "a.xml", body)
    with pytest.raises(ValueError, match=message) as e:
        N.read_box_annotations(path, "a.png", 100, 100)
    assert path in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Annotation file not found: .*nope.xml"):
        N.read_box_annotations(str(tmp_path / "nope.xml"), "a.png", 100, 100)
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        N.prepare_neon_trees(root=str(tmp_path / "missing"), cache_dir=str(tmp_path / "c"))

    src = N.NeonSource(
        "a.png", "a.csv", 500, 450, "TEST", train_region=(0, 0, 500, 450), val_region=None
    )
    _write(tmp_path / "a.csv", HEADER + "a.png,10,10,60,60,Tree\n")
    with pytest.raises(FileNotFoundError, match=r"Image not found: .*a\.png"):
        N.prepare_neon_trees(root=str(tmp_path), cache_dir=str(tmp_path / "c"), sources=[src])
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp")]  # nothing half-built

    Image.fromarray(np.zeros((450, 400, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.png: image is 400x450, expected 500x450"):
        N.prepare_neon_trees(root=str(tmp_path), cache_dir=str(tmp_path / "c"), sources=[src])


def test_custom_sources_build(tmp_path):
    """The pipeline on a synthetic CSV-annotated image: tiling, clipping, the json files."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (450, 500, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    _write(
        tmp_path / "a.csv",
        HEADER + "a.png,10,10,60,60,Tree\na.png,380,100,440,160,Tree\n"
        "a.png,450,420,500,450,Tree\n",
    )
    src = N.NeonSource(
        "a.png", "a.csv", 500, 450, "TEST", train_region=(0, 0, 500, 450), val_region=None
    )
    folder = N.prepare_neon_trees(root=str(tmp_path), cache_dir=str(tmp_path / "c"), sources=[src])
    with open(os.path.join(folder, "train.json")) as f:
        recs = json.load(f)
    assert [r["crop_box"] for r in recs] == [
        [0, 0, 400, 400],
        [100, 0, 500, 400],
        [0, 50, 400, 450],
        [100, 50, 500, 450],
    ]
    assert [[a["tree_id"] for a in r["annotations"]] for r in recs] == [[0], [1], [], [1, 2]]
    with open(os.path.join(folder, "val.json")) as f:
        assert json.load(f) == []

    # Idempotent: a second call reuses the folder without rewriting it ...
    tile = os.path.join(folder, recs[0]["file_name"])
    mtime = os.stat(tile).st_mtime_ns
    assert (
        N.prepare_neon_trees(root=str(tmp_path), cache_dir=str(tmp_path / "c"), sources=[src])
        == folder
    )
    assert os.stat(tile).st_mtime_ns == mtime
    # ... a damaged cache (truncated tile) is rebuilt in place ...
    with open(tile, "r+b") as f:
        f.truncate(100)
    assert (
        N.prepare_neon_trees(root=str(tmp_path), cache_dir=str(tmp_path / "c"), sources=[src])
        == folder
    )
    with Image.open(tile) as im:
        assert im.size == (400, 400)
    assert [n for n in os.listdir(tmp_path / "c") if n.startswith(".")] == []  # no temp leftovers
    # ... and a changed annotation file gives a new folder.
    _write(tmp_path / "a.csv", HEADER + "a.png,10,10,60,60,Tree\n")
    assert (
        N.prepare_neon_trees(root=str(tmp_path), cache_dir=str(tmp_path / "c"), sources=[src])
        != folder
    )
    shutil.rmtree(tmp_path / "c")
