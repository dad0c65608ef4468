"""Open notebooks in a real JupyterLab with Debian's Chromium (driven by Playwright), run all cells, and check that every
plot is drawn: the widgets notebook three times in fresh kernels, and the retention notebook's live curve."""
import json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT/'runs'/'browser'
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IDLE = "() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'"
WIDGET_PLOTS = 7  # 14_widgets displays RetentionCurve, GPUMemoryMonitor, and two inspectors (2 and 3 plots)

# Every plotly plot in the open notebook's outputs: its SVG title, its traces and the longest x/y/z of each trace.
PLOTS = """() => [...window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')].map(g => ({
    title: g.querySelector('.gtitle')?.textContent || '',
    points: (g.data || []).map(t => Math.max(0, ...['x', 'y', 'z'].map(k => (t[k] && t[k].length) || 0))),
    marks: g.querySelectorAll('.scatterlayer .trace, .heatmaplayer .hm').length}))"""
# anywidget (plotly's FigureWidget) gives a model 2 s to load its code; where `slow` is set, give it 50 ms instead,
# as on a machine too busy to import 5 MB of JavaScript in time. Our plots must not depend on that deadline.
SLOW_MACHINE = """(() => { const timeout = AbortSignal.timeout.bind(AbortSignal);
    AbortSignal.timeout = ms => timeout(ms === 2000 && /anywidget/.test(new Error().stack) ? 50 : ms); })()"""

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _lab_copy(tmp, nb_name, dest=None, params:dict|None=None):
    "Copy a notebook into a lab root as `dest`, dropping its nbdev export cell; `params` go in a cell after the parameters cell, as papermill does."
    nb = json.loads((ROOT/'nbs'/nb_name).read_text())
    cells = [c for c in nb['cells'] if 'nbdev_export' not in ''.join(c['source'])]
    if params:
        i = next(i for i, c in enumerate(cells) if 'parameters' in c.get('metadata', {}).get('tags', []))
        src = '\n'.join(f'{k} = {v!r}' for k, v in params.items())
        cells.insert(i + 1, dict(cell_type='code', id='0a1b2c3d', metadata={'tags': ['injected-parameters']}, outputs=[],
                                 execution_count=None, source=src))
    nb['cells'] = cells
    dest = dest or Path(nb_name).name
    (tmp/dest).write_text(json.dumps(nb))
    return dest

@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    chromium = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
    assert chromium, "no Chromium found: `apt-get install -y chromium` (scripts/test.sh does this when run as root)"
    tmp = tmp_path_factory.mktemp('lab')
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp/'.jcfg'), JUPYTER_RUNTIME_DIR=str(tmp/'.jrt'), PYTHONPATH=str(ROOT))
    settings = Path(sys.prefix)/'share/jupyter/lab/settings'; settings.mkdir(parents=True, exist_ok=True)
    (settings/'overrides.json').write_text(json.dumps(
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    log = open(tmp/'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--ip', '127.0.0.1', f'--port={port}',
        '--ServerApp.token=', '--ServerApp.password=', '--allow-root', f'--ServerApp.root_dir={tmp}',
        '--LabApp.expose_app_in_browser=True', '--LabApp.extension_manager=readonly',
        '--ServerApp.disable_check_xsrf=True'], env=env, stdout=log, stderr=log)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            assert proc.poll() is None, f"JupyterLab exited early:\n{(tmp/'lab.log').read_text()[-3000:]}"
            try: urllib.request.urlopen(url + '/api/status', timeout=1); break
            except OSError: time.sleep(0.5)
        else: pytest.fail(f"JupyterLab did not start within 60 s:\n{(tmp/'lab.log').read_text()[-3000:]}")
        yield dict(url=url, root=tmp, chromium=chromium)
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()

@pytest.fixture(scope='module')
def browser(lab):
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=lab['chromium'], headless=True, args=ARGS)
        try: yield b
        finally: b.close()

def _shutdown_kernels(lab):
    "Stop every kernel of the lab, so the next notebook opened starts a fresh one (and the machine's memory stays free)."
    for k in json.load(urllib.request.urlopen(lab['url'] + '/api/kernels')):
        urllib.request.urlopen(urllib.request.Request(f"{lab['url']}/api/kernels/{k['id']}", method='DELETE'))

def _open(browser, slow=False):
    "A new page (so a new widget manager) that records the console's errors; `slow`: see SLOW_MACHINE."
    page = browser.new_page(viewport={'width': 1280, 'height': 1000})
    if slow: page.add_init_script(SLOW_MACHINE)
    page.errors = []
    page.on('console', lambda m: m.type == 'error' and page.errors.append(m.text))
    page.on('pageerror', lambda e: page.errors.append(str(e)))
    return page

