"""YOLO11 from scratch: the lesion detector (and segmenter) of Sec. 3.3 of the paper.

The paper deploys YOLO11-L "with a CSP-Darknet backbone and C2PSA attention" whose attention is the
scaled dot-product attention of Eq. 3, and a PANet neck (Fig. 2, stage 4). The paper gives no more
architectural detail, so every block below follows the published YOLO11 definition (Ultralytics'
yolo11.yaml / yolo11-seg.yaml and their modules); parameter counts equal the published ones
exactly for all five scales, and outputs match the published code to float64 rounding when given
the same weights (tests/test_yolo11.py).

Reading order (bottom-up):
    anchors and box coding -> Conv, Bottleneck, C3k, C3k2, SPPF, Attention (Eq. 3), PSABlock,
    C2PSA, DFL, Proto -> config (scales) -> Backbone (CSP-Darknet, P1..P5) -> Neck (PANet,
    top-down then bottom-up) -> DetectHead / SegmentHead -> YOLO11 / YOLO11Seg -> post-processing
    (NMS, masks) -> FLOP count and summary -> command line.

Outputs (the layout the published detector family exports, so ONNX consumers recognise it):
    YOLO11.train():    list of 3 maps (B, 4*reg_max + nc, H/s, W/s), s = 8, 16, 32
    YOLO11.eval():     (B, 4 + nc, A) boxes (cx, cy, w, h) in input pixels + sigmoid scores
    YOLO11Seg.train(): (maps, coeffs (B, 32, A), protos (B, 32, H/4, W/4))
    YOLO11Seg.eval():  ((B, 4 + nc + 32, A), protos (B, 32, H/4, W/4))
with A = (H/8)(W/8) + (H/16)(W/16) + (H/32)(W/32) anchor points (8,400 at 640 x 640).

Print the per-stage parameter summary and the FLOP count at 640 x 640:

    python yolo11.py --scale l            # YOLO11-L, 7 VinDr-SpineXR classes
    python yolo11.py --scale l --nc 80    # the published COCO model: 25,372,160 params, ~87.6 GFLOPs
    python yolo11.py --scale l --seg      # YOLO11-L-seg
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

# ---------------------------------------------------------------------------
# Anchors and box coding (anchor-free head, Sec. 3.3)
# ---------------------------------------------------------------------------


def make_anchors(feats, strides, offset: float = 0.5, dtype: torch.dtype | None = None):
    """Anchor points at every cell centre of every level.

    feats: list of maps (B, C, H_i, W_i); strides: matching strides (list or tensor); dtype: of the
    result (default: the maps' own).
    Returns anchor_points (A, 2) as (x, y) in grid units of their own level and
    stride_tensor (A, 1), with A = sum_i H_i * W_i, level by level, row-major.
    Multiply anchor_points by stride_tensor to get input pixels.
    """
    points, stride_list = [], []
    dtype, device = dtype or feats[0].dtype, feats[0].device
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[-2:]
        sx = torch.arange(w, device=device, dtype=dtype) + offset  # (W,)
        sy = torch.arange(h, device=device, dtype=dtype) + offset  # (H,)
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")  # (H, W) each
        points.append(torch.stack((sx, sy), -1).view(-1, 2))  # (H*W, 2)
        stride_list.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_list)


def dist2bbox(distance, anchor_points, xywh: bool = True, dim: int = -1):
    """(left, top, right, bottom) distances from anchor points -> boxes (cx, cy, w, h) or xyxy."""
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def bbox2dist(anchor_points, bbox, reg_max: int):
    """xyxy boxes -> (left, top, right, bottom) distances, clamped just below the last DFL bin.

    reg_max is the number of bins (16); distances live in [0, reg_max - 1], and the clamp at
    reg_max - 1 - 0.01 (as in the published implementation) keeps the upper interpolation bin valid.
    """
    x1y1, x2y2 = bbox.chunk(2, -1)
    return torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1).clamp_(0, reg_max - 1 - 0.01)


def cxcywh2xyxy(boxes):
    """(..., 4) boxes (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    xy, wh = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of divisor >= x (the family's channel rounding)."""
    return math.ceil(x / divisor) * divisor


def count_params(module: nn.Module) -> int:
    """All parameters, trainable or not (the published counts include the 16 fixed DFL bins)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU, 'same' padding. After fuse(): Conv2d (bias) -> SiLU.

    The SiLU works in place, as torchvision's EfficientNet does: its input (the BatchNorm's or, fused,
    the convolution's output) feeds nothing else, and autograd saves what silu_'s backward needs
    (tested: same outputs and gradients; the tensors saved for backward are the same). At inference
    it writes no new tensor: YOLO11-L at 640, bf16, one image on a 2-core EPYC, 288 -> 267-275 ms
    (SiLU was 11 % of the forward's time under torch.profiler).
    """

    bn_eps = 1e-3  # published family (ultralytics initialize_weights), PyTorch default is 1e-5
    bn_momentum = 0.03  # published family, PyTorch default is 0.1

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, padding=k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=self.bn_eps, momentum=self.bn_momentum)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self):
        """Fold the (eval-mode) BatchNorm into the convolution.

        BN(conv(x)) = gamma * (W*x - mu) / sqrt(var + eps) + beta
                    = (W * s) * x + (beta - mu * s),   s = gamma / sqrt(var + eps)   (per channel)
        """
        if isinstance(self.bn, nn.Identity):  # already fused
            return
        conv, bn = self.conv, self.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (c2,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, groups=conv.groups, bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight * s.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - bn.running_mean * s)
        self.conv, self.bn = fused, nn.Identity()


class Bottleneck(nn.Module):
    """Two convolutions (k x k) with a residual connection when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, k: int = 3, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, c_, k)
        self.cv2 = Conv(c_, c2, k)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3k(nn.Module):
    """CSP bottleneck with 3 convolutions (C3) whose inner bottlenecks use k x k kernels.

    Two paths: cv1 -> n bottlenecks, and cv2 (a shortcut); concatenated and merged by cv3.
    """

    def __init__(self, c1: int, c2: int, n: int = 2, shortcut: bool = True, e: float = 0.5, k: int = 3):
        super().__init__()
        c_ = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, c_)
        self.cv2 = Conv(c1, c_)
        self.cv3 = Conv(2 * c_, c2)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, k=k, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k2(nn.Module):
    """The CSP block of YOLO11 (a C2f whose inner blocks are Bottlenecks or C3k blocks).

    cv1 splits the input into two halves (a, b) of c channels; b runs through n inner blocks, every
    intermediate output is kept, and cv2 merges [a, b, y_1, ..., y_n] (cross-stage partial).
    c3k=True swaps each Bottleneck for a deeper C3k(n=2). The paper is silent on this switch; we
    follow the published YOLO11 definition: yolo11.yaml sets it in the deep stages (P4, P5 and the
    last neck block) and the published builder forces it on for every C3k2 of scales m, l and x.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, shortcut: bool = True):
        super().__init__()
        self.c = int(c2 * e)  # hidden channels per path
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut) if c3k else Bottleneck(self.c, self.c, shortcut) for _ in range(n)
        )

    def forward(self, x):
        y = list(self.cv1(x).split(self.c, 1))  # [a, b], (B, c, H, W) each
        for block in self.m:
            y.append(block(y[-1]))
        return self.cv2(torch.cat(y, 1))  # (B, c2, H, W)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools (= SPP with 5, 9, 13 windows)."""

    def __init__(self, c1: int, c2: int, k: int = 5, n_pool: int = 3):
        super().__init__()
        c_ = c1 // 2  # hidden channels
        self.cv1 = Conv(c1, c_)
        self.cv2 = Conv(c_ * (n_pool + 1), c2)
        self.pool = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)
        self.n_pool = n_pool

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(self.n_pool):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a map (Eq. 3), plus a positional term.

    One 1x1 conv (qkv) yields per head a query and key of key_dim channels and a value of
    head_dim channels. Each head computes Eq. 3,

        Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V,   d_k = key_dim,

    the heads are concatenated back to C channels, a depth-wise 3x3 conv of V (pe, the position-
    sensitive term of the published block) is added, and a 1x1 conv (proj) mixes the result.
    F.scaled_dot_product_attention computes exactly Eq. 3 (default scale 1/sqrt(d_k)); it agrees
    with the explicit softmax(QK^T)V of the published code to float rounding (~1e-6, tested) and
    uses a fused kernel that never stores the N x N attention matrix.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, act=False)
        self.proj = Conv(dim, dim, act=False)
        self.pe = Conv(dim, dim, 3, g=dim, act=False)  # depth-wise positional encoding

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, 2 * self.key_dim + self.head_dim, H * W).split(
            (self.key_dim, self.key_dim, self.head_dim), 2)  # (B, heads, d, N) each
        out = F.scaled_dot_product_attention(
            q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1))  # Eq. 3, (B, heads, N, head_dim)
        out = out.transpose(-2, -1).reshape(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(out)


class PSABlock(nn.Module):
    """Position-sensitive attention block: x + Attention(x), then x + FFN(x) (a transformer layer)."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4):
        super().__init__()
        self.attn = Attention(c, num_heads=num_heads, attn_ratio=attn_ratio)
        self.ffn = nn.Sequential(Conv(c, 2 * c), Conv(2 * c, c, act=False))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2PSA(nn.Module):
    """CSP wrapper around n PSABlocks (Sec. 3.3 "C2PSA attention"): attention on half the channels."""

    head_channels = 64  # published: one head per 64 channels

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5):
        super().__init__()
        assert c1 == c2, "C2PSA keeps the channel count"
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv(2 * self.c, c1)
        self.m = nn.Sequential(*(PSABlock(self.c, 0.5, max(self.c // self.head_channels, 1)) for _ in range(n)))

    def forward(self, x):
        a, b = self.cv1(x).split(self.c, 1)  # (B, c, H, W) each
        return self.cv2(torch.cat((a, self.m(b)), 1))


class DFL(nn.Module):
    """Distribution Focal Loss decoding: expected value of a softmax over reg_max distance bins.

    Each box side is predicted as a distribution over the integer distances 0 .. reg_max-1 (in
    stride units); the distance is sum_k softmax(logits)_k * k. The bin values are a fixed
    (requires_grad=False) parameter, as in the published model, whose counts include these 16.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.bins = nn.Parameter(torch.arange(reg_max, dtype=torch.float), requires_grad=False)  # (reg_max,)

    def forward(self, x):
        B, _, A = x.shape  # (B, 4*reg_max, A)
        p = x.view(B, 4, self.reg_max, A).softmax(2)  # (B, 4, reg_max, A)
        # elementwise, not a matmul: autocast leaves it in the input's precision (fp32 in decode)
        return (p * self.bins.to(p.dtype).view(-1, 1)).sum(2)  # (B, 4, A) distances (l, t, r, b)


class Proto(nn.Module):
    """Mask prototypes from P3: conv 3x3 -> transposed conv x2 (stride 8 -> 4) -> conv 3x3 -> 1x1."""

    def __init__(self, c1: int, c_: int = 256, c2: int = 32):
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))  # (B, c2, 2H, 2W)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

