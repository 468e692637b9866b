"""A deterministic synthetic instance segmentation dataset, generated on the spot (no download).

Scenes of filled shapes (several classes, a range of sizes, overlapping, the later ones occluding
the earlier) on textured backgrounds, written as JPEG images plus COCO instance JSON with polygon
masks of the visible parts. Used by the quick-start and the tests.
"""

import json
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

from ..utils import atomic_write

__all__ = ["SHAPE_CLASSES", "render_scene", "write_coco_split"]

SHAPE_CLASSES = ["circle", "square", "triangle", "star"]
MIN_VISIBLE_FRACTION = 0.4  # objects occluded beyond this are left out of the scene


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noisy colour gradient with stripes or a checkerboard, (h, w, 3) uint8 BGR."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3)[None, None] + (xx / w)[..., None] * rng.uniform(-60, 60, 3)
    period = rng.uniform(8, 32)
    if rng.random() < 0.5:
        texture = np.sin((xx * rng.uniform(-1, 1) + yy) / period * np.pi)
    else:
        texture = ((xx // period + yy // period) % 2) * 2 - 1
    image = base + texture[..., None] * rng.uniform(5, 25) + rng.normal(0, 8, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_polygon(
    rng: np.random.Generator, kind: str, cx: float, cy: float, r: float
) -> np.ndarray:
    """(K, 2) int32 outline of a shape of radius r centred at (cx, cy), randomly rotated."""
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radii = np.full_like(t, r)
    elif kind == "square":
        t = angle + np.arange(4) * np.pi / 2
        radii = np.full(4, r)
    elif kind == "triangle":
        t = angle + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r)
    else:  # a five-pointed star
        t = angle + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return (
        np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1).round().astype(np.int32)
    )


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of an (h, w) mask as COCO polygons (flat x, y lists), without slivers."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [
        c.reshape(-1).astype(float).tolist()
        for c in contours
        if len(c) >= 3 and cv2.contourArea(c) > 1
    ]


def render_scene(
    rng: np.random.Generator, h: int, w: int, max_objects: int = 6
) -> Tuple[np.ndarray, List[Dict]]:
    """One scene: (h, w, 3) uint8 BGR image and its COCO annotations (without ids)."""
    image = _background(rng, h, w)
    masks, labels, drawn_areas = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.05, 0.3) * min(h, w)
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [_shape_polygon(rng, SHAPE_CLASSES[label], cx, cy, r)], 1)
        color = rng.integers(0, 256, 3)
        shade = rng.uniform(0.75, 1.0, (h, w, 1))
        image[mask > 0] = np.clip(color * shade, 0, 255).astype(np.uint8)[mask > 0]
        masks = [m & (1 - mask) for m in masks]  # the new shape occludes the earlier ones
        masks.append(mask)
        labels.append(label)
        drawn_areas.append(mask.sum())
    annotations = []
    for mask, label, drawn_area in zip(masks, labels, drawn_areas):
        visible_area = mask.sum()
        polygons = _mask_to_polygons(mask)
        if not polygons or visible_area < MIN_VISIBLE_FRACTION * drawn_area:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        annotations.append(
            {
                "category_id": label + 1,
                "segmentation": polygons,
                "area": float(visible_area),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "iscrowd": 0,
            }
        )
    return image, annotations


def write_coco_split(
    out_dir: str, split: str, num_images: int, size: Tuple[int, int], seed: int
) -> str:
    """Writes `num_images` scenes to out_dir/split/*.jpg and out_dir/split.json; returns the JSON
    path. Deterministic for a given seed; the JSON is written last, atomically."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = size
        image, anns = render_scene(rng, h, w)
        file_name = f"{image_id:05d}.jpg"
        image_path = os.path.join(image_dir, file_name)
        if not cv2.imwrite(image_path, image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {image_path}")
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": image_id})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPE_CLASSES)]
    path = os.path.join(out_dir, f"{split}.json")
    with atomic_write(path) as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path
