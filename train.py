"""Algorithm 1, Phases I and II: DERNet triage and YOLO11 lesion detection, with the evaluation reports.

    Phase I  (--stage cls)  Algorithm 1 lines 1-7, Sec. 3.2: the three DERNet members are trained in turn
                            (AdamW, η = 1e-4, cosine annealing, BCE), the best epoch of each chosen on
                            the validation fold; Eq. 2 fuses them and τ_optimal comes from Youden's J on
                            the same fold. Report: Table 2 with study-level bootstrap CIs and paired tests.
    Phase II (--stage det)  Algorithm 1 lines 8-15, Sec. 3.3: YOLO11-L on Eq. 4 (losses.py), mosaic while
                            epoch < τ_mosaic = 25, EMA weights, best epoch by validation mAP@0.5.
                            Report: Table 3 with the VinDr-SpineXR protocol (COCO 101-point AP@0.5).
    YOLO11-seg (--stage seg) the same with lesion masks (Fig. 4c): mask AP, Dice and IoU.

The test split is touched once, at the end of a stage; every choice (epochs, τ, Ω) is made on the
validation fold (Sec. 4.1: 5-fold stratified cross-validation, seed 42, deterministic algorithms).

    python train.py --stage cls                     # CPU demo on the synthetic VinDr-format set
    python train.py --stage det                     # (generated once under data/synthetic)
    python train.py --stage cls --data /path/to/vindr-spinexr --pretrained weights/   # the paper's settings
    torchrun --standalone --nproc_per_node=4 train.py --stage det --data /path/to/vindr-spinexr

Run folders: runs/<stage>/<name>/ with config.json, checkpoints (atomic writes; --resume continues),
report.md, metrics.json, CSVs and PNG plots. Sections: atomic writers -> classification metrics ->
detection metrics -> reports and plots -> runtime (devices, torchrun) -> checkpoints -> config ->
Phase I -> Phase II -> folds -> command line.
"""
import argparse
import collections
import contextlib
import copy
import csv
import functools
import hashlib
import json
import math
import numbers
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import (CLASSES, LT_CODES, NO_FINDING, ClassificationDataset, DataConfig, DataError, DetectionDataset,
                  ImageCache, atomic_write, boxes_from_letterbox, collate_detection, letterbox_geometry, load_split,
                  make_synthetic, repeat_factors, split_fold)
from dernet import MEMBERS, OMEGA, DERNet, Member, build_member, fit_omega, save_dernet, youden_threshold
from losses import DetectionLoss, LossConfig, SegmentationLoss
from yolo11 import YOLO11, YOLO11Seg, non_max_suppression, process_masks, seg_from_det

# --- atomic writers (nothing half-written survives a crash)


def write_text(path, text: str) -> Path:
    """Write a text file (report.md) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _jsonable(obj):
    """numpy arrays/scalars, tuples and Paths to plain JSON types; NaN and ±inf to null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> Path:
    """Write `obj` as indented strict JSON, atomically. NaN (e.g. AP of a class without ground truth) → null."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_text(path, text)


# --- classification metrics (Table 2)

BOOTSTRAP_B = 1000  # Sec. 4.1: bootstrap resampling, B = 1000
BOOTSTRAP_SEED = 42  # Sec. 4.1: fixed seed 42
BOOTSTRAP_ALPHA = 0.05  # Sec. 4.1: 95% confidence intervals


def _check_binary(y, score) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) in {0, 1} (1 = abnormal) and scores (N,) as arrays; both classes must be present."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or y.shape != score.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {score.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
    if y.min() == y.max():
        raise ValueError(f"classification metrics need normal and abnormal images; all labels are {y[0]}")
    return y.astype(np.int64), score


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x (N,), ties sharing their average rank ("midranks", Sun & Xu 2014)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]  # (N,) True where a run of equal values starts
    starts = np.flatnonzero(first)  # (U,) 0-based start of each run
    ends = np.r_[starts[1:], len(x)]  # (U,) one past its end
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]
    return ranks


def auroc(y, score) -> float:
    """Area under the ROC curve = Mann–Whitney U / (n1 n0) = P(S+ > S−) + ½ P(S+ = S−).

    Identical to the trapezoidal ROC area of sklearn.metrics.roc_auc_score, ties included."""
    y, score = _check_binary(y, score)
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((_midranks(score)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_points(y, score) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr (P,), tpr (P,)) from (0, 0) through every distinct score to (1, 1), as sklearn's
    roc_curve(drop_intermediate=False): lowering τ past a score flips all images with that score."""
    y, score = _check_binary(y, score)
    order = np.argsort(-score, kind="mergesort")
    s, abnormal = score[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # (N,) True at the last image of each run of equal scores
    tp, fp = np.cumsum(abnormal)[last], np.cumsum(1 - abnormal)[last]  # (P − 1,)
    return np.r_[0, fp] / fp[-1], np.r_[0, tp] / tp[-1]


def classification_metrics(y, score, threshold: float) -> dict[str, float]:
    """Table 2 metrics of scores S (N,) against labels y (N,) at the operating threshold τ.

    Decision S > τ (strict, Algorithm 1 line 17). F1 and sensitivity are for the abnormal class,
    specificity is the recall of the normal class (= sklearn's recall_score with pos_label=0)."""
    y, score = _check_binary(y, score)
    pred = score > threshold  # Algorithm 1, line 17: abnormal if S > τ_optimal
    tp = np.count_nonzero(pred & (y == 1))
    fp = np.count_nonzero(pred & (y == 0))
    fn = np.count_nonzero(~pred & (y == 1))
    tn = np.count_nonzero(~pred & (y == 0))
    return {
        "auroc": auroc(y, score),
        "f1": float(2 * tp / (2 * tp + fp + fn)),  # > 0 denominator: abnormal images exist
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)),
    }


