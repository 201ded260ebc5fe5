"""Every published PaliGemma config.json (tests/fixtures/configs) parses, builds on the meta device, and has exactly
the parameter count transformers builds from the same file."""
import json
from pathlib import Path

import pytest
import torch

from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from paligemma_edu.paligemma2 import paligemma2_config

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "configs").glob("*.json"))


def n_params(m): return sum(p.numel() for p in m.parameters())


def hf_count(d: dict) -> int:
    from transformers import PaliGemmaConfig as HFC, PaliGemmaForConditionalGeneration as HFP
    with torch.device("meta"): return n_params(HFP(HFC.from_dict(d)))


def test_fixtures_present():
    names = {f.stem for f in FIXTURES}
    for px in (224, 448, 896):
        assert f"paligemma-3b-pt-{px}" in names
        for size in ("3b", "10b", "28b"): assert f"paligemma2-{size}-pt-{px}" in names
    assert any("-mix-" in n and n.startswith("paligemma-") for n in names)
    assert any("-mix-" in n and n.startswith("paligemma2-") for n in names)
    assert any("-ft-" in n and n.startswith("paligemma-") for n in names)


@pytest.mark.parametrize("path", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_published_config_builds_with_hf_parameter_count(path):
    d = json.loads(path.read_text())
    cfg = PaliGemmaConfig.from_json_file(path)
    with torch.device("meta"): ours = PaliGemmaForConditionalGeneration(cfg)
    assert n_params(ours) == hf_count(d)
    t = cfg.text_config
    assert cfg.num_image_tokens == (cfg.vision_config.image_size // 14) ** 2
    assert cfg.image_token_index == 257152 and cfg.vocab_size == t.vocab_size == 257216
    assert cfg.projection_dim == cfg.hidden_size == t.hidden_size  # the file's top-level hidden_size is not read
    if t.model_type == "gemma2":
        assert (t.sliding_window, t.final_logit_softcapping, t.attn_logit_softcapping) == (4096, 30.0, 50.0)


@pytest.mark.parametrize("size", ["3b", "10b", "28b"])
@pytest.mark.parametrize("px", [224, 448, 896])
def test_paligemma2_helper_matches_published_shape(size, px):
    path = Path(__file__).parent / "fixtures" / "configs" / f"paligemma2-{size}-pt-{px}.json"
    with torch.device("meta"):
        a = PaliGemmaForConditionalGeneration(paligemma2_config(size, px))
        b = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_json_file(path))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.cfg.text_config.query_pre_attn_scalar == b.cfg.text_config.query_pre_attn_scalar


def test_value_given_once_is_not_a_contradiction():
    "The usage PaliGemmaConfig(vision_config=..., text_config=... without vocab_size, vocab_size=...) works."
    cfg = PaliGemmaConfig(vision_config={"hidden_size": 1152}, text_config={"hidden_size": 2048},
                          image_token_index=256000, vocab_size=257152, projection_dim=2048)
    assert cfg.text_config.vocab_size == cfg.vocab_size == 257152
    d = json.loads(FIXTURES[0].read_text())
    d.pop("vocab_size", None); d["text_config"]["vocab_size"] = 1000; d["image_token_index"] = 999
    assert PaliGemmaConfig.from_dict(d).vocab_size == 1000  # the 4.57 shape: no top-level vocab_size


def test_real_contradictions_name_both_values():
    d = json.loads((Path(__file__).parent / "fixtures" / "configs" / "paligemma-3b-pt-224.json").read_text())
    with pytest.raises(ValueError, match=r"vocab_size \(1000\) differs from text_config.vocab_size \(257216\)"):
        PaliGemmaConfig.from_dict(d | {"vocab_size": 1000})
    with pytest.raises(ValueError, match=r"projection_dim \(1024\) differs from vision_config.projection_dim \(2048\)"):
        PaliGemmaConfig.from_dict(d | {"projection_dim": 1024})
    with pytest.raises(ValueError, match=r"num_image_tokens \(256\) differs from .* \(1024\)"):
        PaliGemmaConfig.from_dict(d | {"vision_config": d["vision_config"] | {"image_size": 448}})
    with pytest.raises(ValueError, match=r"image_token_index \(257152\) differs from image_token_id \(5\)"):
        PaliGemmaConfig.from_dict(d | {"image_token_id": 5})


def test_omitted_fields_take_transformers_defaults():
    "A text_config without head counts means transformers' Gemma defaults (16 and 16), not ours (8 and 1)."
    d = json.loads(FIXTURES[0].read_text())
    del d["text_config"]["num_key_value_heads"], d["text_config"]["num_attention_heads"]
    cfg = PaliGemmaConfig.from_dict(d)
    assert (cfg.text_config.num_attention_heads, cfg.text_config.num_key_value_heads) == (16, 16)
    with torch.device("meta"): assert n_params(PaliGemmaForConditionalGeneration(cfg)) == hf_count(d)
