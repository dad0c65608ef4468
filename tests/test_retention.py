"The main job: the retention notebook end to end with small parameters, the embedded weights' manifest, and the CLI's errors."
import json, shutil
from pathlib import Path
import pytest
from memnb import tiny
from memnb.cli import run_experiment, main

SMALL = dict(n_facts=3, episodes=1, prefill_seeds=[0], max_distance=2, step=1, prefill=1)

@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    "The embedded weights when committed; else an untrained tiny model saved with a manifest (the notebook must work with either)."
    if tiny.has_weights(): return ''
    d = tmp_path_factory.mktemp('tiny')
    tiny.save_tiny(tiny.build_tiny(seed=0), d, tiny.train_tokenizer(), command='untrained (test)')
    return str(d)

@pytest.fixture(scope='module')
def small_run(tmp_path_factory, model_dir):
    params = dict(SMALL, model=model_dir, require_recall=not model_dir)   # the untrained stand-in cannot pass the recall check
    out = run_experiment('retention', params, out_dir=tmp_path_factory.mktemp('ret'), html=False, progress=False)
    return out, json.loads((out/'retention.json').read_text())

def test_retention_small(small_run, model_dir):
    out, r = small_run
    assert {'model', 'K', 'N', 'distances', 'results', 'survival', 'seconds'} <= set(r)
    cfg = json.loads(((Path(model_dir) if model_dir else tiny.TINY_DIR)/'config.json').read_text())
    K, N = cfg['num_tokens'], cfg['num_tokens'] * (cfg['num_blocks'] - cfg['num_ltm_blocks'])
    assert r['distances'] == [0, 1, 2] and (r['K'], r['N']) == (K, N) == (tiny.NUM_TOKENS, 128) and r['protocol'] == 'recall'
    assert set(r['results']) == {'MemoryLLM', 'M+', 'no memory'}
    for name, per_t in r['results'].items():
        assert set(per_t) == {'0', '1', '2'}, name
        for t, v in per_t.items():
            assert v['n'] == 3 and 0 <= v['hits'] <= 3 and v['acc'] == v['hits'] / 3
            assert 0 <= v['ci'][0] <= v['acc'] <= v['ci'][1] <= 1
    assert r['survival']['1'] == pytest.approx(1 - K / N)
    for name in ('MemoryLLM', 'M+'):   # the wrong-name control: one never-written name per episode, per phrasing
        assert all(v['n'] == 2 and 0 <= v['acc'] <= 1 for v in r['false_recall'][name].values()), r['false_recall']
        assert set(r['by_phrasing'][name]) == {'cloze', 'natural'}
    for name, per_t in r['false_recall'].items():   # only the answer counts; a written value anywhere in the output is the wider count
        for t, v in per_t.items():
            w = r['false_recall_anywhere'][name][t]; assert w['n'] == v['n'] and w['hits'] >= v['hits'], (name, t, v, w)
    assert r['per_seed']['counts']['0']['M+']['0']['cloze'] == [r['results']['M+']['0']['hits'], 3]
    assert (out/'retention.png').stat().st_size > 1000 and (out/'retention.ipynb').exists()

def test_retention_recalls_right_after_writing(small_run, model_dir):
    "With the committed weights, a single fact just written is recalled more often than without memory (the plumbing check the run records)."
    if model_dir: pytest.skip('no trained weights committed: the untrained stand-in cannot recall')
    _, r = small_run
    c = r['plumbing_check']
    for name in ('MemoryLLM', 'M+'):
        assert c['hits'][name] >= c['n'] // 2 and c['hits'][name] > c['hits']['no memory'], (name, c)

