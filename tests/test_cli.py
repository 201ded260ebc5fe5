"""The paligemma-edu command: generate on a checkpoint written here, demo on the bundled model, one-line errors."""
import shutil
import subprocess
import sys

import pytest
import torch

from paligemma_edu.cli import main
from paligemma_edu.shapes import make_scene
from paligemma_edu.bundled import load_bundled_model

EXE = shutil.which("paligemma-edu")


def run(*args):
    cmd = ([EXE, *args] if EXE else
           [sys.executable, "-c", "import sys; from paligemma_edu.cli import main; sys.exit(main())", *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    "A checkpoint folder written by our save_pretrained (weights, config, tokenizer, preprocessor)."
    d = tmp_path_factory.mktemp("ckpt")
    model, processor = load_bundled_model()
    model.save_pretrained(d / "model", processor=processor)
    image, _ = make_scene(3)
    image.save(d / "scene.png")
    return d


def test_generate_from_written_checkpoint(checkpoint):
    out = checkpoint / "boxes.png"
    r = run("generate", "--model", str(checkpoint / "model"), "--image", str(checkpoint / "scene.png"),
            "--prompt", "caption en", "--max-new-tokens", "12", "--boxes", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and out.exists()


def test_generate_several_images_and_sampling(checkpoint, capsys):
    img = str(checkpoint / "scene.png")
    assert main(["generate", "--model", str(checkpoint / "model"), "--image", img, "--image", img,
                 "--prompt", "answer en how many shapes are there?", "--sample", "--seed", "1", "--top-p", "0.9"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("->" in l for l in lines)


def test_generate_compile_flag_gives_the_same_answers(checkpoint, capsys):
    img = str(checkpoint / "scene.png")
    args = ["generate", "--model", str(checkpoint / "model"), "--image", img, "--image", img,
            "--prompt", "caption en", "--prompt", "detect triangle", "--max-new-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--compile", "static"]) == 0
    assert capsys.readouterr().out == plain and "->" in plain
    if not torch.cuda.is_available():
        assert main(args + ["--compile", "cuda-graph"]) == 2
        assert "needs the model on a CUDA device" in capsys.readouterr().err


def test_demo_writes_picture(tmp_path):
    out = tmp_path / "demo.png"
    r = run("demo", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.stat().st_size > 1000
    assert "detect" in r.stdout and "caption en" in r.stdout and "'segment " in r.stdout


def test_generate_masks(checkpoint, tmp_path, capsys):
    "--masks draws the masks of segment answers with the codec beside the model, or the one --codec names."
    from paligemma_edu.bundled import bundled_model_path
    img, out = str(checkpoint / "scene.png"), tmp_path / "masks.png"
    _, scene = make_scene(3)
    segment = f"segment {scene.objects[0].shape}"
    assert main(["generate", "--image", img, "--prompt", segment, "--masks", str(out)]) == 0   # the bundled model
    printed = capsys.readouterr().out
    assert out.exists() and f"masks drawn to {out}" in printed and printed.count("<seg") == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]                        # no temporary file left
    # the checkpoint written by save_pretrained has no codec: --masks says so before generating; --codec gives one
    assert main(["generate", "--model", str(checkpoint / "model"), "--image", img, "--prompt", segment,
                 "--masks", str(tmp_path / "m2.png")]) == 2
    assert "--masks needs a mask codec" in capsys.readouterr().err and not (tmp_path / "m2.png").exists()
    assert main(["generate", "--model", str(checkpoint / "model"), "--codec", str(bundled_model_path()), "--image", img,
                 "--image", img, "--prompt", segment, "--prompt", "caption en", "--masks", str(tmp_path / "m2.png")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "m2.png").exists() and "1 answer(s) could not be read as masks: answer 2:" in printed


@pytest.mark.parametrize("args, expected", [
    (["generate", "--image", "/no/such/image.png", "--prompt", "caption en"], "/no/such/image.png"),
    (["generate", "--model", "/no/such/folder", "--image", "__IMG__", "--prompt", "caption en"], "/no/such/folder"),
    (["generate", "--image", "__IMG__", "--image", "__IMG__", "--prompt", "a", "--prompt", "b", "--prompt", "c"],
     "3 prompts for 2 images"),
    (["train", "--out", "/tmp/never-written", "--recipe", '{"learning_rate": 1}'], "unknown recipe keys ['learning_rate']"),
    (["train", "--out", "/tmp/never-written", "--recipe", '{"steps": "4"}'], "steps='4' (expected a number"),
    (["train", "--out", "/tmp/never-written", "--device", "cuda"], "CUDA is not available"),
    (["train", "--out", "__CKPT__"], "exists and is not empty"),
    (["generate", "--model", "", "--image", "__IMG__", "--prompt", "caption en"], "--model is empty"),
    (["generate", "--image", "__IMG__", "--prompt", "caption en", "--boxes", "__OUT__/boxes"], "--boxes needs a file name"),
    (["demo", "--out", "__OUT__/no/such/dir/demo.png"], "does not exist"),
    (["generate", "--image", "__IMG__", "--prompt", "segment circle", "--masks", "__OUT__/masks.txt"],
     "--masks needs a file name ending in"),
    (["generate", "--image", "__IMG__", "--prompt", "segment circle", "--masks", "__OUT__/m.png", "--codec",
      "__OUT__/none"], "no mask codec config at"),
])
def test_errors_are_one_line(checkpoint, tmp_path, args, expected):
    fill = {"__IMG__": str(checkpoint / "scene.png"), "__CKPT__": str(checkpoint / "model"), "__OUT__": str(tmp_path)}
    args = [fill.get(a, a).replace("__OUT__", str(tmp_path)) for a in args]
    r = run(*args)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert expected in err


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "demo", "train", "evaluate"))


def test_argument_errors_and_debug_anywhere(checkpoint, tmp_path):
    "Bad numbers stop at the parser (exit 2); --debug after the command shows the traceback; nothing unnamed is written."
    r = run("evaluate", "--n", "0")
    assert r.returncode == 2 and "expected an integer >= 1, found 0" in r.stderr
    r = run("generate", "--image", "/no/such/image.png", "--prompt", "caption en", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = run("generate", "--image", str(checkpoint / "scene.png"), "--prompt", "caption en", "--boxes", str(tmp_path / "x"))
    assert r.returncode == 2 and not any(tmp_path.iterdir())  # neither x nor x.png


def test_scene_world_warnings_and_empty_answers(checkpoint, tmp_path, capsys):
    "scene saves a plain image and says what is in it; untrained prompts get one warning line; absent shapes say so."
    from PIL import Image
    scene_png = tmp_path / "scene.png"
    assert main(["scene", "--seed", "7", "--out", str(scene_png)]) == 0
    assert "a yellow triangle and a green square" in capsys.readouterr().out
    assert Image.open(scene_png).size == (64, 64) and [p.name for p in tmp_path.iterdir()] == ["scene.png"]
    assert main(["generate", "--image", str(scene_png), "--prompt", "detect Circle"]) == 0      # answered, with a warning
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "'detect Circle' is not among the prompts" in err
    assert main(["generate", "--image", str(scene_png), "--prompt", "detect circle"]) == 0
    got = capsys.readouterr()
    assert got.out == "no circle found\n" and got.err == ""
    assert main(["generate", "--image", str(scene_png), "--image", str(scene_png), "--prompt", "caption en",
                 "--boxes", str(tmp_path / "b.png")]) == 0
    assert "no boxes in the answers" in capsys.readouterr().out and (tmp_path / "b.png").exists()
    # a checkpoint without a training record (not a shapes model trained by `train`) gets no warning
    assert main(["generate", "--model", str(checkpoint / "model"), "--image", str(scene_png), "--prompt", "what is this",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == ""


def test_help_states_the_world_and_evaluate_save_needs_model(checkpoint, tmp_path, capsys):
    for argv in (["--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit): main(argv)
        text = capsys.readouterr().out
        assert "64 x 64" in text and "answer en what shapes are COLOR?" in text and "red, green, blue, yellow" in text
    assert main(["evaluate", "--save", "--n", "1"]) == 2                       # never into the installed package unasked
    assert "name that folder with --model" in capsys.readouterr().err
    folder = tmp_path / "model"
    shutil.copytree(checkpoint / "model", folder)
    assert main(["evaluate", "--model", str(folder), "--save", "--n", "1"]) == 0
    assert (folder / "eval.json").exists() and (folder / "attention.json").exists()
