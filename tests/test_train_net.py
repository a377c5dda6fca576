"""tools/train_net.py end to end on CPU: training writes metrics and checkpoints,
--resume after a kill continues exactly, a NaN loss stops training cleanly,
--eval-only evaluates, and two gloo workers keep identical replicas."""
import glob
import importlib.util
import json
import math
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
    killed = subprocess.run(
        cmd + opts + ["model.kill_at_iter=4"], env=env, capture_output=True, text=True, timeout=300
    )
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
    # Then a NaN loss on rank 1 only: both workers must stop at that iteration
    # (rank 0 would otherwise wait forever in DDP's gradient all-reduce).
    args = _args(config, "model.nan_at_iter=1", "model.nan_rank=1", f"train.output_dir={dump_dir}/nan", num_gpus=2)
    try:
        do_train(args, setup(args))
        nan_error = None
    except FloatingPointError as e:
        nan_error = str(e)
    torch.save(
        {
            "model": state,
            "optimizer": trainer.optimizer.state_dict(),
            "world_size": comm.get_world_size(),
            "nan_error": nan_error,
        },
        os.path.join(dump_dir, f"rank{comm.get_rank()}.pth"),
    )


@pytest.mark.timeout(600)
def test_two_cpu_workers_keep_replicas_identical(tmp_path):
    """Two gloo workers, each on its own image and seeded differently (seed + rank):
    after a few steps both ranks hold the same weights and optimizer state, which only
    holds if DDP broadcast the initial weights and averaged the gradients. A NaN loss on
    one worker stops both at the same iteration."""
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
    for r in (r0, r1):
        assert r["nan_error"] is not None and "iteration=1 on at least one worker" in r["nan_error"]


def _write_real_config(tmp_path):
    """Deformable DETR (MobileNetV2, the CPU-sized variant) composed with
    configs/common/{data/coco_detr,optim,train}.py, on the toy datasets at toy sizes."""
    common = os.path.join(REPO, "configs", "common")
    text = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
from detectron2.config import LazyCall as L, LazyConfig
from fvcore.common.param_scheduler import MultiStepParamScheduler
from test_train_toy import register_toy_datasets

register_toy_datasets({str(tmp_path / "data")!r})
model = LazyConfig.load({os.path.join(REPO, "projects/deformable_detr/configs/models/deformable_detr_mobilenetv2.py")!r}, "model")
model.backbone.pretrained = False
model.num_classes = 2
model.num_queries = 10
model.transformer.encoder.num_layers = model.transformer.decoder.num_layers = 1
dataloader = LazyConfig.load({os.path.join(common, "data", "coco_detr.py")!r}, "dataloader")
dataloader.train.dataset.names = "toy_train"
dataloader.test.dataset.names = "toy_val"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = dataloader.test.num_workers = 0
dataloader.train.mapper.augmentation.min_sizes = [48]
dataloader.train.mapper.augmentation.max_size = 96
dataloader.train.mapper.augmentation_with_crop.update(
    min_sizes=[48], max_size=96, crop_resize_sizes=[48], crop_size=[32, 48])
dataloader.test.mapper.augmentation.update(min_size=48, max_size=96)
optimizer = LazyConfig.load({os.path.join(common, "optim.py")!r}, "AdamW")
optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = dict(backbone=0.1, sampling_offsets=0.1, reference_points=0.1)
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[40], num_updates=50)
train = LazyConfig.load({os.path.join(common, "train.py")!r}, "train")
train.update(output_dir={str(tmp_path / "output")!r}, max_iter=1, device="cpu", seed=3, log_period=1,
             eval_period=0, checkpointer=dict(period=100, max_to_keep=1))
