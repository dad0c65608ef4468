"Run the MemoryLLM benchmark notebook through papermill with tiny parameters (seconds)."
import json
from pathlib import Path
import papermill

ROOT = Path(__file__).resolve().parent.parent

def test_memoryllm_bench_tiny(tmp_path):
    out_json = tmp_path/'res.json'
    papermill.execute_notebook(str(ROOT/'nbs'/'benchmarks'/'memoryllm_bench.ipynb'), str(tmp_path/'out.ipynb'),
                               parameters=dict(d=32, layers=2, heads=4, kv_heads=2, vocab=97, num_tokens=8, num_blocks=4,
                                               chunk=16, prompt=4, new_tokens=3, reps=2, out_json=str(out_json)),
                               kernel_name='python3', progress_bar=False, cwd=str(ROOT))
    res = json.loads(out_json.read_text())
    assert res['config']['N'] == 32 and res['decode']['kv_len'] == 1 + 32 + 4
    for sec, keys in dict(inject=('inject_s', 'plain_decoder_s', 'ratio'), decode=('memory_step_s', 'plain_step_s', 'ratio'),
                          generate=('cached_s', 'recompute_s', 'speedup')).items():
        for k in keys: assert res[sec][k] > 0, (sec, k)
