"""Training losses of the YOLO11 lesion detector and segmenter (Sec. 3.3 "Loss Optimization").

Algorithm 1, line 14 updates the detector by minimising Eq. 4,

    L_total = λ_box · L_CIoU + λ_cls · L_Focal + λ_dfl · L_DFL,                      (Eq. 4)
    L_CIoU  = 1 − IoU + ρ²(b, b_gt) / c² + α·v,                                      (Eq. 5)
    L_Focal = −α_t (1 − p_t)^γ log(p_t),  γ = 2.0,                                   (Eq. 6)

with λ_box = 7.5, λ_cls = 0.5, λ_dfl = 1.5. This file builds it bottom-up:

  1. box geometry   IoU and Complete-IoU of paired boxes (Eq. 5);
  2. classification focal loss on the assigner's soft targets (Eq. 6), or plain BCE;
  3. DFL            Distribution Focal Loss over the reg_max = 16 bins of each box side;
  4. assignment     the task-aligned assigner (TOOD, Feng et al. 2021) that picks each object's
                    positive anchors and turns them into IoU-aware soft targets;
  5. DetectionLoss  Eq. 4, normalised by the sum of the soft target scores;
  6. SegmentationLoss Eq. 4 plus a mask term for the YOLO11-seg head (lesion masks, Fig. 4c).

Paper or published reference? The reference is Ultralytics' YOLO11 `v8DetectionLoss` /
`v8SegmentationLoss`. This file follows the reference everywhere (assigner, gains, normalisation,
DFL, loss × batch size) except for the classification term: the paper's Eq. 4 names focal loss,
the reference uses BCE on soft targets. Focal loss is the default (`LossConfig.cls_loss =
"focal"`); `"bce"` reproduces the reference. Smaller deliberate differences are marked `Reference:`
at the line.

No command runs this file; train.py uses it (`python train.py --stage det` / `--stage seg`).
Tests: `python -m pytest tests/test_losses.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from yolo11 import bbox2dist, dist2bbox, make_anchors

# ---------------------------------------------------------------------------
# Box geometry: IoU and Complete-IoU (Eq. 5)
# ---------------------------------------------------------------------------


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre-x, centre-y, width, height -> (..., 4) x1, y1, x2, y2."""
    xy, wh = boxes.split(2, -1)
    return torch.cat((xy - wh / 2, xy + wh / 2), -1)


def bbox_iou(
    box1: torch.Tensor, box2: torch.Tensor, xywh: bool = False, ciou: bool = False, eps: float = 1e-7
) -> torch.Tensor:
    """IoU, or Complete-IoU, of PAIRED boxes: box1 (..., 4) and box2 (..., 4) broadcast -> (...).

    Complete-IoU (Zheng et al., AAAI 2020) is the similarity whose loss is Eq. 5:
        CIoU = IoU − ρ²/c² − α·v
        ρ  distance between the two box centres,
        c  diagonal of the smallest box enclosing both,
        v  = 4/π² · (atan(w2/h2) − atan(w1/h1))²   aspect-ratio consistency,
        α  = v / (1 − IoU + v)                      trade-off, a constant: no gradient flows through it.
    """
    if xywh:
        box1, box2 = xywh2xyxy(box1), xywh2xyxy(box2)
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.unbind(-1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.unbind(-1)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1

    inter = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(min=0) * (
        torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter
    iou = inter / (union + eps)
    if not ciou:
        return iou

    cw = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)  # enclosing box width
    ch = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)  # enclosing box height
    c2 = cw**2 + ch**2 + eps  # c², squared enclosing diagonal
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4  # ρ²
    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - rho2 / c2 - alpha * v  # Eq. 5 reads L_CIoU = 1 − this


def ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete-IoU of paired xyxy boxes (..., 4) -> (...)."""
    return bbox_iou(box1, box2, xywh=False, ciou=True, eps=eps)


def ciou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 5 (CIoU): 1 − IoU + ρ²/c² + α·v for paired xyxy boxes (..., 4) -> (...), unreduced."""
    return 1.0 - ciou(pred, target, eps)