def study_bootstrap(groups, B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """Yield B resamples of image indices drawn by STUDY (cluster bootstrap).

    The AP and lateral views of one study are correlated, so the unit resampled is the study
    (groups = study_id per image): each resample draws S of the S studies with replacement and
    takes all images of every drawn study. The same (groups, seed) yields the same resamples,
    which is what makes comparisons between models paired."""
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    by_study = np.argsort(inverse, kind="stable")  # (N,) image indices grouped study by study
    starts = np.cumsum(counts) - counts  # (S,) where each study begins in by_study
    rng = np.random.default_rng(seed)
    for _ in range(B):
        pick = rng.integers(0, len(counts), size=len(counts))  # (S,) studies, with replacement
        n = counts[pick]  # images of each drawn study
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # 0..n_s-1 inside each study
        yield by_study[np.repeat(starts[pick], n) + within]


def bootstrap_samples(y, score, groups, metric_fn, B: int = BOOTSTRAP_B,
                      seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """metric_fn(y, score) -> dict[str, float] evaluated on B study-level resamples: {key: (B_used,)}.

    A resample that happens to contain only one class (AUROC undefined) is skipped, so B_used ≤ B;
    the skip depends on labels and groups only, so every model skips the same resamples."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    values: dict[str, list[float]] = {}
    for idx in study_bootstrap(groups, B, seed):
        if y[idx].min() == y[idx].max():
            continue
        for key, v in metric_fn(y[idx], score[idx]).items():
            values.setdefault(key, []).append(v)
    if not values:
        raise ValueError("every bootstrap resample had a single class; too few studies of one class")
    return {key: np.asarray(v) for key, v in values.items()}


def bootstrap_ci(y, scores, groups, metric_fn, B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED,
                 alpha: float = BOOTSTRAP_ALPHA) -> dict[str, tuple[float, float]]:
    """Percentile (1 − alpha) confidence interval of each metric, resampling studies (Sec. 4.1, B = 1000)."""
    samples = bootstrap_samples(y, scores, groups, metric_fn, B, seed)
    return {key: _percentile_ci(v, alpha) for key, v in samples.items()}


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_bootstrap_pvalue(samples_a: Mapping, samples_b: Mapping, point_a: Mapping,
                            point_b: Mapping) -> dict[str, float]:
    """Two-sided p-value of metric(A) − metric(B) = 0 from PAIRED bootstrap samples (same resamples).

    Null distribution = bootstrap differences shifted to mean zero (Hall & Wilson 1991):
    p = (1 + #{|Δ*_b − Δ̂| ≥ |Δ̂|}) / (B_used + 1)."""
    p = {}
    for key in samples_a:
        delta = point_a[key] - point_b[key]
        diffs = samples_a[key] - samples_b[key]  # (B_used,)
        p[key] = float((1 + np.count_nonzero(np.abs(diffs - delta) >= abs(delta))) / (len(diffs) + 1))
    return p


def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (K,) of K score vectors scores (K, N) on the same images and their DeLong covariance (K, K).

    DeLong, DeLong & Clarke-Pearson (1988), computed with the fast midrank algorithm of Sun & Xu (2014)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))  # (K, N)
    y, _ = _check_binary(y, scores[0])
    x, z = scores[:, y == 1], scores[:, y == 0]  # (K, m) abnormal, (K, n) normal
    m, n = x.shape[1], z.shape[1]
    # 1. Midranks within the abnormal images, within the normal images, and over all images.
    tx = np.stack([_midranks(r) for r in x])  # (K, m)
    tz = np.stack([_midranks(r) for r in z])  # (K, n)
    t_all = np.stack([_midranks(r) for r in np.concatenate([x, z], axis=1)])  # (K, m + n)
    # 2. AUROC from the rank sum of the abnormal images (Mann–Whitney).
    aucs = (t_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / n  # (K,)
    # 3. Structural components: V10(x_i) = share of normals scored below x_i, V01(z_j) = share of
    #    abnormals scored above z_j (ties count ½).
    v10 = (t_all[:, :m] - tx) / n  # (K, m)
    v01 = 1.0 - (t_all[:, m:] - tz) / m  # (K, n)
    # 4. Cov(AUC) = S10 / m + S01 / n.
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n  # (K, K)
    return aucs, cov


def delong_test(y, score_a, score_b) -> dict[str, float]:
    """DeLong's test of two correlated AUROCs (same images): z = ΔAUC / SE, two-sided normal p-value.

    DeLong treats images as independent; with ~2 views per study it is a little optimistic,
    which is why summarize_classification also reports a study-level paired bootstrap p-value."""
    aucs, cov = delong_covariance(y, np.stack([score_a, score_b]))
    delta = aucs[0] - aucs[1]
    se = math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
    z = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "delta": float(delta), "se": se,
            "z": float(z), "p": math.erfc(abs(z) / math.sqrt(2))}  # 2 (1 − Φ(|z|))


def summarize_classification(y, scores: Mapping[str, Sequence[float]], thresholds: Mapping[str, float], groups,
                             reference: str = "DERNet", B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED,
                             alpha: float = BOOTSTRAP_ALPHA) -> dict:
    """Everything Table 2 needs, for each classifier (3 members + DERNet) on one split.

    y (N,) labels, scores {name: (N,)}, thresholds {name: τ} (chosen on validation data), groups (N,)
    study ids. Returns {"models": {name: {auroc, f1, sensitivity, specificity, threshold,
    ci: {metric: [lo, hi]}}}, "comparisons": {name: {delong: {...}, bootstrap_p: {metric: p}}}
    (reference vs each other model), "n_images", "n_studies", "n_abnormal", "bootstrap": {...}}."""
    if reference not in scores:
        raise ValueError(f"reference model {reference!r} is not among the scores {list(scores)}")
    models, samples = {}, {}
    for name, s in scores.items():
        metric_fn = functools.partial(classification_metrics, threshold=thresholds[name])
        samples[name] = bootstrap_samples(y, s, groups, metric_fn, B, seed)  # same resamples for every model
        models[name] = {**metric_fn(y, s), "threshold": float(thresholds[name]),
                        "ci": {k: _percentile_ci(v, alpha) for k, v in samples[name].items()}}
    comparisons = {}
    for name in scores:
        if name != reference:
            comparisons[name] = {
                "delong": delong_test(y, scores[reference], scores[name]),
                "bootstrap_p": paired_bootstrap_pvalue(samples[reference], samples[name],
                                                       models[reference], models[name])}
    return {"models": models, "comparisons": comparisons, "reference": reference,
            "n_images": len(y), "n_studies": len(np.unique(np.asarray(groups))), "n_abnormal": int(np.sum(y)),
            "bootstrap": {"B": B, "used": len(samples[reference]["auroc"]), "seed": seed, "alpha": alpha,
                          "unit": "study"}}


# --- detection metrics: VinDr-SpineXR protocol (Table 3), COCO semantics as in pycocotools

COCO_IOU_THRESHOLDS = (0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95)  # COCO AP@[.5:.95]
COCO_RECALL_POINTS = 101  # COCO: precision sampled at recall 0, 0.01, …, 1 (REFERENCE §2)
VINDR_MAX_DETS = 100  # REFERENCE §2: at most 100 detections per image (capped per class, as pycocotools)
VINDR_IOU = 0.5  # REFERENCE §2: AP at IoU 0.5 (Table 3)


def box_iou(a, b) -> np.ndarray:
    """IoU of boxes a (N, 4) and b (M, 4), xyxy → (N, M). COCO convention: width = x2 − x1 (no +1)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _mask_extents(masks: np.ndarray) -> np.ndarray:
    """Tight extents (N, 4) [y0, y1, x0, x1) of boolean masks (N, H, W); an empty mask gets [0, 0, 0, 0)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (N, H), (N, W)
    h, w = masks.shape[1:]
    ext = np.stack([rows.argmax(1), h - rows[:, ::-1].argmax(1), cols.argmax(1), w - cols[:, ::-1].argmax(1)], axis=1)
    return np.where(rows.any(axis=1)[:, None], ext, 0)


def _extent_counts(masks: np.ndarray, extents: np.ndarray) -> np.ndarray:
    """Pixel count (N,) of each mask, counted inside its extent only."""
    return np.array([np.count_nonzero(m[y0:y1, x0:x1]) for m, (y0, y1, x0, x1) in zip(masks, extents)])


def mask_iou(a, b) -> np.ndarray:
    """IoU of boolean masks a (N, H, W) and b (M, H, W) → (N, M), pixel counts as pycocotools' segm IoU.

    Pairs whose tight extents do not overlap have IoU 0; the others are intersected only inside
    the overlap of their extents, so small lesions in large radiographs stay cheap."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    ea, eb = _mask_extents(a), _mask_extents(b)  # (N, 4), (M, 4)
    area_a, area_b = _extent_counts(a, ea), _extent_counts(b, eb)  # (N,), (M,) pixels
    y0 = np.maximum(ea[:, None, 0], eb[None, :, 0]); y1 = np.minimum(ea[:, None, 1], eb[None, :, 1])
    x0 = np.maximum(ea[:, None, 2], eb[None, :, 2]); x1 = np.minimum(ea[:, None, 3], eb[None, :, 3])
    inter = np.zeros((len(a), len(b)))
    for i, j in zip(*np.nonzero((y0 < y1) & (x0 < x1))):
        ys, xs = slice(y0[i, j], y1[i, j]), slice(x0[i, j], x1[i, j])
        inter[i, j] = np.count_nonzero(a[i, ys, xs] & b[j, ys, xs])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _top_per_class(scores: np.ndarray, classes: np.ndarray, max_dets: int) -> np.ndarray:
    """Indices of one image's detections kept for evaluation, ordered by (class, descending score).

    pycocotools caps detections per image AND per class (evaluateImg: `dt[0:maxDet]` after a
    stable sort by score, for each (image, category)); we do the same. YOLO11's NMS already caps
    each image at 100 detections over all classes, so for our detector both readings agree."""
    order = np.lexsort((-scores, classes))  # stable: equal scores keep their input order
    cls_sorted = classes[order]
    rank = np.arange(len(order)) - np.searchsorted(cls_sorted, cls_sorted, side="left")  # rank within class
    return order[rank < max_dets]


def _greedy_match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """COCO greedy matching in one image: (T, K) index of the GT each detection matches, −1 = FP.

    ious (K, M): detections in descending-score order within each class, pairs of different
    classes set to −1 (a detection only matches GT of its class); thresholds (T,).
    Each detection, best score first, takes the still-unmatched GT with the highest IoU ≥ t."""
    T, (K, M) = len(thresholds), ious.shape
    matched = np.full((T, K), -1)
    if M == 0:
        return matched
    thr = np.minimum(thresholds, 1 - 1e-10)[:, None]  # (T, 1) pycocotools: IoU ≥ min(t, 1 − 1e-10)
    free = np.ones((T, M), dtype=bool)  # GT not yet matched, per threshold
    rows = np.arange(T)
    for k in np.flatnonzero(ious.max(axis=1) >= thr.min()):  # the rest are FPs at every threshold
        cand = np.where(free & (ious[k] >= thr), ious[k], -np.inf)  # (T, M)
        best = M - 1 - np.argmax(cand[:, ::-1], axis=1)  # (T,) ties go to the later GT, as in pycocotools
        hit = np.isfinite(cand[rows, best])  # (T,)
        matched[hit, k] = best[hit]
        free[rows[hit], best[hit]] = False
    return matched


def _interpolated_precision(tp: np.ndarray, n_gt: int, recall_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO precision (T, R) at the recall points and the final recall (T,) of one class.

    tp (T, D): True where a detection is a TP, detections sorted by descending score over all images."""
    T, D = tp.shape
    precision = np.zeros((T, len(recall_grid)))
    if D == 0:
        return precision, np.zeros(T)
    # 1. Cumulative TP and FP down the ranked list.
    tp_sum = np.cumsum(tp, axis=1)  # (T, D)
    fp_sum = np.cumsum(~tp, axis=1)
    recall = tp_sum / n_gt
    prec = tp_sum / (tp_sum + fp_sum)
    # 2. Precision envelope: best precision at this or any higher recall (monotone, COCO/VOC).
    prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    # 3. Sample it at each recall point r: the first rank whose recall ≥ r; 0 where r is never reached.
    for t in range(T):
        idx = np.searchsorted(recall[t], recall_grid, side="left")  # (R,)
        ok = idx < D
        precision[t, ok] = prec[t, idx[ok]]
    return precision, recall[:, -1]


def _as_detections(dets, image_id, num_classes: int) -> np.ndarray:
    dets = np.asarray(dets, dtype=np.float64)
    if dets.size == 0:
        return np.zeros((0, 6))
    if dets.ndim != 2 or dets.shape[1] != 6:
        raise ValueError(f"detections of image {image_id} must be (N, 6) [x1, y1, x2, y2, score, cls], "
                         f"got {dets.shape}")
    if not np.isfinite(dets[:, 4]).all():
        raise ValueError(f"image {image_id}: detection scores must be finite")
    _check_boxes(dets[:, :4], image_id, "detection")
    _check_classes(dets[:, 5], image_id, num_classes)
    return dets


def _as_ground_truth(gt, image_id, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    boxes, classes = (np.asarray(v, dtype=np.float64) for v in gt)
    if boxes.size == 0 and classes.size == 0:  # a normal ("No finding") image
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or classes.shape != (len(boxes),):
        raise ValueError(f"ground truth of image {image_id} must be (boxes (M, 4), classes (M,)), "
                         f"got {boxes.shape} and {classes.shape}")
    _check_boxes(boxes, image_id, "ground-truth")
    _check_classes(classes, image_id, num_classes)
    return boxes, classes.astype(np.int64)


def _check_boxes(boxes: np.ndarray, image_id, what: str) -> None:
    """Finite xyxy boxes with x2 ≥ x1, y2 ≥ y1 (pycocotools would silently ignore a negative-area one)."""
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"image {image_id}: {what} boxes must be finite xyxy with x2 >= x1 and y2 >= y1")


def _check_classes(classes: np.ndarray, image_id, num_classes: int) -> None:
    if not (np.all(classes == np.round(classes)) and np.all((classes >= 0) & (classes < num_classes))):
        raise ValueError(f"image {image_id}: class indices must be integers in [0, {num_classes})")


def _iou_thresholds(iou_thresholds) -> tuple[np.ndarray, int]:
    """IoU thresholds (T,) as an array and the index of 0.5 among them (Table 3 is AP@0.5)."""
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    t50 = np.flatnonzero(np.isclose(thresholds, VINDR_IOU))
    if len(t50) != 1:
        raise ValueError(f"iou_thresholds must contain {VINDR_IOU} once (VinDr-SpineXR AP@0.5)")
    return thresholds, int(t50[0])


def _match_images(dets: Mapping, gt_classes: Mapping, iou_fn, num_classes: int, thresholds: np.ndarray, max_dets: int):
    """Protocol step 1 (pycocotools evaluateImg), on any IoU (boxes or masks).

    dets {image_id: (N, 6)}; gt_classes {image_id: (M,)} for EVERY evaluated image (normal images
    with M = 0 included, so their detections are FPs); iou_fn(image_id, keep (K,)) -> (K, M).
    Image by image in sorted id order (as pycocotools; the order only decides ties in score): keep
    the top max_dets per class, compute IoUs, match greedily at every threshold.
    Returns, over the kept detections of all images: scores (D,), classes (D,), matched_iou (T, D)
    = IoU with the GT matched at threshold t, NaN for a false positive; and n_gt (C,)."""
    T = len(thresholds)
    n_gt = np.zeros(num_classes, dtype=np.int64)
    scores, classes, matched_iou = [np.zeros(0)], [np.zeros(0, dtype=np.int64)], [np.zeros((T, 0))]
    for image_id in sorted(gt_classes):
        g_cls = gt_classes[image_id]  # (M,)
        n_gt += np.bincount(g_cls, minlength=num_classes)
        d = dets.get(image_id, np.zeros((0, 6)))
        keep = _top_per_class(d[:, 4], d[:, 5], max_dets)  # (K,)
        if len(keep) == 0:
            continue
        d_cls = d[keep, 5].astype(np.int64)
        ious = np.where(d_cls[:, None] == g_cls[None, :], iou_fn(image_id, keep), -1.0)  # (K, M)
        match = _greedy_match(ious, thresholds)  # (T, K)
        padded = np.concatenate([ious, np.full((len(keep), 1), np.nan)], axis=1)  # (K, M + 1): column −1 = NaN
        scores.append(d[keep, 4])
        classes.append(d_cls)
        matched_iou.append(padded[np.arange(len(keep)), match])  # (T, K)
    return np.concatenate(scores), np.concatenate(classes), np.concatenate(matched_iou, axis=1), n_gt


def _accumulate(scores: np.ndarray, classes: np.ndarray, matched_iou: np.ndarray, n_gt: np.ndarray,
                thresholds: np.ndarray, t50: int) -> dict:
    """Protocol step 2 (pycocotools accumulate): per class, rank the detections of all images by
    score (stable mergesort, as pycocotools) and take the 101-point interpolated AP at each threshold.
    Classes without GT get NaN and stay out of the means (pycocotools' −1)."""
    num_classes, T = len(n_gt), len(thresholds)
    recall_grid = np.linspace(0.0, 1.0, COCO_RECALL_POINTS)  # (R,) exactly pycocotools' recThrs
    ap = np.full((num_classes, T), np.nan)
    recall = np.full((num_classes, T), np.nan)
    precision50 = np.full((num_classes, len(recall_grid)), np.nan)
    for c in np.flatnonzero(n_gt):
        sel = np.flatnonzero(classes == c)
        order = sel[np.argsort(-scores[sel], kind="mergesort")]
        prec, recall[c] = _interpolated_precision(~np.isnan(matched_iou[:, order]), n_gt[c], recall_grid)
        ap[c] = prec.mean(axis=1)
        precision50[c] = prec[t50]
    ap50_95 = ap.mean(axis=1)  # (C,)
    has_gt = n_gt > 0
    return {
        "iou_thresholds": thresholds, "recall_thresholds": recall_grid,
        "ap": ap, "ap50": ap[:, t50], "ap50_95": ap50_95,
        # Table 3: unweighted mean over the classes with ground truth
        "map50": float(ap[has_gt, t50].mean()) if has_gt.any() else math.nan,
        "map50_95": float(ap50_95[has_gt].mean()) if has_gt.any() else math.nan,
        "recall": recall, "precision50": precision50,
        "n_gt": n_gt, "n_det": np.bincount(classes, minlength=num_classes),
        "classes_with_gt": np.flatnonzero(has_gt),
    }


def evaluate_detections(detections: Mapping, ground_truth: Mapping, num_classes: int = 7,
                        iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
                        max_dets: int = VINDR_MAX_DETS) -> dict:
    """Box AP with the VinDr-SpineXR protocol (REFERENCE §2), COCO semantics identical to pycocotools.

    detections {image_id: (N, 6) [x1, y1, x2, y2, score, cls]}, ground_truth {image_id: (boxes (M, 4),
    classes (M,))}, original pixels. Every image of ground_truth is evaluated (normal images with
    M = 0 too: their detections are FPs); images without a detections entry have none. Area "all",
    no crowd regions. Returns:
      ap (C, T) AP per class and IoU threshold; ap50 (C,); ap50_95 (C,); map50, map50_95 (floats,
      unweighted means over the classes WITH ground truth — classes without any are NaN and
      excluded, as pycocotools does); recall (C, T) final recall; precision50 (C, 101) interpolated
      precision at IoU 0.5 over recall_thresholds (101,) — the PR curve AP integrates;
      n_gt (C,), n_det (C,) (after max_dets), n_images, classes_with_gt, iou_thresholds (T,)."""
    thresholds, t50 = _iou_thresholds(iou_thresholds)
    gt = {i: _as_ground_truth(g, i, num_classes) for i, g in ground_truth.items()}
    dets = _prepare_detections(detections, gt, num_classes)
    scores, classes, matched_iou, n_gt = _match_images(
        dets, {i: c for i, (_, c) in gt.items()}, lambda i, keep: box_iou(dets[i][keep, :4], gt[i][0]),
        num_classes, thresholds, max_dets)
    return {**_accumulate(scores, classes, matched_iou, n_gt, thresholds, t50), "n_images": len(gt)}


def _prepare_detections(detections: Mapping, ground_truth: Mapping, num_classes: int) -> dict:
    unknown = [i for i in detections if i not in ground_truth]
    if unknown:
        raise ValueError(f"detections for {len(unknown)} image(s) without a ground-truth entry, e.g. {unknown[0]!r}")
    return {i: _as_detections(d, i, num_classes) for i, d in detections.items()}


def _instance_masks(masks: Mapping, image_id, n: int, what: str) -> np.ndarray:
    """Boolean masks (n, H, W) of one image; an image with n = 0 may be absent."""
    if image_id not in masks:
        if n:
            raise ValueError(f"{what} masks missing for image {image_id}")
        return np.zeros((0, 1, 1), dtype=bool)
    m = np.asarray(masks[image_id], dtype=bool)
    if m.ndim != 3 or len(m) != n:
        raise ValueError(f"{what} masks of image {image_id} must be ({n}, H, W), got {m.shape}")
    return m


def evaluate_masks(detections: Mapping, pred_masks: Mapping, ground_truth: Mapping, gt_masks: Mapping,
                   num_classes: int = 7, iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
                   max_dets: int = VINDR_MAX_DETS) -> dict:
    """Mask AP (same protocol as evaluate_detections, mask IoU) and Dice/IoU of the matched lesions.

    pred_masks {image_id: (N, H, W) bool} row-aligned with detections; gt_masks {image_id: (M, H, W)
    bool} row-aligned with ground_truth's boxes; original pixels. Masks are read one image at a
    time, so a lazily loading Mapping keeps memory to one image. Returns evaluate_detections' keys
    (mask AP) plus, over the predictions matched at IoU 0.5 (greedy, max_dets):
      dice_matched, iou_matched (mean over matched lesions), dice_matched_per_class,
      iou_matched_per_class (C,) (NaN without matches), n_matched (C,), and dice_all_gt: mean Dice
      over EVERY ground-truth lesion, 0 for a missed one (detection and mask quality in one number)."""
    thresholds, t50 = _iou_thresholds(iou_thresholds)
    gt = {i: _as_ground_truth(g, i, num_classes) for i, g in ground_truth.items()}
    dets = _prepare_detections(detections, gt, num_classes)

    def iou_fn(image_id, keep):
        pred = _instance_masks(pred_masks, image_id, len(dets[image_id]), "predicted")
        true = _instance_masks(gt_masks, image_id, len(gt[image_id][1]), "ground-truth")
        if len(true) == 0:
            return np.zeros((len(keep), 0))
        if pred.shape[1:] != true.shape[1:]:
            raise ValueError(f"image {image_id}: predicted masks {pred.shape[1:]} vs ground truth {true.shape[1:]}")
        return mask_iou(pred, true)[keep]  # (K, M); indexing the IoUs, not the masks, avoids a copy

    scores, classes, matched_iou, n_gt = _match_images(
        dets, {i: c for i, (_, c) in gt.items()}, iou_fn, num_classes, thresholds, max_dets)
    hit = ~np.isnan(matched_iou[t50])  # (D,) matched at IoU 0.5
    m_cls, m_iou = classes[hit], matched_iou[t50, hit]  # (L,) one entry per matched lesion
    dice = 2 * m_iou / (1 + m_iou)  # Dice = 2|A∩B| / (|A| + |B|) = 2 IoU / (1 + IoU)
    n_all = n_gt.sum()
    return {**_accumulate(scores, classes, matched_iou, n_gt, thresholds, t50), "n_images": len(gt),
            "dice_matched": float(dice.mean()) if len(dice) else math.nan,
            "iou_matched": float(m_iou.mean()) if len(m_iou) else math.nan,
            "dice_matched_per_class": _class_means(m_cls, dice, num_classes),
            "iou_matched_per_class": _class_means(m_cls, m_iou, num_classes),
            "n_matched": np.bincount(m_cls, minlength=num_classes),
            "dice_all_gt": float(dice.sum() / n_all) if n_all else math.nan}


def _class_means(classes: np.ndarray, values: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean of values (L,) per class (C,); NaN for a class with no values."""
    n = np.bincount(classes, minlength=num_classes).astype(np.float64)
    total = np.bincount(classes, weights=values, minlength=num_classes)
    return np.divide(total, n, out=np.full(num_classes, np.nan), where=n > 0)


# --- reports and plots

TABLE2_KEYS = ("auroc", "f1", "sensitivity", "specificity")
TABLE2_HEADER = ("Method", "AUROC (%)", "F1 (%)", "Sens. (%)", "Spec. (%)")  # paper, Table 2
PAPER_TABLE2 = (  # paper, Table 2, quoted verbatim (VinDr-SpineXR test split)
    ("EfficientNetV2-S", "89.44", "79.34", "70.80", "91.12"),
    ("ResNet50", "88.88", "80.15", "82.72", "78.13"),
    ("DenseNet121", "86.93", "79.55", "80.39", "79.32"),
    ("VinDr Ensemble [9]", "88.61", "81.06", "83.07", "79.32"),
    ("HealNNet [6]", "88.84", "81.20", "-", "-"),
    ("DERNet", "91.03", "83.09", "84.91", "81.68"),
)
TABLE3_HEADER = ("Method", "LT2", "LT4", "LT6", "LT8", "LT10", "LT11", "LT13", "mAP@0.5")  # paper, Table 3
PAPER_TABLE3 = (  # paper, Table 3, quoted verbatim: AP (%) at IoU 0.5
    ("Dino [19]", "16.58", "22.87", "28.53", "32.71", "59.78", "41.28", "3.24", "29.28"),
    ("RetinaNet [8]", "14.53", "25.35", "41.67", "32.14", "65.49", "51.85", "5.30", "28.09"),
    ("Faster R-CNN [13]", "22.66", "35.99", "49.24", "31.68", "65.22", "51.68", "2.16", "31.83"),
    ("Sparse R-CNN [15]", "20.09", "32.67", "48.16", "45.32", "72.20", "49.30", "5.41", "33.15"),
    ("VinDr-SpineXR [9]", "21.43", "27.36", "34.78", "41.29", "62.53", "43.39", "4.16", "33.56"),
    ("EGCA-Net [2]", "22.36", "29.75", "36.73", "44.69", "66.58", "50.41", "2.09", "36.09"),
    ("Ours (YOLO11-L)", "26.70", "41.40", "40.60", "54.80", "74.10", "51.20", "2.99", "40.10"),
)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(v) -> str:
    """A fraction as a percentage with 2 decimals, as in the paper; "–" for NaN/None (no ground truth)."""
    v = float("nan") if v is None else float(v)
    return "–" if math.isnan(v) else f"{100 * v:.2f}"


def _pvalue(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _class_row(label: str, per_class, overall) -> list[str]:
    """A table row: label, one % cell per lesion type in LT order (class index order), then `overall`."""
    values = np.asarray(per_class, dtype=np.float64)  # None (from JSON) → NaN
    n = len(TABLE3_HEADER) - 2
    if values.shape != (n,):
        raise ValueError(f"{label!r} needs {n} values, one per lesion type in LT order; got shape {values.shape}")
    return [label] + [_pct(v) for v in values] + [_pct(overall)]


def render_table2(summary: Mapping) -> str:
    """Markdown Table 2 from summarize_classification's dict (or that dict read back from JSON):
    each model "value [lo, hi]" in %, then the paper's rows quoted verbatim."""
    b = summary["bootstrap"]
    rows = [[name] + [f"{_pct(m[k])} [{_pct(m['ci'][k][0])}, {_pct(m['ci'][k][1])}]" for k in TABLE2_KEYS]
            for name, m in summary["models"].items()]
    taus = ", ".join(f"{name} {m['threshold']:.4f}" for name, m in summary["models"].items())
    return "\n".join([
        f"Classification, {summary['n_images']} images ({summary['n_abnormal']} abnormal) in "
        f"{summary['n_studies']} studies. Decision S > τ with τ chosen on validation data: {taus}.",
        "",
        _md_table(TABLE2_HEADER, rows),
        "",
        f"95% CI: percentile bootstrap over studies, B = {b['B']} ({b['used']} resamples with both "
        f"classes), seed {b['seed']}.",
        "",
        "Published (paper, Table 2, VinDr-SpineXR test split, quoted verbatim):",
        "",
        _md_table(TABLE2_HEADER, PAPER_TABLE2),
    ])


def render_paired_tests(summary: Mapping) -> str:
    """Markdown table of the reference (DERNet) against each other model: ΔAUROC, DeLong's test and
    study-level paired bootstrap p-values for the four Table 2 metrics."""
    ref = summary["reference"]
    header = ("Comparison", "ΔAUROC (pp)", "DeLong z", "DeLong p", "bootstrap p (AUROC)", "bootstrap p (F1)",
              "bootstrap p (Sens.)", "bootstrap p (Spec.)")
    rows = [[f"{ref} vs {name}", f"{100 * c['delong']['delta']:+.2f}", f"{c['delong']['z']:.2f}",
             _pvalue(c["delong"]["p"])] + [_pvalue(c["bootstrap_p"][k]) for k in TABLE2_KEYS]
            for name, c in summary["comparisons"].items()]
    return "\n".join([
        _md_table(header, rows),
        "",
        "Two-sided tests, significant at p < 0.05 (Sec. 4.1). DeLong (1988) treats images as "
        "independent; the paired bootstrap resamples whole studies (all views together), so it "
        "also accounts for the correlation between views of one study.",
    ])


def render_table3(metrics: Mapping, label: str = "This implementation") -> str:
    """Markdown Table 3 from evaluate_detections' dict: AP@0.5 (%) for LT2 … LT13 and mAP@0.5, then
    the paper's comparison rows quoted verbatim. "–" marks a class without ground truth."""
    return "\n".join([
        _md_table(TABLE3_HEADER, [_class_row(label, metrics["ap50"], metrics["map50"])]),
        "",
        f"mAP@0.5:0.95 = {_pct(metrics['map50_95'])}. VinDr-SpineXR protocol: COCO 101-point AP, "
        f"area all, ≤ {VINDR_MAX_DETS} detections per image and class, {metrics['n_images']} images "
        "(normal ones included); means are unweighted over the classes with ground truth.",
        "",
        "Published (paper, Table 3, VinDr-SpineXR test split, quoted verbatim):",
        "",
        _md_table(TABLE3_HEADER, PAPER_TABLE3),
    ])


def render_mask_table(box_metrics: Mapping, mask_metrics: Mapping) -> str:
    """Markdown rows for the segmentation report: box AP@0.5, mask AP@0.5 and AP@0.5:0.95, and Dice /
    IoU of the lesions matched at mask IoU 0.5, per class (LT2 … LT13) and overall."""
    header = ("Metric",) + TABLE3_HEADER[1:-1] + ("all",)
    m = mask_metrics
    rows = [
        _class_row("Box AP@0.5", box_metrics["ap50"], box_metrics["map50"]),
        _class_row("Mask AP@0.5", m["ap50"], m["map50"]),
        _class_row("Mask AP@0.5:0.95", m["ap50_95"], m["map50_95"]),
        _class_row("Dice, matched", m["dice_matched_per_class"], m["dice_matched"]),
        _class_row("IoU, matched", m["iou_matched_per_class"], m["iou_matched"]),
        ["matched / GT lesions"] + [f"{int(a)}/{int(b)}" for a, b in zip(m["n_matched"], m["n_gt"])]
        + [f"{int(np.sum(m['n_matched']))}/{int(np.sum(m['n_gt']))}"],
    ]
    return "\n".join([
        _md_table(header, rows),
        "",
        f"Dice over every ground-truth lesion (a missed lesion counts 0): {_pct(m['dice_all_gt'])}.",
    ])


def _save_figure(fig: Figure, path) -> Path:
    FigureCanvasAgg(fig)  # Agg canvas for this figure only; no global backend switch
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_roc_curves(y, scores: Mapping[str, Sequence[float]], path,
                    thresholds: Mapping[str, float] | None = None) -> Path:
    """ROC curves of the classifiers (3 members + DERNet) on one axes, AUROC in the legend; with
    thresholds {name: τ}, each model's operating point (S > τ) is marked."""
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    for name, s in scores.items():
        fpr, tpr = roc_points(y, s)
        (line,) = ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * auroc(y, s):.2f}%)")
        if thresholds is not None and name in thresholds:
            op = classification_metrics(y, s, thresholds[name])
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title="ROC, abnormal vs normal")
    ax.legend(loc="lower right", fontsize=8)
    return _save_figure(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, float]], path, x_key: str = "epoch") -> Path:
    """One small panel per logged quantity (losses, metrics) against x_key, from a list of per-epoch dicts."""
    if not history:
        raise ValueError("no training history to plot")
    keys = [k for k in dict.fromkeys(k for h in history for k in h) if k != x_key
            and all(h.get(k) is None or isinstance(h[k], numbers.Real) for h in history)]
    if not keys:
        raise ValueError("the training history has no numeric values to plot")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    for n, key in enumerate(keys, start=1):
        pts = [(h.get(x_key, i), h[key]) for i, h in enumerate(history) if h.get(key) is not None]
        ax = fig.add_subplot(rows, cols, n)
        ax.plot(*zip(*pts), marker=".")
        ax.set(title=key, xlabel=x_key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_pr_curves(metrics: Mapping, class_names: Sequence[str], path) -> Path:
    """Per-class precision–recall curves at IoU 0.5 (the 101-point interpolated precision that AP
    averages), AP@0.5 in the legend; classes without ground truth are listed as such."""
    recall = np.asarray(metrics["recall_thresholds"], dtype=np.float64)  # (R,)
    precision = np.asarray(metrics["precision50"], dtype=np.float64)  # (C, R), None → NaN
    if len(class_names) != len(precision):
        raise ValueError(f"{len(class_names)} class names for {len(precision)} classes")
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    for name, p, ap in zip(class_names, precision, np.asarray(metrics["ap50"], dtype=np.float64)):
        if np.isnan(ap):
            ax.plot([], [], " ", label=f"{name} (no ground truth)")
        else:
            ax.plot(recall, p, label=f"{name} (AP {100 * ap:.2f}%)")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Precision–recall at IoU 0.5, mAP@0.5 {_pct(metrics['map50'])}%")
    ax.legend(loc="upper right", fontsize=7)
    return _save_figure(fig, path)


# --- runtime: device, distributed engine (torchrun), seeds


@dataclass
class Runtime:
    """Where this process runs. One process = one rank; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:  # rank 0 alone logs, writes checkpoints and reports
        return self.rank == 0

    @property
    def amp(self) -> bool:  # CUDA AMP; the CPU's native bf16 serves Phase I only (cls_autocast)
        return self.device.type == "cuda"


NATIVE_BF16_CAPABILITIES = ("AVX512_BF16", "AMX")   # torch.backends.cpu.get_cpu_capability() names
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo flags: x86 and ARM (issue 11)
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=None)  # asked once per training batch: read /proc/cpuinfo once
def native_bf16(capability: str | None = None, cpuinfo: str | None = None) -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Only there is bf16 autocast faster than
    fp32; elsewhere oneDNN emulates it. torch's capability string names AVX512 but not its BF16
    extension, so the Linux cpuinfo flags are read as well (arguments: for tests)."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if any(name in capability.upper() for name in NATIVE_BF16_CAPABILITIES):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:   # not Linux
            cpuinfo = ""
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def cls_autocast(cfg: "TrainConfig", rt: Runtime) -> torch.autocast:
    """Phase I mixed precision (cfg.precision 'auto'): AMP on CUDA; bf16 autocast on a CPU with native
    bf16, where the members train 1.4-1.7x faster (README); fp32 elsewhere or with 'fp32'."""
    cpu_bf16 = cfg.precision == "auto" and rt.device.type == "cpu" and native_bf16()
    return torch.autocast(rt.device.type, dtype=torch.bfloat16 if cpu_bf16 else None,
                          enabled=cpu_bf16 or (rt.amp and cfg.precision == "auto"))


def init_runtime(device: str = "auto") -> Runtime:
    """Single process, or one rank of a torchrun job: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Runtime(rank, world, local_rank, dev)


def close_runtime(rt: Runtime):
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, *parts: int):
    """Seed Python, NumPy and torch from (seed, *parts): reseeding at every epoch start makes an epoch's
    randomness (shuffling, dropout, stochastic depth) a function of the epoch alone, so a resumed run
    repeats exactly what an uninterrupted one does. Data augmentation has its own per-sample
    generators (data.py: default_rng((seed, epoch, index)))."""
    s = int(np.random.SeedSequence((seed, *parts)).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def configure_determinism(rt: Runtime):
    """Sec. 4.1: deterministic algorithms. CUDA has a few kernels without a deterministic version
    (e.g. the backward of nearest upsampling): there torch warns instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA docs)
    torch.use_deterministic_algorithms(True, warn_only=rt.device.type == "cuda")
    torch.backends.cudnn.benchmark = False


def all_gather(obj, rt: Runtime) -> list:
    """Every rank's obj, in rank order (the object itself on one process)."""
    if rt.world == 1:
        return [obj]
    out = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, rt: Runtime):
    """Rank 0's obj on every rank."""
    if rt.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_finite(loss: torch.Tensor, rt: Runtime) -> bool:
    """True when the loss is finite on every rank: all ranks must skip a bad step together, or the
    DDP gradient all-reduce would wait forever for the rank that skipped."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if rt.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def wrap_ddp(model: nn.Module, rt: Runtime, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel on several ranks (optionally with SyncBatchNorm); the model itself on one."""
    if rt.world == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def ranks_in_sync(model: nn.Module, rt: Runtime) -> bool:
    """DDP's invariant, checked after training: every rank holds bit-identical parameters. (BatchNorm
    running statistics are broadcast from rank 0 at each forward and then updated from each rank's own
    batch, so they legitimately differ; rank 0's are the ones saved.) One SHA-256 digest per rank."""
    if rt.world == 1:
        return True
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return len(set(all_gather(digest.hexdigest(), rt))) == 1


