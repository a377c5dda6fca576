import numpy as np
import pytest
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from d2detr.data import (
    DETR_TRAIN_SCALES,
    DetrDatasetMapper,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
    build_detr_train_crop_augmentation,
)


def _write(tmp_path, name, mode, h=120, w=160, rect=None):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 2] = 60  # a distinct blue channel to check RGB/BGR order
    if rect is not None:
        x0, y0, x1, y1 = rect
        arr[y0:y1, x0:x1] = 255
    img = Image.fromarray(arr).convert(mode)
    path = str(tmp_path / f"{name}.png")
    img.save(path)
    return path


def _dict(path, boxes, h=120, w=160):
    return {
        "file_name": path,
        "height": h,
        "width": w,
        "image_id": 0,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": i % 3, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
    }


def _small_mapper(**kw):
    return DetrDatasetMapper(
        is_train=True,
        augmentation=build_detr_train_augmentation(min_sizes=(64, 80, 96), max_size=160),
        augmentation_with_crop=build_detr_train_crop_augmentation(
            min_sizes=(64, 80, 96), max_size=160, crop_resize_sizes=(80, 100), crop_size=(40, 70)
        ),
        **kw,
    )


def test_default_augmentations_are_the_official_ones():
    assert DETR_TRAIN_SCALES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    aug = build_detr_train_augmentation()
    assert isinstance(aug[0], T.RandomFlip) and aug[1].short_edge_length == DETR_TRAIN_SCALES
    assert aug[1].max_size == 1333 and aug[1].is_range is False
    crop = build_detr_train_crop_augmentation()
    assert crop[1].short_edge_length == (400, 500, 600)
    assert crop[2].crop_type == "absolute_range" and tuple(crop[2].crop_size) == (384, 600)
    assert crop[3].short_edge_length == DETR_TRAIN_SCALES and crop[3].max_size == 1333
    test = build_detr_test_augmentation()
    assert test[0].short_edge_length == (800, 800) and test[0].max_size == 1333


def test_boxes_stay_inside_and_follow_the_image(tmp_path):
    np.random.seed(0)
    rect = (50, 30, 110, 90)  # white square in the image
    path = _write(tmp_path, "rgb", "RGB", rect=rect)
    # the square, one box partly outside the image, one box in a corner likely to be cropped away
    d = _dict(path, [rect, (-10, -5, 30, 40), (150, 110, 160, 120)])
    mapper = _small_mapper(image_format="RGB")
    seen_dropped = False
    for _ in range(40):
        out = mapper(d)
        img = out["image"]
        assert img.shape[0] == 3
        H, W = img.shape[1:]
        inst = out["instances"]
        assert inst.image_size == (H, W)
        b = inst.gt_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
        assert (inst.gt_boxes.area() > 0).all()
        seen_dropped |= len(inst) < 3
        # the square's box (class 0) encloses the white pixels the crop kept
        white = (img.float().mean(0) > 200).nonzero()
        if (inst.gt_classes == 0).any() and len(white):
            x0, y0, x1, y1 = b[inst.gt_classes == 0][0].tolist()
            assert white[:, 1].min() >= x0 - 2 and white[:, 1].max() <= x1 + 1
            assert white[:, 0].min() >= y0 - 2 and white[:, 0].max() <= y1 + 1
    assert seen_dropped  # crops remove boxes, and that is handled


def test_empty_images_survive(tmp_path):
    path = _write(tmp_path, "empty", "RGB")
    out = _small_mapper()(_dict(path, []))
    assert len(out["instances"]) == 0 and out["instances"].gt_boxes.tensor.shape == (0, 4)
    # crowd-only also gives an empty (but present) target
    d = _dict(path, [(10, 10, 50, 50)])
    d["annotations"][0]["iscrowd"] = 1
    assert len(_small_mapper()(d)["instances"]) == 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_grayscale_and_rgba_become_three_channels(tmp_path, mode, fmt):
    path = _write(tmp_path, mode, mode)
    out = DetrDatasetMapper(False, build_detr_test_augmentation(64, 200), image_format=fmt)(_dict(path, [(1, 1, 9, 9)]))
    assert out["image"].shape == (3, 64, 85)
    assert "annotations" not in out and "instances" not in out
    if mode == "RGBA":  # the colour is kept, in the requested order
        blue = out["image"][2 if fmt == "RGB" else 0]
        assert abs(float(blue.float().mean()) - 60) < 2


