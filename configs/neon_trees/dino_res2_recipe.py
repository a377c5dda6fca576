"""The DINO recipe (``dino_recipe.py``) plus MobileNetV2's stride-4 res2 as a *decoder-only* level.

Faster R-CNN's FPN reads a stride-4 map (P2) and keeps the better AP on small crowns; the recipe
starts at stride 8, and encoding a stride-4 level made a DINO step 2.8x dearer (the tuning screens
in docs/detectron2_baselines.md). Here res2 goes through the neck's 1x1 projection + GroupNorm and
is read only by the decoder's deformable cross-attention (``transformer.num_decoder_only_levels =
1``, ``d2detr/modeling/deformable_transformer.py``): the encoder, its proposals and query selection
stay on strides 8-64, and the decoder's queries sample the fine map beside them.

Measured (docs/detectron2_baselines.md, 15 min wall clock, 2 threads, seed 42, 2026-12-03): 17.3 AP
after 801 steps of 1.12 s against 19.8 after 1,113 of 0.81 s for ``dino_recipe.py``, APs 9.1 for
both -- no gain, so ``make demo`` keeps ``dino_recipe.py``.
"""
from .common import size_multi_scale_model
from .dino_recipe import RECIPE_WIDTH, dataloader, demo, lr_multiplier, model, optimizer, train  # noqa: F401

size_multi_scale_model(model, embed_dim=RECIPE_WIDTH, extra_levels=1, decoder_only_res2=True)
# size_multi_scale_model resets the counts to the comparison's; the recipe's again
model.num_queries = 300
model.select_box_nums_for_evaluation = 100

train.output_dir = "./output/neon_trees_dino_res2"
