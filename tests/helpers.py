"""Helpers shared by the test files (pytest puts ``tests/`` on ``sys.path``:
``from helpers import synthetic_batch``).

- tiny models from a LazyConfig file with dotted overrides (:func:`build_model`),
- a tiny synthetic detection batch (:func:`synthetic_batch`),
- one-step training / inference / tracing checks of a ``DETRBase`` detector,
- Hugging Face parity: re-drawn HF weights (:func:`randomize_hf_weights`), a padded input
  pair (:func:`padded_hf_inputs`) and the output comparison (:func:`assert_hf_parity`).
"""
import os
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_KEYS = ("loss_class", "loss_bbox", "loss_giou")
#: Tiny single-scale models (DETR, Conditional DETR, DAB-DETR): ResNet-18, width 64, 2 encoder and
#: 3 decoder layers, 3 classes (add ``model.num_queries``).
TINY_SINGLE_SCALE = {
    "model.backbone.depth": 18,
    "model.num_classes": 3,
    "model.position_embedding.num_pos_feats": 32,
    "model.transformer.d_model": 64,
    "model.transformer.nhead": 4,
    "model.transformer.num_encoder_layers": 2,
    "model.transformer.num_decoder_layers": 3,
    "model.transformer.dim_feedforward": 128,
}


# ------------------------------------------------------------------ models and data
def build_model(cfg_file: str, overrides: Optional[Dict] = None, seed: Optional[int] = None):
    """``instantiate(cfg.model)`` of ``cfg_file`` with dotted ``overrides`` (as on the
    ``train_net.py`` command line); ``seed`` seeds torch first."""
    from d2detr.checkpoint import apply_overrides

    cfg = LazyConfig.load(cfg_file)
    apply_overrides(cfg, overrides or {})
    if seed is not None:
        torch.manual_seed(seed)
    return instantiate(cfg.model)


def synthetic_batch(n: int = 2, size: int = 64) -> List[Dict]:
    """Images with one or two bright rectangles and their boxes (class = index mod 3),
    in Detectron2's ``batched_inputs`` format (uint8 RGB, ``Instances``)."""
    g = torch.Generator().manual_seed(0)
    out = []
    boxes_per_image = [[[8, 10, 40, 50]], [[30, 4, 60, 30], [4, 36, 28, 60]]]
    for i in range(n):
        img = torch.randint(0, 60, (3, size, size), generator=g).to(torch.uint8)
        boxes = torch.tensor(boxes_per_image[i % 2], dtype=torch.float32)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            img[j % 3, y0:y1, x0:x1] = 220
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.arange(len(boxes)) % 3
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


def with_original_sizes(batch: List[Dict], originals: Sequence[Tuple[int, int]]) -> List[Dict]:
    """Inference inputs: drops ``instances`` and asks for outputs at ``originals`` (h, w)."""
    for x, (h, w) in zip(batch, originals):
        del x["instances"]
        x["height"], x["width"] = h, w
    return batch


# ------------------------------------------------------------------ one-step checks
def expected_loss_keys(num_aux: int, enc: bool = False) -> set:
    """The criterion's keys: the last layer's, ``_0 .. _{num_aux-1}`` and (two-stage) ``_enc``."""
    keys = set(LOSS_KEYS) | {f"{k}_{i}" for k in LOSS_KEYS for i in range(num_aux)}
    if enc:
        keys |= {f"{k}_enc" for k in LOSS_KEYS}
    return keys


def training_step(model, batch: List[Dict], expected: Iterable[str]) -> Dict[str, torch.Tensor]:
    """``model.train()(batch)`` gives exactly the ``expected`` loss keys, each a finite
    scalar; back-propagates their sum and returns the losses."""
    model.train()
    losses = model(batch)
    assert set(losses) == set(expected)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    return losses


