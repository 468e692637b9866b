"""The generated quick-start dataset: deterministic, valid COCO, masks matching their metadata."""

import json

import numpy as np
from detectron2.structures import polygons_to_bitmask

from condinst_d2.data import SHAPE_CLASSES, render_scene, write_coco_split


def test_same_seed_same_dataset_other_seed_other(tmp_path):
    a = write_coco_split(str(tmp_path / "a"), "train", 3, (96, 128), seed=5)
    b = write_coco_split(str(tmp_path / "b"), "train", 3, (96, 128), seed=5)
    c = write_coco_split(str(tmp_path / "c"), "train", 3, (96, 128), seed=6)
    assert open(a).read() == open(b).read() != open(c).read()
    assert (tmp_path / "a/train/00001.jpg").read_bytes() == (
        tmp_path / "b/train/00001.jpg"
    ).read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_annotations_are_valid_coco_with_consistent_masks(tmp_path):
    path = write_coco_split(str(tmp_path), "val", 12, (128, 160), seed=3)
    data = json.loads(open(path).read())
    assert [c["name"] for c in data["categories"]] == SHAPE_CLASSES
    assert len(data["images"]) == 12 and len(data["annotations"]) >= 12
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    labels = {a["category_id"] for a in data["annotations"]}
    assert labels == {1, 2, 3, 4}  # every class appears
    for ann in data["annotations"]:
        mask = polygons_to_bitmask([np.asarray(p) for p in ann["segmentation"]], 128, 160)
        assert abs(mask.sum() - ann["area"]) <= 0.1 * ann["area"] + 20
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x - 1 and ys.min() >= y - 1 and xs.max() <= x + w and ys.max() <= y + h


def test_occluded_shapes_keep_only_their_visible_part():
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(20):
        image, anns = render_scene(rng, 128, 160)
        assert image.shape == (128, 160, 3) and image.dtype == np.uint8
        masks = [
            polygons_to_bitmask([np.asarray(p) for p in a["segmentation"]], 128, 160) for a in anns
        ]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                overlap = (masks[i] & masks[j]).sum()
                assert (
                    overlap <= 0.05 * min(masks[i].sum(), masks[j].sum()) + 30
                )  # contours touch at most
        sizes += [a["area"] for a in anns]
    assert min(sizes) < 300 and max(sizes) > 3000  # a range of sizes
