"""Tests for train.py: Table 2 metrics (sklearn), study bootstrap, DeLong, VinDr/COCO AP (pycocotools), reports;
end-to-end tiny runs of every stage, SIGKILL + resume, 2-process torchrun, checkpoint errors, overfitting."""
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import f1_score, recall_score, roc_auc_score, roc_curve

import train
from data import Record

# --- classification metrics (Table 2)


def _scores(rng, n, signal=1.0, decimals=2):
    """Labels (n,) and scores with some separation; rounding makes ties, as real model outputs have."""
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    return y, np.round(s, decimals)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, "tie"])
def test_classification_metrics_equal_sklearn(seed, threshold):
    y, s = _scores(np.random.default_rng(seed), 300)
    tau = float(np.median(s)) if threshold == "tie" else threshold  # "tie": some scores equal τ
    m = train.classification_metrics(y, s, tau)
    pred = (s > tau).astype(int)  # Algorithm 1 line 17
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1), abs=1e-12)
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_points_equal_sklearn(seed):
    y, s = _scores(np.random.default_rng(seed), 200, decimals=1)  # many ties
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ours = train.roc_points(y, s)
    assert ours[0] == pytest.approx(fpr, abs=1e-12) and ours[1] == pytest.approx(tpr, abs=1e-12)


def test_decision_is_strict_and_single_class_is_an_error():
    m = train.classification_metrics([0, 1], [0.5, 0.5], threshold=0.5)
    assert m["sensitivity"] == 0 and m["specificity"] == 1  # S = τ is "normal"
    with pytest.raises(ValueError, match="normal and abnormal"):
        train.classification_metrics([1, 1], [0.2, 0.7], 0.5)


def test_study_bootstrap_draws_whole_studies():
    rng = np.random.default_rng(0)
    groups = rng.permutation(np.repeat(np.arange(40), rng.integers(1, 4, 40)))  # 1–3 images per study
    size = np.bincount(groups)
    for idx in train.study_bootstrap(groups, B=50, seed=3):
        per_image = np.bincount(idx, minlength=len(groups))  # times each image was drawn
        for study in range(40):
            drawn = per_image[groups == study]
            assert (drawn == drawn[0]).all()  # a study comes with all its images, or not at all
        assert np.sum(per_image / size[groups]) == pytest.approx(40)  # S studies drawn in all


def _table2_metrics(tau=0.5):
    return lambda y, s: train.classification_metrics(y, s, tau)


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(1)
    y, s = _scores(rng, 200)
    groups = np.arange(200) // 2
    ci = train.bootstrap_ci(y, s, groups, _table2_metrics(), B=300, seed=42)
    point = train.classification_metrics(y, s, 0.5)
    for key, (lo, hi) in ci.items():
        assert lo <= point[key] <= hi and lo < hi


def test_bootstrap_resamples_studies_not_images():
    """Each study = 3 identical images. Resampling studies must give exactly the CI of the
    one-image-per-study data (the metrics are invariant to copying every study 3 times);
    resampling images instead would pretend to have 3x the data and narrow the CI."""
    y, s = _scores(np.random.default_rng(2), 60)
    study = np.arange(60)
    ci_single = train.bootstrap_ci(y, s, study, _table2_metrics(), B=200, seed=7)
    y3, s3, study3 = np.repeat(y, 3), np.repeat(s, 3), np.repeat(study, 3)
    ci_study = train.bootstrap_ci(y3, s3, study3, _table2_metrics(), B=200, seed=7)
    ci_image = train.bootstrap_ci(y3, s3, np.arange(180), _table2_metrics(), B=200, seed=7)
    for key in ci_single:
        assert ci_study[key] == pytest.approx(ci_single[key], abs=1e-12)
    width_image, width_study = (ci["auroc"][1] - ci["auroc"][0] for ci in (ci_image, ci_study))
    assert width_image < 0.75 * width_study


def test_bootstrap_skips_single_class_resamples():
    y, s = np.r_[1, np.zeros(9, int)], np.linspace(0, 1, 10)  # one abnormal study: often not drawn
    samples = train.bootstrap_samples(y, s, np.arange(10), _table2_metrics(), B=100, seed=0)
    assert 0 < len(samples["auroc"]) < 100


def _delong_brute_force(y, scores):
    """DeLong et al. (1988) straight from the definitions: ψ(x, z) = 1 if x > z, ½ if equal."""
    x, z = scores[:, y == 1], scores[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    psi = np.array([[[1.0 if a > b else 0.5 if a == b else 0.0 for b in zk] for a in xk] for xk, zk in zip(x, z)])
    v10 = psi.mean(axis=2)  # (K, m)
    v01 = psi.mean(axis=1)  # (K, n)
    K = len(scores)

    def sample_cov(v, r, c):
        return np.sum((v[r] - v[r].mean()) * (v[c] - v[c].mean())) / (v.shape[1] - 1)

    s10 = np.array([[sample_cov(v10, r, c) for c in range(K)] for r in range(K)])
    s01 = np.array([[sample_cov(v01, r, c) for c in range(K)] for r in range(K)])
    return psi.mean(axis=(1, 2)), s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.r_[np.ones(9, int), np.zeros(13, int)])
    a = np.round(rng.random(22) + 0.4 * y, 1)  # ties within and across classes
    b = np.round(0.7 * a + 0.3 * rng.random(22), 1)  # correlated with a
    aucs, cov = train.delong_covariance(y, np.stack([a, b]))
    bf_aucs, bf_cov = _delong_brute_force(y, np.stack([a, b]))
    assert aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)], abs=1e-12)
    assert aucs == pytest.approx(bf_aucs, abs=1e-12)
    assert cov == pytest.approx(bf_cov, abs=1e-12)
    t = train.delong_test(y, a, b)
    z = (bf_aucs[0] - bf_aucs[1]) / math.sqrt(bf_cov[0, 0] + bf_cov[1, 1] - 2 * bf_cov[0, 1])
    assert t["z"] == pytest.approx(z, abs=1e-9)
    assert t["p"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(abs(z) / math.sqrt(2)))), abs=1e-9)


