"Run the memory-layers benchmark notebook through papermill with tiny parameters."
import json, importlib.util
from pathlib import Path
import pytest
from memnb.cli import run_experiment

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'nbs'/'benchmarks'/'layers_bench.ipynb'

def test_layers_bench_tiny(tmp_path):
    has_peer = importlib.util.find_spec('product_key_memory') is not None  # a dev dependency: CI has it
    out = tmp_path/'results.json'
    run_experiment('layers_bench', dict(dim=32, num_keys=8, k=4, heads=2, dim_head=8, batch=2, seq=16, reps=1,
                                        threads='1', peer=has_peer), out_dir=tmp_path, html=False, progress=False)
    res = json.loads(out.read_text())
    models = {r['model'] for r in res['results'].values()}
    fused = {'memnb_fused_sgd', 'memnb_fused_adam', 'memnb_dense_adam'}   # the fused sparse value update beside the dense layer + Adam
    assert models == ({'memnb', 'ffn', 'peer'} | fused if has_peer else {'memnb', 'ffn'} | fused)
    assert all(r['tok_s'] > 0 and r['peak_extra_mib'] >= 0 for r in res['results'].values())
    assert res['config']['ffn_hidden'] == round((32*32 + 2*2*8*8 + 2*4*32) / 64)  # FLOP-matched FFN
    assert set(res['retrieval_s']) == {'fused@1', 'reference@1'}
    assert ('speed' in res['summary']) == has_peer
