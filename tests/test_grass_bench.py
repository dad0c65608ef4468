"Run the Grass benchmark notebook end to end with a tiny model and a few steps (papermill): fp32, and the bf16 variant."
import json
from pathlib import Path
from memnb.cli import run_experiment

NB = Path(__file__).parent.parent/'nbs'/'benchmarks'/'grass_bench.ipynb'
TINY = dict(steps=6, chunk=2, batch=2, seq=32, hidden=32, layers=2, heads=4, intermediate=48, vocab=512, rank=8, gap=3,
            warmup=2, text_mb=0.3, threads=1, rss_steps=1, eval_batches=2)

def test_grass_bench_tiny(tmp_path):
    out = tmp_path/'results.json'
    run_experiment('grass_bench', TINY, out_dir=tmp_path, html=False, progress=False)
    r = json.loads(out.read_text())
    assert set(r['results']) == {'adamw', 'galore', 'grass'}
    for k, v in r['results'].items(): assert len(r['losses'][k]) == 6 and v['step_s_median'] > 0, k
    g, a = r['results']['grass'], r['results']['adamw']
    assert g['state_tgt_MiB'] < a['state_tgt_MiB'] and g['grad_tgt_MiB'] < a['grad_tgt_MiB']
    assert {'speed_vs_adamw', 'tgt_bytes_vs_adamw', 'loss_vs_galore'} <= set(r['targets'])
    assert g['tgt_bytes_vs_adamw'] == r['targets']['tgt_bytes_vs_adamw']['value'] and a['tgt_bytes_vs_adamw'] == 1

def test_grass_bench_tiny_bf16(tmp_path):
    "bf16 weights, fp32 moments for both optimizers (AdamW then runs on Grass's AdamW path)."
    run_experiment('grass_bench', TINY | dict(steps=4, dtype='bfloat16', state_dtype='float32', optimizers='adamw,grass', rss_steps=0),
                   out_dir=tmp_path, html=False, progress=False)
    r = json.loads((tmp_path/'results.json').read_text())
    assert set(r['results']) == {'adamw', 'grass'} and r['params']['dtype'] == 'bfloat16' and r['params']['state_dtype'] == 'float32'
    g, a = r['results']['grass'], r['results']['adamw']
    for k, v in r['results'].items(): assert len(r['losses'][k]) == 4 and all(l == l for l in r['losses'][k]), k   # finite
    # fp32 moments (8 bytes an element) with bf16 gradients (2): AdamW's targeted state is 4x its gradients (+ a `step` scalar each)
    assert abs(a['state_tgt_MiB'] - 4 * a['grad_tgt_MiB']) < 1e-3 * a['state_tgt_MiB'], a
    assert g['state_tgt_MiB'] < a['state_tgt_MiB'] and g['grad_tgt_MiB'] < a['grad_tgt_MiB'] and 0 < g['tgt_bytes_vs_adamw'] < 1
