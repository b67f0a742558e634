"""Tests for dernet.py: members, Eq. 2 soft voting, omega constraint, Youden threshold, omega fit,
ImageNet initialisation from a local torchvision file, checkpoint round trip."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score

import dernet
from dernet import MEMBERS, OMEGA, DERNet, Member

SIZE = 64   # tiny inputs (GUIDE)


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    """Each full member built once for the whole module (seeded)."""
    torch.manual_seed(0)
    return {name: Member(name).eval() for name in MEMBERS}


class ConstantLogit(nn.Module):
    """A stand-in member returning fixed logits, one per image: (B, 1, H, W) -> (B,)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))
        self.seen_sizes = []

    def forward(self, x):
        self.seen_sizes.append(tuple(x.shape[-2:]))
        return self.logits[: x.shape[0]]


# --- members

# torchvision's published parameter counts (weights meta "num_params", 1000-class ImageNet head)
# and the classifier we replace: Linear(width, 1000) -> Linear(width, 1).
PUBLISHED = {  # name: (torchvision count, classifier input width)
    "densenet121": (7_978_856, 1024),
    "efficientnet_v2_s": (21_458_488, 1280),
    "resnet50": (25_557_032, 2048),
}


@pytest.mark.parametrize("name", MEMBERS)
def test_member_parameter_count(members, name):
    published, width = PUBLISHED[name]
    imagenet_head = width * 1000 + 1000
    abnormal_head = width * 1 + 1
    expected = published - imagenet_head + abnormal_head   # e.g. resnet50: 25,557,032 - 2,049,000 + 2,049
    assert sum(p.numel() for p in members[name].parameters()) == expected
    weights = torchvision.models.get_model_weights(name).DEFAULT   # metadata only, nothing downloaded
    assert weights.meta["num_params"] == published


