"""torch.compile(fullgraph=True) must work on the very first call of an op in a fresh process.

The backend modules used to be imported lazily inside the op, which dynamo cannot trace
(``importlib.import_module`` is marked as skipped), so only a second, warmed-up call compiled.
Runs in a subprocess so no earlier test has imported the kernels already.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import torch, longcat_kernels as lk
    q, k, v = (torch.randn(1, 2 * 3 * 5, 2, 16) for _ in range(3))
    kc, vc = (torch.randn(1, 3 * 5, 2, 16) for _ in range(2))
    rope = lk.Rope3D((3, 3, 5), head_dim=16)
    fns = {
        "prefix_attn": lambda: lk.prefix_attn(q, k, v, 7, backend="triton"),
        "attn_with_kv_cache": lambda: lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, backend="triton"),
    }
    for name, fn in fns.items():
        out = torch.compile(fn, fullgraph=True, backend="eager")()  # first call of the op in this process
        ref = fn()
        assert torch.isfinite(out).all(), name
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), name
        print("compiled", name)
    """
)


@pytest.mark.triton_interpret
def test_fullgraph_compile_on_first_call():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "compiled prefix_attn" in r.stdout and "compiled attn_with_kv_cache" in r.stdout
