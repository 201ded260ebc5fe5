"""Weight-only int8 / int4 quantization: accuracy, kernels, and memory and speed at PaliGemma-3B size.

    python benchmarks/quantization.py --accuracy            # bundled model: float / int8 / int4, 500 scenes per task
    python benchmarks/quantization.py --tiny                # tiny random transformers checkpoint: logits error, greedy tokens
    python benchmarks/quantization.py --kernels             # one 16384x2048 matrix times 1 and 264 rows, every format
    python benchmarks/quantization.py --full [--rounds 3]   # paligemma-3b shapes, random bf16 weights: memory and speed
    python benchmarks/quantization.py --report-only --out D # rewrite D/quantization.md from D/quantization.json
    python benchmarks/quantization.py --quick               # all of it on tiny shapes, in seconds (the test suite runs it)

Full size: random weights are written once, in bfloat16, to --folder (default /tmp/pg3b-bf16, ~5.9 GB; reused if
present), and quantized once while loading (int8 and int4), which also measures that path; the quantized models are
saved next to it and reused. Memory: each configuration in its own process (peak resident memory is per process).
Speed: this machine is shared, and with 2 threads every parallel op waits whenever another process holds the other
core, so timings from separate processes minutes apart are not comparable; instead one process holds transformers'
bf16 model and one of ours and alternates between them (prefill by prefill, generation by generation, the order
rotating), and the ratios of each round are reported (median over rounds), at --threads threads and at 1 thread.
Each run of a section replaces that section of quantization.json and keeps the others. Results go to a new folder,
benchmarks/runs/<UTC date and time>, unless --out names one: the committed results are updated only by
`--out benchmarks/results`.
"""
from __future__ import annotations
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (the shared benchmark helpers: configs, inputs, timed generation, RSS)

NEW_TOKENS = 32
TARGETS = dict(rss_int4_gb=2.5, decode_int4_x=1.5, decode_int8_x=1.3, prefill_slowdown=1.2, acc_int8=0.02, acc_int4=0.05)


# ----------------------------------------------------------------------------------------------------- helpers
def peak_rss_gb() -> float:
    "Peak resident memory of this process so far (VmHWM), GB."
    return bench.current_rss_mb("VmHWM") * 2**20 / 1e9


