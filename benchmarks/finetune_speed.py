"""Training-step speed on CPU: ours against transformers (+ peft for LoRA), same weights and batch, in one process.

    python benchmarks/finetune_speed.py [--sizes tiny,mid] [--rounds 5] [--steps 3] [--threads 1] [--batch-size 16]
                                        [--out benchmarks/results/transfer/finetune_speed.json]

For each size ('tiny': the bundled model's weights; 'mid': its tokenizer and 64 px images with a text model 512 wide and
6 layers deep, random weights) the script times one optimizer step (forward with the loss, backward, AdamW step) of
LoRA (rank 16, alpha 32, peft's Gemma targets q/k/v/o/gate/up/down, on both sides) and of full fine-tuning. The
implementations alternate round by round in one process; each round times `--steps` steps after one warm-up step, and
the median step time over the rounds is reported, in wall-clock seconds and in CPU seconds of the process (the latter
is the fairer comparison on a machine shared with other jobs). Peak memory: each (size, implementation, method) runs
once more in a fresh subprocess (`--memory-worker`): after the imports the kernel's peak-RSS mark is reset, and the growth of the
peak (VmHWM) over loading the model and three steps is reported (`--memory-only` redoes just these rows).
"""
from __future__ import annotations
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from transfer import MID  # noqa: E402  (the mid size shared with benchmarks/transfer.py)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    "A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak since the last reset), in MB."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak():
    "Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux: clear_refs 5)."
    Path("/proc/self/clear_refs").write_text("5")


def make_models(size: str, folder: Path):
    "Write the weights of `size` to `folder` (ours, HF layout) and return (processor, folder)."
    from paligemma_edu.bundled import BUNDLED_RECIPE, load_bundled_model
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    from paligemma_edu.train import init_weights, make_tiny_config
    model, processor = load_bundled_model()
    if size == "mid":
        arch = {k: BUNDLED_RECIPE[k] for k in ("image_size", "patch_size", "mlp_ratio")} | MID
        tok = processor.tokenizer
        model = init_weights(PaliGemmaForConditionalGeneration(make_tiny_config(len(tok), tok.image_token_id, **arch)), seed=0)
    model.save_pretrained(folder, processor=processor)
    return processor


def batch_for(processor, batch_size: int) -> dict:
    from paligemma_edu.shapes import ShapesDataset
    from paligemma_edu.train import make_batch
    data = ShapesDataset(batch_size, seed=123_000, tasks=("caption", "detect", "color", "count", "shape"))
    return make_batch(processor, [data[i] for i in range(batch_size)])


def load(impl: str, method: str, folder: Path):
    "(model, step function) of `impl` ('ours' or 'hf') trained by `method` ('lora' or 'full')."
    import torch
    if impl == "ours":
        from paligemma_edu.finetune import set_trainable
        from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
        model = PaliGemmaForConditionalGeneration.from_pretrained(folder)
        set_trainable(model, method, lora_rank=16, lora_alpha=32, lora_targets=TARGETS)
        loss = lambda b: model(**b).loss
    else:
        from transformers import PaliGemmaForConditionalGeneration as HF
        model = HF.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
        loss = lambda b: model(**b).loss
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    def step(b):
        opt.zero_grad(set_to_none=True)
        loss(b).backward()
        opt.step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, step, trainable


def time_steps(step, batch, n: int) -> tuple:
    "(wall seconds, CPU seconds of this process) per step, after a warm-up step."
    step(batch)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n): step(batch)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def memory_worker(size, impl, method, folder, batch_size, threads) -> dict:
    import torch
    import peft  # noqa: F401  both sides import everything first: the baseline holds the same libraries
    import transformers  # noqa: F401
    from paligemma_edu.finetune import set_trainable  # noqa: F401
    from paligemma_edu.processor import PaliGemmaProcessor
    torch.set_num_threads(threads)
    b = batch_for(PaliGemmaProcessor.from_pretrained(folder), batch_size)
    reset_peak()  # the peak of the imports does not count: only what loading and training add
    before = status_mb("VmRSS")
    _, step, _ = load(impl, method, Path(folder))
    for _ in range(3): step(b)
    return dict(size=size, impl=impl, method=method, peak_rss_mb=round(status_mb("VmHWM")),
                delta_mb=round(status_mb("VmHWM") - before))


