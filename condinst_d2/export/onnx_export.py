"""CondInst -> one ONNX graph from a uint8 image to final detections at a requested size.

Graph inputs: `image` (3, h, w) uint8 in INPUT.FORMAT, already resized to the test size (as
Detectron2's predictor does it outside the model), h and w dynamic; `output_hw` (2,) int64, the
size (H, W) to return boxes and masks at (the original image's). Outputs: `boxes` (D, 4) float32
XYXY, `scores` (D,), `classes` (D,) int64, `masks` (D, H, W) bool, D dynamic (0 allowed).

The traced part is the library's own inference: `preprocess_image`, backbone, mask branch (no
semantic head at inference), FCOS decoding and NMS (`candidates_single_level`,
`select_over_all_levels`: ONNX NonMaxSuppression), the controller at the detections,
`rescale_detections` and the image's `paste_taps` (which mask pixels, with which weights, make
each output row and column). Each detection's mask is then made in an ONNX Scan appended to the
traced graph, one detection at a time: the dynamic mask head on the mask features, and
`paste_one_mask` (the PyTorch path's `paste_masks` of one mask: evaluated only over the region
the mask can be on). So neither the D detections' mask-head activations (D x 10 channels at
stride 8: 280 MB at 2500x1800 for 100) nor float masks of the output size exist at once.
"""

import io
import json
import warnings
from typing import Dict, List, Sequence, Tuple

import onnx
import torch
from detectron2.structures import Instances
from onnx import TensorProto, helper

from ..modeling.meta_arch import CondInst
from ..modeling.postprocessing import Taps, paste_one_mask, paste_taps, rescale_detections

__all__ = [
    "METADATA_MARKER",
    "OnnxExportError",
    "check_exportable",
    "config_metadata",
    "export_onnx",
]

# metadata_props key that marks a file as written by this exporter; its value is the layout version.
METADATA_MARKER = "condinst_d2.onnx_format"
FORMAT_VERSION = "1"
OPSET = 17
INPUT_NAMES = ["image", "output_hw"]
OUTPUT_NAMES = ["boxes", "scores", "classes", "masks"]
# The per-image inputs of the mask Scan: the traced graph's outputs that its body reads.
TAP_NAMES = ["rows_index", "rows_weight", "cols_index", "cols_weight"]
# The per-detection inputs of the mask Scan: what the dynamic mask head needs of a detection.
DETECTION_NAMES = ["mask_head_params", "locations", "fpn_levels"]
_TAP_AXES = {name: {0: "H" if name.startswith("rows") else "W"} for name in TAP_NAMES}


class OnnxExportError(ValueError):
    """A model or config that the exporter cannot turn into a graph; the message says why."""


def check_exportable(model: CondInst) -> None:
    """Raises OnnxExportError for what the exported graph does not compute."""
    if not isinstance(model, CondInst):
        raise OnnxExportError(f"only CondInst models export, got {type(model).__name__}")
    if model.mask_nms:
        raise OnnxExportError(
            "MODEL.CONDINST.MASK_NMS does not export to ONNX (its pairwise mask IoU has no "
            "exportable form here); export with MODEL.CONDINST.MASK_NMS False (box NMS)"
        )


class _Detector(torch.nn.Module):
    """The traced part: image -> boxes, scores, classes at output_hw; the mask features
    (1, Cm, h, w) and, of each kept detection, its `DETECTION_NAMES` ((D, P) dynamic
    parameters, (D, 2) location, (D,) FPN level); and the image's `paste_taps` (rows: (H, 4)
    index and weight, columns: (W, 4))."""

    def __init__(self, model: CondInst):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, output_hw: torch.Tensor):
        model = self.model
        images = model.preprocess_image([{"image": image.float()}])
        features = model.backbone(images.tensor)
        mask_feats, _ = model.mask_branch(features)
        detections = model.proposal_generator(images, features)[0][0]
        result, keep = rescale_detections(detections, output_hw[0], output_hw[1])
        image_hw = torch._shape_as_tensor(image)[1:]
        factor = model.mask_head.upsample_factor
        rows, cols = paste_taps(
            (mask_feats.shape[2] * factor, mask_feats.shape[3] * factor),
            model.mask_head.mask_out_stride,
            (image_hw[0], image_hw[1]),
            (output_hw[0], output_hw[1]),
            image.device,
        )
        return (
            result.pred_boxes.tensor,
            result.scores,
            result.pred_classes,
            mask_feats,
            *(detections.get(name)[keep] for name in DETECTION_NAMES),
            *rows,
            *cols,
        )


