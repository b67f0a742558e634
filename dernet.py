"""DERNet: the Phase I triage ensemble (Sec. 3.2, Fig. 3, Eq. 2, Algorithm 1 lines 1-7 and 16-17).

Three torchvision backbones -- DenseNet121, EfficientNetV2-S and ResNet50 -- each get a single-logit
"abnormal" head. Their probabilities are fused by weighted soft voting (Eq. 2),

    S(x) = sum_m  omega_m * sigmoid(f_m(x)),   sum_m omega_m = 1,   omega = [0.42, 0.32, 0.26],

and a study is flagged abnormal when S > tau (Algorithm 1, line 17). tau is tau_optimal, chosen by
Youden's J on validation data (`youden_threshold`); omega may optionally be refitted on validation data
(`fit_omega`), the paper's values being the default.

Inputs are (B, 1, H, W) grayscale images in [0, 1] with CLAHE (Eq. 1) already applied by data.py.
Each member replicates the channel to RGB and applies the ImageNet normalisation itself, and DERNet
resizes the input to each member's size, so an exported model or a checkpoint needs nothing else.

Nothing is downloaded: ImageNet initialisation comes only from a local torchvision checkpoint file
(`load_pretrained`). Trained by `python train.py --stage cls`; used by `python infer.py image.dcm`.
"""
import math
import re
import sys
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from sklearn.metrics import roc_auc_score, roc_curve

from data import atomic_write

MEMBERS = ("densenet121", "efficientnet_v2_s", "resnet50")  # Sec. 3.2 / Fig. 3, in Omega order
OMEGA = (0.42, 0.32, 0.26)                                   # Eq. 2 / Sec. 3.2, "empirical weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)                        # torchvision ImageNet weights' transforms
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 384                                             # default member input size (issue 3)
OMEGA_SUM_TOL = 1e-6                                         # tolerance of the constraint sum(omega) = 1
CHECKPOINT_FORMAT = "dernet-v1"                              # tag stored in checkpoint meta

# Per architecture: feature width feeding the classifier, the dotted name of the torchvision
# classifier Linear we replace, and the last convolutional feature map (Grad-CAM target, infer.py).
ARCHS = {   # stem: the first convolution, the one that sees the (normalised) image itself
    "densenet121": dict(width=1024, head="classifier", cam_layer="features", stem="features.conv0"),
    "efficientnet_v2_s": dict(width=1280, head="classifier.1", cam_layer="features.7", stem="features.0.0"),
    "resnet50": dict(width=2048, head="fc", cam_layer="layer4", stem="conv1"),
}

# torchvision's DenseNet checkpoints predate the ban on '.' in module names: keys such as
# 'denselayer1.norm.1.weight' must become 'denselayer1.norm1.weight' (torchvision.models.densenet).
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


# --------------------------------------------------------------------------- members

