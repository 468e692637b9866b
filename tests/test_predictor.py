"""From a trained model to predictions: the quick-start's run describes itself (config.yaml and
checkpoint carry the class names), the README's Python example runs as written, the demo draws
the right names from either config, and tools/plot_metrics.py plots the run.

One quick-start run (2 iterations on 6 generated images) is shared by the tests of this file.
"""

import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from condinst_d2 import Predictor, get_class_names, get_condinst_cfg, inference_config
from condinst_d2.data import SHAPE_CLASSES

from helpers import ROOT

QUICKSTART_CONFIG = ROOT / "configs" / "CondInst" / "QuickStart_Shapes_CPU.yaml"


def _run(script, *args, cwd=ROOT, timeout=600):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    return result, result.stdout + result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding output/quickstart as the README's commands expect it, from a real
    quick-start run (every candidate kept, so that an untrained model has detections)."""
    root = tmp_path_factory.mktemp("project")
    args = ["--output", root / "output" / "quickstart", "--num-train", 4, "--num-test", 2]
    args += ["--num-drawn", 1, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2]
    args += ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", 128]
    args += ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0]
    result, log = _run("tools/quickstart.py", *args)
    assert result.returncode == 0, log[-3000:]
    return root, log


def test_quickstart_run_is_complete_and_its_log_short(workdir):
    root, log = workdir
    out = root / "output" / "quickstart"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"bbox", "segm"} and "AP" in results["segm"]
    model_dir = out / "model"
    for name in ("model_final.pth", "config.yaml", "log.txt", "metrics.json"):
        assert (model_dir / name).is_file(), name
    assert list(model_dir.glob("events.out.tfevents.*")), "TensorBoard events"
    assert f"tensorboard --logdir {model_dir}" in log
    # Short names: results under inference/<prefix>_<JSON stem>.
    assert (model_dir / "inference" / "test_test" / "coco_instances_results.json").is_file()
    drawn = sorted(out.glob("prediction_*.png"))
    assert len(drawn) == 1 and drawn[0].stat().st_size > 1000
    assert "Quick start done: held-out segm AP" in log
    # No model dump on the console (it stays in log.txt), no third-party deprecation warnings.
    assert "Model:\nCondInst(" in (model_dir / "log.txt").read_text()
    assert "CondInst(" not in log and "Warning" not in log, log[:3000]


def test_the_run_records_its_class_names(workdir):
    model_dir = workdir[0] / "output" / "quickstart" / "model"
    cfg = get_condinst_cfg(str(model_dir / "config.yaml"))
    assert list(cfg.MODEL.FCOS.CLASS_NAMES) == list(SHAPE_CLASSES)
    assert cfg.MODEL.FCOS.NUM_CLASSES == len(SHAPE_CLASSES)
    checkpoint = torch.load(model_dir / "model_final.pth", weights_only=False)
    assert checkpoint["class_names"] == list(SHAPE_CLASSES)
    # The quick-start's YAML names no class: the checkpoint brings its classes and their number.
    yaml_cfg = get_condinst_cfg(
        str(QUICKSTART_CONFIG), ["MODEL.WEIGHTS", str(model_dir / "model_final.pth")]
    )
    assert yaml_cfg.MODEL.FCOS.NUM_CLASSES == 80 and get_class_names(yaml_cfg) == list(
        SHAPE_CLASSES
    )
    assert inference_config(yaml_cfg).MODEL.FCOS.NUM_CLASSES == len(SHAPE_CLASSES)
    renamed = cfg.clone()
    renamed.MODEL.FCOS.CLASS_NAMES = ["a", "b", "c", "d"]
    renamed.MODEL.WEIGHTS = str(model_dir / "model_final.pth")
    with pytest.raises(ValueError, match=r"trained on the classes \[circle, square"):
        inference_config(renamed)


def readme_python_example() -> str:
    """The first Python block of the README's "Using it" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_written(workdir, monkeypatch):
    root, _ = workdir
    monkeypatch.chdir(root)
    namespace = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    prediction = namespace["prediction"]
    instances = prediction.instances
    assert len(instances) > 0, "every candidate is kept: there are detections"
    assert prediction.labels == [SHAPE_CLASSES[c] for c in instances.pred_classes.tolist()]
    image = cv2.imread("output/quickstart/shapes/test/00001.jpg")
    assert instances.image_size == image.shape[:2]
    assert instances.pred_masks.dtype == torch.bool
    assert instances.pred_masks.shape[1:] == image.shape[:2]


