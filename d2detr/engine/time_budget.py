"""Training for a time budget instead of a number of iterations.

A comparison "at equal training time" only holds on another machine if the schedule is
defined by the time: :class:`TimeBudget` is a Detectron2 hook that measures the training
time spent so far, sets the learning rate to ``base_lr * lr_multiplier(fraction)`` where
``fraction`` = spent / budget (the config's ``lr_multiplier``, a fvcore ``ParamScheduler``
over [0, 1), is reused unchanged: its warmup and steps happen at the same fractions of the
budget as they would of ``max_iter``), evaluates at given fractions, and tells
:func:`train_for_budget` to stop when the budget is spent.

Two clocks (``clock=``):

* ``"wall"``: ``time.perf_counter()``, the budget as a user would measure it on an idle
  machine;
* ``"process"``: ``time.process_time() / threads`` -- this process's CPU time (all its
  threads) divided by the number of threads it trains with. On a machine shared with
  other jobs the wall clock charges a run for the others' load; the CPU clock does not, so
  runs made at different times under different load get about the same amount of
  computation -- not exactly: a ``make demo`` beside other jobs ran 643 of its 1,084
  idle-machine iterations (likely because under contention OpenMP threads spin while they
  wait for each other, and that is CPU time too; not verified).
  It counts only this process: a data loader with worker processes would train for free,
  so budgeted comparisons load data in the main process (``num_workers=0``).

Only the training steps are timed (from this hook's ``before_step`` to its ``after_step``:
data loading, forward, backward, optimizer step); evaluations, checkpoints and metric
writing between steps are not. Config keys (``cfg.train.time_budget``, read by
:func:`build_time_budget` and ``d2detr.engine.do_train``): ``seconds`` (0/None: no budget,
train ``max_iter`` iterations), ``clock``, ``threads`` (None: ``torch.get_num_threads()``),
``eval_fractions``. ``train.max_iter`` stays an upper bound on the iterations.
"""
import logging
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils.events import EventStorage

__all__ = ["BudgetClock", "TimeBudget", "build_time_budget", "train_for_budget"]

logger = logging.getLogger(__name__)

CLOCKS = ("wall", "process")


class BudgetClock:
    """Seconds of a monotonic clock: ``"wall"`` (``perf_counter``) or ``"process"``
    (``process_time() / threads``: CPU seconds of this process per training thread)."""

    def __init__(self, kind: str = "process", threads: Optional[int] = None):
        if kind not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {kind!r}")
        if threads is not None and (int(threads) != threads or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.kind = kind
        self.threads = int(threads) if threads is not None else None

    def __call__(self) -> float:
        if self.kind == "wall":
            return time.perf_counter()
        threads = self.threads or torch.get_num_threads()
        return time.process_time() / threads

    def __repr__(self):
        return f"BudgetClock({self.kind!r}, threads={self.threads})"


class TimeBudget(HookBase):
    """Ends the LR schedule and the training when ``seconds`` of training time are spent.

    Args:
        seconds: the training-time budget (> 0).
        lr_multiplier: callable ``fraction -> multiplier`` (a fvcore ``ParamScheduler``),
            applied to each param group's initial lr before every step.
        clock: a :class:`BudgetClock` or its kind (``"wall"``/``"process"``).
        threads: threads for the process clock (default ``torch.get_num_threads()``).
        eval_function: called (no arguments) when the spent fraction first reaches each of
            ``eval_fractions``; it returns a nested dict of floats (``do_test``'s result),
            written to the event storage and to :attr:`history`.
        eval_fractions: fractions in (0, 1] at which to evaluate. 1.0 is the end of the
            budget; the final evaluation is usually left to Detectron2's ``EvalHook``
            (:func:`train_for_budget` makes its "after the last iteration" test true).

    Attributes:
        spent_s: training seconds spent (checkpointed with the trainer; a resumed run
            continues the budget).
        history: one dict per evaluation: ``iteration``, ``train_s``, ``fraction``, ``results``.
    """

    def __init__(
        self,
        seconds: float,
        lr_multiplier: Callable[[float], float],
        clock="process",
        threads: Optional[int] = None,
        eval_function: Optional[Callable[[], Dict]] = None,
        eval_fractions: Sequence[float] = (),
    ):
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"time budget seconds must be a positive number, got {seconds!r}")
        fractions = sorted(float(f) for f in eval_fractions)
        if any(not (0.0 < f <= 1.0) for f in fractions):
            raise ValueError(f"eval_fractions must lie in (0, 1], got {list(eval_fractions)}")
        if fractions and eval_function is None:
            raise ValueError("eval_fractions given without an eval_function")
        self.seconds = float(seconds)
        self.lr_multiplier = lr_multiplier
        self.clock = clock if isinstance(clock, BudgetClock) else BudgetClock(clock, threads)
        self.eval_function = eval_function
        self.eval_fractions = fractions
        self.spent_s = 0.0
        self.history: List[Dict] = []
        self._t0 = None
        self._best_group = 0

    # ------------------------------------------------------------------ state
    @property
    def fraction(self) -> float:
        return min(self.spent_s / self.seconds, 1.0)

    @property
    def spent(self) -> bool:
        return self.spent_s >= self.seconds

    def state_dict(self):
        return {"spent_s": self.spent_s, "history": self.history}

    def load_state_dict(self, state_dict):
        self.spent_s = float(state_dict["spent_s"])
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ lr
    def _multiplier(self) -> float:
        # fvcore's schedulers are defined on [0, 1): the last step is taken just before 1.
        return float(self.lr_multiplier(min(self.fraction, 1.0 - 1e-9)))

    def _set_lr(self):
        mult = self._multiplier()
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult

    def before_train(self):
        optimizer = self.trainer.optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._best_group = hooks.LRScheduler.get_best_param_group_id(optimizer)
        self._set_lr()

    # ------------------------------------------------------------------ timing
    def before_step(self):
        self._t0 = self.clock()

    def after_step(self):
        if self._t0 is not None:
            self.spent_s += max(self.clock() - self._t0, 0.0)
            self._t0 = None
        storage = self.trainer.storage
        storage.put_scalar("lr", self.trainer.optimizer.param_groups[self._best_group]["lr"], smoothing_hint=False)
        storage.put_scalar("budget/train_s", self.spent_s, smoothing_hint=False)
        storage.put_scalar("budget/fraction", self.fraction, smoothing_hint=False)
        self._set_lr()  # for the next step
        done = {h["fraction_target"] for h in self.history}
        due = [f for f in self.eval_fractions if f <= self.fraction + 1e-12 and f not in done]
        if due:
            self.evaluate(fraction_target=due[-1], skipped=due[:-1])

    def evaluate(self, fraction_target: float, skipped: Sequence[float] = ()) -> Dict:
        """Runs ``eval_function`` now (not timed) and records it in :attr:`history`."""
        from detectron2.evaluation.testing import flatten_results_dict

        results = self.eval_function() or {}
        flat = {k: float(v) for k, v in flatten_results_dict(results).items()}
        if flat:
            self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
        for f in skipped:  # several fractions passed in one step: evaluated once, recorded for each
            self.history.append(self._entry(f, flat))
        entry = self._entry(fraction_target, flat)
        self.history.append(entry)
        return entry

    def _entry(self, target, flat):
        return {
            "iteration": self.trainer.iter + 1,
            "train_s": self.spent_s,
            "fraction": self.fraction,
            "fraction_target": target,
            "results": flat,
        }


