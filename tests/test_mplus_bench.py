"Run the M+ benchmark notebook end to end through papermill with tiny parameters."
import json
from pathlib import Path
import papermill

ROOT = Path(__file__).resolve().parents[1]

def test_mplus_bench_runs(tmp_path):
    out = tmp_path/'r.json'
    papermill.execute_notebook(str(ROOT/'nbs/benchmarks/mplus_bench.ipynb'), str(tmp_path/'out.ipynb'), kernel_name='python3',
                               progress_bar=False, cwd=str(ROOT),
                               parameters=dict(ltm_entries=3000, dk=16, d=32, prompt_tokens=8, k=64, reps=1, threads=1,
                                               gen_layers=2, gen_d=64, gen_K=8, gen_stm_blocks=2, gen_ltm_blocks=1,
                                               gen_prompt=8, gen_new=3, gen_ltm_entries=200,
                                               big_entries=5000, big_d=64, big_prompt=8, big_reps=1, out=str(out)))
    r = json.loads(out.read_text())
    assert r['retrieval']['overlap_with_naive'] > 0.9
    assert r['generate']['prefix_memoryllm'] == r['generate']['prefix_mplus']
    assert r['rss']['ram']['rows_checksum'] == r['rss']['disk']['rows_checksum']
