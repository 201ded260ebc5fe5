"Tests for the synthetic shapes dataset: determinism, geometry, colours, location tokens, IoU and evaluation."
import itertools

import numpy as np
import pytest

from paligemma_edu.shapes import (BACKGROUNDS, COLORS, LOC_BINS, NUMBER_WORDS, SHAPES, TASKS, Scene, ShapeObject,
                                  ShapesDataset, available_tasks, box_iou, caption, collate_examples, detect_answer,
                                  evaluate, loc_tokens, make_example, make_scene, mask_iou, object_masks,
                                  parse_detections, sample_scene, scene_masks, scene_tasks, score, segment_answer, task_kind,
                                  task_texts)
from paligemma_edu.bundled import load_mask_codec

SEEDS = range(60)


@pytest.fixture(scope="module")
def scenes():
    "A few dozen rendered scenes at the default size, without noise."
    return [make_scene(s) for s in SEEDS]


def test_determinism():
    for seed in (0, 7, 123):
        a, b = make_example(seed), make_example(seed)
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        assert a[1:] == b[1:]
    ds1, ds2 = ShapesDataset(20, seed=5), ShapesDataset(20, seed=5)
    for i in range(20):
        x, y = ds1[i], ds2[i]
        np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        assert (x["prompt"], x["answer"], x["scene"]) == (y["prompt"], y["answer"], y["scene"])
    # noise is seeded too
    n1, n2 = make_scene(3, noise=5.0), make_scene(3, noise=5.0)
    np.testing.assert_array_equal(np.asarray(n1[0]), np.asarray(n2[0]))
    # different seeds give different data
    assert not np.array_equal(np.asarray(make_scene(0)[0]), np.asarray(make_scene(1)[0]))


def test_dataset_item_i_is_seed_plus_i():
    ds = ShapesDataset(10, seed=100)
    img, prompt, answer, scene = make_example(103)
    item = ds[3]
    assert (item["prompt"], item["answer"], item["scene"]) == (prompt, answer, scene)
    assert item["task"] == task_kind(prompt)
    assert ds[-1]["scene"] == ds[9]["scene"]
    with pytest.raises(IndexError, match="out of range"):
        ds[10]
    batch = collate_examples([ds[0], ds[1]])
    assert set(batch) == {"image", "prompt", "answer", "scene", "task"} and len(batch["prompt"]) == 2


@pytest.mark.parametrize("image_size", [64, 96])
def test_boxes_inside_and_disjoint(image_size):
    counts, shapes_seen = set(), set()
    for s in SEEDS:
        sc = sample_scene(s, image_size=image_size)
        assert 1 <= len(sc.objects) <= 3
        counts.add(len(sc.objects))
        names = [o.shape for o in sc.objects]
        assert len(set(names)) == len(names), "a shape appears at most once per scene"
        for o in sc.objects:
            y0, x0, y1, x1 = o.bbox
            assert 0 <= y0 < y1 <= image_size and 0 <= x0 < x1 <= image_size
            side = y1 - y0
            assert x1 - x0 == side
            assert round(0.2 * image_size) <= side <= round(0.4 * image_size)
            assert o.color in COLORS and o.shape in SHAPES
            shapes_seen.add(o.shape)
        for a, b in itertools.combinations(sc.objects, 2):
            assert box_iou(a.bbox, b.bbox) == 0.0
            # disjoint along at least one axis
            assert a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0] or a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]
    assert counts == {1, 2, 3} and shapes_seen == set(SHAPES)


def test_centre_pixel_has_stated_colour(scenes):
    for img, sc in scenes:
        px = np.asarray(img)
        assert px.shape == (64, 64, 3) and px.dtype == np.uint8
        for o in sc.objects:
            cy, cx = (int(v) for v in o.center)
            assert tuple(int(v) for v in px[cy, cx]) == COLORS[o.color], (o, sc)
        # a corner of the image that no box covers shows the background
        covered = lambda y, x: any(o.bbox[0] <= y < o.bbox[2] and o.bbox[1] <= x < o.bbox[3] for o in sc.objects)
        free = [(y, x) for y in (0, 63) for x in (0, 63) if not covered(y, x)]
        for y, x in free:
            assert tuple(int(v) for v in px[y, x]) == BACKGROUNDS[sc.background]


def test_centre_colour_with_noise_is_nearest_palette_colour():
    for s in range(20):
        img, sc = make_scene(s, noise=4.0)
        px = np.asarray(img).astype(int)
        for o in sc.objects:
            c = px[int(o.center[0]), int(o.center[1])]
            nearest = min(COLORS, key=lambda k: np.abs(c - np.array(COLORS[k])).sum())
            assert nearest == o.color


