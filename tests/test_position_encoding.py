import math

import pytest
import torch

from d2detr.layers import PositionEmbeddingLearned, PositionEmbeddingSine


def _reference(mask, num_pos_feats, temperature, offset, scale=2 * math.pi, eps=1e-6):
    """Direct, loop-based formula: pe[2i] = sin(p / T^(2i/d)), pe[2i+1] = cos(p / T^(2i/d))."""
    B, H, W = mask.shape
    out = torch.zeros(B, 2 * num_pos_feats, H, W, dtype=torch.float64)
    for b in range(B):
        valid = ~mask[b]
        h = int(valid[:, 0].sum())
        w = int(valid[0, :].sum())
        for y in range(H):
            for x in range(W):
                # cumulative counts of valid pixels along each axis (padding is bottom/right)
                cy = min(y + 1, h) if x < w else 0
                cx = min(x + 1, w) if y < h else 0
                last_y = h if x < w else 0
                last_x = w if y < h else 0
                py = (cy + offset) / (last_y + eps) * scale
                px = (cx + offset) / (last_x + eps) * scale
                for k in range(num_pos_feats):
                    freq = temperature ** (2 * (k // 2) / num_pos_feats)
                    f = math.sin if k % 2 == 0 else math.cos
                    out[b, k, y, x] = f(py / freq)
                    out[b, num_pos_feats + k, y, x] = f(px / freq)
    return out


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_sine_matches_formula(offset):
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = True  # image 1 is 3x4, padded to 5x6
    mask[1, :, 4:] = True
    pe = PositionEmbeddingSine(num_pos_feats=8, temperature=20, offset=offset)(mask)
    assert pe.shape == (2, 16, 5, 6)
    ref = _reference(mask, 8, 20, offset).float()
    # Fully padded rows/columns divide by eps: with offset -0.5 the angle is ~1e6 and
    # float32 vs float64 sin() differ there; those positions are masked out anyway.
    valid = (~mask)[:, None].expand_as(pe)
    torch.testing.assert_close(pe[valid], ref[valid], atol=1e-5, rtol=1e-5)
    if offset == 0.0:
        torch.testing.assert_close(pe, ref, atol=1e-5, rtol=1e-5)


def test_sine_matches_detr_reference_default():
    # DETR's original implementation, verbatim arithmetic
    mask = torch.zeros(1, 4, 7, dtype=torch.bool)
    mask[:, :, 5:] = True
    n, T, scale = 128, 10000, 2 * math.pi
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * scale
    x = x / (x[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(n, dtype=torch.float32)
    dim_t = T ** (2 * (dim_t // 2) / n)
    px, py = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
    px = torch.stack((px[:, :, :, 0::2].sin(), px[:, :, :, 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[:, :, :, 0::2].sin(), py[:, :, :, 1::2].cos()), dim=4).flatten(3)
    ref = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
    torch.testing.assert_close(PositionEmbeddingSine()(mask), ref)


def test_learned_shapes():
    m = PositionEmbeddingLearned(num_pos_feats=16)
    pe = m(torch.zeros(3, 4, 5, dtype=torch.bool))
    assert pe.shape == (3, 32, 4, 5)
    # x half depends only on column, y half only on row
    assert torch.equal(pe[0, :16, 0], pe[0, :16, 3])
    assert torch.equal(pe[0, 16:, :, 0], pe[0, 16:, :, 4])
