"""Phase III clinical inference (Algorithm 1, lines 16-22) and its explanations (Fig. 4a-b).

(Placeholder docstring: the cascade CLI and ONNX sections are written around the explanation section.)
"""
import base64
import threading
from typing import Callable, NamedTuple

import cv2
import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances

from dernet import DERNet, Member, resize_to


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
