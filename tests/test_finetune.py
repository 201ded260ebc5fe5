"Fine-tuning on JSONL data: the data checks, labels, accumulation, resume after SIGKILL, the CLI end to end."
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paligemma_edu import lora
from paligemma_edu.bundled import load_bundled_model
from paligemma_edu.generate import answer
from paligemma_edu.images import load_image
from paligemma_edu.cli import main
from paligemma_edu.finetune import (CHECKPOINT, FinetuneSettings, JsonlDataset, check_out, finetune, finetune_loss,
                                    logits_needed, make_loader, read_jsonl, set_trainable)
from paligemma_edu.shapes import make_example
from paligemma_edu.train import answer_loss, fit, make_batch
from conftest import max_logit_gap_to_transformers, small_shapes_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled():
    return load_bundled_model()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Eight scenes as PNG files, train.jsonl (6 lines, one task each) and val.jsonl (2 lines)."
    d = tmp_path_factory.mktemp("jsonl")
    lines = []
    for i, task in enumerate(["detect", "color", "caption", "count", "shape", "detect", "caption", "color"]):
        image, prompt, ans, _ = make_example(300 + i, task)
        image.save(d / f"s{i}.png")
        lines.append(json.dumps({"image": f"s{i}.png", "prefix": prompt, "suffix": ans}))
    (d / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (d / "val.jsonl").write_text("\n".join(lines[6:]) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, bundled):
    "A tiny random PaliGemma with the bundled processor, saved as a checkpoint folder."
    _, processor = bundled
    folder = tmp_path_factory.mktemp("tiny")
    small_shapes_model(processor).save_pretrained(folder, processor=processor)
    return folder


def _jsonl(tmp_path, data, second_line, name="bad.jsonl"):
    first = (data / "train.jsonl").read_text().splitlines()[0]
    first = json.dumps(json.loads(first) | {"image": str(data / json.loads(first)["image"])})
    p = tmp_path / name
    p.write_text(first + "\n" + second_line + "\n")
    return p


@pytest.mark.parametrize("line, expected", [
    ('{"image": "a.png", "prefix": "caption en"', "not valid JSON"),
    ('["a.png", "caption en", "x"]', "expected a JSON object"),
    ('{"image": "a.png", "suffix": "x"}', "field 'prefix' is missing"),
    ('{"image": "a.png", "prefix": ["caption en"], "suffix": "x"}', "field 'prefix' must be a string"),
    ('{"image": 7, "prefix": "caption en", "suffix": "x"}', "field 'image' must be a string"),
    ('{"image": "missing.png", "prefix": "caption en", "suffix": "x"}', "field 'image': no image file"),
    ('{"image": "notes.png", "prefix": "caption en", "suffix": "x"}', "field 'image': could not read"),
    ('{"image": "folder", "prefix": "caption en", "suffix": "x"}', "field 'image': image file .* is a folder"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, data, line, expected):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder").mkdir()
    p = _jsonl(tmp_path, data, line)
    with pytest.raises(ValueError) as e:
        read_jsonl(p)
    assert str(e.value).startswith(f"{str(p)!r} line 2: ") and re.search(expected, str(e.value)), str(e.value)


def test_jsonl_empty_blank_lines_and_paths(tmp_path, data):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(ValueError, match="holds no examples"):
            read_jsonl(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no JSONL file"):
        read_jsonl(tmp_path / "absent.jsonl")
    text = (data / "train.jsonl").read_text().replace("\n", "\n\n")  # blank lines are skipped; line numbers still count
    (data / "spaced.jsonl").write_text(text)
    recs = read_jsonl(data / "spaced.jsonl")
    assert len(recs) == 6 and recs[0]["image"] == str(data / "s0.png")
    assert recs == read_jsonl(data / "train.jsonl")


def test_labels_only_on_suffix(bundled, data):
    _, processor = bundled
    recs = read_jsonl(data / "train.jsonl")
    batch = next(iter(make_loader(recs, processor, batch_size=3, seed=0, stop=1, num_workers=0)))
    tok = processor.tokenizer
    order = make_loader(recs, processor, batch_size=3, seed=0, stop=1, num_workers=0).batch_sampler.batch(0)
    for row, labels, tt, i in zip(batch["input_ids"], batch["labels"], batch["token_type_ids"], order):
        assert labels[labels != -100].tolist() == tok.encode(recs[i]["answer"]) + [tok.eos_token_id]
        assert labels[labels != -100].tolist() == row[tt == 1].tolist()


def test_workers_give_the_same_batches(bundled, data):
    _, processor = bundled
    recs = read_jsonl(data / "train.jsonl")
    a = list(make_loader(recs, processor, batch_size=4, seed=3, start=1, stop=4, num_workers=0))
    b = list(make_loader(recs, processor, batch_size=4, seed=3, start=1, stop=4, num_workers=2))
    assert len(a) == 3 and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_gradient_accumulation_equals_the_whole_batch(bundled, data):
    "fit with 2 micro-batches of 2 gives the same step as one batch of 4 (per-example loss), within float32 rounding."
    _, processor = bundled
    items = [JsonlDataset(read_jsonl(data / "train.jsonl"))[i] for i in range(4)]
    results = []
    for micro in ([items], [items[:2], items[2:]]):
        model = small_shapes_model(processor)
        batches = [make_batch(processor, m) for m in micro]
        grads = {}

        def loss_fn(k, model=model, batches=batches):
            b = dict(batches[k]); labels = b.pop("labels")
            return answer_loss(model(**b).logits, labels, per="example")

        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: read the accumulated gradients after the step
        hist = fit(opt, loss_fn, steps=1, lr=0.0, warmup=0, clip=1e9, grad_accum=len(micro), progress=False)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((hist[0]["loss"], grads))
    (loss4, g4), (loss22, g22) = results
    assert loss22 == pytest.approx(loss4, rel=1e-6)
    for n in g4: torch.testing.assert_close(g22[n], g4[n], rtol=1e-4, atol=1e-7)


def test_finetune_loss_reads_only_the_logits_it_needs(bundled, data):
    "The loss on the last logits_needed positions equals the loss on all of them, and so does every gradient."
    _, processor = bundled
    b = make_batch(processor, [JsonlDataset(read_jsonl(data / "train.jsonl"))[i] for i in range(3)])
    labels = b.pop("labels")
    keep = logits_needed(labels)
    assert 1 < keep < labels.shape[1] and not (labels[:, :labels.shape[1] - keep + 1] != -100).any()
    model = small_shapes_model(processor)
    results = []
    for loss_of in (lambda: answer_loss(model(**b).logits, labels, per="example"), lambda: finetune_loss(model, b, labels)):
        model.zero_grad()
        loss = loss_of(); loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, g_full), (part, g_part) = results
    torch.testing.assert_close(part, full)
    for n in g_full: torch.testing.assert_close(g_part[n], g_full[n])
    assert logits_needed(torch.full((2, 7), -100)) == 7                  # nothing labelled: every position
    assert logits_needed(torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 3]])) == 3