def assert_overfits(model, batch: List[Dict], steps: int) -> None:
    """``steps`` AdamW steps (lr 1e-3, weight decay 1e-4, gradient norm clipped at 0.1) on
    ``batch`` at least halve the total loss (mean of the first 5 steps vs. the last 5)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(steps):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def assert_losses_weighted(model, batch: List[Dict], expected: Iterable[str], weights: Dict[str, float],
                           **criterion_kwargs) -> None:
    """The model's criterion returns ``weights[base key] *`` the loss of the same criterion
    with unit weights (``SetCriterion(**criterion_kwargs)``) on the eval-mode outputs."""
    from d2detr.modeling.criterion import SetCriterion

    model.eval()
    images, masks = model.preprocess_image(batch)
    targets = model.prepare_targets([x["instances"] for x in batch])
    with torch.no_grad():
        outputs = model.forward_features(images, masks)
        weighted = model.criterion(outputs, targets)
        unit = SetCriterion(num_classes=3, matcher=model.criterion.matcher,
                            weight_dict={k: 1.0 for k in LOSS_KEYS}, **criterion_kwargs)(outputs, targets)
    for k in expected:
        w = weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k]
        torch.testing.assert_close(weighted[k], w * unit[k])


def assert_trace_matches_eager(model) -> None:
    """``torch.jit.trace`` of ``ExportableDetector(model)`` on one synthetic image gives the
    eager wrapper's boxes and scores on another image size."""
    from d2detr.export.wrapper import ExportableDetector

    img = synthetic_batch()[0]["image"]
    wrapper = ExportableDetector(model.eval())
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (img,), check_trace=False)
        img2 = synthetic_batch()[1]["image"][:, :48, :56]
        tb, ts, _ = traced(img2)
        eb, es, _ = wrapper(img2)
    torch.testing.assert_close(tb, eb, atol=1e-4, rtol=0)
    torch.testing.assert_close(ts, es, atol=1e-5, rtol=0)


def assert_torch_export_matches(model, tmp_path, img: torch.Tensor, min_size: int) -> None:
    """``torch.export`` of ``model`` (dynamic height/width from ``min_size``) on ``img``, saved
    and loaded again, gives the eager ``ExportableDetector``'s outputs on an 80x120 image.
    Skips where the native deformable op is unavailable."""
    api = pytest.importorskip("d2detr.export.api")
    from d2detr.export.wrapper import ExportableDetector

    model = model.eval()
    try:
        api.check_native_op(model)
    except Exception as e:  # deformable models need the compiled d2detr._C op
        pytest.skip(f"native op unavailable: {e}")
    api.export_torch_export(model, img, str(tmp_path / "m.pt2"), min_size=min_size, max_size=512)
    exported = api.load_exported(str(tmp_path / "m.pt2"))
    img2 = torch.randint(0, 255, (3, 80, 120), dtype=torch.uint8)
    with torch.no_grad():
        got = exported(img2)
        ref = ExportableDetector(model)(img2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ Hugging Face parity
def run_convert_checkpoint(src, out, model_cfg: str) -> Tuple[str, Dict]:
    """``tools/convert_checkpoint.py src out --config-file model_cfg`` in a fresh process;
    asserts success and returns ``(stdout, the saved checkpoint)``."""
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/convert_checkpoint.py"), str(src), str(out),
         "--config-file", model_cfg],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, torch.load(out, map_location="cpu", weights_only=True)


def randomize_hf_weights(model: torch.nn.Module, seed: int = 0, embedding_key: str = "embeddings") -> None:
    """Redraws every parameter and the frozen-BN statistics (HF initialises many to 0/1 or
    identical values), so a swapped or dropped tensor cannot go unnoticed: 1-D parameters
    get N(0, 0.1) added, 2-D ones are redrawn (std 1 for names containing ``embedding_key``,
    the query embeddings; fan-in scaled otherwise)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, scale):
        return torch.randn(t.shape, generator=g) * scale

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(rnd(p, 0.1))
            elif p.dim() == 2:  # linear layers (fan-in scaled) and the query embeddings
                p.copy_(rnd(p, 1.0 if embedding_key in name else p.shape[1] ** -0.5))
        for name, m in model.named_modules():
            if type(m).__name__.endswith("FrozenBatchNorm2d"):
                m.weight.copy_(1 + rnd(m.weight, 0.2))
                m.bias.copy_(rnd(m.bias, 0.1))
                m.running_mean.copy_(rnd(m.running_mean, 0.1))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def padded_hf_inputs() -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [2,3,64,96], pixel_mask [2,64,96] long)``: the second image is 48x64
    padded to 64x96 (zeros in the padding)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, 48:, :] = 0
    pixel_mask[1, :, 64:] = 0
    return x * pixel_mask[:, None], pixel_mask


def assert_hf_parity(hf, ours, x, pixel_mask, atol: float = 1e-4, box_spread: Optional[slice] = None) -> Dict:
    """Our ``forward_features`` gives HF's logits and boxes (``atol``) on the same normalised
    images; the queries must disagree (logits spread, and boxes' ``[..., box_spread]`` when
    given) for the comparison to mean anything. Returns our outputs."""
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=pixel_mask)
        out = ours.forward_features(x, pixel_mask == 0)
    assert out["pred_logits"].shape == ref.logits.shape
    assert out["pred_boxes"].shape == ref.pred_boxes.shape
    torch.testing.assert_close(out["pred_logits"], ref.logits, atol=atol, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, atol=atol, rtol=0)
    assert ref.logits.std(dim=1).min() > 1e-3
    if box_spread is not None:
        assert ref.pred_boxes[..., box_spread].std(dim=1).min() > 1e-3
    return out
