"""Hostile inputs, round 19 (host side of the compiled extension): each test names the silent or
unclear behaviour it pins.

1. Expanded batch (batch stride 0) into the warp-specialised dense kernel (sm90_ws). Its TMA maps
   (csrc/attn_fwd_sm90_ws.cu ``make_map``) replaced a batch stride of 0 by ``seq * seq_stride`` ("a
   batch of 1: the stride is never used"), but the map still had ``batch`` entries: an expanded q
   (``q1.expand(B, ...)``), expanded fresh k/v beside a cache, or one of k_cache/v_cache expanded (the
   other not) read batch b >= 1 from ``b * seq`` rows past the tensor's start: rows of other queries
   (prefix_attn's narrowed launches: silently wrong output) or memory past the tensor (out of bounds).
   rows16 passes stride 0 (0 % 8 == 0), so nothing copied it. Only segment 0 broadcast as a pair (k
   and v both stride 0: a batch-1 map) is right. Now the cuda wrappers copy the other stride-0
   batches for sm90_ws, and make_map refuses them (a direct op call raises instead of reading).
2. Kernel family per device: ``Facts.csrc_kernels`` is what the extension reports for the device
   that was current when it was first asked (process-wide), ``Facts.capability`` is the call's own
   device. On a machine with a Hopper and a non-Hopper GPU the sm90 families were chosen for tensors
   on the other GPU (the sm_90a kernels' sm_80 build is a ``__trap()``: a sticky launch failure).
   Now the sm90 families are chosen only for compute capability 9.x.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from longcat_kernels.dispatch import Facts, choose_kernel, record_choices


# ---------------------------------------------------------------------------------------------
# 1. expanded batches into sm90_ws (CPU: what reaches the op; GPU: parity and the C++ refusal)
# ---------------------------------------------------------------------------------------------
def _recording_ops(monkeypatch):
    """Replace the compiled ops seen by the cuda wrappers with recorders (CPU tensors pass through)."""
    from longcat_kernels.ops.kv_cache_attn import cuda as kvc

    got = {}

    def kv(q, k, v, k_cache, v_cache, *rest):
        got.update(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, kernel=rest[-2])
        return q.new_empty(q.shape), q.new_empty(0)

    def prefix(q, k, v, prefix_len, scale, kernel, return_lse):
        got.update(q=q, k=k, v=v, kernel=kernel)
        return q.new_empty(q.shape), q.new_empty(0)

    fake = SimpleNamespace(kv_cache_attn_fwd_cuda=kv, prefix_attn_fwd_cuda=prefix)
    monkeypatch.setattr(kvc, "ops", lambda: fake)
    return got


def _bstride0(t):
    return t is not None and t.shape[0] > 1 and t.stride(0) == 0


def _x(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


B, S, H, D = 3, 20, 2, 128


def test_expanded_q_is_not_passed_to_sm90ws(monkeypatch):
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda, prefix_attn_cuda

    got = _recording_ops(monkeypatch)
    q = _x(1, S, H, D).expand(B, -1, -1, -1)
    k, v = _x(B, S, H, D), _x(B, S, H, D)
    attn_with_kv_cache_cuda(q, k, v, kernel="sm90_ws")
    assert not _bstride0(got["q"]) and torch.equal(got["q"], q)
    prefix_attn_cuda(q, k, v, 7, kernel="sm90_ws")
    assert not _bstride0(got["q"]) and torch.equal(got["q"], q)


def test_expanded_fresh_kv_beside_a_cache_is_not_passed_to_sm90ws(monkeypatch):
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda

    got = _recording_ops(monkeypatch)
    q = _x(B, S, H, D)
    k, v = _x(1, S, H, D).expand(B, -1, -1, -1), _x(1, S, H, D).expand(B, -1, -1, -1)
    kc, vc = _x(1, 40, H, D), _x(1, 40, H, D)
    attn_with_kv_cache_cuda(q, k, v, kc, vc, kernel="sm90_ws")
    assert not _bstride0(got["k"]) and not _bstride0(got["v"])
    assert torch.equal(got["k"], k) and torch.equal(got["v"], v)
    assert got["k_cache"] is kc and got["v_cache"] is vc  # a batch-1 cache stays a broadcast


@pytest.mark.parametrize("which", ["k", "v"])
def test_one_expanded_tensor_of_the_first_key_segment_is_not_passed_to_sm90ws(monkeypatch, which):
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda, prefix_attn_cuda

    got = _recording_ops(monkeypatch)
    q, k, v = _x(B, S, H, D), _x(B, S, H, D), _x(B, S, H, D)
    kc, vc = _x(B, 40, H, D), _x(B, 40, H, D)
    exp = _x(1, 40, H, D).expand(B, -1, -1, -1)
    kc, vc = (exp, vc) if which == "k" else (kc, exp)
    attn_with_kv_cache_cuda(q, k, v, kc, vc, kernel="sm90_ws")
    assert not _bstride0(got["k_cache"]) and not _bstride0(got["v_cache"])
    assert torch.equal(got["k_cache"], kc) and torch.equal(got["v_cache"], vc)
    # no cache: the fresh k/v are segment 0
    e = _x(1, S, H, D).expand(B, -1, -1, -1)
    k, v = (e, v) if which == "k" else (k, e)
    attn_with_kv_cache_cuda(q, k, v, kernel="sm90_ws")
    assert not _bstride0(got["k"]) and not _bstride0(got["v"])
    prefix_attn_cuda(q, k, v, 7, kernel="sm90_ws")
    assert not _bstride0(got["k"]) and not _bstride0(got["v"])


def test_a_broadcast_pair_and_other_families_are_not_copied(monkeypatch):
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda

    got = _recording_ops(monkeypatch)
    q = _x(B, S, H, D)
    kc, vc = _x(1, 40, H, D).expand(B, -1, -1, -1), _x(1, 40, H, D).expand(B, -1, -1, -1)
    k, v = _x(B, S, H, D), _x(B, S, H, D)
    attn_with_kv_cache_cuda(q, k, v, kc, vc, kernel="sm90_ws")  # both stride 0: the kernel's batch-1 map
    assert got["k_cache"] is kc and got["v_cache"] is vc
    qe = _x(1, S, H, D).expand(B, -1, -1, -1)
    for fam in ("sm90", "sm80"):  # pointer arithmetic: stride 0 is read right, no copy
        attn_with_kv_cache_cuda(qe, k, v, kernel=fam)
        assert got["q"] is qe


def _sm90ws_or_skip(monkeypatch):
    from helpers import restrict_family  # noqa: PLC0415 - tests/ is on sys.path under pytest

    restrict_family(monkeypatch, "sm90_ws")


@pytest.mark.ext
@pytest.mark.parametrize("case", ["q", "fresh", "k_cache", "v_cache"])
def test_sm90ws_expanded_batch_parity(monkeypatch, case):
    from helpers import poison_allocator  # noqa: PLC0415

    _sm90ws_or_skip(monkeypatch)
    dev = "cuda"
    Sn, Sc = 200, 300

    def r(b, s):
        return torch.randn(b, s, H, D, dtype=torch.bfloat16, device=dev)

    q, k, v, kc, vc = r(B, Sn), r(B, Sn), r(B, Sn), r(B, Sc), r(B, Sc)
    if case == "q":
        q = r(1, Sn).expand(B, -1, -1, -1)
    elif case == "fresh":
        k, v = r(1, Sn).expand(B, -1, -1, -1), r(1, Sn).expand(B, -1, -1, -1)
    elif case == "k_cache":
        kc = r(1, Sc).expand(B, -1, -1, -1)
    else:
        vc = r(1, Sc).expand(B, -1, -1, -1)
    poison_allocator(q)
    _sm90ws_dense_matches_oracle(q, k, v, kc, vc, f"sm90_ws expanded {case}")


def _sm90ws_dense_matches_oracle(q, k, v, kc, vc, name):
    import longcat_kernels as lk
    from longcat_kernels.testing.oracle import attention_lowp, attention_oracle
    from longcat_kernels.testing.tolerance import assert_close

    with record_choices() as ch:
        out = lk.attn_with_kv_cache(q, k, v, kc, vc, backend="cuda")
    assert ch[-1].impl == "csrc_sm90_ws"
    k_all, v_all = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
    ref, _ = attention_oracle(q, k_all, v_all, None, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k_all, v_all, None, D**-0.5), name=name)


@pytest.mark.ext
def test_sm90ws_prefix_expanded_q_parity(monkeypatch):
    import longcat_kernels as lk
    from longcat_kernels.testing.oracle import attention_lowp, attention_oracle, prefix_mask
    from longcat_kernels.testing.tolerance import assert_close

    _sm90ws_or_skip(monkeypatch)
    Sp, P = 300, 130
    q = torch.randn(1, Sp, H, D, dtype=torch.bfloat16, device="cuda").expand(B, -1, -1, -1)
    k, v = (torch.randn(B, Sp, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out = lk.prefix_attn(q, k, v, P, backend="cuda")
    mask = prefix_mask(Sp, P, "cuda")
    ref, _ = attention_oracle(q, k, v, mask, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, mask, D**-0.5), name="sm90_ws prefix, expanded q")


@pytest.mark.ext
def test_sm90ws_op_refuses_an_expanded_q(monkeypatch):
    # the registered op called directly (no wrapper copy): a clear error, not reads past q
    from longcat_kernels.ops.block_sparse_attn.cuda import ops

    _sm90ws_or_skip(monkeypatch)
    q = torch.randn(1, 200, H, D, dtype=torch.bfloat16, device="cuda").expand(B, -1, -1, -1)
    k, v = (torch.randn(B, 200, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    with pytest.raises(RuntimeError, match="batch stride 0"):
        ops().kv_cache_attn_fwd_cuda(q, k, v, None, None, *[None] * 6, 0, 0, D**-0.5, "sm90_ws")
    # the pair broadcast still runs
    kc = torch.randn(1, 200, H, D, dtype=torch.bfloat16, device="cuda").expand(B, -1, -1, -1)
    out, _ = ops().kv_cache_attn_fwd_cuda(q.contiguous(), kc, kc, None, None, *[None] * 6, 0, 0, D**-0.5,
                                          "sm90_ws")
    assert not out.isnan().any()


def _odd_size1_strides(S_, dev="cuda"):
    """[1, S, 1, 128] whose size-1 dims have strides 3 and 5: torch calls it contiguous (it ignores
    those strides), so ``contiguous()`` returned it unchanged to rows16, and the sm90_ws kernels'
    alignment check refused the call ("cannot run this call ... use kernel 'sm90'", also under auto)."""
    buf = torch.randn(S_ * D + 16, dtype=torch.bfloat16, device=dev)
    t = buf.as_strided((1, S_, 1, D), (3, D, 5, 1))
    assert t.is_contiguous() and t.contiguous() is t
    return t


@pytest.mark.ext
def test_sm90ws_dense_takes_odd_strides_of_size1_dims(monkeypatch):
    import longcat_kernels as lk
    from longcat_kernels.testing.oracle import attention_lowp, attention_oracle
    from longcat_kernels.testing.tolerance import assert_close

    _sm90ws_or_skip(monkeypatch)
    q, k, v = (_odd_size1_strides(200) for _ in range(3))
    with record_choices() as ch:
        out = lk.attn_with_kv_cache(q, k, v)
    assert ch[-1].impl == "csrc_sm90_ws"
    ref, _ = attention_oracle(q, k, v, None, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, None, D**-0.5), name="sm90_ws, odd size-1 strides")


@pytest.mark.ext
def test_sm90ws_bsa_takes_odd_strides_of_size1_dims(monkeypatch):
    import longcat_kernels as lk
    from helpers import bsa_oracle  # noqa: PLC0415
    from longcat_kernels.testing.tolerance import assert_close

    _sm90ws_or_skip(monkeypatch)
    grid = (4, 8, 8)
    q, k, v = (_odd_size1_strides(256) for _ in range(3))
    sel = lk.select_blocks(q.contiguous(), k.contiguous(), grid_q=grid, grid_k=grid, chunk_q=(4, 4, 4),
                           sparsity=0.5, backend="torch")
    with torch.no_grad(), record_choices() as ch:
        out = lk.block_sparse_attn(q, k, v, selection=sel, backend="cuda")
    assert ch[-1].impl == "csrc_sm90_ws"
    ref, _, low, _ = bsa_oracle(q, k, v, sel, D**-0.5)
    assert_close(out, ref, low, name="sm90_ws BSA, odd size-1 strides")


@pytest.mark.ext
@pytest.mark.parametrize("which", ["kv", "q", "cache"])
def test_sm90ws_head_expanded_inputs_parity(monkeypatch, which):
    """Head stride 0 (one head expanded over H, ``x[:, :, :1].expand(-1, -1, H, -1)``: MQA keys handed to an
    MHA kernel): the TMA maps get a head stride of 0 (rows16 passes it: 0 % 8 == 0). Either the driver's
    encoder refuses it (then a loud error naming the kernel) or the map reads the one head H times: never a
    wrong answer. Written in session 30 without a device: first GPU run owed."""

    _sm90ws_or_skip(monkeypatch)
    Hx, Sn, Sc = 4, 200, 136

    def r(s, heads=Hx):
        return torch.randn(B, s, heads, D, dtype=torch.bfloat16, device="cuda")

    def one_head(s):
        return r(s, 1).expand(-1, -1, Hx, -1)

    q, k, v, kc, vc = r(Sn), r(Sn), r(Sn), r(Sc), r(Sc)
    if which == "kv":
        k, v = one_head(Sn), one_head(Sn)
    elif which == "q":
        q = one_head(Sn)
    else:
        kc, vc = one_head(Sc), one_head(Sc)
    try:
        _sm90ws_dense_matches_oracle(q, k, v, kc, vc, f"sm90_ws head-expanded {which}")
    except RuntimeError as e:  # the encoder refused the map: loud, names the kernel
        assert "sm90_ws" in str(e), e


@pytest.mark.ext
def test_sm90ws_bsa_head_expanded_kv_parity(monkeypatch):
    import longcat_kernels as lk
    from helpers import bsa_oracle  # noqa: PLC0415
    from longcat_kernels.testing.tolerance import assert_close

    _sm90ws_or_skip(monkeypatch)
    grid, Hx = (4, 8, 8), 4
    q = torch.randn(1, 256, Hx, D, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(1, 256, 1, D, dtype=torch.bfloat16, device="cuda").expand(-1, -1, Hx, -1) for _ in range(2))
    sel = lk.select_blocks(q, k.contiguous(), grid_q=grid, grid_k=grid, chunk_q=(4, 4, 4), sparsity=0.5,
                           backend="torch")
    try:
        with torch.no_grad(), record_choices() as ch:
            out = lk.block_sparse_attn(q, k, v, selection=sel, backend="cuda")
    except RuntimeError as e:
        assert "sm90_ws" in str(e), e
        return
    assert ch[-1].impl == "csrc_sm90_ws"
    ref, _, low, _ = bsa_oracle(q, k, v, sel, D**-0.5)
    assert_close(out, ref, low, name="sm90_ws BSA, head-expanded k/v")


# ---------------------------------------------------------------------------------------------
# 2. the sm90 families only for tensors on a 9.x device
# ---------------------------------------------------------------------------------------------
# the extension reported every family (its first call ran on the Hopper GPU), the call's tensors are
# on another GPU of the same machine
MIXED = Facts(capability=(8, 0), csrc_kernels=("sm90_ws", "sm90", "sm80"))


@pytest.mark.parametrize("op,extra", [
    ("attn_with_kv_cache", {}),
    ("prefix_attn", {}),
    ("block_sparse_attn", dict(block_sparse=True, block_tokens=(64, 64), key_segments=1)),
    ("block_sparse_attn_fwd", dict(block_sparse=True, block_tokens=(128, 128), key_segments=1)),
    ("attn_with_kv_cache", dict(head_dim=64)),
])
def test_sm90_families_not_chosen_for_a_non_hopper_device(op, extra):
    c = choose_kernel(op, MIXED._replace(**extra), "cuda")
    assert c.impl == "csrc_sm80", c
    c = choose_kernel(op, MIXED._replace(**extra), "auto")
    assert not c.impl.startswith("csrc_sm90"), c
    # an extension that reports no sm80 code: refused with the reason, not an sm_90a launch
    from longcat_kernels.dispatch import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="compute capability 8.0"):
        choose_kernel(op, MIXED._replace(csrc_kernels=("sm90_ws", "sm90"), **extra), "cuda")


def test_hopper_still_gets_the_sm90_families():
    assert choose_kernel("attn_with_kv_cache", MIXED._replace(capability=(9, 0)), "cuda").impl == "csrc_sm90_ws"