def test_paired_tests_identical_and_clearly_different_models():
    rng = np.random.default_rng(4)
    y, good = _scores(rng, 400, signal=2.0)
    bad = np.round(rng.random(400), 2)
    assert train.delong_test(y, good, good)["p"] == 1.0
    assert train.delong_test(y, good, bad)["p"] < 1e-6
    groups = np.arange(400) // 2
    sa = train.bootstrap_samples(y, good, groups, _table2_metrics(), B=200)
    sb = train.bootstrap_samples(y, bad, groups, _table2_metrics(), B=200)
    pa, pb = train.classification_metrics(y, good, 0.5), train.classification_metrics(y, bad, 0.5)
    assert train.paired_bootstrap_pvalue(sa, sa, pa, pa)["auroc"] == 1.0
    assert train.paired_bootstrap_pvalue(sa, sb, pa, pb)["auroc"] == pytest.approx(1 / 201)


def _classification_summary(B=100):
    rng = np.random.default_rng(5)
    y, s = _scores(rng, 240, signal=1.5)
    names = ("DenseNet121", "EfficientNetV2-S", "ResNet50")
    members = {n: np.clip(s + rng.normal(0, 0.15, 240), 0, 1) for n in names}
    scores = {**members, "DERNet": np.average(np.stack(list(members.values())), axis=0, weights=(0.42, 0.32, 0.26))}
    thresholds = {n: 0.5 for n in scores}
    return y, scores, train.summarize_classification(y, scores, thresholds, np.arange(240) // 2, B=B)


def test_summary_and_table2_rendering(tmp_path):
    _, _, summary = _classification_summary()
    assert set(summary["comparisons"]) == {"DenseNet121", "EfficientNetV2-S", "ResNet50"}
    m = summary["models"]["DERNet"]
    assert {"auroc", "f1", "sensitivity", "specificity", "threshold", "ci"} <= set(m)
    train.write_json(tmp_path / "metrics.json", summary)
    reloaded = json.loads((tmp_path / "metrics.json").read_text())
    table = train.render_table2(reloaded)  # works from the JSON copy too
    assert table == train.render_table2(summary)
    for row in train.PAPER_TABLE2:
        assert "| " + " | ".join(row) + " |" in table
    lo, hi = m["ci"]["auroc"]
    assert f"| DERNet | {100 * m['auroc']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] |" in table
    tests = train.render_paired_tests(summary)
    assert tests.count("DERNet vs") == 3 and "DeLong" in tests


# --- detection metrics: VinDr-SpineXR protocol (Table 3)


def test_box_iou_equals_torchvision():
    rng = np.random.default_rng(0)
    a = np.c_[rng.random((9, 2)) * 80, rng.random((9, 2)) * 80]
    a[:, 2:] += a[:, :2]
    b = a[rng.permutation(9)[:6]] + rng.normal(0, 5, (6, 4))
    ref = torchvision.ops.box_iou(torch.as_tensor(a), torch.as_tensor(b)).numpy()
    assert train.box_iou(a, b) == pytest.approx(ref, abs=1e-12)


def _gt(*boxes_and_classes):
    return (np.array([b for b, _ in boxes_and_classes], dtype=float).reshape(-1, 4),
            np.array([c for _, c in boxes_and_classes], dtype=int))


def _det(*rows):
    return np.array(rows, dtype=float).reshape(-1, 6)


BOX = [10, 10, 50, 50]
FAR = [200, 200, 240, 240]


def test_perfect_detections_give_ap_one():
    gt = {"a": _gt((BOX, 0), (FAR, 3)), "b": _gt(([5, 60, 30, 90], 0)), "normal": _gt()}
    dets = {"a": _det(BOX + [0.9, 0], FAR + [0.8, 3]), "b": _det([5, 60, 30, 90, 0.7, 0])}
    r = train.evaluate_detections(dets, gt)
    assert r["ap50"][[0, 3]] == pytest.approx([1, 1]) and r["map50"] == 1 and r["map50_95"] == 1
    assert np.isnan(r["ap50"][[1, 2, 4, 5, 6]]).all()  # no GT: NaN, not counted in the mean
    assert r["n_gt"].tolist() == [2, 0, 0, 1, 0, 0, 0] and r["n_images"] == 3


def test_hand_made_ap_under_101_point_interpolation():
    # 1 GT; FP (0.9) ranked above TP (0.8). Ranks: precision 0, 1/2; recall 0, 1.
    # Envelope: 1/2 at every recall point (r = 0 is reached at rank 1, whose envelope is 1/2) → AP 0.5.
    gt = {"a": _gt((BOX, 0))}
    r = train.evaluate_detections({"a": _det(FAR + [0.9, 0], BOX + [0.8, 0])}, gt)
    assert r["ap50"][0] == pytest.approx(0.5)
    # 2 GT; TP (0.9), FP (0.8), TP (0.7). Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; envelope 1, 2/3, 2/3.
    # Recall points 0, 0.01, …, 0.50 (51 points) → 1; 0.51 … 1.00 (50 points) → 2/3.
    # AP = (51 · 1 + 50 · 2/3) / 101 = 0.834983…
    gt = {"a": _gt((BOX, 0), (FAR, 0))}
    r = train.evaluate_detections({"a": _det(BOX + [0.9, 0], [100, 100, 120, 120, 0.8, 0], FAR + [0.7, 0])}, gt)
    assert r["ap50"][0] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert r["precision50"][0, :51] == pytest.approx(1) and r["precision50"][0, 51:] == pytest.approx(2 / 3)


def test_iou_threshold_and_duplicates():
    shifted = [10, 10, 50, 60]  # IoU with BOX = 1600 / 2000 = 0.8: TP at 0.5 … 0.8, FP above
    gt = {"a": _gt((BOX, 0))}
    r = train.evaluate_detections({"a": _det(shifted + [0.9, 0], BOX + [0.8, 0])}, gt)
    # at t ≤ 0.8 the top detection takes the GT and the exact duplicate below it is a FP (AP 1);
    # at t > 0.8 the top one is a FP and the duplicate the TP (AP 0.5, as in the hand case above)
    assert r["ap"][0] == pytest.approx([1] * 7 + [0.5] * 3)
    assert r["map50_95"] == pytest.approx(0.85)


def test_equal_iou_goes_to_the_later_gt_as_pycocotools():
    # Detection A (0.9) has IoU 0.6 with both GTs; B (0.8) overlaps only GT 1 (IoU 1 vs 1/3).
    # pycocotools keeps the LAST GT among equal IoUs, so A takes GT 2 and B takes GT 1: AP@0.5 = 1.
    # (Taking the first GT would leave B unmatched: TP, FP and recall 1/2, AP 51/101.)
    gt = {"a": _gt(([0, 0, 10, 10], 0), ([5, 0, 15, 10], 0))}
    dets = {"a": _det([2.5, 0, 12.5, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0])}
    r = train.evaluate_detections(dets, gt)
    assert r["ap50"][0] == 1
    if importlib.util.find_spec("pycocotools"):
        assert r["ap"] == pytest.approx(_pycocotools_ap(dets, gt, 7, 100), abs=1e-12, nan_ok=True)


def test_detections_on_normal_images_lower_ap():
    gt = {"a": _gt((BOX, 0)), "normal": _gt()}
    clean = train.evaluate_detections({"a": _det(BOX + [0.5, 0])}, gt)
    noisy = train.evaluate_detections({"a": _det(BOX + [0.5, 0]), "normal": _det(BOX + [0.9, 0])}, gt)
    assert clean["ap50"][0] == 1 and noisy["ap50"][0] == pytest.approx(0.5)


def test_max_dets_per_image_and_class():
    gt = {"a": _gt((BOX, 0), (FAR, 1))}
    dets = {"a": _det([100, 100, 120, 120, 0.9, 0], [130, 130, 150, 150, 0.8, 0], BOX + [0.7, 0], FAR + [0.1, 1])}
    three = train.evaluate_detections(dets, gt, max_dets=3)
    two = train.evaluate_detections(dets, gt, max_dets=2)
    assert three["ap50"][0] == pytest.approx(1 / 3)  # TP at rank 3: precision 1/3 at every recall point
    assert two["ap50"][0] == 0  # the TP is the class's 3rd detection in this image: dropped
    assert two["ap50"][1] == 1  # the cap counts per class (as pycocotools), so class 1 keeps its one
    assert two["n_det"][:2].tolist() == [2, 1]


def test_bad_input_is_a_clear_error():
    gt = {"a": _gt((BOX, 0))}
    with pytest.raises(ValueError, match="without a ground-truth entry"):
        train.evaluate_detections({"b": _det(BOX + [0.5, 0])}, gt)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        train.evaluate_detections({"a": np.zeros((2, 5))}, gt)
    with pytest.raises(ValueError, match="x2 >= x1"):
        train.evaluate_detections({"a": _det([50, 10, 10, 50, 0.5, 0])}, gt)
    with pytest.raises(ValueError, match="class indices"):
        train.evaluate_detections({"a": _det(BOX + [0.5, 7])}, gt)
    with pytest.raises(ValueError, match="must contain 0.5"):
        train.evaluate_detections({}, gt, iou_thresholds=(0.6, 0.7))


def _random_scene(rng, n_images=40, num_classes=7, size=256, masks=False):
    """Images with 0–5 lesions (class 6 never has GT), jittered/duplicated/misclassified detections,
    random FPs, images without detections, scores on a 0.05 grid (ties across images)."""
    gt, dets, gt_masks, pred_masks = {}, {}, {}, {}
    yy, xx = np.mgrid[:size, :size]

    def ellipse(b):
        cx, cy, rx, ry = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) / 2, (b[3] - b[1]) / 2
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1

    for i in rng.permutation(n_images):
        image_id = f"img{i:03d}"
        m = rng.integers(0, 6)
        xy = rng.integers(0, size - 70, (m, 2))
        boxes = np.c_[xy, xy + rng.integers(8, 64, (m, 2))].astype(float)
        classes = rng.integers(0, num_classes - 1, m)
        gt[image_id] = (boxes, classes)
        rows = []
        for b, c in zip(boxes, classes):
            for _ in range(rng.integers(0, 4)):
                jb = np.clip(b + rng.normal(0, 4, 4), 0, size - 1)
                jb[2:] = np.maximum(jb[2:], jb[:2] + 2)
                rows.append([*jb, rng.integers(1, 20) / 20, c if rng.random() < 0.85 else rng.integers(0, num_classes)])
        for _ in range(rng.integers(0, 8)):
            xy0 = rng.integers(0, size - 60, 2)
            rows.append([*xy0, *(xy0 + rng.integers(8, 60, 2)), rng.integers(1, 20) / 20, rng.integers(0, num_classes)])
        if rows and rng.random() < 0.9:
            dets[image_id] = np.array(rows, dtype=float)
        if masks:
            gt_masks[image_id] = np.stack([ellipse(b) for b in boxes]) if m else np.zeros((0, size, size), bool)
            if image_id in dets:
                pred_masks[image_id] = np.stack([ellipse(r[:4]) for r in dets[image_id]])
    return (dets, gt, pred_masks, gt_masks) if masks else (dets, gt)