def record_sync(model: nn.Module, what: str, run: Path, rt: Runtime):
    """Several ranks: write ranks.json {what: in sync} (rank 0) and warn if the ranks drifted apart."""
    if rt.world == 1:
        return
    ok = ranks_in_sync(model, rt)
    if rt.main:
        path = run / "ranks.json"
        state = json.loads(path.read_text()) if path.is_file() else {"world": rt.world}
        write_json(path, {**state, what: ok})
    if not ok:
        log(rt, f"warning: {what}: the ranks' weights differ after training")


class EvalShard(torch.utils.data.Sampler):
    """Evaluation indices of this rank: rank, rank + world, ... No padding (unlike DistributedSampler,
    which repeats samples to even out the ranks), so gathering the shards gives every image once and
    the metrics equal a single-process evaluation."""

    def __init__(self, n: int, rt: Runtime):
        self.indices = list(range(rt.rank, n, rt.world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Repeat-factor sampling (LVIS; the official VinDr-SpineXR detector baseline used t = 0.1) for the
    class imbalance of Sec. 3.1: image i appears r_i times per epoch, r_i = max over its classes of
    max(1, sqrt(t / f_c)) (data.repeat_factors), the fractional part by a coin flip. Each epoch's list
    is a function of (seed, epoch), shuffled, trimmed to a multiple of world and dealt to the ranks."""

    def __init__(self, factors: np.ndarray, seed: int, rt: Runtime):
        self.factors, self.seed, self.rt = np.asarray(factors, np.float64), seed, rt
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        rng = np.random.default_rng((self.seed, epoch))
        whole = np.floor(self.factors)
        reps = (whole + (rng.random(len(self.factors)) < self.factors - whole)).astype(np.int64)
        order = rng.permutation(np.repeat(np.arange(len(self.factors)), reps))
        order = order[: len(order) // self.rt.world * self.rt.world]
        self.indices = order[self.rt.rank::self.rt.world].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# --- checkpoints: atomic writes, one-line errors on bad files


class CheckpointError(RuntimeError):
    """A missing, truncated or mismatched checkpoint (one line: the file and what is wrong)."""


def save_checkpoint(obj: dict, path) -> Path:
    """torch.save to a temporary file beside `path`, then an atomic rename: the newest complete
    checkpoint always stays loadable, whatever kills the process."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, stage: str | None = None, nc: int | None = None) -> dict:
    """A training checkpoint (weights_only: tensors and plain Python types only), checked for its stage
    and number of classes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle garbage, foreign types: one line, not a traceback
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not from this project "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (no 'stage' entry)")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path}: a '{ckpt['stage']}' checkpoint, but stage '{stage}' needs its own")
    if nc is not None and ckpt.get("nc", nc) != nc:
        raise CheckpointError(f"{path}: trained for {ckpt['nc']} classes, this run has {nc}")
    return ckpt


def rng_state() -> dict:
    """Random states saved with every checkpoint (restored on resume; epochs also reseed, see seed_everything)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)),
            "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


