"""Full fine-tuning on 1 process vs N processes with FSDP2 (torchrun, gloo, CPU): per-process peak memory, step time.

    python benchmarks/distributed.py                       # small, mid, wide configs: plain 1 process, FSDP on 1 and 2
    python benchmarks/distributed.py --configs mid --steps 4

Each run is its own torchrun job (`--standalone`, one thread a process, glibc's mmap threshold fixed at 64 KiB so that
freed tensors leave the resident set). Per process: the resident memory after imports and the processor (the baseline),
then the peak (VmHWM) while the model is built, sharded and trained, minus that baseline; beside it the prediction of
`distributed.fsdp_memory` (fp32, no mixed precision on CPU) for the same parameter groups. The mid config is the
issue's: text hidden 512, 6 layers (vision 256 wide, 6 layers); wide doubles the text width.
Results: benchmarks/results/distributed.json.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "distributed.json"
CONFIGS = {  # make_tiny_config arguments
    "small": dict(vision_width=128, vision_layers=4, vision_heads=2, text_width=256, text_layers=4, text_heads=4, head_dim=64),
    "mid": dict(vision_width=256, vision_layers=6, vision_heads=4, text_width=512, text_layers=6, text_heads=8, head_dim=64),
    "wide": dict(vision_width=256, vision_layers=6, vision_heads=4, text_width=1024, text_layers=6, text_heads=8, head_dim=128),
}
RUNS = (("plain", 1), ("fsdp", 1), ("fsdp", 2))  # (how, processes)


def rss_mb(field: str = "VmRSS") -> float:
    "This process's resident memory (VmRSS) or its peak (VmHWM), MiB."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args):
    "One process of a run: build, (shard,) train `--steps` steps of a global batch of `--batch`; write rank{r}.json."
    import math
    import torch
    from paligemma_edu.bundled import bundled_model_path
    from paligemma_edu.distributed import FSDPRun, fsdp_groups, fsdp_memory
    from paligemma_edu.finetune import OneProcess
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    from paligemma_edu.processor import PaliGemmaProcessor
    from paligemma_edu.shapes import make_example
    from paligemma_edu.train import answer_loss, fit, init_weights, make_batch, make_tiny_config, param_groups
    torch.set_num_threads(1)
    run = FSDPRun(timeout=300, device="cpu") if args.how == "fsdp" else OneProcess()
    processor = PaliGemmaProcessor.from_pretrained(bundled_model_path())
    tok = processor.tokenizer
    items = [dict(zip(("image", "prompt", "answer"), make_example(i, "caption")[:3])) for i in range(args.batch)]
    batch = make_batch(processor, items)
    per = args.batch // run.world
    batch = {k: v[run.rank * per:(run.rank + 1) * per] for k, v in batch.items()}   # this process's slice
    base = rss_mb()
    cfg = make_tiny_config(len(tok), tok.image_token_id, patch_size=64 // math.isqrt(processor.image_seq_length),
                           **CONFIGS[args.config])
    model = init_weights(PaliGemmaForConditionalGeneration(cfg), seed=0)
    groups = fsdp_groups(model)
    model = run.prepare(model)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    times = []

    def loss_fn(micro):
        b = dict(batch)
        labels = b.pop("labels")
        return run.mean_loss(answer_loss(model(**b).logits, labels, per="example"))

    model.train()
    t = time.perf_counter()
    def on_step(step, hist):
        nonlocal t
        times.append(time.perf_counter() - t); t = time.perf_counter()
    hist = fit(opt, loss_fn, args.steps, 1e-4, warmup=0, progress=False, on_step=on_step, log_every=1)
    out = dict(config=args.config, how=args.how, processes=run.world, rank=run.rank, params=groups["total"],
               groups=groups, batch=args.batch, steps=args.steps, baseline_mb=round(base, 1),
               peak_mb=round(rss_mb("VmHWM") - base, 1),
               predicted_state_mb=round(fsdp_memory(groups, run.world if args.how == "fsdp" else 1, 4)["total"] / 2**20, 1),
               step_s=round(sorted(times[1:])[len(times[1:]) // 2], 4), losses=[h["loss"] for h in hist])
    Path(args.out_dir, f"rank{run.rank}.json").write_text(json.dumps(out))
    if args.how == "fsdp": run.close()


def launch(config: str, how: str, n: int, steps: int, batch: int) -> list:
    "One torchrun job; the per-rank records."
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__,
               "--worker", "--config", config, "--how", how, "--steps", str(steps), "--batch", str(batch), "--out-dir", d]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode: raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        return [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,mid,wide")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="global batch (examples per step, split across processes)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--how", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return worker(args)
    rows = []
    for config in args.configs.split(","):
        for how, n in RUNS:
            recs = launch(config, how, n, args.steps, args.batch)
            rows.append(dict(config=config, how=how, processes=n, params=recs[0]["params"], groups=recs[0]["groups"],
                             peak_mb=max(r["peak_mb"] for r in recs), peak_mb_ranks=[r["peak_mb"] for r in recs],
                             baseline_mb=max(r["baseline_mb"] for r in recs), predicted_state_mb=recs[0]["predicted_state_mb"],
                             step_s=max(r["step_s"] for r in recs), losses=recs[0]["losses"]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("groups", "losses")}), flush=True)
    ratios = {}
    for config in args.configs.split(","):
        by = {(r["how"], r["processes"]): r for r in rows if r["config"] == config}
        ratios[config] = dict(peak_2_vs_plain_1=round(by["fsdp", 2]["peak_mb"] / by["plain", 1]["peak_mb"], 3),
                              peak_2_vs_fsdp_1=round(by["fsdp", 2]["peak_mb"] / by["fsdp", 1]["peak_mb"], 3))
    print(json.dumps(ratios))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(command="python benchmarks/distributed.py " + " ".join(sys.argv[1:]), steps=args.steps,
                                   batch=args.batch, threads_per_process=1, rows=rows, ratios=ratios), indent=1) + "\n")
    os.replace(tmp, RESULTS)


if __name__ == "__main__":
    main()
