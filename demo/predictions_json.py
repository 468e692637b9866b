"""Raw predictions as JSON: boxes, scores, classes and COCO run-length-encoded masks.

The file holds a list with one record per image or video frame:

    {"source": "path/to/input", "frame": null or the 0-based frame index,
     "height": H, "width": W,
     "instances": [{"category_id": 2, "category_name": "car", "score": 0.87,
                    "bbox": [x0, y0, x1, y1],
                    "segmentation": {"size": [H, W], "counts": "<COCO RLE string>"}}, ...]}

`category_id` is the model's contiguous class index (`pred_classes`, 0 .. NUM_CLASSES-1), not a
dataset's own category id; `category_name` is present when the metadata has `thing_classes`.
`bbox` is XYXY in absolute pixels of the input image. `pycocotools.mask.decode` restores a mask.
"""

import json
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import Instances

from condinst_d2.utils import atomic_write

__all__ = ["instances_to_record", "decode_masks", "write_json"]


def encode_masks(masks: np.ndarray) -> List[Dict]:
    """(D, H, W) bool masks -> D COCO RLEs with `counts` as str (JSON-serialisable)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [
        {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        for rle in rles
    ]


def instances_to_record(
    instances: Instances,
    source: str,
    frame: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> Dict:
    """One image's predictions (on the CPU, with pred_masks) as a JSON-serialisable record."""
    height, width = instances.image_size
    boxes = instances.pred_boxes.tensor.tolist()
    rles = encode_masks(instances.pred_masks.numpy())
    items = []
    for box, score, cls, rle in zip(
        boxes, instances.scores.tolist(), instances.pred_classes.tolist(), rles
    ):
        item = {"category_id": cls, "score": score, "bbox": box, "segmentation": rle}
        if class_names is not None and cls < len(class_names):
            item["category_name"] = class_names[cls]
        items.append(item)
    return {"source": source, "frame": frame, "height": height, "width": width, "instances": items}


def decode_masks(record: Dict) -> np.ndarray:
    """A record's masks back as a (D, H, W) bool array."""
    rles = [
        dict(item["segmentation"], counts=item["segmentation"]["counts"].encode("ascii"))
        for item in record["instances"]
    ]
    if not rles:
        return np.zeros((0, record["height"], record["width"]), dtype=bool)
    return mask_util.decode(rles).transpose(2, 0, 1).astype(bool)


def write_json(records: List[Dict], path: str) -> None:
    """Writes the records to `path` atomically: `path` is never half-written."""
    with atomic_write(path) as f:
        json.dump(records, f)
