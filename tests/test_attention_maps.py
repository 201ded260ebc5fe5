"""Attention-map helpers: shapes, normalisation, mass shares, bad input, and that every plot returns its axes."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from paligemma_edu.attention_maps import (
    answer_attention_overlay, answer_with_attentions, attention_mass_in_box, attention_rollout, plot_attention_matrix,
    plot_rollout, plot_text_to_image, plot_text_to_image_grid, plot_vision_patch_attention, segment_boundaries,
    text_to_image_attention, token_labels, upsample_map)
from paligemma_edu.paligemma import PaliGemmaForConditionalGeneration
from paligemma_edu.shapes import make_example
from paligemma_edu.shapes import make_shapes_processor
from paligemma_edu.train import make_tiny_config, init_weights

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
             text_layers=2, text_heads=2, kv_heads=1, head_dim=16, mlp_ratio=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A random tiny PaliGemma on 32px shapes images (4x4 patches), its processor, and one colour question."
    proc = make_shapes_processor(tmp_path_factory.mktemp("tok"), image_size=32, patch_size=8, n_scenes=200)
    cfg = make_tiny_config(len(proc.tokenizer), proc.tokenizer.image_token_id, **SMALL)
    model = init_weights(PaliGemmaForConditionalGeneration(cfg), seed=0).eval()
    img, prompt, _, scene = make_example(1, "color", image_size=32)
    return model, proc, img, prompt, scene


@pytest.fixture(scope="module")
def aa(tiny):
    model, proc, img, prompt, _ = tiny
    return answer_with_attentions(model, proc, img, prompt, max_new_tokens=3)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def random_attn(L=3, B=1, H=2, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.softmax(torch.randn(B, H, T, T, generator=g), -1) for _ in range(L))


def test_answer_with_attentions_shapes(tiny, aa):
    model, proc, *_ = tiny
    T = aa.input_ids.shape[1]
    assert aa.grid == (4, 4) and len(aa.image_positions) == 16
    assert len(aa.attentions) == 2 and aa.attentions[0].shape == (1, 2, T, T)
    assert len(aa.vision_attentions) == 2 and aa.vision_attentions[0].shape == (1, 2, 16, 16)
    torch.testing.assert_close(aa.attentions[1].sum(-1), torch.ones(1, 2, T))
    assert aa.token_type_ids[0, :aa.prompt_len].eq(0).all() and aa.token_type_ids[0, aa.prompt_len:].eq(1).all()
    # the rerun reproduces greedy generation: each answer token is the argmax at the query before it
    assert torch.equal(aa.logits[0, aa.prompt_len - 1:-1].argmax(-1), aa.input_ids[0, aa.prompt_len:])


def test_unequal_prompt_lengths_raise(tiny):
    model, proc, img, *_ = tiny
    with pytest.raises(ValueError, match="different lengths"):
        answer_with_attentions(model, proc, [img, img], ["caption en", "answer en how many shapes are there?"])


def test_text_to_image_attention_selects_and_averages():
    attn = random_attn(L=3, H=2, T=10)
    pos = torch.arange(1, 5)
    m = text_to_image_attention(attn, 8, pos, 2, layers=1, heads=0)
    assert m.shape == (2, 2)
    torch.testing.assert_close(m.flatten(), attn[1][0, 0, 8, 1:5])
    avg = text_to_image_attention(attn, 8, pos, (2, 2))
    torch.testing.assert_close(avg.flatten(), torch.stack([a[0, :, 8, 1:5] for a in attn]).mean((0, 1)))
    assert 0 < float(avg.sum()) <= 1


def test_text_to_image_attention_bad_input():
    attn = random_attn()
    with pytest.raises(ValueError, match="3x3"):
        text_to_image_attention(attn, 8, torch.arange(4), 3)
    with pytest.raises(ValueError, match="layers"):
        text_to_image_attention(attn, 8, torch.arange(4), 2, layers=5)
    with pytest.raises(ValueError, match="token_index"):
        text_to_image_attention(attn, 10, torch.arange(4), 2)


def test_rollout_rows_sum_to_one():
    attn = random_attn(L=4, H=3, T=16, seed=1)
    for res in (True, False):
        R = attention_rollout(attn, add_residual=res)
        assert R.shape == (16, 16) and (R >= 0).all()
        torch.testing.assert_close(R.sum(-1), torch.ones(16))
    torch.testing.assert_close(attention_rollout(attn[:1], add_residual=False), attn[0][0].mean(0))
    one = attn[0][0].mean(0)
    torch.testing.assert_close(attention_rollout(attn[:1]), (one + torch.eye(16)) / 2)


def test_mass_in_box():
    inside = torch.zeros(8, 8)
    inside[2:4, 1:5] = 1.0
    assert attention_mass_in_box(inside, (16, 8, 32, 40), 64) == (1.0, 16 * 32 / 64 ** 2)
    mass, area = attention_mass_in_box(torch.ones(8, 8), (5, 9, 30, 50), 64)
    assert mass == pytest.approx(area)
    g = torch.Generator().manual_seed(0)
    mass, area = attention_mass_in_box(torch.rand(8, 8, generator=g), (3, 7, 41, 22), (64, 64))
    assert 0 <= mass <= 1 and 0 <= area <= 1
    assert attention_mass_in_box(torch.ones(4, 4), (-5, -5, 99, 99), 32) == (1.0, 1.0)
    assert attention_mass_in_box(torch.ones(4, 4), (40, 40, 50, 50), 32) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no mass"):
        attention_mass_in_box(torch.zeros(4, 4), (0, 0, 8, 8), 32)


def test_upsample_map_is_nearest():
    m = torch.arange(4.0).reshape(2, 2)
    up = upsample_map(m, 4)
    assert up.shape == (4, 4) and float(up[0, 0]) == 0 and float(up[3, 3]) == 3 and float(up.sum()) == 4 * float(m.sum())


def test_segment_boundaries_and_labels(tiny, aa):
    _, proc, *_ = tiny
    b = segment_boundaries(aa.input_ids[0], aa.token_type_ids[0], proc.image_token_id)
    assert b == [16, aa.prompt_len]
    labels = token_labels(proc, aa.input_ids[0])
    assert len(labels) == aa.input_ids.shape[1] and labels[0] == "<image>" and labels[1] == ""


def test_plots_return_axes(tiny, aa):
    model, proc, img, prompt, scene = tiny
    q = aa.answer_query(0)
    m = text_to_image_attention(aa.attentions, q, aa.image_positions, aa.grid)
    ax = plot_text_to_image(img, m, title="t", box=scene.objects[0].bbox)
    assert isinstance(ax, plt.Axes)
    axs = plot_text_to_image_grid(img, aa.attentions, q, aa.image_positions, aa.grid, layers=[0, 1], heads=[1])
    assert axs.shape == (3, 2) and all(isinstance(a, plt.Axes) for a in axs.flat)
    assert isinstance(plot_vision_patch_attention(img, aa.vision_attentions, patch=5, layer=1), plt.Axes)
    assert isinstance(plot_vision_patch_attention(img, aa.vision_attentions, patch=5, layer=0, head=1), plt.Axes)
    R = attention_rollout(aa.vision_attentions)
    assert isinstance(plot_rollout(img, R), plt.Axes) and isinstance(plot_rollout(img, R, patch=3), plt.Axes)
    bounds = segment_boundaries(aa.input_ids[0], aa.token_type_ids[0], proc.image_token_id)
    ax = plot_attention_matrix(aa.attentions[0][0, 0], token_labels(proc, aa.input_ids[0]), bounds)
    assert isinstance(ax, plt.Axes)
    assert isinstance(plot_attention_matrix(aa.attentions[1][0].mean(0), boundaries=bounds, query_start=16), plt.Axes)
    with pytest.raises(ValueError, match=r"\(T, S\)"):
        plot_attention_matrix(aa.attentions[0][0])
    _, given = plt.subplots()
    text, ax = answer_attention_overlay(model, proc, img, prompt, max_new_tokens=2, ax=given)
    assert ax is given and isinstance(text, str)


def _box_ratio(aa, b, box, layer):
    "Mass share in `box` / its area share, for the query that produced the first answer token of batch item b."
    one = tuple(a[b:b + 1] for a in aa.attentions)
    m = text_to_image_attention(one, aa.answer_query(0), aa.image_positions, aa.grid, layers=layer)
    mass, area = attention_mass_in_box(m, box, 64)
    return mass, area


def test_bundled_model_reads_the_colour_from_the_asked_object():
    """On the bundled model, the colour answer's image attention concentrates on the object asked about, in the two
    layers that read the image and averaged over layers. Measured on these 30 scenes, ratio (mass share in the box /
    its area share): layer 2 3.7, layer 3 5.5, mean of layers 3.9; a random model gives about 1."""
    from paligemma_edu.shapes import make_scene
    from paligemma_edu.bundled import load_bundled_model
    from paligemma_edu.shapes import EVAL_SEED
    model, proc = load_bundled_model()
    scenes, s = [], EVAL_SEED + 5 * 10**7
    while len(scenes) < 30:
        im, sc = make_scene(s); s += 1
        if len(sc.objects) > 1: scenes.append((im, sc))
    asked = [sc.objects[0] for _, sc in scenes]
    prompts = [f"answer en what color is the {o.shape}?" for o in asked]
    aa = answer_with_attentions(model, proc, [im for im, _ in scenes], prompts, max_new_tokens=2)
    assert [a.strip() for a in aa.answers] == [o.color for o in asked]
    ratios = {}
    for layer in (2, 3, None):
        mass, area = zip(*(_box_ratio(aa, b, o.bbox, layer) for b, o in enumerate(asked)))
        ratios[layer] = np.mean(mass) / np.mean(area)
    assert ratios[2] > 2.0 and ratios[3] > 3.0 and ratios[None] > 2.0, ratios
