"Run the memory-layers benchmark notebook through papermill with tiny parameters."
import json, importlib.util
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'nbs'/'benchmarks'/'layers_bench.ipynb'

def test_layers_bench_tiny(tmp_path):
    papermill = pytest.importorskip('papermill')
    has_peer = importlib.util.find_spec('product_key_memory') is not None  # a dev dependency: CI has it
    out = tmp_path/'results.json'
    papermill.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), kernel_name='python3', progress_bar=False, cwd=str(NB.parent),
                               parameters=dict(dim=32, num_keys=8, k=4, heads=2, dim_head=8, batch=2, seq=16, reps=1,
                                               threads='1', peer=has_peer, out_json=str(out)))
    res = json.loads(out.read_text())
    models = {r['model'] for r in res['results'].values()}
    assert models == ({'memnb', 'ffn', 'peer'} if has_peer else {'memnb', 'ffn'})
    assert all(r['tok_s'] > 0 and r['peak_extra_mib'] >= 0 for r in res['results'].values())
    assert res['config']['ffn_hidden'] == round((32*32 + 2*2*8*8 + 2*4*32) / 64)  # FLOP-matched FFN
    assert set(res['retrieval_s']) == {'fused@1', 'reference@1'}
    assert ('speed' in res['summary']) == has_peer
