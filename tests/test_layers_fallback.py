"Without compiled kernels (MEMNB_OPS_BACKEND=torch), memnb::pkm_retrieve is the reference and still exact, differentiable and compilable."
import os, subprocess, sys, textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_pkm_retrieve_reference_fallback():
    code = textwrap.dedent('''
        import torch
        from memnb.pkm_ops import pkm_retrieve, HAS_PKM_KERNELS
        assert not HAS_PKM_KERNELS  # forced: the schema is defined from Python with the reference as its kernel
        from memnb.layers import ProductKeyMemory
        q = torch.randn(5, 2, 2, 3, dtype=torch.float64, requires_grad=True); K = torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
        s, i = pkm_retrieve(q, K, 9)
        S = torch.einsum('thcd,hcnd->thcn', q, K); full = (S[:, :, 0, :, None] + S[:, :, 1, None, :]).flatten(-2)
        v, j = torch.sort(full, dim=-1, descending=True, stable=True)
        assert torch.equal(i, j[..., :9]) and torch.allclose(s, v[..., :9])
        assert torch.autograd.gradcheck(lambda a, b: pkm_retrieve(a, b, 9)[0], (q, K))
        assert set(torch.library.opcheck(torch.ops.memnb.pkm_retrieve.default, (q, K, 9)).values()) == {'SUCCESS'}
        m = ProductKeyMemory(8, num_slots=16, k=3, heads=2, d_q=8)
        m(torch.randn(4, 8)).sum().backward()
        print('ok')
    ''')
    env = dict(os.environ, MEMNB_OPS_BACKEND='torch', PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-3000:]
