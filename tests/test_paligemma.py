"""PaliGemma end to end against transformers, through checkpoint folders in every key layout."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_hf_paligemma, tiny_paligemma_config_dict
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from paligemma_edu.checkpoints import remap_state_dict

IMG = 299
N = 16  # (28 / 7) ** 2 image tokens


def batch(prefix_lens=(3, 6, 1), suffix_lens=(0, 0, 0), seed=0):
    "Left-padded rows <image>*N <bos> prefix \\n [suffix], with token types and labels."
    g = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for p, s in zip(prefix_lens, suffix_lens):
        pre = [IMG] * N + [2] + torch.randint(3, 290, (p,), generator=g).tolist() + [108]
        suf = torch.randint(3, 290, (s,), generator=g).tolist() + ([1] if s else [])
        rows.append(pre + suf); types.append([0] * len(pre) + [1] * len(suf))
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    tt = torch.tensor([[0] * (L - len(t)) + t for t in types])
    return ids, mask, tt


def hf_pos(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0) + 1


@pytest.fixture(scope="module", params=[1, 2], ids=["kv1", "kv2"])
def models(request, tmp_path_factory):
    kv = request.param
    hf = tiny_hf_paligemma(seed=kv, kv_heads=kv)
    root = tmp_path_factory.mktemp(f"ckpt{kv}")
    hf.save_pretrained(root / "hf5")
    # the same tensors under the published names (vision_tower.vision_model.*)
    (root / "published").mkdir()
    (root / "published" / "config.json").write_text((root / "hf5" / "config.json").read_text())
    sd = load_file(str(root / "hf5" / "model.safetensors"))
    pub = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
           for k, v in sd.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in pub)
    save_file(pub, str(root / "published" / "model.safetensors"))
    return hf, root


@pytest.mark.parametrize("layout", ["hf5", "published"])
def test_logits_prefix_only(models, layout):
    hf, root = models
    ours = PaliGemmaForConditionalGeneration.from_pretrained(root / layout)
    ids, mask, tt = batch()
    pix = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours(ids, pix, mask, tt).logits
        b = hf(input_ids=ids, pixel_values=pix, attention_mask=mask, token_type_ids=tt, position_ids=hf_pos(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)


def test_logits_and_loss_prefix_and_suffix(models):
    hf, root = models
    ours = PaliGemmaForConditionalGeneration.from_pretrained(root / "hf5")
    ids, mask, tt = batch((3, 6, 1), (4, 2, 5), seed=1)
    labels = ids.masked_fill((tt == 0) | (mask == 0), -100)
    pix = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = ours(ids, pix, mask, tt, labels=labels)
        b = hf(input_ids=ids, pixel_values=pix, attention_mask=mask, token_type_ids=tt, position_ids=hf_pos(mask),
               labels=labels)
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)


def test_greedy_generation_matches_hf(models):
    hf, root = models
    ours = PaliGemmaForConditionalGeneration.from_pretrained(root / "published")
    ids, mask, tt = batch((2, 5, 3), seed=2)
    pix = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    mine = ours.generate(ids, pix, mask, tt, max_new_tokens=20, eos_token_id=[])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, token_type_ids=tt,
                             max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert mine.shape == (3, ids.shape[1] + 20)
    assert torch.equal(mine, theirs)


def test_save_pretrained_loads_in_transformers(models, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as HFPaliGemma
    hf, root = models
    ours = PaliGemmaForConditionalGeneration.from_pretrained(root / "hf5")
    ours.save_pretrained(tmp_path)
    back = HFPaliGemma.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, tt = batch(seed=3)
    pix = torch.randn(3, 3, 28, 28)
    kw = dict(input_ids=ids, pixel_values=pix, attention_mask=mask, token_type_ids=tt, position_ids=hf_pos(mask))
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, hf(**kw).logits, atol=0, rtol=0)


def test_in_memory_layouts_load():
    hf = tiny_hf_paligemma()
    ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(tiny_paligemma_config_dict())).eval()
    ours.load_state_dict(remap_state_dict(hf.state_dict()), strict=True)  # 5.x in-memory (model.*, lm_head)
    legacy = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(remap_state_dict(legacy), strict=True)           # 4.5x in-memory


def test_bf16_load_close_to_fp32(models):
    hf, root = models
    ours32 = PaliGemmaForConditionalGeneration.from_pretrained(root / "hf5")
    ours16 = PaliGemmaForConditionalGeneration.from_pretrained(root / "hf5", dtype="bfloat16")
    assert ours16.language_model.lm_head.weight is ours16.language_model.model.embed_tokens.weight
    ids, mask, tt = batch()
    pix = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        a = ours32(ids, pix, mask, tt).logits
        b = ours16(ids, pix.bfloat16(), mask, tt).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 3e-2, rel


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    return PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(tiny_paligemma_config_dict())).eval()


def test_image_token_count_mismatch(small):
    ids, mask, tt = batch((3,))
    ids = ids[:, 1:]  # one <image> token fewer
    with pytest.raises(ValueError, match="hold 15 <image> tokens but the images give 16 features"):
        small(ids, torch.randn(1, 3, 28, 28))


def test_images_without_text_and_text_without_images(small):
    ids, mask, tt = batch((3,))
    with pytest.raises(ValueError, match="no pixel_values"):
        small(ids)
    with pytest.raises(ValueError, match="contain no <image> token"):
        small(torch.tensor([[2, 5, 6]]), torch.randn(1, 3, 28, 28))


def test_prompt_longer_than_positions(small):
    ids = torch.cat([batch((3,))[0], torch.full((1, 200), 7)], 1)
    with pytest.raises(ValueError, match="longer than the model's 128 positions"):
        small(ids, torch.randn(1, 3, 28, 28))


def test_wrong_pixel_shape(small):
    ids, _, _ = batch((3,))
    with pytest.raises(ValueError, match="28"):
        small(ids, torch.randn(1, 3, 32, 32))


def test_folder_without_config_or_weights(tmp_path, models):
    _, root = models
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no config.json .*notes.txt"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((root / "hf5" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*not loaded for safety"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)


def test_truncated_safetensors_names_file(tmp_path, models):
    _, root = models
    (tmp_path / "config.json").write_text((root / "hf5" / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((root / "hf5" / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"model.safetensors.*truncated or corrupt"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)


def test_config_contradicting_weights(tmp_path, models):
    _, root = models
    cfg = json.loads((root / "hf5" / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((root / "hf5" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"mis-shaped.*mlp.down_proj.weight: expected \(48, 100\), found \(48, 96\)"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_and_unexpected_listed(tmp_path, models):
    _, root = models
    sd = load_file(str(root / "hf5" / "model.safetensors"))
    sd.pop("multi_modal_projector.linear.bias")
    sd["language_model.model.layers.0.extra.weight"] = torch.zeros(2)
    (tmp_path / "config.json").write_text((root / "hf5" / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing: \['multi_modal_projector.linear.bias'\].*1 unexpected: "
                                         r"\['language_model.model.layers.0.extra.weight'\]"):
        PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path, models):
    hf, root = models
    sd = load_file(str(root / "hf5" / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (tmp_path / "config.json").write_text((root / "hf5" / "config.json").read_text())
    ours = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path)
    ref = PaliGemmaForConditionalGeneration.from_pretrained(root / "hf5")
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_full_size_paligemma_parameter_count():
    from transformers import PaliGemmaConfig as HFC, PaliGemmaForConditionalGeneration as HFP
    ours_cfg = PaliGemmaConfig()
    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(ours_cfg)
        hf = HFP(HFC(**ours_cfg.to_dict()))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(ours) == n(hf)
