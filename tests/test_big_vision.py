"""big_vision .npz checkpoints: a tiny transformers PaliGemma (1 and 2) written in big_vision's naming and shapes, loaded
with from_big_vision, gives that model's logits.

The writer below is the inverse mapping, written from big_vision's own code, not from our loader:
- models/vit.py: `nn.Conv(width, patch, name="embedding")` on NHWC images (flax kernel HWIO); a learned
  `pos_embedding` of shape (1, N, width); `Encoder(scan=True)` stacks the blocks on axis 0 under
  `Transformer/encoderblock`, each `LayerNorm_0`, `MultiHeadDotProductAttention_0` (flax DenseGeneral kernels:
  query/key/value (width, heads, head_dim), out (heads, head_dim, width)), `LayerNorm_1`, `MlpBlock_0/Dense_0|1`
  (flax Dense kernels are (in, out)); `Transformer/encoder_norm`; `head` = Dense(llm width), the projector
  (models/proj/paligemma/paligemma.py passes num_classes=llm.embdim).
- models/ppp/gemma.py: `embedder/input_embedding` (vocab, width); per scanned layer `pre_attention_norm`, `attn`
  with q = einsum("BTD,NDH->BTNH", x, q_einsum) and k, v = einsum("BSD,2KDH->2BSKH", x, kv_einsum),
  out = einsum("BTNH,NHD->BTD", enc, attn_vec_einsum), `pre_ffw_norm`, `mlp` with gate = x @ gating_einsum[0],
  up = x @ gating_einsum[1], out = act @ linear; Gemma 2 adds `post_attention_norm` and `post_ffw_norm`;
  `final_norm`. RMSNorm scales are stored as `scale` (applied as 1 + scale, like transformers' Gemma norms).
"""
import numpy as np
import pytest
import torch

from conftest import tiny_hf_paligemma
from paligemma_edu.big_vision import from_big_vision
from paligemma_edu.paligemma import PaliGemmaConfig

GEMMA2 = dict(model_type="gemma2", num_hidden_layers=4, num_key_value_heads=2, query_pre_attn_scalar=16,
              sliding_window=64, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


def hf_to_big_vision(hf) -> dict:
    "A transformers PaliGemma's weights as a big_vision .npz dict (written from big_vision's layout, see above)."
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    c = hf.config
    vis, txt = c.vision_config, c.text_config
    V = "model.vision_tower."  # transformers 5.x in-memory names
    Dv, Hv = vis.hidden_size, vis.num_attention_heads
    hd = Dv // Hv
    stack = lambda fmt, f=lambda w: w: np.stack([f(sd[fmt.format(i)]) for i in range(vis.num_hidden_layers)])
    enc = V + "encoder.layers.{}."
    out = {"img/embedding/kernel": sd[V + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
           "img/embedding/bias": sd[V + "embeddings.patch_embedding.bias"],
           "img/pos_embedding": sd[V + "embeddings.position_embedding.weight"][None],
           "img/Transformer/encoder_norm/scale": sd[V + "post_layernorm.weight"],
           "img/Transformer/encoder_norm/bias": sd[V + "post_layernorm.bias"],
           "img/head/kernel": sd["model.multi_modal_projector.linear.weight"].T,
           "img/head/bias": sd["model.multi_modal_projector.linear.bias"]}
    blk = "img/Transformer/encoderblock/"
    for ln, ours in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        out[blk + ln + "/scale"] = stack(enc + ours + ".weight"); out[blk + ln + "/bias"] = stack(enc + ours + ".bias")
    for dense, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[blk + f"MlpBlock_0/{dense}/kernel"] = stack(enc + f"mlp.{ours}.weight", lambda w: w.T)
        out[blk + f"MlpBlock_0/{dense}/bias"] = stack(enc + f"mlp.{ours}.bias")
    att = blk + "MultiHeadDotProductAttention_0/"
    for name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        # flax: y[n, h] = sum_d x[d] K[d, n, h];  torch: y[n*hd + h] = sum_d W[n*hd + h, d] x[d]
        out[att + name + "/kernel"] = stack(enc + f"self_attn.{ours}.weight", lambda w: w.reshape(Hv, hd, Dv).transpose(2, 0, 1))
        out[att + name + "/bias"] = stack(enc + f"self_attn.{ours}.bias", lambda b: b.reshape(Hv, hd))
    # flax: y[d] = sum_{n,h} a[n, h] K[n, h, d];  torch: y[d] = sum_j W[d, j] a[j], j = n*hd + h
    out[att + "out/kernel"] = stack(enc + "self_attn.out_proj.weight", lambda w: w.T.reshape(Hv, hd, Dv))
    out[att + "out/bias"] = stack(enc + "self_attn.out_proj.bias")

    T = "model.language_model."
    D, H, K, Dh, L = txt.hidden_size, txt.num_attention_heads, txt.num_key_value_heads, txt.head_dim, txt.num_hidden_layers
    lstack = lambda name, f=lambda w: w: np.stack([f(sd[T + f"layers.{i}." + name]) for i in range(L)])
    out |= {"llm/embedder/input_embedding": sd[T + "embed_tokens.weight"], "llm/final_norm/scale": sd[T + "norm.weight"]}
    # einsum("BTD,NDH->BTNH"): w[n, d, h] = W[n*Dh + h, d]
    out["llm/layers/attn/q_einsum/w"] = lstack("self_attn.q_proj.weight", lambda w: w.reshape(H, Dh, D).transpose(0, 2, 1))
    out["llm/layers/attn/kv_einsum/w"] = np.stack([
        np.stack([sd[T + f"layers.{i}.self_attn.{p}_proj.weight"].reshape(K, Dh, D).transpose(0, 2, 1) for p in "kv"])
        for i in range(L)])
    # einsum("BTNH,NHD->BTD"): w[n, h, d] = W_o[d, n*Dh + h]
    out["llm/layers/attn/attn_vec_einsum/w"] = lstack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D))
    out["llm/layers/mlp/gating_einsum"] = np.stack([np.stack([sd[T + f"layers.{i}.mlp.{p}_proj.weight"].T
                                                               for p in ("gate", "up")])
                                                    for i in range(L)])
    out["llm/layers/mlp/linear"] = lstack("mlp.down_proj.weight", lambda w: w.T)
    out["llm/layers/pre_attention_norm/scale"] = lstack("input_layernorm.weight")
    if txt.model_type == "gemma2":
        out["llm/layers/post_attention_norm/scale"] = lstack("post_attention_layernorm.weight")
        out["llm/layers/pre_ffw_norm/scale"] = lstack("pre_feedforward_layernorm.weight")
        out["llm/layers/post_ffw_norm/scale"] = lstack("post_feedforward_layernorm.weight")
    else:  # Gemma 1's second norm (transformers: post_attention_layernorm) is the one before the MLP
        out["llm/layers/pre_ffw_norm/scale"] = lstack("post_attention_layernorm.weight")
    return out


