"""Parity and bad-input tests for the vision half: image preprocessing, patch embedding and the SigLIP tower."""
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import SiglipImageProcessorPil

from paligemma_edu.core import compare_layers, seed_everything
from paligemma_edu.images import SiglipImageProcessor, load_image, make_demo_image, to_pil
from paligemma_edu.patch_embedding import patchify
from paligemma_edu.attention_kernels import dot_product_attention
from paligemma_edu.siglip import SiglipVisionConfig, SiglipVisionModel, SiglipVisionOutput

ATOL = 1e-5


# ---------------------------------------------------------------- fixtures
def _hf_processor(p: SiglipImageProcessor) -> SiglipImageProcessorPil:
    d = p.to_dict()
    keys = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "do_convert_rgb")
    return SiglipImageProcessorPil(**{k: d[k] for k in keys})


def _mode_images():
    demo = make_demo_image(96)
    rgba = demo.convert("RGBA")
    a = np.asarray(rgba).copy(); a[::3, :, 3] = 0; a[1::3, :, 3] = 100
    rgba = Image.fromarray(a, "RGBA")
    pal_t = demo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8); pal_t.info["transparency"] = 2
    return {
        "RGB": demo, "RGB-nonsquare": demo.resize((131, 47)), "RGBA": rgba, "LA": rgba.convert("LA"),
        "P": demo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "P-transparency": pal_t,
        "L": demo.convert("L"), "1": demo.convert("1"), "CMYK": demo.convert("CMYK"), "YCbCr": demo.convert("YCbCr"),
        "numpy-RGB": np.asarray(demo.resize((40, 70))), "numpy-RGBA": np.asarray(rgba),
        "numpy-gray": np.asarray(demo.convert("L")),
    }


def _hf_vision(cfg: SiglipVisionConfig):
    hc = transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0,
        vision_use_head=False, attn_implementation="eager")
    return transformers.SiglipVisionModel(hc).eval()


def _hf_state_dict(hf):
    "transformers 5 keeps the tower's keys at the top level; older versions under `vision_model.`."
    return getattr(hf, "vision_model", hf).state_dict()


TINY = {  # (hidden, heads, layers, image, patch, intermediate) -> head dims 12, 8, 16; patches 7, 6, 4
    "p7-dh12": dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, image_size=28, patch_size=7,
                    intermediate_size=80),
    "p6-dh8": dict(hidden_size=24, num_attention_heads=3, num_hidden_layers=3, image_size=36, patch_size=6,
                   intermediate_size=40),
    "p4-dh16-1ch": dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16, patch_size=4,
                        intermediate_size=64, num_channels=1),
}


# ---------------------------------------------------------------- images
@pytest.mark.parametrize("size", [(224, 224), (64, 64), (30, 50)])
def test_processor_matches_hf(size):
    ours = SiglipImageProcessor(size={"height": size[0], "width": size[1]})
    ref = _hf_processor(ours)
    worst = 0.0
    for name, im in _mode_images().items():
        a = ours(im)["pixel_values"]
        hf_im = im[..., None] if name == "numpy-gray" else im   # HF wants (H, W, 1) for a grey array
        b = ref(hf_im, return_tensors="pt")["pixel_values"]
        assert a.shape == b.shape == (1, 3, *size), name
        assert a.dtype == torch.float32
        d = (a - b).abs().max().item()
        assert d <= 1e-6, f"{name}: max diff {d}"
        worst = max(worst, d)
    print(f"\nprocessor {size}: max abs diff {worst:.2e}")


def test_high_bit_depth_and_broken_images():
    "16-bit images are scaled to 8 bits (transformers clips them); images without a fixed range, NaNs, empty ones raise."
    grey = np.asarray(make_demo_image(64).convert("L"))
    i16 = Image.fromarray(grey.astype(np.uint16) * 257)                      # the same picture, 16 bits deep
    assert i16.mode == "I;16"
    assert np.array_equal(np.asarray(load_image(i16)), np.asarray(load_image(Image.fromarray(grey))))
    for mode in ("I", "F"):
        with pytest.raises(ValueError, match=f"mode '{mode}'.*no fixed range"):
            load_image(Image.fromarray(grey).convert(mode))
    for bad, msg in [(np.full((8, 8, 3), np.nan), "NaN"), (np.full((8, 8), np.inf), "NaN or infinite"),
                     (torch.full((3, 8, 8), float("nan")), "NaN"), (np.zeros((0, 0, 3), np.uint8), "empty"),
                     (Image.new("RGB", (0, 5)), "empty")]:
        with pytest.raises(ValueError, match=msg):
            SiglipImageProcessor()(bad)
    for kw in (dict(image_std=(0.5, 0.0, 0.5)), dict(image_mean=(0.5, float("nan"), 0.5)), dict(rescale_factor=0.0)):
        with pytest.raises(ValueError, match="finite"):
            SiglipImageProcessor(**kw)


