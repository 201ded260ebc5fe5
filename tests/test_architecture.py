"""The package reads top to bottom: no module imports a later notebook's module, and the methods later notebooks add
to the model classes show their real signatures.

`python tests/test_architecture.py [ROOT]` prints the import graph of ROOT (default: this checkout): each module, its
notebook, the package modules it imports, and the arrows that run back up (to a later notebook)."""
import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "paligemma_edu"
EXEMPT = {"cli"}  # the command line sits on top of everything (22_cli)


def notebook_of_modules(root: Path) -> dict:
    "{module: notebook stem} from the `#| default_exp` cell of every numbered notebook."
    out = {}
    for nb in sorted((root / "nbs").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M)
            if m: out[m.group(1)] = nb.stem; break
    return out


def imported_modules(source: str, modules: set) -> list:
    "[(line, module)] of every package module `source` imports, at any depth (functions included)."
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == PKG: found.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0 and parts[:1] != [PKG]: continue  # another package
            if node.level == 0: parts = parts[1:]
            if parts: found.append((node.lineno, parts[0]))
            else:  # `from . import x` / `from paligemma_edu import x`: x is a module, or a name from the package init
                found += [(node.lineno, a.name if a.name in modules else "__init__") for a in node.names]
    return found


def import_graph(root: Path) -> dict:
    "{module: [(line, imported module)]} for every module of the package (the hand-written `__init__` left out)."
    nbs = notebook_of_modules(root)
    graph = {}
    for f in sorted((root / PKG).glob("*.py")):
        if f.stem in ("__init__", "_modidx"): continue
        graph[f.stem] = sorted(set((ln, m) for ln, m in imported_modules(f.read_text(), set(nbs)) if m != f.stem))
    return graph


def _number(nbs: dict, module: str) -> int:
    return int(nbs[module][:2]) if module in nbs else 10**6  # the package init imports every module: "latest"


def backward_arrows(root: Path) -> list:
    "'file:line: a (NN_x) imports b (MM_y)' for every import of a later notebook's module (cli excepted)."
    nbs, bad = notebook_of_modules(root), []
    for mod, imps in import_graph(root).items():
        if mod in EXEMPT: continue
        for ln, target in imps:
            if _number(nbs, target) > _number(nbs, mod):
                bad.append(f"{PKG}/{mod}.py:{ln}: {mod} ({nbs.get(mod)}) imports {target} ({nbs.get(target, 'the package')})")
    return bad


def format_graph(root: Path) -> str:
    "The import graph as text: `NN module -> MM imported, ...`, arrows to a later notebook marked `!`."
    nbs, lines = notebook_of_modules(root), []
    graph = import_graph(root)
    for mod in sorted(graph, key=lambda m: (_number(nbs, m), m)):
        targets = sorted({t for _, t in graph[mod]}, key=lambda t: (_number(nbs, t), t))
        n = _number(nbs, mod)
        shown = [f"{'!' if _number(nbs, t) > n and mod not in EXEMPT else ''}{nbs.get(t, 'pkg')[:2]} {t}" for t in targets]
        lines.append(f"{nbs.get(mod, '??')[:2]} {mod:<15} -> {', '.join(shown) or '-'}")
    arrows = backward_arrows(root)
    lines += ["", f"{len(arrows)} import(s) of a later notebook's module (!):"] + [f"  {a}" for a in arrows]
    return "\n".join(lines)


# ---- the parser itself (so a blind spot cannot pass silently)

def test_parser_sees_every_import_form():
    src = ("import paligemma_edu.generate\nfrom . import checkpoints\nfrom .quantization import quantize\n"
           "from paligemma_edu.bundled import x\nimport torch\nfrom torch import nn\n"
           "def f():\n    from paligemma_edu.fast_decoding import fast_generate\n"
           "class C:\n    def m(self):\n        from . import lora\n")
    mods = {"generate", "checkpoints", "quantization", "bundled", "fast_decoding", "lora"}
    assert imported_modules(src, mods) == [(1, "generate"), (2, "checkpoints"), (3, "quantization"), (4, "bundled"),
                                           (8, "fast_decoding"), (11, "lora")]


def test_every_module_has_a_notebook():
    nbs = notebook_of_modules(ROOT)
    missing = sorted(f.stem for f in (ROOT / PKG).glob("*.py") if f.stem not in nbs and f.stem not in ("__init__", "_modidx"))
    assert not missing, f"modules that no notebook exports (default_exp): {missing}"


# ---- (a) dependencies run downward

def test_no_module_imports_a_later_notebook():
    bad = backward_arrows(ROOT)
    assert not bad, "modules import a later notebook's module:\n" + "\n".join(bad)


# ---- (b) the methods that later notebooks attach have real signatures

from paligemma_edu.gemma import GemmaConfig, GemmaForCausalLM  # noqa: E402
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration  # noqa: E402

EXPECTED = {"generate": {"input_ids", "pixel_values", "attention_mask", "max_new_tokens", "do_sample", "temperature",
                         "top_k", "top_p", "eos_token_id", "seed", "streamer", "compile"},
            "from_pretrained": {"path", "dtype", "device", "attn_implementation", "quantize"},
            "save_pretrained": {"folder"}}


def _tiny_models():
    text = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=14,
                  patch_size=7)
    return [GemmaForCausalLM(GemmaConfig(**text)),
            PaliGemmaForConditionalGeneration(PaliGemmaConfig(vision_config=vision, text_config=text, vocab_size=32,
                                                              image_token_index=31, projection_dim=16, hidden_size=16))]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attached_methods_show_real_signatures(name):
    for model in _tiny_models():
        cls = type(model)
        for where, method in ((f"{cls.__name__}.{name}", getattr(cls, name)), (f"model.{name}", getattr(model, name))):
            sig = inspect.signature(method)
            kinds = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            assert not kinds, f"{where}{sig} hides its parameters behind {kinds}"
            missing = EXPECTED[name] - set(sig.parameters)
            assert not missing, f"{where}{sig} lacks {sorted(missing)}"
            assert (inspect.getdoc(method) or "").strip(), f"{where} has no docstring"
        bound = inspect.signature(getattr(model, name))
        first = next(iter(bound.parameters))
        assert first not in ("self", "model", "cls"), f"model.{name}{bound}: the object is not bound"


def test_methods_exist_on_a_bare_module_import():
    "`import paligemma_edu.gemma` alone (a fresh process) already sees the methods later notebooks add."
    code = ("import inspect, paligemma_edu.gemma as g, paligemma_edu.paligemma as p\n"
            "for c in (g.GemmaForCausalLM, p.PaliGemmaForConditionalGeneration):\n"
            "    print(*(inspect.signature(getattr(c, n)) for n in ('generate', 'from_pretrained', 'save_pretrained')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for word in ("max_new_tokens", "compile", "quantize", "folder"): assert r.stdout.count(word) == 2, r.stdout


if __name__ == "__main__":
    print(format_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
