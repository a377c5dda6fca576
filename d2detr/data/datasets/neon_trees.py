"""NEON tree crowns (the sample data shipped in the ``deepforest`` package) as
Detectron2 datasets ``neon_trees_train`` and ``neon_trees_val``.

The split is by image region and fixed: the bottom 400-pixel strip of each of the
two large Yellowstone (YELL) scenes is held out for validation; everything above
that strip, plus the two 400x400 plots OSBS_029 and SOAP_061, is used for
training. No training tile overlaps a validation pixel. Every image of both
splits is a 400x400 tile written once to a cache folder. See ``docs/datasets.md``
for the layout, the tiling rule and the exact counts (the tests check them).

The data folder is located with ``importlib.util.find_spec("deepforest")``:
importing ``deepforest`` itself needs pytorch_lightning, which d2detr does not.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "SOURCES",
    "SPLITS",
    "NeonSource",
    "default_cache_dir",
    "locate_deepforest_data",
    "read_box_annotations",
    "tile_grid",
    "crop_boxes",
    "plan_tiles",
    "prepare_neon_trees",
    "load_neon_trees",
    "register_neon_trees",
]

Box = Tuple[int, int, int, int]  # XYXY, absolute pixels, half-open [x0, x1) x [y0, y1)

#: One class: every crown is a "tree". SOAP_061 labels crowns Alive/Dead; both
#: are tree crowns and are mapped to "tree" (the usual DeepForest task).
CLASS_NAMES = ("tree",)
#: Annotation labels accepted in the source files (case-insensitive) -> category id.
LABEL_TO_CATEGORY = {"tree": 0, "alive": 0, "dead": 0}
#: COCO json category id of "tree" (COCO ids start at 1; Detectron2 uses contiguous 0).
COCO_CATEGORY_ID = 1

SPLITS = ("train", "val")
TILE_SIZE = 400
#: Training tiles overlap by TILE_SIZE - TRAIN_STRIDE = 100 px (the largest crown is 108 px).
TRAIN_STRIDE = 300
#: A box cut by a tile edge is kept (clipped to the tile) when at least this fraction
#: of its area lies inside the tile, and dropped otherwise.
MIN_VISIBLE_FRACTION = 0.5
#: Bump when the cache layout or the content of the dicts changes.
CACHE_VERSION = 2
_BOUNDS_TOLERANCE = 1.0  # px a box may stick out of its image before it is an error


@dataclass(frozen=True)
class NeonSource:
    """One annotated source image and the regions it contributes to each split."""

    image: str
    annotations: str  # a VOC .xml or a DeepForest .csv next to the image
    width: int
    height: int
    site: str
    train_region: Optional[Box]
    val_region: Optional[Box]

    def region(self, split: str) -> Optional[Box]:
        return {"train": self.train_region, "val": self.val_region}[split]


#: The fixed split. Regions are XYXY pixel boxes in each source image.
#: YELL scenes: val = the bottom 400 rows, right-aligned to hold exactly 5 / 3 tiles;
#: train = all rows above it (full width). The bottom-left corners left over
#: (299x400 and 49x400 px; 6 crowns lie entirely in the first) belong to neither split.
SOURCES: Tuple[NeonSource, ...] = (
    NeonSource(
        "2019_YELL_2_528000_4978000_image_crop2.png",
        "2019_YELL_2_528000_4978000_image_crop2.xml",
        2299,
        2472,
        "YELL",
        train_region=(0, 0, 2299, 2072),
        val_region=(299, 2072, 2299, 2472),
    ),
    NeonSource(
        "2019_YELL_2_541000_4977000_image_crop.png",
        "2019_YELL_2_541000_4977000_image_crop.xml",
        1249,
        1035,
        "YELL",
        train_region=(0, 0, 1249, 635),
        val_region=(49, 635, 1249, 1035),
    ),
    NeonSource(
        "OSBS_029.png",
        "OSBS_029.xml",
        400,
        400,
        "OSBS",
        train_region=(0, 0, 400, 400),
        val_region=None,
    ),
    NeonSource(
        "SOAP_061.png",
        "SOAP_061.xml",
        400,
        400,
        "SOAP",
        train_region=(0, 0, 400, 400),
        val_region=None,
    ),
)

_CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")


# ----------------------------------------------------------------------------- locations


def locate_deepforest_data() -> str:
    """The ``data`` folder of the installed ``deepforest`` package (not imported)."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The NEON tree-crown images come from the 'deepforest' package, which is not "
            "installed. Run `make install` (it installs deepforest==2.1.0 with --no-deps) "
            "or pass root=<folder with the images and annotations>."
        )
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    if not os.path.isdir(data):
        raise FileNotFoundError(f"deepforest is installed but has no data folder: {data}")
    return data


