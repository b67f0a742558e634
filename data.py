"""Images and labels for DERNet + YOLO11 spinal-lesion triage (Sec. 3.1 of the paper).

What this file implements, in reading order:
  1. Image loading: DICOM (JPEG 2000 / JPEG / RLE through the pylibjpeg plugins, files without a
     preamble), PNG 8/16-bit and JPEG -> one display-ready 2-D float32 image in [0, 1], plus
     metadata with no patient-identifying field. DICOM grayscale order: stored values -> (the 5/3
     wavelet low band that still covers the working side, which a reduced JPEG 2000 decode returns
     as is: issue 11's fast decode gives the same image) -> Modality LUT -> VOI LUT or first window
     -> MONOCHROME1 inversion -> normalise. Bad files raise DataError.
  2. Preprocessing: CLAHE (Eq. 1, clip limit 2.0, 8x8 tiles) once at a working resolution, model
     inputs shrunk from it, letterbox and box mapping.
  3. VinDr-SpineXR annotations (annotations/{train,test}.csv) -> one Record per image.
  4. Study-grouped, label-stratified 5-fold split (Sec. 4.1, seed 42).
  5. An on-disk cache of decoded, resized and CLAHE'd images, and the torch Datasets for the
     classifiers (Phase I) and the detector (Phase II).
  6. A synthetic dataset in the exact VinDr-SpineXR layout: radiograph-like AP and lateral spine
     images with all 7 lesion classes, exact boxes and per-lesion masks. It is the embedded
     default for every other script, since the real data is credentialed.
  7. A montage of a dataset: annotated images above the classifier input they become.

Commands:
    python data.py synth --out data/synthetic            # write the synthetic VinDr-format set
    python data.py synth --out DIR --train 400 --test 100 --seed 42
    python data.py info path/to/image.dicom              # metadata + a one-line decode check
    python data.py montage --out docs/synthetic_montage.png   # annotated images + classifier input
"""

import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import struct
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from PIL import Image, ImageFile
from pydicom import config as dicom_config
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import (JPEG2000, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless)
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import Dataset
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Classes, the one error type, and the config every function takes its defaults from
# (defined first: readers meet it before its use in default arguments below)

CLASSES = ("Disc space narrowing", "Foraminal stenosis", "Osteophytes", "Spondylolysthesis",
           "Surgical implant", "Vertebral collapse", "Other lesions")  # LT order (Table 3); sic "Spondylolysthesis"
LT_CODES = ("LT2", "LT4", "LT6", "LT8", "LT10", "LT11", "LT13")
NO_FINDING = "No finding"
CSV_COLUMNS = ("study_id", "series_id", "image_id", "rad_id", "lesion_type", "xmin", "ymin", "xmax", "ymax")
IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")  # VinDr ships .dicom; PNG/JPEG exports also work


class DataError(ValueError):
    """The one project error for bad user input. str() is one line: what is wrong + what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


@dataclass
class DataConfig:
    # preprocessing (Sec. 3.1)
    clahe_clip: float = 2.0  # Eq. 1, clip limit tau = 2.0 (Sec. 3.1)
    clahe_tiles: int = 8  # Eq. 1, 8 x 8 regions Omega_k: the common choice, paper silent (REFERENCE §4)
    clahe_side: int = 640  # Eq. 1 working long side: CLAHE once here, model inputs shrunk from it (ours; the
    #                        detector's input size, REFERENCE §3, so each tile holds ~5,000 px >> 256 bins)
    low_band: bool = True  # ours (issue 11): a DICOM is first brought to the 5/3 wavelet low band that still
    #                        covers the working side (wavelet_low_band), which a reduced JPEG 2000 decode returns
    #                        exactly, so the fast decode gives the very image training saw; False: area average only
    pad_value: float = 114 / 255  # detector letterbox grey of the YOLO family (REFERENCE §3)
    cls_pad_value: float = 0.0  # classifier letterbox: black like collimated air, no artificial bright frame (ours)
    imagenet_mean: tuple = (0.485, 0.456, 0.406)  # torchvision ImageNet weights (Algorithm 1, line 2)
    imagenet_std: tuple = (0.229, 0.224, 0.225)  # torchvision ImageNet weights
    mask_ratio: int = 4  # YOLO11-seg prototypes at stride 4 (REFERENCE §3)
    # input guards (issue 2)
    max_pixels: int = 50_000_000  # decompression-bomb limit: ~2.8x the largest VinDr image (4,243 px a side)
    min_side: int = 32  # smaller images carry no diagnosable anatomy
    # folds (Sec. 4.1)
    n_folds: int = 5  # 5-fold stratified cross-validation (Sec. 4.1)
    seed: int = 42  # fixed seed (Sec. 4.1)
    # classification augmentation: radiograph-safe, no vertical flip (ours; paper silent)
    rotate_deg: float = 7.0  # patient positioning varies by a few degrees
    scale_jitter: float = 0.10  # +-10 % zoom (detector distance / collimation)
    translate: float = 0.05  # +-5 % of the input side
    hflip: float = 0.5  # mirror: left/right lateral views both occur; labels are side-agnostic
    brightness: float = 0.10  # +- additive, display units
    contrast: float = 0.20  # x U(1 - c, 1 + c) around mid-grey
    gamma: float = 0.25  # exp(U(-g, g)): exposure / processing curve differences
    # detection augmentation (Algorithm 1, lines 8-13; issue 5). Intensity jitter shares the values above.
    mosaic_center: tuple = (0.3, 0.7)  # Algorithm 1: mosaic centre ~ U(0.3 W, 0.7 W) on the 2S x 2S canvas
    det_translate: float = 0.1  # +-10 % of S (reference family's default)
    det_scale: float = 0.3  # zoom U(1 - s, 1 + s); reference family 0.5, ours 0.3: spinal lesions are small
    min_box_side: float = 2.0  # px: boxes thinner than this after augmentation are dropped (reference family)
    min_box_kept: float = 0.1  # drop a box when < 10 % of its (scaled) area survives the crop (reference family)
    # synthetic VinDr-format set (ours: sized for a CPU demo, skew like REFERENCE §1)
    synth_train: int = 1440  # images in annotations/train.csv (Phase I demo: 1,152 train / 288 val)
    synth_test: int = 100  # images in annotations/test.csv
    synth_height: tuple = (640, 800)  # px; lesions stay >= 3-4 px after downscaling to ~200 px
    synth_min_height: int = 256  # px, the floor of `data.py synth --height` (ours: below it lesions shrink to dots)
    synth_abnormal_study: float = 0.55  # P(abnormal study); ~half the images abnormal (REFERENCE §1: 4,129 / 8,389)
    synth_monochrome1: float = 0.25  # share of inverted-polarity files
    synth_j2k: float = 0.5  # share stored as JPEG 2000 Lossless (VinDr: all), the rest uncompressed
    synth_min_class_images: int = 3  # every class on at least this many images per split (when possible)


def atomic_write(path, write) -> Path:
    """write(tmp) on a temporary file beside `path`, then os.replace (atomic): a crash never leaves half a
    file, and the newest complete one stays readable. Every script writes through this (checkpoints,
    reports, plots, the image cache, ONNX files). A plain open() of a unique name keeps the user's umask
    (mkstemp would make every output 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -----------------------------------------------------------------------------
# 1. Image loading

@dataclass(frozen=True)
class ImageMeta:
    """What later stages need about an image; never a patient-identifying field.
    height/width: size of the stored image (with load_image(reduce_to=...) or low_band=... the
    returned array may be smaller by a power of two: scale coordinates by width / img.shape[1]; its
    pixel n sits at original pixel 2^r n, see resample_reduced)."""
    height: int
    width: int
    source: str  # "dicom" | "png" | "jpeg"
    photometric: str  # DICOM Photometric Interpretation; "MONOCHROME2" / "RGB" for PNG and JPEG
    pixel_spacing: tuple | None  # (row, col) mm, from PixelSpacing or ImagerPixelSpacing
    bits_stored: int | None
    frames: int


def sniff_format(data: bytes) -> str | None:
    """'dicom' | 'png' | 'jpeg' | None from the first bytes."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    # no preamble: a bare data set starts with a group 0002 or 0008 tag (little or big endian)
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return "dicom"
    return None


def _short(err: BaseException) -> str:
    """An exception as a short one-line cause for DataError messages."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:160]


def _read_source(src) -> tuple[bytes, str]:
    """(file bytes, name for messages) from a path or bytes."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "upload"
    path = Path(src)
    try:
        return path.read_bytes(), path.name
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({_short(err)})") from None


def _check_size(h: int, w: int, name: str, max_pixels: int, min_side: int = DataConfig.min_side):
    """Reject tiny images and decompression bombs from header dimensions, before decoding."""
    if min(h, w) < min_side:
        raise DataError(f"{name}: image is {h}x{w} px, smaller than {min_side} px a side; "
                        f"use the original-resolution radiograph")
    if h * w > max_pixels:
        raise DataError(f"{name}: image is {h}x{w} = {h * w:,} px, over the {max_pixels:,}-pixel limit "
                        f"(decompression-bomb guard); raise max_pixels if you trust this file")


def _minmax(x: np.ndarray, name: str) -> np.ndarray:
    """Stretch to [0, 1] by the actual data range; a constant image is an error."""
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        raise DataError(f"{name}: the image is blank (every pixel equals {lo:g}); check the export")
    return ((x - lo) / (hi - lo)).astype(np.float32)


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB of any integer depth -> (H, W) float32, ITU-R BT.601 luma weights."""
    return rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


# --- DICOM

J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)
VOLUME_MODALITIES = ("CT", "MR", "PT", "NM", "RTDOSE")  # multi-frame in these = a 3-D volume


