"""Training for a time budget (d2detr/engine/time_budget.py) with a real Deformable DETR.

The clock is replaced by a counter that advances 1 s per call, so a training step (timed from
the hook's before_step to its after_step) costs exactly 1 s and what is timed is deterministic.
"""
import json
import os

import pytest
import torch
from test_train_net import _args, _load, _write_real_config

from d2detr.engine import main
from d2detr.engine import time_budget as tb


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def counting_clock(monkeypatch):
    calls = {"n": 0}

    def fake(self):
        calls["n"] += 1
        return float(calls["n"])

    monkeypatch.setattr(tb.BudgetClock, "__call__", fake)
    return calls


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="clock must be one of"):
        tb.BudgetClock("cpu")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        tb.BudgetClock("process", threads=0)
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        tb.TimeBudget(0, lambda f: 1.0)
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        tb.TimeBudget(float("nan"), lambda f: 1.0)
    with pytest.raises(ValueError, match=r"eval_fractions must lie in \(0, 1\]"):
        tb.TimeBudget(10, lambda f: 1.0, eval_function=dict, eval_fractions=[0.5, 1.5])
    with pytest.raises(ValueError, match="without an eval_function"):
        tb.TimeBudget(10, lambda f: 1.0, eval_fractions=[0.5])


def test_process_clock_is_cpu_time_per_thread(monkeypatch):
    monkeypatch.setattr(tb.time, "process_time", lambda: 12.0)
    assert tb.BudgetClock("process", threads=3)() == pytest.approx(4.0)
    monkeypatch.setattr(tb.torch, "get_num_threads", lambda: 2)
    assert tb.BudgetClock("process")() == pytest.approx(6.0)  # threads default: torch's
    monkeypatch.setattr(tb.time, "perf_counter", lambda: 5.5)
    assert tb.BudgetClock("wall", threads=3)() == pytest.approx(5.5)


def test_budget_sets_lr_by_fraction_evaluates_and_stops(tmp_path, counting_clock):
    """5 s budget at 1 s per step: 5 steps; the config's lr x0.1 at 80 % of the schedule falls
    on the 5th step; an evaluation at 40 % (after step 2) and one at the end; the spent time is
    checkpointed, and a resumed run with a larger budget trains only the difference."""
    config = _write_real_config(tmp_path)
    out = str(tmp_path / "output")
    budget = ["train.time_budget.seconds=5", "train.time_budget.eval_fractions=[0.4]", "train.max_iter=1000",
              "train.checkpointer.period=1000"]
    main(_args(config, *budget))

    rows = _metrics(out)
    steps = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in steps] == [0, 1, 2, 3, 4]
    assert [r["lr"] for r in steps] == pytest.approx([2e-4] * 4 + [2e-5])
    assert [r["budget/train_s"] for r in steps] == pytest.approx([1, 2, 3, 4, 5])
    evals = [r for r in rows if "bbox/AP" in r]
    assert len(evals) == 2  # at 40 % and at the end
    ckpt = _load(os.path.join(out, "model_final.pth"))
    assert ckpt["iteration"] == 4  # as Detectron2: the last finished step
    assert ckpt["trainer"]["hooks"]["TimeBudget"]["spent_s"] == pytest.approx(5.0)
    history = ckpt["trainer"]["hooks"]["TimeBudget"]["history"]
    assert [(h["iteration"], h["fraction_target"]) for h in history] == [(2, 0.4)]

    # Resume with 7 s: 5 are spent, so two more steps.
    main(_args(config, *[b.replace("seconds=5", "seconds=7") for b in budget], resume=True))
    steps = [r for r in _metrics(out) if "total_loss" in r]
    assert [r["iteration"] for r in steps][-3:] == [4, 5, 6]
    assert [r["budget/train_s"] for r in steps][-2:] == pytest.approx([6, 7])
    # lr of those steps: fraction 5/7 = 0.71 (< 0.8, full lr), 6/7 = 0.86 (x0.1)
    assert [r["lr"] for r in steps][-2:] == pytest.approx([2e-4, 2e-5])
    assert _load(os.path.join(out, "model_final.pth"))["trainer"]["hooks"]["TimeBudget"]["spent_s"] == pytest.approx(7.0)


def test_without_budget_the_iteration_schedule_is_unchanged(tmp_path):
    config = _write_real_config(tmp_path)
    main(_args(config, "train.max_iter=2"))
    steps = [r for r in _metrics(str(tmp_path / "output")) if "total_loss" in r]
    assert [r["iteration"] for r in steps] == [0, 1]
    assert "budget/train_s" not in steps[0]
    assert torch.isfinite(torch.tensor([r["total_loss"] for r in steps])).all()


def test_progress_line_under_a_budget_reports_the_budget_not_max_iter():
    """Under a budget, max_iter is only a cap: the progress line gives the budget's share spent
    and the budget left as ETA (not max_iter x s/it, which reads as days)."""
    from d2detr.engine.progress import format_progress
    from d2detr.engine.time_budget import TimeBudget

    budget = TimeBudget(seconds=900, lr_multiplier=lambda f: 1.0, clock="process")
    budget.spent_s = 300.0
    line = format_progress(120, 100000, 2.5, 4.2, budget)
    assert line.startswith("[d2detr] iter 120  budget 33% of 900 s (process clock)")
    assert "ETA 0:10:00" in line and "total_loss 4.2" in line and "/100000" not in line
    assert "ETA 2 days" in format_progress(120, 100000, 2.5, 4.2)  # what it printed before
