"""Training options read by tools/train_net.py (d2detr.engine.do_train).

Detectron2's configs/common/train.py plus the DETR-family additions
(device, amp.dtype, clip_grad, model_ema, seed). Override from the command line,
e.g. `train.device=cpu train.amp.enabled=True train.model_ema.enabled=True`.
"""
import torch

train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    # "cuda" or "cpu". With "cpu", `--num-gpus N` runs N CPU worker processes (gloo).
    device="cuda" if torch.cuda.is_available() else "cpu",
    # torch.autocast: dtype None = float16 (+ GradScaler) on CUDA, bfloat16 on CPU;
    # "bfloat16" on CUDA trains without a GradScaler.
    amp=dict(enabled=False, dtype=None),
    ddp=dict(  # options for DistributedDataParallel
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    # Clip the norm of all gradients together, as DETR's --clip_max_norm 0.1.
    clip_grad=dict(enabled=True, params=dict(max_norm=0.1, norm_type=2.0)),
    # EMA of the weights, updated after every step, checkpointed and used for evaluation.
    # use_for_eval: evaluation, export, demo and the visualisation tools use a checkpoint's EMA
    # weights when it has them; False selects its raw weights. ramp_steps > 0 ramps the decay up
    # as decay * (1 - exp(-step / ramp_steps)) (YOLOv5 / RT-DETR), for runs of few steps.
    model_ema=dict(enabled=False, decay=0.9998, use_for_eval=True, ramp_steps=0),
    checkpointer=dict(period=5000, max_to_keep=100),  # PeriodicCheckpointer
    eval_period=5000,  # COCO evaluation every N iterations (and after the last); 0: only at the end
    log_period=20,  # metrics.json, TensorBoard and the console line with ETA
    progress_period=None,  # stdout line "iter i/max s/it ETA loss" every N iterations (None: log_period, 0: off)
    # seconds > 0: train for this much training time instead of max_iter (an upper bound then);
    # the LR schedule runs over the budget. clock "wall" or "process" (CPU time / threads).
    # See d2detr/engine/time_budget.py.
    time_budget=dict(seconds=0, clock="process", threads=None, eval_fractions=[]),
    seed=-1,  # < 0: random; else every worker seeds with seed + rank
    cudnn_benchmark=False,
)
