"Tests for the training loop: batches, the schedule, parameter groups, the loop itself and its errors."
import math

import pytest
import torch

from paligemma_edu.bundled import load_bundled_model
from paligemma_edu.shapes import ShapesDataset, held_out_set, make_shapes_processor
from paligemma_edu.train import fit, lr_at, make_batch, param_groups, train
from conftest import small_shapes_model


@pytest.fixture(scope="module")
def bundled():
    "The bundled model (float32) and its processor."
    return load_bundled_model()


def test_training_reduces_loss(bundled):
    "A few seeded steps on a tiny config bring the loss down from about ln(V)."
    _, processor = bundled
    tok = processor.tokenizer
    model = small_shapes_model(processor)
    data = ShapesDataset(10**9, seed=5, weights={})
    hist = train(model, processor, data, eval_data=held_out_set(2), steps=24, batch_size=8, lr=1e-2,
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
        ShapesDataset(10, weights={"point": 1.0})
    with pytest.raises(ValueError, match="pass codec="):
        ShapesDataset(10, weights={"segment": 1.0})
    with pytest.raises(ValueError, match="steps and batch_size"):
        train(model, processor, ShapesDataset(10**9), steps=0)
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
    model = small_shapes_model(processor)
    with torch.no_grad(): model.multi_modal_projector.linear.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged.*step 1"):
        train(model, processor, ShapesDataset(10**9, seed=5, weights={}), steps=3, batch_size=2, progress=False)




def test_fit_logs_and_evaluates_on_schedule():
    "fit logs every log_every steps and at the end, evaluates every eval_every steps, and passes each group's lr_mult."
    w, v = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([dict(params=[w], lr_mult=1.0), dict(params=[v], lr_mult=0.5)], lr=0.1)
    seen = []
    log = fit(opt, lambda step: (w ** 2).sum() + (v ** 2).sum(), steps=7, lr=0.1, warmup=1, log_every=3,
              evaluate=lambda: {"metric": w.sum().item()}, eval_every=2, on_log=seen.append, progress=False)
    assert [r["step"] for r in log] == [2, 3, 4, 6, 7] and seen == log
    assert [r["step"] for r in log if "metric" in r] == [2, 4, 6, 7]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit(opt, lambda step: w.sum(), steps=0, lr=0.1)