def test_embedded_weights_hash(tmp_path):
    if not tiny.has_weights(): pytest.skip('no trained weights committed under memnb/assets/tiny')
    man = tiny.check_manifest(tiny.TINY_DIR)
    assert set(man['files']) == {'config.json', 'model.safetensors', 'tokenizer.json'} and man['command'].startswith('memnb run train_tiny')
    m = tiny.load_tiny('memoryllm'); assert m.N == 128 and m.num_tokens == tiny.NUM_TOKENS
    bad = tmp_path/'tiny'; shutil.copytree(tiny.TINY_DIR, bad)
    raw = bytearray((bad/'model.safetensors').read_bytes()); raw[len(raw) // 2] ^= 0xFF; (bad/'model.safetensors').write_bytes(bytes(raw))
    with pytest.raises(ValueError, match='SHA-256 mismatch'): tiny.load_tiny('mplus', bad)

def test_cli_rejects_unknown_and_bad(tmp_path, capsys):
    assert main(['run', 'no_such_experiment']) == 2
    assert 'unknown experiment' in capsys.readouterr().err
    assert main(['run', 'retention', '-p', 'n_facts', 'many', '-o', str(tmp_path/'a'), '--no-html']) == 2
    assert "parameter 'n_facts' must be int" in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown parameter'): run_experiment('retention', dict(facts=3), out_dir=tmp_path/'b', html=False)

def test_bad_value_stops_at_first_cell(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match='max_distance'):
        run_experiment('retention', dict(max_distance=-1), out_dir=tmp_path, html=False, progress=False)
    nb = json.loads((tmp_path/'retention.ipynb').read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    failed = [i for i, c in enumerate(code) if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    params = [i for i, c in enumerate(code) if 'parameters' in c['metadata'].get('tags', []) or 'injected-parameters' in c['metadata'].get('tags', [])]
    assert failed == [max(params) + 1]   # the first cell after the parameters

def test_distractor_share_is_checked(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match='distractor_frac'):
        run_experiment('retention', dict(distractor_frac=1.5), out_dir=tmp_path, html=False, progress=False)
    with pytest.raises(pm.PapermillExecutionError, match="parameter phrasings=.*must be distinct values from"):
        run_experiment('retention', dict(phrasings=['open']), out_dir=tmp_path/'p', html=False, progress=False)
    with pytest.raises(pm.PapermillExecutionError, match="parameter protocol='many' is invalid"):
        run_experiment('retention', dict(protocol='many'), out_dir=tmp_path/'q', html=False, progress=False)

@pytest.fixture(scope='module')
def untrained(tmp_path_factory):
    "A tiny model that was never trained: it writes into memory but cannot recall, like a broken generation path."
    d = tmp_path_factory.mktemp('untrained')
    tiny.save_tiny(tiny.build_tiny(seed=0, num_hidden_layers=1), d, tiny.train_tokenizer(), command='untrained (test)')
    return str(d)

def test_no_recall_at_t0_stops_the_run(untrained, tmp_path, capsys):
    "A memory that recalls no more than the baseline at t=0 stops the notebook, and `memnb run` prints why and exits 2."
    import torch, transformers
    out = tmp_path/'run'
    assert main(['run', 'retention', '-p', 'model', untrained, '-p', 'check_facts', '3', '-p', 'distances', '[0]', '-p', 'episodes', '1',
                 '-p', 'prefill_seeds', '[0]', '-p', 'prefill', '1', '-o', str(out), '--no-html']) == 2
    err = capsys.readouterr().err
    assert 'retention stopped: RuntimeError: retention: right after writing the facts, MemoryLLM 0/3' in err, err
    assert 'not clearly more than the 0/3 answered without memory' in err and 'generation does not read the memory' in err, err
    assert f'torch {torch.__version__} / transformers {transformers.__version__}' in err, err
    assert str(out) in err and (out/'retention.ipynb').exists() and not (out/'retention.json').exists()

def test_recall_check_can_be_turned_off(untrained, tmp_path):
    "`require_recall=False` lets an untrained stand-in run the protocol to the end."
    run_experiment('retention', dict(model=untrained, n_facts=2, episodes=1, prefill_seeds=[0], distances=[0, 1], prefill=1, require_recall=False),
                   out_dir=tmp_path, html=False, progress=False)
    r = json.loads((tmp_path/'retention.json').read_text())
    assert r['distances'] == [0, 1] and r['results']['MemoryLLM']['0']['n'] == 2
    with pytest.raises(ValueError, match="parameter 'require_recall' must be bool"):
        run_experiment('retention', dict(require_recall=1), out_dir=tmp_path/'x', html=False)


def test_recall_among_four_facts(tmp_path):
    "The default protocol on the committed weights: 4 facts among distractors, asked at t=0 over 3 prefill seeds; per-seed counts add up and every target is judged from the numbers."
    if not tiny.has_weights(): pytest.skip('no trained weights committed under memnb/assets/tiny')
    run_experiment('retention', dict(n_facts=4, episodes=2, prefill_seeds=[0, 1, 2], distances=[0], prefill=4),
                   out_dir=tmp_path, html=False, progress=False)
    r = json.loads((tmp_path/'retention.json').read_text())
    assert r['protocol'] == 'recall' and r['questions_per_point'] == 24 and len(r['per_seed']['counts']) == 3
    for name in ('MemoryLLM', 'M+', 'no memory'):
        for p in ('cloze', 'natural'):
            per = [r['per_seed']['counts'][s][name]['0'][p] for s in ('0', '1', '2')]
            assert [sum(x[0] for x in per), sum(x[1] for x in per)] == [r['by_phrasing'][name][p]['0']['hits'], 24]
        assert r['false_recall'][name]['0']['n'] == 12
        by_rel = r['false_recall_by_relation'][name]   # split by the relation asked, the same questions
        assert set(by_rel) == {'passcode', 'city'}
        assert [sum(by_rel[rel]['0'][k] for rel in by_rel) for k in ('hits', 'n')] == [r['false_recall'][name]['0'][k] for k in ('hits', 'n')]
    judged = {t['target']: t for t in r['targets']}
    for name in ('MemoryLLM', 'M+'):
        t = judged[f'{name} at t=0 >= 90%']; assert t['met'] == (r['results'][name]['0']['acc'] >= 0.9) and t['value'] == r['results'][name]['0']['acc']
    for name in ('MemoryLLM', 'M+'):   # the committed weights look the right fact up: above no memory and above the wrong-name rate
        acc = r['results'][name]['0']['acc']
        assert acc > r['results']['no memory']['0']['acc'] and acc > r['false_recall'][name]['0']['acc'], (name, r['results'], r['false_recall'])
    worst = max(r['false_recall'][n]['0']['acc'] for n in ('MemoryLLM', 'M+'))
    assert judged['wrong-name false recall <= 10% (worst memory and distance)'] == dict(target='wrong-name false recall <= 10% (worst memory and distance)', value=worst, met=worst <= 0.1)

def test_single_fact_protocol_switch(tmp_path):
    "`protocol='single'` is the original protocol: one passcode per episode, no gap."
    run_experiment('retention', dict(protocol='single', episodes=2, prefill_seeds=[0], distances=[0], prefill=1, require_recall=False),
                   out_dir=tmp_path, html=False, progress=False)
    r = json.loads((tmp_path/'retention.json').read_text())
    assert (r['protocol'], r['n_facts'], r['gap'], r['questions_per_point']) == ('single', 1, 0, 2)

def test_retention_controls(tmp_path, model_dir):
    "The two controls run and are recorded: prose alone after the last fact, and M+ reading random long-term rows."
    params = dict(SMALL, model=model_dir, require_recall=False, prefill=17, distances=[0, 1], later_distractor_frac=0.0, retrieval='random')
    out = run_experiment('retention', params, out_dir=tmp_path, html=False, progress=False)
    r = json.loads((out/'retention.json').read_text())
    assert (r['later_distractor_frac'], r['retrieval'], r['distractor_frac']) == (0.0, 'random', 0.5)
    assert r['results']['M+']['1']['n'] == 3

def test_retention_control_values_are_checked(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match='retrieval'):
        run_experiment('retention', dict(retrieval='newest'), out_dir=tmp_path/'a', html=False, progress=False)
    with pytest.raises(pm.PapermillExecutionError, match='later_distractor_frac'):
        run_experiment('retention', dict(later_distractor_frac=2.0), out_dir=tmp_path/'b', html=False, progress=False)

def test_prefill_seeds_are_independent(tmp_path, model_dir):
    "Each prefill seed starts from the loaded memory: a seed's counts do not depend on which seeds ran before it."
    base = dict(SMALL, model=model_dir, require_recall=False, prefill=17, n_facts=2, distances=[0, 2])
    a = json.loads((run_experiment('retention', dict(base, prefill_seeds=[0, 1]), out_dir=tmp_path/'a', html=False, progress=False)/'retention.json').read_text())
    b = json.loads((run_experiment('retention', dict(base, prefill_seeds=[1]), out_dir=tmp_path/'b', html=False, progress=False)/'retention.json').read_text())
    for key in ('prefilled', 'counts', 'false_recall'): assert a['per_seed'][key]['1'] == b['per_seed'][key]['1'], key
    assert a['per_seed']['prefilled']['1']['M+']['ltm_rows'] > 0   # the prefill reached the long-term memory
