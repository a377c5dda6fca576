"""Conditional DETR, DAB-DETR, DAB-Deformable-DETR and DINO through tools/train_net's ``main``:
their real 50-epoch configs (common data pipeline, optimizer param groups, schedule, clipping),
shrunk to toy sizes, train two iterations on the toy datasets, checkpoint and run the COCO
evaluation; then ``--eval-only`` from the checkpoint."""
import json
import os

import pytest
import torch

from d2detr.engine import main
from test_train_net import _args
from test_train_toy import REPO

SHRINK = {
    "conditional_detr": """
model.transformer.update(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64)
model.position_embedding.num_pos_feats = 32
""",
    "dab_detr": """
model.transformer.update(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                         num_patterns=2)
model.position_embedding.num_pos_feats = 32
""",
    "dab_deformable_detr": """
for f, c in zip(("res3", "res4", "res5"), (128, 256, 512)):
    model.neck.input_shapes[f].channels = c
model.neck.out_channels = model.embed_dim = model.transformer.embed_dim = model.transformer.decoder.embed_dim = 64
model.position_embedding.num_pos_feats = 32
model.transformer.encoder.num_layers = 1
model.transformer.decoder.num_layers = 2
model.transformer.two_stage = True
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.update(embed_dim=64, ffn_dim=64)
""",
    "dino": """
for f, c in zip(("res3", "res4", "res5"), (128, 256, 512)):
    model.neck.input_shapes[f].channels = c
model.neck.out_channels = model.embed_dim = model.transformer.embed_dim = model.transformer.decoder.embed_dim = 64
model.transformer.decoder.norm.normalized_shape = model.denoising.embed_dim = 64
model.position_embedding.num_pos_feats = 32
model.transformer.encoder.num_layers = 1
model.transformer.decoder.num_layers = 2
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.update(embed_dim=64, ffn_dim=64)
""",
}
CONFIGS = {
    "conditional_detr": "projects/conditional_detr/configs/conditional_detr_r50_50ep.py",
    "dab_detr": "projects/dab_detr/configs/dab_detr_r50_50ep.py",
    "dab_deformable_detr": "projects/dab_deformable_detr/configs/dab_deformable_detr_r50_50ep.py",
    "dino": "projects/dino/configs/dino_r50_4scale_12ep.py",
}


def write_config(tmp_path, method):
    common = os.path.join(REPO, "configs", "common")
    text = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
from detectron2.config import LazyConfig
from test_train_toy import register_toy_datasets

register_toy_datasets({str(tmp_path / "data")!r})
_cfg = LazyConfig.load({os.path.join(REPO, CONFIGS[method])!r})
model, dataloader, optimizer, lr_multiplier, train = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.lr_multiplier, _cfg.train)
del _cfg
model.backbone.depth = 18
model.num_classes = 2
model.num_queries = 10
{SHRINK[method]}
dataloader.train.dataset.names = "toy_train"
dataloader.test.dataset.names = "toy_val"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = dataloader.test.num_workers = 0
dataloader.train.mapper.augmentation.min_sizes = [48]
dataloader.train.mapper.augmentation.max_size = 96
dataloader.train.mapper.augmentation_with_crop.update(
    min_sizes=[48], max_size=96, crop_resize_sizes=[48], crop_size=[32, 48])
dataloader.test.mapper.augmentation.update(min_size=48, max_size=96)
train.update(output_dir={str(tmp_path / "output")!r}, max_iter=2, device="cpu", seed=3, log_period=1,
             eval_period=0, checkpointer=dict(period=100, max_to_keep=1))
"""
    path = tmp_path / f"{method}_toy.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_train_net_trains_evaluates_and_reloads(tmp_path, method):
    torch.set_num_threads(1)
    config = write_config(tmp_path, method)
    main(_args(config))
    out = str(tmp_path / "output")
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "total_loss" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert all(v == v and abs(v) != float("inf") for k, v in r.items() if k.startswith("loss"))
        assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_0"} <= r.keys()
        if method == "dino":
            assert {"loss_class_dn", "loss_bbox_dn_0", "loss_class_enc"} <= r.keys()
    assert "bbox/AP" in rows[-1]
    ckpt = os.path.join(out, "model_final.pth")
    assert os.path.isfile(ckpt)
    res = main(_args(config, f"train.init_checkpoint={ckpt}", eval_only=True))
    assert "bbox" in res