# ---------------------------------------------------------------------------
# Classification: focal loss (Eq. 6) on soft targets
# ---------------------------------------------------------------------------


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str = "none",
) -> torch.Tensor:
    """Eq. 6, L = −α_t (1 − p_t)^γ log(p_t), elementwise on logits with targets t in [0, 1].

    The task-aligned assigner gives soft targets t (IoU-aware scores), so Eq. 6 is written for any t:
        p        = sigmoid(logit)
        −log p_t = BCE(logit, t) = −t log p − (1 − t) log(1 − p)
        1 − p_t  = |t − p|                      (so p_t = 1 − |t − p|)
        α_t      = α·t + (1 − α)(1 − t)
        L        = α_t · |t − p|^γ · BCE(logit, t)
    For hard targets t ∈ {0, 1} this is exactly Eq. 6 (and torchvision.ops.sigmoid_focal_loss).
    For soft targets it is the Quality Focal Loss of GFL (Li et al., NeurIPS 2020): the loss and its
    gradient vanish at p = t, so the score learns to predict the box quality the assigner asked for.
    The other common extension, 1 − p_t = t(1 − p) + (1 − t)p, is not minimised at p = t: it drives
    scores towards 0 or 1 and breaks the score ⇔ IoU ranking that NMS and AP rely on.

    alpha: weight of the positive part; None switches the α_t factor off.
    reduction: "none" | "mean" | "sum".
    """
    p = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = loss * (targets - p).abs().pow(gamma)  # (1 − p_t)^γ
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))  # α_t
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


# ---------------------------------------------------------------------------
# Distribution Focal Loss (GFL, Li et al. 2020) over reg_max bins
# ---------------------------------------------------------------------------


class DFLoss(nn.Module):
    """Distribution Focal Loss for the head's per-side distance distributions.

    The head predicts, for each of the four sides (left, top, right, bottom), logits over bins
    0, 1, ..., reg_max − 1 (distances in units of the level's stride). A continuous target y between
    bins i = ⌊y⌋ and i + 1 is the two-point distribution with weights (i + 1 − y) and (y − i):
        DFL(S, y) = −((i + 1 − y) · log S_i + (y − i) · log S_{i+1}),   S = softmax(logits).
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max

    def forward(self, pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred_dist (P, 4, reg_max) logits, target (P, 4) distances in bins -> (P,) mean over the 4 sides."""
        target = target.clamp(0, self.reg_max - 1 - 0.01)  # keep bin i + 1 valid (same clamp as bbox2dist)
        left = target.long()  # (P, 4) bin i
        w_left = (left + 1) - target  # (P, 4) weight of bin i
        logp = F.log_softmax(pred_dist, dim=-1)  # (P, 4, reg_max)
        logp_left = logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)  # (P, 4)
        logp_right = logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)  # (P, 4)
        return -(w_left * logp_left + (1 - w_left) * logp_right).mean(-1)


# ---------------------------------------------------------------------------
# Task-aligned assignment (TOOD; reference: Ultralytics TaskAlignedAssigner)
# ---------------------------------------------------------------------------


class Assignment(NamedTuple):
    """What the assigner gives each anchor (B images, A anchors, nc classes)."""

    labels: torch.Tensor  # (B, A) int64 class of the assigned object (0 where background: use fg_mask)
    bboxes: torch.Tensor  # (B, A, 4) xyxy input pixels of the assigned object
    scores: torch.Tensor  # (B, A, nc) soft targets: one-hot class × normalised alignment, 0 for background
    fg_mask: torch.Tensor  # (B, A) bool, positive anchors
    gt_idx: torch.Tensor  # (B, A) int64 index of the assigned object along the n_max_boxes axis


