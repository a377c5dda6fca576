"""A converted checkpoint carries the config overrides that build its model, and every entry
point applies them itself: ``tools/convert_checkpoint.py`` on a tiny random Hugging Face
Deformable DETR (plain: its ~30 overrides include lists such as ``['res3', 'res4', 'res5']``)
stores them and prints them shell-safe; ``train_net.py`` (``--eval-only``), ``demo.py`` and the
tools' config loader build the checkpoint's model from the plain method config plus
``train.init_checkpoint=...``, with a log line, and keys given on the command line win."""
import logging
import os
import shlex

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.config import LazyConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from helpers import run_convert_checkpoint  # noqa: E402
from test_tools import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)
from test_convert_deformable_detr import MODEL_CONFIG, build_hf_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(path of the converted checkpoint, its stored overrides, convert_checkpoint's stdout)."""
    tmp = tmp_path_factory.mktemp("converted")
    hf = build_hf_model(num_labels=3)
    hf.save_pretrained(str(tmp / "hf"))
    out = tmp / "deformable.pth"
    stdout, saved = run_convert_checkpoint(tmp / "hf", out, MODEL_CONFIG)
    assert len(saved["overrides"]) >= 25
    return str(out), saved["overrides"], stdout, saved["model"]


def _assert_applied(cfg, overrides, except_keys=()):
    for key, value in overrides.items():
        if key in except_keys:
            continue
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_object(got) if OmegaConf.is_config(got) else got
        assert got == (list(value) if isinstance(value, tuple) else value), key


def test_printed_overrides_are_shell_safe(converted):
    """The printed line, split by a shell, gives the stored values back through LazyConfig."""
    _, overrides, stdout, _ = converted
    assert any(isinstance(v, list) and len(v) > 1 for v in overrides.values())  # e.g. out_features
    lines = stdout.splitlines()
    line = lines[lines.index(next(x for x in lines if x.startswith("stored in"))) + 1]
    argv = shlex.split(line)
    assert len(argv) == len(overrides)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(MODEL_CONFIG), argv)
    _assert_applied(cfg, overrides)


def test_tools_config_loader_applies_stored_overrides(converted, caplog):
    from d2detr.export.cli import build_model, load_config

    path, overrides, _, state = converted
    with caplog.at_level(logging.INFO, logger="d2detr"):
        cfg = load_config(MODEL_CONFIG, [f"train.init_checkpoint={path}"])
    assert f"applied {len(overrides)} config overrides stored in the checkpoint" in caplog.text
    _assert_applied(cfg, overrides)
    model = build_model(cfg)
    own = model.state_dict()
    assert set(own) == set(state)  # every tensor of the checkpoint has its place, none is left out
    for k, v in state.items():
        assert torch.equal(own[k], v), k

    # a key given on the command line wins over the stored one
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="d2detr"):
        cfg = load_config(MODEL_CONFIG, [f"train.init_checkpoint={path}", "model.num_queries=7"])
    assert cfg.model.num_queries == 7 and overrides["model.num_queries"] == 12
    assert "the command line's value kept for model.num_queries" in caplog.text
    _assert_applied(cfg, overrides, except_keys={"model.num_queries"})


def test_stored_override_missing_from_config_is_an_error(converted):
    from d2detr.export.cli import load_config

    path, _, _, _ = converted
    detr = os.path.join(REPO, "projects/detr/configs/models/detr_r50.py")
    with pytest.raises(KeyError, match="builds another model than the checkpoint's"):
        load_config(detr, [f"train.init_checkpoint={path}"])