@pytest.mark.parametrize("name", MEMBERS)
def test_member_forward_shape_and_preprocessing(members, name):
    m = members[name]
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        logit = m(x)
        # same as torchvision's own recipe: 3-channel replica, ImageNet normalisation, classifier
        mean, std = torch.tensor(dernet.IMAGENET_MEAN), torch.tensor(dernet.IMAGENET_STD)
        rgb = (x.repeat(1, 3, 1, 1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        expected = m.net(rgb)[:, 0]
    assert logit.shape == (2,)
    torch.testing.assert_close(logit, expected)
    assert set(m.state_dict()) == set(m.net.state_dict(prefix="net."))   # normalisation is not saved


def test_unknown_member_name():
    with pytest.raises(ValueError, match="unknown DERNet member"):
        Member("vgg16")


# --- pretrained initialisation from a local torchvision file

def _torchvision_file_state(member: Member) -> dict:
    """`member`'s backbone as torchvision ships it: a 1000-class classifier, and for DenseNet the old
    'norm.1'-style key names and no 'num_batches_tracked' (the file predates them)."""
    name, head = member.name, dernet.ARCHS[member.name]["head"]
    width = dernet.ARCHS[name]["width"]
    state = dict(member.net.state_dict())
    state[head + ".weight"], state[head + ".bias"] = torch.randn(1000, width), torch.randn(1000)
    if name == "densenet121":
        state = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return state


@pytest.mark.parametrize("name,filename", [("densenet121", "densenet121-a639ec97.pth"),
                                           ("efficientnet_v2_s", "efficientnet_v2_s-dd5fe13b.pth"),
                                           ("resnet50", "resnet50-0676ba61.pth")])
def test_load_pretrained(tmp_path, members, name, filename):
    source = members[name]
    state = _torchvision_file_state(source)
    if name == "densenet121":
        assert any(".norm.1." in k for k in state)
    torch.save(state, tmp_path / filename)
    torch.manual_seed(123)
    fresh = Member(name)                                   # a different random init
    head = dernet.ARCHS[name]["head"] + "."
    head_before = {k: v.clone() for k, v in fresh.net.state_dict().items() if k.startswith(head)}
    assert dernet.load_pretrained(fresh, tmp_path / filename) == tmp_path / filename
    (tmp_path / "notes.txt").write_text("other files are ignored")
    assert dernet.load_pretrained(fresh, tmp_path) == tmp_path / filename   # found by architecture name
    loaded = fresh.net.state_dict()
    for key, value in source.net.state_dict().items():
        expected = head_before[key] if key.startswith(head) else value   # the 1-logit head is kept
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0)


def test_load_pretrained_errors(tmp_path, members):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet50-0000.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet50 state_dict") as err:
        dernet.load_pretrained(members["resnet50"], tmp_path / "resnet50-0000.pth")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        dernet.load_pretrained(members["resnet50"], tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="no checkpoint files named like 'densenet121-<hash>.pth'"):
        dernet.load_pretrained(members["densenet121"], tmp_path)
    (tmp_path / "resnet50-1111.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .*resnet50-0000.pth, resnet50-1111.pth.*name the file"):
        dernet.load_pretrained(members["resnet50"], tmp_path)
    with pytest.raises(ValueError, match="not found"):
        dernet.load_pretrained(members["densenet121"], tmp_path / "missing.pth")


# --- Eq. 2 soft voting and the omega constraint

def test_soft_vote_eq2_hand_made():
    probs = torch.tensor([[0.9, 0.6, 0.2],
                          [0.1, 0.3, 0.8]])
    # 0.42*0.9 + 0.32*0.6 + 0.26*0.2 = 0.378 + 0.192 + 0.052 = 0.622
    # 0.42*0.1 + 0.32*0.3 + 0.26*0.8 = 0.042 + 0.096 + 0.208 = 0.346
    s = dernet.soft_vote(probs, torch.tensor(OMEGA))
    torch.testing.assert_close(s, torch.tensor([0.622, 0.346]))


def test_dernet_forward_is_eq2_and_resizes_per_member():
    logits = {"densenet121": [2.0, -1.0], "efficientnet_v2_s": [0.5, 0.0], "resnet50": [-3.0, 1.5]}
    stubs = {name: ConstantLogit(v) for name, v in logits.items()}
    sizes = {"densenet121": 32, "efficientnet_v2_s": 48, "resnet50": SIZE}
    model = DERNet(stubs, image_sizes=sizes, tau=0.4)
    x = torch.rand(2, 1, SIZE, SIZE)
    probs = model.member_probs(x)
    expected_probs = torch.sigmoid(torch.tensor([logits[n] for n in MEMBERS]).T)   # (B, 3)
    torch.testing.assert_close(probs, expected_probs)
    s = model(x)
    torch.testing.assert_close(s, sum(w * expected_probs[:, i] for i, w in enumerate(OMEGA)))
    assert model.decide(s).tolist() == (s > 0.4).tolist()
    assert [stubs[n].seen_sizes[0] for n in MEMBERS] == [(32, 32), (48, 48), (SIZE, SIZE)]


class Bf16Logit(ConstantLogit):
    """Logits in bf16, as a member's last Linear layer yields them under a bf16 autocast."""

    def forward(self, x):
        return super().forward(x).to(torch.bfloat16)


def test_member_probs_are_fp32_under_bf16_autocast():
    logits = {"densenet121": [6.0, 4.25], "efficientnet_v2_s": [5.125, 0.25], "resnet50": [4.875, -3.0]}  # bf16-exact
    model = DERNet({name: Bf16Logit(v) for name, v in logits.items()}, tau=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = model.member_probs(torch.rand(2, 1, SIZE, SIZE))
    expected = torch.sigmoid(torch.tensor([logits[n] for n in MEMBERS]).T)   # fp32 sigmoid
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected)   # a bf16 sigmoid: 0.99609 for 6.0 and 5.125 alike


def test_resize_to_matches_pil_antialiased_bilinear():
    rng = np.random.default_rng(0)
    img = rng.random((64, 64), dtype=np.float32)
    x = torch.from_numpy(img)[None, None]
    assert dernet.resize_to(x, 64) is x                                 # no resampling at equal size
    pil = np.asarray(Image.fromarray(img, mode="F").resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(dernet.resize_to(x, 24)[0, 0].numpy(), pil, atol=1e-4)


@pytest.mark.parametrize("omega,message", [((0.5, 0.3, 0.3), "sum to 1"),
                                           ((0.5, 0.6, -0.1), "non-negative"),
                                           ((0.5, 0.5), "needs 3 weights"),
                                           ((float("nan"), 0.5, 0.5), "non-negative")])
def test_omega_constraint(omega, message):
    stubs = {name: ConstantLogit([0.0]) for name in MEMBERS}
    with pytest.raises(ValueError, match=message):
        DERNet(stubs, omega=omega)
    model = DERNet(stubs)
    with pytest.raises(ValueError, match=message):
        model.set_omega(omega)
    model.set_omega((0.2, 0.3, 0.5))
    assert model.omega.tolist() == pytest.approx([0.2, 0.3, 0.5])


# --- threshold and omega chosen on validation data

def test_youden_threshold_hand_made_roc():
    y = np.array([0, 0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9, 0.05])
    # 3 positives (0.9, 0.8, 0.35), 4 negatives (0.4, 0.3, 0.1, 0.05). Calling "s >= t" abnormal:
    #   t = 0.9 : TPR 1/3  FPR 0    J = 0.333
    #   t = 0.8 : TPR 2/3  FPR 0    J = 0.667
    #   t = 0.4 : TPR 2/3  FPR 1/4  J = 0.417
    #   t = 0.35: TPR 1    FPR 1/4  J = 0.750   <- maximum
    #   t = 0.3 : TPR 1    FPR 2/4  J = 0.500
    #   t = 0.1 : TPR 1    FPR 3/4  J = 0.250
    #   t = 0.05: TPR 1    FPR 1    J = 0
    # S > tau must make the same split: tau between 0.35 and the next lower score 0.3.
    tau = dernet.youden_threshold(y, s)
    assert tau == pytest.approx((0.35 + 0.3) / 2)
    assert ((s > tau) == np.array([0, 0, 1, 1, 1, 1, 0], bool)).all()


def test_youden_threshold_ties_prefer_sensitivity_and_edges():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9])
    # J = 2/3 both at t = 0.8 (TPR 2/3, FPR 0) and at t = 0.35 (TPR 1, FPR 1/3):
    # the lower threshold (higher sensitivity) wins.
    assert dernet.youden_threshold(y, s) == pytest.approx((0.35 + 0.3) / 2)
    # perfectly separated scores
    assert dernet.youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == pytest.approx(0.45)
    # inverted scores: J <= 0 everywhere; the tie between "nothing positive" (sklearn's inf threshold)
    # and "everything positive" goes to sensitivity, and tau stays finite
    y_bad, s_bad = np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.7, 0.9])
    tau = dernet.youden_threshold(y_bad, s_bad)
    assert np.isfinite(tau) and (s_bad > tau).all()
    with pytest.raises(ValueError, match="both normal and abnormal"):
        dernet.youden_threshold([1, 1], [0.2, 0.3])


