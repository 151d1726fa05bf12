"""Round 35: the DiT's text mask. Each test names the silent behaviour it pins."""
from __future__ import annotations

import pytest
import torch

from longcat_vc.config import DiTConfig
from longcat_vc.dit import LongCatDiT


def _model(zero_pad: bool):
    torch.manual_seed(0)
    return LongCatDiT(DiTConfig.tiny(depth=1, text_tokens_zero_pad=zero_pad)).eval()


def _inputs(m, B=2, L=6):
    c = m.config
    x = torch.randn(B, c.in_channels, 2, 4, 4)
    y = torch.randn(B, 1, L, c.caption_channels)
    t = torch.rand(B) * 1000
    return x, t, y


@pytest.mark.parametrize("zero_pad", [True, False])
@pytest.mark.parametrize("bad", [float("-inf"), -1e4, float("nan")])
def test_an_additive_or_nan_text_mask_is_refused(zero_pad, bad):
    """Nonzero = valid token: a diffusers-style additive mask (0 valid, -inf padded) was read upside down
    (padding attended, the prompt zeroed), silently when every row had padding; a NaN entry counted as
    valid. A floating mask with negative or NaN entries is now refused."""
    m = _model(zero_pad)
    x, t, y = _inputs(m)
    mask = torch.zeros(2, 6)
    mask[:, 4:] = bad
    with torch.no_grad(), pytest.raises(ValueError, match="negative or NaN"):
        m(x, t, y, encoder_attention_mask=mask)


@pytest.mark.parametrize("zero_pad", [True, False])
def test_binary_masks_of_every_dtype_still_agree(zero_pad):
    m = _model(zero_pad)
    x, t, y = _inputs(m)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    keep[1, 5:] = False
    with torch.no_grad():
        outs = [m(x, t, y, encoder_attention_mask=keep.to(dt)) for dt in (torch.bool, torch.int64, torch.float32)]
    assert not outs[0].isnan().any()
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