def test_demo_and_train_net_apply_stored_overrides(converted, tmp_path, monkeypatch):
    """demo.py runs the checkpoint's exact weights from the plain method config +
    train.init_checkpoint; train_net.py fine-tunes from it the same way, and its checkpoints carry
    the overrides on, so --eval-only of the fine-tuned model needs nothing else either."""
    import cv2
    import numpy as np
    from detectron2.engine import default_argument_parser
    from test_train_toy import register_toy_datasets
    from test_tools import load_tool
    from test_trained_model_paths import spy_evaluated_weights

    from d2detr.engine import main
    from d2detr.export.cli import build_model

    path, overrides, _, state = converted
    demo = load_tool("demo")
    built = []
    monkeypatch.setattr(demo, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    image = str(tmp_path / "img.png")
    cv2.imwrite(image, np.random.RandomState(0).randint(0, 255, (60, 80, 3)).astype(np.uint8))
    demo.main(demo.get_parser().parse_args(
        ["--config-file", MODEL_CONFIG, "--input", image, "--output", str(tmp_path / "demo"), "--device", "cpu",
         "--min-size", "64", f"train.init_checkpoint={path}"]))
    own = built[0].state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v) for k, v in state.items())

    # train_net.py: fine-tune 1 iteration from the converted checkpoint with the plain R50 method
    # config (the toy data has 2 classes: model.num_classes=2 on the command line wins), then
    # --eval-only the result, from the same plain config and nothing else
    register_toy_datasets(str(tmp_path / "data"))
    common = os.path.join(REPO, "configs", "common")
    config = tmp_path / "finetune.py"
    config.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
        "from detectron2.config import LazyCall as L, LazyConfig\n"
        "from fvcore.common.param_scheduler import MultiStepParamScheduler\n"
        "from test_train_toy import register_toy_datasets\n"
        f"register_toy_datasets({str(tmp_path / 'data')!r})\n"
        f"model = LazyConfig.load({MODEL_CONFIG!r}, 'model')\n"
        f"dataloader = LazyConfig.load({os.path.join(common, 'data', 'coco_detr.py')!r}, 'dataloader')\n"
        "dataloader.train.dataset.names = 'toy_train'\n"
        "dataloader.test.dataset.names = 'toy_val'\n"
        "dataloader.train.total_batch_size = 2\n"
        "dataloader.train.num_workers = dataloader.test.num_workers = 0\n"
        "dataloader.train.mapper.augmentation.update(min_sizes=[64], max_size=96)\n"
        "dataloader.train.mapper.augmentation_with_crop.update(\n"
        "    min_sizes=[64], max_size=96, crop_resize_sizes=[48], crop_size=[32, 48])\n"
        "dataloader.test.mapper.augmentation.update(min_size=64, max_size=96)\n"
        f"optimizer = LazyConfig.load({os.path.join(common, 'optim.py')!r}, 'AdamW')\n"
        "lr_multiplier = L(MultiStepParamScheduler)(values=[1.0], milestones=[], num_updates=1)\n"
        f"train = LazyConfig.load({os.path.join(common, 'train.py')!r}, 'train')\n"
        f"train.update(output_dir={str(tmp_path / 'out')!r}, device='cpu', max_iter=1, eval_period=0,\n"
        "             checkpointer=dict(period=100, max_to_keep=1))\n"
    )
    seen = spy_evaluated_weights(monkeypatch)
    parse = default_argument_parser().parse_args
    main(parse(["--config-file", str(config), f"train.init_checkpoint={path}", "model.num_classes=2"]))
    with open(tmp_path / "out" / "log.txt") as f:
        log = f.read()
    assert f"applied {len(overrides) - 1} config overrides stored in the checkpoint" in log
    final = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["overrides"] == dict(overrides, **{"model.num_classes": 2})  # what built this model
    tuned = final["model"]
    assert tuned["class_embed.0.weight"].shape[0] == 2
    assert all(tuned[k].shape == v.shape for k, v in state.items() if not k.startswith("class_embed"))

    final_path = str(tmp_path / "out" / "model_final.pth")
    assert "bbox" in main(parse(["--config-file", str(config), "--eval-only", f"train.init_checkpoint={final_path}"]))
    assert set(seen[-1]) == set(tuned) and all(torch.equal(seen[-1][k], v) for k, v in tuned.items())
