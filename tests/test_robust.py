"""Nothing lost, nothing silent: crashes inside a commit or a folder swap are completed by the next load, a crash's
leftovers are removed and reported, files changed after saving are refused, and one line per unclear error."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_hf_paligemma
from paligemma_edu.checkpoints import resolve_folder
from paligemma_edu.core import JOURNAL, MANIFEST, StagedFolder, finish_swap, read_manifest, swap_in_folder
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration as Model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    "A tiny checkpoint saved by this library (so with its manifest)."
    d = tmp_path_factory.mktemp("hf")
    tiny_hf_paligemma().save_pretrained(d)
    out = tmp_path_factory.mktemp("ours") / "ckpt"
    Model.from_pretrained(d).save_pretrained(out)
    return out


def logits(m):
    ids = torch.tensor([[299] * 16 + [2, 5, 6, 7]])
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): return m(ids, pix).logits


def one_line(e): assert "\n" not in str(e.value), str(e.value); return str(e.value)


def run_until(script: str, marker: str = "inside", timeout: float = 60) -> None:
    "Run `script` in a child Python, wait until it prints `marker` (it then sleeps inside a window), and SIGKILL it."
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = p.stdout.readline()
        assert line.strip() == marker, (line, p.stderr.read() if p.poll() is not None else "")
    finally:
        p.send_signal(signal.SIGKILL); p.wait(timeout)


def dead_pid() -> int:
    "The id of a process that has exited."
    p = subprocess.Popen([sys.executable, "-c", "pass"]); p.wait()
    return p.pid


# --- 1. a crash between the renames of one commit ---------------------------------------------------------------------

SAVE_AND_SLEEP_AFTER = """
    import os, sys, time, torch
    from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration as Model
    folder, after = sys.argv[1] if len(sys.argv) > 1 else {folder!r}, {after!r}
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if os.path.basename(dst) == after: print("inside", flush=True); time.sleep(60)
    m = Model.from_pretrained(folder)
    with torch.no_grad(): m.language_model.model.norm.weight.add_(1.0)
    os.replace = replace
    m.save_pretrained(folder)
"""


def new_version(folder):
    m = Model.from_pretrained(folder)
    with torch.no_grad(): m.language_model.model.norm.weight.add_(1.0)
    return m


def test_kill_between_renames_is_completed_by_the_next_load(saved, tmp_path):
    "Killed after the new weights are renamed in but before the manifest: the next load finishes the commit, says so."
    import shutil
    d = tmp_path / "c"; shutil.copytree(saved, d)
    expected = logits(new_version(d))
    run_until(SAVE_AND_SLEEP_AFTER.format(folder=str(d), after="model.safetensors"))
    assert (d / JOURNAL).exists()
    with pytest.warns(UserWarning, match="interrupted between its renames"): m = Model.from_pretrained(d)
    torch.testing.assert_close(logits(m), expected, rtol=0, atol=0)
    assert not (d / JOURNAL).exists() and not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    assert set(read_manifest(d)) == {"config.json", "model.safetensors"}


def test_kill_while_staging_leaves_old_checkpoint_and_next_save_cleans(saved, tmp_path):
    "Killed while the weights are written: the old checkpoint loads; the next save removes the leftovers and says how much."
    import shutil
    d = tmp_path / "c"; shutil.copytree(saved, d)
    old = logits(Model.from_pretrained(d))
    run_until(f"""
        import sys, time
        import paligemma_edu.checkpoints as ckpt
        from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration as Model
        real = ckpt.save_file
        def slow(sd, path, metadata=None): real(sd, path, metadata=metadata); print("inside", flush=True); time.sleep(60)
        ckpt.save_file = slow
        Model.from_pretrained({str(d)!r}).save_pretrained({str(d)!r})
    """)
    left = [p for p in d.iterdir() if p.name.endswith(".tmp")]
    assert left
    with warnings.catch_warnings(): warnings.simplefilter("error"); m = Model.from_pretrained(d)  # nothing to complete
    torch.testing.assert_close(logits(m), old, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"removed \d+ temporary file\(s\) \([\d.]+ MB\)"): m.save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]


def test_kill_between_folder_swap_renames_is_completed(tmp_path):
    "`train --overwrite`'s last step killed after moving the old folder aside: the next load moves the new one in."
    target, new = tmp_path / "out", tmp_path / ".out.tmp-1-x"
    target.mkdir(); (target / "v").write_text("old")
    new.mkdir(); (new / "v").write_text("new")
    run_until(f"""
        import os, time
        from paligemma_edu.core import swap_in_folder
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if os.path.basename(dst).startswith(".out.old-"): print("inside", flush=True); time.sleep(60)
        os.replace = replace
        swap_in_folder({str(new)!r}, {str(target)!r}, overwrite=True)
    """)
    assert not target.exists()
    with pytest.warns(UserWarning, match="moved the finished .out.new-.* in"): resolve_folder(target)
    assert (target / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unfinished_run_output_is_removed_and_reported(tmp_path):
    "A killed training run's hidden `.out.tmp-{pid}-...` folder: removed by the next run, with its size."
    left = tmp_path / f".out.tmp-{dead_pid()}-abc"; left.mkdir(); (left / "w").write_bytes(b"\0" * 2_000_000)
    live = tmp_path / f".out.tmp-{os.getpid()}-abc"; live.mkdir()    # a run still going: left alone
    msg = finish_swap(tmp_path / "out")
    assert "removed the unfinished output" in msg and "(2.0 MB)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_overwrite_refusal_names_the_flag(tmp_path):
    (tmp_path / "out").mkdir(); (tmp_path / "out" / "x").write_text("1"); (tmp_path / "n").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"): swap_in_folder(tmp_path / "n", tmp_path / "out")


def test_concurrent_reader_sees_old_or_new(saved, tmp_path):
    "Loads while another process saves two versions in turn: every load is one of the two, never a mixed error."
    import shutil
    d = tmp_path / "c"; shutil.copytree(saved, d)
    a, b = logits(Model.from_pretrained(d)), logits(new_version(d))
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import torch
        from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration as Model
        m = Model.from_pretrained({str(d)!r})
        for i in range(10):
            with torch.no_grad(): m.language_model.model.norm.weight.add_(1.0 if i % 2 == 0 else -1.0)
            m.save_pretrained({str(d)!r})
    """)], env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    seen = set()
    try:
        while writer.poll() is None:
            out = logits(Model.from_pretrained(d))
            seen.add("old" if torch.equal(out, a) else "new" if torch.equal(out, b) else "mixed")
    finally: writer.wait(60)
    assert writer.returncode == 0 and seen and seen <= {"old", "new"}


