"""Build the course website from the committed notebooks: python scripts/build_site.py [--out site] [--overwrite]

Every `nbs/NN_*.ipynb` becomes a page, in course order, as the notebook shows it: prose, every code cell (the `#| export`
cells included), the saved outputs and figures; nothing is re-executed (`#| hide` cells are left out, `#| echo: false`
cells show their output only). The front page is the README's text (rendered from `nbs/index.ipynb` by make_readme),
`api/` holds the reference of every exported name (mkdocstrings, from docstrings and signatures, one page per module),
and `explorer/` the attention explorer, whose data the bundled model computes here. MkDocs Material renders it all
into static pages with its own offline search; math is turned into MathML while building, so the pages load nothing
from outside the folder. Serve the result with `python -m http.server -d site` and open http://127.0.0.1:8000.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
ASSETS = Path(__file__).resolve().parent / "site"       # explorer script, stylesheet, explorer page text
MARKER = ".course-site"                                 # marks a folder this script wrote (safe to replace)
EXPLORER_SCENES = [                                     # (scene seed, prompt): held-out seeds, each task format once
    (2_050_000_000, "answer en what color is the triangle?"),
    (2_050_000_001, "detect triangle"),
    (2_050_000_002, "answer en how many shapes are there?"),
    (2_050_000_003, "caption en"),
    (2_050_000_005, "answer en what shapes are red?"),
]
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif"}


def course_notebooks(nbs: Path = NBS) -> list:
    "The course's notebooks `NN_*.ipynb` in order (whatever exist)."
    return sorted(p for p in nbs.glob("[0-9][0-9]_*.ipynb"))


def read_notebook(path: Path) -> dict:
    "A notebook's JSON, with a clear error naming the file when it is not one."
    try: nb = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a notebook (JSON error at line {e.lineno}: {e.msg})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path}: not a notebook (expected a JSON object with a 'cells' list)")
    return nb


def src(cell: dict) -> str: return "".join(cell.get("source", ""))


def directives(code: str) -> dict:
    "The `#| key value` lines at the top of a code cell, as {key: value}."
    out = {}
    for line in code.splitlines():
        m = re.match(r"#\|\s*([\w-]+):?\s*(.*)$", line.strip())
        if not m: break
        out[m[1]] = m[2].strip()
    return out


def notebook_title(nb: dict, path: Path) -> str:
    "The text of the notebook's first `# Title` markdown line."
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            m = re.search(r"^#\s+(.+)$", src(c), flags=re.M)
            if m: return m[1].strip()
    raise ValueError(f"{path}: no '# Title' markdown cell (every course notebook opens with one)")


def default_exp(nb: dict) -> str | None:
    "The module a notebook exports to (its `#| default_exp` cell), or None."
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            d = directives(src(c))
            if "default_exp" in d: return d["default_exp"].split()[0]
    return None


# ---------------------------------------------------------------------------------------------------------------- math
def _mathml(tex: str, display: bool) -> str:
    from latex2mathml.converter import convert
    return convert(tex.strip(), display="block" if display else "inline").replace("\n", " ")


def math_to_mathml(text: str) -> str:
    "Replace $$...$$ and $...$ outside code with MathML (browsers draw it natively: no script, no fonts to fetch)."
    parts = re.split(r"(```.*?```|`[^`\n]*`)", text, flags=re.S)
    for i in range(0, len(parts), 2):                                   # even parts are outside code
        p = re.sub(r"\$\$(.+?)\$\$", lambda m: _mathml(m[1], True), parts[i], flags=re.S)
        parts[i] = re.sub(r"(?<![\\$])\$([^$\n]+?)\$", lambda m: _mathml(m[1], False), p)
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------------ notebooks
def fence(code: str, lang: str) -> str:
    "A fenced code block long enough not to be closed by backticks inside `code`."
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`{3,}", code)), default=0) + 1)
    return f"{ticks}{lang}\n{code.rstrip()}\n{ticks}"


def strip_ansi(text: str) -> str: return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def output_markdown(out: dict, name: str, files: dict) -> str:
    "Markdown for one saved output; figures go into `files` as {relative path: bytes}."
    kind = out.get("output_type")
    if kind == "stream": return fence(strip_ansi("".join(out.get("text", ""))), "text")
    if kind == "error": return fence(strip_ansi("\n".join(out.get("traceback", []))), "text")
    data = out.get("data", {})
    for mime, ext in IMAGE_TYPES.items():
        if mime in data:
            rel = f"{name}_files/output_{len(files)}.{ext}"
            files[rel] = base64.b64decode("".join(data[mime]))
            return f"![output]({rel})"
    if "image/svg+xml" in data:
        rel = f"{name}_files/output_{len(files)}.svg"
        files[rel] = "".join(data["image/svg+xml"]).encode()
        return f"![output]({rel})"
    if "text/markdown" in data: return math_to_mathml("".join(data["text/markdown"]))
    if "text/html" in data: return "".join(data["text/html"])
    if "text/plain" in data: return fence(strip_ansi("".join(data["text/plain"])), "text")
    return ""


def rewrite_links(md: str, extra: dict) -> str:
    "Links of notebook prose made to work in the site: notebooks -> pages, repository files -> copies under files/."
    def fix(m):
        text, target = m[1], m[2]
        if re.match(r"[a-z]+:|#|/", target): return m[0]
        path, _, frag = target.partition("#")
        p = (NBS / path).resolve()
        if p.suffix == ".ipynb" and p.parent == NBS: new = p.stem + ".md"
        elif p.is_relative_to(NBS / "images"): new = "images/" + p.relative_to(NBS / "images").as_posix()
        elif p.is_file() and p.is_relative_to(ROOT):
            rel = p.relative_to(ROOT).as_posix()
            new = "files/" + rel
            extra[new] = p
        else: return m[0]
        return f"[{text}]({new}{'#' + frag if frag else ''})"
    return re.sub(r"\[([^\]]*)\]\(([^)\s]+)\)", fix, md)


def notebook_markdown(path: Path, nb: dict, module: str | None, api_pages: set, files: dict, extra: dict) -> str:
    "One notebook as a Markdown page: prose, code cells and their saved outputs; a link to its module's reference."
    name, parts, titled = path.stem, [], False
    for c in nb["cells"]:
        text = src(c)
        if not text.strip(): continue
        if c["cell_type"] == "markdown":
            parts.append(math_to_mathml(rewrite_links(text, extra)))
            if not titled and re.search(r"^#\s", text, flags=re.M):
                titled = True
                if module in api_pages:
                    parts.append(f"The code of this notebook is exported to `paligemma_edu.{module}`: "
                                 f"[its API reference](api/{module}.md).\n{{: .nb-api }}")
            continue
        if c["cell_type"] != "code": continue
        d = directives(text)
        if "hide" in d: continue
        if d.get("echo") != "false": parts.append(fence(text, "python"))
        outs = [output_markdown(o, name, files) for o in c.get("outputs", [])]
        outs = [o for o in outs if o.strip()]
        if outs: parts.append('<div class="nb-output" markdown>\n\n' + "\n\n".join(outs) + "\n\n</div>")
    return "\n\n".join(parts) + "\n"


def index_markdown(extra: dict, pages: dict) -> str:
    "The front page: the README's text (as make_readme renders it from nbs/index.ipynb), links made to work in the site."
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_readme import HEADER, render
    md = render(NBS / "index.ipynb").removeprefix(HEADER)
    md = md.replace("](nbs/images/", "](images/")
    def fix(m):
        target = m[1]
        if re.match(r"[a-z]+:|#|/", target) or not (ROOT / target).is_file(): return m[0]
        extra["files/" + target] = ROOT / target
        return f"](files/{target})"
    md = re.sub(r"\]\(([^)\s#]+)\)", fix, md)
    for stem in pages:                                                   # the notebook map: names become links
        md = md.replace(f"| `{stem}` |", f"| [`{stem}`]({stem}.md) |")
    return math_to_mathml(md)


# ------------------------------------------------------------------------------------------------------------ explorer
def explorer_data(out_dir: Path, scenes=EXPLORER_SCENES, max_new_tokens: int = 12) -> dict:
    "Answers of the bundled model with their attentions, for the explorer page; scene images written into `out_dir`."
    import torch
    from paligemma_edu.attention import attention_mask_bool
    from paligemma_edu.attention_maps import answer_with_attentions, attention_rollout, text_to_image_attention, token_labels
    from paligemma_edu.bundled import load_bundled_model
    from paligemma_edu.shapes import make_scene
    torch.manual_seed(0)
    model, processor = load_bundled_model()
    model.eval()
    r4 = lambda t: [round(float(v), 4) for v in torch.as_tensor(t).reshape(-1)]
    eos, data = processor.tokenizer.eos_token_id, []
    for k, (seed, prompt) in enumerate(scenes):
        image, _ = make_scene(seed)
        image.save(out_dir / f"scene_{k}.png")
        aa = answer_with_attentions(model, processor, image, prompt, max_new_tokens=max_new_tokens)
        ids = aa.input_ids[0]
        labels = token_labels(processor, ids)
        T = len(ids)
        n_answer = T - aa.prompt_len
        gen = ids[aa.prompt_len:].tolist()
        if eos in gen: n_answer = gen.index(eos)                # tokens after <eos> are not the answer
        L = len(aa.attentions)
        R = attention_rollout(aa.vision_attentions)                                 # (N, N) row-stochastic
        first_text = int(aa.image_positions[-1]) + 1
        tokens = []
        for pos in range(first_text, aa.prompt_len + n_answer):
            answer = pos >= aa.prompt_len
            q = aa.answer_query(pos - aa.prompt_len) if answer else pos            # the query that wrote an answer token
            per_layer = [text_to_image_attention(aa.attentions, q, aa.image_positions, aa.grid, layers=l) for l in range(L)]
            mean = text_to_image_attention(aa.attentions, q, aa.image_positions, aa.grid)
            rollout = mean.reshape(-1) @ R                                          # traced back to the input patches
            tokens.append({"text": labels[pos], "kind": "answer" if answer else "prompt", "position": pos, "query": q,
                           "layers": [r4(m) for m in per_layer], "mean": r4(mean), "rollout": r4(rollout),
                           "image_share": round(float(mean.sum()), 4)})
        keep = aa.prompt_len + n_answer
        tt = aa.token_type_ids[:, :keep]
        mask = attention_mask_bool(torch.ones_like(tt), keep, prefix_mask=tt == 0)[0, 0]  # (T, T) True = may attend
        data.append({"prompt": prompt, "answer": aa.answers[0], "image": f"scene_{k}.png", "seed": seed,
                     "image_size": list(image.size), "tokens": tokens, "prompt_len": aa.prompt_len,
                     "mask": {"labels": ["<image>" if l == "" else l for l in labels[:keep]],
                              "rows": ["".join("1" if v else "0" for v in row) for row in mask.tolist()],
                              "boundaries": [first_text, aa.prompt_len]},
                     "rollout_matrix": [r4(row) for row in R]})
    cfg = model.cfg
    return {"model": "shapes-tiny (bundled)", "grid": list(aa.grid), "layers": L,
            "vision_layers": cfg.vision_config.num_hidden_layers, "scenes": data}


# ----------------------------------------------------------------------------------------------------------------- build
def write_docs(docs: Path, explorer: bool = True) -> dict:
    "Write the Markdown sources of the site into `docs`; returns the nav."
    docs.mkdir(parents=True, exist_ok=True)
    notebooks = course_notebooks()
    if not notebooks: raise FileNotFoundError(f"no course notebooks nbs/NN_*.ipynb under {NBS}")
    nbs = {p.stem: (p, read_notebook(p)) for p in notebooks}
    modules = {stem: default_exp(nb) for stem, (p, nb) in nbs.items()}
    api_pages = {m for m in modules.values() if m and (ROOT / "paligemma_edu" / f"{m}.py").is_file()}
    extra, files, nav_nbs, nav_api = {}, {}, [], []
    shutil.copytree(NBS / "images", docs / "images")
    for stem, (p, nb) in nbs.items():
        title = notebook_title(nb, p)
        (docs / f"{stem}.md").write_text(notebook_markdown(p, nb, modules[stem], api_pages, files, extra), encoding="utf-8")
        nav_nbs.append({html.escape(f"{stem[:2]} {title.replace('`', '')}", quote=False): f"{stem}.md"})
        m = modules[stem]
        if m in api_pages:
            (docs / "api").mkdir(exist_ok=True)
            (docs / "api" / f"{m}.md").write_text(
                f"# paligemma_edu.{m}\n\nBuilt in [{stem}: {title}](../{stem}.md).\n\n::: paligemma_edu.{m}\n", encoding="utf-8")
            nav_api.append({f"{m}": f"api/{m}.md"})
    if nav_api:
        rows = "\n".join(f"| [`paligemma_edu.{m}`]({m}.md) | [{s}](../{s}.md) |" for s, m in modules.items() if m in api_pages)
        intro = "Every exported name of `paligemma_edu`, from its docstring and signature, one page per module in course order."
        (docs / "api" / "index.md").write_text(f"# API reference\n\n{intro}\n\n| module | built in |\n|---|---|\n{rows}\n",
                                               encoding="utf-8")
    (docs / "index.md").write_text(index_markdown(extra, nbs), encoding="utf-8")
    for rel, blob in files.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_bytes(blob)
    todo = list(extra.values())
    while todo:                                  # repository files linked from the pages, and the files they link to
        path = todo.pop()
        target = docs / "files" / path.relative_to(ROOT)
        if target.exists(): continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix != ".md": shutil.copy(path, target); continue
        text = path.read_text(encoding="utf-8")
        target.write_text(math_to_mathml(text), encoding="utf-8")
        for link in re.findall(r"\]\(([^)\s#]+)", text):
            p = (path.parent / link).resolve()
            if not re.match(r"[a-z]+:", link) and p.is_file() and p.is_relative_to(ROOT): todo.append(p)
    (docs / "assets").mkdir(exist_ok=True)
    for f in ("explorer.js", "extra.css"): shutil.copy(ASSETS / f, docs / "assets" / f)
    nav = [{"Home": "index.md"}, {"Notebooks": nav_nbs}]
    if explorer:
        (docs / "explorer").mkdir(exist_ok=True)
        data = explorer_data(docs / "explorer")
        (docs / "explorer" / "attention.json").write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        shutil.copy(ASSETS / "explorer.md", docs / "explorer" / "index.md")
        nav.append({"Attention explorer": "explorer/index.md"})
    if nav_api: nav.append({"API reference": [{"Overview": "api/index.md"}] + nav_api})
    return nav


def build(out, overwrite: bool = False, explorer: bool = True, quiet: bool = True) -> dict:
    "Build the site into folder `out` (replaced only if this script wrote it, or with overwrite); returns facts about it."
    import logging
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    out = Path(out).resolve()
    if out.exists() and not (out / MARKER).is_file() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and was not written by build_site.py: pass --overwrite to replace it")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        docs, site = Path(tmp) / "docs", Path(tmp) / "site"
        nav = write_docs(docs, explorer)
        if quiet: logging.getLogger("mkdocs").setLevel(logging.WARNING)
        cfg = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(docs), site_dir=str(site), nav=nav, strict=True)
        cfg.plugins.on_startup(command="build", dirty=False)
        try: mkdocs_build(cfg)
        finally: cfg.plugins.on_shutdown()
        (site / MARKER).write_text("built by scripts/build_site.py; this folder is replaced on the next build\n")
        old = Path(tmp) / "old"
        if out.exists(): out.replace(old)
        site.replace(out)
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "seconds": round(time.perf_counter() - t0, 1), "pages": pages, "bytes": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "site"), help="folder to build into (default: site/)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out even if this script did not write it")
    ap.add_argument("--no-explorer", action="store_true", help="skip the attention explorer (no model is loaded)")
    a = ap.parse_args(argv)
    import logging
    from mkdocs.exceptions import MkDocsException
    logging.getLogger("mkdocs").addHandler(logging.StreamHandler())
    try: facts = build(a.out, overwrite=a.overwrite, explorer=not a.no_explorer)
    except (FileExistsError, FileNotFoundError, ValueError, MkDocsException) as e: sys.exit(f"build_site.py: {e}")
    print(f"built {facts['out']}: {len(facts['pages'])} pages, {facts['bytes'] / 2**20:.1f} MiB, {facts['seconds']} s")
    print(f"open it: python -m http.server -d {a.out} 8000, then http://127.0.0.1:8000")


if __name__ == "__main__":
    main()
