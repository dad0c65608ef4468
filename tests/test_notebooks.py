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
