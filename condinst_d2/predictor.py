"""The Python API for predictions: `Predictor`, Detectron2's `DefaultPredictor` for CondInst.

predictor = Predictor.from_output_dir("output/quickstart/model")   # a training run
predictor = Predictor.from_config("configs/CondInst/MS_R_50_1x.yaml", "model.pth")
prediction = predictor.predict("photo.jpg")  # or an (H, W, 3) uint8 BGR array
prediction.instances, prediction.labels
"""

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Instances

from .checkpoint import CondInstCheckpointer
from .classes import get_class_names, inference_config, is_backbone_init
from .config import get_condinst_cfg
from .data import read_image
from .modeling.fold_batchnorm import fold_batchnorm

__all__ = ["Prediction", "Predictor", "find_checkpoint"]

logger = logging.getLogger(__name__)

Image = Union[str, os.PathLike, np.ndarray]


@dataclass
class Prediction:
    """The predictions on one image.

    Attributes:
        instances: on the CPU, at the image's size: pred_boxes (XYXY pixels), scores,
            pred_classes and pred_masks (D, H, W) bool.
        labels: the class name of each instance (D), or its class index as a string when the
            model's class names are unknown.
    """

    instances: Instances
    labels: List[str]


class Predictor(DefaultPredictor):
    """DefaultPredictor's interface (`cfg`, `model`, `metadata`, `aug`, `input_format`, and
    `predictor(bgr_image)["instances"]`), with what CondInst's models need:

    - the weights load through `CondInstCheckpointer` (the authors' files work as they are), and
      a checkpoint saved by condinst_d2 brings its number of classes and their names;
    - `class_names` and `metadata.thing_classes` are the model's class names;
    - `predict` / `predict_batch` take paths or arrays and return `Prediction`s.

    Build it from a config file (`from_config`), a training run's OUTPUT_DIR (`from_output_dir`)
    or a config from `condinst_d2.get_condinst_cfg` (which runs on the CPU without CUDA).
    """

    def __init__(self, cfg: CfgNode, score_threshold: float = 0.0):
        """
        Args:
            cfg: a CondInst config; MODEL.WEIGHTS is loaded when set (random weights otherwise).
            score_threshold: `predict` and `predict_batch` drop detections scoring below it.

        Raises:
            ValueError: MODEL.WEIGHTS is a backbone initialisation (ImageNet), not a CondInst
                model; or the config names other classes than the checkpoint.
        """
        if is_backbone_init(cfg.MODEL.WEIGHTS):
            raise ValueError(
                f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} is the ImageNet backbone that training starts "
                "from, not a trained CondInst model: set MODEL.WEIGHTS to a model file "
                "(a training run's model_final.pth, or one of the README's model zoo)"
            )
        self.cfg = inference_config(cfg).clone()
        self.cfg.freeze()
        self.model = build_model(self.cfg).eval()
        if self.cfg.MODEL.WEIGHTS:
            CondInstCheckpointer(self.model, for_inference=True).load(self.cfg.MODEL.WEIGHTS)
        if self.cfg.MODEL.CONDINST.FOLD_BATCHNORM:
            fold_batchnorm(self.model)
        self.class_names = get_class_names(self.cfg, read_checkpoint=False)
        self.metadata = Metadata(name="condinst_d2", thing_classes=self.class_names)
        min_size, max_size = self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        # Detectron2's convention: MIN_SIZE_TEST 0 disables test-time resizing.
        self.aug = T.ResizeShortestEdge([min_size, min_size], max_size) if min_size > 0 else None
        if self.cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {self.cfg.INPUT.FORMAT!r}")
        self.input_format = self.cfg.INPUT.FORMAT
        self.score_threshold = score_threshold

    @classmethod
    def from_config(
        cls,
        config_file: str,
        weights: Optional[str] = None,
        opts: Sequence[str] = (),
        score_threshold: float = 0.0,
    ) -> "Predictor":
        """A predictor from a YAML config, with `weights` (a path or URL) as MODEL.WEIGHTS if given,
        and config overrides `opts` (KEY VALUE ...)."""
        opts = list(opts) + (["MODEL.WEIGHTS", str(weights)] if weights is not None else [])
        return cls(get_condinst_cfg(config_file, opts), score_threshold)

    @classmethod
    def from_output_dir(
        cls, output_dir: str, opts: Sequence[str] = (), score_threshold: float = 0.0
    ) -> "Predictor":
        """A predictor of a training run: OUTPUT_DIR/config.yaml with its latest checkpoint.

        Raises:
            FileNotFoundError: `output_dir` has no config.yaml or no checkpoint.
        """
        config_file = os.path.join(output_dir, "config.yaml")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{config_file} does not exist: {output_dir} is not the OUTPUT_DIR of a training run"
            )
        return cls.from_config(config_file, find_checkpoint(output_dir), opts, score_threshold)

    def model_input(self, bgr_image: np.ndarray) -> dict:
        """One (H, W, 3) uint8 BGR image -> the model's input dict; outputs at (H, W)."""
        if bgr_image.ndim != 3 or bgr_image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) BGR image, got an array of {bgr_image.shape}")
        image = bgr_image[:, :, ::-1] if self.input_format == "RGB" else bgr_image
        height, width = image.shape[:2]
        if self.aug is not None:
            image = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, original_image: Image) -> dict:
        """DefaultPredictor's call: one image (a path, or an (H, W, 3) BGR array) ->
        {"instances": Instances} on the model's device, every detection kept."""
        return self.model([self.model_input(_bgr(original_image))])[0]

    def predict(self, image: Image) -> Prediction:
        """The predictions on one image: a path, or an (H, W, 3) uint8 BGR array."""
        return self.predict_batch([image])[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Image]) -> List[Prediction]:
        """The predictions on several images (paths or BGR arrays, any sizes) in one model call,
        each keeping the detections that score >= `score_threshold`."""
        outputs = self.model([self.model_input(_bgr(image)) for image in images])
        predictions = []
        for output in outputs:
            instances = output["instances"].to("cpu")
            instances = instances[instances.scores >= self.score_threshold]
            predictions.append(Prediction(instances, self.labels(instances.pred_classes)))
        return predictions

    def labels(self, classes: torch.Tensor) -> List[str]:
        """The class names of class indices `classes` (D,); the indices as text when unknown."""
        if self.class_names is None:
            return [str(c) for c in classes.tolist()]
        return [self.class_names[c] for c in classes.tolist()]


def find_checkpoint(output_dir: str) -> str:
    """The checkpoint of a training run: OUTPUT_DIR/model_final.pth, else the last one saved.

    Raises:
        FileNotFoundError: when the folder has neither.
    """
    final = os.path.join(output_dir, "model_final.pth")
    if os.path.isfile(final):
        return final
    checkpointer = CondInstCheckpointer(torch.nn.Module(), save_dir=output_dir)
    if checkpointer.has_checkpoint():
        return checkpointer.get_checkpoint_file()
    raise FileNotFoundError(f"no model_final.pth and no last_checkpoint in {output_dir}")


def _bgr(image: Image) -> np.ndarray:
    """An (H, W, 3) uint8 BGR array: `image` itself, or the image file it names."""
    if isinstance(image, np.ndarray):
        return image
    return read_image(os.fspath(image), format="BGR")