def _j2k_header(codestream: bytes) -> dict | None:
    """Main-header facts of a raw JPEG 2000 codestream (SIZ + COD markers), None if unusual."""
    if codestream[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ; a JP2 box wrapper is "unusual"
        return None
    lsiz, _, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz = struct.unpack(">HHIIIIIIIIH",
                                                                                         codestream[4:42])
    ssiz = codestream[42]
    head = {"width": xsiz - xosiz, "height": ysiz - yosiz, "offset": (xosiz, yosiz), "components": csiz,
            "precision": (ssiz & 0x7F) + 1, "signed": bool(ssiz & 0x80), "levels": None, "reversible": None,
            "tiled": xtosiz + xtsiz < xsiz or ytosiz + ytsiz < ysiz}  # tiles are transformed one by one
    pos = 4 + lsiz
    while pos + 4 <= len(codestream):  # walk marker segments until COD or the first tile (SOT)
        marker, length = struct.unpack(">HH", codestream[pos:pos + 4])
        if marker == 0xFF52:  # COD: Scod, progression, layers(2), MCT, levels, code-block w/h/style, wavelet
            head["levels"] = codestream[pos + 9]
            head["reversible"] = codestream[pos + 13] == 1  # 1: 5/3 reversible (lossless), 0: 9/7 irreversible
            return head
        if marker == 0xFF90:
            break
        pos += 2 + length
    return None


OPENJPEG_THREADS = "OPJ_NUM_THREADS"  # the environment variable OpenJPEG reads its decode thread count from


def use_jpeg2000_threads(threads: int) -> None:
    """Let OpenJPEG, Pillow's JPEG 2000 decoder (the reduced decode below), decode code-blocks on
    `threads` threads, unless OPJ_NUM_THREADS is already set. OpenJPEG reads that variable whenever it
    creates a decoder; unset means one thread. The reduced decode of a 2,500 x 3,000 DICOM took 88 ->
    49 ms with 2 threads on a 2-core EPYC (bench.py decode); the full decode (pylibjpeg-openjpeg)
    ignores it. Called once per process by infer.Pipeline, before any server thread decodes; training
    leaves it unset (its DataLoader workers already use the cores)."""
    os.environ.setdefault(OPENJPEG_THREADS, str(threads))


# --- one downsampling for every decode: the 5/3 wavelet low band (issue 11)
# A reversible (lossless) JPEG 2000 codestream holds the image's integer 5/3 wavelet coefficients
# (ISO/IEC 15444-1 Annex F), and a decode at resolution level r returns its low band LL_r as stored
# (plus the DC level shift, clipped to the sample range). Those coefficients are a function of the
# pixels alone: the standard fixes the inverse transform, and integer lifting is invertible. So the
# forward lifting below computes the same LL_r from any full decode, bit for bit (tested against
# OpenJPEG). With DataConfig.low_band every DICOM is taken to the level that still covers the working
# side this way, before windowing, and the fast path's reduced decode is then not an approximation of
# the training image but the training image itself.

def _lift_53_low(x: np.ndarray, axis: int) -> np.ndarray:
    """One level of the reversible 5/3 analysis along `axis` -> its low band, ceil(n / 2) samples
    (Annex F.4.8.2; whole-sample symmetric extension at both ends, x[-1] = x[1], x[n] = x[n - 2]):
        predict  d[k] = x[2k+1] - floor((x[2k] + x[2k+2]) / 2)
        update   s[k] = x[2k]   + floor((d[k-1] + d[k] + 2) / 4),   d[-1] = d[0]
    numpy's >> on signed integers is floor division by a power of two."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    if n > 1:
        even, odd = x[0::2], x[1::2]                                              # x[2k], x[2k+1]
        right = even[1:] if n % 2 else np.concatenate([even[1:], even[-1:]])      # x[2k+2]
        d = odd - ((even[:len(odd)] + right) >> 1)                                # predict (high band)
        left = np.concatenate([d[:1], d if n % 2 else d[:-1]])                    # d[k-1]
        here = np.concatenate([d, d[-1:]]) if n % 2 else d                        # d[k]; odd n: d[K] = d[K-2]
        x = even + ((left + here + 2) >> 2)                                       # update (low band)
    return np.moveaxis(x, 0, axis)


def wavelet_low_band(stored: np.ndarray, levels: int) -> np.ndarray:
    """Integer image (H, W) -> its reversible 5/3 low band after `levels` levels, int64 of shape
    (ceil(H / 2^r), ceil(W / 2^r)), unclipped. Each level filters the columns, then the rows: the
    inverse of the decoder's order (Annex F.3.2), which integer rounding makes matter."""
    x = stored.astype(np.int64)
    for _ in range(levels):
        x = _lift_53_low(_lift_53_low(x, 0), 1)
    return x


def low_band_level(hw: tuple[int, int], side: int) -> int:
    """The deepest wavelet level r whose long side ceil(L / 2^r) is still >= side (0: none)."""
    level, long_side = 0, max(hw)
    while math.ceil(long_side / 2 ** (level + 1)) >= side:
        level += 1
    return level


def decoded_level(shape: tuple[int, ...], hw: tuple[int, int]) -> int:
    """The level r of a decode of shape (ceil(H / 2^r), ceil(W / 2^r)) of an (H, W) image."""
    level = 0
    while (math.ceil(hw[0] / 2 ** level), math.ceil(hw[1] / 2 ** level)) != tuple(shape[:2]):
        level += 1
        if 2 ** level > max(hw):
            raise ValueError(f"a {tuple(shape)} image is no reduced JPEG 2000 decode (resolution level) of a {hw} one")
    return level


def _stored_range(ds: DicomDataset, bits: int) -> tuple[int, int]:
    """The sample range a decoder clips to: [0, 2^bits - 1], or signed [-2^(bits-1), 2^(bits-1) - 1]."""
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _to_low_band(arr: np.ndarray, ds: DicomDataset, side: int, bits: int) -> np.ndarray:
    """Stored values at any resolution level -> the low band at low_band_level((H, W), side): the levels
    still missing are lifted here, then clipped to the sample range as a decoder does. Exact against
    a reduced decode at that level when `arr` is the full decode; lifting on from a shallower reduced
    decode (a codestream with fewer decomposition levels than needed) differs only where that decode
    clipped an overshoot of the low-pass at a saturated edge."""
    hw = (int(ds.Rows), int(ds.Columns))
    more = low_band_level(hw, side) - decoded_level(arr.shape, hw)
    if more <= 0:
        return arr
    lo, hi = _stored_range(ds, bits)
    return np.clip(wavelet_low_band(arr, more), lo, hi).astype(np.int32)


def _openjpeg_level(codestream: bytes, level: int) -> tuple[np.ndarray, str]:
    """A JPEG 2000 codestream decoded at resolution `level` by OpenJPEG through Pillow -> (array, mode).

    The level's size is ceil(size / 2^level) (ISO/IEC 15444-1 B.5). Pillow's Jpeg2KImageFile.load
    (12.3) sizes the tile round(size / 2^level) instead, and OpenJPEG's output then does not fit it
    ("broken data stream") whenever size mod 2^level lies in 1 .. 2^(level-1) - 1: one side in four at
    level 2, so about 4 images in 10. We set the tile up with the standard's size and run the base
    class's load, which OpenJPEG fills (tested on such sizes, bit for bit against the full decode)."""
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as im:
        w, h = im.size
        im.reduce = level
        im._size = (math.ceil(w / 2 ** level), math.ceil(h / 2 ** level))
        name, _, offset, args = im.tile[0]
        im.tile = [ImageFile._Tile(name, (0, 0) + im.size, offset, (args[0], level, im.layers, *args[3:]))]
        ImageFile.ImageFile.load(im)
        return np.asarray(im), im.mode


def _decode_j2k_reduced(ds: DicomDataset, reduce_to: int) -> np.ndarray | None:
    """First frame of a JPEG 2000 DICOM decoded at a reduced resolution level with Pillow.

    JPEG 2000 is multi-resolution: level r yields ceil(W / 2^r) x ceil(H / 2^r) straight from the
    wavelet low band, ~20x faster than a full decode. We take the largest r whose long side is
    still >= reduce_to (never below the model size). Returns the stored values, or None (caller
    does the full decode) for anything unusual: colour, signed, tag/codestream mismatch, a 9/7
    (lossy) wavelet or several tiles; a decoder failure raises (the caller then decodes in full).
    The result is wavelet_low_band of the full decode, clipped (tested bit for bit). Its pixel n sits
    at original pixel 2^r n, and it was made by the 5/3 low-pass, not an area average:
    resample_reduced takes both into account when it brings it to a model's working size."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=frames))
    head = _j2k_header(codestream)
    if (head is None or head["levels"] is None or head["components"] != 1 or head["signed"]
            or head["offset"] != (0, 0) or (head["height"], head["width"]) != (rows, cols)
            or head["precision"] > 16 or not head["reversible"] or head["tiled"]):
        return None
    level = min(low_band_level((rows, cols), reduce_to), head["levels"])
    if level == 0:
        return None
    arr, mode = _openjpeg_level(codestream, level)   # a failure raises: the caller does the full decode
    if mode.startswith("I;16"):  # Pillow scales samples of > 8 bits up to 16 bits: shift back
        arr = arr >> (16 - head["precision"])
    return arr


def _voi_output_range(ds: DicomDataset) -> tuple[float, float]:
    """Nominal output range of the first VOI transform, probed through pydicom's own apply_voi_lut
    so that the range and the transform cannot disagree."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        n_entries, first = int(seq[0].LUTDescriptor[0]) or 65536, int(seq[0].LUTDescriptor[1])
        probe = np.arange(first, first + n_entries)  # every LUT input -> every LUT output
    else:  # window: values far outside it saturate to the output extremes (LINEAR, LINEAR_EXACT, SIGMOID)
        center, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
                         for v in (ds.WindowCenter, ds.WindowWidth))
        probe = np.array([center - 10 * width - 1, center + 10 * width + 1])
    out = apply_voi_lut(probe, ds, index=0)
    return float(out.min()), float(out.max())


def _has_voi(ds: DicomDataset) -> bool:
    seq = ds.get("VOILUTSequence")
    lut = bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None
    return lut or (ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None)


def _display_values(stored: np.ndarray, ds: DicomDataset, name: str) -> np.ndarray:
    """Stored grayscale values (any shape) -> display values float32 [0, 1].

    1. Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence).
    2. The file's own VOI: VOI LUT Sequence, else the FIRST window (index 0). We never impose a
       default (e.g. CT) window. Output normalised by the transform's nominal output range (a
       window maps exactly onto [0, 1]; identical for a full and a reduced decode). A window that
       saturates the whole image is ignored with a warning (fall back to step 3's stretch).
    3. No usable VOI: stretch by the actual min/max of the modality output.
    4. MONOCHROME1 (low values bright) is inverted so that bone is always bright."""
    x = apply_modality_lut(stored, ds)  # 1.
    out = None
    if _has_voi(ds):
        try:  # 2.
            lo, hi = _voi_output_range(ds)
            if x.dtype.kind == "f" and ds.get("VOILUTSequence") and np.array_equal(x, np.rint(x)):
                x = x.astype(np.int64)  # a LUT indexes integers (identity rescale gives integral floats)
            y = apply_voi_lut(x, ds, index=0, prefer_lut=True)
            if hi > lo:
                out = np.clip((y - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            warnings.warn(f"{name}: ignoring an invalid VOI LUT / window ({_short(err)})", stacklevel=5)
        if out is not None and not out.max() > out.min():
            warnings.warn(f"{name}: the file's window saturates the whole image; using the full data range",
                          stacklevel=5)
            out = None
    if out is None:
        out = _minmax(x, name)  # 3.
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out  # 4.
    return out


def _dicom_gray(arr: np.ndarray, ds: DicomDataset, name: str) -> np.ndarray:
    """Stored grayscale image (H, W) -> display-ready (H, W) float32 [0, 1]. Every step is a
    function of the stored value alone, so for <= 16-bit ranges the chain runs once per value in
    [min, max] and the image is a table lookup: exact (the extremes of the range are in the image,
    so the stretch of step 3 is unchanged for monotonic modality LUTs), and over 3x faster on a
    2,500 x 3,000 radiograph than float64 arithmetic on every pixel."""
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo >= 2 ** 16:
        return _display_values(arr, ds, name)
    table = _display_values(np.arange(lo, hi + 1), ds, name)  # (hi - lo + 1,)
    return table[arr.astype(np.int64 if arr.dtype.itemsize > 2 else np.int32) - lo]  # (H, W)


def _transfer_syntax(ds: DicomDataset, name: str) -> str:
    """The file's transfer syntax; a file without meta information (no preamble, pre-Part 10)
    gets the one its data set was read with, which is enough for native (uncompressed) pixels."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
    if syntax is None:
        implicit, little = ds.original_encoding
        if ds["PixelData"].is_undefined_length or implicit is None:
            raise DataError(f"{name}: compressed pixel data without a transfer syntax; "
                            f"re-export the DICOM with its file meta information")
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        if "file_meta" not in ds.__dict__:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def _dicom_meta(ds: DicomDataset, rows: int, cols: int, frames: int) -> ImageMeta:
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                spacing = (float(value[0]), float(value[1]))
                break
            except (TypeError, ValueError):
                continue
    bits = ds.get("BitsStored")
    return ImageMeta(height=rows, width=cols, source="dicom", photometric=str(ds.PhotometricInterpretation),
                     pixel_spacing=spacing, bits_stored=int(bits) if bits is not None else None, frames=frames)


def _load_dicom(data: bytes, name: str, max_pixels: int, reduce_to: int | None,
                low_band: int | None) -> tuple[np.ndarray, ImageMeta]:
    # 1. parse (force=True also reads files without the 128-byte preamble), then verify it is an image
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many types on garbage; convert at this boundary
        raise DataError(f"{name}: not a readable DICOM file ({_short(err)}); re-export it") from None
    try:
        if "PixelData" not in ds:
            raise DataError(f"{name}: DICOM without (integer) pixel data, e.g. a report, plan or DICOMDIR; "
                            f"open the image file itself")
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation)
        modality = str(ds.get("Modality", ""))
        syntax = _transfer_syntax(ds, name)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{name}: DICOM header lacks image tags ({_short(err)}); re-export the image") from None
    # 2. guards from the header, before any decoding
    if frames > 1 and (modality in VOLUME_MODALITIES or "GridFrameOffsetVector" in ds
                       or "SpacingBetweenSlices" in ds):
        raise DataError(f"{name}: a 3-D {modality or 'DICOM'} volume ({frames} frames); "
                        f"export a single 2-D radiograph")
    _check_size(rows, cols, name, max_pixels)
    head = None
    if syntax in J2K_SYNTAXES:  # the codestream's own size must agree (a bomb could hide in it)
        try:
            head = _j2k_header(next(generate_frames(ds.PixelData, number_of_frames=frames)))
        except Exception as err:
            raise DataError(f"{name}: truncated or corrupt JPEG 2000 pixel data ({_short(err)}); re-export it") from None
        if head is not None and (head["height"], head["width"]) != (rows, cols):
            raise DataError(f"{name}: JPEG 2000 codestream is {head['height']}x{head['width']} but the header "
                            f"says {rows}x{cols}; re-export the file")
    if frames > 1:
        warnings.warn(f"{name}: multi-frame DICOM ({frames} frames); using the first frame", stacklevel=3)
    # 3. decode the first frame: fast reduced JPEG 2000 level when asked, else pydicom's full decode
    arr = None
    if reduce_to is not None and syntax in J2K_SYNTAXES and photometric.startswith("MONOCHROME"):
        try:
            arr = _decode_j2k_reduced(ds, reduce_to)
        except Exception:  # anything unusual in the fast path: the full decode below decides
            arr = None
    if arr is None:
        try:
            ds.pixel_array_options(index=0)
            arr = ds.pixel_array  # (H, W) or (H, W, 3); YBR is converted to RGB by pydicom
        except Exception as err:  # truncated data, missing decoder plugin, corrupt codestream, ...
            ts_name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
            raise DataError(f"{name}: cannot decode the pixel data ({ts_name}: {_short(err)}); "
                            f"re-export it uncompressed or as JPEG 2000") from None
    # 4. the wavelet low band that covers `low_band` px (DataConfig.low_band), whichever level was decoded
    if low_band is not None and samples == 1 and arr.ndim == 2 and photometric.startswith("MONOCHROME"):
        bits = head["precision"] if head is not None else int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
        arr = _to_low_band(arr, ds, low_band, bits)
    # 5. grayscale, display-ready
    try:
        if photometric == "PALETTE COLOR":
            img = _minmax(_rgb_to_gray(apply_color_lut(arr, ds)), name)
        elif samples == 3 or arr.ndim == 3:
            img = _minmax(_rgb_to_gray(arr), name)
        else:
            img = _dicom_gray(arr, ds, name)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{name}: cannot convert the pixel data to grayscale ({_short(err)})") from None
    return img, _dicom_meta(ds, rows, cols, frames)


# --- PNG / JPEG

def _load_raster(data: bytes, name: str, fmt: str, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    """PNG (8/16-bit, gray or colour) or JPEG -> (H, W) float32 [0, 1], stretched by its min/max.

    The size comes from the header first (Pillow opens lazily; PNG chunks and CRCs are verified
    without decoding) so bombs are refused before any pixel buffer exists; then cv2 decodes
    (16-bit kept, EXIF orientation applied, alpha dropped)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as im:
            w, h = im.size
            _check_size(h, w, name, max_pixels)
            if fmt == "png":
                im.verify()  # reads every chunk: truncation / CRC errors surface here
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{name}: image header declares a huge size (decompression-bomb guard); "
                        f"use a normal radiograph export") from None
    except Exception as err:
        raise DataError(f"{name}: corrupt or truncated {fmt.upper()} file ({_short(err)}); re-export it") from None
    if fmt == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DataError(f"{name}: truncated JPEG (no end-of-image marker); re-export it")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if arr is None:
        raise DataError(f"{name}: cv2 cannot decode this {fmt.upper()} file; re-export it")
    colour = arr.ndim == 3
    gray = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY) if colour else arr  # BT.601 weights, depth kept
    meta = ImageMeta(height=arr.shape[0], width=arr.shape[1], source=fmt,
                     photometric="RGB" if colour else "MONOCHROME2", pixel_spacing=None,
                     bits_stored=8 * arr.dtype.itemsize, frames=1)
    return _minmax(gray.astype(np.float32), name), meta


