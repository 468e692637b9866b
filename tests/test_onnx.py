"""ONNX export (condinst_d2.export, tools/export_onnx.py) and its torch-free runtime
(condinst_onnx): the same detections as PyTorch on real photos through one exported file, 0 and
100 detections, the semantic branch left out, clear errors.

Parity bar (ONNX Runtime vs PyTorch on the same resized input): same count and classes, boxes
within 0.01 px, scores within 1e-4, every mask's IoU >= 0.99.
"""

import contextlib
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from onnx import TensorProto, helper

from condinst_d2.checkpoint import CondInstCheckpointer
from condinst_d2.export import METADATA_MARKER, OnnxExportError, config_metadata, export_onnx
from condinst_d2.export.compare import detection_differences
from condinst_onnx import CondInstOnnx, NotCondInstOnnxError, resized_size

from helpers import FIXTURES, ROOT, SHARED, condinst_cfg, require_fixtures

COCO_IMAGES = SHARED / "datasets" / "coco_val2017_subset" / "val2017"
# Five photos of different sizes and orientations: 426x640, 640x424, 480x640, 424x640, 500x333.
PHOTOS = ["000000000139", "000000000802", "000000005001", "000000010764", "000000011813"]


def _photos():
    paths = [COCO_IMAGES / f"{name}.jpg" for name in PHOTOS]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"the COCO val2017 subset is not at {COCO_IMAGES}")
    return [cv2.imread(str(p)) for p in paths]


def _model(case: str, **overrides):
    case_dir = require_fixtures() / case
    cfg = condinst_cfg(case_dir / "config_condinst.yaml", **overrides)
    model = build_model(cfg).eval()
    CondInstCheckpointer(model).load(str(case_dir / "model.pth"))
    return cfg, model


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export_tool():
    return _load_tool("export_onnx")


@pytest.fixture
def logs(caplog):
    """caplog, also fed by the exporter's and the demo's loggers (Detectron2's setup_logger
    stops them from propagating)."""
    with contextlib.ExitStack() as stack:
        for name in ("condinst_d2", "demo"):
            logging.getLogger(name).addHandler(caplog.handler)
            stack.callback(logging.getLogger(name).removeHandler, caplog.handler)
        yield caplog


def _tool_args(output, *opts, case: str = "tiny_base"):
    case_dir = FIXTURES / case
    return [
        "--config-file",
        str(case_dir / "config_condinst.yaml"),
        "--output",
        str(output),
        "MODEL.WEIGHTS",
        str(case_dir / "model.pth"),
        *map(str, opts),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, export_tool):
    """(PyTorch model, ONNX file written by tools/export_onnx.py) of tiny_base, with COCO's
    class names; a test size below the default 800 keeps the tests quick (the photos still pad
    differently)."""
    require_fixtures()
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    opts = ["INPUT.MIN_SIZE_TEST", 512, "INPUT.MAX_SIZE_TEST", 853]
    opts += ["DATASETS.TEST", "('coco_2017_val',)"]
    assert export_tool.main(_tool_args(path, *opts)) == 0
    return _model("tiny_base", **dict(zip(opts[::2], opts[1::2])))[1], path


def _export(tmp_path_factory, case: str, **overrides):
    """(PyTorch model, path of its ONNX export) of a reference fixture, through the library."""
    cfg, model = _model(case, **overrides)
    sample = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    path = tmp_path_factory.mktemp(case) / "model.onnx"
    path.write_bytes(export_onnx(model, sample, config_metadata(cfg, [])).SerializeToString())
    return model, path


def _torch_detections(model, image_chw: np.ndarray, height: int, width: int):
    inputs = [{"image": torch.as_tensor(image_chw).float(), "height": height, "width": width}]
    with torch.no_grad():
        return model(inputs)[0]["instances"]


def _assert_parity(differences: dict, what: str) -> None:
    assert differences["count"] == differences["count_torch"], (what, differences)
    assert differences["classes_equal"], (what, differences)
    assert differences["max_box_diff"] <= 1e-2, (what, differences)
    assert differences["max_score_diff"] <= 1e-4, (what, differences)
    assert differences["min_mask_iou"] >= 0.99, (what, differences)


def test_photos_of_different_sizes_match_pytorch(tiny):
    """One file, five photos resized to the test size (512 short side): the padded sizes differ."""
    model, path = tiny
    runtime = CondInstOnnx(str(path))
    paddings, counts, agreements = set(), [], []
    for name, image in zip(PHOTOS, _photos()):
        image_chw = runtime.model_input(image)
        h, w = image_chw.shape[1:]
        paddings.add((-h % 32, -w % 32))
        ours = runtime(image)
        assert ours.masks.shape == (len(ours.scores), *image.shape[:2])
        assert ours.masks.dtype == bool and ours.classes.dtype == np.int64
        differences = detection_differences(
            ours, _torch_detections(model, image_chw, *image.shape[:2])
        )
        _assert_parity(differences, name)
        counts.append(differences["count"])
        agreements.append(differences["mask_agreement"])
    assert len(paddings) >= 2, paddings
    assert sum(c > 0 for c in counts) >= 4, counts  # real detections, not empty outputs
    print(f"detections {counts}, mean mask pixel agreement {np.mean(agreements):.7f}")