def _run_all(lab, nb_name, page, timeout=120):
    page.goto(f"{lab['url']}/lab/tree/{nb_name}?reset")   # reset: only this notebook, not the tabs of earlier runs
    page.wait_for_selector('.jp-Notebook .jp-Cell', state='attached', timeout=60_000)
    page.wait_for_function(IDLE, timeout=90_000)
    t0 = time.time()
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    time.sleep(1)
    page.wait_for_function(IDLE, timeout=timeout * 1000)
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    errors = [e for e in errors if 'Error' in e or 'Traceback' in e]
    assert not errors, f'a cell failed in the browser: {errors}'
    return time.time() - t0

def _blank(p): return not p['title'] or not p['points'] or max(p['points']) == 0 or not p['marks']

def _all_drawn(page, n, what, timeout=30):
    "Wait until `n` plotly plots are in the outputs, each with a title and a trace with points; fail naming the blank ones."
    deadline = time.time() + timeout
    while True:
        plots = page.evaluate(PLOTS)
        if len(plots) == n and not any(map(_blank, plots)): return plots
        if time.time() > deadline: break
        time.sleep(0.5)
    page.screenshot(path=str(SHOTS/f'{what}_blank.png'), full_page=True)
    anywidget = [e for e in page.errors if 'anywidget' in e]
    pytest.fail(f'{what}: expected {n} drawn plots, got {len(plots)}, blank: {[p for p in plots if _blank(p)]}; '
                f'all: {plots}; anywidget errors in the console: {anywidget}')

def _no_widget_errors(page, what):
    bad = [e for e in page.errors if 'anywidget' in e or 'Failed to initialize model' in e or 'Could not create' in e]
    assert not bad, f'{what}: widget errors in the browser console: {bad}'

def _plot(page, title_start):
    "The plot (a locator) whose SVG title starts with `title_start`."
    return page.locator('.jp-OutputArea-output .js-plotly-plot').filter(
        has=page.locator('.gtitle', has_text=title_start)).first

def _rect(loc): b = loc.bounding_box(); return (b['x'], b['y'], b['x'] + b['width'], b['y'] + b['height'])

def _overlap(a, b): return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

def _check_polish(page):
    "The slot inspector's categorical write colours, titled colourbars and heatmap hover; the monitor's one title and phase labels."
    # the first inspector is coloured by source: one trace (and legend entry) per write, each in its own flat colour
    ins = _plot(page, 'short-term memory slots, layer 1'); ins.scroll_into_view_if_needed()
    writes = ins.evaluate("g => g.data.filter(t => t.showlegend !== false).map(t => [t.name, t.marker.color])")
    assert len(writes) >= 2 and all(isinstance(c, str) for _, c in writes), writes
    assert len({c for _, c in writes}) == len(writes) and all(n.startswith(('write', 'initial')) for n, _ in writes), writes
    assert ins.locator('.colorbar').count() == 0, 'source ids are categories: no colour scale'
    assert 'source write' in ins.locator('.legendtitletext').text_content()
    assert {n for n, _ in writes} <= set(ins.locator('.legendtext').all_text_contents()), 'each write in the legend'
    # the M+ inspector is coloured by age: a continuous scale, with a titled colourbar
    age = _plot(page, 'short-term memory slots, layer 0')
    assert 'age' in age.locator('.colorbar .cbtitle').text_content()
    # each heatmap: a titled colourbar, and a hover label naming slot, dimension and value
    heats = page.locator('.jp-OutputArea-output .js-plotly-plot').filter(has=page.locator('.gtitle', has_text='slot vectors'))
    assert heats.count() == 2
    for i in range(heats.count()):
        h = heats.nth(i); h.scroll_into_view_if_needed()
        assert h.locator('.colorbar .cbtitle').text_content().strip(), 'heatmap colourbar has a title'
        x0, y0, x1, y1 = _rect(h.locator('.nsewdrag').first)
        page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2)
        label = h.locator('.hoverlayer .hovertext')
        label.first.wait_for(timeout=5_000)
        text = label.first.text_content()
        assert 'slot' in text and 'dim' in text and 'value' in text, text
    page.mouse.move(0, 0)
    # the memory monitor on CPU: one title, saying it plots the process RSS; the line is named so; labels apart
    mon = _plot(page, 'Process RSS'); mon.scroll_into_view_if_needed()
    box = mon.locator('xpath=ancestor::div[contains(@class, "widget-vbox")][1]')
    assert box.locator('.js-plotly-plot').count() == 1 and box.locator('.widget-html').count() == 0, 'one plot, no extra heading'
    assert mon.locator('.gtitle').count() == 1 and 'no CUDA' in mon.locator('.gtitle').text_content()
    assert mon.evaluate("g => g.data.map(t => t.name)") == ['process RSS']
    assert 'process RSS' in mon.locator('.legendtext').all_text_contents()
    labels = mon.locator('.annotation')
    assert labels.count() == 2, labels.all_text_contents()   # setup, alloc ×2
    rects = [_rect(labels.nth(i)) for i in range(labels.count())] + [_rect(mon.locator('.gtitle')), _rect(mon.locator('.legend'))]
    clash = [(i, j) for i in range(len(rects)) for j in range(i) if _overlap(rects[i], rects[j])]
    assert not clash, f'phase labels / title / legend overlap: {clash} in {rects}'
    plot_area = _rect(mon.locator('.nsewdrag').first)
    assert all(r[3] <= plot_area[1] + 1 for r in rects[:-2]), 'phase labels sit above the plot, off the data'

