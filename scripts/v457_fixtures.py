"""Checkpoint folders written by transformers 4.57.1, for tests/test_v457_folders.py, and the check that folders saved by
this library (and by transformers 5.24) load back in 4.57.

transformers 4.57.1 is not a dependency of the project: run the `make` and `check` steps by hand in a side virtual
environment, the `resave` step in the project's own one (from the repository root):

    python -m venv /tmp/v457 && /tmp/v457/bin/pip install torch==2.13.0 transformers==4.57.1 sentencepiece protobuf
    /tmp/v457/bin/python scripts/v457_fixtures.py make tests/fixtures/v457
    .venv/bin/python scripts/v457_fixtures.py resave tests/fixtures/v457 /tmp/v457-resaved
    /tmp/v457/bin/python scripts/v457_fixtures.py check /tmp/v457-resaved tests/fixtures/v457/reload_in_4.57.json

`make` writes two tiny PaliGemma folders with 4.57's own `save_pretrained` (model and processor), each packed as
NAME.tar.gz (the 1152 <loc>/<seg> tokens make the tokenizer JSON files large but very compressible):
  pg1-fast/  PaliGemma 1 (Gemma decoder), fast tokenizer only (tokenizer.json, no tokenizer.model)
  pg2-slow/  PaliGemma 2 (Gemma 2 decoder, soft-capping, sliding window 8), slow tokenizer only (tokenizer.model +
             tokenizer_config.json with added_tokens_decoder)
each with expected.safetensors: two images, a left-padded batch as 4.57's processor builds it, 4.57's logits at the
last positions, its greedy tokens (and, for pg2, the greedy tokens of each row run alone), and expected.json.
`resave` loads each folder with this library and with transformers 5.24 and saves it again; `check` loads those in
4.57 and records whether every weight loaded and how far the logits are from the stored ones.
"""
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

TEXTS = ["caption en", "answer en what color is the big square on the left?", "detect circle ; square", "segment the cat",
         "a red square on a blue background", "two green circles and a yellow triangle", "how many shapes are there? 3",
         "the quick brown fox jumps over the lazy dog"] * 20
PROMPTS = ["caption en", "answer en what color is the big square on the left?"]
IMAGE_SIZE, PATCH = 28, 7
N_LAST, MAX_NEW = 4, 12


def train_spm(path: Path):
    "A small Gemma-like BPE SentencePiece model (pad 0, eos 1, bos 2, unk 3, byte fallback)."
    import sentencepiece as spm
    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=buf, model_type="bpe", vocab_size=320, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path.write_bytes(buf.getvalue())


def tiny_model(kind: str, vocab: int, image_token: int, seed: int):
    "A tiny random PaliGemma (kind 'gemma' or 'gemma2') whose norms and (for gemma2) attention scores are not trivial."
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    D, mul = (16, 3.0) if kind == "gemma" else (32, 2.0)  # sizes where greedy decoding does not just repeat a token
    gemma1 = kind == "gemma"
    text = dict(model_type=kind, vocab_size=vocab, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2 if gemma1 else 4,
                num_attention_heads=2, num_key_value_heads=1 if gemma1 else 2, head_dim=D // 2, max_position_embeddings=128,
                rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_activation="gelu_pytorch_tanh")
    if kind == "gemma2":
        text |= dict(query_pre_attn_scalar=D // 2, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token, projection_dim=D,
                          hidden_size=D, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1: p.add_(torch.randn(p.shape, generator=g) * 0.3)
            if "language" in n and p.ndim == 2 and "embed" not in n: p.mul_(mul)  # layers that matter: no echo of the input
        model.language_model.norm.weight.add_(20.0)  # logits of a few units, so the final soft-cap (3.0) shows
    model.generation_config.eos_token_id = None  # greedy for exactly MAX_NEW tokens
    return model


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (20 + 9 * i, 30 - 4 * i, 3), dtype=np.uint8) for i in range(2)]


def decode_masks(model, inputs):
    "What each layer's eager attention receives at the first decode step: key count and the mask row of row 0."
    import transformers.models.gemma2.modeling_gemma2 as g2
    seen, orig = [], g2.eager_attention_forward
    def spy(module, query, key, value, attention_mask, **kw):
        if query.shape[2] == 1:  # a decode step (one query)
            seen.append(dict(layer=module.layer_idx, sliding=module.sliding_window is not None, keys=key.shape[2],
                             mask_columns=attention_mask.shape[-1],
                             row0_mask_used=(attention_mask[0, 0, 0, :key.shape[2]] == 0).int().tolist()))
        return orig(module, query, key, value, attention_mask, **kw)
    model.config._attn_implementation = model.config.text_config._attn_implementation = "eager"
    g2.eager_attention_forward = spy
    try:
        with torch.no_grad(): model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        g2.eager_attention_forward = orig
        model.config._attn_implementation = model.config.text_config._attn_implementation = "sdpa"
    return seen