def _pycocotools_ap(dets, gt, num_classes, max_dets, gt_masks=None, pred_masks=None):
    """AP (C, T) from pycocotools' COCOeval on the same scene; NaN where it reports -1."""
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    segm = gt_masks is not None

    def rle(m):
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    ids = {image_id: n + 1 for n, image_id in enumerate(sorted(gt))}  # same order as the sorted ids
    anns, results = [], []
    for image_id, (boxes, classes) in gt.items():
        for k, (b, c) in enumerate(zip(boxes, classes)):
            ann = {"id": len(anns) + 1, "image_id": ids[image_id], "category_id": int(c) + 1, "iscrowd": 0,
                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
            if segm:
                ann.update(segmentation=rle(gt_masks[image_id][k]), area=float(gt_masks[image_id][k].sum()))
            anns.append(ann)
    for image_id, rows in dets.items():
        for k, r in enumerate(rows):
            res = {"image_id": ids[image_id], "category_id": int(r[5]) + 1, "score": float(r[4])}
            if segm:
                res["segmentation"] = rle(pred_masks[image_id][k])
            else:
                res["bbox"] = [r[0], r[1], r[2] - r[0], r[3] - r[1]]
            results.append(res)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": v, "height": 256, "width": 256} for v in ids.values()],
                        "annotations": anns, "categories": [{"id": c + 1} for c in range(num_classes)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "segm" if segm else "bbox")
        ev.params.iouThrs = np.array(train.COCO_IOU_THRESHOLDS)
        ev.params.maxDets = [max_dets]
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, 0]  # (T, R, K)
    return np.where(prec[:, 0, :] > -1, prec.mean(axis=1), np.nan).T  # (K, T)