def test_shape_fills_its_box(scenes):
    "The box is the tight bounding box of the shape's pixels."
    for img, sc in scenes:
        px = np.asarray(img)
        for o in sc.objects:
            y0, x0, y1, x1 = o.bbox
            mask = (px[y0:y1, x0:x1] == COLORS[o.color]).all(-1)
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), o


def test_scene_masks_label_exactly_the_drawn_pixels(scenes):
    "Each pixel's labels name the shape and colour drawn there; the background is 0 in both maps."
    palette = np.array([(0, 0, 0)] + list(COLORS.values()))
    for img, sc in scenes:
        px = np.asarray(img)
        shape_map, color_map = scene_masks(sc)
        assert shape_map.shape == color_map.shape == (64, 64) and shape_map.dtype == np.uint8
        fg = color_map > 0
        assert ((shape_map > 0) == fg).all()
        assert (palette[color_map][fg] == px[fg]).all()
        assert (px[~fg] == BACKGROUNDS[sc.background]).all()
        for o in sc.objects:
            y0, x0, y1, x1 = o.bbox
            inside = shape_map[y0:y1, x0:x1]
            assert set(np.unique(inside)) <= {0, 1 + SHAPES.index(o.shape)}, o
            assert (inside > 0).sum() == (shape_map == 1 + SHAPES.index(o.shape)).sum()  # nothing outside its box


def test_detection_round_trip_within_one_bin():
    for image_size in (64, 96, 224):
        bin_px = image_size / LOC_BINS
        for s in range(30):
            sc = sample_scene(s, image_size=image_size)
            for o in sc.objects:
                dets = parse_detections(detect_answer(sc, o.shape), image_size)
                assert len(dets) == 1 and dets[0][1] == o.shape
                assert np.abs(np.subtract(dets[0][0], o.bbox)).max() <= bin_px + 1e-9
    # several detections separated by ' ; ', with multi-word labels
    sc = sample_scene(4)
    text = " ; ".join(detect_answer(sc, o.shape) for o in sc.objects) + " ; <loc0000><loc0000><loc1023><loc1023> big box"
    dets = parse_detections(text, 64)
    assert [l for _, l in dets] == [o.shape for o in sc.objects] + ["big box"]


def test_loc_tokens_convention():
    assert loc_tokens((0, 0, 64, 64), 64) == "<loc0000><loc0000><loc1023><loc1023>"
    assert loc_tokens((16, 32, 48, 40), 64) == "<loc0256><loc0512><loc0768><loc0640>"
    assert loc_tokens((10, 20, 30, 40), (100, 200)) == "<loc0102><loc0102><loc0307><loc0205>"
    assert parse_detections("", 64) == [] and parse_detections("<loc0001><loc0002> circle", 64) == []
    with pytest.raises(ValueError, match="expected a box"):
        loc_tokens((1, 2, 3), 64)
    with pytest.raises(TypeError, match="expected image_size"):
        parse_detections("<loc0001><loc0002><loc0003><loc0004> a", "64")


def test_box_iou_known_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (0, 5, 10, 15)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (2, 2, 8, 8)) == pytest.approx(36 / 100)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_tasks_and_answers():
    sc = Scene([ShapeObject("square", "blue", (30, 40, 50, 60)), ShapeObject("circle", "red", (5, 5, 20, 20))],
               "white", 64)
    assert caption(sc) == "a red circle and a blue square"
    pairs = dict(scene_tasks(sc, rng=0))
    assert pairs["caption en"] == "a red circle and a blue square"
    assert pairs["detect square"] == "<loc0480><loc0640><loc0800><loc0960> square"
    assert pairs["detect triangle"] == ""
    assert pairs["answer en what color is the circle?"] == "red"
    assert "answer en what color is the triangle?" not in pairs
    assert pairs["answer en how many shapes are there?"] == "2"
    assert pairs["answer en what shapes are red?"] == "circle" and pairs["answer en what shapes are blue?"] == "square"
    assert "answer en what shapes are green?" not in pairs
    same = Scene([ShapeObject("square", "red", (30, 40, 50, 60)), ShapeObject("circle", "red", (5, 5, 20, 20))])
    assert dict(scene_tasks(same, tasks=("shape",))) == {"answer en what shapes are red?": "circle and square"}
    three = Scene([ShapeObject("triangle", "green", (0, 40, 20, 60)), ShapeObject("square", "blue", (30, 20, 50, 40)),
                   ShapeObject("circle", "red", (5, 0, 20, 15))])
    assert caption(three) == "a red circle, a blue square and a green triangle"
    for kind in available_tasks():
        _, prompt, answer, scene = make_example(11, task=kind)
        assert task_kind(prompt) == kind
    assert available_tasks() == tuple(t for t in TASKS if t != "segment")
    with pytest.raises(ValueError, match="unknown task"):
        make_example(0, task="point")
    with pytest.raises(ValueError, match="segment answers hold the 16 codes of a mask codec: pass codec="):
        make_example(0, task="segment")
    with pytest.raises(ValueError, match="not one of the shapes tasks"):
        task_kind("caption fr")
    with pytest.raises(ValueError, match="max_objects must be between 1 and 3"):
        make_scene(0, max_objects=4)
    with pytest.raises(TypeError, match="expected an int seed"):
        make_scene("0")


