"""A DatasetMapper whose image reading fails loudly and reads 16-bit images correctly.

Detectron2's `DatasetMapper` reads images with `detection_utils.read_image`, which
(a) lets PIL errors through without the file name (PIL is handed a file object), and
(b) converts 16-bit images with `Image.convert("RGB")`, which clips every value above
255 to 255: a silent, wrong (nearly white) image. `CondInstDatasetMapper` fixes both.
"""

import copy
import errno
import logging
from typing import Any, Dict, Optional

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_first_n
from PIL import Image, ImageOps

from .coco import check_training_masks

__all__ = ["CondInstDatasetMapper", "read_image"]

_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scales a 16-bit (or 16-bit-valued 32-bit integer) PIL image to 8 bits.

    Args:
        image: a decoded PIL image in any mode.

    Returns:
        The image unchanged if it is not a high-bit-depth integer image, otherwise an
        "L" image holding the top 8 bits (value >> 8).

    Raises:
        ValueError: for float images, or integer images with values outside [0, 65535],
            which have no unambiguous 8-bit rendering.
    """
    if image.mode not in _UINT16_MODES + ("I", "F"):
        return image
    if image.mode == "F":
        raise ValueError("floating-point images (PIL mode 'F') are not supported")
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise ValueError(
            f"PIL mode {image.mode!r} with values in [{values.min()}, {values.max()}] "
            "is not a 16-bit image; cannot convert it to 8 bits"
        )
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L")


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """Reads an image like `detection_utils.read_image`, but robustly.

    EXIF orientation is applied; grayscale, palette, RGBA and 16-bit images become
    `format` (e.g. "BGR" or "RGB", 3 channels, uint8); 16-bit values are scaled by
    >> 8 instead of being clipped.

    Args:
        file_name: path of the image (anything `PathManager` opens).
        format: one of PIL's modes, "BGR" or "YUV-BT.601"; None keeps PIL's mode.

    Returns:
        The HWC image as a numpy array (see `detection_utils.read_image`).

    Raises:
        FileNotFoundError: the file does not exist; the message names it.
        ValueError: the file cannot be decoded (not an image, truncated, unsupported
            pixel type); the message names the file and the cause.
    """
    if not PathManager.exists(file_name):
        raise FileNotFoundError(errno.ENOENT, "image file not found", file_name)
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, so truncated data fails here, inside the try
        image = _to_8bit(ImageOps.exif_transpose(image))
        return utils.convert_PIL_to_numpy(image, format)
    except Exception as e:
        raise ValueError(f"cannot read image {file_name!r}: {type(e).__name__}: {e}") from e


def _with_masks(annotations: list, file_name: str) -> list:
    """The annotations that have a mask. Detectron2's COCO loader keeps an instance whose
    "segmentation" is empty without that key, which then breaks `annotations_to_instances`."""
    kept = [a for a in annotations if a.get("segmentation")]
    if len(kept) < len(annotations):
        log_first_n(
            logging.WARNING,
            f"Skipping annotations without a mask (empty 'segmentation'), e.g. in {file_name}",
            n=1,
        )
    return kept


class CondInstDatasetMapper(DatasetMapper):
    """`DatasetMapper` that reads images with this module's `read_image`.

    Construction is unchanged (`CondInstDatasetMapper(cfg, is_train=True)` or the
    explicit keyword arguments of `DatasetMapper`); only image reading differs. The
    size check against the dict's "height"/"width" still runs.

    With MODEL.BOXINST.ENABLED, GT masks are never read (BoxInst learns from the boxes: the
    datasets may have none), as in the authors' mapper; otherwise the training sets must have masks.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        if cfg.MODEL.BOXINST.ENABLED:
            ret.update(use_instance_mask=False, recompute_boxes=False)
        elif is_train and ret["use_instance_mask"]:
            check_training_masks(cfg.DATASETS.TRAIN)
        return ret

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Maps one dataset dict to the model's input dict.

        Args:
            dataset_dict: metadata of one image, in Detectron2 Dataset format.

        Returns:
            The dict with "image" (C, H, W uint8 tensor) and, in training,
            "instances"; see `DatasetMapper.__call__`.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg_gt = self._read_sem_seg(dataset_dict.pop("sem_seg_file_name", None))

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
        elif "annotations" in dataset_dict:
            if self.use_instance_mask:
                dataset_dict["annotations"] = _with_masks(
                    dataset_dict["annotations"], dataset_dict["file_name"]
                )
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    @staticmethod
    def _read_sem_seg(file_name: Optional[str]) -> Optional[np.ndarray]:
        """Reads a label map as Detectron2 does, with errors naming the file.

        Label values are kept as PIL's "L" conversion gives them (not rescaled: they are
        class ids, not intensities).
        """
        if file_name is None:
            return None
        if not PathManager.exists(file_name):
            raise FileNotFoundError(errno.ENOENT, "label map file not found", file_name)
        try:
            return utils.read_image(file_name, "L").squeeze(2)
        except Exception as e:
            raise ValueError(f"cannot read label map {file_name!r}: {type(e).__name__}: {e}") from e
