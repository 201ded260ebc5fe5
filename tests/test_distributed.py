"Fine-tuning on 2 processes (torchrun, gloo, FSDP2) against 1: the same losses and weights, sharded resume, a failed rank."
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import max_logit_gap_to_transformers
from paligemma_edu.finetune import FinetuneSettings, JsonlDataset, finetune, read_jsonl
from paligemma_edu.train import make_batch
from test_finetune import bundled, data, tiny_base  # noqa: F401  (the same tiny model and JSONL files)

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, ACCUM, LR = 6, 4, 2, 1e-3    # a global micro-batch of 4: 2 examples on each of 2 processes

DRIVER = """
import os, signal, sys, time
import paligemma_edu.finetune as ft
from paligemma_edu.cli import main
fault = os.environ.get("TEST_FAULT")                # 'kill' or 'hang' RANK:MICRO_BATCH
if fault:
    kind, where = fault.split(" ")
    rank, at = map(int, where.split(":"))
    if int(os.environ["RANK"]) == rank:
        calls, real = [0], ft.answer_loss
        def answer_loss(*a, **k):
            calls[0] += 1
            if calls[0] == at:
                if kind == "kill": os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)
            return real(*a, **k)
        ft.answer_loss = answer_loss
sys.exit(main(sys.argv[1:]))
"""


def _args(jsonl_folder, base, out, method):
    args = ["finetune", "--model", str(base), "--train", str(jsonl_folder / "train.jsonl"), "--out", str(out),
            "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--lr", str(LR), "--workers", "0", "--save-every", "2"]
    return args + {"lora": ["--lora", "2", "--lora-alpha", "4"], "freeze-vision": ["--freeze", "vision"]}.get(method, [])


def torchrun(tmp_path, n: int, args: list, fault: str | None = None, timeout: float = 240) -> tuple:
    "(return code, output, seconds) of `torchrun --nproc-per-node n` running the CLI (with an optional injected fault)."
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg") | ({"TEST_FAULT": fault} if fault else {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(driver), *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data, tiny_base):  # noqa: F811
    "The same runs in this one process, without torchrun: {method: output folder}."
    outs = {}
    for method in ("full", "lora", "freeze-vision"):
        out = tmp_path_factory.mktemp(f"one-{method}")
        finetune(FinetuneSettings(train=str(data / "train.jsonl"), model=str(tiny_base), method=method, lora_rank=2,
                                  lora_alpha=4.0, steps=STEPS, batch_size=BATCH, grad_accum=ACCUM, lr=LR, workers=0),
                 out, overwrite=True, progress=False)
        outs[method] = out
    return outs


def _same(a: Path, b: Path, name: str, atol: float = 1e-5):
    "Same losses in history.json and the same tensors in `name` (within `atol`) in folders a and b."
    la, lb = (json.loads((d / "history.json").read_text())["log"] for d in (a, b))
    assert len(la) == len(lb) == STEPS
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) <= atol
    ta, tb = load_file(a / name), load_file(b / name)
    assert ta.keys() == tb.keys()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) <= atol


@pytest.mark.parametrize("method", ["full", "lora", "freeze-vision"])
def test_two_processes_equal_one(tmp_path, data, tiny_base, one_process, bundled, method):  # noqa: F811
    "2 processes x 2 examples = 1 process x 4: the same loss curve and final weights; the gathered folder loads."
    out = tmp_path / "two"
    code, log, _ = torchrun(tmp_path, 2, _args(data, tiny_base, out, method))
    assert code == 0, log[-3000:]
    assert log.count("written to") == 1                    # rank 0 alone reports
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    _same(one_process[method], out, name)
    trained = load_file(out / name)
    if method == "freeze-vision":                          # frozen weights are sharded too, and come back unchanged
        base = load_file(tiny_base / "model.safetensors")
        assert all(torch.equal(trained[k], base[k].float()) for k in trained if k.startswith("vision_tower."))
        return
    if method == "lora":
        assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
        assert all("lora_" in k for k in trained)
        return
    _, processor = bundled
    batch = make_batch(processor, [JsonlDataset(read_jsonl(data / "val.jsonl"))[i] for i in range(2)])
    assert max_logit_gap_to_transformers(out, batch) <= 1e-4
    assert not (out / "checkpoint").exists()


