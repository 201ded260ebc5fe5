"Parity of PaliGemmaTokenizer / PaliGemmaProcessor with transformers on a small trained tokenizer, and bad input."
import shutil

import numpy as np
import pytest
import torch

from paligemma_edu.images import SiglipImageProcessor
from paligemma_edu.processor import (IMAGE_TOKEN, PaliGemmaProcessor, PaliGemmaTokenizer, build_paligemma_tokenizer)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GemmaTokenizer, SiglipImageProcessorPil  # noqa: E402
from transformers import PaliGemmaProcessor as HFPaliGemmaProcessor  # noqa: E402

TEXTS = ["caption en", "answer en what color is the big square?", "detect circle ; square", "segment triangle",
         "a red square on a blue background", "two green circles and a yellow triangle", "the shape is small",
         "how many shapes are there? 3"] * 25
SEQ, SIZE = 4, 32
PROMPTS = ["caption en", "answer en what color is the big square on the left?", "detect circle"]
SUFFIXES = ["a red square", "blue", "<loc0010><loc0020><loc0300><loc1023> circle ; <seg005><seg127>"]
SPECIAL_TEXTS = ["<image>x", "hi <bos>there<eos> <pad><unk>", "<loc0000><loc1023><seg000><seg127>", "détect ☃ 42\tz\n",
                 "  two  spaces ", "no-special plain text", "<image><loc0001>", ""]
KEYS = ["input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_paligemma_tokenizer(TEXTS, d, vocab_size=400, seed=0)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, image_seq_length=SEQ).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sp_folder(folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("sp") / "sp"
    shutil.copytree(folder, d); (d / "tokenizer.json").unlink()
    return d


@pytest.fixture(scope="module")
def hf_tok(folder): return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_proc(folder):
    ip = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_seq_length=SEQ)
    return HFPaliGemmaProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8) for i in range(3)]


def test_layout(folder, hf_tok):
    tok = PaliGemmaTokenizer(folder)
    n = len(tok)
    assert [tok.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>"]] == [0, 1, 2, 3]
    assert tok.token_to_id("<loc0000>") == n - 1153 and tok.token_to_id("<seg000>") == n - 129
    assert tok.image_token_id == n - 1 == tok.token_to_id(IMAGE_TOKEN)
    assert isinstance(hf_tok, GemmaTokenizer) and len(hf_tok) == n
    for t in ["<image>", "<loc0000>", "<loc0517>", "<seg127>", "<bos>"]:
        assert hf_tok(t, add_special_tokens=False)["input_ids"] == [tok.token_to_id(t)]


@pytest.mark.parametrize("backend", ["tokenizers", "sentencepiece"])
def test_tokenizer_matches_hf(folder, sp_folder, hf_tok, backend):
    tok = PaliGemmaTokenizer(folder if backend == "tokenizers" else sp_folder)
    assert tok.backend == backend
    for t in SPECIAL_TEXTS + PROMPTS + SUFFIXES + TEXTS[:8]:
        ids = tok.encode(t)
        assert ids == hf_tok(t, add_special_tokens=False)["input_ids"], t
        assert tok.encode(t, add_bos=True) == hf_tok(t)["input_ids"], t
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False), t


def test_hf_converts_model_file_alike(sp_folder, hf_tok):
    "transformers loading only tokenizer.model (its own conversion) gives the same ids."
    hf_sp = AutoTokenizer.from_pretrained(sp_folder)
    assert len(hf_sp) == len(hf_tok)
    for t in SPECIAL_TEXTS + PROMPTS + SUFFIXES:
        assert hf_sp(t)["input_ids"] == hf_tok(t)["input_ids"], t


def test_hf_processor_keeps_ids(folder, hf_tok, hf_proc):
    "PaliGemmaProcessor's own token adding must not move or add ids."
    assert len(hf_proc.tokenizer) == len(hf_tok)
    assert hf_proc.image_token_id == PaliGemmaTokenizer(folder).image_token_id
    for t in SPECIAL_TEXTS:
        assert hf_proc.tokenizer(t, add_special_tokens=False)["input_ids"] == hf_tok(t, add_special_tokens=False)["input_ids"]


