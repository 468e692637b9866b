"""Hostile COCO JSONs: refused at start-up with a message naming the file, image and annotation,
before anything rasterises them; RLE masks switch INPUT.MASK_FORMAT to bitmask.

A polygon with a NaN, infinite or huge coordinate makes pycocotools allocate until the machine runs
out of memory, so every case that could reach it runs in a subprocess under a 6 GiB address-space
limit and a timeout.
"""

import json
import resource
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.structures import BitMasks

from condinst_d2.data import write_coco_split
from condinst_d2.engine import Trainer, build_cfg

from helpers import ROOT

SMALL = str(ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml")
_MEMORY_LIMIT = 6 * 2**30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """(JSON data, image folder) of 3 generated images of 96x128."""
    root = tmp_path_factory.mktemp("data")
    path = write_coco_split(str(root), "train", 3, (96, 128), seed=0)
    return json.loads(open(path).read()), str(root / "train")


def _write(tmp_path, data, name="bad.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))  # NaN / Infinity are written as JSON's NaN / Infinity
    return str(path)


def _with_polygon(data, polygon):
    data = json.loads(json.dumps(data))
    data["annotations"][0]["segmentation"] = [polygon]
    return data


_CHECK_SCRIPT = """
import json, sys
from condinst_d2.engine import build_cfg
messages = []
for split, path, images in json.loads(sys.argv[1]):
    try:
        build_cfg(sys.argv[2], [], **{split: (path, images)})
        messages.append("accepted")
    except ValueError as e:
        messages.append(str(e))
print(json.dumps(messages))
"""


def test_non_finite_or_far_polygon_coordinates_are_refused_under_a_memory_limit(split, tmp_path):
    data, images = split
    ann = data["annotations"][0]
    cases = []
    for i, bad in enumerate((float("nan"), float("inf"), 1e30)):
        path = _write(
            tmp_path, _with_polygon(data, [10.0, 10.0, bad, 10.0, 30.0, 40.0]), f"{i}.json"
        )
        cases += [("train_dataset", path, images), ("test_dataset", path, images)]
    result = subprocess.run(
        [sys.executable, "-c", _CHECK_SCRIPT, json.dumps(cases), SMALL],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    where = f"annotation {ann['id']} (image {ann['image_id']}, '00001.jpg')"
    for (_, path, _), message, kind in zip(
        cases, messages, ["nan"] * 2 + ["inf"] * 2 + ["far"] * 2
    ):
        assert path in message and where in message, message
        expected = (
            "farther than 10 image sizes" if kind == "far" else f"non-finite coordinate ({kind})"
        )
        assert expected in message, message


def test_train_net_reports_a_nan_polygon_in_one_line_under_a_memory_limit(split, tmp_path):
    data, images = split
    path = _write(tmp_path, _with_polygon(data, [10.0, 10.0, float("nan"), 10.0, 30.0, 40.0]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_net.py"), "--config-file", SMALL]
        + ["--train-dataset", path, images, "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and path in last and "non-finite coordinate (nan)" in last


def test_duplicate_image_ids_are_refused_naming_both_files(split, tmp_path):
    data, images = split
    data = json.loads(json.dumps(data))
    data["images"][1]["id"] = data["images"][0]["id"]
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"image id 1 is used by both '00001.jpg' and '00002.jpg'"):
        build_cfg(SMALL, [], train_dataset=(path, images))


def test_duplicate_category_ids_are_refused_naming_both(split, tmp_path):
    data, images = split
    data = json.loads(json.dumps(data))
    data["categories"][1]["id"] = data["categories"][0]["id"]
    names = data["categories"][0]["name"], data["categories"][1]["name"]
    path = _write(tmp_path, data)
    with pytest.raises(
        ValueError, match=rf"category id 1 is used twice \('{names[0]}' and '{names[1]}'\)"
    ):
        build_cfg(SMALL, [], train_dataset=(path, images))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["images"][0].pop("width"), r"image 1 \('00001.jpg'\): 'width' is None"),
        (lambda d: d["images"][0].update(height=0), r"'height' is 0, not a positive integer"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotation 1 \(image 1.*'bbox' is None"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"'bbox' is \[1, 2, 3\], not 4"),
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            "annotation id 1 is used twice",
        ),
        (
            lambda d: d["annotations"][0].update(
                segmentation=[["10", "10", "20", "10", "20", "20"]]
            ),
            r"annotation 1 .*polygon \['10', '10', .* is not a flat list of numbers",
        ),
        (lambda d: d.update(annotations=[]), "has no annotations: there is nothing to train on"),
    ],
)
def test_missing_sizes_boxes_and_duplicate_annotations_are_refused(split, tmp_path, edit, message):
    data, images = split
    data = json.loads(json.dumps(data))
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message):
        build_cfg(SMALL, [], train_dataset=(path, images))


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([[10, 10, 15, 15]], "polygon of 4 coordinates"),
        ([], "'segmentation' is '\\[\\]'"),
        (None, "no numeric 'area'"),
    ],
)
def test_test_set_annotations_cocoeval_cannot_read_are_refused(
    split, tmp_path, segmentation, message
):
    """Training skips them (test_reliability); COCOeval would crash on them after inference."""
    data, images = split
    data = json.loads(json.dumps(data))
    if segmentation is None:
        del data["annotations"][0]["area"]
    else:
        data["annotations"][0]["segmentation"] = segmentation
    path = _write(tmp_path, data)
    build_cfg(SMALL, [], train_dataset=(path, images))  # accepted for training
    with pytest.raises(ValueError, match=rf"{path}.*annotation 1 .*{message}"):
        build_cfg(SMALL, [], train_dataset=(path, images), test_dataset=(path, images))