SCALES = {  # (depth multiple, width multiple, max channels), published yolo11.yaml
    "n": (0.50, 0.25, 1024),
    "s": (0.50, 0.50, 1024),
    "m": (0.50, 1.00, 512),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.50, 512),
}


@dataclass
class YOLOConfig:
    nc: int = 7  # the 7 VinDr-SpineXR lesion classes (data.CLASSES, Table 3)
    scale: str = "l"  # Sec. 3.3: YOLO11-L
    imgsz: int = 640  # published training size and FLOP-count size
    in_channels: int = 3  # published family is RGB; data.py repeats the grayscale radiograph
    reg_max: int = 16  # published head: 4 sides x 16 DFL bins
    strides: tuple[int, ...] = (8, 16, 32)  # published head: P3, P4, P5 (8,400 anchors at 640)
    nm: int = 32  # published yolo11-seg.yaml: 32 prototypes / mask coefficients
    npr: int = 256  # published yolo11-seg.yaml: 256 hidden proto channels (width-scaled)
    c3k_scales: tuple[str, ...] = ("m", "l", "x")  # published builder: C3k blocks everywhere here
    width_divisor: int = 8  # published channel rounding (make_divisible)
    prior_objects: float = 5.0  # published bias init: ~5 objects per 640 x 640 image
    prior_imgsz: int = 640  # published bias init reference size
    box_bias: float = 1.0  # published bias init of the DFL logits (1.0; ultralytics >= 8.4 uses 2.0)
    conf_thres: float = 0.25  # published predictor default confidence
    iou_thres: float = 0.5  # Algorithm 1, line 18: NMS at IoU 0.5
    max_det: int = 100  # VinDr-SpineXR / COCO protocol: at most 100 detections per image
    max_nms: int = 30000  # published NMS: at most 30,000 candidate boxes enter NMS
    mask_thres: float = 0.5  # issue 8: mask = sigmoid(coeffs . protos) > 0.5
    scales: dict = field(default_factory=lambda: dict(SCALES))

    def multiples(self) -> tuple[float, float, int]:
        """(depth multiple, width multiple, max channels) of this scale."""
        if self.scale not in self.scales:
            raise ValueError(f"unknown YOLO11 scale {self.scale!r}; choose one of {', '.join(self.scales)}")
        return self.scales[self.scale]

    def width(self, c: int) -> int:
        """Channels of a layer written as c in yolo11.yaml, at this scale."""
        _, width, max_channels = self.multiples()
        return make_divisible(min(c, max_channels) * width, self.width_divisor)

    def depth(self, n: int) -> int:
        """Repeats of a block written as n in yolo11.yaml, at this scale."""
        return max(round(n * self.multiples()[0]), 1) if n > 1 else n

    def c3k(self, yaml_value: bool) -> bool:
        """The C3k2 c3k switch: the yaml value, forced on for the larger scales (published builder)."""
        return yaml_value or self.scale in self.c3k_scales


