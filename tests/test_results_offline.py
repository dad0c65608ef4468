"Experiment results readable offline: the executed notebook and its HTML are small, embed their figures as PNG, load nothing from the internet, and state this run's numbers."
import base64, json, os, re, shutil, time
from pathlib import Path
from urllib.parse import urlsplit
import nbformat, pytest
from nbformat.v4 import new_notebook, new_code_cell, new_markdown_cell
from memnb import tiny
from memnb.cli import run_experiment, WIDGET_VIEW

ROOT = Path(__file__).resolve().parent.parent
RETENTION = ROOT/'nbs'/'experiments'/'retention.ipynb'
MB = 2**20
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _small_run(d):
    model, recall = '', True
    if not tiny.has_weights():   # an untrained stand-in when no weights are committed (it cannot pass the recall check)
        tiny.save_tiny(tiny.build_tiny(seed=0), d/'tiny', tiny.train_tokenizer(), command='untrained (test)')
        model, recall = str(d/'tiny'), False
    run_experiment('retention', dict(n_facts=3, episodes=1, prefill_seeds=[0], distances=[0, 1, 24, 48], prefill=1, model=model, require_recall=recall),
                   out_dir=d/'run', progress=False)

@pytest.fixture(scope='module')
def run(build_once):
    "A small retention run with its HTML copy; distances up to 48 >= 3N/K so the dotted line is drawn."
    out = build_once('retention_offline', _small_run)/'run'
    return out, nbformat.read(str(out/'retention.ipynb'), as_version=4), (out/'retention.html').read_text()

def _outputs(nb, mime):
    return [o['data'][mime] for c in nb.cells for o in c.get('outputs', []) if mime in o.get('data', {})]

def _loads(page):
    "What the page would fetch from elsewhere: src/href of scripts, images, frames and stylesheets, and CSS url()/@import."
    refs = re.findall(r'<(?:script|img|iframe|embed|source|video|audio|link)\b[^>]*?\s(?:src|href)=["\']([^"\']+)', page)
    return [u for u in refs if urlsplit(u).scheme not in ('', 'data')] + re.findall(r'url\(\s*["\']?(?:https?:)?//[^)]*|@import[^;]*', page)

def test_small_without_widget_state(run):
    out, nb, page = run
    assert (out/'retention.ipynb').stat().st_size <= MB and (out/'retention.html').stat().st_size <= MB
    assert 'widgets' not in nb.metadata and not _outputs(nb, WIDGET_VIEW)
    notes = [''.join(t) for t in _outputs(nb, 'text/plain') if 'a live widget' in ''.join(t)]
    assert notes and notes[0].startswith('[RetentionCurve: a live widget'), notes

