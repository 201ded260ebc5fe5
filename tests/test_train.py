"Tests for the training loop and the bundled shapes model: loading, parity with transformers, accuracy, bad input."
import json
import math
import time

import pytest
import torch

from paligemma_edu.checkpoints import from_pretrained  # noqa: F401  (registers from_pretrained / save_pretrained)
from paligemma_edu.generate import generate  # noqa: F401  (registers model.generate)
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
from paligemma_edu.processor import PaliGemmaProcessor
from paligemma_edu.shapes import TASKS, make_example
from paligemma_edu.train import (EVAL_SEED, ShapesMix, bundled_model_path, count_params, evaluate_model,
                                 held_out_set, init_weights, load_bundled_model, lr_at, make_batch,
                                 make_shapes_processor, make_tiny_config, param_groups, pixel_accuracy,
                                 pixel_label_batch, PixelLabelHead, pretrain_vision, train)

# Measured on 500 held-out scenes per task (assets/shapes-tiny/eval.json) and on the first 40 of them; the thresholds
# sit about 10 points below the lower of the two so that only a real regression fails.
# Measured (500 / first 40): caption 0.650 / 0.525, colour 1.000 / 1.000, count 0.996 / 1.000, shape 0.928 / 0.925,
# detection hit@0.5 0.986 / 0.968, absent shapes 0.993 / 1.0.
MIN_ACCURACY = {"caption": 0.40, "color": 0.90, "count": 0.90, "shape": 0.80, "detect_hit": 0.85, "detect_absent": 0.90}


@pytest.fixture(scope="module")
def bundled():
    "The bundled model (float32) and its processor."
    return load_bundled_model()


def _small_model(processor):
    "A tiny, randomly initialised (seed 0) PaliGemma for the bundled processor's images and vocabulary."
    tok = processor.tokenizer
    patch = 64 // math.isqrt(processor.image_seq_length)  # the bundled processor fixes the number of image tokens
    cfg = make_tiny_config(len(tok), tok.image_token_id, patch_size=patch, vision_width=32, vision_layers=1,
                           vision_heads=1, text_width=32, text_layers=1, text_heads=2, head_dim=16)
    return init_weights(PaliGemmaForConditionalGeneration(cfg), seed=0)


def test_bundled_folder_is_complete():
    p = bundled_model_path()
    names = {f.name for f in p.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "eval.json", "history.json"} <= names
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
    for i, task in enumerate(TASKS * 2):
        img, prompt, _, _ = make_example(EVAL_SEED + 900 + i, task)
        text = "<image>" + prompt
        ours_in, hf_in = processor(images=img, text=text), hf_proc(images=img, text=text, return_tensors="pt")
        for k in ("input_ids", "attention_mask", "token_type_ids"): assert torch.equal(ours_in[k], hf_in[k].long()), k
        torch.testing.assert_close(ours_in["pixel_values"], hf_in["pixel_values"])
        T = ours_in["input_ids"].shape[1]
        ours = model.generate(ours_in["input_ids"], ours_in["pixel_values"], ours_in["attention_mask"],
                              ours_in["token_type_ids"], max_new_tokens=24)[0, T:].tolist()
        with torch.no_grad():
            theirs = hf.generate(**hf_in, max_new_tokens=24, do_sample=False)[0, T:].tolist()
        assert ours == theirs, f"{prompt!r}: ours {ours} vs transformers {theirs}"
        assert ours[-1] == 1, f"{prompt!r}: the answer should end with <eos>; got {ours}"


def test_accuracy_on_fixed_held_out_set(bundled):
    "40 held-out scenes per task: accuracy not clearly below what was measured on 500."
    model, processor = bundled
    res = evaluate_model(model, processor, n_per_task=40)
    print("\n" + json.dumps({t: {k: round(v, 3) for k, v in m.items()} for t, m in res.items()}))
    assert res["caption"]["exact"] >= MIN_ACCURACY["caption"], res["caption"]
    assert res["color"]["exact"] >= MIN_ACCURACY["color"], res["color"]
    assert res["count"]["exact"] >= MIN_ACCURACY["count"], res["count"]
    assert res["shape"]["exact"] >= MIN_ACCURACY["shape"], res["shape"]
    assert res["detect"]["hit@0.5"] >= MIN_ACCURACY["detect_hit"], res["detect"]
    assert res["detect"]["absent_acc"] >= MIN_ACCURACY["detect_absent"], res["detect"]