# --- config: the paper's settings (Sec. 4.1, Algorithm 1) and the CPU demo on the synthetic set


@dataclass
class TrainConfig:
    stage: str = "cls"  # cls = Phase I (DERNet), det = Phase II (YOLO11), seg = YOLO11-seg (Fig. 4c)
    # data
    data: str | None = None  # VinDr-SpineXR root; None = the synthetic VinDr-format set (demo)
    synthetic_dir: str = "data/synthetic"  # where the demo writes its dataset once (relative to cwd)
    cache_dir: str = ".cache/images"  # decoded + CLAHE'd images (data.ImageCache)
    clahe_side: int | None = DataConfig.clahe_side  # Eq. 1 working long side; None = each input's own size
    low_band: bool = DataConfig.low_band  # ours (issue 11): DICOMs through the 5/3 low band (data.wavelet_low_band)
    fold: int = 0  # validation fold inside the training split (model selection only)
    n_folds: int = 5  # Sec. 4.1: 5-fold stratified cross-validation
    workers: int = -1  # DataLoader processes; -1 = 0 on CPU (cached images load in ~1 ms), 8 on CUDA
    seed: int = 42  # Sec. 4.1
    # Phase I: DERNet (Algorithm 1, lines 1-7)
    cls_epochs: int = 60  # Sec. 4.1: 60 epochs, cosine annealing
    cls_batch: int = 16  # not given in the paper; fits an 8 GB GPU at 384 px (Sec. 4.1)
    cls_imgsz: int = 384  # member input size (issue 3 default)
    member_imgsz: dict = field(default_factory=dict)  # per-member overrides {name: size} (issue 3)
    cls_augment: bool = True  # issue 3: radiograph-safe augmentation (data.DataConfig); off in the short demo
    cls_fast_decode_p: float = 0.5  # ours (issue 11): P(a training image is read through inference's reduced
    #                                 JPEG 2000 decode); validation and test always read the full decode. With
    #                                 low_band both reads give the same image: it matters for --no-low-band
    lr: float = 1e-4  # Algorithm 1: η = 1e-4, AdamW (both phases)
    cls_weight_decay: float = 1e-2  # AdamW's own default (paper: "AdamW", no value)
    grad_clip: float = 10.0  # max gradient norm (reference detector family's value, used for both phases)
    pretrained: str | None = None  # local torchvision ImageNet files (Algorithm 1, line 2); never downloaded
    train_images: int = 0  # use whole studies of the training split up to this many images (0 = all)
    fit_omega: bool = False  # refit Ω on validation (off: the paper's Ω = [0.42, 0.32, 0.26], Eq. 2)
    # Phase II: YOLO11 (Algorithm 1, lines 8-15)
    scale: str = "l"  # Sec. 3.3: YOLO11-L
    det_epochs: int = 55  # Sec. 4.1
    det_batch: int = 12  # Sec. 4.1
    det_imgsz: int = 640  # REFERENCE §3: the family's training size
    nominal_batch: int = 64  # REFERENCE §3: gradient accumulation to a nominal batch of 64
    tau_mosaic: int = 25  # Algorithm 1, line 9: mosaic while epoch < τ_mosaic
    warmup_epochs: float = 3.0  # REFERENCE §3
    warmup_min_iters: int = 100  # reference family: warm-up lasts at least 100 optimizer iterations
    final_lr_ratio: float = 0.01  # reference family (lrf): cosine decay to 1 % of η
    det_weight_decay: float = 5e-4  # reference family, scaled by the nominal batch
    ema_decay: float = 0.9999  # REFERENCE §3: EMA of weights, reference decay ...
    ema_tau: float = 2000.0  # ... ramped up as 1 - exp(-updates / τ) (reference)
    cls_loss: str = "focal"  # Eq. 4 / Eq. 6 (focal); "bce" = the reference family
    repeat_threshold: float = 0.0  # repeat-factor sampling threshold t (0 = off; VinDr baseline: 0.1)
    init_from: str | None = None  # seg: start from this detection checkpoint (every shared block)
    nms_iou: float = 0.5  # Algorithm 1, line 18
    eval_conf: float = 0.001  # keep low-score boxes for AP (COCO practice)
    max_det: int = 100  # REFERENCE §2: at most 100 detections per image
    # run
    out: str = "runs"
    name: str | None = None  # run folder runs/<stage>/<name>; None = a timestamp
    resume: str | None = None  # a run folder, or "latest"
    folds_all: bool = False  # run all 5 folds and report mean ± std
    sync_bn: bool = False  # SyncBatchNorm across ranks
    device: str = "auto"
    bootstrap: int = BOOTSTRAP_B  # Sec. 4.1: B = 1000
    precision: str = "auto"  # auto: AMP on CUDA, bf16 for the members on a CPU with native bf16; fp32
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    progress: bool = True


# CPU demo on the synthetic set (no --data): the paper's architectures and optimiser, with smaller
# images, fewer epochs and no gradient accumulation so that a stage finishes on a 2-core CPU (measured
# figures in README). Every model starts from scratch (no ImageNet or COCO weights are ever downloaded),
# so the short schedules use AdamW at 1e-3 -- the reference detector family's automatic rate for short
# runs, 0.002 * 5 / (4 + nc) ≈ 1e-3 -- instead of the paper's η = 1e-4 (which assumes pretrained weights
# and a long run). Phase I: 6 epochs over the 1,152 training-fold images at 128 px without augmentation:
# measured here, ResNet50 reached validation AUROC 0.97 in 6 epochs without augmentation and 0.56 with
# it (augmentation regularises long runs; this one is too short to overfit). Detection: whole studies
# making up 400 images of the training split (~320 train / 80 val), the paper's mosaic share of epochs
# (25 / 55 ≈ 0.45). CLAHE (Eq. 1) runs at the detection demo's 384 px for all three stages, so the
# members' 128-px inputs and the detector's share one working image, as the paper's sizes share 640.
# Every value is one flag away (--imgsz 384 --epochs 60 --lr 1e-4 --augment ...).
DEMO_CLAHE_SIDE = 384
DEMO = {
    "cls": dict(cls_epochs=6, cls_imgsz=128, cls_batch=16, lr=1e-3, cls_augment=False,
                clahe_side=DEMO_CLAHE_SIDE),
    "det": dict(train_images=400, scale="n", det_epochs=30, det_imgsz=384, det_batch=8, nominal_batch=8,
                tau_mosaic=14, warmup_epochs=1.0, lr=1e-3, clahe_side=DEMO_CLAHE_SIDE),
    "seg": dict(train_images=400, scale="n", det_epochs=24, det_imgsz=320, det_batch=8, nominal_batch=8,
                tau_mosaic=11, warmup_epochs=1.0, lr=1e-3, clahe_side=DEMO_CLAHE_SIDE),
}