"""
    path = tmp_path / "deformable_toy.py"
    path.write_text(text)
    return str(path)


def test_real_deformable_detr_with_common_configs(tmp_path):
    """The shared configs drive a real model: DetrDatasetMapper pipeline, the AdamW
    param groups (backbone and sampling-offset/reference-point projections at 0.1 x lr),
    clipping, checkpoint and COCO evaluation."""
    config = _write_real_config(tmp_path)
    main(_args(config))
    out = str(tmp_path / "output")
    rows = _metrics(out)
    train_rows = [r for r in rows if "total_loss" in r]
    assert len(train_rows) == 1 and all(math.isfinite(r["total_loss"]) for r in train_rows)
    assert {"loss_class", "loss_bbox", "loss_giou"} <= train_rows[0].keys()
    assert "bbox/AP" in rows[-1]

    ckpt = _load(os.path.join(out, "model_final.pth"))
    groups = ckpt["trainer"]["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([2e-5, 2e-4])
    names = [n for n, p in _named_trainable(config)]
    lr_of = {}
    for g in groups:
        for idx in g["params"]:
            lr_of[names[idx]] = g["initial_lr"]
    for name, lr in lr_of.items():
        slow = name.startswith("backbone.") or "sampling_offsets" in name or "reference_points" in name
        assert lr == pytest.approx(2e-5 if slow else 2e-4), name


def _named_trainable(config):
    """Parameter names in the optimizer's order (get_default_optimizer_params's order
    before grouping is lost; rebuild it the way the optimizer saw it)."""
    from detectron2.config import instantiate

    cfg = load_config(_args(config))
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    index = {id(p): n for n, p in model.named_parameters()}
    return [(index[id(p)], p) for g in opt.param_groups for p in g["params"]]


# --------------------------------------------------------------------------- real tiny models
def _write_tiny_train_config(tmp_path, method="deformable_detr_refine", num_train=5, shuffle=True, model_extra="",
                             **train):
    """A full train config around a real tiny model of ``method`` (tests/tiny_configs.py), wrapped
    in tests/train_faults.py's ``with_faults`` (no fault unless overridden), on ``num_train`` toy
    images with d2detr's resumable loader: shuffled, RandomFlip + ResizeShortestEdge (three
    sizes), batch 2."""
    from tiny_configs import write_tiny_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    model_cfg = write_tiny_config(tmp_path, method, num_classes=2, extra=model_extra)
    items = dict(output_dir=str(tmp_path / "output"), max_iter=6, device="cpu", seed=5, log_period=1,
                 eval_period=0, checkpointer=dict(period=2, max_to_keep=10))
    items.update(train)
    text = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
from detectron2.config import LazyCall as L, LazyConfig
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from fvcore.common.param_scheduler import MultiStepParamScheduler
from d2detr.data import DetrDatasetMapper, build_detr_train_loader
from test_train_toy import register_toy_datasets
from train_faults import with_faults

register_toy_datasets({str(tmp_path / "data")!r}, num_train={num_train})
model = L(with_faults)(model=LazyConfig.load({model_cfg!r}).model)
dataloader = dict(train=L(build_detr_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="toy_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(is_train=True, augmentation=[
        L(T.RandomFlip)(horizontal=True),
        L(T.ResizeShortestEdge)(short_edge_length=(40, 48, 56), max_size=96, sample_style="choice"),
    ]),
    total_batch_size=2, num_workers=0, shuffle={shuffle!r}))
optimizer = LazyConfig.load({os.path.join(REPO, "configs/common/optim.py")!r}, "AdamW")
optimizer.lr = 1e-3
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[5], num_updates=6)
train = LazyConfig.load({os.path.join(REPO, "configs/common/train.py")!r}, "train")
train.update({items!r})
"""
    path = tmp_path / "train_config.py"
    path.write_text(text)
    return str(path)


