#!/usr/bin/env python
"""Train or evaluate a d2detr model from a LazyConfig.

    python tools/train_net.py --config-file projects/detr/configs/detr_r50_500ep.py \
        --num-gpus 8 [train.max_iter=1000 dataloader.train.total_batch_size=8 ...]
    python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=model.pth
    python tools/train_net.py --config-file CFG --resume       # continue after a kill

`--resume` continues from `train.output_dir/last_checkpoint` (weights, optimizer, LR
scheduler, AMP scaler, EMA and iteration). `--num-gpus N` starts N workers per machine:
GPUs with NCCL, or N CPU processes with gloo when `train.device=cpu`. Multi-machine:
`--num-machines M --machine-rank R --dist-url tcp://HOST:PORT`, as in Detectron2.
Metrics go to `train.output_dir/metrics.json` and TensorBoard event files there.
"""
import os
import sys

# Allow running from a source checkout without installing d2detr.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser  # noqa: E402

from d2detr.engine import launch_from_args, main  # noqa: E402


def parse_args(argv=None):
    parser = default_argument_parser(
        epilog="With train.device=cpu, --num-gpus N starts N CPU worker processes (gloo)."
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    launch_from_args(args, main)
