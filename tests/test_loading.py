"""Loading and saving checkpoint folders: atomic writes, no stale layouts, strict and finite weights, regular files
only, and one-line errors (what was expected, what was found, which file) for every bad file. One test per class."""
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_hf_paligemma, tiny_paligemma_config_dict
import paligemma_edu.checkpoints as ckpt
import paligemma_edu.core as core
from paligemma_edu.images import SiglipImageProcessor
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration as Model
from paligemma_edu.processor import PaliGemmaProcessor, build_paligemma_tokenizer

TEXTS = ["caption en", "a red square", "detect circle ; square", "answer en how many?"] * 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    "A tiny checkpoint written by transformers, with a processor (tokenizer.json + tokenizer.model)."
    d = tmp_path_factory.mktemp("src")
    tiny_hf_paligemma().save_pretrained(d)
    tok = tmp_path_factory.mktemp("tok")
    build_paligemma_tokenizer(TEXTS, tok, vocab_size=300)
    SiglipImageProcessor(size={"height": 28, "width": 28}, image_seq_length=16).save_pretrained(tok)
    return d, tok


@pytest.fixture
def model(source): return Model.from_pretrained(source[0])


@pytest.fixture
def saved(model, tmp_path):
    d = tmp_path / "ckpt"; model.save_pretrained(d); return d


def logits(m):
    ids = torch.tensor([[299] * 16 + [2, 5, 6, 7]]); pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): return m(ids, pix).logits


def copy_unchecked(src, dst):
    "A copy of a folder without its manifest.json, as another program writes one: edits to it test the loaders' own checks."
    shutil.copytree(src, dst); (dst / "manifest.json").unlink(missing_ok=True)


def one_line(e): assert "\n" not in str(e.value), str(e.value); return str(e.value)


# --- data loss -------------------------------------------------------------------------------------------------------

def test_failed_save_leaves_previous_checkpoint(model, saved, monkeypatch):
    "A write that fails halfway (disk full) leaves the old checkpoint loading unchanged, and no temporary files."
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = Model.from_pretrained(saved)
    with torch.no_grad(): other.language_model.model.norm.weight.add_(1.0)
    def half_write(sd, path, metadata=None):
        with open(path, "wb") as f: f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(OSError, match="No space left"): other.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    torch.testing.assert_close(logits(Model.from_pretrained(saved)), logits(model), atol=0, rtol=0)


def test_failed_processor_save_leaves_previous_files(source, tmp_path, monkeypatch):
    proc = PaliGemmaProcessor.from_pretrained(source[1])
    d = tmp_path / "p"; proc.save_pretrained(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real = shutil.copyfile
    calls = []
    def fail_second(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 2: raise OSError(5, "I/O error")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(shutil, "copyfile", fail_second)
    with pytest.raises(OSError, match="I/O error"): proc.save_pretrained(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_save_removes_stale_layouts(model, source, tmp_path):
    "An old shard index and its shards, and an old tokenizer.json beside a new slow tokenizer, do not survive a save."
    d = tmp_path / "ckpt"; d.mkdir()
    saved = Model.from_pretrained(source[0]).save_pretrained(tmp_path / "x")
    sd = {k: v.clone() + 1 for k, v in load_file(saved / "model.safetensors").items()}
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:5]}, d / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[5:]}, d / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "tokenizer.json").write_text("{}")
    slow = tmp_path / "slow"; shutil.copytree(source[1], slow); (slow / "tokenizer.json").unlink()
    model.save_pretrained(d, processor=PaliGemmaProcessor.from_pretrained(slow))
    names = sorted(p.name for p in d.iterdir())
    assert "model.safetensors.index.json" not in names and not any(n.startswith("model-0000") for n in names)
    assert "tokenizer.json" not in names and "tokenizer.model" in names
    torch.testing.assert_close(logits(Model.from_pretrained(d)), logits(model), atol=0, rtol=0)
    assert PaliGemmaProcessor.from_pretrained(d).tokenizer.backend == "sentencepiece"


# --- silent wrong answers --------------------------------------------------------------------------------------------

def _shards(saved, d, split=5):
    sd = load_file(saved / "model.safetensors"); keys = sorted(sd)
    d.mkdir(exist_ok=True); shutil.copy(saved / "config.json", d)
    return sd, keys


