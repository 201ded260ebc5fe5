"""Every notebook runs top to bottom as Jupyter runs it: all cells in order, in a fresh kernel, no nbdev flag honoured.

This is the test command's notebook run (it replaces `nbdev_test`): `jupyter nbconvert --execute` starts a kernel in
`nbs/` per notebook, as "Run All" does, and runs every cell, `#| slow` and `#| gpu` ones included. Those guard
themselves: a slow cell runs only when PALIGEMMA_EDU_SLOW=1 (removed here), a GPU cell only where CUDA is available,
so on a CPU machine they say they were skipped. Notebooks run two at a time (each in its own kernel process); the
executed copies go to a temporary folder, never over the committed notebooks. Marker: `notebooks`
(`-m "not notebooks"` leaves them out).
"""
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
WORKERS = max(1, min(2, os.cpu_count() or 1))
pytestmark = pytest.mark.notebooks


def execute(nb: Path, out_dir: Path) -> dict:
    "Run one notebook as Jupyter does (nbconvert --execute, a fresh kernel started in nbs/); its status and seconds."
    env = {k: v for k, v in os.environ.items() if k != "PALIGEMMA_EDU_SLOW"}
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--output-dir", str(out_dir),
           "--ExecutePreprocessor.timeout=900", str(nb)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=nb.parent, env=env, capture_output=True, text=True)
    log = re.sub(r"\x1b\[[0-9;]*m", "", r.stderr)  # the traceback without its terminal colours
    return dict(ok=r.returncode == 0, seconds=round(time.perf_counter() - t0, 1), log=log[-6000:])


@pytest.fixture(scope="session")
def notebook_runs(request, tmp_path_factory) -> dict:
    "The selected notebooks, executed WORKERS at a time; {name: result}, and the timings in the terminal summary."
    wanted = [item.callspec.params["nb"] for item in request.session.items
              if getattr(item, "callspec", None) and "nb" in item.callspec.params and item.module.__name__ == __name__]
    out = tmp_path_factory.mktemp("executed")
    with ThreadPoolExecutor(WORKERS) as pool:
        runs = dict(zip(wanted, pool.map(lambda name: execute(ROOT / "nbs" / name, out), wanted)))
    (out / "timings.json").write_text(json.dumps({k: v["seconds"] for k, v in runs.items()}, indent=1))
    return runs


@pytest.mark.parametrize("nb", [p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(nb, notebook_runs):
    run = notebook_runs[nb]
    assert run["ok"], f"{nb} stopped ({run['seconds']} s):\n{run['log']}"


def test_slow_and_gpu_cells_guard_themselves():
    "A cell flagged slow or gpu starts its work behind its own check, so Run All on a CPU does not start it."
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text())["cells"]:
            lines = "".join(cell["source"]).splitlines()
            if cell["cell_type"] != "code" or not lines: continue
            flags = {w for l in lines if l.startswith("#|") for w in l[2:].split()}
            body = [l for l in lines if l.strip() and not l.startswith("#")]
            guarded = lambda check: any(l.startswith(check) for l in body[:2])
            if "slow" in flags: assert guarded("if SLOW"), f"{nb.name}: a slow cell without `if SLOW:`:\n{lines[:3]}"
            if "gpu" in flags:
                assert guarded("if torch.cuda.is_available()"), f"{nb.name}: a gpu cell without a CUDA check:\n{lines[:3]}"