def _compare(ours, theirs, keys):
    assert set(ours) == set(keys)
    for k in keys:
        torch.testing.assert_close(ours[k], theirs[k].to(ours[k].dtype), rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", ["tokenizers", "sentencepiece"])
@pytest.mark.parametrize("with_suffix", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_processor_matches_hf(folder, sp_folder, hf_proc, images, backend, with_suffix, side):
    proc = PaliGemmaProcessor.from_pretrained(folder if backend == "tokenizers" else sp_folder)
    sfx = SUFFIXES if with_suffix else None
    ours = proc(images=images, text=PROMPTS, suffix=sfx, padding_side=side)
    theirs = hf_proc(images=images, text=PROMPTS, suffix=sfx, padding="longest", padding_side=side, return_tensors="pt")
    _compare(ours, theirs, KEYS if with_suffix else [k for k in KEYS if k != "labels"])
    if not with_suffix: assert (theirs["labels"] == -100).all()  # transformers returns all -100 labels here; we omit them
    assert proc.batch_decode(ours.input_ids) == hf_proc.batch_decode(theirs["input_ids"], skip_special_tokens=True)
    assert (proc.batch_decode(ours.input_ids, skip_special_tokens=False)
            == hf_proc.batch_decode(theirs["input_ids"], skip_special_tokens=False))


def test_default_padding_is_left(folder, hf_proc, images):
    proc = PaliGemmaProcessor.from_pretrained(folder)
    assert proc.padding_side == hf_proc.tokenizer.padding_side == "left"
    out = proc(images=images, text=PROMPTS, suffix=SUFFIXES)
    assert (out.input_ids[:, -1] == 1).all() and (out.attention_mask[:, -1] == 1).all()


def test_processor_image_tokens_in_text(folder, hf_proc, images):
    proc = PaliGemmaProcessor.from_pretrained(folder)
    text = ["<image>caption en", "<image>what is <loc0001>?", "<image>detect circle"]
    ours = proc(images=images, text=text, suffix=SUFFIXES)
    theirs = hf_proc(images=images, text=text, suffix=SUFFIXES, padding="longest", return_tensors="pt")
    _compare(ours, theirs, KEYS)


def test_processor_single_and_max_length(folder, hf_proc, images):
    proc = PaliGemmaProcessor.from_pretrained(folder)
    ours = proc(images=images[0], text="caption en", suffix="a red square")
    theirs = hf_proc(images=images[0], text="caption en", suffix="a red square", padding="longest", return_tensors="pt")
    _compare(ours, theirs, KEYS)
    ours = proc(images=images, text=PROMPTS, padding="max_length", max_length=40)
    theirs = hf_proc(images=images, text=PROMPTS, padding="max_length", max_length=40, return_tensors="pt")
    _compare(ours, theirs, [k for k in KEYS if k != "labels"])
    ours = proc(images=images, text=PROMPTS, max_length=8, truncation=True)  # no suffix: same cut as transformers
    theirs = hf_proc(images=images, text=PROMPTS, max_length=8, truncation=True, padding="longest", return_tensors="pt")
    _compare(ours, theirs, [k for k in KEYS if k != "labels"])


def test_save_load_roundtrip(folder, hf_proc, images, tmp_path):
    proc = PaliGemmaProcessor.from_pretrained(folder)
    out = proc(images=images, text=PROMPTS, suffix=SUFFIXES)
    proc.save_pretrained(tmp_path / "saved")
    _compare(PaliGemmaProcessor.from_pretrained(tmp_path / "saved")(images=images, text=PROMPTS, suffix=SUFFIXES), out, KEYS)


def test_seq_length_from_config_json(sp_folder, tmp_path):
    d = tmp_path / "c"; shutil.copytree(sp_folder, d); (d / "manifest.json").unlink()  # edited below, as by hand
    import json
    cfg = json.loads((d / "preprocessor_config.json").read_text()); cfg.pop("image_seq_length")
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cannot tell the number of image tokens"):
        PaliGemmaProcessor.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"vision_config": {"image_size": 224, "patch_size": 14}}))
    assert PaliGemmaProcessor.from_pretrained(d).image_seq_length == 256


def test_bad_input(folder, images):
    proc = PaliGemmaProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="needs a text prompt"): proc(images=images)
    with pytest.raises(ValueError, match="needs images"): proc(text=PROMPTS)
    with pytest.raises(ValueError, match="received 3 images .* for 2 prompts"): proc(images=images, text=PROMPTS[:2])
    with pytest.raises(ValueError, match="received 2 suffixes for 3 prompts"):
        proc(images=images, text=PROMPTS, suffix=SUFFIXES[:2])
    with pytest.raises(ValueError, match=r"sequence lengths \[.*\] exceed max_length=8"):
        proc(images=images, text=PROMPTS, max_length=8)
    for bad in (0, -1, 2.5, True, "8"):  # -1 would drop the last token and 0 every token, silently
        with pytest.raises(ValueError, match=r"max_length must be an integer >= 1; found"):
            proc(images=images, text=PROMPTS, max_length=bad, truncation=True)
    with pytest.raises(ValueError, match=r"max_length=4 would cut into the image tokens and <bos>, which take 5"):
        proc(images=images, text=PROMPTS, max_length=4, truncation=True)
    assert proc(images=images, text=PROMPTS, max_length=5, truncation=True)["input_ids"].shape == (3, 5)
    with pytest.raises(ValueError, match="2 <image> tokens but 1 images"): proc(images=images[0], text="<image><image>hi")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'; found 'middle'"):
        proc(images=images, text=PROMPTS, padding_side="middle")
    with pytest.raises(ValueError, match="image_seq_length must be a positive int"):
        PaliGemmaProcessor(SiglipImageProcessor(), PaliGemmaTokenizer(folder))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"): PaliGemmaTokenizer(folder / "nope")
    with pytest.raises(TypeError, match="encode expects a str"): PaliGemmaTokenizer(folder).encode(["a"])
