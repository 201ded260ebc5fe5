"""CPU benchmarks of paligemma_edu against transformers on the same random weights.

    python benchmarks/run.py [--sizes tiny,mid] [--full] [--out FOLDER] [--quick] [--rounds R] [--reps N]
                             [--threads 2] [--impls ours,ours_compiled,...] [--report-only]

Implementations: ours (the eager loop), ours_static (generate(compile="static"): the fixed-shape step, not compiled),
ours_compiled (generate(compile=True): the fixed-shape step under torch.compile; its first call, compile included, is
reported separately), hf_eager and hf_sdpa (transformers).

Every measurement runs in its own subprocess (`--worker ...`), implementations alternate round by round, each
measurement has a warm-up and the median of several repetitions is reported. Weights: one random model per size,
written with our `save_pretrained` to a temporary folder, loaded by every process (ours and transformers).

Results go to a new folder, benchmarks/runs/<UTC date and time>, unless --out names one: the committed results in
benchmarks/results are rewritten only by `--out benchmarks/results`.
"""
from __future__ import annotations
import argparse
import importlib
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


def new_run_folder() -> Path:
    "A fresh results folder, benchmarks/runs/<UTC date and time>: the default --out, so no run overwrites another."
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for k in range(100):
        p = HERE / "runs" / (stamp + (f"-{k}" if k else ""))
        if not p.exists(): return p
    raise FileExistsError(f"{HERE / 'runs'} already holds 100 folders named {stamp}*; give --out")
ROOT = HERE.parent
IMPLS = ("ours", "ours_static", "ours_compiled", "hf_eager", "hf_sdpa")
FAST = {"ours_static": "static", "ours_compiled": True}  # generate(compile=...) of our fast paths (True: torch.compile)
NAMES = {"ours": "ours", "ours_static": "ours static", "ours_compiled": "ours compiled", "hf_eager": "HF eager",
         "hf_sdpa": "HF sdpa"}
LOAD_KEYS = ("load_s", "peak_rss_delta_mb", "rss_after_mb", "params_mb")
PROMPT_LEN = 8  # text tokens after the image tokens (bos + 6 words + "\n")


# ----------------------------------------------------------------------------------------------------- configs
def tiny_config() -> dict:
    "The bundled shapes model's config (random weights here), or the same recipe when the asset is absent."
    p = ROOT / "paligemma_edu" / "assets" / "shapes-tiny" / "config.json"
    if p.exists():
        d = json.loads(p.read_text())
        d["text_config"]["max_position_embeddings"] = 1024  # room for the 512-token length sweep
        d["_source"] = "paligemma_edu/assets/shapes-tiny/config.json (max_position_embeddings raised to 1024)"
        return d
    v = dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=3, image_size=64, patch_size=8, num_channels=3, layer_norm_eps=1e-6,
             attention_dropout=0.0, hidden_act="gelu_pytorch_tanh", vision_use_head=False, projection_dim=256)
    return _pg(v, _text(400, 256, 1024, 4, 4, 1, 64), 399, "shapes-tiny recipe (asset absent)")


def _text(vocab, width, inter, layers, heads, kv, dh, max_pos=1024):
    return dict(model_type="gemma", vocab_size=vocab, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=dh, max_position_embeddings=max_pos,
                rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                hidden_activation="gelu_pytorch_tanh")


def _pg(v, t, image_token, source):
    return dict(vision_config=v, text_config=t, image_token_index=image_token, vocab_size=t["vocab_size"],
                projection_dim=t["hidden_size"], hidden_size=t["hidden_size"], pad_token_id=0, bos_token_id=2,
                eos_token_id=1, _source=source)


def mid_config() -> dict:
    "~130M parameters: SigLIP 384x6 (patch 14, 224 px: 256 image tokens) + Gemma 768x12, MQA, vocab 32768."
    v = dict(model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=6, image_size=224, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
             attention_dropout=0.0, hidden_act="gelu_pytorch_tanh", vision_use_head=False, projection_dim=768)
    return _pg(v, _text(32768, 768, 3072, 12, 8, 1, 96), 32767, "mid (chosen here)")


def full_config() -> dict:
    "paligemma-3b-pt-224 shapes."
    v = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
             num_attention_heads=16, image_size=224, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
             attention_dropout=0.0, hidden_act="gelu_pytorch_tanh", vision_use_head=False, projection_dim=2048)
    return _pg(v, _text(257216, 2048, 16384, 18, 8, 1, 256, 8192), 257152, "paligemma-3b-pt-224 shapes")