# --- data for a run

def data_config(cfg: TrainConfig) -> DataConfig:
    """data.py's settings for this run: the paper's, with the run's CLAHE working side (Eq. 1) and
    low-band choice."""
    return replace(DataConfig(), clahe_side=cfg.clahe_side, low_band=cfg.low_band)


def dataset_root(cfg: TrainConfig, rt: Runtime) -> Path:
    """--data, or the synthetic set (written once by rank 0; the CSVs are written last, so their
    presence means the set is complete)."""
    if cfg.data is not None:
        root = Path(cfg.data)
        if not (root / "annotations" / "train.csv").is_file():
            raise DataError(f"{root}: no annotations/train.csv; --data must be a VinDr-SpineXR root "
                            f"(annotations/, train_images/, test_images/)")
        return root
    root = Path(cfg.synthetic_dir)
    if rt.main and not (root / "annotations" / "test.csv").is_file():
        log(rt, f"writing the synthetic VinDr-format dataset to {root} (once)")
        make_synthetic(root, overwrite=(root / "annotations").exists(), progress=cfg.progress)
    broadcast(None, rt)  # the other ranks wait for it
    return root


@dataclass
class Splits:
    train: list
    val: list
    test: list


def load_splits(cfg: TrainConfig, root: Path, fold: int) -> Splits:
    """Training split -> (other folds, validation fold `fold`); the official test split is kept apart
    and read only for the final report."""
    train, val = split_fold(study_subset(load_split(root, "train"), cfg.train_images, cfg.seed), fold,
                            cfg.n_folds, cfg.seed)
    return Splits(train, val, load_split(root, "test"))


def study_subset(records: list, n_images: int, seed: int) -> list:
    """Whole studies in a seeded random order until about n_images images (0 = all), in file order:
    the detection demos train on a part of the training split, still grouped by study for the folds."""
    if n_images <= 0 or n_images >= len(records):
        return records
    sizes = collections.Counter(r.study_id for r in records)  # images per study, in file order
    studies, keep, count = list(sizes), set(), 0
    for k in np.random.default_rng(seed).permutation(len(studies)):
        if count >= n_images:
            break
        keep.add(studies[k])
        count += sizes[studies[k]]
    return [r for r in records if r.study_id in keep]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout: the members' convolutions run 10-30 % faster on CPU (and on CUDA with AMP)."""
    return x.contiguous(memory_format=torch.channels_last)


def make_loader(dataset, batch: int, sampler, workers: int, collate=None, drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last)


def log(rt: Runtime, msg: str):
    if rt.main:
        tqdm.write(msg)


def progress(iterable, rt: Runtime, cfg: TrainConfig, **kw):
    return tqdm(iterable, disable=not (rt.main and cfg.progress), dynamic_ncols=True, leave=False, **kw)


# --- run folders and resume


def new_run_dir(cfg: TrainConfig, rt: Runtime) -> Path:
    """runs/<stage>/<name> (or the folder being resumed), decided by rank 0 and shared with the others."""
    run = None
    if rt.main:
        base = Path(cfg.out) / cfg.stage
        if cfg.resume == "latest":
            run = latest_run(base)
        elif cfg.resume:
            run = Path(cfg.resume)
            if not (run / "config.json").is_file():
                raise CheckpointError(f"{run}: not a run folder (no config.json) to resume")
        else:
            name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
            run = base / name
            if (run / "config.json").exists():
                raise CheckpointError(f"{run}: exists already; pass --resume {run} or another --name")
            run.mkdir(parents=True, exist_ok=True)
            write_json(run / "config.json", asdict(cfg))
    return Path(broadcast(str(run), rt))