def test_rgb_vs_bgr_order(tmp_path):
    path = _write(tmp_path, "c", "RGB")
    rgb = DetrDatasetMapper(False, [], image_format="RGB")(_dict(path, []))["image"]
    bgr = DetrDatasetMapper(False, [], image_format="BGR")(_dict(path, []))["image"]
    assert (rgb.flip(0) == bgr).all() and int(rgb[2, 0, 0]) == 60


def test_flip_mirrors_boxes(tmp_path):
    path = _write(tmp_path, "f", "RGB")
    m = DetrDatasetMapper(True, [T.RandomFlip(prob=1.0)])
    out = m(_dict(path, [(10, 20, 40, 60)]))
    assert out["instances"].gt_boxes.tensor.tolist() == [[120.0, 20.0, 150.0, 60.0]]


def test_to_three_channels():
    from d2detr.data import to_three_channels

    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert (to_three_channels(g) == g[..., None]).all() and to_three_channels(g).shape == (2, 3, 3)
    assert to_three_channels(g[..., None]).shape == (2, 3, 3)
    rgba = np.random.randint(0, 255, (2, 3, 4), dtype=np.uint8)
    assert (to_three_channels(rgba) == rgba[..., :3]).all()
    with pytest.raises(ValueError):
        to_three_channels(np.zeros((2, 3, 5)))


# ------------------------------------------------------------------ exact quarter turns
def _marked(h, w, rect):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = rect
    img[y0:y1, x0:x1] = 255
    return img


def _pixel_box(img):
    """The box of the non-zero pixels (pixel edges, XYXY): the reference a box transform must match."""
    ys, xs = np.nonzero(img[..., 0])
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("k", [0, 1, 2, 3, -1, 5])
def test_rot90_moves_boxes_with_the_pixels(k):
    from d2detr.data import Rot90Transform

    h, w, rect = 7, 11, (2, 1, 6, 3)  # not square and off-centre, so a wrong turn shows
    img = _marked(h, w, rect)
    t = Rot90Transform(h, w, k)
    out = t.apply_image(img)
    assert out.shape == ((w, h, 3) if k % 2 else (h, w, 3)) and out.flags["C_CONTIGUOUS"]
    assert (out == np.rot90(img, k % 4)).all()  # counter-clockwise, as np.rot90
    assert t.apply_box(np.array([rect], dtype=np.float64)).tolist() == [_pixel_box(out)]
    back = t.inverse()
    assert (back.apply_image(out) == img).all()
    assert back.apply_box(t.apply_box(np.array([rect], dtype=np.float64))).tolist() == [list(rect)]


def test_rot90_in_the_mapper_keeps_the_box_on_its_object(tmp_path):
    from d2detr.data import RandomRot90

    np.random.seed(0)
    rect = (20, 10, 60, 30)
    path = _write(tmp_path, "r", "RGB", h=50, w=80, rect=rect)
    mapper = DetrDatasetMapper(True, [RandomRot90(), T.RandomFlip(prob=0.5)], image_format="RGB")
    sizes = set()
    for _ in range(24):
        out = mapper(_dict(path, [rect], h=50, w=80))
        img = out["image"].permute(1, 2, 0).numpy()
        sizes.add(img.shape[:2])
        assert out["instances"].image_size == img.shape[:2]
        white = (img.mean(2) > 200).astype(np.uint8)[..., None]
        assert out["instances"].gt_boxes.tensor.tolist() == [_pixel_box(white)]
    assert sizes == {(50, 80), (80, 50)}  # both orientations were drawn


def test_rot90_rejects_bad_arguments():
    from d2detr.data import RandomRot90, Rot90Transform

    with pytest.raises(ValueError, match="integer"):
        Rot90Transform(4, 5, 1.5)
    with pytest.raises(ValueError, match="positive"):
        Rot90Transform(0, 5, 1)
    with pytest.raises(ValueError, match="4x5"):
        Rot90Transform(4, 5, 1).apply_image(np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="quarter_turns"):
        RandomRot90(quarter_turns=())
    with pytest.raises(ValueError, match="quarter_turns"):
        RandomRot90(quarter_turns=(0, 0.5))
    assert isinstance(RandomRot90(quarter_turns=(4,)).get_transform(np.zeros((3, 3, 3))), T.NoOpTransform)
