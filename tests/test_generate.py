"""generate refuses what it cannot honour: one clear error per kind of bad request, before any work."""
import pytest
import torch

from paligemma_edu.generate import generate
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration


@pytest.fixture(scope="module")
def tiny():
    "A tiny random PaliGemma and a left-padded batch of two prompts."
    torch.manual_seed(0)
    cfg = PaliGemmaConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                             image_size=28, patch_size=7),
                          text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                           max_position_embeddings=128),
                          image_token_index=299, vocab_size=300, projection_dim=48, hidden_size=48)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[0, 0] + [299] * 16 + [2, 17, 45, 108], [299] * 16 + [2, 33, 12, 9, 71, 108]])
    mask = (torch.arange(22) >= torch.tensor([[2], [0]])).long()
    return model, ids, torch.randn(2, 3, 28, 28), mask, torch.zeros_like(ids)


def test_good_request_runs(tiny):
    model, ids, pix, mask, tt = tiny
    out = generate(model, ids, pix, mask, tt, max_new_tokens=3, do_sample=True, temperature=0.7, top_k=5, top_p=1.0, seed=0)
    assert out.shape == (2, 25)
    assert generate(model, ids, pix, mask.bool(), tt, max_new_tokens=2, eos_token_id=[]).shape == (2, 24)  # bool masks too


@pytest.mark.parametrize("compile", [False, "static"])
@pytest.mark.parametrize("option, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", -5, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", 2.5, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", None, "max_new_tokens must be an integer >= 1"),
    ("temperature", 0.0, "temperature must be a finite number > 0 when sampling"),
    ("temperature", -1.0, "temperature must be a finite number > 0 when sampling"),
    ("temperature", float("nan"), "temperature must be a finite number > 0 when sampling"),
    ("temperature", float("inf"), "temperature must be a finite number > 0 when sampling"),
    ("top_k", 0, "top_k must be an integer >= 1"),
    ("top_k", -2, "top_k must be an integer >= 1"),
    ("top_k", 3.0, "top_k must be an integer >= 1"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", -0.5, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("top_p", float("nan"), r"top_p must be in \(0, 1\]"),
])
def test_bad_options(tiny, option, value, message, compile):
    model, ids, pix, mask, tt = tiny
    with pytest.raises(ValueError, match=message):
        generate(model, ids, pix, mask, tt, do_sample=True, compile=compile, **{option: value})


def test_temperature_is_not_checked_when_greedy(tiny):
    model, ids, pix, mask, tt = tiny
    assert generate(model, ids, pix, mask, tt, max_new_tokens=2, temperature=0.0).shape[0] == 2


@pytest.mark.parametrize("compile", [False, "static"])
def test_bad_attention_masks(tiny, compile):
    model, ids, pix, mask, tt = tiny
    cases = [(mask * 2, r"only 0 \(padding\) and 1 \(token\); found \[2\]"),
             (mask - 0.5, r"only 0 \(padding\) and 1 \(token\)"),
             (mask * torch.tensor([[0], [1]]), r"row\(s\) \[0\] are all zeros"),
             (mask.flip(-1), r"row\(s\) \[0\] have padding after a token \(right padding\).*padding_side='left'"),
             (mask[:, :-1], "attention_mask shape")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, ids, pix, bad, tt, max_new_tokens=2, compile=compile)


def test_right_padded_rows_are_refused_not_answered(tiny):
    "A right-padded batch (what padding_side='right' gives) would read its first new token from a pad: refused."
    model, ids, pix, mask, tt = tiny
    n = mask.sum(-1)
    right_ids = torch.stack([torch.cat([r[m == 1], r[m == 0]]) for r, m in zip(ids, mask)])
    right_mask = (torch.arange(ids.shape[1]) < n[:, None]).long()
    with pytest.raises(ValueError, match="right padding"):
        generate(model, right_ids, pix, right_mask, tt, max_new_tokens=2)


@pytest.mark.parametrize("compile", [False, "static"])
def test_bad_pixel_values(tiny, compile):
    model, ids, pix, mask, tt = tiny
    raw = (pix.clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8)
    with pytest.raises(TypeError, match="pixel_values must be a floating-point tensor.*processor"):
        generate(model, ids, raw, mask, tt, max_new_tokens=2, compile=compile)
    with pytest.raises(TypeError, match="got torch.int64"):
        generate(model, ids, raw.long(), mask, tt, max_new_tokens=2, compile=compile)
    for bad in (float("nan"), float("inf"), -float("inf")):
        p = pix.clone(); p[1, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="pixel_values contain NaN or infinite values"):
            generate(model, ids, p, mask, tt, max_new_tokens=2, compile=compile)


def test_bad_input_ids(tiny):
    model, ids, pix, mask, tt = tiny
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, ids.float(), pix, mask, tt)
    with pytest.raises(ValueError, match=r"\(batch, tokens\) tensor"):
        generate(model, ids[0], pix, mask, tt)
