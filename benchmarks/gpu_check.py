"""Parity and speed of paligemma_edu against transformers at full PaliGemma size, on one GPU.

    python benchmarks/gpu_check.py                      # paligemma-3b-pt-224 shapes, random weights, CUDA
    python benchmarks/gpu_check.py --tiny --device cpu  # the same checks on a tiny config (seconds)

Random weights (norms perturbed so they matter) are written once with our `save_pretrained` in bfloat16 and loaded by
both libraries, in float32 (TF32 off) and in bfloat16. Checks: last-position and full-sequence logits (relative error =
max |ours - HF| / max |HF|), greedy tokens. Speed: prefill latency and decode tokens/s at batch 1 (exactly N new
tokens), both libraries (HF with sdpa attention), plus the device's memory-bandwidth roofline for decode.

Fast decoding (bfloat16, batch 1 and 8, on the paligemma-3b and paligemma2-3b shapes): decode tokens/s of our eager
loop, our `generate(compile="cuda-graph")` (the static step captured by hand) and `compile="reduce-overhead"`
(torch.compile + CUDA graphs), transformers with sdpa and transformers' static cache (`cache_implementation="static"`,
which compiles the forward on a GPU); the first call of each (compile / capture included), the share of the bandwidth
roofline, and whether the tokens equal our eager loop's. Tokens/s come from per-token timestamps taken after a device
synchronisation, the same for every implementation. A section that would start after --budget-s seconds is skipped
(and says so), so the whole check stays under 8 minutes; a path that fails is reported with its error, not hidden.
On CPU (--tiny --device cpu) the fast paths are "static" (and "inductor" with --fast-modes) and transformers' static
cache is not compiled.
Writes a markdown table to stdout and to --out.
"""
from __future__ import annotations
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import new_run_folder, full_config, full2_config, make_inputs, _text, _pg, counts, meta_model  # noqa: E402
from paligemma_edu.fast_decoding import decode_bytes_per_step  # noqa: E402

FP32_TOL = 1e-4  # relative error allowed in float32 (different kernel orders only)


def tiny_config() -> dict:
    v = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=28, patch_size=7, num_channels=3, layer_norm_eps=1e-6,
             attention_dropout=0.0, hidden_act="gelu_pytorch_tanh", vision_use_head=False, projection_dim=48)
    return _pg(v, _text(300, 48, 96, 2, 4, 1, 16, 256), 299, "tiny")


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()


def timeit(fn, dev, reps=3, warmup=1):
    for _ in range(warmup): fn()
    ts = []
    for _ in range(reps):
        sync(dev); t0 = time.perf_counter(); fn(); sync(dev); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build_weights(cfg: dict, folder: Path, dev):
    "Random model (norm weights perturbed), saved in bfloat16 with our save_pretrained."
    from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(dev):
        m = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1 and "norm" in n: p.add_(torch.randn_like(p) * 0.3)
    m.to(torch.bfloat16).save_pretrained(folder)
    del m
    if dev.type == "cuda": torch.cuda.empty_cache()


def load_both(folder, dtype, dev, hf_attn):
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import PaliGemmaForConditionalGeneration as HF
    ours = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=dev).eval()
    hf = HF.from_pretrained(folder, attn_implementation=hf_attn, dtype=dtype).to(dev).eval()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    return ours, hf


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def parity(ours, hf, inp, n_new):
    "Relative errors of full-sequence logits and greedy tokens of both."
    with torch.inference_mode():
        lo = ours(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"]).logits
        lh = hf(**inp).logits
        t_o = ours.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                            max_new_tokens=n_new, eos_token_id=[])
        t_h = hf.generate(**inp, max_new_tokens=n_new, do_sample=False)
    T = inp["input_ids"].shape[1]
    same = (t_o[:, T:] == t_h[:, T:]).float().mean().item()
    first_diff = next((i for i in range(n_new) if not bool((t_o[:, T + i] == t_h[:, T + i]).all())), None)
    return dict(rel_err_all=rel_err(lo, lh), rel_err_last=rel_err(lo[:, -1], lh[:, -1]), tokens_equal=same,
                first_token_diff=first_diff, argmax_last_equal=bool((lo[:, -1].argmax(-1) == lh[:, -1].argmax(-1)).all()))