def test_image_file_errors_name_the_file(tmp_path, monkeypatch):
    "A decompression bomb and a 32-bit image file are refused with the file's name in the message."
    path = tmp_path / "big.png"
    make_demo_image(64).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)                      # 64 x 64 is now past twice the limit
    with pytest.raises(ValueError, match="big.png.*decompression bombs"):
        load_image(path)
    monkeypatch.undo()
    deep = tmp_path / "deep.tiff"
    make_demo_image(16).convert("F").save(deep)
    with pytest.raises(ValueError, match="deep.tiff.*mode 'F'"):
        load_image(deep)


def test_processor_batch_and_inputs():
    demo = make_demo_image(64)
    arr = np.array(demo)
    ten = torch.from_numpy(arr).permute(2, 0, 1)
    p = SiglipImageProcessor(size={"height": 32, "width": 32})
    pv = p([demo, arr, ten, ten.float() / 255])["pixel_values"]
    assert pv.shape == (4, 3, 32, 32)
    for i in range(1, 4): torch.testing.assert_close(pv[i], pv[0])
    torch.testing.assert_close(p(demo)["pixel_values"], pv[:1])


def test_processor_roundtrip_and_hf_reads_it(tmp_path):
    p = SiglipImageProcessor(image_seq_length=256)
    path = p.save_pretrained(tmp_path)
    d = json.loads(path.read_text())
    assert d["image_processor_type"] == "SiglipImageProcessor" and d["processor_class"] == "PaliGemmaProcessor"
    assert d["image_seq_length"] == 256
    assert SiglipImageProcessor.from_pretrained(tmp_path) == p
    assert SiglipImageProcessor.from_json_file(path) == p
    hf = SiglipImageProcessorPil.from_pretrained(tmp_path)
    assert hf.image_seq_length == 256
    im = make_demo_image(100)
    torch.testing.assert_close(hf(im, return_tensors="pt")["pixel_values"], p(im)["pixel_values"], atol=1e-6, rtol=0)


def test_processor_reads_paligemma_style_config():
    d = {"_valid_processor_keys": ["images"], "do_convert_rgb": None, "do_normalize": True, "do_rescale": True,
         "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
         "image_seq_length": 256, "image_std": [0.5, 0.5, 0.5], "processor_class": "PaliGemmaProcessor",
         "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}
    p = SiglipImageProcessor.from_dict(d)
    assert p.do_convert_rgb is True and p.image_seq_length == 256 and p.size == {"height": 224, "width": 224}


def test_processor_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"; bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(str(bad))
    with pytest.raises(ValueError, match="is not a file"):
        load_image(tmp_path)
    with pytest.raises(TypeError, match="expected a path"):
        load_image([1, 2, 3])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        load_image(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(torch.full((3, 4, 4), 2.0))
    with pytest.raises(TypeError, match="int32"):
        load_image(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="size must be"):
        SiglipImageProcessor(size={"shortest_edge": 224})
    with pytest.raises(ValueError, match="do_center_crop"):
        SiglipImageProcessor.from_dict({"do_center_crop": True})
    with pytest.raises(ValueError, match="image_seq_length"):
        SiglipImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        SiglipImageProcessor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="different sizes"):
        SiglipImageProcessor(do_resize=False)([make_demo_image(8), make_demo_image(16)])


def test_to_pil_roundtrip():
    demo = make_demo_image(32)
    pv = SiglipImageProcessor(size={"height": 32, "width": 32})(demo)["pixel_values"]
    assert np.array_equal(np.asarray(to_pil(pv)), np.asarray(demo))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_pil(torch.zeros(2, 3, 4, 4))


# ---------------------------------------------------------------- patches
def test_patchify_equals_conv_and_unfold():
    seed_everything(0)
    P, D = 7, 20
    x = torch.randn(2, 3, 21, 35)
    conv = nn.Conv2d(3, D, P, stride=P)
    lin = nn.Linear(3 * P * P, D)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(D, -1)); lin.bias.copy_(conv.bias)
    by_conv = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(lin(patchify(x, P)), by_conv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patchify(x, P), nn.functional.unfold(x, P, stride=P).transpose(1, 2))
    with pytest.raises(ValueError, match="not divisible"):
        patchify(x, 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(x[0], P)


# ---------------------------------------------------------------- attention kernel
def test_attention_paths_agree():
    seed_everything(0)
    q, k, v = torch.randn(2, 3, 5, 12), torch.randn(2, 3, 9, 12), torch.randn(2, 3, 9, 12)
    mask = torch.zeros(2, 1, 5, 9); mask[0, :, :, -3:] = torch.finfo(torch.float32).min
    for m in (None, mask):
        fused, none = dot_product_attention(q, k, v, m)
        eager, probs = dot_product_attention(q, k, v, m, output_probs=True)
        assert none is None and probs.shape == (2, 3, 5, 9)
        torch.testing.assert_close(fused, eager, atol=1e-6, rtol=1e-5)
        ref = torch.softmax(q @ k.transpose(-1, -2) / 12 ** 0.5 + (0 if m is None else m), -1) @ v
        torch.testing.assert_close(eager, ref)
    # soft-capping goes through the eager path with tanh(s / c) * c before the mask
    out, p = dot_product_attention(q, k, v, scale=1.0, softcap=2.0)
    s = torch.tanh((q @ k.transpose(-1, -2)) / 2.0) * 2.0
    torch.testing.assert_close(p, torch.softmax(s, -1))
    with pytest.raises(ValueError, match=r"\(B, H, T, Dh\)"):
        dot_product_attention(q[0], k, v)


# ---------------------------------------------------------------- config
def test_config():
    cfg = SiglipVisionConfig.from_dict({"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                                        "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                                        "patch_size": 14, "projection_dim": 2048, "vision_use_head": False})
    assert (cfg.num_patches, cfg.head_dim) == (256, 72)
    assert SiglipVisionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="vision_use_head"):
        SiglipVisionConfig.from_dict({"vision_use_head": True})
    with pytest.raises(ValueError, match="num_attention_heads"):
        SiglipVisionConfig(hidden_size=100)
    with pytest.raises(ValueError, match="patch_size"):
        SiglipVisionConfig(image_size=100)
    with pytest.raises(ValueError, match="attn_implementation"):
        SiglipVisionConfig(attn_implementation="flash")