def test_box_only_test_set_is_evaluated_on_boxes(split, tmp_path):
    """No annotation has a mask: a box-only set (BoxInst's), registered for bbox evaluation; one
    annotation without a mask among masked ones is still refused above."""
    data, images = split
    data = json.loads(json.dumps(data))
    for ann in data["annotations"]:
        del ann["segmentation"]
    path = _write(tmp_path, data, "boxes_only.json")
    cfg = build_cfg(SMALL, [], test_dataset=(path, images))
    evaluator = Trainer.build_evaluator(cfg, cfg.DATASETS.TEST[0], str(tmp_path / "eval"))
    assert evaluator._tasks == ("bbox",)


def test_rle_masks_switch_to_bitmask_and_train(split, tmp_path):
    data, images = split
    data = json.loads(json.dumps(data))
    ann = data["annotations"][0]
    x, y, w, h = (int(v) for v in ann["bbox"])
    mask = np.zeros((96, 128), dtype=np.uint8, order="F")
    mask[y : y + h, x : x + w] = 1
    rle = mask_util.encode(mask)
    ann["segmentation"] = {"size": [96, 128], "counts": rle["counts"].decode()}
    path = _write(tmp_path, data)
    cfg = build_cfg(SMALL, ["INPUT.MIN_SIZE_TRAIN", "(96,)"], train_dataset=(path, images))
    assert cfg.INPUT.MASK_FORMAT == "bitmask"
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert all(isinstance(x["instances"].gt_masks, BitMasks) for x in batch)


def test_rle_of_another_size_is_refused(split, tmp_path):
    data, images = split
    data = json.loads(json.dumps(data))
    data["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": "PPY1"}
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"annotation 1 .*\[96, 128\], got size \[10, 10\]"):
        build_cfg(SMALL, [], train_dataset=(path, images))


def test_annotations_of_images_not_in_the_file_are_reported(split, tmp_path, caplog):
    data, images = split
    data = json.loads(json.dumps(data))
    data["annotations"][0]["image_id"] = 99
    path = _write(tmp_path, data)
    with caplog.at_level("WARNING", logger="condinst_d2.data.coco_checks"):
        build_cfg(SMALL, [], train_dataset=(path, images))
    assert f"{path}: 1 annotations (ids [1]) belong to no image of the file" in caplog.text


def test_the_first_bad_polygon_is_the_one_named(split, tmp_path):
    data, images = split
    data = json.loads(json.dumps(data))
    last = data["annotations"][-1]
    last["segmentation"] = last["segmentation"] + [[0, 0, 5000, 0, 5000, 10]]
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"annotation {last['id']} .*x in \[0, 5000\]"):
        build_cfg(SMALL, [], train_dataset=(path, images))
