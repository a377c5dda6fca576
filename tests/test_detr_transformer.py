"""d2detr.modeling.transformer against PyTorch's own transformer layers.

Without position embeddings DETR's layers are exactly ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` (same parameter names: post-norm by default,
``norm_first`` for pre-norm), an independent reference for the layer wiring; the
position embeddings are checked against Hugging Face's DETR in test_convert_detr.py.
"""
import pytest
import torch
from torch import nn

from d2detr.modeling.transformer import (
    DetrTransformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)

D, H, FFN = 32, 4, 64


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
def test_layers_match_torch_nn_transformer_layers(pre_norm):
    torch.manual_seed(0)
    kw = dict(dropout=0.0, batch_first=True, norm_first=pre_norm)
    ref_enc = nn.TransformerEncoderLayer(D, H, FFN, **kw).eval()
    ref_dec = nn.TransformerDecoderLayer(D, H, FFN, **kw).eval()
    enc = TransformerEncoderLayer(D, H, FFN, dropout=0.0, normalize_before=pre_norm).eval()
    dec = TransformerDecoderLayer(D, H, FFN, dropout=0.0, normalize_before=pre_norm).eval()
    with torch.no_grad():  # non-trivial LayerNorms
        for m in (ref_enc, ref_dec):
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn_like(p))
    enc.load_state_dict(ref_enc.state_dict(), strict=True)
    dec.load_state_dict(ref_dec.state_dict(), strict=True)

    src = torch.randn(2, 12, D)
    tgt = torch.randn(2, 5, D)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    with torch.no_grad():
        torch.testing.assert_close(
            enc(src, key_padding_mask=pad), ref_enc(src, src_key_padding_mask=pad), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            dec(tgt, src, memory_key_padding_mask=pad),
            ref_dec(tgt, src, memory_key_padding_mask=pad),
            atol=1e-5, rtol=0,
        )


def test_positions_go_to_queries_and_keys_not_values():
    """With positions p, self-attention equals attention over (x+p, x+p, x)."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(D, H, FFN, dropout=0.0).eval()
    x, p = torch.randn(1, 6, D), torch.randn(1, 6, D)
    with torch.no_grad():
        attn = layer.self_attn(x + p, x + p, x, need_weights=False)[0]
        expected = layer.norm1(x + attn)
        expected = layer.norm2(expected + layer.linear2(torch.relu(layer.linear1(expected))))
        torch.testing.assert_close(layer(x, pos=p), expected, atol=1e-6, rtol=0)


def test_decoder_normalises_returned_outputs_only():
    """The final LayerNorm goes on every returned output, not on what the next layer gets."""
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(D, H, FFN, dropout=0.0)
    norm = nn.LayerNorm(D)
    with torch.no_grad():
        norm.weight.add_(torch.randn(D))
    dec = TransformerDecoder(layer, 3, norm, return_intermediate=True).eval()
    last = TransformerDecoder(layer, 3, norm, return_intermediate=False).eval()
    last.load_state_dict(dec.state_dict())
    tgt, mem = torch.zeros(2, 4, D), torch.randn(2, 9, D)
    qpos, pos = torch.randn(2, 4, D), torch.randn(2, 9, D)
    with torch.no_grad():
        hs = dec(tgt, mem, pos=pos, query_pos=qpos)
        x, outs = tgt, []
        for lyr in dec.layers:
            x = lyr(x, mem, pos=pos, query_pos=qpos)
            outs.append(norm(x))
        assert hs.shape == (3, 2, 4, D)
        torch.testing.assert_close(hs, torch.stack(outs), atol=1e-6, rtol=0)
        torch.testing.assert_close(last(tgt, mem, pos=pos, query_pos=qpos), hs[-1:], atol=1e-6, rtol=0)


def test_detr_transformer_shapes_and_init():
    t = DetrTransformer(d_model=D, nhead=H, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=FFN)
    assert t.encoder.norm is None and t.decoder.norm is not None  # post-norm: only the decoder's
    pre = DetrTransformer(d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                          dim_feedforward=FFN, normalize_before=True)
    assert isinstance(pre.encoder.norm, nn.LayerNorm)
    src, pos = torch.randn(2, D, 3, 5), torch.randn(2, D, 3, 5)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    hs, memory = t.eval()(src, mask, torch.randn(7, D), pos)
    assert hs.shape == (3, 2, 7, D) and memory.shape == src.shape
    with pytest.raises(ValueError):
        TransformerEncoderLayer(D, H, FFN, activation="tanh")
