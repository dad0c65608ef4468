#!/usr/bin/env bash
# Build the docs offline, without Quarto: every notebook in nbs/ rendered to HTML in _docs/ (or the folder given as $1),
# with nbdev's show_doc API reference for every exported name, links between pages, a navigation sidebar on every
# page, and nothing loaded from the internet. Notebooks are not executed: pages show their sources, and the API
# reference is rendered from the installed modules (nbdev's showdoc), so the build takes seconds, not the tests' minutes.
# Uses the project venv (.venv, made by scripts/setup.sh) when there is one, else $PYTHON or python3.
set -euo pipefail
OUT=${1:+$(realpath -m "$1")}   # a folder given relative to where the command runs
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec "$PY" - "$OUT" <<'PY'
import ast, base64, html, importlib, io, json, os, posixpath, re, shutil, sys, time, warnings
from pathlib import Path
t0 = time.time()
warnings.filterwarnings('ignore')
from fastcore.nbio import read_nb, mk_cell
from nbdev.config import get_config, nbpath2html
from nbdev.process import NBProcessor, Processor
from nbdev.processors import (populate_language, add_show_docs, strip_ansi, hide_line, rm_header_dash, rm_export,
                              clean_magics, hide_, mv_exports, strip_hidden_metadata, _want_doc, _def_names, _default_exp)
from nbdev.doclinks import NbdevLookup, nbglob, patch_name
from nbdev.showdoc import show_doc
from memnb._modidx import d as MODIDX
from memnb.cli import offline_exporter, OFFLINE_TEMPLATE

cfg = get_config()
NBS = cfg.path('nbs_path')
OUT = Path(sys.argv[1] or cfg.path('doc_path')).resolve()
LIB = cfg.lib_path.name

# ---- the pages: every notebook nbdev would render (folders and files starting with _ or . are skipped) ----
nbs = sorted(map(Path, nbglob(NBS)), key=lambda p: (p.parent != NBS, p.name != 'index.ipynb', str(p.relative_to(NBS))))
def page_of(nb): return nbpath2html(nb.relative_to(NBS)).as_posix()
pages = {page_of(nb): nb for nb in nbs}
assert len(pages) == len(nbs), 'two notebooks map to the same page'

def title_of(nb):
    "The notebook's `# title` and `> description` (nbdev's front matter in markdown)."
    for c in json.loads(nb.read_text())['cells']:
        if c['cell_type'] != 'markdown': continue
        lines = ''.join(c['source']).splitlines()
        t = [l[2:].strip() for l in lines if l.startswith('# ')]
        if t: return t[0], next((l[1:].strip() for l in lines if l.startswith('>')), '')
    return nb.stem, ''
titles = {pg: title_of(nb) for pg, nb in pages.items()}

# ---- where each documented name lives: nbdev's _modidx, plus the module-level names in __all__ (constants) ----
syms = {}  # symbol -> 'page.html#anchor', relative to the docs root
for mod, dets in MODIDX['syms'].items():
    for k, (url, py) in dets.items(): syms[k] = url
mod_page = {}
for pg, nb in pages.items():
    m = _default_exp(read_nb(nb))
    if m: mod_page[f'{LIB}.{m}'] = pg
for mod, pg in mod_page.items():
    syms.setdefault(mod, pg)
    for n in getattr(importlib.import_module(mod), '__all__', []): syms.setdefault(f'{mod}.{n}', f'{pg}#{n.lower()}')

def rel(url, page):
    "`url` (relative to the docs root) as seen from `page`."
    path, _, frag = url.partition('#')
    r = posixpath.relpath(path, posixpath.dirname(page) or '.')
    return r + ('#' + frag if frag else '')

def lookup_for(page):
    "nbdev's backtick linker over this library's names only, with links relative to `page` (nbdev's own are site-absolute)."
    nl = NbdevLookup.__new__(NbdevLookup)
    nl.aliases, nl.syms = {}, {}
    for k, url in syms.items():
        nl.syms[k] = rel(url, page)
        mod = next((m for m in mod_page if k.startswith(m + '.')), None)
        if mod: nl.syms.setdefault(k[len(mod) + 1:], nl.syms[k])
    return nl

# ---- API reference blocks ----
def resolve(mod, name):
    o = importlib.import_module(mod)
    for part in name.split('.'): o = getattr(o, part)
    return o

