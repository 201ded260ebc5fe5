"""Quantized layers against the dequantized reference, strict save / load round trips, mismatch errors, quantizing while
loading against quantizing after, memory while quantizing on load, the bundled model's answers, the CLI flag."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paligemma_edu.checkpoints import map_key
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from paligemma_edu.quantization import (QuantEmbedding, QuantLinear, TiedHead, dequantize_int4, fake_quantize, quantize,
                                        quantize_int4, unpack_int4_cpu)
from paligemma_edu.shapes import make_scene
from paligemma_edu.bundled import bundled_model_path, load_bundled_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled():
    return load_bundled_model()


@pytest.fixture(scope="module")
def saved(bundled, tmp_path_factory):
    "The bundled model quantized in int8 and int4, saved with the processor."
    model, processor = bundled
    d = tmp_path_factory.mktemp("quantized")
    return {bits: quantize(copy.deepcopy(model), bits).save_pretrained(d / f"int{bits}", processor=processor)
            for bits in (8, 4)}


# ------------------------------------------------------------------------------------------------------- layers
U = 2 ** -8  # bfloat16's unit roundoff


def bf16_bound(x, w, ref):
    "Bound on |error| of x @ w.T computed in bfloat16: x, scales, weights and output each rounded once, f32 sums."
    return 3 * U * (x.float().abs() @ w.abs().T) + 2 * U * ref.abs()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N, K", [(100, 269), (64, 192), (48, 4304), (2096, 320)])
def test_quant_linear_matches_dequantized_reference(bits, N, K):
    "Quantized layers compute in bfloat16 on the CPU, for float32 activations too: within bfloat16's bound of the reference."
    torch.manual_seed(N + K)
    lin = nn.Linear(K, N)
    q = QuantLinear.from_linear(lin, bits)
    ref_w = fake_quantize(lin.weight.detach(), bits)  # quantize -> dequantize, plainly (float32 scales)
    if bits == 8: torch.testing.assert_close(q.dequantize(), ref_w)
    else:  # int4 scales and zeros are kept in bfloat16: a weight moves by at most u (8 s + |z|)
        sz = q.scale_zero[:, :N].float().repeat_interleave(64, 0)[:K].transpose(0, 1)   # (N, K, 2)
        assert ((q.dequantize() - ref_w).abs() <= U * (8 * sz[..., 0] + sz[..., 1].abs())).all()
    qb = QuantLinear.from_linear(copy.deepcopy(lin).bfloat16(), bits)
    for layer, dtype in ((q, torch.float32), (qb, torch.bfloat16)):
        w = layer.dequantize()
        for M in (1, 3, 40, 70):  # the kernels (few rows), int8 dequantized slices and int4 unpacked (many)
            x = torch.randn(2, M, K).to(dtype)
            ref = x.float() @ w.T + layer.bias.float()
            y = layer(x)
            assert y.dtype == dtype and y.shape == (2, M, N)
            err = (y.float() - ref).abs()
            assert (err <= bf16_bound(x, w, ref)).all(), (dtype, M, (err / bf16_bound(x, w, ref)).max())


def test_float32_activations_take_the_bfloat16_kernels():
    "What a float32 call runs: the input cast to bfloat16, the bfloat16 kernel, the output cast back; nothing else converted."
    from torch.profiler import profile
    lin = nn.Linear(512, 256)
    for bits, kernel in ((8, "aten::_weight_int8pack_mm"), (4, "aten::_weight_int4pack_mm_for_cpu")):
        layer = QuantLinear.from_linear(lin, bits)
        with torch.no_grad(), profile() as prof: layer(torch.randn(1, 512))
        ops = {e.key: e.count for e in prof.key_averages()}
        assert ops.get(kernel) == 1, ops
        assert ops.get("aten::_to_copy") == 2 + (bits == 8), ops  # x and y; int8: its (N,) float32 scales too
        assert layer.qweight.dtype in (torch.int8, torch.uint8)


def test_int4_prefill_takes_the_dense_path_and_matches_the_kernel():
    from paligemma_edu.quantization import INT4_DENSE_M, int4_cpu_layout
    from torch.profiler import profile
    if int4_cpu_layout()[0] != "halves": pytest.skip("this CPU's int4 layout keeps the kernel for every row count")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(320, 2096).bfloat16(), 4)  # 32 blocks of 64 rows and a partial one
    x = torch.randn(INT4_DENSE_M, 320).bfloat16()
    with torch.no_grad(), profile() as prof: dense = layer(x)
    assert "aten::_weight_int4pack_mm_for_cpu" not in {e.key for e in prof.key_averages()}
    kernel = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])  # one row at a time: the kernel
    w = layer.dequantize()
    ref = x.float() @ w.T + layer.bias.float()
    for y in (dense, kernel): assert ((y.float() - ref).abs() <= bf16_bound(x, w, ref)).all()


def test_int4_dense_path_same_result_in_any_slicing():
    "The unpacked slices (here 2, 8 or all 32 blocks of 64 rows at a time) only split the matmul's columns: equal results."
    from paligemma_edu.quantization import int4_cpu_layout, int4_matmul_dense
    if int4_cpu_layout()[0] != "halves": pytest.skip("this CPU's int4 layout keeps the kernel for every row count")
    torch.manual_seed(1)
    layer = QuantLinear.from_linear(nn.Linear(320, 2096).bfloat16(), 4)
    x = torch.randn(70, 320).bfloat16()
    whole = int4_matmul_dense(x, layer.qweight, layer.scale_zero, 64, elements=1 << 30)
    for blocks in (2, 8):
        assert torch.equal(int4_matmul_dense(x, layer.qweight, layer.scale_zero, 64, elements=320 * 64 * blocks), whole)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_c_unpack_gives_the_same_bits_as_the_torch_passes(group_size):
    "The C kernel and the torch passes compute the same float operations: equal weights and equal prefill outputs."
    from paligemma_edu.quantization import (int4_cpu_layout, int4_matmul_dense, int4_unpack_fused, int4_unpack_kernel,
                                            int4_unpack_passes)
    if int4_cpu_layout()[0] != "halves": pytest.skip("this CPU's int4 layout keeps the kernel for every row count")
    if int4_unpack_kernel() is None: pytest.skip("no C compiler here: the torch passes are the only unpack")
    torch.manual_seed(2)
    layer = QuantLinear.from_linear(nn.Linear(384, 2096).bfloat16(), 4, group_size)  # 32 blocks of 64 rows + a partial one
    B = int4_cpu_layout()[1]
    for r0, n in ((0, B), (B, 5 * B), (0, 2048)):
        fused = int4_unpack_fused(layer.qweight, layer.scale_zero, group_size, r0, n, B)
        assert torch.equal(fused, int4_unpack_passes(layer.qweight, layer.scale_zero, group_size, r0, n, B))
    w = layer.dequantize(padded=True)[:2048].T                                         # (K, n) float32 reference
    sz = layer.scale_zero[:, :2048].float().repeat_interleave(group_size, 0)          # (K, n, 2)
    offset = sz[..., 1] - 8 * sz[..., 0]                                               # z - 8s, rounded to bfloat16 first
    assert ((fused.float() - w).abs() <= 2 ** -8 * (offset.abs() + w.abs())).all()   # two bfloat16 roundings
    x = torch.randn(70, 384).bfloat16()
    assert torch.equal(int4_matmul_dense(x, layer.qweight, layer.scale_zero, group_size, fused=True),
                       int4_matmul_dense(x, layer.qweight, layer.scale_zero, group_size, fused=False))


def test_int4_c_unpack_refuses_a_request_outside_the_layer():
    "The kernel reads raw memory: rows past the end, rows not on a block boundary or a wrong dtype are refused first."
    from paligemma_edu.quantization import int4_cpu_layout, int4_unpack_fused, int4_unpack_kernel
    if int4_cpu_layout()[0] != "halves" or int4_unpack_kernel() is None: pytest.skip("no C unpack on this machine")
    layer, B = QuantLinear.from_linear(nn.Linear(128, 256), 4), int4_cpu_layout()[1]
    for r0, n in ((0, 320), (B // 2, B), (-B, B)):
        with pytest.raises(ValueError, match="not a valid request"):
            int4_unpack_fused(layer.qweight, layer.scale_zero, 64, r0, n, B)
    with pytest.raises(ValueError, match="not a valid request"):
        int4_unpack_fused(layer.qweight, layer.scale_zero.float(), 64, 0, B, B)


def test_int4_prefill_without_a_c_compiler_warns_and_uses_the_passes(tmp_path, monkeypatch):
    "No compiler (CC pointing nowhere, an empty cache): one warning naming the cause, and the same outputs by torch passes."
    import paligemma_edu.quantization as Q
    if Q.int4_cpu_layout()[0] != "halves": pytest.skip("this CPU's int4 layout keeps the kernel for every row count")
    torch.manual_seed(3)
    layer = QuantLinear.from_linear(nn.Linear(256, 512, bias=False).bfloat16(), 4)
    x = torch.randn(Q.INT4_DENSE_M, 256).bfloat16()
    expected = Q.int4_matmul_dense(x, layer.qweight, layer.scale_zero, 64, fused=False)
    monkeypatch.setenv("PALIGEMMA_EDU_CACHE", str(tmp_path)); monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    Q.int4_unpack_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="falls back to slower torch operations.*no-such-cc"):
            assert Q.int4_unpack_kernel() is None
        with torch.no_grad(): assert torch.equal(layer(x), expected)
        assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())  # nothing half-written left
    finally:
        Q.int4_unpack_kernel.cache_clear()


def test_int4_c_unpack_is_built_once_into_the_cache_folder(tmp_path, monkeypatch):
    "A fresh cache folder gets one library (and no leftovers); the next process loads it and compiles nothing."
    import paligemma_edu.quantization as Q
    if Q.int4_cpu_layout()[0] != "halves": pytest.skip("this CPU's int4 layout keeps the kernel for every row count")
    monkeypatch.setenv("PALIGEMMA_EDU_CACHE", str(tmp_path))
    Q.int4_unpack_kernel.cache_clear()
    try:
        if Q.int4_unpack_kernel() is None: pytest.skip("no C compiler here")
        libs = list((tmp_path / "kernels").iterdir())
        assert len(libs) == 1 and libs[0].suffix == ".so"
        Q.int4_unpack_kernel.cache_clear()                                              # as in a new process
        monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("compiled a second time"))
        assert Q.int4_unpack_kernel() is not None and list((tmp_path / "kernels").iterdir()) == libs
    finally:
        Q.int4_unpack_kernel.cache_clear()


def test_int8_layers_of_a_model_share_one_workspace(bundled):
    "quantize gives one Workspace to all the int8 layers of a model (none to a layer made alone, none shared between models)."
    import paligemma_edu.quantization as Q
    from paligemma_edu.quantization import SMALL_M, Workspace
    assert not any(isinstance(v, dict) and k.isupper() and k.startswith("_") for k, v in vars(Q).items())
    model, _ = bundled
    a, b = quantize(copy.deepcopy(model), 8), quantize(copy.deepcopy(model), 8)
    ws = {id(m.workspace) for m in a.modules() if isinstance(m, QuantLinear)}
    assert len(ws) == 1 and isinstance(next(m for m in a.modules() if isinstance(m, QuantLinear)).workspace, Workspace)
    assert ws.isdisjoint({id(m.workspace) for m in b.modules() if isinstance(m, QuantLinear)})
    layer = next(m for m in a.modules() if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding))
    x = torch.randn(SMALL_M + 1, layer.in_features)
    alone = QuantLinear.from_linear(nn.Linear(layer.in_features, layer.out_features), 8)
    assert alone.workspace is None
    with torch.no_grad(): y = layer(x)
    assert list(layer.workspace.buffers) == [(torch.bfloat16, "cpu")]
    layer.workspace = None  # a fresh buffer per call: the same numbers
    with torch.no_grad(): torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_bundled_model_greedy_tokens_unchanged_by_bfloat16_compute(bundled):
    "Greedy answers of the quantized bundled model (float32, bfloat16) equal those recorded before the bfloat16 compute."
    model, processor = bundled
    from paligemma_edu.shapes import held_out_set
    rec = json.loads((ROOT / "tests/fixtures/quant_tokens_before.json").read_text())
    items = held_out_set(4, seed=77)
    inputs = processor(images=[it["image"] for it in items], text=[it["prompt"] for it in items])
    args = [inputs[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")]
    until_eos = lambda r: r[:r.index(1) + 1] if 1 in r else r  # noqa: E731  (tokens after the answer's end are noise)
    floor = 20 if torch.backends.cpu.get_cpu_capability() == rec["cpu_capability"] else 18  # other CPUs round differently
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        for bits in (8, 4):
            q = quantize(copy.deepcopy(m), bits)
            a = [t.to(dtype) if t.is_floating_point() else t for t in args]
            got = q.generate(*a, max_new_tokens=16, eos_token_id=[])[:, args[0].shape[1]:].tolist()
            ref = rec["tokens"][f"{str(dtype)[6:]}-int{bits}"]
            same = sum(until_eos(g) == until_eos(r) for g, r in zip(got, ref))
            assert same >= floor, (dtype, bits, same)


def test_int4_codes_are_the_min_max_codes():
    w = torch.randn(80, 128)
    q, s, z = quantize_int4(w, 64)
    assert (w - dequantize_int4(q, s, z, 64)).abs().reshape(80, 2, 64).le(s[..., None] / 2 + 1e-6).all()
    layer = QuantLinear.from_linear(nn.Linear(128, 80, bias=False).requires_grad_(False).eval(), 4)
    layer.quantize_(w)
    assert torch.equal(unpack_int4_cpu(layer.qweight), q)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_int4_layout_on_other_cpu_capabilities(capability):
    "The kernel's packing depends on the CPU; the probe must find each layout and the kernel must match the reference."
    code = ("import torch; from paligemma_edu.quantization import *; torch.manual_seed(0); w = torch.randn(112, 320);"
            "q, s, z = quantize_int4(w, 64);"
            "p = pack_int4_cpu(q); assert torch.equal(unpack_int4_cpu(p), q); x = torch.randn(3, 320);"
            "sz = torch.stack([s, z], -1).transpose(0, 1).contiguous();"
            "torch.testing.assert_close(torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 64, sz),"
            " x @ dequantize_int4(q, s, z, 64).T,"
            " rtol=1e-5, atol=1e-4); print(torch.backends.cpu.get_cpu_capability(), int4_cpu_layout())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0].lower() == capability


def test_tied_table_serves_embedding_and_head(bundled):
    model, _ = bundled
    q = quantize(copy.deepcopy(model), 4)
    lm = q.language_model
    assert isinstance(lm.model.embed_tokens, QuantEmbedding) and isinstance(lm.lm_head, TiedHead)
    assert lm.lm_head.embedding is lm.model.embed_tokens
    assert not any(k.startswith("language_model.lm_head") for k in q.state_dict())  # the table is stored once
    w = model.language_model.model.embed_tokens.weight.detach()
    ids = torch.tensor([[0, 7, 1552]])
    torch.testing.assert_close(lm.model.embed_tokens(ids), fake_quantize(w, 8)[ids])


def test_bad_settings_are_errors(bundled):
    model, _ = bundled
    with pytest.raises(ValueError, match="vision_towr"): quantize(copy.deepcopy(model), 4, skip=["vision_towr"])
    with pytest.raises(ValueError, match="group_size"): quantize(copy.deepcopy(model), 4, group_size=100)
    with pytest.raises(ValueError, match="bits"): quantize(copy.deepcopy(model), 3)
    with pytest.raises(TypeError, match="skip"): quantize(copy.deepcopy(model), 8, skip="vision_tower")


# ------------------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(bundled, saved):
    model, processor = bundled
    inputs = processor(images=[make_scene(2)[0]], text=["detect triangle"])
    for bits, folder in saved.items():
        ref = quantize(copy.deepcopy(model), bits)
        back = PaliGemmaForConditionalGeneration.from_pretrained(folder)
        assert back.cfg.quantization_config == ref.cfg.quantization_config
        a, b = ref.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad(): assert torch.equal(back(**inputs).logits, ref(**inputs).logits)
        cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert cfg["bits"] == bits and cfg["quant_method"] == "paligemma_edu"
        assert not list(folder.glob(".*tmp*"))  # no temporary files left behind


def test_quantize_on_load_equals_quantize_after_load(bundled):
    model, _ = bundled
    for kw in (dict(bits=8), dict(bits=4), dict(bits=4, group_size=32, skip=["vision_tower", "*.embed_tokens"])):
        after = quantize(copy.deepcopy(model), **kw).state_dict()
        on_load = PaliGemmaForConditionalGeneration.from_pretrained(bundled_model_path(), quantize=kw).state_dict()
        assert after.keys() == on_load.keys() and all(torch.equal(after[k], on_load[k]) for k in after)
    bf16 = PaliGemmaForConditionalGeneration.from_pretrained(bundled_model_path(), dtype="bfloat16", quantize="int4")
    after = quantize(copy.deepcopy(model).bfloat16(), 4).state_dict()
    assert all(torch.equal(after[k], v) for k, v in bf16.state_dict().items())


def test_quantize_on_load_rounds_to_dtype_first(bundled, tmp_path):
    "A float32 checkpoint loaded in bfloat16: quantizing on load equals loading in bfloat16, then quantizing."
    model = copy.deepcopy(bundled[0])
    with torch.no_grad():  # weights that are not already bfloat16 numbers
        for p in model.parameters(): p.add_(torch.randn_like(p) * 1e-3)
    f32 = model.save_pretrained(tmp_path / "f32")
    for q in ("int8", "int4"):
        on_load = PaliGemmaForConditionalGeneration.from_pretrained(f32, dtype="bfloat16", quantize=q).state_dict()
        after = quantize(PaliGemmaForConditionalGeneration.from_pretrained(f32, dtype="bfloat16"), int(q[3:])).state_dict()
        assert all(torch.equal(after[k], v) for k, v in on_load.items())


def _copy_folder(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    sd = load_file(src / "model.safetensors")
    save_file(tensors(sd) if tensors else sd, str(dst / "model.safetensors"))
    return dst


def test_settings_and_tensors_disagree(saved, tmp_path):
    int8, int4 = saved[8], saved[4]
    claims_int4 = lambda c: c | {"quantization_config": c["quantization_config"] | {"bits": 4, "group_size": 64}}
    lie = _copy_folder(int8, tmp_path / "lie", config=claims_int4)
    with pytest.raises(ValueError, match=r"do not match the quantization settings.*mis-shaped.*qweight"):
        PaliGemmaForConditionalGeneration.from_pretrained(lie)
    key = "language_model.model.layers.1.mlp.down_proj.zero"
    gone = _copy_folder(int4, tmp_path / "gone", tensors=lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=rf"1 missing: \['{key}'\]"): PaliGemmaForConditionalGeneration.from_pretrained(gone)
    key = "language_model.model.layers.0.self_attn.q_proj.qweight"
    signed = _copy_folder(int4, tmp_path / "signed", tensors=lambda sd: sd | {key: sd[key].view(torch.int8)})
    with pytest.raises(ValueError, match=rf"{key}: expected torch.uint8, found torch.int8"):
        PaliGemmaForConditionalGeneration.from_pretrained(signed)
    foreign = _copy_folder(int8, tmp_path / "foreign",
                           config=lambda c: c | {"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ValueError, match="bitsandbytes"): PaliGemmaForConditionalGeneration.from_pretrained(foreign)
    load = PaliGemmaForConditionalGeneration.from_pretrained
    with pytest.raises(ValueError, match="already quantized"): load(int8, quantize="int4")
    with pytest.raises(ValueError, match="'int8', 'int4'"): load(int8, quantize="fp8")


def test_float_checkpoint_with_a_different_head_is_refused(bundled, tmp_path):
    model, _ = bundled
    src = model.save_pretrained(tmp_path / "float")
    head = _copy_folder(src, tmp_path / "head", tensors=lambda sd: sd | {
        "lm_head.weight": sd["language_model.model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="LM head that differs"):
        PaliGemmaForConditionalGeneration.from_pretrained(head, quantize="int8")
    same = _copy_folder(src, tmp_path / "same",
                        tensors=lambda sd: sd | {"lm_head.weight": sd["language_model.model.embed_tokens.weight"].clone()})
    PaliGemmaForConditionalGeneration.from_pretrained(same, quantize="int8")  # an equal head is fine


def test_quantizing_on_load_never_holds_the_float_model(tmp_path):
    "Peak memory while quantizing a 0.2 GB bf16 checkpoint to int4 on load stays well under the float weights' size."
    code = f"""
