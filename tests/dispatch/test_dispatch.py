"""The kernel choice (``longcat_kernels.dispatch``): the decision table on fake machine facts (CPU),
explicit backends never falling back, environment variables rejecting bad values, ``env`` printing
exactly ``choose_kernel``'s answer, and (GPU) what ran equals what ``env`` printed."""

from __future__ import annotations

import itertools

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import _envvars, dispatch, env
from longcat_kernels.dispatch import OPS, BackendUnavailableError, Facts, choose_kernel

# fake machines
H100 = Facts()  # Hopper, extension with every family, triton, cuDNN; bf16 D128 inputs
H100_NO_EXT = Facts(ext_error="ImportError: longcat_kernels._C is not built", csrc_kernels=())
H100_NO_WS = Facts(csrc_kernels=("sm90", "sm80"))  # e.g. an extension whose driver lacks TMA encode
H100_SM80_BUILD = Facts(csrc_kernels=("sm80",))  # extension built without sm_90a
A100 = Facts(capability=(8, 0), csrc_kernels=("sm80",))
NO_TRITON = Facts(triton_error="import triton failed: ModuleNotFoundError")
CPU = Facts("cpu", dtype="float32", capability=None, ext_error="no CUDA device", csrc_kernels=(), cudnn=False)
CPU_INTERP = CPU._replace(interpret=True)

BSA64 = dict(block_sparse=True, block_tokens=(64, 64), key_segments=1)
BSA128 = dict(block_sparse=True, block_tokens=(128, 128), key_segments=1)
KV_BSA_CACHE = dict(block_sparse=True, block_tokens=(64, 64), key_segments=2)
# a cache whose frame count is not a multiple of the key chunk's t: key blocks straddle the segments
KV_BSA_STRADDLE = dict(block_sparse=True, block_tokens=(64, 64), key_segments=2, key_split_aligned=False)
GQA = dict(gqa=True)  # k/v with fewer heads than q (dense cached-KV / prefix)

