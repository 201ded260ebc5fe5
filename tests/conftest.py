"""Shared fixtures: tiny random transformers models (float32, eager, eval, seeded) used as the reference."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch
import transformers
from transformers import GemmaConfig as HFGemmaConfig, GemmaForCausalLM as HFGemmaForCausalLM
from transformers import PaliGemmaConfig as HFPaliGemmaConfig, PaliGemmaForConditionalGeneration as HFPaliGemma

transformers.logging.set_verbosity_error()


def perturb_norms(model, seed=0):
    "Norm weights start at zero (Gemma) or one (LayerNorm); give them random values so checks exercise them."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1: p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tiny_hf_gemma(seed=0, **kw):
    "A tiny random HF GemmaForCausalLM."
    torch.manual_seed(seed)
    args = dict(vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, head_dim=20, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                hidden_activation="gelu_pytorch_tanh", attn_implementation="eager") | kw
    return perturb_norms(HFGemmaForCausalLM(HFGemmaConfig(**args)).eval(), seed)


def tiny_paligemma_config_dict(kv_heads=1, text=None, vision=None, **top):
    "A PaliGemma config.json dict for a tiny model (both libraries read it)."
    v = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=28, patch_size=7, num_channels=3, layer_norm_eps=1e-6,
             vision_use_head=False) | (vision or {})
    t = dict(model_type="gemma", vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128,
             rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
             hidden_activation="gelu_pytorch_tanh") | (text or {})
    return dict(vision_config=v, text_config=t, image_token_index=299, vocab_size=t["vocab_size"],
                projection_dim=t["hidden_size"], hidden_size=t["hidden_size"], pad_token_id=0, bos_token_id=2,
                eos_token_id=1) | top


def tiny_hf_paligemma(seed=0, **kw):
    "A tiny random HF PaliGemmaForConditionalGeneration."
    torch.manual_seed(seed)
    cfg = HFPaliGemmaConfig(**tiny_paligemma_config_dict(**kw), attn_implementation="eager")
    return perturb_norms(HFPaliGemma(cfg).eval(), seed)


def left_padded_batch(lengths, vocab, seed=0, low=3):
    "Random ids (B, T) left-padded with 0, and the mask."
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(low, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def small_shapes_model(processor):
    "A tiny, randomly initialised (seed 0) PaliGemma for the bundled processor's images and vocabulary."
    import math
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    from paligemma_edu.train import init_weights, make_tiny_config
    tok = processor.tokenizer
    patch = 64 // math.isqrt(processor.image_seq_length)  # the bundled processor fixes the number of image tokens
    cfg = make_tiny_config(len(tok), tok.image_token_id, patch_size=patch, vision_width=32, vision_layers=1,
                           vision_heads=1, text_width=32, text_layers=1, text_heads=2, head_dim=16)
    return init_weights(PaliGemmaForConditionalGeneration(cfg), seed=0)


def labelled_batch(prefix_lens=(3, 6), suffix_lens=(4, 2), seed=0, image_token=299, n_image=16):
    "Left-padded rows <image>*n_image <bos> prefix \\n suffix <eos> (tiny config): ids, mask, token types, suffix labels, pixels."
    g = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for p, s in zip(prefix_lens, suffix_lens):
        pre = [image_token] * n_image + [2] + torch.randint(3, 290, (p,), generator=g).tolist() + [108]
        suf = torch.randint(3, 290, (s,), generator=g).tolist() + [1]
        rows.append(pre + suf); types.append([0] * len(pre) + [1] * len(suf))
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    tt = torch.tensor([[0] * (L - len(t)) + t for t in types])
    labels = ids.masked_fill((tt == 0) | (mask == 0), -100)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                pixel_values=torch.randn(len(rows), 3, 28, 28, generator=g))


def max_logit_gap_to_transformers(folder, batch) -> float:
    "Largest |ours - transformers| of the logits of a saved folder on a left-padded processor batch (labels dropped)."
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    ours = PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()
    theirs = HFPaliGemma.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        hf_positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0) + 1  # ours on a left-padded batch
        a, b = ours(**batch).logits, theirs(**batch, position_ids=hf_positions).logits
    return (a - b).abs().max().item()
