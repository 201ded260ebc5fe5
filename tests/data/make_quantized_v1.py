"""Writes tests/data/quantized-v1: a tiny random PaliGemma quantized to int8 and to int4, saved by the library as it was
before quantization settings became part of PaliGemmaConfig (commit 375da23), with the logits of one fixed batch.
tests/test_quantization.py::test_quantized_folders_saved_before_still_load checks that today's code loads them and
gives the same logits. Run from the repository root: `python tests/data/make_quantized_v1.py` (it refuses to overwrite)."""
import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_paligemma_config_dict  # noqa: E402
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration  # noqa: E402
from paligemma_edu.quantization import quantize  # noqa: E402

OUT = Path(__file__).parent / "quantized-v1"

def fixed_batch(cfg) -> dict:
    "Two prompts of 16 image tokens + 6 text tokens, the second left-padded by 2, and two images."
    g = torch.Generator().manual_seed(0)
    n_img, T = cfg.num_image_tokens, cfg.num_image_tokens + 6
    ids = torch.randint(3, 250, (2, T), generator=g)
    ids[:, :n_img] = cfg.image_token_index
    mask = torch.ones(2, T, dtype=torch.long)
    ids[1, 2:2 + n_img], ids[1, :2], mask[1, :2] = cfg.image_token_index, 0, 0
    tt = torch.zeros(2, T, dtype=torch.long); tt[:, -2:] = 1  # the last two tokens are a suffix
    px = torch.rand(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g) * 2 - 1
    return dict(input_ids=ids, pixel_values=px, attention_mask=mask, token_type_ids=tt)

if __name__ == "__main__":
    if OUT.exists(): sys.exit(f"{OUT} exists; remove it first")
    torch.manual_seed(0)
    cfg = PaliGemmaConfig.from_dict(tiny_paligemma_config_dict(kv_heads=1))
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    batch = fixed_batch(cfg)
    tensors = dict(batch)
    for bits in (8, 4):
        q = quantize(copy.deepcopy(model), bits)
        q.save_pretrained(OUT / f"int{bits}")
        with torch.no_grad(): tensors[f"logits_int{bits}"] = q(**batch).logits.contiguous()
    save_file(tensors, str(OUT / "batch_and_logits.safetensors"))
