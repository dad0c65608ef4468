"Build the docs offline with `scripts/docs.sh` and check them: a page per notebook, the API reference, links (those in _modidx too), and every page opened in Debian's Chromium."
import html, json, os, posixpath, re, shutil, subprocess, sys, time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

def _notebooks():
    "The notebooks nbdev renders: every .ipynb under nbs/ outside folders and files starting with _ or ."
    return sorted(p for p in NBS.rglob('*.ipynb') if not any(s.startswith(('_', '.')) for s in p.relative_to(NBS).parts))

def _page(nb):
    "nbdev's page name for a notebook: its path under nbs/ without the numeric prefix (`03a_hf.ipynb` -> `hf.html`)."
    rel = nb.relative_to(NBS)
    return rel.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', rel.name.lower())).with_suffix('.html').as_posix()

def _title(nb):
    "The notebook's `# title` line, which the page's <title> and <h1> must show."
    for c in json.loads(nb.read_text())['cells']:
        if c['cell_type'] == 'markdown':
            t = [l[2:].strip() for l in ''.join(c['source']).splitlines() if l.startswith('# ')]
            if t: return t[0]
    return nb.stem

class _Page(HTMLParser):
    "The ids, links, resources, API headings and title of one HTML page."
    def __init__(self):
        super().__init__(); self.ids, self.links, self.loads, self.api, self.title, self._in = set(), [], [], set(), '', None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if a.get('src'): self.loads.append(a['src'])
        if tag == 'link' and a.get('href'): self.loads.append(a['href'])
        if tag in ('h3', 'h4') and 'doc-name' in (a.get('class') or '').split(): self.api.add(a.get('id'))
        if tag == 'title': self._in = 'title'
    def handle_endtag(self, tag):
        if tag == 'title': self._in = None
    def handle_data(self, data):
        if self._in == 'title': self.title += data


def _build(out):
    t0 = time.time()
    r = subprocess.run(['bash', str(ROOT/'scripts'/'docs.sh'), str(out/'site')], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, f'scripts/docs.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    print(f'docs built in {time.time() - t0:.0f} s: {r.stdout.strip()}')

@pytest.fixture(scope='module')
def docs(build_once):
    out = build_once('docs', _build)/'site'
    pages = {}
    for f in sorted(out.rglob('*.html')):
        p = _Page(); p.text = f.read_text(); p.feed(p.text); pages[f.relative_to(out).as_posix()] = p
    return out, pages

def test_a_page_per_notebook_and_an_index(docs):
    out, pages = docs
    want = {_page(nb) for nb in _notebooks()}
    assert want <= set(pages), f'notebooks without a page: {sorted(want - set(pages))}'
    linked = {posixpath.normpath(unquote(urlsplit(h).path)) for h in pages['index.html'].links if not urlsplit(h).scheme}
    assert want - {'index.html'} <= linked, f'index.html does not link to: {sorted(want - linked - {"index.html"})}'

def test_api_reference_for_every_exported_name(docs):
    "Each module's `__all__` has a show_doc entry (an <h3 class=doc-name> with nbdev's anchor) on its notebook's page."
    import importlib
    _, pages = docs
    missing, n = [], 0
    for nb in _notebooks():
        m = re.search(r'#\|\s*default_exp\s+([\w.]+)', nb.read_text())
        if not m: continue
        mod = importlib.import_module(f'memnb.{m[1]}')
        for name in mod.__all__:
            n += 1
            if name.lower() not in pages[_page(nb)].api: missing.append(f'{mod.__name__}.{name} on {_page(nb)}')
    assert n > 100 and not missing, f'{len(missing)} of {n} exported names have no API entry: {missing[:20]}'
    shown = html.unescape(re.sub(r'<[^>]+>', '', pages['widgets.html'].text))   # the page's text, highlighting removed
    assert 'def wilson_interval(' in shown and 'Wilson score interval for a binomial proportion' in shown

def _resolves(pages, page, href):
    u = urlsplit(href)
    path, frag = unquote(u.path), unquote(u.fragment)
    target = posixpath.normpath(posixpath.join(posixpath.dirname(page), path)) if path else page
    return target in pages and (not frag or frag in pages[target].ids)

def test_links_resolve(docs):
    "Every link between pages lands on an existing page and anchor, and so does every `_modidx` entry (what nbdev links to)."
    from memnb._modidx import d
    _, pages = docs
    bad = [f'{pg}: {h}' for pg, p in pages.items() for h in p.links
           if urlsplit(h).scheme not in ('http', 'https', 'mailto') and not _resolves(pages, pg, h)]
    assert not bad, f'{len(bad)} broken links: {bad[:20]}'
    syms = [(k, url) for dets in d['syms'].values() for k, (url, _) in dets.items()]
    bad = [f'{k}: {url}' for k, url in syms if not _resolves(pages, 'index.html', url)]
    assert len(syms) > 200 and not bad, f'{len(bad)} of {len(syms)} _modidx links do not resolve: {bad[:20]}'

def test_nothing_from_the_internet_in_the_html(docs):
    "No script, image, stylesheet or CSS import points off the page (links to other sites are fine: they are not loaded)."
    _, pages = docs
    bad = [f'{pg}: {u[:80]}' for pg, p in pages.items() for u in p.loads if not u.startswith('data:') and urlsplit(u).scheme]
    bad += [f'{pg}: {m[:80]}' for pg, p in pages.items() for m in re.findall(r'url\(\s*["\']?(?:https?:)?//[^)]*|@import[^;]*', p.text)]
    assert not bad, bad[:20]
    assert not any('<script' in p.text for p in pages.values()), 'a page has a script (require.js, MathJax, widgets?)'

def test_pages_in_chromium(docs):
    "Open every page: no console error, no request other than the page's own files, and the notebook's title shown."
    from playwright.sync_api import sync_playwright
    chromium = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
    assert chromium, "no Chromium found: `apt-get install -y chromium` (scripts/test.sh does this when run as root)"
    out, pages = docs
    titles = {_page(nb): _title(nb) for nb in _notebooks()}
    errors, outside, wrong = [], [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        try:
            page = b.new_page(viewport={'width': 1280, 'height': 900})
            page.on('console', lambda m: m.type == 'error' and errors.append(f'{page.url}: {m.text}'))
            page.on('pageerror', lambda e: errors.append(f'{page.url}: {e}'))
            page.on('request', lambda r: r.url.startswith(('file:', 'data:', 'about:')) or outside.append(f'{page.url}: {r.url}'))
            page.route(re.compile(r'^(https?|wss?|ftp):'), lambda route: route.abort())
            for pg, want in titles.items():
                page.goto((out/pg).as_uri(), wait_until='load')
                got = (page.title(), page.locator('h1').first.inner_text().replace('¶', '').strip())
                if got != (want, want): wrong.append(f'{pg}: {got} != {want!r}')
                if pg == 'index.html': page.screenshot(path=str(out/'index.png'))
        finally: b.close()
    assert not errors, errors[:20]
    assert not outside, f'requests off the page: {outside[:20]}'
    assert not wrong, wrong
