"""Shared pieces live in one room each: the attention kernel before both models, the `<loc>` helpers and their one
constant with the vocabulary, the shapes world's seeds and scoring in `shapes` (not in the training loop), one AdamW
builder, and module docstrings that nbdev does not cut."""
import ast
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

import paligemma_edu
from paligemma_edu import attention_kernels, core, processor, segmentation, shapes, siglip

generate = importlib.import_module("paligemma_edu.generate")  # the module (the package's `generate` is its function)

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "paligemma_edu"
MODULES = sorted(p for p in PKG.glob("*.py") if p.stem not in ("__init__", "_modidx"))


def imports_of(module: str) -> set:
    "The package modules `module` imports (relative or absolute, at any depth)."
    out = set()
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if node.level == 1: out.add(parts[0])
            elif parts[0] == "paligemma_edu" and len(parts) > 1: out.add(parts[1])
    return out


def assignments(name_re: str) -> list:
    "[(module, name)] of every module-level assignment whose target matches `name_re`."
    found = []
    for f in MODULES:
        for node in ast.parse(f.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                for n in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(n, ast.Name) and re.fullmatch(name_re, n.id): found.append((f.stem, n.id))
    return found


def test_attention_kernel_lives_before_both_models():
    assert siglip.dot_product_attention is attention_kernels.dot_product_attention  # the old path still works
    assert siglip.soft_cap is attention_kernels.soft_cap
    for mod in ("attention", "gemma", "paligemma2", "big_vision"):
        assert "siglip" not in imports_of(mod), f"{mod} imports the vision tower's file"
    assert assignments(r"soft_cap|dot_product_attention") == []  # functions, defined once (in attention_kernels)


def test_loc_helpers_and_their_constant_live_with_the_vocabulary():
    assert processor.LOC_BINS == len(processor.LOC_TOKENS) == 1024
    assert [m for m, _ in assignments(r"LOC_BINS")] == ["processor"]
    for name in ("LOC_BINS", "image_hw", "loc_tokens", "parse_detections", "draw_boxes"):
        assert getattr(generate, name) is getattr(processor, name)  # re-exported where users imported them from
    assert paligemma_edu.parse_detections is processor.parse_detections
    for mod in ("segmentation", "attention_maps"):
        assert "generate" not in imports_of(mod), f"{mod} reads boxes through the decoding module"
    assert shapes.loc_tokens is segmentation.loc_tokens is processor.loc_tokens


def test_training_loop_is_free_of_the_shapes_world():
    assert "shapes" not in imports_of("train")
    assert "train" not in imports_of("shapes")
    assert "bundled" not in imports_of("segmentation")


def test_mask_codec_is_free_of_the_shapes_world():
    "The codec knows masks, boxes and text; the shapes world's recipe and scoring of it live with the bundled model."
    assert "shapes" not in imports_of("segmentation")
    for name in ("codec_masks", "pasted_iou", "train_mask_codec", "CODEC_RECIPE", "segment_answer", "Scene"):
        assert not hasattr(segmentation, name), name
    assert "scene" not in inspect.signature(segmentation.MaskCodec.segment_answer).parameters
    defined = [f.stem for f in MODULES for node in ast.parse(f.read_text()).body
               if isinstance(node, ast.FunctionDef) and node.name == "mask_iou"]
    assert defined == ["core"], defined  # one definition, before both its users
    assert shapes.mask_iou is segmentation.mask_iou is core.mask_iou


def test_seeds_are_named_once():
    named = assignments(r"[A-Z_]*SEED")
    assert named and {m for m, _ in named} == {"shapes"}, named
    starts = [getattr(shapes, n) for _, n in named]
    assert starts == sorted(set(starts)), "seed ranges start in the order they are written, each once"


def test_one_adamw_builder():
    uses = [f.stem for f in MODULES if "torch.optim.AdamW(" in f.read_text()]
    assert uses == ["train"], uses


@pytest.mark.parametrize("nb", sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_module_docstring_is_the_whole_summary(nb):
    "nbdev keeps only the first `> ` line of the summary as the module docstring: that line must be a whole sentence."
    cells = json.loads(nb.read_text())["cells"]
    lines = "".join(cells[0]["source"]).splitlines()
    quote = [i for i, line in enumerate(lines) if line.startswith("> ")]
    assert quote, f"{nb.name}: no `> ` summary line"
    first = quote[0]
    assert lines[first].rstrip().endswith("."), f"{nb.name}: the summary line does not end a sentence"
    after = lines[first + 1] if first + 1 < len(lines) else ""
    assert not after.startswith("> "), f"{nb.name}: the summary continues on a second `> ` line, which nbdev drops"
