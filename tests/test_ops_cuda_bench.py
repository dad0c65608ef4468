"Run the GPU ops benchmark notebook through papermill with tiny sizes (needs a GPU) and check its result JSON."
import json
from pathlib import Path
import papermill, pytest, torch

NB = Path(__file__).parents[1]/'nbs'/'benchmarks'/'ops_cuda_bench.ipynb'
TINY = dict(T=64, L=8, N=512, D=32, Q=16, M=3000, dk=16, k=40, Lyr=2, pool_N=96, K=8, pool_D=16, reps=3)

@pytest.mark.cuda
def test_ops_cuda_bench_tiny(tmp_path):
    if not torch.cuda.is_available(): pytest.skip('ops_cuda_bench needs an NVIDIA GPU and the CUDA build of torch')
    papermill.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters=dict(TINY, out_dir=str(tmp_path)),
                               kernel_name='python3', cwd=str(NB.parent), progress_bar=False)
    res = json.loads((tmp_path/'results.json').read_text())
    assert res['backends'] == {'embedding_bag_wsum': 'cuda', 'topk_mean_sigmoid': 'cuda', 'pool_drop_append': 'cuda'}
    assert res['hbm_copy_GB_per_s'] > 0
    for r in res['rows']: assert r['median_s'] > 0 and r['min_s'] <= r['median_s'], r
    assert {(r['case'], r['impl']) for r in res['rows']} >= {('ebw forward', 'memnb'), ('ebw forward', 'torch'),
        ('topk_mean_sigmoid', 'memnb keys on CPU'), ('pool_drop_append', 'memnb in-place')}
    assert res['summary']['float32']['ebw_fwd_speedup'] > 0 and res['summary']['topk_mem_frac'] >= 0

def test_ops_cuda_bench_refuses_cpu_only(tmp_path):
    if torch.cuda.is_available(): pytest.skip('this checks the message on a machine without a GPU')
    with pytest.raises(papermill.PapermillExecutionError, match='needs an NVIDIA GPU'):
        papermill.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters=dict(TINY), kernel_name='python3',
                                   cwd=str(NB.parent), progress_bar=False)