# ---------------------------------------------------------------------------
# Backbone (CSP-Darknet) and neck (PANet) -- Fig. 2, stage 4
# ---------------------------------------------------------------------------


def stage(**layers) -> nn.Sequential:
    """A backbone stage with named layers (backbone.stage2.down, backbone.stage2.csp, ...)."""
    return nn.Sequential(OrderedDict(layers))


class Backbone(nn.Module):
    """CSP-Darknet: a stride-2 conv per stage, then a C3k2 block; SPPF and C2PSA close P5."""

    def __init__(self, cfg: YOLOConfig):
        super().__init__()
        # w(c): the c channels written in yolo11.yaml at this scale; d(n): repeats; c3k(v): C3k switch
        w, d, c3k = cfg.width, cfg.depth, cfg.c3k
        self.stem = Conv(cfg.in_channels, w(64), 3, 2)  # P1/2
        self.stage2 = stage(down=Conv(w(64), w(128), 3, 2),  # P2/4
                            csp=C3k2(w(128), w(256), d(2), c3k(False), e=0.25))
        self.stage3 = stage(down=Conv(w(256), w(256), 3, 2),  # P3/8
                            csp=C3k2(w(256), w(512), d(2), c3k(False), e=0.25))
        self.stage4 = stage(down=Conv(w(512), w(512), 3, 2),  # P4/16
                            csp=C3k2(w(512), w(512), d(2), c3k(True)))
        self.stage5 = stage(down=Conv(w(512), w(1024), 3, 2),  # P5/32
                            csp=C3k2(w(1024), w(1024), d(2), c3k(True)),
                            sppf=SPPF(w(1024), w(1024), 5),
                            psa=C2PSA(w(1024), w(1024), d(2)))
        self.out_channels = (w(512), w(512), w(1024))  # P3, P4, P5

    def forward(self, x):  # (B, 3, H, W)
        x = self.stage2(self.stem(x))  # (B, w256, H/4, W/4)
        p3 = self.stage3(x)  # (B, w512, H/8, W/8)
        p4 = self.stage4(p3)  # (B, w512, H/16, W/16)
        p5 = self.stage5(p4)  # (B, w1024, H/32, W/32)
        return p3, p4, p5


