"""Decoding on hand-made head outputs for both flavours (docs/MODEL.md, "Decoding")."""

from __future__ import annotations

import math

import pytest
import torch

from fcos.inference import (
    clip_legacy,
    decode_boxes,
    image_candidates,
    legacy_batched_nms,
    select_candidates,
    select_detections,
    top_detections_with_ties,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def logits_of(probs):
    return torch.tensor([[logit(p) for p in row] for row in probs])


# Four points, two classes. Probabilities above 0.05: (0,0) .9, (1,1) .6, (2,0) .3, (2,1) .2, (3,0) .06, (3,1) .07.
PROBS = [[0.9, 0.01], [0.04, 0.6], [0.3, 0.2], [0.06, 0.07]]
CTR = [0.1, 0.2, 1.0 - 1e-6, 0.9]


def candidates(topk_first: bool, topk: int):
    point_idx, class_idx, scores = select_candidates(
        logits_of(PROBS),
        torch.tensor([logit(c) for c in CTR]),
        score_thresh=0.05,
        topk=topk,
        topk_first=topk_first,
    )
    return sorted(zip(point_idx.tolist(), class_idx.tolist(), scores.tolist()))


def test_seed_order_ranks_by_class_probability():
    got = candidates(topk_first=True, topk=2)
    assert [(p, c) for p, c, _ in got] == [(0, 0), (1, 1)]
    assert [s for _, _, s in got] == pytest.approx(
        [math.sqrt(0.9 * 0.1), math.sqrt(0.6 * 0.2)], rel=1e-5
    )


def test_official_order_ranks_by_probability_times_centerness():
    # prob * ctr: .09, .12, .3, .2, .054, .063 -> top 2 are (2,0) and (2,1).
    got = candidates(topk_first=False, topk=2)
    assert [(p, c) for p, c, _ in got] == [(2, 0), (2, 1)]
    assert [s for _, _, s in got] == pytest.approx([math.sqrt(0.3), math.sqrt(0.2)], rel=1e-5)


def test_threshold_is_strict_and_applies_to_class_probability():
    # (1,0) with 0.04 is below; (3,0)=0.06 passes although 0.06*0.9 < 0.05.
    got = candidates(topk_first=False, topk=100)
    assert [(p, c) for p, c, _ in got] == [(0, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    # The seed order keeps at most min(100, 4 points) = 4: the four best probabilities.
    got = candidates(topk_first=True, topk=100)
    assert [(p, c) for p, c, _ in got] == [(0, 0), (1, 1), (2, 0), (2, 1)]


def test_decode_boxes_and_weights():
    boxes = decode_boxes(
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0, 20.0]]), (1, 1, 1, 1)
    )
    assert boxes.tolist() == [[9, 18, 13, 24]]
    boxes = decode_boxes(
        torch.tensor([[2.0, 2.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0]]), (2, 1, 2, 1)
    )
    assert boxes.tolist() == [[-1, -2, 1, 2]]


def _image(**kwargs):
    """Level 0: 3 points, 2 classes. Points 0 and 1 predict nearly the same box; point 2 a far one."""
    logits = [logits_of([[0.8, 0.01], [0.7, 0.6], [0.5, 0.01]])]
    deltas = [torch.tensor([[10.0, 10, 10, 10], [10, 10, 11, 10], [5, 5, 5, 5]])]
    ctr = [torch.full((3,), 20.0)]  # sigmoid ~ 1
    points = [torch.tensor([[50.0, 50.0], [50.0, 50.0], [200.0, 200.0]])]
    # Official ranking: all four candidates of the three points pass (the seed order caps at 3).
    args = dict(score_thresh=0.05, topk=1000, topk_first=False, box_weights=(1.0, 1.0, 1.0, 1.0))
    args.update({k: v for k, v in kwargs.items() if k in args})
    candidates = image_candidates(logits, deltas, ctr, points, **args)
    return select_detections(
        *candidates, (300, 300), nms_thresh=0.6, max_detections=kwargs.get("max_detections", 100)
    )