# (op, machine, extra facts) -> (backend, impl, a word of the reason): the auto table
AUTO_TABLE = [
    # Hopper with the extension: the csrc warp-specialised kernels where they apply
    ("attn_with_kv_cache", H100, {}, "cuda", "csrc_sm90_ws", "fastest"),
    ("prefix_attn", H100, {}, "cuda", "csrc_sm90_ws", "fastest"),
    ("attn_with_kv_cache", H100, {"dtype": "float16"}, "cuda", "csrc_sm90_ws", "fastest"),
    ("block_sparse_attn", H100, BSA64, "cuda", "csrc_sm90_ws", "64-token blocks"),
    ("block_sparse_attn_fwd", H100, BSA64, "cuda", "csrc_sm90_ws", "64-token blocks"),
    # ... and not where they do not
    ("attn_with_kv_cache", H100, {"head_dim": 64}, "triton", "triton_prologue_cudnn", "slower"),
    ("prefix_attn", H100, {"head_dim": 64}, "triton", "triton_prologue_cudnn", "slower"),
    ("attn_with_kv_cache", H100, KV_BSA_CACHE, "cuda", "csrc_sm90_ws", "warp-specialised BSA"),
    ("attn_with_kv_cache", H100, KV_BSA_STRADDLE, "triton", "triton_fused", "Triton"),
    ("attn_with_kv_cache", H100, BSA64, "cuda", "csrc_sm90_ws", "warp-specialised BSA"),
    ("block_sparse_attn", H100, BSA128, "triton", "triton", "faster than csrc sm90"),
    ("block_sparse_attn", H100, dict(BSA64, requires_grad=True), "cuda", "csrc_sm90_ws_triton_bwd",
     "Triton backward"),
    ("block_sparse_attn", H100, dict(BSA64, requires_grad=True, head_dim=64), "triton", "triton", "forward only"),
    ("block_sparse_attn", H100_NO_WS, dict(BSA64, requires_grad=True), "triton", "triton", "forward only"),
    ("block_sparse_attn", NO_TRITON, dict(BSA64, requires_grad=True), "torch", "torch_reference",
     "no kernel backend"),
    ("block_sparse_attn_fwd", H100, dict(BSA64, requires_grad=True), "triton", "triton", "forward only"),
    ("block_sparse_attn", H100, dict(BSA128, requires_grad=True), "triton", "triton", "forward only"),
    ("block_sparse_attn", H100, dict(BSA64, head_dim=64), "triton", "triton", "faster than csrc sm90"),
    ("attn_with_kv_cache", H100, {"dtype": "float32"}, "triton", "triton_fused", "bf16/fp16 only"),
    ("attn_with_kv_cache", H100, {"cudnn": False}, "cuda", "csrc_sm90_ws", "fastest"),
    ("attn_with_kv_cache", H100, {"cudnn": False, "head_dim": 64}, "triton", "triton_fused", "faster than csrc"),
    ("attn_with_kv_cache", H100, {"dtype": "float64"}, "torch", "torch_reference", "float64"),
    ("select_blocks", H100, {}, "triton", "triton", "no csrc kernel"),
    ("qk_norm_rope", H100, {}, "triton", "triton", "no csrc kernel"),
    ("fp8_quantize", H100, {"head_dim": 4096}, "triton", "triton", "no csrc kernel"),
    # fp8_quantize: no e4m3 conversion before sm89, rows too long for the register-resident kernel
    ("fp8_quantize", A100, {"head_dim": 4096}, "torch", "torch_reference", "8.9"),
    ("fp8_quantize", H100, {"head_dim": 32768}, "torch", "torch_reference", "16384"),
    # Hopper without the extension / without the warp-specialised kernels / an sm80-only build
    ("attn_with_kv_cache", H100_NO_EXT, {}, "triton", "triton_prologue_cudnn", "not built"),
    ("block_sparse_attn", H100_NO_EXT, BSA64, "triton", "triton", "not built"),
    ("attn_with_kv_cache", H100_NO_WS, {}, "triton", "triton_prologue_cudnn", "slower"),
    ("block_sparse_attn", H100_NO_WS, BSA64, "triton", "triton", "sm90"),
    ("prefix_attn", H100_SM80_BUILD, {}, "triton", "triton_prologue_cudnn", "sm80"),
    ("block_sparse_attn", A100, BSA64, "triton", "triton", "sm80"),
    ("attn_with_kv_cache", A100, {}, "triton", "triton_prologue_cudnn", "sm80"),
    # no triton: the csrc kernels, else the reference
    ("attn_with_kv_cache", NO_TRITON, {"head_dim": 64}, "cuda", "csrc_sm90", "Triton unavailable"),
    ("block_sparse_attn", NO_TRITON, BSA128, "cuda", "csrc_sm90", "Triton unavailable"),
    ("attn_with_kv_cache", NO_TRITON._replace(csrc_kernels=("sm80",)), {}, "cuda", "csrc_sm80", "Triton unavailable"),
    ("select_blocks", NO_TRITON, {}, "torch", "torch_reference", "no kernel backend"),
    ("attn_with_kv_cache", NO_TRITON._replace(ext_error="x", csrc_kernels=()), {}, "torch", "torch_reference",
     "no kernel backend"),
    # CUDA tensors while TRITON_INTERPRET=1: no Triton on CUDA tensors
    ("attn_with_kv_cache", H100._replace(interpret=True), {"head_dim": 64}, "cuda", "csrc_sm90", "TRITON_INTERPRET"),
    # GQA/MQA: no csrc kernel, no cuDNN route: the fused Triton kernel (it indexes kv head h // group)
    ("attn_with_kv_cache", H100, GQA, "triton", "triton_fused", "GQA"),
    ("prefix_attn", H100, GQA, "triton", "triton_fused", "GQA"),
    ("attn_with_kv_cache", H100, dict(GQA, head_dim=64), "triton", "triton_fused", "GQA"),
    ("attn_with_kv_cache", A100, GQA, "triton", "triton_fused", "GQA"),
    ("attn_with_kv_cache", NO_TRITON, GQA, "torch", "torch_reference", "GQA"),
    ("qk_norm_rope", H100, GQA, "triton", "triton", "no csrc kernel"),  # per-head norm takes GQA
    # qk_norm_rope cases the Triton prologue does not take: the reference
    ("qk_norm_rope", H100, {"rope_pairs": "half"}, "torch", "torch_reference", "interleaved"),
    ("qk_norm_rope", H100, dict(GQA, norm_all_heads=True), "torch", "torch_reference", "all-heads"),
    ("qk_norm_rope", H100, {"norm_all_heads": True}, "triton", "triton", "no csrc kernel"),
    # CPU: the reference, interpreter or not
    ("attn_with_kv_cache", CPU, {}, "torch", "torch_reference", "cpu"),
    ("block_sparse_attn", CPU_INTERP, BSA64, "torch", "torch_reference", "cpu"),
]


