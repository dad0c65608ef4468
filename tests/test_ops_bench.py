"Run the ops benchmark notebook through papermill with tiny sizes and check the result JSON it writes."
import json
from pathlib import Path
import papermill, torch

NB = Path(__file__).parents[1]/'nbs'/'benchmarks'/'ops_bench.ipynb'
TINY = dict(threads=[1], T=64, L=8, N=512, D=32, Q=16, M=3000, dk=16, k=40, Lyr=2, pool_N=96, K=8, pool_D=16, reps=2)

def test_ops_bench_tiny(tmp_path):
    papermill.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters=dict(TINY, out_dir=str(tmp_path)),
                               kernel_name='python3', cwd=str(NB.parent), progress_bar=False)
    res = json.loads((tmp_path/'results.json').read_text())
    assert res['config']['T'] == 64 and res['config']['threads'] == [1]
    assert set(res['backends']) == {'embedding_bag_wsum', 'topk_mean_sigmoid', 'pool_drop_append'}
    assert {'read', 'copy'} <= set(res['bandwidth']['1']) and res['bandwidth']['1']['read'] > 0
    cases = {(r['case'], r['impl']) for r in res['rows']}
    assert cases == {('ebw forward', 'memnb'), ('ebw forward', 'torch'), ('ebw forward+backward', 'memnb'),
                     ('ebw forward+backward', 'torch'), ('topk_mean_sigmoid', 'memnb'), ('topk_mean_sigmoid', 'torch naive'),
                     ('pool_drop_append', 'memnb'), ('pool_drop_append', 'torch index+cat'), ('pool_drop_append', 'memnb in-place'),
                     ('dense dV fill', 'torch.zeros(N, D)'), ('fp32 GEMM at the op shape', 'MKL')} | (
                     {('fp32 GEMM at the op shape', 'oneDNN')} if torch.backends.mkldnn.is_available() else set())
    for r in res['rows']: assert r['median_s'] > 0 and r['min_s'] <= r['median_s'] and 'peak_extra_MiB' in r, r
    s = res['summary']['1']
    for key in ('ebw_fwd_roofline_frac', 'ebw_fwd_speedup', 'ebw_fwd_bwd_speedup', 'topk_speedup', 'topk_mem_frac', 'pool_speedup',
                'ebw_dense_dv_bound', 'ebw_dense_dv_bound_frac', 'topk_gemm_frac'):
        assert s[key] > 0 or key == 'topk_mem_frac', (key, s[key])
    assert set(res['targets']['1']) == {'ebw_fwd_roofline_90pct', 'ebw_fwd_bwd_2x', 'topk_2x', 'topk_gemm_85pct', 'topk_mem_5pct'}
    assert 'machine' in res
