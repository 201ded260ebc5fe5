"""Decode and prefill speed of every mode at three sizes and two dtypes, against transformers, in one process.

    python benchmarks/quant_matrix.py                                   # tiny, mid, 3b; float32, bfloat16; results in /tmp
    python benchmarks/quant_matrix.py --out benchmarks/results          # the committed results (quant_matrix.json / .md)
    python benchmarks/quant_matrix.py --sizes tiny --rounds 1 --new-tokens 4 --modes hf,eager,int8,int4   # smoke test
    python benchmarks/quant_matrix.py --report-only --out benchmarks/results   # rewrite the table from the json
    python benchmarks/quant_matrix.py --kernel-prefill --threads 1 --clock cpu  # one 3b MLP layer at 264 rows

Sizes: tiny = the bundled model's shapes; mid = text 512 wide, MLP 2048, 6 layers (8 heads of 64, 1 kv head), vision
4 x 256; 3b = three text layers of paligemma-3b's shapes (2048 wide, MLP 16384, 8 heads of 256, 1 kv head), vocabulary
1,664, vision 4 x 256 at 224 px (256 image tokens). Random weights (seeded) are written once per size with our
`save_pretrained`; every model is loaded from that folder: transformers (sdpa), ours float (eager loop, compile="static",
compile=True) and ours quantized on load (int8, int4; eager loop), in float32 and in bfloat16.

All models of one size and dtype live in one process, and each round runs every mode once, in an order that rotates
from round to round: the machine is shared, so only figures measured side by side are compared, as ratios. Decode:
greedy generation of exactly --new-tokens tokens at batch 1, tok/s = (n - 1) / (time after the first token). Prefill:
one forward of image + prompt (256 + 8 tokens at mid / 3b) filling a cache, logits of the last position. Roofline: the
bytes one decode step reads (every tensor of the text layers, the final norm and the embedding table read as the LM
head, in their stored dtype, plus the KV cache), divided by the memory bandwidth measured in the same process (the
faster of a float32 and a bfloat16 matrix-vector product over a 256 MiB matrix). --clock cpu times everything in this
process's CPU time instead of wall time (with --threads 1): on a machine busy with other work, a wall clock also counts
the time the process waited for a core. The first call of compile=True
(its compile, or its load from the compile cache) is reported separately and never counted in a round.
Results go to --out (default: a folder under /tmp); committed results are only replaced when --out names them.
"""
from __future__ import annotations
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (configs, inputs, timed generation shared with run.py)

MODES = ("hf", "eager", "static", "compiled", "int8", "int4")
NAMES = {"hf": "transformers (sdpa)", "eager": "ours eager", "static": 'ours compile="static"', "compiled": "ours compile=True",
         "int8": 'ours quantize="int8"', "int4": 'ours quantize="int4"'}
TARGETS = dict(int4_x=2.0, int8_x=1.3, tiny_x=1.0, int4_prefill_x=1.1, compiled_mid_hf_x=2.0, compiled_mid_roofline=0.8)


def _vision(width=256, layers=4, size=224):
    return dict(model_type="siglip_vision_model", hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=4, image_size=size, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                attention_dropout=0.0, hidden_act="gelu_pytorch_tanh", vision_use_head=False)


def configs() -> dict:
    "tiny (the bundled shapes), mid, 3b (three layers of paligemma-3b's text shapes)."
    mid = bench._pg(_vision(), bench._text(1664, 512, 2048, 6, 8, 1, 64), 1663, "mid: text 512 x 6, MLP 2048")
    b3 = bench._pg(_vision(), bench._text(1664, 2048, 16384, 3, 8, 1, 256), 1663, "3 layers of paligemma-3b's text shapes")
    for d in (mid, b3): d["vision_config"]["projection_dim"] = d["text_config"]["hidden_size"]
    return {"tiny": bench.tiny_config(), "mid": mid, "3b": b3}


def write_model(cfg: dict, folder: Path, seed: int = 0) -> Path:
    "Random float32 weights (seeded) of a config, saved with our save_pretrained."
    import torch
    from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    torch.manual_seed(seed)
    m = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")}))
    with torch.no_grad():
        for p in m.parameters(): p.normal_(0, 0.02)
    return m.save_pretrained(folder)


def step_bytes(model, seq_len: int) -> int:
    "Bytes a decode step reads: every tensor of the text layers, final norm and embedding table (stored dtypes) + KV cache."
    from paligemma_edu.attention import kv_bytes_per_token
    lm = model.language_model
    mods = [lm.model.layers, lm.model.norm, lm.model.embed_tokens]
    n = sum({t.data_ptr(): t.numel() * t.element_size() for m in mods for t in [*m.parameters(), *m.buffers()]}.values())
    c, itemsize = lm.cfg, next(model.parameters()).element_size()
    return n + seq_len * kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, itemsize)