FALLBACKS = []   # names show_doc could not render
_re_src = re.compile(r'^\[source\]\(.*$\n?', re.M)
def doc_block(mod, name, level=3):
    "nbdev's show_doc for `mod.name` as markdown, with an `id` that nbdev's _modidx links to and no source link (no git host)."
    obj = resolve(mod, name)
    try: md = show_doc(obj, name=name, title_level=level)._repr_markdown_()
    except Exception as e:   # show_doc evaluates string annotations; one naming a type the module imports only for checkers fails
        import inspect
        FALLBACKS.append(f'{mod}.{name} ({type(e).__name__}: {e})')
        try: sig = str(inspect.signature(obj))
        except (TypeError, ValueError): sig = '(...)'
        md = f"{'#' * level} {name}\n\n```python\n{'class' if isinstance(obj, type) else 'def'} {name.split('.')[-1]}{sig}\n```\n\n*{inspect.getdoc(obj) or ''}*"
    md = re.sub(r'^---\s*$', '', _re_src.sub('', md), count=1, flags=re.M)   # the source link and the rule above each entry
    md = re.sub(rf'^#{{{level}}} .*$', f'<h{level} id="{name.lower()}" class="doc-name"><code>{html.escape(name)}</code></h{level}>', md, count=1, flags=re.M)
    return f'<div class="doc">\n\n{md.strip()}\n\n</div>'

def const_block(name, node, src):
    code = ast.get_source_segment(src, node) or name
    lines = code.splitlines()
    if len(lines) > 12: code = '\n'.join(lines[:12] + ['...'])
    return f'<div class="doc">\n\n<h3 id="{name.lower()}" class="doc-name"><code>{html.escape(name)}</code></h3>\n\n```python\n{code}\n```\n\n</div>'

class api_extras(Processor):
    """After each exported cell: the reference for its public methods and exported constants, and an anchor for every
    other name nbdev's _modidx links to (private helpers), so that each of those links lands on this page."""
    def begin(self):
        mod = self.nb.module_
        if not mod: return
        public = set(getattr(importlib.import_module(mod), '__all__', []))
        for cell in reversed([c for c in self.nb.cells if c.cell_type == 'code' and {'export', 'exports', 'exporti'} & set(c.directives_)]):
            try: tree = ast.parse(cell.source)
            except SyntaxError: continue
            shown = set(_def_names(cell, set())) if _want_doc(cell) else set()   # what add_show_docs will document
            blocks, anchors = [], []
            for t in tree.body:
                if isinstance(t, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    nms = patch_name(t)
                    anchors += [n for n in (nms if isinstance(nms, list) else [nms]) if n not in shown]
                    if isinstance(t, ast.ClassDef):
                        for m in t.body:
                            if not isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)): continue
                            nm = f'{t.name}.{m.name}'
                            if t.name in public and not m.name.startswith('_'): blocks.append(doc_block(mod, nm, 4))
                            else: anchors.append(nm)
                elif isinstance(t, (ast.Assign, ast.AnnAssign)):
                    for tg in (t.targets if isinstance(t, ast.Assign) else [t.target]):
                        if isinstance(tg, ast.Name) and tg.id in public: blocks.append(const_block(tg.id, t, cell.source))
            if anchors: blocks.append(''.join(f'<div id="{a.lower()}"></div>' for a in dict.fromkeys(anchors)))
            if blocks: self.nb.cells.insert(cell.idx_ + 1, mk_cell('\n\n'.join(blocks), 'markdown'))

def render_show_docs(mod):
    "A processor turning the `show_doc(name)` cells add_show_docs inserted into markdown cells holding the rendered reference."
    def proc(cell):
        if cell.cell_type != 'code' or not cell.get('has_sd'): return
        name = re.fullmatch(r'show_doc\((.+)\)', cell.source.strip())[1]
        cell.cell_type, cell.source = 'markdown', doc_block(mod, name)
        cell.pop('outputs', None); cell.pop('execution_count', None)
    return proc

# ---- math: TeX rendered with matplotlib's mathtext into inline SVG (MathJax would have to come from a CDN) ----
def tex_svg(tex):
    import matplotlib; matplotlib.use('Agg')
    from matplotlib import mathtext
    buf = io.BytesIO()
    try: mathtext.math_to_image(f'${tex}$', buf, format='svg', dpi=72, prop=None)
    except Exception: return f'<code>{html.escape(tex)}</code>'
    return (f'<img class="math" alt="{html.escape(tex)}" style="vertical-align:middle" '
            f'src="data:image/svg+xml;base64,{base64.b64encode(buf.getvalue()).decode()}">')

def render_math(md):
    parts = re.split(r'(```.*?```|`[^`\n]*`)', md, flags=re.S)   # leave code alone
    return ''.join(p if i % 2 else re.sub(r'(?<![\\$])\$([^$\n]+?)\$', lambda m: tex_svg(m[1]), p) for i, p in enumerate(parts))

def page_links(page):
    nl = lookup_for(page)
    here = pages[page].parent
    def nb_link(m):
        target = (here/m[1]).resolve()
        try: return f'({rel(nbpath2html(target.relative_to(NBS)).as_posix(), page)}{m[2] or ""})'
        except ValueError: return m[0]
    def proc(cell):
        if cell.cell_type != 'markdown': return
        src = nl.linkify(cell.source)
        src = re.sub(r'\((?!https?:)([^()\s#]+\.ipynb)(#[^()\s]*)?\)', nb_link, src)
        cell.source = render_math(src)
    return proc