@pytest.mark.parametrize("op,machine,extra,backend,impl,word", AUTO_TABLE)
def test_auto_table(op, machine, extra, backend, impl, word):
    c = choose_kernel(op, machine._replace(**extra), "auto")
    assert (c.op, c.backend, c.impl) == (op, backend, impl), c
    assert word in c.reason, c


# explicit requests: (op, machine, extra, requested) -> impl, or the reason it raises with
EXPLICIT_TABLE = [
    ("attn_with_kv_cache", H100, {}, "triton", "triton_fused"),  # never the cuDNN route
    ("prefix_attn", H100, {}, "triton", "triton_fused"),
    ("block_sparse_attn", H100, BSA64, "triton", "triton"),
    ("attn_with_kv_cache", H100, {}, "cuda", "csrc_sm90_ws"),
    ("attn_with_kv_cache", H100, {"head_dim": 64}, "cuda", "csrc_sm90"),
    ("attn_with_kv_cache", H100, KV_BSA_CACHE, "cuda", "csrc_sm90_ws"),
    ("attn_with_kv_cache", H100, KV_BSA_STRADDLE, "cuda", "csrc_sm90"),
    ("attn_with_kv_cache", H100, BSA64, "cuda", "csrc_sm90_ws"),
    ("block_sparse_attn", H100, BSA128, "cuda", "csrc_sm90"),
    ("block_sparse_attn_fwd", H100, BSA64, "cuda", "csrc_sm90_ws"),
    ("block_sparse_attn", A100, BSA64, "cuda", "csrc_sm80"),
    ("prefix_attn", H100_SM80_BUILD, {}, "cuda", "csrc_sm80"),
    ("attn_with_kv_cache", H100, {"dtype": "float32"}, "torch", "torch_reference"),
    ("attn_with_kv_cache", CPU_INTERP, {}, "triton", "triton_fused"),
    ("qk_norm_rope", CPU_INTERP, {}, "triton", "triton"),
    ("fp8_quantize", CPU_INTERP, {}, "triton", "triton"),
    # refusals
    ("block_sparse_attn", H100, dict(BSA64, requires_grad=True), "cuda", "forward only"),
    ("block_sparse_attn", H100, dict(BSA128, requires_grad=True), "cuda", "forward only"),
    ("attn_with_kv_cache", H100, dict(BSA64, requires_grad=True), "cuda", "forward only"),
    ("attn_with_kv_cache", H100, {"dtype": "float32"}, "cuda", "bf16/fp16 only"),
    ("attn_with_kv_cache", H100, {"head_dim": 96}, "cuda", "head_dim 96 not supported"),
    ("block_sparse_attn", H100, dict(BSA64, block_tokens=(2048, 64)), "cuda", "at most 1024"),
    ("select_blocks", H100, {}, "cuda", "has no csrc kernel"),
    ("qk_norm_rope", H100, {}, "cuda", "has no csrc kernel"),
    ("fp8_quantize", H100, {}, "cuda", "has no csrc kernel"),
    ("fp8_quantize", A100, {}, "triton", "compute capability >= 8.9"),
    ("fp8_quantize", H100, {"head_dim": 20000}, "triton", "<= 16384"),
    ("attn_with_kv_cache", H100_NO_EXT, {}, "cuda", "not built"),
    ("attn_with_kv_cache", NO_TRITON, {}, "triton", "import triton failed"),
    ("attn_with_kv_cache", H100, {"dtype": "float64"}, "triton", "torch backend only"),
    ("attn_with_kv_cache", H100._replace(interpret=True), {}, "triton", "TRITON_INTERPRET=1 is set"),
    ("attn_with_kv_cache", CPU, {}, "triton", "need TRITON_INTERPRET=1"),
    ("attn_with_kv_cache", CPU, {}, "cuda", "needs CUDA tensors"),
    ("block_sparse_attn", CPU_INTERP, BSA64, "cuda", "needs CUDA tensors"),
    ("attn_with_kv_cache", H100, GQA, "triton", "triton_fused"),
    ("prefix_attn", CPU_INTERP, GQA, "triton", "triton_fused"),
    ("attn_with_kv_cache", H100, GQA, "cuda", "GQA/MQA"),
    ("prefix_attn", H100, GQA, "cuda", "GQA/MQA"),
    ("qk_norm_rope", H100, {"rope_pairs": "half"}, "triton", "interleaved pairs"),
    ("qk_norm_rope", CPU_INTERP, {"rope_pairs": "half"}, "triton", "interleaved pairs"),
    ("qk_norm_rope", H100, dict(GQA, norm_all_heads=True), "triton", "all-heads norm"),
]


