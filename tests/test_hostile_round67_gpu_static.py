"""Hostile round 67: the host-side logic of the GPU code changed since 9eed60b, read as a GPU user runs it and
pinned on the CPU (Triton interpreter; device checks monkeypatched where needed): ``dispatch.launcher`` runs a
compiled kernel's launch without the interpreter lock (and hands any launch back unchanged while torch.compile traces), ``kernel_tables`` copies
nothing on the DiT's hot path (fp32 contiguous tables), the ``qk_norm_rope`` prologue takes what the DiT and the
diffusers Wan integration pass (``[H*D]`` all-heads and bf16/fp32 weights), the cuDNN route's lse merge reads
fused-qkv views of a batch, ``cat_cache`` keeps its dtype under autocast, and ``exact_matmul`` stays exact under
autocast and torch.compile and restores the CUDA fp32 precision setting."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import dispatch
from longcat_kernels.dispatch import launcher

pytestmark = pytest.mark.triton_interpret


def _close(got, want, tol=1e-5):
    got = got.double()
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want.double(), rtol=tol, atol=tol)


class _Launch:
    """A stand-in for ``kernel[grid]``: records its calls and whether the interpreter lock was held."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs, dispatch._INTERPRETER_LOCK._is_owned()))
        return "ran"


class _CompiledKernel:
    def __init__(self):
        self.launch, self.grids = _Launch(), []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.launch


class _InterpretedKernel(_CompiledKernel):
    pass


_InterpretedKernel.__module__ = "triton.runtime.interpreter"


def test_launcher_runs_a_compiled_kernels_launch_without_the_lock():
    k = _CompiledKernel()
    got = launcher(k, (3, 4))
    assert k.grids == [(3, 4)] and not k.launch.calls  # nothing launched before the call
    # (a device guard wraps it since round 72: tests/test_hostile_round72_devices.py)
    assert got(1, x=2) == "ran" and k.launch.calls == [((1,), {"x": 2}, False)]


def test_launcher_while_compiling_returns_the_launch_unchanged(monkeypatch):
    k = _InterpretedKernel()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert launcher(k, (1,)) is k.launch


def test_launcher_holds_the_lock_for_interpreted_kernels_only_while_they_run():
    k = _InterpretedKernel()
    run = launcher(k, (2,))
    assert run is not k.launch and not k.launch.calls  # nothing launched before the call
    assert run(7, BLOCK=16, num_warps=4) == "ran"
    assert k.launch.calls == [((7,), {"BLOCK": 16, "num_warps": 4}, True)]
    assert not dispatch._INTERPRETER_LOCK._is_owned()


def test_the_packages_kernels_are_interpreted_here_so_the_lock_is_exercised():
    from longcat_kernels.ops.block_sparse_attn import _triton_kernels as K

    assert type(K.bsa_pool_kernel).__module__.startswith("triton.runtime.interpreter")
    assert launcher(K.bsa_pool_kernel, (1,)).__name__ == "run_interpreted"


def test_kernel_tables_copy_nothing_for_the_dits_fp32_contiguous_tables():
    from longcat_kernels.ops.rope.triton import kernel_tables, rope_table_args

    rope = lk.Rope3D((2, 4, 4), 32)
    tabs, gh, gw = rope_table_args(rope)
    own = [rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w]
    assert all(a is b for a, b in zip(tabs, own)) and (gh, gw) == (4, 4)
    got = kernel_tables(tabs, torch.randn(1, 16, 2, 32))
    assert all(a is b for a, b in zip(got, tabs))  # the hot path: the same tensors, no per-call copy


def test_kernel_tables_make_strided_and_half_tables_fp32_contiguous():
    from longcat_kernels.ops.rope.triton import kernel_tables

    raw = [torch.randn(4, 6) for _ in range(6)]
    given = [raw[0].t().contiguous().t(), raw[1].to(torch.bfloat16), raw[2], raw[3].double(),
             torch.randn(4, 12)[:, ::2], raw[5]]
    given[4] = given[4].copy_(raw[4])
    got = kernel_tables(given, torch.randn(2, 3, dtype=torch.float16))
    for g, src in zip(got, given):
        assert g.dtype == torch.float32 and g.is_contiguous() and g.device == src.device
        assert torch.equal(g, src.float())


@pytest.mark.parametrize("qd,wd,all_heads", [
    (torch.float16, torch.bfloat16, True),   # diffusers Wan: [H*D] norm_q/norm_k weights, bf16 model
    (torch.float32, torch.bfloat16, True),
    (torch.float16, torch.float32, False),   # the DiT: [D] RMSNorm weights, fp32 master weights
    (torch.float32, torch.bfloat16, False),
])
def test_qk_norm_rope_triton_takes_the_dit_and_wan_weights(qd, wd, all_heads):
    B, S, H, D = 1, 32, 2, 32
    rope = lk.Rope3D((2, 4, 4), D)
    q, k = torch.randn(B, S, H, D, dtype=qd), torch.randn(B, S, H, D, dtype=qd)
    n = H * D if all_heads else D
    qw, kw = (torch.rand(n) + 0.5).to(wd), (torch.rand(n) + 0.5).to(wd)
    with torch.no_grad():
        got = lk.qk_norm_rope(q, k, qw, kw, rope, backend="triton")
        want = lk.qk_norm_rope(q, k, qw, kw, rope, backend="torch")
    for g, w in zip(got, want):
        assert g.dtype == qd
        _close(g, w, tol=2e-3 if qd == torch.float16 else 1e-5)