@pytest.mark.parametrize("seed,max_dets", [(0, 100), (1, 100), (2, 3), (3, 1)])
def test_box_ap_equals_pycocotools(seed, max_dets):
    dets, gt = _random_scene(np.random.default_rng(seed))
    ours = train.evaluate_detections(dets, gt, max_dets=max_dets)
    ref = _pycocotools_ap(dets, gt, 7, max_dets)
    assert np.isnan(ref[6]).all() and np.isnan(ours["ap"][6]).all()  # class 6 has detections but no GT
    assert ours["ap"] == pytest.approx(ref, abs=1e-6, nan_ok=True)
    assert ours["ap50"] == pytest.approx(ref[:, 0], abs=1e-6, nan_ok=True)
    assert ours["map50"] == pytest.approx(np.nanmean(ref[:, 0]), abs=1e-6)
    assert ours["map50_95"] == pytest.approx(np.nanmean(ref), abs=1e-6)
    assert 0.05 < ours["map50"] < 0.95  # a scene that exercises the protocol, not a trivial one


def test_mask_iou_equals_brute_force():
    rng = np.random.default_rng(0)
    a = rng.random((5, 40, 50)) < 0.02
    a[:, 10:20, 5:30] |= rng.random((5, 10, 25)) < 0.5
    b = np.concatenate([a[:3] ^ (rng.random((3, 40, 50)) < 0.05), np.zeros((1, 40, 50), bool)])  # + an empty mask
    inter = (a[:, None] & b[None]).sum(axis=(2, 3))
    union = (a[:, None] | b[None]).sum(axis=(2, 3))
    assert train.mask_iou(a, b) == pytest.approx(np.where(union > 0, inter / np.maximum(union, 1), 0), abs=1e-12)


def test_mask_ap_and_dice_on_hand_made_masks():
    size = 64
    gt_m = np.zeros((2, size, size), bool)
    gt_m[0, 10:20, 10:20] = True  # class 0, 100 px
    gt_m[1, 40:50, 40:50] = True  # class 1, never found
    pred = np.zeros((2, size, size), bool)
    pred[0, 10:20, 10:18] = True  # 80 px inside the GT: IoU 0.8, Dice 2·80/180
    pred[1, 30:35, 0:5] = True  # elsewhere: FP
    gt = {"a": (np.array([[10, 10, 20, 20], [40, 40, 50, 50]], float), np.array([0, 1]))}
    dets = {"a": _det([10, 10, 18, 20, 0.9, 0], [0, 30, 5, 35, 0.6, 0])}
    r = train.evaluate_masks(dets, {"a": pred}, gt, {"a": gt_m})
    assert r["ap50"][:2].tolist() == [1, 0] and r["map50"] == 0.5
    assert r["ap"][0] == pytest.approx([1] * 7 + [0] * 3)  # IoU 0.8 is a TP up to t = 0.80
    assert r["dice_matched"] == pytest.approx(160 / 180) and r["iou_matched"] == pytest.approx(0.8)
    assert r["dice_matched_per_class"][0] == pytest.approx(160 / 180) and np.isnan(r["dice_matched_per_class"][1])
    assert r["n_matched"][:2].tolist() == [1, 0] and r["dice_all_gt"] == pytest.approx(80 / 180)
    with pytest.raises(ValueError, match="predicted masks"):
        train.evaluate_masks(dets, {"a": pred[:1]}, gt, {"a": gt_m})


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_ap_equals_pycocotools(seed):
    dets, gt, pred_masks, gt_masks = _random_scene(np.random.default_rng(seed), n_images=25, masks=True)
    ours = train.evaluate_masks(dets, pred_masks, gt, gt_masks)
    ref = _pycocotools_ap(dets, gt, 7, 100, gt_masks=gt_masks, pred_masks=pred_masks)
    assert ours["ap"] == pytest.approx(ref, abs=1e-6, nan_ok=True)
    assert ours["map50_95"] == pytest.approx(np.nanmean(ref), abs=1e-6)