def latest_run(base: Path) -> Path:
    """Newest unfinished run in base (automatic resume after a torchrun restart, or --resume latest)."""
    runs = sorted((p for p in base.glob("*/config.json") if not (p.parent / "metrics.json").exists()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CheckpointError(f"{base}: no unfinished run to resume")
    return runs[-1].parent


# --- Phase I: DERNet members (Algorithm 1, lines 1-7) and the ensemble (Eq. 2, Sec. 3.2)

MEMBER_NAMES = {"densenet121": "DenseNet121", "efficientnet_v2_s": "EfficientNetV2-S", "resnet50": "ResNet50"}


@torch.no_grad()
def predict_probs(prob_fn: Callable, dataset, cfg: TrainConfig, rt: Runtime, batch: int) -> np.ndarray:
    """prob_fn(x) for every image of `dataset`, in dataset order: each rank scores its shard
    (EvalShard) and the shards are gathered. prob_fn: x (B, 1, S, S) -> probabilities (B,) or (B, M)."""
    shard = EvalShard(len(dataset), rt)
    loader = make_loader(dataset, batch, shard, resolve_workers(cfg, rt))
    out = []
    for x, _ in progress(loader, rt, cfg, desc="predict"):
        with cls_autocast(cfg, rt):
            out.append(prob_fn(channels_last(x.to(rt.device, non_blocking=True))).float().cpu())
    values = torch.cat(out).numpy() if out else np.zeros((0,))
    result = [None] * len(dataset)
    for indices, vals in all_gather((shard.indices, values), rt):
        for i, v in zip(indices, vals):
            result[i] = v
    return np.stack(result)


def member_prob_fn(member: nn.Module) -> Callable:
    member.eval()
    return lambda x: torch.sigmoid(member(x).float())  # fp32 under autocast, as DERNet.member_probs


def dernet_prob_fn(dernet: DERNet) -> Callable:
    dernet.eval()
    return dernet.member_probs  # (B, 3) in MEMBERS order


def resolve_workers(cfg: TrainConfig, rt: Runtime) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return min(8, os.cpu_count() or 1) if rt.device.type == "cuda" else 0


def member_sizes(cfg: TrainConfig) -> dict[str, int]:
    """Each member's input size: --imgsz, or its --member-imgsz override."""
    return {name: int(cfg.member_imgsz.get(name, cfg.cls_imgsz)) for name in MEMBERS}


def sizes_text(cfg: TrainConfig) -> str:
    sizes = member_sizes(cfg)
    if len(set(sizes.values())) == 1:
        return f"{sizes[MEMBERS[0]]} px"
    return ", ".join(f"{MEMBER_NAMES[name]} {size}" for name, size in sizes.items()) + " px"


def cls_epoch(model, loader, optimizer, scaler, loss_fn, cfg: TrainConfig, rt: Runtime, desc: str) -> dict:
    """One epoch of Algorithm 1 lines 4-5: BCE (line 4) and an AdamW step (line 5) per batch."""
    model.train()
    total, seen, bad, t0 = 0.0, 0, 0, time.perf_counter()
    bar = progress(loader, rt, cfg, desc=desc)
    for x, y in bar:
        x, y = channels_last(x.to(rt.device, non_blocking=True)), y.to(rt.device, non_blocking=True)
        with cls_autocast(cfg, rt):
            loss = loss_fn(model(x).float(), y)  # Algorithm 1, line 4
        if not all_finite(loss, rt):
            bad = skip_bad_step(optimizer, bad, cfg, rt)
            continue
        bad = 0
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # Algorithm 1, line 5 (AdamW)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        total, seen = total + loss.item() * len(x), seen + len(x)
        bar.set_postfix(loss=f"{total / seen:.4f}", img_s=f"{seen * rt.world / (time.perf_counter() - t0):.1f}")
    return {"train_loss": total / max(seen, 1), "img_per_s": seen * rt.world / (time.perf_counter() - t0)}


def skip_bad_step(optimizer, bad: int, cfg: TrainConfig, rt: Runtime) -> int:
    """A non-finite loss: drop this step (warn); stop with a clear message after max_bad_steps in a row.
    The last good checkpoint stays on disk untouched."""
    optimizer.zero_grad(set_to_none=True)
    bad += 1
    log(rt, f"warning: non-finite loss, step skipped ({bad} in a row)")
    if bad >= cfg.max_bad_steps:
        raise TrainingDiverged(f"{bad} non-finite losses in a row; stopped. The last good checkpoint is kept; "
                               f"lower --lr or check the data, then --resume")
    return bad


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


def train_member(name: str, cfg: TrainConfig, splits: Splits, cache: ImageCache, run: Path, rt: Runtime) -> list:
    """Algorithm 1, lines 2-6 for one member: AdamW + cosine annealing on BCE with the positive class
    weighted by the class balance; the best epoch by validation AUROC is kept (member_<name>.pt), and
    the full training state is saved atomically after every epoch (<name>_last.pt) for --resume."""
    size, epochs = member_sizes(cfg)[name], cfg.cls_epochs
    train_ds = ClassificationDataset(splits.train, size, cache, augment=cfg.cls_augment, seed=cfg.seed,
                                     fast_decode_p=cfg.cls_fast_decode_p)
    val_ds = ClassificationDataset(splits.val, size, cache)
    seed_everything(cfg.seed, MEMBERS.index(name))
    try:
        model = build_member(name, cfg.pretrained).to(rt.device, memory_format=torch.channels_last)  # line 2
    except ValueError as err:  # a wrong --pretrained file: one line, no traceback
        raise CheckpointError(str(err)) from None
    ddp_model = wrap_ddp(model, rt, cfg.sync_bn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.cls_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)  # Sec. 4.1
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp and cfg.precision == "auto")  # fp16 on CUDA
    n_pos = float(train_ds.labels.sum())
    pos_weight = torch.tensor((len(train_ds) - n_pos) / max(n_pos, 1.0), device=rt.device)  # class balance
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)  # Algorithm 1, line 4
    sampler = DistributedSampler(train_ds, rt.world, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # drop the last partial batch: a batch of one cannot train BatchNorm on a 1 x 1 feature map
    loader = make_loader(train_ds, cfg.cls_batch, sampler, resolve_workers(cfg, rt), drop_last=True)
    if len(loader) == 0:
        raise DataError(f"{len(train_ds)} training images for {rt.world} process(es) do not fill one batch of "
                        f"{cfg.cls_batch}; lower --batch")
    start, best, history = 0, {"auroc": -1.0, "epoch": -1}, []
    last = run / f"{name}_last.pt"
    if last.exists():  # --resume: continue after the last completed epoch
        ckpt = load_checkpoint(last, "cls")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        if start < epochs:
            log(rt, f"{name}: resuming at epoch {start + 1}/{epochs}")
    for epoch in range(start, epochs):
        seed_everything(cfg.seed, MEMBERS.index(name), epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = cls_epoch(ddp_model, loader, optimizer, scaler, loss_fn, cfg, rt, f"{name} {epoch + 1}/{epochs}")
        val_p = predict_probs(member_prob_fn(model), val_ds, cfg, rt, cfg.cls_batch)
        val_auroc = auroc(val_ds.labels, val_p)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats,
               "val_loss": bce(val_ds.labels, val_p), "val_auroc": val_auroc, "time_s": time.perf_counter() - t0}
        scheduler.step()
        history.append(row)
        if rt.main:
            if val_auroc > best["auroc"]:  # model selection on the validation fold only
                best = {"auroc": val_auroc, "epoch": epoch + 1}
                save_checkpoint({"stage": "cls", "member": name, "model": model.state_dict(), "epoch": epoch,
                                 "image_size": size, "val_auroc": val_auroc}, run / f"member_{name}.pt")
            save_checkpoint({"stage": "cls", "member": name, "epoch": epoch, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "best": best, "history": history,
                             "rng": rng_state()}, last)
        log(rt, f"{name} epoch {epoch + 1}/{epochs}  loss {stats['train_loss']:.4f}  val AUROC {val_auroc:.4f}  "
                f"best {best['auroc']:.4f} (epoch {best['epoch']})  {stats['img_per_s']:.1f} img/s  "
                f"{row['time_s']:.0f} s")
        broadcast(None, rt)  # nobody reads a checkpoint before rank 0 has written it
    record_sync(model, name, run, rt)
    return history


def bce(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (for the validation curve)."""
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def assemble_dernet(cfg: TrainConfig, splits: Splits, cache: ImageCache, run: Path, rt: Runtime):
    """Eq. 2: the members' best epochs fused by weighted soft voting. τ_optimal (Algorithm 1, line 17)
    by Youden's J on the validation fold, for DERNet and for each member (Table 2 rows); optionally Ω
    refitted on the same fold. Saved as dernet.pt with Ω, τ, image sizes and preprocessing."""
    members = {}
    for name in MEMBERS:
        member = Member(name)
        member.load_state_dict(load_checkpoint(run / f"member_{name}.pt", "cls")["model"])
        members[name] = member
    sizes = member_sizes(cfg)
    preprocess = {"clahe_clip_limit": cache.hyp.clahe_clip, "clahe_tile_grid": cache.hyp.clahe_tiles,
                  "clahe_side": cache.hyp.clahe_side, "low_band": cache.hyp.low_band}
    dernet = DERNet(members, omega=OMEGA, image_sizes=sizes, preprocess=preprocess).to(rt.device)
    val_ds = ClassificationDataset(splits.val, max(sizes.values()), cache)  # each member resizes down (Eq. 2)
    val_probs = predict_probs(dernet_prob_fn(dernet), val_ds, cfg, rt, cfg.cls_batch)  # (N, 3)
    y = val_ds.labels
    choice = {"omega_paper": list(OMEGA)}
    if cfg.fit_omega:
        omega = fit_omega(y, val_probs)
        choice.update(omega_fitted=omega.tolist(), val_auroc_paper=auroc(y, val_probs @ np.array(OMEGA)),
                      val_auroc_fitted=auroc(y, val_probs @ omega))
        dernet.set_omega(omega.tolist())
    omega = dernet.omega.cpu().numpy().astype(np.float64)
    dernet.tau = youden_threshold(y, val_probs @ omega)
    taus = {MEMBER_NAMES[n]: youden_threshold(y, val_probs[:, k]) for k, n in enumerate(MEMBERS)}
    taus["DERNet"] = dernet.tau
    if cfg.fit_omega:
        taus["DERNet (paper Ω)"] = youden_threshold(y, val_probs @ np.array(OMEGA))
    if rt.main:
        save_dernet(dernet.cpu(), run / "dernet.pt")
    broadcast(None, rt)
    return dernet.to(rt.device), taus, choice


def cls_scores(probs: np.ndarray, omega, with_paper: bool) -> dict:
    """{Table 2 row name: scores (N,)} from member probabilities (N, 3)."""
    scores = {MEMBER_NAMES[n]: probs[:, k] for k, n in enumerate(MEMBERS)}
    scores["DERNet"] = probs @ np.asarray(omega, np.float64)  # Eq. 2
    if with_paper:
        scores["DERNet (paper Ω)"] = probs @ np.array(OMEGA)
    return scores


def report_cls(cfg: TrainConfig, dernet: DERNet, taus: dict, choice: dict, splits: Splits, cache: ImageCache,
               run: Path, rt: Runtime, histories: dict) -> dict:
    """The test split, touched once: predictions.csv, metrics.json, report.md (Table 2 with study-level
    bootstrap CIs and paired tests), roc.png and training_curves.png."""
    test_ds = ClassificationDataset(splits.test, max(dernet.image_sizes.values()), cache)
    probs = predict_probs(dernet_prob_fn(dernet), test_ds, cfg, rt, cfg.cls_batch)  # (N, 3)
    if not rt.main:
        return {}
    y, studies = test_ds.labels, np.array([r.study_id for r in splits.test])
    scores = cls_scores(probs, dernet.omega.cpu().numpy(), cfg.fit_omega)
    summary = summarize_classification(y, scores, taus, studies, B=cfg.bootstrap, seed=cfg.seed)
    rows = [[r.image_id, r.study_id, int(r.label), *(f"{p:.6f}" for p in probs[i]), f"{scores['DERNet'][i]:.6f}",
             int(scores["DERNet"][i] > dernet.tau)] for i, r in enumerate(splits.test)]
    write_csv(run / "predictions.csv", ["image_id", "study_id", "label", *(f"p_{n}" for n in MEMBERS),
                                        "score", "decision"], rows)
    metrics = {"test": summary, "omega": dernet.omega.tolist(), "tau": dernet.tau, "omega_choice": choice,
               "best_epochs": {n: max(h, key=lambda r: r["val_auroc"])["epoch"] for n, h in histories.items()},
               "val_size": len(splits.val), "train_size": len(splits.train)}
    write_json(run / "metrics.json", metrics)
    plot_roc_curves(y, scores, run / "roc.png", taus)
    plot_member_curves(histories, run / "training_curves.png")
    write_text(run / "report.md", cls_report(cfg, metrics, summary, splits))
    return metrics


def plot_member_curves(histories: dict, path) -> Path:
    """Training loss, validation loss and validation AUROC per epoch, one line per member."""
    fig = Figure(figsize=(12, 3.2))
    for k, key in enumerate(("train_loss", "val_loss", "val_auroc")):
        ax = fig.add_subplot(1, 3, k + 1)
        for name, hist in histories.items():
            ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], marker=".", label=MEMBER_NAMES[name])
        ax.set(title=key, xlabel="epoch")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def cls_report(cfg: TrainConfig, metrics: dict, summary: dict, splits: Splits) -> str:
    omega = ", ".join(f"{w:.2f}" for w in metrics["omega"])
    data = cfg.data or f"synthetic VinDr-format set ({cfg.synthetic_dir}, demo settings)"
    lines = ["# Phase I — DERNet triage (Table 2)", "",
             f"Data: {data}; fold {cfg.fold} of {cfg.n_folds} for validation ({len(splits.val)} images), "
             f"{len(splits.train)} training images, test split {len(splits.test)} images (used once, here).",
             f"Members trained {cfg.cls_epochs} epochs at {sizes_text(cfg)}, AdamW η = {cfg.lr:g}, cosine "
             f"annealing; best epoch by validation AUROC: "
             + ", ".join(f"{MEMBER_NAMES[n]} {e}" for n, e in metrics["best_epochs"].items()) + ".",
             f"Ensemble: Ω = [{omega}] (Eq. 2), τ = {metrics['tau']:.4f} (Youden's J on validation).", ""]
    if cfg.fit_omega:
        c = metrics["omega_choice"]
        lines += [f"Ω refitted on validation: {c['omega_fitted']} (validation AUROC {c['val_auroc_fitted']:.4f}) "
                  f"vs the paper's {c['omega_paper']} ({c['val_auroc_paper']:.4f}).", ""]
    lines += [render_table2(summary), "", "## Paired comparisons (test split)", "", render_paired_tests(summary), "",
              "Plots: roc.png (ROC with operating points), training_curves.png."]
    return "\n".join(lines) + "\n"


def write_csv(path, header: Sequence[str], rows) -> Path:
    def write(tmp: Path):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return atomic_write(path, write)


def run_cls(cfg: TrainConfig, root: Path, run: Path, rt: Runtime) -> dict:
    """Phase I on one fold: each member in turn (Algorithm 1, line 1), then the ensemble and the report."""
    splits = load_splits(cfg, root, cfg.fold)
    cache = ImageCache(cfg.cache_dir, hyp=data_config(cfg))
    log(rt, f"Phase I, fold {cfg.fold}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
            f"images, {cfg.cls_epochs} epochs at {sizes_text(cfg)} on {rt.device} x{rt.world}")
    histories = {name: train_member(name, cfg, splits, cache, run, rt) for name in MEMBERS}
    dernet, taus, choice = assemble_dernet(cfg, splits, cache, run, rt)
    return report_cls(cfg, dernet, taus, choice, splits, cache, run, rt, histories)


# --- Phase II: YOLO11 detection with mosaic decay (Algorithm 1, lines 8-15); YOLO11-seg (Fig. 4c)


class ModelEMA:
    """Exponential moving average of the weights, used for evaluation (REFERENCE §3):
    ema = d * ema + (1 - d) * w after every optimizer step, with d = decay * (1 - exp(-updates / τ))
    ramped up so that early on the average follows the quickly changing weights (reference family)."""

    def __init__(self, model: nn.Module, decay: float, tau: float):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        weights = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:  # parameters and BN statistics; not the BN batch counters
                v.mul_(d).add_(weights[k].detach(), alpha=1 - d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution weights only; none on BatchNorm weights and biases (reference family)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
                (no_decay if bn or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def det_lr(iteration: int, batches_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of one iteration (a pure function of it, so resuming needs no scheduler state):
    1. cosine decay from η to final_lr_ratio · η over the epochs (fractional epoch = iteration / nb),
    2. times a linear warm-up from 0 over the first warmup_epochs."""
    epoch = iteration / batches_per_epoch
    cosine = 1 + (cfg.final_lr_ratio - 1) * (1 - math.cos(math.pi * epoch / cfg.det_epochs)) / 2  # 1.
    warmup = max(round(cfg.warmup_epochs * batches_per_epoch), 1)
    return cfg.lr * cosine * min(1.0, (iteration + 1) / warmup)  # 2.


def build_detector(cfg: TrainConfig, seg: bool) -> nn.Module:
    """YOLO11 (or YOLO11-seg) for the 7 lesion classes; seg may start from a detection checkpoint."""
    if seg and cfg.init_from:
        ckpt = load_checkpoint(cfg.init_from, "det", len(CLASSES))
        if ckpt["scale"] != cfg.scale:
            raise CheckpointError(f"{cfg.init_from}: a YOLO11-{ckpt['scale']} checkpoint, this run is --scale {cfg.scale}")
        return seg_from_det(ckpt["model"], len(CLASSES), cfg.scale)
    return (YOLO11Seg if seg else YOLO11)(nc=len(CLASSES), scale=cfg.scale)


def det_epoch(model, ema: ModelEMA, loader, optimizer, scaler, loss_fn, cfg: TrainConfig, rt: Runtime,
              epoch: int, accumulate: int, seg: bool, desc: str) -> dict:
    """One epoch of Algorithm 1, line 14: Eq. 4 on each micro-batch, gradients accumulated over
    `accumulate` micro-batches (nominal batch 64 across all ranks), then AdamW and the EMA update."""
    model.train()
    nb, window = len(loader), cfg.det_batch * accumulate  # images per optimizer step on this rank
    names = ("box", "cls", "dfl", "mask")[: 4 if seg else 3]
    sums, seen, bad, t0 = torch.zeros(len(names)), 0, 0, time.perf_counter()
    bar = progress(loader, rt, cfg, desc=desc, total=nb)
    for i, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = det_lr(epoch * nb + i, nb, cfg)
        imgs = batch["img"].to(rt.device, non_blocking=True)  # (B, 3, S, S)
        targets = batch["targets"].to(rt.device)  # (N, 6) [batch_idx, cls, x1, y1, x2, y2]
        step = (i + 1) % accumulate == 0 or i + 1 == nb
        with model.no_sync() if rt.world > 1 and not step else contextlib.nullcontext():
            with torch.autocast(rt.device.type, enabled=rt.amp):
                preds = model(imgs)
            if seg:
                loss, items = loss_fn(preds, targets, batch["masks"].to(rt.device), imgs.shape[-1])
            else:
                loss, items = loss_fn(preds, targets, imgs.shape[-1])  # Eq. 4 (× batch size, losses.py)
            if not all_finite(loss, rt):
                bad = skip_bad_step(optimizer, bad, cfg, rt)  # drops this accumulation window
                continue
            bad = 0
            scaler.scale(loss / window).backward()  # image-weighted mean over the window (DDP averages ranks)
        if step:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(unwrap(model))
        sums, seen = sums + items.cpu() * len(imgs), seen + len(imgs)
        bar.set_postfix(**{k: f"{v:.3f}" for k, v in zip(names, sums / seen)},
                        img_s=f"{seen * rt.world / (time.perf_counter() - t0):.1f}")
    means = (sums / max(seen, 1)).tolist()
    return {**{f"train_{k}": v for k, v in zip(names, means)}, "img_per_s": seen * rt.world / (time.perf_counter() - t0)}


class PackedMasks(Mapping):
    """{image_id: (N, h, w) bool} stored bit-packed (8x smaller), unpacked one image at a time."""

    def __init__(self):
        self.data = {}

    def add(self, image_id, masks: np.ndarray):
        self.data[image_id] = (np.packbits(masks, axis=-1), masks.shape)

    def __getitem__(self, image_id):
        packed, shape = self.data[image_id]
        return np.unpackbits(packed, axis=-1, count=shape[-1]).astype(bool).reshape(shape)

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def image_region(orig_hw, size: int) -> tuple[slice, slice]:
    """Rows and columns of the letterboxed input that hold the image (not the padding)."""
    _, (new_h, new_w), (pad_x, pad_y) = letterbox_geometry(orig_hw, size)
    return slice(pad_y, pad_y + new_h), slice(pad_x, pad_x + new_w)


@torch.no_grad()
def predict_detections(model: nn.Module, dataset: DetectionDataset, cfg: TrainConfig, rt: Runtime, seg: bool):
    """Detections {image_id: (N, 6) [x1, y1, x2, y2, score, cls]} in original pixels (NMS IoU 0.5,
    Algorithm 1 line 18; ≤ 100 per image), and for seg the instance masks in the letterboxed image
    region (PackedMasks). Sharded over ranks and gathered."""
    shard = EvalShard(len(dataset), rt)
    loader = make_loader(dataset, cfg.det_batch, shard, resolve_workers(cfg, rt), collate_detection)
    model.eval()
    dets, masks = {}, PackedMasks()
    for batch in progress(loader, rt, cfg, desc="evaluate"):
        imgs = batch["img"].to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, enabled=rt.amp):
            out = model(imgs)
        pred, protos = out if seg else (out, None)  # (B, 4 + nc [+ 32], A)
        results = non_max_suppression(pred.float(), cfg.eval_conf, cfg.nms_iou, cfg.max_det, nm=32 if seg else 0)
        for b, r in enumerate(results):
            image_id, orig_hw = batch["image_ids"][b], batch["orig_hw"][b]
            boxes = boxes_from_letterbox(r[:, :4].cpu().numpy(), batch["ratio"][b], batch["pad"][b], orig_hw)
            dets[image_id] = np.concatenate([boxes, r[:, 4:6].cpu().numpy()], 1).astype(np.float64)
            if seg:
                m = process_masks(protos[b].float(), r[:, 6:], r[:, :4], imgs.shape[-2:])  # (N, S, S)
                rows, cols = image_region(orig_hw, imgs.shape[-1])
                masks.add(image_id, m[:, rows, cols].cpu().numpy())
    merged_dets, merged_masks = {}, PackedMasks()
    for d, m in all_gather((dets, masks.data if seg else {}), rt):
        merged_dets.update(d)
        merged_masks.data.update(m)
    return merged_dets, (merged_masks if seg else None)


class GroundTruthMasks(Mapping):
    """Ground-truth instance masks of a DetectionDataset in the same frame as the predictions
    (letterboxed image region), loaded one image at a time."""

    def __init__(self, dataset: DetectionDataset):
        self.dataset, self.index = dataset, {r.image_id: i for i, r in enumerate(dataset.records)}

    def __getitem__(self, image_id):
        i = self.index[image_id]
        sample = self.dataset.load_sample(i)
        rows, cols = image_region(self.dataset._orig_hw[i], self.dataset.imgsz)
        return sample.masks[:, rows, cols].astype(bool)

    def __iter__(self):
        return iter(self.index)

    def __len__(self):
        return len(self.index)


def ground_truth(records) -> dict:
    return {r.image_id: (r.boxes, r.classes) for r in records}


def evaluate_detector(model, dataset, cfg: TrainConfig, rt: Runtime, seg: bool):
    """Box AP (and mask AP, Dice) with the VinDr-SpineXR protocol on one split, and the predictions:
    (box metrics, mask metrics | None, detections, masks | None); the metrics on rank 0 only."""
    dets, masks = predict_detections(model, dataset, cfg, rt, seg)
    if not rt.main:
        return {}, None, dets, masks
    box = evaluate_detections(dets, ground_truth(dataset.records), len(CLASSES), max_dets=cfg.max_det)
    mask = None
    if seg:
        mask = evaluate_masks(dets, masks, ground_truth(dataset.records), GroundTruthMasks(dataset),
                              len(CLASSES), max_dets=cfg.max_det)
    return box, mask, dets, masks


def detector_checkpoint(model: nn.Module, cfg: TrainConfig, seg: bool, epoch: int, val: dict) -> dict:
    """What inference needs: weights (EMA), scale, classes, input size, strides and preprocessing."""
    return {"stage": "seg" if seg else "det", "model": model.state_dict(), "scale": cfg.scale, "nc": len(CLASSES),
            "names": list(CLASSES), "lt_codes": list(LT_CODES), "imgsz": cfg.det_imgsz,
            "strides": [8, 16, 32], "epoch": epoch, "val_map50": val.get("map50", float("nan")),
            "preprocess": {"clahe_clip_limit": DataConfig.clahe_clip, "clahe_tile_grid": DataConfig.clahe_tiles,
                           "clahe_side": cfg.clahe_side, "low_band": cfg.low_band, "pad_value": DataConfig.pad_value}}


def train_detector(cfg: TrainConfig, splits: Splits, cache: ImageCache, run: Path, rt: Runtime, seg: bool) -> list:
    """Algorithm 1, lines 8-15. Mosaic while epoch < τ_mosaic (lines 9-10), plain images after
    (line 12, distribution alignment); Eq. 4 (line 14); best epoch by validation mAP@0.5."""
    stage = "seg" if seg else "det"
    train_ds = DetectionDataset(splits.train, cfg.det_imgsz, cache, augment=True, seed=cfg.seed, masks=seg)
    val_ds = DetectionDataset(splits.val, cfg.det_imgsz, cache, masks=seg)
    seed_everything(cfg.seed)
    model = build_detector(cfg, seg).to(rt.device)
    ddp_model = wrap_ddp(model, rt, cfg.sync_bn)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
    accumulate = max(round(cfg.nominal_batch / (cfg.det_batch * rt.world)), 1)  # REFERENCE §3
    weight_decay = cfg.det_weight_decay * cfg.det_batch * rt.world * accumulate / cfg.nominal_batch
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=cfg.lr)  # Algorithm 1: AdamW, η
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp)
    loss_cfg = LossConfig(cls_loss=cfg.cls_loss)
    loss_fn = (SegmentationLoss if seg else DetectionLoss)(len(CLASSES), model.reg_max, (8, 16, 32), loss_cfg)
    if cfg.repeat_threshold > 0:  # class imbalance (Sec. 3.1): repeat-factor sampling on top of focal loss
        sampler = RepeatFactorSampler(repeat_factors(splits.train, cfg.repeat_threshold), cfg.seed, rt)
    else:
        sampler = DistributedSampler(train_ds, rt.world, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = make_loader(train_ds, cfg.det_batch, sampler, resolve_workers(cfg, rt), collate_detection)
    start, best, history = 0, {"map50": -1.0, "epoch": -1}, []
    last = run / "last.pt"
    if last.exists():  # --resume
        ckpt = load_checkpoint(last, stage, len(CLASSES))
        model.load_state_dict(ckpt["model"])
        ema.ema.load_state_dict(ckpt["ema"])
        ema.updates = ckpt["ema_updates"]
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        log(rt, f"resuming at epoch {start + 1}/{cfg.det_epochs}")
    log(rt, f"YOLO11-{cfg.scale}{'-seg' if seg else ''} at {cfg.det_imgsz} px, batch {cfg.det_batch} x {rt.world} rank(s) "
            f"x {accumulate} accumulation, {len(train_ds)} train / {len(val_ds)} val images, "
            f"{'repeat-factor sampling t=' + str(cfg.repeat_threshold) if cfg.repeat_threshold > 0 else 'uniform sampling'}, "
            f"{cfg.cls_loss} classification loss")
    for epoch in range(start, cfg.det_epochs):
        seed_everything(cfg.seed, epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        train_ds.mosaic = epoch + 1 < cfg.tau_mosaic  # Algorithm 1, lines 9-13, with t = epoch + 1
        t0 = time.perf_counter()
        stats = det_epoch(ddp_model, ema, loader, optimizer, scaler, loss_fn, cfg, rt, epoch, accumulate, seg,
                          f"{stage} {epoch + 1}/{cfg.det_epochs}")
        box, mask, _, _ = evaluate_detector(ema.ema, val_ds, cfg, rt, seg)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats,
               "val_map50": box.get("map50"), "val_map50_95": box.get("map50_95"), "mosaic": float(train_ds.mosaic),
               "time_s": time.perf_counter() - t0}
        if seg and mask is not None:
            row.update(val_mask_map50=mask["map50"], val_dice=mask["dice_matched"])
        history.append(row)
        if rt.main:
            score = box["map50"] if math.isfinite(box["map50"]) else 0.0
            if score > best["map50"]:  # model selection on the validation fold only
                best = {"map50": score, "epoch": epoch + 1}
                save_checkpoint(detector_checkpoint(ema.ema, cfg, seg, epoch, box), run / "best.pt")
            save_checkpoint({"stage": stage, "nc": len(CLASSES), "scale": cfg.scale, "epoch": epoch,
                             "model": model.state_dict(), "ema": ema.ema.state_dict(), "ema_updates": ema.updates,
                             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best": best,
                             "history": history, "rng": rng_state()}, last)
            extra = f"  mask mAP@0.5 {mask['map50']:.4f}" if seg else ""
            log(rt, f"{stage} epoch {epoch + 1}/{cfg.det_epochs}  " + "  ".join(
                f"{k[6:]} {v:.3f}" for k, v in stats.items() if k.startswith("train_"))
                + f"  val mAP@0.5 {box['map50']:.4f}{extra}  best {best['map50']:.4f} (epoch {best['epoch']})  "
                  f"{'mosaic  ' if train_ds.mosaic else ''}{stats['img_per_s']:.1f} img/s  {row['time_s']:.0f} s")
        broadcast(None, rt)
    record_sync(model, stage, run, rt)
    return history


def plot_predictions(dataset: DetectionDataset, dets: dict, path, n: int = 6, score_thres: float = 0.25) -> Path:
    """A few images (abnormal first) with ground truth (green) and detections with score >= score_thres (red)."""
    order = sorted(range(len(dataset)), key=lambda i: -dataset.records[i].label)[:n]
    fig = Figure(figsize=(3.2 * len(order), 4))
    for k, i in enumerate(order):
        r = dataset.records[i]
        img, meta = dataset.cache.get(r.path, dataset.imgsz)  # (h, w) uint8, long side imgsz
        sx, sy = img.shape[1] / meta.width, img.shape[0] / meta.height  # original px -> shown px
        ax = fig.add_subplot(1, len(order), k + 1)
        ax.imshow(img, cmap="gray")
        for x1, y1, x2, y2 in r.boxes:
            ax.add_patch(Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy, fill=False, ec="lime", lw=1))
        for x1, y1, x2, y2, score, c in dets.get(r.image_id, np.zeros((0, 6))):
            if score >= score_thres:
                ax.add_patch(Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy, fill=False, ec="red", lw=1))
                ax.text(x1 * sx, y1 * sy, f"{LT_CODES[int(c)]} {score:.2f}", color="red", fontsize=6, va="bottom")
        ax.set_title(f"{r.image_id[:8]} ({'abnormal' if r.label else 'normal'})", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"ground truth (green), detections with score >= {score_thres} (red)", fontsize=9)
    return _save_figure(fig, path)


