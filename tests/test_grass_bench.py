"Run the Grass benchmark notebook end to end with a tiny model and a few steps (papermill)."
import json
from pathlib import Path
import papermill

NB = Path(__file__).parent.parent/'nbs'/'benchmarks'/'grass_bench.ipynb'
TINY = dict(steps=6, chunk=2, batch=2, seq=32, hidden=32, layers=2, heads=4, intermediate=48, vocab=512, rank=8, gap=3,
            warmup=2, text_mb=0.3, threads=1, rss_steps=1, eval_batches=2)

def test_grass_bench_tiny(tmp_path):
    out = tmp_path/'r.json'
    papermill.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters=dict(TINY, out=str(out)),
                               kernel_name='python3', progress_bar=False, cwd=str(NB.parent))
    r = json.loads(out.read_text())
    assert set(r['results']) == {'adamw', 'galore', 'grass'}
    for k, v in r['results'].items(): assert len(r['losses'][k]) == 6 and v['step_s_median'] > 0, k
    g, a = r['results']['grass'], r['results']['adamw']
    assert g['state_tgt_MiB'] < a['state_tgt_MiB'] and g['grad_tgt_MiB'] < a['grad_tgt_MiB']
    assert {'speed_vs_adamw', 'tgt_bytes_vs_adamw', 'loss_vs_galore'} <= set(r['targets'])
