"""Round 81: mutation testing of longcat_kernels/integrations/ (diffusers Wan adapter, SPEC 12) and
longcat_vc/parallel.py (context parallelism).

32 single-point mutants, each applied alone, run against the existing tests of its file (D: tests/integrations/
test_diffusers_{wan,hostile,round56_ecosystem}.py; P: tests/vc/test_context_parallel.py -k "not torchrun",
test_vc_hostile_round52_cp.py, test_cp_fingerprint.py, and for the survivors also test_cp_check_once.py and
test_cp_early_checks.py). 12 survived them: 9 were test gaps, all killed by this file (each test here fails with
its mutant applied and passes on the product code), 3 are equivalent (D1, D7, P15). No product bug found.

  id   mutation                                                           existing  this file
  D1   _wan_rope: sin[..., 1::2] -> sin[..., 0::2]                         survived  equivalent (a)
  D2   _wan_rope: x1*s + x2*c -> x1*s - x2*c                               killed
  D3   value.unflatten(2, (heads, -1)) -> (-1, heads)                      killed
  D4   SDPA (training) path: key <- query                                  killed
  D5   chunk_k of the params dropped (chunk_q used for keys)               survived  killed
  D6   cdf_threshold of the params not passed to block_sparse_attn         survived  killed
  D7   _dense(): "cdf_threshold is None" dropped                           survived  equivalent (b)
  D8   pre-forward hook grid (F, W, H) instead of (F, H, W)                killed    equivalent here (c)
  D9   rope hook does not tag cos with its grid                            killed    killed
  D10  _uninstall restores over another install's processor               survived  killed
  D11  duplicate block indices accepted by _check_layers                   killed
  D12  fused prologue: norm_q's weight for k                               killed    killed
  D13  fused prologue: the norms' eps not passed (default eps)             survived  killed
  D14  attention_mask no longer sent to diffusers' processor              killed    killed
  D15  _all_heads_rms: equal eps of norm_q / norm_k not required           survived  killed
  D16  rope_matches: atol 1e-4 -> 1e-1 (other theta takes Rope3D angles)    survived  killed
  P1   tokens_to_heads: heads grouped interleaved (h*P + r)                killed    killed
  P2   tokens_to_heads (padded): slots put at the frame's end              killed    killed
  P3   heads_to_tokens: head order within the output flipped             killed    killed
  P4   head_range from the world rank, not the SP rank                     killed    killed
  P5   batch_slice: CFG halves swapped                                     killed    killed
  P6   local_cache: batch-1 (shared) cache sliced by the CFG half          killed    killed
  P7   shard_tokens: prefix_tokens = cond frames * hw (not * m)            killed    killed
  P8   cfg layout: cfg_rank = rank % 2, sp_rank = rank // 2                killed (world 4)
  P9   _SameCall compares float values, not bits (NaN != NaN)              survived  killed
  P10  checksum row weights from 0 (row 0 unweighted)                      killed (early_checks)
  P11  shard_cache: head_start 0 on every rank                             killed    killed
  P12  local_cache: a sharded cache's sp_rank not checked                  killed    killed
  P13  broadcast from global rank 0, not the group's first rank            survived  killed
  P14  checked_region leaves "not in a region" on exit (nested)            killed (check_once) killed
  P15  gather_tokens also copies the other CFG group's (same) batch        survived  equivalent (d)
  P16  valid_slots without max(0, ...) (negative counts)                   survived  killed

  (a) diffusers' Wan sin table repeats each angle for its pair: columns 0::2 and 1::2 are equal.
  (b) SPEC: cdf + top-k keeps the larger count; sparsity 0 keeps every block, which is the dense attention.
  (c) the rope hook re-derives the grid from the rope's own input on every model with a rope module (killed by
      the existing tests on a model without one).
  (d) without a batch split both CFG groups computed the same batch bit for bit: the second copy is equal.

The context-parallel tests here run the ranks as threads of one process: ``_all_to_all`` and a stand-in
for ``torch.distributed`` exchange tensors through a barrier (no process group, no gloo start-up), so the
data movement of the sharded layout is checked exactly (``torch.equal``) against a layout computed
independently here, on grids whose token count does not divide by the ranks (padded slots poisoned with
NaN) and with a rank that holds no token at all.
"""

from __future__ import annotations

import random
import threading
import types

import pytest
import torch

import longcat_vc.parallel as par
from longcat_vc.kv_cache import KVCache
from longcat_vc.modules.attention import AttnPlan
from longcat_vc.parallel import ContextParallel, ShardedKVCache


# ---------------------------------------------------------------------------------------------
# threads as ranks