def test_qk_norm_rope_op_names_a_weight_of_neither_size():
    B, S, H, D = 1, 16, 2, 8
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    bad = torch.ones(D + 2)
    with pytest.raises(ValueError, match=r"k_weight: expected shape \[8\] \(head_dim\) or \[16\]"):
        torch.ops.longcat_kernels.qk_norm_rope(q, k, torch.ones(D), bad, *[None] * 6, 1, 1, 0, 1e-6,
                                               torch.empty_like(q), torch.empty_like(k))
    with pytest.raises(ValueError, match="k_weight: expected 8 elements"):
        torch.ops.longcat_kernels.qk_norm_rope(q, k, torch.ones(D), torch.ones(H * D), *[None] * 6, 1, 1, 0, 1e-6,
                                               torch.empty_like(q), torch.empty_like(k))


def test_merge_partial_attention_reads_a_batch_of_fused_qkv_views():
    # the cuDNN route's partials as views into [B, S, 3, H, D] buffers (a batch and row stride of 3*H*D)
    from longcat_kernels.ops.kv_cache_attn.cudnn import merge_partial_attention

    b, s, h, d = 3, 37, 2, 8
    o1 = torch.randn(b, s, 3, h, d)[:, :, 1]
    o2 = torch.randn(b, s, 3, h, d)[:, :, 2]
    l1, l2 = torch.randn(b, h, s) * 4, torch.randn(b, s, h).transpose(1, 2) * 4
    l1[0, 0, :3] = float("-inf")  # rows with no keys in one part take the other part alone
    lse = torch.logaddexp(l1.double(), l2.double())
    w1, w2 = (torch.exp(x.double() - lse).transpose(1, 2)[..., None] for x in (l1, l2))
    got = merge_partial_attention(o1, l1, o2, l2)
    assert got.is_contiguous() and got.shape == (b, s, h, d)
    _close(got, o1.double() * w1 + o2.double() * w2)


@pytest.mark.parametrize("dtype,ac", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                      (torch.bfloat16, torch.float16)])
def test_cat_cache_keeps_its_dtype_under_autocast(dtype, ac):
    from longcat_kernels.ops.kv_cache_attn.reference import cat_cache

    cache, x = torch.randn(1, 4, 2, 8).to(dtype), torch.randn(3, 5, 2, 8).to(dtype)
    with torch.autocast("cpu", dtype=ac):
        got = cat_cache(cache, x)
        assert cat_cache(None, x) is x
    assert got.dtype == dtype and got.shape == (3, 9, 2, 8)
    assert torch.equal(got[:, :4], cache.expand(3, -1, -1, -1)) and torch.equal(got[:, 4:], x)


def test_exact_matmul_stays_fp32_in_forward_and_backward_under_autocast():
    from longcat_kernels.ops.block_sparse_attn.selection import exact_matmul

    a = torch.randn(2, 3, 5, 7, requires_grad=True)
    b = torch.randn(2, 3, 7, 4, requires_grad=True)
    g = torch.randn(2, 3, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = exact_matmul(a, b)
        ga, gb = torch.autograd.grad(out, (a, b), g)
    assert out.dtype == ga.dtype == gb.dtype == torch.float32
    a64, b64 = a.detach().double(), b.detach().double()
    _close(out, a64 @ b64)
    _close(ga, g.double() @ b64.transpose(-1, -2))
    _close(gb, a64.transpose(-1, -2) @ g.double())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_exact_matmul_under_torch_compile(backend):
    from longcat_kernels.ops.block_sparse_attn.selection import exact_matmul

    torch._dynamo.reset()
    a, b = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 7, 3)
    f = torch.compile(lambda x, y: exact_matmul(x, y).sum(), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = f(a, b)
    loss.backward()
    _close(loss, (a.detach().double() @ b.double()).sum())
    _close(a.grad, torch.ones(2, 5, 3, dtype=torch.float64) @ b.double().transpose(-1, -2))


_M = torch.backends.cuda.matmul
_NEW_API = hasattr(_M, "fp32_precision")


@pytest.mark.skipif(not _NEW_API, reason="torch without torch.backends.cuda.matmul.fp32_precision")
@pytest.mark.parametrize("user", ["default", "legacy_high", "new_tf32"])
def test_ieee_fp32_matmul_on_cuda_restores_the_users_precision_setting(user):
    # the host-side half of the CUDA path (the device type only picks it): TF32 off inside, the user's setting
    # back after a normal exit, an exception and nesting
    from longcat_kernels.ops.block_sparse_attn import selection

    mk = torch.backends.mkldnn.matmul
    before_new, before_mk, before_legacy = _M.fp32_precision, mk.fp32_precision, torch.get_float32_matmul_precision()
    try:
        if user == "legacy_high":
            torch.set_float32_matmul_precision("high")
        elif user == "new_tf32":
            _M.fp32_precision = "tf32"
        found = _M.fp32_precision
        legacy = torch.get_float32_matmul_precision() if user != "new_tf32" else None
        cuda = torch.device("cuda")
        with selection.ieee_fp32_matmul(cuda):
            assert _M.fp32_precision == "ieee"
            with selection.ieee_fp32_matmul(cuda):
                assert _M.fp32_precision == "ieee"
            assert _M.fp32_precision == "ieee"  # the inner exit keeps the outer block's setting
        assert _M.fp32_precision == found
        with pytest.raises(KeyError):
            with selection.ieee_fp32_matmul(cuda):
                raise KeyError("x")
        assert _M.fp32_precision == found and selection._IEEE_STATE["depth"] == 0
        if legacy is not None:
            assert torch.get_float32_matmul_precision() == legacy
            assert _M.allow_tf32 == (user == "legacy_high")
    finally:  # the legacy setter first (it sets the per-backend ones too), then those as they were
        torch.set_float32_matmul_precision(before_legacy)
        _M.fp32_precision, mk.fp32_precision = before_new, before_mk