class Member(nn.Module):
    """One torchvision backbone with a single-logit abnormal head.

    forward: x (B, 1, H, W) float in [0, 1] -> logit (B,). Grayscale is replicated to 3 channels and
    ImageNet-normalised here, so the member consumes exactly what data.py produces.
    """

    def __init__(self, name: str):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown DERNet member {name!r}; expected one of {', '.join(MEMBERS)}")
        self.name = name
        self.net = getattr(torchvision.models, name)(weights=None)   # never downloads
        head = self.net.get_submodule(ARCHS[name]["head"])
        assert isinstance(head, nn.Linear) and head.in_features == ARCHS[name]["width"]
        self.net.set_submodule(ARCHS[name]["head"], nn.Linear(head.in_features, 1))
        # Constants, not learnt: kept out of the state_dict so its keys match torchvision's.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional feature map, the Grad-CAM target (infer.py)."""
        return self.net.get_submodule(ARCHS[self.name]["cam_layer"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)                  # (B, 3, H, W) grayscale replicated
        x = (x - self.mean) / self.std               # ImageNet normalisation
        return self.net(x).squeeze(1)                # (B,) abnormal logit


def _find_checkpoint(name: str, directory: Path) -> Path:
    """The torchvision file for `name` in `directory`: '<name>-<hash>.pth' (or '<name>.pth'/'.pt')."""
    found = sorted(p for p in directory.iterdir()
                   if p.is_file() and re.fullmatch(rf"{re.escape(name)}(-[0-9a-f]+)?\.pth?", p.name))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise ValueError(f"{directory}: {what} checkpoint files named like '{name}-<hash>.pth'; "
                         f"name the file itself")
    return found[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a torchvision file, or from a training checkpoint's 'state_dict'/'model'."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors have multi-line messages; keep the first line
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: does not contain a state_dict of tensors")
    return obj


def load_pretrained(member: Member, path: str | Path) -> Path:
    """Initialise `member`'s backbone from a local torchvision ImageNet checkpoint; returns the file used.

    `path` is a file (e.g. resnet50-0676ba61.pth, densenet121-a639ec97.pth,
    efficientnet_v2_s-dd5fe13b.pth) or a directory holding one such file per architecture. The
    1000-class classifier weights are skipped (the 1-logit head stays freshly initialised). Any other
    missing, unexpected or mis-shaped key is an error: the file is for another architecture.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: pretrained weights not found")
    if path.is_dir():
        path = _find_checkpoint(member.name, path)
    state = _read_state_dict(path)
    if member.name == "densenet121":
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    head = ARCHS[member.name]["head"] + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = {k: v for k, v in member.net.state_dict().items() if not k.startswith(head)}
    # Files saved before BatchNorm counted batches lack 'num_batches_tracked'; BatchNorm fills it in.
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        example = (missing + unexpected + wrong)[0]
        raise ValueError(f"{path}: not a torchvision {member.name} state_dict ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped keys, e.g. {example!r})")
    member.net.load_state_dict(state, strict=False)   # strict=False only for the skipped head
    return path


def build_member(name: str, pretrained: str | Path | None = None) -> Member:
    """A member with ImageNet weights from `pretrained` (file or directory), else random init + notice."""
    member = Member(name)
    if pretrained is None:
        print(f"dernet: {name} randomly initialised (no pretrained file given; "
              f"weights are never downloaded)", file=sys.stderr)
    else:
        used = load_pretrained(member, pretrained)
        print(f"dernet: {name} initialised from {used}", file=sys.stderr)
    return member


# --------------------------------------------------------------------------- ensemble (Eq. 2)

def check_omega(omega: Sequence[float], n_members: int = len(MEMBERS)) -> tuple[float, ...]:
    """Validate ensemble weights: n_members finite, non-negative values with sum 1 (Eq. 2)."""
    omega = tuple(float(w) for w in omega)
    if len(omega) != n_members:
        raise ValueError(f"omega needs {n_members} weights (one per member), got {len(omega)}")
    if not all(math.isfinite(w) and w >= 0 for w in omega):
        raise ValueError(f"omega weights must be finite and non-negative, got {list(omega)}")
    if abs(sum(omega) - 1.0) > OMEGA_SUM_TOL:
        raise ValueError(f"omega must sum to 1 (Eq. 2), got {list(omega)} with sum {sum(omega):.6g}")
    return omega


def soft_vote(probs: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Eq. 2: S = sum_m omega_m * P_m. probs (B, M), omega (M,) -> S (B,)."""
    return probs @ omega.to(probs.dtype)


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), antialiased bilinear; unchanged if already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DERNet(nn.Module):
    """Weighted soft voting of the members' abnormal probabilities (Eq. 2, Fig. 3).

    forward: x (B, 1, H, W) in [0, 1] -> S (B,) ensemble abnormal probability; S > tau is "abnormal".
    Each member sees x resized to its own image size (image_sizes[name]).
    """

    def __init__(self, members: Mapping[str, nn.Module], omega: Sequence[float] = OMEGA,
                 tau: float = 0.5, image_sizes: Mapping[str, int] | None = None,
                 preprocess: Mapping[str, float | int | None] | None = None):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.register_buffer("omega", torch.tensor(check_omega(omega, len(self.members)),
                                                   dtype=torch.float32))   # (M,)
        self.tau = float(tau)
        sizes = dict(image_sizes or {})
        self.image_sizes = {name: int(sizes.get(name, IMAGE_SIZE)) for name in self.members}
        self.preprocess = dict(preprocess or {})   # what data.py applied before us (CLAHE, Eq. 1)

    def set_omega(self, omega: Sequence[float]) -> None:
        self.omega.copy_(torch.tensor(check_omega(omega, len(self.members))))

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) -> P_m(abnormal | x) for each member, (B, M) in MEMBERS order, in fp32 also
        under a bf16 / fp16 autocast: a bf16 sigmoid moves in steps of 1/256 near 1 (0.984375, 0.98828,
        ..., 1.0), so confident images would tie and AUROC, tau and the vote would see coarse scores."""
        logits = [m(resize_to(x, self.image_sizes[name])) for name, m in self.members.items()]
        return torch.sigmoid(torch.stack(logits, dim=1).float())   # (B, M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_vote(self.member_probs(x), self.omega)   # (B,) Eq. 2

    def decide(self, s: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, line 17: abnormal iff S > tau_optimal. (B,) float -> (B,) bool."""
        return s > self.tau

    # -- checkpoints: meta holds only primitive types so torch.load(weights_only=True) reads them
    def checkpoint_meta(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "members": list(self.members),
                "omega": [float(w) for w in self.omega], "tau": self.tau,
                "image_sizes": dict(self.image_sizes), "preprocess": dict(self.preprocess)}

    def checkpoint(self) -> dict:
        return {"meta": self.checkpoint_meta(), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping) -> "DERNet":
        meta = ckpt.get("meta") if isinstance(ckpt, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a DERNet checkpoint (expected meta format {CHECKPOINT_FORMAT!r})")
        model = cls({name: Member(name) for name in meta["members"]}, omega=meta["omega"],
                    tau=meta["tau"], image_sizes=meta["image_sizes"], preprocess=meta["preprocess"])
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError) as e:   # torch's message lists every key: keep one line
            raise ValueError(f"DERNet checkpoint weights do not fit its members ({str(e).splitlines()[0]})") from None
        return model


