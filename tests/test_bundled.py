"Tests for the bundled shapes model: its folder, loading, parity with transformers, accuracy, and its training."
import json
import os
import time

import pytest
import torch

from paligemma_edu.bundled import (PixelLabelHead, bundled_model_path, evaluate_checkpoint, load_bundled_model, load_mask_codec,
                                   pixel_accuracy, pixel_label_batch, pretrain_vision, train_bundled_model)
from paligemma_edu.segmentation import CODEC_CONFIG, CODEC_WEIGHTS, load_codec
from paligemma_edu.shapes import EVAL_SEED, TASKS, evaluate_model, make_example
from paligemma_edu.train import count_params
from conftest import small_shapes_model

# The first 40 of the 500 held-out scenes per task that eval.json records are measured here. A floor sits three
# standard errors of a 40-scene estimate (at least 5 points) below the recorded value, so that only a real regression
# of loading or decoding fails, whatever model is bundled.
def floor(recorded: float, n: int = 40) -> float:
    return recorded - max(0.05, 3 * (recorded * (1 - recorded) / n) ** 0.5)


@pytest.fixture(scope="module")
def bundled():
    "The bundled model (float32) and its processor."
    return load_bundled_model()


def test_bundled_folder_is_complete():
    p = bundled_model_path()
    names = {f.name for f in p.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "eval.json", "history.json", "attention.json", CODEC_CONFIG, CODEC_WEIGHTS,
            "mask_codec_history.json"} <= names
    from safetensors import safe_open
    with safe_open(str(p / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}, f"bundled weights should be stored in bfloat16; found {dtypes}"
    assert (p / "model.safetensors").stat().st_size < 20e6


def test_load_time(record_property):
    "Loading the bundled model and processor is fast (measured and reported, not asserted)."
    load_bundled_model()  # warm the file cache and imports
    t0 = time.perf_counter()
    model, processor = load_bundled_model()
    dt = time.perf_counter() - t0
    record_property("load_seconds", dt)
    print(f"\nbundled model + processor loaded in {dt * 1000:.0f} ms ({count_params(model) / 1e6:.2f} M params)")
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_matches_transformers_greedy(bundled):
    "transformers loads the bundled folder and generates the same greedy tokens as our implementation."
    transformers = pytest.importorskip("transformers")
    folder = str(bundled_model_path())
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager",
                                                                        dtype=torch.float32).eval()
    hf_proc = transformers.PaliGemmaProcessor.from_pretrained(folder)
    model, processor = bundled
    codec = load_mask_codec()
    for i, task in enumerate(TASKS * 2):
        img, prompt, _, _ = make_example(EVAL_SEED + 900 + i, task, codec=codec)
        text = "<image>" + prompt
        ours_in, hf_in = processor(images=img, text=text), hf_proc(images=img, text=text, return_tensors="pt")
        for k in ("input_ids", "attention_mask", "token_type_ids"): assert torch.equal(ours_in[k], hf_in[k].long()), k
        torch.testing.assert_close(ours_in["pixel_values"], hf_in["pixel_values"])
        T = ours_in["input_ids"].shape[1]
        ours = model.generate(ours_in["input_ids"], ours_in["pixel_values"], ours_in["attention_mask"],
                              ours_in["token_type_ids"], max_new_tokens=32)[0, T:].tolist()
        with torch.no_grad():
            theirs = hf.generate(**hf_in, max_new_tokens=32, do_sample=False)[0, T:].tolist()
        assert ours == theirs, f"{prompt!r}: ours {ours} vs transformers {theirs}"
        assert ours[-1] == 1, f"{prompt!r}: the answer should end with <eos>; got {ours}"


def test_accuracy_on_fixed_held_out_set(bundled):
    "40 held-out scenes per task: accuracy not clearly below what eval.json records on 500."
    model, processor = bundled
    res = evaluate_model(model, processor, n_per_task=40, codec=load_mask_codec())
    print("\n" + json.dumps({t: {k: round(v, 3) for k, v in m.items()} for t, m in res.items()}))
    recorded = json.loads((bundled_model_path() / "eval.json").read_text())["metrics"]
    for task in TASKS:
        assert res[task]["exact"] >= floor(recorded[task]["exact"]), (task, res[task], recorded[task])
    for task in ("detect", "segment"):
        for key in ("hit@0.5", "absent_acc"):
            assert res[task][key] >= floor(recorded[task][key]), (task, key, res[task], recorded[task])
    # mask IoU is a mean of numbers in [0, 1], not a proportion: a fixed margin of 0.1 (several standard errors of a
    # 40-scene mean at the spread of per-object IoUs)
    assert res["segment"]["mask_iou"] >= recorded["segment"]["mask_iou"] - 0.1, (res["segment"], recorded["segment"])
    assert res["segment"]["invalid"] <= recorded["segment"]["invalid"] + 0.05, (res["segment"], recorded["segment"])


def test_eval_json_records_the_command():
    ev = json.loads((bundled_model_path() / "eval.json").read_text())
    assert ev["n_per_task"] >= 500 and set(ev["metrics"]) == set(TASKS)
    assert ev["command"].startswith("paligemma-edu evaluate --model")