def make(out: Path):
    import transformers
    from safetensors.torch import save_file
    from transformers import GemmaTokenizer, GemmaTokenizerFast, PaliGemmaProcessor, SiglipImageProcessor
    assert transformers.__version__ == "4.57.1", f"run this step with transformers 4.57.1, found {transformers.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"; work.mkdir(exist_ok=True)
    train_spm(work / "tokenizer.model")
    fast_dir = work / "fast"
    GemmaTokenizerFast(vocab_file=str(work / "tokenizer.model")).save_pretrained(fast_dir)
    (fast_dir / "tokenizer.model").unlink(missing_ok=True)          # a fast-only tokenizer: tokenizer.json alone
    toks = {"pg1-fast": GemmaTokenizerFast.from_pretrained(fast_dir),
            "pg2-slow": GemmaTokenizer(vocab_file=str(work / "tokenizer.model"))}
    seeds = {"pg1-fast": 0, "pg2-slow": 2}  # pg2: a seed whose padded row's greedy tokens change in 4.57 (not every seed's do)
    for name, tok in toks.items():
        seed = seeds[name]
        tok.padding_side = "left"  # as PaliGemma's published tokenizers
        ip = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_normalize=True,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
        ip.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
        proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <image> and the <loc>/<seg> tokens
        model = tiny_model("gemma" if name.startswith("pg1") else "gemma2", len(tok), proc.image_token_id, seed)
        d = out / name
        model.save_pretrained(d); proc.save_pretrained(d)
        ims = images()
        inputs = proc(images=ims, text=PROMPTS, return_tensors="pt", padding="longest")
        gave_tt = "token_type_ids" in inputs  # 4.57's processor returns them only with a suffix
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # the prompt is all prefix
        with torch.no_grad():
            logits = model(**inputs).logits[:, -N_LAST:]
            no_tt = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[:, -N_LAST:]
            gen = dict(max_new_tokens=MAX_NEW, do_sample=False, output_scores=True, return_dict_in_generate=True)
            out_b = model.generate(**inputs, **gen)
            tokens = out_b.sequences[:, inputs["input_ids"].shape[1]:]
            alone, step_diff = [], []
            for b in range(len(PROMPTS)):
                one = proc(images=[ims[b]], text=[PROMPTS[b]], return_tensors="pt")
                one["token_type_ids"] = torch.zeros_like(one["input_ids"])
                out_1 = model.generate(**one, **gen)
                alone.append(out_1.sequences[0, one["input_ids"].shape[1]:])
                step_diff.append([float((sb[b] - s1[0]).abs().max()) for sb, s1 in zip(out_b.scores, out_1.scores)])
        spy = decode_masks(model, inputs) if name == "pg2-slow" else None
        tensors = {"image0": torch.from_numpy(ims[0]), "image1": torch.from_numpy(ims[1]), "logits_last": logits,
                   "tokens": tokens, "tokens_alone": torch.stack(alone), "pixel_values": inputs["pixel_values"],
                   **{k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "expected.safetensors"))
        (d / "expected.json").write_text(json.dumps(dict(
            prompts=PROMPTS, last_positions=N_LAST, max_new_tokens=MAX_NEW, transformers=transformers.__version__,
            torch=torch.__version__, tokenizer=type(tok).__name__, vocab_size=len(tok), image_token_id=proc.image_token_id,
            processor_returned_token_type_ids=gave_tt,
            max_abs_logit_change_without_token_type_ids=float((no_tt - logits).abs().max()),
            padded_vs_alone_max_abs_logit_diff_per_step=step_diff,
            first_decode_step_masks=spy,
            files=sorted(p.name for p in d.iterdir() if not p.name.startswith("expected"))), indent=2) + "\n")
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:  # one small archive per folder
            for p in sorted(d.iterdir()): tar.add(p, arcname=f"{name}/{p.name}")
        print(name, sorted(p.name for p in d.iterdir()), "tokens", tokens.tolist())
        shutil.rmtree(d)
    shutil.rmtree(work)


def unpack(fixtures: Path, into: Path) -> list:
    "Extract every NAME.tar.gz of `fixtures` into `into`; the extracted folders."
    into.mkdir(parents=True, exist_ok=True)
    for arc in sorted(fixtures.glob("*.tar.gz")):
        with tarfile.open(arc) as tar: tar.extractall(into, filter="data")
    return sorted(p for p in into.iterdir() if (p / "config.json").exists())


def resave(fixtures: Path, out: Path):
    "Load each fixture with this library and with transformers 5.24 and save it again (project venv)."
    import transformers
    from transformers import PaliGemmaForConditionalGeneration as HF
    from paligemma_edu import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    v = transformers.__version__
    for d in unpack(fixtures, out / "_fixtures"):
        ours = PaliGemmaForConditionalGeneration.from_pretrained(d)
        ours.save_pretrained(out / f"paligemma_edu__{d.name}", processor=PaliGemmaProcessor.from_pretrained(d))
        hf = HF.from_pretrained(d)
        hf.save_pretrained(out / f"transformers {v}, loaded from the 4.57 folder__{d.name}")
        fresh = HF(hf.config); fresh.load_state_dict(hf.state_dict())  # a model made in 5.24 (e.g. trained there)
        fresh.save_pretrained(out / f"transformers {v}, built in {v}__{d.name}")
        print("saved", d.name)


def check(resaved: Path, result: Path):
    "Load every re-saved folder in transformers 4.57.1; record missing weights and the logits against the fixtures."
    import transformers
    from safetensors.torch import load_file
    from transformers import PaliGemmaForConditionalGeneration as HF
    transformers.logging.set_verbosity_error()
    fixtures = resaved / "_fixtures"
    rows = []
    for d in sorted(p for p in resaved.iterdir() if p.is_dir() and p.name != "_fixtures"):
        saved_by, name = d.name.split("__")
        exp = load_file(str(fixtures / name / "expected.safetensors"))
        model, info = HF.from_pretrained(d, output_loading_info=True)
        inputs = {k: exp[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
        with torch.no_grad(): logits = model.eval()(**inputs).logits[:, -exp["logits_last"].shape[1]:]
        rows.append(dict(saved_by=saved_by, fixture=name,
                         missing=len(info["missing_keys"]), unexpected=len(info["unexpected_keys"]),
                         max_abs_logit_diff=float((logits - exp["logits_last"]).abs().max())))
        print(rows[-1])
    result.write_text(json.dumps(dict(transformers=transformers.__version__, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"make": make, "resave": resave, "check": check}[cmd](*map(Path, args))