def test_fit_omega_recovers_the_informative_member():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    informative = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.15, 400), 0, 1)   # AUROC ~ 1
    noise = rng.uniform(0, 1, (400, 2))                                                   # AUROC ~ 0.5
    probs = np.column_stack([noise[:, 0], informative, noise[:, 1]])
    omega = dernet.fit_omega(y, probs, step=0.05)
    assert omega.sum() == pytest.approx(1.0)
    assert np.argmax(omega) == 1 and omega[1] >= 0.8
    assert roc_auc_score(y, probs @ omega) >= roc_auc_score(y, probs @ np.array(OMEGA))


def test_fit_omega_ties_go_to_paper_omega():
    y = np.array([0, 0, 1, 1])
    same = np.array([0.1, 0.2, 0.8, 0.9])
    probs = np.column_stack([same, same, same])   # every weighting ranks identically
    np.testing.assert_allclose(dernet.fit_omega(y, probs, step=0.02), OMEGA)
    with pytest.raises(ValueError, match="step must divide 1"):
        dernet.fit_omega(y, probs, step=0.03)


# --- config, builder and checkpoint

def test_build_save_load_round_trip(tmp_path, capsys):
    cfg = dernet.DERNetConfig(omega=(0.5, 0.3, 0.2), tau=0.37, image_size=48, image_sizes={"resnet50": 32})
    model = dernet.build_dernet(cfg).eval()
    assert capsys.readouterr().err.count("randomly initialised") == 3      # one line per member
    assert list(model.members) == list(MEMBERS)
    assert model.image_sizes == {"densenet121": 48, "efficientnet_v2_s": 48, "resnet50": 32}
    path = tmp_path / "dernet.pt"
    dernet.save_dernet(model, path)
    loaded = dernet.load_dernet(path)          # torch.load(..., weights_only=True)
    assert capsys.readouterr().err == ""       # weights come from the checkpoint: no notice
    assert loaded.checkpoint_meta() == model.checkpoint_meta() == {
        "format": dernet.CHECKPOINT_FORMAT, "members": list(MEMBERS), "omega": pytest.approx([0.5, 0.3, 0.2]),
        "tau": 0.37, "image_sizes": model.image_sizes,
        "preprocess": {"clahe_clip_limit": 2.0, "clahe_tile_grid": 8, "clahe_side": 640}}
    assert not list(tmp_path.glob("*.tmp"))
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="not a DERNet checkpoint"):
        DERNet.from_checkpoint({"state_dict": {}})