def test_eval_json_records_the_command():
    ev = json.loads((bundled_model_path() / "eval.json").read_text())
    assert ev["n_per_task"] >= 500 and set(ev["metrics"]) == set(TASKS)
    assert ev["command"].startswith("python -m paligemma_edu.train --evaluate")


def test_training_reduces_loss(bundled):
    "A few seeded steps on a tiny config bring the loss down from about ln(V)."
    _, processor = bundled
    tok = processor.tokenizer
    model = _small_model(processor)
    hist = train(model, processor, ShapesMix(seed=5), eval_data=held_out_set(2), steps=24, batch_size=8, lr=1e-2,
                 warmup=4, eval_every=12, log_every=4, seed=0, progress=False)
    assert hist[0]["loss"] == pytest.approx(math.log(len(tok)), rel=0.15)
    assert hist[-1]["loss"] < 0.75 * hist[0]["loss"], [h["loss"] for h in hist]
    assert [h["step"] for h in hist if "eval_loss" in h] == [12, 24]
    assert hist[-1]["eval_loss"] < hist[0]["loss"]


def test_labels_cover_the_answer_only(bundled):
    _, processor = bundled
    items = held_out_set(2)
    b = make_batch(processor, items)
    tok = processor.tokenizer
    for row, it in zip(b["labels"], items):
        want = tok.encode(it["answer"]) + [tok.eos_token_id]
        assert row[row != -100].tolist() == want


def test_schedule():
    lrs = [lr_at(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.05, abs=1e-3)


def test_bad_input(tmp_path, bundled):
    model, processor = bundled
    with pytest.raises(ValueError, match="multiple of patch_size"):
        make_shapes_processor(tmp_path, image_size=64, patch_size=10)
    with pytest.raises(ValueError, match="unknown tasks"):
        ShapesMix(weights={"segment": 1.0})
    with pytest.raises(ValueError, match="steps and batch_size"):
        train(model, processor, ShapesMix(), steps=0)
    with pytest.raises(KeyError, match="'answer'"):
        make_batch(processor, [{"image": None, "prompt": "caption en"}])


@pytest.mark.parametrize("projector_mult, want_projector", [(None, 3.0), (1.0, 1.0), (0.5, 0.5)])
def test_param_groups_cover_every_parameter_once(bundled, projector_mult, want_projector):
    model, _ = bundled
    groups = param_groups(model, weight_decay=0.1, vision_lr_mult=3.0, projector_lr_mult=projector_mult)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    part = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
    want = {"vision_tower": 3.0, "multi_modal_projector": want_projector, "language_model": 1.0}
    for g in groups:
        parts = {part[id(p)] for p in g["params"]}
        assert len(parts) == 1, f"a group mixes {parts}"
        assert g["lr_mult"] == want[parts.pop()]
        assert g["weight_decay"] == (0.1 if g["params"][0].ndim >= 2 else 0.0)
        assert len({p.ndim >= 2 for p in g["params"]}) == 1


def test_training_stops_when_the_loss_is_not_finite(bundled):
    "A diverged run raises at once instead of training on NaNs."
    _, processor = bundled
    model = _small_model(processor)
    with torch.no_grad(): model.multi_modal_projector.linear.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged.*step 1"):
        train(model, processor, ShapesMix(seed=5), steps=3, batch_size=2, progress=False)


def test_vision_pretraining_trains_the_tower_only(bundled):
    "Pixel-label pretraining lowers its loss and changes the vision tower, and nothing else."
    _, processor = bundled
    model = _small_model(processor)
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
    model = _small_model(processor)
    with torch.no_grad(): model.vision_tower.embeddings.patch_embedding.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="vision pretraining diverged.*step 1"):
        pretrain_vision(model, processor.image_processor, steps=3, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="steps and batch_size"):
        pretrain_vision(model, processor.image_processor, steps=0)
