"""The Gemma decoder against transformers: logits, per-layer outputs, padding, cache, generation, bad input."""
import pytest
import torch

from conftest import left_padded_batch, tiny_hf_gemma
from paligemma_edu.core import compare_layers
from paligemma_edu.gemma import GemmaConfig, GemmaForCausalLM

SHAPES = {  # name: HF config overrides
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=20),
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=20),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12),
    "mha": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=16),
}


def pair(name, impl="sdpa", seed=0):
    hf = tiny_hf_gemma(seed, **SHAPES[name])
    ours = GemmaForCausalLM(GemmaConfig.from_dict(hf.config.to_dict() | {"attn_implementation": impl})).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_and_layers_match(name, impl):
    ours, hf = pair(name, impl)
    ids = torch.randint(3, 160, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    pairs = [(f"model.layers.{i}", f"model.layers.{i}") for i in range(3)] + [("model.norm", "model.norm")]
    report = compare_layers(ours, hf, lambda: ours(ids), lambda: hf(ids), pairs, atol=1e-5)
    assert report.first_divergent is None, report


def test_state_dict_keys_equal():
    ours, hf = pair("mqa")
    assert set(ours.state_dict()) == set(hf.state_dict())


@pytest.mark.parametrize("name", ["mqa", "gqa4"])
def test_left_padded_batch(name):
    ours, hf = pair(name)
    ids, mask = left_padded_batch([9, 14, 5], 160)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits  # positions default to the padding-aware ones
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)


def test_output_attentions_are_probabilities():
    ours, _ = pair("gqa2")
    out = ours(torch.randint(3, 160, (1, 6)), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (1, 4, 6, 6)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 4, 6))
    assert out.attentions[0][0, :, 0, 1:].abs().max() == 0  # causal
    assert len(out.hidden_states) == 4


@pytest.mark.parametrize("name", ["mqa", "gqa2"])
def test_greedy_generation_matches_hf(name):
    ours, hf = pair(name)
    ids, mask = left_padded_batch([6, 11, 3], 160, seed=2)
    with torch.no_grad():
        mine = ours.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert mine.shape == (3, 11 + 30)
    assert torch.equal(mine, theirs)


def test_cached_equals_uncached_every_step():
    ours, _ = pair("gqa2")
    ids, mask = left_padded_batch([4, 9, 6], 160, seed=3)
    B, T, n = 3, 9, 30
    cache = ours.new_cache(B, T + n)
    full_mask = torch.cat([mask, torch.ones(B, n, dtype=torch.long)], 1)
    seq = ids
    worst = 0.0
    with torch.no_grad():
        step_logits = ours(ids, attention_mask=mask, cache=cache).logits[:, -1]
        for t in range(n):
            ref = ours(seq, attention_mask=full_mask[:, :T + t]).logits[:, -1]  # recompute from scratch
            worst = max(worst, (ref - step_logits).abs().max().item())
            nxt = step_logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            step_logits = ours(nxt, attention_mask=full_mask[:, :T + t + 1], cache=cache).logits[:, -1]
    assert worst <= 1e-5, worst
    assert cache.seen == T + n


def test_rows_stop_independently_at_eos():
    ours, _ = pair("mqa")
    ids, mask = left_padded_batch([5, 7], 160, seed=4)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])[:, 7:]
    eos = int(free[0, 2])  # declare row 0's third new token the end-of-sequence token
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)[:, 7:]
    for b in range(2):
        hits = (free[b] == eos).nonzero().flatten()
        stop = int(hits[0]) + 1 if len(hits) else 8          # tokens up to and including the first eos
        assert torch.equal(out[b, :stop], free[b, :stop])
        assert (out[b, stop:] == 0).all()                    # padded after its own eos
    assert out.shape[1] == max(int((free[b] == eos).nonzero().flatten()[0]) + 1 if (free[b] == eos).any() else 8
                               for b in range(2))


# ---------------------------------------------------------------- bad input
def test_cache_overflow_says_capacity():
    ours, _ = pair("mqa")
    cache = ours.new_cache(1, 5)
    with pytest.raises(ValueError, match="holds 5 positions; this step needs 7"):
        ours(torch.randint(3, 160, (1, 7)), cache=cache)


def test_heads_must_divide():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        GemmaConfig(num_attention_heads=8, num_key_value_heads=3)


def test_ids_outside_vocab():
    ours, _ = pair("mqa")
    with pytest.raises(ValueError, match=r"\[0, 160\).*200"):
        ours(torch.tensor([[5, 200]]))


def test_mismatched_batch_sizes():
    ours, _ = pair("mqa")
    with pytest.raises(ValueError, match="batch 2 but attention_mask has batch 3"):
        ours(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(3, 4, dtype=torch.long))


def test_generate_past_positions():
    ours, _ = pair("mqa")
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        ours.generate(torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)


@pytest.mark.slow
def test_full_size_gemma_2b_parameter_count():
    from transformers import GemmaConfig as HFGemmaConfig, GemmaForCausalLM as HFGemmaForCausalLM
    kw = dict(vocab_size=257216, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
              num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    with torch.device("meta"):
        ours = GemmaForCausalLM(GemmaConfig(**kw))
        hf = HFGemmaForCausalLM(HFGemmaConfig(**kw))
    n = lambda m: sum(p.numel() for p in m.parameters())  # tied head counted once
    assert n(ours) == n(hf)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
