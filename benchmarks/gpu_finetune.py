"""LoRA training steps at paligemma-3b size on one GPU: ours against transformers + peft, same weights and batch.

    python benchmarks/gpu_finetune.py                      # paligemma-3b-pt-224 shapes, random bf16 weights, CUDA
    python benchmarks/gpu_finetune.py --tiny --device cpu  # the same run on a tiny config (seconds)

Random weights are written once with our `save_pretrained` (bfloat16) and loaded by both libraries in bfloat16. A batch
of 8 (256 image tokens, a 16-token prompt and a 16-token answer each; labels on the answer) trains LoRA (rank 16,
alpha 32, peft's Gemma targets q/k/v/o/gate/up/down, float32 adapters on both sides), AdamW, with or without gradient
checkpointing. Reported per implementation: median step time (forward with the loss, backward, optimizer step) over
--steps steps after 2 warm-up steps, and the peak device memory of training (torch.cuda.max_memory_allocated). The
two sides run one after the other in one process, the first model freed before the second loads. Designed to finish
in well under 8 minutes on one GPU; writes JSON and a markdown table to --out.
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
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import full_config  # noqa: E402
from gpu_check import sync, tiny_config  # noqa: E402  (the same tiny model and device sync as the decode check)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = 16  # prompt tokens and answer tokens


def build_weights(cfg: dict, folder: Path, dev):
    "Random model saved in bfloat16 with our save_pretrained."
    from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from paligemma_edu.train import init_weights
    with torch.device(dev):
        m = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")}))
    init_weights(m, seed=0)
    m.to(torch.bfloat16).save_pretrained(folder)
    del m
    if dev.type == "cuda": torch.cuda.empty_cache()


def make_batch(cfg: dict, batch: int, dev) -> dict:
    "<image> x N, <bos>, TEXT prompt tokens, '\\n', TEXT answer tokens; token types and labels on the answer."
    g = torch.Generator().manual_seed(0)
    v = cfg["vision_config"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    hi = min(cfg["vocab_size"], cfg["image_token_index"])
    prompt, ans = torch.randint(3, hi, (batch, TEXT), generator=g), torch.randint(3, hi, (batch, TEXT), generator=g)
    ids = torch.cat([torch.full((batch, n_img), cfg["image_token_index"]), torch.full((batch, 1), 2), prompt,
                     torch.full((batch, 1), 108 % hi), ans], 1)
    tt = torch.zeros_like(ids); tt[:, -TEXT:] = 1
    labels = ids.masked_fill(tt == 0, -100)
    pix = torch.rand(batch, 3, v["image_size"], v["image_size"], generator=g).mul(2).sub(1).to(torch.bfloat16)
    return {k: t.to(dev) for k, t in dict(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                                          token_type_ids=tt, labels=labels).items()}


def load(impl: str, folder: Path, dev, gc: bool):
    if impl == "ours":
        from paligemma_edu.finetune import set_trainable
        from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device=dev)
        set_trainable(model, "lora", lora_rank=16, lora_alpha=32, lora_targets=TARGETS)
        if gc: model.gradient_checkpointing_enable()
    else:
        import transformers
        from peft import LoraConfig, get_peft_model
        transformers.logging.set_verbosity_error()
        from transformers import PaliGemmaForConditionalGeneration as HF
        model = HF.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
        if gc: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
        for p in model.parameters():  # adapters in float32, as ours
            if p.requires_grad: p.data = p.data.float()
    model.train()
    return model


def measure(impl: str, folder: Path, dev, batch: dict, steps: int, gc: bool) -> dict:
    if dev.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model = load(impl, folder, dev, gc)
    weights = torch.cuda.memory_allocated() if dev.type == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ts, losses = [], []
    for i in range(steps + 2):
        sync(dev); t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        sync(dev); ts.append(time.perf_counter() - t0); losses.append(loss.item())
    out = dict(impl=impl, step_s=round(statistics.median(ts[2:]), 4), trainable=sum(p.numel() for p in params),
               first_loss=losses[0], last_loss=losses[-1])
    if dev.type == "cuda":
        out |= dict(peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2), weights_gb=round(weights / 2**30, 2))
    del model, opt, params
    if dev.type == "cuda": torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true"); p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=8); p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-gc", action="store_true", help="without gradient checkpointing (more memory)")
    p.add_argument("--out", default=str(HERE / "results" / "transfer" / "gpu_finetune.md"))
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available(): sys.exit("no CUDA device; use --tiny --device cpu")
    cfg = tiny_config() if a.tiny else full_config()
    t0 = time.perf_counter()
    res = dict(config=cfg["_source"], device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               batch_size=a.batch_size, gradient_checkpointing=not a.no_gc, lora="rank 16, alpha 32, " + "/".join(TARGETS),
               command="python benchmarks/gpu_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv), rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        build_weights(cfg, Path(tmp), dev)
        batch = make_batch(cfg, a.batch_size, dev)
        for impl in ("ours", "hf"):
            res["rows"].append(measure(impl, Path(tmp), dev, batch, a.steps, not a.no_gc))
            print(res["rows"][-1], flush=True)
    o, h = res["rows"]
    res["speedup"] = round(h["step_s"] / o["step_s"], 2)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    mem = lambda r: f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-"
    md = [f"# gpu_finetune ({res['config']}, {res['device']}, batch {a.batch_size}, LoRA {res['lora']}, "
          f"gradient checkpointing {'on' if res['gradient_checkpointing'] else 'off'})", "",
          "| | step (s) | peak memory (GB) | trainable |", "|---|---|---|---|",
          f"| ours | {o['step_s']:.3f} | {mem(o)} | {o['trainable']:,} |",
          f"| transformers + peft | {h['step_s']:.3f} | {mem(h)} | {h['trainable']:,} |", "",
          f"speed-up {res['speedup']}x; {res['seconds']} s in all; `{res['command']}`"]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n"); out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
