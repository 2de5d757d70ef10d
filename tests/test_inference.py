"""Decoding on hand-made head outputs for both flavours (FCOS_SPEC.md, "Decoding")."""
from __future__ import annotations

import math

import pytest
import torch

from fcos.inference import decode_boxes, image_candidates, select_candidates, select_detections


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def logits_of(probs):
    return torch.tensor([[logit(p) for p in row] for row in probs])


# Four points, two classes. Probabilities above 0.05: (0,0) .9, (1,1) .6, (2,0) .3, (2,1) .2, (3,0) .06, (3,1) .07.
PROBS = [[0.9, 0.01], [0.04, 0.6], [0.3, 0.2], [0.06, 0.07]]
CTR = [0.1, 0.2, 1.0 - 1e-6, 0.9]


def candidates(topk_first: bool, topk: int):
    point_idx, class_idx, scores = select_candidates(
        logits_of(PROBS), torch.tensor([logit(c) for c in CTR]), score_thresh=0.05, topk=topk, topk_first=topk_first
    )
    return sorted(zip(point_idx.tolist(), class_idx.tolist(), scores.tolist()))


def test_seed_order_ranks_by_class_probability():
    got = candidates(topk_first=True, topk=2)
    assert [(p, c) for p, c, _ in got] == [(0, 0), (1, 1)]
    assert [s for _, _, s in got] == pytest.approx([math.sqrt(0.9 * 0.1), math.sqrt(0.6 * 0.2)], rel=1e-5)


def test_official_order_ranks_by_probability_times_centerness():
    # prob * ctr: .09, .12, .3, .2, .054, .063 -> top 2 are (2,0) and (2,1).
    got = candidates(topk_first=False, topk=2)
    assert [(p, c) for p, c, _ in got] == [(2, 0), (2, 1)]
    assert [s for _, _, s in got] == pytest.approx([math.sqrt(0.3), math.sqrt(0.2)], rel=1e-5)


def test_threshold_is_strict_and_applies_to_class_probability():
    for topk_first in (True, False):
        got = candidates(topk_first=topk_first, topk=100)
        # (1,0) with 0.04 is below; (3,0)=0.06 passes although 0.06*0.9 < 0.05.
        assert [(p, c) for p, c, _ in got] == [(0, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]


def test_decode_boxes_and_weights():
    boxes = decode_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0, 20.0]]), (1, 1, 1, 1))
    assert boxes.tolist() == [[9, 18, 13, 24]]
    boxes = decode_boxes(torch.tensor([[2.0, 2.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0]]), (2, 1, 2, 1))
    assert boxes.tolist() == [[-1, -2, 1, 2]]


def _image(**kwargs):
    """Level 0: 3 points, 2 classes. Points 0 and 1 predict nearly the same box; point 2 a far one."""
    logits = [logits_of([[0.8, 0.01], [0.7, 0.6], [0.5, 0.01]])]
    deltas = [torch.tensor([[10.0, 10, 10, 10], [10, 10, 11, 10], [5, 5, 5, 5]])]
    ctr = [torch.full((3,), 20.0)]  # sigmoid ~ 1
    points = [torch.tensor([[50.0, 50.0], [50.0, 50.0], [200.0, 200.0]])]
    args = dict(score_thresh=0.05, topk=1000, topk_first=True, box_weights=(1.0, 1.0, 1.0, 1.0))
    args.update({k: v for k, v in kwargs.items() if k in args})
    candidates = image_candidates(logits, deltas, ctr, points, **args)
    return select_detections(*candidates, (300, 300), nms_thresh=0.6, max_detections=kwargs.get("max_detections", 100))


def test_nms_is_class_aware_and_keeps_top_detections():
    result = _image()
    # (1, class 0) overlaps (0, class 0) with IoU 400/420 and is suppressed; (1, class 1) survives.
    assert result.pred_classes.tolist() == [0, 1, 0]
    assert result.scores.tolist() == pytest.approx([math.sqrt(0.8), math.sqrt(0.6), math.sqrt(0.5)], rel=1e-4)
    assert result.pred_boxes.tensor.tolist() == [[40, 40, 60, 60], [40, 40, 61, 60], [195, 195, 205, 205]]
    assert len(_image(max_detections=2)) == 2
    assert _image(max_detections=2).scores.tolist() == pytest.approx([math.sqrt(0.8), math.sqrt(0.6)], rel=1e-4)


def test_nothing_above_threshold_gives_empty_instances():
    result = _image(score_thresh=0.95)
    assert len(result) == 0
    assert result.pred_boxes.tensor.shape == (0, 4)