def load_image(src, *, max_pixels: int = DataConfig.max_pixels, reduce_to: int | None = None,
               low_band: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Path or bytes (DICOM with or without extension/preamble, PNG, JPEG) -> ((H, W) float32 in
    [0, 1], display-ready, bone bright; ImageMeta). Bad input raises DataError, never a library error.

    reduce_to: for JPEG 2000 DICOMs, decode at the smallest resolution level whose long side is
    still >= reduce_to (fast path, issue 11); ignored for other files.
    low_band: for grayscale DICOMs, the stored values are taken to the 5/3 wavelet low band whose long
    side is still >= low_band (wavelet_low_band) before windowing, from whichever level was decoded.
    With reduce_to = low_band the fast path then returns the same array as the full decode (issue 11).
    ImageMeta keeps the stored size either way."""
    data, name = _read_source(src)
    fmt = sniff_format(data)
    if fmt == "dicom":
        return _load_dicom(data, name, max_pixels, reduce_to, low_band)
    if fmt in ("png", "jpeg"):
        return _load_raster(data, name, fmt, max_pixels)
    raise DataError(f"{name}: not a DICOM, PNG or JPEG image; export the radiograph as DICOM or PNG")


# -----------------------------------------------------------------------------
# 2. Preprocessing: CLAHE (Eq. 1), resize, letterbox, box mapping

def to_uint8(img: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255] (rounded)."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _clahe_u8(img: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Eq. 1 on an 8-bit image: per tile Omega_k, I' = beta (CDF(I) - CDF_min) / (|Omega_k| - CDF_min),
    beta = 255, with the histogram clipped at clip_limit x its mean bin height; tiles blended bilinearly.

    8-bit on purpose: the clip limit is relative to the mean height of a 256-bin histogram as in
    the usual 8-bit pipeline the paper's tau = 2.0 comes from. With 16 bits, 12-bit data fills one
    bin in sixteen, so the same tau would clip far harder; the cache also halves in size."""
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid)).apply(img)


def apply_clahe(img: np.ndarray, clip_limit: float = DataConfig.clahe_clip,
                tile_grid: int = DataConfig.clahe_tiles) -> np.ndarray:
    """Eq. 1 (CLAHE): (H, W) float32 [0, 1] -> (H, W) float32 [0, 1] in 1/255 steps."""
    return _clahe_u8(to_uint8(img), clip_limit, tile_grid).astype(np.float32) / 255.0


def resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize to (h, w): area averaging when shrinking (no aliasing), bilinear when enlarging."""
    h, w = hw
    if (h, w) == img.shape[:2]:
        return img
    shrink = h * w < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_hw(hw: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(h, w) shrunk so that max(h, w) == long_side, aspect kept; smaller sizes are left as they are."""
    h, w = hw
    if max(h, w) <= long_side:
        return h, w
    r = long_side / max(h, w)
    return max(1, round(h * r)), max(1, round(w * r))


def fit_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """Shrink so that max(h, w) == long_side; smaller images are left as they are."""
    return resize_image(img, fit_hw(img.shape[:2], long_side))


# --- a reduced JPEG 2000 decode onto the working grid (issue 11)
# The reference is the full decode shrunk by an area average: each working pixel is the mean of an
# f x f box of original pixels (f = H / h), centred on its own centre. A reduced decode of level r
# differs in two ways, and resample_reduced undoes both:
#   - grid: low-band pixel n sits at original pixel 2^r n (the even samples of each level), not at
#     the centre of its 2^r pixels, so it is 1.5 original px off at r = 2;
#   - blur: the 5/3 low-pass (-1, 2, 6, 2, -1) / 8 that made it is not a box. It slightly sharpens
#     (second moment -1/2 px^2), where the box blurs (f^2 / 12).
# Matching the second moment (the blur's variance) and sampling each working pixel's centre with
# Lanczos, which adds almost none, cuts the gap to the reference by a quarter to a half against a
# bilinear shift onto the grid followed by an area resize (measured on synthetic radiographs, mean
# grey levels: 1.07 -> 0.49 at r = 1 and 384 px, 0.65 -> 0.47 at r = 2 and 640 px; after CLAHE
# 2.5 -> 1.3 and 1.7 -> 1.2). 0.75 or 1.25 times that variance does worse in every case measured.

def low_band_variance(level: int) -> float:
    """Second moment (original px^2) of the filter that makes the 5/3 low band of `level` from the
    image. The analysis low-pass (-1, 2, 6, 2, -1) / 8 has sum_k k^2 h_k = -1/2; level j applies it
    stretched by 2^j (variance x 4^j), so r levels give -(1 + 4 + ... + 4^(r-1)) / 2 = -(4^r - 1) / 6."""
    return -(4 ** level - 1) / 6


def smoothing_kernel(var: float) -> np.ndarray:
    """Symmetric 1-D kernel with unit sum and second moment var (px^2): [a, 1 - 2a, a] with a = var / 2
    up to var = 1/2 (the sampled Gaussian is far off there), a sampled Gaussian of sigma sqrt(var) above."""
    if var <= 0.5:
        a = max(var, 0.0) / 2
        return np.float32([a, 1 - 2 * a, a])
    sigma = math.sqrt(var)
    return cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F).ravel()