def plot_masks(dataset: DetectionDataset, dets: dict, masks: Mapping, path, n: int = 4, score_thres: float = 0.25) -> Path:
    """Side by side per abnormal image: the image, its ground-truth masks, the predicted masks (score >= score_thres)."""
    order = [i for i in range(len(dataset)) if dataset.records[i].label][:n]
    gt = GroundTruthMasks(dataset)
    fig = Figure(figsize=(9, 3 * max(len(order), 1)))
    for k, i in enumerate(order):
        image_id = dataset.records[i].image_id
        sample = dataset.load_sample(i)
        rows, cols = image_region(dataset._orig_hw[i], dataset.imgsz)
        keep = dets[image_id][:, 4] >= score_thres
        panels = (("image", None), ("ground truth", gt[image_id]), ("prediction", masks[image_id][keep]))
        for j, (title, m) in enumerate(panels):
            ax = fig.add_subplot(len(order), 3, 3 * k + j + 1)
            ax.imshow(sample.img[rows, cols], cmap="gray")
            if m is not None and len(m):
                ax.imshow(np.ma.masked_equal(m.any(0).astype(np.uint8), 0), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f"{image_id[:8]} {title}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _save_figure(fig, path)


def det_report(cfg: TrainConfig, metrics: dict, splits: Splits, seg: bool) -> str:
    data = cfg.data or f"synthetic VinDr-format set ({cfg.synthetic_dir}, demo settings)"
    kind = "YOLO11-seg" if seg else "YOLO11"
    lines = [f"# Phase II — {kind}-{cfg.scale.upper()} lesion {'segmentation' if seg else 'detection'} (Table 3)", "",
             f"Data: {data}; fold {cfg.fold} of {cfg.n_folds} for validation ({len(splits.val)} images), "
             f"{len(splits.train)} training images, test split {len(splits.test)} images (used once, here).",
             f"{cfg.det_epochs} epochs at {cfg.det_imgsz} px, batch {cfg.det_batch}, nominal batch {cfg.nominal_batch}, "
             f"AdamW η = {cfg.lr:g}, mosaic while epoch < τ_mosaic = {cfg.tau_mosaic}; EMA weights of the best "
             f"validation epoch ({metrics['best_epoch']}, validation mAP@0.5 {_pct(metrics['val_map50'])}).",
             f"Class imbalance: {cfg.cls_loss} classification loss (Eq. 6), {metrics['sampling']} sampling. "
             f"NMS IoU {cfg.nms_iou} (Algorithm 1, line 18).", "",
             render_table3(metrics["test"]), ""]
    if seg:
        lines += ["## Masks (test split; mask IoU computed in the network-input frame)", "",
                  render_mask_table(metrics["test"], metrics["test_mask"]), ""]
    lines += ["Plots: pr_curves.png, predictions.png (validation images)"
              + (", masks.png (validation images)" if seg else "") + ", training_curves.png."]
    return "\n".join(lines) + "\n"


def report_det(cfg: TrainConfig, splits: Splits, cache: ImageCache, run: Path, rt: Runtime, seg: bool,
               history: list) -> dict:
    """The test split, touched once, with the best-on-validation EMA weights: detections.csv,
    ground_truth.csv, metrics.json, report.md (Table 3), PR curves, example predictions, curves."""
    ckpt = load_checkpoint(run / "best.pt", "seg" if seg else "det", len(CLASSES))
    model = (YOLO11Seg if seg else YOLO11)(nc=len(CLASSES), scale=cfg.scale).to(rt.device)
    model.load_state_dict(ckpt["model"])
    test_ds = DetectionDataset(splits.test, cfg.det_imgsz, cache, masks=seg)
    val_ds = DetectionDataset(splits.val, cfg.det_imgsz, cache, masks=seg)
    box, mask, dets, _ = evaluate_detector(model, test_ds, cfg, rt, seg)
    _, _, val_dets, val_masks = evaluate_detector(model, val_ds, cfg, rt, seg)
    if not rt.main:
        return {}
    write_csv(run / "detections.csv", ["image_id", "class", "lt_code", "score", "x1", "y1", "x2", "y2"],
              [[i, CLASSES[int(c)], LT_CODES[int(c)], f"{s:.5f}", *(f"{v:.1f}" for v in (x1, y1, x2, y2))]
               for i, d in dets.items() for x1, y1, x2, y2, s, c in d])
    write_csv(run / "ground_truth.csv", ["image_id", "class", "lt_code", "x1", "y1", "x2", "y2"],
              [[r.image_id, CLASSES[c], LT_CODES[c], *(f"{v:.1f}" for v in b)]
               for r in splits.test for b, c in zip(r.boxes, r.classes)]
              + [[r.image_id, NO_FINDING, "", "", "", "", ""] for r in splits.test if not r.label])
    metrics = {"test": box, "test_mask": mask, "best_epoch": ckpt["epoch"] + 1, "val_map50": ckpt["val_map50"],
               "sampling": f"repeat-factor (t = {cfg.repeat_threshold})" if cfg.repeat_threshold > 0 else "uniform",
               "cls_loss": cfg.cls_loss, "train_size": len(splits.train), "val_size": len(splits.val)}
    write_json(run / "metrics.json", metrics)
    plot_pr_curves(box, [f"{lt} {c}" for lt, c in zip(LT_CODES, CLASSES)], run / "pr_curves.png")
    plot_training_curves(history, run / "training_curves.png")
    plot_predictions(val_ds, val_dets, run / "predictions.png")
    if seg:
        plot_masks(val_ds, val_dets, val_masks, run / "masks.png")
    write_text(run / "report.md", det_report(cfg, metrics, splits, seg))
    return metrics


def run_det(cfg: TrainConfig, root: Path, run: Path, rt: Runtime, seg: bool) -> dict:
    """Phase II on one fold: train YOLO11 (or YOLO11-seg), then the test report."""
    splits = load_splits(cfg, root, cfg.fold)
    cache = ImageCache(cfg.cache_dir, hyp=data_config(cfg))
    history = train_detector(cfg, splits, cache, run, rt, seg)
    return report_det(cfg, splits, cache, run, rt, seg, history)


# --- all five folds: mean ± std of the test metrics


def fold_summary(stage: str, results: list[dict]) -> tuple[dict, str]:
    """Mean ± std over folds of the test metrics (Table 2 rows, or Table 3 AP@0.5 per class and mAP)."""
    if stage == "cls":
        names = list(results[0]["test"]["models"])
        table = {n: {k: [r["test"]["models"][n][k] for r in results] for k in TABLE2_KEYS} for n in names}
        rows = [[n] + [f"{_pct(np.mean(v))} ± {_pct(np.std(v))}" for v in table[n].values()] for n in names]
        return table, _md_table(TABLE2_HEADER, rows)
    ap = np.array([r["test"]["ap50"] for r in results], np.float64)  # (folds, C)
    maps = np.array([r["test"]["map50"] for r in results], np.float64)
    row = ["YOLO11 (mean ± std)"] + [f"{_pct(m)} ± {_pct(s)}" for m, s in zip(np.nanmean(ap, 0), np.nanstd(ap, 0))]
    row += [f"{_pct(maps.mean())} ± {_pct(maps.std())}"]
    return {"ap50": ap.tolist(), "map50": maps.tolist()}, _md_table(TABLE3_HEADER, [row])


# --- command line


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description="Algorithm 1: Phase I (DERNet triage, --stage cls) and Phase II (YOLO11 detection, --stage det; "
                    "YOLO11-seg, --stage seg). Without --data: the synthetic VinDr-format set and CPU demo settings.")
    p.add_argument("--stage", choices=("cls", "det", "seg"), default=d.stage)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="VinDr-SpineXR root (annotations/, train_images/, test_images/); the paper's "
                                  "settings become the defaults")
    g.add_argument("--fold", type=int, default=d.fold, help="validation fold 0-4 inside the training split")
    g.add_argument("--folds", choices=("all",), help="'all': run the five folds and report mean ± std")
    g.add_argument("--cache-dir", default=d.cache_dir, help="decoded-image cache")
    g.add_argument("--clahe-side", type=int, help=f"long side CLAHE (Eq. 1) runs at before each input is shrunk "
                                                  f"(default {d.clahe_side}; demo {DEMO_CLAHE_SIDE})")
    g.add_argument("--low-band", action=argparse.BooleanOptionalAction,
                   help="DICOMs through the 5/3 wavelet low band before the working side, which the fast JPEG "
                        "2000 decode returns exactly (default: on; --no-low-band: area average only)")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader processes (-1: 0 on CPU, 8 on CUDA)")
    g.add_argument("--train-images", type=int, help="use a seeded subset of whole studies, about this many images "
                                                    "of the training split (default: all; detection demo: 400)")
    g = p.add_argument_group("optimisation (default: the paper's values, or the demo's without --data)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch", type=int, help="per-process batch size")
    g.add_argument("--imgsz", type=int, help="input size (cls: member input; det/seg: letterbox side, multiple of 32)")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate (paper: {d.lr:g}; det/seg demo: 1e-3)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("Phase I (cls)")
    g.add_argument("--pretrained", help="folder with torchvision ImageNet files densenet121-*.pth, "
                                        "efficientnet_v2_s-*.pth, resnet50-*.pth (never downloaded)")
    g.add_argument("--fit-omega", action="store_true", help="refit Ω on the validation fold (reported beside the paper's)")
    g.add_argument("--member-imgsz", nargs="+", metavar="NAME=SIZE",
                   help=f"per-member input size, e.g. resnet50=448 (members: {', '.join(MEMBERS)})")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="radiograph-safe augmentation (default: on; off in the 6-epoch demo)")
    g.add_argument("--fast-decode-p", type=float, default=d.cls_fast_decode_p,
                   help="probability that a training image is read through the reduced JPEG 2000 decode "
                        "infer.py --fast-decode uses (0: never)")
    g = p.add_argument_group("Phase II (det, seg)")
    g.add_argument("--scale", choices=("n", "s", "m", "l", "x"), help="YOLO11 scale (paper: l)")
    g.add_argument("--tau-mosaic", type=int, help="mosaic while epoch < τ_mosaic (Algorithm 1; paper: 25)")
    g.add_argument("--cls-loss", choices=("focal", "bce"), default=d.cls_loss, help="Eq. 6 focal, or BCE")
    g.add_argument("--repeat-threshold", type=float, default=d.repeat_threshold,
                   help="repeat-factor sampling threshold (0 = off; the VinDr baseline used 0.1)")
    g.add_argument("--nominal-batch", type=int, help=f"gradient accumulation target (paper: {d.nominal_batch}; demo: none)")
    g.add_argument("--init-from", help="seg: a det checkpoint (best.pt) to start from")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="runs root: runs/<stage>/<name>")
    g.add_argument("--name", help="run folder name (default: a timestamp)")
    g.add_argument("--resume", nargs="?", const="latest", help="continue a run folder (default: the latest unfinished)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    g.add_argument("--precision", choices=("auto", "fp32"), default=d.precision,
                   help="auto: AMP on CUDA, bf16 for the DERNet members on a CPU with native bf16; fp32: none")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun ranks")
    g.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples for the 95%% CIs")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults: the paper's settings with --data, the CPU demo on the synthetic set without; flags win.
    --resume restores the run's own config.json (so a resumed run cannot drift from the original)."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"  # torchrun --max-restarts
    resume = args.resume or ((str(Path(args.out) / args.stage / args.name) if args.name else "latest") if restarted else None)
    if resume:
        run = latest_run(Path(args.out) / args.stage) if resume == "latest" else Path(resume)
        saved = run / "config.json"
        if not saved.is_file():
            raise CheckpointError(f"{run}: not a run folder (no config.json) to resume")
        older = {"clahe_side": None, "cls_fast_decode_p": 0.0,   # older runs: CLAHE at input size, full decode
                 "low_band": False}                                # only, area average only
        cfg = TrainConfig(**{**older, **json.loads(saved.read_text())})
        return replace(cfg, resume=str(run), device=args.device, workers=args.workers, progress=not args.no_progress)
    cfg = TrainConfig(stage=args.stage)
    if args.data is None:
        cfg = replace(cfg, **DEMO[args.stage])
    stage_keys = {"epochs": "cls_epochs", "batch": "cls_batch", "imgsz": "cls_imgsz"} if args.stage == "cls" else \
                 {"epochs": "det_epochs", "batch": "det_batch", "imgsz": "det_imgsz"}
    flags = {stage_keys[k]: getattr(args, k) for k in stage_keys if getattr(args, k) is not None}
    flags.update({k: getattr(args, k) for k in ("scale", "tau_mosaic", "init_from", "pretrained", "name", "lr",
                                                "nominal_batch", "train_images", "clahe_side")
                  if getattr(args, k) is not None})
    if args.augment is not None:
        flags["cls_augment"] = args.augment
    if args.low_band is not None:
        flags["low_band"] = args.low_band
    if args.member_imgsz:
        flags["member_imgsz"] = parse_member_sizes(args.member_imgsz)
    cfg = replace(cfg, **flags, data=args.data, fold=args.fold, folds_all=args.folds == "all",
                  cache_dir=args.cache_dir, workers=args.workers, seed=args.seed,
                  fit_omega=args.fit_omega, cls_fast_decode_p=args.fast_decode_p,
                  cls_loss=args.cls_loss, repeat_threshold=args.repeat_threshold,
                  out=args.out, device=args.device, precision=args.precision, sync_bn=args.sync_bn,
                  bootstrap=args.bootstrap, progress=not args.no_progress)
    check_config(cfg)
    return cfg