@pytest.mark.parametrize("op,machine,extra,requested,expect", EXPLICIT_TABLE)
def test_explicit_table(op, machine, extra, requested, expect):
    f = machine._replace(**extra)
    if expect in {impl for _, impl in dispatch._REGISTRY} | {"torch_reference"}:
        c = choose_kernel(op, f, requested)
        assert (c.backend, c.impl) == (requested, expect), c
    else:
        with pytest.raises(BackendUnavailableError, match=rf"^{op}: backend '{requested}' unavailable: .*{expect}"):
            choose_kernel(op, f, requested)


MACHINES = [H100, H100_NO_EXT, H100_NO_WS, H100_SM80_BUILD, A100, NO_TRITON, CPU, CPU_INTERP,
            H100._replace(interpret=True), H100._replace(cudnn=False)]
VARIANTS = [{}, {"head_dim": 64}, {"dtype": "float32"}, {"dtype": "float16"}, {"dtype": "float64"},
            {"requires_grad": True}, BSA64, BSA128, KV_BSA_CACHE, KV_BSA_STRADDLE, GQA, {"rope_pairs": "half"},
            dict(GQA, norm_all_heads=True)]


def test_every_choice_is_registered_and_explicit_never_falls_back():
    """Whole product of ops x machines x inputs x requests: every answer names a registered impl of
    its op on the backend it claims; an explicit request answers with that backend or raises."""
    prefix = {"torch": "torch_", "triton": "triton", "cuda": "csrc_"}
    n = 0
    for op, m, extra, req in itertools.product(OPS, MACHINES, VARIANTS, dispatch.BACKENDS):
        f = m._replace(**extra)
        try:
            c = choose_kernel(op, f, req)
        except BackendUnavailableError as e:
            assert req != "auto" and req != "torch", (op, f, req, e)
            assert str(e).startswith(f"{op}: backend '{req}' unavailable: ")
            continue
        n += 1
        assert c.op == op and c.reason
        assert c.impl.startswith(prefix[c.backend]), c
        assert c.impl == "torch_reference" or (op, c.impl) in dispatch._REGISTRY, c
        if req != "auto":
            assert c.backend == req, (req, c)
        if f.device_type != "cuda" and req == "auto":
            assert c.impl == "torch_reference"
        if c.impl == "triton_prologue_cudnn":
            assert req == "auto"  # only auto picks the cuDNN route
            assert not f.gqa  # ... and never for GQA (it does not index kv heads)
        if f.gqa:
            assert not c.impl.startswith("csrc_"), c  # the csrc kernels take equal head counts
    assert n > 300


def test_env_backend_replaces_auto_and_never_falls_back():
    c = choose_kernel("attn_with_kv_cache", H100._replace(env_backend="triton"), "auto")
    assert c.impl == "triton_fused" and "LONGCAT_KERNELS_BACKEND=triton" in c.reason
    assert choose_kernel("prefix_attn", H100._replace(env_backend="torch")).impl == "torch_reference"
    with pytest.raises(BackendUnavailableError, match=r"LONGCAT_KERNELS_BACKEND=cuda.*needs CUDA tensors"):
        choose_kernel("prefix_attn", CPU._replace(env_backend="cuda"))
    # an explicit argument wins over the variable
    assert choose_kernel("prefix_attn", H100._replace(env_backend="torch"), "cuda").impl == "csrc_sm90_ws"