def test_nms_is_class_aware_and_keeps_top_detections():
    result = _image()
    # (1, class 0) overlaps (0, class 0) with IoU 400/420 and is suppressed; (1, class 1) survives.
    assert result.pred_classes.tolist() == [0, 1, 0]
    assert result.scores.tolist() == pytest.approx(
        [math.sqrt(0.8), math.sqrt(0.6), math.sqrt(0.5)], rel=1e-4
    )
    assert result.pred_boxes.tensor.tolist() == [
        [40, 40, 60, 60],
        [40, 40, 61, 60],
        [195, 195, 205, 205],
    ]
    assert len(_image(max_detections=2)) == 2
    assert _image(max_detections=2).scores.tolist() == pytest.approx(
        [math.sqrt(0.8), math.sqrt(0.6)], rel=1e-4
    )


def test_nothing_above_threshold_gives_empty_instances():
    result = _image(score_thresh=0.95)
    assert len(result) == 0
    assert result.pred_boxes.tensor.shape == (0, 4)


def seed_level_selection(logits, score_thresh: float, topk: int):
    """The seed's per-level selection written out literally: sort all H*W*K probabilities, keep the
    first min(topk, H*W), drop prob <= threshold. Returns (point, class) pairs in its order."""
    num_points, num_classes = logits.shape
    probs, order = logits.sigmoid().flatten().sort(descending=True)
    num_topk = min(topk, num_points)
    probs, order = probs[:num_topk], order[:num_topk]
    order = order[probs > score_thresh]
    return list(zip((order // num_classes).tolist(), (order % num_classes).tolist()))


def _pairs(logits, topk: int):
    point_idx, class_idx, _ = select_candidates(
        logits, torch.zeros(logits.shape[0]), score_thresh=0.05, topk=topk, topk_first=True
    )
    return list(zip(point_idx.tolist(), class_idx.tolist()))


def test_seed_order_caps_candidates_at_the_number_of_points_of_a_small_level():
    """A P7-like 7x11 map with K = 80: 77 points but 6,160 (point, class) pairs. The cap is
    min(1000, 77) = 77 candidates, although about 1,540 pairs pass the 0.05 threshold."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(77, 80, generator=generator) - 2.2
    assert int((logits.sigmoid() > 0.05).sum()) > 1000
    got = _pairs(logits, topk=1000)
    assert len(got) == 77
    assert sorted(got) == sorted(seed_level_selection(logits, 0.05, 1000))
    # With fewer pairs above the threshold than points, every one of them is kept.
    sparse = logits - 3.5
    passing = int((sparse.sigmoid() > 0.05).sum())
    assert 0 < passing < 77
    assert sorted(_pairs(sparse, topk=1000)) == sorted(seed_level_selection(sparse, 0.05, 1000))
    assert len(_pairs(sparse, topk=1000)) == passing


def test_seed_order_resolves_ties_at_the_cut_as_the_seed_sort_does():
    """Equal probabilities straddling the cut: which of them survive depends on the tie order of
    torch.sort over all H*W*K values (not a stable sort), so the selection must be that sort's."""
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.full((7 * 5,), -6.0)
        idx = torch.randperm(7 * 5, generator=generator)
        logits[idx[:3]] = 2.0
        logits[idx[3:15]] = 0.0  # 12 tied candidates, of which 7 - 3 = 4 survive the cut
        logits = logits.reshape(7, 5)
        got = _pairs(logits, topk=1000)
        assert len(got) == 7
        assert got == seed_level_selection(logits, 0.05, 1000)


def _legacy_nms(boxes, scores, classes, thresh):
    boxes, scores, classes = torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes)
    return legacy_batched_nms(boxes, scores, classes, thresh).tolist()


def test_legacy_nms_counts_pixels_inclusively():
    """[0,0,9,9] vs [0,0,9,7]: "+1" areas 100 and 80, intersection 80 -> IoU 0.8; without the +1,
    81, 63, 63 -> 0.778. At threshold 0.79 only the "+1" convention suppresses the second box."""
    boxes, scores = [[0.0, 0, 9, 9], [0.0, 0, 9, 7]], [0.9, 0.8]
    assert _legacy_nms(boxes, scores, [0, 0], 0.79) == [0]
    seed = select_detections(
        torch.tensor(boxes),
        torch.tensor(scores),
        torch.tensor([0, 0]),
        (20, 20),
        nms_thresh=0.79,
        max_detections=100,
    )
    assert seed.scores.tolist() == pytest.approx(scores)
    assert _legacy_nms(boxes, scores, [0, 1], 0.79) == [0, 1]  # class-aware
    # Sharing only the column x = 1: "+1" intersection 1 x 2, areas 4 and 4 -> IoU 1/3 (else 0).
    assert _legacy_nms([[0.0, 0, 1, 1], [1.0, 0, 2, 1]], [0.9, 0.8], [0, 0], 0.3) == [0]
    assert _legacy_nms([[0.0, 0, 1, 1], [1.0, 0, 2, 1]], [0.9, 0.8], [0, 0], 0.34) == [0, 1]


def test_legacy_nms_is_greedy_and_strict():
    """A suppresses B (IoU 70/130), B would suppress C (70/130) but is gone, A and C overlap 40/160:
    C survives. An IoU equal to the threshold does not suppress."""
    boxes = [[0.0, 0, 9, 9], [3.0, 0, 12, 9], [6.0, 0, 15, 9]]
    assert _legacy_nms(boxes, [0.7, 0.9, 0.8], [2, 2, 2], 0.5) == [1]
    assert _legacy_nms(boxes, [0.9, 0.8, 0.7], [2, 2, 2], 0.5) == [0, 2]
    # IoU exactly 0.5 (50 / 100) does not suppress.
    assert _legacy_nms([[0.0, 0, 9, 9], [0.0, 0, 9, 4]], [0.9, 0.8], [0, 0], 0.5) == [0, 1]
    assert _legacy_nms(torch.zeros(0, 4).tolist(), [], [], 0.5) == []


def test_clip_legacy_uses_the_last_pixel_index():
    boxes = torch.tensor(
        [[-5.0, -3, 130, 50], [125.0, 10, 140, 20], [10.0, 10, 8, 20], [5.0, 6, 7, 8]]
    )
    clipped, keep = clip_legacy(boxes, (100, 120))
    assert clipped.tolist() == [[0, 0, 119, 50], [119, 10, 119, 20], [10, 10, 8, 20], [5, 6, 7, 8]]
    # remove_small_boxes(0) keeps "+1" sizes >= 0: the one-column box stays, x1 - x0 + 1 = -1 goes.
    assert keep.tolist() == [True, True, False, True]


def test_official_cut_keeps_ties_at_the_last_place():
    scores = torch.tensor([0.3, 0.5, 0.9, 0.5])
    assert top_detections_with_ties(scores, 2).tolist() == [False, True, True, True]
    assert top_detections_with_ties(scores, 1).tolist() == [False, False, True, False]
    assert top_detections_with_ties(scores, 4).all() and top_detections_with_ties(scores, 0).all()


def test_official_postprocess_clips_before_nms():
    """Two boxes of one class that overlap only after clipping to a 20 x 20 input: [0,0,19,19] and
    [0,0,19,17] -> "+1" IoU 360/400 = 0.9 suppresses the second; unclipped their IoU is 0.31."""
    boxes = torch.tensor([[-10.0, -10, 19, 19], [0.0, 0, 30, 17]])
    args = dict(score_thresh=0.05, topk=10, topk_first=False, box_weights=(1.0, 1.0, 1.0, 1.0))
    logits, ctr = [logits_of([[0.9], [0.8]])], [torch.full((2,), 20.0)]
    points = [torch.zeros(2, 2)]
    deltas = [torch.cat((-boxes[:, :2], boxes[:, 2:]), dim=1)]
    official = image_candidates(
        logits, deltas, ctr, points, postprocess="official", image_size=(20, 20), **args
    )
    assert official[0].tolist() == [[0, 0, 19, 19], [0, 0, 19, 17]]
    result = select_detections(
        *official, (20, 20), nms_thresh=0.6, max_detections=100, postprocess="official"
    )
    assert result.pred_boxes.tensor.tolist() == [[0, 0, 19, 19]]
    seed = image_candidates(logits, deltas, ctr, points, **args)
    assert seed[0].tolist() == boxes.tolist()
    assert len(select_detections(*seed, (20, 20), nms_thresh=0.6, max_detections=100)) == 2
