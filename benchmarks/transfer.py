"""Transfer on the bundled model: a new task (which shape is at the top?) taught by each fine-tuning method, and the memory of a
training step predicted by `transfer.step_memory` against the peak RSS measured on CPU.

    python benchmarks/transfer.py data --data DIR [--n-train 4000] [--replay 0.25]
    python benchmarks/transfer.py base --data DIR [--n-old 100] [--threads 1]
    python benchmarks/transfer.py run --data DIR --method lora [--rank 16] [--steps 200] [--lr 1e-3] [--batch-size 32]
                                      [--threads 1] [--n-old 100] [--quantize int4] [--name NAME]
    python benchmarks/transfer.py memory [--sizes tiny,mid] [--threads 1]
    python benchmarks/transfer.py memory-3b [--folder /tmp/pg3b-bf16] [--configs ours-lora,ours-qlora,hf-lora] [--rounds 1]
                                           [--steps 2] [--threads 2]

Results are written as JSON to benchmarks/results/transfer/ (`--results` elsewhere): base.json (the bundled model on the
new task and on its own tasks), NAME.json per run (new-task accuracy before and after, the change of each old task,
trainable parameters, minutes, CPU minutes, peak RSS), memory.json, memory_3b.json. `run` trains with
`finetune.finetune` (the library's one training loop) in this process and measures the peak RSS of this process;
`memory` runs each configuration in a fresh subprocess.

`memory-3b`: paligemma-3b-pt-224 shapes (tests/fixtures/configs/paligemma-3b-pt-224.json) with random bfloat16 weights,
written once to --folder (~5.9 GB, reused if present), batch 1 at 224 px (256 image tokens, 12 text tokens, labels on the
4-token suffix), gradient checkpointing, LoRA rank 16 on peft's Gemma targets: ours in bfloat16, ours quantized to int4
while loading (QLoRA), and transformers + peft on the same folder (`-all-logits`: ours with the LM head at every
position, as before `finetune.logits_needed`); each configuration in a fresh subprocess, its peak RSS
(ru_maxrss: file pages of the memory-mapped weights count as they are read) and its growth over the loaded model, and
the wall and CPU seconds of each of --steps AdamW steps through `train.fit` (the loop `finetune` uses).
"""
from __future__ import annotations
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "transfer"
# A mid-size model of the bundled model's kind: text hidden 512, 6 layers (the finetune_speed benchmark's mid size too)
MID = dict(vision_width=256, vision_layers=6, vision_heads=4, text_width=512, text_layers=6, text_heads=8, kv_heads=1,
           head_dim=64)


def cpu_seconds() -> float:
    "CPU time of this process and its finished children."
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def peak_rss_mb() -> float:
    "Peak resident memory of this process (ru_maxrss is in kB on Linux)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    return dict(platform=platform.platform(), cpu_count=os.cpu_count(), load_average=list(os.getloadavg()),
                python=platform.python_version(), when=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n"); os.replace(tmp, path)


def new_task_accuracy(model, processor, val_file) -> dict:
    "Exact match of greedy answers on the held-out JSONL of the new task."
    from paligemma_edu.finetune import predict, read_jsonl
    records = read_jsonl(val_file)
    preds = predict(model, processor, records, batch_size=100, max_new_tokens=8)
    return dict(exact=sum(p.strip() == r["answer"] for p, r in zip(preds, records)) / len(records), n=len(records),
                examples=[dict(prompt=r["prompt"], answer=r["answer"], prediction=p) for r, p in zip(records[:5], preds)])


def old_tasks(model, processor, n: int) -> dict:
    "The bundled model's own evaluation (its held-out scenes, every task, segment with its codec) at n per task."
    from paligemma_edu.bundled import bundled_model_path
    from paligemma_edu.segmentation import load_codec
    from paligemma_edu.shapes import evaluate_model
    return evaluate_model(model, processor, n_per_task=n, codec=load_codec(bundled_model_path()))


def cmd_data(a):
    from paligemma_edu.transfer import write_position_data
    t0 = time.perf_counter()
    files = write_position_data(a.data, n_train=a.n_train, n_val=a.n_val, replay=a.replay, overwrite=a.overwrite)
    print(f"wrote {files['train']} and {files['val']} in {time.perf_counter() - t0:.0f} s")