def test_same_tensor_in_two_shards(saved, tmp_path):
    d = tmp_path / "dup"; sd, keys = _shards(saved, d)
    save_file({k: sd[k] for k in keys[:6]}, d / "a.safetensors")
    save_file({k: sd[k] for k in keys[5:]}, d / "b.safetensors")
    weight_map = {k: "a.safetensors" if i < 6 else "b.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as e: Model.from_pretrained(d)
    assert keys[5] in one_line(e) and "a.safetensors" in str(e.value) and "b.safetensors" in str(e.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_shard_paths_that_escape_are_refused(saved, tmp_path, shard):
    d = tmp_path / "esc"; sd, keys = _shards(saved, d)
    save_file(sd, tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))
    with pytest.raises(ValueError, match="not a plain file name") as e: Model.from_pretrained(d)
    one_line(e)


def test_two_layouts_in_one_folder_are_refused(saved, tmp_path):
    d = tmp_path / "both"; copy_unchecked(saved, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ValueError, match="two layouts"): Model.from_pretrained(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_tensor_and_file(saved, tmp_path, bad):
    d = tmp_path / "nan"; copy_unchecked(saved, d)
    sd = load_file(d / "model.safetensors")
    k = "language_model.model.layers.1.mlp.up_proj.weight"
    sd[k][3, 4] = bad
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError) as e: Model.from_pretrained(d)
    assert k in one_line(e) and "model.safetensors" in str(e.value) and "NaN" in str(e.value)


# --- files that are not what they seem -------------------------------------------------------------------------------

def _run_with_timeout(fn, seconds=20):
    "Run fn in a thread; fail (not hang) if it does not finish."
    out = {}
    def go():
        try: fn()
        except BaseException as e: out["e"] = e
    t = threading.Thread(target=go, daemon=True); t.start(); t.join(seconds)
    assert not t.is_alive(), "call did not return (hangs on a special file)"
    return out.get("e")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"])
@pytest.mark.parametrize("kind", ["fifo", "devzero", "folder"])
def test_only_regular_files_are_read(saved, source, tmp_path, name, kind):
    d = tmp_path / "odd"; shutil.copytree(saved, d); PaliGemmaProcessor.from_pretrained(source[1]).save_pretrained(d)
    (d / name).unlink()
    if kind == "fifo": os.mkfifo(d / name)
    elif kind == "devzero": os.symlink("/dev/zero", d / name)
    else: (d / name).mkdir()
    by_model = name in ("config.json", "model.safetensors")
    load = (lambda: Model.from_pretrained(d)) if by_model else (lambda: PaliGemmaProcessor.from_pretrained(d))
    e = _run_with_timeout(load)
    assert isinstance(e, (ValueError, OSError)), e
    assert name in str(e) and ("regular file" in str(e) or "folder" in str(e)) and "\n" not in str(e)


def test_oversized_json_is_not_read(saved, tmp_path):
    d = tmp_path / "big"; copy_unchecked(saved, d)
    with open(d / "config.json", "r+b") as f: f.truncate(100 * 2**20)  # sparse: costs no disk, would cost 100 MB to read
    with pytest.raises(ValueError, match="bytes; expected at most") as e: Model.from_pretrained(d)
    assert "config.json" in one_line(e)


def test_empty_path_is_not_the_current_folder(saved, source, monkeypatch):
    monkeypatch.chdir(saved)  # a valid checkpoint: "" must not load it
    with pytest.raises(ValueError, match="empty"): Model.from_pretrained("")
    with pytest.raises(ValueError, match="empty"): PaliGemmaProcessor.from_pretrained("")
    with pytest.raises(ValueError, match="empty"): Model.from_pretrained(saved).save_pretrained("")


def test_hub_id_same_for_model_and_processor(saved, source, tmp_path, monkeypatch):
    "A Hub id goes through the same resolver for model and processor: both download, or both fail the same way."
    d = tmp_path / "hub"; shutil.copytree(saved, d); PaliGemmaProcessor.from_pretrained(source[1]).save_pretrained(d)
    asked = []
    monkeypatch.setattr(core, "_download", lambda repo, patterns: asked.append((repo, tuple(patterns))) or d)
    Model.from_pretrained("org/tiny"); PaliGemmaProcessor.from_pretrained("org/tiny")
    assert [a[0] for a in asked] == ["org/tiny", "org/tiny"] and all("tokenizer.model" in a[1] for a in asked)
    def offline(repo, patterns): raise FileNotFoundError(f"{repo!r} is not a folder here, and huggingface_hub is not installed")
    monkeypatch.setattr(core, "_download", offline)
    with pytest.raises(FileNotFoundError) as a: Model.from_pretrained("org/tiny")
    with pytest.raises(FileNotFoundError) as b: PaliGemmaProcessor.from_pretrained("org/tiny")
    assert str(a.value) == str(b.value)


# --- unclear errors made one line -----------------------------------------------------------------------------------

GOOD = tiny_paligemma_config_dict()
BAD_CONFIGS = {
    "not json": ("{not json", "is not valid JSON"),
    "list": ("[]", "must hold a JSON object"),
    "null": ("null", "must hold a JSON object"),
    "no text_config": ({k: v for k, v in GOOD.items() if k != "text_config"}, "text_config is missing"),
    "text_config null": (GOOD | {"text_config": None}, "text_config is missing"),
    "no vision_config": ({k: v for k, v in GOOD.items() if k != "vision_config"}, "vision_config is missing"),
    "zero layers": (GOOD | {"text_config": GOOD["text_config"] | {"num_hidden_layers": 0}},
                    "text_config.num_hidden_layers must be a positive integer; found 0"),
    "negative width": (GOOD | {"vision_config": GOOD["vision_config"] | {"hidden_size": -32}},
                       "vision_config.hidden_size must be a positive integer; found -32"),
    "string size": (GOOD | {"text_config": GOOD["text_config"] | {"num_attention_heads": "4"}}, "found '4'"),
    "word size": (GOOD | {"vision_config": GOOD["vision_config"] | {"patch_size": "abc"}}, "found 'abc'"),
    "eps string": (GOOD | {"text_config": GOOD["text_config"] | {"rms_norm_eps": "abc"}},
                   "rms_norm_eps must be a positive number"),
    "pad >= vocab": (GOOD | {"text_config": GOOD["text_config"] | {"pad_token_id": 300}},
                     "pad_token_id 300 is outside the vocabulary"),
    "top pad >= vocab": (GOOD | {"pad_token_id": 1000}, "pad_token_id 1000 is outside the vocabulary"),
    "untied": (GOOD | {"tie_word_embeddings": False}, "tie_word_embeddings is false"),
    "gemma3": (GOOD | {"text_config": GOOD["text_config"] | {"model_type": "gemma3"}}, "text_config.model_type must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_one_line_naming_file(saved, tmp_path, case):
    content, expect = BAD_CONFIGS[case]
    d = tmp_path / "cfg"; copy_unchecked(saved, d)
    (d / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as e: Model.from_pretrained(d)
    msg = one_line(e)
    assert expect in msg and str(d / "config.json") in msg


@pytest.mark.parametrize("name,content,expect", [
    ("tokenizer.json", "{garbage", "not a tokenizer.json"),
    ("tokenizer.json", '{"version": "1.0"}', "not a tokenizer.json"),
    ("tokenizer.model", "garbage", "not a SentencePiece model"),
    ("preprocessor_config.json", "{garbage", "not valid JSON"),
    ("preprocessor_config.json", '{"size": {"height": -1, "width": 3}}', "size must be a dict"),
    ("preprocessor_config.json", "[1]", "must hold a JSON object"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"5": 7}}', "added_tokens_decoder must map"),
])
def test_bad_processor_files_name_the_file(source, tmp_path, name, content, expect):
    d = tmp_path / "p"; copy_unchecked(source[1], d)
    if name in ("tokenizer.model", "tokenizer_config.json"): (d / "tokenizer.json").unlink()  # the slow path reads them
    (d / name).write_text(content)
    with pytest.raises(ValueError) as e: PaliGemmaProcessor.from_pretrained(d)
    msg = one_line(e)
    assert expect in msg and name in msg


def test_saved_files_have_plain_file_permissions(model, tmp_path):
    "Every file a save writes gets the permissions of a plain new file (safetensors alone writes owner-only files)."
    umask = os.umask(0o022); os.umask(umask)
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {p.name: 0o666 & ~umask for p in folder.iterdir()}