def resample_reduced(img: np.ndarray, full_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """A reduced (5/3 low band) decode of an original of full_hw = (H, W) -> (h, w), as close as
    possible to the area average resize_image gives from the full decode. (H/2^r, W/2^r) float32 ->
    (h, w) float32 in [0, 1]. Steps, per axis:
      1. the level r, from the sizes (the decode is ceil(H / 2^r) x ceil(W / 2^r));
      2. the blur the reference has and the low band lacks, in reduced px^2: (f^2/12 - v_r) / 4^r;
      3. smooth the low band with that variance (smoothing_kernel);
      4. sample each working pixel's centre, original x = (j + 1/2) f - 1/2, at x / 2^r in the low
         band, with Lanczos (8 taps);
      5. clip the Lanczos overshoot at edges back to [0, 1]."""
    (H, W), (h, w) = full_hw, hw
    level = decoded_level(img.shape, full_hw)                                         # 1.
    if level < 1:
        raise ValueError(f"a {img.shape} image is no reduced JPEG 2000 decode of a {(H, W)} one")
    k = 2 ** level
    fy, fx = H / h, W / w                                                              # original px per working px
    vy, vx = ((f * f / 12 - low_band_variance(level)) / k ** 2 for f in (fy, fx))      # 2.
    smooth = cv2.sepFilter2D(img, -1, smoothing_kernel(vx), smoothing_kernel(vy),      # 3.
                             borderType=cv2.BORDER_REPLICATE)
    to_low_band = np.float32([[fx / k, 0, (fx / 2 - 0.5) / k],                         # 4. working -> low band
                              [0, fy / k, (fy / 2 - 0.5) / k]])
    out = cv2.warpAffine(smooth, to_low_band, (w, h), flags=cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    return np.clip(out, 0.0, 1.0)                                                      # 5.


def shrink_decoded(img: np.ndarray, hw: tuple[int, int], full_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded display image -> (h, w): area average (resize_image), or resample_reduced when img is a
    reduced JPEG 2000 decode of an original of full_hw."""
    if full_hw is None or img.shape[:2] == tuple(full_hw):
        return resize_image(img, hw)
    return resample_reduced(img, full_hw, hw)


def working_side(long_side: int, clahe_side: int | None) -> int:
    """The long side Eq. 1 runs at for a model input of long_side: clahe_side, or long_side when that
    is larger. None (checkpoints from before clahe_side existed) = long_side: CLAHE at the input size."""
    return long_side if clahe_side is None else max(long_side, clahe_side)


def clahe_image(img: np.ndarray, side: int, *, clahe: bool = True, clip_limit: float = DataConfig.clahe_clip,
                tile_grid: int = DataConfig.clahe_tiles, full_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Display image (H, W) float32 [0, 1] -> shrink to long side `side` (area average) -> uint8 ->
    CLAHE (Eq. 1, Sec. 3.1) -> (h, w) uint8: the working image every model input is shrunk from.

    full_hw: the size of the full decode (ImageMeta) when img is a reduced JPEG 2000 decode: it is then
    resampled onto the full decode's grid (resample_reduced), and the working image is sized from
    full_hw, so both decodes give the same (h, w): the reduced decode's ceil(H / 2^r) rounding can
    change the aspect by a pixel (a 794 x 619 test image gives 384 x 299, its level-1 decode 397 x 310
    would give 384 x 300), and every later shape (the model inputs) follows."""
    u8 = to_uint8(shrink_decoded(img, fit_hw(full_hw or img.shape[:2], side), full_hw))
    return _clahe_u8(u8, clip_limit, tile_grid) if clahe else u8


def shrink_u8(u8: np.ndarray, long_side: int) -> np.ndarray:
    """(h, w) uint8 -> long side <= long_side (area average in float, rounded once)."""
    if max(u8.shape) <= long_side:
        return u8
    return to_uint8(fit_long_side(u8.astype(np.float32) / 255.0, long_side))


def prepare_image(img: np.ndarray, long_side: int, *, clahe: bool = True,
                  clip_limit: float = DataConfig.clahe_clip, tile_grid: int = DataConfig.clahe_tiles,
                  clahe_side: int | None = DataConfig.clahe_side,
                  full_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The one preprocessing path (cache, training and inference): display image (H, W) float32
    -> shrink to the working side (area average) -> CLAHE (Eq. 1, Sec. 3.1) -> shrink to long_side
    -> (h, w) uint8.

    Why CLAHE runs at a working resolution and not at each model's input size: Eq. 1 maps each
    tile through the CDF of its own histogram, which needs many more pixels than the 256 bins. A
    128-px input has tiles of ~200 px: the CDF is a staircase, OpenCV's clip limit floors to one
    count per bin (tau = 2.0 is not applied), and half a grey level of input reshuffles a tile's
    mapping (measured on the synthetic test split: 2.2 grey levels mean change of the 128-px input,
    against 0.6 when it is shrunk from CLAHE at 384 px). One working image also serves every model
    (the members and the detector): one CLAHE per image. Why not the decoded resolution: CLAHE there
    amplifies full-resolution noise and texture, so a reduced JPEG 2000 decode (issue 11) would no
    longer give nearly the same input (3-16 % mean difference, against ~1-2 % at the working side)."""
    side = working_side(long_side, clahe_side if clahe else None)
    work = clahe_image(img, side, clahe=clahe, clip_limit=clip_limit, tile_grid=tile_grid, full_hw=full_hw)
    return shrink_u8(work, long_side)


def letterbox_geometry(hw: tuple[int, int], size: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Scale and integer padding that fit an (h, w) image into (size, size), centred.
    Returns (ratio, (new_h, new_w), (pad_x, pad_y)); x_lb = x * ratio + pad_x."""
    h, w = hw
    ratio = size / max(h, w)
    new_h, new_w = min(size, max(1, round(h * ratio))), min(size, max(1, round(w * ratio)))
    return ratio, (new_h, new_w), ((size - new_w) // 2, (size - new_h) // 2)


def letterbox(img: np.ndarray, size: int,
              pad_value: float = DataConfig.pad_value) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(H, W) image -> ((size, size) image, ratio r, (pad_x, pad_y)) with x_lb = x * r + pad_x.
    Padding is an integer number of pixels so boxes map exactly. pad_value is in [0, 1] units
    (scaled to 0-255 for uint8 images)."""
    ratio, (new_h, new_w), (pad_x, pad_y) = letterbox_geometry(img.shape[:2], size)
    fill = round(pad_value * 255) if img.dtype == np.uint8 else pad_value
    out = np.full((size, size) + img.shape[2:], fill, dtype=img.dtype)
    out[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resize_image(img, (new_h, new_w))
    return out, ratio, (float(pad_x), float(pad_y))


def detector_canvas(img: np.ndarray, orig_hw: tuple[int, int], size: int,
                    pad_value: float = DataConfig.pad_value) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Prepared uint8 image (any resolution of the original) -> detector input (size, size) float32 [0, 1]
    in the letterbox geometry of the ORIGINAL size (so x_lb = x_orig * ratio + pad whatever resolution
    the image was decoded at), grey padding; returns (canvas, ratio, (pad_x, pad_y)). The one detector
    preprocessing of training, evaluation and inference."""
    ratio, (new_h, new_w), (pad_x, pad_y) = letterbox_geometry(orig_hw, size)
    canvas = np.full((size, size), pad_value, np.float32)  # (S, S)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resize_image(img, (new_h, new_w)).astype(np.float32) / 255
    return canvas, ratio, (pad_x, pad_y)


def boxes_to_letterbox(boxes: np.ndarray, ratio: float, pad: tuple[float, float]) -> np.ndarray:
    """(N, 4) xyxy original pixels -> letterboxed input pixels."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return boxes * ratio + np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)


def boxes_from_letterbox(boxes: np.ndarray, ratio: float, pad: tuple[float, float],
                         orig_hw: tuple[int, int]) -> np.ndarray:
    """(N, 4) xyxy letterboxed input pixels -> original pixels, clipped to the image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = (boxes - np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)) / ratio
    h, w = orig_hw
    out[:, 0::2] = out[:, 0::2].clip(0, w)
    out[:, 1::2] = out[:, 1::2].clip(0, h)
    return out


def imagenet_input(x: torch.Tensor, mean: tuple = DataConfig.imagenet_mean,
                   std: tuple = DataConfig.imagenet_std) -> torch.Tensor:
    """(B, 1, H, W) grayscale in [0, 1] -> (B, 3, H, W) ImageNet-normalised, for torchvision backbones."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - m) / s


# -----------------------------------------------------------------------------
# 3. VinDr-SpineXR annotations

@dataclass
class Record:
    """One image and its labels. boxes: (N, 4) float32 xyxy in original pixels; classes: (N,) int64
    indices into CLASSES; rad_ids: (N,) the radiologist of each box (every row is kept)."""
    image_id: str
    study_id: str
    series_id: str
    path: Path
    boxes: np.ndarray
    classes: np.ndarray
    mask_paths: list | None = None  # masks/<split>/<image_id>/<k>.png per box; [] for normal; None if absent
    rad_ids: tuple = ()

    @property
    def label(self) -> int:
        """1 = abnormal = the image has any lesion box (REFERENCE §1)."""
        return int(len(self.boxes) > 0)


def _find_image(images_dir: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def _parse_box(row: dict, where: str) -> list[float]:
    try:
        box = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (TypeError, ValueError):
        raise DataError(f"{where}: malformed box ({row['xmin']}, {row['ymin']}, {row['xmax']}, {row['ymax']}); "
                        f"expected four numbers") from None
    if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(f"{where}: invalid box {box}; need xmax > xmin and ymax > ymin")
    return box


def read_annotations(csv_path, images_dir, masks_dir=None) -> list[Record]:
    """annotations/{train,test}.csv -> one Record per image, in order of first appearance.

    One row per box; a normal image has one "No finding" row with empty box columns. An image with
    both "No finding" and boxes is abnormal (boxes win; warned). Errors name the CSV line."""
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    masks_dir = Path(masks_dir) if masks_dir is not None else None
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found; point to the dataset root")
    try:
        fh = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{csv_path}: cannot open the annotation file ({_short(err)})") from None
    images: dict[str, dict] = {}
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(c.strip() for c in header) != CSV_COLUMNS:
            raise DataError(f"{csv_path}:1: expected the columns {','.join(CSV_COLUMNS)}, got {header}")
        for values in reader:
            where = f"{csv_path}:{reader.line_num}"
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(CSV_COLUMNS):
                raise DataError(f"{where}: expected {len(CSV_COLUMNS)} fields, got {len(values)}")
            row = dict(zip(CSV_COLUMNS, (v.strip() for v in values)))
            if not row["image_id"] or not row["study_id"]:
                raise DataError(f"{where}: empty image_id or study_id")
            entry = images.setdefault(row["image_id"], {"study": row["study_id"], "series": row["series_id"],
                                                        "line": where, "boxes": [], "classes": [],
                                                        "rads": [], "no_finding": False})
            if (entry["study"], entry["series"]) != (row["study_id"], row["series_id"]):
                raise DataError(f"{where}: image {row['image_id']} appears with another study_id/series_id "
                                f"than at {entry['line']}")
            lesion = row["lesion_type"]
            if lesion == NO_FINDING:
                if any(row[k] for k in ("xmin", "ymin", "xmax", "ymax")):
                    raise DataError(f"{where}: a '{NO_FINDING}' row must have empty box columns")
                entry["no_finding"] = True
            elif lesion in CLASSES:
                entry["boxes"].append(_parse_box(row, where))
                entry["classes"].append(CLASSES.index(lesion))
                entry["rads"].append(row["rad_id"])
            else:
                raise DataError(f"{where}: unknown lesion_type '{lesion}'; expected one of "
                                f"{', '.join(CLASSES + (NO_FINDING,))}")
    if not images:
        raise DataError(f"{csv_path}: no annotation rows; check the file")
    records, mixed = [], 0
    for image_id, e in images.items():
        path = _find_image(images_dir, image_id)
        if path is None:
            raise DataError(f"{e['line']}: image file {images_dir / (image_id + '.dicom')} not found; "
                            f"check images_dir")
        mixed += bool(e["no_finding"] and e["boxes"])
        mask_paths = None
        if masks_dir is not None:
            candidate = [masks_dir / image_id / f"{k}.png" for k in range(len(e["boxes"]))]
            mask_paths = candidate if all(p.is_file() for p in candidate) else None
        records.append(Record(image_id=image_id, study_id=e["study"], series_id=e["series"], path=path,
                              boxes=np.array(e["boxes"], np.float32).reshape(-1, 4),
                              classes=np.array(e["classes"], np.int64), mask_paths=mask_paths,
                              rad_ids=tuple(e["rads"])))
    if mixed:
        warnings.warn(f"{csv_path}: {mixed} image(s) have both '{NO_FINDING}' and lesion boxes; "
                      f"treated as abnormal", stacklevel=2)
    return records


def load_split(root, split: str) -> list[Record]:
    """Records of the VinDr-SpineXR layout under root: annotations/<split>.csv, <split>_images/,
    and masks/<split>/ when present (synthetic set only)."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}'; use 'train' or 'test'")
    root = Path(root)
    masks = root / "masks" / split
    return read_annotations(root / "annotations" / f"{split}.csv", root / f"{split}_images",
                            masks if masks.is_dir() else None)


# -----------------------------------------------------------------------------
# 4. Folds: study-grouped, label-stratified (Sec. 4.1)

def make_folds(records: list[Record], n_folds: int = DataConfig.n_folds, seed: int = DataConfig.seed) -> np.ndarray:
    """(N,) fold id per record. No study is split across folds (both views of a patient stay
    together); each fold keeps the abnormal ratio (sklearn StratifiedGroupKFold)."""
    groups = np.array([r.study_id for r in records])
    labels = np.array([r.label for r in records])
    if len(set(groups)) < n_folds:
        raise DataError(f"{len(set(groups))} studies cannot be split into {n_folds} folds; "
                        f"use more data or fewer folds")
    folds = np.empty(len(records), np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        folds[val_idx] = k
    return folds


def split_fold(records: list[Record], fold: int, n_folds: int = DataConfig.n_folds,
               seed: int = DataConfig.seed) -> tuple[list[Record], list[Record]]:
    """(train = the other folds, val = fold `fold`) inside the training split; the official test
    split is never touched here."""
    if not 0 <= fold < n_folds:
        raise DataError(f"fold {fold} out of range; use 0..{n_folds - 1}")
    folds = make_folds(records, n_folds, seed)
    return ([r for r, f in zip(records, folds) if f != fold], [r for r, f in zip(records, folds) if f == fold])


# -----------------------------------------------------------------------------
# 5. On-disk image cache and the torch Datasets

CACHE_VERSION = 5  # bump when prepare_image changes so stale entries are never read
FAST_DECODE_STREAM = 1  # ClassificationDataset: the decode choice's own random stream


class ImageCache:
    """Decoded -> CLAHE'd (Eq. 1) at the working side -> shrunk-to-long-side images as uint8
    (prepare_image), one .npz per image (the uint8 array `img` plus the ImageMeta as JSON in one file,
    so a write is one atomic os.replace), under root/<2 hex>/<sha1>.npz. The key hashes (absolute
    path, file size, mtime_ns, long side, CLAHE parameters and working side, low-band and fast-decode flags,
    CACHE_VERSION): an edited file or a changed parameter misses. Safe for concurrent DataLoader
    workers / ranks: temp file + os.replace. root=None computes every time (inference, tests)."""

    def __init__(self, root=None, *, clahe: bool = True, fast_decode: bool = False,
                 hyp: DataConfig = DataConfig()):
        self.root = Path(root) if root is not None else None
        self.clahe, self.fast_decode, self.hyp = clahe, fast_decode, hyp

    def key(self, path: Path, long_side: int) -> str:
        st = path.stat()
        parts = (str(path.resolve()), st.st_size, st.st_mtime_ns, long_side, self.clahe, self.hyp.clahe_clip,
                 self.hyp.clahe_tiles, self.hyp.clahe_side, self.hyp.low_band, self.fast_decode, CACHE_VERSION)
        return hashlib.sha1(repr(parts).encode()).hexdigest()

    def compute(self, path: Path, long_side: int) -> tuple[np.ndarray, ImageMeta]:
        side = working_side(long_side, self.hyp.clahe_side if self.clahe else None)
        img, meta = load_image(path, max_pixels=self.hyp.max_pixels, reduce_to=side if self.fast_decode else None,
                               low_band=side if self.hyp.low_band else None)
        return prepare_image(img, long_side, clahe=self.clahe, clip_limit=self.hyp.clahe_clip,
                             tile_grid=self.hyp.clahe_tiles, clahe_side=self.hyp.clahe_side,
                             full_hw=(meta.height, meta.width)), meta

    def get(self, path, long_side: int) -> tuple[np.ndarray, ImageMeta]:
        """(h, w) uint8 with max(h, w) == min(long_side, original long side), and the ImageMeta."""
        path = Path(path)
        if self.root is None:
            return self.compute(path, long_side)
        try:
            key = self.key(path, long_side)
        except OSError as err:
            raise DataError(f"{path}: cannot read the file ({_short(err)})") from None
        file = self.root / key[:2] / f"{key}.npz"
        if file.is_file():
            try:
                with np.load(file, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    meta["pixel_spacing"] = tuple(meta["pixel_spacing"]) if meta["pixel_spacing"] else None
                    return z["img"], ImageMeta(**meta)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable entry (disk trouble): recompute and overwrite it below
        img, meta = self.compute(path, long_side)

        def write(tmp: Path):
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
                np.savez(fh, img=img, meta=np.array(json.dumps(asdict(meta))))

        atomic_write(file, write)
        return img, meta


# --- classification (Phase I)

def _classifier_matrix(hw: tuple[int, int], size: int, rng: np.random.Generator | None,
                       hyp: DataConfig) -> np.ndarray:
    """2x3 affine: letterbox into (size, size), then (rng given) horizontal flip, rotation,
    scale and translation about the canvas centre, composed so the image is resampled once."""
    _, (new_h, new_w), (pad_x, pad_y) = letterbox_geometry(hw, size)
    h, w = hw
    lb = np.array([[new_w / w, 0, pad_x], [0, new_h / h, pad_y], [0, 0, 1]], np.float64)
    if rng is None:
        return lb[:2]
    c = size / 2
    angle = math.radians(rng.uniform(-hyp.rotate_deg, hyp.rotate_deg))
    scale = rng.uniform(1 - hyp.scale_jitter, 1 + hyp.scale_jitter)
    flip = -1.0 if rng.random() < hyp.hflip else 1.0  # horizontal only; never vertical (anatomy is upright)
    tx, ty = rng.uniform(-hyp.translate, hyp.translate, 2) * size
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    jitter = np.array([[cos * flip, -sin, c + tx - c * (cos * flip - sin)],
                       [sin * flip, cos, c + ty - c * (sin * flip + cos)], [0, 0, 1]], np.float64)
    return (jitter @ lb)[:2]


def _intensity_jitter(img: np.ndarray, rng: np.random.Generator, hyp: DataConfig) -> np.ndarray:
    """Gamma, contrast and brightness jitter of a [0, 1] image (exposure/processing differences)."""
    img = img ** math.exp(rng.uniform(-hyp.gamma, hyp.gamma))
    img = (img - 0.5) * rng.uniform(1 - hyp.contrast, 1 + hyp.contrast) + 0.5
    return np.clip(img + rng.uniform(-hyp.brightness, hyp.brightness), 0.0, 1.0)


def classifier_input(img: np.ndarray, size: int, rng: np.random.Generator | None = None,
                     hyp: DataConfig = DataConfig()) -> np.ndarray:
    """Prepared (h, w) uint8 (CLAHE'd) -> (1, size, size) float32 [0, 1]. Letterboxed, not
    stretched: vertebral shape (height vs width) is the diagnosis for collapse and disc narrowing.
    With rng: radiograph-safe augmentation (intensity jitter, then one affine warp)."""
    x = img.astype(np.float32) / 255.0
    if rng is None:
        out = letterbox(x, size, hyp.cls_pad_value)[0]
    else:
        x = _intensity_jitter(x, rng, hyp)  # before the warp so the padding stays black
        out = cv2.warpAffine(x, _classifier_matrix(x.shape, size, rng, hyp), (size, size),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=hyp.cls_pad_value)
    return out[None]  # (1, S, S)


class ClassificationDataset(Dataset):
    """(x (1, S, S) float32 [0, 1] after CLAHE, y float32 scalar) per record, for the DERNet
    members (Phase I). The models replicate to 3 channels and ImageNet-normalise themselves.

    fast_decode_p: the probability that a sample is read through the reduced JPEG 2000 decode that
    inference uses (ImageCache(fast_decode=True); files without one read the same either way). The two
    decodes differ by a noise realisation (the wavelet's low band is not an area average) that CLAHE
    amplifies; a model trained on the full decode alone may move its score by a few hundredths on some
    images between them (issue 11). Randomness: np.random.default_rng((seed, epoch, index)) for the
    augmentation and a stream of its own for the decode, so a run is reproducible and resumable whatever
    the DataLoader workers, and the augmentation draws are the same with or without the decode choice."""

    def __init__(self, records: list[Record], image_size: int, cache: ImageCache | None = None,
                 augment: bool = False, seed: int = DataConfig.seed, hyp: DataConfig = DataConfig(),
                 fast_decode_p: float = 0.0):
        self.records, self.image_size, self.augment, self.seed, self.hyp = records, image_size, augment, seed, hyp
        self.cache = cache if cache is not None else ImageCache(None, hyp=hyp)
        self.fast_decode_p = fast_decode_p
        self.fast_cache = ImageCache(self.cache.root, clahe=self.cache.clahe, fast_decode=True, hyp=self.cache.hyp)
        self.labels = np.array([r.label for r in records], np.float32)  # (N,) for pos_weight / sampling
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        fast = self.fast_decode_p > 0 and \
            np.random.default_rng((self.seed, self.epoch, i, FAST_DECODE_STREAM)).random() < self.fast_decode_p
        img, _ = (self.fast_cache if fast else self.cache).get(self.records[i].path, self.image_size)
        rng = np.random.default_rng((self.seed, self.epoch, i)) if self.augment else None
        x = classifier_input(img, self.image_size, rng, self.hyp)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(self.labels[i])


# --- detection (Phase II)

@dataclass
class DetSample:
    """One detector sample in letterboxed input pixels; augmentations are pure functions on these."""
    img: np.ndarray  # (S, S) float32 [0, 1]
    boxes: np.ndarray  # (N, 4) float32 xyxy input pixels
    cls: np.ndarray  # (N,) int64
    masks: np.ndarray | None  # (N, S, S) uint8 {0, 1}, or None


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Binary mask -> (h, w) uint8 {0, 1}: area-weighted coverage >= 0.5, and never emptied: a
    lesion thinner than the new pixel keeps its best-covered pixels."""
    cover = cv2.resize(mask.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    out = cover >= 0.5
    if not out.any() and cover.max() > 0:
        out = cover >= cover.max() * 0.5
    return out.astype(np.uint8)


# --- detection augmentation: pure functions on DetSample (images, boxes and masks move together)

def _tile_slices(k: int, xc: int, yc: int, size: int) -> tuple[slice, slice, slice, slice]:
    """Mosaic tile k (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of a (size, size) image
    around the centre (xc, yc) of the (2S, 2S) canvas -> (canvas rows, canvas cols, tile rows, tile cols)."""
    x0, x1 = (max(xc - size, 0), xc) if k in (0, 2) else (xc, min(xc + size, 2 * size))
    y0, y1 = (max(yc - size, 0), yc) if k in (0, 1) else (yc, min(yc + size, 2 * size))
    w, h = x1 - x0, y1 - y0
    tx0 = size - w if k in (0, 2) else 0  # the tile's corner touching the centre stays in view
    ty0 = size - h if k in (0, 1) else 0
    return slice(y0, y1), slice(x0, x1), slice(ty0, ty0 + h), slice(tx0, tx0 + w)


def _keep_boxes(sample: DetSample, before: np.ndarray, scale: float, hyp: DataConfig) -> DetSample:
    """Drop boxes that augmentation made too thin or cut away (< min_box_kept of their scaled area)."""
    w, h = sample.boxes[:, 2] - sample.boxes[:, 0], sample.boxes[:, 3] - sample.boxes[:, 1]
    area_before = (before[:, 2] - before[:, 0]) * (before[:, 3] - before[:, 1]) * scale ** 2
    keep = (w > hyp.min_box_side) & (h > hyp.min_box_side) & (w * h > hyp.min_box_kept * area_before)
    return DetSample(img=sample.img, boxes=sample.boxes[keep], cls=sample.cls[keep],
                     masks=sample.masks[keep] if sample.masks is not None else None)


def mosaic4(samples: list[DetSample], rng: np.random.Generator, hyp: DataConfig = DataConfig()) -> DetSample:
    """Algorithm 1, lines 9-10: four (S, S) samples around a centre (xc, yc) ~ U(0.3 W, 0.7 W) of a
    (2S, 2S) canvas (W = 2S). Returns the (2S, 2S) sample; random_affine then crops it back to S."""
    size = samples[0].img.shape[0]
    lo, hi = hyp.mosaic_center
    xc, yc = (int(v) for v in rng.uniform(lo * 2 * size, hi * 2 * size, 2))
    img = np.full((2 * size, 2 * size), hyp.pad_value, np.float32)  # (2S, 2S)
    with_masks = samples[0].masks is not None
    boxes, classes, masks = [], [], []
    for k, s in enumerate(samples):
        rows, cols, trows, tcols = _tile_slices(k, xc, yc, size)
        img[rows, cols] = s.img[trows, tcols]
        shift = np.array([cols.start - tcols.start, rows.start - trows.start] * 2, np.float32)
        b = s.boxes + shift  # (N, 4) canvas pixels
        b[:, 0::2] = b[:, 0::2].clip(cols.start, cols.stop)  # only what shows of this tile
        b[:, 1::2] = b[:, 1::2].clip(rows.start, rows.stop)
        boxes.append(b)
        classes.append(s.cls)
        if with_masks:
            m = np.zeros((len(s.boxes), 2 * size, 2 * size), np.uint8)  # (N, 2S, 2S)
            m[:, rows, cols] = s.masks[:, trows, tcols]
            masks.append(m)
    sample = DetSample(img=img, boxes=np.concatenate(boxes).astype(np.float32), cls=np.concatenate(classes),
                       masks=np.concatenate(masks) if with_masks else None)
    return _keep_boxes(sample, np.concatenate([s.boxes for s in samples]), 1.0, hyp)


def random_affine(sample: DetSample, rng: np.random.Generator, size: int, hyp: DataConfig = DataConfig()) -> DetSample:
    """Random zoom and translation into a (size, size) output, one resampling for image and masks.
    Input (H, H): a plain letterboxed sample (H = S) or a mosaic (H = 2S, whose centre region is kept).
    Axis-aligned only (no rotation or shear), so transformed boxes stay exact."""
    src = sample.img.shape[0]
    s = rng.uniform(1 - hyp.det_scale, 1 + hyp.det_scale)
    tx, ty = (0.5 + rng.uniform(-hyp.det_translate, hyp.det_translate, 2)) * size
    matrix = np.array([[s, 0, tx - s * src / 2], [0, s, ty - s * src / 2]], np.float64)  # centre -> (tx, ty)
    img = cv2.warpAffine(sample.img, matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=hyp.pad_value)
    boxes = sample.boxes * s + np.array([matrix[0, 2], matrix[1, 2]] * 2, np.float32)
    boxes = boxes.clip(0, size).astype(np.float32)
    masks = None
    if sample.masks is not None:
        masks = np.stack([cv2.warpAffine(m, matrix, (size, size), flags=cv2.INTER_NEAREST) for m in sample.masks]) \
            if len(sample.masks) else np.zeros((0, size, size), np.uint8)
    return _keep_boxes(DetSample(img=img, boxes=boxes, cls=sample.cls, masks=masks), sample.boxes, s, hyp)


def random_hflip(sample: DetSample, rng: np.random.Generator, hyp: DataConfig = DataConfig()) -> DetSample:
    """Mirror left-right with probability hyp.hflip (never vertically: anatomy is upright)."""
    if rng.random() >= hyp.hflip:
        return sample
    size = sample.img.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = size - sample.boxes[:, [2, 0]]
    masks = np.ascontiguousarray(sample.masks[:, :, ::-1]) if sample.masks is not None else None
    return DetSample(img=np.ascontiguousarray(sample.img[:, ::-1]), boxes=boxes, cls=sample.cls, masks=masks)


class DetectionDataset(Dataset):
    """Letterboxed image, boxes and classes (and per-lesion masks) for YOLO11 (Phase II).
    __getitem__ -> dict(img (3, S, S) float32 [0, 1], boxes (N, 4) float32 xyxy input px,
    cls (N,) int64, masks (N, S/4, S/4) uint8 | None, image_id, orig_hw, ratio, pad)."""

    def __init__(self, records: list[Record], imgsz: int, cache: ImageCache | None = None,
                 augment: bool = False, seed: int = DataConfig.seed, masks: bool = False,
                 hyp: DataConfig = DataConfig()):
        self.records, self.imgsz, self.augment, self.seed, self.masks, self.hyp = \
            records, imgsz, augment, seed, masks, hyp
        self.cache = cache if cache is not None else ImageCache(None, hyp=hyp)
        self.mosaic = augment  # toggled by the training loop (Algorithm 1, line 9: t < tau_mosaic)
        self.epoch = 0
        self._orig_hw: dict[int, tuple[int, int]] = {}  # per-process memo filled by load_sample
        if masks:
            missing = [r.image_id for r in records if r.label and r.mask_paths is None]
            if missing:
                raise DataError(f"segmentation needs mask labels: {len(missing)} image(s) have none "
                                f"(e.g. {missing[0]}); use the synthetic set or masks/<split>/<image_id>/<k>.png")
            if imgsz % hyp.mask_ratio:
                raise DataError(f"imgsz {imgsz} must be a multiple of {hyp.mask_ratio} for masks")

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load_sample(self, i: int) -> DetSample:
        """Cached image letterboxed to (S, S); boxes and masks mapped from original pixels."""
        r, size = self.records[i], self.imgsz
        img, meta = self.cache.get(r.path, size)
        self._orig_hw[i] = (meta.height, meta.width)
        canvas, ratio, (pad_x, pad_y) = detector_canvas(img, (meta.height, meta.width), size, self.hyp.pad_value)
        _, (new_h, new_w), _ = letterbox_geometry((meta.height, meta.width), size)
        boxes = boxes_to_letterbox(r.boxes, ratio, (pad_x, pad_y))  # (N, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(pad_x, pad_x + new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(pad_y, pad_y + new_h)
        masks = None
        if self.masks:
            masks = np.zeros((len(r.boxes), size, size), np.uint8)  # (N, S, S)
            for k, mask_path in enumerate(r.mask_paths or []):
                m = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
                if m is None or m.shape != (meta.height, meta.width):
                    raise DataError(f"{mask_path}: unreadable mask or not {meta.height}x{meta.width}; "
                                    f"regenerate the masks")
                masks[k, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = _resize_mask(m > 127, (new_h, new_w))
        return DetSample(img=canvas, boxes=boxes, cls=r.classes.copy(), masks=masks)

    def to_output(self, sample: DetSample, i: int) -> dict:
        """DetSample of record i -> the contract dict (grey replicated to 3 channels, masks at S/4)."""
        size = sample.img.shape[0]
        orig_hw = self._orig_hw[i]
        ratio, _, pad = letterbox_geometry(orig_hw, size)
        masks = None
        if sample.masks is not None:
            s = size // self.hyp.mask_ratio
            masks = torch.from_numpy(np.stack([_resize_mask(m, (s, s)) for m in sample.masks])
                                     if len(sample.masks) else np.zeros((0, s, s), np.uint8))  # (N, S/4, S/4)
        return {"img": torch.from_numpy(sample.img)[None].expand(3, size, size),  # (3, S, S)
                "boxes": torch.from_numpy(sample.boxes.astype(np.float32)).reshape(-1, 4),
                "cls": torch.from_numpy(sample.cls.astype(np.int64)),
                "masks": masks, "image_id": self.records[i].image_id, "orig_hw": orig_hw,
                "ratio": ratio, "pad": (float(pad[0]), float(pad[1]))}

    def __getitem__(self, i: int) -> dict:
        sample = self.load_sample(i)
        if self.augment:
            sample = self.augment_sample(sample, i)
        return self.to_output(sample, i)

    def augment_sample(self, sample: DetSample, i: int) -> DetSample:
        """1. mosaic with three other random images while self.mosaic (Algorithm 1, lines 9-13);
        2. random zoom/translation back to S; 3. horizontal flip; 4. brightness/contrast/gamma.
        Randomness from default_rng((seed, epoch, i)): the same whatever the worker or rank."""
        rng = np.random.default_rng((self.seed, self.epoch, i))
        if self.mosaic:
            others = rng.integers(0, len(self.records), 3)
            sample = mosaic4([sample] + [self.load_sample(int(j)) for j in others], rng, self.hyp)
        sample = random_affine(sample, rng, self.imgsz, self.hyp)
        sample = random_hflip(sample, rng, self.hyp)
        return dataclasses.replace(sample, img=_intensity_jitter(sample.img, rng, self.hyp).astype(np.float32))


def collate_detection(samples: list[dict]) -> dict:
    """Batch the detector dicts: img (B, 3, S, S), targets (N, 6) [batch_idx, cls, x1, y1, x2, y2],
    masks (N, S/4, S/4) float32 or None, and per-image lists."""
    targets = [torch.cat([torch.full((len(s["cls"]), 1), float(b)), s["cls"].float()[:, None], s["boxes"]], 1)
               for b, s in enumerate(samples)]
    has_masks = all(s["masks"] is not None for s in samples)
    return {"img": torch.stack([s["img"] for s in samples]),
            "targets": torch.cat(targets, 0) if targets else torch.zeros((0, 6)),
            "masks": torch.cat([s["masks"] for s in samples], 0).float() if has_masks else None,
            "image_ids": [s["image_id"] for s in samples], "orig_hw": [s["orig_hw"] for s in samples],
            "ratio": [s["ratio"] for s in samples], "pad": [s["pad"] for s in samples]}


def repeat_factors(records: list[Record], threshold: float = 0.1) -> np.ndarray:
    """LVIS repeat-factor sampling (the VinDr-SpineXR detector baseline): f_c = fraction of images
    containing class c, r_c = max(1, sqrt(t / f_c)), image factor = max over its classes (1 if normal)."""
    n = max(len(records), 1)
    freq = np.array([sum(c in r.classes for r in records) / n for c in range(len(CLASSES))])
    r_c = np.maximum(1.0, np.sqrt(threshold / np.maximum(freq, 1e-12)))
    return np.array([max((r_c[c] for c in set(r.classes.tolist())), default=1.0) for r in records], np.float64)


# -----------------------------------------------------------------------------
# 6. Synthetic VinDr-format dataset
#
# An image is rendered in "attenuation" units (air 0, soft tissue ~0.3, bone adds ~0.1-0.25,
# metal ~0.9) where overlapping structures add, as along an X-ray path; then blurred (detector
# MTF), given quantum noise, and mapped to 12-bit stored values with a random exposure whose
# display mean is drawn independently of the labels. Every vertebra lives in its own frame:
# centre c, unit vectors ex (across the body; +u = anterior on lateral views) and ey (down
# the column); p = c + u ex + v ey. Each lesion is rasterised once into its own mask, which is
# both what is drawn and what is saved; its box is the mask's tight bounding box.

@dataclass
class _Vertebra:
    c: np.ndarray  # (2,) centre, px
    ex: np.ndarray  # (2,) unit, across the body (anterior on lateral views)
    ey: np.ndarray  # (2,) unit, down the column
    w: float  # body width (lateral: antero-posterior depth), px
    h: float  # body height, px
    hf_ant: float = 1.0  # height factor at the anterior (lateral) / right (AP) wall; < 1 = collapse
    hf_post: float = 1.0

    def to_img(self, u, v) -> np.ndarray:
        u, v = np.broadcast_arrays(np.asarray(u, np.float64), np.asarray(v, np.float64))
        return self.c + u[..., None] * self.ex + v[..., None] * self.ey  # (..., 2)

    @property
    def top(self) -> float:
        """v of the highest point of the top endplate (the taller wall)."""
        return 0.5 * self.h - self.h * max(self.hf_ant, self.hf_post)

    def edges(self, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
        """Top and bottom endplates, (n, 2) image px each, posterior -> anterior. The bottom endplate
        is fixed; collapse lowers the top one (a wedge when only the anterior height is lost)."""
        t = np.linspace(-1, 1, n)
        u = 0.5 * self.w * t
        hf = self.hf_post + (self.hf_ant - self.hf_post) * (t + 1) / 2
        cave = 0.04 * self.h * (1 - t ** 2)  # endplates are slightly concave
        return self.to_img(u, 0.5 * self.h - self.h * hf + cave), self.to_img(u, 0.5 * self.h - cave)

    def outline(self, n: int = 12) -> np.ndarray:
        """(K, 2) body polygon with slightly concave walls."""
        top, bottom = self.edges(n)
        s = np.linspace(0, 1, n)[1:-1, None]
        inset = 0.03 * self.w * np.sin(np.pi * s) * self.ex
        anterior = top[-1] + s * (bottom[-1] - top[-1]) - inset
        posterior = bottom[0] + s * (top[0] - bottom[0]) + inset
        return np.concatenate([top, anterior, bottom[::-1], posterior])


def _poly(layer: np.ndarray, pts: np.ndarray, value=255):
    """Fill one polygon (K, 2) in float px (sub-pixel vertices) into layer."""
    cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], value, lineType=cv2.LINE_8, shift=4)


def _line(layer: np.ndarray, pts: np.ndarray, thickness: float, value=255, closed: bool = False):
    cv2.polylines(layer, [np.round(pts * 16).astype(np.int32)], closed, value,
                  thickness=max(1, round(thickness)), lineType=cv2.LINE_8, shift=4)


def _ellipse(layer: np.ndarray, centre, axes, ex: np.ndarray, value=255, thickness: int = -1):
    """Ellipse with semi-axes (a along ex, b across) at an image-px centre."""
    angle = math.degrees(math.atan2(ex[1], ex[0]))
    cv2.ellipse(layer, ((float(centre[0]), float(centre[1])), (2 * axes[0], 2 * axes[1]), angle), value,
                thickness=thickness, lineType=cv2.LINE_8)


def _unit(layer: np.ndarray) -> np.ndarray:
    """uint8 0/255 layer -> float32 [0, 1]."""
    return layer.astype(np.float32) / 255


def _smooth_field(rng: np.random.Generator, hw: tuple[int, int], cells: int, amp: float) -> np.ndarray:
    """Low-frequency random field (H, W) float32: a coarse grid upsampled bicubically."""
    grid = rng.normal(0, amp, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)


# --- planning: which image gets which lesions (before any pixel is drawn)

LATERAL_ONLY = (CLASSES.index("Foraminal stenosis"), CLASSES.index("Spondylolysthesis"))
# P(class on an abnormal image), max count. Order and skew follow REFERENCE §1: ~3 osteophytes per
# abnormal image as in VinDr (12,556 / 4,129), ~20x vertebral collapse here vs 47x there so that the
# rarest class still appears in a few hundred images.
_LESION_RATES = {"Osteophytes": (0.90, 6), "Disc space narrowing": (0.30, 2), "Other lesions": (0.15, 2),
                 "Foraminal stenosis": (0.25, 2), "Surgical implant": (0.15, 1), "Spondylolysthesis": (0.22, 1),
                 "Vertebral collapse": (0.10, 1)}


@dataclass
class _ImagePlan:
    study: int
    view: str  # "ap" | "lateral"
    region: str  # "lumbar" | "cervical"
    classes: list  # class index per planned lesion
    uids: tuple  # (study_id, series_id, image_id), 32 hex each


def _sample_lesions(rng: np.random.Generator, view: str) -> list[int]:
    classes = []
    for name, (p, most) in _LESION_RATES.items():
        c = CLASSES.index(name)
        if (view == "ap" and c in LATERAL_ONLY) or rng.random() >= p:
            continue
        extra = rng.poisson(2.0) if name == "Osteophytes" else rng.integers(0, most)
        classes += [c] * int(min(most, 1 + extra))
    return classes or [CLASSES.index("Osteophytes")]


def _plan_split(seed: int, split: int, n_images: int, hyp: DataConfig) -> list[_ImagePlan]:
    """1. ~2 images (AP + lateral) per study; 2. abnormal studies get lesions on most of their
    images; 3. every class is topped up to hyp.synth_min_class_images images where views allow."""
    plans = []
    for study in range(math.ceil(n_images / 2)):
        rng = np.random.default_rng((seed, split, study))
        region = "lumbar" if rng.random() < 0.65 else "cervical"
        abnormal = rng.random() < hyp.synth_abnormal_study
        if n_images - 2 * study == 1:
            views = [("ap", "lateral")[rng.integers(2)]]
        else:  # sometimes two views of one kind (e.g. flexion / extension laterals)
            views = ["ap", "lateral"] if rng.random() < 0.9 else [("ap", "lateral")[rng.integers(2)]] * 2
        study_id = rng.bytes(16).hex()
        for view in views:
            classes = _sample_lesions(rng, view) if abnormal and rng.random() < 0.93 else []
            plans.append(_ImagePlan(study, view, region, classes, (study_id, rng.bytes(16).hex(), rng.bytes(16).hex())))
    rng = np.random.default_rng((seed, split, 1_000_003))
    for c in range(len(CLASSES)):
        have = sum(c in p.classes for p in plans)
        pool = [p for p in plans if p.classes and c not in p.classes and not (p.view == "ap" and c in LATERAL_ONLY)]
        for p in sorted(pool, key=lambda p: (len(p.classes), rng.random()))[: max(0, hyp.synth_min_class_images - have)]:
            p.classes.append(c)
    return plans


# --- rendering: anatomy

def _build_spine(rng: np.random.Generator, hw: tuple[int, int], view: str, region: str,
                 collapse: int | None, narrowed: set, slip: int | None) -> tuple[list[_Vertebra], np.ndarray]:
    """Vertebrae top to bottom (the first and last are cut by the image edge) and disc heights (n-1,).
    Lateral views face left or right at random (the sign is inside ex)."""
    H, W = hw
    n_vis = 5 if region == "lumbar" else 7
    rho = 0.30 if region == "lumbar" else 0.34  # disc / body height
    h = H * rng.uniform(0.80, 0.88) / (n_vis + (n_vis + 1) * rho)
    aspect = {("lumbar", "lateral"): (1.25, 1.45), ("lumbar", "ap"): (1.5, 1.7),
              ("cervical", "lateral"): (1.1, 1.3), ("cervical", "ap"): (1.3, 1.5)}[region, view]
    w = h * rng.uniform(*aspect)
    s = 1.0 if view == "ap" else float(rng.choice([-1.0, 1.0]))  # anterior to the right / left
    n = n_vis + 2
    discs = h * rho * rng.uniform(0.85, 1.15, n - 1)
    for k in narrowed:
        discs[k] = h * rho * rng.uniform(0.22, 0.40)  # disc space narrowing
    bend = rng.uniform(0.12, 0.30) if view == "lateral" else rng.uniform(-0.06, 0.06)
    theta = s * bend * np.linspace(1, -1, n) + rng.normal(0, 0.02, n)  # lordosis: apex anterior
    verts = []
    for k in range(n):
        ey = np.array([math.sin(theta[k]), math.cos(theta[k])])
        grow = 1 + 0.03 * (k - n / 2)  # bodies grow down the column
        v = _Vertebra(np.zeros(2), s * np.array([ey[1], -ey[0]]), ey,
                      w * grow * rng.uniform(0.96, 1.04), h * grow * rng.uniform(0.95, 1.05))
        if k == collapse and view == "lateral":
            v.hf_ant = rng.uniform(0.45, 0.65)  # anterior wedge
        elif k == collapse:
            v.hf_post = rng.uniform(0.55, 0.70)  # loss of height, a little asymmetric
            v.hf_ant = v.hf_post * rng.uniform(0.9, 1.0)
        verts.append(v)
    for k in range(1, n):  # stack along the column: bottom endplate of k-1, disc, top endplate of k
        a, b = verts[k - 1], verts[k]
        b.c = a.c + (0.5 * a.h + discs[k - 1] - b.top) * (a.ey + b.ey) / np.linalg.norm(a.ey + b.ey)
    if slip is not None:  # spondylolisthesis: vertebra `slip` and all above it slide anteriorly
        shift = rng.uniform(0.20, 0.32) * verts[slip].w * verts[slip].ex
        for k in range(slip + 1):
            verts[k].c = verts[k].c + shift
    # centre the visible column vertically; horizontally centre the body-to-spinous-process extent
    top = verts[1].to_img(0, verts[1].top)[1]
    bottom = verts[-2].to_img(0, 0.5 * verts[-2].h)[1]
    target_x = W / 2 + (0.0 if view == "ap" else 0.38 * w * s) + rng.normal(0, 0.03 * W)
    shift = np.array([target_x - verts[n // 2].c[0], (H - (bottom - top)) / 2 - top])
    for v in verts:
        v.c = v.c + shift
    return verts, discs


def _disc_polygon(upper: _Vertebra, lower: _Vertebra) -> np.ndarray:
    return np.concatenate([upper.edges()[1], lower.edges()[0][::-1]])


def _foramen(v: _Vertebra, disc: float, scale: float = 1.0, lift: float = 0.0):
    """Intervertebral foramen below vertebra v (lateral view): (centre, (a, b)) of its ellipse.
    scale < 1 and lift > 0 give a narrowed window open only at the top (foraminal stenosis)."""
    a, b = 0.11 * v.w, 0.5 * (0.72 * v.h + disc)
    centre = v.to_img(-0.67 * v.w, 0.5 * v.h + 0.5 * disc - 0.12 * v.h - lift * b)
    return centre, (a * scale, b * scale)


def _posterior_lateral(layer: np.ndarray, verts: list[_Vertebra], discs: np.ndarray, region: str):
    """Pedicle / articular column behind the bodies and the spinous processes (lateral view)."""
    length = 1.55 if region == "lumbar" else 1.3  # spinous tip, in body widths behind the centre
    for k, v in enumerate(verts):
        up, down = discs[max(k - 1, 0)], discs[min(k, len(discs) - 1)]
        u = np.array([-0.51, -1.12, -1.12, -0.51]) * v.w
        _poly(layer, v.to_img(u, np.array([v.top - 0.5 * up] * 2 + [0.5 * v.h + 0.5 * down] * 2)))
        _poly(layer, v.to_img(np.array([-1.07, -length, -length, -1.07]) * v.w,
                              np.array([-0.15, 0.30, 0.55, 0.40]) * v.h))


def _posterior_ap(layer: np.ndarray, rim: np.ndarray, verts: list[_Vertebra], region: str):
    """Pedicle rings, spinous processes and (lumbar) transverse processes (AP view)."""
    for v in verts:
        for side in (-1, 1):
            centre = v.to_img(side * 0.3 * v.w, -0.18 * v.h)
            _ellipse(layer, centre, (0.085 * v.w, 0.15 * v.h), v.ex, 120)
            _ellipse(rim, centre, (0.085 * v.w, 0.15 * v.h), v.ex, 255, thickness=max(2, round(0.025 * v.w)))
            if region == "lumbar":
                _poly(layer, v.to_img(side * np.array([0.45, 0.9, 0.9, 0.45]) * v.w,
                                      np.array([-0.28, -0.20, -0.08, -0.02]) * v.h))
        _ellipse(layer, v.to_img(0, 0.3 * v.h), (0.05 * v.w, 0.2 * v.h), v.ex, 255)


def _tissue(rng: np.random.Generator, hw: tuple[int, int], view: str, region: str,
            verts: list[_Vertebra]) -> np.ndarray:
    """Soft tissue (H, W) float32: thickest over the trunk's centre (anterior to the spine on
    lateral views), a smooth random field, bowel gas (lumbar) and iliac wings (lumbar AP)."""
    H, W = hw
    xx = np.linspace(-1, 1, W, dtype=np.float32)[None, :]
    mid = verts[len(verts) // 2]
    centre = (mid.c[0] + (0.0 if view == "ap" else 1.2 * mid.w * mid.ex[0])) / W * 2 - 1
    tissue = 0.30 * np.sqrt(np.clip(1 - ((xx - centre) / rng.uniform(0.9, 1.6)) ** 2, 0, 1))
    tissue = tissue + 0.06 + _smooth_field(rng, hw, 4, 0.04)
    if region == "lumbar":
        gas = np.zeros(hw, np.uint8)
        for _ in range(rng.integers(0, 6)):
            _ellipse(gas, (rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H),
                     (rng.uniform(0.03, 0.08) * W, rng.uniform(0.02, 0.06) * H), np.array([1.0, 0.0]))
        tissue -= 0.07 * cv2.GaussianBlur(gas.astype(np.float32) / 255, (0, 0), 0.01 * W)
        if view == "ap":
            iliac = np.zeros(hw, np.uint8)
            for side in (-1, 1):
                cv2.ellipse(iliac, (int(verts[-1].c[0] + side * 0.42 * W), int(1.05 * H)),
                            (int(0.28 * W), int(0.22 * H)), 0, 180, 360, 255, thickness=max(3, int(0.03 * W)))
            tissue += 0.12 * (iliac > 0)
    return tissue


# --- rendering: lesions (each is rasterised once into its mask; the image is drawn through it)

def _spur(v: _Vertebra, side: float, upper: bool, rng: np.random.Generator) -> np.ndarray:
    """Osteophyte polygon: a bony beak from a body corner, outward and toward the disc (claw). Drawn
    moderate to large (a third to a half of the body's width): at the CPU demo's 128 px the classifiers
    see 6-12 px beaks and learn them from random initialisation in minutes; at half that size they did
    not (README). Real VinDr osteophytes include subtler ones."""
    length, base = rng.uniform(0.36, 0.55) * v.w, rng.uniform(0.30, 0.45) * v.h
    sv = -1.0 if upper else 1.0
    corner = v.top if upper else 0.5 * v.h
    u = side * np.array([0.44 * v.w, 0.5 * v.w + 0.35 * length, 0.5 * v.w + length, 0.5 * v.w + 0.45 * length, 0.44 * v.w])
    vv = corner + np.array([-sv * base, -sv * 0.5 * base, sv * 0.25 * length, sv * 0.02 * v.h, sv * 0.02 * v.h])
    return v.to_img(u, vv)


def _blob(v: _Vertebra, rng: np.random.Generator) -> np.ndarray:
    """Irregular focal lesion polygon inside a body (lytic or sclerotic)."""
    r = rng.uniform(0.12, 0.19) * v.w
    cu, cv_ = rng.uniform(-0.22, 0.22) * v.w, rng.uniform(-0.2, 0.2) * v.h + 0.5 * (v.top + 0.5 * v.h)
    phi = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    rad = r * (1 + 0.25 * rng.uniform(-1, 1, phi.size))
    return v.to_img(cu + rad * np.cos(phi), cv_ + 0.8 * rad * np.sin(phi))


def _implant(hw: tuple[int, int], verts: list[_Vertebra], view: str) -> np.ndarray:
    """Pedicle screws in the given vertebrae joined by rods: the metal's mask (H, W) uint8."""
    mask = np.zeros(hw, np.uint8)
    heads: dict[int, list] = {-1: [], 1: []}
    for v in verts:
        for side in ((-1, 1) if view == "ap" else (1,)):
            if view == "ap":  # screws converge medially from lateral heads
                head, tip = v.to_img(side * 0.45 * v.w, -0.16 * v.h), v.to_img(side * 0.08 * v.w, -0.06 * v.h)
            else:  # through the pedicle into the body
                head, tip = v.to_img(-1.05 * v.w, -0.14 * v.h), v.to_img(0.38 * v.w, -0.04 * v.h)
            _line(mask, np.stack([head, tip]), 0.08 * v.h)
            _ellipse(mask, head, (0.07 * v.w, 0.1 * v.h), v.ex)
            heads[side].append(head)
    for pts in heads.values():
        if len(pts) > 1:
            _line(mask, np.array(pts), 0.06 * verts[0].h)
    return mask


def _choose_sites(rng: np.random.Generator, n_vis: int, want: dict) -> dict:
    """Vertebrae / discs for each planned lesion; lesions that reshape a vertebra get their own.
    Returns implant (first, count) | None, collapse, slip (index | None), others, narrowed, stenotic."""
    inner = list(range(1, n_vis + 1))  # fully visible vertebrae; disc k lies below vertebra k
    free = [int(k) for k in rng.permutation(inner)]
    implant = None
    if want.get(4):
        first = int(rng.choice(inner[:-1]))
        implant = (first, min(int(rng.integers(2, 4)), inner[-1] - first + 1))
        free = [k for k in free if not first <= k < first + implant[1]]
    collapse = free.pop() if want.get(5) and free else None
    slip = next((k for k in free if k < inner[-1]), None) if want.get(3) else None
    if slip is not None:
        free.remove(slip)
    others = [free.pop() for _ in range(min(want.get(6, 0), len(free)))]
    discs = inner[:-1]
    return {"implant": implant, "collapse": collapse, "slip": slip, "others": others,
            "narrowed": {int(k) for k in rng.choice(discs, min(want.get(0, 0), len(discs)), replace=False)},
            "stenotic": {int(k) for k in rng.choice(discs, min(want.get(1, 0), len(discs)), replace=False)}}


def _render(rng: np.random.Generator, hw: tuple[int, int], view: str, region: str,
            classes: list[int]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], float]:
    """Attenuation image (H, W) float32, [(class, mask (H, W) uint8 0/255)] per lesion, and the
    median vertebral body height in px."""
    H, W = hw
    n_vis = 5 if region == "lumbar" else 7
    want = {c: classes.count(c) for c in set(classes)}
    # 1. lesion sites, then the column (narrowing, collapse and slip change its geometry)
    site = _choose_sites(rng, n_vis, want)
    verts, discs = _build_spine(rng, hw, view, region, site["collapse"], site["narrowed"], site["slip"])
    # 2. anatomy layers as uint8 masks (union within a layer)
    body, rim, post, post_rim, disc_layer = (np.zeros(hw, np.uint8) for _ in range(5))
    for v in verts:
        outline = v.outline()
        _poly(body, outline)
        _line(rim, outline, max(2.0, 0.035 * v.w), closed=True)  # cortical rim
    for k in range(len(verts) - 1):
        _poly(disc_layer, _disc_polygon(verts[k], verts[k + 1]))
    lesions: list[tuple[int, np.ndarray]] = []
    if view == "lateral":
        _posterior_lateral(post, verts, discs, region)
        for k in range(len(verts) - 1):
            centre, axes = _foramen(verts[k], discs[k])
            _ellipse(post, centre, axes, verts[k].ex, 0)  # the dark foraminal window
            if k in site["stenotic"]:  # foraminal stenosis: bone fills it but for a small top opening
                m = np.zeros(hw, np.uint8)
                _ellipse(m, centre, axes, verts[k].ex)
                _ellipse(post, centre, axes, verts[k].ex, 255)
                c2, a2 = _foramen(verts[k], discs[k], scale=rng.uniform(0.38, 0.55), lift=0.35)
                _ellipse(post, c2, a2, verts[k].ex, 0)
                lesions.append((CLASSES.index("Foraminal stenosis"), m))
    else:
        _posterior_ap(post, post_rim, verts, region)
    # 3. lesions
    corners = [(k, side, upper) for k in range(1, n_vis + 1) if k != site["collapse"]
               for side in ((1.0,) if view == "lateral" else (-1.0, 1.0)) for upper in (True, False)]
    for j in rng.permutation(len(corners))[: want.get(2, 0)]:
        k, side, upper = corners[j]
        m = np.zeros(hw, np.uint8)
        _poly(m, _spur(verts[k], side, upper, rng))
        m[body > 0] = 0  # the lesion is the part outside the body
        body[m > 0] = 255
        rim[cv2.dilate(m, np.ones((3, 3), np.uint8)) > 0] = 255  # spurs are dense cortical bone
        lesions.append((CLASSES.index("Osteophytes"), m))
    for k in sorted(site["narrowed"]):
        m = np.zeros(hw, np.uint8)
        _poly(m, _disc_polygon(verts[k], verts[k + 1]))
        lesions.append((CLASSES.index("Disc space narrowing"), m))
    if site["slip"] is not None:  # the slipped segment: both bodies and the disc between them
        k, m = site["slip"], np.zeros(hw, np.uint8)
        for pts in (verts[k].outline(), _disc_polygon(verts[k], verts[k + 1]), verts[k + 1].outline()):
            _poly(m, pts)
        lesions.append((CLASSES.index("Spondylolysthesis"), m))
    metal = np.zeros(hw, np.uint8)
    if site["implant"] is not None:
        first, count = site["implant"]
        metal = _implant(hw, verts[first:first + count], view)
        lesions.append((CLASSES.index("Surgical implant"), metal.copy()))
    density = np.zeros(hw, np.float32)  # extra (+) or missing (-) bone inside bodies
    if site["collapse"] is not None:
        m = np.zeros(hw, np.uint8)
        _poly(m, verts[site["collapse"]].outline())
        density[m > 0] += 0.06  # compressed trabeculae are denser
        lesions.append((CLASSES.index("Vertebral collapse"), m))
    for k in site["others"]:
        m = np.zeros(hw, np.uint8)
        _poly(m, _blob(verts[k], rng))
        m[body == 0] = 0
        density[m > 0] += -0.2 if rng.random() < 0.6 else 0.2  # lytic (dark) or sclerotic (bright), ~ the body
        lesions.append((CLASSES.index("Other lesions"), m))
    # 4. compose: tissue + disc + bone + metal (attenuations add along the ray), all float32
    small = rng.standard_normal((H // 2, W // 2), dtype=np.float32)  # texture at half size: 4x cheaper
    texture = cv2.GaussianBlur(small, (0, 0), 0.002 * H) - cv2.GaussianBlur(small, (0, 0), 0.006 * H)
    texture = cv2.resize(texture * (0.25 / (texture.std() + 1e-6)), (W, H), interpolation=cv2.INTER_LINEAR)
    img = _tissue(rng, hw, view, region, verts) + 0.03 * _unit(disc_layer) + 0.11 * _unit(rim)
    img += _unit(body) * (0.13 * (1 + texture) + density)  # trabecular bone
    img += _unit(post) * (0.11 * (1 + 0.5 * texture)) + 0.08 * _unit(post_rim) + 0.9 * _unit(metal)
    return img.astype(np.float32), lesions, float(np.median([v.h for v in verts]))


def _expose(rng: np.random.Generator, img: np.ndarray, bits: int = 12) -> tuple[np.ndarray, tuple[float, float]]:
    """Attenuation image -> (stored (H, W) uint16 in [0, 2^bits), window (centre, width)).

    Quantum noise blurred by the detector, a random gamma, then a window whose width is a random multiple
    of the image's spread and whose level is solved so that the DISPLAY mean equals a random
    target drawn independently of the labels: mean brightness gives no lesion away."""
    noise = np.float32(rng.uniform(0.025, 0.045)) * np.sqrt(np.clip(img, 0.05, None))  # Poisson-like
    img = cv2.GaussianBlur(img + noise * rng.standard_normal(img.shape, np.float32), (0, 0), 0.8)  # detector MTF
    img = np.clip(img, 0, None) ** np.float32(rng.uniform(0.85, 1.2))
    width = rng.uniform(4.0, 5.5) * float(img.std())
    target, sub = rng.uniform(0.38, 0.52), img[::4, ::4]
    lo, hi = float(sub.min()) - width, float(sub.max())
    for _ in range(30):  # bisection on the window's lower edge: the display mean falls as it rises
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.clip((sub - mid) / width, 0, 1).mean() > target else (lo, mid)
    top = 2 ** bits - 1
    stored_width, stored_low = rng.uniform(0.35, 0.6) * top, rng.uniform(0.15, 0.3) * top
    stored = np.clip(np.rint((img - 0.5 * (lo + hi)) / width * stored_width + stored_low), 0, top)
    return stored.astype(np.uint16), (stored_low + stored_width / 2, stored_width)


def _collimation(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[slice, slice] | None:
    """Sometimes a border band shuttered to black, as collimation does (label-independent)."""
    if rng.random() >= 0.3:
        return None
    H, W = hw
    edge = int(rng.integers(0, 4))
    band = int(rng.uniform(0.02, 0.06) * (W if edge < 2 else H))
    return ((slice(None), slice(0, band)), (slice(None), slice(W - band, W)),
            (slice(0, band), slice(None)), (slice(H - band, H), slice(None)))[edge]


def synth_radiograph(rng: np.random.Generator, hw: tuple[int, int], view: str = "lateral",
                     region: str = "lumbar", classes=()) -> tuple[np.ndarray, tuple, list, float]:
    """One synthetic spine radiograph: stored (H, W) uint16 (12-bit, MONOCHROME2), window (c, w),
    [(class index, mask (H, W) uint8 0/255)] for the lesions drawn, and pixel spacing in mm.
    classes: lesion class indices to draw (lateral-only classes are skipped on AP views)."""
    img, lesions, body_px = _render(rng, hw, view, region, list(classes))
    stored, window = _expose(rng, img)
    band = _collimation(rng, hw)
    if band is not None:
        stored[band] = 0
        for _, m in lesions:
            m[band] = 0  # hidden under the shutter: not a visible lesion any more
    body_mm = 27.0 if region == "lumbar" else 14.0  # typical adult vertebral body height
    return stored, window, [(c, m) for c, m in lesions if m.any()], body_mm / body_px


# --- writing DICOM

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                compress: bool = False, window: tuple | None = None, pixel_spacing: tuple | None = None,
                rescale: tuple = (1.0, 0.0), uids: tuple | None = None, view: str | None = None,
                body_part: str | None = None, modality: str = "DX") -> Path:
    """Write a DICOM radiograph (also used by tests and bench). pixels: (H, W) or (F, H, W) unsigned
    grayscale, or (H, W, 3) uint8 with photometric "RGB". compress -> JPEG 2000 Lossless, else
    explicit VR little endian. uids: (study, series, sop); VinDr's anonymised 32-hex IDs are not
    valid DICOM UIDs, so value validation is off while they are set. Only non-identifying tags."""
    study, series, sop = uids or tuple(pydicom.uid.generate_uid() for _ in range(3))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with dicom_config.disable_value_validation():
        ds = DicomDataset()
        ds.file_meta = FileMetaDataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS
        ds.PatientName, ds.PatientID = "SYNTHETIC^PATIENT", "SYNTHETIC"
        ds.Modality = modality
        if view:
            ds.ViewPosition = view
        if body_part:
            ds.BodyPartExamined = body_part
        ds.set_pixel_data(pixels, photometric, bits_stored, generate_instance_uid=False)
        if photometric.startswith("MONOCHROME"):
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = round(float(window[0]), 2), round(float(window[1]), 2)
        if pixel_spacing is not None:
            spacing = [round(float(pixel_spacing[0]), 6), round(float(pixel_spacing[1]), 6)]
            ds.PixelSpacing, ds.ImagerPixelSpacing = spacing, spacing
        if compress:
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    return path


def write_synthetic_dicom(path, height: int = 3000, width: int = 2500, *, seed: int = 0,
                          compress: bool = True) -> Path:
    """One full-size synthetic lateral lumbar radiograph (JPEG 2000 by default), for benchmarks."""
    rng = np.random.default_rng(seed)
    stored, window, _, spacing = synth_radiograph(rng, (height, width), "lateral", "lumbar",
                                                  (CLASSES.index("Osteophytes"),) * 2)
    return write_dicom(path, stored, compress=compress, window=window, pixel_spacing=(spacing, spacing))


def _write_synthetic_image(out: Path, split: str, code: int, j: int, plan: _ImagePlan, seed: int,
                           hyp: DataConfig) -> list[list[str]]:
    """Render, write the DICOM and the masks of one planned image; return its CSV rows."""
    rng = np.random.default_rng((seed, code, plan.study, j))
    H = int(rng.integers(*hyp.synth_height))
    W = int(H * rng.uniform(0.66, 0.8))
    stored, window, lesions, spacing = synth_radiograph(rng, (H, W), plan.view, plan.region, plan.classes)
    study_id, series_id, image_id = plan.uids
    photometric = "MONOCHROME1" if rng.random() < hyp.synth_monochrome1 else "MONOCHROME2"
    if photometric == "MONOCHROME1":  # stored inverted, window mirrored: displays the same once loaded
        stored, window = 4095 - stored, (4095 - window[0], window[1])
    write_dicom(out / f"{split}_images" / f"{image_id}.dicom", stored, photometric=photometric,
                compress=bool(rng.random() < hyp.synth_j2k), window=window, pixel_spacing=(spacing, spacing),
                uids=plan.uids, view="AP" if plan.view == "ap" else "LL",
                body_part="LSPINE" if plan.region == "lumbar" else "CSPINE")
    rad = f"rad{int(rng.integers(1, 10))}"
    if not lesions:
        return [[study_id, series_id, image_id, rad, NO_FINDING, "", "", "", ""]]
    rows = []
    (out / "masks" / split / image_id).mkdir(parents=True, exist_ok=True)
    for k, (c, m) in enumerate(lesions):
        x, y, w, h = cv2.boundingRect(m)  # tight box on pixel edges
        rows.append([study_id, series_id, image_id, rad, CLASSES[c], f"{x:.1f}", f"{y:.1f}",
                     f"{x + w:.1f}", f"{y + h:.1f}"])
        cv2.imwrite(str(out / "masks" / split / image_id / f"{k}.png"), m)
    return rows


def _write_task(task: tuple) -> list[list[str]]:
    cv2.setNumThreads(1)  # one image per process already uses the cores; avoids fork/thread-pool trouble
    return _write_synthetic_image(*task)


def make_synthetic(out_dir, n_train: int = DataConfig.synth_train, n_test: int = DataConfig.synth_test,
                   seed: int = DataConfig.seed, *, overwrite: bool = False, workers: int = 0,
                   progress: bool = True, hyp: DataConfig = DataConfig()) -> Path:
    """Write a synthetic dataset in the exact VinDr-SpineXR layout and return out_dir:

        annotations/train.csv, annotations/test.csv    study_id,series_id,image_id,rad_id,lesion_type,
                                                       xmin,ymin,xmax,ymax - one row per box; a normal
                                                       image has one "No finding" row, empty box
        train_images/<image_id>.dicom, test_images/<image_id>.dicom
        masks/{train,test}/<image_id>/<k>.png           extra, for segmentation: binary 0/255 at the
                                                       image size, k = index of the image's box rows
                                                       in CSV order

    IDs are 32-hex; image_id = SOPInstanceUID = file stem; study_id = StudyInstanceUID; ~2 images
    (AP + lateral) per study, lumbar or cervical. DICOMs: 12 bits stored in 16, unsigned, a mix of
    JPEG 2000 Lossless and uncompressed explicit VR little endian, some MONOCHROME1 (stored
    inverted: bone still shows bright once loaded), Window Center/Width, pixel spacing from the
    anatomy (~0.2 mm). Patient tags read "SYNTHETIC"; there is no real patient data.
    Deterministic for a seed, whatever the number of worker processes (0 = one per CPU core)."""
    out = Path(out_dir)
    if (out / "annotations").exists():
        if not overwrite:
            raise DataError(f"{out}: already holds a dataset; pass --overwrite or choose another folder")
        for sub in ("annotations", "train_images", "test_images", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
    splits = (("train", n_train), ("test", n_test))
    tasks = []
    for code, (split, n) in enumerate(splits):
        (out / f"{split}_images").mkdir(parents=True, exist_ok=True)
        tasks += [(out, split, code, j, plan, seed, hyp) for j, plan in enumerate(_plan_split(seed, code, n, hyp))]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = dict(total=len(tasks), desc="synthetic images", disable=not progress, leave=False)
    if workers > 1:  # each image has its own seeded generator: parallel output == sequential output
        # forkserver/spawn, never fork: a process whose OpenCV thread pool has started deadlocks when forked
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            rows = list(tqdm(pool.map(_write_task, tasks, chunksize=2), **bar))
    else:
        rows = [_write_task(task) for task in tqdm(tasks, **bar)]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, _ in splits:
        with open(out / "annotations" / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(r for task, image_rows in zip(tasks, rows) if task[1] == split for r in image_rows)
    return out


# -----------------------------------------------------------------------------
# 7. A look at a dataset: annotated images and what the classifier sees

CLASS_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240))  # RGB, one per LT class (distinct on grey); infer.py too
MONTAGE_TILE = 230  # px per tile side
MONTAGE_GAP = 4  # px of white between tiles and rows
MONTAGE_LEGEND = 44  # px height of the colour key and caption
MONTAGE_FONT, MONTAGE_FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.35
WHITE = 255


def pick_montage(records: list[Record], n: int, n_normal: int) -> list[Record]:
    """n images: abnormal ones chosen greedily to show the most classes not yet shown (ties: more
    boxes first, then file order), then n_normal normal ones."""
    abnormal, normal = [r for r in records if r.label], [r for r in records if not r.label]
    chosen, taken, seen = [], set(), set()
    while len(chosen) < min(n - n_normal, len(abnormal)):
        best = max((r for r in abnormal if r.image_id not in taken),
                   key=lambda r: (len(set(r.classes.tolist()) - seen), len(r.boxes)))
        chosen.append(best)
        taken.add(best.image_id)
        seen |= set(best.classes.tolist())
    return chosen + normal[: n - len(chosen)]


def _tile(gray_u8: np.ndarray, tile: int) -> tuple[np.ndarray, float, np.ndarray]:
    """(h, w) uint8 -> (tile, tile, 3) RGB with the image scaled to fit and centred on white; the scale
    and the (x, y) offset that map image px to tile px: tile = image * scale + offset."""
    scale = tile / max(gray_u8.shape)
    h, w = (max(1, round(v * scale)) for v in gray_u8.shape)
    small = cv2.resize(gray_u8, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((tile, tile, 3), WHITE, np.uint8)
    x0, y0 = (tile - w) // 2, (tile - h) // 2
    out[y0:y0 + h, x0:x0 + w] = small[..., None]
    return out, scale, np.array([x0, y0])


def _annotated_tile(img: np.ndarray, record: Record, tile: int) -> np.ndarray:
    """The display image with each lesion's mask outline (or its box, without masks) and LT code."""
    rgb, scale, offset = _tile(to_uint8(img), tile)
    for k, (box, c) in enumerate(zip(record.boxes, record.classes)):
        colour = CLASS_COLOURS[int(c) % len(CLASS_COLOURS)]
        if record.mask_paths:
            mask = cv2.imread(str(record.mask_paths[k]), cv2.IMREAD_GRAYSCALE)
            contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            contours = [np.round(cnt * scale).astype(np.int32) + offset for cnt in contours]
            cv2.drawContours(rgb, contours, -1, colour, 1, cv2.LINE_AA)
        else:
            x1, y1, x2, y2 = (np.round(box * scale).reshape(2, 2) + offset).reshape(-1).astype(int)
            cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, 1)
        x, y = (np.round(box[:2] * scale) + offset).astype(int)
        cv2.putText(rgb, LT_CODES[int(c)], (int(x), max(int(y) - 2, 8)), MONTAGE_FONT, MONTAGE_FONT_SCALE, colour,
                    1, cv2.LINE_AA)
    return rgb


def _legend(width: int, caption: str) -> np.ndarray:
    """Two text rows: a colour key per class, then the caption."""
    out = np.full((MONTAGE_LEGEND, width, 3), WHITE, np.uint8)
    x = 6
    for code, name, colour in zip(LT_CODES, CLASSES, CLASS_COLOURS):
        cv2.rectangle(out, (x, 6), (x + 10, 16), colour, -1)
        text = f"{code} {name}"
        cv2.putText(out, text, (x + 14, 16), MONTAGE_FONT, MONTAGE_FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
        x += 22 + cv2.getTextSize(text, MONTAGE_FONT, MONTAGE_FONT_SCALE, 1)[0][0]
    cv2.putText(out, caption, (6, 36), MONTAGE_FONT, MONTAGE_FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _row(tiles: list[np.ndarray]) -> np.ndarray:
    gap = np.full((tiles[0].shape[0], MONTAGE_GAP, 3), WHITE, np.uint8)
    return np.hstack([x for t in tiles for x in (gap, t)][1:])


def write_montage(records: list[Record], out, n: int = 6, n_normal: int = 2, input_size: int = 128,
                  clahe_side: int = 384, tile: int = MONTAGE_TILE, hyp: DataConfig = DataConfig()) -> Path:
    """PNG of n images (pick_montage): top row the loaded, display-ready images with their lesions, bottom
    row the classifier input at input_size, shrunk from CLAHE at clahe_side (prepare_image, Eq. 1; the
    defaults are the CPU demo's), then a colour key."""
    chosen = pick_montage(records, n, n_normal)
    if not chosen:
        raise DataError("no images to show")
    images = [load_image(r.path)[0] for r in chosen]                         # each decoded once
    top = _row([_annotated_tile(img, r, tile) for img, r in zip(images, chosen)])
    bottom = _row([_tile(prepare_image(img, input_size, clip_limit=hyp.clahe_clip, tile_grid=hyp.clahe_tiles,
                                       clahe_side=clahe_side), tile)[0] for img in images])
    n_norm = sum(1 for r in chosen if not r.label)
    caption = (f"top: loaded image (display-ready) with lesion {'masks' if chosen[0].mask_paths else 'boxes'} "
               f"and LT codes; bottom: {input_size}-px classifier input (CLAHE, Eq. 1, at {clahe_side} px)"
               + (f"; last {n_norm} normal" if n_norm else ""))
    image = np.vstack([top, np.full((MONTAGE_GAP, top.shape[1], 3), WHITE, np.uint8), bottom,
                       _legend(top.shape[1], caption)])
    _, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return atomic_write(out, lambda tmp: tmp.write_bytes(png.tobytes()))


# -----------------------------------------------------------------------------
# CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DERNet + YOLO11 data tools: synthetic VinDr-format "
                                                 "set and image inspection", add_help=True)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write the synthetic VinDr-SpineXR-format dataset")
    group = synth.add_argument_group("output")
    group.add_argument("--out", required=True, help="dataset root to create")
    group.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    group = synth.add_argument_group("size")
    group.add_argument("--train", type=int, default=DataConfig.synth_train, help="images in the train split")
    group.add_argument("--test", type=int, default=DataConfig.synth_test, help="images in the test split")
    group.add_argument("--seed", type=int, default=DataConfig.seed)
    group.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU core)")
    group = synth.add_argument_group("look")
    group.add_argument("--height", type=int, nargs=2, default=DataConfig.synth_height, metavar=("MIN", "MAX"),
                       help="image height range in px (width follows the view)")
    group.add_argument("--j2k", type=float, default=DataConfig.synth_j2k,
                       help="share of files stored as JPEG 2000 Lossless (VinDr: 1.0); e.g. --j2k 1 --height 768 "
                            "800 gives every image a reduced level at a 384-px working side (issue 11's guard)")
    montage = sub.add_parser("montage", help="PNG of annotated images and their classifier input")
    montage.add_argument("--data", default="data/synthetic", help="dataset root in the VinDr-SpineXR layout")
    montage.add_argument("--split", default="test", choices=("train", "test"))
    montage.add_argument("--out", required=True, help="PNG file to write")
    montage.add_argument("--images", type=int, default=6, help="images shown (abnormal ones first)")
    montage.add_argument("--normal", type=int, default=2, help="of which normal images")
    montage.add_argument("--input-size", type=int, default=128, help="classifier input size shown (demo: 128)")
    montage.add_argument("--clahe-side", type=int, default=384, help="long side CLAHE runs at (demo: 384)")
    info = sub.add_parser("info", help="print an image's metadata and check that it decodes")
    info.add_argument("path", help="DICOM, PNG or JPEG file")
    info.add_argument("--max-pixels", type=int, default=DataConfig.max_pixels)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.command == "synth":
        if args.train < 1 or args.test < 1:
            raise DataError("--train and --test must be at least 1")
        low, high = args.height
        if not DataConfig.synth_min_height <= low < high or not 0 <= args.j2k <= 1:
            raise DataError(f"need {DataConfig.synth_min_height} <= --height MIN < MAX and 0 <= --j2k <= 1")
        hyp = dataclasses.replace(DataConfig(), synth_height=(low, high), synth_j2k=args.j2k)
        t0 = time.perf_counter()
        out = make_synthetic(args.out, args.train, args.test, args.seed, overwrite=args.overwrite,
                             workers=args.workers, hyp=hyp)
        print(f"wrote {args.train} + {args.test} synthetic images to {out} in {time.perf_counter() - t0:.1f} s")
    elif args.command == "montage":
        if not 0 <= args.normal <= args.images or args.images < 1 or min(args.input_size, args.clahe_side) < 16:
            raise DataError("need --images >= 1, 0 <= --normal <= --images, --input-size and --clahe-side >= 16")
        if not Path(args.out).resolve().parent.is_dir():
            raise DataError(f"--out {args.out}: the folder does not exist")
        out = write_montage(load_split(args.data, args.split), args.out, args.images, args.normal, args.input_size,
                            args.clahe_side)
        print(f"wrote {out}")
    elif args.command == "info":
        t0 = time.perf_counter()
        img, meta = load_image(args.path, max_pixels=args.max_pixels)
        dt = time.perf_counter() - t0
        for key, value in asdict(meta).items():
            print(f"{key:14s} {value}")
        print(f"decode ok: {img.shape[0]}x{img.shape[1]} float32 in [{img.min():.3f}, {img.max():.3f}], "
              f"mean {img.mean():.3f}, {dt * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    cli_args = get_args_parser().parse_args()
    try:
        sys.exit(main(cli_args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