def test_set_trainable_methods(bundled):
    _, processor = bundled
    model = small_shapes_model(processor)
    names = set_trainable(model, "attention-only")
    assert names and all(n.startswith("language_model.") and ".self_attn." in n for n in names)
    names = set_trainable(model, "freeze-vision")
    assert not any(n.startswith("vision_tower.") for n in names) and any(n.startswith("multi_modal") for n in names)
    assert set_trainable(model, "projector-only") == ["multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias"]
    with pytest.raises(ValueError, match="unknown method"):
        set_trainable(model, "everything")
    names = set_trainable(small_shapes_model(processor), "lora", lora_targets=r".*language_model.*\.(q_proj|v_proj)")
    assert names and all(n.startswith("language_model.") and (".q_proj.lora_" in n or ".v_proj.lora_" in n) for n in names)


RUN = textwrap.dedent("""
    import os, signal, sys, json
    import paligemma_edu.finetune as ft
    from paligemma_edu.finetune import FinetuneSettings, finetune
    args = json.loads(sys.argv[1])
    kill_at = args.pop("kill_at_micro_batch", None)
    if kill_at is not None:
        calls = [0]
        real = ft.answer_loss
        def answer_loss(*a, **k):  # SIGKILL in the middle of a step, after a checkpoint was written
            calls[0] += 1
            if calls[0] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        ft.answer_loss = answer_loss
    resume = args.pop("resume", False)
    out = args.pop("out")
    finetune(FinetuneSettings(**args), out, resume=resume, progress=False)
""")