def test_evaluate_perfect_and_wrong_predictors():
    ds = ShapesDataset(80, seed=321)
    answers = {}
    for i in range(len(ds)):
        it = ds[i]
        answers[(it["prompt"], np.asarray(it["image"]).tobytes())] = it["answer"]
    calls = []

    def perfect(images, prompts):
        calls.append(len(prompts))
        return [answers[(p, np.asarray(im).tobytes())] for im, p in zip(images, prompts)]

    res = evaluate(perfect, ds, batch_size=32)
    assert calls == [32, 32, 16]
    assert set(res) == set(available_tasks()) and sum(m["n"] for m in res.values()) == 80
    for kind, m in res.items():
        for name, v in m.items():
            if name != "n": assert v == 1.0, (kind, name, v)

    wrong = evaluate(lambda ims, ps: ["<loc0000><loc0000><loc0010><loc0010> " + p.split()[-1] if p.startswith("detect")
                                      else "purple" for p in ps], ds)
    assert all(m["exact"] == 0.0 for m in wrong.values())
    assert wrong["detect"]["hit@0.5"] == 0.0 and wrong["detect"]["absent_acc"] == 0.0

    with pytest.raises(ValueError, match="returned 1 predictions for a batch of 8"):
        evaluate(lambda ims, ps: ["x"], ShapesDataset(8, seed=0))


def test_score_detection_matching():
    sc = Scene([ShapeObject("square", "blue", (16, 16, 32, 32))])
    ans = detect_answer(sc, "square")
    assert score("detect", ans, ans, sc)["ious"] == [1.0]
    # right box, wrong label: no match
    assert score("detect", ans.replace("square", "circle"), ans, sc)["ious"] == [0.0]
    # half-shifted box: IoU 1/3, a miss
    shifted = loc_tokens((16, 24, 32, 40), 64) + " square"
    r = score("detect", shifted, ans, sc)
    assert r["ious"][0] == pytest.approx(1 / 3) and r["exact"] == 0.0 and r["n_pred"] == 1
    absent = score("detect", "", "", sc)
    assert absent["absent"] and absent["n_pred"] == 0 and absent["exact"] == 1.0
    assert score("color", " red ", "red", sc)["exact"] == 1.0
    with pytest.raises(ValueError, match="unknown task kind"):
        score("colour", "red", "red", sc)


# Every word (whitespace-separated, location tokens excluded) a prompt or an answer of the shapes tasks can contain.
TASK_WORDS = {"caption", "en", "detect", "segment", "answer", "what", "color", "is", "the", "how", "many", "shapes", "are",
              "there?", "a", "and", *SHAPES, *COLORS, *NUMBER_WORDS, *(f"{s}?" for s in SHAPES), *(f"{s}," for s in SHAPES),
              *(f"{c}?" for c in COLORS)}


def test_task_texts_cover_vocabulary():
    texts = task_texts(300, seed=0)
    assert texts == task_texts(300, seed=0)
    words = {w for t in texts for w in t.split() if "<loc" not in w}
    assert words == set(TASK_WORDS)


# ---------------------------------------------------------------- segment, with the bundled model's mask codec

@pytest.fixture(scope="module")
def codec():
    return load_mask_codec()


def test_object_masks_and_mask_iou(scenes):
    for _, scene in scenes[:10]:
        masks = object_masks(scene)
        assert len(masks) == len(scene.objects) and all(m.dtype == bool and m.any() for m in masks)
        assert np.array_equal(np.sum(masks, axis=0), scene_masks(scene)[0] > 0)   # disjoint, and they cover every object
    assert mask_iou(np.ones((4, 4)), np.eye(4)).item() == 0.25
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))).item() == 1.0