class TaskAlignedAssigner(nn.Module):
    """Picks positive anchors per ground-truth object and builds soft classification targets.

    Alignment metric of anchor j for object g (TOOD): t = s^α · u^β, where s is the predicted score
    of g's class at j and u the overlap of j's predicted box with g. It rewards anchors that are
    good at both tasks. Positives are the top-k candidates of each object; their targets are
    t normalised per object so that its best anchor's target equals the object's best overlap.

    Reference: the overlap u is CIoU clamped at 0 (as the reference; TOOD uses IoU), and β = 6 was
    tuned with it. Anchors whose centre lies in no box are never positive, so an object smaller
    than a stride can end up with no positive anchor at all (recent reference releases widen such
    tiny boxes to 16 px for candidate selection; earlier ones, followed here, do not).
    """

    def __init__(self, topk: int = 10, num_classes: int = 7, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9,
                 target_eps: float = 1e-9):
        super().__init__()
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.target_eps = target_eps

    @torch.no_grad()
    def forward(
        self,
        pd_scores: torch.Tensor,
        pd_bboxes: torch.Tensor,
        anc_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask_gt: torch.Tensor,
    ) -> Assignment:
        """Assign objects to anchors. Shapes: B images, A anchors, C classes, M = n_max_boxes.

        pd_scores (B, A, C) predicted probabilities (after sigmoid); pd_bboxes (B, A, 4) predicted
        xyxy boxes and anc_points (A, 2) anchor centres, both in input pixels; gt_labels (B, M, 1)
        classes, gt_bboxes (B, M, 4) xyxy input pixels, mask_gt (B, M, 1) bool: True for real objects,
        False for the padding that gives every image M rows.
        """
        B, A, C = pd_scores.shape
        M = gt_bboxes.shape[1]
        if M == 0:  # no object in the whole batch: every anchor is background
            return Assignment(
                labels=torch.zeros(B, A, dtype=torch.long, device=pd_scores.device),
                bboxes=torch.zeros_like(pd_bboxes),
                scores=torch.zeros_like(pd_scores),
                fg_mask=torch.zeros(B, A, dtype=torch.bool, device=pd_scores.device),
                gt_idx=torch.zeros(B, A, dtype=torch.long, device=pd_scores.device),
            )

        # 1. Candidates: anchors whose centre lies strictly inside a real object's box.  (B, M, A)
        candidates = self.centres_in_boxes(anc_points, gt_bboxes) & mask_gt.bool()
        # 2. Alignment metric t = s^α · u^β of every candidate pair (0 elsewhere).       (B, M, A) ×2
        align, overlaps = self.alignment_metric(pd_scores, pd_bboxes, gt_labels, gt_bboxes, candidates)
        # 3. Top-k candidates per object by t (all of them if it has fewer than k).      (B, M, A)
        mask_pos = self.select_topk(align, candidates)
        # 4. One object per anchor: an anchor positive for several keeps the highest overlap.
        gt_idx, fg_mask, mask_pos = self.resolve_conflicts(mask_pos, overlaps)  # (B, A) ×2, (B, M, A)
        # 5. Targets of the assigned objects: class, box, one-hot class vector.
        labels = gt_labels.squeeze(-1).long().gather(1, gt_idx)  # (B, A)
        bboxes = gt_bboxes.gather(1, gt_idx.unsqueeze(-1).expand(B, A, 4))  # (B, A, 4)
        onehot = F.one_hot(labels, C).to(pd_scores.dtype) * fg_mask.unsqueeze(-1)  # (B, A, C)
        # 6. Soft targets: per object, t / max t × max overlap (IoU-aware classification).
        quality = self.soft_targets(align, overlaps, mask_pos)  # (B, A)
        return Assignment(labels, bboxes, onehot * quality.unsqueeze(-1), fg_mask, gt_idx)

    def centres_in_boxes(self, points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """points (A, 2), boxes (B, M, 4) xyxy -> (B, M, A) bool, True where the point is strictly inside."""
        x, y = points[:, 0], points[:, 1]  # (A,)
        x1, y1, x2, y2 = (c.unsqueeze(-1) for c in boxes.unbind(-1))  # (B, M, 1) each
        nearest_side = torch.minimum(torch.minimum(x - x1, y - y1), torch.minimum(x2 - x, y2 - y))  # (B, M, A)
        return nearest_side > self.eps

    def alignment_metric(self, pd_scores, pd_bboxes, gt_labels, gt_bboxes, candidates):
        """t = s^α · u^β and u = CIoU⁺(object, prediction), computed for candidate pairs only -> (B, M, A) ×2."""
        b, m, a = candidates.nonzero(as_tuple=True)  # (K,) each: image, object, anchor of every candidate
        score = pd_scores[b, a, gt_labels[b, m, 0].long()]  # (K,) s: score of the object's class
        overlap = ciou(gt_bboxes[b, m], pd_bboxes[b, a]).clamp(min=0)  # (K,) u
        align = torch.zeros(candidates.shape, dtype=pd_scores.dtype, device=pd_scores.device)
        overlaps = torch.zeros(candidates.shape, dtype=pd_bboxes.dtype, device=pd_bboxes.device)
        align[b, m, a] = score.pow(self.alpha) * overlap.pow(self.beta)
        overlaps[b, m, a] = overlap
        return align, overlaps

    def select_topk(self, align: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, M, A) metric and candidates -> (B, M, A) bool, the k best candidates of each object.

        Reference: it ranks all anchors and then drops non-candidates, so when fewer than k
        candidates have t > 0 the choice among t = 0 anchors depends on top-k tie-breaking;
        ranking candidates only makes it well defined. Candidates picked with t = 0 get a soft
        target of 0 (step 6), so they never add box or DFL loss either way.
        """
        k = min(self.topk, align.shape[-1])
        ranked = torch.where(candidates, align, torch.full_like(align, -1.0))  # non-candidates last
        top = ranked.topk(k, dim=-1).indices  # (B, M, k)
        chosen = torch.zeros_like(candidates).scatter_(-1, top, True)
        return chosen & candidates

    def resolve_conflicts(self, mask_pos: torch.Tensor, overlaps: torch.Tensor):
        """(B, M, A) positives and overlaps -> gt_idx (B, A), fg_mask (B, A), mask_pos (B, M, A) one-hot over M.

        Reference: it takes the highest overlap over all objects the anchor is a candidate of, so
        an anchor can go to an object whose top-k it is not in; here only the objects it is
        positive for compete, as in TOOD's own implementation (mmdetection TaskAlignedAssigner).
        """
        n_objects = mask_pos.sum(-2, keepdim=True)  # (B, 1, A)
        own = torch.where(mask_pos, overlaps, torch.full_like(overlaps, -1.0))  # (B, M, A)
        best = torch.zeros_like(mask_pos).scatter_(-2, own.argmax(-2, keepdim=True), True)  # (B, M, A)
        mask_pos = torch.where(n_objects > 1, best, mask_pos)
        fg_mask = mask_pos.any(-2)  # (B, A)
        gt_idx = mask_pos.to(torch.uint8).argmax(-2)  # (B, A), 0 for background
        return gt_idx, fg_mask, mask_pos

    def soft_targets(self, align: torch.Tensor, overlaps: torch.Tensor, mask_pos: torch.Tensor) -> torch.Tensor:
        """(B, M, A) metric t, overlaps u and positives -> (B, A) soft target of each anchor: per object,
        t / (max t + target_eps) × max u, so the object's best anchor gets (about) its best overlap and the
        others proportionally less. Background anchors get 0; so does an object whose t is 0 everywhere.

        target_eps = 1e-9 is the reference's guard, and the default. With β = 6 it is not only a guard:
        t = s^0.5 · u^6 falls below 1e-9 whenever the best overlap is under ~0.05 at the initial score
        s ≈ 0.01, as for a small object under the head's initial, too-large boxes. That object's targets
        shrink towards 0, and with them its box and DFL terms (weighted by the target), so it can stay
        unlearned: in the overfit test of tests/test_train.py three of nine osteophytes were never
        detected on one CPU. target_eps = 0 is TOOD's exact t / max t (only 0 / 0 is guarded) and finds
        them all; one 30-epoch detection demo with it scored lower on validation (mAP@0.5 52.0 against
        56.6), so the default stays the reference's until more runs decide."""
        align = align * mask_pos  # (B, M, A)
        max_align = align.amax(-1, keepdim=True)  # (B, M, 1)
        max_overlap = (overlaps * mask_pos).amax(-1, keepdim=True)  # (B, M, 1)
        norm = max_align.clamp(min=torch.finfo(align.dtype).tiny) + self.target_eps  # (B, M, 1), never 0
        return (align * max_overlap / norm).amax(-2)  # (B, A)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    box: float = 7.5  # Eq. 4, λ_box (paper Sec. 3.3 = reference default)
    cls: float = 0.5  # Eq. 4, λ_cls (paper Sec. 3.3 = reference default)
    dfl: float = 1.5  # Eq. 4, λ_dfl (paper Sec. 3.3 = reference default)
    mask: float = 7.5  # mask-loss gain; not in the paper, the reference reuses λ_box for its mask term
    cls_loss: str = "focal"  # Eq. 4 names focal loss (Eq. 6); "bce" = the reference's BCE on soft targets
    gamma: float = 2.0  # Eq. 6, γ (paper Sec. 3.3)
    alpha: float | None = 0.25  # Eq. 6, α (positive weight): best value with γ = 2 in Lin et al. 2017 [8]
    topk: int = 10  # assigner top-k (reference; REFERENCE.md §3)
    tal_alpha: float = 0.5  # assigner exponent of the class score s (reference)
    tal_beta: float = 6.0  # assigner exponent of the overlap u (reference)
    tal_target_eps: float = 1e-9  # soft targets t / (max t + eps) (reference); 0 = TOOD's exact t / max t

    def __post_init__(self):
        if self.cls_loss not in ("focal", "bce"):
            raise ValueError(f"cls_loss must be 'focal' or 'bce', got {self.cls_loss!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"focal alpha must be in [0, 1] or None, got {self.alpha}")


# ---------------------------------------------------------------------------
# Detection loss (Eq. 4)
# ---------------------------------------------------------------------------


class DetectionTerms(NamedTuple):
    """Intermediate results that the segmentation loss reuses."""

    terms: torch.Tensor  # (3,) gain-weighted [box, cls, dfl] of this batch, with gradient
    assignment: Assignment  # what each anchor was given
    gt_rows: torch.Tensor  # (B, M) row of `targets` (and of the mask stack) for each object slot, -1 = padding


class DetectionLoss:
    """Eq. 4 for the anchor-free YOLO11 head.

    Scaling convention (the reference's): each term is a per-batch value, normalised by the sum of
    the soft target scores of the batch (at least 1), and the returned loss is (box + cls + dfl) × B,
    the batch size, so losses add up over images like sums. Gradient accumulation to a nominal
    batch (64): run k = round(64 / B) micro-batches per optimiser step and call
    `(loss / n).backward()` on each, n = the number of images in that step's window (k·B, fewer in
    a short last window). The step's gradient is then the image-weighted mean of the per-batch
    losses, whatever the micro-batch sizes (a short batch counts by its size, not as a full one).
    `items` are the three gain-weighted terms, detached and NOT multiplied by B (for logging).

    All losses run in float32 with autocast disabled, so they are safe under AMP.
    """

    def __init__(self, nc: int, reg_max: int = 16, strides=(8, 16, 32), cfg: LossConfig = LossConfig()):
        self.nc = nc
        self.reg_max = reg_max
        self.strides = tuple(float(s) for s in strides)
        self.cfg = cfg
        self.assigner = TaskAlignedAssigner(cfg.topk, nc, cfg.tal_alpha, cfg.tal_beta, target_eps=cfg.tal_target_eps)
        self.dfl_loss = DFLoss(reg_max)

    def __call__(self, feats: list[torch.Tensor], targets: torch.Tensor, imgsz=None):
        """feats: list of 3 maps (B, 4*reg_max + nc, H/s, W/s) at strides 8/16/32 (training output);
        targets: (N, 6) rows [batch_idx, cls, x1, y1, x2, y2] in input pixels; imgsz: the input
        size, int or (H, W); detection needs no more than the anchors (which are in input pixels),
        it is accepted for the same call as the segmentation loss.
        Returns (loss, items): loss scalar = sum of terms × B; items (3,) detached [box, cls, dfl].
        """
        with torch.autocast(feats[0].device.type, enabled=False):
            det = self.detection_terms([f.float() for f in feats], targets)
        return det.terms.sum() * feats[0].shape[0], det.terms.detach()

    # --- the steps of Eq. 4

    def detection_terms(self, feats: list[torch.Tensor], targets: torch.Tensor) -> DetectionTerms:
        if len(feats) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (strides {self.strides}), got {len(feats)}")
        B, R = feats[0].shape[0], self.reg_max
        # 1. Flatten the levels: (B, 4R + nc, A) -> distance logits (B, A, 4R) and class logits (B, A, nc).
        flat = torch.cat([f.flatten(2) for f in feats], 2)  # (B, 4R + nc, A)
        if flat.shape[1] != 4 * R + self.nc:
            raise ValueError(f"feature maps have {flat.shape[1]} channels, expected 4*{R} + {self.nc}")
        pred_dist, pred_logits = flat.permute(0, 2, 1).split((4 * R, self.nc), -1)
        # 2. Anchor centres (A, 2) in grid units of their level, and their strides (A, 1).
        anchors, stride = make_anchors(feats, self.strides)
        # 3. Ground truth padded to (B, M, ...) per image.
        gt_labels, gt_bboxes, mask_gt, gt_rows = self.pad_targets(targets.to(flat), B)
        # 4. Decode the predicted boxes: expected distance of each side's distribution (grid units).
        pred_bboxes = self.decode(anchors, pred_dist)  # (B, A, 4) xyxy, grid units
        # 5. Assign objects to anchors, in input pixels, on detached predictions.
        asg = self.assigner(
            pred_logits.detach().sigmoid(), pred_bboxes.detach() * stride, anchors * stride,
            gt_labels, gt_bboxes, mask_gt,
        )
        score_sum = asg.scores.sum().clamp(min=1)  # normaliser of every term
        # 6. Classification over all anchors and classes (background anchors have target 0).
        if self.cfg.cls_loss == "focal":  # Eq. 6
            cls = focal_loss(pred_logits, asg.scores, self.cfg.gamma, self.cfg.alpha, reduction="sum")
        else:  # reference
            cls = F.binary_cross_entropy_with_logits(pred_logits, asg.scores, reduction="sum")
        cls = cls / score_sum
        # 7. Box (Eq. 5) and DFL over positive anchors, each weighted by its soft target.
        fg = asg.fg_mask  # (B, A)
        weight = asg.scores.sum(-1)[fg]  # (P,)
        target_bboxes = asg.bboxes / stride  # (B, A, 4) grid units, like the prediction
        box = (ciou_loss(pred_bboxes[fg], target_bboxes[fg]) * weight).sum() / score_sum
        target_ltrb = bbox2dist(anchors, target_bboxes, R)  # (B, A, 4) distances in bins
        dfl = (self.dfl_loss(pred_dist[fg].reshape(-1, 4, R), target_ltrb[fg]) * weight).sum() / score_sum
        # 8. Eq. 4 gains.
        terms = torch.stack((self.cfg.box * box, self.cfg.cls * cls, self.cfg.dfl * dfl))
        return DetectionTerms(terms, asg, gt_rows)

    def decode(self, anchors: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """anchors (A, 2), pred_dist (B, A, 4R) logits -> (B, A, 4) xyxy boxes in grid units."""
        B, A, _ = pred_dist.shape
        bins = torch.arange(self.reg_max, dtype=pred_dist.dtype, device=pred_dist.device)  # (R,)
        dist = pred_dist.reshape(B, A, 4, self.reg_max).softmax(-1) @ bins  # (B, A, 4) expected distance
        return dist2bbox(dist, anchors, xywh=False)

    @staticmethod
    def pad_targets(targets: torch.Tensor, batch_size: int):
        """(N, 6) [batch_idx, cls, x1, y1, x2, y2] -> per-image tensors padded to M = most objects in one image.

        Returns gt_labels (B, M, 1), gt_bboxes (B, M, 4), mask_gt (B, M, 1) bool, gt_rows (B, M) int64
        (row of `targets` in each slot, -1 for padding). Rows may come in any order.
        """
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be (N, 6) [batch_idx, cls, x1, y1, x2, y2], got {tuple(targets.shape)}")
        n, device = targets.shape[0], targets.device
        image = targets[:, 0].long()  # (N,)
        if n and (image.min() < 0 or image.max() >= batch_size):
            raise ValueError(f"targets batch_idx must lie in [0, {batch_size}), got {image.min()}..{image.max()}")
        counts = torch.bincount(image, minlength=batch_size)  # (B,)
        M = int(counts.max()) if n else 0
        order = torch.argsort(image, stable=True)  # rows grouped by image, original order inside
        first = counts.cumsum(0) - counts  # (B,) first sorted row of each image
        slot = torch.arange(n, device=device) - first[image[order]]  # (N,) position inside its image
        gt_rows = torch.full((batch_size, M), -1, dtype=torch.long, device=device)
        gt_rows[image[order], slot] = order
        gt = torch.zeros(batch_size, M, 5, dtype=targets.dtype, device=device)
        gt[image[order], slot] = targets[order, 1:]
        mask_gt = (gt_rows >= 0).unsqueeze(-1)
        return gt[..., :1], gt[..., 1:], mask_gt, gt_rows


# ---------------------------------------------------------------------------
# Segmentation loss (Eq. 4 + mask term, YOLO11-seg)
# ---------------------------------------------------------------------------


def box_pixel_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """boxes (P, 4) xyxy in pixels of an (h, w) grid -> (P, h, w) bool, True where the pixel centre is inside.

    Reference: its crop_mask tests the pixel index (the left/top edge), half a pixel off the centre.
    """
    xs = torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5  # (w,) pixel centres
    ys = torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5  # (h,)
    x1, y1, x2, y2 = (c[:, None] for c in boxes.unbind(-1))  # (P, 1) each
    in_x = (xs >= x1) & (xs < x2)  # (P, w)
    in_y = (ys >= y1) & (ys < y2)  # (P, h)
    return in_y[:, :, None] & in_x[:, None, :]


def cropped_mask_bce(logits: torch.Tensor, gt_masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mask BCE inside each box, normalised by the box area -> (P,).

    logits (P, h, w) predicted mask logits; gt_masks (P, h, w) in {0, 1}; boxes (P, 4) xyxy in mask
    pixels. The area is clamped at one pixel so a box thinner than a mask pixel cannot blow up.
    """
    bce = F.binary_cross_entropy_with_logits(logits, gt_masks, reduction="none")  # (P, h, w)
    inside = box_pixel_mask(boxes, *logits.shape[-2:])  # (P, h, w)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1.0)  # (P,)
    return (bce * inside).sum((1, 2)) / area


class SegmentationLoss(DetectionLoss):
    """Eq. 4 plus the mask loss of the YOLO11-seg head.

    Mask term: every positive anchor predicts a mask logit map coeffs · protos at prototype
    resolution (stride 4); its loss is the BCE against the ground-truth mask of the object the
    assigner gave it, inside that object's box, divided by the box area (so large and small lesions
    count alike), averaged over positive anchors and multiplied by `LossConfig.mask`.
    Same scaling convention as DetectionLoss: loss = (box + cls + dfl + mask) × B.
    """

    def __call__(self, preds, targets: torch.Tensor, masks: torch.Tensor, imgsz=None):
        """preds: (feats list of 3, coeffs (B, 32, A), protos (B, 32, H/4, W/4)) of YOLO11Seg in train mode;
        targets (N, 6) as DetectionLoss; masks (N, H/4, W/4) ground-truth masks in {0, 1}, row i for
        targets row i; imgsz: input size int or (H, W), default feature size × first stride.
        Returns (loss, items (4,) detached [box, cls, dfl, mask]).
        """
        feats, coeffs, protos = preds
        with torch.autocast(feats[0].device.type, enabled=False):
            feats = [f.float() for f in feats]
            det = self.detection_terms(feats, targets)
            hw = self.input_size(feats, imgsz)
            mask = self.mask_term(det, coeffs.float(), protos.float(), masks.to(protos.device).float(), hw)
            terms = torch.cat((det.terms, (self.cfg.mask * mask).unsqueeze(0)))
        return terms.sum() * feats[0].shape[0], terms.detach()

    def input_size(self, feats: list[torch.Tensor], imgsz) -> tuple[int, int]:
        if imgsz is None:
            h, w = feats[0].shape[-2:]
            return int(h * self.strides[0]), int(w * self.strides[0])
        return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))

    def mask_term(self, det: DetectionTerms, coeffs, protos, masks, hw) -> torch.Tensor:
        """Mean over positive anchors of the cropped, area-normalised mask BCE (ungained scalar)."""
        asg = det.assignment
        n_pos = asg.fg_mask.sum()
        if n_pos == 0:  # keep the mask branch in the graph with a zero loss
            return (coeffs * 0).sum() + (protos * 0).sum()
        B, nm, mh, mw = protos.shape
        if masks.shape[-2:] != (mh, mw):
            raise ValueError(f"masks are {tuple(masks.shape[-2:])} but prototypes are ({mh}, {mw}): "
                             "give ground-truth masks at prototype resolution (input size / 4)")
        to_proto = protos.new_tensor([mw / hw[1], mh / hw[0], mw / hw[1], mh / hw[0]])  # input px -> mask px
        total = protos.new_zeros(())
        for i in range(B):  # per image: (P_i, 32) @ (32, h*w) keeps memory at P_i masks
            fg = asg.fg_mask[i]  # (A,)
            if not fg.any():
                continue
            rows = det.gt_rows[i, asg.gt_idx[i, fg]]  # (P_i,) rows of the mask stack
            logits = (coeffs[i][:, fg].T @ protos[i].view(nm, -1)).view(-1, mh, mw)  # (P_i, h, w)
            boxes = asg.bboxes[i, fg] * to_proto  # (P_i, 4) mask pixels
            total = total + cropped_mask_bce(logits, masks[rows], boxes).sum()
        return total / n_pos
