"""The course website in a real browser: build it (scripts/build_site.py), serve it on 127.0.0.1, open every page in
headless Chromium (Playwright driving Debian's `chromium`) and check links, images, console, search and the explorer.

Needs the `docs` extra (`pip install -e ".[docs]"`) and a Chromium binary (`apt-get install chromium`); skipped with
the reason when either is absent, and failed instead when CI is set, so CI cannot pass it by skipping. Screenshots of
the front page, a notebook page and the explorer are written to site-artifacts/ (or $SITE_ARTIFACTS).
"""
import functools
import http.server
import json
import os
import re
import shutil
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urldefrag

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
ARTIFACTS = Path(os.environ.get("SITE_ARTIFACTS", ROOT / "site-artifacts"))
SEARCH_WORD, SEARCH_PAGE = "roofline", "19_fast_decoding"   # a word of the notebook's prose, and the notebook
TIMEOUT_MS = 30_000


def missing() -> list:
    "What the browser test needs and this machine lacks."
    out = []
    for mod, pkg in [("playwright.sync_api", "playwright"), ("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                     ("mkdocstrings_handlers.python", "mkdocstrings-python"), ("latex2mathml", "latex2mathml")]:
        try: __import__(mod)
        except ImportError: out.append(f"{pkg} (pip install -e '.[docs]')")
    if chromium() is None: out.append("a chromium binary (apt-get install chromium)")
    return out


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site, built into a temporary folder: (folder, build facts)."
    lack = missing()
    if lack:
        msg = "the site's browser test needs " + ", ".join(lack)
        if os.environ.get("CI"): pytest.fail(msg + " (CI must run this test, not skip it)")
        pytest.skip(msg)
    from build_site import build
    facts = build(tmp_path_factory.mktemp("site") / "site")
    print(f"\nsite built in {facts['seconds']} s: {len(facts['pages'])} pages, {facts['bytes'] / 2**20:.1f} MiB")
    return Path(facts["out"]), facts


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args): pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):     # a browser hanging up is not an error
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def base_url(site):
    "The site served over HTTP on 127.0.0.1 (a free port) by a thread, stopped after the module's tests."
    server = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site[0])))
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown(); server.server_close(); thread.join(10)


@pytest.fixture(scope="module")
def browser(base_url):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


class Watched:
    "A browser page that records console errors, page errors and requests leaving the site."
    def __init__(self, browser, base_url):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors, self.external = [], []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("response", lambda r: self.errors.append(f"HTTP {r.status} for {r.url}") if r.status >= 400 else None)
        self.page.on("request", lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else self.external.append(r.url))

    def goto(self, url):
        self.errors.clear(); self.external.clear()
        response = self.page.goto(url, wait_until="load")
        return response.status if response else None


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def test_every_page(site, base_url, browser):
    "Every page: HTTP 200, links inside the site resolve (anchors too), every image loaded, no console errors, nothing external."
    folder, facts = site
    pages = facts["pages"]
    notebooks = sorted(p.stem for p in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))
    for stem in notebooks: assert f"{stem}/index.html" in pages, f"no page for notebook {stem}"
    assert "explorer/index.html" in pages and "api/index.html" in pages
    w, problems, links = Watched(browser, base_url), [], {}
    for rel in pages:
        url = base_url + rel
        if w.goto(url) != 200: problems.append(f"{rel}: HTTP status not 200")
        images = w.page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        problems += [f"{rel}: image {src} did not load" for src, done, width in images if not (done and width > 0)]
        problems += [f"{rel}: {e}" for e in w.errors] + [f"{rel}: loads {u} from outside the site" for u in w.external]
        for href in w.page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
            if href.startswith(base_url): links.setdefault(href, rel)
    w.page.close()
    ids = {}
    for href, rel in sorted(links.items()):
        target, frag = urldefrag(href)
        code = status(target)
        if code != 200: problems.append(f"{rel}: link {href} gives HTTP {code}"); continue
        if frag and not target.endswith((".json", ".png", ".md")):
            if target not in ids:
                with urllib.request.urlopen(target, timeout=10) as r: text = r.read().decode()
                ids[target] = set(re.findall(r'id="([^"]+)"', text))
            if unquote(frag) not in ids[target]: problems.append(f"{rel}: link {href}: no element with that id")
    assert len(links) > 100, f"only {len(links)} internal links found: the pages did not render their navigation"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])