def ours_config(hf) -> PaliGemmaConfig:
    return PaliGemmaConfig.from_dict(hf.config.to_dict())


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[299] * 16 + [2, 17, 43, 98, 5, 108], [0, 0] + [299] * 16 + [2, 11, 12, 108]])
    return ids, torch.randn(2, 3, 28, 28, generator=g), (ids != 0).long(), torch.zeros_like(ids)


@pytest.mark.parametrize("text", [None, GEMMA2], ids=["paligemma", "paligemma2"])
@pytest.mark.parametrize("prefix", ["", "params/"])
def test_npz_in_big_vision_layout_gives_hf_logits(tmp_path, text, prefix):
    hf = tiny_hf_paligemma(text=text)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **{prefix + k: v for k, v in hf_to_big_vision(hf).items()})
    ours = from_big_vision(npz, ours_config(hf), attn_implementation="eager")
    ids, pix, am, tt = inputs()
    pos = (am.cumsum(-1) - 1).clamp(min=0) + 1
    with torch.no_grad():
        a = ours(ids, pix, am, tt).logits
        b = hf(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt, position_ids=pos).logits
    torch.testing.assert_close(a[am.bool()], b[am.bool()], atol=1e-4, rtol=0)


def test_bfloat16_npz(tmp_path):
    "big_vision saves bfloat16 arrays as 2-byte 'void' (numpy has no bfloat16); they load as bfloat16 values."
    hf = tiny_hf_paligemma()
    bv = hf_to_big_vision(hf)
    as_void = {k: torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view("V2") for k, v in bv.items()}
    np.savez(tmp_path / "bf16.npz", **as_void)
    ours = from_big_vision(tmp_path / "bf16.npz", ours_config(hf))
    w = ours.language_model.model.embed_tokens.weight
    torch.testing.assert_close(w, torch.from_numpy(bv["llm/embedder/input_embedding"]).to(torch.bfloat16).float())


def test_missing_extra_misshaped_are_named(tmp_path):
    hf = tiny_hf_paligemma()
    bv = hf_to_big_vision(hf)
    bv.pop("img/head/bias"); bv["llm/extra/thing"] = np.zeros(3, np.float32)
    bv["llm/final_norm/scale"] = np.zeros(5, np.float32)
    np.savez(tmp_path / "bad.npz", **bv)
    with pytest.raises(ValueError) as e: from_big_vision(tmp_path / "bad.npz", ours_config(hf))
    msg = str(e.value)
    assert "missing: ['img/head/bias']" in msg and "unexpected: ['llm/extra/thing']" in msg
    assert "llm/final_norm/scale: expected (48,), found (5,)" in msg and "bad.npz" in msg


def test_vocab_rows_padded_only_when_asked(tmp_path):
    hf = tiny_hf_paligemma()
    bv = hf_to_big_vision(hf)
    bv["llm/embedder/input_embedding"] = bv["llm/embedder/input_embedding"][:296]
    np.savez(tmp_path / "short.npz", **bv)
    with pytest.raises(ValueError, match="pad_vocab=True"): from_big_vision(tmp_path / "short.npz", ours_config(hf))
    ours = from_big_vision(tmp_path / "short.npz", ours_config(hf), pad_vocab=True)
    emb = ours.language_model.model.embed_tokens.weight
    assert emb.shape[0] == 300 and emb[296:].abs().sum() == 0


@pytest.mark.parametrize("content,expect", [(b"not a zip", "is not an .npz file"), (None, "NaN")])
def test_bad_npz_files(tmp_path, content, expect):
    hf = tiny_hf_paligemma()
    p = tmp_path / "x.npz"
    if content is not None: p.write_bytes(content)
    else:
        bv = hf_to_big_vision(hf); bv["img/head/bias"][0] = np.nan; np.savez(p, **bv)
    with pytest.raises(ValueError, match=expect) as e: from_big_vision(p, ours_config(hf))
    assert "x.npz" in str(e.value)


def test_pickled_npz_is_refused(tmp_path):
    "An .npz holding a pickled object array is not unpickled."
    hf = tiny_hf_paligemma()
    bv = hf_to_big_vision(hf); bv["img/head/bias"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "p.npz", **bv)
    with pytest.raises(ValueError, match="could not read|pickle"): from_big_vision(tmp_path / "p.npz", ours_config(hf))