def _gemma2(t, kv, window=4096):
    "A Gemma 2 text config from a Gemma one: kv heads, soft-capping, sliding windows on alternate layers."
    return t | dict(model_type="gemma2", num_key_value_heads=kv, query_pre_attn_scalar=t["head_dim"],
                    sliding_window=window, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


def mid2_config() -> dict:
    "PaliGemma 2 shape at the mid size: the mid vision tower + a Gemma 2 768x12 with 2 kv heads."
    d = mid_config()
    d["text_config"] = _gemma2(d["text_config"], kv=2)
    return d | {"_source": "mid, PaliGemma 2 (Gemma 2 text model)"}


def full2_config() -> dict:
    "paligemma2-3b-pt-224 shapes (Gemma 2 2B: 2304 wide, 26 layers, 8 heads, 4 kv heads)."
    v = full_config()["vision_config"] | {"projection_dim": 2304}
    t = _gemma2(_text(257216, 2304, 9216, 26, 8, 4, 256, 8192), kv=4) | {"query_pre_attn_scalar": 256}
    return _pg(v, t, 257152, "paligemma2-3b-pt-224 shapes")


SIZES = {"tiny": (tiny_config, "float32"), "mid": (mid_config, "float32"), "full": (full_config, "bfloat16"),
         "mid2": (mid2_config, "float32"), "full2": (full2_config, "bfloat16")}


# ----------------------------------------------------------------------------------------------------- helpers
def _torch(threads):
    import torch
    torch.set_num_threads(threads)
    return torch


def _dtype(name):
    import torch
    return getattr(torch, name)


def peak_rss_mb() -> float:
    "Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb(field="VmRSS") -> float:
    "VmRSS (resident now) or VmHWM (peak since start or since the last reset) from /proc/self/status, in MiB."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    "Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to /proc/self/clear_refs)."
    try: Path("/proc/self/clear_refs").write_text("5"); return True
    except OSError: return False


def make_inputs(cfg: dict, batch: int, dtype, seed=0):
    "input_ids (B, N + PROMPT_LEN): N <image> tokens, bos, random words, a newline-like token; pixels; masks."
    import torch
    g = torch.Generator().manual_seed(seed)
    v = cfg["vision_config"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    words = torch.randint(3, min(cfg["vocab_size"], cfg["image_token_index"]), (1, PROMPT_LEN - 1), generator=g)
    ids = torch.cat([torch.full((1, n_img), cfg["image_token_index"]), torch.tensor([[2]]), words], 1).repeat(batch, 1)
    pix = torch.rand(1, 3, v["image_size"], v["image_size"], generator=g).mul(2).sub(1).repeat(batch, 1, 1, 1).to(dtype)
    return dict(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))


def load(impl: str, folder: str, dtype):
    if impl.startswith("ours"):
        from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
        return PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype, device="cpu").eval()
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import PaliGemmaForConditionalGeneration as HF
    m = HF.from_pretrained(folder, attn_implementation=impl.split("_")[1], dtype=dtype).eval()
    m.generation_config.eos_token_id = None  # force exactly max_new_tokens
    m.generation_config.pad_token_id = 0
    return m


class Clock:
    "Timestamps of every new token: a callable for our generate, put/end for transformers' streamer protocol."
    def __init__(self, skip_first_put=False): self.t, self.skip = [], skip_first_put
    def __call__(self, tok): self.t.append(time.perf_counter())
    def put(self, value):
        if self.skip: self.skip = False; return  # transformers first puts the prompt
        self.t.append(time.perf_counter())
    def end(self): pass


def timed_generate(impl, model, inp, n_new):
    "(ttft_s, total_s, per-token timestamps relative to the start) for one greedy generation of exactly n_new tokens."
    import torch
    clock = Clock(skip_first_put=not impl.startswith("ours"))
    t0 = time.perf_counter()
    if impl.startswith("ours"):
        out = model.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                             max_new_tokens=n_new, eos_token_id=[], streamer=clock, compile=FAST.get(impl, False))
    else:
        with torch.inference_mode():
            out = model.generate(**inp, max_new_tokens=n_new, do_sample=False, streamer=clock)
    t1 = time.perf_counter()
    new = out.shape[1] - inp["input_ids"].shape[1]
    if new != n_new: raise RuntimeError(f"{impl} generated {new} tokens instead of {n_new}")
    return clock.t[0] - t0, t1 - t0, [t - t0 for t in clock.t]