def save_dernet(model: DERNet, path: str | Path) -> None:
    """Write the checkpoint atomically (temporary file + rename): a crash never leaves half a file."""
    atomic_write(path, lambda tmp: torch.save(model.checkpoint(), tmp))


def load_dernet(path: str | Path, map_location: str | torch.device = "cpu") -> DERNet:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: DERNet checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    return DERNet.from_checkpoint(ckpt).eval()


# --------------------------------------------------------------------------- validation-set choices

def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """tau_optimal = the operating point maximising Youden's J = TPR - FPR on validation data.

    sklearn's roc_curve marks "positive iff s >= t" for each distinct score t (descending), preceded by
    t = inf (nothing positive, J = 0). Our decision is strict, S > tau (Algorithm 1, line 17), so for the
    best t we return the midpoint between t and the next lower distinct score: the same split of the
    validation scores, with equal margin on both sides for unseen scores. When the best t is the lowest
    score (everything positive) tau is the next float below it.
    Ties in J are broken towards the LOWER threshold, i.e. higher sensitivity: a triage stage that
    filters normal studies should rather pass an abnormal one on to the detector than drop it. Hence
    the inf point is never returned: the all-positive point (TPR = FPR = 1) ties with it at J = 0, so
    scores with no signal send every study on to the detector.
    """
    y, s = np.asarray(y).ravel(), np.asarray(s, dtype=np.float64).ravel()
    if len(np.unique(y)) != 2:
        raise ValueError("youden_threshold needs both normal and abnormal validation images")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)   # thresholds[0] = inf
    j = tpr - fpr
    k = len(j) - 1 - int(np.argmax(j[::-1]))                          # last maximum = lowest threshold
    if k == len(thresholds) - 1:
        return float(np.nextafter(thresholds[k], -np.inf))
    return float((thresholds[k] + thresholds[k + 1]) / 2)