import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import torch, quantization as qb, run as bench
from pathlib import Path
cfg = bench.mid_config()
folder = Path({str(tmp_path / 'mid')!r}); qb.write_random_bf16(cfg, folder)
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
import paligemma_edu.checkpoints, paligemma_edu.quantization  # noqa
bench.reset_peak_rss(); base = bench.current_rss_mb("VmHWM")
m = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype="bfloat16", quantize="int4")
print(json.dumps(dict(peak=bench.current_rss_mb("VmHWM") - base, file=(folder / "model.safetensors").stat().st_size / 2**20)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["file"] > 200 and res["peak"] < 0.6 * res["file"], res


# ------------------------------------------------------------------------------------------------------- answers, CLI
def test_bundled_model_still_answers(bundled):
    model, processor = bundled
    from paligemma_edu.generate import answer
    from paligemma_edu.shapes import held_out_set
    items = held_out_set(6, seed=77)
    images, prompts = [it["image"] for it in items], [it["prompt"] for it in items]
    ref = answer(model, processor, images, prompts, max_new_tokens=24)
    for bits, floor in ((8, 0.95), (4, 0.85)):
        got = answer(quantize(copy.deepcopy(model), bits), processor, images, prompts, max_new_tokens=24)
        same = sum(a == b for a, b in zip(got, ref)) / len(ref)
        assert same >= floor, (bits, same, [(p, a, b) for p, a, b in zip(prompts, got, ref) if a != b][:5])


def test_cli_generate_quantized(tmp_path, capsys):
    from paligemma_edu.cli import main
    image, _ = make_scene(4)
    image.save(tmp_path / "scene.png")
    assert main(["generate", "--image", str(tmp_path / "scene.png"), "--prompt", "answer en how many shapes are there?",
                 "--quantize", "int4"]) == 0
    assert capsys.readouterr().out.strip()


def test_benchmark_script_quick(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/quantization.py", "--quick", "--kernels", "--full", "--threads", "1",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "quantization.json").read_text())
    assert {"ours_bf16", "ours_int8", "ours_int4"} <= set(res["full"]["memory"])
    assert res["full"]["onload"]["int4"]["peak_rss_gb"] > 0
    assert "| ours int4, saved quantized checkpoint |" in (tmp_path / "quantization.md").read_text()


@pytest.mark.parametrize("bits", [8, 4])
def test_fixed_shape_decoding_of_a_quantized_model(bundled, bits):
    "The fixed-shape decode step of 19_fast_decoding runs a quantized model and gives its eager greedy tokens."
    model, processor = bundled
    q = quantize(copy.deepcopy(model), bits)
    image, _ = make_scene(11)
    inputs = processor(images=[image, image], text=["caption en", "detect circle"])
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], inputs["token_type_ids"])
    eager = q.generate(*args, max_new_tokens=12)
    assert torch.equal(q.generate(*args, max_new_tokens=12, compile="static"), eager)


def test_quant_matrix_script_quick(tmp_path):
    "The benchmark matrix runs end to end on tiny shapes and writes its table where --out says (never elsewhere)."
    committed = ROOT / "benchmarks/results/quant_matrix/quant_matrix.json"
    before = committed.read_bytes() if committed.exists() else None
    r = subprocess.run([sys.executable, "benchmarks/quant_matrix.py", "--sizes", "tiny", "--dtypes", "float32", "--rounds", "1",
                        "--new-tokens", "3", "--modes", "hf,eager,int8,int4", "--threads", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "quant_matrix.json").read_text())
    (row,) = res["results"]
    assert set(row["decode"]) == {"hf", "eager", "int8", "int4"} and all(v[0] > 0 for v in row["decode"].values())
    assert row["step_bytes"]["int4"] < row["step_bytes"]["int8"] < row["step_bytes"]["eager"]
    assert '| tiny | float32 | ours quantize="int4" |' in (tmp_path / "quant_matrix.md").read_text()
    assert (committed.read_bytes() if committed.exists() else None) == before


# ------------------------------------------------------------------------------------------------------- old folders
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_folders_saved_before_still_load(bits, tmp_path):
    "int8 / int4 folders written before the settings moved into the config (tests/data/make_quantized_v1.py) load as saved."
    data = ROOT / "tests" / "data" / "quantized-v1"
    folder, ref = data / f"int{bits}", load_file(data / "batch_and_logits.safetensors")
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert model.cfg.quantization_config == saved
    sd, on_disk = model.state_dict(), load_file(folder / "model.safetensors")
    assert all(torch.equal(sd[map_key(k)], v) for k, v in on_disk.items())  # every stored tensor read back unchanged
    batch = {k: ref[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
    with torch.no_grad(): logits = model(**batch).logits
    torch.testing.assert_close(logits, ref[f"logits_int{bits}"], atol=1e-6, rtol=0)
    text = (folder / "config.json").read_text()  # the config round-trips to the very same JSON
    assert json.dumps(PaliGemmaConfig.from_json_file(folder / "config.json").to_dict(), indent=2) == text
    again = model.save_pretrained(tmp_path / "again")  # and saving the loaded model writes the same folder
    assert (again / "config.json").read_text() == text
    resaved = load_file(again / "model.safetensors")
    assert resaved.keys() == on_disk.keys() and all(torch.equal(resaved[k], v) for k, v in on_disk.items())


def test_quantized_folder_without_the_quantization_module(tmp_path):
    "The reader knows quantized folders only through the hook 20_quantization registers; without it the error says so."
    from paligemma_edu import checkpoints
    folder = ROOT / "tests" / "data" / "quantized-v1" / "int8"
    saved = checkpoints.QUANTIZERS.pop(checkpoints.QUANT_METHOD)
    try:
        with pytest.raises(RuntimeError, match="paligemma_edu.quantization"):
            PaliGemmaForConditionalGeneration.from_pretrained(folder)
    finally: checkpoints.QUANTIZERS[checkpoints.QUANT_METHOD] = saved


def test_quantization_config_is_a_config_field():
    "PaliGemmaConfig carries quantization_config: absent for a float model, kept as given, refused when not an object."
    from conftest import tiny_paligemma_config_dict
    d = tiny_paligemma_config_dict()
    assert "quantization_config" not in PaliGemmaConfig.from_dict(d).to_dict()
    q = {"quant_method": "paligemma_edu", "bits": 4, "group_size": 64, "skip": []}
    assert PaliGemmaConfig.from_dict(d | {"quantization_config": q}).to_dict()["quantization_config"] == q
    with pytest.raises(ValueError, match="quantization_config"): PaliGemmaConfig.from_dict(d | {"quantization_config": "int8"})