def test_segment_task(codec):
    sc = Scene([ShapeObject("square", "blue", (30, 40, 50, 60)), ShapeObject("circle", "red", (5, 5, 20, 20))], "white", 64)
    pairs = dict(scene_tasks(sc, rng=0, tasks=("detect", "segment"), codec=codec))
    assert set(pairs) == {"detect square", "detect circle", "detect triangle",
                          "segment square", "segment circle", "segment triangle"}
    assert pairs["segment triangle"] == "" and pairs["segment square"].startswith("<loc0480><loc0640><loc0800><loc0960><seg")
    assert pairs["segment square"].count("<seg") == 16 and pairs["segment square"].endswith("> square")
    (box, mask, label), = codec.decode_segmentation(pairs["segment square"], 64)
    assert box == (30.0, 40.0, 50.0, 60.0) and label == "square" and mask_iou(mask, object_masks(sc)[0]) > 0.95
    # with a codec, every task is available; the dataset draws segment too, and the same stream twice
    assert available_tasks(codec) == TASKS
    ds = ShapesDataset(60, seed=3, codec=codec, weights={"segment": 3.0})
    kinds = [ds[i]["task"] for i in range(60)]
    assert kinds.count("segment") > 15 and [ds[i]["answer"] for i in range(5)] == [ds[i]["answer"] for i in range(5)]
    _, prompt, answer, scene = make_example(11, task="segment", codec=codec)
    assert task_kind(prompt) == "segment" and (answer == "" or answer.count("<seg") == 16)
    with pytest.raises(ValueError, match="pass codec="):
        ShapesDataset(10, weights={"segment": 1.0})
    with pytest.raises(ValueError, match="pass codec="):
        scene_tasks(sc, tasks=("segment",))


def test_segment_targets_do_not_depend_on_autocast(codec):
    "Training writes its targets inside a bf16 autocast region; the codes are the codec's float32 ones all the same."
    import torch
    ds = ShapesDataset(40, seed=9, tasks=("segment",), codec=codec)
    plain = [ds[i]["answer"] for i in range(40)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [ds[i]["answer"] for i in range(40)] == plain


def test_score_segment(codec):
    sc = Scene([ShapeObject("square", "blue", (16, 16, 32, 32)), ShapeObject("circle", "red", (40, 36, 60, 56))])
    ans = segment_answer(sc, "circle", codec)
    own = score("segment", ans, ans, sc, codec)
    assert own["exact"] == 1.0 and own["ious"] == [1.0] and not own["invalid"] and own["n_pred"] == 1
    assert own["mask_ious"][0] == pytest.approx(float(mask_iou(codec.decode_segmentation(ans, 64)[0][1],
                                                               object_masks(sc)[1])))
    # the mask is pasted into the predicted box: a box 5 pixels to the left loses mask IoU too
    moved = score("segment", loc_tokens((40, 31, 60, 51), 64) + ans[36:], ans, sc, codec)
    assert moved["ious"][0] == pytest.approx(15 / 25) and moved["mask_ious"][0] < own["mask_ious"][0] - 0.2
    # another object's label, or the right label on a far box
    assert score("segment", ans.replace("circle", "square"), ans, sc, codec)["mask_ious"] == [0.0]
    far = score("segment", loc_tokens((0, 0, 10, 10), 64) + ans[36:], ans, sc, codec)
    assert far["ious"] == [0.0] and far["mask_ious"] == [0.0] and not far["invalid"]
    # malformed: fifteen codes, a code out of range, no box
    for bad in (ans.replace("<seg", "<xxx", 1), ans.replace(ans[36:44], "<seg200>"), ans[36:]):
        r = score("segment", bad, ans, sc, codec)
        assert r["invalid"] and r["mask_ious"] == [0.0] and r["ious"] == [0.0] and r["exact"] == 0.0, bad
    # absent shapes: nothing is right; anything else, a malformed answer included, is wrong
    assert score("segment", "", "", sc, codec) == {"exact": 1.0, "ious": [], "mask_ious": [], "n_pred": 0,
                                                   "absent": True, "invalid": False}
    assert score("segment", "<loc0001>", "", sc, codec)["invalid"]
    with pytest.raises(ValueError, match="needs the scene .* and the mask codec"):
        score("segment", ans, ans, sc)


def test_evaluate_segment(codec):
    ds = ShapesDataset(48, seed=77, tasks=("segment",), codec=codec)
    truth = {(ds[i]["prompt"], np.asarray(ds[i]["image"]).tobytes()): ds[i]["answer"] for i in range(len(ds))}
    perfect = evaluate(lambda ims, ps: [truth[(p, np.asarray(im).tobytes())] for im, p in zip(ims, ps)], ds, codec=codec)
    m = perfect["segment"]
    assert set(perfect) == {"segment"} and m["n"] == 48
    assert (m["exact"], m["hit@0.5"], m["mean_iou"], m["absent_acc"], m["invalid"]) == (1.0, 1.0, 1.0, 1.0, 0.0)
    assert 0.95 < m["mask_iou"] < 1.0   # the codec's reconstruction, not the mask itself
    broken = evaluate(lambda ims, ps: ["<loc0001> " + p.split()[1] for p in ps], ds, codec=codec)["segment"]
    assert (broken["invalid"], broken["mask_iou"], broken["hit@0.5"], broken["absent_acc"]) == (1.0, 0.0, 0.0, 0.0)
    silent = evaluate(lambda ims, ps: [""] * len(ps), ds, codec=codec)["segment"]
    assert silent["absent_acc"] == 1.0 and silent["mask_iou"] == 0.0 and silent["invalid"] == 0.0