def speed(ours, hf, inp, n_new, dev, reps):
    "Prefill latency (ms) and decode tok/s at batch 1 for both; decode from per-token timestamps (first to last token)."
    res = {}
    for name, m in (("ours", ours), ("hf", hf)):
        with torch.inference_mode():
            if name == "ours":
                pre = lambda: m(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                                cache=m.new_cache(1, inp["input_ids"].shape[1] + 1), logits_to_keep=1)
                gen = lambda c: m.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                                           inp["token_type_ids"], max_new_tokens=n_new, eos_token_id=[], streamer=c)
            else:
                pre = lambda: m(**inp, logits_to_keep=1, use_cache=True)
                gen = lambda c: m.generate(**inp, max_new_tokens=n_new, do_sample=False, streamer=c)
            t_pre = timeit(pre, dev, reps)
            gen(StreamClock(dev, name == "hf"))  # warm-up
            rates = []
            for _ in range(reps):
                clock = StreamClock(dev, name == "hf")
                gen(clock)
                rates.append((len(clock.t) - 1) / (clock.t[-1] - clock.t[0]))
        res[name] = dict(prefill_ms=t_pre * 1e3, decode_tok_s=statistics.median(rates))
    return res


class StreamClock:
    "Per-token timestamps after a device synchronisation: a callable for our generate, put/end for transformers'."
    def __init__(self, dev, skip_first_put=False): self.dev, self.t, self.skip = dev, [], skip_first_put
    def __call__(self, tok=None): sync(self.dev); self.t.append(time.perf_counter())
    def put(self, value):
        if self.skip: self.skip = False; return  # transformers first puts the prompt
        self()
    def end(self): pass


def fast_speed(cfg, folder, dev, n_new, reps, batches, ours_modes, deadline, hf_static=True):
    "Decode tok/s at each batch size: ours eager and fast modes, HF sdpa and HF static cache (+ compile on a GPU)."
    ours, hf = load_both(folder, torch.bfloat16, dev, "sdpa")
    res = {}
    for B in batches:
        if time.perf_counter() > deadline:
            res[B] = {"skipped": "time budget (--budget-s) reached before this batch size"}; continue
        inp = {k: v.to(dev) for k, v in make_inputs(cfg, B, torch.bfloat16).items()}
        args = (inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"])
        impls = [("ours", lambda c, m=False: ours.generate(*args, max_new_tokens=n_new, eos_token_id=[], streamer=c, compile=m))]
        impls += [(f"ours {m}", lambda c, m=m: ours.generate(*args, max_new_tokens=n_new, eos_token_id=[], streamer=c,
                                                             compile=m)) for m in ours_modes]
        impls += [("HF sdpa", lambda c: hf.generate(**inp, max_new_tokens=n_new, do_sample=False, streamer=c))]
        if hf_static:
            impls += [("HF static" + (" + compile" if dev.type == "cuda" else ""),
                       lambda c: hf.generate(**inp, max_new_tokens=n_new, do_sample=False, streamer=c,
                                             cache_implementation="static"))]
        row, ref = {}, None
        for name, gen in impls:
            if time.perf_counter() > deadline:
                row[name] = {"skipped": "time budget (--budget-s) reached"}; continue
            try:
                with torch.inference_mode():
                    sync(dev); t0 = time.perf_counter(); gen(StreamClock(dev, name.startswith("HF"))); sync(dev)
                    first = time.perf_counter() - t0
                    rates = []
                    for _ in range(reps):
                        clock = StreamClock(dev, name.startswith("HF"))
                        out = gen(clock)
                        rates.append((len(clock.t) - 1) * B / (clock.t[-1] - clock.t[0]))
            except Exception as e:  # reported in the table, not hidden
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}; continue
            if ref is None: ref = out
            T = inp["input_ids"].shape[1]
            row[name] = dict(first_call_s=first, decode_tok_s=statistics.median(rates),
                             tokens_equal_ours_eager=(out[:, T:] == ref[:, T:]).float().mean().item())
        res[B] = row
    ours = hf = None  # free both models (the closures above hold them) before emptying the cache
    if dev.type == "cuda": torch.cuda.empty_cache()
    return res