def build_time_budget(cfg, eval_function=None) -> Optional[TimeBudget]:
    """The :class:`TimeBudget` of ``cfg.train.time_budget`` (with ``cfg.lr_multiplier``
    instantiated), or ``None`` when the config has no budget (``seconds`` 0 or absent)."""
    from detectron2.config import instantiate

    tb = cfg.train.get("time_budget", None) if "train" in cfg else None
    if not tb or not tb.get("seconds"):
        return None
    # The evaluation at the end of the budget is EvalHook's (do_train), as after max_iter.
    fractions = [f for f in (tb.get("eval_fractions", None) or []) if f < 1.0]
    return TimeBudget(
        seconds=float(tb["seconds"]),
        lr_multiplier=instantiate(cfg.lr_multiplier),
        clock=tb.get("clock", "process"),
        threads=tb.get("threads", None),
        eval_function=eval_function if fractions else None,
        eval_fractions=fractions,
    )


def train_for_budget(trainer, budget: TimeBudget, start_iter: int = 0, max_iter: Optional[int] = None):
    """Detectron2's ``TrainerBase.train`` loop, ended by ``budget`` (registered as one of
    ``trainer``'s hooks) or by ``max_iter`` (an upper bound; default: none).

    When the loop ends, ``trainer.max_iter`` is set to the iterations done and the
    ``PeriodicCheckpointer`` writes ``model_final`` (as after step ``max_iter - 1`` of a normal
    run), so ``EvalHook``'s final evaluation runs in ``after_train`` as after a normal run.
    """
    if budget not in trainer._hooks:
        raise ValueError("the TimeBudget must be registered with trainer.register_hooks first")
    upper = int(max_iter) if max_iter else 2**62
    trainer.iter = trainer.start_iter = start_iter
    trainer.max_iter = upper
    logger.info(
        "Starting training from iteration %d for a %.0f s budget (%s clock, %.0f s spent)",
        start_iter, budget.seconds, budget.clock.kind, budget.spent_s,
    )
    with EventStorage(start_iter) as trainer.storage:
        try:
            trainer.before_train()
            while trainer.iter < upper and not budget.spent:
                trainer.before_step()
                trainer.run_step()
                trainer.after_step()
                trainer.iter += 1
            trainer.max_iter = trainer.iter
            if trainer.iter > start_iter:
                for h in trainer._hooks:
                    if isinstance(h, hooks.PeriodicCheckpointer):
                        # It saves model_final after step max_iter - 1; the end is known only now.
                        # The trainer state saved must read as after that step, as in a normal run.
                        h.max_iter = trainer.iter
                        trainer.iter -= 1
                        try:
                            h.step(trainer.iter)
                        finally:
                            trainer.iter += 1
        except Exception:
            logger.exception("Exception during training:")
            raise
        finally:
            trainer.after_train()
    logger.info(
        "Time budget spent: %d iterations in %.1f s (%s clock)", trainer.iter, budget.spent_s, budget.clock.kind
    )
    return trainer
