"""H-DETR's hybrid branch (d2detr/modeling/hybrid_matching.py) on DINO: the self-attention mask,
the one-to-many targets and losses, and that the one-to-one queries -- the model used at
inference -- are exactly what they would be without the branch."""
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from d2detr.layers import native_ms_deform_attn_available
from d2detr.modeling.denoising import denoising_attn_mask
from d2detr.modeling.hybrid_matching import hybrid_attn_mask, repeat_targets
from helpers import synthetic_batch
from tiny_configs import write_tiny_config


def test_mask_blocks_the_two_branches_from_each_other():
    mask = hybrid_attn_mask(num_one2one=2, num_one2many=3)
    expected = torch.tensor([[0, 0, 1, 1, 1],
                             [0, 0, 1, 1, 1],
                             [1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert hybrid_attn_mask(2, 0) is None


def test_mask_keeps_denoising_groups_and_hides_the_one2many_queries_from_them():
    # 2 groups of (1 positive + 1 negative) denoising queries, 2 one-to-one, 2 one-to-many
    dn = denoising_attn_mask(num_groups=2, max_gt=1, num_matching=4)
    mask = hybrid_attn_mask(2, 2, num_denoising=4, denoising_mask=dn)
    p, q = 4, 2
    assert torch.equal(mask[:p, :p], dn[:p, :p])  # groups see only themselves
    assert not mask[:p, p:p + q].any()  # denoising queries see the one-to-one queries, as in DINO
    assert mask[:p, p + q:].all() and mask[p + q:, :p].all()  # ... but not the one-to-many ones
    assert mask[p:p + q, :p].all()  # matching queries never see the denoising ones
    assert mask[p:p + q, p + q:].all() and mask[p + q:, p:p + q].all()
    assert not mask[p + q:, p + q:].any() and not mask[p:p + q, p:p + q].any()
    with pytest.raises(ValueError, match="denoising mask of shape"):
        hybrid_attn_mask(2, 3, num_denoising=4, denoising_mask=dn)


def test_repeat_targets():
    t = {"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4), "image_size": torch.tensor([5.0, 6.0])}
    (r,) = repeat_targets([t], 3)
    assert r["labels"].tolist() == [0, 2, 0, 2, 0, 2]
    assert torch.equal(r["boxes"], t["boxes"].repeat(3, 1)) and r["image_size"] is t["image_size"]
    with pytest.raises(ValueError, match=">= 1"):
        repeat_targets([t], 0)


def _dino(tmp_path, one2many: int, repeat: int = 2):
    cfg = LazyConfig.load(write_tiny_config(tmp_path, "dino"))
    cfg.model.transformer.num_one2many_queries = one2many
    cfg.model.criterion.one2many_repeat = repeat
    torch.manual_seed(0)
    return instantiate(cfg.model)


@pytest.mark.skipif(not native_ms_deform_attn_available("cpu"), reason="d2detr._C not built")
def test_one2one_queries_are_unchanged_by_the_hybrid_branch(tmp_path):
    """Same weights with and without 6 one-to-many queries: in training the one-to-one outputs,
    the denoising outputs and their losses are identical (the branches cannot see each other),
    the one-to-many outputs have their own losses on every layer; in eval the two models give the
    same detections. A one-to-many query's outputs depend on the other one-to-many queries only."""
    plain, hybrid = _dino(tmp_path, 0), _dino(tmp_path, 6)
    missing, unexpected = plain.load_state_dict(hybrid.state_dict(), strict=False)
    assert missing == [] and unexpected == ["transformer.tgt_embed_one2many.weight"]
    batch = synthetic_batch(2, 64)
    outputs = {}
    for name, model in (("plain", plain), ("hybrid", hybrid)):
        model.train()
        images, masks = model.preprocess_image(batch)
        targets = model.prepare_targets([x["instances"] for x in batch])
        torch.manual_seed(1)  # the same denoising noise for both
        outputs[name] = (model.forward_features(images, masks, targets=targets), targets)
    (p_out, targets), (h_out, _) = outputs["plain"], outputs["hybrid"]
    q = hybrid.num_queries
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(h_out[key], p_out[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_out["dn_outputs"][key], p_out["dn_outputs"][key], rtol=1e-5, atol=1e-5)
    assert h_out["pred_logits"].shape[1] == q
    many = h_out["one2many_outputs"]
    assert many["pred_logits"].shape[1] == 6 and len(many["aux_outputs"]) == len(h_out["aux_outputs"])
    assert "one2many_outputs" not in p_out
    p_losses = plain.criterion(p_out, targets)
    h_losses = hybrid.criterion(h_out, targets)
    extra = sorted(set(h_losses) - set(p_losses))
    assert extra == sorted(f"{k}_one2many{s}" for k in ("loss_class", "loss_bbox", "loss_giou")
                           for s in [""] + [f"_{i}" for i in range(len(many["aux_outputs"]))])
    for k, v in p_losses.items():
        torch.testing.assert_close(h_losses[k], v, rtol=1e-5, atol=1e-6)
    sum(h_losses.values()).backward()
    assert hybrid.transformer.tgt_embed_one2many.weight.grad.abs().sum() > 0
    plain.eval(), hybrid.eval()
    with torch.no_grad():
        a, b = plain(batch), hybrid(batch)
    for x, y in zip(a, b):
        torch.testing.assert_close(y["instances"].pred_boxes.tensor, x["instances"].pred_boxes.tensor)
        torch.testing.assert_close(y["instances"].scores, x["instances"].scores)


def test_one2many_losses_match_each_object_repeat_times(tmp_path):
    """With K = 3 every object is assigned 3 one-to-many queries (6 queries, 2 objects)."""
    model = _dino(tmp_path, 6, repeat=3)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    outputs = {"pred_logits": torch.randn(1, 6, model.num_classes), "pred_boxes": torch.rand(1, 6, 4) * 0.5 + 0.25}
    (rows, cols), = model.criterion.matcher(outputs, repeat_targets(targets, 3))
    assert len(rows) == 6 and sorted((cols % 2).tolist()) == [0, 0, 0, 1, 1, 1]


def test_hybrid_branch_without_a_repeat_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs criterion.one2many_repeat >= 1"):
        _dino(tmp_path, 6, repeat=0)
    with pytest.raises(ValueError, match="num_one2many_queries must be >= 0"):
        _dino(tmp_path, -1)


def test_one2many_loss_with_one_repeat_is_the_one2one_loss(tmp_path):
    """K = 1 on outputs equal to the one-to-one ones gives exactly the one-to-one losses (same
    weights, same normalisation); K = 2 on duplicated outputs too (2n boxes over 2n targets)."""
    from d2detr.modeling.criterion import SetCriterion
    from d2detr.modeling.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(2, 8, 3, generator=g), "pred_boxes": torch.rand(2, 8, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.2, 0.3]])}]
    weights = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    for repeat, many in ((1, dict(out)), (2, {k: torch.cat([v, v], 1) for k, v in out.items()})):
        criterion = SetCriterion(3, HungarianMatcher(2.0, 5.0, 2.0, use_focal=True), weights, use_focal=True,
                                 one2many_repeat=repeat)
        losses = criterion(dict(out, one2many_outputs=many), targets)
        for k in weights:
            torch.testing.assert_close(losses[f"{k}_one2many"], losses[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one2many_repeat >= 1"):
        SetCriterion(3, HungarianMatcher(use_focal=True), weights, use_focal=True)(dict(out, one2many_outputs=out), targets)


def test_matching_with_a_repeat_is_matching_the_repeated_targets():
    """``matcher(outputs, targets, repeat=k)`` (costs computed once per target) assigns exactly what
    matching against ``repeat_targets(targets, k)`` does, an image without targets included."""
    from d2detr.modeling.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(3, 20, 2, generator=g), "pred_boxes": torch.rand(3, 20, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": torch.rand(3, 4, generator=g) * 0.4 + 0.3},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([1, 0]), "boxes": torch.rand(2, 4, generator=g) * 0.4 + 0.3}]
    matcher = HungarianMatcher(2.0, 5.0, 2.0, use_focal=True)
    for (rows, cols), (ref_rows, ref_cols) in zip(matcher(outputs, targets, repeat=4),
                                                  matcher(outputs, repeat_targets(targets, 4))):
        assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    assert [len(r) for r, _ in matcher(outputs, targets, repeat=4)] == [12, 0, 8]
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        matcher(outputs, targets, repeat=0)
