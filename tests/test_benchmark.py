"""tools/benchmark.py runs end to end and reports every measurement (at small sizes; the speed
itself is the benchmark's business, never asserted here)."""

import json
import subprocess
import sys

from helpers import ROOT


def test_benchmark_runs_and_reports_all_measurements(tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "benchmark.py"),
            "--repeats",
            "1",
            "--size",
            "128",
            "192",
            "--large-size",
            "160",
            "224",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=900,  # minutes on a shared 2-core machine
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (
        r["end_to_end"]["condinst"]["detections"]
        == r["end_to_end"]["mask_rcnn"]["detections"]
        == 100
    )
    assert set(r["mask_stage"]) == {"1", "10", "50", "100"}
    for section in (r["end_to_end"], r["peak_memory_mib"], r["slope_ms"]):
        assert set(section) == {"condinst", "mask_rcnn"}
    training = r["training"]["seconds"]
    assert set(training) == {"condinst", "condinst_bf16", "mask_rcnn", "mask_rcnn_random_rpn"}
    assert all(v > 0 for v in training.values())
    assert all(v > 0 for v in r["peak_memory_mib"].values())
    # An RPN that proposes as a trained one does gives Mask R-CNN's heads more foreground RoIs
    # than a random one, up to Detectron2's 128 per image.
    fg_rois = r["training"]["fg_rois_per_image"]
    assert 8 <= fg_rois["mask_rcnn_random_rpn"] < fg_rois["mask_rcnn"] <= 128
    assert "Mask R-CNN's RPN as trained" in result.stdout
    assert r["hardware"]["condinst_gflops"] > 1 and r["hardware"]["conv_gflops"] > 1
    assert "| inference 128x192 (100 vs 100 detections)" in result.stdout
    assert "CondInst / Mask R-CNN" in result.stdout
    assert plot.stat().st_size > 1000
    assert set(r["ablations"]["paste_100_masks"]) == {"restricted", "step_by_step"}
    assert all(v > 0 for v in r["ablations"]["conv3x3_256"].values())
    assert "CondInst speed-ups against what they replace" in result.stdout
    assert set(r["ablations"]["inference_options"]) == {"float32", "folded", "bf16"}
    assert r["hardware"]["conv_gflops_bf16"] > 0
    assert all(r["end_to_end"][m]["candidates"] >= 100 for m in ("condinst", "mask_rcnn"))
