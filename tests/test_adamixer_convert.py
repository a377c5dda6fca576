"""Official AdaMixer / DEQDet checkpoints: state dicts with the official mmdet names and shapes
(written out below from the official modules) convert, load strictly into our configs, and put
every tensor where it belongs; the official parameter counts follow from the same shapes."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from d2detr.checkpoint import apply_overrides, convert_hf_checkpoint, detect_model_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAMIXER_CFG = os.path.join(ROOT, "projects/adamixer/configs/models/adamixer_r50.py")
DEQDET_CFG = os.path.join(ROOT, "projects/deqdet/configs/models/deqdet_r50.py")
RNNDET_CFG = os.path.join(ROOT, "projects/rnndet/configs/models/rnndet_r50.py")
RESNET_CHANNELS = [256, 512, 1024, 2048]


def official_state_dict(fmt, depth=50, num_classes=80, queries=100, heads=6, width=256, in_points=32,
                        out_points=128, groups=4, ffn=2048, num_heads=8, kernel=1, make=torch.randn):
    """The tensors of an official checkpoint: ``fmt`` "adamixer" (mmdet 2 ``QueryBased``) or "deqdet"
    (mmdet 3 ``DEQDet``, whose heads also carry mmdet DIIHead's unused dynamic conv)."""
    import torchvision

    resnet = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]()
    sd = {f"backbone.{k}": make(v.shape) if v.is_floating_point() else v for k, v in resnet.state_dict().items()
          if not k.startswith("fc.")}
    convs = "lateral_convs" if fmt == "adamixer" else "convs"
    for lvl, c in enumerate(RESNET_CHANNELS):
        sd[f"neck.{convs}.{lvl}.conv.weight"] = make(width, c, kernel, kernel)
        sd[f"neck.{convs}.{lvl}.conv.bias"] = make(width)
    sd["neck.gn_out.weight"], sd["neck.gn_out.bias"] = make(width), make(width)
    sd["rpn_head.init_proposal_bboxes.weight"] = make(queries, 4)
    content = "init_content_features" if fmt == "adamixer" else "init_proposal_features"
    sd[f"rpn_head.{content}.weight"] = make(queries, width)
    g_dim = width // groups

    def linear(name, n_out, n_in):
        sd[name + ".weight"], sd[name + ".bias"] = make(n_out, n_in), make(n_out)

    def norm(name, n):
        sd[name + ".weight"], sd[name + ".bias"] = make(n), make(n)

    for h in range(heads):
        p = f"roi_head.bbox_head.{h}."
        sd[p + "attention.attn.in_proj_weight"] = make(3 * width, width)
        sd[p + "attention.attn.in_proj_bias"] = make(3 * width)
        linear(p + "attention.attn.out_proj", width, width)
        norm(p + "attention_norm", width)
        linear(p + "ffn.layers.0.0", ffn, width)
        linear(p + "ffn.layers.1", width, ffn)
        norm(p + "ffn_norm", width)
        for branch in ("cls_fcs", "reg_fcs"):
            linear(p + f"{branch}.0", width, width)
            norm(p + f"{branch}.1", width)
        linear(p + "fc_cls", num_classes, width)
        linear(p + "fc_reg", 4, width)
        linear(p + "sampling_n_mixing.sampling_offset_generator.0", groups * in_points * 3, width)
        norm(p + "sampling_n_mixing.norm", width)
        linear(p + "sampling_n_mixing.adaptive_mixing.parameter_generator.0",
               groups * (g_dim * g_dim + in_points * out_points), width)
        linear(p + "sampling_n_mixing.adaptive_mixing.out_proj", width, g_dim * out_points * groups)
        sd[p + "iof_tau"] = make(num_heads)
        if fmt == "deqdet":  # mmdet DIIHead's DynamicConv (in 256, feat 64, 7x7 RoI) and its norm
            linear(p + "instance_interactive_conv.dynamic_layer", 2 * 256 * 64, 256)
            norm(p + "instance_interactive_conv.norm_in", 64)
            norm(p + "instance_interactive_conv.norm_out", 256)
            linear(p + "instance_interactive_conv.fc_layer", 256, 256 * 49)
            norm(p + "instance_interactive_conv.fc_norm", 256)
            norm(p + "instance_interactive_conv_norm", 256)
    return sd


def official_parameter_count(sd):
    """What ``sum(p.numel() for p in model.parameters())`` gives for the official model: every
    tensor but BatchNorm's running statistics."""
    return sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def build(cfg_file, overrides):
    cfg = LazyConfig.load(cfg_file)
    apply_overrides(cfg, overrides)
    cfg.model.criterion = None
    return instantiate(cfg.model)