# ---- the page template: the offline template of memnb.cli, plus a navigation sidebar ----
DOCS_BLOCKS = """
{%- block extra_css -%}
<style>
body.jp-Notebook { margin: 0; padding: 0; }
nav.docs-nav { position: fixed; top: 0; left: 0; bottom: 0; width: 16rem; overflow-y: auto; box-sizing: border-box;
  padding: 1rem 0.75rem; border-right: 1px solid #ddd; background: #f7f7f7; font: 14px/1.45 system-ui, sans-serif; }
nav.docs-nav a { display: block; color: #1a5490; text-decoration: none; padding: 0.1rem 0.3rem; border-radius: 3px; }
nav.docs-nav a:hover { background: #e4ecf5; } nav.docs-nav a.current { font-weight: 600; background: #dde7f2; }
nav.docs-nav .section { margin: 0.8rem 0 0.2rem; color: #666; font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
body.jp-Notebook > main { margin-left: 16rem; padding: 1rem 2rem; max-width: 60rem; }
div.doc { border: 1px solid #ddd; border-radius: 6px; padding: 0.2rem 1rem; margin: 1rem 0; background: #fcfcfc; }
.doc-name code { font-size: 1em; background: none; }
.jp-RenderedHTMLCommon a code, main a code { color: #1a5490 !important; }
</style>
{%- endblock extra_css -%}
{%- block body_header -%}
<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="docs-nav" aria-label="pages">{{ resources.docs_nav }}</nav>
<main>
{%- endblock body_header -%}
"""
exporter = offline_exporter(OFFLINE_TEMPLATE + DOCS_BLOCKS)
exporter.exclude_input_prompt = exporter.exclude_output_prompt = True   # nothing was executed: `In [ ]:` says nothing

def nav_for(page):
    out, section = [f'<a href="{rel("index.html", page)}"><b>{html.escape(LIB)}</b></a>'], None
    for pg in pages:
        if pg == 'index.html': continue
        sec = posixpath.dirname(pg)
        if sec != section: out.append(f'<div class="section">{html.escape(sec or "modules")}</div>'); section = sec
        cur = ' class="current" aria-current="page"' if pg == page else ''
        out.append(f'<a href="{rel(pg, page)}"{cur} title="{html.escape(titles[pg][1])}">{html.escape(titles[pg][0])}</a>')
    return '\n'.join(out)

def index_list():
    rows = [f'| [{titles[pg][0]}]({pg}) | `{pg}` | {titles[pg][1]} |' for pg in pages if pg != 'index.html']
    return '## All pages\n\n| page | file | what it covers |\n|---|---|---|\n' + '\n'.join(r.replace('\n', ' ') for r in rows)

import nbformat
def clean(c):
    d = {k: v for k, v in c.items() if not k.endswith('_') and k not in ('has_sd', 'idx_')}
    d.setdefault('metadata', {})
    if d['cell_type'] == 'code': d.setdefault('outputs', []); d.setdefault('execution_count', None)
    else: d.pop('outputs', None); d.pop('execution_count', None)
    return d

MARK = '.memnb-docs'   # marks a folder this script wrote, which a rebuild may empty (as it may _docs/, git-ignored)
if OUT.exists() and any(OUT.iterdir()):
    if not (OUT/MARK).exists() and OUT != cfg.path('doc_path').resolve(): sys.exit(f'docs: {OUT} is not empty and not an earlier docs build; give a new or empty folder')
    shutil.rmtree(OUT)
OUT.mkdir(parents=True, exist_ok=True)
(OUT/MARK).write_text('built by scripts/docs.sh; rebuilding empties this folder\n')
for page, nbp in pages.items():
    nb = read_nb(nbp)
    nb.path_ = str(nbp)
    m = _default_exp(nb)
    nb.module_ = f'{LIB}.{m}' if m else None
    if page == 'index.html': nb.cells.append(mk_cell(index_list(), 'markdown'))
    procs = [populate_language, api_extras, add_show_docs, render_show_docs(nb.module_), strip_ansi, hide_line,
             rm_header_dash, rm_export, clean_magics, hide_, page_links(page), mv_exports, strip_hidden_metadata]
    NBProcessor(nb=nb, procs=procs, rm_directives=True).process()
    cells = [clean(c) for c in nb.cells if c.get('source') is not None and (c['source'].strip() or c['cell_type'] == 'code' and c.get('outputs'))]
    node = nbformat.from_dict(dict(cells=cells, metadata=dict(nb.metadata), nbformat=4, nbformat_minor=4))
    for c in node.cells: c.pop('id', None)
    body, _ = exporter.from_notebook_node(node, resources=dict(metadata=dict(name=titles[page][0]), docs_nav=nav_for(page)))
    dest = OUT/page
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(body)
if FALLBACKS: print('docs: plain signatures where show_doc failed: ' + '; '.join(FALLBACKS), file=sys.stderr)
print(f'docs: {len(pages)} pages in {OUT} ({time.time() - t0:.0f} s); open {OUT/"index.html"}')
PY