def test_killed_rank_then_resume_on_one_and_two(tmp_path, data, tiny_base, one_process):  # noqa: F811
    """Rank 1 SIGKILLed in step 5: the job exits non-zero in bounded time naming rank 1, the step-4 sharded checkpoint
    stays; resumed on 1 process and on 2 it ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    code, log, seconds = torchrun(tmp_path, 2, _args(data, tiny_base, out, "full") + ["--dist-timeout", "20"],
                                  fault=f"kill 1:{4 * ACCUM + 1}")
    assert code != 0 and seconds < 120, log[-3000:]
    named = re.search(r"rank 1 stopped", log) or re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", log)
    assert named, log[-3000:]
    meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 4 and meta["processes"] == 2 and (out / "checkpoint" / meta["state"] / ".metadata").is_file()
    shutil.copytree(out, tmp_path / "run2")
    for n, folder in ((1, out), (2, tmp_path / "run2")):
        code, log, _ = torchrun(tmp_path, n, _args(data, tiny_base, folder, "full") + ["--resume"])
        assert code == 0, log[-3000:]
        _same(one_process["full"], folder, "model.safetensors")


def test_silent_rank_times_out_with_its_name(tmp_path, data, tiny_base):  # noqa: F811
    "Rank 1 stops answering (alive, asleep): rank 0's collective times out after --dist-timeout, its error names rank 1."
    code, log, seconds = torchrun(tmp_path, 2, _args(data, tiny_base, tmp_path / "run", "full") + ["--dist-timeout", "3"],
                                  fault=f"hang 1:{2 * ACCUM + 1}")
    assert code != 0 and seconds < 90, log[-3000:]
    assert re.search(r"error: rank 0 of 2: the run stopped because rank 1 is alive but behind", log), log[-3000:]


def test_one_process_checkpoint_needs_no_torchrun(tmp_path):
    "A sharded checkpoint's reader refuses a one-process checkpoint with a clear message."
    from paligemma_edu.distributed import read_sharded_meta
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": "paligemma_edu_finetune_checkpoint"}))
    with pytest.raises(ValueError, match="one-process checkpoint; resume it without torchrun"):
        read_sharded_meta(tmp_path)


def test_sharded_checkpoint_resumes_only_under_torchrun(tmp_path, data, tiny_base):  # noqa: F811
    "A plain (one-process) resume of a sharded checkpoint says how to resume it instead."
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint.json").write_text(json.dumps({"format": "paligemma_edu_distributed_checkpoint",
                                                                         "processes": 2}))
    s = FinetuneSettings(train=str(data / "train.jsonl"), model=str(tiny_base), steps=2, batch_size=2, workers=0)
    with pytest.raises(ValueError, match="sharded checkpoint written by 2 processes under torchrun; resume it under torchrun"):
        finetune(s, tmp_path, resume=True, progress=False)



def test_heartbeat_thread_is_joined_by_stop(monkeypatch):
    """After `Health.stop` no heartbeat thread is left: a daemon thread cut off inside the store's C++ code at
    interpreter exit aborts the process ('terminate called without an active exception')."""
    import threading
    from datetime import timedelta
    import torch.distributed as dist
    from paligemma_edu.distributed import Health
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    before = set(threading.enumerate())
    health = Health(0, 1, every=1e-4)                  # beats almost without pause: its thread is mostly in the store
    time.sleep(0.1)
    assert len(set(threading.enumerate()) - before) == 1
    health.stop()
    assert not (set(threading.enumerate()) - before)
