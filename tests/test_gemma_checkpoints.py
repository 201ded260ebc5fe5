"""Text-only Gemma folders (transformers' `GemmaForCausalLM` / `Gemma2ForCausalLM` layout): load, save, generate, bad input."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from paligemma_edu.gemma import GemmaForCausalLM
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration

transformers.logging.set_verbosity_error()
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=8)


def _hf(kind="gemma", seed=0):
    torch.manual_seed(seed)
    if kind == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SIZES, sliding_window=4,
                                                                        attn_implementation="eager")).eval()
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**SIZES, attn_implementation="eager")).eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma") / "hf"
    _hf().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_round_trip_with_transformers(tmp_path, kind):
    hf = _hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = GemmaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert ours.cfg.model_type == kind and not ours.training
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=0, atol=1e-4)
        ours.save_pretrained(tmp_path / "ours")
        back = type(hf).from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
        torch.testing.assert_close(back(x).logits, hf(x).logits, rtol=0, atol=1e-5)
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")  # tied: left out, as transformers does


def test_greedy_tokens_equal_transformers(hf_folder):
    ours = GemmaForCausalLM.from_pretrained(hf_folder)
    hf = transformers.GemmaForCausalLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
    x = torch.randint(4, 64, (1, 5))
    theirs = hf.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(ours.generate(x, max_new_tokens=8, eos_token_id=[]), theirs)


def test_dtype_and_a_head_equal_to_the_embedding(tmp_path, hf_folder):
    sd = load_file(hf_folder / "model.safetensors")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text((hf_folder / "config.json").read_text())
    save_file(sd | {"lm_head.weight": sd["model.embed_tokens.weight"].clone()}, tmp_path / "f" / "model.safetensors")
    m = GemmaForCausalLM.from_pretrained(tmp_path / "f", dtype=torch.bfloat16)
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.lm_head.weight.dtype == torch.bfloat16


def _folder_with(tmp_path, hf_folder, cfg=None, sd=None):
    f = tmp_path / "bad"
    f.mkdir(exist_ok=True)
    base = json.loads((hf_folder / "config.json").read_text())
    (f / "config.json").write_text(json.dumps(base if cfg is None else cfg(base)))
    tensors = load_file(hf_folder / "model.safetensors")
    save_file(tensors if sd is None else sd(tensors), f / "model.safetensors")
    return f


@pytest.mark.parametrize("cfg, sd, message", [
    (None, lambda t: t | {"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}, "differs from the"),
    (None, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}, "1 missing: ['model.norm.weight']"),
    (None, lambda t: t | {"model.extra": torch.zeros(2)}, "1 unexpected: ['model.extra']"),
    (lambda c: c | {"hidden_size": 0}, None, "sizes must be positive integers"),
    (lambda c: c | {"num_hidden_layers": 3}, None, "missing"),
    (lambda c: c | {"model_type": "llama"}, None, "expected a Gemma config"),
    (lambda c: c | {"tie_word_embeddings": False}, None, "tie_word_embeddings is false"),
    (lambda c: c | {"quantization_config": {"bits": 8}}, None, "quantized checkpoint"),
])
def test_bad_folders_raise_one_clear_error(tmp_path, hf_folder, cfg, sd, message):
    with pytest.raises(ValueError) as e: GemmaForCausalLM.from_pretrained(_folder_with(tmp_path, hf_folder, cfg, sd))
    assert message in str(e.value), str(e.value)


def test_wrong_requests(tmp_path, hf_folder):
    with pytest.raises(ValueError, match="PaliGemma folders"): GemmaForCausalLM.from_pretrained(hf_folder, quantize="int8")
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        GemmaForCausalLM.from_pretrained(hf_folder, attn_implementation="flash")
    with pytest.raises(FileNotFoundError, match="no config.json"): GemmaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="empty"): GemmaForCausalLM.from_pretrained(hf_folder).save_pretrained("")
    text = dict(SIZES, num_hidden_layers=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=14, patch_size=7)
    pg = PaliGemmaForConditionalGeneration(PaliGemmaConfig(vision_config=vision, text_config=text, vocab_size=64,
                                                           image_token_index=63, projection_dim=32, hidden_size=32))
    pg.save_pretrained(tmp_path / "pg")
    with pytest.raises(ValueError, match="PaliGemmaForConditionalGeneration.from_pretrained"):
        GemmaForCausalLM.from_pretrained(tmp_path / "pg")


def test_save_replaces_a_sharded_layout(tmp_path, hf_folder):
    m = GemmaForCausalLM.from_pretrained(hf_folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00001.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    m.save_pretrained(out)
    assert not (out / "model.safetensors.index.json").exists() and not (out / "model-00001-of-00001.safetensors").exists()
    torch.testing.assert_close(GemmaForCausalLM.from_pretrained(out).state_dict(), m.state_dict())