class _Ranks:
    """``world`` ranks as threads; ``rank()`` is the calling thread's rank."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.box = [None] * world
        self.local = threading.local()
        self.calls = []

    def rank(self) -> int:
        return self.local.rank

    def exchange(self, t: torch.Tensor, ranks) -> list:
        """Every rank of ``ranks`` posts ``t``; returns the posts of ``ranks`` in order."""
        self.box[self.rank()] = t.clone()
        self.barrier.wait()
        got = [self.box[r] for r in ranks]
        self.barrier.wait()
        return got

    def run(self, fn):
        """``fn(rank)`` on every rank (thread); returns the results, re-raises a rank's error."""
        res, errs = [None] * self.world, [None] * self.world

        def body(r):
            self.local.rank = r
            try:
                res[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errs[r] = e
                self.barrier.abort()

        th = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        for e in errs:
            if e is not None and not isinstance(e, threading.BrokenBarrierError):
                raise e
        for e in errs:
            if e is not None:
                raise e
        return res


class _FakeDist:
    """The few ``torch.distributed`` calls parallel.py makes, over ``_Ranks`` (the whole world)."""

    def __init__(self, ranks: _Ranks) -> None:
        self.ranks = ranks

    def all_gather(self, parts, t, group=None):
        for dst, src in zip(parts, self.ranks.exchange(t, range(self.ranks.world))):
            dst.copy_(src)

    def get_backend(self, group=None):
        return "gloo"

    def broadcast(self, t, src, group=None):
        self.ranks.calls.append(("broadcast", src))


def _cp(ranks: _Ranks, rank: int, *, sp: int, heads: int, cfg: bool = False) -> ContextParallel:
    """A ``ContextParallel`` as ``__init__`` lays it out (world ``sp`` or ``2 * sp`` with cfg), no process group."""
    cp = ContextParallel.__new__(ContextParallel)
    cp.group, cp.world_size, cp.rank = None, ranks.world, rank
    cp.cfg_parallel = cfg
    cp.cfg_size, cp.cfg_rank = (2, rank // sp) if cfg else (1, 0)
    cp.sp_size, cp.sp_rank = sp, rank % sp
    cp.num_heads, cp.device = heads, None
    cp.group_ranks = list(range(ranks.world))
    cp._region = threading.local()
    base = cp.cfg_rank * sp
    sp_ranks = list(range(base, base + sp))

    def all_to_all(out, inp):  # all_to_all_single, equal splits on dim 0
        for s, src in enumerate(ranks.exchange(inp, sp_ranks)):
            out[s].copy_(src[cp.sp_rank])

    cp._all_to_all = all_to_all
    return cp


def _seed() -> int:
    return random.randrange(2**31)


# (P, hw): unpadded; padded; a rank with no token; hw - r*m < 0 for the last rank
GEOMS = [(2, 6), (3, 7), (3, 2), (4, 5)]


def _slots(P, hw):
    m = -(-hw // P)
    return m, [(r * m, max(0, min(m, hw - r * m))) for r in range(P)]


@pytest.mark.parametrize("P,hw", GEOMS)
def test_all_to_all_layout_is_the_global_sequence_of_this_ranks_heads(P, hw):
    """tokens_to_heads: every real token of every frame, in order, heads [r*H/P, (r+1)*H/P) (padded slots,
    NaN here, never reach attention); heads_to_tokens: this rank's slots of every head, head-major as the
    output projection expects, zeros on padded slots."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    B, T, X, D = 2, 3, 3, 2
    H = 2 * P
    Hl = H // P
    m, slots = _slots(P, hw)
    G = torch.randn(B, T, hw, X, H, D, generator=g, dtype=torch.float64)
    O = torch.randn(B, T, hw, H, D, generator=g, dtype=torch.float64)
    ranks = _Ranks(P)
    plan = types.SimpleNamespace()

    def body(r):
        cp = _cp(ranks, r, sp=P, heads=H)
        hook = par._ShardedAttention(cp, plan, T, hw, m)
        lo, n = slots[r]
        t = torch.full((B, T, m, X, H, D), float("nan"), dtype=torch.float64)
        t[:, :, :n] = G[:, :, lo:lo + n]
        q = hook.tokens_to_heads(t.view(B, T * m, X, H, D))
        o = hook.heads_to_tokens(O[:, :, :, r * Hl:(r + 1) * Hl].reshape(B, T * hw, Hl, D).clone())
        return q, o

    for r, (q, o) in enumerate(ranks.run(body)):
        lo, n = slots[r]
        exp_q = G[:, :, :, :, r * Hl:(r + 1) * Hl].reshape(B, T * hw, X, Hl, D)
        assert torch.equal(q, exp_q), f"tokens_to_heads rank {r} of {P}, hw={hw}, seed={seed}"
        exp_o = torch.zeros(B, T, m, H * D, dtype=torch.float64)
        exp_o[:, :, :n] = O[:, :, lo:lo + n].reshape(B, T, n, H * D)
        assert torch.equal(o, exp_o.view(B, T * m, H * D)), f"heads_to_tokens rank {r} of {P}, hw={hw}, seed={seed}"


@pytest.mark.parametrize("P,hw", GEOMS)
def test_valid_slots_count_the_real_tokens(P, hw):
    m, slots = _slots(P, hw)
    got = [ContextParallel.valid_slots(r, hw, m) for r in range(P)]
    assert got == [n for _, n in slots] and sum(got) == hw, (P, hw, got)


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("P,hw", [(2, 6), (3, 7), (4, 5)])
def test_shard_then_gather_is_the_identity(P, hw, cfg, monkeypatch):
    """shard_tokens (after split_batch) then gather_tokens on every rank gives back the whole batch: the
    CFG groups' halves in order, every rank's slots in place; the shard's plan has the cond prefix of the
    shard (cond frames x slots) and the whole plan in its hook."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    B, T, C, c = 4, 3, 5, 2
    Y = torch.randn(B, T * hw, C, generator=g, dtype=torch.float64)
    world = 2 * P if cfg else P
    ranks = _Ranks(world)
    monkeypatch.setattr(par, "_dist", lambda: _FakeDist(ranks))
    plan = AttnPlan(mode="prefix", grid=(T, 1, hw), rope=None, prefix_tokens=c * hw)
    m = -(-hw // P)

    def body(r):
        cp = _cp(ranks, r, sp=P, heads=P, cfg=cfg)
        (y,) = cp.split_batch(B, Y)
        x, sub = cp.shard_tokens(y, plan)
        assert sub.grid == (T, 1, m) and sub.prefix_tokens == c * m and sub.parallel.plan is plan, sub
        return cp.gather_tokens(x, B, plan.grid)

    for r, full in enumerate(ranks.run(body)):
        assert torch.equal(full, Y), f"rank {r}, P={P}, hw={hw}, cfg={cfg}, seed={seed}"


def _stub_model(heads):
    """A model's ``config.num_heads`` and ``_check_cache`` (which raises the problems the caller found)."""

    def check(cache, B, Nh, Nw, *, heads=None, problems=()):
        if problems:
            raise ValueError("; ".join(problems))

    return types.SimpleNamespace(config=types.SimpleNamespace(num_heads=heads), _check_cache=check)


@pytest.mark.parametrize("Bc", [1, 2])
def test_local_cache_of_a_full_cache_is_this_ranks_heads_and_cfg_half(Bc):
    """cfg_parallel on 4 ranks (SP groups of 2): rank 3 reads heads [2, 4) (its SP rank's, not its world
    rank's) and, of a per-sample cache, row 1 of a CFG batch of 2; a shared (batch 1) cache keeps its row."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    ranks = _Ranks(4)
    k = torch.randn(Bc, 6, 4, 2, generator=g)
    v = torch.randn(Bc, 6, 4, 2, generator=g)
    cache = KVCache(keys=[k], values=[v], num_frames=1, grid_hw=(2, 3), dtype=k.dtype, device=k.device)
    for r in range(4):
        cp = _cp(ranks, r, sp=2, heads=4, cfg=True)
        loc = cp.local_cache(_stub_model(4), cache, 2, 2, 3)
        h = slice(2 * (r % 2), 2 * (r % 2) + 2)
        b = slice(r // 2, r // 2 + 1) if Bc == 2 else slice(None)
        assert torch.equal(loc.keys[0], k[b, :, h]) and torch.equal(loc.values[0], v[b, :, h]), \
            f"rank {r}, Bc={Bc}, seed={seed}"


def test_a_sharded_cache_of_another_sp_rank_is_refused():
    ranks = _Ranks(2)
    cp = _cp(ranks, 1, sp=2, heads=4)
    k = torch.zeros(1, 6, 2, 2)
    cache = ShardedKVCache(keys=[k], values=[k], num_frames=1, grid_hw=(2, 3), dtype=k.dtype, device=k.device,
                           num_heads=4, head_start=0, sp_size=2, sp_rank=0)
    with pytest.raises(ValueError, match="sequence-parallel rank 0 of 2"):
        cp.local_cache(_stub_model(4), cache, 1, 2, 3)


def test_shard_cache_labels_the_heads_it_holds():
    ranks = _Ranks(4)
    k = torch.zeros(1, 6, 2, 2)
    cache = KVCache(keys=[k], values=[k], num_frames=1, grid_hw=(2, 3), dtype=k.dtype, device=k.device)
    for r in range(4):
        sc = _cp(ranks, r, sp=2, heads=4, cfg=True).shard_cache(cache, (1.0, 2.0))
        assert (sc.head_start, sc.sp_rank, sc.sp_size, sc.num_heads) == (2 * (r % 2), r % 2, 2, 4), (r, sc)


def test_nested_checked_regions_restore_the_outer_one():
    cp = _cp(_Ranks(1), 0, sp=1, heads=1)
    assert not cp.in_checked_region()
    with cp.checked_region():
        with cp.checked_region():
            assert cp.in_checked_region()
        assert cp.in_checked_region(), "leaving an inner checked_region ended the outer one"
    assert not cp.in_checked_region()


def test_broadcast_comes_from_the_groups_first_rank(monkeypatch):
    """A group of world ranks [2, 3]: rank 2's copy (the group's first), not global rank 0 (not a member)."""
    ranks = _Ranks(1)
    monkeypatch.setattr(par, "_dist", lambda: _FakeDist(ranks))
    cp = _cp(ranks, 0, sp=2, heads=2)
    cp.group_ranks = [2, 3]
    cp.broadcast(torch.zeros(3))
    assert ranks.calls == [("broadcast", 2)], ranks.calls


def test_same_call_compares_bits_nan_equal_signed_zero_not(monkeypatch):
    """Equal inputs give bitwise equal checksums, NaN included: NaN on every rank is the same call; 0.0 vs
    -0.0 (other bits) is not."""
    ranks = _Ranks(2)
    monkeypatch.setattr(par, "_dist", lambda: _FakeDist(ranks))

    def call(vals):
        def body(r):
            cp = _cp(ranks, r, sp=2, heads=2)
            try:
                with cp.same_call("f", ("x", "y")) as c:
                    c.record(vals[r], 1.0)
            except ValueError as e:
                return str(e)
            return None
        return ranks.run(body)

    nan = float("nan")
    assert call([nan, nan]) == [None, None]
    msgs = call([0.0, -0.0])
    assert all(msg is not None and "x: rank 0" in msg and "y:" not in msg for msg in msgs), msgs


# ---------------------------------------------------------------------------------------------
# the diffusers Wan adapter


def _wan_self_attn_inputs(model, x):
    """hidden_states and rotary_emb blocks[0].attn1 gets in a forward of ``model`` on ``x``, and its output."""
    got = {}

    def pre(mod, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        got["rope"] = kwargs.get("rotary_emb", args[3] if len(args) > 3 else None)

    def post(mod, args, kwargs, out):
        got["out"] = out

    attn = model.blocks[0].attn1
    h1 = attn.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = attn.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            model(hidden_states=x, timestep=torch.tensor([300]), encoder_hidden_states=torch.randn(1, 5, 24),
                  return_dict=False)
    finally:
        h1.remove()
        h2.remove()
    return got


def _qkv64(attn, h, rope):
    """Wan self-attention's q, k, v in fp64, written out here: RMSNorm over all heads, interleaved-pair RoPE."""
    def lin(m, t):
        return t.double() @ m.weight.double().T + m.bias.double()

    def rms(n, t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight.double()

    def rot(t):
        cos, sin = (r.double()[..., 0::2] for r in rope)
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)

    H = attn.heads
    q = rot(rms(attn.norm_q, lin(attn.to_q, h)).unflatten(2, (H, -1)))
    k = rot(rms(attn.norm_k, lin(attn.to_k, h)).unflatten(2, (H, -1)))
    v = lin(attn.to_v, h).unflatten(2, (H, -1))
    return q, k, v


# (the rule the processor is given, the same rule with the argument under test left out)
RULES = {
    "chunk_k": (dict(sparsity=0.5, chunk_k=(1, 2, 3)), dict(sparsity=0.5)),
    "cdf_threshold": (dict(sparsity=0.9, cdf_threshold=0.95), dict(sparsity=0.9)),
}


# norm eps (q, k), fused_prologue, RoPE theta: diffusers' ops; the fused prologue (it must take the norms' eps);
# the fused prologue asked for norms of different eps (it cannot apply two: diffusers' ops run) or a RoPE of twice
# Wan's default theta (a probe rotated 0.06 off Rope3D's at head_dim 16: under 0.1, over rope_matches' 1e-4)
PROLOGUES = {"diffusers": (0.05, 0.05, False, None), "fused": (0.05, 0.05, True, None),
             "fused_other_eps_k": (0.05, 0.2, True, None), "fused_theta_x2": (0.05, 0.05, True, 20000.0)}


@pytest.mark.parametrize("prologue", sorted(PROLOGUES))
@pytest.mark.parametrize("arg", sorted(RULES))
def test_the_params_rule_reaches_block_sparse_attention(arg, prologue):
    """params.chunk_k (other than chunk_q) and params.cdf_threshold (with top-k: the larger count) reach the
    processor's block-sparse attention: the output of blocks[0].attn1 equals block_sparse_attn on q/k/v
    computed here in fp64 with the same rule, and differs from the rule without that argument (so the
    test can tell). The norms' eps (large here, so that it shows) is the one applied, on either prologue."""
    pytest.importorskip("diffusers")
    import longcat_kernels as lk
    from helpers import tiny_wan

    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention

    seed = _seed()
    torch.manual_seed(seed)
    model = tiny_wan(num_layers=1, seed=None)
    eps_q, eps_k, fused, theta = PROLOGUES[prologue]
    if theta is not None:
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        model.rope = WanRotaryPosEmbed(16, (1, 2, 2), 32, theta=theta)
    model.blocks[0].attn1.norm_q.eps, model.blocks[0].attn1.norm_k.eps = eps_q, eps_k
    x = torch.randn(1, 4, 4, 8, 12)  # token grid (4, 4, 6): height and width apart
    grid, cq = (4, 4, 6), (2, 2, 2)
    rule, without = RULES[arg]
    apply_block_sparse_attention(model, lk.BlockSparseParams(chunk_q=cq, **rule), backend="torch",
                                 fused_prologue=fused)
    got = _wan_self_attn_inputs(model, x)
    attn = model.blocks[0].attn1
    q, k, v = _qkv64(attn, got["h"], got["rope"])

    def expected(kw):
        o = lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=cq, backend="torch", **kw)
        return o.flatten(2).double() @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()

    exp, other = expected(rule), expected(without)
    out = got["out"].double()
    assert torch.isfinite(out).all(), f"seed={seed}"
    tol = 1e-4 * exp.abs().max().item()
    err = (out - exp).abs().max().item()
    assert err < tol, f"{rule}, {prologue}: max err {err} (tol {tol}), seed={seed}"
    assert (other - exp).abs().max().item() > 100 * tol, f"{arg} does not change the result, seed={seed}"


def test_an_attention_mask_goes_to_diffusers_processor():
    """A self-attention call with an attention_mask (which block-sparse attention cannot apply) is served by
    diffusers' processor: equal to masked fp64 attention written here, not the unmasked one."""
    pytest.importorskip("diffusers")
    import longcat_kernels as lk
    from helpers import tiny_wan

    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention

    seed = _seed()
    torch.manual_seed(seed)
    model = tiny_wan(num_layers=1, seed=None)
    x = torch.randn(1, 4, 2, 4, 4)  # token grid (2, 2, 2)
    apply_block_sparse_attention(model, lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 1, 1)), backend="torch",
                                 fused_prologue=False)
    got = _wan_self_attn_inputs(model, x)
    attn, h, rope = model.blocks[0].attn1, got["h"], got["rope"]
    S = h.shape[1]
    keep = torch.rand(1, 1, S, S) < 0.5
    keep[..., 0] = True  # every query keeps a key
    with torch.no_grad():
        out = attn(h, attention_mask=keep, rotary_emb=rope).double()
    q, k, v = _qkv64(attn, h, rope)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    o = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~keep, float("-inf")).softmax(-1), v)
    exp = o.flatten(2) @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    assert torch.isfinite(out).all(), f"seed={seed}"
    err = (out - exp).abs().max().item()
    assert err < 1e-4 * exp.abs().max().item(), f"max err {err}, seed={seed}"


def test_remove_keeps_a_processor_of_another_install():
    """remove_block_sparse_attention puts diffusers' original back only where its own processor still runs:
    a block given another model's block-sparse processor since apply keeps it."""
    pytest.importorskip("diffusers")
    import longcat_kernels as lk
    from helpers import tiny_wan

    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention, remove_block_sparse_attention

    a, c = tiny_wan(num_layers=2), tiny_wan(num_layers=1)
    orig = a.blocks[1].attn1.processor
    params = lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 1, 1))
    apply_block_sparse_attention(a, params, backend="torch")
    apply_block_sparse_attention(c, params, backend="torch")
    theirs = c.blocks[0].attn1.processor
    a.blocks[0].attn1.set_processor(theirs)
    remove_block_sparse_attention(a)
    assert a.blocks[0].attn1.processor is theirs
    assert a.blocks[1].attn1.processor is orig
