"""LoRA and QLoRA: merge equality, peft interop both ways (against transformers), quantized bases, and bad inputs."""
import copy
import json
import math
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PaliGemmaForConditionalGeneration as HFPaliGemma

from conftest import labelled_batch, tiny_hf_paligemma
from paligemma_edu.lora import (LORA_TARGETS, LoRALinear, add_lora, hf_module_name, is_adapter_folder, load_adapted,
                                load_adapter, lora_layers, lora_state_dict, merge_lora, parameter_counts, save_adapter)
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
from paligemma_edu.quantization import QuantLinear
from paligemma_edu.bundled import bundled_model_path, load_bundled_model
from paligemma_edu.shapes import held_out_set
from paligemma_edu.train import make_batch

BF16_U = 2.0 ** -8  # bfloat16's unit roundoff
IMG, N = 299, 16  # <image> id and (28 / 7) ** 2 image tokens of the tiny config
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft, about transformers' API


def batch(prefix_lens=(3, 6), suffix_lens=(4, 2), seed=0):
    "Left-padded rows of the tiny config with token types, labels on the suffix, and pixels."
    return labelled_batch(prefix_lens, suffix_lens, seed, IMG, N)


B = batch()
REAL = B["attention_mask"].bool()


def ours_logits(model, b=B):
    with torch.no_grad(): return model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["token_type_ids"]).logits


def hf_logits(model, b=B):
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0) + 1
    with torch.no_grad():
        return model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                     token_type_ids=b["token_type_ids"], position_ids=pos).logits


