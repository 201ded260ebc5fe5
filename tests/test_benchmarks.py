"""The benchmark scripts run end to end (tiny configs, CPU); no timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(args, timeout=300):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_gpu_check_tiny_cpu_matches(tmp_path):
    out = tmp_path / "gpu_check.md"
    text = run(["benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out)])
    assert "float32 parity: MATCH" in text
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["ok"] and res["parity"]["float32"]["rel_err_all"] <= 1e-4
    assert res["parity"]["float32"]["tokens_equal"] == 1.0
    assert out.read_text().startswith("# gpu_check (tiny")


def test_run_quick_writes_table(tmp_path):
    run(["benchmarks/run.py", "--quick", "--sizes", "tiny", "--threads", "1", "--impls", "ours,ours_static,hf_sdpa",
         "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    assert "| decode, batch 1 (tok/s) |" in table and "| prefill latency, batch 1 (ms) |" in table
    assert (tmp_path / "decode_vs_length.png").exists() and (tmp_path / "speedups.png").exists()
    assert set(json.loads((tmp_path / "results.json").read_text())["sizes"]) == {"tiny"}


def test_results_go_to_a_new_folder_unless_named():
    "Without --out a run writes to a fresh benchmarks/runs/<time> folder; the committed results only when named."
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as bench
    a, committed = bench.new_run_folder(), ROOT / "benchmarks" / "results"
    assert a.parent == ROOT / "benchmarks" / "runs" and not a.exists()
    a.mkdir(parents=True)
    try: assert bench.new_run_folder() != a      # a second run in the same second gets its own folder
    finally: a.rmdir()
    for script in ("run.py", "quantization.py"):
        r = subprocess.run([sys.executable, f"benchmarks/{script}", "--report-only"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "name it with --out" in r.stderr
    assert committed.is_dir()


def test_transfer_memory_3b_runs_on_a_tiny_folder(tmp_path):
    "memory-3b's three configurations on a tiny random bf16 folder: same adapters and first loss in ours and transformers."
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as bench
    from quantization import write_random_bf16
    write_random_bf16(bench.tiny_config(), tmp_path / "tiny-bf16")
    run(["benchmarks/transfer.py", "memory-3b", "--folder", str(tmp_path / "tiny-bf16"), "--results", str(tmp_path),
         "--configs", "ours-lora,hf-lora,ours-lora-all-logits,ours-qlora", "--threads", "1"])
    rows = {r["config"]: r for r in json.loads((tmp_path / "memory_3b.json").read_text())["runs"]}
    assert rows["ours-lora"]["trainable_params"] == rows["hf-lora"]["trainable_params"] > 0
    for name in ("ours-lora", "ours-lora-all-logits"):
        assert abs(rows[name]["losses"][0] - rows["hf-lora"]["losses"][0]) < 2e-2   # bf16 weights, float32 adapters
    assert all(len(r["step_s"]) == 2 and r["peak_rss_mb"] >= r["rss_loaded_mb"] for r in rows.values())