class Neck(nn.Module):
    """PANet: a top-down path (P5 -> P4 -> P3) then a bottom-up path (P3 -> P4 -> P5)."""

    def __init__(self, cfg: YOLOConfig, in_channels: tuple[int, int, int]):
        super().__init__()
        w, d, c3k = cfg.width, cfg.depth, cfg.c3k
        c3, c4, c5 = in_channels
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        # top-down
        self.td4 = C3k2(c5 + c4, w(512), d(2), c3k(False))  # upsampled P5 + P4
        self.td3 = C3k2(w(512) + c3, w(256), d(2), c3k(False))  # upsampled td4 + P3 -> out P3
        # bottom-up
        self.down3 = Conv(w(256), w(256), 3, 2)
        self.bu4 = C3k2(w(256) + w(512), w(512), d(2), c3k(False))  # down(out P3) + td4 -> out P4
        self.down4 = Conv(w(512), w(512), 3, 2)
        self.bu5 = C3k2(w(512) + c5, w(1024), d(2), c3k(True))  # down(out P4) + P5 -> out P5
        self.out_channels = (w(256), w(512), w(1024))

    def forward(self, p3, p4, p5):
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))  # (B, w512, H/16, W/16)
        n3 = self.td3(torch.cat((self.up(t4), p3), 1))  # (B, w256, H/8, W/8)
        n4 = self.bu4(torch.cat((self.down3(n3), t4), 1))  # (B, w512, H/16, W/16)
        n5 = self.bu5(torch.cat((self.down4(n4), p5), 1))  # (B, w1024, H/32, W/32)
        return [n3, n4, n5]