def test_html_embeds_the_figure_and_loads_nothing(run):
    out, nb, page = run
    pngs = [base64.b64decode(p) for p in re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', page)]
    assert (out/'retention.png').read_bytes() in pngs, 'retention.png is not embedded in the HTML'
    assert (out/'retention.png').read_bytes() in [base64.b64decode(p) for p in _outputs(nb, 'image/png')]   # and the notebook shows it
    assert '<script' not in page and not _loads(page), _loads(page)[:5]

def test_html_in_chromium(run):
    "Open the HTML offline: no console error, no request off the page, and the figure decodes."
    from playwright.sync_api import sync_playwright
    chromium = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
    assert chromium, "no Chromium found: `apt-get install -y chromium` (scripts/test.sh does this when run as root)"
    out, _, _ = run
    errors, outside = [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        try:
            page = b.new_page()
            page.on('console', lambda m: m.type == 'error' and errors.append(m.text))
            page.on('pageerror', lambda e: errors.append(str(e)))
            page.on('request', lambda r: r.url.startswith(('file:', 'data:', 'about:')) or outside.append(r.url))
            page.route(re.compile(r'^(https?|wss?|ftp):'), lambda route: route.abort())
            page.goto((out/'retention.html').as_uri(), wait_until='load')
            widths = page.evaluate("() => [...document.images].map(i => i.complete ? i.naturalWidth : 0)")
        finally: b.close()
    assert not errors and not outside, (errors, outside)
    assert widths and min(widths) > 100, widths

def test_prose_states_this_runs_numbers(run):
    "The numbers the notebook states come from this run; fixed ones are labelled as the reference run."
    out, nb, _ = run
    r = json.loads((out/'retention.json').read_text())
    said = ' '.join(''.join(m) for m in _outputs(nb, 'text/markdown') if 'This run' in ''.join(m))
    assert said.startswith('**This run** (3 questions per point: 1 episodes x 1 prefill seeds x 3 facts, seed 1234): at t = 1, the first distance after 0'), said
    for name in r['results']: assert f"{name} recalled {r['results'][name]['1']['acc']:.0%}" in said, (name, said)
    a = r['at_3N_over_K']
    assert f"At t = 3N/K = {a['t']}: M+ {a['mplus']:.0%}, MemoryLLM {a['memoryllm']:.0%}." in said and a['t'] == 3 * r['N'] // r['K']
    assert f"The never-written name got a written value back in {r['false_recall']['MemoryLLM']['0']['acc']:.0%} (MemoryLLM)" in said
    src = nbformat.read(str(RETENTION), as_version=4)
    for c in src.cells:
        if c.cell_type != 'markdown': continue
        for para in c.source.split('\n\n'):   # a recall share at a distance is a result: only the reference run may fix one
            if re.search(r'\d+(\.\d+)? ?%[^.;]*?\bat t ?= ?\d', para): assert para.startswith('Reference run'), para

def _plot(ts, K=32, N=256):
    "Run the notebook's figure cell on made-up results; return its axes and what it displayed."
    import matplotlib; matplotlib.use('Agg')
    cell = next(c for c in nbformat.read(str(RETENTION), as_version=4).cells if c.cell_type == 'code' and "retention.png'" in c.source)
    names = ['MemoryLLM', 'M+', 'no memory']
    results = {n: {str(t): dict(acc=a, ci=[max(0, a - .1), min(1, a + .1)]) for t in ts} for n, a in zip(names, (.5, .9, 0.))}
    shown = []
    ns = dict(ts=ts, names=names, results=results, acc0=1.0, floor=0.0, K=K, N=N, n_facts=3, out_dir='', summary={}, phrasings=['cloze'],
              json=json, Path=Path, display=shown.append, Markdown=lambda s: s)
    exec(cell.source, ns)
    return ns['ax'], shown

def test_plot_x_range_and_3nk_line():
    ax, shown = _plot([0, 4, 8])          # 3N/K = 24 lies beyond the data: no line, and the caption says so
    lo, hi = ax.get_xlim()
    assert -1 <= lo < 0 and 8 < hi <= 9, (lo, hi)
    assert not any('3N/K' in l.get_label() for l in ax.get_lines()) and not ax.texts
    assert 'not drawn' in shown[-1] and type(shown[0]).__name__ == 'Image'
    ax, shown = _plot([0, 12, 24, 32])    # within the data: a dotted line, labelled on the plot and in the legend
    lo, hi = ax.get_xlim()
    assert -2 <= lo < 0 and 32 < hi <= 34, (lo, hi)
    assert [l.get_label() for l in ax.get_lines() if l.get_linestyle() == ':'] == ['3N/K = 24']
    assert [t.get_text() for t in ax.texts] == ['3N/K = 24'] and '3N/K' in [t.get_text() for t in ax.get_legend().get_texts()][-1]
    assert shown[-1].endswith('The dotted line is t = 3N/K = 24.')

def test_any_experiment_gets_its_figures_and_no_widget_state(tmp_path):
    "An experiment that shows a widget and only saves its figure (as train_tiny does): the HTML embeds this run's PNG, not a stale one."
    (tmp_path/'experiments').mkdir()
    params = new_code_cell("out_dir: str = ''"); params.metadata['tags'] = ['parameters']
    nb = new_notebook(cells=[new_markdown_cell('# plot\n> A demo experiment with a widget and a saved figure.'), params,
        new_code_cell("import ipywidgets as W\nfrom IPython.display import display\ndisplay(W.IntSlider(3))"),
        new_code_cell("import matplotlib; matplotlib.use('Agg')\nimport matplotlib.pyplot as plt, pathlib\n"
                      "fig, ax = plt.subplots(); ax.plot([0, 1], [1, 0]); fig.savefig(pathlib.Path(out_dir)/'plot.png'); plt.show()")],
        metadata=dict(kernelspec=dict(name='python3', display_name='python3', language='python')))
    nbformat.write(nb, tmp_path/'experiments'/'plot.ipynb')
    out = tmp_path/'out'; out.mkdir()
    (out/'stale.png').write_bytes(b'\x89PNG old'); os.utime(out/'stale.png', (time.time() - 3600,) * 2)
    run_experiment('plot', out_dir=out, nbs_dir=tmp_path, progress=False)
    page, done = (out/'plot.html').read_text(), nbformat.read(str(out/'plot.ipynb'), as_version=4)
    pngs = [base64.b64decode(p) for p in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    test = (out/'plot.png').read_bytes()
    assert pngs == [test], 'the HTML should embed plot.png (written by this run) and not stale.png'
    assert '<title>plot</title>' in page and '<script' not in page and not _loads(page)
    assert 'widgets' not in done.metadata and ['[IntSlider: a live widget' in ''.join(t) for t in _outputs(done, 'text/plain')] == [True]
