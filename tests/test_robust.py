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


# --- 3. one prompt, several images ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes():
    "The bundled processor, a tiny random model for its vocabulary, and two drawn scenes."
    from conftest import small_shapes_model
    from paligemma_edu.bundled import bundled_model_path
    from paligemma_edu.processor import PaliGemmaProcessor
    from paligemma_edu.shapes import make_scene
    proc = PaliGemmaProcessor.from_pretrained(bundled_model_path())
    return small_shapes_model(proc).eval(), proc, [make_scene(s)[0] for s in (1, 2)]


def test_one_prompt_for_several_images_answers_each(shapes):
    "A list of images with one prompt: that prompt for each image (N answers); [[a, b]] is one two-image prompt."
    from paligemma_edu.generate import answer
    model, proc, (a, b) = shapes
    each = answer(model, proc, [a, b], "caption en", max_new_tokens=4)
    assert each == [answer(model, proc, im, "caption en", max_new_tokens=4) for im in (a, b)]
    assert isinstance(answer(model, proc, a, "caption en", max_new_tokens=2), str)
    assert len(answer(model, proc, [[a, b]], "caption en", max_new_tokens=2)) == 1


# --- 4. soft-caps of 0 -----------------------------------------------------------------------------------------------

def test_softcap_zero_means_off():
    "transformers 5.24 divides by a cap of 0 (every logit 0 or NaN); big_vision treats 0 as off, and so do we."
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from paligemma_edu.gemma import GemmaConfig, GemmaForCausalLM
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, attn_implementation="eager")
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(**kw, final_logit_softcapping=0.0)).eval()
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad(): z = hf(ids).logits
    assert bool(((z == 0) | z.isnan()).all())                      # what transformers computes with a cap of 0
    ours = {cap: GemmaConfig(model_type="gemma2", **kw | {"attn_implementation": "sdpa"}, final_logit_softcapping=cap,
                             attn_logit_softcapping=cap) for cap in (0.0, None)}
    assert ours[0.0].final_logit_softcapping is None and ours[0.0].attn_logit_softcapping is None
    torch.manual_seed(0); m0 = GemmaForCausalLM(ours[0.0]).eval()
    torch.manual_seed(0); m1 = GemmaForCausalLM(ours[None]).eval()
    with torch.no_grad(): z0, z1 = m0(ids).logits, m1(ids).logits
    assert bool(torch.isfinite(z0).all()) and z0.abs().max() > 0
    torch.testing.assert_close(z0, z1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="final_logit_softcapping must be a positive number"):
        GemmaConfig(model_type="gemma2", final_logit_softcapping=-1.0)


def test_softcap_zero_in_config_json_is_saved_as_none(tmp_path):
    "A config.json with caps of 0 loads with no caps and is saved with null, which transformers also reads as off."
    from conftest import tiny_paligemma_config_dict
    from paligemma_edu.paligemma import PaliGemmaConfig
    d = tiny_paligemma_config_dict(text=dict(model_type="gemma2", final_logit_softcapping=0.0, attn_logit_softcapping=0))
    cfg = PaliGemmaConfig.from_dict(d)
    assert cfg.text_config.final_logit_softcapping is None and cfg.text_config.attn_logit_softcapping is None
    assert cfg.to_dict()["text_config"]["final_logit_softcapping"] is None


# --- 6. one line for each unclear error ------------------------------------------------------------------------------

def unchecked(saved, tmp_path):
    import shutil
    d = tmp_path / "u"; shutil.copytree(saved, d); (d / MANIFEST).unlink(); return d


def test_float_tensor_stored_as_int(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    d = unchecked(saved, tmp_path)
    sd = load_file(d / "model.safetensors"); k = "language_model.model.norm.weight"
    sd[k] = sd[k].to(torch.int32); save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError) as e: Model.from_pretrained(d)
    assert "language_model.model.norm.weight (torch.int32)" in one_line(e) and "floating point" in str(e.value)


def test_integer_dtype_and_unknown_attention_are_refused(saved):
    with pytest.raises(ValueError, match="floating-point dtype") as e: Model.from_pretrained(saved, dtype=torch.int64)
    one_line(e)
    with pytest.raises(ValueError, match="'sdpa' or 'eager'.*'flash'") as e:
        Model.from_pretrained(saved, attn_implementation="flash")
    one_line(e)


def test_symlink_loop_is_named(saved, tmp_path):
    d = unchecked(saved, tmp_path); (d / "model.safetensors").unlink()
    os.symlink(d / "model.safetensors", d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="symbolic link that leads nowhere") as e: Model.from_pretrained(d)
    one_line(e)


def test_token_type_ids_of_wrong_shape(saved):
    m = Model.from_pretrained(saved)
    ids = torch.tensor([[299] * 16 + [2, 5, 6, 7]]); pix = torch.zeros(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(1, 3\); expected input_ids' shape \(1, 20\)") as e:
        m(ids, pix, token_type_ids=torch.zeros(1, 3, dtype=torch.long))
    one_line(e)


def test_processor_inputs(shapes):
    model, proc, (a, b) = shapes
    cases = [(dict(images=a, text="caption \ud800"), ValueError, "lone surrogate"),
             (dict(images=[], text=[]), ValueError, "at least one image and one prompt"),
             (dict(images=[a, b], text=["a", None]), TypeError, r"text\[1\] is NoneType")]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg) as e: proc(**kw)
        one_line(e)
    for ids in ([-1], [5, 99999]):
        with pytest.raises(ValueError, match="cannot decode token id") as e: proc.decode(ids)
        one_line(e)