def default_cache_dir() -> str:
    """Where tiles are written: ``$D2DETR_DATASETS/neon_trees`` if set, otherwise
    ``$XDG_CACHE_HOME/d2detr/neon_trees`` (``~/.cache/d2detr/neon_trees``)."""
    base = os.environ.get("D2DETR_DATASETS")
    if base:
        return os.path.join(os.path.expanduser(base), "neon_trees")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "d2detr", "neon_trees")


# ----------------------------------------------------------------------------- annotations


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path.strip()))[0]


def _number(value, where: str, field: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{where}: {field}={value!r} is not finite")
    return out


def _check_box(box, label: str, where: str, width: int, height: int):
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError(
            f"{where}: empty or inverted box xmin={x0:g}, ymin={y0:g}, xmax={x1:g}, ymax={y1:g} "
            "(need xmax > xmin and ymax > ymin)"
        )
    t = _BOUNDS_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise ValueError(
            f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the "
            f"{width}x{height} image"
        )
    if label.strip().lower() not in LABEL_TO_CATEGORY:
        raise ValueError(
            f"{where}: unknown label {label!r}; expected one of "
            f"{sorted(set(k.capitalize() for k in LABEL_TO_CATEGORY))}"
        )


def _read_csv(path: str, image_name: str, width: int, height: int):
    boxes, labels = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise ValueError(
                f"{path}: empty CSV file, expected the header {','.join(_CSV_COLUMNS)}"
            )
        missing = [c for c in _CSV_COLUMNS if c not in [h.strip() for h in header]]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; found {header}, expected "
                f"{','.join(_CSV_COLUMNS)}"
            )
        reader.fieldnames = [h.strip() for h in header]
        seen_images = set()
        for row in reader:
            where = f"{path}, row {reader.line_num}"  # the line number in the file
            if any(row.get(c) is None for c in _CSV_COLUMNS) or None in row:
                raise ValueError(f"{where}: expected {len(header)} fields, got a malformed row")
            seen_images.add(row["image_path"])
            if _stem(row["image_path"]) != _stem(image_name):
                continue
            box = [_number(row[c], where, c) for c in ("xmin", "ymin", "xmax", "ymax")]
            if box == [0.0, 0.0, 0.0, 0.0]:  # DeepForest's marker of an image without trees
                continue
            _check_box(box, row["label"], where, width, height)
            boxes.append(box)
            labels.append(row["label"].strip())
    if seen_images and not any(_stem(p) == _stem(image_name) for p in seen_images):
        raise ValueError(
            f"{path}: no row refers to image {image_name!r} (image_path values: "
            f"{sorted(seen_images)[:5]})"
        )
    return boxes, labels


def _read_voc_xml(path: str, image_name: str, width: int, height: int):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: malformed XML ({e})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: not a Pascal VOC annotation (root element <{root.tag}>)")
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        w = _number(size.findtext("width"), f"{path}, <size>", "width")
        h = _number(size.findtext("height"), f"{path}, <size>", "height")
        if (int(w), int(h)) != (width, height):
            raise ValueError(
                f"{path}: <size> says {int(w)}x{int(h)} but image {image_name!r} is "
                f"{width}x{height}"
            )
    boxes, labels = [], []
    for k, obj in enumerate(root.findall("object"), start=1):
        where = f"{path}, <object> #{k}"
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{where}: no <bndbox>")
        vals = []
        for field in ("xmin", "ymin", "xmax", "ymax"):
            text = bnd.findtext(field)
            if text is None:
                raise ValueError(f"{where}: <bndbox> has no <{field}>")
            vals.append(_number(text.strip(), where, field))
        label = (obj.findtext("name") or "").strip()
        _check_box(vals, label, where, width, height)
        boxes.append(vals)
        labels.append(label)
    return boxes, labels


