"""The COCO configs of AdaMixer, RNNDet and DEQDet load and carry the official recipes (mmdet's
epochs over 117,266 images at batch 16, steps, warm-up, AdamW settings, per-parameter factors)."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS_PER_EPOCH = -(-117266 // 16)
# name: (queries, epochs, lr drops (epochs), backbone depth, weight decay, decoder factors, multi-scale + crop)
CONFIGS = {
    "adamixer/configs/adamixer_r50_12ep": (100, 12, (8, 11), 50, 1e-4, None, False),
    "adamixer/configs/adamixer_r50_36ep": (300, 36, (24, 33), 50, 1e-4, None, True),
    "adamixer/configs/adamixer_r101_36ep": (300, 36, (24, 33), 101, 1e-4, None, True),
    "adamixer/configs/adamixer_r101_12ep": (100, 12, (8, 11), 101, 1e-4, None, False),
    "deqdet/configs/deqdet_r50_12ep": (100, 12, (8, 11), 50, 0.01, (4.0, 10.0), False),
    "deqdet/configs/deqdet_r50_24ep": (300, 24, (16, 22), 50, 0.01, (4.0, 10.0), True),
    "deqdet/configs/deqdet_r101_24ep": (300, 24, (16, 22), 101, 0.01, (4.0, 10.0), True),
    "rnndet/configs/rnndet_r50_nf6_12ep": (100, 12, (8, 11), 50, 0.01, (4.0, 10.0), False),
    "rnndet/configs/rnndet_r50_nf20_12ep": (100, 12, (8, 11), 50, 0.01, (4.0, 10.0), False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recipe(name):
    queries, epochs, drops, depth, wd, factors, crop = CONFIGS[name]
    cfg = LazyConfig.load(os.path.join(ROOT, "projects", name + ".py"))
    assert cfg.model.num_queries == queries and cfg.model.select_box_nums_for_evaluation == queries
    assert cfg.model.backbone.depth == depth and cfg.model.num_classes == 80
    assert cfg.optimizer.lr == 2.5e-5 and cfg.optimizer.weight_decay == wd
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 1.0
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.dataloader.train.dataset.filter_empty
    assert (cfg.dataloader.train.mapper.augmentation_with_crop is not None) == crop
    assert cfg.train.max_iter == epochs * ITERS_PER_EPOCH
    sched = instantiate(cfg.lr_multiplier)
    at = lambda it: sched(it / cfg.train.max_iter)  # noqa: E731
    assert at(0) == pytest.approx(0.001) and at(250) == pytest.approx(0.5005, rel=1e-3)  # linear warm-up
    assert at(drops[0] * ITERS_PER_EPOCH - 10) == 1.0 and at(drops[0] * ITERS_PER_EPOCH + 10) == pytest.approx(0.1)
    assert at(drops[1] * ITERS_PER_EPOCH + 10) == pytest.approx(0.01)
    if "rnndet" in name:
        assert cfg.model.refinement_steps == int(name.split("_nf")[1].split("_")[0]) - 1

    with torch.device("meta"):  # the optimizer's groups, without building real weights
        model = instantiate(cfg.model)
        cfg.optimizer.params.model = model
        opt = instantiate(cfg.optimizer)
    groups = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    backbone = next(p for p in model.backbone.parameters() if p.requires_grad)
    assert groups[id(backbone)] == pytest.approx((2.5e-5, wd))  # no backbone multiplier
    stage = model.stages[0] if "adamixer" in name else model.refine_stage
    lr_f, wd_f = factors or (1.0, 1.0)
    for p in (stage.fc_cls.bias, stage.sampling_mixing.adaptive_mixing.parameter_generator.weight, stage.ffn_norm.weight):
        assert groups[id(p)] == pytest.approx((2.5e-5 * lr_f, wd * wd_f))
    assert groups[id(model.queries.content.weight)] == pytest.approx((2.5e-5, wd))