def prefill(impl, model, inp):
    import torch
    with torch.inference_mode():
        if impl.startswith("ours"):
            B, T = inp["input_ids"].shape
            cache = model.new_cache(B, T + 1)
            return model(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                         cache=cache, logits_to_keep=1).logits
        return model(**inp, logits_to_keep=1, use_cache=True).logits


def pool(runs: list) -> dict:
    "Median over rounds (and repetitions, where a worker returned them) of every figure."
    alls = {"prefill_s": "prefill_all", "decode_b1_tok_s": "decode_b1_all", "decode_b8_tok_s": "decode_b8_all"}
    return {k: statistics.median([x for r in runs for x in (r[alls[k]] if k in alls else [r[k]])])
            for k in runs[0] if not k.endswith("_all") and k not in LOAD_KEYS}


def med_time(fn, reps, warmup=1):
    for _ in range(warmup): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


# ----------------------------------------------------------------------------------------------------- workers
def worker_speed(a):
    "Prefill latency, TTFT and decode tokens/s at batch 1 and 8 for one implementation."
    _torch(a.threads)  # sets the thread count
    dtype = _dtype(a.dtype)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    res = load_stats(a.impl, a.model, dtype)  # a fresh process: the checkpoint load is measured first
    model = res.pop("model")
    inp1 = make_inputs(cfg, 1, dtype)
    res["prefill_s"], res["prefill_all"] = med_time(lambda: prefill(a.impl, model, inp1), a.reps)
    for B in (1, 8):
        inp = make_inputs(cfg, B, dtype)
        t0 = time.perf_counter()  # warm-up; for the compiled path the first call compiles (same length bucket)
        timed_generate(a.impl, model, inp, a.new_tokens if a.impl in FAST else min(4, a.new_tokens))
        if a.impl in FAST: res[f"first_call_b{B}_s"] = time.perf_counter() - t0
        ttft, dec = [], []
        for _ in range(a.reps):
            t_first, total, _ = timed_generate(a.impl, model, inp, a.new_tokens)
            ttft.append(t_first); dec.append((a.new_tokens - 1) * B / (total - t_first))
        res[f"ttft_b{B}_s"], res[f"decode_b{B}_tok_s"] = statistics.median(ttft), statistics.median(dec)
        res[f"decode_b{B}_all"] = dec
    return res


def worker_curve(a):
    "Ours: per-token decode time against generated length, with the KV cache and without (full recompute)."
    torch = _torch(a.threads)
    dtype = _dtype(a.dtype)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    model = load("ours", a.model, dtype)
    inp = make_inputs(cfg, 1, dtype)
    timed_generate("ours", model, inp, 8)
    runs = []
    for _ in range(a.reps):
        _, _, ts = timed_generate("ours", model, inp, a.max_len)
        runs.append([b - c for b, c in zip(ts[1:], ts[:-1])])  # step n: time to produce token n+1
    cached = [statistics.median(col) for col in zip(*runs)]
    # no cache: token L+1 costs one forward over prompt + L tokens (image features reused, not re-encoded)
    nc = {}
    with torch.inference_mode():
        feats = model.get_image_features(inp["pixel_values"])
        g = torch.Generator().manual_seed(1)
        extra = torch.randint(3, cfg["image_token_index"], (1, a.max_len_nocache), generator=g)
        L = 1
        while L <= a.max_len_nocache:
            ids = torch.cat([inp["input_ids"], extra[:, :L]], 1)
            tt = torch.cat([inp["token_type_ids"], torch.ones_like(extra[:, :L])], 1)
            f = lambda: model(ids, attention_mask=torch.ones_like(ids), token_type_ids=tt, image_features=feats,
                              logits_to_keep=1).logits.argmax(-1)
            nc[L] = med_time(f, max(1, a.reps), warmup=1)[0]
            L *= 2
    return dict(cached=cached, nocache=nc)


def load_stats(impl, folder, dtype):
    "Checkpoint load time and the peak-RSS increase it causes (call first thing in a fresh process)."
    if impl.startswith("ours"):
        importlib.import_module("paligemma_edu.checkpoints")  # before the clock starts: load time excludes imports
    else:
        importlib.import_module("transformers.models.paligemma")
    import gc; gc.collect()
    reset = reset_peak_rss()  # else fall back to ru_maxrss, which the imports may already have pushed higher
    base_peak, base_rss = (current_rss_mb("VmHWM") if reset else peak_rss_mb()), current_rss_mb()
    t0 = time.perf_counter()
    model = load(impl, folder, dtype)
    dt = time.perf_counter() - t0
    peak = current_rss_mb("VmHWM") if reset else peak_rss_mb()
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return dict(load_s=dt, peak_rss_delta_mb=peak - base_peak, rss_after_mb=current_rss_mb() - base_rss,
                params_mb=params_mb, model=model)


