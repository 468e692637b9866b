"""A deterministic one-class train / held-out split of a COCO-format dataset, e.g. the `person`
images of a few COCO val images, as a small real benchmark (`tools/compare_maskrcnn.py --split`).

The rule depends on the image ids only: the images that show the class (at least one non-crowd
instance) are sorted by id, and every `holdout_every`-th of them (ranks holdout_every - 1,
2 * holdout_every - 1, ...) is held out. The JSONs keep the source's file names, so the images
stay where they are: use the source's image folder with both.
"""

import json
import os
from typing import Dict, List, Tuple

from ..utils import atomic_write
from .coco import _read_coco_json

__all__ = ["split_one_class", "write_one_class_split"]


def split_one_class(
    data: dict, class_name: str, holdout_every: int = 4
) -> Tuple[Dict[str, list], Dict[str, list]]:
    """The (train, held-out) COCO dicts of `class_name`'s images and annotations in `data`.

    Args:
        data: a COCO instance dataset ("images", "annotations", "categories").
        class_name: the category kept (its crowd regions too, which COCOeval ignores).
        holdout_every: every holdout_every-th image, in ascending id order, is held out (>= 2).

    Returns:
        Two COCO dicts with the one category (its id unchanged) and the source's "info" and
        "licenses" when it has them.

    Raises:
        ValueError: `class_name` is not a category of `data`, no image shows it, or
            `holdout_every` < 2.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
    categories = [c for c in data["categories"] if c.get("name") == class_name]
    if not categories:
        names = sorted(str(c.get("name")) for c in data["categories"])
        raise ValueError(f"no category {class_name!r} in the dataset; it has {names[:20]}")
    category_id = categories[0]["id"]
    annotations = [a for a in data["annotations"] if a.get("category_id") == category_id]
    shown = {a["image_id"] for a in annotations if not a.get("iscrowd", 0)}
    images = sorted((i for i in data["images"] if i["id"] in shown), key=lambda i: i["id"])
    if not images:
        raise ValueError(f"no image of the dataset has a (non-crowd) {class_name!r} instance")
    held_out = {
        i["id"] for rank, i in enumerate(images) if rank % holdout_every == holdout_every - 1
    }
    extra = {k: data[k] for k in ("info", "licenses") if k in data}
    splits = []
    for keep in (lambda i: i not in held_out, lambda i: i in held_out):
        splits.append(
            {
                **extra,
                "images": [i for i in images if keep(i["id"])],
                "annotations": [
                    a for a in annotations if a["image_id"] in shown and keep(a["image_id"])
                ],
                "categories": categories[:1],
            }
        )
    return splits[0], splits[1]


def write_one_class_split(
    json_file: str, class_name: str, out_dir: str, holdout_every: int = 4
) -> Tuple[str, str]:
    """Writes `split_one_class` of `json_file` to out_dir/<class>_train.json and
    out_dir/<class>_val.json (atomically; `out_dir` is created); returns their paths.

    Raises:
        FileNotFoundError, ValueError: `json_file` is missing or not a COCO instance JSON, or
            as `split_one_class`.
    """
    data = _read_coco_json(json_file, evaluated=False)
    splits = split_one_class(data, class_name, holdout_every)
    os.makedirs(out_dir, exist_ok=True)
    stem = "".join(ch if ch.isalnum() else "_" for ch in class_name)
    paths: List[str] = []
    for split, data in zip(("train", "val"), splits):
        paths.append(os.path.join(out_dir, f"{stem}_{split}.json"))
        with atomic_write(paths[-1]) as f:
            json.dump(data, f)
    return paths[0], paths[1]
