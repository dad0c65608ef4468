"Run the M+ benchmark notebook end to end through papermill with tiny parameters (correctness of what it reports; no timings)."
import json
from pathlib import Path
from memnb.cli import run_experiment

ROOT = Path(__file__).resolve().parents[1]

def test_mplus_bench_runs(tmp_path):
    out = tmp_path/'results.json'
    run_experiment('mplus_bench', out_dir=tmp_path, html=False, progress=False, params=dict(ltm_entries=70_000, dk=16, d=32, prompt_tokens=8, k=64, reps=1, threads=1,
                                               gen_layers=2, gen_d=64, gen_K=8, gen_stm_blocks=2, gen_ltm_blocks=1,
                                               gen_prompt=8, gen_new=3, gen_ltm_entries=200, gen_d_wide=128,
                                               big_entries=5000, big_d=64, big_prompt=8, big_reps=1))
    r = json.loads(out.read_text())
    ret = r['retrieval']
    assert ret['overlap_with_torch_ref'] >= 0.98                # the compiled op picks the reference's rows (up to float32 ties)
    assert ret['overlap_with_naive'] > 0.9
    for key in ('gemm_GFLOPs', 'score_op_fraction_of_gemm', 'read_fraction_of_bandwidth', 'peak_extra_fraction_of_naive', 'memnb_torch_ref_ms'):
        assert ret[key] > 0, key
    assert r['generate']['prefix_memoryllm'] == r['generate']['prefix_mplus']
    assert r['generate']['bf16_keys_same_rows'] > 0.9              # bf16 keys retrieve (almost) the float32 keys' rows
    assert r['generate_wide']['d'] == 128 and r['generate_wide']['prefix_mplus'] == r['generate_wide']['prefix_memoryllm']
    assert 1 < r['generate']['bound_fp32_over_memoryllm'] and 'generate at d=128: M+ / MemoryLLM <= 1.2' in r['targets']
    assert ret['recipe'] in ('bf16', 'onednn', 'cpp', 'torch') and r['generate']['mplus_bf16_keys_ms'] > 0
    assert r['rss']['ram']['rows_checksum'] == r['rss']['disk']['rows_checksum']
    assert set(r['targets']) >= {'retrieval >= 2x naive', 'generate M+ / MemoryLLM <= 1.2', 'generate M+ (bf16 keys) / MemoryLLM <= 1.2'}