# --- reports and plots


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    y, scores, summary = _classification_summary(B=20)
    roc = train.plot_roc_curves(y, scores, tmp_path / "roc.png", thresholds={n: 0.5 for n in scores})
    history = [{"epoch": e, "train_loss": 1 / e, "val_auroc": 0.5 + e / 10, "lr": 1e-4, "note": "text is skipped"}
               for e in range(1, 5)]
    curves = train.plot_training_curves(history, tmp_path / "curves.png")
    dets, gt = _random_scene(np.random.default_rng(0))
    det = train.evaluate_detections(dets, gt)
    pr = train.plot_pr_curves(det, [f"class {c}" for c in range(7)], tmp_path / "sub" / "pr.png")
    assert all(_is_png(p) for p in (roc, curves, pr))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["curves.png", "pr.png", "roc.png", "sub"]  # no temp files


def test_write_json_is_strict_and_atomic(tmp_path):
    path = train.write_json(tmp_path / "m.json", {"ap": np.array([0.5, np.nan]), "n": np.int64(3), "t": (1, 2)})
    assert json.loads(path.read_text()) == {"ap": [0.5, None], "n": 3, "t": [1, 2]}
    with pytest.raises(TypeError):
        train.write_json(path, {"bad": object()})

    def crash_midway(tmp):
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.atomic_write(path, crash_midway)
    assert json.loads(path.read_text())["n"] == 3 and len(list(tmp_path.iterdir())) == 1  # old file intact, no temp


def test_table3_and_mask_table_rendering(tmp_path):
    dets, gt, pred_masks, gt_masks = _random_scene(np.random.default_rng(1), n_images=20, masks=True)
    box = train.evaluate_detections(dets, gt)
    mask = train.evaluate_masks(dets, pred_masks, gt, gt_masks)
    table = train.render_table3(box)
    for row in train.PAPER_TABLE3:
        assert "| " + " | ".join(row) + " |" in table
    ours = [f"{100 * v:.2f}" for v in box["ap50"][:6]] + ["–", f"{100 * box['map50']:.2f}"]  # LT13: no GT
    assert "| This implementation | " + " | ".join(ours) + " |" in table
    train.write_json(tmp_path / "box.json", box)
    assert train.render_table3(json.loads((tmp_path / "box.json").read_text())) == table
    seg = train.render_mask_table(box, mask)
    assert "| Mask AP@0.5 | " + " | ".join(f"{100 * v:.2f}" for v in mask["ap50"][:6]) in seg
    assert f"| {int(mask['n_matched'].sum())}/{int(mask['n_gt'].sum())} |" in seg
    with pytest.raises(ValueError, match="needs 7 values"):
        train.render_table3({**box, "ap50": box["ap50"][:6]})


# --- configuration: demo settings, flags, training subset, Phase I precision


def _records(study_sizes):
    return [Record(f"s{s}i{i}", f"s{s}", f"s{s}", Path(f"s{s}i{i}.png"), np.zeros((s % 2, 4), np.float32),
                         np.zeros(s % 2, np.int64)) for s, n in enumerate(study_sizes) for i in range(n)]


@pytest.mark.parametrize("n_images", [0, 5, 11, 100])
def test_study_subset_keeps_whole_studies(n_images):
    records = _records([2, 1, 3, 2, 2, 1, 2])  # 13 images in 7 studies
    subset = train.study_subset(records, n_images, seed=42)
    if n_images in (0, 100):
        assert subset == records
        return
    assert n_images <= len(subset) < n_images + 3  # stops at the first study that reaches n_images
    kept = {r.study_id for r in subset}
    assert subset == [r for r in records if r.study_id in kept]  # whole studies, file order
    assert train.study_subset(records, n_images, seed=42) == subset  # seeded


def _config(*argv):
    return train.config_from_args(train.get_args_parser().parse_args(list(argv)))