def test_bad_names_raise():
    with pytest.raises(ValueError, match="op: expected one of"):
        choose_kernel("flash_attn", H100)
    with pytest.raises(ValueError, match="backend: expected one of"):
        choose_kernel("prefix_attn", H100, "cudnn")


# ---------------------------------------------------------------------------------------------
# environment variables: each parsed by one helper, bad values raise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad", [("LONGCAT_KERNELS_JIT", "2"), ("LONGCAT_KERNELS_DETERMINISTIC", "yes please"),
                                      ("LONGCAT_KERNELS_VERBOSE_BUILD", "x"), ("LONGCAT_KERNELS_SKIP_CUDA_BUILD", "on!")])
def test_bad_flag_values_raise(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=rf"{name}: expected 0 or 1 \(or false/true, no/yes, off/on\), got '{bad}'"):
        _envvars.env_flag(name, False)


def test_flags_parse(monkeypatch):
    monkeypatch.setenv("LONGCAT_KERNELS_JIT", "0")
    assert _envvars.env_flag("LONGCAT_KERNELS_JIT", True) is False
    monkeypatch.setenv("LONGCAT_KERNELS_JIT", " 1 ")
    assert _envvars.env_flag("LONGCAT_KERNELS_JIT", False) is True
    monkeypatch.delenv("LONGCAT_KERNELS_JIT")
    assert _envvars.env_flag("LONGCAT_KERNELS_JIT", True) is True


def test_bad_jit_value_raises_at_load(monkeypatch):
    from longcat_kernels import _ext

    monkeypatch.setenv("LONGCAT_KERNELS_JIT", "maybe")
    with pytest.raises(ValueError, match="LONGCAT_KERNELS_JIT"):
        _ext.load_extension()


def test_backend_variable(monkeypatch):
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "Triton")
    assert _envvars.backend_override() == "triton"
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "warp")
    with pytest.raises(ValueError, match=r"LONGCAT_KERNELS_BACKEND: expected one of .*got 'warp'"):
        _envvars.backend_override()
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="LONGCAT_KERNELS_BACKEND"):
        lk.prefix_attn(q, q, q, 3)


def test_cuda_archs(monkeypatch):
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "9.0a;8.0")
    assert _envvars.cuda_arch_flags_from_env() == [
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-gencode=arch=compute_90a,code=sm_90a")
    assert _envvars.cuda_arch_flags_from_env() == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "hopper")
    with pytest.raises(ValueError, match="LONGCAT_KERNELS_CUDA_ARCHS: expected compute capabilities"):
        _envvars.cuda_arch_flags_from_env()
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS")
    assert _envvars.cuda_arch_flags_from_env() is None


@pytest.mark.parametrize("name", _envvars.REMOVED)
def test_removed_kernel_knobs_raise(monkeypatch, name):
    monkeypatch.setenv(name, "1")
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match=rf"{name}: removed"):
        lk.prefix_attn(q, q, q, 3)


def test_no_other_product_variables():
    """Every LONGCAT_KERNELS_* the packages and the product bench read is in _envvars.KNOWN (grep)."""
    import pathlib
    import re

    root = pathlib.Path(lk.__file__).parent
    found = set()
    code = [p for p in (root.parent / "csrc").glob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    others = list((root.parent / "longcat_vc").rglob("*.py")) + [
        p for p in (root.parent / "bench").rglob("*.py") if "dev" not in p.parts]
    for p in list(root.rglob("*.py")) + others + code + [root.parent / "setup.py"]:
        if p.is_file():
            found |= set(re.findall(r"LONGCAT_KERNELS_[A-Z0-9_]+[A-Z0-9]", p.read_text(errors="ignore")))
    assert found - set(_envvars.KNOWN) - set(_envvars.REMOVED) == set()


# ---------------------------------------------------------------------------------------------
# env prints choose_kernel's answer; the choice is recorded and logged
# ---------------------------------------------------------------------------------------------
def test_env_prints_choose_kernel(capsys):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts = lk._backend.representative_facts(device)
    assert env.main([]) == 0
    text = capsys.readouterr().out
    for op in OPS:
        f = facts._replace(block_sparse=op.startswith("block_sparse"),
                           block_tokens=(64, 64) if op.startswith("block_sparse") else None)
        c = choose_kernel(op, f)
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(op + " "))
        assert f"auto -> {c.backend}" in line and c.impl in line and c.reason in line, (line, c)
    assert "extension longcat_kernels._C:" in text
    if device == "cpu":
        assert "skipped: no CUDA device" in text


