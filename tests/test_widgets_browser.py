"Open the widgets notebook in a real JupyterLab with Debian's Chromium (driven by Playwright), run all cells, and check the plots are drawn."
import json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT/'runs'/'browser'
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IDLE = "() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'"

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _lab_copy(tmp, nb_name):
    "Copy a notebook into a lab root, dropping its nbdev export cell (the copy is not inside the project)."
    nb = json.loads((ROOT/'nbs'/nb_name).read_text())
    nb['cells'] = [c for c in nb['cells'] if 'nbdev_export' not in ''.join(c['source'])]
    (tmp/nb_name).write_text(json.dumps(nb))

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
        '--LabApp.expose_app_in_browser=True', '--LabApp.extension_manager=readonly'], env=env, stdout=log, stderr=log)
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

def _run_all(lab, nb_name, page):
    page.goto(f"{lab['url']}/lab/tree/{nb_name}")
    page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=60_000)
    page.wait_for_function(IDLE, timeout=90_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    time.sleep(1)
    page.wait_for_function(IDLE, timeout=120_000)

def test_widgets_render(lab):
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    _lab_copy(lab['root'], '14_widgets.ipynb')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=lab['chromium'], headless=True, args=ARGS)
        try:
            page = b.new_page(viewport={'width': 1280, 'height': 1000})
            _run_all(lab, '14_widgets.ipynb', page)
            page.wait_for_selector('.jp-OutputArea-output .js-plotly-plot .main-svg', timeout=60_000)
            errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
            errors = [e for e in errors if 'Error' in e or 'Traceback' in e]
            assert not errors, f'a cell failed in the browser: {errors}'
            plots = page.locator('.js-plotly-plot')
            assert plots.count() >= 2, f'expected the retention curve and the memory monitor, got {plots.count()} plots'
            titles = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].map(e => e.textContent)")
            assert any('retention' in t.lower() for t in titles), titles
            assert any('RSS' in t for t in titles), titles
            # the retention curve drew its points: markers of the MemoryLLM line
            npts = page.evaluate("() => document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length")
            assert npts >= 3, npts
            page.screenshot(path=str(SHOTS/'widgets.png'), full_page=True)
            # the slot inspector: change its layer selector in the browser and check the heatmap is redrawn
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
        finally: b.close()