def test_demo_settings_and_flags(tmp_path):
    demo = _config("--stage", "cls")
    assert (demo.cls_imgsz, demo.cls_epochs, demo.lr, demo.cls_augment) == (128, 6, 1e-3, False)
    assert _config("--stage", "cls", "--augment").cls_augment
    paper = _config("--stage", "cls", "--data", str(tmp_path))
    assert (paper.cls_imgsz, paper.cls_epochs, paper.lr, paper.cls_augment, paper.train_images) == (384, 60, 1e-4, True, 0)
    assert not _config("--stage", "cls", "--data", str(tmp_path), "--no-augment").cls_augment
    assert _config("--stage", "det").train_images == 400
    assert _config("--stage", "det", "--train-images", "0").train_images == 0
    assert _config("--stage", "cls", "--precision", "fp32").precision == "fp32"
    assert _config("--stage", "cls", "--member-imgsz", "resnet50=448").member_imgsz == {"resnet50": 448}
    for bad in ("vgg16=224", "resnet50=big", "resnet50=0"):
        with pytest.raises(train.DataError, match="--member-imgsz"):
            _config("--stage", "cls", "--member-imgsz", bad)
    with pytest.raises(train.DataError, match="--train-images"):
        _config("--stage", "det", "--train-images", "-3")
    # Eq. 1 working side: the demo's three stages share 384, the paper's sizes 640; a flag wins
    assert {_config("--stage", s).clahe_side for s in ("cls", "det", "seg")} == {train.DEMO_CLAHE_SIDE} == {384}
    assert paper.clahe_side == train.DataConfig.clahe_side == 640
    assert _config("--stage", "cls", "--clahe-side", "256").clahe_side == 256
    with pytest.raises(train.DataError, match="--clahe-side"):
        _config("--stage", "cls", "--clahe-side", "8")
    old = tmp_path / "old_run"   # a run folder from before clahe_side: resumed with CLAHE at the input size
    old.mkdir()
    saved = {k: v for k, v in dataclasses.asdict(demo).items()
             if k not in ("clahe_side", "cls_fast_decode_p", "low_band")}
    (old / "config.json").write_text(json.dumps(saved))
    resumed = _config("--stage", "cls", "--resume", str(old))
    assert resumed.clahe_side is None and resumed.cls_fast_decode_p == 0   # and the full decode only,
    assert resumed.low_band is False                                       # area average only
    # issue 11: DICOMs through the wavelet low band unless told otherwise; it reaches data.py and the checkpoints
    assert demo.low_band is paper.low_band is train.DataConfig.low_band is True
    assert _config("--stage", "det", "--no-low-band").low_band is False
    assert train.data_config(_config("--stage", "det", "--no-low-band")).low_band is False
    # issue 11: members also see inference's reduced decode, half of the time unless told otherwise
    assert demo.cls_fast_decode_p == paper.cls_fast_decode_p == 0.5
    assert _config("--stage", "cls", "--fast-decode-p", "0").cls_fast_decode_p == 0
    with pytest.raises(train.DataError, match="--fast-decode-p"):
        _config("--stage", "cls", "--fast-decode-p", "1.5")


@pytest.mark.parametrize("precision,native,expected", [("auto", True, torch.bfloat16), ("auto", False, None),
                                                       ("fp32", True, None)])
def test_cls_autocast_uses_native_cpu_bf16_only(monkeypatch, precision, native, expected):
    monkeypatch.setattr(train, "native_bf16", lambda: native)
    cfg = dataclasses.replace(train.TrainConfig(), precision=precision)
    with train.cls_autocast(cfg, train.Runtime()):
        enabled = torch.is_autocast_enabled("cpu")
        y = torch.nn.Linear(4, 2)(torch.ones(3, 4))
    assert enabled == (expected is not None)
    assert y.dtype == (expected or torch.float32)


def test_member_probabilities_are_fp32_under_autocast():
    torch.manual_seed(0)
    member = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1), torch.nn.Flatten(0))  # (B,) logits
    x = torch.randn(8, 1, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs = member(x), train.member_prob_fn(member)(x)
    assert logits.dtype == torch.bfloat16 and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.sigmoid(logits.float()))   # sigmoid of the bf16 logits, in fp32


# --- end-to-end runs on the tiny synthetic set (tests/conftest.py): outputs, resume, DDP, checkpoints

REPO = Path(__file__).resolve().parents[1]
CLS_FILES = ("config.json", "dernet.pt", "predictions.csv", "metrics.json", "report.md", "roc.png",
             "training_curves.png", *(f"member_{n}.pt" for n in train.MEMBERS), *(f"{n}_last.pt" for n in train.MEMBERS))
DET_FILES = ("config.json", "best.pt", "last.pt", "detections.csv", "ground_truth.csv", "metrics.json", "report.md",
             "pr_curves.png", "predictions.png", "training_curves.png")


def _args(root, out, stage, name, *extra) -> list[str]:
    tiny = {"cls": ["--epochs", "2", "--imgsz", "32", "--batch", "8"],
            "det": ["--epochs", "2", "--imgsz", "64", "--batch", "4", "--scale", "n", "--tau-mosaic", "2"],
            "seg": ["--epochs", "2", "--imgsz", "64", "--batch", "4", "--scale", "n", "--tau-mosaic", "2"]}[stage]
    return ["--stage", stage, "--data", str(root), "--out", str(out), "--cache-dir", str(out / "cache"),
            "--name", name, "--bootstrap", "20", "--no-progress", "--clahe-side", "96", *tiny, *extra]


def _run_main(argv) -> int:
    return train.main(train.get_args_parser().parse_args(argv))