def fast_table(fast: dict, roofline: dict) -> list:
    "Markdown lines: one row per (shape, batch), tok/s of every implementation, ratios against HF's static path."
    names = []
    for shape in fast.values():
        for row in shape.values():
            names += [n for n in row if n not in names and n != "skipped"]
    L = ["| shape | batch | " + " | ".join(f"{n} tok/s" for n in names) + " | best ours / best HF | best ours / roofline | "
         "first call s (" + ", ".join(names) + ") | tokens equal to ours eager |", "|---" * (len(names) + 6) + "|"]
    for shape, rows in fast.items():
        for B, row in rows.items():
            if "skipped" in row:
                L.append(f"| {shape} | {B} | skipped: {row['skipped']} |"); continue
            cell = lambda r: f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else r.get("error", r.get("skipped", "n/a"))
            rate = lambda pre: max((r["decode_tok_s"] for n, r in row.items() if n.startswith(pre) and "decode_tok_s" in r),
                                   default=None)
            best_ours, best_hf = rate("ours"), rate("HF")
            roof = roofline[shape][str(B)] if str(B) in roofline[shape] else roofline[shape][B]
            L.append(f"| {shape} | {B} | " + " | ".join(cell(row.get(n, {})) for n in names) + " | "
                     + (f"{best_ours / best_hf:.2f}x" if best_ours and best_hf else "n/a") + " | "
                     + (f"{best_ours / roof:.0%} of {roof:.0f}" if best_ours else "n/a") + " | "
                     + ", ".join(f"{row[n]['first_call_s']:.1f}" if "first_call_s" in row.get(n, {}) else "-" for n in names)
                     + " | " + ", ".join(f"{row[n]['tokens_equal_ours_eager']:.0%}" if "tokens_equal_ours_eager" in row.get(n, {})
                                         else "-" for n in names) + " |")
    return L