def _start(args: dict) -> subprocess.Popen:
    "A fine-tuning run in a new process (one thread), its output captured."
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple:
    "(return code, stderr) of a run started by `_start`."
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err[-2000:]


@pytest.mark.parametrize("method, workers", [("full", 0), ("lora", 1)])
def test_resume_after_sigkill_is_bit_identical(tmp_path, data, tiny_base, method, workers):
    "A run killed by SIGKILL mid-step and resumed ends with the same weights, bit for bit, as an uninterrupted run."
    base = dict(train=str(data / "train.jsonl"), model=str(tiny_base), method=method, steps=6, batch_size=2,
                grad_accum=2, lr=1e-2, save_every=2, workers=workers, lora_rank=2, lora_dropout=0.1 if method == "lora" else 0.0)
    straight = _start(base | {"out": str(tmp_path / "straight")})           # the two first runs side by side
    killed = _start(base | {"out": str(tmp_path / "resumed"), "kill_at_micro_batch": 2 * 5 + 2})  # during step 6
    (code, err), (killed_code, killed_err) = _finish(straight), _finish(killed)
    assert code == 0, err
    assert killed_code == -signal.SIGKILL, killed_err
    meta = json.loads((tmp_path / "resumed" / CHECKPOINT / "checkpoint.json").read_text())
    assert meta["step"] == 4 and meta["data"]["micro_batch"] == 8
    code, err = _finish(_start(base | {"out": str(tmp_path / "resumed"), "resume": True}))
    assert code == 0, err
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((tmp_path / d / "history.json").read_text())["log"] for d in ("straight", "resumed"))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 6
    assert not (tmp_path / "resumed" / CHECKPOINT).exists()


def test_resume_refuses_other_settings(tmp_path, data, tiny_base):
    out = tmp_path / "run"
    s = FinetuneSettings(train=str(data / "train.jsonl"), model=str(tiny_base), steps=2, batch_size=2, save_every=1,
                         workers=0)
    finetune(s, out, progress=False)
    (out / CHECKPOINT).mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(s, out, resume=True, progress=False)
    import paligemma_edu.finetune as ft
    real = ft.write_results
    try:  # stop before the results are written, so the last checkpoint stays
        ft.write_results = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            finetune(s, out, overwrite=True, progress=False)
    finally: ft.write_results = real
    with pytest.raises(ValueError, match=r"settings differ .*batch_size: 2 -> 3.*lr: None -> 0\.001"):
        finetune(FinetuneSettings(**{**s.__dict__, "batch_size": 3, "lr": 1e-3, "workers": 1}), out, resume=True,
                 progress=False)


def test_output_folder_is_not_clobbered(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        check_out(tmp_path)
    assert check_out(tmp_path, overwrite=True) == tmp_path
    with pytest.raises(ValueError, match="give one of the two"):
        check_out(tmp_path, resume=True, overwrite=True)
    assert check_out(tmp_path / "new") == tmp_path / "new"


def test_cli_lora_then_generate(tmp_path, data, capsys):
    out = tmp_path / "lora"
    args = ["finetune", "--train", str(data / "train.jsonl"), "--val", str(data / "val.jsonl"), "--out", str(out),
            "--lora", "4", "--steps", "3", "--batch-size", "2", "--workers", "0"]
    assert main(args) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "history.json", "loss.png", "predictions.jsonl"} <= \
        {p.name for p in out.iterdir()}
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [set(p) for p in preds] == [{"image", "prefix", "suffix", "prediction"}] * 2
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--image", str(data / "s0.png"), "--prompt", "detect triangle"]) == 0
    model, processor = lora.load_adapted(out)
    want = answer(model, processor, load_image(data / "s0.png"), "detect triangle")
    assert capsys.readouterr().out.strip() == want.strip() and want.strip()
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--quantize", "int8"]) == 0


