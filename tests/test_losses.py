"""Tests for losses.py: Eq. 4-6, the DFL, the task-aligned assigner, the detection and mask losses.

Trusted references: torchvision.ops (CIoU loss, sigmoid focal loss, IoU), hand computations, and
(only where the optional `ultralytics` package is importable, never in CI) the published
reference implementation of the YOLO11 losses.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tvops

from losses import (
    DetectionLoss,
    DFLoss,
    LossConfig,
    SegmentationLoss,
    TaskAlignedAssigner,
    bbox_iou,
    ciou,
    ciou_loss,
    focal_loss,
)

NC = 7
RM = 16  # reg_max
STRIDES = (8, 16, 32)


# --- helpers


def random_boxes(n: int, gen: torch.Generator, size: float = 100.0) -> torch.Tensor:
    """(n, 4) valid xyxy boxes inside [0, size]."""
    xy = torch.rand(n, 2, generator=gen) * size * 0.7
    wh = torch.rand(n, 2, generator=gen) * size * 0.3 + 1.0
    return torch.cat((xy, xy + wh), 1)


def random_feats(batch: int, imgsz: int, gen: torch.Generator, scale: float = 1.0, nc: int = NC):
    """Raw head output: list of 3 maps (B, 4*reg_max + nc, S/s, S/s), requiring grad."""
    return [
        (torch.randn(batch, 4 * RM + nc, imgsz // s, imgsz // s, generator=gen) * scale).requires_grad_()
        for s in STRIDES
    ]


def grid_anchors(imgsz: int, stride: int) -> torch.Tensor:
    """(A, 2) anchor centres of one level in input pixels, row-major like make_anchors."""
    c = torch.arange(imgsz // stride, dtype=torch.float32) * stride + stride / 2
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((xs, ys), -1).view(-1, 2)


# --- CIoU (Eq. 5) and IoU


def test_ciou_loss_matches_torchvision_values_and_gradients():
    gen = torch.Generator().manual_seed(42)
    a = random_boxes(200, gen).requires_grad_()
    b = random_boxes(200, gen)
    b[:50] = a[:50].detach() + torch.randn(50, 4, generator=gen)  # near-matches, not only disjoint pairs
    b[:50, 2:] = torch.maximum(b[:50, 2:], b[:50, :2] + 0.5)
    a2 = a.detach().clone().requires_grad_()

    ours = ciou_loss(a, b)
    ref = tvops.complete_box_iou_loss(a2, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    ref.sum().backward()  # α is gradient-free in both
    torch.testing.assert_close(a.grad, a2.grad, atol=1e-5, rtol=1e-4)


def test_ciou_loss_hand_computation():
    b1 = torch.tensor([0.0, 0.0, 4.0, 2.0])  # centre (2, 1), w/h = 2
    b2 = torch.tensor([1.0, 1.0, 3.0, 5.0])  # centre (2, 3), w/h = 0.5
    iou = 2.0 / (8.0 + 8.0 - 2.0)  # intersection 2 x 1
    rho2 = 2.0**2  # centre distance
    c2 = 4.0**2 + 5.0**2  # enclosing box [0, 4] x [0, 5]
    v = 4 / math.pi**2 * (math.atan(0.5) - math.atan(2.0)) ** 2
    alpha = v / (1 - iou + v)
    expected = 1 - iou + rho2 / c2 + alpha * v
    assert ciou_loss(b1, b2).item() == pytest.approx(expected, rel=1e-5)
    assert ciou_loss(b1, b1).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("use_ciou", [False, True])
def test_bbox_iou_xywh_equals_xyxy(use_ciou):
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(50, gen), random_boxes(50, gen)
    to_xywh = lambda x: torch.cat(((x[:, :2] + x[:, 2:]) / 2, x[:, 2:] - x[:, :2]), 1)  # noqa: E731
    torch.testing.assert_close(
        bbox_iou(to_xywh(a), to_xywh(b), xywh=True, ciou=use_ciou), bbox_iou(a, b, ciou=use_ciou), atol=1e-5, rtol=1e-5
    )


def test_bbox_iou_matches_torchvision():
    gen = torch.Generator().manual_seed(1)
    a, b = random_boxes(30, gen), random_boxes(40, gen)
    torch.testing.assert_close(bbox_iou(a[:, None], b[None]), tvops.box_iou(a, b), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ciou(a[:, None], b[None]), tvops.complete_box_iou(a, b), atol=1e-5, rtol=1e-5)


# --- focal loss (Eq. 6)


@pytest.mark.parametrize("alpha", [0.25, 0.5, None])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_matches_torchvision_on_hard_targets(alpha, gamma, reduction):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, NC, generator=gen) * 3
    targets = (torch.rand(64, NC, generator=gen) > 0.8).float()
    tv_alpha = -1 if alpha is None else alpha  # torchvision's "off"
    ref = tvops.sigmoid_focal_loss(logits, targets, alpha=tv_alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(focal_loss(logits, targets, gamma, alpha, reduction), ref, atol=1e-6, rtol=1e-5)


def test_focal_on_soft_targets_is_minimised_at_the_target():
    t = torch.tensor([0.0, 0.1, 0.37, 0.8, 1.0 - 1e-4])
    logits = torch.logit(t.clamp(1e-4, 1 - 1e-4)).requires_grad_()
    focal_loss(logits, t, gamma=2.0, alpha=0.25).sum().backward()
    assert torch.allclose(logits.grad, torch.zeros_like(t), atol=1e-6)
    # ...and is positive away from it
    assert (focal_loss(logits.detach() + 1.0, t, 2.0, 0.25) > 0).all()


def test_focal_without_modulation_is_bce():
    gen = torch.Generator().manual_seed(4)
    logits, t = torch.randn(100, generator=gen), torch.rand(100, generator=gen)
    torch.testing.assert_close(
        focal_loss(logits, t, gamma=0.0, alpha=None), F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    )


# --- Distribution Focal Loss


def test_dfl_hand_built_two_bin_mix():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, RM, generator=gen)
    target = torch.tensor([[3.3, 0.0, 7.5, 14.2], [5.0, 1.75, 0.25, 9.9]])
    expected = torch.zeros(2)
    for p in range(2):
        for side in range(4):
            y = target[p, side].item()
            i = math.floor(y)
            ce = lambda k: F.cross_entropy(logits[p, side][None], torch.tensor([k]))  # noqa: E731
            expected[p] += ((i + 1 - y) * ce(i) + (y - i) * ce(i + 1)) / 4
    torch.testing.assert_close(DFLoss(RM)(logits, target), expected, atol=1e-5, rtol=1e-5)


def test_dfl_clamps_targets_beyond_the_last_bin():
    logits = torch.zeros(1, 4, RM)
    out = DFLoss(RM)(logits, torch.full((1, 4), 40.0))
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(math.log(RM), rel=1e-5)  # uniform distribution: CE = log(reg_max)


# --- task-aligned assigner


def assign(assigner, scores, pred_boxes, anchors, labels, boxes, mask=None):
    labels = torch.as_tensor(labels, dtype=torch.float32).view(1, -1, 1)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).view(1, -1, 4)
    mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask
    return assigner(scores[None], pred_boxes[None], anchors, labels, boxes, mask)


def test_assigner_picks_topk_anchors_inside_the_box():
    anchors = grid_anchors(64, 8)  # (64, 2)
    A, C, k = len(anchors), 3, 10
    gt = torch.tensor([10.0, 10.0, 50.0, 42.0])
    gen = torch.Generator().manual_seed(6)
    # predictions: the true box shifted half-way towards each anchor, so quality falls with distance
    centre = (gt[:2] + gt[2:]) / 2
    shift = (anchors - centre) * 0.5
    pred = gt.repeat(A, 1) + shift.repeat(1, 2)
    scores = torch.rand(A, C, generator=gen) * 0.8 + 0.1
    asg = assign(TaskAlignedAssigner(k, C, 0.5, 6.0), scores, pred, anchors, [2], gt)

    # independent computation with torchvision's CIoU
    inside = (anchors > gt[:2]).all(1) & (anchors < gt[2:]).all(1)
    u = tvops.complete_box_iou(gt[None], pred)[0].clamp(min=0)
    t = scores[:, 2].sqrt() * u**6
    ranked = torch.where(inside, t, torch.full_like(t, -1)).argsort(descending=True)
    expected_pos = set(ranked[:k].tolist())

    fg = asg.fg_mask[0]
    assert set(fg.nonzero().flatten().tolist()) == expected_pos
    assert inside[fg].all() and int(fg.sum()) == k
    assert (asg.labels[0, fg] == 2).all()
    torch.testing.assert_close(asg.bboxes[0, fg], gt.expand(k, 4))
    # soft targets: t / max t × max IoU on the class channel, zero elsewhere
    pos = torch.tensor(sorted(expected_pos))
    expected_q = t[pos] / t[pos].max() * u[pos].max()
    torch.testing.assert_close(asg.scores[0, pos, 2], expected_q, atol=1e-5, rtol=1e-4)
    assert asg.scores[0, pos][:, [0, 1]].abs().sum() == 0
    assert asg.scores[0, ~fg].abs().sum() == 0


def test_assigner_small_box_gets_all_its_candidates():
    anchors = grid_anchors(64, 8)
    A = len(anchors)
    gt = torch.tensor([18.0, 18.0, 30.0, 26.0])  # contains the centres (20, 20) and (28, 20) only
    pred = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(A, 1)  # no overlap anywhere: metric 0
    asg = assign(TaskAlignedAssigner(10, 1), torch.full((A, 1), 0.5), pred, anchors, [0], gt)
    fg = asg.fg_mask[0]
    assert sorted(anchors[fg].tolist()) == [[20.0, 20.0], [28.0, 20.0]]
    assert torch.isfinite(asg.scores).all() and asg.scores.abs().sum() == 0  # quality 0, no NaN


@pytest.mark.parametrize("target_eps", [1e-9, 0.0])
def test_assigner_soft_targets_of_a_small_alignment(target_eps):
    # a 16-px object under 120-px predicted boxes (the head's size at initialisation) at the prior score
    # 0.01: overlap ~0.02, so t = s^0.5 u^6 ~ 1e-12. TOOD's t / max t (target_eps 0) still gives its best
    # anchor its best overlap; the reference's t / (max t + 1e-9), the default, gives a fraction of it.
    anchors = grid_anchors(64, 8)
    A = len(anchors)
    gt = torch.tensor([18.0, 18.0, 34.0, 34.0])  # contains the centres 20 and 28 in x and y
    pred = torch.cat([anchors - 60.0, anchors + 60.0], 1)  # (A, 4) 120-px boxes centred on each anchor
    asg = assign(TaskAlignedAssigner(10, 1, target_eps=target_eps), torch.full((A, 1), 0.01), pred, anchors, [0], gt)
    fg = asg.fg_mask[0]
    u = tvops.complete_box_iou(gt[None], pred)[0].clamp(min=0)  # (A,)
    t = 0.1 * u ** 6
    assert int(fg.sum()) == 4 and t[fg].max() < 1e-9  # the regime where the two rules part
    expected = t[fg] / (t[fg].max() + target_eps) * u[fg].max()
    torch.testing.assert_close(asg.scores[0, fg, 0], expected)
    if target_eps == 0:
        torch.testing.assert_close(asg.scores[0, fg, 0].max(), u[fg].max())
    else:
        assert asg.scores[0, fg, 0].max() < 0.05 * u[fg].max()


def test_assigner_conflict_goes_to_highest_overlap():
    anchors = grid_anchors(64, 8)
    A = len(anchors)
    gt1, gt2 = torch.tensor([0.0, 0.0, 40.0, 40.0]), torch.tensor([16.0, 16.0, 56.0, 56.0])
    in1 = (anchors > gt1[:2]).all(1) & (anchors < gt1[2:]).all(1)
    in2 = (anchors > gt2[:2]).all(1) & (anchors < gt2[2:]).all(1)
    shared = (in1 & in2).nonzero().flatten()  # 9 anchors, candidates of both objects
    pred = torch.where(in2[:, None], gt2, gt1).clone()
    pred[shared[::2]] = gt1  # these predict object 1 exactly, the others object 2
    # k = 25 = every candidate, so the shared anchors are in both objects' top-k
    asg = assign(TaskAlignedAssigner(25, 1), torch.full((A, 1), 0.5), pred, anchors, [0, 0], torch.stack((gt1, gt2)))
    assert asg.fg_mask[0, shared].all()
    assert asg.gt_idx[0, shared[::2]].eq(0).all() and asg.gt_idx[0, shared[1::2]].eq(1).all()
    assert int(asg.fg_mask[0].sum()) == int((in1 | in2).sum())  # one object per anchor, none lost


def test_assigner_ignores_padding_rows():
    anchors = grid_anchors(64, 8)
    A, C = len(anchors), 2
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(2, A, C, generator=gen)
    pred = random_boxes(2 * A, gen, 64.0).view(2, A, 4)
    boxes = torch.tensor([[[4.0, 4.0, 30.0, 40.0], [20.0, 30.0, 60.0, 62.0]],
                          [[8.0, 8.0, 44.0, 36.0], [0.0, 0.0, 64.0, 64.0]]])  # last row: padding
    labels = torch.tensor([[[0.0], [1.0]], [[1.0], [0.0]]])
    mask = torch.tensor([[[True], [True]], [[True], [False]]])
    assigner = TaskAlignedAssigner(10, C)
    both = assigner(scores, pred, anchors, labels, boxes, mask)
    alone = assigner(scores[1:], pred[1:], anchors, labels[1:, :1], boxes[1:, :1], mask[1:, :1])
    torch.testing.assert_close(both.fg_mask[1], alone.fg_mask[0])
    torch.testing.assert_close(both.scores[1], alone.scores[0])
    assert both.gt_idx[1][both.fg_mask[1]].eq(0).all()


def test_assigner_without_objects_is_all_background():
    asg = TaskAlignedAssigner(10, NC)(
        torch.rand(2, 5, NC), torch.rand(2, 5, 4), torch.rand(5, 2), torch.zeros(2, 0, 1), torch.zeros(2, 0, 4),
        torch.zeros(2, 0, 1, dtype=torch.bool),
    )
    assert not asg.fg_mask.any() and asg.scores.abs().sum() == 0


# --- DetectionLoss (Eq. 4)


def test_pad_targets_keeps_rows_in_any_order():
    t = torch.tensor([[1, 3, 1, 1, 5, 5], [0, 2, 0, 0, 4, 4], [1, 4, 2, 2, 9, 9], [2, 0, 3, 3, 6, 6]]).float()
    labels, boxes, mask, rows = DetectionLoss.pad_targets(t, batch_size=4)
    assert rows.tolist() == [[1, -1], [0, 2], [3, -1], [-1, -1]]
    assert mask.squeeze(-1).tolist() == [[True, False], [True, True], [True, False], [False, False]]
    valid = rows >= 0
    torch.testing.assert_close(boxes[valid], t[rows[valid], 2:])
    torch.testing.assert_close(labels[valid, 0], t[rows[valid], 1])


@pytest.mark.parametrize("cls_loss", ["focal", "bce"])
def test_detection_loss_finite_with_finite_gradients(cls_loss):
    gen = torch.Generator().manual_seed(8)
    feats = random_feats(2, 128, gen, scale=5.0)
    t = torch.tensor([[0, 1, 10, 12, 60, 50], [0, 5, 70, 20, 120, 100], [1, 6, 30, 30, 42, 47]], dtype=torch.float)
    loss, items = DetectionLoss(NC, cfg=LossConfig(cls_loss=cls_loss))(feats, t, 128)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert items.shape == (3,) and not items.requires_grad and (items > 0).all()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    torch.testing.assert_close(loss.detach(), items.sum() * 2)  # the × batch-size convention


def test_no_box_batch_trains_background_without_nan():
    gen = torch.Generator().manual_seed(9)
    feats = random_feats(3, 64, gen)
    loss, items = DetectionLoss(NC)(feats, torch.zeros(0, 6), 64)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    grads = torch.cat([f.grad.flatten(2) for f in feats], 2)  # (B, 4R + nc, A)
    assert torch.isfinite(grads).all()
    assert grads[:, : 4 * RM].abs().sum() == 0 and grads[:, 4 * RM :].abs().sum() > 0  # pushes scores down only


def test_image_without_boxes_is_background_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(10)
    feats = random_feats(2, 64, gen)
    t = torch.tensor([[0, 3, 8, 8, 40, 30]], dtype=torch.float)
    loss_fn = DetectionLoss(NC)
    det = loss_fn.detection_terms(feats, t)
    assert det.assignment.fg_mask[0].any() and not det.assignment.fg_mask[1].any()
    assert det.assignment.scores[1].abs().sum() == 0
    loss, items = loss_fn(feats, t, 64)
    loss.backward()
    g1 = torch.cat([f.grad[1].flatten(1) for f in feats], 1)  # image 1: (4R + nc, A)
    assert g1[: 4 * RM].abs().sum() == 0 and g1[4 * RM :].abs().sum() > 0
    assert torch.isfinite(loss) and (items > 0).all()


def test_loss_is_per_batch_mean_times_batch_size():
    # predictions good enough for the soft targets to sum above 1 (below, the normaliser is clamped at 1):
    # every side's distribution sits on bin 1, so a stride-8 anchor at (x, y) predicts [x-8, y-8, x+8, y+8]
    gen = torch.Generator().manual_seed(11)
    one = random_feats(1, 64, gen)
    for f in one:
        f.data[:, : 4 * RM].view(1, 4, RM, *f.shape[-2:])[:, :, 1] += 20.0
        f.data[:, 4 * RM :] += 4.0
    two = [torch.cat((f, f)).detach() for f in one]
    t1 = torch.tensor([[0, 2, 4, 4, 20, 20], [0, 4, 28, 36, 44, 52]], dtype=torch.float)  # = two predictions
    t2 = torch.cat((t1, t1 + torch.tensor([1, 0, 0, 0, 0, 0])))
    loss_fn = DetectionLoss(NC)
    assert loss_fn.detection_terms(one, t1).assignment.scores.sum() > 1
    loss1, items1 = loss_fn(one, t1, 64)
    loss2, items2 = loss_fn(two, t2, 64)
    torch.testing.assert_close(items2, items1)  # terms are per-batch means: duplicating changes nothing
    torch.testing.assert_close(loss2, 2 * loss1)  # the loss sums over images


def test_bce_option_is_the_plain_bce_term():
    gen = torch.Generator().manual_seed(12)
    feats = random_feats(2, 64, gen)
    t = torch.tensor([[0, 1, 4, 4, 40, 44], [1, 0, 20, 10, 60, 50]], dtype=torch.float)
    loss_fn = DetectionLoss(NC, cfg=LossConfig(cls_loss="bce"))
    det = loss_fn.detection_terms(feats, t)
    logits = torch.cat([f.flatten(2) for f in feats], 2)[:, 4 * RM :].permute(0, 2, 1)
    scores = det.assignment.scores
    expected = F.binary_cross_entropy_with_logits(logits, scores, reduction="sum") / scores.sum().clamp(min=1)
    torch.testing.assert_close(det.terms[1], 0.5 * expected)


def test_low_precision_inputs_give_a_float32_loss():
    gen = torch.Generator().manual_seed(13)
    feats = [f.detach().to(torch.bfloat16) for f in random_feats(1, 64, gen)]
    loss, items = DetectionLoss(NC)(feats, torch.tensor([[0, 0, 8, 8, 40, 40.0]]), 64)
    assert loss.dtype == torch.float32 and torch.isfinite(items).all()


def test_bad_config_and_targets_give_clear_errors():
    with pytest.raises(ValueError, match="cls_loss"):
        LossConfig(cls_loss="varifocal")
    feats = random_feats(1, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        DetectionLoss(NC)(feats, torch.zeros(3, 5), 64)
    with pytest.raises(ValueError, match="batch_idx"):
        DetectionLoss(NC)(feats, torch.tensor([[1, 0, 0, 0, 9, 9.0]]), 64)


# --- SegmentationLoss (mask term)


def seg_case(gen: torch.Generator, imgsz: int = 64):
    """Two images, three objects with elliptical masks inside pixel-aligned, disjoint boxes."""
    t = torch.tensor([[0, 1, 8, 8, 32, 40], [0, 4, 40, 16, 60, 56], [1, 2, 16, 12, 52, 44]], dtype=torch.float)
    h = w = imgsz // 4
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = torch.zeros(len(t), h, w)
    for i, (x1, y1, x2, y2) in enumerate(t[:, 2:] / 4):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks[i] = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).float()
    feats = random_feats(2, imgsz, gen)
    A = sum((imgsz // s) ** 2 for s in STRIDES)
    return feats, t, masks, A, h, w


def union_protos(t, masks, h, w, logit):
    """Prototype 0 = +logit on each image's object masks, −logit elsewhere; the rest zero."""
    protos = torch.zeros(2, 32, h, w)
    for b in range(2):
        union = masks[t[:, 0] == b].amax(0)
        protos[b, 0] = torch.where(union > 0, logit, -logit)
    return protos


