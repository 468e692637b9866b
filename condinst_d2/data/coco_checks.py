"""Start-up checks of a COCO instance JSON: the mistakes that would otherwise crash late, take the
machine's memory, or silently train or evaluate the wrong labels.

pycocotools rasterises a polygon into a buffer proportional to its length in pixels: one NaN,
infinite or absurdly large coordinate makes it allocate until the machine runs out of memory (or
segfault under a memory cap), in training and in COCO evaluation alike. Duplicate image ids make
Detectron2's loader train one image with the other's annotations. COCOeval reads the test JSON
itself and crashes, after all inference, on annotations the training loader merely skips.
"""

import functools
import logging
from typing import Any, Callable, Dict, List, Mapping, Sequence, Set, Tuple

import numpy as np

__all__ = ["check_coco_json", "has_rle_masks"]

logger = logging.getLogger(__name__)

# Polygon coordinates may lie outside the image (crops, sloppy tools), but by at most 10 image
# sizes on each side: x in [-10 W, 11 W], y in [-10 H, 11 H]. Farther is a broken file, and
# rasterising it costs memory in proportion to the distance (a few MB at this bound).
_MARGIN = 10


def check_coco_json(data: Mapping[str, Any], json_file: str, evaluated: bool) -> None:
    """Raises ValueError, naming `json_file` and the image / annotation, for content that cannot
    be trained or evaluated correctly.

    Args:
        data: the parsed COCO JSON (a dict with lists "images", "annotations", "categories").
        json_file: its path, for the messages.
        evaluated: the set is evaluated by COCOeval, which also needs every annotation's
            polygons to have >= 3 points and an "area".
    """
    _check_unique_categories(data["categories"], json_file)
    if not evaluated and not data["annotations"]:
        raise ValueError(f"{json_file!r} has no annotations: there is nothing to train on")
    images = _check_images(data["images"], json_file)
    # A set without any mask is box-only (BoxInst's data; evaluated on boxes): COCOeval's segm
    # task, which needs every annotation's mask, does not run on it.
    masks_evaluated = evaluated and any(
        isinstance(a, dict) and a.get("segmentation") is not None for a in data["annotations"]
    )
    seen: Set[Any] = set()
    orphans, polygons = [], []
    for ann in data["annotations"]:
        where = functools.partial(_where, ann, images, json_file)  # formatted only to raise
        if not isinstance(ann, dict) or "id" not in ann:
            raise ValueError(f"{where()}: not an annotation with an 'id'")
        if ann["id"] in seen:
            raise ValueError(
                f"{where()}: annotation id {ann['id']!r} is used twice; make ids unique"
            )
        seen.add(ann["id"])
        image = images.get(ann.get("image_id"))
        if image is None:
            orphans.append(ann["id"])
            continue
        _check_bbox(ann, where)
        segm = ann.get("segmentation")
        _check_segmentation(segm, image, where, masks_evaluated)
        if isinstance(segm, list):
            polygons += [(where, image, polygon) for polygon in segm]
        if evaluated and not _is_number(ann.get("area")):
            raise ValueError(f"{where()}: no numeric 'area' (COCO evaluation needs it); add it")
    _check_polygons(polygons, evaluated)
    if orphans:
        logger.warning(
            "%s: %d annotations (ids %s) belong to no image of the file and are ignored",
            json_file,
            len(orphans),
            orphans[:5],
        )


def has_rle_masks(data: Mapping[str, Any]) -> bool:
    """Whether a non-crowd annotation's mask is RLE (which INPUT.MASK_FORMAT polygon rejects)."""
    return any(
        isinstance(a.get("segmentation"), dict) and not a.get("iscrowd", 0)
        for a in data["annotations"]
    )


def _check_unique_categories(categories: Sequence[Any], json_file: str) -> None:
    names: Dict[Any, Any] = {}
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{json_file!r}: category {c!r} has no 'id' and 'name'")
        if c["id"] in names:
            raise ValueError(
                f"{json_file!r}: category id {c['id']!r} is used twice ({names[c['id']]!r} and "
                f"{c['name']!r}); give each category its own id"
            )
        names[c["id"]] = c["name"]


