"""Compare training recipes for the bundled shapes model, several at once, one process per recipe.

    python scripts/recipe_sweep.py --measure                     # CPU seconds per step of each variant (2 threads)
    python scripts/recipe_sweep.py --device cuda --out DIR       # train every variant in parallel on one GPU
    python scripts/recipe_sweep.py --only base,lr1e3 --device cpu --scale 0.01 --out DIR   # a quick smoke run
    python scripts/recipe_sweep.py --only seg,seg3 --sequential --threads 2 --steps 2000 --out DIR  # one at a time

Each variant is `START` (the recipe the comparison began from) plus its own overrides, applied on top of
`BUNDLED_RECIPE`. Step counts are chosen so that every variant costs about the
same on 2 CPU cores (the budget of the bundled recipe), so the comparison is between recipes a CPU user can actually
run; a GPU only makes the comparison quicker. Every process logs its held-out accuracy as it goes and ends with a
greedy evaluation on `--n` held-out scenes per task; DIR/summary.md and DIR/summary.json collect what finished.
On a shared CPU, `--sequential` trains the variants one after another (each on `--threads` threads), and `--steps`
gives every variant the same number of answer steps (the vision stage and the codec keep theirs).
"""
from __future__ import annotations
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

P8S = dict(patch_size=8, text_width=128, text_layers=3, text_heads=4, head_dim=32)
# The recipe the comparison started from (before the shape question existed; it gets weight 0 here). Every variant
# is this plus its own overrides, so the names keep their meaning whatever BUNDLED_RECIPE becomes.
# The segment task came later still: it has weight 0 in every variant before round 5.
START = dict(lr=2e-3, task_weights={"caption": 1.0, "detect": 1.5, "color": 1.0, "count": 1.0, "shape": 0.0, "segment": 0.0},
             steps=6000, vision_pretrain_steps=0, vision_lr_mult=1.0, projector_lr_mult=None)
W3 = {"caption": 1.0, "detect": 3.0, "color": 1.0, "count": 1.0, "shape": 0.0, "segment": 0.0}
# Round 5 onwards: the recipe of round 4 (`pretrained_proj1`), with the segment task
PRE = dict(lr=1e-3, steps=5000, vision_pretrain_steps=1000, vision_lr_mult=0.1, projector_lr_mult=1.0)
W4 = {"caption": 1.5, "detect": 2.0, "color": 1.5, "count": 0.5, "shape": 1.5, "segment": 0.0}
VARIANTS = {
    "base": {},
    "lr1e3": dict(lr=1e-3),
    "lr5e4": dict(lr=5e-4),
    "bs16": dict(batch_size=16, steps=12000),
    "vlr3": dict(vision_lr_mult=3.0),
    "det3": dict(task_weights=W3),
    "lr1e3_det3": dict(lr=1e-3, task_weights=W3),
    "lr1e3_det3_shape": dict(lr=1e-3, task_weights=W3 | {"shape": 1.5}),  # the bundled recipe before pretraining
    "pretrained": dict(PRE, projector_lr_mult=None, task_weights=W4),
    "pretrained_proj1": dict(PRE, task_weights=W4),  # the bundled recipe of round 4
    "pretrained_cap": dict(PRE, projector_lr_mult=None,
                           task_weights=W4 | {"caption": 2.5, "color": 1.0, "shape": 2.0}),
    "pretrained_cap_det3": dict(PRE, projector_lr_mult=None,
                                task_weights=W4 | {"caption": 2.5, "detect": 3.0, "color": 1.0, "shape": 2.0}),
    "vbig": dict(vision_width=192, vision_layers=6, vision_heads=3, text_width=128, text_layers=3, head_dim=32, steps=5000),
    "p8s": dict(P8S, steps=4500),
    "p8s_lr1e3": dict(P8S, steps=4500, lr=1e-3),
    "p8s_vlr3": dict(P8S, steps=4500, vision_lr_mult=3.0),
    "p8s_bs16": dict(P8S, steps=9000, batch_size=16),
    # round 5: how much segment, and whether its boxes can stand in for some of detection's
    "seg": dict(PRE, task_weights=W4 | {"segment": 1.5}),
    "seg3": dict(PRE, task_weights=W4 | {"segment": 3.0}),
    "seg_det1": dict(PRE, task_weights=W4 | {"detect": 1.0, "segment": 2.5}),
}
VARIANTS = {k: START | v for k, v in VARIANTS.items()}


def measure(names, steps=12):
    "CPU seconds per training step (data included) of each variant, 2 threads; a vision pretraining stage is not counted."
    import torch
    from paligemma_edu.bundled import BUNDLED_RECIPE, train_bundled_model
    torch.set_num_threads(2)
    for n in names:
        with tempfile.TemporaryDirectory() as d:
            r = {k: v for k, v in VARIANTS[n].items() if k != "steps"} | {"vision_pretrain_steps": 0,
                                                                           "codec": {"steps": 2, "n_scenes": 20}}
            _, _, h = train_bundled_model(d, steps=steps, recipe=r, eval_every=10**9, progress=False, eval_per_task=0)
            t = (h[-1]["time"] - h[0]["time"]) / (h[-1]["step"] - h[0]["step"])
            st = (BUNDLED_RECIPE | VARIANTS[n])["steps"]
            print(f"{n:10s} {t * 1e3:6.0f} ms/step  x {st} steps = {t * st / 60:5.1f} min", flush=True)