def test_mask_loss_zero_for_a_perfect_prediction_and_positive_otherwise():
    feats, t, masks, A, h, w = seg_case(torch.Generator().manual_seed(14))
    coeffs = torch.zeros(2, 32, A)
    coeffs[:, 0] = 1.0  # every anchor's mask = prototype 0
    loss_fn = SegmentationLoss(NC)
    # boxes are disjoint, so inside each box the union equals that object's own mask: a perfect prediction
    _, perfect = loss_fn((feats, coeffs, union_protos(t, masks, h, w, 30.0)), t, masks, 64)
    assert 0 <= perfect[3] < 1e-9  # BCE(σ(±30), 1/0) ≈ e^-30
    _, wrong = loss_fn((feats, coeffs, union_protos(t, masks, h, w, -30.0)), t, masks, 64)
    assert wrong[3] > 100  # every pixel in every box is wrong with logit 30
    # zero logits: BCE = log 2 on every pixel; boxes are pixel-aligned so the area normalisation is exact
    _, flat = loss_fn((feats, torch.zeros(2, 32, A), torch.zeros(2, 32, h, w)), t, masks, 64)
    assert flat[3].item() == pytest.approx(7.5 * math.log(2), rel=1e-5)


def test_seg_loss_without_boxes_and_gradients():
    gen = torch.Generator().manual_seed(15)
    feats, t, masks, A, h, w = seg_case(gen)
    coeffs = torch.randn(2, 32, A, generator=gen).requires_grad_()
    protos = torch.randn(2, 32, h, w, generator=gen).requires_grad_()
    loss, items = SegmentationLoss(NC)((feats, coeffs, protos), t, masks, 64)
    loss.backward()
    assert items.shape == (4,) and (items > 0).all() and torch.isfinite(loss)
    assert torch.isfinite(coeffs.grad).all() and torch.isfinite(protos.grad).all() and protos.grad.abs().sum() > 0

    coeffs.grad = protos.grad = None
    loss, items = SegmentationLoss(NC)((feats, coeffs, protos), torch.zeros(0, 6), torch.zeros(0, h, w), 64)
    loss.backward()
    assert torch.isfinite(loss) and items[0] == items[2] == items[3] == 0
    assert protos.grad.abs().sum() == 0 and coeffs.grad.abs().sum() == 0


