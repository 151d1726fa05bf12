"""Hostile round 5 (interop and tools): a Wan-shaped diffusers model whose self-attention is not Wan's,
processors set after apply, a bad bench commit in the environment report and bench, the
LONGCAT_KERNELS_* settings a results file records, and a results file cut short."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.integrations.diffusers import (
    BlockSparseWanAttnProcessor, apply_block_sparse_attention, remove_block_sparse_attention,
)


class _Attn(torch.nn.Module):
    def __init__(self, processor):
        super().__init__()
        self.processor = processor

    def set_processor(self, processor):
        self.processor = processor


class _Block(torch.nn.Module):
    def __init__(self, processor):
        super().__init__()
        self.attn1 = _Attn(processor)


def _wan_shaped(processor_cls):
    """A module with Wan's structure (3D patch_size, blocks[i].attn1 with processors), no diffusers needed."""
    m = torch.nn.Module()
    m.config = types.SimpleNamespace(patch_size=(1, 2, 2))
    m.blocks = torch.nn.ModuleList([_Block(processor_cls()) for _ in range(2)])
    return m


def test_a_wan_shaped_model_with_another_self_attention_is_refused_at_apply():
    # diffusers' AnyFlow has Wan's structure, but its RoPE tables come as a dict of complex tensors (and its
    # input is [B, F, C, H, W]): apply accepted it and the first forward failed with "cannot create weak
    # reference to 'dict' object"
    AnyFlowAttnProcessor = type("AnyFlowAttnProcessor", (), {
        "__module__": "diffusers.models.transformers.transformer_anyflow", "__call__": lambda self, *a, **k: None})
    m = _wan_shaped(AnyFlowAttnProcessor)
    with pytest.raises(TypeError, match=r"^transformer: Module is not supported: blocks\[0\]\.attn1 runs "
                                        r"AnyFlowAttnProcessor, not the Wan self-attention"):
        apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5))
    assert len(m._forward_pre_hooks) == 0 and not hasattr(m, "_longcat_block_sparse")
    assert not any(isinstance(b.attn1.processor, BlockSparseWanAttnProcessor) for b in m.blocks)
    # Wan's own processor (also SkyReels-V2's copy of it) is still taken
    WanAttnProcessor = type("WanAttnProcessor", (), {
        "__module__": "diffusers.models.transformers.transformer_wan", "__call__": lambda self, *a, **k: None})
    apply_block_sparse_attention(_wan_shaped(WanAttnProcessor), lk.BlockSparseParams(sparsity=0.5))


def test_the_real_anyflow_model_is_refused_before_it_is_changed():
    mod = pytest.importorskip("diffusers.models.transformers.transformer_anyflow")
    m = mod.AnyFlowTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      text_dim=24, freq_dim=16, ffn_dim=48, num_layers=1, rope_max_seq_len=32)
    with pytest.raises(TypeError, match=r"AnyFlowTransformer3DModel is not supported.*AnyFlowAttnProcessor"):
        apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)), backend="torch")
    assert len(m._forward_pre_hooks) == 0


def test_remove_keeps_a_processor_set_after_apply():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32)
    original = m.blocks[0].attn1.processor
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    mine = type(original)()  # the user's own choice for block 1, made after apply
    m.blocks[1].attn1.set_processor(mine)
    remove_block_sparse_attention(m)
    # block 1's processor was replaced by the one apply had found there
    assert m.blocks[1].attn1.processor is mine
    assert m.blocks[0].attn1.processor is original
    assert len(m._forward_pre_hooks) == 0 and not hasattr(m, "_longcat_block_sparse")


def test_a_bad_bench_commit_is_listed_by_the_report_and_stops_bench_with_its_message(monkeypatch, capsys):
    from bench import cli
    from longcat_kernels import _envvars, env

    monkeypatch.setenv("LONGCAT_KERNELS_BENCH_COMMIT", "not-a-hash")
    # the report showed it as a plain setting; bench then died with a traceback from the machine header
    assert "LONGCAT_KERNELS_BENCH_COMMIT" in _envvars.setting_problems()
    assert env.main([]) == 0
    out = capsys.readouterr().out
    assert "INVALID LONGCAT_KERNELS_BENCH_COMMIT: LONGCAT_KERNELS_BENCH_COMMIT: expected a commit hash" in out
    assert "every op call raises" not in out  # a bench-only setting: the ops still run
    q = torch.randn(1, 8, 1, 16)
    lk.flash_attn_with_kvcache(q, q, q, backend="torch")
    with pytest.raises(SystemExit, match=r"^LONGCAT_KERNELS_BENCH_COMMIT: expected a commit hash \(7-40 hex digits\), "
                                         r"got 'not-a-hash'$"):
        cli.main(["--suite", "bsa", "--quick", "--no-write"])
    assert "== suite" not in capsys.readouterr().out  # refused before anything ran