# ---------------------------------------------------------------- SigLIP tower vs transformers
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TINY))
def test_siglip_matches_hf(name, attn):
    cfg = SiglipVisionConfig(**TINY[name], attn_implementation=attn)
    seed_everything(0)
    hf = _hf_vision(cfg)
    ours = SiglipVisionModel(cfg).eval()
    hf_sd = _hf_state_dict(hf)
    assert set(ours.state_dict()) == set(hf_sd)
    ours.load_state_dict(hf_sd, strict=True)
    pv = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    pairs = ([("embeddings", "embeddings")] + [(f"encoder.layers.{i}",) * 2 for i in range(cfg.num_hidden_layers)]
             + [("post_layernorm", "post_layernorm")])
    diff = compare_layers(ours, hf, lambda: ours(pv), lambda: hf(pixel_values=pv), pairs, atol=ATOL)
    assert diff.first_divergent is None, diff
    with torch.no_grad():
        a = ours(pv, output_hidden_states=True, output_attentions=True)
        b = hf(pixel_values=pv, output_hidden_states=True, output_attentions=True)
    assert isinstance(a, SiglipVisionOutput)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=ATOL, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == cfg.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states): torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    for x, y in zip(a.attentions, b.attentions): torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    worst = max(diff.max_diff, *[(x - y).abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states)])
    print(f"\nsiglip {name} {attn}: max abs diff {worst:.2e}")


def test_siglip_bad_input():
    cfg = SiglipVisionConfig(**TINY["p7-dh12"])
    m = SiglipVisionModel(cfg)
    for bad in (torch.randn(3, 28, 28), torch.randn(1, 1, 28, 28), torch.randn(1, 3, 28, 35), torch.randn(1, 3, 56, 56)):
        with pytest.raises(ValueError, match=r"expected pixel_values of shape \(B, C, H, W\) = \(B, 3, 28, 28\); found"):
            m(bad)


# ---------------------------------------------------------------- full size (meta device)
@pytest.mark.slow
def test_so400m_parameter_count_matches_hf():
    cfg = SiglipVisionConfig()
    with torch.device("meta"):
        ours = SiglipVisionModel(cfg)
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_channels=3,
            image_size=224, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
            vision_use_head=False, attn_implementation="eager"))
    hf_sd = _hf_state_dict(hf)
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(hf_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in getattr(hf, "vision_model", hf).parameters())
    assert n_ours == n_hf == 412_442_352
