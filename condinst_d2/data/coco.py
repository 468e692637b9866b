"""Registering a COCO-format instance segmentation dataset given on the command line."""

import json
import os
import re
from typing import Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .coco_checks import check_coco_json, has_rle_masks

__all__ = ["register_coco_dataset", "check_training_masks", "drop_masks"]


def drop_masks(data: dict) -> int:
    """Removes the 'segmentation' of every annotation of COCO `data`, in place (BoxInst's
    box-only training data: boxes, classes and images are kept). Returns the annotation count."""
    for annotation in data["annotations"]:
        annotation.pop("segmentation", None)
    return len(data["annotations"])


def _read_coco_json(json_file: str, evaluated: bool) -> dict:
    """A COCO instance JSON, after checking that it is one (and `check_coco_json`; `evaluated`:
    the checks of a set that COCOeval scores)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset annotation file {json_file!r} does not exist")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file!r} is not valid JSON: {e}") from e
    missing = [
        k
        for k in ("images", "annotations", "categories")
        if not isinstance(data.get(k) if isinstance(data, dict) else None, list)
    ]
    if missing:
        raise ValueError(f"{json_file!r} is not a COCO instance JSON: no list {missing}")
    if not data["images"]:
        raise ValueError(f"{json_file!r} has no images")
    if not data["categories"]:
        raise ValueError(f"{json_file!r} has no categories")
    check_coco_json(data, json_file, evaluated)
    known = {c["id"] for c in data["categories"]}
    unknown = sorted({a.get("category_id") for a in data["annotations"]} - known, key=str)
    if unknown:
        raise ValueError(
            f"{json_file!r}: annotations use category ids {unknown[:10]} that are not in its "
            f"'categories' (ids {sorted(known)[:10]}{'...' if len(known) > 10 else ''})"
        )
    return data


def register_coco_dataset(prefix: str, json_file: str, image_root: str) -> Tuple[str, int]:
    """Registers `json_file` + `image_root` (once per process) as a dataset named
    "<prefix>_<JSON file stem>" (e.g. "test_val" for a/val.json), which a shell and a file system
    take as it is: results go to OUTPUT_DIR/inference/<name>/. Another file with the same stem
    gets "_2", "_3", ...

    Returns:
        (dataset name, number of categories). The class names come from the JSON's categories;
        the metadata's `rle_masks` says whether a non-crowd mask is RLE.
    """
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"dataset image folder {image_root!r} does not exist")
    data = _read_coco_json(json_file, evaluated=prefix == "test")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    name = _dataset_name(prefix, json_file)
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_file, image_root)
        MetadataCatalog.get(name).set(
            thing_classes=[c["name"] for c in categories],
            rle_masks=has_rle_masks(data),
            # False for a box-only dataset (annotations but no 'segmentation'): BoxInst's data
            has_masks=any(a.get("segmentation") for a in data["annotations"])
            or not data["annotations"],
        )
    elif MetadataCatalog.get(name).image_root != image_root:
        raise ValueError(
            f"{json_file!r} is already registered with images in {MetadataCatalog.get(name).image_root!r}"
        )
    return name, len(categories)


def _dataset_name(prefix: str, json_file: str) -> str:
    """The name of `json_file` (an absolute path): the one it is registered under, else a free
    "<prefix>_<stem>" with only letters, digits, '.', '_' and '-'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(json_file))[0])
    name, count = f"{prefix}_{stem}", 1
    while name in DatasetCatalog.list() and MetadataCatalog.get(name).get("json_file") != json_file:
        count += 1
        name = f"{prefix}_{stem}_{count}"
    return name


def check_training_masks(dataset_names: Sequence[str]) -> None:
    """Fails when a training set registered here has boxes but no masks: CondInst learns its masks
    from GT masks, BoxInst from boxes."""
    for name in dataset_names:
        if MetadataCatalog.get(name).get("has_masks", True) is False:
            raise ValueError(
                f"dataset {name!r} has boxes but no masks (no annotation has a 'segmentation'): "
                "CondInst learns masks from masks; train BoxInst on it instead "
                "(--config-file configs/BoxInst/..., or MODEL.BOXINST.ENABLED True)"
            )
