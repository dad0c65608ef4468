"Run every notebook in nbs/ as one pytest case through nbdev's runner; notebooks with `#| cuda` cells get a second case that runs them on a GPU."
import json, re
from pathlib import Path
import pytest, torch
from nbdev.config import get_config
import nbdev.test as nbt  # not `from nbdev.test import test_nb`: pytest would collect it

cfg = get_config()
NBS = sorted(p for p in Path(cfg.nbs_path).rglob('*.ipynb')
             if not any(part.startswith(('_', '.')) for part in p.relative_to(cfg.nbs_path).parts)
             and p.relative_to(cfg.nbs_path).parts[0] not in ('experiments', 'benchmarks'))  # those run via papermill in test_experiments.py
FLAG = re.compile(r'^\s*#\s*\|\s*cuda\s*$', re.M)

def _has_cuda_cells(nb):
    return any(c['cell_type'] == 'code' and FLAG.search(''.join(c['source'])) for c in json.loads(nb.read_text())['cells'])

def _id(p): return str(p.relative_to(cfg.nbs_path))

@pytest.mark.parametrize('nb', NBS, ids=[_id(p) for p in NBS])
def test_notebook(nb):
    ok, secs = nbt.test_nb(nb, skip_flags=cfg.tst_flags.split(), basepath=cfg.config_path)
    assert ok, f'{nb.name} failed (traceback above)'

CUDA_NBS = [p for p in NBS if _has_cuda_cells(p)]

@pytest.mark.cuda
@pytest.mark.parametrize('nb', CUDA_NBS, ids=[_id(p) + '[cuda]' for p in CUDA_NBS])
def test_notebook_cuda(nb):
    if not torch.cuda.is_available(): pytest.skip('`#| cuda` cells need an NVIDIA GPU and the CUDA build of torch')
    flags = [f for f in cfg.tst_flags.split() if f != 'cuda']
    ok, secs = nbt.test_nb(nb, skip_flags=flags, basepath=cfg.config_path)
    assert ok, f'{nb.name} failed with the cuda flag (traceback above)'

GUARD = "if not torch.cuda.is_available(): print('skipped: no CUDA')"

@pytest.mark.parametrize('nb', CUDA_NBS, ids=[_id(p) for p in CUDA_NBS])
def test_cuda_cells_guarded(nb):
    "Run-all in JupyterLab on a CPU must go past `#| cuda` cells: each one starts with the no-CUDA guard."
    for c in json.loads(nb.read_text())['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code' and FLAG.search(src):
            body = [l for l in src.splitlines() if not l.lstrip().startswith('#|')]
            assert body and body[0].startswith(GUARD), f'{nb.name}: a `#| cuda` cell does not start with the guard:\n{src[:200]}'

def test_run_all_with_cuda_cells_on_cpu(capsys):
    "Every cell, `#| cuda` ones included, runs on a machine without CUDA: the guard prints and the notebook goes on."
    if torch.cuda.is_available(): pytest.skip('this checks the CPU path')
    nb = Path(cfg.nbs_path)/'03_attention.ipynb'
    ok, secs = nbt.test_nb(nb, skip_flags=[f for f in cfg.tst_flags.split() if f != 'cuda'], basepath=cfg.config_path)
    assert ok

def test_export_cell_harmless_outside_the_repo(tmp_path):
    "A notebook copied out of the repo ends without an error: its export cell does nothing there."
    import subprocess, sys
    for nb in NBS:
        cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        last = ''.join(cells[-1]['source'])
        if 'nbdev_export' not in last: continue
        r = subprocess.run([sys.executable, '-c', last], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, f'{nb.name}: export cell fails outside the repo:\n{r.stderr[-500:]}'