def bandwidth() -> float:
    "Bytes per second streamed by a matrix-vector product over a 256 MiB matrix (the faster of float32 and bfloat16)."
    import torch
    best = 0.0
    for dt in (torch.float32, torch.bfloat16):
        w = torch.randn(8192, (1 << 28) // 8192 // dt.itemsize).to(dt)
        x = torch.randn(w.shape[1]).to(dt)
        w @ x
        ts = []
        for _ in range(5):
            t0 = NOW(); w @ x; ts.append(NOW() - t0)
        best = max(best, w.numel() * dt.itemsize / min(ts))
    return best


def load_all(folder: Path, dtype, modes) -> dict:
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration as Ours
    out = {}
    for mode in modes:
        if mode == "hf": out[mode] = bench.load("hf_sdpa", str(folder), dtype)
        elif mode in ("int8", "int4"): out[mode] = Ours.from_pretrained(folder, dtype=dtype, quantize=mode).eval()
        elif mode == "eager" or "eager" not in out: out[mode] = Ours.from_pretrained(folder, dtype=dtype).eval()
        else: out[mode] = out["eager"]  # static / compiled: the same float model, another decode path
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
NOW = time.perf_counter  # set by --clock


class Clock:
    "Timestamps of every new token (NOW): a callable for our generate, put/end for transformers' streamer protocol."
    def __init__(self, skip_first_put=False): self.t, self.skip = [], skip_first_put
    def __call__(self, tok): self.t.append(NOW())
    def put(self, value):
        if self.skip: self.skip = False; return  # transformers first puts the prompt
        self.t.append(NOW())
    def end(self): pass


def run_mode(mode, model, inp, n_new):
    "(decode tok/s, prefill s) of one mode: one greedy generation of exactly n_new tokens, then one prefill."
    import torch
    clock = Clock(skip_first_put=mode == "hf")
    t0 = NOW()
    with torch.inference_mode():
        if mode == "hf": out = model.generate(**inp, max_new_tokens=n_new, do_sample=False, streamer=clock)
        else:
            fast = {"static": "static", "compiled": True}.get(mode, False)
            out = model.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], inp["token_type_ids"],
                                 max_new_tokens=n_new, eos_token_id=[], streamer=clock, compile=fast)
    total = NOW() - t0
    if out.shape[1] - inp["input_ids"].shape[1] != n_new: raise RuntimeError(f"{mode}: not {n_new} new tokens")
    t1 = NOW()
    bench.prefill("hf_sdpa" if mode == "hf" else "ours", model, inp)
    return (n_new - 1) / (total - (clock.t[0] - t0)), NOW() - t1


def measure(size: str, cfg: dict, folder: Path, dtype_name: str, modes, rounds: int, n_new: int, bw: float) -> dict:
    import torch
    dtype = getattr(torch, dtype_name)
    models = load_all(folder, dtype, modes)
    inp = bench.make_inputs(cfg, 1, dtype)
    res = dict(size=size, dtype=dtype_name, decode={m: [] for m in modes}, prefill={m: [] for m in modes})
    for mode in modes:  # warm-up; compile=True compiles (or loads from the compile cache) here
        t0 = time.perf_counter()
        run_mode(mode, models[mode], inp, n_new)
        if mode == "compiled": res["compiled_first_call_wall_s"] = time.perf_counter() - t0
    for r in range(rounds):
        order = list(modes[r % len(modes):]) + list(modes[:r % len(modes)])
        for mode in order:
            tok_s, pre_s = run_mode(mode, models[mode], inp, n_new)
            res["decode"][mode].append(tok_s); res["prefill"][mode].append(pre_s)
    T = inp["input_ids"].shape[1] + n_new // 2
    res["step_bytes"] = {m: step_bytes(models[m], T) for m in modes if m != "hf"}
    res["roofline_tok_s"] = {m: bw / b for m, b in res["step_bytes"].items()}
    res["ratios"] = ratios(res)
    del models
    return res


def ratios(res: dict) -> dict:
    "Per-round ratios (median over rounds): decode against ours eager and transformers, prefill against ours eager."
    d, p = res["decode"], res["prefill"]
    med = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    out = {}
    for m in d:
        if "eager" in d: out[f"{m}_vs_eager"] = med(d[m], d["eager"])
        if "hf" in d: out[f"{m}_vs_hf"] = med(d[m], d["hf"])
        if "eager" in p: out[f"{m}_prefill_vs_eager"] = med(p[m], p["eager"])
    return out


def table(results: list, bw: float) -> str:
    "Markdown: per size and dtype, decode tok/s (median), x ours eager, x transformers, % of roofline, prefill ms."
    rows = ["| size | dtype | mode | decode tok/s | x ours float | x transformers | of roofline | prefill ms | prefill x float |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        q = r["ratios"]
        for m in r["decode"]:
            tok_s, roof = statistics.median(r["decode"][m]), r["roofline_tok_s"].get(m)
            frac = "" if roof is None else f"{tok_s / roof:.0%}"
            x = {k: q.get(f"{m}_{k}", float("nan")) for k in ("vs_eager", "vs_hf", "prefill_vs_eager")}
            rows.append(f"| {r['size']} | {r['dtype']} | {NAMES[m]} | {tok_s:.1f} | {x['vs_eager']:.2f} | {x['vs_hf']:.2f} | "
                        f"{frac} | {1e3 * statistics.median(r['prefill'][m]):.0f} | {x['prefill_vs_eager']:.2f} |")
    bws = sorted({f"{r.get('bandwidth_Bps', bw) / 1e9:.1f}" for r in results})
    return "\n".join(rows) + f"\n\nMemory bandwidth measured in the same process, same clock: {' / '.join(bws)} GB/s."


def write_atomic(path: Path, text: str):
    "Write text to a temporary name beside path, then rename it over path."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text); os.replace(tmp, path)