def test_notebook_pages_show_code_outputs_and_api_link(site, base_url, browser):
    "A notebook page shows its export cells, its saved outputs and figures, and links to its module's API page."
    w = Watched(browser, base_url)
    assert w.goto(base_url + "16_attention_maps/") == 200
    code = w.page.inner_text("article")
    assert "#| export" in code and "def attention_rollout(" in code
    assert w.page.locator(".nb-output img").count() > 0 and w.page.locator(".nb-output pre").count() > 0
    w.page.click("article a[href$='api/attention_maps/']")
    w.page.wait_for_load_state("load")
    assert w.page.url.endswith("/api/attention_maps/")
    assert w.page.locator("[id='paligemma_edu.attention_maps.attention_rollout']").count() == 1   # signature and docstring
    assert "Abnar & Zuidema rollout" in w.page.inner_text("article")
    w.goto(base_url + "16_attention_maps/")
    prev, nxt = (w.page.get_attribute(f"a.md-footer__link--{k}", "href") for k in ("prev", "next"))
    assert prev.rstrip("/").endswith("15_segmentation") and nxt.rstrip("/").endswith("17_bundled_model")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "notebook.png"
    w.page.screenshot(path=str(shot))
    print(f"\nscreenshot: {shot}")
    assert not w.errors, w.errors
    w.page.close()


def test_search_finds_a_notebook(site, base_url, browser):
    "The built-in search (lunr, in the browser) finds a notebook by a word of its prose."
    w = Watched(browser, base_url)
    w.goto(base_url)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "index.png"
    w.page.screenshot(path=str(shot))
    print(f"\nscreenshot: {shot}")
    w.page.click("input.md-search__input")
    w.page.fill("input.md-search__input", SEARCH_WORD)
    w.page.wait_for_selector(f".md-search-result__item a[href*='{SEARCH_PAGE}']")
    found = w.page.eval_on_selector_all(".md-search-result__item a", "as => as.map(a => a.getAttribute('href'))")
    assert any(SEARCH_PAGE in h for h in found), found
    assert len({h.split("#")[0] for h in found}) < len(site[1]["pages"]) // 2, f"the search did not discriminate: {found}"
    assert not w.errors and not w.external, (w.errors, w.external)
    w.page.close()


SNAPSHOT = ("() => { const c = document.getElementById('ae-image'); window.snaps = window.snaps || [];\n"
            "window.snaps.push(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); return window.snaps.length - 1; }")
MASK_CELLS = ("(T) => { const c = document.getElementById('ae-mask'), cell = c.width / T, d = c.getContext('2d')"
              ".getImageData(0, 0, c.width, c.height).data, rows = [];\n"
              "for (let i = 0; i < T; i++) { let r = ''; for (let j = 0; j < T; j++) {"
              " const k = 4 * (Math.floor((i + 0.5) * cell) * c.width + Math.floor((j + 0.5) * cell));\n"
              " r += d[k] < 128 ? '1' : '0'; }"
              " rows.push(r); } return rows; }")
CHANGED = ("([i, j]) => { const a = window.snaps[i], b = window.snaps[j]; let n = 0;"
           " for (let k = 0; k < a.length; k++) if (a[k] !== b[k]) n++; return n / a.length; }")


