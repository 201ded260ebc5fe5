"""Parity and speed of paligemma_edu against transformers at full PaliGemma size, on one GPU.

    python benchmarks/gpu_check.py                      # paligemma-3b-pt-224 shapes, random weights, CUDA
    python benchmarks/gpu_check.py --tiny --device cpu  # the same checks on a tiny config (seconds)

Random weights (norms perturbed so they matter) are written once with our `save_pretrained` in bfloat16 and loaded by
both libraries, in float32 (TF32 off) and in bfloat16. Checks: last-position and full-sequence logits (relative error =
max |ours - HF| / max |HF|), greedy tokens. Speed: prefill latency and decode tokens/s at batch 1 (exactly N new
tokens), both libraries (HF with sdpa attention), plus the device's memory-bandwidth roofline for decode.
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
from run import full_config, make_inputs, _text, _pg, counts, decode_bytes_per_step  # noqa: E402

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
    "Prefill latency (ms) and decode tok/s at batch 1 for both: decode = (n_new - 1) / (generate time - prefill time)."
    res = {}
    for name, m in (("ours", ours), ("hf", hf)):
        with torch.inference_mode():
            if name == "ours":
                pre = lambda: m(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                                cache=m.new_cache(1, inp["input_ids"].shape[1] + 1), logits_to_keep=1)
                gen = lambda: m.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                                         max_new_tokens=n_new, eos_token_id=[])
            else:
                pre = lambda: m(**inp, logits_to_keep=1, use_cache=True)
                gen = lambda: m.generate(**inp, max_new_tokens=n_new, do_sample=False)
            t_pre = timeit(pre, dev, reps)
            t_gen = timeit(gen, dev, reps)
        res[name] = dict(prefill_ms=t_pre * 1e3, decode_tok_s=(n_new - 1) / max(t_gen - t_pre, 1e-9))
    return res


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
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cpu": torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = tiny_config() if a.tiny else full_config()
    n_new = a.new_tokens or (8 if a.tiny else 32)
    out = Path(a.out) if a.out else HERE / "results" / f"gpu_check_{'tiny' if a.tiny else 'full'}_{dev.type}.md"
    t_start = time.perf_counter()
    rows, info = [], dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__)
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
    T = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2 + 8
    lines = [f"# gpu_check ({'tiny' if a.tiny else 'paligemma-3b-pt-224 shapes'}, random weights) on {info['device']}",
             "", f"torch {info['torch']}, transformers {info['transformers']}; {cnt['total'] / 1e6:.1f}M parameters; "
             f"prompt {T} tokens; {n_new} new tokens; HF eager for parity, sdpa for speed.", "",
             "| dtype | logits rel. err (all) | rel. err (last) | last argmax equal | greedy tokens equal | "
             "prefill ms ours / HF | decode tok/s ours / HF | decode roofline tok/s |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    for name in par:
        p, s = par[name], spd[name]
        roof = bw[name] / decode_bytes_per_step(cfg, cnt, 1, T + n_new // 2, 4 if name == "float32" else 2)
        lines.append(f"| {name} | {p['rel_err_all']:.2e} | {p['rel_err_last']:.2e} | {p['argmax_last_equal']} | "
                     f"{p['tokens_equal']:.0%} (first diff: {p['first_token_diff']}) | {s['ours']['prefill_ms']:.1f} / "
                     f"{s['hf']['prefill_ms']:.1f} | {s['ours']['decode_tok_s']:.1f} / {s['hf']['decode_tok_s']:.1f} | {roof:.0f} |")
    f32 = par["float32"]
    ok = f32["rel_err_all"] <= FP32_TOL and f32["tokens_equal"] == 1.0
    lines += ["", f"Bandwidth (matrix @ vector): float32 {bw['float32'] / 1e9:.0f} GB/s, bfloat16 {bw['bfloat16'] / 1e9:.0f} GB/s.",
              f"float32 parity: {'MATCH' if ok else 'MISMATCH'} (relative error <= {FP32_TOL:g} and identical greedy tokens).",
              f"Total time {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(dict(info=info, parity=par, speed=spd, bandwidth=bw, ok=ok), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