def memory_rows(size: str, method: str, folder: Path, a) -> list:
    "Peak memory of ours and of transformers for (size, method), each in a fresh subprocess."
    rows = []
    for impl in ("ours", "hf"):
        r = subprocess.run([sys.executable, __file__, "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                            "--memory-worker", size, impl, method, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if r.returncode: raise RuntimeError(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print("   ", rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid"); p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3); p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16); p.add_argument("--methods", default="lora,full")
    p.add_argument("--out", default=str(HERE / "results" / "transfer" / "finetune_speed.json"))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the memory rows, written into an existing --out")
    p.add_argument("--memory-worker", nargs=4, metavar=("SIZE", "IMPL", "METHOD", "FOLDER"))
    a = p.parse_args(argv)
    if a.memory_worker:
        print(json.dumps(memory_worker(*a.memory_worker, a.batch_size, a.threads))); return
    if a.memory_only:
        out = Path(a.out); results = json.loads(out.read_text())
        results["memory"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for size in a.sizes.split(","):
                make_models(size, Path(tmp) / size)
                for method in a.methods.split(","): results["memory"] += memory_rows(size, method, Path(tmp) / size, a)
        results["memory_command"] = "python benchmarks/finetune_speed.py " + " ".join(sys.argv[1:])
        tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(results, indent=1) + "\n"); os.replace(tmp, out)
        return
    import torch
    import transformers
    import peft
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    results = dict(rows=[], memory=[], threads=a.threads, batch_size=a.batch_size, rounds=a.rounds, steps=a.steps,
                   torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                   platform=platform.platform(), load_average_start=list(os.getloadavg()),
                   when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   command="python benchmarks/finetune_speed.py " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            folder = Path(tmp) / size
            processor = make_models(size, folder)
            batch = batch_for(processor, a.batch_size)
            for method in a.methods.split(","):
                impls = {impl: load(impl, method, folder) for impl in ("ours", "hf")}
                times, cpu = {impl: [] for impl in impls}, {impl: [] for impl in impls}
                for r in range(a.rounds):  # alternate, starting side swapped each round
                    for impl in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                        wall, c = time_steps(impls[impl][1], batch, a.steps)
                        times[impl].append(wall); cpu[impl].append(c)
                med = {impl: statistics.median(ts) for impl, ts in times.items()}
                mcpu = {impl: statistics.median(ts) for impl, ts in cpu.items()}
                row = dict(size=size, method=method, ours_s=round(med["ours"], 4), hf_s=round(med["hf"], 4),
                           speedup=round(med["hf"] / med["ours"], 2), ours_cpu_s=round(mcpu["ours"], 4),
                           hf_cpu_s=round(mcpu["hf"], 4), cpu_speedup=round(mcpu["hf"] / mcpu["ours"], 2),
                           trainable_ours=impls["ours"][2], trainable_hf=impls["hf"][2], times=times, cpu_times=cpu)
                results["rows"].append(row)
                print(f"{size:5s} {method:5s} ours {row['ours_s']*1e3:8.1f} ms  HF{'+peft' if method == 'lora' else '     '} "
                      f"{row['hf_s']*1e3:8.1f} ms  x{row['speedup']}  CPU x{row['cpu_speedup']}", flush=True)
                del impls
                if not a.no_memory: results["memory"] += memory_rows(size, method, folder, a)
    results["load_average_end"] = list(os.getloadavg())
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(results, indent=1) + "\n"); os.replace(tmp, out)


if __name__ == "__main__":
    main()