def test_record_and_log(caplog, monkeypatch):
    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    q = torch.randn(1, 8, 1, 16)
    with caplog.at_level("DEBUG", logger="longcat_kernels"), dispatch.record_choices() as got:
        lk.prefix_attn(q, q, q, 3)
        lk.prefix_attn(q, q, q, 3, backend="torch")
    assert [c.impl for c in got] == ["torch_reference", "torch_reference"]
    assert dispatch.last_choice("prefix_attn") == got[-1]
    assert "prefix_attn: backend=torch impl=torch_reference" in caplog.text


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(BackendUnavailableError, match=r"prefix_attn: backend 'triton' unavailable"):
        lk.prefix_attn(q, q, q, 3, backend="triton")


# values Triton reads differently from a plain "== '1'" or a stripped, lower-cased match
TRITON_INTERPRET_VALUES = ["1", "0", "", "true", "TRUE", "True", "on", "ON", "yes", "YeS", "y", "Y", "off", "false",
                           "no", "n", "t", "2", "01", "enable", " 1", "1 ", "true ", "\t1", "yes\n"]


@pytest.mark.parametrize("value", TRITON_INTERPRET_VALUES)
def test_triton_interpret_reads_the_variable_as_triton_does(monkeypatch, value):
    """We said "interpreter" for " 1" (Triton compiles) and the op modules "compiled" for "true"
    (Triton 3.3+ interprets): one reader, which agrees with the installed Triton's own knob."""
    pytest.importorskip("triton")
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", value)
    if hasattr(triton, "knobs"):  # Triton >= 3.3
        expect = bool(triton.knobs.runtime.interpret)
    else:  # 3.0-3.2: jit() tests os.getenv("TRITON_INTERPRET", "0") == "1"
        expect = value == "1"
    assert dispatch.triton_interpret() is expect


def test_triton_interpret_has_one_reader():
    """No module of the kernels package reads TRITON_INTERPRET but dispatch.triton_interpret (grep)."""
    import pathlib
    import re

    root = pathlib.Path(lk.__file__).parent
    readers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if re.search(r"environ[^\n]*TRITON_INTERPRET|getenv\([^\n]*TRITON_INTERPRET", p.read_text()))
    assert readers == ["dispatch.py"]