def read_box_annotations(
    path: str, image_name: str, width: int, height: int
) -> Tuple[np.ndarray, List[str]]:
    """Read and validate the boxes of one image from a VOC ``.xml`` or DeepForest ``.csv``.

    Returns ``(boxes, labels)``: ``boxes`` is a float64 ``[N, 4]`` array of absolute XYXY
    pixel coordinates (DeepForest's convention: continuous coordinates, the right edge of
    a W-wide image is W), clipped to the image. A CSV may hold several images: only rows
    whose ``image_path`` has the same stem as ``image_name`` are read.

    Raises FileNotFoundError if the file is missing and ValueError, naming the file and
    the row / object, for missing columns, non-numeric values, empty or inverted boxes,
    boxes outside the image and unknown labels.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Annotation file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        boxes, labels = _read_csv(path, image_name, width, height)
    elif ext == ".xml":
        boxes, labels = _read_voc_xml(path, image_name, width, height)
    else:
        raise ValueError(f"{path}: unsupported annotation format {ext!r} (use .xml or .csv)")
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    arr[:, 0::2] = arr[:, 0::2].clip(0, width)
    arr[:, 1::2] = arr[:, 1::2].clip(0, height)
    return arr, labels


# ----------------------------------------------------------------------------- tiling


def _starts(lo: int, hi: int, size: int, stride: int) -> List[int]:
    if hi - lo <= size:
        return [lo]
    starts = list(range(lo, hi - size + 1, stride))
    if starts[-1] != hi - size:
        starts.append(hi - size)  # last tile flush with the region's end
    return starts


def tile_grid(region: Box, size: int = TILE_SIZE, stride: int = TILE_SIZE) -> List[Box]:
    """Tiles of ``size`` covering ``region`` with the given ``stride``, row-major.

    The last tile of a row / column is moved back to end flush with the region (so it
    overlaps its neighbour more); a region narrower than ``size`` gives one narrower tile.
    Tiles never leave the region.
    """
    x0, y0, x1, y1 = region
    return [
        (tx, ty, min(tx + size, x1), min(ty + size, y1))
        for ty in _starts(y0, y1, size, stride)
        for tx in _starts(x0, x1, size, stride)
    ]


def crop_boxes(
    boxes: np.ndarray, crop: Box, min_visible: float = MIN_VISIBLE_FRACTION
) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes of a crop, relative to its origin: each box is clipped to ``crop`` and kept if
    at least ``min_visible`` of its area is inside. Returns ``(boxes [K, 4], kept indices [K])``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx0, cy0, cx1, cy1 = crop
    clipped = np.stack(
        [
            boxes[:, 0].clip(cx0, cx1),
            boxes[:, 1].clip(cy0, cy1),
            boxes[:, 2].clip(cx0, cx1),
            boxes[:, 3].clip(cy0, cy1),
        ],
        axis=1,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inter = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = np.nonzero((inter > 0) & (inter >= min_visible * area))[0]
    return clipped[keep] - np.array([cx0, cy0, cx0, cy0], dtype=np.float64), keep


def _owner_split(boxes: np.ndarray, src: NeonSource) -> np.ndarray:
    """For each box, the split whose region holds the largest part of it ("train" on a
    tie, "" when it touches neither region). Tiles only keep the boxes their split owns,
    so a crown straddling the train/val boundary is annotated in one split only."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    fracs = []
    for split in SPLITS:
        region = src.region(split)
        if region is None:
            fracs.append(np.zeros(len(boxes)))
            continue
        x0, y0, x1, y1 = region
        iw = boxes[:, 2].clip(x0, x1) - boxes[:, 0].clip(x0, x1)
        ih = boxes[:, 3].clip(y0, y1) - boxes[:, 1].clip(y0, y1)
        fracs.append(iw * ih / area)
    fracs = np.stack(fracs, axis=1)
    owner = np.array(SPLITS, dtype=object)[fracs.argmax(axis=1)]
    owner[fracs.max(axis=1) <= 0] = ""
    return owner


