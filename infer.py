"""Phase III: cascaded clinical inference (Algorithm 1, lines 16-22), ONNX export, and explanations.

For one radiograph x (DICOM with or without extension, PNG or JPEG), Algorithm 1's Phase III:

    1. decode and window x (data.load_image); a JPEG 2000 DICOM may be decoded at a reduced resolution
       level, never below the largest CLAHE working side (issue 11, --fast-decode). Models trained on
       the 5/3 wavelet low band (data.wavelet_low_band, the default since issue 11) get the same low
       band from either decode; older ones get the reduced decode resampled with the full path's blur
       (data.resample_reduced), an approximation,
    2. S = sum_m omega_m P_m(x)  with DenseNet121, EfficientNetV2-S, ResNet50      (Eq. 2, line 16)
    3. if S > tau_optimal:                                                         (line 17)
           B = NMS(YOLO11(x), IoU 0.5), boxes mapped back to ORIGINAL pixels       (lines 18-19)
       else: "normal study", no boxes                                              (lines 20-22)
    A YOLO11-seg checkpoint adds one instance mask per box (Fig. 4c), as COCO RLE in original pixels.

Preprocessing is the one training and evaluation use (data.prepare_image: shrink to the working
side, CLAHE, Eq. 1, shrink to the model size; classifier letterbox black, detector letterbox grey
114), so with --no-fast-decode a score here equals train.py's evaluation score for the same file.
When the DERNet and the detector were trained at the same working side, one CLAHE serves both. The
models are loaded, Conv+BN fused (detector), put in channels-last memory and warmed once per
process; --precision auto runs bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX) and
fp16/bf16 on CUDA, else fp32, on a copy of the DERNet with its Conv+BN pairs fused and the weights
autocast converts stored in that precision once (precast); the members' stems and the detector head's
output layers stay fp32. Detector boxes decode in fp32 whatever the precision. python bench.py infer
times all of it, python bench.py guard checks its accuracy against fp32 + full decode (issue 11).
The same cascade runs on ONNX Runtime (--backend onnx) from two self-contained files written by
--export onnx. Grad-CAM and LIME (Fig. 4a-b) explain the ensemble score.

    python infer.py image.dcm                          # summary: score, tau, decision, boxes
    python infer.py scans/ --json > results.json       # folders too; one JSON object per image
    python infer.py ap.dcm lat.dcm --study             # one study: decision = max of the view scores
    python infer.py image.dcm --save out/ --explain all  # annotated PNG + Grad-CAM and LIME overlays
    python infer.py image.dcm --no-cascade             # detector regardless of S (evaluation)
    python infer.py --export onnx --out onnx/          # dernet.onnx + detector.onnx
    python infer.py image.dcm --backend onnx --onnx-dir onnx/

Checkpoints default to the newest runs/cls/*/dernet.pt (python train.py --stage cls) and the newest
runs/{seg,det}/*/best.pt (python train.py --stage det | seg). Exit status 0, or 2 when a file could
not be read or no checkpoint exists (one line each on stderr). No patient-identifying DICOM field is
ever read into a result or printed.

Sections (bottom-up): explanations -> configuration -> loading -> preprocessing and geometry ->
cascade -> ONNX -> rendering -> command line.
"""
import argparse
import base64
import copy
import hashlib
import json
import math
import os
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import cv2
import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances
from tqdm import tqdm

from data import (CLASS_COLOURS, CLASSES, IMAGE_SUFFIXES, LT_CODES, DataConfig, DataError, atomic_write,
                  boxes_from_letterbox, clahe_image, classifier_input, detector_canvas, letterbox_geometry,
                  load_image, shrink_u8, sniff_format, use_jpeg2000_threads, working_side)
from dernet import ARCHS, DERNet, load_dernet, resize_to, soft_vote
from train import CheckpointError, channels_last, image_region, load_checkpoint, native_bf16
from yolo11 import YOLO11, YOLO11Seg, YOLOConfig, non_max_suppression, process_masks


# --- explanations: Grad-CAM (Selvaraju et al. 2017) and LIME (Ribeiro et al. 2016)
#
# Grad-CAM (Fig. 4b): for one member, A = the last convolutional feature map (B=1, C, h, w) and y the
# abnormal logit; channel weights alpha_k = mean_ij dy/dA_kij; map = ReLU(sum_k alpha_k A_k),
# upsampled bilinearly to the input. Targets (Member.cam_layer): DenseNet121 `features` (after norm5
# and torchvision's in-place ReLU, see grad_cam), EfficientNetV2-S `features[-1]`, ResNet50 `layer4`.
# Each is the map the head global-average-pools, so for these linear heads Grad-CAM equals CAM.
#
# LIME (Fig. 4a): superpixels switched on/off at random, a weighted ridge regression of the ensemble
# score on the on/off pattern, and the superpixels with the largest positive coefficients shown.

LIME_SEGMENTS = 49         # ~7 x 7 superpixels: few enough to be estimated from LIME_SAMPLES samples
LIME_SAMPLES = 64          # perturbations; a 384-px explanation of the 3-member ensemble in <= 30 s on 2 CPU cores
LIME_BATCH = 8             # perturbed images per ensemble forward pass
LIME_KERNEL_WIDTH = 0.25   # Ribeiro et al. 2016 / lime's image explainer: exp kernel on cosine distance
LIME_RIDGE_ALPHA = 1.0     # lime's default surrogate, sklearn Ridge(alpha=1)
LIME_TOP_SEGMENTS = 5      # lime's get_image_and_mask(num_features=5, positive_only=True)
LIME_SMOOTH_SIGMA = 1.0    # px, Gaussian smoothing before the watershed (quantum noise of radiographs)
OVERLAY_ALPHA = 0.4        # heat-map opacity in overlays
OVERLAY_CMAP = "jet"       # the customary Grad-CAM palette


def grad_cam(member: nn.Module, x: torch.Tensor, layer: nn.Module | None = None,
             size: tuple[int, int] | None = None) -> np.ndarray:
    """Raw (unnormalised) Grad-CAM of one member's abnormal logit. x (1, 1, H, W) -> (H, W) float32 >= 0.

    `layer` defaults to member.cam_layer; `size` (default: x's H, W) is the output size. The member must
    be in eval() mode (BatchNorm with running statistics); it is not modified.

    How it stays safe to call from an app:
      * The forward hook is registered for this call only and removed in `finally` (no leaks).
      * No backward hooks: the hook keeps a reference to the layer's output tensor A and we call
        torch.autograd.grad(y, A). That works with in-place ReLUs. For DenseNet121, torchvision runs
        F.relu(features, inplace=True) after `features`: the ReLU overwrites A and re-bases its autograd
        history, so A and dy/dA are both those of the rectified map the classifier pools -- the map
        Grad-CAM is defined on (and the same kind of map as ResNet's layer4 output).
      * Thread safety: no state is kept on the module; the hook records only tensors produced by the
        calling thread, so concurrent calls (or plain predictions from other threads) on the same
        member never see each other's activations, and no lock is needed. Parameter .grad fields are
        never written (autograd.grad w.r.t. A only).
      * Gradients are enabled locally, also when the caller runs under torch.inference_mode(): the
        input is cloned outside inference mode and made to require grad, so it works with frozen
        parameters too.
    """
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 1:
        raise ValueError(f"grad_cam expects one image (1, 1, H, W), got {tuple(x.shape)}")
    if member.training:
        raise ValueError("grad_cam needs the model in eval() mode (BatchNorm running statistics)")
    layer = member.cam_layer if layer is None else layer
    size = tuple(x.shape[-2:]) if size is None else size
    caller = threading.get_ident()
    outputs = []

    def keep_output(module, inputs, output):
        if threading.get_ident() == caller:
            outputs.append(output)

    handle = layer.register_forward_hook(keep_output)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(True)             # a normal tensor even from inference mode
            logit = member(x)                              # (1,)
            if len(outputs) != 1:
                raise ValueError(f"the Grad-CAM layer ran {len(outputs)} times in the forward pass (expected 1)")
            (A,) = outputs                                 # (1, C, h, w), rectified in place for DenseNet
            (dA,) = torch.autograd.grad(logit.sum(), A)    # (1, C, h, w)
    finally:
        handle.remove()
    with torch.no_grad():
        alpha = dA.mean(dim=(2, 3), keepdim=True)          # (1, C, 1, 1) spatially averaged gradients
        cam = F.relu((alpha * A).sum(dim=1, keepdim=True))  # (1, 1, h, w)
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)   # (1, 1, H, W)
    return cam[0, 0].float().cpu().numpy()