def test_predictor_inputs_paths_arrays_and_batches_alike(workdir):
    model_dir = workdir[0] / "output" / "quickstart" / "model"
    image_path = workdir[0] / "output" / "quickstart" / "shapes" / "test" / "00001.jpg"
    predictor = Predictor.from_output_dir(str(model_dir))
    assert predictor.class_names == list(SHAPE_CLASSES)
    assert predictor.metadata.thing_classes == list(SHAPE_CLASSES)
    from_path = predictor.predict(image_path)
    from_array = predictor.predict(cv2.imread(str(image_path)))
    image = cv2.imread(str(image_path))
    batch = predictor.predict_batch([image_path, image])
    for other in (from_array, *batch):
        torch.testing.assert_close(other.instances.scores, from_path.instances.scores)
        assert other.labels == from_path.labels
    # Any size: the outputs are at the input's size. (In a batch, images are padded to the
    # largest, which changes GroupNorm's statistics: compare batches of equal sizes only.)
    cropped = predictor.predict(np.ascontiguousarray(image[:96]))
    assert cropped.instances.image_size == (96, image.shape[1])
    # DefaultPredictor's call: a BGR array in, {"instances"} out, on the model's device.
    assert len(predictor(cv2.imread(str(image_path)))["instances"]) == len(from_path.instances)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) BGR image"):
        predictor.predict(np.zeros((10, 10), np.uint8))


def test_predictor_errors_name_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        Predictor.from_output_dir(str(tmp_path))
    with pytest.raises(ValueError, match="ImageNet backbone.*not a trained CondInst model"):
        Predictor.from_config(str(QUICKSTART_CONFIG))  # MODEL.WEIGHTS: efficientnet-lite0://


@pytest.mark.parametrize("config", ["run", "yaml"])
def test_demo_draws_the_models_class_names(workdir, tmp_path, config):
    """With the run's config.yaml, and with the quick-start YAML plus the run's weights."""
    model_dir = workdir[0] / "output" / "quickstart" / "model"
    config_file = model_dir / "config.yaml" if config == "run" else QUICKSTART_CONFIG
    image = workdir[0] / "output" / "quickstart" / "shapes" / "test" / "00001.jpg"
    json_path = tmp_path / "predictions.json"
    args = ["--config-file", config_file, "--input", image, "--output", tmp_path / "drawn"]
    args += ["--json", json_path, "--confidence-threshold", 0.0]
    result, log = _run(
        "demo/demo.py", *args, "--opts", "MODEL.WEIGHTS", model_dir / "model_final.pth"
    )
    assert result.returncode == 0, log[-3000:]
    instances = json.loads(json_path.read_text())[0]["instances"]
    assert instances and all(
        item["category_name"] == SHAPE_CLASSES[item["category_id"]] for item in instances
    )
    assert "Skip loading parameter" not in log


def test_demo_leaves_no_empty_output_folder_when_it_fails(workdir, tmp_path):
    out = tmp_path / "new" / "drawn"
    image = workdir[0] / "output" / "quickstart" / "shapes" / "test" / "00001.jpg"
    args = ["--config-file", QUICKSTART_CONFIG, "--input", image, "--output", out]
    result, log = _run("demo/demo.py", *args, "--opts", "MODEL.WEIGHTS", tmp_path / "missing.pth")
    assert result.returncode == 1 and "missing.pth" in log
    assert os.listdir(tmp_path) == []


def test_plot_metrics_draws_losses_and_aps(workdir, tmp_path):
    model_dir = workdir[0] / "output" / "quickstart" / "model"
    output = tmp_path / "curves.png"
    result, log = _run("tools/plot_metrics.py", model_dir, "--output", output)
    assert result.returncode == 0, log
    png = cv2.imread(str(output))
    assert png.shape == (450, 1200, 3) and (png < 128).any(), "a drawn figure"
    result, log = _run("tools/plot_metrics.py", tmp_path)
    assert result.returncode == 1 and "metrics.json" in log and "Traceback" not in log