# --- 2. checksums ----------------------------------------------------------------------------------------------------

def test_finite_garbage_over_a_tensor_is_refused(saved, tmp_path):
    "Random bytes over a tensor's data that stay finite: an error naming model.safetensors, not a model answering garbage."
    import shutil
    d = tmp_path / "c"; shutil.copytree(saved, d)
    f = d / "model.safetensors"
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with safe_open(str(f), "pt") as sf: k = next(k for k in sf.keys() if "embed_tokens" in k)
    meta = json.loads(f.read_bytes()[8:header])[k]
    start = header + meta["data_offsets"][0]
    g = torch.Generator().manual_seed(0)
    garbage = (torch.rand(64, generator=g) * 0.1).numpy().astype("float32").tobytes()   # finite values
    with open(f, "r+b") as fh: fh.seek(start); fh.write(garbage)
    with pytest.raises(ValueError) as e: Model.from_pretrained(d)
    assert "model.safetensors" in one_line(e) and "not the file that was saved" in str(e.value)
    (d / MANIFEST).unlink()        # a folder from elsewhere: no checksums, it loads as before
    Model.from_pretrained(d)


def test_every_saved_file_is_in_the_manifest(saved, tmp_path):
    from paligemma_edu.bundled import bundled_model_path
    from paligemma_edu.processor import PaliGemmaProcessor
    d = tmp_path / "c"
    Model.from_pretrained(saved).save_pretrained(d, processor=PaliGemmaProcessor.from_pretrained(bundled_model_path()))
    names = {p.name for p in d.iterdir()} - {MANIFEST}
    assert set(read_manifest(d)) == names
    (d / "preprocessor_config.json").write_text((d / "preprocessor_config.json").read_text().replace("}", ' }'))
    with pytest.raises(ValueError, match="preprocessor_config.json.*not the file that was saved"):
        PaliGemmaProcessor.from_pretrained(d)


def test_staged_folder_without_manifest_writes_none(tmp_path):
    "A plain output folder (the CLI's pictures) gets no manifest: only checkpoint folders do."
    with StagedFolder(tmp_path) as st: st.write_text("a.txt", "x"); st.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