# ---------------------------------------------------------------------------
# Heads: anchor-free detection (box + class branches, DFL) and segmentation (+ protos, coeffs)
# ---------------------------------------------------------------------------


class DetectHead(nn.Module):
    """Decoupled anchor-free head: per level a box branch (4 x reg_max DFL logits) and a class branch.

    The class branch uses depth-wise 3x3 convs followed by 1x1 convs (YOLO11; YOLOv8 used full 3x3).
    """

    def __init__(self, cfg: YOLOConfig, in_channels: tuple[int, ...]):
        super().__init__()
        self.nc, self.reg_max, self.strides = cfg.nc, cfg.reg_max, cfg.strides
        c0 = in_channels[0]
        c_box = max(16, c0 // 4, 4 * cfg.reg_max)  # published channel rule
        c_cls = max(c0, min(cfg.nc, 100))  # published channel rule
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, c_box, 3), Conv(c_box, c_box, 3), nn.Conv2d(c_box, 4 * cfg.reg_max, 1))
            for c in in_channels)
        self.cls = nn.ModuleList(
            nn.Sequential(Conv(c, c, 3, g=c), Conv(c, c_cls),  # depth-wise 3x3, point-wise 1x1
                          Conv(c_cls, c_cls, 3, g=c_cls), Conv(c_cls, c_cls),
                          nn.Conv2d(c_cls, cfg.nc, 1))
            for c in in_channels)
        self.dfl = DFL(cfg.reg_max)
        self._anchor_key, self._anchors, self._anchor_strides = None, None, None
        self.init_bias(cfg)

    @torch.no_grad()
    def init_bias(self, cfg: YOLOConfig):
        """Prior-probability bias initialisation (as in RetinaNet / the published family).

        Class logits start at log(p) with p = prior_objects / nc / (prior_imgsz / s)^2: about 5
        objects per 640 x 640 image spread over nc classes and the (640/s)^2 cells of a level, so
        early training is not swamped by the background. (This is log(p), not the exact logit
        log(p / (1 - p)); p is tiny, so the two agree.) The box bias is one constant over all bins;
        softmax is shift-invariant, so it does not change the initial DFL distances.
        """
        for s, box, cls in zip(cfg.strides, self.box, self.cls):
            box[-1].bias.fill_(cfg.box_bias)
            cls[-1].bias.fill_(math.log(cfg.prior_objects / cfg.nc / (cfg.prior_imgsz / s) ** 2))

    def anchors(self, maps, dtype: torch.dtype):
        """Anchor points (2, A) and strides (1, A) of a dtype, cached per input shape, device and dtype.

        While torch.export / torch.compile traces the model (ONNX export), they are built inside
        the graph instead, so no traced tensor is ever stored on the module.
        """
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            points, strides = make_anchors(maps, self.strides, 0.5, dtype)
            return points.T, strides.T
        key = (tuple(m.shape[-2:] for m in maps), maps[0].device, dtype)
        if key != self._anchor_key:
            points, strides = make_anchors(maps, self.strides, 0.5, dtype)
            self._anchors, self._anchor_strides, self._anchor_key = points.T, strides.T, key
        return self._anchors, self._anchor_strides

    def decode(self, maps):
        """Raw maps -> (B, 4 + nc, A): boxes (cx, cy, w, h) in input pixels, sigmoid class scores.

        At least fp32, also when the maps come from a bf16 / fp16 autocast: with 8 significant bits
        a bf16 box corner at 640 px would sit on a 2-4 px grid (issue 11's accuracy guard)."""
        B = maps[0].shape[0]
        pred = torch.cat([m.view(B, m.shape[1], -1) for m in maps], 2)  # (B, 4*reg_max + nc, A)
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
        box, cls = pred.split((4 * self.reg_max, self.nc), 1)
        anchors, strides = self.anchors(maps, pred.dtype)  # (2, A), (1, A)
        boxes = dist2bbox(self.dfl(box), anchors.unsqueeze(0), xywh=True, dim=1) * strides  # (B, 4, A)
        return torch.cat((boxes, cls.sigmoid()), 1)

    def forward(self, feats):
        maps = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.box, self.cls)]
        return maps if self.training else self.decode(maps)  # list of (B, 4*reg_max + nc, H/s, W/s)