def one(name, out, device, scale, n_eval, deadline, threads=1, answer_steps=None):
    "Train one variant (stopping early at the wall-clock deadline) and write out/name.json."
    import torch
    from paligemma_edu import bundled as T
    from paligemma_edu.segmentation import load_codec
    from paligemma_edu.shapes import evaluate_model
    torch.set_num_threads(threads)
    r = T.BUNDLED_RECIPE | VARIANTS[name]
    steps = answer_steps or max(2, int(r["steps"] * scale))
    recipe = VARIANTS[name] | ({"vision_pretrain_steps": max(1, int(r["vision_pretrain_steps"] * scale))}
                               if r["vision_pretrain_steps"] else {})
    hist, t0 = [], time.perf_counter()

    class Stop(Exception): pass

    def log(rec):
        hist.append(rec)
        if "eval_loss" in rec:  # keep what is known so far on disk, in case the run is cut short
            (Path(out) / f"{name}.json").write_text(json.dumps(dict(name=name, recipe=VARIANTS[name], steps=steps,
                                                    finished=False, history=hist, seconds=time.perf_counter() - t0)))
            acc = {k: round(v, 2) for k, v in rec.items() if k.startswith(("acc_", "hit_", "iou_"))}
            print(f"[{name}] step {rec['step']} loss {rec['loss']:.3f} eval {rec['eval_loss']:.3f} {acc}", flush=True)
        if time.time() > deadline: raise Stop

    res = dict(name=name, recipe=VARIANTS[name], steps=steps, finished=False, history=hist, threads=threads,
               load_average_start=os.getloadavg()[0])
    with tempfile.TemporaryDirectory() as d:
        try:
            model, processor, _ = T.train_bundled_model(Path(d) / "m", steps=steps, recipe=recipe, progress=False,
                                                        on_log=log, eval_every=max(1, steps // 10), device=device,
                                                        eval_per_task=0)
        except Stop:  # cut short: only the logged history is reported
            pass
        else:
            info = json.loads((Path(d) / "m" / "history.json").read_text())
            res.update(finished=True, train_minutes=info["train_minutes"], load_average_end=os.getloadavg()[0],
                       metrics=evaluate_model(model.to(device), processor, n_eval, codec=load_codec(Path(d) / "m")))
    res["seconds"] = time.perf_counter() - t0
    (Path(out) / f"{name}.json").write_text(json.dumps(res))
    print(f"[{name}] done in {res['seconds']:.0f} s", flush=True)


def summarise(out):
    "Collect DIR/*.json (one per variant) into DIR/summary.md and DIR/summary.json."
    rows = []
    for f in sorted(Path(out).glob("*.json")):
        if f.name == "summary.json": continue
        r = json.loads(f.read_text())
        last = next((h for h in reversed(r["history"]) if "eval_loss" in h), {})
        scores = {t: m["exact"] for t, m in r.get("metrics", {}).items()}
        if "detect" in r.get("metrics", {}):
            scores |= {"det_hit": r["metrics"]["detect"]["hit@0.5"], "det_iou": r["metrics"]["detect"]["mean_iou"]}
        if "segment" in r.get("metrics", {}):
            m = r["metrics"]["segment"]
            scores |= {"seg_mask_iou": m["mask_iou"], "seg_hit": m["hit@0.5"], "seg_absent": m["absent_acc"],
                       "seg_invalid": m["invalid"]}
            scores.pop("segment")
        rows.append(dict(name=r["name"], steps=r["steps"], finished=r["finished"], seconds=round(r["seconds"]),
                         train_minutes=r.get("train_minutes"),
                         scores=scores, last_step=last.get("step"), last_eval_loss=last.get("eval_loss"),
                         history=r["history"]))
    cols = sorted({k for r in rows for k in r["scores"]})
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    row = lambda cells: "| " + " | ".join(cells) + " |"
    lines = [row(["variant", "steps", "finished", "s", "train min", *cols, "last eval loss"]), row(["---"] * (len(cols) + 6))]
    lines += [row([r["name"], str(r["steps"]), str(r["finished"]), str(r["seconds"]), fmt(r["train_minutes"]),
                   *(fmt(r["scores"].get(c)) for c in cols), fmt(r["last_eval_loss"])]) for r in rows]
    (Path(out) / "summary.md").write_text("\n".join(lines) + "\n")
    (Path(out) / "summary.json").write_text(json.dumps(rows))
    print("\n".join(lines), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--measure", action="store_true", help="print CPU seconds per step of each variant and exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every variant's steps (smoke runs)")
    ap.add_argument("--n", type=int, default=200, help="held-out scenes per task in the final evaluation")
    ap.add_argument("--seconds", type=float, default=3600, help="wall-clock budget; runs stop and report at the end")
    ap.add_argument("--out", default="sweep_out")
    ap.add_argument("--summarise", action="store_true", help="only rebuild DIR/summary.* from the per-variant files")
    ap.add_argument("--sequential", action="store_true", help="train the variants one after another, not in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    ap.add_argument("--steps", type=int, default=None, help="answer steps of every variant (default: each its own)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad: ap.error(f"unknown variants {bad}; expected among {list(VARIANTS)}")
    if a.measure: return measure(names)
    if a.summarise: return summarise(a.out)
    if a.one: return one(a.one, a.out, a.device, a.scale, a.n, a.deadline, a.threads, a.steps)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.seconds
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    cmd = lambda n: [sys.executable, __file__, "--one", n, "--out", a.out, "--device", a.device, "--scale", str(a.scale),
                     "--n", str(a.n), "--deadline", str(deadline), "--threads", str(a.threads)] + \
        (["--steps", str(a.steps)] if a.steps else [])
    if a.sequential:
        for n in names: subprocess.run(cmd(n), env=env, check=False)
    else:
        procs = [subprocess.Popen(cmd(n), env=env) for n in names]
        for p in procs: p.wait()
    summarise(a.out)


if __name__ == "__main__":
    sys.exit(main())