def test_seg_loss_rejects_masks_at_the_wrong_resolution():
    feats, t, masks, A, h, w = seg_case(torch.Generator().manual_seed(16))
    with pytest.raises(ValueError, match="prototype resolution"):
        SegmentationLoss(NC)((feats, torch.zeros(2, 32, A), torch.zeros(2, 32, h, w)), t, masks[:, ::2, ::2], 64)


# --- published reference (optional: needs `ultralytics`, absent in CI)


def reference_rules_assigner():
    """Our assigner with the reference's two tie/conflict rules, to isolate every other difference."""

    class ReferenceRules(TaskAlignedAssigner):
        def select_topk(self, align, candidates):  # the reference ranks every anchor
            top = align.topk(self.topk, dim=-1).indices
            return torch.zeros_like(candidates).scatter_(-1, top, True) & candidates

        def resolve_conflicts(self, mask_pos, overlaps):  # ...and resolves over all candidate objects
            best = F.one_hot(overlaps.argmax(-2), mask_pos.shape[1]).permute(0, 2, 1).bool()
            mask_pos = torch.where(mask_pos.sum(-2, keepdim=True) > 1, best, mask_pos)
            return mask_pos.to(torch.uint8).argmax(-2), mask_pos.any(-2), mask_pos

    return ReferenceRules(10, NC, 0.5, 6.0)