def plan_tiles(split: str, sources: Sequence[NeonSource] = SOURCES) -> List[Tuple[NeonSource, Box]]:
    """The ``(source, tile)`` pairs of a split, in order. Train tiles overlap
    (stride ``TRAIN_STRIDE``); validation tiles do not (each crown is scored once per tile)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    stride = TRAIN_STRIDE if split == "train" else TILE_SIZE
    out = []
    for src in sources:
        region = src.region(split)
        if region is not None:
            out.extend((src, t) for t in tile_grid(region, TILE_SIZE, stride))
    return out


# ----------------------------------------------------------------------------- cache


def _cache_key(root: str, sources: Sequence[NeonSource]) -> str:
    files = []
    for src in sources:
        for name in (src.image, src.annotations):
            p = os.path.join(root, name)
            st = os.stat(p) if os.path.exists(p) else None
            files.append([name, st.st_size if st else -1, st.st_mtime_ns if st else -1])
    desc = {
        "version": CACHE_VERSION,
        "tile": TILE_SIZE,
        "stride": TRAIN_STRIDE,
        "min_visible": MIN_VISIBLE_FRACTION,
        "labels": LABEL_TO_CATEGORY,
        "root": os.path.abspath(root),
        "sources": [asdict(s) for s in sources],
        "files": files,
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _load_image(path: str, src: NeonSource) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image not found: {path} (annotations: {src.annotations})")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[:2] != (src.height, src.width):
        raise ValueError(
            f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {src.width}x{src.height}"
        )
    return arr


def _coco_dict(records: List[dict]) -> dict:
    images, annotations = [], []
    for r in records:
        images.append(
            {
                "id": r["image_id"],
                "file_name": r["file_name"],
                "width": r["width"],
                "height": r["height"],
            }
        )
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO annotation ids must not be 0
                    "image_id": r["image_id"],
                    "category_id": COCO_CATEGORY_ID,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "NEON tree crowns (deepforest sample data), d2detr tiling"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": COCO_CATEGORY_ID, "name": CLASS_NAMES[0]}],
    }


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _build(root: str, out_dir: str, sources: Sequence[NeonSource]) -> dict:
    """Write tiles, per-split dicts, COCO jsons and finally ``index.json`` into out_dir."""
    from PIL import Image

    per_source = {}
    for src in sources:  # validate everything before writing anything
        ann_path = os.path.join(root, src.annotations)
        img_path = os.path.join(root, src.image)
        if not os.path.isfile(img_path):
            raise FileNotFoundError(f"Image not found: {img_path} (annotations: {ann_path})")
        boxes, labels = read_box_annotations(ann_path, src.image, src.width, src.height)
        per_source[src.image] = (boxes, labels)

    files: Dict[str, int] = {}
    counts = {}
    image_id = 0
    pixels: Dict[str, np.ndarray] = {}
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        records = []
        for src, tile in plan_tiles(split, sources):
            if src.image not in pixels:
                pixels[src.image] = _load_image(os.path.join(root, src.image), src)
            x0, y0, x1, y1 = tile
            rel = f"{split}/{_stem(src.image)}_x{x0}_y{y0}.png"
            # Aerial imagery barely compresses (-8 %); storing is 2x faster to write and read.
            Image.fromarray(pixels[src.image][y0:y1, x0:x1]).save(
                os.path.join(out_dir, rel), compress_level=0
            )
            files[rel] = os.path.getsize(os.path.join(out_dir, rel))
            boxes, labels = per_source[src.image]
            tile_boxes, keep = crop_boxes(boxes, tile)
            owned = _owner_split(boxes, src)[keep] == split  # a crown never in both splits
            tile_boxes, keep = tile_boxes[owned], keep[owned]
            image_id += 1
            records.append(
                {
                    "file_name": rel,
                    "image_id": image_id,
                    "height": y1 - y0,
                    "width": x1 - x0,
                    "source_image": src.image,
                    "crop_box": [x0, y0, x1, y1],
                    "annotations": [
                        {
                            "bbox": [float(v) for v in b],
                            "bbox_mode": 0,  # BoxMode.XYXY_ABS
                            "category_id": LABEL_TO_CATEGORY[labels[i].lower()],
                            "iscrowd": 0,
                            "tree_id": int(i),  # index of the crown in its source annotation file
                        }
                        for b, i in zip(tile_boxes, keep)
                    ],
                }
            )
        _write_json(os.path.join(out_dir, f"{split}.json"), records)
        _write_json(os.path.join(out_dir, f"{split}_coco.json"), _coco_dict(records))
        trees = {(r["source_image"], a["tree_id"]) for r in records for a in r["annotations"]}
        counts[split] = {
            "images": len(records),
            "boxes": sum(len(r["annotations"]) for r in records),
            "trees": len(trees),
            "empty_images": sum(1 for r in records if not r["annotations"]),
        }
        for name in (f"{split}.json", f"{split}_coco.json"):
            files[name] = os.path.getsize(os.path.join(out_dir, name))
    index = {
        "version": CACHE_VERSION,
        "root": os.path.abspath(root),
        "counts": counts,
        "files": files,
    }
    _write_json(os.path.join(out_dir, "index.json"), index)  # written last: marks completion
    return index


def _valid_cache(path: str) -> bool:
    try:
        with open(os.path.join(path, "index.json")) as f:
            index = json.load(f)
        if index.get("version") != CACHE_VERSION:
            return False
        return all(
            os.path.getsize(os.path.join(path, rel)) == size for rel, size in index["files"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def prepare_neon_trees(
    root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    sources: Sequence[NeonSource] = SOURCES,
) -> str:
    """Build (once) the tiles and annotation files of both splits and return their folder.

    The folder ``<cache_dir>/v<version>-<key>`` is keyed on the tiling parameters, the
    split and the source files (name, size, mtime), so a change rebuilds it. It is built
    in a temporary sibling folder and renamed into place, so concurrent processes (DDP
    ranks, dataloader workers) never see a half-written cache; a damaged one (missing or
    truncated files) is rebuilt.
    """
    root = locate_deepforest_data() if root is None else os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"NEON tree-crown data folder not found: {root}")
    cache_dir = default_cache_dir() if cache_dir is None else os.path.expanduser(cache_dir)
    final = os.path.join(cache_dir, f"v{CACHE_VERSION}-{_cache_key(root, sources)}")
    if _valid_cache(final):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        logger.info("Tiling the NEON tree-crown images from %s into %s", root, final)
        _build(root, tmp, sources)
        if os.path.exists(final) and not _valid_cache(final):
            trash = os.path.join(cache_dir, f".trash-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass  # another process replaced it meanwhile
        try:
            os.rename(tmp, final)
        except OSError:
            if not _valid_cache(final):  # lost a race to a process that left nothing valid
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- Detectron2


def _load(split: str, root: Optional[str], cache_dir: Optional[str]) -> Tuple[str, List[dict]]:
    from detectron2.structures import BoxMode

    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    folder = prepare_neon_trees(root, cache_dir)
    with open(os.path.join(folder, f"{split}.json")) as f:
        records = json.load(f)
    for r in records:
        r["file_name"] = os.path.join(folder, r["file_name"])
        for a in r["annotations"]:
            a["bbox_mode"] = BoxMode(a["bbox_mode"])
    return folder, records


def load_neon_trees(
    split: str, root: Optional[str] = None, cache_dir: Optional[str] = None
) -> List[dict]:
    """Detectron2 dataset dicts of one split (tiles built on first use).

    Each dict: ``file_name`` (absolute path of a tile PNG), ``image_id`` (int, unique over
    both splits), ``height``, ``width``, ``source_image``, ``crop_box`` (the tile's XYXY
    box in the source image) and ``annotations``: ``bbox`` (XYXY_ABS in the tile),
    ``bbox_mode``, ``category_id`` 0, ``iscrowd`` 0 and ``tree_id`` (the crown's index in
    its source annotation file; a crown cut by tile edges appears in several tiles)."""
    return _load(split, root, cache_dir)[1]


def _load_registered(name: str, split: str, root: Optional[str], cache_dir: Optional[str]):
    from detectron2.data import MetadataCatalog

    folder, records = _load(split, root, cache_dir)
    # The COCO json exists only once the tiles are built: point the metadata at it now.
    # A COCOEvaluator built before this converts the dicts itself (same content).
    json_file = os.path.join(folder, f"{split}_coco.json")
    meta = MetadataCatalog.get(name)
    if getattr(meta, "json_file", None) != json_file:
        meta.__dict__["json_file"] = json_file  # Metadata.set refuses to change a value
    return records


def register_neon_trees(
    root: Optional[str] = None, cache_dir: Optional[str] = None, prefix: str = "neon_trees"
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` (replacing earlier registrations
    of those names). Lazy: nothing is read until ``DatasetCatalog.get``. ``root`` defaults
    to deepforest's data folder, ``cache_dir`` to :func:`default_cache_dir`."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, functools.partial(_load_registered, name, split, root, cache_dir)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(CLASS_NAMES),
            thing_colors=[(30, 200, 30)],
            thing_dataset_id_to_contiguous_id={COCO_CATEGORY_ID: 0},
            evaluator_type="coco",
            split=split,
        )
        names.append(name)
    return names