class SegmentHead(DetectHead):
    """DetectHead + prototype branch on P3 and a 32-coefficient branch per level (YOLO11-seg)."""

    def __init__(self, cfg: YOLOConfig, in_channels: tuple[int, ...]):
        super().__init__(cfg, in_channels)
        self.nm = cfg.nm
        self.proto = Proto(in_channels[0], cfg.width(cfg.npr), cfg.nm)  # published: npr is width-scaled
        c_coef = max(in_channels[0] // 4, cfg.nm)  # published channel rule
        self.coef = nn.ModuleList(
            nn.Sequential(Conv(c, c_coef, 3), Conv(c_coef, c_coef, 3), nn.Conv2d(c_coef, cfg.nm, 1))
            for c in in_channels)

    def forward(self, feats):
        B = feats[0].shape[0]
        protos = self.proto(feats[0])  # (B, nm, H/4, W/4)
        coeffs = torch.cat([coef(f).view(B, self.nm, -1) for f, coef in zip(feats, self.coef)], 2)  # (B, nm, A)
        det = super().forward(feats)
        if self.training:
            return det, coeffs, protos
        return torch.cat((det, coeffs), 1), protos  # (B, 4 + nc + nm, A), protos


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


class YOLO11(nn.Module):
    """YOLO11 detector (Sec. 3.3): backbone -> PANet neck -> anchor-free head.

    nc and scale are the two knobs people change; cfg carries the rest of the (published) constants.
    """

    head_class = DetectHead

    def __init__(self, nc: int = 7, scale: str = "l", cfg: YOLOConfig | None = None):
        super().__init__()
        cfg = replace(cfg or YOLOConfig(), nc=nc, scale=scale)
        cfg.multiples()  # validates the scale name
        self.cfg, self.nc, self.scale, self.reg_max = cfg, nc, scale, cfg.reg_max
        self.register_buffer("stride", torch.tensor(cfg.strides, dtype=torch.float), persistent=False)
        self.backbone = Backbone(cfg)
        self.neck = Neck(cfg, self.backbone.out_channels)
        self.head = self.head_class(cfg, self.neck.out_channels)

    def forward(self, x):  # (B, 3, H, W), H and W multiples of the largest stride (32)
        s = self.cfg.strides[-1]
        if x.shape[-1] % s or x.shape[-2] % s:
            raise ValueError(f"input height and width must be multiples of {s}, got {tuple(x.shape[-2:])}")
        return self.head(self.neck(*self.backbone(x)))

    def fuse(self):
        """Fold every BatchNorm into its convolution for inference; returns self in eval mode."""
        self.eval()
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self


class YOLO11Seg(YOLO11):
    """YOLO11-seg: the same backbone, neck and detection branches, plus prototype and coefficient branches."""

    head_class = SegmentHead


def seg_from_det(det_state_dict: dict, nc: int = 7, scale: str = "l") -> YOLO11Seg:
    """A segmentation model initialised from a (non-fused) detection checkpoint's state_dict.

    Every detection weight is copied (the models share all block names); only the prototype and
    coefficient branches (head.proto.*, head.coef.*) keep their fresh initialisation.
    """
    model = YOLO11Seg(nc=nc, scale=scale)
    own = model.state_dict()
    wrong = [k for k, v in det_state_dict.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in det_state_dict and not k.startswith(("head.proto.", "head.coef."))]
    if wrong or missing:
        raise ValueError(f"not a YOLO11-{scale} detection state_dict with {nc} classes "
                         f"(mismatched {wrong[:2]}, missing {missing[:2]})")
    model.load_state_dict(det_state_dict, strict=False)
    return model


# ---------------------------------------------------------------------------
# Post-processing: NMS (Algorithm 1, inference) and mask assembly
# ---------------------------------------------------------------------------


def non_max_suppression(pred, conf_thres: float = YOLOConfig.conf_thres, iou_thres: float = YOLOConfig.iou_thres,
                        max_det: int = YOLOConfig.max_det, nm: int = 0, multi_label: bool = False,
                        max_nms: int = YOLOConfig.max_nms):
    """Eval output (B, 4 + nc + nm, A) -> per image (N, 6 + nm) [x1, y1, x2, y2, score, cls, coeffs].

    1. keep (box, class) pairs with score > conf_thres: the best class per box, or every class above
       the threshold when multi_label (one box may then carry several labels; useful for mAP),
    2. keep the max_nms highest scores (bounds NMS time on untrained models),
    3. class-aware NMS at iou_thres (torchvision batched_nms: boxes of different classes never
       suppress each other),
    4. keep the max_det highest-scoring survivors. Boxes stay in input (letterboxed) pixels;
       data.boxes_from_letterbox maps them to the original image.
    """
    nc = pred.shape[1] - 4 - nm
    out = []
    for p in pred.transpose(1, 2):  # (A, 4 + nc + nm)
        box, scores, coeffs = p.split((4, nc, nm), 1)
        if multi_label:  # 1.
            i, cls = (scores > conf_thres).nonzero(as_tuple=True)
            score = scores[i, cls]
        else:
            score, cls = scores.max(1)
            i = (score > conf_thres).nonzero(as_tuple=True)[0]
            score, cls = score[i], cls[i]
        if score.numel() > max_nms:  # 2.
            score, top = score.topk(max_nms)
            i, cls = i[top], cls[top]
        xyxy = cxcywh2xyxy(box[i])
        keep = torchvision.ops.batched_nms(xyxy, score, cls, iou_thres)[:max_det]  # 3., 4.
        out.append(torch.cat((xyxy[keep], score[keep, None], cls[keep, None].to(p.dtype), coeffs[i][keep]), 1))
    return out


def process_masks(protos, coeffs, boxes, shape, thres: float = YOLOConfig.mask_thres):
    """Instance masks (issue 8): sigmoid(coeffs @ protos), upsampled to shape, cropped to the box.

    protos (nm, h, w) at stride 4; coeffs (N, nm); boxes (N, 4) xyxy in input pixels;
    shape (H, W) the input size. Returns (N, H, W) bool (probability > thres inside the box).
    """
    nm, h, w = protos.shape
    H, W = shape
    masks = (coeffs @ protos.reshape(nm, -1)).sigmoid().view(-1, 1, h, w)  # (N, 1, h, w)
    masks = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)[:, 0]  # (N, H, W)
    xs = torch.arange(W, device=masks.device, dtype=boxes.dtype)[None, None, :]  # (1, 1, W)
    ys = torch.arange(H, device=masks.device, dtype=boxes.dtype)[None, :, None]  # (1, H, 1)
    x1, y1, x2, y2 = boxes[:, :, None, None].unbind(1)  # (N, 1, 1) each
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)  # (N, H, W)
    return (masks > thres) & inside