def test_explorer(site, base_url, browser):
    "Explorer: the data agrees with the page; two tokens give two different overlays; layers differ; the mask is drawn."
    folder, _ = site
    data = json.loads((folder / "explorer" / "attention.json").read_text())
    w = Watched(browser, base_url)
    w.goto(base_url + "explorer/")
    w.page.wait_for_selector("#ae-root[data-ready='true']")
    w.page.wait_for_selector("#ae-image[data-image='loaded']")
    scene = data["scenes"][0]
    assert w.page.locator(".ae-scenes button").count() == len(data["scenes"]) >= 3
    prompt_buttons, answer_buttons = w.page.locator("#ae-prompt button"), w.page.locator("#ae-answer button")
    assert prompt_buttons.count() + answer_buttons.count() == len(scene["tokens"])
    assert answer_buttons.count() >= 1 and "".join(answer_buttons.all_inner_texts()).replace(" ", "") != ""
    prompt_buttons.nth(1).click()
    a = w.page.evaluate(SNAPSHOT)
    answer_buttons.nth(0).click()
    b = w.page.evaluate(SNAPSHOT)
    diff = w.page.evaluate(CHANGED, [a, b])
    assert diff > 0.05, f"two tokens gave nearly the same overlay ({diff:.1%} of the pixel values differ)"
    w.page.select_option("#ae-layer", "rollout")
    c = w.page.evaluate(SNAPSHOT)
    assert w.page.evaluate(CHANGED, [b, c]) > 0, "the rollout overlay equals the layer-average one"
    drawn = w.page.evaluate(MASK_CELLS, len(scene["mask"]["rows"]))                # each cell's centre: dark = may attend
    assert drawn == scene["mask"]["rows"], "the mask drawn differs from the mask in attention.json"
    rows = scene["mask"]["rows"]
    assert rows[0][-1] == "0" and rows[-1][0] == "1" and rows[0][scene["prompt_len"] - 1] == "1"  # prefix block, causal answer
    w.page.locator(".ae-scenes button").nth(1).click()
    w.page.wait_for_selector("#ae-image[data-image='loaded']")
    assert w.page.locator("#ae-answer button").count() >= 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "explorer.png"
    w.page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    assert not w.errors and not w.external, (w.errors, w.external)
    w.page.close()


# The page writer alone (no browser, no MkDocs): what a notebook page keeps and drops, and the build's refusals.
def _nb(*cells):
    "A notebook from (cell type, source, outputs) triples."
    return {"cells": [{"cell_type": t, "source": s, "metadata": {}, **({"outputs": o} if t == "code" else {})}
                      for t, s, o in cells]}


def test_notebook_markdown_keeps_export_cells_and_outputs_drops_hidden():
    pytest.importorskip("latex2mathml")
    import build_site
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    nb = _nb(("markdown", "# A `<seg>` title\n\n> summary with $x^2$", None),
             ("code", "#| default_exp demo", []),
             ("code", "#| export\ndef f(x): return x", []),
             ("code", "#| hide\nsecret = 1", []),
             ("code", "f(2)", [{"output_type": "execute_result", "data": {"text/plain": "2"}, "metadata": {}}]),
             ("code", "#| echo: false\nshow()", [{"output_type": "display_data", "data": {"image/png": png}, "metadata": {}}]),
             ("markdown", "See [the shapes](13_shapes.ipynb#pixel-labels) and `$not math$`.", None))
    assert build_site.notebook_title(nb, Path("x.ipynb")) == "A `<seg>` title" and build_site.default_exp(nb) == "demo"
    files = {}
    md = build_site.notebook_markdown(Path("nbs/99_demo.ipynb"), nb, "demo", {"demo"}, files, {})
    assert "#| export\ndef f(x): return x" in md and "secret" not in md and "show()" not in md
    assert "```text\n2\n```" in md and "(api/demo.md)" in md
    assert list(files) == ["99_demo_files/output_0.png"] and files["99_demo_files/output_0.png"].startswith(b"\x89PNG")
    assert "<math" in md and "$x^2$" not in md and "`$not math$`" in md
    assert "(13_shapes.md#pixel-labels)" in md


def test_build_refuses_a_folder_it_did_not_write(tmp_path):
    pytest.importorskip("mkdocs")
    import build_site
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"): build_site.build(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    bad = tmp_path / "00_x.ipynb"; bad.write_text("{not json")
    with pytest.raises(ValueError, match="00_x.ipynb: not a notebook"): build_site.read_notebook(bad)
    with pytest.raises(ValueError, match="no '# Title'"): build_site.notebook_title(_nb(("markdown", "no title", None)), bad)