def test_cli_full_finetune_loads_in_transformers(tmp_path, data, bundled):
    "A fully fine-tuned folder loads in transformers and gives our logits."
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    out = tmp_path / "full"
    assert main(["finetune", "--train", str(data / "train.jsonl"), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--lr", "1e-3", "--workers", "0"]) == 0
    _, processor = bundled
    batch = make_batch(processor, [JsonlDataset(read_jsonl(data / "val.jsonl"))[i] for i in range(2)])
    assert max_logit_gap_to_transformers(out, batch) <= 1e-4
    base, _ = bundled
    ours = PaliGemmaForConditionalGeneration.from_pretrained(out)
    assert not torch.equal(ours.multi_modal_projector.linear.weight, base.multi_modal_projector.linear.weight)


def test_scores_exact_boxes_and_masks(tmp_path):
    "Exact match, box IoU for detect prompts and mask IoU for segment prompts (the bundled mask codec)."
    from paligemma_edu.finetune import score_predictions
    from paligemma_edu.bundled import load_mask_codec
    codec = load_mask_codec()
    image, prompt, truth, scene = make_example(11, "segment", codec=codec)
    image.save(tmp_path / "a.png")
    shape = prompt.split(" ", 1)[1]
    det = f"<loc0100><loc0100><loc0500><loc0500> {shape}"
    part = f"<loc0100><loc0100><loc0500><loc0400> {shape}"  # three quarters of the width: IoU 0.75
    recs = [dict(image=str(tmp_path / "a.png"), prompt=f"detect {shape}", answer=det),
            dict(image=str(tmp_path / "a.png"), prompt=prompt, answer=truth),
            dict(image=str(tmp_path / "a.png"), prompt=prompt, answer=truth),
            dict(image=str(tmp_path / "a.png"), prompt="caption en", answer="a red circle")]
    res = score_predictions(recs, [part, truth, "not a mask", "a red  circle"], codec)
    assert res["exact"] == 0.5 and res["n"] == 4
    assert res["detect_mean_iou"] == pytest.approx(0.75) and res["detect_hit@0.5"] == 1.0
    assert res["segment_mask_iou"] == pytest.approx(0.5)  # a perfect mask and an unreadable answer
    assert "segment_mask_iou" not in score_predictions(recs, [part, truth, truth, ""], None)


def test_fit_prints_plain_progress_off_a_terminal(capsys):
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    fit(opt, lambda step: (w ** 2).sum(), steps=5, lr=0.1, warmup=0, print_every=2, examples_per_step=4, desc="demo")
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["demo step 2/5", "demo step 4/5", "demo step 5/5"]
    assert all(re.search(r"loss \d+\.\d{4} [\d.]+ ex/s ETA \d+:\d\d:\d\d$", line) for line in lines), lines


def test_gradient_checkpointing_option(tmp_path, data, tiny_base):
    "--gradient-checkpointing switches on the model's checkpointing; the weights come out the same as without it."
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
    s = FinetuneSettings(train=str(data / "train.jsonl"), model=str(tiny_base), method="lora", lora_rank=2,
                         lora_dropout=0.1, steps=2, batch_size=2, workers=0)
    if not hasattr(PaliGemmaForConditionalGeneration, "gradient_checkpointing_enable"):
        with pytest.raises(ValueError, match="no gradient_checkpointing_enable"):
            finetune(FinetuneSettings(**{**s.__dict__, "gradient_checkpointing": True}), tmp_path / "gc", progress=False)
        return
    for name, on in (("plain", False), ("gc", True)):
        finetune(FinetuneSettings(**{**s.__dict__, "gradient_checkpointing": on}), tmp_path / name, progress=False)
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("plain", "gc"))
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
