"""The training and evaluation loop behind ``tools/train_net.py``.

It follows Detectron2's ``tools/lazyconfig_train_net.py`` and adds what the DETR
family needs: :class:`DetrTrainer` (AMP on CUDA and CPU, gradient clipping,
non-finite loss guard), an optional weight EMA that is checkpointed and used for
evaluation, an exact ``--resume`` with :func:`d2detr.data.build_detr_train_loader` (its sampler
is checkpointed as ``train_sampler`` and skips to the resumed iteration; other loaders restart
their order, with a warning), the model's ``num_classes`` for a ``DetrDatasetMapper``, and CPU
multi-process training (``--num-gpus N`` starts N gloo workers when ``train.device`` is ``"cpu"``).

Config keys read here (``cfg.train``; see ``configs/common/train.py``): ``output_dir``,
``init_checkpoint``, ``max_iter``, ``device``, ``amp.enabled``, ``amp.dtype``,
``ddp.*``, ``clip_grad.enabled``, ``clip_grad.params.{max_norm,norm_type}``,
``model_ema.enabled``, ``model_ema.decay``, ``model_ema.use_for_eval``,
``checkpointer.{period,max_to_keep}``, ``eval_period``, ``log_period``, ``progress_period``,
``seed`` (also the per-step torch seed of :class:`DetrTrainer`), ``time_budget.*``
(``d2detr/engine/time_budget.py``); plus ``cfg.model``, ``cfg.optimizer``
(``params.model`` is filled in), ``cfg.lr_multiplier``, ``cfg.dataloader.{train,test,evaluator}``.
"""
import logging
import os
from typing import Optional

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.registry import locate
from detectron2.engine import create_ddp_model, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from d2detr.checkpoint import (
    DetrCheckpointer,
    apply_checkpoint_overrides,
    overrides_to_shell,
    read_checkpoint_overrides,
    use_ema_weights,
)

from .ema import ModelEMA
from .launch import launch
from .progress import ProgressHook
from .time_budget import build_time_budget, train_for_budget
from .trainer import DetrTrainer

import d2detr.data  # noqa: F401,E402  registers the built-in datasets (neon_trees_*) for any config
from d2detr.data import DetrDatasetMapper, resumable_sampler  # noqa: E402

__all__ = [
    "load_config",
    "setup",
    "build_model_ema",
    "build_trainer",
    "build_progress_hook",
    "do_test",
    "do_train",
    "main",
    "launch_from_args",
]

logger = logging.getLogger("d2detr")


def _get(cfg, dotted: str, default=None):
    node = cfg
    for key in dotted.split("."):
        if node is None or key not in node:
            return default
        node = node[key]
    return node


def _load_config(args, log: bool):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    return cfg, apply_checkpoint_overrides(cfg, args.opts, log=log)


def load_config(args):
    """``LazyConfig.load(args.config_file)`` with the ``key=value`` overrides applied, and the
    overrides stored in ``train.init_checkpoint`` (a converted checkpoint) where the command line
    does not set the key (:func:`d2detr.checkpoint.apply_checkpoint_overrides`)."""
    return _load_config(args, log=True)[0]


def setup(args):
    """Loads the config and runs Detectron2's ``default_setup`` (logging, seed,
    config.yaml); d2detr's own loggers go to the same console and log file."""
    cfg, stored = _load_config(args, log=False)
    default_setup(cfg, args)
    setup_logger(_get(cfg, "train.output_dir"), distributed_rank=comm.get_rank(), name="d2detr")
    if stored:
        logger.info(
            f"{cfg.train.init_checkpoint}: applied {len(stored)} config overrides stored in the checkpoint "
            f"(keys given on the command line keep their value): {overrides_to_shell(stored)}"
        )
    return cfg


def _device(cfg) -> str:
    return str(_get(cfg, "train.device", "cuda"))