def bandwidth(dev, dtype, n):
    W, x = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, device=dev, dtype=dtype)
    t = timeit(lambda: W @ x, dev, reps=10, warmup=3)
    return W.numel() * W.element_size() / t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown file to write (a .json beside it; default: in a new folder "
                    "benchmarks/runs/<UTC time>; the committed one is rewritten only when named)")
    ap.add_argument("--fast-shapes", default=None, help="shapes for the fast-decoding table (default: full,full2 on "
                    "CUDA, tiny with --tiny); '' to skip it")
    ap.add_argument("--fast-modes", default=None, help="our compile= modes (default: cuda-graph,reduce-overhead on CUDA, "
                    "static on CPU)")
    ap.add_argument("--fast-new-tokens", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no fast-decoding measurement after this many "
                    "seconds (the longest one, a compile, takes ~1-2 min: the whole check stays under 8 min)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cpu": torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = tiny_config() if a.tiny else full_config()
    n_new = a.new_tokens or (8 if a.tiny else 32)
    out = Path(a.out) if a.out else new_run_folder() / f"gpu_check_{'tiny' if a.tiny else 'full'}_{dev.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__)
    import transformers
    info["transformers"] = transformers.__version__
    cnt = counts(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        build_weights(cfg, Path(tmp), dev)
        info["build_s"] = time.perf_counter() - t_start
        par, spd = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).split(".")[1]
            ours, hf = load_both(tmp, dtype, dev, "eager")
            inp2 = {k: v.to(dev) for k, v in make_inputs(cfg, 2, dtype).items()}
            inp2["input_ids"][1, -3:] = torch.tensor([5, 6, 7])  # two different rows
            par[name] = parity(ours, hf, inp2, n_new)
            hf.set_attn_implementation("sdpa")  # speed: transformers' fast attention
            inp1 = {k: v.to(dev) for k, v in make_inputs(cfg, 1, dtype).items()}
            spd[name] = speed(ours, hf, inp1, n_new, dev, a.reps)
            del ours, hf
            if dev.type == "cuda": torch.cuda.empty_cache()
        bw = {n: bandwidth(dev, d, 4096 if a.tiny or dev.type == "cpu" else 16384) for n, d in
              (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
        shapes = [x for x in (a.fast_shapes if a.fast_shapes is not None else
                              ("tiny" if a.tiny else "full,full2" if dev.type == "cuda" else "")).split(",") if x]
        modes = [x for x in (a.fast_modes or ("cuda-graph,reduce-overhead" if dev.type == "cuda" else "static")).split(",") if x]
        n_fast = a.fast_new_tokens or (16 if a.tiny else 64)
        fast, roofline, deadline = {}, {}, t_start + a.budget_s
        for shape in shapes:
            if time.perf_counter() > deadline:
                fast[shape] = {1: {"skipped": "time budget (--budget-s) reached before this shape"}}
                roofline[shape] = {}; continue
            scfg = dict(tiny=tiny_config, full=full_config, full2=full2_config)[shape]()
            folder = Path(tmp)
            if shape != ("tiny" if a.tiny else "full"):  # another shape: its own random weights
                folder = Path(tmp) / shape
                build_weights(scfg, folder, dev)
            Ts = (scfg["vision_config"]["image_size"] // scfg["vision_config"]["patch_size"]) ** 2 + 8
            roofline[shape] = {B: B * bw["bfloat16"] / decode_bytes_per_step(meta_model(scfg), B, Ts + n_fast // 2, 2)
                               for B in (1, 8)}
            fast[shape] = fast_speed(scfg, folder, dev, n_fast, a.reps, (1, 8), modes, deadline)
            print(f"fast decoding, {shape}: done at {time.perf_counter() - t_start:.0f} s", flush=True)
    T = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2 + 8
    lines = [f"# gpu_check ({'tiny' if a.tiny else 'paligemma-3b-pt-224 shapes'}, random weights) on {info['device']}",
             "", f"torch {info['torch']}, transformers {info['transformers']}; {cnt['total'] / 1e6:.1f}M parameters; "
             f"prompt {T} tokens; {n_new} new tokens; HF eager for parity, sdpa for speed.", "",
             "| dtype | logits rel. err (all) | rel. err (last) | last argmax equal | greedy tokens equal | "
             "prefill ms ours / HF | decode tok/s ours / HF | decode roofline tok/s |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    for name in par:
        p, s = par[name], spd[name]
        roof = bw[name] / decode_bytes_per_step(meta_model(cfg), 1, T + n_new // 2, 4 if name == "float32" else 2)
        lines.append(f"| {name} | {p['rel_err_all']:.2e} | {p['rel_err_last']:.2e} | {p['argmax_last_equal']} | "
                     f"{p['tokens_equal']:.0%} (first diff: {p['first_token_diff']}) | {s['ours']['prefill_ms']:.1f} / "
                     f"{s['hf']['prefill_ms']:.1f} | {s['ours']['decode_tok_s']:.1f} / {s['hf']['decode_tok_s']:.1f} | "
                     f"{roof:.0f} |")
    f32 = par["float32"]
    ok = f32["rel_err_all"] <= FP32_TOL and f32["tokens_equal"] == 1.0
    lines += ["", f"Bandwidth (matrix @ vector): float32 {bw['float32'] / 1e9:.0f} GB/s, "
                  f"bfloat16 {bw['bfloat16'] / 1e9:.0f} GB/s.",
              f"float32 parity: {'MATCH' if ok else 'MISMATCH'} (relative error <= {FP32_TOL:g} and identical greedy tokens).",
              f"Total time {time.perf_counter() - t_start:.0f} s."]
    if fast:
        lines += ["", f"## Fast decoding (bfloat16, {n_fast} new tokens, tokens/s from synchronised per-token timestamps, "
                      f"median of {a.reps})", ""] + fast_table(fast, roofline) + [
                  "", "Roofline = batch x bfloat16 bandwidth / bytes per step (text weights + tied embedding + KV cache). "
                      "First call = the first generate call of each path in this process (compile or capture included)."]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    info |= dict(prompt_tokens=T, new_tokens=n_new, fast_new_tokens=n_fast, total_s=time.perf_counter() - t_start)
    (out.with_suffix(".json")).write_text(json.dumps(dict(info=info, parity=par, speed=spd, bandwidth=bw, ok=ok, fast=fast,
                                                          fast_roofline_tok_s=roofline), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
