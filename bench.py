"""Speed and memory benchmarks: where the time of training and of Phase III inference goes.

Every speed or memory target of the project lives here (never in the tests), next to the figure
measured on this machine, with a pass/MISS mark; nothing is asserted. Sub-commands, bottom-up:

    machine     CPU model, cores, torch threads, CPU capability, fp32 matmul GFLOP/s, CUDA device
    decode      one 2,500 x 3,000 JPEG 2000 DICOM: full decode (and its wavelet low band) vs
                reduced-resolution decode (issue 11) vs a data.ImageCache hit
    members     DenseNet121 / EfficientNetV2-S / ResNet50 (dernet.Member) and DERNet at 224/384/512,
                fp32 and bf16 where native (issue 3)
    yolo        YOLO11-L forward at 640: unfused, fused, channels-last, bf16 (and precast), ONNX Runtime;
                GFLOP/s against the matmul rate; the published implementation if importable (issue 4)
    train-step  YOLO11-L training step (Eq. 4 loss, backward, AdamW) at 640, batch 2; on CUDA also
                batch 12 with AMP and the peak memory (issue 5; the paper trained on 8 GB)
    infer       infer.Pipeline on the DICOM: decode, preprocess, DERNet, detector, total, cold and
                warm, torch fp32 / torch auto / ONNX Runtime, images per second; the fastest one's
                compute floor at the matmul rate (issues 6, 11)
    guard       accuracy of the fast paths (bf16, reduced decode, ONNX) against torch fp32 + full decode
                on a test split: per-image score difference, AUROC, mAP@0.5 (issue 11; trained models)
    app         app.py's server under a bounded concurrent load on loopback (issue 9)

    python bench.py machine
    python bench.py yolo --json yolo.json
    python bench.py infer --cls-ckpt runs/cls/NAME/dernet.pt --det-ckpt runs/det/NAME/best.pt
    python bench.py guard --cls-ckpt runs/cls/NAME/dernet.pt --det-ckpt runs/det/NAME/best.pt --plots docs
    python bench.py all --json bench.json        # everything: long (10+ minutes on 2 CPU cores)
    python bench.py all --quick                  # tiny models and inputs: checks that it runs (1-2 min)

Method: time.perf_counter around each call, CUDA synchronised, after warm-up calls; the median of
the timed runs (min-max in brackets); forward passes under torch.inference_mode. Without
--cls-ckpt/--det-ckpt, `infer` and `app` use freshly initialised full-size models saved in the
exact checkpoint formats of train.py (untrained weights time the same as trained ones). --quick
swaps in tiny models and inputs: its figures only show that the code runs, so no target applies.
"""
import argparse
import contextlib
import copy
import gc
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data import (CLASSES, OPENJPEG_THREADS, DataConfig, DataError, ImageCache, atomic_write, fit_long_side, letterbox,
                  load_image, load_split, make_synthetic, prepare_image, to_uint8, write_synthetic_dicom)
from dernet import MEMBERS, DERNet, Member, save_dernet
import infer
from losses import DetectionLoss, LossConfig
from train import TrainConfig, auroc, detector_checkpoint, evaluate_detections, param_groups, save_checkpoint
from yolo11 import YOLO11, count_flops

# --------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    # timing
    runs: int = 7  # timed calls per figure (issue 11: median of >= 5)
    warmup: int = 2  # untimed calls first (allocator, oneDNN kernel selection, caches)
    seed: int = 0
    # machine
    matmul_n: int = 2048  # (n x n) @ (n x n) fp32, 2 n^3 FLOPs
    # decode / infer / app input
    dicom_hw: tuple = (3000, 2500)  # issues 6 and 11: one 2,500 x 3,000 JPEG 2000 DICOM (H, W)
    reduce_to: tuple = (640, 384)  # reduced decodes at the detector's and the classifier's input size
    # members
    member_sizes: tuple = (224, 384, 512)  # issue 3
    # yolo
    yolo_scale: str = "l"  # Sec. 3.3: YOLO11-L
    yolo_nc: tuple = (80, 7)  # the published COCO model (comparable figures) and the 7 lesion classes
    yolo_imgsz: int = 640  # REFERENCE §3
    onnx: bool = True  # include ONNX Runtime rows (yolo) and the onnx backend (infer); export takes a while
    onnx_opset: int = 18  # as infer.ONNX_OPSET
    # train-step
    train_scale: str = "l"  # Sec. 3.3
    train_imgsz: int = 640  # REFERENCE §3
    train_batch: int = 2  # issue 5: batch 2 on this CPU
    train_cuda_batch: int = 12  # Sec. 4.1: batch 12 (with AMP on CUDA)
    train_boxes: int = 6  # synthetic objects per training image
    train_runs: int = 3  # training steps are slow: fewer timed steps ...
    train_warmup: int = 1  # ... after one untimed (AdamW allocates its state in the first step)
    # infer
    cls_imgsz: int = 384  # dernet.IMAGE_SIZE (issue 3 default) for fresh DERNet checkpoints
    det_scale: str = "l"  # Sec. 3.3
    det_imgsz: int = 640  # REFERENCE §3
    infer_batch: int = 16  # issue 6: images per second for a batch of 16
    # guard
    guard_data: str = "data/synthetic"  # train.py's synthetic default (REFERENCE §1 layout)
    guard_split: str = "test"  # issue 11: "on the synthetic test split"
    guard_quick_images: int = 4  # --quick without --data: a tiny synthetic test split
    guard_nudge: float = 0.5 / 255  # ours: the reference's own sensitivity, images half a display level brighter / darker
    guard_precision: str = "auto"  # the reduced-precision rows: what infer.py runs here, or bf16 forced (numerics)
    # app
    app_clients: int = 8  # issue 9: 8 concurrent clients ...
    app_seconds: float = 60.0  # ... for 60 s
    app_start_timeout: float = 600.0  # s to wait for /api/health (full-size models load and warm; busy CPU)
    app_request_timeout: float = 300.0  # s per request (8 clients queue behind one inference at a time)
    app_png_side: int = 1024  # long side of the PNG uploads
    # targets: measured figure <= target passes
    yolo_published_s: dict = field(default_factory=lambda: {  # published implementation, this machine:
        "fp32 unfused": 0.53,  # REFERENCE §5
        "fp32 fused": 0.41,  # REFERENCE §5, issue 4
        "fp32 fused channels-last": 0.28,  # issue 11
        # issue 11 (torch.autocast bfloat16), on the layout infer.py runs: contiguous bf16 is 2.3-2.5x slower
        # here, for the published implementation as for ours
        "bf16 fused channels-last": 0.13,
        "bf16 fused channels-last, precast": 0.13,
        "onnxruntime fp32 fused": 0.21,  # issue 11
    })
    infer_total_s: float = 0.40  # issue 11: end to end, warm
    infer_detector_s: float = 0.13  # issue 11: detector at 640
    guard_max_dS: float = 0.01  # issue 11: ensemble score within 0.01 of fp32 + full decode, per image
    guard_max_dauroc: float = 0.005  # issue 11: AUROC within 0.005
    guard_max_dmap50: float = 0.5  # issue 11: detection mAP@0.5 within 0.5 points
    paper_total_s: float = 1.0  # the paper's "sub-second" diagnosis (REFERENCE §4, issue 6)
    train_cuda_peak_gib: float = 8.0  # Sec. 4.1: trained on one 8 GB GPU (REFERENCE §4, issue 5)
    app_max_5xx: int = 0  # issue 9: zero 5xx (each client has a queue place, so a 503 counts too)
    # ours: a leak of one decoded 2,500 x 3,000 float32 image (30 MB) per request passes this in ~7
    # requests; allocator arenas of the handler threads stay well below it
    app_rss_growth_mib: float = 200.0
    # references (not targets): figures measured on this machine by the issues
    decode_ref_s: dict = field(default_factory=lambda: {
        "full": 0.86,  # issue 11: pydicom + pylibjpeg, full resolution
        "reduced": 0.05,  # issue 11: Pillow, 625 x 750 level
    })
    member_ref_s: dict = field(default_factory=lambda: {  # REFERENCE §5: torchvision at 384
        "densenet121": 0.19, "efficientnet_v2_s": 0.08, "resnet50": 0.10,
    })


