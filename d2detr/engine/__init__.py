"""Training machinery: one trainer for CUDA and CPU (AMP, gradient clipping, non-finite
loss guard, weight EMA), CPU/GPU multi-process launch and the train/eval loop of
``tools/train_net.py``."""
from .ema import ModelEMA, unwrap_model
from .launch import launch
from .param_groups import LrFactorByName
from .trainer import DetrTrainer, resolve_amp_dtype
from .defaults import (
    build_model_ema,
    build_trainer,
    do_test,
    do_train,
    launch_from_args,
    load_config,
    main,
    setup,
)
