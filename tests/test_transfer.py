"""The transfer notebook's pieces: the memory estimate's bookkeeping, the new task's data, the GPU fine-tuning script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_paligemma_config_dict
from paligemma_edu.finetune import read_jsonl, set_trainable
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from paligemma_edu.shapes import Scene, ShapeObject
from paligemma_edu.transfer import (MEMORY_METHODS, TRANSFER_EVAL_SEED, TRANSFER_SEED, position_answer, position_example,
                                    step_memory, write_position_data)

ROOT = Path(__file__).resolve().parents[1]
CFG = PaliGemmaConfig.from_dict(tiny_paligemma_config_dict())


@pytest.mark.parametrize("method", ["full", "freeze-vision", "attention-only", "lora"])
def test_step_memory_counts_what_a_real_model_trains(method):
    "Parameter and trainable counts equal those of a real model after set_trainable; optimizer = 2 float32 moments."
    model = PaliGemmaForConditionalGeneration(CFG)
    set_trainable(model, method, lora_rank=16, lora_alpha=32)
    ps = {id(p): p for p in model.parameters()}.values()
    m = step_memory(CFG, method=method, dtype=torch.float32)
    assert m["params"] == sum(p.numel() for p in ps)
    assert m["trainable"] == sum(p.numel() for p in ps if p.requires_grad)
    assert m["optimizer"] == 8 * m["trainable"] and m["gradients"] == 4 * m["trainable"]
    assert m["weights"] == 4 * m["params"]
    assert m["total"] == m["weights"] + m["gradients"] + m["optimizer"] + m["activations"]


def test_step_memory_orders():
    "bf16 full fine-tuning pays a float32 master; QLoRA stores less; checkpointing and frozen vision hold fewer activations."
    full = step_memory(CFG, method="full", dtype=torch.bfloat16)
    assert full["optimizer"] == 12 * full["trainable"] and full["gradients"] == 2 * full["trainable"]
    lora, qlora = step_memory(CFG, method="lora"), step_memory(CFG, method="qlora")
    assert qlora["weights"] < lora["weights"] and qlora["trainable"] == lora["trainable"]
    assert step_memory(CFG, method="full", gradient_checkpointing=True)["activations"] < \
        step_memory(CFG, method="full", gradient_checkpointing=False)["activations"]
    assert step_memory(CFG, method="freeze-vision")["activations"] < full["activations"]
    big = step_memory(CFG, 56, "lora")  # 4x the image tokens
    assert big["activations"] > lora["activations"]
    with pytest.raises(ValueError, match="method must be one of"): step_memory(CFG, method="adapters")
    assert set(MEMORY_METHODS) == {"full", "freeze-vision", "attention-only", "lora", "qlora"}


def test_position_task():
    obj = lambda shape, y: ShapeObject(shape, "red", (y, 10, y + 12, 22))
    scene = Scene([obj("circle", 30), obj("square", 5), obj("triangle", 48)])
    assert position_answer(scene, "top") == "square" and position_answer(scene, "bottom") == "triangle"
    with pytest.raises(ValueError, match="no clear top"): position_answer(Scene([obj("circle", 30), obj("square", 28)]), "top")
    with pytest.raises(ValueError, match="no clear"): position_answer(Scene([obj("circle", 30)]), "bottom")
    for s in range(20):
        img, prompt, ans, sc = position_example(TRANSFER_SEED + s)
        assert position_answer(sc, prompt.split()[-1].rstrip("?")) == ans
    assert position_example(TRANSFER_EVAL_SEED)[1:3] == position_example(TRANSFER_EVAL_SEED)[1:3]


def test_write_position_data(tmp_path):
    files = write_position_data(tmp_path / "d", n_train=12, n_val=3, replay=0.5)
    train, val = read_jsonl(files["train"]), read_jsonl(files["val"])
    assert len(train) == 12 and len(val) == 3
    assert all(r["prompt"].startswith("answer en which shape is at the") for r in val)
    assert 0 < sum(r["prompt"].startswith("answer en which shape is at the") for r in train) < 12
    with pytest.raises(FileExistsError, match="not an empty folder"): write_position_data(tmp_path / "d", n_train=2, n_val=1)
    with pytest.raises(ValueError, match="replay"): write_position_data(tmp_path / "e", replay=1.0)


def test_gpu_finetune_tiny_cpu(tmp_path):
    "The GPU script runs end to end on a tiny config on CPU and writes its table (no timing asserted)."
    out = tmp_path / "g.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "benchmarks/gpu_finetune.py", "--tiny", "--device", "cpu", "--steps", "1",
                        "--batch-size", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert [row["impl"] for row in res["rows"]] == ["ours", "hf"]
    assert res["rows"][0]["trainable"] == res["rows"][1]["trainable"] > 0
    assert out.read_text().startswith("# gpu_finetune (tiny")