def test_results_record_the_longcat_kernels_settings(monkeypatch):
    from bench import machine

    # with LONGCAT_KERNELS_BACKEND=triton the cache suite's "auto" DiT ran Triton; nothing in the file said so
    import os

    for k in [k for k in os.environ if k.startswith("LONGCAT_KERNELS_")]:  # (the caller's own settings)
        monkeypatch.delenv(k)
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("LONGCAT_KERNELS_DETERMINISTIC", "1")
    monkeypatch.setenv("LONGCAT_KERNELS_BENCH_COMMIT", "abcdef1")  # recorded as the commit, not repeated here
    h = machine.machine_header("cpu")
    assert h["commit"] == "abcdef1"
    assert h["settings"] == {"LONGCAT_KERNELS_BACKEND": "torch", "LONGCAT_KERNELS_DETERMINISTIC": "1"}
    assert "settings: LONGCAT_KERNELS_BACKEND=torch, LONGCAT_KERNELS_DETERMINISTIC=1" in machine.format_header(h)


def _doc(date: str) -> dict:
    from bench import writer

    return {"schema": writer.SCHEMA, "machine": {"date": date, "cpu": "x", "device_slug": "cpu-x"},
            "config": {"quick": False, "dtype": "float32"},
            "rows": [{"suite": "pipeline", "case": "c", "backend": "torch", "status": "ok", "ms": 1.0}]}


def test_report_refuses_a_results_file_cut_short(tmp_path):
    from bench import writer

    dev = tmp_path / "cpu-x"
    dev.mkdir()
    (dev / "bench-pipeline_20260101T000000Z.json").write_text(json.dumps(_doc("2026-01-01T00:00:00Z"), indent=1))
    (dev / "notes.json").write_text("{not ours")  # another tool's broken JSON: still skipped
    assert writer.latest_results(tmp_path)["cpu-x"]["pipeline"]["machine"]["date"].startswith("2026")
    newer = json.dumps(_doc("2027-01-01T00:00:00Z"), indent=1)
    cut = dev / "bench-pipeline_20270101T000000Z.json"
    cut.write_text(newer[: len(newer) // 2])
    # the newer, cut-short file was skipped without a word: the report showed the older run as the newest
    with pytest.raises(ValueError, match=rf"^{cut}: a 'longcat-bench/1' results file that is not valid JSON"):
        writer.latest_results(tmp_path)


def test_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from bench import writer

    jpath, _ = writer.write_results(tmp_path, _doc("d")["machine"], {}, [{"suite": "a", "status": "ok"}], "s")
    before = jpath.read_text()
    real_open = Path.open

    class _DiesHalfway:  # the run dies while the file is written
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise KeyboardInterrupt

    def open_for_writing_dies(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return _DiesHalfway(f) if "w" in mode else f

    # (it patched Path.write_text, which the writer stopped using with round 66's replace_file: the patch
    # then caught nothing and the test failed "DID NOT RAISE")
    monkeypatch.setattr(Path, "open", open_for_writing_dies)
    with pytest.raises(KeyboardInterrupt):
        writer.write_results(tmp_path, _doc("d")["machine"], {}, [{"suite": "b", "status": "ok"}] * 50, "s")
    monkeypatch.undo()
    assert jpath.read_text() == before  # the previous suites' results, whole
    assert not list(tmp_path.glob("*.tmp"))  # and no half-written temporary left beside them


def test_results_record_the_imported_package_version(monkeypatch):
    # the version came from the installed distribution's metadata: bench run from a checkout beside a
    # pip-installed release recorded the release's version for the checkout's code
    import longcat_kernels
    from bench import machine

    monkeypatch.setattr(longcat_kernels, "__version__", "9.9.9-checkout")
    assert machine.machine_header("cpu")["longcat_kernels"] == "9.9.9-checkout"


@pytest.mark.parametrize("value", ["-gencode", "-gencode=", "-arch", "-gencode -arch=sm_80", "9.0a -code"])
def test_cuda_archs_flag_without_its_value_is_refused(monkeypatch, value):
    # a bare "-gencode" passed the check and reached nvcc, which failed minutes into the build
    from longcat_kernels._envvars import cuda_arch_flags_from_env

    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    with pytest.raises(ValueError, match="LONGCAT_KERNELS_CUDA_ARCHS: .*(needs a value|has no value|expected)"):
        cuda_arch_flags_from_env()


def test_cuda_archs_flags_with_values_still_pass(monkeypatch):
    from longcat_kernels._envvars import cuda_arch_flags_from_env

    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-gencode arch=compute_90a,code=sm_90a -arch=sm_80")
    assert cuda_arch_flags_from_env() == ["-gencode", "arch=compute_90a,code=sm_90a", "-arch=sm_80"]


def test_bench_exits_1_when_a_named_backend_timed_nothing(capsys):
    # `--backends cuda` on a machine without the extension: the cuda cases were skipped, the SDPA
    # baselines timed, and the run exited 0 as if it had measured what was asked
    from bench import cli

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA (the cuda backend cannot run there)")
    assert cli.main(["--suite", "bsa", "--quick", "--no-write", "--backends", "torch,cuda"]) == 1
    assert "--backends torch,cuda: NOTHING was timed for cuda" in capsys.readouterr().out
    assert cli.main(["--suite", "bsa", "--quick", "--no-write", "--backends", "torch"]) == 0