def write_random_bf16(cfg: dict, folder: Path, seed: int = 0):
    "A checkpoint folder of random bfloat16 weights (published names), written tensor by tensor in blocks of rows."
    import torch
    from paligemma_edu.checkpoints import HEAD, to_published_key
    from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    pc = PaliGemmaConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"): m = PaliGemmaForConditionalGeneration(pc)
    shapes = {to_published_key(k): tuple(v.shape) for k, v in m.state_dict().items() if k != HEAD}
    header, off = {}, 0
    for k, s in shapes.items():
        n = 2 * max(1, int(torch.tensor(s).prod()))
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}; off += n
    raw = json.dumps(header).encode(); raw += b" " * (-len(raw) % 8)
    tmp = folder.with_name(folder.name + ".tmp"); tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with open(tmp / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little")); f.write(raw)
        for k, s in shapes.items():
            rows = s[0] if s else 1
            step = max(1, (1 << 24) // max(1, int(torch.tensor(s[1:]).prod())))
            for i in range(0, rows, step):
                shape = (min(step, rows - i), *s[1:])
                if "norm" in k and len(s) == 1: t = torch.randn(shape, generator=g) * 0.1 + (1.0 if "vision" in k else 0.0)
                else: t = torch.randn(shape, generator=g) * 0.02
                f.write(t.bfloat16().view(torch.int16).numpy().tobytes())
    (tmp / "config.json").write_text(json.dumps(pc.to_dict(), indent=2))
    os.replace(tmp, folder)


def spawn(args, **kw) -> dict:
    "Run one worker in a fresh interpreter with --threads threads; return its JSON (last stdout line)."
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads)]
    for k, v in kw.items(): cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode: raise RuntimeError(f"worker {kw} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- worker
def worker(a) -> dict:
    """One configuration in this process: load, prefill (median of --reps after a warm-up), one batch-1 generation of
    --new-tokens tokens; peak resident memory over all of it. --save: write the quantized model afterwards."""
    import torch
    torch.set_num_threads(a.threads)
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    import paligemma_edu.checkpoints  # noqa: F401  (modules loaded before the baseline, as transformers below)
    import paligemma_edu.generate  # noqa: F401
    if a.impl.startswith("hf"):
        import transformers  # noqa: F401  (imported before the baseline, like ours)
    base = peak_rss_gb()
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    t0 = time.perf_counter()
    if a.impl.startswith("hf"): model = bench.load(a.impl, a.model, torch.bfloat16)
    else:
        model = PaliGemmaForConditionalGeneration.from_pretrained(a.model, dtype="bfloat16",
                                                                  quantize=None if a.quantize == "none" else a.quantize)
    load_s = time.perf_counter() - t0
    impl = "ours" if not a.impl.startswith("hf") else a.impl
    inp = bench.make_inputs(cfg, 1, torch.bfloat16)
    pre, pre_all = bench.med_time(lambda: bench.prefill(impl, model, inp), a.reps)
    ttft, total, _ = bench.timed_generate(impl, model, inp, a.new_tokens)
    out = dict(impl=a.impl, load_s=load_s, base_rss_gb=base, prefill_s=pre, prefill_all=pre_all, ttft_s=ttft,
               decode_tok_s=(a.new_tokens - 1) / (total - ttft), peak_rss_gb=peak_rss_gb())
    if a.save:
        model.save_pretrained(a.save)
        out["saved_gb"] = (Path(a.save) / "model.safetensors").stat().st_size / 1e9
    return out


def worker_paired(a) -> dict:
    """transformers bf16 (eager, then sdpa, on one model) and ours (--quantize, from --model) in one process, alternating:
    --reps rounds of prefills, then --reps rounds of --new-tokens greedy tokens at batch 1 (order rotating each round)."""
    import torch
    torch.set_num_threads(a.threads)
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    cfg = json.loads((Path(a.folder) / "config.json").read_text())
    hf = bench.load("hf_eager", a.folder, torch.bfloat16)
    ours = PaliGemmaForConditionalGeneration.from_pretrained(a.model, dtype="bfloat16")
    inp = bench.make_inputs(cfg, 1, torch.bfloat16)
    def use(name):
        if name.startswith("hf"): hf.set_attn_implementation(name[3:])
        return ("ours", ours) if name == "ours" else ("hf", hf)
    names = ["hf_eager", "hf_sdpa", "ours"]
    pre, dec = {n: [] for n in names}, {n: [] for n in names}
    for n in names:  # warm-up
        impl, m = use(n); bench.prefill(impl, m, inp); bench.timed_generate(impl, m, inp, 2)
    for r in range(a.reps):
        for n in names[r % 3:] + names[:r % 3]:
            impl, m = use(n); t0 = time.perf_counter(); bench.prefill(impl, m, inp); pre[n].append(time.perf_counter() - t0)
    for r in range(a.reps):
        for n in names[r % 3:] + names[:r % 3]:
            impl, m = use(n); ttft, total, _ = bench.timed_generate(impl, m, inp, a.new_tokens)
            dec[n].append((a.new_tokens - 1) / (total - ttft))
    return dict(ours=a.quantize, threads=a.threads, prefill_s=pre, decode_tok_s=dec,
                decode_x=[dec["ours"][r] / max(dec["hf_eager"][r], dec["hf_sdpa"][r]) for r in range(a.reps)],
                prefill_x=[pre["ours"][r] / min(pre["hf_eager"][r], pre["hf_sdpa"][r]) for r in range(a.reps)])


# ----------------------------------------------------------------------------------------------------- sections
def run_accuracy(a) -> dict:
    "Bundled model, float32 activations: float, int8, int4 on every task of the held-out set."
    import copy
    import torch
    from paligemma_edu.quantization import quantize
    from paligemma_edu.bundled import load_bundled_model, load_mask_codec
    from paligemma_edu.shapes import evaluate_model
    torch.set_num_threads(a.threads)
    model, processor = load_bundled_model()
    codec = load_mask_codec()
    n = 5 if a.quick else a.n
    res, secs = {}, {}
    for name, bits in (("float", None), ("int8", 8), ("int4", 4)):
        m = model if bits is None else quantize(copy.deepcopy(model), bits)
        t0 = time.perf_counter()
        res[name] = evaluate_model(m, processor, n_per_task=n, codec=codec)
        secs[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: {secs[name]} s", flush=True)
    metric = {"detect": ("hit@0.5", "boxes found, IoU >= 0.5"), "segment": ("mask_iou", "mean mask IoU")}
    table = {f"{t} ({metric.get(t, ('exact', 'exact match'))[1]})":
             {k: res[k][t][metric.get(t, ('exact',))[0]] for k in res} for t in res["float"]}
    return dict(n_per_task=n, table=table, metrics=res, seconds=secs, activations="float32",
                command="python benchmarks/quantization.py --accuracy" + (" --quick" if a.quick else ""))


def run_tiny(a) -> dict:
    "A tiny random transformers PaliGemma (float32): ours in float / int8 / int4 against it, logits and greedy tokens."
    import tempfile
    import torch
    import transformers
    from transformers import PaliGemmaForConditionalGeneration as HF, PaliGemmaConfig as HFConfig
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    cfg = dict(vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=28, patch_size=7, vision_use_head=False),
               text_config=dict(model_type="gemma", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128),
               image_token_index=511, vocab_size=512, projection_dim=128, hidden_size=128)
    n_new, rows = (8, []) if a.quick else (NEW_TOKENS, [])
    for seed in range(2 if a.quick else 5):
        torch.manual_seed(seed)
        hf = HF(HFConfig(**cfg, attn_implementation="eager")).eval()
        hf.generation_config.eos_token_id = None
        g = torch.Generator().manual_seed(100 + seed)
        ids = torch.cat([torch.full((4, 16), 511), torch.randint(3, 500, (4, 6), generator=g)], 1)
        inp = dict(input_ids=ids, pixel_values=torch.randn(4, 3, 28, 28, generator=g), attention_mask=torch.ones_like(ids),
                   token_type_ids=torch.zeros_like(ids))
        with tempfile.TemporaryDirectory() as d, torch.no_grad():
            hf.save_pretrained(d)
            ref = hf(**inp).logits
            ref_tok = hf.generate(**inp, max_new_tokens=n_new, do_sample=False)[:, ids.shape[1]:]
            for q in (None, "int8", "int4"):
                m = PaliGemmaForConditionalGeneration.from_pretrained(d, quantize=q)
                z = m(**inp).logits
                tok = m.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                                 max_new_tokens=n_new, eos_token_id=[])[:, ids.shape[1]:]
                first = [(r != s).nonzero()[0].item() if (r != s).any() else n_new for r, s in zip(tok, ref_tok)]
                err = ((z - ref).abs().max() / ref.abs().max()).item()
                rows.append(dict(seed=seed, weights=q or "float32", rel_logits_err=err,
                                 last_argmax_equal=(z[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).float().mean().item(),
                                 tokens_equal=(tok == ref_tok).float().mean().item(),
                                 tokens_before_first_difference=statistics.mean(first)))
    summary = {}
    for w in ("float32", "int8", "int4"):
        rs = [r for r in rows if r["weights"] == w]
        summary[w] = {k: statistics.median(r[k] for r in rs) for k in ("rel_logits_err", "last_argmax_equal", "tokens_equal",
                                                                      "tokens_before_first_difference")}
    return dict(config=cfg, rows=rows, summary=summary, new_tokens=n_new, batch=4,
                command="python benchmarks/quantization.py --tiny" + (" --quick" if a.quick else ""))


def run_kernels(a) -> dict:
    "One N x K matrix times M rows of activations in every format (interleaved, median of repetitions), at --threads and 1."
    import torch
    from paligemma_edu.quantization import QuantLinear, Workspace
    N, K = (1024, 512) if a.quick else (16384, 2048)
    lin = torch.nn.Linear(K, N, bias=False)
    layers = {"float32": lin, "bfloat16": torch.nn.Linear(K, N, bias=False).bfloat16(),
              "int8": QuantLinear.from_linear(lin, 8, workspace=Workspace()).bfloat16(),  # as in a model: one reused buffer
              "int4": QuantLinear.from_linear(lin, 4).bfloat16()}
    out = {}
    for threads in dict.fromkeys([a.threads, 1]):
        torch.set_num_threads(threads)
        for M in (1, 264):
            xs = {k: torch.randn(M, K, dtype=torch.float32 if k == "float32" else torch.bfloat16) for k in layers}
            times = {k: [] for k in layers}
            with torch.inference_mode():
                for r in range(3 if a.quick else 9):  # formats interleaved, repetition by repetition
                    for k, l in layers.items():
                        if r == 0: l(xs[k])
                        t0 = time.perf_counter(); l(xs[k]); times[k].append(time.perf_counter() - t0)
            out[f"{threads} threads, M={M}"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return dict(shape=[N, K], ms=out, group_size=64, activations="bfloat16 (float32 for the float32 column)")


def run_full(a, folder: Path, cfg: dict) -> dict:
    "Memory of every configuration (each in its own process), then paired speed runs (see the module docstring)."
    if not (folder / "model.safetensors").exists():
        t0 = time.perf_counter()
        print(f"writing random bf16 weights to {folder} ...", flush=True)
        write_random_bf16(cfg, folder)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    new, reps = (4, 1) if a.quick else (NEW_TOKENS, 2)
    stem = folder.name[:-len("bf16")] if folder.name.endswith("bf16") else folder.name + "-"
    qdirs = {q: folder.with_name(stem + q) for q in ("int8", "int4")}
    onload = {}
    for q, d in qdirs.items():  # quantize while loading the bf16 folder, generate, save (reused by the runs below)
        onload[q] = spawn(a, impl=f"ours_{q}_onload", model=folder, quantize=q, reps=1, new_tokens=new, save=d)
        o = onload[q]
        print(f"  {q} quantized while loading: {o['load_s']:.1f} s, peak RSS {o['peak_rss_gb']:.2f} GB", flush=True)
    mem_impls = {"ours_bf16": folder, "ours_int8": qdirs["int8"], "ours_int4": qdirs["int4"]}
    if not a.quick: mem_impls |= {"hf_eager": folder, "hf_sdpa": folder}
    memory = {}
    for k, d in mem_impls.items():
        memory[k] = spawn(a, impl=k, model=d, quantize="none", reps=reps, new_tokens=new)
        print(f"  {k}: peak RSS {memory[k]['peak_rss_gb']:.2f} GB, load {memory[k]['load_s']:.1f} s", flush=True)
    paired = {}
    for threads in [a.threads] if a.quick else dict.fromkeys([a.threads, 1]):
        configs = [("bf16", folder), ("int8", qdirs["int8"]), ("int4", qdirs["int4"])]
        for q, d in configs[2:] if a.quick else configs:
            a2 = argparse.Namespace(**{**vars(a), "threads": threads})
            r = paired[f"{q}@{threads}"] = spawn(a2, impl="paired", model=d, folder=folder, quantize=q, reps=a.rounds,
                                                 new_tokens=new if a.quick else 16)
            print(f"  paired {q}, {threads} threads: decode x {[round(x, 2) for x in r['decode_x']]}, "
                  f"prefill x {[round(x, 2) for x in r['prefill_x']]}", flush=True)
    return dict(config=cfg.get("_source", "custom"), folder=str(folder), rounds=a.rounds, new_tokens=new, onload=onload,
                paired_new_tokens=new if a.quick else 16,
                memory=memory, paired=paired, quantized_gb={q: onload[q]["saved_gb"] for q in onload},
                bf16_gb=(folder / "model.safetensors").stat().st_size / 1e9)


# ----------------------------------------------------------------------------------------------------- report
def _med(xs): return statistics.median(xs)


def full_table(f: dict) -> str:
    "Markdown tables of the full-size section: memory per process, then the paired speed ratios (all from the results)."
    m, o = f["memory"], f["onload"]
    L = ["| configuration | weights on disk (GB) | peak RSS, load + generate (GB) | load (s) |", "|---|---|---|---|"]
    for k in ("hf_eager", "hf_sdpa"):
        if k in m:
            L.append(f"| transformers bf16 ({k[3:]}) | {f['bf16_gb']:.2f} | {m[k]['peak_rss_gb']:.2f} | {m[k]['load_s']:.1f} |")
    b = m["ours_bf16"]
    L.append(f"| ours bf16 (memory-mapped) | {f['bf16_gb']:.2f} | {b['peak_rss_gb']:.2f} | {b['load_s']:.1f} |")
    for q in ("int8", "int4"):
        L.append(f"| ours {q}, saved quantized checkpoint | {f['quantized_gb'][q]:.2f} | {m[f'ours_{q}']['peak_rss_gb']:.2f} | "
                 f"{m[f'ours_{q}']['load_s']:.1f} |")
        L.append(f"| ours {q}, quantized while loading the bf16 checkpoint | {f['bf16_gb']:.2f} | {o[q]['peak_rss_gb']:.2f} | "
                 f"{o[q]['load_s']:.1f} |")
    if not f["paired"]: return "\n".join(L)
    L += ["", "| ours | threads | decode b1 tok/s: ours / HF eager / HF sdpa | decode: ours / faster HF | "
          "prefill s: ours / HF eager / HF sdpa | prefill: ours / faster HF | prefill: ours / ours bf16 |",
          "|---|---|---|---|---|---|---|"]
    for key, r in f["paired"].items():
        q, th = key.split("@")
        d, p = r["decode_tok_s"], r["prefill_s"]
        base = f["paired"].get(f"bf16@{th}")
        vs_bf16 = f"{_med(r['prefill_x']) / _med(base['prefill_x']):.2f}x" if base else "n/a"
        L.append(f"| {q} | {th} | {_med(d['ours']):.2f} / {_med(d['hf_eager']):.2f} / {_med(d['hf_sdpa']):.2f} | "
                 f"**{_med(r['decode_x']):.2f}x** ({min(r['decode_x']):.2f}-{max(r['decode_x']):.2f}) | "
                 f"{_med(p['ours']):.2f} / {_med(p['hf_eager']):.2f} / {_med(p['hf_sdpa']):.2f} | "
                 f"{_med(r['prefill_x']):.2f}x ({min(r['prefill_x']):.2f}-{max(r['prefill_x']):.2f}) | {vs_bf16} |")
    return "\n".join(L)


def _paired_runs(res: dict) -> list:
    "(label, paired results) of the full-size runs kept, oldest first: the one before (when kept) and the latest."
    runs = [res["full_previous"]] if res.get("full_previous") else []
    runs += [res["full"]] if res.get("full", {}).get("paired") else []
    return [(f"{'AB'[i] if len(runs) == 2 else 'A'} ({r['date'][-9:]})", r["paired"]) for i, r in enumerate(runs)]


def targets_table(res: dict) -> str:
    "Each target and the measured value, in every full-size run kept and at every thread count."
    L = ["| target | measured | met? |", "|---|---|---|"]
    yes = lambda ok: "**yes**" if ok else "no"
    runs = [(d, p) for d, p in _paired_runs(res) if all(f"{q}@1" in p for q in ("bf16", "int8", "int4"))]
    if runs:
        f, th = res["full"], res["threads"]
        rss4 = max(f["onload"]["int4"]["peak_rss_gb"], f["memory"]["ours_int4"]["peak_rss_gb"])
        on_load, saved = f["onload"]["int4"]["peak_rss_gb"], f["memory"]["ours_int4"]["peak_rss_gb"]
        L.append(f"| full size: peak RSS over load + generation, int4 <= {TARGETS['rss_int4_gb']} GB | {rss4:.2f} GB (quantized "
                 f"while loading: {on_load:.2f}; saved int4: {saved:.2f}) | {yes(rss4 <= TARGETS['rss_int4_gb'])} |")
        def row(name, fn, ok):
            vals = {(d, t): fn(p, t) for d, p in runs for t in (th, 1)}
            text = "; ".join(f"run {d}: " + " / ".join(f"{vals[d, t]:.2f}x" for t in (th, 1)) for d, _ in runs)
            bad = [f"run {d[0]}, {t} thread{'s' if t != 1 else ''}" for (d, t), v in vals.items() if not ok(v)]
            met = ("**yes**" if not bad else "no" if len(bad) == len(vals) else
                   f"in {len(vals) - len(bad)} of {len(vals)} (not: {', '.join(bad)})")
            L.append(f"| {name} | {text} ({th} threads / 1 thread) | {met} |")
        for q, tgt in (("int4", TARGETS["decode_int4_x"]), ("int8", TARGETS["decode_int8_x"])):
            row(f"full size: decode batch 1, {q} >= {tgt}x transformers bf16 (its faster path)",
                lambda p, t: _med(p[f"{q}@{t}"]["decode_x"]), lambda v: v >= tgt)
        for q in ("int8", "int4"):
            row(f"full size: prefill, {q} at most {TARGETS['prefill_slowdown']:.1f}x ours bf16",
                lambda p, t: _med(p[f"{q}@{t}"]["prefill_x"]) / _med(p[f"bf16@{t}"]["prefill_x"]),
                lambda v: v <= TARGETS["prefill_slowdown"])
    acc = res.get("accuracy")
    if acc:
        d8, d4 = (round(min(r[q] - r["float"] for r in acc["table"].values()), 4) + 0.0 for q in ("int8", "int4"))
        L += [f"| bundled model, every task within {TARGETS['acc_int8']:.0%} of float in int8 | worst {d8:+.1%} | "
              f"{yes(d8 >= -TARGETS['acc_int8'])} |",
              f"| bundled model, every task within {TARGETS['acc_int4']:.0%} of float in int4 | worst {d4:+.1%} | "
              f"{yes(d4 >= -TARGETS['acc_int4'])} |"]
    return "\n".join(L)


def write_report(out: Path, res: dict) -> Path:
    L = ["# Quantization benchmark results", "", f"Machine: {res.get('machine', {})}", ""]
    if "full" in res:
        f = res["full"]
        title = "Quick run, tiny shapes" if f["new_tokens"] < NEW_TOKENS else "Full size"
        L += [f"## {title} ({f['config']}), random bf16 weights", "",
              f"Memory: each configuration in its own process, {res['threads']} threads, loading then prefill and "
              f"{f['new_tokens']} "
              f"greedy tokens at batch 1. Speed: paired runs (one process holds transformers' bf16 model and one of ours and "
              f"alternates, order rotating), {f['rounds']} rounds of prefills and of {f['paired_new_tokens']}-token generations; "
              f"ratio columns: median "
              f"over rounds (min-max). Load during the run: {f.get('load_note', 'n/a')}.", "", f["table_md"], ""]
        if "full_previous" in res:
            pv = res["full_previous"]
            L += [f"Speed in the run before, run A ({pv['date']}; {pv['load_note']}); the tables above are run B:", "",
                  pv["table_md"].split("\n\n")[-1], ""]
    if "accuracy" in res:
        acc = res["accuracy"]
        L += [f"## Bundled model, {acc['n_per_task']} held-out scenes per task (`{acc['command']}`)", "",
              "| task (metric) | float | int8 | int4 |", "|---|---|---|---|"]
        for t, r in acc["table"].items():
            d8, d4 = (round(r[q] - r["float"], 4) + 0.0 for q in ("int8", "int4"))  # + 0.0: no "-0.0%"
            L.append(f"| {t} | {r['float']:.1%} | {r['int8']:.1%} ({d8:+.1%}) | {r['int4']:.1%} ({d4:+.1%}) |")
        L.append("")
    if "tiny" in res:
        t = res["tiny"]
        L += [f"## Tiny random transformers checkpoint (`{t['command']}`)", "",
              f"Medians over {len(t['rows']) // 3} random models; batch {t['batch']}, {t['new_tokens']} greedy tokens.", "",
              "| weights | max abs logits error / max abs logit | last-position argmax equal | greedy tokens equal "
              "| tokens before the first difference |",
              "|---|---|---|---|---|"]
        for w, s in t["summary"].items():
            L.append(f"| {w} | {s['rel_logits_err']:.2e} | {s['last_argmax_equal']:.0%} | {s['tokens_equal']:.0%} | "
                     f"{s['tokens_before_first_difference']:.1f} |")
        L.append("")
    if "kernels" in res:
        k = res["kernels"]
        cols = list(next(iter(k["ms"].values())))
        L += [f"## One {k['shape'][0]}x{k['shape'][1]} matrix (ms, median; int4 group {k['group_size']}; "
              f"activations {k['activations']})", "",
              "| threads, rows | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
        for M, r in k["ms"].items(): L.append(f"| {M} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |")
        L.append("")
    L += ["## Targets", "", targets_table(res), ""]
    path = out / "quantization.md"
    path.write_text("\n".join(L))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in ("accuracy", "tiny", "kernels", "full"): ap.add_argument(f"--{s}", action="store_true")
    ap.add_argument("--quick", action="store_true", help="every section on tiny shapes (seconds)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=None, help="folder of quantization.json, which each run updates (default: a new "
                    "benchmarks/runs/<UTC time>; the committed results are updated only with --out benchmarks/results)")
    ap.add_argument("--folder", default="/tmp/pg3b-bf16", help="the random bf16 checkpoint (written if absent)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=500, help="held-out scenes per task (--accuracy)")
    ap.add_argument("--worker", action="store_true"); ap.add_argument("--impl"); ap.add_argument("--model")
    ap.add_argument("--quantize", default="none"); ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS); ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker_paired(a) if a.impl == "paired" else worker(a))); return
    if a.report_only and a.out is None: ap.error("--report-only rewrites the report of an existing run: name it with --out")
    out = Path(a.out) if a.out else bench.new_run_folder()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quantization.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if not a.report_only:
        if a.quick and not (a.accuracy or a.tiny or a.kernels or a.full): a.accuracy = a.tiny = a.kernels = a.full = True
        if a.quick: a.rounds = 1
        import platform
        import torch
        import transformers
        res["machine"] = dict(cpu=next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                                        if l.startswith("model name")), platform.processor()), logical_cpus=os.cpu_count(),
                              torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        res["threads"] = a.threads
        l0 = os.getloadavg()
        for name in ("accuracy", "tiny", "kernels"):
            if getattr(a, name):
                print(f"{name} ...", flush=True)
                res[name] = globals()[f"run_{name}"](a) | dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        if a.full:
            print("full ...", flush=True)
            if a.quick:
                cfg = bench.tiny_config()
                folder = out / "tiny-bf16"
            else: cfg, folder = bench.full_config(), Path(a.folder)
            previous = res.get("full")
            res["full"] = run_full(a, folder, cfg)
            res["full"]["table_md"] = full_table(res["full"])
            res["full"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            l1 = os.getloadavg()
            res["full"]["load_note"] = (f"1/5/15-min load average {'/'.join(f'{x:.1f}' for x in l0)} at the start, "
                                        f"{'/'.join(f'{x:.1f}' for x in l1)} at the end ({os.cpu_count()} logical CPUs, shared)")
            if previous and previous.get("paired") and not a.quick:  # the machine is shared: keep the run before for comparison
                res["full_previous"] = {k: previous[k] for k in ("date", "load_note", "paired", "table_md") if k in previous}
    res["targets_md"] = targets_table(res)
    path.write_text(json.dumps(res, indent=1, default=str))
    print(write_report(out, res).read_text())


if __name__ == "__main__":
    main()
