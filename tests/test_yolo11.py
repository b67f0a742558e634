"""Tests for yolo11.py: published parameter counts and FLOPs, shapes and strides, DFL and box decoding
by hand, Conv+BN fusion, NMS against torchvision, mask assembly, seg-from-det initialisation, and
(when ultralytics is importable, i.e. in the reference venv) numerical parity with the published model.

    python -m pytest tests/test_yolo11.py -q
"""

import copy
import math

import pytest
import torch
import torchvision

import yolo11
from yolo11 import (YOLO11, YOLO11Seg, Attention, DFL, bbox2dist, count_flops, count_params, dist2bbox,
                    make_anchors, non_max_suppression, process_masks, seg_from_det)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def build(cls=YOLO11, nc=7, scale="n", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return cls(nc=nc, scale=scale).to(dtype)


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine terms, so fusion and parity checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def randomize_class_bias(model, seed=0):
    """Spread the class logits so the sigmoid scores are not all ~1e-4 (the prior)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for cls in model.head.cls:
            cls[-1].bias.copy_(torch.randn(cls[-1].bias.shape, generator=g))
    return model


# ---------------------------------------------------------------------------
# published sizes (Ultralytics' yolo11.yaml / yolo11-seg.yaml model summaries)
# ---------------------------------------------------------------------------

PUBLISHED = [  # (segmentation?, scale, classes, parameters)
    (False, "n", 80, 2_624_080), (False, "s", 80, 9_458_752), (False, "m", 80, 20_114_688),
    (False, "l", 80, 25_372_160), (False, "x", 80, 56_966_176), (False, "l", 7, 25_315_877),
    (True, "n", 80, 2_876_848), (True, "s", 80, 10_113_248), (True, "m", 80, 22_420_896),
    (True, "l", 80, 27_678_368), (True, "x", 80, 62_142_656), (True, "l", 7, 27_622_085),
]


@pytest.mark.parametrize("seg,scale,nc,expected", PUBLISHED)
def test_parameter_counts_equal_published(seg, scale, nc, expected):
    with torch.device("meta"):  # shapes only: no initialisation cost, even for x
        model = (YOLO11Seg if seg else YOLO11)(nc=nc, scale=scale)
    assert count_params(model) == expected


def test_flops_l_within_2_percent_of_published():
    with torch.device("meta"):
        model = YOLO11(nc=80, scale="l")
    gflops = count_flops(model, 640)[""] / 1e9
    assert abs(gflops - 87.6) / 87.6 < 0.02


def test_default_is_l_with_7_classes():
    with torch.device("meta"):
        model = YOLO11()
    assert (model.scale, model.nc, model.reg_max) == ("l", 7, 16)
    assert model.cfg.strides == (8, 16, 32) and model.stride.shape == (3,)


def test_bias_initialisation_formula():
    model = build(nc=7)
    for s, box, cls in zip((8, 16, 32), model.head.box, model.head.cls):
        assert torch.all(box[-1].bias == 1.0)
        assert torch.allclose(cls[-1].bias, torch.full((7,), math.log(5 / 7 / (640 / s) ** 2)))


# ---------------------------------------------------------------------------
# shapes, strides, anchors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,W", [(2, 64, 64), (1, 96, 128), (1, 128, 64), (1, 640, 640)])
def test_train_and_eval_shapes_and_strides(B, H, W):
    model = build(nc=7)
    x = torch.rand(B, 3, H, W)
    with torch.no_grad():  # shapes only; the training path is the same with gradients
        maps = model.train()(x)
        out = model.eval()(x)
    assert len(maps) == 3
    for m, s in zip(maps, model.stride.tolist()):
        assert m.shape == (B, 4 * 16 + 7, H // s, W // s)
        assert (H / m.shape[2], W / m.shape[3]) == (s, s)
    A = sum((H // s) * (W // s) for s in (8, 16, 32))
    assert out.shape == (B, 4 + 7, A)
    assert torch.all((out[:, 4:] >= 0) & (out[:, 4:] <= 1))  # sigmoid scores
    assert torch.all(out[:, 2:4] >= 0)  # widths and heights


def test_l_forward_at_640():
    model = build(scale="l", nc=7).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 640, 640))
    assert out.shape == (1, 11, 8400)  # 80*80 + 40*40 + 20*20 = 8,400 anchor points at 640
    assert torch.isfinite(out).all()


def test_make_anchors_by_hand():
    feats = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 1)]
    points, strides = make_anchors(feats, [8, 16])
    expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]]
    assert points.tolist() == expected
    assert strides.flatten().tolist() == [8] * 6 + [16]


def test_anchors_cached_per_shape_and_recomputed_on_change():
    model = build().eval()
    head = model.head
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
        first = head._anchors
        model(torch.rand(1, 3, 64, 64))
        assert head._anchors is first  # same shape: cached
        out = model(torch.rand(1, 3, 128, 96))
    assert head._anchors is not first and head._anchors.shape == (2, 16 * 12 + 8 * 6 + 4 * 3)
    assert out.shape[-1] == head._anchors.shape[1]


def test_bad_input_size_and_scale_give_clear_errors():
    model = build()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 64))
    with pytest.raises(ValueError, match="unknown YOLO11 scale"):
        YOLO11(scale="q")


# ---------------------------------------------------------------------------
# DFL and box decoding by hand
# ---------------------------------------------------------------------------


def test_dfl_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4 * 16, 5)  # (B, 4*reg_max, A)
    got = DFL(16)(logits)
    assert got.shape == (2, 4, 5)
    for b in range(2):
        for side in range(4):
            for a in range(5):
                z = [logits[b, side * 16 + k, a].item() for k in range(16)]
                e = [math.exp(v - max(z)) for v in z]
                want = sum(k * ek for k, ek in enumerate(e)) / sum(e)
                assert got[b, side, a].item() == pytest.approx(want, abs=1e-5)
    one_hot = torch.full((1, 64, 1), -50.0)
    for side, k in enumerate((0, 3, 9, 15)):
        one_hot[0, side * 16 + k, 0] = 50.0
    assert DFL(16)(one_hot).flatten().tolist() == pytest.approx([0, 3, 9, 15], abs=1e-6)


def test_eval_layout_decodes_boxes_in_input_pixels():
    """A hand-set DFL distribution at one anchor of each level -> known (cx, cy, w, h) in pixels."""
    model = build(nc=3).eval()
    H = W = 64
    maps = [torch.full((1, 64 + 3, H // s, W // s), -50.0) for s in (8, 16, 32)]
    ltrb = (1, 2, 3, 4)  # distances in stride units
    cells = [(2, 5), (1, 0), (1, 1)]  # (row, col) per level
    for m, (r, c) in zip(maps, cells):
        for side, k in enumerate(ltrb):
            m[0, side * 16 + k, r, c] = 50.0
        m[0, 64 + 1, r, c] = 0.0  # class 1 logit 0 -> score 0.5
    out = model.head.decode(maps)  # (1, 4 + nc, A)
    offset = 0
    for m, (r, c), s in zip(maps, cells, (8, 16, 32)):
        a = offset + r * m.shape[3] + c
        ax, ay = c + 0.5, r + 0.5
        x1, y1, x2, y2 = (ax - 1) * s, (ay - 2) * s, (ax + 3) * s, (ay + 4) * s
        want = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.0, 0.5, 0.0]
        assert out[0, :, a].tolist() == pytest.approx(want, abs=1e-4)
        offset += m.shape[2] * m.shape[3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_is_fp32_under_reduced_precision_autocast(dtype):
    """Maps from a bf16/fp16 forward decode in fp32: boxes off the 2-4 px grid such maps would give."""
    torch.manual_seed(0)
    model = build(nc=3).eval()
    maps = [8 * torch.randn(1, 64 + 3, 640 // s, 640 // s).to(dtype) for s in (8, 16, 32)]
    with torch.autocast("cpu", dtype=dtype):
        out = model.head.decode(maps)
    want = model.head.decode([m.float() for m in maps])  # the same maps, no autocast
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=1e-4)
    x2 = out[0, 0] + out[0, 2] / 2  # right edges, input px
    assert (x2[x2 > 512] % 4).unique().numel() > 4  # not on the 4 px grid of bf16 in [512, 1024)


def test_bbox2dist_inverts_dist2bbox_and_clamps():
    anchors = torch.tensor([[4.5, 4.5], [2.5, 7.5]])
    dist = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 6.0, 14.0, 2.0]])
    boxes = dist2bbox(dist, anchors, xywh=False)
    assert torch.allclose(bbox2dist(anchors, boxes, 16), dist)
    far = torch.tensor([[-30.0, 0.0, 40.0, 9.0]])  # beyond the last bin on both x sides
    assert bbox2dist(anchors[:1], far, 16).tolist()[0] == pytest.approx([14.99, 4.5, 14.99, 4.5])
    xywh = dist2bbox(dist, anchors, xywh=True)
    assert torch.allclose(yolo11.cxcywh2xyxy(xywh), boxes)


def test_attention_is_eq3():
    """F.scaled_dot_product_attention path == the explicit softmax(QK^T / sqrt(d_k)) V of Eq. 3."""
    torch.manual_seed(0)
    attn = randomize_bn(Attention(128, num_heads=2)).eval()
    x = torch.randn(2, 128, 6, 5)
    B, C, H, W = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x).view(B, 2, 2 * attn.key_dim + attn.head_dim, H * W)
        q, k, v = qkv.split((attn.key_dim, attn.key_dim, attn.head_dim), 2)
        weights = (q.transpose(-2, -1) @ k / math.sqrt(attn.key_dim)).softmax(-1)  # (B, heads, N, N)
        heads = (v @ weights.transpose(-2, -1)).view(B, C, H, W)
        want = attn.proj(heads + attn.pe(v.reshape(B, C, H, W)))
        assert torch.allclose(attn(x), want, atol=1e-5)


# ---------------------------------------------------------------------------
# fusion and determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [YOLO11, YOLO11Seg])
def test_fuse_preserves_outputs(cls):
    """Float64 so the comparison isolates the algebra from float32 rounding (which is ~1e-6 relative)."""
    model = randomize_class_bias(randomize_bn(build(cls, dtype=torch.float64))).eval()
    x = torch.rand(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        after = model.fuse()(x)
    assert n_bn > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    if cls is YOLO11Seg:
        (before, pb), (after, pa) = before, after
        assert torch.allclose(pa, pb, rtol=0, atol=1e-9)
    assert torch.allclose(after, before, rtol=0, atol=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_inplace_silu_matches_out_of_place(fused):
    """Conv's SiLU works in place: the outputs, and in training the input and weight gradients, equal
    those of the same weights with an out-of-place SiLU (float64, so any difference is a real one)."""
    model = randomize_bn(build(dtype=torch.float64))
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, torch.nn.SiLU):
            m.inplace = False
    assert any(isinstance(m, torch.nn.SiLU) and m.inplace for m in model.modules())
    if fused:
        model, reference = model.eval().fuse(), reference.eval().fuse()
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    outs, ref_outs = model(x), reference(x_ref)
    loss = sum(o.square().mean() for o in outs)
    ref_loss = sum(o.square().mean() for o in ref_outs)
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    grads = [(name, p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), reference.parameters())
             if p.requires_grad]
    assert all(g is not None for _, g, _ in grads)
    for name, g, g_ref in grads:
        assert torch.allclose(g, g_ref, rtol=0, atol=1e-12), name


def test_fuse_float32_within_1e5_relative():
    model = randomize_bn(build()).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        after = model.fuse()(x)
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-4)  # atol: box coords reach ~64 px


def test_deterministic_init_and_forward():
    a, b = build(seed=3), build(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    a.eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
        assert torch.equal(a(x), b.eval()(x))


# ---------------------------------------------------------------------------
# non-maximum suppression
# ---------------------------------------------------------------------------


def pred_from(boxes_xyxy, scores):
    """(N, 4) xyxy boxes, (N, nc) scores -> eval layout (1, 4 + nc, N) with cxcywh boxes."""
    b = torch.as_tensor(boxes_xyxy, dtype=torch.float32)
    cxcywh = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1)
    return torch.cat((cxcywh, torch.as_tensor(scores, dtype=torch.float32)), 1).T[None]


def test_nms_class_aware_and_conf_filter():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
    scores = [[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.6, 0.0], [0.1, 0.2]]
    (det,) = non_max_suppression(pred_from(boxes, scores), conf_thres=0.25, iou_thres=0.5)
    assert det.shape == (3, 6)
    # box 1 (IoU 0.68 with box 0, same class) suppressed; box 2 overlaps box 0 fully but is class 1;
    # box 4 is below the confidence threshold
    assert det[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert det[:, 5].tolist() == [0, 1, 0]
    assert det[:, :4].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]


def test_nms_max_det_and_multi_label():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(6)]  # disjoint
    scores = [[0.9 - 0.1 * i, 0.5] for i in range(6)]
    (det,) = non_max_suppression(pred_from(boxes, scores), max_det=4)
    assert det.shape == (4, 6) and det[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    (multi,) = non_max_suppression(pred_from(boxes, scores), conf_thres=0.25, multi_label=True, max_det=100)
    assert multi.shape == (12, 6)  # every box carries both labels above 0.25
    (empty,) = non_max_suppression(pred_from(boxes, scores), conf_thres=0.95)
    assert empty.shape == (0, 6)


def test_nms_matches_torchvision_per_class_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    n, nc, nm = 300, 3, 4
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 2
    xyxy = torch.cat((xy, xy + wh), 1)
    scores = torch.rand(n, nc, generator=g)
    coeffs = torch.randn(n, nm, generator=g)
    pred = torch.cat((pred_from(xyxy, scores)[0], coeffs.T), 0)[None]
    (det,) = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.5, max_det=1000, nm=nm)
    best, cls = scores.max(1)
    keep = best > 0.3
    want = []
    for c in range(nc):
        idx = torch.nonzero(keep & (cls == c)).flatten()
        kept = idx[torchvision.ops.nms(xyxy[idx], best[idx], 0.5)]
        want += [(i, c) for i in kept.tolist()]
    assert det.shape == (len(want), 6 + nm)
    got = sorted(det[:, 4].tolist(), reverse=True)
    assert got == pytest.approx(sorted((best[i].item() for i, _ in want), reverse=True), abs=1e-6)
    assert det[:, 4].tolist() == sorted(det[:, 4].tolist(), reverse=True)
    rows = {round(s, 6): i for i, s in enumerate(best.tolist())}
    for row in det:  # each kept row carries its own box, class and coefficients
        i = rows[round(row[4].item(), 6)]
        assert torch.allclose(row[:4], xyxy[i], atol=1e-4) and row[5].item() == cls[i].item()
        assert torch.allclose(row[6:], coeffs[i])


# ---------------------------------------------------------------------------
# segmentation: shapes, mask assembly, initialisation from a detector
# ---------------------------------------------------------------------------


def test_seg_shapes_train_and_eval():
    model = build(YOLO11Seg, nc=7)
    x = torch.rand(2, 3, 96, 64)
    A = 12 * 8 + 6 * 4 + 3 * 2
    maps, coeffs, protos = model.train()(x)
    assert [m.shape for m in maps] == [(2, 71, 12, 8), (2, 71, 6, 4), (2, 71, 3, 2)]
    assert coeffs.shape == (2, 32, A) and protos.shape == (2, 32, 24, 16)
    with torch.no_grad():
        out, protos = model.eval()(x)
    assert out.shape == (2, 4 + 7 + 32, A) and protos.shape == (2, 32, 24, 16)


def test_every_trainable_parameter_gets_a_gradient():
    model = build(YOLO11Seg, nc=3).train()
    maps, coeffs, protos = model(torch.rand(2, 3, 64, 64))
    (sum(m.square().mean() for m in maps) + coeffs.square().mean() + protos.square().mean()).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["head.dfl.bins"]  # the fixed DFL bin values 0..15
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_process_masks_crops_to_box_and_thresholds():
    protos = torch.zeros(32, 16, 16)  # stride 4 for a 64 x 64 input
    protos[0] = 10.0  # prototype 0: "everything", prototype 1: "left half"
    protos[1, :, :8] = 10.0
    protos[1, :, 8:] = -10.0
    coeffs = torch.zeros(4, 32)
    coeffs[0, 0] = 1.0  # all-on mask, cropped by its box
    coeffs[1, 0] = -1.0  # all-off mask
    coeffs[2, 1] = 1.0  # left half only
    coeffs[3, 0] = 1.0
    boxes = torch.tensor([[8.0, 16.0, 24.0, 48.0], [0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 64.0, 64.0],
                          [10.5, 10.5, 20.2, 12.7]])
    masks = process_masks(protos, coeffs, boxes, (64, 64))
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.bool
    want0 = torch.zeros(64, 64, dtype=torch.bool)
    want0[16:48, 8:24] = True
    assert torch.equal(masks[0], want0)
    assert not masks[1].any()
    assert masks[2, :, :30].all() and not masks[2, :, 34:].any()  # boundary blurred by the upsampling
    assert masks[3].sum().item() == 10 * 2  # pixel indices x 11..20, y 11..12 inside the box
    assert process_masks(protos, coeffs[:0], boxes[:0], (64, 64)).shape == (0, 64, 64)


def test_seg_from_det_copies_every_shared_weight():
    det = randomize_class_bias(randomize_bn(build(YOLO11, nc=5)))
    seg = seg_from_det(det.state_dict(), nc=5, scale="n")
    missing = set(seg.state_dict()) - set(det.state_dict())
    assert missing and all(k.startswith(("head.proto.", "head.coef.")) for k in missing)
    assert set(det.state_dict()) <= set(seg.state_dict())
    for k, v in det.state_dict().items():
        assert torch.equal(seg.state_dict()[k], v)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        boxes_scores = det.eval()(x)
        out, _ = seg.eval()(x)
    assert torch.equal(out[:, :4 + 5], boxes_scores)  # the detection part is the detector
    with pytest.raises(ValueError, match="detection state_dict"):
        seg_from_det(det.state_dict(), nc=6, scale="n")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def test_cli_prints_stage_summary(capsys):
    yolo11.main(yolo11.get_args_parser().parse_args(["--scale", "n", "--nc", "80", "--imgsz", "320"]))
    out = capsys.readouterr().out
    assert "backbone.stage5" in out and "neck.bu5" in out and "head.cls" in out
    assert "2,624,080" in out.splitlines()[-1]
    with pytest.raises(SystemExit, match="multiple of 32"):
        yolo11.main(yolo11.get_args_parser().parse_args(["--imgsz", "100"]))


# ---------------------------------------------------------------------------
# parity with the published implementation (reference venv only)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seg", [False, True])
def test_parity_with_ultralytics(seg, monkeypatch):
    """Load the published model's weights (by order; shapes checked) and compare eval outputs."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    nc = 7
    torch.manual_seed(0)
    theirs = (tasks.SegmentationModel if seg else tasks.DetectionModel)(
        f"yolo11n{'-seg' if seg else ''}.yaml", nc=nc, verbose=False)
    randomize_bn(theirs)
    mine = build(YOLO11Seg if seg else YOLO11, nc=nc)
    src, dst = theirs.state_dict(), mine.state_dict()
    assert len(src) == len(dst)
    mapped = {}
    for (k, v), (_, u) in zip(dst.items(), src.items()):
        assert v.numel() == u.numel() and (v.shape == u.shape or k == "head.dfl.bins")
        mapped[k] = u.reshape(v.shape)
    mine.load_state_dict(mapped)
    randomize_class_bias(mine)
    with torch.no_grad():
        for m, c in zip(theirs.model[-1].cv3, mine.head.cls):
            m[-1].bias.copy_(c[-1].bias)
    theirs, mine = theirs.double().eval(), mine.double().eval()
    x = torch.rand(2, 3, 128, 96, dtype=torch.float64)
    with torch.no_grad():
        ref, got = theirs(x)[0], mine(x)
    if seg:
        (ref, ref_protos), (got, got_protos) = ref, got
        assert torch.allclose(got_protos, ref_protos, rtol=0, atol=1e-9)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=0, atol=1e-9)