def worker_ceilings(a):
    "Memory bandwidth from large matrix-vector products and matmul FLOP/s from large GEMMs, fp32 and bf16."
    torch = _torch(a.threads)
    out = {}
    n, m = (2048, 512) if a.quick else (8192, 2048)
    for name in ("float32", "bfloat16"):
        dt = _dtype(name)
        W, x = torch.randn(n, n).to(dt), torch.randn(n).to(dt)
        t, _ = med_time(lambda: W @ x, 7 if not a.quick else 3, warmup=2)
        out[f"bw_{name}_GBps"] = W.numel() * W.element_size() / t / 1e9
        A, B = torch.randn(m, m).to(dt), torch.randn(m, m).to(dt)
        t, _ = med_time(lambda: A @ B, 3, warmup=1)
        out[f"gemm_{name}_GFLOPs"] = 2 * m**3 / t / 1e9
    out["gemv_n"], out["gemm_n"] = n, m
    return out


def worker_ab(a):
    "Decode tok/s (batch --batch) of several implementations in ONE process, alternating run by run: a robust ratio."
    _torch(a.threads)  # sets the thread count
    dtype = _dtype(a.dtype)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    impls = [i for i in a.impls.split(",") if i]
    models = {i: load(i, a.model, dtype) for i in impls}
    inp = make_inputs(cfg, a.batch, dtype)
    for i in impls: timed_generate(i, models[i], inp, a.new_tokens)  # warm-up (compiles the compiled path)
    rates = {i: [] for i in impls}
    for r in range(a.reps):
        for i in (impls if r % 2 == 0 else impls[::-1]):
            t_first, total, _ = timed_generate(i, models[i], inp, a.new_tokens)
            rates[i].append((a.new_tokens - 1) * a.batch / (total - t_first))
    return dict(rates=rates, median={i: statistics.median(v) for i, v in rates.items()})


WORKERS = dict(speed=worker_speed, curve=worker_curve, ceilings=worker_ceilings, ab=worker_ab)


