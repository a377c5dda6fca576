"""Every DETR config loads, carries the official recipe and builds its model."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name: (depth, dc5, trainable parameters in millions at 80 classes, paper)
    "detr_r50_500ep": (50, False, 41.3),
    "detr_r101_500ep": (101, False, 60.2),
    "detr_r50_dc5_500ep": (50, True, 41.3),
    "detr_r101_dc5_500ep": (101, True, 60.2),
}


def load(name):
    return LazyConfig.load(os.path.join(ROOT, "projects/detr/configs", name + ".py"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_detr_config_recipe_and_model(name):
    depth, dc5, params_m = CONFIGS[name]
    cfg = load(name)
    assert cfg.model.backbone.depth == depth and cfg.model.backbone.dc5 == dc5
    assert cfg.model.num_classes == 80 and cfg.model.num_queries == 100
    # AdamW 1e-4 (backbone x0.1), wd 1e-4, clip 0.1, batch 64, 500 epochs dropping at 400
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 0.1
    assert cfg.dataloader.train.total_batch_size == 64
    iters_per_epoch = -(-118287 // 64)
    assert cfg.train.max_iter == 500 * iters_per_epoch
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) == 1.0
    assert sched(399.5 / 500) == 1.0 and sched(400.5 / 500) == pytest.approx(0.1)

    model = instantiate(cfg.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable / 1e6 == pytest.approx(params_m, abs=0.05)
    stride = 16 if dc5 else 32
    assert model.backbone.output_shape()["res5"].stride == stride

    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
    assert lrs[id(model.backbone.res5[0].conv1.weight)] == pytest.approx(1e-5)
    assert lrs[id(model.transformer.encoder.layers[0].linear1.weight)] == pytest.approx(1e-4)
    assert lrs[id(model.query_embed.weight)] == pytest.approx(1e-4)