def normalise_map(cam: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by its maximum (all zeros stays all zeros)."""
    peak = float(cam.max())
    return (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)


def ensemble_grad_cam(dernet: DERNet, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-member raw Grad-CAM maps and their Omega-weighted combination. x (1, 1, H, W).

    Returns ({member name: raw (H, W) map}, ensemble (H, W) in [0, 1]). Each member sees x at its own
    input size, as in DERNet.forward; its map is upsampled back to (H, W).

    The raw maps are combined first and the sum is normalised once. A raw map is in the member's logit
    units (for these global-average-pooled linear heads its spatial mean before the ReLU is the logit
    minus the bias), so the maps are on one scale and their Omega-weighted sum keeps the relative
    evidence. Normalising each member first would stretch a near-constant map from an uninformative
    member to the full [0, 1] range and give it the same say as a sharply peaked, confident one.
    """
    H, W = x.shape[-2:]
    maps = {name: grad_cam(member, resize_to(x, dernet.image_sizes[name]), size=(H, W))
            for name, member in dernet.members.items()}
    combined = sum(float(w) * maps[name] for name, w in zip(dernet.members, dernet.omega))
    return maps, normalise_map(combined)


def superpixels(image: np.ndarray, n_segments: int = LIME_SEGMENTS) -> np.ndarray:
    """Grid-seeded watershed superpixels. image (H, W) float [0, 1] -> labels (H, W) int32 in 0..K-1.

    Choice for grayscale radiographs: OpenCV's SLIC/SEEDS live in cv2.ximgproc, which
    opencv-python-headless does not ship. A watershed flooded from a regular grid of seeds gives the
    same kind of partition with what is available: about n_segments regions of similar size (one
    per seed, each connected), whose borders settle on the strongest intensity edges between seeds --
    cortical rims, end plates and disc spaces -- rather than cutting across a vertebra. The image is
    smoothed first so quantum noise does not create edges, and each seed moves to the flattest pixel
    of its 3 x 3 neighbourhood (as SLIC does) so it does not start on an edge.
    """
    H, W = image.shape
    step = max(1, round(np.sqrt(H * W / n_segments)))
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), LIME_SMOOTH_SIGMA)
    gray = np.round(smooth * 255).clip(0, 255).astype(np.uint8)
    grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))   # (H, W) edge strength
    # 1. seeds on a regular grid, each nudged to the lowest gradient in its 3 x 3 neighbourhood
    markers = np.zeros((H, W), np.int32)
    ys = np.arange(step // 2, H, step)
    xs = np.arange(step // 2, W, step)
    for k, (sy, sx) in enumerate((sy, sx) for sy in ys for sx in xs):
        y0, x0 = max(sy - 1, 0), max(sx - 1, 0)
        patch = grad[y0:sy + 2, x0:sx + 2]
        dy, dx = np.unravel_index(np.argmin(patch), patch.shape)
        markers[y0 + dy, x0 + dx] = k + 1
    # 2. flood (OpenCV's watershed orders pixels by intensity difference to the labelled neighbour)
    cv2.watershed(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), markers)
    # 3. watershed lines (-1) and the image frame join a neighbouring region
    while (markers <= 0).any():
        grown = cv2.dilate(markers.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
        markers = np.where(markers > 0, markers, grown)
    return np.unique(markers, return_inverse=True)[1].reshape(H, W).astype(np.int32)   # 0..K-1


class LimeExplanation(NamedTuple):
    segments: np.ndarray   # (H, W) int32 superpixel label per pixel
    weights: np.ndarray    # (K,) surrogate coefficient per superpixel (evidence for "abnormal")
    mask: np.ndarray       # (H, W) bool, the top positive superpixels


def lime_explain(predict_fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
                 n_samples: int = LIME_SAMPLES, seed: int = 42, n_segments: int = LIME_SEGMENTS,
                 batch_size: int = LIME_BATCH, top: int = LIME_TOP_SEGMENTS,
                 kernel_width: float = LIME_KERNEL_WIDTH) -> LimeExplanation:
    """LIME for an image classifier (Ribeiro et al. 2016), seeded: same input and seed, same result.

    predict_fn: (N, H, W) float32 images in [0, 1] -> (N,) abnormal scores (e.g. `dernet_predict_fn`).
    image: (H, W) float in [0, 1], as the model sees it (after CLAHE).
    """
    image = np.asarray(image, dtype=np.float32)
    # 1. superpixels, K of them
    segments = superpixels(image, n_segments)                      # (H, W)
    K = int(segments.max()) + 1
    # 2. random on/off patterns; the first sample is the unperturbed image (as in lime)
    rng = np.random.default_rng(seed)
    Z = rng.integers(0, 2, size=(n_samples, K))                   # (N, K) 1 = superpixel kept
    Z[0] = 1
    # 3. ensemble scores of the perturbed images, switched-off superpixels filled with the image mean
    fill = np.float32(image.mean())
    scores = np.empty(n_samples)
    for i in range(0, n_samples, batch_size):
        keep = Z[i:i + batch_size][:, segments].astype(bool)     # (b, H, W)
        scores[i:i + batch_size] = predict_fn(np.where(keep, image, fill))
    # 4. locality: exponential kernel on the cosine distance to the unperturbed pattern (lime's form)
    d = pairwise_distances(Z, np.ones((1, K)), metric="cosine").ravel()   # (N,)
    kernel = np.sqrt(np.exp(-(d ** 2) / kernel_width ** 2))
    # 5. weighted ridge surrogate: score ~ b + sum_k w_k z_k
    surrogate = Ridge(alpha=LIME_RIDGE_ALPHA).fit(Z, scores, sample_weight=kernel)
    weights = surrogate.coef_.astype(np.float64)                   # (K,)
    # 6. the `top` superpixels with the largest positive weights
    order = np.argsort(-weights, kind="stable")[:top]
    chosen = order[weights[order] > 0]
    return LimeExplanation(segments, weights, np.isin(segments, chosen))


def dernet_predict_fn(dernet: DERNet) -> Callable[[np.ndarray], np.ndarray]:
    """A LIME predict_fn: (N, H, W) float32 [0, 1] -> (N,) ensemble scores S (Eq. 2)."""
    device = dernet.omega.device

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
            return dernet(x[:, None]).float().cpu().numpy()       # (N, 1, H, W) -> (N,)

    return predict


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA,
                    cmap: str = OVERLAY_CMAP) -> np.ndarray:
    """image (H, W) [0, 1], cam (H, W) >= 0 -> RGB (H, W, 3) uint8: the coloured map over the image."""
    colour = matplotlib.colormaps[cmap](normalise_map(cam))[..., :3]   # (H, W, 3) in [0, 1]
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    return np.round(255 * ((1 - alpha) * gray + alpha * colour)).astype(np.uint8)


def lime_overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0),
                 alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """image (H, W) [0, 1], mask (H, W) bool -> RGB (H, W, 3) uint8: chosen superpixels tinted, outlined."""
    rgb = np.repeat(np.round(255 * np.clip(image, 0, 1))[..., None], 3, axis=2)
    tint = np.asarray(colour, dtype=np.float64)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * tint
    m = mask.astype(np.uint8)
    outline = cv2.morphologyEx(m, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    rgb[outline] = tint
    return rgb.astype(np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of (H, W) or RGB (H, W, 3) uint8, or of a float map in [0, 1] (stored as 8-bit gray)."""
    if img.dtype.kind == "f":
        if img.ndim != 2 or not (np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1):
            raise ValueError("float images to encode must be 2-D maps with values in [0, 1]")
        img = np.round(img * 255).astype(np.uint8)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"cannot encode {img.dtype} array of shape {img.shape} as PNG")
    ok, buf = cv2.imencode(".png", img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def encode_png_base64(img: np.ndarray) -> str:
    """encode_png as an ASCII base64 string, for JSON responses and data: URLs."""
    return base64.b64encode(encode_png(img)).decode("ascii")


# --- configuration and errors

PRECISIONS = ("auto", "fp32", "bf16", "fp16")   # fp16 autocast is a CUDA option
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)   # what autocast runs in bf16 / fp16
BACKENDS = ("torch", "onnx")
EXPLAIN_METHODS = ("gradcam", "lime")
MASK_COEFFS = YOLOConfig.nm                      # 32 mask coefficients per box (YOLO11-seg)
MASK_THRESHOLD = YOLOConfig.mask_thres           # issue 8: mask = sigmoid(coeffs . protos) > 0.5


@dataclass
class InferConfig:
    cls_ckpt: str | None = None        # DERNet checkpoint (dernet.pt); None = newest runs/cls/**/dernet.pt
    det_ckpt: str | None = None        # detector checkpoint (best.pt, stage det or seg); None = newest of
    #                                    runs/seg/**/best.pt and runs/det/**/best.pt (by mtime)
    runs: str = "runs"                 # train.py --out: where the newest checkpoints are looked for
    backend: str = "torch"             # torch | onnx (Clinical Deployment: ONNX Runtime)
    onnx_dir: str | None = None        # backend onnx: folder with dernet.onnx + detector.onnx; None = export
    #                                    once into onnx/ next to each checkpoint
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (issue 11: bf16 only where native; CUDA autocast)
    fast_decode: bool = True           # reduced-resolution JPEG 2000 decode, never below the working side (issue 11)
    cascade: bool = True               # Algorithm 1, line 17: detector only if S > tau; False = --no-cascade
    conf: float = YOLOConfig.conf_thres   # 0.25, the published predictor's display confidence
    nms_iou: float = YOLOConfig.iou_thres  # 0.5, Algorithm 1, line 18
    max_det: int = YOLOConfig.max_det  # 100 per image (REFERENCE §2)
    lime_samples: int = LIME_SAMPLES   # issue 7: <= 30 s for a 384-px ensemble explanation on 2 CPU cores
    device: str = "auto"               # auto | cpu | cuda | cuda:N


class InferError(RuntimeError):
    """A user-facing problem: missing or mismatched checkpoint or ONNX file, a bad option. One line
    naming the file and what to do (bad image files raise data.DataError instead)."""


def check_config(cfg: InferConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise InferError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.precision not in PRECISIONS:
        raise InferError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if not 0 <= cfg.conf < 1 or not 0 < cfg.nms_iou <= 1:
        raise InferError(f"need 0 <= conf < 1 and 0 < nms_iou <= 1, got conf {cfg.conf}, nms_iou {cfg.nms_iou}")
    if cfg.max_det < 1 or cfg.lime_samples < 2:
        raise InferError(f"need max_det >= 1 and lime_samples >= 2, got {cfg.max_det} and {cfg.lime_samples}")


# --- loading: checkpoints, device, precision, models

def file_version(path: Path) -> str:
    """A checkpoint's version: the first 12 hex digits of its SHA-256 (what /api/health reports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _newest(paths) -> Path | None:
    files = [p for p in paths if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def find_checkpoints(cfg: InferConfig) -> tuple[Path, Path | None]:
    """(DERNet checkpoint, detector checkpoint or None): the given files, else the newest under cfg.runs."""
    runs = Path(cfg.runs)
    if cfg.cls_ckpt:
        cls_path = Path(cfg.cls_ckpt)
        if not cls_path.is_file():
            raise InferError(f"{cls_path}: DERNet checkpoint not found")
    else:
        cls_path = _newest((runs / "cls").rglob("dernet.pt"))
        if cls_path is None:
            raise InferError(f"no trained DERNet checkpoint under {runs / 'cls'}; "
                             f"train one with: python train.py --stage cls")
    if cfg.det_ckpt:
        det_path = Path(cfg.det_ckpt)
        if not det_path.is_file():
            raise InferError(f"{det_path}: detector checkpoint not found")
    else:
        det_path = _newest([*(runs / "seg").rglob("best.pt"), *(runs / "det").rglob("best.pt")])
    return cls_path, det_path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InferError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InferError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device, backend: str) -> str:
    """'auto' -> fp32 | bf16 | fp16 for this machine (issue 11); explicit choices are checked."""
    if precision not in PRECISIONS:
        raise InferError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend == "onnx":
        if precision in AUTOCAST_DTYPES:
            raise InferError(f"--precision {precision} is a torch-backend option; the ONNX models run in fp32")
        return "fp32"
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "fp16":
        raise InferError("fp16 autocast is a CUDA option; on a CPU use --precision bf16 or fp32")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def load_classifier(path: Path, device: torch.device) -> DERNet:
    """The DERNet ensemble (members, Omega, tau, image sizes, CLAHE settings) in eval mode."""
    try:
        dernet = load_dernet(path)
    except ValueError as err:
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise InferError(f"{message}; pass the dernet.pt written by python train.py --stage cls") from None
    return dernet.to(device).eval()


def load_detector(path: Path) -> tuple[YOLO11, dict]:
    """A train.py detector checkpoint (stage det or seg) -> (YOLO11 / YOLO11Seg, Conv+BN fused, eval, CPU;
    its meta: stage, scale, names, lt_codes, imgsz, strides, preprocess)."""
    hint = "the detector needs best.pt from python train.py --stage det (or seg)"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise InferError(f"{err}; {hint}") from None
    if ckpt["stage"] not in ("det", "seg"):
        raise InferError(f"{path}: a '{ckpt['stage']}' checkpoint; {hint}")
    seg = ckpt["stage"] == "seg"
    model = (YOLO11Seg if seg else YOLO11)(nc=int(ckpt["nc"]), scale=ckpt["scale"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:   # torch lists every key: keep the first line
        first = str(err).splitlines()[0][:120]
        raise InferError(f"{path}: weights do not fit YOLO11-{ckpt['scale']} ({first})") from None
    preprocess = {"clahe_clip_limit": DataConfig.clahe_clip, "clahe_tile_grid": DataConfig.clahe_tiles,
                  "pad_value": DataConfig.pad_value, **ckpt.get("preprocess", {})}
    meta = {"stage": ckpt["stage"], "scale": ckpt["scale"], "names": list(ckpt.get("names", CLASSES)),
            "lt_codes": list(ckpt.get("lt_codes", LT_CODES)), "imgsz": int(ckpt["imgsz"]),
            "strides": [int(s) for s in ckpt.get("strides", YOLOConfig.strides)], "preprocess": preprocess}
    return model.fuse(), meta


# --- preprocessing and geometry: model inputs, and outputs mapped back to the original image

def working_params(preprocess: Mapping) -> dict:
    """A checkpoint's preprocess record -> working_image's keyword arguments. Checkpoints from before
    clahe_side existed record none (None): CLAHE ran at their input size, and still does."""
    return {"clip_limit": float(preprocess.get("clahe_clip_limit", DataConfig.clahe_clip)),
            "tile_grid": int(preprocess.get("clahe_tile_grid", DataConfig.clahe_tiles)),
            "clahe_side": preprocess.get("clahe_side")}


def trained_on_low_band(preprocess: Mapping) -> bool:
    """Whether a checkpoint's images went through data.wavelet_low_band; older ones record nothing: no."""
    return bool(preprocess.get("low_band", False))


def working_key(size: int, params: dict) -> tuple[int, float, int]:
    """What working_image depends on for a model of input size `size`: (side, clip limit, tile grid)."""
    return working_side(size, params["clahe_side"]), params["clip_limit"], params["tile_grid"]


def working_image(img: np.ndarray, size: int, clip_limit: float, tile_grid: int,
                  clahe_side: int | None, full_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Display image (h, w) in [0, 1] -> the CLAHE'd (Eq. 1) uint8 working image a model of input size
    `size` is shrunk from (data.prepare_image's first half: clahe_image at working_side), sized from
    full_hw, the original (H, W), when img is a reduced decode."""
    return clahe_image(img, working_side(size, clahe_side), clip_limit=clip_limit, tile_grid=tile_grid,
                       full_hw=full_hw)


def classifier_view(work: np.ndarray, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Working image (h, w) uint8 -> DERNet input (1, size, size) float32 in [0, 1], and the (rows, cols)
    of it that hold the image. Exactly the evaluation path of train.py (ClassificationDataset without
    augmentation): prepare_image at the input size (working_image, then shrink), then the black
    letterbox of data.classifier_input."""
    u8 = shrink_u8(work, size)                                                  # (h', w') uint8
    x = classifier_input(u8, size)                                             # (1, S, S)
    _, (new_h, new_w), (pad_x, pad_y) = letterbox_geometry(u8.shape, size)
    return x, (slice(pad_y, pad_y + new_h), slice(pad_x, pad_x + new_w))


def detector_view(work: np.ndarray, orig_hw: tuple[int, int], size: int,
                  pad_value: float) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Working image -> detector input (size, size) float32 [0, 1], letterbox ratio and padding: exactly
    DetectionDataset.load_sample without augmentation (prepare_image at the input size; then
    data.detector_canvas). Boxes map back with data.boxes_from_letterbox."""
    canvas, ratio, (pad_x, pad_y) = detector_canvas(shrink_u8(work, size), orig_hw, size, pad_value)
    return canvas, ratio, (float(pad_x), float(pad_y))


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> uncompressed COCO RLE {"size": [H, W], "counts": [...]}: the run lengths of the
    column-major flattening, alternating 0s and 1s and starting with a (possibly empty) run of 0s.
    pycocotools reads it with frPyObjects(rle, H, W)."""
    mask = np.asarray(mask, bool)
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    """Uncompressed COCO RLE -> (H, W) bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, not {h} x {w}")
    return flat.reshape(w, h).T


def mask_to_original(mask: np.ndarray, box: np.ndarray, orig_hw: tuple[int, int]) -> dict:
    """An instance mask in the letterboxed image region (h_r, w_r) -> COCO RLE in original pixels.

    Nearest neighbour at pixel centres (X + 0.5) * w_r / W, no invented detail, and cropped to the box
    in original pixels as process_masks crops to the box in input pixels. Only the box's columns are
    materialised, so a 3,000 x 2,500 image with 100 masks stays small.
    """
    H, W = orig_hw
    h_r, w_r = mask.shape
    x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x1, y1 = min(int(math.ceil(box[2])), W), min(int(math.ceil(box[3])), H)
    if x1 <= x0 or y1 <= y0:
        return {"size": [H, W], "counts": [H * W]}
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    cols = np.minimum(((xs + 0.5) * w_r / W).astype(np.int64), w_r - 1)
    rows = np.minimum(((ys + 0.5) * h_r / H).astype(np.int64), h_r - 1)
    crop = mask[np.ix_(rows, cols)]                                         # (y1 - y0, x1 - x0)
    crop &= ((xs >= box[0]) & (xs < box[2]))[None, :] & ((ys >= box[1]) & (ys < box[3]))[:, None]
    strip = np.zeros((H, x1 - x0), bool)                                    # the box's full columns
    strip[y0:y1] = crop
    counts = rle_encode(strip)["counts"]
    counts[0] += x0 * H                                                     # columns left of the box
    after = (W - x1) * H                                                    # columns right of it
    if len(counts) % 2:          # odd count: the last run is 0s
        counts[-1] += after
    elif after:
        counts.append(after)
    return {"size": [H, W], "counts": counts}


# --- cascade: Algorithm 1, Phase III (lines 16-22)

@dataclass
class Analysis:
    """One analysed image. result (JSON-serialisable; `--json` prints a list of them):

        {"file": str, "image_size": [H, W] original px, "score": S, "threshold": tau,
         "decision": "abnormal" | "normal", "member_probs": {member: P_m}, "detector_ran": bool,
         "boxes": [{"class_id": int, "class": str, "lt_code": str, "score": float,
                    "box": [x1, y1, x2, y2] original px,
                    "mask": {"size": [H, W], "counts": [...]}   # segmentation checkpoints only: COCO RLE
                   }, ...],                                     #   (uncompressed, column-major, original px)
         "timings_ms": {"decode", "preprocess", "dernet", "detector", "total"},
         "backend": "torch" | "onnx", "precision": "fp32" | "bf16" | "fp16"}
    The CLI adds "explanations": {method: Pipeline.explain(...)} with --explain.
    """
    result: dict                # the schema above
    image: np.ndarray           # (h, w) float32 [0, 1] display image (windowed) at decode resolution
    scale: float                # decode px per original px (1.0 full decode, < 1 reduced JPEG 2000 decode)
    x_cls: torch.Tensor         # (1, 1, S, S) DERNet input in [0, 1] (CLAHE'd, letterboxed), for explain()
    cls_region: tuple[slice, slice] | None = None   # rows, cols of x_cls that hold the image
    work: np.ndarray | None = None   # (h, w) uint8 CLAHE'd working image x_cls was shrunk from (Eq. 1)


class FP32Conv(nn.Module):
    """A convolution that runs in fp32 inside a bf16 / fp16 autocast region: a member's stem (its input
    is the image) and the detector head's output convolutions (their outputs are the logits).

    bf16 keeps 8 significant bits. Rounding the ImageNet-normalised image (values up to ~2.6) to it
    moves each pixel by up to ~0.3 grey levels, the same size as the input changes the demo DERNet is
    most sensitive to (bench.py guard). Measured on the synthetic test split, bf16 against fp32 (full
    decode): max |delta S| 0.0111 with bf16 stems, 0.0041 with fp32 stems. The three stems are ~4 % of
    the ensemble's FLOPs; the rest of the network stays in bf16."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.conv(x.float())


def fp32_stems(dernet: DERNet) -> DERNet:
    """Each member's first convolution wrapped in FP32Conv (in place; returns dernet)."""
    for member in dernet.members.values():
        path = ARCHS[member.name]["stem"]
        member.net.set_submodule(path, FP32Conv(member.net.get_submodule(path)))
    return dernet


def fuse_member_norms(dernet: DERNet) -> DERNet:
    """Fold each member BatchNorm that directly follows a convolution into it (in place; returns dernet).

    With eval statistics BN(conv(x)) = conv'(x), w' = w g / s, b' = (b - mu) g / s + beta,
    s = sqrt(var + eps) (torch.nn.utils.fusion.fuse_conv_bn_eval), as the detector's Conv+BN fusion.
    torchvision registers a convolution's BatchNorm right after it in the same parent, in forward
    order: ResNet's conv/bn pairs, EfficientNetV2's Conv2dNormActivation, DenseNet's conv0/norm0 and
    conv1/norm2 (tested: the fused members give the unfused outputs). DenseNet's pre-activation norms
    (norm1 after each concatenation, the transitions' and norm5) follow no convolution and stay. Under
    bf16 every BatchNorm runs in fp32 between bf16 convolutions; folding 222 of 284 saved 8-10 ms per
    member at 384 px (bf16, channels-last, one image) on a 2-core EPYC with AVX512-BF16."""
    for module in dernet.modules():
        names = list(module._modules)
        for conv, norm in zip(names, names[1:]):
            if isinstance(module._modules[conv], nn.Conv2d) and isinstance(module._modules[norm], nn.BatchNorm2d):
                module._modules[conv] = fuse_conv_bn_eval(module._modules[conv], module._modules[norm])
                module._modules[norm] = nn.Identity()
    return dernet


def fp32_head_outputs(detector: YOLO11) -> YOLO11:
    """The last 1x1 convolution of every head branch (box DFL logits, class logits, mask coefficients)
    wrapped in FP32Conv (in place; returns detector).

    NMS and AP rank detections by these logits. Rounded to bf16 they sit on a grid of 2^-7 of their
    size (0.03 at |logit| 4-8), so equal scores are common: 959 of the 10,000 detections the demo
    detector kept on the synthetic test split tied another of its image and class, and ties are ordered
    arbitrarily. With these layers in fp32 none tied, and the mean class-logit error against fp32 fell
    from 0.022 to 0.012 (the rest comes from the bf16 body). They are ~0.1 % of YOLO11-L's FLOPs."""
    head = detector.head
    for branches in (head.box, head.cls, getattr(head, "coef", ())):
        for branch in branches:
            branch[-1] = FP32Conv(branch[-1])
    return detector


def precast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weights autocast casts on every call (convolutions, linear layers) in its dtype, once.

    Autocast keeps fp32 master weights and converts each one at every forward (its cast cache lives for
    one autocast region): ~55 M DERNet and ~25 M YOLO11-L parameters read and rewritten per image.
    Converting them ahead gives the same arithmetic, bit for bit (tested), and saved here (bf16, one
    image) DenseNet121 2, EfficientNetV2-S 6, ResNet50 5 ms at 384; YOLO11-L at 640 gained 0-10 ms
    (within run-to-run noise, bench.py yolo). Other layers (BatchNorm of the unfused members) keep
    fp32, as under autocast, and so do the convolutions inside FP32Conv. In place; returns model."""
    kept = {layer for m in model.modules() if isinstance(m, FP32Conv) for layer in m.modules()}
    for layer in model.modules():
        if isinstance(layer, AUTOCAST_LAYERS) and layer not in kept:
            layer.to(dtype)
    return model


class TorchBackend:
    """The two models in PyTorch: inference mode, detector Conv+BN fused, channels-last memory and
    autocast for bf16 / fp16 on a copy of the DERNet with its Conv+BN pairs fused (fuse_member_norms),
    with the autocast weights converted once (precast). Stateless per call, so threads may share it.

    Channels-last (NHWC) is the layout oneDNN and cuDNN convolutions run fastest in; it helped every
    model on this 2-core CPU (AVX512-BF16), median ms of one image, fp32 -> channels-last fp32 ->
    channels-last bf16: DenseNet121 at 384 95 -> 62 -> 42, EfficientNetV2-S 94 -> 73 -> 51, ResNet50
    122 -> 72 -> 43, YOLO11-L at 640 367 -> 296 -> 140 (untrained weights; bench.py has the real table).
    """

    name = "torch"

    def __init__(self, dernet: DERNet, detector: YOLO11 | None, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.dernet = dernet.to(device, memory_format=torch.channels_last).eval()
        self.detector = None if detector is None else detector.to(device, memory_format=torch.channels_last).eval()
        dtype = AUTOCAST_DTYPES.get(precision)
        if dtype is not None:  # the Pipeline keeps the fp32 DERNet for Grad-CAM and LIME: convert a copy
            self.dernet = precast(fp32_stems(fuse_member_norms(copy.deepcopy(self.dernet))), dtype)
            self.detector = None if detector is None else precast(fp32_head_outputs(self.detector), dtype)

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    @torch.inference_mode()
    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, S, S) -> (S (B,), P (B, M)) in fp32: the members under autocast (their sigmoid is
        fp32, DERNet.member_probs), then Eq. 2 outside it (the vote is a matmul autocast would run in bf16)."""
        with self._autocast():
            probs = self.dernet.member_probs(channels_last(x.to(self.device)))   # (B, M) fp32
        return soft_vote(probs, self.dernet.omega).cpu(), probs.cpu()

    @torch.inference_mode()
    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, 1, S, S) grey -> (eval output (B, 4 + nc [+ 32], A), protos (B, 32, S/4, S/4) | None), fp32."""
        x = channels_last(x.to(self.device).expand(-1, 3, -1, -1))   # grey replicated, as in training
        with self._autocast():
            out = self.detector(x)
        pred, protos = out if isinstance(out, tuple) else (out, None)
        return pred.float(), None if protos is None else protos.float()


class Pipeline:
    """Algorithm 1, Phase III with the models loaded, fused and warmed once (CLI, app.py, bench.py).

    analyze(src) -> Analysis; study(analyses) -> study decision; explain(analysis, method) -> overlays;
    render(analysis) -> annotated RGB image; health() -> what is loaded. No per-call state is kept on
    the object, so a web server's threads may share one Pipeline.
    """

    def __init__(self, cfg: InferConfig | None = None):
        self.cfg = cfg = cfg or InferConfig()
        check_config(cfg)
        # 1. checkpoints, device, precision
        self.cls_path, self.det_path = find_checkpoints(cfg)
        self.versions = {"dernet": file_version(self.cls_path),
                         "detector": file_version(self.det_path) if self.det_path else None}
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.backend)
        # 2. the torch DERNet always (Grad-CAM and LIME need it); the detector's weights and meta
        self.dernet = load_classifier(self.cls_path, self.device)
        self.tau = float(self.dernet.tau)                                    # tau_optimal (line 17)
        self.cls_size = max(self.dernet.image_sizes.values())                # members resize from here
        p = self.dernet.preprocess                                           # what training applied (Eq. 1)
        self.cls_preprocess = working_params(p)
        detector, self.det_meta = load_detector(self.det_path) if self.det_path else (None, None)
        keys = [working_key(self.cls_size, self.cls_preprocess)]             # (side, clip, tiles) per model
        low_band = [trained_on_low_band(p)]
        self.det_preprocess = None
        if self.det_meta:
            self.det_preprocess = working_params(self.det_meta["preprocess"])
            self.det_pad_value = float(self.det_meta["preprocess"]["pad_value"])
            keys.append(working_key(self.det_meta["imgsz"], self.det_preprocess))
            low_band.append(trained_on_low_band(self.det_meta["preprocess"]))
        # one CLAHE per image when both models were trained on the same working image
        self.shared_work = len(keys) == 2 and keys[0] == keys[1]
        # 3. the backend that runs the cascade
        if cfg.backend == "torch":
            self.backend = TorchBackend(self.dernet, detector, self.device, self.precision)
        else:
            self.backend = OnnxBackend(*onnx_files(cfg, self), self.device)
            self.backend.check(self)
        # 4. decode no smaller than the largest working image, on torch's threads (issue 11), then one warm-up
        # pass. Models trained on the wavelet low band get it from either decode (exactly the same image
        # when they share the working side); with one older model in the pair both keep the area path.
        largest = max(side for side, _, _ in keys)
        self.reduce_to = largest if cfg.fast_decode else None
        self.low_band = largest if all(low_band) else None
        if cfg.fast_decode:
            use_jpeg2000_threads(torch.get_num_threads())
        self._warm_up()

    @property
    def has_detector(self) -> bool:
        return self.det_meta is not None

    def _warm_up(self):
        """One pass per model on a blank input: allocator, oneDNN/cuDNN kernels, ORT arenas."""
        self.backend.score(torch.zeros(1, 1, self.cls_size, self.cls_size))
        if self.has_detector:
            size = self.det_meta["imgsz"]
            self.backend.detect(torch.full((1, 1, size, size), self.det_pad_value))

    def health(self) -> dict:
        detector = None
        if self.has_detector:
            detector = {k: self.det_meta[k] for k in ("stage", "scale", "names", "lt_codes", "imgsz")}
            detector.update(file=str(self.det_path), version=self.versions["detector"])
        return {"ready": True, "backend": self.backend.name, "precision": self.precision,
                "fast_decode": self.cfg.fast_decode, "low_band": self.low_band is not None,
                "device": str(self.backend.device),
                "dernet": {"members": list(self.dernet.members), "omega": [float(w) for w in self.dernet.omega],
                           "tau": self.tau, "image_sizes": dict(self.dernet.image_sizes), "file": str(self.cls_path),
                           "version": self.versions["dernet"]},
                "detector": detector}

    # -- Algorithm 1, lines 16-22

    def analyze(self, src, name: str | None = None, cascade: bool | None = None) -> Analysis:
        """One image (path or bytes) through the cascade. Bad input raises data.DataError (one line).

        name: the "file" of the result (default: the path as given, or "upload" for bytes);
        cascade: None = cfg.cascade; False runs the detector whatever S (--no-cascade).
        """
        if name is None:
            name = str(src) if isinstance(src, (str, os.PathLike)) else "upload"
        t0 = time.perf_counter()
        # 1. decode and window; reduced JPEG 2000 level when fast_decode (long side >= reduce_to), the
        #    wavelet low band that covers the working side for low-band models (either decode)
        img, meta = load_image(src, reduce_to=self.reduce_to, low_band=self.low_band)
        return self.analyze_decoded(img, (meta.height, meta.width), name, cascade, 1e3 * (time.perf_counter() - t0))

    def analyze_decoded(self, img: np.ndarray, full_hw: tuple[int, int], name: str = "image",
                        cascade: bool | None = None, decode_ms: float = 0.0) -> Analysis:
        """analyze() from step 2 on, for an image already decoded and windowed: img (h, w) float32 in
        [0, 1], possibly a reduced decode of an original of full_hw = (H, W) pixels."""
        cascade = self.cfg.cascade if cascade is None else cascade
        t1 = time.perf_counter()
        # 2. DERNet input, exactly as in evaluation: CLAHE once at the working side, then shrink
        work = working_image(img, self.cls_size, **self.cls_preprocess, full_hw=full_hw)   # (h, w) uint8, Eq. 1
        x, region = classifier_view(work, self.cls_size)
        x_cls = torch.from_numpy(x)[None]                                    # (1, 1, S, S)
        t2 = time.perf_counter()
        # 3. S = sum_m omega_m P_m(x) (Eq. 2, line 16)
        score, probs = self.backend.score(x_cls)
        score, probs = float(score[0]), [float(p) for p in probs[0]]
        t3 = time.perf_counter()
        abnormal = score > self.tau                                          # line 17
        result = {"file": name, "image_size": list(full_hw), "score": score, "threshold": self.tau,
                  "decision": "abnormal" if abnormal else "normal",
                  "member_probs": dict(zip(self.dernet.members, probs)), "detector_ran": False, "boxes": [],
                  "timings_ms": {"decode": decode_ms, "preprocess": 1e3 * (t2 - t1),
                                 "dernet": 1e3 * (t3 - t2), "detector": 0.0, "total": 0.0},
                  "backend": self.backend.name, "precision": self.precision}
        analysis = Analysis(result, img, img.shape[1] / full_hw[1], x_cls, region, work)
        # 4. lines 18-19: lesions only for abnormal studies (or always without the cascade)
        if self.has_detector and (abnormal or not cascade):
            self._detect(analysis)
        result["timings_ms"]["total"] = decode_ms + 1e3 * (time.perf_counter() - t1)
        return analysis

    def _detect(self, analysis: Analysis) -> None:
        """Detector on the analysed image: NMS at IoU 0.5 (line 18), boxes (and masks) in original
        pixels (line 19). Fills result["boxes"] and the detector timings."""
        result, size = analysis.result, self.det_meta["imgsz"]
        orig_hw = tuple(result["image_size"])
        seg = self.det_meta["stage"] == "seg"
        t0 = time.perf_counter()
        work = analysis.work if self.shared_work else working_image(analysis.image, size, **self.det_preprocess,
                                                                    full_hw=orig_hw)
        x, ratio, pad = detector_view(work, orig_hw, size, self.det_pad_value)
        t1 = time.perf_counter()
        pred, protos = self.backend.detect(torch.from_numpy(x)[None, None])  # (1, 4 + nc [+ 32], A)
        det = non_max_suppression(pred, self.cfg.conf, self.cfg.nms_iou, self.cfg.max_det,
                                  nm=MASK_COEFFS if seg else 0)[0]         # (N, 6 [+ 32]) input px
        boxes = boxes_from_letterbox(det[:, :4].cpu().numpy(), ratio, pad, orig_hw)   # (N, 4) original px
        masks = None
        if seg:
            rows, cols = image_region(orig_hw, size)
            masks = process_masks(protos[0], det[:, 6:], det[:, :4], (size, size), MASK_THRESHOLD)
            masks = masks[:, rows, cols].cpu().numpy()                       # (N, new_h, new_w) image region
        names, codes = self.det_meta["names"], self.det_meta["lt_codes"]
        records = []
        for k, (box, score, cls) in enumerate(zip(boxes, det[:, 4].tolist(), det[:, 5].long().tolist())):
            record = {"class_id": cls, "class": names[cls], "lt_code": codes[cls], "score": score,
                      "box": [round(float(v), 2) for v in box]}
            if masks is not None:
                record["mask"] = mask_to_original(masks[k], box, orig_hw)
            records.append(record)
        t2 = time.perf_counter()
        timings = result["timings_ms"]
        timings["preprocess"] += 1e3 * (t1 - t0)
        timings["detector"] += 1e3 * (t2 - t1)
        timings["total"] += 1e3 * (t2 - t0)   # (analyze() sets the total afterwards; study() adds to it)
        result["boxes"], result["detector_ran"] = records, True

    def study(self, analyses: Sequence[Analysis]) -> dict:
        """Views of one study -> the study decision: S_study = max over views of S > tau. Radiologists
        triage studies, not images: when the study is abnormal, views whose own S <= tau are sent to the
        detector as well (a lesion may show in one view only); their results are updated in place."""
        if not analyses:
            raise ValueError("a study needs at least one analysed view")
        scores = [a.result["score"] for a in analyses]
        k = int(np.argmax(scores))
        abnormal = scores[k] > self.tau
        if abnormal and self.has_detector:
            for a in analyses:
                if not a.result["detector_ran"]:
                    self._detect(a)
        return {"files": [a.result["file"] for a in analyses], "views": len(analyses), "score": scores[k],
                "threshold": self.tau, "decision": "abnormal" if abnormal else "normal",
                "max_view": analyses[k].result["file"], "boxes": sum(len(a.result["boxes"]) for a in analyses)}

    # -- explanations (Fig. 4a-b) of the ensemble score, on the classifier's own input

    def explain(self, analysis: Analysis, method: str, seed: int = 0) -> dict:
        """Grad-CAM or LIME for the analysed image, as base64 PNGs over the classifier's view (its input
        without the letterbox padding: (h, w) = "size", the image's aspect ratio). Always fp32 torch."""
        if method not in EXPLAIN_METHODS:
            raise InferError(f"unknown explanation {method!r}; use one of {', '.join(EXPLAIN_METHODS)}")
        rows, cols = analysis.cls_region or (slice(None), slice(None))
        view = analysis.x_cls[0, 0, rows, cols].numpy()                     # (h, w) what DERNet saw
        t0 = time.perf_counter()
        if method == "gradcam":
            maps, ensemble = ensemble_grad_cam(self.dernet, analysis.x_cls.to(self.device))
            ensemble = normalise_map(ensemble[rows, cols])
            out = {"method": "gradcam", "overlay": encode_png_base64(heatmap_overlay(view, ensemble)),
                   "members": {name: encode_png_base64(heatmap_overlay(view, m[rows, cols]))
                               for name, m in maps.items()},
                   "map": encode_png_base64(ensemble)}
        else:
            predict = self._lime_predict_fn(analysis.x_cls.shape[-1], rows, cols)
            lime = lime_explain(predict, view, n_samples=self.cfg.lime_samples, seed=seed)
            evidence = normalise_map(np.clip(lime.weights, 0, None)[lime.segments].astype(np.float32))
            out = {"method": "lime", "overlay": encode_png_base64(lime_overlay(view, lime.mask)),
                   "map": encode_png_base64(evidence)}
        out["size"] = list(view.shape)
        out["time_ms"] = 1e3 * (time.perf_counter() - t0)
        return out

    def _lime_predict_fn(self, size: int, rows: slice, cols: slice) -> Callable[[np.ndarray], np.ndarray]:
        """LIME perturbs the image region only; each perturbed view goes back into the black letterbox."""
        predict = dernet_predict_fn(self.dernet)

        def predict_region(images: np.ndarray) -> np.ndarray:                # (N, h, w) -> (N,)
            canvas = np.full((len(images), size, size), DataConfig.cls_pad_value, np.float32)
            canvas[:, rows, cols] = images
            return predict(canvas)

        return predict_region

    def render(self, analysis: Analysis) -> np.ndarray:
        """(h, w, 3) uint8 RGB: the windowed image with the decision, boxes, labels, scores and masks."""
        return render_result(analysis.image, analysis.result, analysis.scale)


# --- ONNX: export (two self-contained files) and the ONNX Runtime backend

ONNX_OPSET = 18            # pinned; the members' antialiased Resize (unequal member sizes) needs opset >= 18
ONNX_MAX_BATCH = 1024      # upper bound of the dynamic batch axis (torch.export needs one)
ONNX_FORMAT = "dernet-yolo11-onnx-v1"
ONNX_CACHE = "onnx"        # folder next to a checkpoint where --backend onnx exports once
DERNET_ONNX, DETECTOR_ONNX = "dernet.onnx", "detector.onnx"


class DERNetForExport(nn.Module):
    """The whole ensemble in one graph: x (B, 1, S, S) -> (S (B,), member probabilities (B, M)).

    Documented choice: ONE fixed input size S = the largest member size (the size the pipeline
    prepares), members with a smaller size resize inside the graph (antialiased, as DERNet does).
    Static spatial shapes keep the graph simple and let ONNX Runtime plan every buffer once.
    """

    def __init__(self, dernet: DERNet):
        super().__init__()
        self.dernet = dernet

    def forward(self, x):
        probs = self.dernet.member_probs(x)                   # (B, M)
        return soft_vote(probs, self.dernet.omega), probs     # Eq. 2: (B,), (B, M)


WORKING_TEXT = {  # how the exported models' inputs were made (data.prepare_image), for other runtimes
    "working_side": "max(long_side, clahe_side), or long_side when clahe_side is null",
    "clahe": "area average to working_side, round to 8-bit, CLAHE (clip limit, tile grid below)",
    "shrink": "area average of the CLAHE'd image to long_side, rounded to 8-bit"}


def dernet_onnx_metadata(dernet: DERNet) -> dict:
    size, params = max(dernet.image_sizes.values()), working_params(dernet.preprocess)
    return {"format": ONNX_FORMAT, "model": "dernet", "members": list(dernet.members),
            "omega": [float(w) for w in dernet.omega], "tau": float(dernet.tau),
            "image_sizes": dict(dernet.image_sizes), "input_size": size,
            "inputs": f"image: (B, 1, {size}, {size}) float32 in [0, 1]",
            "outputs": "score: (B,) S = sum_m omega_m P_m (Eq. 2), abnormal iff S > tau; "
                       "member_probs: (B, M) P_m in members order",
            "preprocess": {"decode": "DICOM: Modality LUT, VOI LUT or first window, MONOCHROME1 inverted; "
                                     "PNG/JPEG: grey, min-max; then [0, 1]",
                           "long_side": size, **WORKING_TEXT,
                           "clahe_clip_limit": params["clip_limit"], "clahe_tile_grid": params["tile_grid"],
                           "clahe_side": params["clahe_side"],
                           "letterbox": "centred, integer padding", "pad_value": DataConfig.cls_pad_value}}


def detector_onnx_metadata(meta: dict) -> dict:
    size, seg = meta["imgsz"], meta["stage"] == "seg"
    nc = len(meta["names"])
    outputs = (f"output0: (B, 4 + {nc}{' + 32' if seg else ''}, A) boxes cx, cy, w, h in input pixels, sigmoid "
               f"class scores{', mask coefficients' if seg else ''}; A = sum over strides of (S / s)^2")
    if seg:
        outputs += f"; protos: (B, 32, {size // 4}, {size // 4}), mask = sigmoid(coeffs . protos) > {MASK_THRESHOLD}"
    return {"format": ONNX_FORMAT, "model": "yolo11-seg" if seg else "yolo11", "stage": meta["stage"],
            "scale": meta["scale"], "class_names": meta["names"], "lt_codes": meta["lt_codes"], "imgsz": size,
            "strides": meta["strides"], "nms_iou": YOLOConfig.iou_thres, "conf": YOLOConfig.conf_thres,
            "max_det": YOLOConfig.max_det,
            "inputs": f"images: (B, 3, {size}, {size}) float32 in [0, 1], grey replicated",
            "outputs": outputs,
            "preprocess": {"long_side": size, **WORKING_TEXT, "clahe_side": None, **meta["preprocess"],
                           "letterbox": "centred, integer padding, geometry of the original size; "
                                        "x_orig = (x - pad_x) / ratio"}}


def _export(model: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
            metadata: dict) -> Path:
    """torch.onnx.export (dynamo) with a dynamic batch axis, weights inside the file (external_data=False),
    metadata_props as JSON strings; written atomically."""
    batch = torch.export.Dim("batch", min=1, max=ONNX_MAX_BATCH)
    program = torch.onnx.export(model.eval(), (example,), None, input_names=[input_name], output_names=output_names,
                                opset_version=ONNX_OPSET, dynamic_shapes=({0: batch},), dynamo=True,
                                external_data=False, verbose=False)
    program.model.metadata_props.update({k: json.dumps(v) for k, v in metadata.items()})
    return atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


def export_dernet_onnx(dernet: DERNet, path) -> Path:
    """dernet.onnx: (B, 1, S, S) -> score (B,), member_probs (B, M). dernet: fp32, CPU, eval."""
    size = max(dernet.image_sizes.values())
    example = torch.rand(2, 1, size, size)   # batch 2: torch.export would specialise a batch of 1
    return _export(DERNetForExport(dernet), example, Path(path), "image", ["score", "member_probs"],
                   dernet_onnx_metadata(dernet))


def export_detector_onnx(model: YOLO11, meta: dict, path) -> Path:
    """detector.onnx: (B, 3, S, S) -> output0 (B, 4 + nc [+ 32], A) [, protos]. model: fused, fp32, CPU, eval."""
    size = meta["imgsz"]
    outputs = ["output0", "protos"] if meta["stage"] == "seg" else ["output0"]
    return _export(model, torch.rand(2, 3, size, size), Path(path), "images", outputs, detector_onnx_metadata(meta))


def export_onnx(cfg: InferConfig, out_dir) -> list[Path]:
    """Both files from the configured (or newest) checkpoints into out_dir: dernet.onnx [, detector.onnx]."""
    cls_path, det_path = find_checkpoints(cfg)
    out = Path(out_dir)
    paths = [export_dernet_onnx(load_classifier(cls_path, torch.device("cpu")), out / DERNET_ONNX)]
    if det_path is not None:
        model, meta = load_detector(det_path)
        paths.append(export_detector_onnx(model, meta, out / DETECTOR_ONNX))
    return paths


def onnx_files(cfg: InferConfig, pipe: "Pipeline") -> tuple[Path, Path | None]:
    """(dernet.onnx, detector.onnx | None) for the ONNX backend: from cfg.onnx_dir, or exported once into
    onnx/ next to each checkpoint (again whenever the checkpoint is newer than its export)."""
    if cfg.onnx_dir:
        folder = Path(cfg.onnx_dir)
        paths = [folder / DERNET_ONNX] + ([folder / DETECTOR_ONNX] if pipe.has_detector else [])
        for p in paths:
            if not p.is_file():
                raise InferError(f"{p}: not found; write it with: python infer.py --export onnx --out {folder}")
        return paths[0], (paths[1] if pipe.has_detector else None)
    dernet_path = pipe.cls_path.parent / ONNX_CACHE / DERNET_ONNX
    if _stale(dernet_path, pipe.cls_path):
        print(f"exporting {dernet_path} once (--backend onnx)", file=sys.stderr)
        export_dernet_onnx(load_classifier(pipe.cls_path, torch.device("cpu")), dernet_path)
    detector_path = None
    if pipe.has_detector:
        detector_path = pipe.det_path.parent / ONNX_CACHE / DETECTOR_ONNX
        if _stale(detector_path, pipe.det_path):
            print(f"exporting {detector_path} once (--backend onnx)", file=sys.stderr)
            model, meta = load_detector(pipe.det_path)
            export_detector_onnx(model, meta, detector_path)
    return dernet_path, detector_path


def _stale(export: Path, checkpoint: Path) -> bool:
    return not export.is_file() or export.stat().st_mtime < checkpoint.stat().st_mtime


def onnx_providers(device: torch.device) -> list[str]:
    """CUDA when onnxruntime has it and the device is not pinned to the CPU, else the CPU provider."""
    import onnxruntime as ort
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_metadata(session) -> dict:
    """metadata_props of a session's model, JSON-decoded."""
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


class OnnxBackend:
    """The same cascade on ONNX Runtime (Clinical Deployment): the interface of TorchBackend."""

    name = "onnx"

    def __init__(self, dernet_path: Path, detector_path: Path | None, device: torch.device):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = onnx_providers(device)
        self.paths = (dernet_path, detector_path)
        self.dernet = ort.InferenceSession(str(dernet_path), options, providers=providers)
        self.detector = None
        if detector_path is not None:
            self.detector = ort.InferenceSession(str(detector_path), options, providers=providers)
        self.device = "cuda" if self.dernet.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def check(self, pipe: "Pipeline") -> None:
        """The files must come from the pipeline's checkpoints (same tau, Omega, sizes, classes)."""
        expected = dernet_onnx_metadata(pipe.dernet)
        checks = [(self.dernet, self.paths[0], {k: expected[k] for k in ("members", "omega", "tau", "image_sizes")})]
        if self.detector is not None:
            expected = detector_onnx_metadata(pipe.det_meta)
            checks.append((self.detector, self.paths[1],
                           {k: expected[k] for k in ("stage", "scale", "class_names", "imgsz", "strides")}))
        for session, path, values in checks:
            meta = onnx_metadata(session)
            for key, value in values.items():
                if json.loads(json.dumps(value)) != meta.get(key):
                    raise InferError(f"{path}: exported from another checkpoint ({key} {meta.get(key)!r}, the "
                                     f"checkpoint has {value!r}); re-export with: python infer.py --export onnx "
                                     f"--out {path.parent}")

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, probs = self.dernet.run(["score", "member_probs"], {"image": x.numpy()})
        return torch.from_numpy(score), torch.from_numpy(probs)

    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = self.detector.run(None, {"images": np.repeat(x.numpy(), 3, axis=1)})   # (B, 3, S, S)
        return torch.from_numpy(outputs[0]), (torch.from_numpy(outputs[1]) if len(outputs) > 1 else None)


# --- rendering: the annotated image (OpenCV drawing)

MASK_ALPHA = 0.35        # mask fill opacity
DRAW_SCALE = 600         # px of image long side per unit of OpenCV font scale / line thickness
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _label(img: np.ndarray, text: str, x: int, y: int, colour, font_scale: float, thickness: int) -> None:
    """Text on a filled box whose bottom-left corner is (x, y), kept inside the image."""
    (tw, th), base = cv2.getTextSize(text, FONT, font_scale, thickness)
    x = int(np.clip(x, 0, max(img.shape[1] - tw - 2, 0)))
    y = int(np.clip(y, th + base + 2, img.shape[0]))
    cv2.rectangle(img, (x, y - th - base - 2), (x + tw + 2, y), colour, -1)
    dark = sum(colour) > 382   # dark text on light colours
    cv2.putText(img, text, (x + 1, y - base - 1), FONT, font_scale, (0, 0, 0) if dark else (255, 255, 255),
                thickness, cv2.LINE_AA)


def render_result(image: np.ndarray, result: dict, scale: float) -> np.ndarray:
    """image (h, w) [0, 1] at decode resolution, result boxes in original px (x scale) -> RGB uint8."""
    h, w = image.shape
    rgb = np.ascontiguousarray(np.repeat(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)[..., None], 3, 2))
    unit = max(h, w) / DRAW_SCALE
    thickness, font_scale = max(1, round(2 * unit)), max(0.4, 0.6 * unit)
    for box in result["boxes"]:                         # masks first, so outlines and labels stay on top
        if "mask" in box:
            mask = rle_decode(box["mask"])
            if mask.shape != (h, w):
                mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)
            colour = np.asarray(CLASS_COLOURS[box["class_id"] % len(CLASS_COLOURS)], np.float32)
            rgb[mask] = np.round((1 - MASK_ALPHA) * rgb[mask] + MASK_ALPHA * colour).astype(np.uint8)
    for box in result["boxes"]:
        colour = CLASS_COLOURS[box["class_id"] % len(CLASS_COLOURS)]
        x1, y1, x2, y2 = (int(round(v * scale)) for v in box["box"])
        cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, thickness)
        _label(rgb, f"{box['lt_code']} {box['class']} {box['score']:.2f}", x1, y1, colour, 0.8 * font_scale,
               max(1, thickness // 2))
    relation = ">" if result["decision"] == "abnormal" else "<="
    header = f"{result['decision'].upper()}  S {result['score']:.3f} {relation} tau {result['threshold']:.3f}"
    _label(rgb, header, 0, h, (200, 30, 30) if result["decision"] == "abnormal" else (30, 120, 30),
           font_scale, max(1, thickness // 2))
    return rgb


# --- command line

def collect_inputs(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files as given, and folders searched recursively for DICOM (also extension-less), PNG and JPEG.
    Returns (files, one-line problems such as a missing path or a folder without images)."""
    files, problems = [], []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and (f.suffix.lower() in IMAGE_SUFFIXES or (not f.suffix and _is_dicom(f))))
            if not found:
                problems.append(f"{p}: no DICOM, PNG or JPEG files in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder; check the path")
    unique = list(dict.fromkeys(files))
    return unique, problems


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return sniff_format(fh.read(132)) == "dicom"
    except OSError:
        return False


def format_result(r: dict) -> str:
    """The readable summary of one result (no patient-identifying field exists to print)."""
    h, w = r["image_size"]
    relation, verdict = (">", "ABNORMAL") if r["decision"] == "abnormal" else ("<=", "normal")
    lines = [f"{r['file']}  ({h} x {w} px)",
             f"  score S = {r['score']:.4f} {relation} tau = {r['threshold']:.4f}: {verdict}",
             "  members: " + ", ".join(f"{name} {p:.3f}" for name, p in r["member_probs"].items())]
    if not r["detector_ran"]:
        why = "normal study" if r["decision"] == "normal" else "no detector checkpoint"
        lines.append(f"  detector not run ({why})")
    elif not r["boxes"]:
        lines.append("  no lesion above the confidence threshold")
    else:
        lines.append(f"  {len(r['boxes'])} lesion{'s' if len(r['boxes']) > 1 else ''} (x1, y1, x2, y2 in original px):")
        for b in r["boxes"]:
            extra = f"  mask {int(rle_decode(b['mask']).sum()):,} px" if "mask" in b else ""
            lines.append(f"    {b['lt_code']:<5} {b['class']:<22} {b['score']:.2f}  "
                         f"[{', '.join(f'{v:.0f}' for v in b['box'])}]{extra}")
    t = r["timings_ms"]
    lines.append(f"  time: decode {t['decode']:.0f} ms, preprocess {t['preprocess']:.0f} ms, "
                 f"DERNet {t['dernet']:.0f} ms, detector {t['detector']:.0f} ms, total {t['total']:.0f} ms "
                 f"({r['backend']}, {r['precision']})")
    return "\n".join(lines)


def format_study(s: dict) -> str:
    relation, verdict = (">", "ABNORMAL") if s["decision"] == "abnormal" else ("<=", "normal")
    return (f"study of {s['views']} view{'s' if s['views'] > 1 else ''}: S = max over views = {s['score']:.4f} "
            f"({s['max_view']}) {relation} tau = {s['threshold']:.4f}: {verdict}, {s['boxes']} lesion box(es)")


def save_outputs(pipe: Pipeline, analysis: Analysis, folder: Path, used: set) -> list[Path]:
    """<stem>.png annotated, and with explanations <stem>_gradcam[_<member>].png, <stem>_lime.png."""
    stem = Path(analysis.result["file"]).stem or "image"
    base, k = stem, 2
    while base in used:   # two inputs with one name (from different folders) keep both
        base, k = f"{stem}_{k}", k + 1
    used.add(base)
    written = [folder / f"{base}.png"]
    atomic_write(written[0], lambda tmp: tmp.write_bytes(encode_png(pipe.render(analysis))))
    for method, exp in analysis.result.get("explanations", {}).items():
        overlays = {f"{base}_{method}.png": exp["overlay"]}
        overlays.update({f"{base}_{method}_{name}.png": png for name, png in exp.get("members", {}).items()})
        for name, png in overlays.items():
            written.append(folder / name)
            atomic_write(written[-1], lambda tmp, png=png: tmp.write_bytes(base64.b64decode(png)))
    return written


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def get_args_parser() -> argparse.ArgumentParser:
    d = InferConfig()
    p = argparse.ArgumentParser(description="Algorithm 1, Phase III: DERNet triage, then YOLO11 lesion detection "
                                            "for abnormal studies (decision support for research use, not a diagnosis)")
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="DICOM, PNG or JPEG files, or folders of them")
    g = p.add_argument_group("models")
    g.add_argument("--cls-ckpt", help="DERNet checkpoint (default: newest RUNS/cls/*/dernet.pt)")
    g.add_argument("--det-ckpt", help="detector checkpoint (default: newest RUNS/{seg,det}/*/best.pt)")
    g.add_argument("--runs", default=d.runs, help="folder searched for the newest checkpoints")
    g.add_argument("--backend", choices=BACKENDS, default=d.backend)
    g.add_argument("--onnx-dir", help="backend onnx: folder with dernet.onnx and detector.onnx "
                                      "(default: exported once next to the checkpoints)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 where the CPU has native bf16, bf16/fp16 autocast on CUDA, else fp32")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=d.fast_decode,
                   help="decode JPEG 2000 at a reduced resolution level, never below the CLAHE working side")
    g = p.add_argument_group("cascade")
    g.add_argument("--no-cascade", action="store_true", help="run the detector whatever the score")
    g.add_argument("--study", action="store_true", help="the inputs are views of one study: decision = max view score")
    g.add_argument("--conf", type=float, default=d.conf, help="detector confidence threshold for reported boxes")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="JSON on stdout instead of the summary")
    g.add_argument("--save", metavar="DIR", help="write an annotated PNG per image (and explanation overlays)")
    g.add_argument("--explain", choices=(*EXPLAIN_METHODS, "all"), help="Grad-CAM and/or LIME (needs --save or --json)")
    g.add_argument("--lime-samples", type=int, default=d.lime_samples, help="LIME perturbations")
    g = p.add_argument_group("export")
    g.add_argument("--export", choices=("onnx",), help="write dernet.onnx and detector.onnx to --out and exit")
    g.add_argument("--out", metavar="DIR", help="folder for --export")
    return p


def config_from_args(args: argparse.Namespace) -> InferConfig:
    return InferConfig(cls_ckpt=args.cls_ckpt, det_ckpt=args.det_ckpt, runs=args.runs, backend=args.backend,
                       onnx_dir=args.onnx_dir, precision=args.precision, fast_decode=args.fast_decode,
                       cascade=not args.no_cascade, conf=args.conf, lime_samples=args.lime_samples,
                       device=args.device)


def run_export(cfg: InferConfig, out: str) -> int:
    for path in export_onnx(cfg, out):
        print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB, opset {ONNX_OPSET}, dynamic batch)")
    return 0


def main(args: argparse.Namespace) -> int:
    """Exit status: 0, or 2 if any input failed (one line each on stderr). InferError (no checkpoint,
    bad option) propagates to __main__, which prints its one line and exits 2."""
    cfg = config_from_args(args)
    check_config(cfg)
    if args.export:
        if not args.out:
            raise InferError("--export onnx needs --out DIR")
        return run_export(cfg, args.out)
    if not args.inputs:
        raise InferError("give image files or folders (or --export onnx --out DIR); see --help")
    if args.explain and not (args.save or args.json):
        raise InferError("--explain writes overlays: add --save DIR and/or --json")
    files, problems = collect_inputs(args.inputs)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    failed = len(problems)
    pipe = Pipeline(cfg)
    if not pipe.has_detector:
        print(f"note: no detector checkpoint under {Path(cfg.runs) / 'det'} or {Path(cfg.runs) / 'seg'}; "
              f"triage only (train one with: python train.py --stage det)", file=sys.stderr)
    methods = EXPLAIN_METHODS if args.explain == "all" else (args.explain,) if args.explain else ()
    analyses, used = [], set()
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line       # library warnings as one line each
        for path in tqdm(files, desc="images", disable=len(files) < 2, leave=False, file=sys.stderr):
            try:
                analysis = pipe.analyze(path, name=str(path))
            except DataError as err:
                tqdm.write(f"error: {err}", file=sys.stderr)   # (on its own line, not after the progress bar)
                failed += 1
                continue
            analyses.append(analysis)
        study = pipe.study(analyses) if args.study and analyses else None
        for analysis in analyses:   # after study(): its extra detections are drawn too
            if methods:
                analysis.result["explanations"] = {m: pipe.explain(analysis, m) for m in methods}
            if args.save:
                save_outputs(pipe, analysis, Path(args.save), used)
    results = [a.result for a in analyses]
    if args.json:
        print(json.dumps({"study": study, "images": results} if args.study else results, indent=2))
    else:
        for r in results:
            print(format_result(r))
        if study:
            print(format_study(study))
    return 2 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (InferError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:   # output piped into e.g. head: stop quietly (Python docs, signal module)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
