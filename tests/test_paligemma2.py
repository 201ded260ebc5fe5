"""PaliGemma 2 (Gemma 2 decoder) against transformers."""
import json

import pytest
import torch

from conftest import perturb_norms, tiny_paligemma_config_dict
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration

GEMMA2 = dict(model_type="gemma2", num_hidden_layers=4, num_key_value_heads=2, query_pre_attn_scalar=24,
              sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


def hf_pg2(seed=0, **text):
    from transformers import PaliGemmaConfig as HFC, PaliGemmaForConditionalGeneration as HFP
    torch.manual_seed(seed)
    hf = HFP(HFC(**tiny_paligemma_config_dict(text=GEMMA2 | text), attn_implementation="eager")).eval()
    perturb_norms(hf, seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "q_proj" in n or "k_proj" in n: p.mul_(4)  # large scores: soft-capping active
    return hf


def rows(seed=0):
    "Two left-padded rows, 16 image tokens, prefix and 4-token suffix; ~27 tokens > window 8."
    g = torch.Generator().manual_seed(seed)
    r = [[299] * 16 + [2] + torch.randint(3, 290, (n,), generator=g).tolist() + [108]
         + torch.randint(3, 290, (4,), generator=g).tolist()
         for n in (3, 6)]
    L = max(map(len, r))
    ids = torch.tensor([[0] * (L - len(x)) + x for x in r])
    am = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in r])
    tt = torch.tensor([[0] * (L - 4) + [1] * 4] * 2)
    return ids, am, tt


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_pg2()
    d = tmp_path_factory.mktemp("pg2")
    hf.save_pretrained(d)
    return hf, PaliGemmaForConditionalGeneration.from_pretrained(d), d


def test_config_is_gemma2(pair):
    _, ours, _ = pair
    t = ours.cfg.text_config
    assert t.model_type == "gemma2" and t.sliding_window == 8
    assert t.layer_types == ["sliding_attention", "full_attention"] * 2


def test_logits_and_loss_match(pair):
    hf, ours, _ = pair
    ids, am, tt = rows()
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(tt == 0, -100)
    pos = (am.cumsum(-1) - 1).clamp(min=0) + 1
    with torch.no_grad():
        a = ours(ids, pix, am, tt, labels=labels)
        b = hf(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt, position_ids=pos, labels=labels)
    real = am.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    assert a.logits.abs().max() <= 3.0  # final soft-cap


def test_window_matters(pair):
    "The same weights without the window give different logits: the test above exercises the window."
    _, ours, d = pair
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["sliding_window"] = 4096
    (d / "nowin").mkdir(exist_ok=True)
    (d / "nowin" / "config.json").write_text(json.dumps(cfg))
    (d / "nowin" / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    wide = PaliGemmaForConditionalGeneration.from_pretrained(d / "nowin")
    ids, am, tt = rows()
    pix = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (ours(ids, pix, am, tt).logits - wide(ids, pix, am, tt).logits).abs().max() > 1e-3


def test_greedy_generation_matches(pair):
    hf, ours, _ = pair
    ids, am, tt = rows(2)
    ids, am, tt = ids[:, :-4], am[:, :-4], torch.zeros_like(tt[:, :-4])
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    mine = ours.generate(ids, pix, am, tt, max_new_tokens=20, eos_token_id=[])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt, max_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine, theirs)


def test_gemma2_checkpoint_into_gemma1_config_fails(pair, tmp_path):
    _, _, d = pair
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gemma"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"unexpected: \[.*pre_feedforward_layernorm"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)


def test_gemma1_checkpoint_into_gemma2_config_fails(tmp_path):
    from conftest import tiny_hf_paligemma
    hf = tiny_hf_paligemma()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gemma2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing: \[.*post_feedforward_layernorm"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.slow
def test_full_size_paligemma2_3b_parameter_count():
    from transformers import PaliGemmaConfig as HFC, PaliGemmaForConditionalGeneration as HFP
    from paligemma_edu.paligemma2 import paligemma2_3b_config
    cfg = paligemma2_3b_config()
    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(cfg)
        hf = HFP(HFC(**cfg.to_dict()))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(ours) == n(hf)
    assert hf.config.text_config.model_type == "gemma2"