def _check_images(images: Sequence[Any], json_file: str) -> Dict[Any, dict]:
    """The images by id, after checking ids, file names and sizes."""
    by_id: Dict[Any, dict] = {}
    for image in images:
        where = f"{json_file!r}: image {image.get('id') if isinstance(image, dict) else image!r}"
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{where}: an image needs an 'id' and a 'file_name'")
        for key in ("width", "height"):
            value = image.get(key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(
                    f"{where} ({image['file_name']!r}): '{key}' is {value!r}, not a positive "
                    f"integer; add the image's {key} in pixels"
                )
        if image["id"] in by_id:
            raise ValueError(
                f"{json_file!r}: image id {image['id']!r} is used by both "
                f"{by_id[image['id']]['file_name']!r} and {image['file_name']!r}; "
                "give each image its own id"
            )
        by_id[image["id"]] = image
    return by_id


def _where(ann: Any, images: Mapping[Any, dict], json_file: str) -> str:
    """'file: annotation ID (image ID, file name)' for messages."""
    if not isinstance(ann, dict):
        return f"{json_file!r}: annotation {ann!r}"
    image = images.get(ann.get("image_id"), {})
    return (
        f"{json_file!r}: annotation {ann.get('id')!r} (image {ann.get('image_id')!r}, "
        f"{image.get('file_name')!r})"
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _check_bbox(ann: dict, where: Callable[[], str]) -> None:
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise ValueError(
            f"{where()}: 'bbox' is {box!r}, not 4 finite numbers [x, y, width, height]; fix it"
        )
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"{where()}: 'bbox' {box} has a negative width or height; fix it")


def _check_segmentation(segm: Any, image: dict, where: Callable[[], str], evaluated: bool) -> None:
    """A list of polygons (checked by `_check_polygons`) or an RLE of the image's size."""
    if segm is None and not evaluated:
        return  # no mask: the mapper skips the annotation for mask training
    if isinstance(segm, dict):
        if "counts" not in segm or list(segm.get("size", ())) != [image["height"], image["width"]]:
            raise ValueError(
                f"{where()}: RLE 'segmentation' needs 'counts' and 'size' [height, width] = "
                f"{[image['height'], image['width']]}, got size {segm.get('size')!r}"
            )
        return
    if not isinstance(segm, list) or (evaluated and not segm):
        raise ValueError(
            f"{where()}: 'segmentation' is {str(segm)[:60]!r}, not a list of polygons or an RLE"
        )


def _check_polygons(polygons: List[Tuple[Callable[[], str], dict, Any]], evaluated: bool) -> None:
    """Checks every (where, image, polygon) at once with numpy; the first bad polygon is then
    reported by `_check_polygon` (one at a time takes minutes for COCO's 860k annotations)."""
    flat, lengths, sizes = [], [], []
    for _, image, polygon in polygons:
        if not isinstance(polygon, list):
            flat = [None]  # not numbers: found below
            break
        flat += polygon
        lengths.append(len(polygon))
        sizes.append((image["width"], image["height"]))
    try:
        xy = np.asarray(flat)
    except ValueError:  # ragged nesting
        xy = np.asarray([None])
    if xy.ndim != 1 or xy.dtype.kind not in "iuf":
        bad = list(range(len(polygons)))  # _check_polygon finds the first that is not numbers
    else:
        lengths_ = np.asarray(lengths, dtype=np.int64)
        owner = np.repeat(np.arange(len(lengths_)), lengths_)
        index = np.arange(xy.size) - np.repeat(np.cumsum(lengths_) - lengths_, lengths_)
        limit = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[owner, index % 2]
        xy = xy.astype(np.float64)
        with np.errstate(invalid="ignore"):
            far = (xy < -_MARGIN * limit) | (xy > (1 + _MARGIN) * limit)
        bad = np.unique(owner[~np.isfinite(xy) | far]).tolist()
        if evaluated:
            bad += np.flatnonzero((lengths_ < 6) | (lengths_ % 2 == 1)).tolist()
    for i in sorted(bad):
        _check_polygon(polygons[i][2], polygons[i][1], polygons[i][0], evaluated)


def _too_far(coordinates: np.ndarray, size: int) -> bool:
    return bool(coordinates.min() < -_MARGIN * size or coordinates.max() > (1 + _MARGIN) * size)


def _check_polygon(polygon: Any, image: dict, where: Callable[[], str], evaluated: bool) -> None:
    """Raises ValueError for a polygon that is not numbers, not finite, too far outside the
    image, or (`evaluated`) of fewer than 3 points."""
    try:
        xy = np.asarray(polygon)
    except ValueError:  # ragged nesting
        xy = np.zeros((0, 0))
    if xy.ndim != 1 or xy.dtype.kind not in "iuf":  # strings, None, nested lists, booleans
        raise ValueError(f"{where()}: polygon {str(polygon)[:60]} is not a flat list of numbers")
    xy = xy.astype(np.float64)
    if not np.isfinite(xy).all():
        raise ValueError(
            f"{where()}: polygon has a non-finite coordinate ({xy[~np.isfinite(xy)][0]}); "
            "fix or remove the annotation"
        )
    w, h = image["width"], image["height"]
    x, y = xy[0::2], xy[1::2]
    if x.size and y.size and _too_far(x, w) | _too_far(y, h):
        raise ValueError(
            f"{where()}: polygon coordinates reach x in [{x.min():g}, {x.max():g}], y in "
            f"[{y.min():g}, {y.max():g}], farther than {_MARGIN} image sizes ({w}x{h}) outside "
            "the image; fix or remove the annotation"
        )
    if evaluated and (xy.size < 6 or xy.size % 2):
        raise ValueError(
            f"{where()}: polygon of {xy.size} coordinates (a polygon needs >= 3 x, y points); COCO "
            "evaluation cannot read it: remove the polygon or the annotation from the test set"
        )