def _cli(argv, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_cls_tiny_run_writes_every_output(synthetic_root, tmp_path):
    assert _run_main(_args(synthetic_root, tmp_path, "cls", "t", "--member-imgsz", "resnet50=40")) == 0
    run = tmp_path / "cls" / "t"
    for f in CLS_FILES:
        assert (run / f).is_file(), f
    header = (run / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header == ["image_id", "study_id", "label", *(f"p_{n}" for n in train.MEMBERS), "score", "decision"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["models"]) >= {"DERNet", *train.MEMBER_NAMES.values()}
    report = (run / "report.md").read_text()
    assert "AUROC" in report and "DERNet" in report and "p" in report
    dernet = train.DERNet.from_checkpoint(torch.load(run / "dernet.pt", weights_only=True))
    assert dernet.tau == pytest.approx(metrics["tau"])
    assert dernet.image_sizes == {"densenet121": 32, "efficientnet_v2_s": 32, "resnet50": 40}  # per member
    assert dernet.preprocess == {"clahe_clip_limit": 2.0, "clahe_tile_grid": 8, "clahe_side": 96,
                                 "low_band": True}  # what inference redoes
    assert "ResNet50 40" in report


@pytest.mark.parametrize("stage", ["det", "seg"])
def test_det_seg_tiny_run_writes_every_output(synthetic_root, tmp_path, stage):
    assert _run_main(_args(synthetic_root, tmp_path, stage, "t")) == 0
    run = tmp_path / stage / "t"
    for f in DET_FILES + (("masks.png",) if stage == "seg" else ()):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["test"]["ap50"]) == 7 and math.isfinite(metrics["test"]["map50"])
    assert (metrics["test_mask"] is not None) == (stage == "seg")
    assert (run / "detections.csv").read_text().startswith("image_id,class,lt_code,score,x1,y1,x2,y2")
    report = (run / "report.md").read_text()
    assert "LT2" in report and "LT13" in report and "mAP@0.5" in report
    preprocess = train.load_checkpoint(run / "best.pt")["preprocess"]
    assert preprocess["clahe_side"] == 96 and preprocess["low_band"] is True


def _kill_after_first_epoch(argv, marker: Path) -> None:
    """Start a training run, SIGKILL it once its first per-epoch checkpoint exists (mid-epoch 2)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["det", "cls"])
def test_sigkill_then_resume_equals_uninterrupted(synthetic_root, tmp_path, stage):
    """Issue 10: kill -9 mid-run, --resume, and the final weights equal an uninterrupted run's (CPU)."""
    extra = ["--epochs", "3"] if stage == "det" else []
    whole = _cli(_args(synthetic_root, tmp_path, stage, "whole", *extra))
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / stage / "cut"
    marker = run / ("last.pt" if stage == "det" else "efficientnet_v2_s_last.pt")
    _kill_after_first_epoch(_args(synthetic_root, tmp_path, stage, "cut", *extra), marker)
    assert not (run / "metrics.json").exists()  # really interrupted
    resumed = _cli(["--stage", stage, "--resume", str(run), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    files = ["best.pt", "last.pt"] if stage == "det" else [f"member_{n}.pt" for n in train.MEMBERS] + ["dernet.pt"]
    for f in files:
        key = "state_dict" if f == "dernet.pt" else "model"
        a = torch.load(tmp_path / stage / "whole" / f, weights_only=True)[key]
        b = torch.load(run / f, weights_only=True)[key]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    m_whole = json.loads((tmp_path / stage / "whole" / "metrics.json").read_text())
    m_cut = json.loads((run / "metrics.json").read_text())
    assert m_whole["test"] == m_cut["test"]


@pytest.mark.parametrize("stage", ["cls", "det"])
def test_torchrun_two_cpu_processes(synthetic_root, tmp_path, stage):
    """Issue 10: 2 gloo ranks finish, hold identical weights, and their gathered evaluation equals a
    single-process evaluation of the same checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *_args(synthetic_root, tmp_path, stage, "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / stage / "ddp"
    ranks = json.loads((run / "ranks.json").read_text())
    assert ranks.pop("world") == 2 and ranks and all(ranks.values())
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = train.TrainConfig(**json.loads((run / "config.json").read_text()))
    splits = train.load_splits(cfg, synthetic_root, cfg.fold)
    cache = train.ImageCache(cfg.cache_dir, hyp=train.data_config(cfg))   # the run's CLAHE working side
    rt = train.Runtime()  # one CPU process
    if stage == "cls":
        dernet = train.DERNet.from_checkpoint(torch.load(run / "dernet.pt", weights_only=True))
        ds = train.ClassificationDataset(splits.test, cfg.cls_imgsz, cache)
        probs = train.predict_probs(train.dernet_prob_fn(dernet), ds, cfg, rt, 4)
        single = train.auroc(ds.labels, probs @ dernet.omega.numpy())
        assert metrics["test"]["models"]["DERNet"]["auroc"] == pytest.approx(single, abs=1e-6)
    else:
        ckpt = train.load_checkpoint(run / "best.pt", "det", 7)
        model = train.YOLO11(nc=7, scale=cfg.scale)
        model.load_state_dict(ckpt["model"])
        ds = train.DetectionDataset(splits.test, cfg.det_imgsz, cache)
        box, *_ = train.evaluate_detector(model, ds, cfg, rt, False)
        assert box["map50"] == pytest.approx(metrics["test"]["map50"], abs=1e-9)
        assert np.asarray(box["n_det"]).tolist() == list(metrics["test"]["n_det"])


def test_checkpoint_errors_are_one_line(tmp_path, synthetic_root):
    ckpt = {"stage": "det", "nc": 7, "model": {}}
    path = train.save_checkpoint(ckpt, tmp_path / "det.pt")
    for kwargs, needle in (({"stage": "seg"}, "'det' checkpoint"), ({"nc": 3}, "7 classes")):
        with pytest.raises(train.CheckpointError, match=needle) as err:
            train.load_checkpoint(path, **kwargs)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(train.CheckpointError, match="unreadable checkpoint") as err:
        train.load_checkpoint(truncated)
    assert "\n" not in str(err.value)
    # through the command line: exit 2 with one line naming the file
    proc = _cli(["--stage", "seg", "--data", str(synthetic_root), "--init-from", str(truncated), "--out",
                 str(tmp_path), "--no-progress"])
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and "truncated.pt" in last
    assert "Traceback" not in proc.stderr


def test_non_finite_losses_skip_then_abort():
    cfg = train.TrainConfig(max_bad_steps=3)
    rt = train.Runtime()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    bad = train.skip_bad_step(opt, 0, cfg, rt)
    bad = train.skip_bad_step(opt, bad, cfg, rt)
    with pytest.raises(train.TrainingDiverged, match="3 non-finite"):
        train.skip_bad_step(opt, bad, cfg, rt)


# --- overfit: the whole Phase II machinery (dataset, Eq. 4 / mask loss, assigner, NMS, VinDr AP) can fit

OVERFIT_SIZE, OVERFIT_LR = 256, 2e-3
OVERFIT_STEPS = {False: 200, True: 400}  # det, seg (the mask branch needs longer)
MIN_SIDE = {False: 16, True: 32}  # smallest lesion side kept, px at the input (det, seg):
# the task-aligned assigner only takes anchors whose centre lies inside a box (losses.py, step 1), so a
# lesion under one P3 stride (8 px; most synthetic osteophytes at 256 px) has no anchor at all - true of the
# published family too; det keeps two strides. Masks live on the stride-4 prototype grid, whose boundary
# error alone costs small lesions more Dice than the test allows; seg keeps eight prototype cells. The
# small-lesion regime is what the full-resolution runs measure. For the same reason seg keeps only masks
# whose best stride-4 version reaches Dice GRID_DICE (thin implant screws reach ~0.5).
GRID_DICE = 0.9
OVERFIT_IMAGES = {False: 4, True: 3}  # the tiny set has three images with such masks


def _grid_dice(mask_path, hw: tuple[int, int], stride: int = 4) -> float:
    """Dice of a lesion mask with its best stride-4 version (area-averaged, halved, upsampled): the most a
    prototype mask can reach. Thin shapes (implant screws and rods) stay far below 1."""
    m = cv2.resize(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), hw[::-1], interpolation=cv2.INTER_LINEAR) > 127
    small = cv2.resize(m.astype(np.float32), (hw[1] // stride, hw[0] // stride), interpolation=cv2.INTER_AREA) > 0.5
    up = cv2.resize(small.astype(np.uint8), hw[::-1], interpolation=cv2.INTER_LINEAR) > 0
    return 2 * (m & up).sum() / max(m.sum() + up.sum(), 1)


def _assignable(record, cache, min_side: float, seg: bool = False):
    _, meta = cache.get(record.path, OVERFIT_SIZE)
    ratio, new_hw, _ = train.letterbox_geometry((meta.height, meta.width), OVERFIT_SIZE)
    sides = np.minimum(record.boxes[:, 2] - record.boxes[:, 0], record.boxes[:, 3] - record.boxes[:, 1]) * ratio
    keep = sides >= min_side
    if seg:  # and masks the stride-4 prototype grid can represent
        keep &= np.array([_grid_dice(p, new_hw) >= GRID_DICE for p in record.mask_paths], bool)
    masks = [p for p, k in zip(record.mask_paths, keep) if k] if record.mask_paths is not None else None
    return dataclasses.replace(record, boxes=record.boxes[keep], classes=record.classes[keep], mask_paths=masks)


@pytest.mark.parametrize("seg", [False, True], ids=["det", "seg"])
def test_overfit_a_few_images(synthetic_root, tmp_path, seg):
    torch.manual_seed(0)
    cache = train.ImageCache(tmp_path / "cache")
    records = [r for r in (_assignable(r, cache, MIN_SIDE[seg], seg) for r in train.load_split(synthetic_root, "train"))
               if r.label][:OVERFIT_IMAGES[seg]]
    assert len(records) == OVERFIT_IMAGES[seg]
    ds = train.DetectionDataset(records, OVERFIT_SIZE, cache, masks=seg)
    batch = train.collate_detection([ds[i] for i in range(len(ds))])
    model = (train.YOLO11Seg if seg else train.YOLO11)(nc=7, scale="n")
    # TOOD's exact soft targets: under the reference's (default) 1e-9 guard, small objects whose initial
    # overlap is tiny can get no target at all and stay unlearned (losses.TaskAlignedAssigner.soft_targets)
    loss_cfg = train.LossConfig(tal_target_eps=0.0)
    loss_fn = (train.SegmentationLoss if seg else train.DetectionLoss)(7, model.reg_max, (8, 16, 32), loss_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=OVERFIT_LR)
    model.train()
    for _ in range(OVERFIT_STEPS[seg]):
        preds = model(batch["img"])
        loss, _ = loss_fn(preds, batch["targets"], batch["masks"], OVERFIT_SIZE) if seg else \
            loss_fn(preds, batch["targets"], OVERFIT_SIZE)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    cfg = train.TrainConfig(det_imgsz=OVERFIT_SIZE, det_batch=4, progress=False)
    box, mask, _, _ = train.evaluate_detector(model, ds, cfg, train.Runtime(), seg)
    assert box["map50"] > 0.9, box["ap50"]
    if seg:
        assert mask["dice_matched"] > 0.8 and mask["map50"] > 0.5, (mask["dice_matched"], mask["map50"])
