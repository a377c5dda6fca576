"""What the five convergence-comparison configs share (``tools/compare_convergence.py``).

Everything except the model: data, optimizer, schedule, seed. The choices are the
NEON-trees demo's (``projects/deformable_detr/configs/deformable_detr_mobilenetv2_neon_trees.py``):
``neon_trees_train`` (66 aerial 400x400 tiles, one class "tree"), short edges 352..480 with
horizontal and vertical flips for training, 416 at test, batch 2, AdamW with weight decay 1e-4,
gradient clipping 0.1, a 3 % linear warmup and a x0.1 drop at 80 % of ``train.max_iter``.

The size constants below are applied by every method's config, so the five models differ
only in what their papers change: d_model 128, 8 heads, 2 encoder + 2 decoder layers,
FFN 512 (Deformable DETR's 1024 : 256 ratio is 4x as well), 100 queries, one class.
"""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

import d2detr.data.datasets  # noqa: F401  (registers neon_trees_train / neon_trees_val)
from d2detr.data.detr_dataset_mapper import DetrDatasetMapper

from ..common.optim import AdamW as optimizer
from ..common.train import train

# ------------------------------------------------------------- shared model sizes
D_MODEL = 128
NUM_HEADS = 8
FFN_DIM = 4 * D_MODEL
ENC_LAYERS = 2
DEC_LAYERS = 2
NUM_QUERIES = 100  # the densest tile holds about 60 crowns
NUM_CLASSES = 1
#: MobileNetV2 (ImageNet, offline weights, FrozenBN, stem + stride-4 frozen) output channels.
MOBILENET_CHANNELS = {"res3": (32, 8), "res4": (96, 16), "res5": (320, 32)}


#: MobileNetV2's stride-4 stage, for a decoder-only level (``size_multi_scale_model(decoder_only_res2=True)``)
MOBILENET_RES2 = {"res2": (24, 4)}


def size_multi_scale_model(model, embed_dim=D_MODEL, extra_levels=0, decoder_only_res2=False):
    """Gives a multi-scale deformable model config (``configs/common/models/deformable_r50.py`` and
    the methods built on it) the comparison's shared size: the ImageNet MobileNetV2 res3-res5
    (3 levels, plus ``extra_levels`` stride-2 3x3 convs on res5 as DINO-4scale's stride-64 level),
    width ``embed_dim`` (``D_MODEL`` for the comparison), ``ENC_LAYERS`` + ``DEC_LAYERS`` layers of
    ``NUM_HEADS`` heads and FFN 4x the width, ``NUM_QUERIES`` queries, ``NUM_CLASSES`` class. Sizes
    of method-specific parts (a decoder norm, a denoising embedding) are the method config's to set.
    ``decoder_only_res2``: also the stride-4 res2, as a level only the decoder reads
    (``transformer.num_decoder_only_levels = 1``; the encoder keeps the others)."""
    from d2detr.modeling.backbone import MobileNetV2Backbone

    channels = {**(MOBILENET_RES2 if decoder_only_res2 else {}), **MOBILENET_CHANNELS}
    num_levels = len(channels) + extra_levels
    model.backbone = L(MobileNetV2Backbone)(out_features=list(channels), pretrained=True)
    model.neck.input_shapes = {
        name: L(ShapeSpec)(channels=c, stride=stride) for name, (c, stride) in channels.items()
    }
    # Set explicitly: the base config's list need not be the backbone's levels.
    model.neck.in_features = list(channels)
    model.neck.out_channels = embed_dim
    model.neck.num_outs = num_levels
    model.embed_dim = embed_dim
    model.position_embedding.num_pos_feats = embed_dim // 2
    model.transformer.embed_dim = embed_dim
    model.transformer.num_feature_levels = num_levels
    if decoder_only_res2:
        model.transformer.num_decoder_only_levels = 1
    if "embed_dim" in model.transformer.decoder:
        model.transformer.decoder.embed_dim = embed_dim
    model.transformer.encoder.num_layers = ENC_LAYERS
    model.transformer.decoder.num_layers = DEC_LAYERS
    for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
        layer.embed_dim = embed_dim
        layer.num_heads = NUM_HEADS
        layer.num_levels = num_levels
        layer.ffn_dim = 4 * embed_dim
    model.transformer.encoder.encoder_layer.num_levels = num_levels - int(decoder_only_res2)
    model.num_classes = NUM_CLASSES
    model.num_queries = NUM_QUERIES
    model.select_box_nums_for_evaluation = NUM_QUERIES
    return model

# ----------------------------------------------------------------------------- data
TRAIN_SIZES = (352, 384, 416, 448, 480)
TEST_SIZE = 416

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="neon_trees_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentation=[
            L(T.RandomFlip)(horizontal=True, vertical=False),
            L(T.RandomFlip)(horizontal=False, vertical=True),
            L(T.ResizeShortestEdge)(short_edge_length=TRAIN_SIZES, max_size=800, sample_style="choice"),
        ],
        image_format="RGB",
    ),
    total_batch_size=2,
    # In the main process: the sampler and the augmentations then draw from RNGs seeded by
    # train.seed only, so every method sees the same images, flips and sizes in the same order.
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="neon_trees_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentation=[L(T.ResizeShortestEdge)(short_edge_length=TEST_SIZE, max_size=800)],
        image_format="RGB",
    ),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir=None,  # <train.output_dir>/inference
    use_fast_impl=False,
)

# ------------------------------------------------------------------------ optimizer
# Each method's config sets optimizer.lr and the per-parameter lr factors of its paper.

# ------------------------------------------------------------------------- schedule
train.max_iter = 500
train.device = "cpu"
train.output_dir = "./output/convergence"
train.eval_period = 50
train.log_period = 20
train.checkpointer = dict(period=100000, max_to_keep=1)
train.seed = 42

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[8], num_updates=10),
    warmup_length=0.03,
    warmup_method="linear",
    warmup_factor=0.01,
)