# --quick: tiny models and inputs, to check that every code path runs (tests/test_bench.py)
QUICK = dict(runs=2, warmup=1, matmul_n=256, dicom_hw=(480, 400), reduce_to=(64,), member_sizes=(64,),
             yolo_scale="n", yolo_nc=(7,), yolo_imgsz=64, train_scale="n", train_imgsz=64, train_cuda_batch=2,
             train_boxes=2, train_runs=1, cls_imgsz=64, det_scale="n", det_imgsz=64, infer_batch=2,
             app_clients=2, app_seconds=3.0, app_png_side=256)

SECTIONS = ("machine", "decode", "members", "yolo", "train-step", "infer", "guard", "app")  # bottom-up: `all` order


class BenchError(RuntimeError):
    """A user mistake (missing checkpoint, unreadable file): one line, exit status 2."""


# --------------------------------------------------------------------------- timing


def ms(seconds: float) -> str:
    """Milliseconds, one decimal below 10 ms."""
    v = seconds * 1e3
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


@dataclass
class Timing:
    """Seconds of the timed calls."""
    times: list

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    def ms(self) -> str:
        """'412 (405-431)': median and range, milliseconds."""
        return f"{ms(self.median)} ({ms(min(self.times))}-{ms(max(self.times))})"

    def to_json(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.times), "max_s": max(self.times), "runs": len(self.times)}


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, runs: int, warmup: int, device: torch.device = torch.device("cpu")) -> Timing:
    """1. `warmup` untimed calls, 2. `runs` calls each timed with perf_counter (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(times)


# --------------------------------------------------------------------------- reporting


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def mark(value: float | None, target: float | None, applies: bool = True) -> str:
    """'pass' when value <= target, 'MISS' otherwise; '-' when there is no target or it does not apply."""
    if value is None or target is None or not applies:
        return "-"
    return "pass" if value <= target else "MISS"


def one_line(err: BaseException, limit: int = 80) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit] if text else ''}"


def log(msg: str):
    """Progress on stderr, so stdout stays a clean markdown report."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Section:
    name: str
    markdown: str
    data: dict


def write_json(path: Path, obj) -> None:
    """Atomic: a temporary file beside `path`, then rename (an interrupted run keeps the last complete file)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


# --------------------------------------------------------------------------- machine facts


def cpu_info() -> dict:
    """Model name, x86 family/model/stepping and feature flags of the first CPU in /proc/cpuinfo (Linux); the
    platform's name elsewhere. Virtual machines often report only "AMD EPYC": the family and model tell CPU
    generations apart (AMD family 25 = Zen 3/4, 26 = Zen 5), which matters when comparing timings."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())  # x86 / ARM
    generation = "/".join(fields[k] for k in ("cpu family", "model", "stepping") if k in fields)
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "family/model/stepping": generation or None, "flags": flags}