def spawn(kind, args, **kw) -> dict:
    "Run one worker in a fresh interpreter; return its JSON."
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(args.threads)]
    if args.quick: cmd.append("--quick")
    for k, v in kw.items(): cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as cache:  # a cold torch.compile cache: the first call is a user's first call
        r = subprocess.run(cmd, capture_output=True, text=True, env=env | {"TORCHINDUCTOR_CACHE_DIR": cache})
    if r.returncode:
        raise RuntimeError(f"worker {kind} {kw} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- accounting
def meta_model(cfg: dict):
    "Our PaliGemma of this config on the meta device: every shape, no memory."
    from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    import torch
    c = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"): return PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(c))


def counts(cfg: dict) -> dict:
    "Parameter counts by part (tied embedding counted once)."
    m = meta_model(cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    lm = m.language_model
    return dict(total=n(m), vision=n(m.vision_tower), projector=n(m.multi_modal_projector),
                embed=lm.model.embed_tokens.weight.numel(), text_layers=n(lm.model.layers) + n(lm.model.norm))


def prefill_flops(cfg, cnt, T):
    "2 x params x tokens for every matmul (vision on N patches, projector on N, text layers on T, LM head on 1) + attention."
    v, t = cfg["vision_config"], cfg["text_config"]
    N = (v["image_size"] // v["patch_size"]) ** 2
    attn_v = 4 * v["num_hidden_layers"] * N * N * v["hidden_size"]
    attn_t = 4 * t["num_hidden_layers"] * T * T * t["num_attention_heads"] * t["head_dim"]
    return 2 * (cnt["vision"] * N + cnt["projector"] * N + cnt["text_layers"] * T + cnt["embed"]) + attn_v + attn_t


# ----------------------------------------------------------------------------------------------------- report
def plot_curves(curves: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), dpi=80, squeeze=False)
    for ax, (size, c) in zip(axs[0], curves.items()):
        xs = list(range(1, len(c["cached"]) + 1))
        ax.plot(xs, [t * 1e3 for t in c["cached"]], lw=0.8, label="with KV cache")
        nc = {int(k): v for k, v in c["nocache"].items()}
        ax.plot(list(nc), [t * 1e3 for t in nc.values()], "o-", ms=3, label="no cache (recompute)")
        ax.set_xscale("log", base=2); ax.set_yscale("log")
        ax.set_xlabel("generated length (tokens)"); ax.set_ylabel("ms per new token"); ax.set_title(f"{size}: ours, batch 1")
        ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path); plt.close(fig)
    return path


def plot_ratios(rows: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [("decode_b1_tok_s", "decode b1"), ("decode_b8_tok_s", "decode b8"), ("prefill_s", "prefill"),
               ("ttft_b1_s", "TTFT")]
    fig, ax = plt.subplots(figsize=(5.5, 3), dpi=80)
    w = 0.8 / (2 * len(rows))
    for i, (size, r) in enumerate(rows.items()):
        for j, hf in enumerate(h for h in ("hf_eager", "hf_sdpa") if h in r):
            # speed-up of ours: tokens/s ratio, or inverse latency ratio
            vals = [r["ours"][m] / r[hf][m] if "tok_s" in m else r[hf][m] / r["ours"][m] for m, _ in metrics]
            ax.bar([k + (2 * i + j) * w for k in range(len(metrics))], vals, w, label=f"{size} vs {hf}")
    ax.axhline(1, color="k", lw=0.6)
    ax.set_xticks([k + w * (len(rows) - 0.5) for k in range(len(metrics))], [n for _, n in metrics])
    ax.set_ylabel("speed-up of ours (x)"); ax.legend(fontsize=6); fig.tight_layout(); fig.savefig(path); plt.close(fig)
    return path


def fmt(x, p=3):
    return f"{x:.{p}g}" if isinstance(x, (int, float)) else str(x)


def machine() -> dict:
    import torch
    import transformers
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_report(out: Path, info: dict) -> Path:
    m, ceil = info["machine"], info["ceilings"]
    rt = info.get("reps_tiny", info["reps"])
    tiny_reps = "" if rt == info["reps"] else f" ({rt} for tiny)"
    L = [f"# Benchmark results ({info['mode']})", "",
         f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs visible), torch threads = {info['threads']}",
         f"- torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['date']}",
         f"- Load on the machine during the run: {info.get('load_note', 'n/a')}",
         f"- Each figure: median over {info['rounds']} alternating rounds x {info['reps']} repetitions{tiny_reps}, "
         f"after a warm-up; every implementation in its own process; "
         f"decode forced to exactly {info['new_tokens']} new tokens.", "",
         "## Ceilings", "",
         "| | float32 | bfloat16 |", "|---|---|---|",
         f"| memory bandwidth (GB/s, {ceil['gemv_n']}x{ceil['gemv_n']} matrix @ vector) | {fmt(ceil['bw_float32_GBps'])} | "
         f"{fmt(ceil['bw_bfloat16_GBps'])} |",
         f"| matmul (GFLOP/s, {ceil['gemm_n']}^3 GEMM) | {fmt(ceil['gemm_float32_GFLOPs'])} | "
         f"{fmt(ceil['gemm_bfloat16_GFLOPs'])} |", ""]
    for size, s in info["sizes"].items():
        c, cnt = s["config"], s["counts"]
        t, v = c["text_config"], c["vision_config"]
        L += [f"## {size}: {cnt['total'] / 1e6:.1f}M parameters, {s['dtype']}", "",
              f"Config: {c.get('_source', '')}. Vision {v['hidden_size']}x{v['num_hidden_layers']} (patch {v['patch_size']}, "
              f"image {v['image_size']}: {s['n_image_tokens']} image tokens), text {t['hidden_size']}x{t['num_hidden_layers']}, "
              f"{t['num_attention_heads']} heads / {t['num_key_value_heads']} kv head, head_dim {t['head_dim']}, "
              f"MLP {t['intermediate_size']}, vocab {t['vocab_size']}. "
              f"Prompt = {s['n_image_tokens']} image + {PROMPT_LEN} text tokens.", "",
              "| metric | " + " | ".join(NAMES[i] for i in IMPLS) + " | ours / HF eager | ours / HF sdpa | "
              "compiled / faster HF | ours vs ceiling |", "|---" * (len(IMPLS) + 5) + "|"]
        r = s["results"]
        hfs = [h for h in ("hf_eager", "hf_sdpa") if h in r]
        for key, name, unit in (("prefill_s", "prefill latency, batch 1", "ms"),
                                ("ttft_b1_s", "time to first token, batch 1", "ms"),
                                ("ttft_b8_s", "time to first token, batch 8", "ms"),
                                ("decode_b1_tok_s", "decode, batch 1", "tok/s"), ("decode_b8_tok_s", "decode, batch 8", "tok/s"),
                                ("first_call_b1_s", "first call, batch 1 (compile included)", "s"),
                                ("first_call_b8_s", "first call, batch 8 (compile included)", "s")):
            vals = {i: r[i].get(key) for i in IMPLS if i in r}  # HF has no sdpa path for Gemma 2
            if all(v is None for v in vals.values()): continue
            # ratios reported as a speed-up (>1 = ours faster) for both latencies and throughputs
            up = lambda a, b: "n/a" if a is None or b is None else f"{a / b if unit == 'tok/s' else b / a:.2f}x"
            best = (max if unit == "tok/s" else min)((vals[h] for h in hfs if vals.get(h) is not None), default=None)
            show = ["n/a" if vals.get(i) is None else fmt(vals[i] * 1e3 if unit == "ms" else vals[i]) for i in IMPLS]
            roof = s["roofline"].get(key)
            L.append(f"| {name} ({unit}) | " + " | ".join(show) + f" | {up(vals.get('ours'), vals.get('hf_eager'))} | "
                     f"{up(vals.get('ours'), vals.get('hf_sdpa'))} | {up(vals.get('ours_compiled'), best)} | "
                     f"{'' if roof is None else f'{roof:.0%}'} |")
        ld = s["load"]
        for key, name in (("load_s", "checkpoint load (s)"), ("peak_rss_delta_mb", "peak RSS increase while loading (MiB)"),
                          ("rss_after_mb", "RSS increase after loading (MiB)")):
            vals = {i: ld[i][key] for i in IMPLS if i in ld}
            rt = [f"{vals[h] / vals['ours']:.2f}x" if h in vals and vals["ours"] > 0 else "n/a" for h in ("hf_eager", "hf_sdpa")]
            L.append(f"| {name} | " + " | ".join(fmt(vals[i]) if i in vals else "n/a" for i in IMPLS) +
                     f" | {rt[0]} | {rt[1]} |  | weights {ld['ours']['params_mb']:.0f} MiB |")
        if s.get("decode_roofline_share"):
            share = json.loads(json.dumps(s["decode_roofline_share"]))  # batch keys as strings, as read back from results.json
            L += ["", "Decode as a share of the bandwidth roofline (batch 1 / batch 8): " + ", ".join(
                f"{NAMES[i]} {v['1']:.0%} / {v['8']:.0%}" for i, v in share.items()) + "."]
        cv = s.get("curve")
        if cv:
            cached = cv["cached"]
            i16, iend = min(15, len(cached) - 1), len(cached) - 1
            L += ["", f"Per-token decode time with the KV cache: token 16 {cached[i16] * 1e3:.2f} ms, token {iend + 1} "
                      f"{cached[iend] * 1e3:.2f} ms (growth {cv['growth']:.2f}x, median of tokens 9-24 vs the last 16). "
                      f"Without the cache (full recompute of prompt + generated tokens, image features reused; lengths "
                      f"capped at {max(int(k) for k in cv['nocache'])}): "
                      + ", ".join(f"L={k}: {v * 1e3:.1f} ms" for k, v in cv["nocache"].items()) + "."]
        L.append("")
    L += targets_table(info) + [""]
    L += ["Speed-ups are ours relative to transformers (>1: ours faster); for latencies it is HF time / our time. "
          "'compiled / faster HF' compares ours_compiled with the faster of HF eager and HF sdpa. The compiled path's "
          "first call is timed in a fresh process with an empty torch.compile cache.",
          "Decode tok/s = (new tokens - 1) x batch / (total generate time - time to first token): the first token comes "
          "from the prefill. Ceiling column: decode = measured / (bandwidth / bytes read per step), where bytes per step "
          "= text-layer weights + the tied embedding read once as the LM head + the KV cache of every row at the mean "
          "length; prefill = (FLOPs / measured time) / GEMM FLOP/s, FLOPs = 2 x params x tokens for each matmul (vision "
          "and projector on the image patches, text layers on all prompt tokens, the LM head on one) + 4 x layers x T^2 x "
          "width for attention scores and mixing. The vision tower's position-embedding table is counted as a matmul "
          "(slight over-count).", ""]
    if info.get("plots"):
        L += [f"![{p}]({p})" for p in info["plots"]] + [""]
    path = out / "results.md"
    path.write_text("\n".join(L))
    return path


def targets_table(info) -> list:
    "The performance targets, each against the faster of HF eager / HF sdpa."
    L = ["## Targets (ours against the faster transformers implementation)", "",
         "| size | target | measured | met |", "|---|---|---|---|"]
    for size, s in info["sizes"].items():
        r = s["results"]
        for impl in (i for i in ("ours", "ours_compiled") if i in r):
            for key, goal in (("decode_b1_tok_s", 2.0), ("decode_b8_tok_s", 1.5)):
                best = max(r[h][key] for h in ("hf_eager", "hf_sdpa") if h in r)
                x = r[impl][key] / best
                L.append(f"| {size} | decode batch {key[8]} >= {goal}x HF ({NAMES[impl]}) | {x:.2f}x | "
                         f"{'yes' if x >= goal else 'no'} |")
        best = min(r[h]["prefill_s"] for h in ("hf_eager", "hf_sdpa") if h in r)
        x = best / r["ours"]["prefill_s"]
        L.append(f"| {size} | prefill no slower (speed-up >= 1x) | {x:.2f}x | {'yes' if x >= 1 else 'no'} |")
        if s.get("curve"):
            g = s["curve"]["growth"]
            L.append(f"| {size} | cached decode cost growth, token 16 -> last <= 1.5x | {g:.2f}x | "
                     f"{'yes' if g <= 1.5 else 'no'} |")
    return L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--full", action="store_true", help="also run the paligemma-3b-pt-224 shape (bf16, ~6 GiB, slow)")
    # sizes: tiny, mid, full (PaliGemma), mid2, full2 (PaliGemma 2 shapes; transformers runs Gemma 2 in eager only)
    ap.add_argument("--out", default=None, help="results folder (default: a new benchmarks/runs/<UTC time>; the committed "
                    "results are rewritten only with --out benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="few tokens, one round: proves the command works")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default=",".join(IMPLS), help="implementations to run, comma-separated (of %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--max-len-nocache", type=int, default=None)
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md and the plots from results.json in --out")
    ap.add_argument("--ab", metavar="SIZE", help="only an in-process A/B of decode at SIZE (all --impls in one process, "
                    "alternating, --reps runs each, batch --batch): writes ab_SIZE_tTHREADS[_bBATCH].json in --out")
    ap.add_argument("--batch", type=int, default=1, help="batch size of --ab")
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--impl", default="ours")
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 2)
    a.reps = a.reps or (1 if q else 3)
    a.new_tokens = a.new_tokens or (4 if q else 32)
    a.max_len = a.max_len or (16 if q else 512)
    a.max_len_nocache = a.max_len_nocache or (4 if q else 256)
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return

    import torch
    from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from paligemma_edu.fast_decoding import decode_bytes_per_step
    if a.report_only and a.out is None: ap.error("--report-only rewrites the report of an existing run: name it with --out")
    out = Path(a.out) if a.out else new_run_folder()
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        info = json.loads((out / "results.json").read_text())
        curves = {k: e["curve"] for k, e in info["sizes"].items() if e.get("curve")}
        if curves: plot_curves(curves, out / "decode_vs_length.png")
        plot_ratios({s: e["results"] for s, e in info["sizes"].items()}, out / "speedups.png")
        print(write_report(out, info).read_text())
        return
    if a.ab:
        make, dtype = SIZES[a.ab]
        cfg = make()
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            conf = PaliGemmaConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
            model = PaliGemmaForConditionalGeneration(conf)
            model.to(_dtype(dtype)).save_pretrained(Path(tmp))
            del model
            res = spawn("ab", a, model=tmp, dtype=dtype, reps=a.reps, new_tokens=a.new_tokens, impls=a.impls, batch=a.batch)
        m = res["median"]
        best_hf = max(v for i, v in m.items() if i.startswith("hf"))
        res |= dict(size=a.ab, threads=a.threads, batch=a.batch, new_tokens=a.new_tokens, reps=a.reps, machine=machine(),
                    loadavg=os.getloadavg(),
                    ratio_vs_faster_hf={i: v / best_hf for i, v in m.items() if i.startswith("ours")})
        (out / f"ab_{a.ab}_t{a.threads}{'' if a.batch == 1 else f'_b{a.batch}'}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: res[k] for k in ("median", "ratio_vs_faster_hf", "loadavg")}, indent=1))
        return
    sizes = [s for s in a.sizes.split(",") if s] + (["full"] if a.full and "full" not in a.sizes else [])
    others = subprocess.run(["pgrep", "-af", "paligemma-edu train"], capture_output=True, text=True).stdout.strip()
    info = dict(mode="quick" if q else "full run", threads=a.threads, rounds=a.rounds, reps=a.reps, new_tokens=a.new_tokens,
                machine=machine(), sizes={}, plots=[],
                load_note=("training process running concurrently: " + others[:80]) if others else "no training process running")
    info["loadavg_start"] = os.getloadavg()
    info["reps_tiny"] = a.reps if q else 2 * a.reps
    print("ceilings ...", flush=True)
    info["ceilings"] = spawn("ceilings", a)
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            make, dtype = SIZES[size]
            cfg = make()
            cnt = counts(cfg)
            folder = Path(tmp) / size
            torch.manual_seed(0)
            default = torch.get_default_dtype()
            torch.set_default_dtype(_dtype(dtype))  # built in the benchmark dtype: no float32 copy of a 3B model in memory
            try:
                with torch.device("cpu"):
                    conf = PaliGemmaConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
                    model = PaliGemmaForConditionalGeneration(conf)
            finally: torch.set_default_dtype(default)
            model.to(_dtype(dtype)).save_pretrained(folder)
            del model
            reps = a.reps * 2 if size == "tiny" and not q else a.reps  # tiny runs are cheap and noisy: more repetitions
            kw = dict(model=folder, dtype=dtype, reps=reps, new_tokens=a.new_tokens)
            print(f"{size}: {cnt['total'] / 1e6:.1f}M params, saved", flush=True)
            impls = [i for i in a.impls.split(",") if i and (i != "hf_sdpa" or cfg["text_config"]["model_type"] == "gemma")]
            bad = sorted(set(impls) - set(IMPLS))  # HF Gemma 2: eager only
            if bad or "ours" not in impls or not {"hf_eager", "hf_sdpa"} & set(impls):
                raise SystemExit(f"--impls must include ours and one of hf_eager / hf_sdpa, and name only {IMPLS}; "
                                 f"found {a.impls!r}")
            runs = {i: [] for i in impls}
            for r in range(a.rounds):
                for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate the order round by round
                    runs[impl].append(spawn("speed", a, impl=impl, **kw))
                    print(f"  round {r} {impl}: {runs[impl][-1]['decode_b1_tok_s']:.1f} tok/s b1", flush=True)
            res = {i: pool(runs[i]) for i in impls}
            load = {i: {k: statistics.median(r[k] for r in runs[i]) for k in LOAD_KEYS} for i in impls}
            n_img = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
            T = n_img + PROMPT_LEN
            bpe = 2 if dtype == "bfloat16" else 4
            bw = info["ceilings"][f"bw_{dtype}_GBps"] * 1e9
            step = {B: decode_bytes_per_step(meta_model(cfg), B, T + a.new_tokens // 2, bpe) for B in (1, 8)}  # bytes per step
            roof = {}
            for B in (1, 8):
                roof[f"decode_b{B}_tok_s"] = res["ours"][f"decode_b{B}_tok_s"] / (B * bw / step[B])
            gemm = info["ceilings"][f"gemm_{dtype}_GFLOPs"] * 1e9
            roof["prefill_s"] = prefill_flops(cfg, cnt, T) / res["ours"]["prefill_s"] / gemm
            roof_by_impl = {i: {B: res[i][f"decode_b{B}_tok_s"] / (B * bw / step[B]) for B in (1, 8)} for i in impls}
            entry = dict(config=cfg, counts=cnt, dtype=dtype, n_image_tokens=n_img, results=res, load=load, roofline=roof,
                         decode_roofline_share=roof_by_impl,
                         raw=runs, decode_roofline_tok_s={B: B * bw / step[B] for B in (1, 8)})
            if not size.startswith("full"):
                print("  curve ...", flush=True)
                cv = spawn("curve", a, model=folder, dtype=dtype, reps=1 if q else 2, max_len=a.max_len,
                           max_len_nocache=a.max_len_nocache)
                c = cv["cached"]
                early, late = c[8:24] or c[:1], c[-16:]
                cv["growth"] = statistics.median(late) / statistics.median(early)
                entry["curve"] = curves[size] = cv
            info["sizes"][size] = entry
            (out / "results.json").write_text(json.dumps(info, indent=1, default=str))
    if curves: info["plots"].append(plot_curves(curves, out / "decode_vs_length.png").name)
    info["plots"].append(plot_ratios({s: e["results"] for s, e in info["sizes"].items()}, out / "speedups.png").name)
    (out / "results.json").write_text(json.dumps(info, indent=1, default=str))
    info["loadavg_end"] = os.getloadavg()
    info["load_note"] += (f"; 1/5/15-min load average {'/'.join(f'{x:.1f}' for x in info['loadavg_start'])} at the start, "
                          f"{'/'.join(f'{x:.1f}' for x in info['loadavg_end'])} at the end (2 cores)")
    path = write_report(out, info)
    print(path.read_text())


if __name__ == "__main__":
    main()
