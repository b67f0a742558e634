"""Tests for bench.py: every sub-benchmark runs in its tiny --quick configuration and reports a markdown
table and its figures in JSON; the helpers (timing, marks, ONNX runner, synthetic targets); user mistakes
exit 2 with one line. No timed assertions: the speed targets live in bench.py."""
import json
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import bench
import infer
from data import load_split
from dernet import MEMBERS, DERNet, Member


def run_bench(capsys, tmp_path, *argv) -> tuple[int, str, str, dict | None]:
    """bench.main in this process with --quick, one thread (tiny models gain nothing from more, and a
    shared CPU loses much) and --json -> (exit status, stdout, stderr, JSON report). The thread count
    is restored afterwards."""
    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:
        rc = bench.main(bench.get_args_parser().parse_args([*argv, "--quick", "--threads", "1", "--json", str(out)]))
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err, json.loads(out.read_text()) if out.exists() else None


def table_rows(markdown: str) -> list[list[str]]:
    """Body rows of every markdown table in the text."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= {"-"} for c in r)]


# --- helpers


def test_time_calls_warms_up_then_times_each_run():
    calls = []
    t = bench.time_calls(lambda: calls.append(1), runs=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3
    assert min(t.times) <= t.median <= max(t.times)
    assert set(t.to_json()) == {"median_s", "min_s", "max_s", "runs"}


def test_mark():
    assert bench.mark(0.3, 0.4) == "pass"
    assert bench.mark(0.4, 0.4) == "pass"
    assert bench.mark(0.5, 0.4) == "MISS"
    assert bench.mark(0.5, 0.4, applies=False) == "-"
    assert bench.mark(None, 0.4) == "-" and bench.mark(0.5, None) == "-"


def test_synthetic_targets_are_boxes_inside_the_image():
    t = bench.synthetic_targets(batch=3, n=4, imgsz=64, nc=7, seed=0)
    assert t.shape == (12, 6)
    assert t[:, 0].tolist() == [i for i in range(3) for _ in range(4)]
    assert ((t[:, 1] >= 0) & (t[:, 1] < 7)).all()
    assert (t[:, 2:] >= 0).all() and (t[:, 2:] <= 64).all()
    assert (t[:, 4] > t[:, 2]).all() and (t[:, 5] > t[:, 3]).all()


def test_onnx_runner_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU()).eval()
    x = torch.rand(1, 3, 16, 16)
    run = bench.onnx_runner(model, x, tmp_path / "m.onnx", bench.BenchConfig(), torch.device("cpu"))
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(run()[0] - expected).max() < 1e-5


# --- sub-benchmarks, --quick


def test_machine(capsys, tmp_path):
    rc, out, _, report = run_bench(capsys, tmp_path, "machine")
    assert rc == 0 and "## machine" in out
    data = report["sections"]["machine"]
    assert data["torch_threads"] == 1  # --threads 1
    assert data["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and Path("/proc/cpuinfo").exists():
        assert re.fullmatch(r"\d+/\d+/\d+", data["cpu_family/model/stepping"])  # tells CPU generations apart
    cpu = [m for m in data["matmul"] if m["device"] == "cpu"]
    assert [m["dtype"] for m in cpu] == ["float32", "bfloat16"][: 1 + bench.bf16_native(torch.device("cpu"))]
    assert all(m["gflops"] > 0 and m["runs"] == bench.QUICK["runs"] for m in cpu)


def test_decode(capsys, tmp_path):
    rc, out, _, report = run_bench(capsys, tmp_path, "decode")
    assert rc == 0 and "## decode" in out
    rows = {r["what"]: r for r in report["sections"]["decode"]["rows"]}
    full = rows["full decode (load_image)"]["shape"]
    assert full == list(bench.QUICK["dicom_hw"])
    size = bench.QUICK["reduce_to"][0]
    reduced = rows[f"reduced decode (reduce_to={size}, 1 thread)"]["shape"]  # run_bench: --threads 1, one row
    assert size <= max(reduced) < max(full)  # a lower JPEG 2000 resolution level, never below the model size
    assert rows[f"ImageCache hit (fast decode, {size} px)"]["shape"] == rows[
        f"ImageCache miss (fast decode, {size} px, CLAHE, write)"]["shape"]


def test_members(capsys, tmp_path):
    rc, out, _, report = run_bench(capsys, tmp_path, "members")
    assert rc == 0 and "## members" in out
    rows = report["sections"]["members"]["rows"]
    assert [r["model"] for r in rows] == [*bench.MEMBERS, "DERNet (3 members, Eq. 2)"]
    assert all(r["size"] == bench.QUICK["member_sizes"][0] and r["fp32"]["median_s"] > 0 for r in rows)
    assert all((r["bf16"] is not None) == bench.bf16_native(torch.device("cpu")) for r in rows)


def test_yolo(capsys, tmp_path):
    rc, out, _, report = run_bench(capsys, tmp_path, "yolo", "--no-onnx")  # ONNX: test_onnx_runner_matches_torch
    assert rc == 0 and "## yolo" in out
    data = report["sections"]["yolo"]
    ours = [r for r in data["rows"] if r["impl"] == "ours"]
    precast = [f"{bench.REDUCED_NAMES[d]} fused channels-last, precast"
               for d in bench.reduced_dtypes(torch.device("cpu"))]
    assert [r["variant"] for r in ours] == [v[0] for v in bench.yolo_variants(torch.device("cpu"))] + precast
    assert all(r["gflops"] > 0 and r["mark"] == "-" for r in ours)  # --quick: no target applies
    published = [r for r in data["rows"] if r["impl"] == "published"]
    assert published  # timed, or a row saying why it was skipped
    assert data["gflops_per_forward"]["7"] > 0


def test_train_step(capsys, tmp_path):
    rc, out, _, report = run_bench(capsys, tmp_path, "train-step")
    assert rc == 0 and "## train-step" in out
    (row,) = report["sections"]["train-step"]["rows"]
    assert row["batch"] == bench.BenchConfig.train_batch and row["amp"] is False and row["images_per_s"] > 0


def test_infer(capsys, tmp_path):
    # --no-onnx: exporting the three members takes longer than this whole file may (ONNX: test_infer.py and
    # test_onnx_runner_matches_torch); fresh checkpoints, as without --cls-ckpt/--det-ckpt
    rc, out, _, report = run_bench(capsys, tmp_path, "infer", "--no-onnx")
    assert rc == 0 and "## infer" in out and "Under 1 s warm" in out
    data = report["sections"]["infer"]
    expected = [label for label, _ in bench.infer_settings(bench.BenchConfig(onnx=False))]
    assert [r["label"] for r in data["results"]] == expected
    for r in data["results"]:
        assert r["detector_always_ran"]  # cascade off
        assert set(bench.STAGES) <= set(r["warm_median"]) and r["warm_median"]["total"] > 0
        assert 0 < r["warm_median"]["triage"] <= r["warm_median"]["total"]   # decode + preprocess + dernet
        assert len(r["warm_runs"]) == bench.QUICK["runs"] and r["images_per_s"] > 0
    assert data["results"][0]["precision"] == "fp32"
    floor, fastest = data["floor"], min(data["results"], key=lambda r: r["warm_median"]["total"])
    assert floor["label"] == data["fastest"] == fastest["label"]
    assert floor["gflop"]["dernet"] > 0 and floor["gflop"]["detector"] > 0 and floor["matmul_gflop_s"] > 0
    assert floor["compute_s"] == pytest.approx(sum(floor["gflop"].values()) / floor["matmul_gflop_s"])
    m = fastest["warm_median"]
    assert floor["floor_s"] == pytest.approx(m["decode"] + m["preprocess"] + floor["compute_s"])
    assert "Compute floor" in out


def test_dernet_gflops_match_torchvision_published_ops():
    """Each member at its torchvision evaluation size: twice the multiply-adds torchvision publishes
    (weights meta "_ops", GMACs) within 1 % (our heads have 1 output instead of 1,000)."""
    sizes = {"densenet121": 224, "efficientnet_v2_s": 384, "resnet50": 224}
    published = {"densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
                 "efficientnet_v2_s": torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1,
                 "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1}
    torch.manual_seed(0)
    dernet = DERNet({name: Member(name) for name in MEMBERS}, image_sizes=sizes).eval()
    expected = 2 * sum(published[name].meta["_ops"] for name in MEMBERS)
    assert bench.dernet_gflops(dernet) == pytest.approx(expected, rel=0.01)


def test_guard(capsys, tmp_path, tiny_models, synthetic_root):
    # --no-onnx as in test_infer; the tiny untrained models: no target applies, but every figure is computed
    rc, out, _, report = run_bench(capsys, tmp_path, "guard", "--no-onnx", "--data", str(synthetic_root),
                                   "--cls-ckpt", str(tiny_models.cls_ckpt), "--det-ckpt", str(tiny_models.det_ckpt),
                                   "--plots", str(tmp_path))
    assert rc == 0 and "## guard" in out and "no target applies" in out
    data = report["sections"]["guard"]
    assert data["images"] == 8 and data["reference"] == "torch fp32, full decode"
    expected = [label for label, _ in bench.guard_settings(bench.BenchConfig(onnx=False))]
    assert [r["label"] for r in data["rows"]] == expected
    auto = infer.resolve_precision("auto", torch.device("cpu"), "torch")   # bf16 where native, else fp32
    assert [r["precision"] for r in data["rows"]] == ["fp32", "fp32", auto, auto]
    ref, *others = data["rows"]
    assert ref["max_abs_dS"] == 0 and ref["d_auroc"] == 0 and ref["d_map50"] == 0   # the reference against itself
    for row in others:
        assert 0 <= row["mean_abs_dS"] <= row["max_abs_dS"] < 1 and set(row["marks"].values()) == {"-"}
        assert row["worst_image"] in {r.image_id for r in load_split(synthetic_root, "test")}
        assert 0 <= row["worst_ref_S"] <= 1                               # the reference's S of that image
    header, *body = table_rows(out)   # the guard's table, then the reference's sensitivity table
    assert header[:2] == ["configuration", "max abs ΔS"] and header[8].startswith("most moved (S ref.; τ")
    assert body[len(data["rows"])] == header[:9]
    nudge = bench.BenchConfig.guard_nudge
    assert [r["label"] for r in data["sensitivity"]] == [bench.nudge_label(nudge), bench.nudge_label(-nudge)]
    for row in data["sensitivity"]:   # the reference on its own images made half a level brighter / darker
        assert 0 <= row["mean_abs_dS"] <= row["max_abs_dS"] < 1 and np.isfinite(row["d_map50"])
    assert "The reference's own sensitivity" in out and len(table_rows(out)) == 1 + len(data["rows"]) + 1 + 2
    assert data["plot"] == str(tmp_path / "guard.png") and (tmp_path / "guard.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_guard_precision_picks_the_reduced_rows(precision):
    args = bench.get_args_parser().parse_args(["guard", "--quick", "--guard-precision", precision])
    settings = bench.guard_settings(bench.config_from_args(args))
    assert [f["precision"] for _, f in settings] == ["fp32", "fp32", precision, precision, "fp32"]  # onnx last
    assert [label for label, _ in settings][2:4] == [f"torch {precision}, full decode", f"torch {precision}, fast decode"]


def test_guard_needs_trained_checkpoints(capsys, tmp_path):
    rc = bench.main(bench.get_args_parser().parse_args(["guard"]))
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "--cls-ckpt" in err


def test_guard_without_a_test_split_is_one_line_exit_2(capsys, tmp_path, tiny_models):
    rc, out, err, _ = run_bench(capsys, tmp_path, "guard", "--data", str(tmp_path / "nowhere"),
                                "--cls-ckpt", str(tiny_models.cls_ckpt), "--det-ckpt", str(tiny_models.det_ckpt))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "nowhere" in err and "--data" in err


def test_plots_into_a_missing_folder_is_one_line_exit_2(capsys, tmp_path):
    rc, out, err, _ = run_bench(capsys, tmp_path, "guard", "--plots", str(tmp_path / "nowhere"))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--plots" in err


def test_all_skips_the_guard_without_checkpoints():
    args = bench.get_args_parser().parse_args(["all"])
    assert "skipped" in bench.skipped("guard", args) and bench.skipped("infer", args) is None
    assert bench.skipped("guard", bench.get_args_parser().parse_args(["all", "--quick"])) is None


def test_app(capsys, tmp_path, tiny_models):
    rc, out, _, report = run_bench(capsys, tmp_path, "app", "--cls-ckpt", str(tiny_models.cls_ckpt),
                                   "--det-ckpt", str(tiny_models.det_ckpt))
    assert rc == 0 and "## app" in out
    data = report["sections"]["app"]
    assert data["alive"] and data["n5xx"] == 0 and data["no_response"] == 0 and data["internal_errors"] == 0
    assert data["unexpected"] == 0  # every kind got its expected status (200, 400, 404, 411, 415)
    assert data["requests"] > 0 and data["rss_mib"]["after"] > 0 and data["rss_growth_mib"] is not None
    assert {"200", "400", "404", "411", "415"} >= set(data["statuses"])


# --- user mistakes


def test_missing_checkpoint_is_one_line_exit_2(capsys, tmp_path):
    rc, out, err, report = run_bench(capsys, tmp_path, "infer", "--cls-ckpt", str(tmp_path / "nope.pt"))
    assert rc == 2 and report is None and out == ""
    assert err.count("\n") == 1 and "nope.pt" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_exit_2(capsys, tmp_path):
    rc, _, err, _ = run_bench(capsys, tmp_path, "machine", "--device", "cuda")
    assert rc == 2 and err.count("\n") == 1 and "CUDA" in err