def cmd_base(a):
    import torch
    from paligemma_edu.bundled import bundled_model_path, load_bundled_model
    torch.set_num_threads(a.threads)
    model, processor = load_bundled_model()
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = dict(new_task=new_task_accuracy(model, processor, Path(a.data) / "val.jsonl"),
               old_tasks=old_tasks(model, processor, a.n_old), n_old=a.n_old,
               eval_json=json.loads((bundled_model_path() / "eval.json").read_text())["metrics"],
               eval_minutes=round((time.perf_counter() - t0) / 60, 2), eval_cpu_minutes=round((cpu_seconds() - c0) / 60, 2),
               threads=a.threads, machine=machine(), command="python benchmarks/transfer.py " + " ".join(sys.argv[1:]))
    write_json(Path(a.results) / "base.json", out)
    print(json.dumps({k: out[k] for k in ("new_task", "old_tasks")}, indent=1)[:3000])


def old_change(old: dict, base: dict) -> dict:
    "Points of change of each old task's headline metric (exact match; hit@0.5 for detect, mask IoU for segment)."
    key = lambda t: {"detect": "hit@0.5", "segment": "mask_iou"}.get(t, "exact")
    return {t: round(100 * (old[t][key(t)] - base[t][key(t)]), 1) for t in base if t in old}


def llm_targets() -> list:
    "The default LoRA targets of the bundled model's language model only, as the module paths peft matches."
    from paligemma_edu.bundled import BUNDLED_RECIPE
    from paligemma_edu.lora import LORA_TARGETS
    part = lambda t: ("self_attn." if t[0] in "qkvo" else "mlp.") + t
    return [f"language_model.layers.{i}.{part(t)}" for i in range(BUNDLED_RECIPE["text_layers"]) for t in LORA_TARGETS]


def cmd_run(a):
    import torch
    from paligemma_edu.finetune import FinetuneSettings, finetune
    from paligemma_edu.lora import load_adapted
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    from paligemma_edu.processor import PaliGemmaProcessor
    torch.set_num_threads(a.threads)
    name = a.name or (a.method + (f"-{a.quantize}" if a.quantize else ""))
    out_dir = Path(a.out or tempfile.mkdtemp(prefix=f"transfer-{name}-"))
    s = FinetuneSettings(train=str(Path(a.data) / "train.jsonl"), method=a.method, lora_rank=a.rank,
                         lora_alpha=2.0 * a.rank, quantize=a.quantize, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                         seed=a.seed, workers=0, lora_targets=llm_targets() if a.targets == "llm" else None,
                         gradient_checkpointing=a.gradient_checkpointing, print_every=25)
    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = finetune(s, out_dir, overwrite=True, progress=False)
    minutes, cpu_minutes, peak = (time.perf_counter() - t0) / 60, (cpu_seconds() - c0) / 60, peak_rss_mb()
    if a.method == "lora": model, processor = load_adapted(out_dir, quantize=a.quantize)
    else: model, processor = (PaliGemmaForConditionalGeneration.from_pretrained(out_dir),
                              PaliGemmaProcessor.from_pretrained(out_dir))
    new = new_task_accuracy(model, processor, Path(a.data) / "val.jsonl")
    old = old_tasks(model, processor, a.n_old)
    base = json.loads((Path(a.results) / "base.json").read_text())  # written by `base` (which may run alongside)
    if base["n_old"] != a.n_old: raise ValueError(f"base.json has n_old {base['n_old']}, this run {a.n_old}")
    log = summary["log"]
    out = dict(name=name, method=a.method, quantize=a.quantize, rank=a.rank if a.method == "lora" else None,
               targets=a.targets,
               alpha=2.0 * a.rank if a.method == "lora" else None, steps=a.steps, lr=summary["lr"], batch_size=a.batch_size,
               gradient_checkpointing=a.gradient_checkpointing, trainable_params=summary["trainable_params"],
               total_params=summary["total_params"], train_minutes=round(minutes, 2), train_cpu_minutes=round(cpu_minutes, 2),
               peak_rss_mb=round(peak), threads=a.threads, new_task_before=base["new_task"]["exact"],
               new_task_after=new["exact"], n_new=new["n"], examples=new["examples"], old_tasks=old,
               old_change_points=old_change(old, base["old_tasks"]), n_old=base["n_old"],
               loss_first=log[0]["loss"], loss_last=log[-1]["loss"], machine=machine(),
               command="python benchmarks/transfer.py " + " ".join(sys.argv[1:]))
    write_json(Path(a.results) / f"{name}.json", out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("examples", "old_tasks", "machine")}, indent=1))


