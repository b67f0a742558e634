"""Shared, seeded, tiny fixtures: a small synthetic VinDr-format set and untrained checkpoints in the
exact formats train.py writes (dernet.pt, detector best.pt), for the inference and app tests."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data import CLASSES, LT_CODES, DataConfig, make_synthetic
from dernet import MEMBERS, DERNet, Member, save_dernet
from train import TrainConfig, detector_checkpoint, save_checkpoint
from yolo11 import YOLO11, YOLO11Seg

TINY_CLS_SIZE = 64  # member input size of the tiny DERNet
TINY_DET_SIZE = 64  # detector input size of the tiny YOLO11-n
TINY_CLAHE_SIDE = 64  # both models' CLAHE working side (Eq. 1): one shared working image


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """24 training + 8 test images in the VinDr layout (seeded; written once per test session)."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), n_train=24, n_test=8, seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> SimpleNamespace:
    """Untrained (seeded) checkpoints: cls_ckpt (DERNet, 64 px), det_ckpt and seg_ckpt (YOLO11-n, 64 px)."""
    out = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    dernet = DERNet({name: Member(name) for name in MEMBERS}, tau=0.5,
                    image_sizes={name: TINY_CLS_SIZE for name in MEMBERS},
                    preprocess={"clahe_clip_limit": DataConfig.clahe_clip, "clahe_tile_grid": DataConfig.clahe_tiles,
                                "clahe_side": TINY_CLAHE_SIDE, "low_band": DataConfig.low_band})
    save_dernet(dernet.eval(), out / "dernet.pt")
    cfg = TrainConfig(scale="n", det_imgsz=TINY_DET_SIZE, clahe_side=TINY_CLAHE_SIDE)
    paths = {}
    for seg, model_cls in ((False, YOLO11), (True, YOLO11Seg)):
        torch.manual_seed(0)
        model = model_cls(nc=len(CLASSES), scale="n").eval()
        paths[seg] = save_checkpoint(detector_checkpoint(model, cfg, seg, epoch=0, val={}),
                                     out / ("seg.pt" if seg else "det.pt"))
    return SimpleNamespace(cls_ckpt=out / "dernet.pt", det_ckpt=paths[False], seg_ckpt=paths[True],
                           names=list(CLASSES), lt_codes=list(LT_CODES))