@pytest.mark.timeout(600)
def test_real_model_resume_with_shuffle_and_augmentation_is_exact(tmp_path):
    """A real Deformable DETR (box refinement, dropout 0.1) on 5 images, shuffled every epoch,
    with random flips and sizes: SIGKILLed at iteration 4 and resumed from the checkpoint of
    iteration 3, it ends with bitwise the weights and optimizer state of an uninterrupted run (which
    needs the same images, flips, sizes and dropout masks in iterations 4 and 5)."""
    ref_cfg = _write_tiny_train_config(tmp_path / "ref")
    main(_args(ref_cfg))
    reference = _load(str(tmp_path / "ref" / "output" / "model_final.pth"))

    config = _write_tiny_train_config(tmp_path / "run")
    out = tmp_path / "run" / "output"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    killed = subprocess.run(cmd + ["model.kill_at_iter=4"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"

    main(_args(config, resume=True))
    resumed = _load(str(out / "model_final.pth"))
    rows = [r for r in _metrics(str(out)) if "total_loss" in r]
    ref_rows = [r for r in _metrics(str(tmp_path / "ref" / "output")) if "total_loss" in r]
    assert [r["iteration"] for r in rows] == list(range(6))
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]
    for key in ("iteration", "model", "trainer", "train_sampler"):
        _assert_same(resumed[key], reference[key], key)
    assert resumed["train_sampler"]["shuffle"] and reference["trainer"]["seed"] >= 0


def test_nonresumable_loader_warns_on_resume(tmp_path):
    """Detectron2's own train loader restarts its order on --resume: the log says so."""
    config = write_toy_config(tmp_path, max_iter=2, checkpointer=dict(period=1, max_to_keep=10))
    main(_args(config))
    main(_args(config, "train.max_iter=3", resume=True))
    log = (tmp_path / "output" / "log.txt").read_text()
    assert "Resuming at iteration 2 with a train loader that cannot skip ahead" in log


def test_label_outside_num_classes_names_the_record(tmp_path):
    """A category id the model has no class for stops training with the record's file name and
    image id (do_train gives DetrDatasetMapper the model's num_classes)."""
    config = _write_tiny_train_config(tmp_path, max_iter=1)
    with pytest.raises(ValueError, match=r"toy_train/00\d\.png.*image_id \d\).*category_id 1 .*num_classes=1"):
        main(_args(config, "model.model.num_classes=1", "dataloader.train.shuffle=False"))


def _ddp_real_worker(config, dump_dir):
    from detectron2.utils import comm

    from d2detr.engine import do_train, setup

    # aux_loss=False with box refinement under DDP (find_unused_parameters=False): a parameter
    # without a gradient would fail the second iteration's forward.
    args = _args(config, "model.model.aux_loss=False", num_gpus=2)
    cfg = setup(args)
    assert cfg.train.ddp.find_unused_parameters is False
    trainer = do_train(args, cfg)
    state = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    # Then the backbone overflows on rank 1 only, at iteration 1.
    args = _args(config, "model.nonfinite_at_iter=1", "model.nonfinite_rank=1",
                 f"train.output_dir={dump_dir}/nonfinite", num_gpus=2)
    try:
        do_train(args, setup(args))
        error = None
    except FloatingPointError as e:
        error = str(e)
    torch.save({"model": state, "error": error}, os.path.join(dump_dir, f"rank{comm.get_rank()}.pth"))


@pytest.mark.timeout(600)
def test_two_workers_real_model_aux_loss_off_and_nonfinite_predictions(tmp_path):
    """Two gloo workers training a real Deformable DETR with box refinement and aux_loss=False
    finish with identical replicas (every parameter reached DDP's reducer); predictions that
    overflow on rank 1 only stop both workers at that iteration with the same message, before
    the matcher would have raised on rank 1 alone."""
    config = _write_tiny_train_config(tmp_path, max_iter=3, device="cpu")
    launch(_ddp_real_worker, 2, dist_url="auto", args=(config, str(tmp_path)), device="cpu")
    r0, r1 = _load(str(tmp_path / "rank0.pth")), _load(str(tmp_path / "rank1.pth"))
    _assert_same(r0["model"], r1["model"], "model")
    for r in (r0, r1):
        assert r["error"] is not None
        assert "non-finite predictions" in r["error"] and "worker(s) [1] of 2" in r["error"], r["error"]
        assert "iteration=1;" in r["error"], r["error"]


def _loader(num_workers=0, shuffle=True, seed=11, total_batch_size=2):
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T

    from d2detr.data import DetrDatasetMapper, build_detr_train_loader

    mapper = DetrDatasetMapper(is_train=True, augmentation=[
        T.RandomFlip(horizontal=True),
        T.ResizeShortestEdge(short_edge_length=(40, 48, 56), max_size=96, sample_style="choice"),
    ])
    return build_detr_train_loader(DatasetCatalog.get("toy_train"), mapper=mapper, total_batch_size=total_batch_size,
                                   num_workers=num_workers, shuffle=shuffle, seed=seed)


def _take(loader, n):
    it = iter(loader)
    return [[(x["image_id"], x["image"].clone(), x["instances"].gt_boxes.tensor.clone()) for x in next(it)]
            for _ in range(n)]


def test_resumable_loader_order_augmentation_and_skip(tmp_path):
    """build_detr_train_loader: every epoch is a new permutation of all images; augmentations
    vary (flips, three sizes) but are a function of (seed, epoch, image); started at iteration 3
    (also with a data worker process) it yields exactly batches 3.. of a run from 0."""
    from test_train_toy import register_toy_datasets

    register_toy_datasets(str(tmp_path / "data"), num_train=5)
    ref = _take(_loader(), 10)  # 20 samples = 4 epochs of 5 images
    ids = [x[0] for batch in ref for x in batch]
    epochs = [ids[i : i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1 and any(e != [0, 1, 2, 3, 4] for e in epochs)
    sizes = {tuple(x[1].shape[1:]) for batch in ref for x in batch}
    assert sizes == {(40, 53), (48, 64), (56, 75)}, sizes
    # the same image in two epochs is augmented differently at least once (flip or size)
    first = {}
    differs = False
    for batch in ref:
        for image_id, img, _ in batch:
            if image_id in first and (first[image_id].shape != img.shape or not torch.equal(first[image_id], img)):
                differs = True
            first.setdefault(image_id, img)
    assert differs

    for num_workers in (0, 1):
        loader = _loader(num_workers=num_workers)
        loader.batch_sampler.set_start_iter(3)
        for a, b in zip(_take(loader, 7), ref[3:]):
            for (ia, xa, ba), (ib, xb, bb) in zip(a, b):
                assert ia == ib and torch.equal(xa, xb) and torch.equal(ba, bb)

    # Without shuffling: dataset order, epoch after epoch.
    assert [x[0] for batch in _take(_loader(shuffle=False), 5) for x in batch] == [0, 1, 2, 3, 4] * 2
    with pytest.raises(ValueError, match="multiple of the number of workers"):
        _loader(total_batch_size=0)
