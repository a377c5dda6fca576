"""Every shipped model config still resolves to the model it was before the multi-scale core moved
into ``d2detr/modeling`` (``tests/data/model_signatures.json``, see ``tests/model_signatures.py``):
the same parameter and buffer names and shapes, the same parameter counts, and -- with weights
that depend only on each tensor's name -- the same detections and training losses."""
import json

import pytest
import torch

from model_signatures import SIGNATURES, TIE, signature

with open(SIGNATURES) as f:
    RECORDED = json.load(f)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("config", sorted(RECORDED))
def test_config_resolves_to_the_recorded_model(config):
    expected = RECORDED[config]
    got = signature(config)
    for key in ("num_parameters", "num_trainable", "num_state_dict_keys", "state_dict_layout_sha1"):
        assert got[key] == expected[key], f"{config}: {key}"
    assert got["top_scores"] == pytest.approx(expected["top_scores"], abs=2e-5)
    scores = expected["top_scores"]
    if len(scores) > 5 and scores[0] - scores[5] < TIE:
        # The top detections are ties (Conditional DETR with these synthetic weights: ten scores
        # within 1e-6), so which of them come first, and which tied ones make the cut of the
        # detections, depends on the CPU's float summation order: each recorded top box must be
        # one of the boxes tied with the best, and the sum over all boxes agrees to 1e-3.
        near = torch.tensor(got["near_top_boxes"])
        for box in expected["top_boxes"]:
            assert (near - torch.tensor(box)).abs().max(1).values.min() < 2e-3, f"{config}: top box {box} missing"
        assert got["box_sum"] == pytest.approx(expected["box_sum"], rel=1e-3)
    else:
        assert torch.tensor(got["top_boxes"]) == pytest.approx(torch.tensor(expected["top_boxes"]), abs=2e-3)
        assert got["box_sum"] == pytest.approx(expected["box_sum"], rel=1e-4)
    assert sorted(got["losses"]) == sorted(expected["losses"])
    for k, v in expected["losses"].items():
        assert got["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), f"{config}: {k}"