def _check_layer_change(page):
    "Change the first inspector's layer selector in the browser and check its heatmap is redrawn."
    heat = """() => [...document.querySelectorAll('.js-plotly-plot')].filter(g => g.data && g.data[0] && g.data[0].type === 'heatmap')
                         .map(g => JSON.stringify(g.data[0].z).slice(0, 2000))"""
    before = page.evaluate(heat)
    assert before, 'no slot-vector heatmap was drawn'
    sel = page.locator('.widget-dropdown select').filter(has=page.locator('option', has_text='layer 1')).first
    sel.scroll_into_view_if_needed()
    current = sel.evaluate("s => s.options[s.selectedIndex].text")
    sel.select_option(label='layer 0' if current != 'layer 0' else 'layer 1')
    page.wait_for_function(f"() => ({heat})()[0] !== {json.dumps(before[0])}", timeout=30_000)
    page.screenshot(path=str(SHOTS/'inspector_layer_changed.png'))

def test_widgets_always_draw(lab, browser):
    "Run-all of the widgets notebook 3 times, each in a fresh kernel and page: every plot is drawn every time."
    times = []
    for run in range(3):
        _shutdown_kernels(lab)
        name = _lab_copy(lab['root'], '14_widgets.ipynb', f'14_widgets_run{run}.ipynb')   # a new path: a new session and kernel
        page = _open(browser, slow=run == 2)
        try:
            times.append(round(_run_all(lab, name, page)))
            plots = _all_drawn(page, WIDGET_PLOTS, f'widgets run {run}')
            titles = [p['title'] for p in plots]
            assert any('retention' in t.lower() for t in titles) and any('RSS' in t for t in titles), titles
            _no_widget_errors(page, f'widgets run {run}')
            if run == 0:
                page.screenshot(path=str(SHOTS/'widgets.png'), full_page=True)
                _check_polish(page)
                _check_layer_change(page)
            if run == 2:   # save, then reload the page: the widgets come back from the kernel, all at once, still drawn
                page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')"); time.sleep(1)
                page.errors.clear(); page.reload()
                page.wait_for_selector('.jp-Notebook .jp-Cell', state='attached', timeout=60_000)
                _all_drawn(page, WIDGET_PLOTS, 'widgets after reload')
                _no_widget_errors(page, 'widgets after reload')
        finally: page.close()
    print('run-all seconds:', times)

RETENTION_SMALL = dict(n_facts=3, episodes=1, prefill_seeds=[0], max_distance=2, step=1, prefill=1, require_recall=False)

def test_retention_live_curve(lab, browser):
    "The retention notebook (small parameters, in a copy) fills its live curve: every memory's line has a point per distance."
    _shutdown_kernels(lab)
    name = _lab_copy(lab['root'], 'experiments/retention.ipynb', 'retention_small.ipynb', RETENTION_SMALL)
    page = _open(browser, slow=True)
    try:
        _run_all(lab, name, page, timeout=180)
        [curve] = _all_drawn(page, 1, 'retention')
        assert 'retention' in curve['title'].lower(), curve
        lines = page.evaluate("""() => window.jupyterapp.shell.currentWidget.node.querySelector('.jp-OutputArea-output .js-plotly-plot').data
                                       .filter(t => t.mode === 'lines+markers').map(t => [t.name, t.x.length])""")
        assert sorted(lines) == [['M+', 3], ['MemoryLLM', 3], ['no memory', 3]], lines
        _no_widget_errors(page, 'retention')
        page.screenshot(path=str(SHOTS/'retention.png'), full_page=True)
    finally: page.close(); _shutdown_kernels(lab)