# ---------------------------------------------------------------------------
# FLOP count and per-stage summary
# ---------------------------------------------------------------------------


def count_flops(model: nn.Module, imgsz: int = 640) -> dict[str, int]:
    """FLOPs of one eval forward at imgsz x imgsz, per module name ("" = whole model).

    Counted by torch.utils.flop_counter (convolutions, matrix multiplies and attention, 2 FLOPs per
    multiply-add) on the meta device: shapes only, no arithmetic, about a second even for YOLO11-x.
    Element-wise work (BN, SiLU, pooling, softmax) is not counted; for YOLO11-L at 640 this gives
    87.2 GFLOPs against the published 87.6 (thop, which also counts BatchNorm).
    """
    with torch.device("meta"):  # a shape-only twin of the model
        meta = type(model)(nc=model.nc, scale=model.scale, cfg=model.cfg).eval()
    x = torch.empty(1, model.cfg.in_channels, imgsz, imgsz, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    root = type(meta).__name__
    return {("" if k == root else k.removeprefix(root + ".")): sum(v.values())
            for k, v in counter.get_flop_counts().items() if k != "Global"}


def summary(model: YOLO11, imgsz: int = 640) -> str:
    """A table of parameters and GFLOPs per stage, and the totals."""
    flops = count_flops(model, imgsz)
    rows = [("backbone.stem", "P1/2"), ("backbone.stage2", "P2/4"), ("backbone.stage3", "P3/8"),
            ("backbone.stage4", "P4/16"), ("backbone.stage5", "P5/32"),
            ("neck.td4", "top-down P4"), ("neck.td3", "top-down P3 (out)"),
            ("neck.down3", "bottom-up"), ("neck.bu4", "bottom-up P4 (out)"),
            ("neck.down4", "bottom-up"), ("neck.bu5", "bottom-up P5 (out)"),
            ("head.box", "box branch (DFL)"), ("head.cls", "class branch"), ("head.dfl", "DFL bins")]
    if isinstance(model, YOLO11Seg):
        rows += [("head.proto", "prototypes"), ("head.coef", "mask coefficients")]
    modules = dict(model.named_modules())
    kind = "YOLO11-seg" if isinstance(model, YOLO11Seg) else "YOLO11"
    lines = [f"{kind}-{model.scale}, {model.nc} classes, input {imgsz} x {imgsz}",
             f"{'stage':<18}{'role':<21}{'params':>13}{'GFLOPs':>9}"]
    for name, role in rows:
        # a ModuleList is never called itself: add up its levels (head.box.0, head.box.1, ...)
        levels = sum(v for k, v in flops.items() if k.rpartition(".")[0] == name and k.rpartition(".")[2].isdigit())
        gflops = flops.get(name, levels) / 1e9
        lines.append(f"{name:<18}{role:<21}{count_params(modules[name]):>13,}{gflops:>9.2f}")
    lines.append(f"{'total':<39}{count_params(model):>13,}{flops[''] / 1e9:>9.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def get_args_parser():
    cfg = YOLOConfig()
    parser = argparse.ArgumentParser(description="YOLO11 (Sec. 3.3): per-stage parameters and GFLOPs")
    model = parser.add_argument_group("model")
    model.add_argument("--scale", default=cfg.scale, choices=tuple(SCALES), help="model scale (default: l)")
    model.add_argument("--nc", type=int, default=cfg.nc, help="number of classes (default: 7 VinDr lesions)")
    model.add_argument("--seg", action="store_true", help="segmentation model (YOLO11-seg)")
    count = parser.add_argument_group("count")
    count.add_argument("--imgsz", type=int, default=cfg.imgsz, help="square input size, a multiple of 32")
    return parser


def main(args):
    if args.imgsz <= 0 or args.imgsz % 32:
        raise SystemExit(f"error: --imgsz must be a positive multiple of 32, got {args.imgsz}")
    if args.nc < 1:
        raise SystemExit(f"error: --nc must be at least 1, got {args.nc}")
    with torch.device("meta"):  # shapes only: nothing is initialised or computed
        model = (YOLO11Seg if args.seg else YOLO11)(nc=args.nc, scale=args.scale)
    print(summary(model, args.imgsz))


if __name__ == "__main__":
    main(get_args_parser().parse_args(sys.argv[1:]))
