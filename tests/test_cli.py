"The `memnb` command: `--help` and `run --list` without torch, `-o` naming a file, and `memnb check`'s verdicts and exit status."
import subprocess, sys
from pathlib import Path
import pytest
from memnb import tiny
from memnb.cli import main, list_experiments, recall_failure

def _fresh(code):
    "Run `code` in a fresh interpreter of this environment; return its stdout."
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout

@pytest.mark.parametrize('argv', [['--help'], ['run', '--help'], ['run', '--list']])
def test_help_and_list_import_no_torch(argv):
    out = _fresh(f"""import sys
from memnb.cli import main
try: rc = main({argv!r})
except SystemExit as e: rc = e.code
assert rc == 0, rc
assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'""")
    for name in list_experiments(): assert name in out, (name, out)
    if argv[-1] == '--help': assert 'e.g. memnb run retention -p' in out and 'memnb check' in out, out

@pytest.fixture(scope='module')
def untrained(tmp_path_factory):
    "A tiny model that was never trained: it cannot recall, so every recall check must fail on it."
    d = tmp_path_factory.mktemp('untrained')
    tiny.save_tiny(tiny.build_tiny(seed=0, num_hidden_layers=1), d, tiny.train_tokenizer(), command='untrained (test)')
    return d

def test_out_is_an_existing_file(tmp_path, capsys):
    f = tmp_path/'results.txt'; f.write_text('keep me')
    for out in (f, f/'sub'):
        assert main(['run', 'retention', '-o', str(out), '--no-html']) == 2
        err = capsys.readouterr().err
        assert f'{f.resolve()} is an existing file' in err and 'Traceback' not in err, err
    assert f.read_text() == 'keep me'

def test_recall_failure_rule():
    assert recall_failure({'MemoryLLM': 3, 'M+': 3}, 0, 3) is None
    assert recall_failure({'MemoryLLM': 10}, 2, 40) is None                        # 20 points above
    assert 'MemoryLLM 9/40' in recall_failure({'MemoryLLM': 9, 'M+': 40}, 2, 40)   # 17.5 points: not clearly
    assert 'M+ 1/3' in recall_failure({'M+': 1}, 0, 3)                            # fewer than 2 facts

def test_check_ok(capsys):
    "On a working install the packaged tiny model recalls what it was just told: `memnb check` says OK and exits 0."
    if not tiny.has_weights(): pytest.skip('no trained weights committed under memnb/assets/tiny')
    rc = main(['check'])
    out = capsys.readouterr().out
    verdict = out.rstrip().splitlines()[-1]
    assert rc == 0 and verdict.startswith('OK: '), out
    for k in ('python', 'torch', 'transformers', 'peft', 'papermill', 'ops on cpu', 'pool_drop_append', 'pkm_retrieve'): assert k in out, k

def test_check_fail_exit_status(untrained):
    "An untrained model gives the FAIL verdict, naming the versions, and the command exits 1."
    exe = Path(sys.executable).parent/'memnb'
    if not exe.exists(): pytest.skip(f'no memnb console script next to {sys.executable}')
    r = subprocess.run([str(exe), 'check', '--weights', str(untrained)], capture_output=True, text=True, timeout=300)
    verdict = r.stdout.rstrip().splitlines()[-1]
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    import torch, transformers
    assert verdict.startswith('FAIL: right after writing the facts'), r.stdout
    assert f'torch {torch.__version__} / transformers {transformers.__version__}' in verdict and 'not trained to recall' in verdict, verdict
