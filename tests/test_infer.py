"""Tests for infer.py.

Explanations: Grad-CAM (against pytorch_grad_cam when installed, and against a hand-computed map), hook
hygiene, inference mode, threads; LIME determinism and faithfulness; overlays.
Cascade (on conftest's tiny checkpoints): results equal train.py's evaluation path (scores, boxes, masks);
the detector runs only when S > tau; boxes map back through the letterbox to original pixels, also from a
reduced JPEG 2000 decode; COCO RLE against pycocotools; the JSON schema; --study; bad files and exit
codes; the no-checkpoint message; precision choice; the ONNX export round trip against torch.

    python -m pytest -q tests/test_infer.py
"""
import base64
import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import onnx
import pydicom
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pycocotools import mask as coco_mask
from torchvision.ops import box_iou

import infer
from data import (CLASSES, ClassificationDataset, DataConfig, DetectionDataset, ImageCache, load_image, load_split,
                  low_band_level, write_dicom)
from dernet import ARCHS, MEMBERS, DERNet, Member, load_dernet, save_dernet
from train import Runtime, TrainConfig, load_checkpoint, predict_detections, save_checkpoint
from yolo11 import YOLO11, YOLO11Seg

CAM_SIZE = 128   # 4 x 4 final feature maps for all three members (stride 32)


