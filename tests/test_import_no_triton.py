"""The package imports and runs the reference path with CUDA hidden and `import triton` failing."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    assert not torch.cuda.is_available(), "CUDA should be hidden"
    import longcat_kernels as lk
    assert "triton" not in sys.modules, "importing longcat_kernels imported triton"
    from longcat_kernels.testing import (attention_lowp, attention_oracle, assert_close, bsa_token_mask,
                                         prefix_mask)
    # fp32 tolerance per the rule: 2 x torch's own fp32 error on this machine + floor (CPUs differ
    # in fp32 matmul/exp precision; CI once measured 2.8e-5 here where this machine gives 2.5e-7)
    cpu = torch.backends.cpu.get_cpu_capability()

    av = lk.available_backends()
    assert av["torch"] is None, av
    assert "import triton failed" in av["triton"], av
    assert av["cuda"] is not None, av

    grid = (3, 4, 5)
    q, k, v = (torch.randn(2, 60, 2, 64) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=(2, 2, 2), sparsity=0.5)
    out = lk.block_sparse_attn(q, k, v, selection=sel)
    mask = bsa_token_mask(sel.to_mask(), grid, grid, (2, 2, 2), (2, 2, 2))
    ref, _ = attention_oracle(q, k, v, mask)
    try:
        assert_close(out, ref, attention_lowp(q, k, v, mask), name=f"bsa (cpu capability {cpu})")
    except AssertionError:
        # CI once failed here (rel L2 2.6e-5, baseline 2.3e-7) and it never reproduced: print what
        # tells a wrong row from a platform-wide fp32 gap before failing
        err = (out.double() - ref).abs().amax(dim=-1)  # [B, S, H]
        b_, s_, h_ = (int(i) for i in torch.nonzero(err == err.max())[0])
        out2 = lk.block_sparse_attn(q, k, v, selection=sel)
        cpu_model = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][:1]
        print("bsa diagnostics: worst row b,s,h", (b_, s_, h_), "max abs", float(err.max()),
              "rows with max abs > 1e-5:", int((err > 1e-5).sum()), "of", err.numel(),
              "| keys seen by the worst row", int(mask[b_, h_, s_].sum()),
              "| a second call is bit-equal:", torch.equal(out, out2),
              "| threads", torch.get_num_threads(), "|", "".join(cpu_model).strip(), file=sys.stderr)
        raise
    pm = prefix_mask(60, 20)
    assert_close(lk.prefix_attn(q, k, v, 20), attention_oracle(q, k, v, pm)[0], attention_lowp(q, k, v, pm),
                 name=f"prefix_attn (cpu capability {cpu})")
    rope = lk.Rope3D((5, 4, 5), 64)
    kc, vc = torch.randn(1, 40, 2, 64), torch.randn(1, 40, 2, 64)
    o = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    assert o.shape == q.shape and not torch.isnan(o).any()
    qn, kn = lk.qk_norm_rope(q, k, torch.ones(64), torch.ones(64), lk.Rope3D(grid, 64))
    try:
        lk.prefix_attn(q, k, v, 20, backend="triton")
    except lk.BackendUnavailableError as e:
        assert "import triton failed" in str(e), e
    else:
        raise AssertionError("backend='triton' did not raise without triton")
    print("NO_TRITON_OK")
    """
)


def test_import_without_triton_and_cuda(tmp_path):
    blocker = tmp_path / "triton"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('triton is blocked for this test')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "LONGCAT_KERNELS_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "NO_TRITON_OK" in r.stdout, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