def parse_member_sizes(items: list[str]) -> dict[str, int]:
    """['resnet50=448', ...] -> {'resnet50': 448}; unknown names and bad sizes are one-line errors."""
    sizes = {}
    for item in items:
        name, _, size = item.partition("=")
        if name not in MEMBERS or not size.isdigit() or int(size) < 1:
            raise DataError(f"--member-imgsz wants NAME=SIZE with NAME in {', '.join(MEMBERS)} and a positive "
                            f"size, got {item!r}")
        sizes[name] = int(size)
    return sizes


def check_config(cfg: TrainConfig):
    if not 0 <= cfg.fold < cfg.n_folds:
        raise DataError(f"--fold must be in 0..{cfg.n_folds - 1}, got {cfg.fold}")
    if cfg.stage != "cls" and cfg.det_imgsz % 32:
        raise DataError(f"--imgsz must be a multiple of 32 for YOLO11, got {cfg.det_imgsz}")
    if cfg.clahe_side is not None and cfg.clahe_side < 16:
        raise DataError(f"--clahe-side must be at least 16 px, got {cfg.clahe_side}")
    if not 0 <= cfg.cls_fast_decode_p <= 1:
        raise DataError(f"--fast-decode-p is a probability in [0, 1], got {cfg.cls_fast_decode_p:g}")
    if cfg.train_images < 0:
        raise DataError(f"--train-images must be positive (0 = all), got {cfg.train_images}")
    for key in ("cls_epochs", "det_epochs", "cls_batch", "det_batch", "cls_imgsz", "det_imgsz", "nominal_batch"):
        if getattr(cfg, key) < 1:
            raise DataError(f"--{key.split('_')[-1]} must be positive, got {getattr(cfg, key)}")
    if cfg.init_from and cfg.stage != "seg":
        raise DataError("--init-from is for --stage seg (a detection checkpoint to start from)")


def run_stage(cfg: TrainConfig, root: Path, run: Path, rt: Runtime) -> dict:
    if (run / "metrics.json").is_file():  # this fold finished before an interruption
        return json.loads((run / "metrics.json").read_text())
    if cfg.stage == "cls":
        return run_cls(cfg, root, run, rt)
    return run_det(cfg, root, run, rt, seg=cfg.stage == "seg")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    rt = init_runtime(cfg.device)
    try:
        configure_determinism(rt)
        t0 = time.perf_counter()
        root = dataset_root(cfg, rt)
        run = new_run_dir(cfg, rt)
        log(rt, f"run folder {run}")
        if cfg.folds_all:
            results = [run_stage(replace(cfg, fold=k), root, run / f"fold{k}", rt) for k in range(cfg.n_folds)]
            if rt.main:
                table, md = fold_summary(cfg.stage, results)
                write_text(run / "report.md", f"# {cfg.n_folds}-fold cross-validation, test split, mean ± std\n\n{md}\n\n"
                                              f"Per-fold reports: fold0/report.md ... fold{cfg.n_folds - 1}/report.md.\n")
                write_json(run / "metrics.json", {"folds": table})
        else:
            run_stage(cfg, root, run, rt)
        log(rt, f"done in {time.perf_counter() - t0:.0f} s; report: {run / 'report.md'}")
    finally:
        close_runtime(rt)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (DataError, CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is saved; continue with --resume", file=sys.stderr)
        sys.exit(130)
