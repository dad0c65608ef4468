"Committed notebooks carry no executed widget state and no papermill outputs live under nbs/."
import json, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _tracked_notebooks():
    out = subprocess.run(['git', 'ls-files', '*.ipynb'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT/p for p in out.split()]

def test_no_widget_state_committed():
    bad = []
    for nb in _tracked_notebooks():
        j = json.loads(nb.read_text())
        if 'widgets' in j.get('metadata', {}): bad.append(f'{nb.name}: metadata.widgets')
        for c in j['cells']:
            for o in c.get('outputs', []):
                if 'application/vnd.jupyter.widget-view+json' in o.get('data', {}): bad.append(f'{nb.name}: a widget output')
        if nb.stat().st_size > 1_000_000: bad.append(f'{nb.name}: {nb.stat().st_size} bytes')
    assert not bad, 'executed widget notebooks must not be committed (clear their outputs): ' + '; '.join(bad)

def test_no_papermill_outputs_in_nbs():
    bad = [nb.name for nb in _tracked_notebooks() if 'papermill' in json.loads(nb.read_text()).get('metadata', {})]
    assert not bad, f'papermill outputs belong in runs/, not the repo: {bad}'