def _simplex_grid(n_members: int, steps: int) -> np.ndarray:
    """All weight vectors with entries in {0, 1/steps, ..., 1} summing to 1: (G, n_members)."""
    rows = [c + (steps - sum(c),) for c in product(range(steps + 1), repeat=n_members - 1)
            if sum(c) <= steps]
    return np.array(rows, dtype=np.float64) / steps


def fit_omega(y: np.ndarray, probs: np.ndarray, step: float = 0.02,
              prior: Sequence[float] = OMEGA) -> np.ndarray:
    """Ensemble weights maximising validation AUROC over a grid on the simplex (optional, issue 3).

    probs (N, M) member probabilities on the validation fold. Every omega with entries on the grid
    {0, step, 2*step, ..., 1} and sum 1 is scored (1,326 points for M = 3, step 0.02). Many weightings
    rank the images identically and tie; ties go to the one closest (Euclidean) to `prior` -- the
    paper's Omega -- so the fit departs from the paper only when the data say so.
    """
    y, probs = np.asarray(y).ravel(), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y):
        raise ValueError(f"probs must be (N, M) with N = len(y) = {len(y)}, got {probs.shape}")
    if len(np.unique(y)) != 2:
        raise ValueError("fit_omega needs both normal and abnormal validation images")
    steps = round(1 / step)
    if not math.isclose(steps * step, 1.0):
        raise ValueError(f"step must divide 1 (e.g. 0.02, 0.05, 0.1), got {step}")
    grid = _simplex_grid(probs.shape[1], steps)                    # (G, M)
    auc = np.array([roc_auc_score(y, probs @ w) for w in grid])   # (G,)
    best = np.flatnonzero(auc == auc.max())
    distance = np.linalg.norm(grid[best] - np.asarray(prior), axis=1)
    return grid[best[np.argmin(distance)]]


# --------------------------------------------------------------------------- config and builder

@dataclass
class DERNetConfig:
    members: tuple[str, ...] = MEMBERS   # Sec. 3.2 / Fig. 3
    omega: tuple[float, ...] = OMEGA     # Eq. 2 / Sec. 3.2
    tau: float = 0.5                     # placeholder until youden_threshold on validation (Alg. 1 l. 17)
    image_size: int = IMAGE_SIZE         # per-member default input size (issue 3); override per member
    image_sizes: dict[str, int] = field(default_factory=dict)   # e.g. {"resnet50": 512}
    clahe_clip_limit: float = 2.0        # Eq. 1 / Sec. 3.1, tau = 2.0
    clahe_tile_grid: int = 8             # Eq. 1, 8 x 8 tiles (common choice, REFERENCE.md Sec. 4)
    clahe_side: int = 640                # Eq. 1 working long side (data.DataConfig.clahe_side)
    omega_grid_step: float = 0.02        # fit_omega simplex grid spacing (issue 3, optional refit)


def build_dernet(cfg: DERNetConfig | None = None, pretrained: str | Path | None = None) -> DERNet:
    """The ensemble from `cfg`; `pretrained` is a directory with one torchvision file per member."""
    cfg = cfg or DERNetConfig()
    if pretrained is not None and not Path(pretrained).is_dir():
        raise ValueError(f"{pretrained}: for the whole ensemble give a directory holding "
                         f"{', '.join(n + '-<hash>.pth' for n in cfg.members)}")
    members = {name: build_member(name, pretrained) for name in cfg.members}
    sizes = {name: cfg.image_sizes.get(name, cfg.image_size) for name in cfg.members}
    preprocess = {"clahe_clip_limit": cfg.clahe_clip_limit, "clahe_tile_grid": cfg.clahe_tile_grid,
                  "clahe_side": cfg.clahe_side}
    return DERNet(members, omega=cfg.omega, tau=cfg.tau, image_sizes=sizes, preprocess=preprocess)
