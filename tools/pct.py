"Convert between nbdev notebooks and a percent-format text file (`# %%` cells), with stable cell ids."
import hashlib, json, re, sys
from pathlib import Path

HDR = re.compile(r'^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$')

def _cell_id(path, i, src):
    return hashlib.sha1(f'{Path(path).name}:{i}'.encode()).hexdigest()[:8]

def pct_to_nb(pct_path, nb_path=None):
    "Write the notebook for `pct_path` (default: same stem, .ipynb)."
    pct_path = Path(pct_path)
    nb_path = Path(nb_path) if nb_path else pct_path.with_name(pct_path.name.replace('.pct.py', '.ipynb'))
    cells, cur = [], None
    for line in pct_path.read_text().splitlines():
        m = HDR.match(line)
        if m:
            cur = dict(md=bool(m['md']), tags=json.loads(m['tags']) if m['tags'] else [], lines=[])
            cells.append(cur); continue
        if cur is None:
            if line.strip(): raise ValueError(f'{pct_path}: text before the first `# %%` cell: {line!r}')
            continue
        cur['lines'].append(line)
    out = []
    for i, c in enumerate(cells):
        lines = c['lines']
        while lines and not lines[-1].strip(): lines.pop()
        if c['md']:
            lines = [l[2:] if l.startswith('# ') else ('' if l == '#' else l) for l in lines]
        src = '\n'.join(lines)
        meta = {'tags': c['tags']} if c['tags'] else {}
        cell = dict(cell_type='markdown' if c['md'] else 'code', id=_cell_id(nb_path, i, src), metadata=meta,
                    source=[l + '\n' for l in src.split('\n')[:-1]] + [src.split('\n')[-1]] if src else [])
        if not c['md']: cell.update(execution_count=None, outputs=[])
        out.append(cell)
    nb = dict(cells=out, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return nb_path

def nb_to_pct(nb_path, pct_path=None):
    "Write the percent-format text of notebook `nb_path` (outputs dropped)."
    nb_path = Path(nb_path)
    pct_path = Path(pct_path) if pct_path else nb_path.with_name(nb_path.stem + '.pct.py')
    parts = []
    for c in json.loads(nb_path.read_text())['cells']:
        src = ''.join(c['source'])
        tags = c.get('metadata', {}).get('tags')
        hdr = '# %%' + (' [markdown]' if c['cell_type'] == 'markdown' else '') + (f' tags={json.dumps(tags)}' if tags else '')
        if c['cell_type'] == 'markdown': src = '\n'.join(('# ' + l) if l else '#' for l in src.split('\n'))
        parts.append(hdr + '\n' + src + '\n')
    pct_path.write_text('\n'.join(parts))
    return pct_path

if __name__ == '__main__':
    cmd, *paths = sys.argv[1:]
    for p in paths: print((pct_to_nb if cmd == 'to-nb' else nb_to_pct)(p))
