"""Round-4 hostile-user checks of the integrations: the diffusers processor, LoRA training with
peft, and the bench CLI / report. Each test failed before its fix (the comment says how)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import folder_module

HERE = Path(__file__).resolve().parent



# ---------------------------------------------------------------------- diffusers processor
def _wan():
    pytest.importorskip("diffusers")
    return folder_module("integrations", "test_diffusers_hostile")


@pytest.mark.parametrize("shapes", [
    [(2, 8, 12), (2, 12, 8)],   # same token count, another grid: silently wrong gradients
    [(2, 8, 8), (1, 8, 8)],     # another token count: ValueError raised from inside backward
])
def test_gradient_checkpointing_recomputes_each_forward_with_its_own_grid(shapes):
    # diffusers' enable_gradient_checkpointing recomputes every block in backward; the processor took
    # the grid of the *last* forward, so two forwards before one backward (bucketed resolutions, a
    # no-grad sample in between) gave gradients of the wrong grid
    h = _wan()
    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention

    def grads(ckpt):
        m = h._model()
        apply_block_sparse_attention(m, h.P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
        m.train()
        if ckpt:
            m.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(0)
        losses = []
        for F, H, W in shapes:
            x = torch.randn(1, 4, F, H, W, generator=g)
            txt = torch.randn(1, 7, h.TEXT_DIM, generator=g)
            out = m(hidden_states=x, timestep=torch.tensor([300]), encoder_hidden_states=txt, return_dict=False)[0]
            losses.append((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum())
        sum(losses).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    want, got = grads(False), grads(True)
    assert got.keys() == want.keys() and any("attn1.to_q" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")


# ---------------------------------------------------------------------- LoRA training (peft)
def _peft_model(init=False):
    pytest.importorskip("peft")
    from longcat_vc import training as tr

    tc = folder_module("vc", "tiny_ckpt")
    cfg = tc.tiny_config(enable_bsa=False, attn_backend="torch")
    dit = tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=3)).train()
    return cfg, tr.add_lora(dit, tr.lora_config(rank=4, alpha=8, init_lora_weights=init))


def test_saving_in_a_dtype_the_adapter_overflows_is_refused(tmp_path):
    # finite fp32 adapter weights above 65504 saved with dtype=torch.float16 became Inf in the file:
    # save_longcat_lora reported success, load_lora refused the file later
    from longcat_vc import training as tr

    _, model = _peft_model()
    with torch.no_grad():
        model.get_base_model().blocks[0].attn.proj.lora_B["default"].weight.fill_(1e5)
    path = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match=r"^dtype: blocks\.0\.attn\.proj\.lora_B .*torch\.float16"):
        tr.save_longcat_lora(model, path, dtype=torch.float16)
    assert not path.exists()
    tr.save_longcat_lora(model, path, dtype=torch.bfloat16)  # bf16 holds 1e5
    assert path.exists()


def test_an_fp8_lora_file_is_refused_when_saved_and_when_read(tmp_path):
    # save_longcat_lora(dtype=torch.float8_e4m3fn) wrote a file that load_lora then failed on with
    # NotImplementedError: "sum_cpu" not implemented for 'Float8_e4m3fn' (its non-finite check)
    from safetensors.torch import save_file

    from longcat_vc import training as tr

    cfg, model = _peft_model()
    path = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match=r"^dtype: expected None or one of .*got torch\.float8_e4m3fn"):
        tr.save_longcat_lora(model, path, dtype=torch.float8_e4m3fn)
    assert not path.exists()
    sd = tr.longcat_lora_state_dict(model)
    key = next(k for k in sd if k.endswith("lora_down.weight"))
    save_file({k: v.to(torch.float8_e4m3fn) if k == key else v for k, v in sd.items()}, str(path))
    tc = folder_module("vc", "tiny_ckpt")
    dit = tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=3))
    with pytest.raises(ValueError, match=rf"holds tensor\(s\) of a dtype other than .*{key} \(torch\.float8_e4m3fn\)"):
        dit.load_lora(path, "x")


def test_targets_that_also_match_a_non_linear_module_are_refused_before_training(tmp_path):
    # "proj" (every projection) also matches x_embedder.proj, a Conv3d: peft adapted and trained it,
    # and save_longcat_lora refused it only after the training ("only nn.Linear targets can be saved")
    peft = pytest.importorskip("peft")
    from longcat_vc import training as tr

    tc = folder_module("vc", "tiny_ckpt")
    cfg = tc.tiny_config(enable_bsa=False, attn_backend="torch")
    dit = tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=3))
    with pytest.raises(ValueError, match=r"^add_lora: targets \['proj'\] also match \['x_embedder\.proj \(Conv3d\)'\]"):
        tr.add_lora(dit, tr.lora_config(rank=4, alpha=8, targets=["proj"]))
    assert not any(type(m).__module__.startswith("peft.") for m in dit.modules())
    with pytest.raises(ValueError, match=r"also match \['x_embedder\.proj \(Conv3d\)', 'y_embedder\.y_proj"):
        tr.add_lora(dit, peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*proj"))  # a peft regex
    # left out with exclude_modules: the linears are adapted and the file is written
    model = tr.add_lora(dit, tr.lora_config(rank=4, alpha=8, targets=["proj"], exclude_modules=["x_embedder.proj"]))
    paths = tr.save_longcat_lora(model, tmp_path / "lora.safetensors")
    assert "blocks.0.attn.proj" in paths and "blocks.0.cross_attn.proj" in paths and "x_embedder.proj" not in paths


@pytest.mark.parametrize("kw,msg", [
    # the base layers' biases trained and the file silently lacked them (reload off by ~3%)
    (dict(bias="all"), "bias='all' trains the base layers' biases"),
    (dict(bias="lora_only"), "bias='lora_only' trains the base layers' biases"),
    # accepted until save_longcat_lora refused it, after the whole training
    (dict(lora_bias=True), "lora_bias=True cannot be saved"),
])
def test_a_hand_made_peft_config_the_file_cannot_hold_is_refused_before_training(kw, msg):
    peft = pytest.importorskip("peft")
    from longcat_vc import training as tr

    tc = folder_module("vc", "tiny_ckpt")
    cfg = tc.tiny_config(enable_bsa=False, attn_backend="torch")
    dit = tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=3))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(tr.LORA_TARGETS_CFG_STEP), **kw)
    with pytest.raises(ValueError, match=rf"^add_lora: config: {msg}"):
        tr.add_lora(dit, config)
    assert not any(type(m).__module__.startswith("peft.") for m in dit.modules())
    if "lora_bias" in kw:
        with pytest.raises(ValueError, match=rf"^lora_config: {msg}"):
            tr.lora_config(rank=4, alpha=8, **kw)


# ---------------------------------------------------------------------- bench report / CLI
def _result_doc(rows, date="2026-01-01T00:00:00Z"):
    return {"schema": "longcat-bench/1", "config": {"quick": False, "dtype": "float32"}, "rows": rows,
            "machine": {"device_slug": "cpu-x", "cpu": "x", "torch": "2", "commit": None, "date": date}}


_BSA_ROW = {"suite": "bsa", "case": "s0.5/gated/fwd", "backend": "torch", "status": "ok", "ms": 1.0, "kind": "gated",
            "grid": "8x8x14", "mode": "fwd", "chunk": "4x4x4", "sparsity": 0.5}


@pytest.mark.parametrize("suite_row,field", [
    (_BSA_ROW, "grid"),
    (_BSA_ROW, "backend"),
    ({"suite": "cached-attn", "case": "c4/fused", "backend": "torch", "status": "ok", "ms": 1.0, "cond_latents": 4,
      "op": "fused"}, "op"),
    ({"suite": "cache", "case": "c4/on", "backend": "auto", "status": "ok", "ms": 1.0, "mode": "on", "cond_frames": 13,
      "cond_latents": 4}, "cond_frames"),  # no speedup: it needs a timed cache-off row (round 53)
])
def test_report_names_the_file_row_and_field_a_timed_row_lacks(tmp_path, suite_row, field):
    # a results file (of an older version, or edited by hand) whose timed row lacks a field the tables
    # index by: a bare KeyError traceback naming neither the file nor the row (a cache row without
    # cond_frames: "None" in the table, the KeyError from --plot)
    import json

    from bench import report

    row = {k: v for k, v in suite_row.items() if k != field}
    d = tmp_path / "cpu-x"
    d.mkdir()
    f = d / "bench-x_20260101T000000Z.json"
    f.write_text(json.dumps(_result_doc([row])))
    with pytest.raises(ValueError, match=rf"{f.name}: rows\[0\] \(suite '{row['suite']}'.*missing \['{field}'\]"):
        report.render(tmp_path)
    with pytest.raises(SystemExit, match=rf"missing \['{field}'\]"):
        report.main(["--results", str(tmp_path)])
    row["status"] = "error"  # rows that were not timed are not read by the tables
    f.write_text(json.dumps(_result_doc([row, suite_row])))
    assert report.render(tmp_path)


@pytest.mark.parametrize("flag", ["--write", "--check", None])
def test_report_refuses_a_results_folder_or_readme_that_does_not_exist(tmp_path, flag):
    # a mistyped --results rendered "no results yet": --check said the table was out of date and
    # --write replaced the README's whole table with that placeholder; a mistyped --readme was a
    # FileNotFoundError traceback
    from bench import report

    readme = tmp_path / "README.md"
    text = f"intro\n{report.START}\n| the table |\n{report.END}\n"
    readme.write_text(text)
    extra = [flag] if flag else []
    with pytest.raises(SystemExit, match=r"^--results: expected an existing folder, got .*bench/result \(nothing there\)"):
        report.main(["--results", str(HERE.parent / "bench" / "result"), "--readme", str(readme)] + extra)
    assert readme.read_text() == text
    with pytest.raises(SystemExit, match=r"^--results: expected an existing folder, got .* \(a file\)"):
        report.main(["--results", str(readme), "--readme", str(readme)] + extra)
    if flag:
        with pytest.raises(SystemExit, match=r"^--readme: expected an existing file, got .*READM\.md \(nothing there\)"):
            report.main(["--readme", str(tmp_path / "READM.md"), flag])


def test_report_refuses_a_results_folder_without_result_documents(tmp_path):
    # --results bench/results/h100 (one level too deep: no <device>/ folders) rendered the "no results
    # yet" placeholder, and --write put it in place of the README's table
    from bench import report

    readme = tmp_path / "README.md"
    text = f"{report.START}\n| the table |\n{report.END}\n"
    readme.write_text(text)
    with pytest.raises(SystemExit, match=r"^--results: expected a folder of <device>/ folders .*h100 with none"):
        report.main(["--results", str(HERE.parent / "bench" / "results" / "h100"), "--readme", str(readme), "--write"])
    assert readme.read_text() == text
    assert report.main(["--results", str(HERE.parent / "bench" / "results"), "--readme", str(readme), "--write"]) == 0
    assert "bench-cache-bsa-cached-attn" in readme.read_text()


@pytest.mark.parametrize("argv, msg", [
    # each was timed twice; the tables (keyed by the value) kept one row and paired an "on" row of one
    # repeat with the "off" row of the other for its speedup
    (["--cond-frames", "13,13"], "--cond-frames: expected distinct values, got 13 and 13"),
    (["--cond-frames", "13,14"], "--cond-frames: expected distinct values, got 13 and 14 give the same conditioning"),
    (["--shapes", "tiny,24x2x4"], "--shapes: expected distinct values, got tiny and 24x2x4 give the same grid"),
    (["--sparsity", "0.5,0.50", "--suite", "bsa"], "--sparsity: expected distinct values, got 0.5 and 0.5"),
    (["--backends", "torch,torch", "--suite", "bsa"], "--backends: expected distinct values, got torch and torch"),
    # every case errored with "Overflow when unpacking long long" from torch's generator
    (["--seed", str(2**64)], "--seed: expected an int in [-2**63, 2**63)"),
])
def test_cli_refuses_repeats_and_seeds_out_of_range_before_running(argv, msg, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["--quick", "--no-write", "--time-limit", "1e-9"] + argv)
    assert str(ei.value.code).startswith(msg), ei.value.code
    assert "== suite" not in capsys.readouterr().out


def test_report_shows_a_non_finite_mfu_as_written():
    # the writer stores NaN/Inf floats as strings; the cache table computed 100 * "inf": a cell of
    # "inf" repeated 100 times in the README
    from bench import report

    row = {"suite": "cache", "case": "c4/off", "backend": "auto", "status": "ok", "ms": 2.0, "mode": "off",
           "cond_frames": 13, "cond_latents": 4, "grid": "24x2x4", "mfu": "inf"}
    on = dict(row, case="c4/on", mode="on", mfu=0.25)
    table = report.cache_table(_result_doc([row, on]))
    assert "infinf" not in table
    assert table.splitlines()[-1].endswith("| inf | 25% |"), table