def test_without_the_memory_arena_the_detections_are_the_same(tiny):
    _, path = tiny
    image = _photos()[0]
    default, without = (
        CondInstOnnx(str(path), memory_arena=arena)(image) for arena in (True, False)
    )
    assert len(default.scores) > 0
    for a, b in zip(default, without):
        np.testing.assert_array_equal(a, b)


def test_no_detection_gives_empty_outputs(tiny):
    """A photo that the tiny model, fed it at its own size (480x640), finds nothing in."""
    model, path = tiny
    runtime = CondInstOnnx(str(path))
    image_chw = np.ascontiguousarray(_photos()[2].transpose(2, 0, 1))
    reference = _torch_detections(model, image_chw, 300, 400)
    assert len(reference) == 0, "the tiny model should detect nothing in this photo"
    ours = runtime.run(image_chw, (300, 400))
    assert ours.boxes.shape == (0, 4) and ours.scores.shape == (0,)
    assert ours.classes.shape == (0,) and ours.masks.shape == (0, 300, 400)


def test_100_detections_and_no_semantic_branch(tmp_path_factory):
    """tiny_sem (trained with the semantic loss) at threshold 0: POST_NMS_TOPK_TEST detections;
    its semantic head (a 1x1 conv to the 80 classes) is not in the graph."""
    model, path = _export(
        tmp_path_factory,
        "tiny_sem",
        **{"MODEL.FCOS.INFERENCE_TH_TEST": 0.0, "INPUT.MIN_SIZE_TEST": 320},
    )
    assert model.mask_branch.semantic_loss_on
    weights = {x.name: tuple(x.dims) for x in onnx.load(str(path)).graph.initializer}
    assert not [
        n for n, dims in weights.items() if len(dims) == 4 and dims[0] == 80 and dims[2:] == (1, 1)
    ]
    assert [
        n for n, dims in weights.items() if len(dims) == 4 and dims[0] == 80 and dims[2:] == (3, 3)
    ]
    runtime = CondInstOnnx(str(path))
    image = _photos()[0]
    differences = detection_differences(
        runtime(image), _torch_detections(model, runtime.model_input(image), *image.shape[:2])
    )
    assert differences["count"] == 100
    _assert_parity(differences, "tiny_sem, 100 detections")


def test_runtime_needs_no_torch(tiny, tmp_path):
    """condinst_onnx imported and run in a process where torch and detectron2 cannot import."""
    _, path = tiny
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8))
    script = f"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "detectron2", "condinst_d2"):
            raise ImportError(f"{{name}} is blocked")
sys.meta_path.insert(0, Block())
import cv2
from condinst_onnx import CondInstOnnx
det = CondInstOnnx({str(path)!r})(cv2.imread({str(image)!r}))
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "detectron2")]
print(json.dumps([len(det.scores), list(det.masks.shape)]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    count, mask_shape = json.loads(result.stdout.strip().splitlines()[-1])
    assert mask_shape == [count, 200, 300]


def test_metadata_and_test_size(tiny):
    _, path = tiny
    runtime = CondInstOnnx(str(path))
    assert (runtime.min_size, runtime.max_size, runtime.input_format) == (512, 853, "BGR")
    assert len(runtime.class_names) == 80 and runtime.class_names[0] == "person"
    for h, w in [(426, 640), (640, 424), (500, 333), (100, 3000), (800, 800), (1, 1)]:
        expected = T.ResizeShortestEdge([800, 800], 1333).get_transform(np.zeros((h, w, 3)))
        assert resized_size(h, w, 800, 1333) == (expected.new_h, expected.new_w)


def test_export_takes_the_class_names_and_their_number_from_the_checkpoint(export_tool, tmp_path):
    """A checkpoint saved by training records its classes: the exported file carries them, and
    the config's NUM_CLASSES (80 here) follows the checkpoint's, without any override."""
    names = [f"thing_{i}" for i in range(80)]
    state = torch.load(FIXTURES / "tiny_base" / "model.pth", weights_only=False)["model"]
    weights = tmp_path / "trained.pth"
    torch.save({"model": state, "class_names": names}, weights)
    output = tmp_path / "model.onnx"
    args = _tool_args(output, "MODEL.WEIGHTS", weights, "MODEL.FCOS.NUM_CLASSES", 3)
    assert export_tool.main(args + ["INPUT.MIN_SIZE_TEST", "256"]) == 0
    assert CondInstOnnx(str(output)).class_names == names


def test_files_that_are_not_ours_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        CondInstOnnx(str(tmp_path / "missing.onnx"))
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(NotCondInstOnnxError, match="notes.onnx is not a readable ONNX model"):
        CondInstOnnx(str(text))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    with pytest.raises(
        NotCondInstOnnxError, match=f"other.onnx is an ONNX model but not one.*{METADATA_MARKER}"
    ):
        CondInstOnnx(str(other))


def test_mask_nms_is_refused():
    require_fixtures()
    cfg = condinst_cfg(
        ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml", **{"MODEL.CONDINST.MASK_NMS": True}
    )
    with pytest.raises(OnnxExportError, match="MASK_NMS does not export"):
        export_onnx(build_model(cfg).eval(), torch.zeros((3, 64, 64), dtype=torch.uint8), {})


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.CONDINST.MASK_NMS", True], "MODEL.CONDINST.MASK_NMS does not export to ONNX"),
        (
            ["MODEL.WEIGHTS", "/no/such/model.pth"],
            "MODEL.WEIGHTS file not found: /no/such/model.pth",
        ),
        (["MODEL.NO_SUCH_KEY", 1], "invalid config"),
    ],
)
def test_export_tool_errors(export_tool, tmp_path, logs, opts, message):
    output = tmp_path / "model.onnx"
    assert export_tool.main(_tool_args(output, *opts)) == 1
    assert message in logs.text
    assert "Traceback" not in logs.text
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_export_tool_exports_a_bf16_config_in_float32(export_tool, tmp_path, logs):
    output = tmp_path / "model.onnx"
    assert export_tool.main(_tool_args(output, "MODEL.CONDINST.BF16", True)) == 0
    assert "MODEL.CONDINST.BF16 does not export" in logs.text
    weights = onnx.load(str(output)).graph.initializer
    assert weights and all(w.data_type != onnx.TensorProto.BFLOAT16 for w in weights)


