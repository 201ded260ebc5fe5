"""The compile cache: compiled decode steps are kept in a folder the user can see (PALIGEMMA_EDU_CACHE or
~/.cache/paligemma_edu/inductor), and a second process reuses them instead of compiling again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import json, os
from paligemma_edu.bundled import load_bundled_model
from paligemma_edu.fast_decoding import StaticDecoder, compile_cache_dir
model, _ = load_bundled_model()
StaticDecoder(model, 1, 64, "static")  # no compiler, no cache folder
static = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
StaticDecoder(model, 1, 64, "inductor")  # torch.compile is lazy: nothing is compiled here
print(json.dumps(dict(static=static, inductor=os.environ.get("TORCHINDUCTOR_CACHE_DIR"), dir=str(compile_cache_dir()))))
"""

GENERATE = """
import json
from torch._dynamo.utils import counters
from paligemma_edu.bundled import load_bundled_model
from paligemma_edu.shapes import make_scene
model, processor = load_bundled_model()
inp = processor(images=[make_scene(3)[0]], text=["caption en"])
args = [inp[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")]
out = model.generate(*args, max_new_tokens=4, compile=True)
print(json.dumps(dict(tokens=out.tolist(), hits=counters["inductor"]["fxgraph_cache_hit"],
                      aot_hits=counters["aot_autograd"]["autograd_cache_hit"])))
"""


def run(code, env):
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | env
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=env | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_compiled_modes_use_the_visible_cache_folder(tmp_path):
    got = run(BUILD, {"PALIGEMMA_EDU_CACHE": str(tmp_path)})
    assert got["static"] is None and got["inductor"] == got["dir"] == str(tmp_path / "inductor")


def test_compile_cache_folder_defaults_and_overrides(tmp_path, monkeypatch):
    from paligemma_edu.fast_decoding import compile_cache_dir, use_compile_cache
    monkeypatch.delenv("PALIGEMMA_EDU_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert compile_cache_dir() == Path.home() / ".cache" / "paligemma_edu" / "inductor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "paligemma_edu" / "inductor"
    monkeypatch.setenv("PALIGEMMA_EDU_CACHE", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert use_compile_cache() == tmp_path / "chosen"  # a folder the user chose is left alone
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "chosen")


@pytest.mark.slow
def test_second_process_reuses_the_compiled_step(tmp_path):
    "First process: compiles and fills the folder. Second: finds the graph in it (cache hits), same tokens."
    env = {"PALIGEMMA_EDU_CACHE": str(tmp_path)}
    first = run(GENERATE, env)
    files = [p for p in (tmp_path / "inductor").rglob("*") if p.is_file()]
    assert first["hits"] == 0 and len(files) > 5, (first, len(files))
    second = run(GENERATE, env)
    assert second["hits"] >= 1 and second["aot_hits"] >= 1, second
    assert second["tokens"] == first["tokens"]