# ------------------------------------------------------------------------------------------------- memory
def size_config(size: str, processor):
    "The bundled model's architecture ('tiny') or the mid size, for the bundled tokenizer and 64 px images."
    from paligemma_edu.bundled import BUNDLED_RECIPE
    from paligemma_edu.train import make_tiny_config
    arch = {k: BUNDLED_RECIPE[k] for k in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                                           "text_width", "text_layers", "text_heads", "kv_heads", "head_dim", "mlp_ratio")}
    if size == "mid": arch |= MID
    tok = processor.tokenizer
    return make_tiny_config(len(tok), tok.image_token_id, **arch)


def memory_worker(size: str, method: str, gc: bool, batch_size: int, threads: int) -> dict:
    "Peak RSS of two training steps of `method` on random weights of `size` (run in a fresh process), and the prediction."
    import torch
    from paligemma_edu.bundled import load_bundled_model
    from paligemma_edu.finetune import set_trainable
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    from paligemma_edu.quantization import quantize
    from paligemma_edu.shapes import make_example
    from paligemma_edu.train import answer_loss, init_weights, make_batch, make_tiny_config
    from paligemma_edu.transfer import step_memory
    torch.set_num_threads(threads)
    _, processor = load_bundled_model()
    cfg = size_config(size, processor)
    items = [dict(zip(("image", "prompt", "answer", "scene"), make_example(10_000 + i))) for i in range(batch_size)]
    batch = make_batch(processor, items)
    labels = batch.pop("labels")

    def steps(cfg, n, b):
        model = init_weights(PaliGemmaForConditionalGeneration(cfg), seed=0)
        if method == "qlora": quantize(model, bits=4)
        set_trainable(model, "lora" if method == "qlora" else method, lora_rank=16, lora_alpha=32)
        if gc: model.gradient_checkpointing_enable()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model.train()
        for _ in range(n):
            loss = answer_loss(model(**b).logits, labels[:len(b["input_ids"])], per="example")
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    # warm-up on a minute model of the same kind: libraries and kernels that load on first use are not counted
    tok = processor.tokenizer
    small = make_tiny_config(len(tok), tok.image_token_id, patch_size=16, vision_width=32, vision_layers=1, vision_heads=1,
                             text_width=32, text_layers=1, text_heads=2, head_dim=16)
    steps(small, 2, {k: v[:1] for k, v in batch.items()})
    before = peak_rss_mb()
    steps(cfg, 2, batch)
    measured = peak_rss_mb() - before
    text_tokens = batch["input_ids"].shape[1] - cfg.num_image_tokens
    pred = step_memory(cfg, None, method, batch_size, torch.float32, gc, text_tokens=text_tokens, lora_rank=16)
    return dict(size=size, method=method, gradient_checkpointing=gc, batch_size=batch_size, measured_mb=round(measured, 1),
                predicted_mb=round(pred["total"] / 2**20, 1), predicted=pred, ratio=round(measured / (pred["total"] / 2**20), 2),
                baseline_rss_mb=round(before))


def cmd_memory(a):
    rows = []
    for size in a.sizes.split(","):
        for method in ("full", "freeze-vision", "attention-only", "lora", "qlora"):
            for gc in (False, True):
                r = subprocess.run([sys.executable, __file__, "memory-worker", "--size", size, "--method", method,
                                    "--batch-size", str(a.batch_size), "--threads", str(a.threads)] + (["--gc"] if gc else []),
                                   capture_output=True, text=True, cwd=ROOT)
                if r.returncode: raise RuntimeError(f"memory worker {size} {method} failed:\n{r.stderr[-3000:]}")
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(rows[-1]["size"], rows[-1]["method"], "gc" if gc else "  ", rows[-1]["measured_mb"],
                      rows[-1]["predicted_mb"], rows[-1]["ratio"], flush=True)
    write_json(Path(a.results) / "memory.json", dict(rows=rows, float32=True, lora_rank=16, machine=machine(),
                                                      command="python benchmarks/transfer.py " + " ".join(sys.argv[1:])))


# ------------------------------------------------------------------------------------------------- memory at 3B
CONFIG_3B = ROOT / "tests" / "fixtures" / "configs" / "paligemma-3b-pt-224.json"
FOLDER_3B = "/tmp/pg3b-bf16"
CONFIGS_3B = ("ours-lora", "ours-qlora", "hf-lora", "ours-lora-all-logits", "ours-qlora-all-logits")
PREFIX_TOKENS, SUFFIX_TOKENS = 7, 4   # bos + 6 words | "\n" ... : 12 text tokens after the 256 image tokens


def status_mb(field: str) -> float:
    "A memory field of /proc/self/status (VmRSS: resident now; VmHWM: its peak), in MB."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    raise KeyError(field)


