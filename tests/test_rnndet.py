"""RNNDet: one initial stage + one weight-tied refinement stage unrolled K times, trained through
the unroll; the number of test-time steps is an option."""
import pytest
import torch
from helpers import expected_loss_keys, synthetic_batch, training_step
from tiny_configs import build_tiny, write_tiny_config

from d2detr.layers.ms_deform_attn import native_ms_deform_attn_available
from d2detr.modeling.adamixer import AdaMixerStage

pytestmark = pytest.mark.skipif(not native_ms_deform_attn_available("cpu"), reason="d2detr._C not built")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_rnndet(tmp_path, steps, extra=""):
    config = write_tiny_config(tmp_path, "rnndet", extra=f"model.refinement_steps = {steps}\n" + extra)
    model, _ = build_tiny(config)
    return model


def record_calls(module):
    """A list that receives one entry per forward call of ``module``: whether grads were on."""
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    return calls


def test_weight_tying_by_parameter_identity(tmp_path):
    """Whatever K, the model holds exactly two stages, the same parameters, and every refinement
    step runs the one ``refine_stage`` (same module, same parameter tensors)."""
    short, long = tiny_rnndet(tmp_path, 2), tiny_rnndet(tmp_path, 6)
    for model in (short, long):
        stages = [m for m in model.modules() if isinstance(m, AdaMixerStage)]
        assert stages == [model.init_stage, model.refine_stage]
    assert sum(p.numel() for p in short.parameters()) == sum(p.numel() for p in long.parameters())
    assert not torch.equal(long.init_stage.fc_cls.weight, long.refine_stage.fc_cls.weight)  # two inits

    seen = []
    long.refine_stage.register_forward_pre_hook(
        lambda m, args: seen.append((id(m), tuple(p.data_ptr() for p in m.parameters())))
    )
    training_step(long, synthetic_batch(), expected_loss_keys(6))  # init + 5 steps as aux, the last plain
    assert len(seen) == 6 and len(set(seen)) == 1


def test_backprop_through_the_unroll(tmp_path):
    """BPTT: the last step's loss alone reaches the initial stage (through the contents), and the
    refinement stage's gradient is the sum over the steps that use it."""
    model = tiny_rnndet(tmp_path, 3)
    batch = synthetic_batch()
    model.train()
    losses = model(batch)
    final = losses["loss_class"] + losses["loss_bbox"] + losses["loss_giou"]
    final.backward()
    assert model.init_stage.ffn[0].weight.grad.abs().sum() > 0
    assert model.init_stage.fc_cls.weight.grad is None or model.init_stage.fc_cls.weight.grad.abs().sum() == 0


def test_test_time_steps_option(tmp_path):
    """``test_refinement_steps`` (default K) sets the refinement steps at inference; the
    detections are the last step's, as a hand-written loop over the stages gives them."""
    model = tiny_rnndet(tmp_path, 4).eval()
    assert model.test_refinement_steps == 4
    calls = record_calls(model.refine_stage)
    image = synthetic_batch()[0]["image"]
    images, masks = model.preprocess_image([{"image": image}])
    for steps in (0, 1, 7):
        model.test_refinement_steps = steps
        calls.clear()
        with torch.no_grad():
            out = model.forward_features(images, masks)
            whwh = model.image_whwh(masks)
            pyramid = model.pyramid(images, masks, model.init_stage.num_groups)
            state = model.init_stage(pyramid, model.queries(whwh))
            for _ in range(steps):
                state = model.refine_stage(pyramid, state)
            ref = model.stage_outputs(state, whwh)
        assert len(calls) == 2 * steps
        torch.testing.assert_close(out["pred_logits"], ref["pred_logits"])
        torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"])


def test_bad_steps(tmp_path):
    with pytest.raises(ValueError, match="refinement_steps"):
        tiny_rnndet(tmp_path, 0)
    with pytest.raises(ValueError, match="test_refinement_steps"):
        tiny_rnndet(tmp_path, 2, "model.test_refinement_steps = -1\n")