def write_report(out: Path, info: dict):
    info["table_md"] = table(info["results"], info["bandwidth_Bps"])
    write_atomic(out / "quant_matrix.json", json.dumps(info, indent=1))
    write_atomic(out / "quant_matrix.md", info["table_md"] + "\n")
    return out / "quant_matrix.md"


def kernel_prefill(rows: int = 264, reps: int = 5) -> dict:
    "One 16384 x 2048 layer (paligemma-3b's MLP) at prompt length, bfloat16: ms of CPU time per call, least of reps."
    import torch
    from paligemma_edu.quantization import QuantLinear, Workspace, int4_matmul_dense
    lin = torch.nn.Linear(2048, 16384, bias=False).bfloat16().requires_grad_(False)
    q4, q8 = QuantLinear.from_linear(lin, 4), QuantLinear.from_linear(lin, 8, workspace=Workspace())  # as in a model
    x = torch.randn(rows, 2048).bfloat16()
    calls = {"bfloat16 matmul": lambda: lin(x), "int8 layer": lambda: q8(x),
             "int4 layer (C unpack, dense matmul)": lambda: int4_matmul_dense(x, q4.qweight, q4.scale_zero, 64, fused=True),
             "int4 layer (torch passes, dense matmul)": lambda: int4_matmul_dense(x, q4.qweight, q4.scale_zero, 64, fused=False),
             "int4 kernel": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.qweight, 64, q4.scale_zero)}
    out = {}
    with torch.inference_mode():
        for name, f in calls.items():
            f()
            best = float("inf")
            for _ in range(reps):
                t0 = NOW(); f(); best = min(best, NOW() - t0)
            out[name] = best * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mid,3b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "quant_matrix"))
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (with --threads 1: robust to other work on the machine)")
    ap.add_argument("--append", action="store_true",
                    help="keep the results already in --out, replacing those of the same size and dtype")
    ap.add_argument("--kernel-prefill", action="store_true",
                    help="only time one 3b MLP layer at 264 rows, every format (appended to --out/kernel_prefill.json)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.report_only:
        print(write_report(out, json.loads((out / "quant_matrix.json").read_text())).read_text()); return
    global NOW
    NOW = CLOCKS[a.clock]
    if a.clock == "cpu" and a.threads != 1: ap.error("--clock cpu counts the CPU time of all threads: use --threads 1")
    bench._torch(a.threads)
    if a.kernel_prefill:  # appended to --out/kernel_prefill.json
        run = dict(command="python benchmarks/quant_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), clock=a.clock, threads=a.threads,
                   ms={k: round(v, 1) for k, v in kernel_prefill().items()})
        f = out / "kernel_prefill.json"
        runs = json.loads(f.read_text())["runs"] if f.exists() else []
        write_atomic(f, json.dumps({"runs": runs + [run]}, indent=1))
        print(json.dumps(run["ms"])); return
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    modes = [m for m in a.modes.split(",") if m]
    if bad := set(modes) - set(MODES): ap.error(f"unknown modes {sorted(bad)}; expected some of {MODES}")
    cfgs, bw = configs(), bandwidth()
    info = dict(command="python benchmarks/quant_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=a.threads, clock=a.clock,
                new_tokens=a.new_tokens, rounds=a.rounds, machine=bench.machine(), bandwidth_Bps=bw, results=[],
                configs={s: cfgs[s] for s in a.sizes.split(",")})
    if a.append and (out / "quant_matrix.json").exists():
        old = json.loads((out / "quant_matrix.json").read_text())
        keep = {k: v for k, v in old.items() if k not in ("results", "earlier_runs", "table_md")}
        info["earlier_runs"] = old.get("earlier_runs", []) + [keep]
        info["configs"] = old["configs"] | info["configs"]
        info["results"] = [r | {"bandwidth_Bps": r.get("bandwidth_Bps", old["bandwidth_Bps"])} for r in old["results"]]
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            folder = write_model(cfgs[size], Path(tmp) / size)
            for dt in a.dtypes.split(","):
                r = measure(size, cfgs[size], folder, dt, modes, a.rounds, a.new_tokens, bw)
                r |= dict(bandwidth_Bps=bw, command=info["command"], date=info["date"])
                info["results"] = [x for x in info["results"] if (x["size"], x["dtype"]) != (size, dt)] + [r]
                print(size, dt, {m: round(statistics.median(v), 1) for m, v in r["decode"].items()},
                      {k: round(v, 2) for k, v in r["ratios"].items() if "vs_eager" in k}, flush=True)
                write_report(out, info)  # after every configuration: a partial run leaves its results
    print(write_report(out, info).read_text())


if __name__ == "__main__":
    main()
