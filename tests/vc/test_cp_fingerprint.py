"""Context parallel: the ranks' inputs are compared by a position-sensitive fingerprint.

``parallel.checksum`` gives two fp64 values per input: the row sums weighted by the row number
(swapped batch rows differ) and a sum weighted per flat element by ``frac((i + 1) * golden ratio)``,
so two values swapped inside a row (a flipped frame, permuted tokens) or a ``+d``/``-d`` pair also
differ. A full ``KVCache`` handed to ``LongCatDiT.forward`` is fingerprinted too (before: not
compared, so ranks with other caches mixed them silently). Unit tests of ``checksum`` here, and two
gloo ranks on CPU (this file run as a script, ``--worker``) for the forward.
"""

from __future__ import annotations

import os
import struct
import sys

import pytest
import torch

from longcat_vc import parallel
from longcat_vc.parallel import checksum

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_TIMEOUT_S = 20  # a rank left waiting in a collective fails fast


def _bits(values) -> list:
    return [struct.pack("<d", v) for v in values]


# ====================================================================== checksum


def _x(seed=0, shape=(2, 3, 5, 7)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_equal_inputs_give_equal_bits():
    x = _x()
    assert _bits(checksum(x)) == _bits(checksum(x.clone()))
    # a non-contiguous view of the same values gives the same numbers
    y = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not y.is_contiguous() and _bits(checksum(y)) == _bits(checksum(x))


def test_two_values_swapped_inside_a_row_differ():
    x = _x()
    y = x.clone()
    y[1, 0, 0, 0], y[1, 2, 4, 6] = x[1, 2, 4, 6], x[1, 0, 0, 0]
    assert checksum(y)[0] == checksum(x)[0]  # what the row sums alone saw: nothing
    assert checksum(y)[1] != checksum(x)[1]


def test_a_flipped_frame_differs():
    x = _x(1, (1, 4, 3, 6, 8))
    y = x.clone()
    y[:, :, 1] = x[:, :, 1].flip(-1)
    assert checksum(y) != checksum(x)


def test_a_cancelling_pair_differs():
    x = _x(2)
    x[0, 1, 2, 3] = x[0, 2, 1, 0] = 1.0
    y = x.clone()
    y[0, 1, 2, 3], y[0, 2, 1, 0] = 1.25, 0.75  # exact in fp32: the row sums are the same bits
    assert checksum(y)[0] == checksum(x)[0]
    assert checksum(y)[1] != checksum(x)[1]


def test_swapped_rows_differ():
    x = _x(3)
    assert checksum(x.flip(0))[0] != checksum(x)[0]
    assert checksum(x.flip(0))[1] != checksum(x)[1]


def test_nan_equals_nan_bitwise():
    x = _x(4)
    x[0, 1, 1, 1] = float("nan")
    a, b = checksum(x), checksum(x.clone())
    assert a[0] != a[0] and a[1] != a[1]  # NaN
    assert _bits(a) == _bits(b)  # same_call compares the bits


def test_several_tensors_and_chunks_keep_positions(monkeypatch):
    # small chunks: a swap across a chunk boundary and tensors swapped in the list both show
    monkeypatch.setitem(parallel._CHECKSUM_CHUNK, "cpu", 16)
    a, b = _x(5, (1, 9, 4)), _x(6, (1, 9, 4))
    y = a.clone()
    y[0, 0, 0], y[0, 8, 3] = a[0, 8, 3], a[0, 0, 0]
    assert checksum(y)[0] == checksum(a)[0] and checksum(y)[1] != checksum(a)[1]
    assert checksum(a, b)[0] == checksum(b, a)[0] and checksum(a, b)[1] != checksum(b, a)[1]
    assert _bits(checksum(a, b)) == _bits(checksum(a.clone(), b.clone()))


def test_integer_bool_and_empty_inputs():
    m = torch.ones(2, 7, dtype=torch.long)
    m[0, 5:] = 0
    assert _bits(checksum(m)) == _bits(checksum(m.bool()))
    flipped = m.clone()
    flipped[0] = m[0].flip(0)  # the padding moved to the front: same count of ones
    assert checksum(flipped)[1] != checksum(m)[1]
    assert checksum(torch.zeros(0, 3)) == (0.0, 0.0)


# ====================================================================== two ranks, direct forward


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from test_dit import make_inputs
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
    from vc_components import error_text, finish_rank, init_gloo_rank

    init_gloo_rank(rank, world, init, PG_TIMEOUT_S)
    attempt = error_text

    cfg = tiny_config(hidden_size=128, num_heads=4)
    sd = random_state_dict(cfg, seed=3)
    ref, dit = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    dit.enable_context_parallel()
    x, t, y, mask = make_inputs(cfg, B=2, T=3, H=4, W=6, seed=5, shared_cond=1)
    res = {}
    with torch.no_grad():
        res["same"] = attempt(lambda: dit(x, t, y, mask))
        # rank 1: two tokens of one frame swapped (same row sums)
        xs = x.clone()
        if rank == 1:
            xs[0, :, 1, 0, 0], xs[0, :, 1, 3, 5] = x[0, :, 1, 3, 5], x[0, :, 1, 0, 0]
        res["hidden_swapped"] = attempt(lambda: dit(xs, t, y, mask))

        full = ref.build_kv_cache(x[:1, :, :1])  # a full KVCache, the same on both ranks
        sharded = dit.build_kv_cache(x[:1, :, :1])
        res["same_full_cache"] = attempt(lambda: dit(x[:, :, 1:], t, y, mask, kv_cache=full))
        other = ref.build_kv_cache(x[:1, :, :1])
        if rank == 1:
            k = other.keys[1]
            k[0, 0, 1, 0], k[0, 5, 2, 3] = full.keys[1][0, 5, 2, 3], full.keys[1][0, 0, 1, 0]
        res["cache_differs"] = attempt(lambda: dit(x[:, :, 1:], t, y, mask, kv_cache=other))
        res["sharded_cache"] = attempt(lambda: dit(x[:, :, 1:], t, y, mask, kv_cache=sharded))
        res["full_vs_sharded"] = attempt(lambda: dit(x[:, :, 1:], t, y, mask,
                                                     kv_cache=full if rank == 0 else sharded))
    finish_rank(res, out, rank)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from vc_components import two_rank_results

    return two_rank_results(__file__, tmp_path_factory.mktemp("cp_fingerprint"), [], ROOT, HERE)


@pytest.mark.parametrize("key", ["same", "same_full_cache", "sharded_cache"])
def test_equal_inputs_pass(results, key):
    for r in results:
        assert r[key] == "no error", r[key]


@pytest.mark.parametrize("key, field", [
    ("hidden_swapped", "hidden_states (position checksum)"),
    ("cache_differs", "kv_cache keys and values (position checksum)"),
    ("full_vs_sharded", "kv_cache sharded: rank 0: 0, rank 1: 1"),
])
def test_different_inputs_raise_on_every_rank_naming_the_field(results, key, field):
    for r in results:
        msg = r[key]
        assert msg.startswith("ValueError: context parallel: the ranks called forward with different") \
            and field in msg, msg


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])


def test_pipeline_signature_sees_a_reordered_schedule():
    # the pipeline's fields compared timesteps and sigmas by their plain sums: a rank with the same
    # steps in another order passed the check
    from longcat_vc.stages import _PIPELINE_FIELDS, _pipeline_signature

    lat, emb = torch.zeros(1, 16, 3, 4, 4), torch.zeros(2, 1, 8, 32)
    ts = torch.tensor([900.0, 700.0, 400.0, 100.0])
    sg = torch.cat([ts / 1000, torch.zeros(1)])
    a = _pipeline_signature(lat, 1, emb, ts, sg, 4.0, True)
    b = _pipeline_signature(lat, 1, emb, ts.flip(0), torch.cat([sg[:-1].flip(0), sg[-1:]]), 4.0, True)
    assert len(a) == len(_PIPELINE_FIELDS)
    assert a == _pipeline_signature(lat, 1, emb, ts.clone(), sg.clone(), 4.0, True)
    differ = {_PIPELINE_FIELDS[i] for i in range(len(a)) if a[i] != b[i]}
    assert differ == {"timesteps (position checksum)", "sigmas (position checksum)"}
