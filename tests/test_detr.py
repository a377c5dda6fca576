"""DETR (projects/detr): size of the paper's model, losses, training, inference."""
import os

import pytest
import torch

from helpers import (TINY_SINGLE_SCALE, assert_losses_weighted, assert_overfits, build_model,
                     expected_loss_keys, synthetic_batch, training_step, with_original_sizes)

from d2detr.modeling.transformer import DetrTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CFG = os.path.join(ROOT, "projects/detr/configs/models/detr_r50.py")
TINY = {**TINY_SINGLE_SCALE, "model.num_queries": 10}


def build(overrides=None, **kwargs):
    return build_model(MODEL_CFG, {**(overrides or {}), **kwargs})


def tiny_detr(**kwargs):
    torch.manual_seed(0)
    return build({**TINY, **kwargs})


def test_detr_r50_has_the_papers_41m_parameters():
    """The paper's DETR R50 (91 COCO ids) has 41M parameters: exactly the
    41,302,368 trainable ones the official code prints (stem/res2 frozen)."""
    model = build({"model.num_classes": 91})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(trainable / 1e6 - 41.0) <= 0.5
    assert trainable == 41_302_368
    t = model.transformer
    assert isinstance(t, DetrTransformer) and t.d_model == 256 and t.nhead == 8
    assert len(t.encoder.layers) == 6 and len(t.decoder.layers) == 6
    assert not t.encoder.layers[0].normalize_before and t.encoder.norm is None
    assert t.decoder.layers[0].linear1.out_features == 2048
    assert model.query_embed.weight.shape == (100, 256)
    assert model.class_embed.out_features == 92
    assert model.input_proj.in_channels == 2048
    assert model.backbone.stem.conv1.weight.requires_grad is False
    assert model.backbone.res3[0].conv1.weight.requires_grad is True
    assert model.criterion.eos_coef == 0.1
    assert model.criterion.weight_dict == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    m = model.criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (1.0, 5.0, 2.0)


def test_training_step_gives_finite_weighted_losses_with_aux_keys():
    model = tiny_detr()
    batch = synthetic_batch()
    expected = expected_loss_keys(num_aux=2)  # 3 decoder layers -> 2 aux sets
    training_step(model, batch, expected)
    assert model.class_embed.weight.grad is not None and model.class_embed.weight.grad.abs().sum() > 0
    assert model.query_embed.weight.grad.abs().sum() > 0
    assert model.backbone.res5[0].conv1.weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv1.weight.grad is None  # frozen

    # the losses are weighted: same outputs through a criterion with unit weights
    assert_losses_weighted(model, batch, expected, {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
                           eos_coef=0.1)


def test_aux_outputs_follow_aux_loss_flag():
    model = tiny_detr(**{"model.aux_loss": False}).eval()
    batch = synthetic_batch()
    images, masks = model.preprocess_image(batch)
    out = model.forward_features(images, masks)
    assert out["aux_outputs"] == []
    assert out["pred_logits"].shape == (2, 10, 4) and out["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from threads, and lose a lot when the 2 CPU cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_overfits_two_images(one_thread):
    # backbone frozen for speed: the transformer, projections and heads must learn the boxes
    model = tiny_detr(**{"model.transformer.dropout": 0.0, "model.backbone.freeze_at": 5})
    assert_overfits(model, synthetic_batch(), steps=60)


def test_inference_returns_instances_in_original_image_size():
    model = tiny_detr().eval()
    batch = synthetic_batch()
    # the network saw 64x64 inputs; the originals were 128x96 and 80x200
    originals = [(128, 96), (80, 200)]
    with_original_sizes(batch, originals)
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 2
    for res, (h, w) in zip(results, originals):
        inst = res["instances"]
        assert inst.image_size == (h, w)
        assert len(inst) == 10  # one detection per query
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()


def test_transformer_ignores_padded_positions():
    """The key-padding mask and the masked sine positions make the decoder output
    independent of what lies in the padding (the backbone's border effects aside)."""
    model = tiny_detr().eval()
    torch.manual_seed(0)
    src = torch.randn(1, 64, 3, 4)
    padded = torch.randn(1, 64, 5, 7)
    padded[..., :3, :4] = src
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    pmask = torch.ones(1, 5, 7, dtype=torch.bool)
    pmask[:, :3, :4] = False
    q = model.query_embed.weight
    with torch.no_grad():
        hs, mem = model.transformer(src, mask, q, model.position_embedding(mask))
        hs_p, mem_p = model.transformer(padded, pmask, q, model.position_embedding(pmask))
    assert hs.shape == (3, 1, 10, 64)  # every decoder layer, normalised
    torch.testing.assert_close(hs_p, hs, atol=1e-5, rtol=0)
    torch.testing.assert_close(mem_p[..., :3, :4], mem, atol=1e-5, rtol=0)
