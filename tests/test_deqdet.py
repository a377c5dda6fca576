"""DEQDet: the training schedule (no-grad fixed-point steps, RAG, supervision at the official
steps, RAP), its single loss dict against the official in-loss-backward formulation, activation
checkpointing, and the test-time number of steps."""
import pytest
import torch
from helpers import synthetic_batch
from tiny_configs import build_tiny, write_tiny_config

from d2detr.layers.ms_deform_attn import native_ms_deform_attn_available
from d2detr.modeling.adamixer import QueryState, boxes_to_xyzr

pytestmark = pytest.mark.skipif(not native_ms_deform_attn_available("cpu"), reason="d2detr._C not built")

LOSSES = ("loss_class", "loss_bbox", "loss_giou")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_deqdet(tmp_path, extra=""):
    """3 no-grad steps, supervision after steps 1 and 3 (tiny_configs), RAG 2, 2 extra init steps."""
    model, _ = build_tiny(write_tiny_config(tmp_path, "deqdet", extra=extra))
    return model.train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, expected):
    """Equal up to float32 summation order: each tensor within 1e-5 of its largest entry."""
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-5 * float(g.abs().max()) + 1e-12, msg=name)


def test_schedule_loss_keys_and_which_steps_carry_gradients(tmp_path):
    """Supervised: the initial stage, its 2 extra steps, and after the steps (1, 3) the result of
    2 RAG steps; the fixed-point steps run without gradient."""
    model = tiny_deqdet(tmp_path)
    calls = []
    model.refine_stage.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    losses = model(synthetic_batch())
    suffixes = ["_init", "_init1", "_init2", "_step1", "_step3"]
    assert set(losses) == {k + s for k in LOSSES for s in suffixes}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    # 2 init extra (grad) | step 1 (no grad), RAG x2 | step 2 | step 3, RAG x2
    assert calls == [True, True, False, True, True, False, False, True, True]


def test_rag_losses_start_from_the_detached_state(tmp_path):
    """The fixed-point iteration starts from the detached initial state: the RAG losses reach the
    refinement stage and the features (backbone/neck) but not the initial stage; the initial
    losses reach the initial stage."""
    model = tiny_deqdet(tmp_path)
    losses = model(synthetic_batch())
    sum(v for k, v in losses.items() if "_step" in k).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.init_stage.parameters())
    assert model.refine_stage.fc_cls.weight.grad.abs().sum() > 0
    assert model.neck.input_proj[0][0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    losses = model(synthetic_batch())
    (losses["loss_class_init"] + losses["loss_giou_init"]).backward()
    assert model.init_stage.fc_cls.weight.grad.abs().sum() > 0


def test_single_loss_dict_gradients_equal_in_loss_backward(tmp_path):
    """One backward() of the summed loss dict == the official formulation (each RAG loss
    back-propagated inside the loss function, feature gradients stashed on leaf copies), with
    both perturbations drawn at every step (same seed, same draws)."""
    from d2detr.projects.deqdet.modeling import in_loss_backward_step

    model = tiny_deqdet(tmp_path, "model.perturb_content_prob = 1.0\nmodel.perturb_position_prob = 1.0\n")
    batch = synthetic_batch()
    torch.manual_seed(7)
    losses = model(batch)
    sum(losses.values()).backward()
    single = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    official = in_loss_backward_step(model, batch)
    in_loss = grads(model)
    assert set(official) == set(losses)
    for k in losses:
        torch.testing.assert_close(official[k], losses[k].detach(), rtol=1e-5, atol=1e-6)
    assert len(single) > 100
    assert_same_gradients(in_loss, single)
    assert any(single[n].abs().sum() > 0 for n in single if n.startswith("backbone."))


def test_activation_checkpointing_same_losses_and_gradients(tmp_path):
    model = tiny_deqdet(tmp_path)
    batch = synthetic_batch()
    results = []
    for checkpointed in (False, True):
        model.checkpoint_refinement = checkpointed
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        losses = model(batch)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()}, grads(model)))
    (l0, g0), (l1, g1) = results
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k])
    assert_same_gradients(g1, g0)


def test_refinement_aware_perturbation(tmp_path):
    """RAP: contents -> 0.9 c + 0.1 ||c|| N(0, I), boxes + 25 px N(0, 1) and the position re-encoded
    from them; one decision per step (two uniform draws), nothing when both probabilities are 0."""
    model = tiny_deqdet(tmp_path, "model.perturb_content_prob = 1.0\nmodel.perturb_position_prob = 1.0\n")
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 64.0, 64.0]]])
    state = QueryState(boxes_to_xyzr(boxes), torch.randn(1, 2, 32), boxes)
    torch.manual_seed(5)
    out = model.perturb(state)
    torch.manual_seed(5)
    torch.rand(1)
    noise_c = torch.randn(1, 2, 32)
    torch.rand(1)
    noise_b = torch.randn(1, 2, 4)
    c = state.content
    torch.testing.assert_close(out.content, 0.9 * c + 0.1 * c.norm(dim=-1, keepdim=True) * noise_c)
    torch.testing.assert_close(out.boxes, boxes + 25 * noise_b)
    torch.testing.assert_close(out.xyzr, boxes_to_xyzr(boxes + 25 * noise_b))
    model.perturb_content_prob = model.perturb_position_prob = 0.0
    same = model.perturb(state)
    assert all(a is b for a, b in zip(same, state))