def frozen_bn_affine(model):
    return sum(m.weight.numel() + m.bias.numel() for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d")


@pytest.mark.parametrize("fmt,cfg_file", [("adamixer", ADAMIXER_CFG), ("deqdet", DEQDET_CFG)])
def test_official_r50_sizes_load_strictly_and_count(fmt, cfg_file):
    """Official R50 shapes at 80 classes: detected, converted, loaded strictly into our R50 config
    with the overrides the converter reads off the tensors (which are the config's defaults), and
    the official parameter count = ours + the BatchNorm affine parameters (frozen buffers here)
    + the fixed initial boxes (a buffer here) [+ DEQDet's unused DIIHead dynamic convs]."""
    heads = 6 if fmt == "adamixer" else 2
    kw = dict(heads=heads, in_points=32 if fmt == "adamixer" else 64, kernel=1 if fmt == "adamixer" else 3)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        sd = official_state_dict(fmt, make=torch.empty, **kw)
        assert detect_model_type(sd) == f"{fmt}_mmdet"
        converted, overrides = convert_hf_checkpoint(sd)
        model = build(cfg_file, overrides)
    defaults = LazyConfig.load(cfg_file)
    assert overrides["model.stage.in_points"] == defaults.model.stage.in_points
    assert overrides["model.stage.out_points"] == 128 and overrides["model.stage.num_groups"] == 4
    assert overrides["model.num_queries"] == 100 and overrides["model.num_classes"] == 80
    model.load_state_dict(converted, strict=True, assign=True)
    ours = sum(p.numel() for p in model.parameters())
    unused = sum(v.numel() for k, v in sd.items() if "instance_interactive_conv" in k)
    assert official_parameter_count(sd) == ours + frozen_bn_affine(model) + 100 * 4 + unused
    expected = {"adamixer": (134_737_384, 0), "deqdet": (77_705_592, 23_269_120)}[fmt]  # README table
    assert (ours, unused) == expected


def test_converted_tensors_land_in_place_and_tool_verifies(tmp_path, capsys):
    """Random values, a smaller model (3 stages, 20 queries, 5 classes, 4 x 16 -> 32 points): every
    official tensor is found at its new name with the same values; tools/convert_checkpoint.py
    converts the file and loads it strictly into our config."""
    import importlib.util

    torch.manual_seed(0)
    sd = official_state_dict("adamixer", num_classes=5, queries=20, heads=3, in_points=16, out_points=32, ffn=512)
    converted, overrides = convert_hf_checkpoint(sd)
    assert overrides["model.num_stages"] == 3 and overrides["model.stage.in_points"] == 16
    assert overrides["model.stage.ffn_dim"] == 512 and overrides["model.stage.num_cls_fcs"] == 1
    pairs = {
        "roi_head.bbox_head.2.attention.attn.in_proj_weight": "stages.2.attention.in_proj_weight",
        "roi_head.bbox_head.1.ffn.layers.1.weight": "stages.1.ffn.3.weight",
        "roi_head.bbox_head.0.sampling_n_mixing.adaptive_mixing.parameter_generator.0.bias":
            "stages.0.sampling_mixing.adaptive_mixing.parameter_generator.bias",
        "roi_head.bbox_head.2.sampling_n_mixing.sampling_offset_generator.0.weight":
            "stages.2.sampling_mixing.sampling_offset_generator.weight",
        "roi_head.bbox_head.1.reg_fcs.1.weight": "stages.1.reg_fcs.1.weight",
        "neck.lateral_convs.3.conv.weight": "neck.input_proj.3.0.weight",
        "neck.gn_out.bias": "neck.shared_norm.bias",
        "rpn_head.init_content_features.weight": "queries.content.weight",
        "backbone.layer3.5.bn2.running_var": "backbone.res4.5.conv2.norm.running_var",
        "backbone.layer1.0.downsample.0.weight": "backbone.res2.0.shortcut.weight",
    }
    for src, dst in pairs.items():
        assert torch.equal(converted[dst], sd[src]), (src, dst)
    src = tmp_path / "adamixer_official.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": sd}, src)
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools/convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(src), str(tmp_path / "out.pth"), "--config-file", ADAMIXER_CFG])  # exits unless strict load works
    out = capsys.readouterr().out
    assert "converted adamixer_mmdet" in out and "verified" in out
    saved = torch.load(tmp_path / "out.pth", weights_only=True)
    assert saved["overrides"]["model.num_stages"] == 3 and saved["model_type"] == "adamixer_mmdet"


def test_deqdet_checkpoint_into_deqdet_and_rnndet():
    """The two official heads become ``init_stage`` / ``refine_stage`` (RNNDet has the same
    weights); DIIHead's unused tensors are dropped, anything unknown is refused."""
    torch.manual_seed(0)
    sd = official_state_dict("deqdet", heads=2, queries=10, num_classes=3, in_points=4, out_points=8, ffn=64,
                             width=64, kernel=3)
    converted, overrides = convert_hf_checkpoint(sd)
    assert overrides["model.neck.kernel_size"] == 3 and overrides["model.stage.in_points"] == 4
    assert torch.equal(converted["refine_stage.iof_tau"], sd["roi_head.bbox_head.1.iof_tau"])
    assert torch.equal(converted["init_stage.fc_cls.weight"], sd["roi_head.bbox_head.0.fc_cls.weight"])
    assert not any("instance_interactive" in k for k in converted)
    for cfg_file in (DEQDET_CFG, RNNDET_CFG):
        build(cfg_file, overrides).load_state_dict(converted, strict=True)
    sd["roi_head.bbox_head.1.something_new"] = torch.zeros(3)
    with pytest.raises(KeyError, match="something_new"):
        convert_hf_checkpoint(sd)
    with pytest.raises(ValueError, match="initial and a refinement head"):
        convert_hf_checkpoint({k: v for k, v in sd.items() if ".bbox_head.1." not in k}, model_type="deqdet_mmdet")
