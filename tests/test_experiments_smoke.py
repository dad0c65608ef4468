"The training and soak notebooks of the main job run end to end with tiny parameters (the real runs take minutes)."
import json
from memnb.cli import run_experiment
from memnb import tiny

def test_train_tiny_smoke(tmp_path):
    "From scratch with a two-digit tokenizer: every stage runs, and the weights, tokenizer and manifest are saved."
    out = run_experiment('train_tiny', dict(steps=5, episodes=2, minutes=1.0, bare_max=0.2, ic_max=0.4, digits=2), out_dir=tmp_path, html=False, progress=False)
    man = tiny.check_manifest(out)   # weights + manifest written, hashes consistent
    assert set(man['files']) == {'config.json', 'model.safetensors', 'tokenizer.json'}
    assert '-p digits 2' in man['command']   # the manifest's command reproduces the tokenizer too
    m = tiny.load_tiny('mplus', out); assert m.N == tiny.NUM_TOKENS * tiny.STM_BLOCKS and len(m.tokenizer) == m.lm.config.vocab_size
    assert m.tokenizer.convert_ids_to_tokens(tiny.encode(' 0427', m.tokenizer).tolist()) == ['▁04', '27']   # `digits=2`: the tokenizer saved is the one trained with
    checks = man['info']['held_out_checks']                                          # held-out recall logged before each phase and at the end
    assert len(checks) >= 2 and all(0 <= c[k] <= 1 for c in checks for k in ('bare', 'in_context', 'memory'))
    h = json.loads((out/'history.json').read_text())   # the in-context warm-up and the memory phases both ran
    assert {x['in_context'] for x in h} == {0.0, 1.0} and all(x['answer'] == x['answer'] for x in h)

def test_tiny_soak_smoke(tmp_path):
    run_experiment('tiny_soak', dict(writes=40, every=10, windows=2), out_dir=tmp_path, html=False, progress=False)
    r = json.loads((tmp_path/'results.json').read_text())
    assert r['writes'] == 40 and r['nonfinite_checks'] == 0 and len(r['windows']) == 2

def test_lookup_probe_smoke(tmp_path):
    "Both vocabularies run end to end (in context, then through memory) and report held-out recall with the wrong-memory control."
    for vocab in ('word', 'byte'):
        out = tmp_path/vocab
        run_experiment('lookup_probe', dict(vocab=vocab, ic_steps=6, bare_steps=3, template_from=5, mem_steps=3, eval_every=3, eval_episodes=2),
                       out_dir=out, html=False, progress=False)
        r = json.loads((out/'results.json').read_text())
        assert r['in_context']['n'] == r['memory']['n'] == 8
        for v in (r['in_context']['bare'], r['in_context']['template'], r['memory']['template'], r['memory']['wrong_memory']): assert 0 <= v <= 1
        assert [h['phase'] for h in r['history']].count('memory') == 4 and (out/'probe.png').stat().st_size > 1000

def test_train_tiny_continues(tmp_path):
    "Going on from saved weights: memory stage only, the M+ layout with hard negatives and lures, and the run it went on from named by its file hashes."
    out = run_experiment('train_tiny', dict(init=str(tiny.TINY_DIR), steps=4, episodes=2, minutes=1.0, phase1=0.0, ramp=0.05, ic_mix=0.0,
                                            mplus_share=1.0, hard_negatives=True, later='run', unknown_weight=2.0, pool_distractor_frac=1.0, unknown_lure=1.0),
                         out_dir=tmp_path, html=False, progress=False)
    man, base = tiny.check_manifest(out), tiny.check_manifest(tiny.TINY_DIR)
    assert man['info']['init']['files'] == base['files'] and man['info']['init']['command'] == base['command']
    assert man['info']['stages'] == [dict(stage=2, step=0, share=0.0, init=str(tiny.TINY_DIR))] and man['info']['steps'] == 4
    assert '-p hard_negatives True' in man['command'] and '-p unknown_lure 1.0' in man['command'] and f'-p init {tiny.TINY_DIR}' in man['command']
    h = json.loads((out/'history.json').read_text())
    assert [x['mplus'] for x in h] == [1.0] * 4 and all(x['answer'] == x['answer'] and x['retriever'] > 0 for x in h)

def test_train_tiny_ema(tmp_path):
    "With `ema`, the folder gets the weights' moving average and its sibling '-last' the last weights, each named so in its manifest."
    from safetensors.torch import load_file
    out = run_experiment('train_tiny', dict(init=str(tiny.TINY_DIR), steps=4, episodes=2, minutes=1.0, ema=0.5), out_dir=tmp_path/'run', html=False, progress=False)
    last = tmp_path/'run-last'
    ma, ml = tiny.check_manifest(out), tiny.check_manifest(last)
    assert (ma['info']['weights'], ml['info']['weights']) == ('ema', 'last') and '-p ema 0.5' in ma['command'] == ml['command']
    a, l, w0 = (load_file(f/'model.safetensors') for f in (out, last, tiny.TINY_DIR))
    k = 'lm.model.layers.0.mlp.up_proj.weight' if 'lm.model.layers.0.mlp.up_proj.weight' in a else next(k for k in a if 'up_proj' in k)
    da, dl = (a[k] - w0[k]).norm(), (l[k] - w0[k]).norm()
    assert 0 < da < dl, (da, dl)   # the average moved from the start, and less far than the last step's weights

def test_train_tiny_bad_init(tmp_path):
    "An init folder without saved weights, or with a tokenizer that groups digits otherwise, stops before training, naming the parameter."
    import pytest
    with pytest.raises(Exception, match="is not a folder of weights saved by train_tiny"):
        run_experiment('train_tiny', dict(init=str(tmp_path/'nothing'), steps=2), out_dir=tmp_path/'out', html=False, progress=False)
    with pytest.raises(Exception, match="digits=2 but init=.*splits ' 0427' into 4 tokens"):   # the init's tokenizer groups digits one by one
        run_experiment('train_tiny', dict(init=str(tiny.TINY_DIR), digits=2, steps=2), out_dir=tmp_path/'out2', html=False, progress=False)