@pytest.mark.parametrize("value, interpreted", [("true", True), (" 1", False)])
def test_op_modules_agree_with_the_kernels_triton_built(value, interpreted):
    """The op modules' interpreter settings (tile sizes, stages) follow the kernels Triton decorated
    at their import: InterpretedFunction under the interpreter, JITFunction when it compiles."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = (
        "import longcat_kernels.dispatch as d\n"
        "from longcat_kernels.ops.rope import triton as rt\n"
        "from longcat_kernels.ops.kv_cache_attn import triton as kt\n"
        "from longcat_kernels.ops.block_sparse_attn import triton as bt\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "print(isinstance(rt.rope_apply, InterpretedFunction), rt._INTERPRET, kt._INTERPRET, bt._interpreting(),"
        " d.triton_interpret())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET=value, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    import triton

    if not hasattr(triton, "knobs") and value == "true":
        interpreted = False  # Triton < 3.3: "1" only
    assert r.stdout.split() == [str(interpreted)] * 5


@pytest.mark.parametrize("op", sorted(OPS))
def test_interpreter_dtype_rule(op):
    """The Triton CPU interpreter computes fp32/fp16 only (numpy has no bf16): bf16 is refused with a
    reason naming the interpreter; auto runs the reference; CUDA bf16 is unaffected."""
    for dt in ("float32", "float16"):
        assert choose_kernel(op, CPU_INTERP._replace(dtype=dt), "triton").backend == "triton"
    with pytest.raises(BackendUnavailableError, match=rf"{op}: backend 'triton' unavailable: .*CPU interpreter"):
        choose_kernel(op, CPU_INTERP._replace(dtype="bfloat16"), "triton")
    with pytest.raises(BackendUnavailableError, match="fp32/fp16"):
        choose_kernel(op, CPU_INTERP._replace(dtype="bfloat16", env_backend="triton"), "auto")
    assert choose_kernel(op, CPU_INTERP._replace(dtype="bfloat16"), "auto").impl == "torch_reference"
    assert choose_kernel(op, H100._replace(dtype="bfloat16"), "triton").backend == "triton"


# ---------------------------------------------------------------------------------------------
# GPU: what runs is what env printed
# ---------------------------------------------------------------------------------------------
def _gpu_calls():
    from longcat_kernels.ops.block_sparse_attn.api import _forward

    B, H, D, grid = 1, 2, 128, (4, 8, 8)
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sel = lk.select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    w = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    rope = lk.Rope3D((8, 8, 8), D, device="cuda")
    return {
        "select_blocks": lambda b: lk.select_blocks(q, k, grid_q=grid, sparsity=0.5, backend=b).counts,
        "block_sparse_attn": lambda b: lk.block_sparse_attn(q, k, v, selection=sel, backend=b),
        "block_sparse_attn_fwd": lambda b: _forward(q, k, v, sel, None, backend=b)[0],
        "attn_with_kv_cache": lambda b: lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, backend=b),
        "prefix_attn": lambda b: lk.prefix_attn(q, k, v, 100, backend=b),
        "qk_norm_rope": lambda b: lk.qk_norm_rope(q, k, w, w, rope=rope, backend=b)[0],
        "fp8_quantize": lambda b: (lambda r: r[0].float() * r[1])(lk.fp8_quantize_rows(q, backend=b)),
    }


@pytest.mark.cuda
def test_gpu_what_runs_is_what_env_printed(monkeypatch):
    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    printed = env.op_choices("cuda")
    for op, call in _gpu_calls().items():
        with dispatch.record_choices() as got:
            out = call("auto")
        ran = [c for c in got if c.op == op]
        assert ran, op
        assert ran[-1]._asdict() == printed[op]["auto"], (op, ran[-1], printed[op]["auto"])
        assert dispatch.last_choice(op) == ran[-1]
        # and it computed the op: close to the reference (top-k gating: counts equal)
        exp = call("torch")
        assert not out.float().isnan().any(), op
        torch.testing.assert_close(out.float(), exp.float(), atol=3e-2, rtol=3e-2)


def test_choose_derives_gqa_from_head_counts():
    """``choose`` sets ``Facts.gqa`` from the tensors (k/v heads != q heads), so no caller forgets it."""
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 2, 16)
    seen = {}
    orig = dispatch.choose_kernel

    def spy(op, facts, requested="auto"):
        seen[op] = facts
        return orig(op, facts, requested)

    try:
        dispatch.choose_kernel = spy
        dispatch.choose("prefix_attn", q, k, k, requested="torch")
        assert seen["prefix_attn"].gqa is True
        dispatch.choose("prefix_attn", q, q, q, requested="torch")
        assert seen["prefix_attn"].gqa is False
        dispatch.choose("qk_norm_rope", q, q, requested="torch", rope_pairs="half", norm_all_heads=True)
        assert (seen["qk_norm_rope"].rope_pairs, seen["qk_norm_rope"].norm_all_heads) == ("half", True)
    finally:
        dispatch.choose_kernel = orig


def test_first_compile_in_a_process_compiles_once():
    """An op compiled before any eager call traced the environment scan: the graph guarded on the
    once-per-process flag (and the checks table) the trace itself flipped, so the next call compiled
    again (2 graphs for the first torch.compile of every process). Fresh process: the flag is per process."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, longcat_kernels as lk\n"
        "from torch._dynamo.utils import counters\n"
        "f = torch.compile(lambda q: lk.prefix_attn(q, q, q, 0), backend='eager', fullgraph=True)\n"
        "q = torch.randn(1, 8, 1, 8)\n"
        "f(q); f(q + 1)\n"
        "print(counters['stats']['unique_graphs'])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGCAT_")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "1", r.stdout + r.stderr
