"""A compact progress line on stdout for long training runs.

Detectron2's ``CommonMetricPrinter`` logs every metric with an ETA through ``logging``; when the
logging is quiet (a script that raises the log level, a notebook, ``make demo`` redirected to a
file) nothing tells the user how far a run is. :class:`ProgressHook` prints, on the main process
only, one short line every ``period`` iterations, after the first and after the last::

    [d2detr] iter 4/12 (33%)  0.137 s/it  ETA 0:00:01  total_loss 4.895

``s/it`` is the wall-clock time per iteration since the previous line (evaluation and
checkpointing included, so the ETA is what the user waits), ``ETA`` that rate times the
iterations left, ``total_loss`` the last iteration's loss (summed over the loss terms, as in
``metrics.json``). ``tools/train_net.py`` wires it from ``train.progress_period``
(default ``train.log_period``; ``0`` turns it off).
"""
import datetime
import sys
import time
from typing import Optional

from detectron2.engine import HookBase

__all__ = ["ProgressHook", "format_progress"]


def format_progress(
    done: int, max_iter: int, seconds_per_iter: Optional[float], loss: Optional[float], budget=None
) -> str:
    """``[d2detr] iter DONE/MAX (P%)  S s/it  ETA H:MM:SS  total_loss L`` (missing parts left out).
    Under a :class:`~d2detr.engine.time_budget.TimeBudget` (``max_iter`` is then only a cap) the
    progress is the budget's: ``iter DONE  budget P% (clock)  S s/it  ETA`` of the budget left."""
    if budget is not None:
        parts = [f"[d2detr] iter {done}  budget {100.0 * budget.fraction:.0f}% of {budget.seconds:.0f} s ({budget.clock.kind} clock)"]
    else:
        parts = [f"[d2detr] iter {done}/{max_iter} ({100.0 * done / max(max_iter, 1):.0f}%)"]
    if seconds_per_iter is not None:
        parts.append(f"{seconds_per_iter:.3f} s/it")
        if budget is not None:
            eta = max(budget.seconds - budget.spent_s, 0.0)  # in the budget's clock
        else:
            eta = max(max_iter - done, 0) * seconds_per_iter
        parts.append(f"ETA {datetime.timedelta(seconds=int(round(eta)))}")
    if loss is not None:
        parts.append(f"total_loss {loss:.4g}")
    return "  ".join(parts)


class ProgressHook(HookBase):
    """Prints :func:`format_progress` to ``file`` (default: ``sys.stdout`` at print time) every
    ``period`` iterations, after the first iteration of the run and after the last.

    Args:
        max_iter: the run's ``train.max_iter``.
        period: iterations between two lines (> 0).
        file: a text stream; ``None`` is the current ``sys.stdout``.
        budget: the run's ``TimeBudget``, if it trains for a time budget.
    """

    def __init__(self, max_iter: int, period: int = 20, file=None, budget=None):
        if int(period) <= 0:
            raise ValueError(f"ProgressHook period must be > 0, got {period}")
        self.max_iter = int(max_iter)
        self.period = int(period)
        self.file = file
        self.budget = budget  # a TimeBudget: progress and ETA from the budget, not max_iter
        self._mark_time = None
        self._mark_iter = None

    def before_train(self):
        self._mark_time = time.perf_counter()
        self._mark_iter = self.trainer.start_iter

    def after_step(self):
        done = self.trainer.iter + 1  # iterations finished, counted from 0
        first = done == self.trainer.start_iter + 1
        if not (first or done % self.period == 0 or done >= self.max_iter):
            return
        now = time.perf_counter()
        seconds_per_iter = (now - self._mark_time) / max(done - self._mark_iter, 1)
        self._mark_time, self._mark_iter = now, done
        print(format_progress(done, self.max_iter, seconds_per_iter, self._last_loss(), self.budget),
              file=self.file or sys.stdout, flush=True)

    def _last_loss(self) -> Optional[float]:
        storage = self.trainer.storage
        try:
            return float(storage.history("total_loss").latest())
        except KeyError:  # not written (yet), e.g. on a worker that does not gather metrics
            return None