def bf16_native(device: torch.device) -> bool:
    """bfloat16 arithmetic in hardware: AVX512-BF16 / AMX-BF16 (x86) or BF16 (ARM) on CPU, else CUDA's own
    check. (torch's oneDNN check also accepts plain AVX-512, where bf16 is emulated and slower.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return infer.native_bf16()  # the same rule as infer.py's --precision auto


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    return torch.device(name)


def context_line(cfg: BenchConfig, device: torch.device, quick: bool, runs: int | None = None,
                 warmup: int | None = None) -> str:
    runs, warmup = runs or cfg.runs, cfg.warmup if warmup is None else warmup
    line = (f"device {device}, {torch.get_num_threads()} torch threads, median (min-max) of {runs} timed runs "
            f"after {warmup} warm-up")
    return line + ("; **--quick: tiny models and inputs, no target applies**" if quick else "")


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, cfg: BenchConfig) -> tuple[Timing, float]:
    """Median GFLOP/s of an (n x n) @ (n x n) product: 2 n^3 FLOPs per call."""
    g = torch.Generator().manual_seed(cfg.seed)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_calls(lambda: torch.mm(a, b, out=out), cfg.runs, cfg.warmup, device)
    return t, 2 * n ** 3 / t.median / 1e9


# --------------------------------------------------------------------------- workspace: inputs and checkpoints


class Workspace:
    """What several sub-benchmarks share, made once per process in a temporary folder: the synthetic
    DICOM, the checkpoints and the matmul rates."""

    def __init__(self, cfg: BenchConfig, device: torch.device, quick: bool, cls_ckpt=None, det_ckpt=None,
                 data=None, plots=None):
        self.cfg, self.device, self.quick, self.data, self.plots = cfg, device, quick, data, plots
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-")
        self.dir = Path(self.tmp.name)
        self.user_ckpts = (cls_ckpt, det_ckpt)
        self._dicom = self._ckpts = None
        self._matmul = {}

    def close(self):
        self.tmp.cleanup()

    def dicom(self) -> Path:
        """A synthetic lateral lumbar radiograph, JPEG 2000 Lossless, 12-bit (VinDr's format, REFERENCE §1)."""
        if self._dicom is None:
            h, w = self.cfg.dicom_hw
            log(f"writing a {w} x {h} JPEG 2000 DICOM")
            self._dicom = write_synthetic_dicom(self.dir / "image.dcm", h, w, seed=self.cfg.seed)
        return self._dicom

    def checkpoints(self) -> tuple[Path, Path]:
        """(DERNet, detector) checkpoints: the user's, or fresh full-size models in train.py's formats."""
        if self._ckpts is None:
            cls_ckpt, det_ckpt = (Path(p) if p else None for p in self.user_ckpts)
            folder = self.dir / "ckpt"
            folder.mkdir(exist_ok=True)
            if cls_ckpt is None:
                log(f"saving an untrained DERNet ({self.cfg.cls_imgsz} px)")
                cls_ckpt = folder / "dernet.pt"
                save_dernet(fresh_dernet(self.cfg), cls_ckpt)
            if det_ckpt is None:
                log(f"saving an untrained YOLO11-{self.cfg.det_scale} ({self.cfg.det_imgsz} px)")
                det_ckpt = folder / "best.pt"
                torch.manual_seed(self.cfg.seed)
                model = YOLO11(nc=len(CLASSES), scale=self.cfg.det_scale).eval()
                tcfg = TrainConfig(scale=self.cfg.det_scale, det_imgsz=self.cfg.det_imgsz,
                                   clahe_side=self.cfg.det_imgsz)
                save_checkpoint(detector_checkpoint(model, tcfg, seg=False, epoch=0, val={}), det_ckpt)
            self._ckpts = (cls_ckpt, det_ckpt)
        return self._ckpts

    def matmul(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Timing, float]:
        """(Timing, GFLOP/s) of the matmul_n^3 product, measured once per device and dtype."""
        if (device, dtype) not in self._matmul:
            log(f"matmul {self.cfg.matmul_n}^3 {dtype} on {device}")
            self._matmul[device, dtype] = matmul_rate(self.cfg.matmul_n, dtype, device, self.cfg)
        return self._matmul[device, dtype]


def fresh_dernet(cfg: BenchConfig) -> DERNet:
    """Untrained DERNet in its checkpoint form. tau = 0: every image is "abnormal", so even a cascaded
    pipeline (the app) always runs the detector: the worst case is timed. CLAHE (Eq. 1) at the
    detector's size, as train.py records it, so the two share one working image."""
    torch.manual_seed(cfg.seed)
    return DERNet({name: Member(name) for name in MEMBERS}, tau=0.0,
                  image_sizes={name: cfg.cls_imgsz for name in MEMBERS},
                  preprocess={"clahe_clip_limit": DataConfig.clahe_clip, "clahe_tile_grid": DataConfig.clahe_tiles,
                              "clahe_side": cfg.det_imgsz, "low_band": DataConfig.low_band}).eval()


def onnx_runner(model: nn.Module, x: torch.Tensor, path: Path, cfg: BenchConfig, device: torch.device) -> Callable:
    """Export `model` at input x (one self-contained file) and return a call running it in onnxruntime
    with torch's thread count (CUDA provider when on CUDA)."""
    import onnxruntime as ort  # here, not at the top: only the ONNX rows need it
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, opset_version=cfg.onnx_opset,
                          verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


def published_yolo(scale: str, nc: int) -> nn.Module:
    """The published implementation built from its YAML (no download), Conv+BN fused. Raises
    ImportError when `ultralytics` is absent: it is not a dependency of this project."""
    from ultralytics.nn.tasks import DetectionModel
    return DetectionModel(f"yolo11{scale}.yaml", nc=nc, verbose=False).fuse(verbose=False).eval()


# --------------------------------------------------------------------------- machine


def bench_machine(cfg: BenchConfig, ws: Workspace) -> Section:
    info, device = cpu_info(), ws.device
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data = {"cpu": info["model"], "cpu_family/model/stepping": info["family/model/stepping"],
            "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native_cpu": bf16_native(torch.device("cpu")),
            "load_average_1min": round(os.getloadavg()[0], 2),  # other processes competing for the cores
            "torch": torch.__version__, "python": platform.python_version(), "cuda": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data["cuda"] = {"name": props.name, "memory_gib": props.total_memory / 2 ** 30,
                        "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()}
    rows = [[k, v if not isinstance(v, dict) else ", ".join(f"{a} {b}" for a, b in v.items())]
            for k, v in data.items()]
    n, data["matmul"] = cfg.matmul_n, []
    for dev in [torch.device("cpu")] + ([device] if device.type == "cuda" else []):
        for dtype in (torch.float32, torch.bfloat16) if bf16_native(dev) else (torch.float32,):
            t, gflops = ws.matmul(dev, dtype)
            dtype_name = str(dtype).removeprefix("torch.")
            data["matmul"].append({"device": str(dev), "dtype": dtype_name, "n": n, **t.to_json(), "gflops": gflops})
            rows.append([f"{dtype_name} matmul {n}^3 on {dev}", f"{gflops:.1f} GFLOP/s ({t.ms()} ms)"])
    md = "## machine\n\n" + context_line(cfg, device, ws.quick) + "\n\n" + md_table(["what", "value"], rows)
    return Section("machine", md, data)


# --------------------------------------------------------------------------- decode


@contextlib.contextmanager
def openjpeg_threads(threads: int | None):
    """OpenJPEG's thread count = threads inside the block (None: unset, one thread), restored after."""
    before = os.environ.pop(OPENJPEG_THREADS, None)
    if threads is not None:
        os.environ[OPENJPEG_THREADS] = str(threads)
    try:
        yield
    finally:
        os.environ.pop(OPENJPEG_THREADS, None)
        if before is not None:
            os.environ[OPENJPEG_THREADS] = before


def bench_decode(cfg: BenchConfig, ws: Workspace) -> Section:
    """1. full decode, 2. reduced JPEG 2000 decode at each model size, on one OpenJPEG thread and on
    torch's threads (what infer.Pipeline sets, data.use_jpeg2000_threads), 3. ImageCache miss and hit."""
    path, rows, data = ws.dicom(), [], {"file_mib": ws.dicom().stat().st_size / 2 ** 20, "rows": []}
    h, w = cfg.dicom_hw

    def add(what: str, t: Timing, shape, ref: float | None = None):
        rows.append([what, f"{shape[1]} x {shape[0]}", t.ms(), ms(ref) if ref else "-"])
        data["rows"].append({"what": what, "shape": list(shape), **t.to_json(), "ref_s": ref})

    log("decode: full")
    add("full decode (load_image)", time_calls(lambda: load_image(path), cfg.runs, cfg.warmup),
        load_image(path)[0].shape, cfg.decode_ref_s["full"])
    size = cfg.reduce_to[0]
    log(f"decode: full, then the wavelet low band for >= {size}")
    add(f"full decode + wavelet low band (low_band={size})",
        time_calls(lambda: load_image(path, low_band=size), cfg.runs, cfg.warmup),
        load_image(path, low_band=size)[0].shape)
    for size in cfg.reduce_to:
        for threads in sorted({1, torch.get_num_threads()}):
            log(f"decode: reduced to >= {size}, {threads} OpenJPEG threads")
            with openjpeg_threads(threads if threads > 1 else None):
                t = time_calls(lambda: load_image(path, reduce_to=size), cfg.runs, cfg.warmup)
            shape = load_image(path, reduce_to=size)[0].shape
            add(f"reduced decode (reduce_to={size}, {threads} thread{'s' * (threads > 1)})", t, shape,
                cfg.decode_ref_s["reduced"])
    for fast in (False, True):
        cache = ImageCache(ws.dir / f"cache-{int(fast)}", fast_decode=fast)
        t0 = time.perf_counter()
        img, _ = cache.get(path, size)  # miss: decode, shrink, CLAHE, write
        miss = Timing([time.perf_counter() - t0])
        kind = "fast decode" if fast else "full decode"
        add(f"ImageCache miss ({kind}, {size} px, CLAHE, write)", miss, img.shape)
        add(f"ImageCache hit ({kind}, {size} px)", time_calls(lambda: cache.get(path, size), cfg.runs, cfg.warmup),
            img.shape)
    md = (f"## decode: one {w} x {h} JPEG 2000 DICOM ({data['file_mib']:.1f} MiB)\n\n"
          + context_line(cfg, torch.device("cpu"), ws.quick) + " (cache miss: one call)\n\n"
          + md_table(["what", "output (W x H)", "ms", "reference ms (issue 11)"], rows))
    return Section("decode", md, data)


# --------------------------------------------------------------------------- members


@torch.inference_mode()
def bench_members(cfg: BenchConfig, ws: Workspace) -> Section:
    """Each DERNet member and the whole ensemble (Eq. 2) at each size, batch 1, fp32 (and bf16 autocast
    where native)."""
    device, bf16 = ws.device, bf16_native(ws.device)
    torch.manual_seed(cfg.seed)
    members = {name: Member(name).eval().to(device) for name in MEMBERS}
    rows, data = [], {"bf16": bf16, "rows": []}
    for size in cfg.member_sizes:
        x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        dernet = DERNet(members, image_sizes={name: size for name in MEMBERS}).eval()
        for name, model in [*members.items(), ("DERNet (3 members, Eq. 2)", dernet)]:
            log(f"members: {name} at {size}")
            t32 = time_calls(lambda: model(x), cfg.runs, cfg.warmup, device)
            t16 = None
            if bf16:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    t16 = time_calls(lambda: model(x), cfg.runs, cfg.warmup, device)
            ref = cfg.member_ref_s.get(name) if size == 384 and device.type == "cpu" else None
            rows.append([name, size, t32.ms(), t16.ms() if t16 else "-", ms(ref) if ref else "-"])
            data["rows"].append({"model": name, "size": size, "fp32": t32.to_json(),
                                 "bf16": t16.to_json() if t16 else None, "ref_s": ref})
    md = ("## members: DERNet members' forward, batch 1\n\n" + context_line(cfg, device, ws.quick) + "\n\n"
          + md_table(["model", "size", "fp32 ms", "bf16 autocast ms", "torchvision ref ms (REFERENCE §5)"], rows))
    return Section("members", md, data)


# --------------------------------------------------------------------------- yolo


REDUCED_NAMES = {dtype: name for name, dtype in infer.AUTOCAST_DTYPES.items()}  # torch.bfloat16 -> "bf16"


def reduced_dtypes(device: torch.device) -> list[torch.dtype]:
    """Autocast dtypes worth timing here: bf16 where native, fp16 on CUDA."""
    return ([torch.bfloat16] if bf16_native(device) else []) + ([torch.float16] if device.type == "cuda" else [])


def yolo_variants(device: torch.device) -> list[tuple[str, bool, bool, torch.dtype | None]]:
    """(label, fused, channels-last, autocast dtype): fp32 first, then reduced precision where native."""
    variants = [("fp32 unfused", False, False, None), ("fp32 fused", True, False, None),
                ("fp32 fused channels-last", True, True, None)]
    for dtype in reduced_dtypes(device):
        name = REDUCED_NAMES[dtype]
        variants += [(f"{name} fused", True, False, dtype), (f"{name} fused channels-last", True, True, dtype)]
    return variants


def time_forward(model: nn.Module, x: torch.Tensor, channels_last: bool, dtype, cfg: BenchConfig,
                 device: torch.device) -> Timing:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        t = time_calls(lambda: model(x), cfg.runs, cfg.warmup, device)
    model.to(memory_format=torch.contiguous_format)
    return t


def bench_yolo(cfg: BenchConfig, ws: Workspace) -> Section:
    """YOLO11 at imgsz, batch 1: each variant of yolo_variants, then ONNX Runtime, then the published
    implementation when importable. Achieved GFLOP/s = count_flops / median time."""
    device, s, scale = ws.device, cfg.yolo_imgsz, cfg.yolo_scale
    on_cpu = device.type == "cpu" and not ws.quick  # the published figures were measured on this CPU
    peak = ws.matmul(device)[1]
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    rows, data = [], {"matmul_fp32_gflops": peak, "imgsz": s, "scale": scale, "rows": []}

    def add(impl: str, nc: int, variant: str, t: Timing | None, gflop: float, note: str = ""):
        target = cfg.yolo_published_s.get(variant) if impl == "ours" and on_cpu else None
        if t is None:
            rows.append([impl, nc, variant, note, "-", "-", "-", "-"])
            data["rows"].append({"impl": impl, "nc": nc, "variant": variant, "skipped": note})
            return
        rate = gflop / t.median
        rows.append([impl, nc, variant, t.ms(), f"{rate:.0f}", f"{100 * rate / peak:.0f}%",
                     ms(target) if target else "-", mark(t.median, target, on_cpu)])
        data["rows"].append({"impl": impl, "nc": nc, "variant": variant, **t.to_json(), "gflops": rate,
                             "target_s": target, "mark": mark(t.median, target, on_cpu)})

    for nc in cfg.yolo_nc:
        torch.manual_seed(cfg.seed)
        model = YOLO11(nc=nc, scale=scale).eval().to(device)
        gflop = count_flops(model, s)[""] / 1e9
        data.setdefault("gflops_per_forward", {})[nc] = gflop
        for variant, fused, channels_last, dtype in yolo_variants(device):
            log(f"yolo: YOLO11-{scale} nc={nc} {variant}")
            if fused:
                model.fuse()  # idempotent
            add("ours", nc, variant, time_forward(model, x, channels_last, dtype, cfg, device), gflop)
        for dtype in reduced_dtypes(device):  # as infer.TorchBackend runs it: autocast weights converted once
            log(f"yolo: YOLO11-{scale} nc={nc} {REDUCED_NAMES[dtype]} precast")
            fast = infer.precast(copy.deepcopy(model), dtype)
            add("ours", nc, f"{REDUCED_NAMES[dtype]} fused channels-last, precast",
                time_forward(fast, x, True, dtype, cfg, device), gflop)
            del fast
        if cfg.onnx:
            log(f"yolo: YOLO11-{scale} nc={nc} ONNX export and onnxruntime")
            run = onnx_runner(model, x, ws.dir / f"yolo11{scale}-{nc}.onnx", cfg, device)
            add("ours", nc, "onnxruntime fp32 fused", time_calls(run, cfg.runs, cfg.warmup), gflop)
        del model
        try:
            ref = published_yolo(scale, nc).to(device)
        except ImportError:
            add("published", nc, "fp32 fused", None, gflop, "skipped: ultralytics not importable (not a dependency)")
            continue
        log(f"yolo: published YOLO11-{scale} nc={nc}")
        add("published", nc, "fp32 fused", time_forward(ref, x, False, None, cfg, device), gflop)
        for dtype in reduced_dtypes(device):
            add("published", nc, f"{REDUCED_NAMES[dtype]} fused channels-last",
                time_forward(ref, x, True, dtype, cfg, device), gflop)
        if cfg.onnx:
            try:
                run = onnx_runner(ref, x, ws.dir / f"published-{nc}.onnx", cfg, device)
                add("published", nc, "onnxruntime fp32 fused", time_calls(run, cfg.runs, cfg.warmup), gflop)
            except Exception as err:  # a third-party model that our exporter settings do not handle
                add("published", nc, "onnxruntime fp32 fused", None, gflop, f"export failed: {one_line(err)}")
    md = (f"## yolo: YOLO11-{scale} forward at {s}, batch 1\n\n" + context_line(cfg, device, ws.quick)
          + f"; {peak:.0f} GFLOP/s fp32 matmul; GFLOPs per forward "
          + ", ".join(f"{v:.1f} (nc={k})" for k, v in data["gflops_per_forward"].items())
          + " (torch.utils.flop_counter); target: the published implementation on this CPU\n\n"
          + md_table(["impl", "nc", "variant", "ms", "GFLOP/s", "of fp32 matmul", "target ms", "mark"], rows))
    return Section("yolo", md, data)


# --------------------------------------------------------------------------- train-step


def synthetic_targets(batch: int, n: int, imgsz: int, nc: int, seed: int) -> torch.Tensor:
    """(batch * n, 6) rows [batch_idx, cls, x1, y1, x2, y2] in input pixels: random boxes of 4-25 % of a side."""
    g = torch.Generator().manual_seed(seed)
    wh = imgsz * (0.04 + 0.21 * torch.rand(batch * n, 2, generator=g))
    xy = (imgsz - wh) * torch.rand(batch * n, 2, generator=g)
    cls = torch.randint(0, nc, (batch * n, 1), generator=g).float()
    idx = torch.arange(batch).repeat_interleave(n)[:, None].float()
    return torch.cat((idx, cls, xy, xy + wh), 1)


def bench_train_step(cfg: BenchConfig, ws: Workspace) -> Section:
    """One optimiser step as in train.det_epoch: forward (autocast on CUDA), Eq. 4 loss, backward,
    gradient clipping, AdamW. CPU: batch train_batch fp32. CUDA: also train_cuda_batch, AMP, peak memory."""
    device, s, nc, tcfg = ws.device, cfg.train_imgsz, len(CLASSES), TrainConfig()
    cuda = device.type == "cuda"
    settings = [(cfg.train_batch, cuda)] + ([(cfg.train_cuda_batch, True)] if cuda else [])
    rows, data = [], {"imgsz": s, "scale": cfg.train_scale, "rows": []}
    for batch, amp in settings:
        log(f"train-step: YOLO11-{cfg.train_scale} batch {batch} {'AMP' if amp else 'fp32'}")
        torch.manual_seed(cfg.seed)
        model = YOLO11(nc=nc, scale=cfg.train_scale).to(device).train()
        loss_fn = DetectionLoss(nc, model.reg_max, model.cfg.strides, LossConfig())
        optimizer = torch.optim.AdamW(param_groups(model, tcfg.det_weight_decay), lr=tcfg.lr)  # Algorithm 1
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        imgs = torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        targets = synthetic_targets(batch, cfg.train_boxes, s, nc, cfg.seed).to(device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                preds = model(imgs)  # 3 maps (B, 4 * reg_max + nc, H/s, W/s)
            loss, _ = loss_fn(preds, targets, s)  # Eq. 4, x B (losses.py)
            scaler.scale(loss / batch).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time_calls(step, cfg.train_runs, cfg.train_warmup, device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
        ok = mark(peak, cfg.train_cuda_peak_gib, not ws.quick)
        rows.append([str(device), batch, "AMP" if amp else "fp32", t.ms(), f"{batch / t.median:.2f}",
                     f"{peak:.2f}" if peak is not None else "-", ok])
        data["rows"].append({"device": str(device), "batch": batch, "amp": amp, **t.to_json(),
                             "images_per_s": batch / t.median, "cuda_peak_gib": peak, "mark": ok})
        del model, optimizer, scaler, loss_fn
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    md = (f"## train-step: YOLO11-{cfg.train_scale} at {s} (forward + Eq. 4 + backward + AdamW)\n\n"
          + context_line(cfg, device, ws.quick, cfg.train_runs, cfg.train_warmup)
          + f"; target: CUDA peak <= {cfg.train_cuda_peak_gib:.0f} GiB (the paper's GPU)\n\n"
          + md_table(["device", "batch", "precision", "ms / step", "images/s", "CUDA peak GiB", "mark"], rows))
    return Section("train-step", md, data)


# --------------------------------------------------------------------------- infer

STAGES = ("decode", "preprocess", "dernet", "detector", "total")  # infer.py's timings_ms keys
TRIAGE = ("decode", "preprocess", "dernet")  # up to the decision S > tau: all a normal study costs under the cascade


def infer_settings(cfg: BenchConfig) -> list[tuple[str, dict]]:
    """(label, InferConfig fields): issue 11's three configurations."""
    settings = [("torch fp32, full decode", dict(backend="torch", precision="fp32", fast_decode=False)),
                ("torch auto, fast decode", dict(backend="torch", precision="auto", fast_decode=True))]
    if cfg.onnx:
        settings.append(("onnx, fast decode", dict(backend="onnx", precision="fp32", fast_decode=True)))
    return settings


def analyze_once(pipe, path: Path) -> dict:
    """Stage times (s) from the result, plus the wall time around the call."""
    t0 = time.perf_counter()
    analysis = pipe.analyze(path)
    wall = time.perf_counter() - t0
    out = {k: analysis.result["timings_ms"][k] / 1e3 for k in STAGES}
    out["wall"], out["detector_ran"] = wall, analysis.result["detector_ran"]
    return out


def bench_one_pipeline(label: str, fields: dict, cfg: BenchConfig, ws: Workspace) -> dict:
    """1. build the Pipeline (load, fuse, warm; ONNX export once), 2. the first analysis (cold),
    3. warm analyses, 4. infer_batch analyses back to back (images per second)."""
    cls_ckpt, det_ckpt = ws.checkpoints()
    path = ws.dicom()
    log(f"infer: {label}: loading")
    t0 = time.perf_counter()
    pipe = infer.Pipeline(infer.InferConfig(cls_ckpt=str(cls_ckpt), det_ckpt=str(det_ckpt), cascade=False,
                                            device=str(ws.device), **fields))
    init = time.perf_counter() - t0
    health = pipe.health()
    cold = analyze_once(pipe, path)
    log(f"infer: {label}: {cfg.runs} warm runs, then {cfg.infer_batch} back to back")
    for _ in range(cfg.warmup - 1):  # the cold call was the first warm-up
        analyze_once(pipe, path)
    warm = [analyze_once(pipe, path) for _ in range(cfg.runs)]
    t0 = time.perf_counter()
    for _ in range(cfg.infer_batch):
        pipe.analyze(path)
    batch_s = time.perf_counter() - t0
    del pipe
    gc.collect()
    median = {k: float(np.median([r[k] for r in warm])) for k in (*STAGES, "wall")}
    median["triage"] = float(np.median([sum(r[k] for k in TRIAGE) for r in warm]))
    return {"label": label, "fields": fields, "backend": health.get("backend"), "precision": health.get("precision"),
            "device": health.get("device"), "init_s": init, "cold": cold, "warm_median": median,
            "warm_runs": warm, "detector_always_ran": all(r["detector_ran"] for r in [cold, *warm]),
            "batch": cfg.infer_batch, "images_per_s": cfg.infer_batch / batch_s}


def letterboxed_input(path: Path, imgsz: int) -> torch.Tensor:
    """The detector's input for this DICOM: (1, 3, imgsz, imgsz) letterboxed, CLAHE'd, in [0, 1]."""
    img, _ = load_image(path, reduce_to=imgsz)
    lb = letterbox(prepare_image(img, imgsz, clahe_side=imgsz), imgsz)[0].astype(np.float32) / 255.0  # (S, S)
    return torch.from_numpy(lb).expand(1, 3, -1, -1).contiguous()


def bench_published_detector(cfg: BenchConfig, ws: Workspace) -> list[list]:
    """Issue 11: the published YOLO11-L fp32 and its ONNX Runtime export on this DICOM's detector input."""
    try:
        ref = published_yolo(cfg.det_scale, len(CLASSES)).to(ws.device)
    except ImportError:
        return [["published YOLO11 (ultralytics)", "skipped: not importable (not a dependency)"]]
    x = letterboxed_input(ws.dicom(), cfg.det_imgsz).to(ws.device)
    rows = [["published YOLO11 fp32 fused, torch", time_forward(ref, x, False, None, cfg, ws.device).ms()]]
    if cfg.onnx:
        try:
            run = onnx_runner(ref, x, ws.dir / "published-det.onnx", cfg, ws.device)
            rows.append(["published YOLO11 fp32 fused, onnxruntime", time_calls(run, cfg.runs, cfg.warmup).ms()])
        except Exception as err:
            rows.append(["published YOLO11, onnxruntime", f"export failed: {one_line(err)}"])
    return rows


def dernet_gflops(dernet: DERNet) -> float:
    """GFLOPs of one DERNet.member_probs call at its input size (torch.utils.flop_counter: convolutions
    and matrix multiplies, 2 FLOPs per multiply-add, as yolo11.count_flops)."""
    size = max(dernet.image_sizes.values())
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        dernet.member_probs(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() / 1e9


def compute_floor(best: dict, ws: Workspace) -> dict:
    """The fastest configuration's total if every FLOP of both models ran at this machine's matmul rate
    in its precision (bf16 or fp32; the bf16 forwards reach 45-80 % of it on a 2-core EPYC): its
    measured decode and preprocess, plus (DERNet + detector GFLOPs) / matmul GFLOP/s. Above the
    target, no kernel tuning of these models at these input sizes can meet it here."""
    cls_ckpt, det_ckpt = ws.checkpoints()
    dernet = infer.load_classifier(cls_ckpt, torch.device("cpu"))
    detector, meta = infer.load_detector(det_ckpt)
    gflop = {"dernet": dernet_gflops(dernet), "detector": count_flops(detector, meta["imgsz"])[""] / 1e9}
    dtype = infer.AUTOCAST_DTYPES.get(best["precision"], torch.float32)
    rate = ws.matmul(ws.device, dtype)[1]
    m = best["warm_median"]
    compute = sum(gflop.values()) / rate
    return {"label": best["label"], "dtype": str(dtype).removeprefix("torch."), "gflop": gflop,
            "matmul_gflop_s": rate, "compute_s": compute, "floor_s": m["decode"] + m["preprocess"] + compute}


def floor_line(floor: dict, cfg: BenchConfig, quick: bool) -> str:
    g = floor["gflop"]
    verdict = "within reach" if floor["floor_s"] <= cfg.infer_total_s else "out of reach on this machine"
    return (f"Compute floor of {floor['label']}: its decode + preprocess, plus DERNet {g['dernet']:.1f} + detector "
            f"{g['detector']:.1f} GFLOPs at this machine's {floor['dtype']} matmul rate "
            f"({floor['matmul_gflop_s']:.0f} GFLOP/s) = {ms(floor['compute_s'])} ms: **{ms(floor['floor_s'])} ms** "
            f"against the {cfg.infer_total_s * 1e3:.0f} ms target"
            + (" (quick mode: tiny models, no target applies)" if quick else f": {verdict}"))


def where_time_goes(r: dict) -> str:
    m = r["warm_median"]
    parts = [f"{k} {100 * m[k] / m['wall']:.0f}%" for k in STAGES[:-1]]
    other = m["wall"] - sum(m[k] for k in STAGES[:-1])
    return f"{r['label']} ({ms(m['wall'])} ms): " + ", ".join(parts) + f", other {100 * other / m['wall']:.0f}%"


def bench_infer(cfg: BenchConfig, ws: Workspace) -> Section:
    results = []
    for label, fields in infer_settings(cfg):
        try:
            results.append(bench_one_pipeline(label, fields, cfg, ws))
        except (infer.InferError, DataError) as err:
            raise BenchError(str(err)) from None
    applies = not ws.quick
    warm_rows, cold_rows, tput_rows = [], [], []
    for r in results:
        m, c = r["warm_median"], r["cold"]
        r["marks"] = {"total": mark(m["total"], cfg.infer_total_s, applies),
                      "detector": mark(m["detector"], cfg.infer_detector_s, applies),
                      "under_1s": mark(m["total"], cfg.paper_total_s, applies)}
        name = f"{r['label']} [{r['backend']}, {r['precision']}]"
        warm_rows.append([name, *(ms(m[k]) for k in STAGES), ms(m["wall"]), ms(m["triage"]), r["marks"]["total"],
                          r["marks"]["detector"], r["marks"]["under_1s"]])
        cold_rows.append([name, f"{r['init_s']:.2f}", *(ms(c[k]) for k in STAGES)])
        tput_rows.append([name, r["batch"], f"{r['images_per_s']:.2f}", ms(1 / r["images_per_s"])])
    best = min(results, key=lambda r: r["warm_median"]["total"])
    under = best["warm_median"]["total"] < cfg.paper_total_s
    h, w = cfg.dicom_hw
    md = [f"## infer: one {w} x {h} JPEG 2000 DICOM through infer.Pipeline (cascade off: the detector always runs)",
          "", context_line(cfg, ws.device, ws.quick) + f"; DERNet at {cfg.cls_imgsz} px, YOLO11-{cfg.det_scale} "
          f"at {cfg.det_imgsz} px" + ("" if ws.user_ckpts == (None, None) else " (given checkpoints)"), "",
          "Warm, median ms per stage (`wall` = around analyze(); `triage` = decode + preprocess + dernet, all a "
          "normal study costs under the cascade; targets: total <= "
          f"{cfg.infer_total_s * 1e3:.0f} ms, detector <= {cfg.infer_detector_s * 1e3:.0f} ms (issue 11), "
          f"under {cfg.paper_total_s:.0f} s (the paper's claim))", "",
          md_table(["configuration", *STAGES, "wall", "triage", "total target", "detector target", "< 1 s"],
                   warm_rows), "",
          "Cold: Pipeline construction (load, fuse, warm; ONNX export if not cached) and the first analysis, ms", "",
          md_table(["configuration", "init s", *STAGES], cold_rows), "",
          "Throughput: analyses back to back", "",
          md_table(["configuration", "images", "images/s", "ms/image"], tput_rows), "",
          "Where the time goes (warm medians, share of wall):", "",
          *(f"- {where_time_goes(r)}" for r in results), "",
          f"**Under 1 s warm (the paper's sub-second claim): {'yes' if under else 'no'}** — fastest: "
          f"{best['label']}, {ms(best['warm_median']['total'])} ms total"
          + (" (quick mode: tiny models, not a measurement of the claim)" if ws.quick else "")]
    floor = compute_floor(best, ws)
    md += ["", floor_line(floor, cfg, ws.quick)]
    if not all(r["detector_always_ran"] for r in results):
        md.append("\nNote: the detector did not run on every call although cascade=False.")
    published = bench_published_detector(cfg, ws)
    md += ["", "Published detector on the same letterboxed input (issue 11):", "",
           md_table(["implementation", "ms"], published)]
    data = {"results": results, "under_1s": under, "fastest": best["label"], "floor": floor, "published": published}
    return Section("infer", "\n".join(md), data)


# --------------------------------------------------------------------------- guard


def guard_settings(cfg: BenchConfig) -> list[tuple[str, dict]]:
    """(label, InferConfig fields): the reference first, then the fast configurations, each lever alone too."""
    settings = [("torch fp32, full decode", dict(backend="torch", precision="fp32", fast_decode=False)),
                ("torch fp32, fast decode", dict(backend="torch", precision="fp32", fast_decode=True)),
                *((f"torch {cfg.guard_precision}, {kind} decode",
                   dict(backend="torch", precision=cfg.guard_precision, fast_decode=fast))
                  for kind, fast in (("full", False), ("fast", True)))]
    if cfg.onnx:
        settings.append(("onnx, fast decode", dict(backend="onnx", precision="fp32", fast_decode=True)))
    return settings


def guard_split(cfg: BenchConfig, ws: Workspace, root: Path | None):
    """The evaluation split's records: --data's test split (default: the synthetic set train.py writes);
    with --quick and no --data, a tiny synthetic set written into the workspace."""
    if root is None and ws.quick:
        root = make_synthetic(ws.dir / "synthetic", n_train=2, n_test=cfg.guard_quick_images, seed=cfg.seed,
                              workers=1, progress=False)
    root = Path(root or cfg.guard_data)
    try:
        return load_split(root, cfg.guard_split)
    except (DataError, OSError) as err:
        raise BenchError(f"guard: no {cfg.guard_split} split under {root} ({one_line(err)}); "
                         f"python train.py --stage cls writes the synthetic set, or pass --data") from None


def detections_of(analysis) -> np.ndarray:
    """(K, 6) [x1, y1, x2, y2, score, class] in original pixels: the boxes of an analysed image."""
    boxes = [[*b["box"], b["score"], b["class_id"]] for b in analysis.result["boxes"]]
    return np.array(boxes, np.float32).reshape(-1, 6)


def run_split(label: str, fields: dict, records, cfg: BenchConfig, ws: Workspace, nudges: Sequence[float] = ()) -> dict:
    """Every image through one Pipeline configuration, cascade off: scores S (N,) and detections
    {image_id: (K, 6)} at train.py's evaluation confidence; and for each nudge the same of every decoded
    image made that much brighter (negative: darker), steps 2-4 of Pipeline.analyze on it."""
    cls_ckpt, det_ckpt = ws.checkpoints()
    pipe = infer.Pipeline(infer.InferConfig(cls_ckpt=str(cls_ckpt), det_ckpt=str(det_ckpt), cascade=False,
                                            conf=TrainConfig.eval_conf, device=str(ws.device), **fields))
    runs = {key: {"scores": [], "detections": {}} for key in (None, *nudges)}
    for r in tqdm(records, desc=f"guard: {label}", leave=False, disable=ws.quick):
        analysis = pipe.analyze(r.path)
        for nudge, run in runs.items():
            a = analysis if nudge is None else pipe.analyze_decoded(
                np.clip(analysis.image + nudge, 0, 1), tuple(analysis.result["image_size"]))
            run["scores"].append(a.result["score"])
            run["detections"][r.image_id] = detections_of(a)
    for run in runs.values():
        run.update(scores=np.array(run["scores"]), precision=pipe.precision, tau=pipe.tau)
    out = runs.pop(None)
    out["nudged"] = runs
    return out


def scored(run: dict, label: str, y: np.ndarray, truth: dict) -> dict:
    """run with its label, AUROC (NaN with one class only) and detection mAP@0.5 in points."""
    return {**run, "label": label, "auroc": auroc(y, run["scores"]) if 0 < y.sum() < len(y) else float("nan"),
            "map50": 100 * evaluate_detections(run["detections"], truth)["map50"]}


def guard_row(run: dict, ref: dict, records, cfg: BenchConfig, applies: bool) -> dict:
    """One configuration against the reference: |delta S| per image (max, mean, count over the target),
    AUROC and mAP@0.5 with their differences, the image that moved most (and its reference S: near tau
    it is a borderline image), and the pass/MISS marks."""
    d = np.abs(run["scores"] - ref["scores"])                                     # (N,)
    worst = int(d.argmax())
    row = {"label": run["label"], "precision": run["precision"], "max_abs_dS": float(d.max()),
           "mean_abs_dS": float(d.mean()), "images_over_dS": int((d > cfg.guard_max_dS).sum()),
           "worst_image": records[worst].image_id, "worst_ref_S": float(ref["scores"][worst]), "auroc": run["auroc"],
           "d_auroc": run["auroc"] - ref["auroc"], "map50": run["map50"], "d_map50": run["map50"] - ref["map50"]}
    row["marks"] = {"dS": mark(row["max_abs_dS"], cfg.guard_max_dS, applies),
                    "auroc": mark(abs(row["d_auroc"]), cfg.guard_max_dauroc, applies),
                    "map50": mark(abs(row["d_map50"]), cfg.guard_max_dmap50, applies)}
    return row


def nudge_label(nudge: float) -> str:
    return f"reference, {'brighter' if nudge > 0 else 'darker'} by {255 * abs(nudge):g}/255"


def plot_guard(runs: list[dict], cfg: BenchConfig, path: Path) -> Path:
    """One panel per fast configuration: S - S_ref against S_ref per image, the +-target band, and in greys
    the reference's own change when its images get half a display level brighter or darker."""
    ref, others = runs[0], runs[1:]
    fig = Figure(figsize=(3.2 * len(others), 3.4))
    for k, run in enumerate(others):
        ax = fig.add_subplot(1, len(others), k + 1, sharey=fig.axes[0] if k else None)
        for (nudge, run_n), grey in zip(ref["nudged"].items(), ("lightgray", "darkgray")):
            ax.scatter(ref["scores"], run_n["scores"] - ref["scores"], s=8, color=grey,
                       label=f"reference, {255 * nudge:+g}/255")
        ax.scatter(ref["scores"], run["scores"] - ref["scores"], s=8, color="tab:blue", label="this configuration")
        for y in (-cfg.guard_max_dS, cfg.guard_max_dS):
            ax.axhline(y, color="tab:red", ls=":", lw=1)
        ax.set(title=run["label"], xlabel="S (torch fp32, full decode)", xlim=(0, 1))
        ax.title.set_fontsize(9)
    fig.axes[0].set_ylabel("ΔS")
    fig.axes[0].legend(fontsize=7, loc="lower left")
    FigureCanvasAgg(fig)  # Agg canvas for this figure only; no global backend switch
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def bench_guard(cfg: BenchConfig, ws: Workspace) -> Section:
    """Issue 11's accuracy guard: each fast configuration against torch fp32 + full decode on a test split:
    per-image |delta S| (max, mean), AUROC and detection mAP@0.5 (VinDr protocol, train.py's code); and
    how far the reference itself moves when its decoded images get half a display level brighter or darker."""
    records = guard_split(cfg, ws, ws.data)
    y = np.array([r.label for r in records])
    truth = {r.image_id: (r.boxes, r.classes) for r in records}
    runs, nudges = [], (cfg.guard_nudge, -cfg.guard_nudge)
    for k, (label, fields) in enumerate(guard_settings(cfg)):
        try:
            out = run_split(label, fields, records, cfg, ws, nudges if k == 0 else ())
        except (infer.InferError, DataError) as err:
            raise BenchError(str(err)) from None
        out["nudged"] = {n: scored(run, nudge_label(n), y, truth) for n, run in out["nudged"].items()}
        runs.append(scored(out, label, y, truth))
    ref, applies = runs[0], not ws.quick and ws.user_ckpts != (None, None)
    data = {"images": len(records), "abnormal": int(y.sum()), "reference": ref["label"],
            "rows": [guard_row(r, ref, records, cfg, applies) for r in runs],
            "sensitivity": [guard_row(r, ref, records, cfg, False) for r in ref["nudged"].values()]}

    def cells(r: dict, marks: bool) -> list:
        worst = f"{r['worst_image'][:8]} ({r['worst_ref_S']:.3f})" if r["max_abs_dS"] > 0 else "-"
        return [f"{r['label']} [{r['precision']}]", f"{r['max_abs_dS']:.4f}", f"{r['mean_abs_dS']:.4f}",
                r["images_over_dS"], f"{r['auroc']:.4f}", f"{r['d_auroc']:+.4f}", f"{r['map50']:.2f}",
                f"{r['d_map50']:+.2f}", worst, *(r["marks"].values() if marks else ())]

    header = ["configuration", "max abs ΔS", "mean abs ΔS", f"images ΔS > {cfg.guard_max_dS}", "AUROC", "ΔAUROC",
              "mAP@0.5", "ΔmAP@0.5", f"most moved (S ref.; τ {ref['tau']:.3f})"]
    most_map = max(data["sensitivity"], key=lambda r: abs(r["d_map50"]))
    md = [f"## guard: accuracy of the fast paths on {len(records)} {cfg.guard_split} images ({int(y.sum())} abnormal)",
          "", f"Against {ref['label']}; cascade off, detections at confidence {TrainConfig.eval_conf}. Targets "
          f"(issue 11): max |ΔS| <= {cfg.guard_max_dS}, |ΔAUROC| <= {cfg.guard_max_dauroc}, "
          f"|ΔmAP@0.5| <= {cfg.guard_max_dmap50} points"
          + ("" if applies else "; **untrained or --quick models: no target applies**"), "",
          md_table([*header, "ΔS target", "AUROC target", "mAP target"], [cells(r, True) for r in data["rows"]]), "",
          f"The reference's own sensitivity: the same models and path on each decoded image made brighter or "
          f"darker by {255 * cfg.guard_nudge:g}/255 (half a display level, invisible to a reader): S moved by up "
          f"to {max(r['max_abs_dS'] for r in data['sensitivity']):.4f} and mAP@0.5 by up to "
          f"{abs(most_map['d_map50']):.2f} points.", "", md_table(header, [cells(r, False) for r in data["sensitivity"]])]
    if ws.plots is not None:
        data["plot"] = str(plot_guard(runs, cfg, ws.plots / "guard.png"))
        md += ["", f"Plot: {data['plot']}"]
    return Section("guard", "\n".join(md), data)


# --------------------------------------------------------------------------- app


# Request mix: kind -> (weight, expected status). Valid uploads, a Grad-CAM explanation (the page's toggle),
# and the client mistakes of issue 9 (unsupported type, unreadable DICOM, empty, no length, wrong path).
APP_MIX = {"dicom": (4, 200), "png": (3, 200), "gradcam": (1, 200), "garbage": (1, 415), "truncated-dicom": (1, 400),
           "empty": (1, 400), "no-length": (1, 411), "unknown-path": (1, 404)}


def free_port() -> int:
    """An ephemeral loopback port, free a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field_name: str = "VmRSS") -> float | None:
    """Resident memory of a process from /proc/<pid>/status (VmRSS now, VmHWM its peak), MiB; None when
    unreadable (not Linux, or the process has exited)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    return None


def app_payloads(ws: Workspace, cfg: BenchConfig) -> dict[str, bytes]:
    """Request bodies by APP_MIX kind: the bench DICOM, an 8-bit PNG of it, random bytes, a cut DICOM, nothing."""
    dicom = ws.dicom().read_bytes()
    img = to_uint8(fit_long_side(load_image(dicom)[0], cfg.app_png_side))
    _, png = cv2.imencode(".png", img)
    garbage = np.random.default_rng(cfg.seed).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    return {"dicom": dicom, "png": png.tobytes(), "gradcam": dicom, "garbage": garbage,
            "truncated-dicom": dicom[: len(dicom) // 3], "empty": b""}


def app_request(port: int, kind: str, payloads: dict, timeout: float) -> tuple[int, float]:
    """One request of the given kind on a fresh connection -> (status, seconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if kind == "unknown-path":
            conn.request("GET", "/api/no-such-route")
        elif kind == "no-length":  # headers only: http.client adds no Content-Length to a bare putrequest
            conn.putrequest("POST", "/api/analyze")
            conn.endheaders()
        else:
            path = "/api/explain?method=gradcam" if kind == "gradcam" else "/api/analyze"
            conn.request("POST", path, body=payloads[kind], headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    except (OSError, http.client.HTTPException):  # reset, refused, timed out: recorded as status 0
        return 0, time.perf_counter() - t0
    finally:
        conn.close()


def start_server(cfg: BenchConfig, ws: Workspace, port: int, log_file) -> subprocess.Popen:
    """python app.py on loopback with the bench checkpoints; one inference at a time and a queue place for
    every client, so that a 503 would be a failure rather than backpressure."""
    app_py = Path(__file__).with_name("app.py")
    if not app_py.is_file():
        raise BenchError(f"{app_py} not found")
    cls_ckpt, det_ckpt = ws.checkpoints()
    cmd = [sys.executable, str(app_py), "--host", "127.0.0.1", "--port", str(port), "--cls-ckpt", str(cls_ckpt),
           "--det-ckpt", str(det_ckpt), "--workers", "1", "--queue", str(cfg.app_clients), "--device", str(ws.device)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as this process
    return subprocess.Popen(cmd, cwd=app_py.parent, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, log_path: Path) -> dict:
    """Poll /api/health until it says ready -> its JSON; a server that exits gives its last log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"app.py exited with status {proc.returncode}: {tail[0]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health")
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200 and json.loads(body).get("ready"):
                return json.loads(body)
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.5)
    raise BenchError(f"app.py not ready after {timeout:.0f} s")


def run_load(cfg: BenchConfig, port: int, payloads: dict) -> tuple[list, float]:
    """app_clients threads send requests of random kinds (APP_MIX weights, seeded per client) until
    app_seconds have passed. Returns ([(kind, status, seconds)], elapsed seconds)."""
    kinds = list(APP_MIX)
    weights = np.array([APP_MIX[k][0] for k in kinds], float)
    records, lock = [], threading.Lock()
    deadline = time.perf_counter() + cfg.app_seconds

    def client(i: int):
        rng = np.random.default_rng([cfg.seed, i])
        while time.perf_counter() < deadline:
            kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
            status, seconds = app_request(port, kind, payloads, cfg.app_request_timeout)
            with lock:
                records.append((kind, status, seconds))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(cfg.app_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def stop_server(proc: subprocess.Popen):
    """SIGTERM to the server this benchmark started, SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_stats(records: list, elapsed: float) -> dict:
    """Requests/s, latency percentiles, status counts overall and per kind, against APP_MIX's expectations."""
    statuses = Counter(status for _, status, _ in records)
    lat = np.array([s for _, _, s in records] or [0.0])
    by_kind = {}
    for kind, (_, expected) in APP_MIX.items():
        sel = [(status, s) for k, status, s in records if k == kind]
        if sel:
            times = np.array([s for _, s in sel])
            by_kind[kind] = {"expected": expected, "n": len(sel), "statuses": dict(Counter(st for st, _ in sel)),
                             "p50_s": float(np.percentile(times, 50)), "p95_s": float(np.percentile(times, 95))}
    return {"requests": len(records), "seconds": elapsed, "requests_per_s": len(records) / elapsed,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "statuses": dict(statuses), "n5xx": sum(v for k, v in statuses.items() if k >= 500),
            "no_response": statuses.get(0, 0),
            "unexpected": sum(1 for kind, status, _ in records if status != APP_MIX[kind][1]), "by_kind": by_kind}


def bench_app(cfg: BenchConfig, ws: Workspace) -> Section:
    """1. start app.py and wait for /api/health, 2. one request of each kind (warm-up), RSS before,
    3. the load, 4. RSS after and the peak; 5xx and RSS growth against their targets."""
    payloads = app_payloads(ws, cfg)
    ws.checkpoints()
    port, log_path = free_port(), ws.dir / "app.log"
    with open(log_path, "wb") as log_file:
        log(f"app: starting app.py on 127.0.0.1:{port}")
        proc = start_server(cfg, ws, port, log_file)
        try:
            health = wait_ready(proc, port, cfg.app_start_timeout, log_path)  # 1.
            for kind in APP_MIX:  # 2.
                app_request(port, kind, payloads, cfg.app_request_timeout)
            rss = {"before": rss_mib(proc.pid)}
            log(f"app: {cfg.app_clients} clients for {cfg.app_seconds:g} s")
            records, elapsed = run_load(cfg, port, payloads)  # 3.
            alive = proc.poll() is None
            rss.update(after=rss_mib(proc.pid), peak=rss_mib(proc.pid, "VmHWM"))  # 4.
        finally:
            stop_server(proc)
    log_lines = log_path.read_text(errors="replace").splitlines()
    data = {"clients": cfg.app_clients, **load_stats(records, elapsed), "alive": alive,
            "internal_errors": sum("internal error" in line for line in log_lines),
            "rss_mib": rss, "rss_growth_mib": None if None in rss.values() else rss["after"] - rss["before"]}
    data["marks"] = {"5xx": mark(data["n5xx"], cfg.app_max_5xx),
                     "rss_growth": mark(data["rss_growth_mib"], cfg.app_rss_growth_mib, not ws.quick)}

    def mib(v: float | None, sign: str = "") -> str:
        return "?" if v is None else f"{v:{sign}.0f}"

    summary = [["requests", data["requests"]], ["requests/s", f"{data['requests_per_s']:.2f}"],
               ["latency p50 / p95 ms", f"{ms(data['p50_s'])} / {ms(data['p95_s'])}"],
               ["status counts", ", ".join(f"{k}: {v}" for k, v in sorted(data["statuses"].items()))],
               ["5xx responses", f"{data['n5xx']} ({data['marks']['5xx']}, target {cfg.app_max_5xx})"],
               ["no response (reset / timeout)", data["no_response"]],
               ["status other than expected", data["unexpected"]],
               ["server alive after the load", "yes" if alive else "NO"],
               ["'internal error' lines in the server log", data["internal_errors"]],
               ["server RSS before / after / peak since start MiB",
                " / ".join(mib(rss[k]) for k in ("before", "after", "peak"))],
               ["RSS growth MiB", f"{mib(data['rss_growth_mib'], '+')} ({data['marks']['rss_growth']}, "
                                  f"bound {cfg.app_rss_growth_mib:.0f})"]]
    kinds = [[kind, k["expected"], k["n"], ", ".join(f"{st}: {n}" for st, n in sorted(k["statuses"].items())),
              ms(k["p50_s"]), ms(k["p95_s"])] for kind, k in data["by_kind"].items()]
    md = (f"## app: {cfg.app_clients} concurrent clients for {cfg.app_seconds:g} s on loopback\n\n"
          f"server: `python app.py --workers 1 --queue {cfg.app_clients}` ({health.get('backend')}, "
          f"{health.get('precision')}, {health.get('device')}); RSS of the server process from /proc, before = "
          f"after one warm-up request of each kind"
          + ("; **--quick: tiny models, no target applies**" if ws.quick else "") + "\n\n"
          + md_table(["what", "value"], summary) + "\n\n"
          + md_table(["kind", "expected", "n", "statuses", "p50 ms", "p95 ms"], kinds))
    return Section("app", md, data)


# --------------------------------------------------------------------------- command line

BENCHES = {"machine": bench_machine, "decode": bench_decode, "members": bench_members, "yolo": bench_yolo,
           "train-step": bench_train_step, "infer": bench_infer, "guard": bench_guard, "app": bench_app}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Speed and memory benchmarks with the project's targets",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=(*SECTIONS, "all"), help="sub-benchmark, or all of them in order")
    run = parser.add_argument_group("run")
    run.add_argument("--quick", action="store_true", help="tiny models and inputs: checks that it runs, no targets")
    run.add_argument("--runs", type=int, help=f"timed calls per figure (default {BenchConfig.runs})")
    run.add_argument("--warmup", type=int, help=f"untimed calls first (default {BenchConfig.warmup})")
    run.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--no-onnx", dest="onnx", action="store_false",
                     help="skip the ONNX exports: yolo's onnxruntime rows, infer's onnx backend")
    models = parser.add_argument_group("models (infer, guard, app)")
    models.add_argument("--cls-ckpt", help="DERNet checkpoint (default: a fresh untrained one)")
    models.add_argument("--det-ckpt", help="detector checkpoint (default: a fresh untrained YOLO11-L)")
    models.add_argument("--data", type=Path,
                        help=f"guard: dataset root in the VinDr-SpineXR layout (default {BenchConfig.guard_data})")
    models.add_argument("--guard-precision", choices=("auto", "bf16"), default=BenchConfig.guard_precision,
                        help="guard: reduced precision to check (auto: infer.py's choice on this machine; bf16: "
                             "bf16 autocast even without native support, slow, to check its numerics anywhere)")
    load = parser.add_argument_group("load (app)")
    load.add_argument("--clients", type=int, help=f"concurrent clients (default {BenchConfig.app_clients})")
    load.add_argument("--seconds", type=float, help=f"load duration (default {BenchConfig.app_seconds:.0f})")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    out.add_argument("--plots", type=Path, help="guard: write guard.png (ΔS against S per configuration) here")
    return parser


def guard_lacks_models(args: argparse.Namespace) -> bool:
    """The guard compares trained models (untrained ones score every image alike and detect nothing, so
    the comparison would say nothing); --quick runs it on the tiny fresh ones only to check the code."""
    return not args.quick and not (args.cls_ckpt and args.det_ckpt)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = replace(BenchConfig(), **QUICK) if args.quick else BenchConfig()
    overrides = {"runs": args.runs, "warmup": args.warmup, "app_clients": args.clients, "app_seconds": args.seconds}
    cfg = replace(cfg, onnx=args.onnx, guard_precision=args.guard_precision,
                  **{k: v for k, v in overrides.items() if v is not None})
    bad_threads = args.threads is not None and args.threads < 1
    if cfg.runs < 1 or cfg.warmup < 0 or cfg.app_clients < 1 or cfg.app_seconds <= 0 or bad_threads:
        raise BenchError("--runs, --threads, --clients and --seconds must be positive and --warmup not negative")
    if args.json and not args.json.resolve().parent.is_dir():
        raise BenchError(f"--json {args.json}: the folder {args.json.parent} does not exist")
    if args.plots and not args.plots.is_dir():
        raise BenchError(f"--plots {args.plots}: no such folder")
    for flag in ("cls_ckpt", "det_ckpt"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise BenchError(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.what == "guard" and guard_lacks_models(args):
        raise BenchError("guard compares the fast paths on trained models: pass --cls-ckpt and --det-ckpt "
                         "(python train.py --stage cls / --stage det)")
    return cfg


def skipped(name: str, args: argparse.Namespace) -> str | None:
    """Why `all` leaves a section out, or None."""
    if name == "guard" and guard_lacks_models(args):
        return "## guard\n\nskipped: pass --cls-ckpt and --det-ckpt (trained models) to run the accuracy guard"
    return None


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        ws = Workspace(cfg, resolve_device(args.device), args.quick, args.cls_ckpt, args.det_ckpt, args.data,
                       args.plots)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"config": asdict(cfg), "quick": args.quick, "sections": {}}
    try:
        for name in SECTIONS if args.what == "all" else (args.what,):
            if (why := skipped(name, args)) is not None:
                print(why + "\n", flush=True)
                continue
            section = BENCHES[name](cfg, ws)
            print(section.markdown + "\n", flush=True)
            report["sections"][name] = section.data
            if args.json:
                write_json(args.json, report)  # after every section: an interrupted run keeps what it measured
    except (BenchError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