def test_export_tool_unwritable_output(export_tool, tmp_path, logs):
    output = tmp_path / "missing_folder" / "model.onnx"
    assert export_tool.main(_tool_args(output)) == 1
    assert f"cannot write --output {output}" in logs.text
    assert not output.parent.exists()


def test_demo_onnx_images_video_and_json(tiny, tmp_path, logs):
    """demo.py --onnx: a folder of photos and a video, drawn, with the PyTorch path's JSON."""
    sys.path.insert(0, str(ROOT / "demo"))
    import demo  # noqa: E402  (demo/demo.py; its own imports need demo/ on sys.path)

    _, path = tiny
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in list(zip(PHOTOS, _photos()))[:2]:
        cv2.imwrite(str(folder / f"{name}.jpg"), image)
    out, json_path = tmp_path / "out", tmp_path / "predictions.json"
    args = ["--onnx", str(path), "--input", str(folder), "--output", str(out)]
    assert demo.main([*args, "--json", str(json_path), "--confidence-threshold", "0.3"]) == 0
    records = json.loads(json_path.read_text())
    assert len(records) == 2
    runtime = CondInstOnnx(str(path))
    for record in records:
        image = cv2.imread(record["source"])
        expected = runtime(image)
        kept = expected.scores >= 0.3
        assert [x["category_id"] for x in record["instances"]] == expected.classes[kept].tolist()
        assert record["instances"][0]["category_name"] in runtime.class_names
        assert cv2.imread(str(out / Path(record["source"]).name)).shape == image.shape
    torch_json = tmp_path / "torch.json"
    torch_args = ["--config-file", str(FIXTURES / "tiny_base" / "config_condinst.yaml")]
    torch_args += ["--input", record["source"], "--output", str(tmp_path / "torch.png")]
    torch_args += ["--json", str(torch_json), "--confidence-threshold", "0.3", "--opts"]
    torch_args += ["MODEL.WEIGHTS", str(FIXTURES / "tiny_base" / "model.pth")]
    torch_args += ["INPUT.MIN_SIZE_TEST", "512", "DATASETS.TEST", "('coco_2017_val',)"]
    assert demo.main(torch_args) == 0
    torch_record = json.loads(torch_json.read_text())[0]
    assert set(torch_record) == set(record)
    assert set(torch_record["instances"][0]) == set(record["instances"][0])

    video = SHARED / "media" / "vtest.avi"
    if video.is_file():
        movie = tmp_path / "vtest.mp4"
        video_args = ["--onnx", str(path), "--video-input", str(video), "--max-frames", "2"]
        assert demo.main([*video_args, "--output", str(movie)]) == 0
        assert movie.stat().st_size > 1000
    assert demo.main(["--onnx", str(json_path), "--input", str(folder), "--output", str(out)]) == 1
    assert "is not a readable ONNX model" in logs.text


def test_the_mask_head_runs_in_the_scan_one_detection_at_a_time(tiny):
    """No (D, channels, h*w) mask-head activations at once: every matrix product of the dynamic
    mask head (one per layer) is in the Scan's body, none in the graph around it."""
    graph = onnx.load(str(tiny[1])).graph
    (if_node,) = [n for n in graph.node if n.op_type == "If" and n.output[0] == "masks"]
    branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    (scan,) = branch.node
    body = next(a.g for a in scan.attribute if a.name == "body")
    layers = tiny[0].mask_head.weight_nums
    assert [n.op_type for n in body.node].count("MatMul") == len(layers)
    assert "MatMul" not in [n.op_type for n in graph.node]
    assert [x.name for x in body.input] == [f"mask/{name}/one" for name in scan.input]