class _MaskOne(torch.nn.Module):
    """The mask of one detection: the mask features (1, Cm, h, w), the detection's
    `DETECTION_NAMES` ((1, P), (1, 2), (1,)) and the image's taps -> (1, H, W) bool."""

    def __init__(self, model: CondInst):
        super().__init__()
        self.mask_head = model.mask_head
        self.threshold = model.mask_threshold

    def forward(self, mask_feats, params, locations, levels, *taps_and_output_hw):
        # The mask head reads these fields only; the image size is not used.
        detection = Instances((1, 1), im_inds=torch.zeros_like(levels))
        for name, value in zip(DETECTION_NAMES, (params, locations, levels)):
            detection.set(name, value)
        probs = self.mask_head(mask_feats, detection).sigmoid()
        rows_index, rows_weight, cols_index, cols_weight, output_hw = taps_and_output_hw
        rows, cols = Taps(rows_index, rows_weight), Taps(cols_index, cols_weight)
        output_size = (output_hw[0], output_hw[1])
        return paste_one_mask(probs[0, 0], rows, cols, output_size, self.threshold)[None]


def _trace(
    module: torch.nn.Module,
    args: Tuple,
    names: Sequence[str],
    outputs: Sequence[str],
    dynamic_axes: Dict,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Tracer warnings about Python values are expected: every data-dependent size in the
        # traced code is taken from tensor shapes, which the exporter keeps dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(names),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def _prefixed(graph: onnx.GraphProto, prefix: str, keep: Dict[str, str]) -> List[onnx.NodeProto]:
    """The nodes of `graph` with every value name prefixed, except those renamed by `keep`."""

    def rename(name: str) -> str:
        return keep.get(name, prefix + name) if name else name

    nodes = []
    for node in graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
        node.name = prefix + node.name
        nodes.append(node)
    return nodes


def _append_mask_scan(main: onnx.ModelProto, mask_one: onnx.ModelProto) -> None:
    """Replaces main's mask features, `DETECTION_NAMES` and taps outputs by `masks` (D, H, W)
    bool, computed by a Scan that runs `mask_one` on one detection at a time (reading the mask
    features, the taps and `output_hw` from the outer graph).

    A Scan, not a Loop: ONNX Runtime writes each Scan iteration's output straight into the final
    (D, H, W) tensor, whereas a Loop keeps every iteration's output and concatenates them at the
    end, holding the D masks twice."""
    graph = main.graph
    outer = ["mask_feats", *TAP_NAMES, "output_hw"]
    one = {name: f"mask/{name}/one" for name in DETECTION_NAMES}  # a scan slice, rank - 1
    body_nodes = [
        helper.make_node("Unsqueeze", [one[name], "mask/axis0"], ["mask/" + name])
        for name in DETECTION_NAMES
    ]
    body_nodes += _prefixed(mask_one.graph, "mask/", {name: name for name in outer})
    body_nodes.append(
        helper.make_node(
            "Squeeze", ["mask/" + mask_one.graph.output[0].name, "mask/axis0"], ["mask"]
        )
    )
    initializers = [helper.make_tensor("mask/axis0", TensorProto.INT64, [1], [0])]
    for init in mask_one.graph.initializer:
        init = onnx.TensorProto.FromString(init.SerializeToString())
        init.name = "mask/" + init.name
        initializers.append(init)
    slices = {x.name: x.type.tensor_type for x in main.graph.output if x.name in one}
    body = helper.make_graph(
        body_nodes,
        "mask_of_one_detection",
        [
            helper.make_tensor_value_info(
                one[name], slices[name].elem_type, [None] * (len(slices[name].shape.dim) - 1)
            )
            for name in DETECTION_NAMES
        ],
        [helper.make_tensor_value_info("mask", TensorProto.BOOL, ["H", "W"])],
        initializer=initializers,
    )
    # ONNX Runtime refuses a Scan over 0 detections: an If gives (0, H, W) for them instead.
    masks_type = [helper.make_tensor_value_info("masks", TensorProto.BOOL, ["D", "H", "W"])]
    scan = helper.make_graph(
        [
            helper.make_node(
                "Scan", DETECTION_NAMES, ["masks"], body=body, num_scan_inputs=len(DETECTION_NAMES)
            )
        ],
        "masks_of_all_detections",
        [],
        masks_type,
    )
    empty = helper.make_graph(
        [
            helper.make_node("Concat", ["zero_1d", "output_hw"], ["empty_shape"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                ["empty_shape"],
                ["masks"],
                value=helper.make_tensor("false", TensorProto.BOOL, [1], [False]),
            ),
        ],
        "no_masks",
        [],
        masks_type,
        initializer=[helper.make_tensor("zero_1d", TensorProto.INT64, [1], [0])],
    )
    graph.node.extend(
        [
            helper.make_node("Shape", [DETECTION_NAMES[0]], ["num_masks_1d"], start=0, end=1),
            helper.make_node("Squeeze", ["num_masks_1d"], ["num_masks"]),
            helper.make_node(
                "Constant",
                [],
                ["no_mask"],
                value=helper.make_tensor("zero", TensorProto.INT64, [], [0]),
            ),
            helper.make_node("Greater", ["num_masks", "no_mask"], ["any_mask"]),
            helper.make_node("If", ["any_mask"], ["masks"], then_branch=scan, else_branch=empty),
        ]
    )
    kept = [o for o in graph.output if o.name in OUTPUT_NAMES]
    del graph.output[:]
    graph.output.extend(kept)
    graph.output.append(helper.make_tensor_value_info("masks", TensorProto.BOOL, ["D", "H", "W"]))


def _trace_mask_one(model: CondInst) -> onnx.ModelProto:
    """`_MaskOne` traced on a small sample (any content)."""
    head = model.mask_head
    mask_feats = torch.rand(1, head.in_channels, 4, 6)
    factor = head.upsample_factor
    output_size = torch.tensor([60, 90])
    rows, cols = paste_taps(
        (4 * factor, 6 * factor), head.mask_out_stride, (30, 45), tuple(output_size), "cpu"
    )
    detection = (
        torch.randn(1, head.num_params),
        torch.rand(1, 2) * 30,
        torch.zeros(1, dtype=torch.int64),
    )
    return _trace(
        _MaskOne(model).eval(),
        (mask_feats, *detection, *rows, *cols, output_size),
        ["mask_feats", *DETECTION_NAMES, *TAP_NAMES, "output_hw"],
        ["mask"],
        {"mask_feats": {2: "hf", 3: "wf"}, "mask": {1: "H", 2: "W"}, **_TAP_AXES},
    )


@torch.no_grad()
def export_onnx(
    model: CondInst, sample_image: torch.Tensor, metadata: Dict[str, str]
) -> onnx.ModelProto:
    """Traces `model` (eval mode, CPU) into one ONNX model (see the module docstring).

    Args:
        sample_image: (3, h, w) uint8 image the tracer runs on (any content).
        metadata: strings stored in the file's metadata_props (next to the exporter's marker).
    Returns:
        The model, checked with `onnx.checker`.
    Raises:
        OnnxExportError: for a model the graph cannot compute (`check_exportable`).
    """
    check_exportable(model)
    model = model.eval()
    output_hw = torch.tensor(sample_image.shape[1:], dtype=torch.int64)
    main = _trace(
        _Detector(model).eval(),
        (sample_image, output_hw),
        INPUT_NAMES,
        ["boxes", "scores", "classes", "mask_feats", *DETECTION_NAMES, *TAP_NAMES],
        {
            "image": {1: "h", 2: "w"},
            "boxes": {0: "D"},
            "scores": {0: "D"},
            "classes": {0: "D"},
            "mask_feats": {2: "hf", 3: "wf"},
            **{name: {0: "D"} for name in DETECTION_NAMES},
            **_TAP_AXES,
        },
    )
    _append_mask_scan(main, _trace_mask_one(model))
    entries = {METADATA_MARKER: FORMAT_VERSION, **metadata}
    for key, value in entries.items():
        main.metadata_props.add(key=key, value=value)
    main.producer_name = "condinst_d2"
    onnx.checker.check_model(main, full_check=True)
    return main


def config_metadata(cfg, class_names: Sequence[str]) -> Dict[str, str]:
    """What the runtime needs from the config: test-time resizing, channel order, class names."""
    return {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
        "class_names": json.dumps(list(class_names)),
    }