def randomize_(model, seed=0, scale=0.1):
    "Random non-zero adapters (A and B) in every LoRALinear."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            for w in (m.lora_A.weight, m.lora_B.weight): w.copy_(torch.randn(w.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    "A tiny transformers PaliGemma and the folder it saved (read by ours)."
    hf = tiny_hf_paligemma(seed=3, kv_heads=1)
    root = tmp_path_factory.mktemp("lora")
    hf.save_pretrained(root / "hf")
    return hf, root / "hf"


def load_ours(folder, **kw): return PaliGemmaForConditionalGeneration.from_pretrained(folder, **kw)


def test_init_equals_base_and_merge_equals_unmerged(base):
    _, folder = base
    ours = load_ours(folder)
    ref = ours_logits(ours)
    names = add_lora(ours, rank=4, alpha=8)
    assert len(names) == 7 * 2 + 3 * 2  # 7 projections in each of 2 text layers, q/k/v in each of 2 vision layers
    torch.testing.assert_close(ours_logits(ours), ref, rtol=0, atol=0)
    counts = parameter_counts(ours)
    assert counts["trainable"] == sum(4 * (m.in_features + m.out_features) for m in lora_layers(ours).values())
    assert all(p.requires_grad == (".lora_" in n) for n, p in ours.named_parameters())
    adapted = ours_logits(randomize_(ours))
    assert (adapted - ref).abs().max() > 1e-2
    merged = merge_lora(ours)
    assert not lora_layers(merged) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(ours_logits(merged), adapted, rtol=1e-5, atol=1e-5)


def test_lora_linear_dtypes():
    base = torch.nn.Linear(64, 32).bfloat16()
    lora = LoRALinear(base, rank=4, alpha=4)
    assert lora.lora_A.weight.dtype == torch.float32 and lora.scaling == 1.0
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert lora(x).dtype == torch.bfloat16
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)


def test_peft_loads_ours(base, tmp_path):
    hf, folder = base
    ours = load_ours(folder)
    add_lora(ours, rank=4, alpha=8)
    adapted = ours_logits(randomize_(ours, seed=1))
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    sd = peft.get_peft_model_state_dict(theirs)
    mine = lora_state_dict(ours)
    assert set(sd) == set(mine)
    for k in sd: torch.testing.assert_close(sd[k], mine[k], rtol=0, atol=0)
    torch.testing.assert_close(hf_logits(theirs)[REAL], adapted[REAL], rtol=0, atol=1e-4)
    # the tied LM head is never adapted, and the folder holds peft's two files and our manifest (which peft ignores)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "manifest.json"]


def to_v4_key(k):
    "A peft key of transformers 5.x's module paths -> the same layer's 4.x path."
    for new, old in (("base_model.model.model.language_model.", "base_model.model.language_model.model."),
                     ("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."),
                     ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector.")):
        if k.startswith(new): return old + k[len(new):]
    raise AssertionError(k)


@pytest.mark.parametrize("targets, task", [(list(LORA_TARGETS), None), (r".*language_model.*\.(q_proj|v_proj)", None),
                                           ("all-linear", None), (["q_proj", "v_proj"], "CAUSAL_LM")],
                         ids=["seven", "regex-text-qv", "all-linear", "causal-lm-qv"])
def test_ours_loads_peft(base, tmp_path, targets, task):
    hf, folder = base
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=targets, task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(hf), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n: p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    ref = hf_logits(theirs)
    theirs.save_pretrained(str(tmp_path / "ad"))
    ours = load_ours(folder)
    names = load_adapter(ours, tmp_path / "ad")
    hf_names = {n[len("base_model.model."):] for n, m in theirs.named_modules() if hasattr(m, "lora_A") and
                not n.endswith((".lora_A", ".lora_B"))}
    assert {hf_module_name(n) for n in names} == hf_names
    assert next(iter(lora_layers(ours).values())).dropout == 0.1
    ours.eval()
    torch.testing.assert_close(ours_logits(ours)[REAL], ref[REAL], rtol=0, atol=1e-4)
    # the same tensors under transformers 4.x's module paths load to the same model
    v4 = tmp_path / "v4"; v4.mkdir()
    (v4 / "adapter_config.json").write_text((tmp_path / "ad" / "adapter_config.json").read_text())
    save_file({to_v4_key(k): v for k, v in load_file(str(tmp_path / "ad" / "adapter_model.safetensors")).items()},
              str(v4 / "adapter_model.safetensors"))
    if isinstance(targets, list):  # a regex names 5.x paths; a list of names matches in both
        ours4 = load_ours(folder)
        load_adapter(ours4, v4)
        torch.testing.assert_close(ours_logits(ours4.eval()), ours_logits(ours), rtol=0, atol=0)


def test_merged_model_loads_in_transformers(base, tmp_path):
    _, folder = base
    ours = load_ours(folder)
    add_lora(ours, rank=4, alpha=8, targets=["q_proj", "down_proj", "linear"])
    adapted = ours_logits(randomize_(ours, seed=4))
    merge_lora(ours).save_pretrained(tmp_path / "merged")
    back = HFPaliGemma.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(back)[REAL], adapted[REAL], rtol=0, atol=1e-4)


def test_adapter_round_trip_and_load_adapted(tmp_path):
    model, processor = load_bundled_model()
    b = make_batch(processor, held_out_set(1, seed=3))
    run = lambda m: ours_logits(m, b)
    add_lora(model, rank=2, alpha=3.5, targets=r".*layers\.1\.mlp\.(up|down)_proj")
    adapted = run(randomize_(model, seed=5))
    ad = tmp_path / "runs" / "ad"
    save_adapter(model, ad, base_model_name_or_path="../../base")  # relative to the adapter folder
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.language_model.layers.1.mlp.down_proj", "model.language_model.layers.1.mlp.up_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"], cfg["bias"]) == (2, 3.5, "LORA", "none")
    (tmp_path / "base").symlink_to(bundled_model_path())  # the base where the relative path points
    assert is_adapter_folder(ad) and not is_adapter_folder(tmp_path / "base")
    back, back_processor = load_adapted(ad)
    torch.testing.assert_close(run(back), adapted, rtol=0, atol=0)
    assert back_processor.tokenizer.vocab_size == processor.tokenizer.vocab_size
    with pytest.raises(FileNotFoundError, match="pass base="): load_adapted(ad, base=tmp_path / "nowhere")
    save_adapter(model, tmp_path / "b2", base_model_name_or_path="bundled")
    torch.testing.assert_close(run(load_adapted(tmp_path / "b2")[0]), adapted, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="not empty"): save_adapter(model, ad)
    save_adapter(model, ad, overwrite=True)


@pytest.mark.parametrize("K, N", [(200, 1030), (1100, 70)])  # rows beyond a block of 1024; inputs beyond 1024, padded
def test_quant_linear_gradient_wrt_input(K, N):
    lin = torch.nn.Linear(K, N)
    for bits in (8, 4):
        ql = QuantLinear.from_linear(lin, bits)
        ref_w = ql.dequantize()  # the float matrix the integers stand for
        for M in (1, 40):
            x, g = torch.randn(M, K, requires_grad=True), torch.randn(M, N)
            (ql(x) * g).sum().backward()
            torch.testing.assert_close(x.grad, g @ ref_w, rtol=1e-5, atol=1e-4)
            # the path CUDA-packed int4 layers take (they cannot be unpacked), run here with the CPU kernels, which
            # compute in bfloat16: each weight they return is rounded to bfloat16 once
            err = (ql._grad_input_by_kernel(g) - g @ ref_w).abs()
            assert (err <= 2 * BF16_U * (g.abs() @ ref_w.abs()) + 1e-5).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_step_changes_only_adapters(base, tmp_path, bits):
    _, folder = base
    q = load_ours(folder, quantize=f"int{bits}")
    add_lora(q, rank=4, alpha=8)
    assert all(isinstance(m.base, QuantLinear) for m in lora_layers(q).values())
    before = {k: v.clone() for k, v in q.state_dict().items()}
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    q.train()
    out = q(B["input_ids"], B["pixel_values"], B["attention_mask"], B["token_type_ids"], labels=B["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward(); opt.step()
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= {k for k in before if ".lora_" in k}  # the adapters only: the quantized base and the norms stay
    assert {k for k in before if ".lora_B." in k} <= changed  # every B moved (A's gradient is zero while B is zero)
    assert any(k.startswith("vision_tower.") for k in changed)  # gradients reached the vision tower through int layers
    with pytest.raises(ValueError, match="quantized base"): merge_lora(q)
    q.eval()
    save_adapter(q, tmp_path / "ad", base_model_name_or_path=str(folder))
    back = load_ours(folder, quantize=f"int{bits}")
    load_adapter(back, tmp_path / "ad")
    torch.testing.assert_close(ours_logits(back), ours_logits(q), rtol=0, atol=0)


# --- bad inputs: one clear error each ---

@pytest.mark.parametrize("kw, msg", [(dict(rank=0), "rank must be an integer >= 1"), (dict(rank=2.0), "rank must be"),
                                     (dict(alpha=math.nan), "alpha must be a finite number > 0"),
                                     (dict(alpha=0), "alpha must be"),
                                     (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
                                     (dict(targets=[]), "targets must be module names"),
                                     (dict(targets="("), "not a valid regular expression"),
                                     (dict(targets=["query_key_value"]), "match no module"),
                                     (dict(targets=["lm_head"]), "cannot take an adapter"),
                                     (dict(targets=["mlp"]), "cannot take an adapter")])
def test_add_lora_bad_arguments(base, kw, msg):
    ours = load_ours(base[1])
    with pytest.raises(ValueError, match=msg): add_lora(ours, **kw)
    assert not lora_layers(ours) and all(p.requires_grad for p in ours.parameters())


def test_no_match_error_names_examples(base):
    ours = load_ours(base[1])
    with pytest.raises(ValueError, match=r"model\.language_model\.layers\.\d\.mlp\.down_proj.*'q_proj'"):
        add_lora(ours, targets=["qkv"])


def test_already_adapted_and_nothing_to_merge(base, tmp_path):
    ours = load_ours(base[1])
    with pytest.raises(ValueError, match="no LoRA adapters to merge"): merge_lora(ours)
    with pytest.raises(ValueError, match="no LoRA adapters"): save_adapter(ours, tmp_path / "x")
    add_lora(ours)
    with pytest.raises(ValueError, match="already has LoRA adapters"): add_lora(ours)
    save_adapter(ours, tmp_path / "ad")
    with pytest.raises(ValueError, match="already has LoRA adapters"): load_adapter(ours, tmp_path / "ad")


@pytest.fixture
def saved(base, tmp_path):
    "An adapter folder as peft writes one (no manifest.json): the checks below are of the files themselves."
    ours = load_ours(base[1])
    add_lora(ours, rank=4, alpha=8)
    folder = save_adapter(randomize_(ours), tmp_path / "ad")
    (folder / "manifest.json").unlink()
    return folder


def test_saved_adapter_is_checked_against_its_manifest(base, tmp_path):
    "save_adapter records each file's sha256; a changed byte is refused before any tensor reaches the model."
    ours = load_ours(base[1])
    add_lora(ours, rank=4, alpha=8)
    folder = save_adapter(randomize_(ours), tmp_path / "ad")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    fresh = load_ours(base[1])
    load_adapter(fresh, folder)                                   # intact: loads
    f = folder / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1                                                 # one bit of the last tensor's bytes
    f.write_bytes(bytes(data))
    fresh = load_ours(base[1])
    with pytest.raises(ValueError, match="is not the file that was saved") as e: load_adapter(fresh, folder)
    assert "adapter_model.safetensors" in str(e.value)
    assert not lora_layers(fresh)


@pytest.mark.parametrize("edit, msg", [
    (lambda d: "{not json", "is not valid JSON"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "r"}), r"missing field\(s\) \['r'\]"),
    (lambda d: json.dumps(d | {"peft_type": "PREFIX_TUNING"}), "only LoRA adapters"),
    (lambda d: json.dumps(d | {"r": "8"}), "rank must be an integer"),
    (lambda d: json.dumps(d | {"lora_alpha": -1}), "alpha must be a finite number"),
    (lambda d: json.dumps(d | {"use_dora": True}), "not plain LoRA"),
    (lambda d: json.dumps(d | {"rank_pattern": {"q_proj": 2}}), "not plain LoRA"),
    (lambda d: json.dumps(d | {"init_lora_weights": "pissa_niter_4"}), "changed the base weights"),
    (lambda d: json.dumps(d | {"target_modules": ["qkv"]}), "match no module"),
    (lambda d: json.dumps([1, 2]), "must hold a JSON object")])
def test_bad_adapter_config(base, saved, edit, msg):
    cfg_file = saved / "adapter_config.json"
    cfg_file.write_text(edit(json.loads(cfg_file.read_text())))
    ours = load_ours(base[1])
    with pytest.raises(ValueError, match=msg) as e: load_adapter(ours, saved)
    assert "adapter_config.json" in str(e.value)
    assert not lora_layers(ours)


def _rewrite(saved, fn):
    f = saved / "adapter_model.safetensors"
    sd = fn(load_file(str(f)))
    save_file(sd, str(f))


@pytest.mark.parametrize("fn, msg", [
    (lambda sd: {k: v for i, (k, v) in enumerate(sd.items()) if i}, "1 missing"),
    (lambda sd: sd | {"base_model.model.model.language_model.layers.0.mlp.up_proj.lora_C.weight": torch.zeros(2)},
     "1 unexpected"),
    (lambda sd: {k: (v[:2] if i == 0 else v) for i, (k, v) in enumerate(sd.items())}, "1 mis-shaped"),
    (lambda sd: {k.replace("base_model.model.", ""): v for k, v in sd.items()}, "lack peft's 'base_model.model.' prefix")])
def test_bad_adapter_tensors(base, saved, fn, msg):
    _rewrite(saved, fn)
    ours = load_ours(base[1])
    with pytest.raises(ValueError, match=msg) as e: load_adapter(ours, saved)
    assert "adapter_model.safetensors" in str(e.value)
    assert not lora_layers(ours)


def test_pickled_adapter_refused(base, saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"): load_adapter(load_ours(base[1]), saved)


def test_nan_adapter_refused(base, saved):
    _rewrite(saved, lambda sd: {k: v.fill_(math.nan) if i == 0 else v for i, (k, v) in enumerate(sd.items())})
    with pytest.raises(ValueError, match="NaN"): load_adapter(load_ours(base[1]), saved)


def test_load_adapted_base_not_local(saved):
    cfg_file = saved / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"base_model_name_or_path": "google/paligemma-3b-pt-224"}))
    with pytest.raises(FileNotFoundError, match="pass base="): load_adapted(saved)
    with pytest.raises(FileNotFoundError, match="not an adapter folder"): load_adapted(saved.parent)


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_under_bf16_autocast(base, bits):
    q = load_ours(base[1], quantize=f"int{bits}")
    add_lora(q, rank=4, alpha=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(B["input_ids"], B["pixel_values"], B["attention_mask"], B["token_type_ids"], labels=B["labels"])
    out.loss.backward()
    grads = [m.lora_B.weight.grad for m in lora_layers(q).values()]
    assert torch.isfinite(out.loss) and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