def forward_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def synthetic_radiograph(size: int, seed: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A spine-like image (soft tissue, vertebral bodies with brighter rims, noise) and one bright focal
    lesion beside a vertebra, the only region brighter than bone. Returns (image (size, size) float32
    in [0, 1], lesion box (x1, y1, x2, y2))."""
    rng = np.random.default_rng(seed)
    s = size
    img = np.full((s, s), 0.15, np.float32)
    cv2.rectangle(img, (int(0.3 * s), 0), (int(0.7 * s), s), 0.3, -1)               # soft tissue
    for i in range(5):                                                                 # vertebral bodies
        y0 = int((0.05 + 0.19 * i) * s)
        y1 = y0 + int(0.14 * s)
        cv2.rectangle(img, (int(0.38 * s), y0), (int(0.62 * s), y1), 0.55, -1)
        cv2.rectangle(img, (int(0.38 * s), y0), (int(0.62 * s), y1), 0.7, max(1, s // 128))
    cx, cy, r = int(0.67 * s), int(0.47 * s), max(3, int(0.04 * s))
    cv2.circle(img, (cx, cy), r, 0.95, -1)                                             # the lesion
    img = cv2.GaussianBlur(img, (0, 0), 1.0) + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), (cx - r - 1, cy - r - 1, cx + r + 2, cy + r + 2)


class BrightSpotNet(nn.Module):
    """A constructed detector whose output depends only on regions brighter than bone: the highest
    local mean brightness (5 x 5 box filter) above 0.75 drives the abnormal logit.
    (B, 1, H, W) -> (B,). On synthetic_radiograph only the lesion passes the threshold."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 5, padding=2)
        with torch.no_grad():
            self.features.weight.fill_(1 / 25)
            self.features.bias.fill_(-0.75)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.relu(self.features(x))                   # (B, 1, H, W) lesion-only evidence
        return 30 * a.amax(dim=(1, 2, 3)) - 2.0           # (B,) logit: -2 without a lesion, ~ +4 with


class TinyNet(nn.Module):
    """Two convolutions; like torchvision's DenseNet the target map is rectified IN PLACE after the
    target module, and the head is non-linear (mean of squares) so dy/dA varies in space."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(4, 3, 3, stride=2, padding=1))
        self.w = nn.Parameter(torch.tensor([1.0, -0.5, 2.0]))

    def forward(self, x):
        a = F.relu(self.features(x), inplace=True)          # (B, 3, h, w)
        return (a.pow(2).mean(dim=(2, 3)) * self.w).sum(1)  # (B,)


@pytest.fixture(scope="module", autouse=True)
def synthetic_set_first(synthetic_root):
    """Write conftest's synthetic set before this module's first OpenCV call: data.make_synthetic forks
    worker processes, and a fork after OpenCV has started its pthreads pool deadlocks in the child."""


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    torch.manual_seed(0)
    return {name: Member(name).eval() for name in MEMBERS}


# --- Grad-CAM

def test_grad_cam_matches_hand_computed_map():
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(1, 1, 20, 20)
    cam = infer.grad_cam(net, x, layer=net.features)
    # by hand: A = relu(features(x)), y = sum_k w_k mean(A_k^2), dy/dA_k = 2 w_k A_k / (h w)
    with torch.no_grad():
        A = F.relu(net.features(x))[0]                                  # (3, 10, 10)
        h, w = A.shape[1:]
        alpha = (2 * net.w[:, None, None] * A / (h * w)).mean(dim=(1, 2))  # (3,)
        expected = F.relu((alpha[:, None, None] * A).sum(0))             # (10, 10)
        expected = F.interpolate(expected[None, None], size=(20, 20), mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
    assert expected.max() > 0 and (expected == 0).any()                 # the ReLU matters here
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)
    assert forward_hook_count(net) == 0


def _focus_head(member: Member, x: torch.Tensor, yx: tuple[float, float]) -> None:
    """Give the member a head that prefers the feature vector at relative position yx, so Grad-CAM has a
    structured map (a random head's map is often zero everywhere after the ReLU)."""
    kept = []
    handle = member.cam_layer.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        member(x)
    handle.remove()
    A = kept[0][0]                                                     # (C, h, w)
    v = A[:, int(yx[0] * A.shape[1]), int(yx[1] * A.shape[2])] - A.mean(dim=(1, 2))
    head = member.net.get_submodule(ARCHS[member.name]["head"])
    with torch.no_grad():
        head.weight.copy_(v / v.norm())
        head.bias.zero_()


@pytest.mark.parametrize("name", MEMBERS)
def test_grad_cam_matches_pytorch_grad_cam(members, name):
    gradcam_lib = pytest.importorskip("pytorch_grad_cam", reason="grad-cam not installed; "
                                      "test_grad_cam_matches_hand_computed_map covers the formula")
    image, box = synthetic_radiograph(CAM_SIZE)
    x = torch.from_numpy(image)[None, None]
    member = members[name]
    _focus_head(member, x, ((box[1] + box[3]) / 2 / CAM_SIZE, (box[0] + box[2]) / 2 / CAM_SIZE))
    ours = infer.grad_cam(member, x)

    class Logit2D(nn.Module):   # pytorch_grad_cam expects (B, classes) outputs
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m(t)[:, None]

    # Same model, same layer. (For DenseNet, pytorch_grad_cam's tensor hook sees the gradient before
    # torchvision's in-place ReLU while on CPU its saved activations alias the rectified map; the
    # maps still agree closely. Fed the same network with an explicit ReLU module, they agree to 1e-6.)
    with gradcam_lib.GradCAM(model=Logit2D(member), target_layers=[member.cam_layer]) as cam:
        reference = cam(input_tensor=x, targets=[lambda out: out[0]])[0]   # (H, W) normalised
    assert ours.shape == reference.shape == (CAM_SIZE, CAM_SIZE)
    assert ours.std() > 0
    r = np.corrcoef(ours.ravel(), reference.ravel())[0, 1]
    print(f"{name}: correlation with pytorch_grad_cam {r:.6f}")
    assert r >= 0.99
    assert forward_hook_count(member) == 0


def test_grad_cam_hooks_removed_and_inference_mode(members):
    member = members["densenet121"]            # the in-place ReLU case
    member.zero_grad(set_to_none=True)         # (pytorch_grad_cam's backward may have filled .grad)
    x = torch.rand(1, 1, 64, 64)
    before = forward_hook_count(member)
    cam = infer.grad_cam(member, x)
    assert forward_hook_count(member) == before == 0
    with torch.inference_mode():
        x_inf = x.clone()                       # an inference tensor
        cam_inf = infer.grad_cam(member, x_inf)
    np.testing.assert_allclose(cam_inf, cam, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in member.parameters())   # nothing accumulated on the model
    with pytest.raises(ValueError, match="ran 0 times"):      # hook removed on the error path too
        infer.grad_cam(member, x, layer=members["resnet50"].cam_layer)
    assert forward_hook_count(member) == 0 and forward_hook_count(members["resnet50"]) == 0
    with pytest.raises(ValueError, match=r"\(1, 1, H, W\)"):
        infer.grad_cam(member, torch.rand(2, 1, 64, 64))


def test_grad_cam_two_threads(members):
    member = members["densenet121"]
    inputs = [torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = [infer.grad_cam(member, x) for x in inputs]
    start = threading.Barrier(3)
    results, errors = {0: [], 1: []}, []

    def explain(i):
        try:
            start.wait()
            for _ in range(3):
                results[i].append(infer.grad_cam(member, inputs[i]))
        except Exception as e:   # surfaced by the assertion below
            errors.append(e)

    def predict():               # plain predictions on the same member meanwhile
        start.wait()
        with torch.inference_mode():
            for _ in range(3):
                member(torch.rand(1, 1, 64, 64))

    threads = [threading.Thread(target=explain, args=(i,)) for i in range(2)] + [threading.Thread(target=predict)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for cam in results[i]:
            np.testing.assert_allclose(cam, expected[i], rtol=1e-5, atol=1e-6)
    assert forward_hook_count(member) == 0


def test_ensemble_grad_cam_combines_raw_maps_then_normalises(members):
    model = DERNet(members, image_sizes={"densenet121": 64, "efficientnet_v2_s": 96, "resnet50": 48}).eval()
    image, _ = synthetic_radiograph(80)
    x = torch.from_numpy(image)[None, None]
    maps, ensemble = model_maps = infer.ensemble_grad_cam(model, x)
    assert list(maps) == list(MEMBERS) and all(m.shape == (80, 80) for m in maps.values())
    for name, size in model.image_sizes.items():   # each member explained at its own input size
        single = infer.grad_cam(members[name], F.interpolate(x, size=(size, size), mode="bilinear",
                                                             antialias=True), size=(80, 80))
        np.testing.assert_allclose(maps[name], single, rtol=1e-5, atol=1e-7)
    raw = sum(w * maps[n] for n, w in zip(MEMBERS, model.omega.tolist()))
    assert model_maps[1].max() == pytest.approx(1.0) or raw.max() == 0
    np.testing.assert_allclose(ensemble, raw / raw.max(), rtol=1e-5, atol=1e-6)


def test_grad_cam_peak_on_the_lesion():
    image, (x1, y1, x2, y2) = synthetic_radiograph(128)
    net = BrightSpotNet().eval()
    cam = infer.grad_cam(net, torch.from_numpy(image)[None, None], layer=net.features)
    py, px = np.unravel_index(np.argmax(cam), cam.shape)
    assert x1 <= px < x2 and y1 <= py < y2


# --- LIME

def _bright_spot_predict(images: np.ndarray) -> np.ndarray:
    net = BrightSpotNet().eval()
    with torch.no_grad():
        return torch.sigmoid(net(torch.from_numpy(images)[:, None])).numpy()


def test_superpixels_partition():
    image, _ = synthetic_radiograph(128)
    seg = infer.superpixels(image, n_segments=49)
    assert seg.shape == image.shape and seg.dtype == np.int32
    K = seg.max() + 1
    assert set(np.unique(seg)) == set(range(K)) and 36 <= K <= 49
    for k in range(K):                                        # every superpixel is one connected region
        assert cv2.connectedComponents((seg == k).astype(np.uint8))[0] == 2
    np.testing.assert_array_equal(seg, infer.superpixels(image, n_segments=49))


def test_lime_is_seeded():
    image, _ = synthetic_radiograph(96)
    a = infer.lime_explain(_bright_spot_predict, image, n_samples=40, seed=7)
    b = infer.lime_explain(_bright_spot_predict, image, n_samples=40, seed=7)
    c = infer.lime_explain(_bright_spot_predict, image, n_samples=40, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.weights, c.weights)


def test_lime_top_superpixels_on_the_lesion():
    image, (x1, y1, x2, y2) = synthetic_radiograph(128)
    result = infer.lime_explain(_bright_spot_predict, image, n_samples=64, seed=0)
    box = np.zeros(image.shape, bool)
    box[y1:y2, x1:x2] = True
    best = np.argmax(result.weights)
    assert (box & (result.segments == best)).any()              # the strongest superpixel covers the lesion
    assert (box & result.mask).sum() >= 0.5 * box.sum()          # and the overlay shows most of the box
    assert result.weights[best] > 5 * np.abs(np.delete(result.weights, best)).max()   # and dominates


def test_lime_with_dernet(members):
    model = DERNet(members, image_sizes={name: 64 for name in MEMBERS}).eval()
    image, _ = synthetic_radiograph(64)
    predict = infer.dernet_predict_fn(model)
    with torch.inference_mode():
        expected = model(torch.from_numpy(image)[None, None]).numpy()
    np.testing.assert_allclose(predict(image[None]), expected, rtol=1e-5)
    result = infer.lime_explain(predict, image, n_samples=6, batch_size=4, seed=0, n_segments=16)
    assert result.segments.shape == image.shape and result.weights.shape == (result.segments.max() + 1,)
    assert result.mask.dtype == bool


# --- overlays and encoding

def test_overlays_and_png_base64():
    image, _ = synthetic_radiograph(64)
    cam = np.zeros_like(image)
    cam[10:20, 30:40] = 3.0
    heat = infer.heatmap_overlay(image, cam)
    assert heat.shape == (64, 64, 3) and heat.dtype == np.uint8
    assert heat[15, 35, 0] > heat[15, 35, 2] and heat[50, 5, 2] > heat[50, 5, 0]   # hot red, cold blue
    mask = np.zeros(image.shape, bool)
    mask[5:15, 5:15] = True
    lime = infer.lime_overlay(image, mask)
    assert lime.shape == (64, 64, 3) and (lime[10, 10, 1] > lime[10, 10, 0])
    for img in (heat, (image * 255).astype(np.uint8)):
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(infer.encode_png_base64(img)), np.uint8),
                               cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded[..., ::-1] if img.ndim == 3 else decoded, img)   # RGB kept
    decoded = cv2.imdecode(np.frombuffer(infer.encode_png(infer.normalise_map(cam)), np.uint8),
                           cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint8 and decoded.max() == 255 and decoded.min() == 0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        infer.encode_png(cam)


# --- cascade: fixtures

ROOT = Path(__file__).resolve().parents[1]
CONF = 0.25                 # InferConfig's default display confidence, also used for the evaluation path
PATIENT_TAG = "SYNTHETIC"   # PatientName / PatientID of every synthetic DICOM: must never be printed


def confident_detector(src: Path, dst: Path, records: list) -> Path:
    """An untrained conftest detector made to output well-separated scores and varied boxes, so results
    can be compared box by box: BatchNorm statistics recalibrated on detector inputs of `records` (an
    untrained network's activations otherwise vanish with depth), class logits scaled and shifted, DFL
    bins biased towards short distances."""
    ckpt = load_checkpoint(src)
    model = (YOLO11Seg if ckpt["stage"] == "seg" else YOLO11)(nc=ckpt["nc"], scale=ckpt["scale"])
    model.load_state_dict(ckpt["model"])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None                      # cumulative average over the calibration batch
    S, params = ckpt["imgsz"], infer.working_params(ckpt["preprocess"])
    views = [infer.detector_view(infer.working_image(img, S, **params), img.shape, S, DataConfig.pad_value)[0]
             for img in (load_image(r.path)[0] for r in records)]
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(np.stack(views))[:, None].expand(-1, 3, -1, -1))   # (N, 3, S, S)
        for cls in model.head.cls:
            cls[-1].weight.mul_(3.0)
            cls[-1].bias.fill_(-2.5)
        for box in model.head.box:
            box[-1].bias.copy_((-0.3 * torch.arange(16.0)).repeat(4))
    save_checkpoint({**ckpt, "model": model.eval().state_dict()}, dst)
    return dst


@pytest.fixture(scope="module")
def detectors(tiny_models, synthetic_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("detectors")
    calibration = load_split(synthetic_root, "train")[:8]
    return {stage: confident_detector(getattr(tiny_models, f"{stage}_ckpt"), out / f"{stage}.pt", calibration)
            for stage in ("det", "seg")}


def make_pipe(tiny_models, det_ckpt, **kw) -> infer.Pipeline:
    fields = dict(cls_ckpt=str(tiny_models.cls_ckpt), det_ckpt=str(det_ckpt), precision="fp32", device="cpu",
                  fast_decode=False)
    return infer.Pipeline(infer.InferConfig(**{**fields, **kw}))


@pytest.fixture(scope="module")
def det_pipe(tiny_models, detectors) -> infer.Pipeline:
    return make_pipe(tiny_models, detectors["det"])


@pytest.fixture(scope="module")
def seg_pipe(tiny_models, detectors) -> infer.Pipeline:
    return make_pipe(tiny_models, detectors["seg"])


@pytest.fixture(scope="module")
def test_records(synthetic_root) -> list:
    return load_split(synthetic_root, "test")[:3]


def cli(*argv) -> int:
    return infer.main(infer.get_args_parser().parse_args([str(a) for a in argv]))


def assert_same_boxes(boxes: list[dict], reference: np.ndarray, score_tol: float = 1e-4,
                      agree: Callable[[dict, int], bool] | None = None) -> list[int]:
    """Result boxes vs (N, 6) [x1, y1, x2, y2, score, cls]: same count, each matched one-to-one to an
    unmatched reference box of its class within score_tol and IoU > 0.99. Boxes clipped to the image
    may coincide with tied scores, so among those candidates the first one `agree`s with (e.g. whose
    mask it equals) is taken, else the one it overlaps most. Returns the matched rows."""
    assert len(boxes) == len(reference)
    matches = []
    for b in boxes:
        iou = box_iou(torch.tensor([b["box"]], dtype=torch.float64), torch.from_numpy(reference[:, :4]))[0].numpy()
        ok = (reference[:, 5] == b["class_id"]) & (np.abs(reference[:, 4] - b["score"]) < score_tol) & (iou > 0.99)
        ok[matches] = False
        candidates = [k for k in np.flatnonzero(ok) if agree is None or agree(b, int(k))]
        assert candidates, b
        matches.append(int(max(candidates, key=lambda k: iou[k])))
    return matches


# --- cascade: results equal evaluation, Eq. 2, the tau gate

def test_results_equal_the_evaluation_path(det_pipe, test_records):
    """Scores: ClassificationDataset + DERNet (train.py's evaluation); boxes: train.predict_detections."""
    cache = ImageCache(hyp=replace(DataConfig(), clahe_side=det_pipe.cls_preprocess["clahe_side"]))  # as trained
    dataset = ClassificationDataset(test_records, det_pipe.cls_size, cache)
    model, _ = infer.load_detector(det_pipe.det_path)
    cfg = TrainConfig(eval_conf=CONF, det_batch=2, workers=0, progress=False)
    dets, _ = predict_detections(model, DetectionDataset(test_records, det_pipe.det_meta["imgsz"], cache), cfg,
                                 Runtime(), seg=False)
    n_boxes = 0
    for i, record in enumerate(test_records):
        r = det_pipe.analyze(record.path, cascade=False).result
        with torch.inference_mode():
            expected = det_pipe.dernet.member_probs(dataset[i][0][None].contiguous())[0]
        assert r["score"] == pytest.approx(float(expected @ det_pipe.dernet.omega), abs=1e-5)
        assert list(r["member_probs"].values()) == pytest.approx(expected.tolist(), abs=1e-5)
        assert r["score"] == pytest.approx(sum(w * p for w, p in zip(det_pipe.dernet.omega.tolist(),
                                                                    r["member_probs"].values())), abs=1e-6)   # Eq. 2
        assert_same_boxes(r["boxes"], dets[record.image_id])
        n_boxes += len(r["boxes"])
    assert n_boxes > 0   # the comparison was not vacuous


def test_detector_runs_only_above_tau(det_pipe, test_records, monkeypatch):
    calls = []
    detect = det_pipe.backend.detect
    monkeypatch.setattr(det_pipe.backend, "detect", lambda x: calls.append(x.shape) or detect(x))
    path = test_records[0].path
    monkeypatch.setattr(det_pipe, "tau", 1.0)               # S <= 1 = tau: every study is normal
    r = det_pipe.analyze(path).result
    assert (r["decision"], r["detector_ran"], r["boxes"], r["threshold"]) == ("normal", False, [], 1.0)
    assert calls == [] and r["timings_ms"]["detector"] == 0.0
    monkeypatch.setattr(det_pipe, "tau", r["score"] - 1e-6)  # S > tau: abnormal, the detector runs once
    r = det_pipe.analyze(path).result
    assert (r["decision"], r["detector_ran"]) == ("abnormal", True) and len(calls) == 1 and r["boxes"]
    monkeypatch.setattr(det_pipe, "tau", 1.0)               # --no-cascade: whatever S
    assert det_pipe.analyze(path, cascade=False).result["detector_ran"] and len(calls) == 2


# --- geometry: letterbox -> original pixels, reduced decodes, RLE

def fake_detections(pipe, monkeypatch, box_orig, orig_hw, cls: int = 2, score: float = 0.9):
    """Replace the detector by one that outputs a single box at box_orig's letterbox position, computed
    here independently of data.py: x_lb = x * S / max(H, W) + (S - round(W * S / max(H, W))) // 2."""
    S, (H, W) = pipe.det_meta["imgsz"], orig_hw
    r = S / max(H, W)
    pad_x, pad_y = (S - round(W * r)) // 2, (S - round(H * r)) // 2
    x1, y1, x2, y2 = box_orig[0] * r + pad_x, box_orig[1] * r + pad_y, box_orig[2] * r + pad_x, box_orig[3] * r + pad_y
    pred = torch.zeros(1, 4 + len(CLASSES), 1)
    pred[0, :4, 0] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    pred[0, 4 + cls, 0] = score
    monkeypatch.setattr(pipe.backend, "detect", lambda x: (pred, None))


def with_clahe_side(src: Path, dst: Path, dernet: bool, side: int | None) -> Path:
    """A copy of a checkpoint with another CLAHE working side; None: as written before clahe_side
    existed (CLAHE at the model's input size, and no wavelet low band, which came later)."""
    older = ("clahe_side", "low_band") if side is None else ("clahe_side",)
    if dernet:
        model = load_dernet(src)
        for key in older:
            model.preprocess.pop(key)
        model.preprocess.update({} if side is None else {"clahe_side": side})
        save_dernet(model, dst)
        return dst
    ckpt = load_checkpoint(src)
    preprocess = {k: v for k, v in ckpt["preprocess"].items() if k not in older}
    return save_checkpoint({**ckpt, "preprocess": {**preprocess, **({} if side is None else {"clahe_side": side})}},
                           dst)


@pytest.mark.parametrize("cls_side, det_side, reduce_to", [(96, 96, 96), (96, None, 96), (None, 96, 96),
                                                           (None, None, 64)])
def test_clahe_once_per_working_side_and_old_checkpoints_keep_theirs(tiny_models, detectors, test_records, tmp_path,
                                                                    monkeypatch, cls_side, det_side, reduce_to):
    """Both 64-px models at a 96-px working side share one CLAHE; checkpoints from before clahe_side
    (None) keep CLAHE at their input size. One CLAHE per distinct working side, the fast decode never
    below the largest, and the score equals train.py's evaluation path with the checkpoint's own
    preprocessing."""
    import data
    cls_ckpt = with_clahe_side(tiny_models.cls_ckpt, tmp_path / "d.pt", True, cls_side)
    det_ckpt = with_clahe_side(detectors["det"], tmp_path / "y.pt", False, det_side)
    pipe = make_pipe(tiny_models, det_ckpt, cls_ckpt=str(cls_ckpt), fast_decode=True)
    sides = {data.working_side(64, cls_side), data.working_side(64, det_side)}
    assert pipe.reduce_to == reduce_to == max(sides) and pipe.shared_work == (len(sides) == 1)
    seen, clahe = [], data._clahe_u8
    monkeypatch.setattr(data, "_clahe_u8", lambda img, *a: seen.append(max(img.shape)) or clahe(img, *a))
    record = test_records[0]
    score = pipe.analyze(record.path, cascade=False).result["score"]
    assert sorted(seen) == sorted(sides)                                  # one CLAHE per working side
    cache = ImageCache(hyp=replace(DataConfig(), clahe_side=cls_side, low_band=pipe.low_band is not None),
                       fast_decode=True)
    x = ClassificationDataset([record], pipe.cls_size, cache)[0][0]
    with torch.inference_mode():
        assert score == pytest.approx(float(pipe.dernet(x[None])[0]), abs=1e-5)


def test_fast_decode_pipeline_decodes_jpeg2000_on_torch_threads(tiny_models, detectors, monkeypatch):
    monkeypatch.delenv("OPJ_NUM_THREADS", raising=False)
    make_pipe(tiny_models, detectors["det"], fast_decode=False)
    assert "OPJ_NUM_THREADS" not in os.environ                     # the full decode does not use it
    make_pipe(tiny_models, detectors["det"], fast_decode=True)
    assert os.environ["OPJ_NUM_THREADS"] == str(torch.get_num_threads())


@pytest.mark.parametrize("low_band", [True, False])
def test_fast_decode_keeps_the_full_decode_shapes(det_pipe, tmp_path, monkeypatch, low_band):
    # 290 x 201 decodes at level 2 to 73 x 51 (a size Pillow's own load refuses: data._openjpeg_level),
    # which alone would fit 64 px as 64 x 45; the original gives 64 x 44. The working image and the DERNet
    # input's region follow the original size. Low-band models get that same 73 x 51 from the full
    # decode (bit for bit); older ones the full 290 x 201.
    rng = np.random.default_rng(0)
    dcm = write_dicom(tmp_path / "odd.dcm", rng.integers(0, 4096, (290, 201)).astype(np.uint16), compress=True)
    assert det_pipe.low_band == det_pipe.cls_size == 64                 # the tiny models: low band, 64 px
    monkeypatch.setattr(det_pipe, "low_band", 64 if low_band else None)
    full = det_pipe.analyze(dcm, cascade=False)
    monkeypatch.setattr(det_pipe, "reduce_to", det_pipe.cls_size)   # the fast decode of a 64-px model
    fast = det_pipe.analyze(dcm, cascade=False)
    assert fast.image.shape == (73, 51) and full.image.shape == ((73, 51) if low_band else (290, 201))
    assert fast.work.shape == full.work.shape == (64, 44) and fast.cls_region == full.cls_region
    assert np.array_equal(fast.image, full.image) == low_band
    assert (fast.result["score"] == full.result["score"]) == low_band


def test_analyze_decoded_repeats_analyze_from_the_decoded_image(det_pipe, tmp_path, monkeypatch):
    # the reduced decode of a 290 x 201 JPEG 2000 (bench.py guard feeds its nudged images this way)
    rng = np.random.default_rng(0)
    dcm = write_dicom(tmp_path / "odd.dcm", rng.integers(0, 4096, (290, 201)).astype(np.uint16), compress=True)
    monkeypatch.setattr(det_pipe, "reduce_to", det_pipe.cls_size)
    want = det_pipe.analyze(dcm, cascade=False)
    got = det_pipe.analyze_decoded(want.image, (290, 201), str(dcm), cascade=False)
    assert got.result["decision"] == want.result["decision"] and len(got.result["boxes"]) > 0
    for key in ("file", "image_size", "score", "member_probs", "boxes"):
        assert got.result[key] == want.result[key]
    assert got.scale == want.scale and np.array_equal(got.work, want.work) and torch.equal(got.x_cls, want.x_cls)
    assert got.result["timings_ms"]["decode"] == 0 < got.result["timings_ms"]["total"]


def test_boxes_map_back_to_original_pixels(det_pipe, tmp_path, monkeypatch):
    # a wide PNG (letterbox pads top and bottom) and a tall 12-bit JPEG 2000 DICOM decoded at 1/4 size
    rng = np.random.default_rng(0)
    png = tmp_path / "wide.png"
    cv2.imwrite(str(png), rng.integers(0, 255, (90, 150), dtype=np.uint8))
    dcm = write_dicom(tmp_path / "tall.dcm", rng.integers(0, 4096, (300, 260)).astype(np.uint16), compress=True)
    box = [40.0, 60.0, 120.0, 220.0]
    monkeypatch.setattr(det_pipe, "reduce_to", det_pipe.cls_size)   # the fast decode of a 64-px model
    for path, hw, scale in ((png, (90, 150), 1.0), (dcm, (300, 260), 0.25)):
        expected = [min(v, hw[k % 2 == 0] - 1) for k, v in enumerate(box)]   # inside the image: x < W, y < H
        fake_detections(det_pipe, monkeypatch, expected, hw)
        analysis = det_pipe.analyze(path, cascade=False)
        r = analysis.result
        assert r["image_size"] == list(hw) and len(r["boxes"]) == 1
        assert r["boxes"][0]["box"] == pytest.approx(expected, abs=0.01)
        assert (r["boxes"][0]["class"], r["boxes"][0]["lt_code"]) == (CLASSES[2], "LT6")
        assert analysis.scale == pytest.approx(scale) and analysis.image.shape[1] == round(hw[1] * scale)
        # drawn at decode resolution: the left edge of the box, below its label, has the class colour
        rgb = det_pipe.render(analysis)
        assert rgb.shape == (*analysis.image.shape, 3) and rgb.dtype == np.uint8
        x, y = round(expected[0] * scale), round(expected[1] * scale) + 3
        assert tuple(rgb[y, x]) == infer.CLASS_COLOURS[2]


def test_rle_against_pycocotools():
    rng = np.random.default_rng(0)
    for mask in (rng.random((37, 23)) > 0.6, np.ones((5, 7), bool), np.zeros((4, 9), bool)):
        mask[0, 0] = mask[0, 0] if mask.all() or not mask.any() else True   # a run of 1s first: counts[0] = 0
        rle = infer.rle_encode(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        ours = coco_mask.frPyObjects(rle, *mask.shape)          # pycocotools reads ours ...
        assert ours["counts"] == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]  # ... = its own
        assert coco_mask.area(ours) == mask.sum()
        np.testing.assert_array_equal(infer.rle_decode(rle), mask)


def test_segmentation_masks_equal_evaluation_in_original_pixels(seg_pipe, test_records):
    record = test_records[0]
    model, _ = infer.load_detector(seg_pipe.det_path)
    cfg = TrainConfig(eval_conf=CONF, det_batch=1, workers=0, progress=False)
    cache = ImageCache(hyp=replace(DataConfig(), clahe_side=seg_pipe.det_preprocess["clahe_side"]))  # as trained
    dets, masks = predict_detections(model, DetectionDataset(test_records[:1], seg_pipe.det_meta["imgsz"], cache), cfg,
                                     Runtime(), seg=True)
    analysis = seg_pipe.analyze(record.path, cascade=False)
    r = analysis.result
    H, W = r["image_size"]
    region = masks[record.image_id]                                   # (N, new_h, new_w) image region
    ys, xs = np.mgrid[:H, :W]

    def same_mask(b: dict, k: int) -> bool:
        """Ours vs the reference: the region mask scaled to the original size (nearest, pixel centres),
        cut to the box."""
        ours = infer.rle_decode(b["mask"])
        full = cv2.resize(region[k].astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)
        x1, y1, x2, y2 = b["box"]
        full &= (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        union = (full | ours).sum()
        return union == 0 or (full & ours).sum() / union > 0.99

    assert_same_boxes(r["boxes"], dets[record.image_id], agree=same_mask)   # every box with its mask
    assert len(r["boxes"]) > 0 and region.shape[0] == len(r["boxes"])
    for b in r["boxes"]:
        ours = infer.rle_decode(b["mask"])
        assert ours.shape == (H, W)
        assert (coco_mask.frPyObjects(b["mask"], H, W)["counts"]
                == coco_mask.encode(np.asfortranarray(ours.astype(np.uint8)))["counts"])
    rgb = seg_pipe.render(analysis)        # drawn on the decoded image: the low band of the working side here
    assert rgb.shape == analysis.image.shape + (3,) and max(rgb.shape) >= seg_pipe.det_meta["imgsz"]


# --- command line: JSON schema, summary, --study, bad files, no checkpoint, explanations

RESULT_KEYS = {"file", "image_size", "score", "threshold", "decision", "member_probs", "detector_ran", "boxes",
               "timings_ms", "backend", "precision"}
BOX_KEYS = {"class_id", "class", "lt_code", "score", "box"}


def check_result_schema(r: dict, seg: bool = False):
    assert set(r) == RESULT_KEYS
    assert isinstance(r["file"], str) and len(r["image_size"]) == 2 and all(isinstance(v, int) for v in r["image_size"])
    assert 0 <= r["score"] <= 1 and isinstance(r["threshold"], float)
    assert r["decision"] == ("abnormal" if r["score"] > r["threshold"] else "normal")
    assert list(r["member_probs"]) == list(MEMBERS)
    assert set(r["timings_ms"]) == {"decode", "preprocess", "dernet", "detector", "total"}
    assert r["timings_ms"]["total"] >= r["timings_ms"]["dernet"] + r["timings_ms"]["detector"]
    assert (r["backend"], r["precision"]) == ("torch", "fp32")
    for b in r["boxes"]:
        assert set(b) == BOX_KEYS | ({"mask"} if seg else set())
        H, W = r["image_size"]
        assert 0 <= b["box"][0] <= b["box"][2] <= W and 0 <= b["box"][1] <= b["box"][3] <= H
        assert b["class"] == CLASSES[b["class_id"]] and b["lt_code"].startswith("LT") and CONF < b["score"] <= 1


def test_json_schema_and_summary(tiny_models, detectors, test_records, capsys):
    common = ["--cls-ckpt", tiny_models.cls_ckpt, "--det-ckpt", detectors["seg"], "--precision", "fp32",
              "--device", "cpu", "--no-cascade"]
    paths = [r.path for r in test_records[:2]]
    assert cli(*paths, *common, "--json") == 0
    out = capsys.readouterr().out
    results = json.loads(out)
    assert [r["file"] for r in results] == [str(p) for p in paths]
    for r in results:
        check_result_schema(r, seg=True)
        assert r["detector_ran"]
    assert PATIENT_TAG not in out
    assert cli(paths[0], *common) == 0
    text = capsys.readouterr().out
    assert f"score S = {results[0]['score']:.4f}" in text and "tau = " in text and PATIENT_TAG not in text
    assert all(f"{b['lt_code']:<5} {b['class']:<22} {b['score']:.2f}" in text for b in results[0]["boxes"])


def test_study_decision_is_the_max_view_score(tiny_models, detectors, det_pipe, test_records, tmp_path, capsys):
    paths = [r.path for r in test_records[:2]]
    scores = [det_pipe.analyze(p).result["score"] for p in paths]
    assert scores[0] != scores[1]
    dernet = load_dernet(tiny_models.cls_ckpt)
    dernet.tau = sum(scores) / 2                      # one view above tau, the other not
    save_dernet(dernet, tmp_path / "dernet.pt")
    common = ["--cls-ckpt", tmp_path / "dernet.pt", "--det-ckpt", detectors["det"], "--precision", "fp32",
              "--device", "cpu", "--no-fast-decode", "--study"]
    assert cli(*paths, *common, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    study, views = out["study"], out["images"]
    k = int(np.argmax(scores))
    assert study["score"] == pytest.approx(max(scores)) and study["decision"] == "abnormal"
    assert study["threshold"] == pytest.approx(dernet.tau) and study["max_view"] == str(paths[k])
    assert study["files"] == [str(p) for p in paths] and study["views"] == 2
    assert [v["decision"] for v in views] == ["abnormal" if s > dernet.tau else "normal" for s in scores]
    assert all(v["detector_ran"] for v in views)      # the normal-looking view of an abnormal study too
    assert study["boxes"] == sum(len(v["boxes"]) for v in views) > 0
    assert cli(*paths, *common) == 0
    assert "study of 2 views" in capsys.readouterr().out


def test_bad_files_are_reported_and_the_rest_processed(tiny_models, detectors, test_records, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = folder / "view.dicom"
    good.write_bytes(test_records[0].path.read_bytes())
    (folder / "noext").write_bytes(test_records[1].path.read_bytes())   # an extension-less DICOM is found
    (folder / "broken.dcm").write_bytes(b"\x00" * 64 + b"not a dicom")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "notes.txt").write_text("not an image: skipped in folders")
    missing = tmp_path / "missing.dcm"
    rc = cli(folder, missing, "--cls-ckpt", tiny_models.cls_ckpt, "--det-ckpt", detectors["det"], "--json",
             "--precision", "fp32", "--device", "cpu")
    out, err = capsys.readouterr()
    assert rc == 2
    assert sorted(Path(r["file"]).name for r in json.loads(out)) == ["noext", "view.dicom"]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3
    for name in ("broken.dcm", "truncated.png", "missing.dcm"):
        assert sum(name in line for line in lines) == 1
    assert "Traceback" not in err and "notes.txt" not in err


def test_no_checkpoint_and_bad_checkpoint_messages(tmp_path, tiny_models):
    empty = tmp_path / "runs"
    empty.mkdir()
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    proc = subprocess.run([sys.executable, "infer.py", str(png), "--runs", str(empty)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: no trained DERNet checkpoint under {empty / 'cls'}; "
                                               f"train one with: python train.py --stage cls"]
    garbage = tmp_path / "dernet.pt"
    garbage.write_bytes(b"garbage")
    with pytest.raises(infer.InferError, match="dernet.pt: not a readable PyTorch checkpoint"):
        infer.Pipeline(infer.InferConfig(cls_ckpt=str(garbage), runs=str(empty)))
    with pytest.raises(infer.InferError, match=r"dernet.pt: not a training checkpoint.*train.py --stage det"):
        infer.Pipeline(infer.InferConfig(cls_ckpt=str(tiny_models.cls_ckpt), det_ckpt=str(tiny_models.cls_ckpt)))


def test_explanations_from_the_cli(tiny_models, detectors, det_pipe, test_records, tmp_path, capsys):
    path = test_records[0].path
    assert cli(path, "--cls-ckpt", tiny_models.cls_ckpt, "--det-ckpt", detectors["det"], "--precision", "fp32",
               "--device", "cpu", "--no-fast-decode", "--save", tmp_path / "out", "--json", "--explain", "all",
               "--lime-samples", 6) == 0
    r = json.loads(capsys.readouterr().out)[0]
    stem = path.stem
    expected = {f"{stem}.png", f"{stem}_gradcam.png", f"{stem}_lime.png", *(f"{stem}_gradcam_{m}.png" for m in MEMBERS)}
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected
    annotated = cv2.imread(str(tmp_path / "out" / f"{stem}.png"))
    H, W = r["image_size"]                                 # drawn on the decode: for these low-band models the
    level = low_band_level((H, W), det_pipe.low_band)      # working side's low band, whichever decode
    assert annotated.shape[:2] == (-(-H // 2 ** level), -(-W // 2 ** level))
    decode = lambda b64: cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    for method in ("gradcam", "lime"):
        e = r["explanations"][method]
        assert e["method"] == method and e["time_ms"] > 0
        h, w = e["size"]
        assert max(h, w) == det_pipe.cls_size                 # the classifier's view, without its padding
        assert decode(e["overlay"]).shape == (h, w, 3) and decode(e["map"]).shape == (h, w)
        on_disk = cv2.imread(str(tmp_path / "out" / f"{stem}_{method}.png"))
        np.testing.assert_array_equal(on_disk, decode(e["overlay"]))
    assert set(r["explanations"]["gradcam"]["members"]) == set(MEMBERS)
    with pytest.raises(infer.InferError, match="unknown explanation"):
        det_pipe.explain(det_pipe.analyze(path), "shap")


def test_health(det_pipe, seg_pipe):
    h = det_pipe.health()
    assert set(h) == {"ready", "backend", "precision", "fast_decode", "low_band", "device", "dernet", "detector"}
    assert (h["ready"], h["backend"], h["precision"], h["device"]) == (True, "torch", "fp32", "cpu")
    assert h["low_band"] is True and h["fast_decode"] == det_pipe.cfg.fast_decode
    assert h["dernet"]["members"] == list(MEMBERS) and h["dernet"]["omega"] == pytest.approx([0.42, 0.32, 0.26])
    assert set(h["dernet"]) == {"members", "omega", "tau", "image_sizes", "file", "version"}
    assert set(h["detector"]) == {"stage", "scale", "names", "lt_codes", "imgsz", "file", "version"}
    digest = hashlib.sha256(Path(h["dernet"]["file"]).read_bytes()).hexdigest()
    assert h["dernet"]["version"] == digest[:12] and len(h["detector"]["version"]) == 12
    assert (h["detector"]["stage"], seg_pipe.health()["detector"]["stage"]) == ("det", "seg")
    json.dumps(h)


# --- precision and fast decode (issue 11)

def test_precision_choice(monkeypatch):
    assert not infer.native_bf16("AVX2", "flags\t\t: fpu sse avx2 fma\n")
    assert infer.native_bf16("AVX512", "flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert infer.native_bf16("AVX512", "flags\t\t: fpu amx_bf16 amx_tile\n")
    assert infer.native_bf16("AVX512_BF16", "")
    cpu = torch.device("cpu")
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(infer, "native_bf16", lambda: native)
        assert infer.resolve_precision("auto", cpu, "torch") == expected
    assert infer.resolve_precision("bf16", cpu, "torch") == "bf16"      # selectable explicitly anywhere
    assert infer.resolve_precision("auto", cpu, "onnx") == "fp32"
    with pytest.raises(infer.InferError, match="CUDA"):
        infer.resolve_precision("fp16", cpu, "torch")
    with pytest.raises(infer.InferError, match="torch-backend"):
        infer.resolve_precision("bf16", cpu, "onnx")


def test_bf16_and_fast_decode_stay_close_to_fp32_full_decode(tiny_models, detectors, det_pipe, synthetic_root,
                                                             monkeypatch):
    path = next(r.path for r in load_split(synthetic_root, "test")
                if pydicom.dcmread(r.path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed)
    reference = det_pipe.analyze(path, cascade=False).result
    monkeypatch.setattr(det_pipe, "reduce_to", det_pipe.cls_size)           # what fast_decode=True sets
    fast = det_pipe.analyze(path, cascade=False)
    H, W = reference["image_size"]
    assert det_pipe.cls_size <= max(fast.image.shape) < max(H, W)   # a reduced level, never below the model
    assert fast.scale == pytest.approx(fast.image.shape[1] / W) and fast.result["image_size"] == [H, W]
    # low-band models (DataConfig.low_band, these): the fast decode is the reference image, bit for bit
    assert det_pipe.low_band is not None
    assert fast.result["score"] == reference["score"] and fast.result["boxes"] == reference["boxes"]
    monkeypatch.setattr(det_pipe, "low_band", None)                         # older models: the area path, where
    area_fast = det_pipe.analyze(path, cascade=False).result                # the fast decode approximates
    monkeypatch.setattr(det_pipe, "reduce_to", None)
    area = det_pipe.analyze(path, cascade=False).result
    assert area_fast["score"] != area["score"] and abs(area_fast["score"] - area["score"]) < 0.01   # issue 11
    monkeypatch.undo()
    bf16 = make_pipe(tiny_models, detectors["det"], precision="bf16")
    r = bf16.analyze(path, cascade=False).result
    assert r["precision"] == "bf16" and abs(r["score"] - reference["score"]) < 0.02
    assert len(r["boxes"]) > 0


@pytest.mark.parametrize("name", [*MEMBERS, "yolo11-seg"])
def test_precast_weights_give_autocast_results_bit_for_bit(name):
    torch.manual_seed(0)
    if name == "yolo11-seg":  # convolutions, a transposed convolution (Proto), attention
        model, x = YOLO11Seg(nc=len(CLASSES), scale="n").fuse(), torch.rand(1, 3, 64, 64)
    else:                     # convolutions, BatchNorm (kept fp32), the linear classifier
        model, x = Member(name).eval(), torch.rand(1, 1, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        fast = infer.precast(copy.deepcopy(model), torch.bfloat16)
        got = fast(x)
    layers = [m for m in fast.modules() if isinstance(m, infer.AUTOCAST_LAYERS)]
    assert layers and all(p.dtype == torch.bfloat16 for m in layers for p in m.parameters())
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, kept", [("densenet121", 62), ("efficientnet_v2_s", 0), ("resnet50", 0)])
def test_fused_member_norms_give_the_unfused_outputs(name, kept):
    """Every BatchNorm right after a convolution is folded into it; DenseNet's pre-activation norms
    (58 norm1, 3 transitions, norm5) stay. Random statistics, so a wrong pair would show."""
    torch.manual_seed(0)
    member = Member(name).eval()
    for m in member.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    dernet = DERNet({name: member}, omega=[1.0], image_sizes={name: 64})
    fused = infer.fuse_member_norms(copy.deepcopy(dernet))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == kept
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fused.member_probs(x), dernet.member_probs(x), rtol=0, atol=1e-5)


def test_bf16_backend_converts_a_copy_and_keeps_the_member_stems_fp32(tiny_models, detectors):
    pipe = make_pipe(tiny_models, detectors["det"], precision="bf16")
    stems = {m.conv for m in pipe.backend.dernet.modules() if isinstance(m, infer.FP32Conv)}
    convs = [m for m in pipe.backend.dernet.modules() if isinstance(m, nn.Conv2d)]
    assert len(stems) == len(MEMBERS) and all(c.weight.dtype == torch.float32 for c in stems)
    assert all(c.weight.dtype == torch.bfloat16 for c in convs if c not in stems)
    assert all(m.weight.dtype == torch.float32 for m in pipe.dernet.modules() if isinstance(m, nn.Conv2d))  # Grad-CAM
    norms = [sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) for d in (pipe.backend.dernet, pipe.dernet)]
    assert norms == [62, 284]                               # folded in the bf16 copy only (fuse_member_norms)
    assert pipe.backend.detector.backbone.stem.conv.weight.dtype == torch.bfloat16
    head_outputs = [m.conv for m in pipe.backend.detector.modules() if isinstance(m, infer.FP32Conv)]
    assert len(head_outputs) == 6 and all(c.weight.dtype == torch.float32 for c in head_outputs)


@pytest.mark.parametrize("model_class", [YOLO11, YOLO11Seg])
def test_fp32_head_outputs_are_unrounded_logits_under_bf16_autocast(model_class):
    """Each head branch's last convolution keeps its fp32 weights and returns the fp32 convolution of
    its (bf16) input, bit for bit; the layers before it still run in bf16."""
    torch.manual_seed(0)
    model, x = model_class(nc=len(CLASSES), scale="n").fuse().eval(), torch.rand(1, 3, 64, 64)
    fast = infer.precast(infer.fp32_head_outputs(copy.deepcopy(model)), torch.bfloat16)
    wrapped = {name: m for name, m in fast.named_modules() if isinstance(m, infer.FP32Conv)}
    assert len(wrapped) == 3 * (3 if model_class is YOLO11Seg else 2)   # box, cls [, coef] per level
    seen = {}
    for name, m in wrapped.items():
        m.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x)
    for name, (inp, out) in seen.items():
        original = model.get_submodule(name)                       # the fp32 nn.Conv2d it wraps
        assert inp.dtype == torch.bfloat16 and out.dtype == torch.float32
        with torch.inference_mode():
            assert torch.equal(out, original(inp.float()))
    assert len(seen) == len(wrapped)


@pytest.mark.parametrize("name", MEMBERS)
def test_fp32_stem_sees_the_image_unrounded_under_bf16_autocast(name):
    """The stem's output equals the fp32 convolution of the fp32 normalised image, bit for bit; the
    rest of the member still runs in bf16."""
    torch.manual_seed(0)
    member, x = Member(name).eval(), torch.rand(1, 1, 64, 64)
    dernet = DERNet({name: copy.deepcopy(member)}, omega=[1.0], image_sizes={name: 64})
    fast = infer.precast(infer.fp32_stems(dernet), torch.bfloat16).members[name]
    stem_path = ARCHS[name]["stem"]
    seen = {}
    fast.net.get_submodule(stem_path).register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.inference_mode():
        want = member.net.get_submodule(stem_path)((x.expand(-1, 3, -1, -1) - member.mean) / member.std)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logit = fast(x)
    assert seen["out"].dtype == torch.float32 and torch.equal(seen["out"], want)
    assert logit.dtype == torch.bfloat16 and torch.isfinite(logit).all()   # the head ran in bf16


# --- ONNX export round trip (one export per module: the three members make it the slowest step)

@pytest.fixture(scope="module")
def onnx_dir(tiny_models, detectors, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert cli("--export", "onnx", "--out", out, "--cls-ckpt", tiny_models.cls_ckpt,
               "--det-ckpt", detectors["seg"]) == 0
    return out


def test_onnx_files_are_self_contained_with_metadata(onnx_dir, seg_pipe):
    import onnxruntime as ort
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["dernet.onnx", "detector.onnx"]   # no external data
    for name in ("dernet.onnx", "detector.onnx"):
        model = onnx.load(str(onnx_dir / name))
        onnx.checker.check_model(model)
        assert {o.domain: o.version for o in model.opset_import}[""] == infer.ONNX_OPSET
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param      # dynamic batch axis
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_dir / "dernet.onnx")).metadata_props}
    assert meta["tau"] == seg_pipe.tau and meta["omega"] == pytest.approx([0.42, 0.32, 0.26])
    assert meta["image_sizes"] == seg_pipe.dernet.image_sizes and meta["preprocess"]["clahe_clip_limit"] == 2.0
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_dir / "detector.onnx")).metadata_props}
    assert meta["class_names"] == list(CLASSES) and meta["lt_codes"][0] == "LT2" and meta["strides"] == [8, 16, 32]
    assert meta["stage"] == "seg" and meta["nms_iou"] == 0.5 and "pad_value" in meta["preprocess"]
    session = ort.InferenceSession(str(onnx_dir / "detector.onnx"), providers=["CPUExecutionProvider"])
    S = seg_pipe.det_meta["imgsz"]
    out = session.run(None, {"images": np.random.default_rng(0).random((3, 3, S, S), np.float32)})   # batch 3
    assert out[0].shape[:2] == (3, 4 + len(CLASSES) + 32) and out[1].shape == (3, 32, S // 4, S // 4)


def test_onnx_backend_equals_torch(onnx_dir, tiny_models, detectors, seg_pipe, test_records):
    pipe = make_pipe(tiny_models, detectors["seg"], backend="onnx", onnx_dir=str(onnx_dir))
    assert pipe.health()["backend"] == "onnx" and pipe.precision == "fp32"
    n_boxes = 0
    for record in test_records[:2]:
        a, b = (p.analyze(record.path, cascade=False).result for p in (pipe, seg_pipe))
        assert abs(a["score"] - b["score"]) < 1e-4 and a["backend"] == "onnx"
        assert list(a["member_probs"].values()) == pytest.approx(list(b["member_probs"].values()), abs=1e-4)
        reference = np.array([[*x["box"], x["score"], x["class_id"]] for x in b["boxes"]]).reshape(-1, 6)

        def same_mask(box: dict, k: int) -> bool:
            ma, mb = infer.rle_decode(box["mask"]), infer.rle_decode(b["boxes"][k]["mask"])
            return (ma & mb).sum() >= 0.99 * (ma | mb).sum()

        assert_same_boxes(a["boxes"], reference, agree=same_mask)   # every box with its mask
        n_boxes += len(a["boxes"])
    assert n_boxes > 0
    with pytest.raises(infer.InferError, match="exported from another checkpoint"):
        make_pipe(tiny_models, detectors["det"], backend="onnx", onnx_dir=str(onnx_dir))