def test_vision_pretraining_trains_the_tower_only(bundled):
    "Pixel-label pretraining lowers its loss and changes the vision tower, and nothing else."
    _, processor = bundled
    model = small_shapes_model(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head, hist = pretrain_vision(model, processor.image_processor, steps=30, batch_size=8, lr=3e-3, warmup=3,
                                 eval_every=10, progress=False)
    assert [h["step"] for h in hist] == [10, 20, 30]
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"], [h["loss"] for h in hist]
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith("vision_tower."), n
    assert all(0 <= h["shape_acc"] <= 1 and 0 <= h["color_acc"] <= 1 for h in hist)


def test_pixel_label_head_layout():
    "Patch k's logits land on the pixels of patch k (row-major patches, as the patch embedding orders them)."
    head = PixelLabelHead(width=4, image_size=8, patch_size=4, n_shapes=2, n_colors=3)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.weight[:, 0] = 1.0  # every output equals feature 0 of its patch
    h = torch.zeros(1, 4, 4)
    h[0, :, 0] = torch.arange(4.0)  # patch k carries the value k
    s, c = head(h)
    assert s.shape == (1, 2, 8, 8) and c.shape == (1, 3, 8, 8)
    want = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(s[0, 0], want) and torch.equal(c[0, 2], want)
    with pytest.raises(ValueError, match="expected 4 patch embeddings per image, found 5"):
        head(torch.zeros(1, 5, 4))


def test_pixel_accuracy_of_a_perfect_head(bundled):
    "A head that returns the true labels scores 1; labels and pixels come from the same scenes."
    _, processor = bundled
    px, sm, cm = pixel_label_batch(processor.image_processor, range(3))
    assert px.shape == (3, 3, 64, 64) and sm.shape == cm.shape == (3, 64, 64)
    oracle = lambda _: (torch.nn.functional.one_hot(sm, 4).permute(0, 3, 1, 2).float(),
                        torch.nn.functional.one_hot(cm, 5).permute(0, 3, 1, 2).float())
    acc = pixel_accuracy(_Identity(torch.nn.Linear(1, 1)), oracle, (px, sm, cm))
    assert acc == {"shape_acc": 1.0, "color_acc": 1.0}


class _Identity(torch.nn.Module):
    "Passes its input through; holds a parameter so that it has a device."
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x): return x


def test_vision_pretraining_stops_when_the_loss_is_not_finite(bundled):
    _, processor = bundled
    model = small_shapes_model(processor)
    with torch.no_grad(): model.vision_tower.embeddings.patch_embedding.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="vision pretraining diverged.*step 1"):
        pretrain_vision(model, processor.image_processor, steps=3, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="steps and batch_size"):
        pretrain_vision(model, processor.image_processor, steps=0)


TINY_RECIPE = dict(vision_pretrain_steps=2, vision_pretrain_batch_size=4, steps=3, batch_size=4, warmup=1,
                   vision_width=32, vision_layers=1, vision_heads=1, text_width=32, text_layers=1, text_heads=2,
                   head_dim=16, codec={"steps": 3, "n_scenes": 20, "warmup": 1, "batch_size": 8})


def test_training_writes_a_complete_folder_atomically(tmp_path):
    "A finished run leaves exactly the checkpoint folder (with history and eval); a non-empty folder is refused."
    out = tmp_path / "model"
    train_bundled_model(out, recipe=TINY_RECIPE, progress=False, eval_per_task=2)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "history.json", "eval.json", CODEC_CONFIG,
            CODEC_WEIGHTS, "mask_codec_history.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left beside it
    umask = os.umask(0o022); os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a plain folder, not the temporary one's owner-only mode
    info, ev = (json.loads((out / name).read_text()) for name in ("history.json", "eval.json"))
    assert info["recipe"]["codec"]["steps"] == 3 and info["codec_minutes"] <= info["train_minutes"]
    assert set(ev["metrics"]) == set(TASKS) and ev["metrics"]["segment"]["n"] == 2
    assert load_codec(out).cfg.width == info["recipe"]["codec"]["width"]
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        train_bundled_model(out, recipe=TINY_RECIPE, progress=False, eval_per_task=2)
    assert (out / "model.safetensors").read_bytes() == before
    train_bundled_model(out, recipe=TINY_RECIPE, seed=1, progress=False, eval_per_task=2, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_interrupted_training_leaves_the_old_folder(tmp_path, monkeypatch):
    "A run that fails half-way (here: in the evaluation) leaves the previous checkpoint untouched and no debris."
    import paligemma_edu.bundled as B
    out = tmp_path / "model"
    train_bundled_model(out, recipe=TINY_RECIPE, progress=False, eval_per_task=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    def boom(*args, **kwargs): raise KeyboardInterrupt
    monkeypatch.setattr(B, "evaluate_checkpoint", boom)
    with pytest.raises(KeyboardInterrupt):
        train_bundled_model(out, recipe=TINY_RECIPE, seed=1, progress=False, eval_per_task=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_checkpoint_codec_is_loaded_strictly(tmp_path):
    "The codec beside a checkpoint is part of it: evaluation loads it strictly and fails on a damaged one."
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "m"
    shutil.copytree(bundled_model_path(), folder)
    sd = load_file(folder / CODEC_WEIGHTS)
    sd.pop("decoder.conv_out.bias")
    save_file(sd, folder / CODEC_WEIGHTS)
    with pytest.raises(ValueError, match=r"mask_codec.safetensors.*missing.*decoder.conv_out.bias"):
        evaluate_checkpoint(folder, n_per_task=1, write=False)
    (folder / CODEC_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="mask_codec.safetensors"):
        evaluate_checkpoint(folder, n_per_task=1, write=False)
    for name in (CODEC_CONFIG, "mask_codec_history.json"): (folder / name).unlink()
    assert "segment" not in evaluate_checkpoint(folder, n_per_task=1, write=False)["metrics"]  # a model without one