def test_matches_the_published_reference_loss():
    pytest.importorskip("ultralytics")
    from types import SimpleNamespace

    from ultralytics.utils.loss import v8SegmentationLoss

    model = torch.nn.Linear(1, 1)
    model.model = [SimpleNamespace(stride=torch.tensor([8.0, 16.0, 32.0]), nc=NC, reg_max=RM)]
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, overlap_mask=False)
    reference = v8SegmentationLoss(model)
    reference.assigner.stride_val = 0.0  # newer releases widen tiny boxes; the rule here is "centre inside"
    ours = SegmentationLoss(NC, cfg=LossConfig(cls_loss="bce"))
    ours.assigner = reference_rules_assigner()

    gen = torch.Generator().manual_seed(17)
    S, B = 128, 2
    feats = [f.detach() for f in random_feats(B, S, gen, scale=2.0)]
    t = torch.tensor([[0, 1, 8, 8, 48, 40], [0, 4, 40, 16, 120, 96], [0, 0, 30, 30, 70, 70], [1, 2, 16, 12, 52, 44]],
                     dtype=torch.float)
    A = sum((S // s) ** 2 for s in STRIDES)
    coeffs, protos = torch.randn(B, 32, A, generator=gen), torch.randn(B, 32, S // 4, S // 4, generator=gen)
    masks = (torch.rand(len(t), S // 4, S // 4, generator=gen) > 0.5).float()
    flat = torch.cat([f.flatten(2) for f in feats], 2)
    xyxy = t[:, 2:] / S
    preds = {"boxes": flat[:, : 4 * RM], "scores": flat[:, 4 * RM :], "feats": feats,
             "mask_coefficient": coeffs, "proto": protos}
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "masks": masks,
             "bboxes": torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)}
    _, ref_items = reference(preds, batch)
    _, items = ours((feats, coeffs, protos), t, masks, S)
    expected = torch.stack([ref_items[k] for k in ("box_loss", "cls_loss", "dfl_loss")])
    torch.testing.assert_close(items[:3], expected, rtol=1e-5, atol=1e-5)
    # the mask term differs only by the crop convention (pixel centre here, pixel index there)
    assert items[3].item() == pytest.approx(ref_items["seg_loss"].item(), rel=0.15)


# --- with the real model


@pytest.mark.parametrize("seg", [False, True])
def test_losses_accept_the_yolo11_training_output(seg):
    from yolo11 import YOLO11, YOLO11Seg

    torch.manual_seed(0)
    S = 64
    model = (YOLO11Seg if seg else YOLO11)(nc=NC, scale="n").train()
    t = torch.tensor([[0, 1, 8, 12, 32, 40], [0, 4, 36, 6, 60, 30], [1, 2, 16, 16, 44, 50]], dtype=torch.float)
    masks = torch.zeros(len(t), S // 4, S // 4)
    for i, (x1, y1, x2, y2) in enumerate((t[:, 2:] / 4).long().tolist()):
        masks[i, y1:y2, x1:x2] = 1.0
    out = model(torch.rand(2, 3, S, S))
    loss, items = SegmentationLoss(NC)(out, t, masks, S) if seg else DetectionLoss(NC)(out, t, S)
    loss.backward()
    assert torch.isfinite(loss) and items.shape == ((4,) if seg else (3,)) and (items > 0).all()
    branches = [model.head.box, model.head.cls] + ([model.head.coef, model.head.proto] if seg else [])
    for branch in branches:  # every output branch of the head receives a finite, non-zero gradient
        grads = [p.grad for p in branch.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
