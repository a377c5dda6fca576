"""tools/train_net.py end to end on CPU: training writes metrics and checkpoints,
--resume after a kill continues exactly, a NaN loss stops training cleanly,
--eval-only evaluates, and two gloo workers keep identical replicas."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from test_train_toy import REPO, write_toy_config

from d2detr.engine import launch, load_config, main

_spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "tools", "train_net.py"))
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)


def _args(config, *opts, resume=False, eval_only=False, num_gpus=1):
    argv = ["--config-file", config, "--num-gpus", str(num_gpus)]
    argv += ["--resume"] if resume else []
    argv += ["--eval-only"] if eval_only else []
    return train_net.parse_args(argv + list(opts))


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(a, b, where=""):
    """Recursively equal: tensors bitwise, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_train_writes_metrics_checkpoints_and_evaluates(tmp_path):
    config = write_toy_config(tmp_path, max_iter=4, eval_period=2)
    out = str(tmp_path / "output")
    main(_args(config, "optimizer.lr=2e-3"))  # a key=value override

    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "model_*.pth")))
    assert names == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    final = _load(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == final["trainer"]["iteration"] == 3
    assert "optimizer" in final["trainer"]
    assert "model_ema" not in final  # EMA is off by default

    rows = _metrics(out)
    train_rows = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in train_rows] == [0, 1, 2, 3]
    for r in train_rows:
        assert {"loss_ce", "loss_bbox", "lr", "grad_norm", "data_time"} <= r.keys()
    # The override reached the optimizer; the schedule drops x0.1 at iteration 3.
    assert [r["lr"] for r in train_rows] == pytest.approx([2e-3, 2e-3, 2e-3, 2e-4])
    # COCOEvaluator ran after 2 iterations (eval_period) and after training (logged at max_iter).
    assert [r["iteration"] for r in rows if "bbox/AP" in r] == [1, 4]
    assert glob.glob(os.path.join(out, "events.out.tfevents.*")), "no TensorBoard events"
    assert os.path.isfile(os.path.join(out, "config.yaml"))

    # --eval-only on the final checkpoint gives the final evaluation again.
    res = main(_args(config, f"train.init_checkpoint={out}/model_final.pth", eval_only=True))
    assert res["bbox"]["AP"] == pytest.approx(rows[-1]["bbox/AP"])


def test_resume_after_kill_continues_exactly(tmp_path):
    """Killed at iteration 4 (SIGKILL, no cleanup), resumed from the checkpoint of
    iteration 3: the learning rates and the final weights, optimizer and EMA state are
    bitwise those of an uninterrupted run. (The LR schedule is a function of the
    iteration, so restoring the iteration restores the scheduler.)"""
    opts = ["train.max_iter=6", "train.model_ema.enabled=True", "train.model_ema.decay=0.5"]
    ref_cfg = write_toy_config(tmp_path / "ref")
    main(_args(ref_cfg, *opts))
    reference = _load(str(tmp_path / "ref" / "output" / "model_final.pth"))

    config = write_toy_config(tmp_path / "run")
    out = tmp_path / "run" / "output"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    killed = subprocess.run(cmd + opts + ["model.kill_at_iter=4"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"

    main(_args(config, *opts, resume=True))
    resumed = _load(str(out / "model_final.pth"))
    rows = [r for r in _metrics(str(out)) if "total_loss" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4, 5]  # killed run: 0-3, resumed: 4-5
    ref_rows = [r for r in _metrics(str(tmp_path / "ref" / "output")) if "total_loss" in r]
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]
    for key in ("iteration", "model", "trainer", "model_ema"):
        _assert_same(resumed[key], reference[key], key)


def test_nan_loss_stops_with_iteration_and_clean_checkpoints(tmp_path):
    config = write_toy_config(tmp_path, max_iter=6, checkpointer=dict(period=1, max_to_keep=100))
    out = str(tmp_path / "output")
    with pytest.raises(FloatingPointError, match=r"iteration=3\b"):
        main(_args(config, "model.nan_at_iter=3"))
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "model_*.pth")))
    assert names == ["model_0000000.pth", "model_0000001.pth", "model_0000002.pth"]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000002.pth"
    for name in names:
        ckpt = _load(os.path.join(out, name))
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values()), name


def _ddp_worker(config, dump_dir):
    from detectron2.utils import comm

    from d2detr.engine import do_train, setup

    args = _args(config, num_gpus=2)
    trainer = do_train(args, setup(args))
    state = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    torch.save(
        {"model": state, "optimizer": trainer.optimizer.state_dict(), "world_size": comm.get_world_size()},
        os.path.join(dump_dir, f"rank{comm.get_rank()}.pth"),
    )


def test_two_cpu_workers_keep_replicas_identical(tmp_path):
    """Two gloo workers, each on its own image and seeded differently (seed + rank):
    after a few steps both ranks hold the same weights and optimizer state, which only
    holds if DDP broadcast the initial weights and averaged the gradients."""
    config = write_toy_config(tmp_path, max_iter=3, eval_period=0, device="cpu")
    assert load_config(_args(config)).train.device == "cpu"
    launch(_ddp_worker, 2, dist_url="auto", args=(config, str(tmp_path)), device="cpu")
    r0, r1 = _load(str(tmp_path / "rank0.pth")), _load(str(tmp_path / "rank1.pth"))
    assert r0["world_size"] == r1["world_size"] == 2
    _assert_same(r0["model"], r1["model"], "model")
    _assert_same(r0["optimizer"], r1["optimizer"], "optimizer")
    _assert_same(r0["model"], _load(str(tmp_path / "output" / "model_final.pth"))["model"])
    early = _load(str(tmp_path / "output" / "model_0000001.pth"))["model"]
    assert any(not torch.equal(early[k], r0["model"][k]) for k in early), "no training happened"