def batch_3b(cfg: dict) -> dict:
    """A processor-shaped batch of 1: <image> x 256, bos, 6 prefix words, "\n", 3 suffix words, eos; token_type_ids 1 and
    labels on the suffix (with eos), -100 elsewhere; pixels in [-1, 1], bfloat16."""
    import torch
    g = torch.Generator().manual_seed(0)
    v = cfg["vision_config"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    words = lambda n: torch.randint(3, cfg["image_token_index"], (n,), generator=g).tolist()
    prefix = [cfg["image_token_index"]] * n_img + [2] + words(PREFIX_TOKENS - 1) + [108]   # 108: "\n" in Gemma's vocabulary
    suffix = words(SUFFIX_TOKENS - 1) + [1]                                                  # answer + eos
    ids = torch.tensor([prefix + suffix])                                                    # (1, T)
    tt = torch.tensor([[0] * len(prefix) + [1] * len(suffix)])
    labels = torch.where(tt == 1, ids, -100)
    pix = torch.rand(1, 3, v["image_size"], v["image_size"], generator=g).mul(2).sub(1).bfloat16()
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=tt, pixel_values=pix, labels=labels)


def memory_3b_worker(config: str, folder: str, steps: int, threads: int) -> dict:
    """One 3B configuration in this (fresh) process: load, LoRA rank 16, gradient checkpointing, `steps` AdamW steps
    through `train.fit`; RSS after the imports and after loading, the peak over all of it, and each step's seconds."""
    import torch
    import peft  # noqa: F401  (every configuration imports the same libraries before its baseline)
    import transformers
    from paligemma_edu.finetune import enable_gradient_checkpointing, finetune_loss, set_trainable
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    from paligemma_edu.train import answer_loss, fit, param_groups
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    batch = batch_3b(cfg)
    labels = batch.pop("labels")
    rss_imports = status_mb("VmRSS")
    t0, c0 = time.perf_counter(), cpu_seconds()
    if config.startswith("ours"):
        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                                  quantize="int4" if "qlora" in config else None)
        set_trainable(model, "lora", lora_rank=16, lora_alpha=32)
        enable_gradient_checkpointing(model)
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
        if config.endswith("all-logits"):   # the loss as `finetune` computed it before `logits_needed`: every position
            loss_fn = lambda micro: answer_loss(model(**batch).logits, labels, per="example")
        else: loss_fn = lambda micro: finetune_loss(model, batch, labels)   # as `finetune` computes it
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import PaliGemmaForConditionalGeneration as HF
        from paligemma_edu.lora import LORA_TARGETS
        model = HF.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        loss_fn = lambda micro: model(**batch, labels=labels).loss
    load_s, load_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    rss_loaded, hwm_loaded = status_mb("VmRSS"), status_mb("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    marks = [(time.perf_counter(), cpu_seconds())]
    model.train()
    hist = fit(opt, loss_fn, steps, 1e-4, warmup=0, clip=1.0, log_every=1, progress=False,
               on_step=lambda step, h: marks.append((time.perf_counter(), cpu_seconds())))
    peak = peak_rss_mb()
    return dict(config=config, threads=threads, steps=steps, trainable_params=trainable, tokens=int(batch["input_ids"].shape[1]),
                load_s=round(load_s, 1), load_cpu_s=round(load_cpu_s, 1), rss_after_imports_mb=round(rss_imports),
                rss_loaded_mb=round(rss_loaded), peak_loading_mb=round(hwm_loaded), peak_rss_mb=round(peak),
                growth_over_loaded_mb=round(peak - rss_loaded),
                step_s=[round(b[0] - a[0], 1) for a, b in zip(marks, marks[1:])],
                step_cpu_s=[round(b[1] - a[1], 1) for a, b in zip(marks, marks[1:])],
                losses=[round(r["loss"], 4) for r in hist], torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__)


def cmd_memory_3b(a):
    import torch
    from paligemma_edu.paligemma import PaliGemmaConfig
    from paligemma_edu.transfer import step_memory
    sys.path.insert(0, str(HERE))
    from quantization import write_random_bf16   # the benchmarks' writer of random bf16 checkpoints
    folder = Path(a.folder)
    cfg = json.loads(CONFIG_3B.read_text())
    if not (folder / "model.safetensors").exists():
        t0 = time.perf_counter()
        print(f"writing random bf16 weights to {folder} ...", flush=True)
        write_random_bf16(cfg, folder)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    out_path = Path(a.results) / "memory_3b.json"
    res = json.loads(out_path.read_text()) if a.keep and out_path.exists() else dict(runs=[])
    configs, command = a.configs.split(","), "python benchmarks/transfer.py " + " ".join(sys.argv[1:])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    for r in range(a.rounds):   # one heavy process at a time; the order alternates round by round
        for config in (configs if r % 2 == 0 else configs[::-1]):
            p = subprocess.run([sys.executable, __file__, "memory-3b-worker", "--config", config, "--folder", str(folder),
                                "--steps", str(a.steps), "--threads", str(a.threads)],
                               capture_output=True, text=True, cwd=ROOT, env=env)
            if p.returncode: raise RuntimeError(f"memory-3b worker {config} failed:\n{p.stderr[-3000:]}")
            row = json.loads(p.stdout.strip().splitlines()[-1]) | dict(round=r, load_average=list(os.getloadavg()),
                                                                       command=command)
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
    pc = PaliGemmaConfig.from_dict(json.loads((folder / "config.json").read_text()))   # the weights' own config
    text_tokens = PREFIX_TOKENS + 1 + SUFFIX_TOKENS
    res["predicted_gb"] = {m: round(step_memory(pc, None, m, 1, torch.bfloat16, True, text_tokens=text_tokens,
                                                lora_rank=16)["total"] / 1e9, 2) for m in ("lora", "qlora")}
    res |= dict(targets_gb=dict(lora=8.0, qlora=4.0), config=str(CONFIG_3B.relative_to(ROOT)), folder=str(folder),
                folder_gb=round((folder / "model.safetensors").stat().st_size / 1e9, 2), batch_size=1, image_size=224,
                text_tokens=text_tokens, lora_rank=16, lora_alpha=32, gradient_checkpointing=True, dtype="bfloat16",
                machine=machine(), command=command)
    write_json(out_path, res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("data", "base", "run", "memory", "memory-worker", "memory-3b", "memory-3b-worker"):
        q = sub.add_parser(name)
        q.add_argument("--results", default=str(RESULTS))
        q.add_argument("--threads", type=int, default=2)
        if name in ("data", "base", "run"): q.add_argument("--data", required=True)
    sub.choices["data"].add_argument("--n-train", type=int, default=4000)
    sub.choices["data"].add_argument("--n-val", type=int, default=500)
    sub.choices["data"].add_argument("--replay", type=float, default=0.25)
    sub.choices["data"].add_argument("--overwrite", action="store_true")
    for name in ("base", "run"): sub.choices[name].add_argument("--n-old", type=int, default=100)
    r = sub.choices["run"]
    r.add_argument("--method", required=True, choices=("full", "freeze-vision", "attention-only", "lora"))
    r.add_argument("--quantize", choices=("int8", "int4"))
    r.add_argument("--rank", type=int, default=16)
    r.add_argument("--targets", choices=("llm",), help="llm: the default targets in the language model only (not SigLIP's q/k/v)")
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--lr", type=float)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.add_argument("--name"); r.add_argument("--out")
    sub.choices["memory"].add_argument("--sizes", default="tiny,mid")
    sub.choices["memory"].add_argument("--batch-size", type=int, default=16)
    w = sub.choices["memory-worker"]
    w.add_argument("--size"); w.add_argument("--method"); w.add_argument("--gc", action="store_true")
    w.add_argument("--batch-size", type=int, default=16)
    m = sub.choices["memory-3b"]
    m.add_argument("--folder", default=FOLDER_3B, help="the random bf16 checkpoint (written if absent)")
    m.add_argument("--configs", default="ours-lora,ours-qlora,hf-lora")
    m.add_argument("--rounds", type=int, default=1); m.add_argument("--steps", type=int, default=2)
    m.add_argument("--keep", action="store_true", help="add the runs to those already in memory_3b.json")
    w3 = sub.choices["memory-3b-worker"]
    w3.add_argument("--config", choices=CONFIGS_3B); w3.add_argument("--folder", default=FOLDER_3B)
    w3.add_argument("--steps", type=int, default=2)
    a = p.parse_args(argv)
    if a.cmd == "memory-3b-worker":
        print(json.dumps(memory_3b_worker(a.config, a.folder, a.steps, a.threads)))
        return
    if a.cmd == "memory-worker":
        print(json.dumps(memory_worker(a.size, a.method, a.gc, a.batch_size, a.threads)))
        return
    dict(data=cmd_data, base=cmd_base, run=cmd_run, memory=cmd_memory, **{"memory-3b": cmd_memory_3b})[a.cmd](a)


if __name__ == "__main__":
    main()