def _ddp_kwargs(cfg) -> dict:
    kwargs = dict(_get(cfg, "train.ddp", None) or {})
    if _device(cfg).startswith("cpu"):
        kwargs.setdefault("device_ids", None)  # DDP over CPU modules takes no device ids
    return kwargs


def build_model_ema(cfg, model) -> Optional[ModelEMA]:
    """A :class:`ModelEMA` of ``model`` when ``train.model_ema.enabled``, else ``None``."""
    if not _get(cfg, "train.model_ema.enabled", False):
        return None
    return ModelEMA(
        model, decay=_get(cfg, "train.model_ema.decay", 0.9998), ramp_steps=_get(cfg, "train.model_ema.ramp_steps", 0)
    )


def _train_seed(cfg) -> int:
    """``train.seed``, or when it is < 0 a random seed shared by all workers."""
    seed = int(_get(cfg, "train.seed", -1))
    return seed if seed >= 0 else int(comm.shared_random_seed())


def build_trainer(cfg, model, data_loader, optimizer, model_ema=None) -> DetrTrainer:
    """:class:`DetrTrainer` configured from ``cfg.train.{amp,clip_grad,seed}`` (the per-step RNG
    seed; with ``train.seed < 0`` a random one, kept in the checkpoint)."""
    clip = _get(cfg, "train.clip_grad", None) or {}
    clip_params = clip.get("params", None) or {}
    return DetrTrainer(
        model,
        data_loader,
        optimizer,
        amp=bool(_get(cfg, "train.amp.enabled", False)),
        amp_dtype=_get(cfg, "train.amp.dtype", None),
        clip_grad_max_norm=clip_params.get("max_norm", 0.1) if clip.get("enabled", False) else None,
        clip_grad_norm_type=clip_params.get("norm_type", 2.0),
        model_ema=model_ema,
        seed=_train_seed(cfg),
    )


def build_progress_hook(cfg, budget=None) -> Optional[ProgressHook]:
    """The stdout progress line every ``train.progress_period`` iterations (default
    ``train.log_period``; 0: none)."""
    period = _get(cfg, "train.progress_period", None)
    if period is None:
        period = _get(cfg, "train.log_period", 20)
    return ProgressHook(cfg.train.max_iter, int(period), budget=budget) if period else None


def _stored_overrides(cfg) -> dict:
    """The config's values of the keys ``train.init_checkpoint`` stores overrides for: saved in
    this run's checkpoints, so that they too build their model from the plain config."""
    keys = read_checkpoint_overrides(str(_get(cfg, "train.init_checkpoint", "") or ""))
    values = {k: OmegaConf.select(cfg, k) for k in keys}
    return {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in values.items()}


def _set_mapper_num_classes(cfg, model) -> None:
    """Gives a ``DetrDatasetMapper`` train mapper whose ``num_classes`` is unset the model's, so
    a category id the model has no class for is an error naming the dataset record."""
    mapper = _get(cfg, "dataloader.train.mapper", None)
    num_classes = getattr(model, "num_classes", None)
    if mapper is None or num_classes is None or "_target_" not in mapper:
        return
    target = mapper._target_
    if isinstance(target, str):
        target = locate(target)
    if isinstance(target, type) and issubclass(target, DetrDatasetMapper) and mapper.get("num_classes") is None:
        mapper.num_classes = int(num_classes)


def _checkpointables(model_ema):
    return {"model_ema": model_ema} if model_ema is not None else {}