def test_generate_inputs(shapes):
    from paligemma_edu.generate import generate
    model, proc, (a, _) = shapes
    inputs = proc(images=a, text="caption en")
    with pytest.raises(ValueError, match="input_ids is empty") as e: generate(model, inputs["input_ids"][:0])
    one_line(e)
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in \[0, ") as e:
        generate(model, inputs["input_ids"], inputs["pixel_values"], pad_token_id=-1)
    one_line(e)


def test_image_token_disagreement_is_named(shapes):
    "A config whose image_token_index differs from the tokenizer's <image>: the error names both, not the prompts."
    import copy
    from paligemma_edu.generate import answer
    model, proc, (a, _) = shapes
    cfg = copy.deepcopy(model.cfg); cfg.image_token_index = 5
    with pytest.raises(ValueError, match=f"writes <image> as id {proc.image_token_id}.*image_token_index 5") as e:
        answer(Model(cfg), proc, a, "caption en")
    one_line(e)


def test_images(tmp_path):
    from PIL import Image
    from paligemma_edu.images import SiglipImageProcessor
    ip = SiglipImageProcessor(size={"height": 28, "width": 28})
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes(); (tmp_path / "t.png").write_bytes(data[:len(data) // 2])
    lazy = Image.open(tmp_path / "t.png")                      # PIL reads the pixels only later
    with pytest.raises(ValueError, match="damaged or truncated") as e: ip(lazy)
    one_line(e)
    with pytest.raises(ValueError, match="resample must be a PIL resampling filter") as e:
        SiglipImageProcessor.from_dict({"resample": 99})
    one_line(e)
    Image.new("L", (64, 64), 7).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="do_convert_rgb=False needs RGB input"):
        SiglipImageProcessor(size={"height": 28, "width": 28}, do_convert_rgb=False)(str(tmp_path / "grey.png"))


def test_npz_files_and_big_vision_config(tmp_path):
    import zipfile
    import numpy as np
    from paligemma_edu.big_vision import from_big_vision
    from paligemma_edu.paligemma2 import paligemma2_config
    from paligemma_edu.segmentation import load_big_vision_codec
    (tmp_path / "r.npz").write_bytes(os.urandom(4096))
    for load in (lambda p: from_big_vision(p, paligemma2_config()), load_big_vision_codec):
        with pytest.raises(ValueError, match="is not an .npz file") as e: load(tmp_path / "r.npz")
        assert "allow_pickle" not in one_line(e)
    np.savez(tmp_path / "z.npz", a=np.zeros(2, np.float32))
    with zipfile.ZipFile(tmp_path / "z.npz", "a") as z: z.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"members that are not .npy arrays: \['notes.txt'\]") as e:
        from_big_vision(tmp_path / "z.npz", paligemma2_config())
    one_line(e)
    for bad in (None, 3):
        with pytest.raises(TypeError, match="config must be a PaliGemmaConfig") as e: from_big_vision(tmp_path / "z.npz", bad)
        one_line(e)


def test_quantize_settings_and_cli_wording(tmp_path):
    from paligemma_edu.quantization import _settings_from
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bitz'\]") as e: _settings_from({"bitz": 8})
    one_line(e)


def test_cli_debug_before_command_and_codec_without_masks(tmp_path, capsys):
    from paligemma_edu.cli import main
    with pytest.raises(FileNotFoundError): main(["--debug", "generate", "--image", "/no/such.png", "--prompt", "x"])
    assert main(["generate", "--image", "/no/such.png", "--prompt", "x", "--codec", "/no/codec"]) == 2
    assert "--codec is used only with --masks" in capsys.readouterr().err


def test_quantized_folder_with_changed_bytes_is_refused(saved, tmp_path):
    "Random bytes over an int8 qweight of a saved quantized model: an error naming the file."
    from paligemma_edu.quantization import quantize
    d = tmp_path / "q"
    quantize(Model.from_pretrained(saved), 8).save_pretrained(d)
    Model.from_pretrained(d)
    with pytest.raises(ValueError, match="leave out --quantize on the command line") as e:
        Model.from_pretrained(d, quantize="int4")
    one_line(e)
    f = d / "model.safetensors"
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    meta = json.loads(f.read_bytes()[8:header])
    k = next(k for k in meta if k.endswith("qweight"))
    with open(f, "r+b") as fh: fh.seek(header + meta[k]["data_offsets"][0]); fh.write(os.urandom(32))
    with pytest.raises(ValueError, match="model.safetensors.*not the file that was saved") as e: Model.from_pretrained(d)
    one_line(e)


def test_another_programs_manifest_is_left_alone(tmp_path):
    "A manifest.json this library did not write is neither read for checksums nor overwritten."
    theirs = json.dumps({"name": "web app", "files": ["a.json"]})
    (tmp_path / MANIFEST).write_text(theirs)
    with StagedFolder(tmp_path) as st: st.write_text("a.json", "{}"); st.write_text("b.json", "{}"); st.commit()
    assert (tmp_path / MANIFEST).read_text() == theirs and read_manifest(tmp_path) is None
    with pytest.raises(FileExistsError, match="manifest.json that this library did not write"):
        with StagedFolder(tmp_path, manifest=True) as st: st.write_text("c.json", "{}"); st.commit()
    assert (tmp_path / MANIFEST).read_text() == theirs and not (tmp_path / "c.json").exists()