def test_test_time_steps_and_bf16(tmp_path):
    """Inference: the initial stage, then ``test_refinement_steps`` steps (0 gives the initial
    stage's detections); bf16 autocast training on the CPU is finite."""
    model = tiny_deqdet(tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    images, masks = model.preprocess_image([{"image": synthetic_batch()[0]["image"]}])
    with torch.no_grad():
        model.test_refinement_steps = 0
        init = model.forward_features(images, masks)
        whwh = model.image_whwh(masks)
        pyramid = model.pyramid(images, masks, model.init_stage.num_groups)
        first = model.init_stage(pyramid, model.queries(whwh))
        torch.testing.assert_close(init["pred_logits"], first.logits)
        model.test_refinement_steps = 2
        two = model.forward_features(images, masks)
        ref = model.refine_stage(pyramid, model.refine_stage(pyramid, first))
        torch.testing.assert_close(two["pred_boxes"], model.stage_outputs(ref, whwh)["pred_boxes"])


def test_bad_schedule(tmp_path):
    with pytest.raises(ValueError, match="supervision_steps"):
        tiny_deqdet(tmp_path, "model.supervision_steps = [1, 4]\n")
    with pytest.raises(ValueError, match="probability"):
        tiny_deqdet(tmp_path, "model.perturb_content_prob = 1.5\n")


def test_outputs_per_step_and_plot_refinement_steps(tmp_path):
    """``outputs_per_step`` gives, after n steps, what ``test_refinement_steps = n`` gives; the
    plot tool's AP after n steps is the AP of Detectron2's evaluation loop with that setting."""
    import importlib.util
    import os

    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import inference_on_dataset
    from tiny_configs import REPO

    from d2detr.export.cli import build_model, load_config

    model = tiny_deqdet(tmp_path).eval()
    images, masks = model.preprocess_image([{"image": synthetic_batch()[0]["image"]}])
    with torch.no_grad():
        per_step = list(model.outputs_per_step(images, masks, 3))
        for n, out in per_step:
            model.test_refinement_steps = n
            torch.testing.assert_close(out["pred_boxes"], model.forward_features(images, masks)["pred_boxes"])
    assert [n for n, _ in per_step] == [0, 1, 2, 3]

    # a two-image dataset, and a checkpoint whose boxes move from step to step
    records = []
    for i, x in enumerate(synthetic_batch()):
        path = str(tmp_path / f"img{i}.png")
        cv2.imwrite(path, x["image"].permute(1, 2, 0).numpy())
        boxes = x["instances"].gt_boxes.tensor.tolist()
        records.append({"file_name": path, "image_id": i, "height": 64, "width": 64, "annotations": [
            {"bbox": b, "bbox_mode": 0, "category_id": int(c)} for b, c in zip(boxes, x["instances"].gt_classes)]})
    name = "deqdet_refinement_steps_test"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    torch.manual_seed(0)
    for stage in (model.init_stage, model.refine_stage):
        torch.nn.init.normal_(stage.fc_reg.weight, std=0.05)
    weights = str(tmp_path / "w.pth")
    torch.save({"model": model.state_dict()}, weights)
    config = str(tmp_path / "full.py")
    with open(config, "w") as f:
        f.write(open(write_tiny_config(tmp_path, "deqdet")).read() + f'''
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf
from d2detr.data.detr_dataset_mapper import DetrDatasetMapper
dataloader = OmegaConf.create()
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="{name}", filter_empty=False),
    mapper=L(DetrDatasetMapper)(is_train=False, augmentation=[], image_format="RGB"), num_workers=0)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="{name}", output_dir=None, use_fast_impl=False)
''')
    spec = importlib.util.spec_from_file_location("plot_refinement_steps", os.path.join(REPO, "tools", "plot_refinement_steps.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out_json, out_png = str(tmp_path / "steps.json"), str(tmp_path / "steps.png")
    results = tool.main(tool.get_parser().parse_args(
        ["--run", "DEQDet", config, weights, "--max-steps", "3", "--json", out_json, "--figure", out_png]))
    run = results["runs"][0]
    assert sorted(run["steps"]) == ["1", "2", "3"] and run["test_refinement_steps"] == 3 and os.path.isfile(out_png)
    cfg = load_config(config, [f"train.init_checkpoint={weights}", "model.test_refinement_steps=2"])
    cfg.dataloader.evaluator.output_dir = str(tmp_path / "eval")
    from detectron2.config import instantiate

    ref = inference_on_dataset(build_model(cfg), instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    assert run["steps"]["2"]["AP"] == pytest.approx(ref["bbox"]["AP"], abs=1e-6)
    assert tool.main(tool.get_parser().parse_args(["--plot-only", "--json", out_json, "--figure", out_png]))["runs"]
