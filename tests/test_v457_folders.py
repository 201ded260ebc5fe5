"""Folders written by transformers 4.57.1 (tests/fixtures/v457, made by scripts/v457_fixtures.py): they load strictly
into our model and processor, match 4.57's stored logits and greedy tokens where 4.57 is right, and pin the two places
where it is not (PaliGemma 2's final soft-cap; a left-padded row under a sliding window). Ours re-saved loads in 5.24."""
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paligemma_edu import PaliGemmaForConditionalGeneration as Model, PaliGemmaProcessor
from paligemma_edu.attention_kernels import soft_cap

FIXTURES = Path(__file__).parent / "fixtures" / "v457"
NAMES = ["pg1-fast", "pg2-slow"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("v457")
    for name in NAMES:
        with tarfile.open(FIXTURES / f"{name}.tar.gz") as tar: tar.extractall(d, filter="data")
    return {n: d / n for n in NAMES}


@pytest.fixture(scope="module", params=NAMES)
def case(request, folders):
    d = folders[request.param]
    exp = load_file(d / "expected.safetensors")
    meta = json.loads((d / "expected.json").read_text())
    model, proc = Model.from_pretrained(d, attn_implementation="eager"), PaliGemmaProcessor.from_pretrained(d)
    return request.param, d, exp, meta, model, proc


def images(exp): return [exp["image0"].numpy(), exp["image1"].numpy()]


def batch(exp): return exp["input_ids"], exp["pixel_values"], exp["attention_mask"], exp["token_type_ids"]


def test_folder_as_written_by_457(case):
    name, d, exp, meta, model, proc = case
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["transformers_version"] == "4.57.1" and "vocab_size" not in cfg  # 4.57 writes no top-level vocab_size
    assert model.cfg.vocab_size == meta["vocab_size"] and model.cfg.image_token_index == meta["image_token_id"]
    assert (d / "tokenizer.json").exists() == (name == "pg1-fast") and (d / "tokenizer.model").exists() == (name == "pg2-slow")
    assert proc.tokenizer.backend == ("tokenizers" if name == "pg1-fast" else "sentencepiece")


def test_processor_matches_457(case):
    _, _, exp, meta, _, proc = case
    out = proc(images=images(exp), text=meta["prompts"])
    assert out["attention_mask"][0].sum() < out["attention_mask"][1].sum() and out["attention_mask"][0, 0] == 0  # left-padded
    for k in ("input_ids", "attention_mask", "token_type_ids"): assert torch.equal(out[k], exp[k]), k
    torch.testing.assert_close(out["pixel_values"], exp["pixel_values"], atol=1e-6, rtol=0)


def test_logits_match_457(case):
    name, _, exp, _, model, _ = case
    with torch.no_grad(): ours = model(*batch(exp)).logits[:, -exp["logits_last"].shape[1]:]
    if name == "pg1-fast":
        torch.testing.assert_close(ours, exp["logits_last"], atol=1e-4, rtol=0)
    else:  # 4.57's PaliGemma never applies Gemma 2's final soft-cap; ours (5.x, big_vision) does
        cap = model.cfg.text_config.final_logit_softcapping
        torch.testing.assert_close(ours, soft_cap(exp["logits_last"], cap), atol=1e-4, rtol=0)
        assert (ours - exp["logits_last"]).abs().max() > 0.1 and exp["logits_last"].abs().max() > cap


def generate(model, exp, meta):
    return model.generate(*batch(exp), max_new_tokens=meta["max_new_tokens"], eos_token_id=[])[:, exp["input_ids"].shape[1]:]


def test_greedy_tokens(case):
    "Where padding does not meet a sliding window, ours = 4.57; the padded PaliGemma 2 row follows the reference instead."
    name, _, exp, meta, model, _ = case
    ours = generate(model, exp, meta)
    assert torch.equal(ours[1], exp["tokens"][1])              # the longest row: no padding
    assert torch.equal(ours[0], exp["tokens_alone"][0])        # reference: a padded row = the same row alone
    if name == "pg1-fast": assert torch.equal(ours[0], exp["tokens"][0])
    else: assert not torch.equal(exp["tokens"][0], exp["tokens_alone"][0])  # 4.57: padding changes the answer


def test_transformers_524_agrees_with_ours(case):
    "The pinned transformers (5.24) loads the 4.57 folder and gives our logits and tokens, padded row included."
    from transformers import PaliGemmaForConditionalGeneration as HF
    _, d, exp, meta, model, _ = case
    hf = HF.from_pretrained(d, attn_implementation="eager").eval()
    ids, pix, am, tt = batch(exp)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt, do_sample=False,
                             max_new_tokens=meta["max_new_tokens"], eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
        real = am.bool()
        hf_logits = hf(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt,
                       position_ids=(am.cumsum(-1) - 1).clamp(min=0) + 1).logits
        torch.testing.assert_close(model(ids, pix, am, tt).logits[real], hf_logits[real], atol=1e-4, rtol=0)
    assert torch.equal(theirs, generate(model, exp, meta))


def test_ours_saved_reloads_in_transformers(case, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as HF, PaliGemmaProcessor as HFProcessor
    _, _, exp, meta, model, proc = case
    model.save_pretrained(tmp_path, processor=proc)
    hf = HF.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, pix, am, tt = batch(exp)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt).logits[:, -4:],
                                   model(ids, pix, am, tt).logits[:, -4:], atol=1e-5, rtol=0)
    hp = HFProcessor.from_pretrained(tmp_path)
    hf_ids = hp(images=images(exp), text=meta["prompts"], return_tensors="pt", padding="longest")["input_ids"]
    assert hf_ids.tolist() == ids.tolist()


def test_recorded_reload_in_457():
    "The script's `check` step (run by hand in 4.57.1): folders saved by this library load there with every weight."
    rows = json.loads((FIXTURES / "reload_in_4.57.json").read_text())["rows"]
    ours = [r for r in rows if r["saved_by"] == "paligemma_edu"]
    assert {r["fixture"] for r in ours} == set(NAMES)
    assert all(r["missing"] == r["unexpected"] == 0 and r["max_abs_logit_diff"] <= 1e-4 for r in ours)