def do_test(cfg, model, model_ema: Optional[ModelEMA] = None):
    """Evaluates ``model`` (with the EMA weights when ``model_ema`` is given, unless
    ``train.model_ema.use_for_eval=False``) on ``cfg.dataloader.test`` with
    ``cfg.dataloader.evaluator``; returns the results."""
    if "evaluator" not in cfg.dataloader:
        return {}
    evaluator_cfg = cfg.dataloader.evaluator
    if "output_dir" in evaluator_cfg and evaluator_cfg.output_dir is None:
        # COCOEvaluator caches the COCO-format ground truth of non-COCO datasets there.
        evaluator_cfg = OmegaConf.merge(
            evaluator_cfg, {"output_dir": os.path.join(cfg.train.output_dir, "inference")}
        )
    evaluator = instantiate(evaluator_cfg)
    data_loader = instantiate(cfg.dataloader.test)
    if model_ema is not None and use_ema_weights(cfg):
        with model_ema.apply_to(model):
            ret = inference_on_dataset(model, data_loader, evaluator)
    else:
        ret = inference_on_dataset(model, data_loader, evaluator)
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def do_train(args, cfg) -> DetrTrainer:
    """Trains ``cfg`` (resuming from ``train.output_dir`` when ``args.resume``) and
    returns the trainer."""
    device = _device(cfg)
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    _set_mapper_num_classes(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    sampler = resumable_sampler(train_loader)  # build_detr_train_loader's: checkpointed, can skip ahead

    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    model_ema = build_model_ema(cfg, model)
    trainer = build_trainer(cfg, model, train_loader, optimizer, model_ema)
    checkpointer = DetrCheckpointer(
        model, cfg.train.output_dir, use_ema=None, overrides=_stored_overrides(cfg),
        trainer=trainer, **_checkpointables(model_ema),
        **({"train_sampler": sampler} if sampler is not None else {}),
    )
    # train.time_budget.seconds: the LR schedule runs over the budget's time, not max_iter.
    budget = build_time_budget(cfg, lambda: do_test(cfg, model, model_ema))
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            budget or hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            # With a budget, its eval_fractions replace the periodic evaluation; the last one stays here.
            hooks.EvalHook(0 if budget else cfg.train.eval_period, lambda: do_test(cfg, model, model_ema)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
            build_progress_hook(cfg, budget) if comm.is_main_process() else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if model_ema is not None and model_ema.num_updates == 0:
        # Not resumed from a checkpoint with an EMA: start it from the loaded weights.
        model_ema.copy_from(model)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint was written after iteration `trainer.iter` finished.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    if sampler is not None:
        sampler.set_start_iter(start_iter)
        if start_iter > 0:
            logger.info(f"Resuming the data order at iteration {start_iter} (seed {sampler.seed}).")
    elif start_iter > 0:
        logger.warning(
            f"Resuming at iteration {start_iter} with a train loader that cannot skip ahead "
            f"({type(train_loader).__name__}): it starts its order (and augmentation RNG) anew, so the "
            "run differs from an uninterrupted one; d2detr.data.build_detr_train_loader resumes exactly."
        )
    if budget is not None:
        train_for_budget(trainer, budget, start_iter, cfg.train.max_iter)
    else:
        trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def _eval_only(args, cfg):
    """Evaluates ``train.init_checkpoint`` (``--resume``: the last checkpoint of
    ``train.output_dir``) with its EMA weights when it has them (:class:`DetrCheckpointer`)."""
    model = instantiate(cfg.model)
    model.to(_device(cfg))
    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    checkpointer = DetrCheckpointer(model, cfg.train.output_dir, use_ema=use_ema_weights(cfg))
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if checkpointer.loaded_weights != "ema" and _get(cfg, "train.model_ema.enabled", False) and use_ema_weights(cfg):
        logger.warning("train.model_ema.enabled, but the checkpoint has no EMA weights: evaluating its weights.")
    return do_test(cfg, model)


def main(args):
    """Entry point of one worker: ``--eval-only`` evaluates, otherwise trains."""
    cfg = setup(args)
    if args.eval_only:
        return _eval_only(args, cfg)
    do_train(args, cfg)


def launch_from_args(args, main_func=main):
    """Starts ``main_func(args)`` in ``args.num_gpus`` processes per machine.

    On CUDA these are GPU workers (Detectron2's launch, NCCL). When the config's
    ``train.device`` is ``"cpu"``, ``--num-gpus N`` means N CPU worker processes
    that train together through gloo.
    """
    device = _device(load_config(args))
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )
