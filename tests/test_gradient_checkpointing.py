"""Gradient checkpointing recomputes layers in backward: the same loss and gradients, and no effect outside training."""
import pytest
import torch

from conftest import labelled_batch, tiny_paligemma_config_dict
from paligemma_edu.gemma import GemmaConfig, GemmaForCausalLM
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration

IMG, N = 299, 16  # image token id, (28 / 7) ** 2 image tokens


def paligemma(seed=0, **text):
    "A tiny random PaliGemma (float32) with non-trivial norms; `text` overrides text_config fields."
    torch.manual_seed(seed)
    m = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(tiny_paligemma_config_dict(text=text)))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n and p.ndim == 1: p.normal_(0, 0.3)
    return m


def batch(seed=0):
    "Two left-padded rows with token types, labels and pixels, as a tuple (ids, pixels, mask, token types, labels)."
    b = labelled_batch(seed=seed, image_token=IMG, n_image=N)
    return b["input_ids"], b["pixel_values"], b["attention_mask"], b["token_type_ids"], b["labels"]


def step(model, checkpointing: bool, data):
    "Loss and every parameter gradient of one training step."
    model.train(); model.zero_grad()
    if checkpointing: model.gradient_checkpointing_enable()
    else: model.gradient_checkpointing_disable()
    ids, pix, mask, tt, labels = data
    loss = model(ids, pix, mask, tt, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_same_gradients(model_type):
    text = dict(model_type="gemma2", sliding_window=8) if model_type == "gemma2" else {}
    model, data = paligemma(**text), batch()
    loss0, g0 = step(model, False, data)
    loss1, g1 = step(model, True, data)
    assert model.vision_tower.encoder.gradient_checkpointing and model.language_model.model.gradient_checkpointing
    assert len(g0) == len(list(model.parameters()))  # every parameter gets a gradient
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    torch.testing.assert_close(g1, g0)


def test_layers_are_recomputed():
    "Each layer runs again in backward (pre-hooks count it: recomputation stops early, so post-hooks may not fire)."
    model, data = paligemma(), batch()
    calls = []
    for layer in [*model.vision_tower.encoder.layers, *model.language_model.model.layers]:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    step(model, False, data)
    plain = len(calls); calls.clear()
    step(model, True, data)
    assert plain == 4 and len(calls) == 2 * plain


def test_eval_unchanged():
    "In eval mode (or without gradients) checkpointing does nothing: same logits, no recomputation."
    model, (ids, pix, mask, tt, _) = paligemma(), batch()
    model.eval()
    with torch.no_grad(): want = model(ids, pix, mask, tt).logits
    model.gradient_checkpointing_enable()
    with torch.no_grad(): got = model(ids, pix, mask, tt).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    model.train()
    with torch.no_grad(): got = model(ids, pix, mask, tt).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    model.gradient_checkpointing_disable()
    assert not model.vision_tower.encoder.gradient_checkpointing and not model.language_model.model.gradient_checkpointing


def test_causal_lm_and_cache():
    "GemmaForCausalLM has the same methods; a forward with a KV cache in train mode is not checkpointed and still fills it."
    torch.manual_seed(0)
    lm = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    ids = torch.randint(3, 64, (2, 7))
    lm.train(); lm.zero_grad()
    lm(ids, labels=ids).loss.backward()
    g0 = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(); lm.gradient_checkpointing_enable()
    lm(ids, labels=ids).loss.backward()
    torch.testing.assert_close({n: p.grad for n, p in lm.named_parameters()}, g0)
    cache = lm.new_cache(2, 8)
    with_cache = lm(ids, cache=cache).logits
    assert cache.seen == 7
    lm.gradient_checkpointing_disable(); lm.eval()
    with torch.no_grad(): torch.testing.assert_close(with_cache.detach(), lm(ids).logits)
