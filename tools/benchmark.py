#!/usr/bin/env python
"""CondInst (condinst_d2) vs Detectron2's Mask R-CNN, side by side in one run.

Both are R-50-FPN with random weights, on the same inputs and thread count; every timing is the
median of repeats after warm-up, with the two models' runs interleaved. Reported as ratios
(CondInst / Mask R-CNN):
  1. end-to-end inference latency at 800x1216 (--size), with 100 detections each;
  2. the mask stage alone for K = 1, 10, 50, 100 instances, and its per-instance slope:
     CondInst: controller output -> dynamic head -> upsample -> paste/threshold at image size;
     Mask R-CNN: ROIAlign -> mask head -> paste at image size;
  3. one training iteration (forward, backward, SGD step) on the same 2-image batch of that size,
     Mask R-CNN with its RPN proposing as a trained one does (and as a random one, for reference),
     CondInst also with MODEL.CONDINST.BF16;
  4. peak memory of inference on a 2500x1800 image (--large-size) with 100 detections, each model
     in its own process;
  and CondInst's latency against the time its FLOPs take at this machine's 3x3-conv throughput.
With --onnx, also CondInst exported to ONNX (condinst_d2.export) and run with ONNX Runtime
against the same PyTorch model: end-to-end latency at --size (same uint8 input, interleaved)
and peak memory at --large-size (own process).

    python tools/benchmark.py [--threads 2] [--repeats 5] [--onnx] [--plot bench.png] [--json out.json]
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import onnxruntime
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage, get_event_storage

from condinst_d2.config import get_condinst_cfg
from condinst_d2.export import export_onnx
from condinst_d2.modeling.dynamic_mask_head import pack_dynamic_params
from condinst_d2.modeling.fold_batchnorm import fold_batchnorm
from condinst_d2.modeling.layers import compute_locations
from condinst_d2.modeling.postprocessing import paste_masks, paste_masks_by_steps
from condinst_onnx import CondInstOnnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDINST_CONFIG = os.path.join(ROOT, "configs", "CondInst", "MS_R_50_1x.yaml")
MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
SIZE = (800, 1216)  # end-to-end and mask-stage input (H, W)
LARGE = (2500, 1800)  # peak-memory input (H, W)
DETECTIONS = 100
LOGIT_STD = 2.0  # spread of the calibrated random models' class logits (`_calibrate_classifier`)


def build(
    name: str, calibration_image: Optional[torch.Tensor]
) -> Tuple[torch.nn.Module, Optional[int]]:
    """A randomly initialised CPU model at its trained default score threshold (0.05),
    calibrated on `calibration_image` (3, H, W) to keep its top 100 detections there (None:
    class scores left random, for loading calibrated weights).

    Returns:
        The model, and its number of candidates above the threshold before NMS (or None).
    """
    cpu_random = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    if name == "condinst":
        cfg = get_condinst_cfg(CONDINST_CONFIG, cpu_random)
    else:
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN_CONFIG))
        cfg.merge_from_list(cpu_random)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Random weights regress degenerate boxes (FCOS: zero size, dropped by postprocessing; Mask
    # R-CNN: saturated deltas, i.e. near-identical boxes that NMS merges). Calibrating the box
    # regressors gives both models real, varied boxes.
    if name == "condinst":
        torch.nn.init.constant_(model.proposal_generator.fcos_head.bbox_pred.bias, 2.0)
        _local_masks(model)
        record = _condinst_classifier
    else:
        for layer in (
            model.proposal_generator.rpn_head.anchor_deltas,
            model.roi_heads.box_predictor.bbox_pred,
        ):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        record = _mask_rcnn_classifier
    if calibration_image is None:
        return model, None
    return model, _calibrate_classifier(record(model, calibration_image))


class _Classifier(NamedTuple):
    """A random model's class scores on one image, recorded for `_calibrate_classifier`."""

    layer: torch.nn.Module  # the last layer of the classifier (FCOS cls_logits, cls_score)
    logits: torch.Tensor  # (M, C) its outputs less its bias, over all locations or boxes
    softmax: bool  # scores: softmax over C = K + 1 (background last), or sigmoid of C = K
    threshold: float  # the model's score threshold
    detections: Callable[[float, torch.Tensor], int]  # (weight scale, new bias) -> detections


def _record(module: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor):
    """(inputs, output) of `module`'s call in one inference of `model` on image x."""
    calls = []
    handle = module.register_forward_hook(lambda m, inputs, out: calls.append((inputs, out)))
    model([{"image": x}])
    handle.remove()
    return calls[0]


def _condinst_classifier(model: torch.nn.Module, x: torch.Tensor) -> _Classifier:
    fcos = model.proposal_generator
    layer = fcos.fcos_head.cls_logits
    (feats,), out = _record(fcos.fcos_head, model, x)
    raw = [level - layer.bias[:, None, None] for level in out.logits]  # L x (1, K, Hl, Wl)

    def detections(scale: float, bias: torch.Tensor) -> int:
        logits = [level * scale + bias[:, None, None] for level in raw]
        outputs = out._replace(logits=logits)
        return len(fcos.inference(outputs, fcos.level_locations(feats), [x.shape[-2:]])[0])

    flat = torch.cat([level[0].flatten(1).T for level in raw])
    return _Classifier(layer, flat, False, fcos.score_thresh, detections)


def _mask_rcnn_classifier(model: torch.nn.Module, x: torch.Tensor) -> _Classifier:
    predictor = model.roi_heads.box_predictor
    (_, _, proposals, _), _ = _record(model.roi_heads, model, x)
    _, (scores, deltas) = _record(predictor, model, x)
    raw = scores - predictor.cls_score.bias

    def detections(scale: float, bias: torch.Tensor) -> int:
        return len(predictor.inference((raw * scale + bias, deltas), proposals)[0][0])

    return _Classifier(predictor.cls_score, raw, True, predictor.test_score_thresh, detections)


@torch.no_grad()
def _calibrate_classifier(c: _Classifier) -> int:
    """Sets a random model's class scores as a trained one's: logits spread (std LOGIT_STD), and
    the fewest candidates (location or box, class pairs above the default threshold) from which
    NMS keeps DETECTIONS detections. The logits are linear in the layer's weights, so the recorded
    ones give the detections under rescaled weights and any foreground bias exactly; the bias is
    bisected on them.

    Returns:
        The number of candidates.
    """
    num_classes = c.logits.shape[1] - 1 if c.softmax else c.logits.shape[1]
    scale = LOGIT_STD / float(c.logits[:, :num_classes].std())
    bias = torch.zeros(c.logits.shape[1])

    def with_bias(value: float) -> torch.Tensor:
        bias[:num_classes] = value
        return bias

    low, high = -50.0, 50.0  # fewer than DETECTIONS detections at `low`, enough at `high`
    while high - low > 1e-3:
        mid = (low + high) / 2
        if c.detections(scale, with_bias(mid)) < DETECTIONS:
            low = mid
        else:
            high = mid
    c.layer.weight.mul_(scale)
    # A margin over the rounding of the rescaled layer; more candidates still give DETECTIONS.
    c.layer.bias.copy_(with_bias(high + 0.01))
    logits = c.logits * scale + bias
    scores = logits.softmax(1)[:, :-1] if c.softmax else logits.sigmoid()
    return int((scores > c.threshold).sum())


def _local_masks(model) -> None:
    """Makes every generated mask head compute logit = 4 - 10 * (|rel_x| + |rel_y|): a blob of
    ~25 px around its location on P3, as trained masks are local (random heads cover the image).
    The dynamic head still runs in full; only the controller's output is fixed."""
    head = model.mask_head
    if head.disable_rel_coords or len(head.weight_nums) != 3:
        raise ValueError("the benchmark's mask calibration expects the default 3-layer head")
    c_in, hidden = head.weight_nums[0] // head.bias_nums[0], head.bias_nums[0]
    w0, w1, w2 = torch.zeros(hidden, c_in), torch.zeros(hidden, hidden), torch.zeros(1, hidden)
    w0[0, 0], w0[1, 0], w0[2, 1], w0[3, 1] = 1, -1, 1, -1  # relu(+-rel_x), relu(+-rel_y)
    w1[0, :4] = 1  # |rel_x| + |rel_y|
    w2[0, 0] = -10
    biases = [torch.zeros(hidden), torch.zeros(hidden), torch.tensor([4.0])]
    params = pack_dynamic_params([w[None] for w in (w0, w1, w2)], [b[None] for b in biases])[0]
    controller = model.proposal_generator.fcos_head.controller
    torch.nn.init.zeros_(controller.weight)
    with torch.no_grad():
        controller.bias.copy_(params)


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A (3, h, w) float image of smooth random blobs (0-255)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, h // 32, w // 32, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0] * 255


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds of each function, the functions' runs alternating."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def end_to_end(models, repeats: int, size) -> Dict[str, Dict[str, float]]:
    inputs = [{"image": image(*size)}]
    counts = {k: len(m(inputs)[0]["instances"]) for k, m in models.items()}
    times = interleaved({k: (lambda m=m: m(inputs)) for k, m in models.items()}, repeats)
    return {k: {"seconds": times[k], "detections": counts[k]} for k in models}


def _random_boxes(k: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 32 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2])
    return torch.cat([xy, xy + wh], dim=1)


@torch.no_grad()
def mask_stage_fns(condinst, mask_rcnn, k: int, size) -> Dict[str, Callable[[], object]]:
    """The two mask stages for k instances on one image of `size`, from backbone features."""
    x = image(*size)
    c_images = condinst.preprocess_image([{"image": x}])
    c_feats = condinst.backbone(c_images.tensor)
    mask_feats, _ = condinst.mask_branch(c_feats)
    head = condinst.proposal_generator.fcos_head
    towers = head([c_feats[f] for f in condinst.proposal_generator.in_features]).bbox_towers
    p3 = towers[0]
    g = torch.Generator().manual_seed(k)
    loc_inds = torch.randint(0, p3.shape[2] * p3.shape[3], (k,), generator=g)
    zeros = torch.zeros(k, dtype=torch.long)
    stride = condinst.proposal_generator.strides[0]
    locations = compute_locations(p3.shape[2], p3.shape[3], stride, p3.device)[loc_inds]

    def condinst_masks():
        inst = Instances(
            c_images.tensor.shape[-2:], im_inds=zeros, fpn_levels=zeros, locations=locations
        )
        inst.mask_head_params = head.controller_at(towers, zeros, zeros, loc_inds)
        probs = condinst.mask_probabilities(mask_feats, inst)
        return paste_masks(probs, c_images.tensor.shape[-2:], size, size)

    m_images = mask_rcnn.preprocess_image([{"image": x}])
    m_feats = mask_rcnn.backbone(m_images.tensor)
    m_feats = [m_feats[f] for f in mask_rcnn.roi_heads.mask_in_features]
    boxes = Boxes(_random_boxes(k, *size))
    classes = torch.randint(0, 80, (k,), generator=g)

    def mask_rcnn_masks():
        pooled = mask_rcnn.roi_heads.mask_pooler(m_feats, [boxes])
        logits = mask_rcnn.roi_heads.mask_head.layers(pooled)
        inst = Instances(size, pred_boxes=boxes, pred_classes=classes)
        mask_rcnn_inference(logits, [inst])
        return paste_masks_in_image(inst.pred_masks[:, 0], boxes, size, threshold=0.5)

    return {"condinst": condinst_masks, "mask_rcnn": mask_rcnn_masks}


def mask_stage(condinst, mask_rcnn, repeats: int, size) -> Dict[int, Dict[str, float]]:
    with torch.no_grad():
        return {
            k: interleaved(mask_stage_fns(condinst, mask_rcnn, k, size), repeats)
            for k in (1, 10, 50, 100)
        }


def training_batch(h: int, w: int) -> List[Dict]:
    """Two images with 8 box-shaped instances each (polygon masks)."""
    from detectron2.structures import PolygonMasks

    batch = []
    for seed in range(2):
        boxes = _random_boxes(8, h, w)
        polys = [
            [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]
            for x0, y0, x1, y1 in boxes.tolist()
        ]
        inst = Instances(
            (h, w),
            gt_boxes=Boxes(boxes),
            gt_classes=torch.arange(8) % 80,
            gt_masks=PolygonMasks(polys),
        )
        batch.append({"image": image(h, w, seed), "instances": inst})
    return batch


@torch.no_grad()
def _objectness_as_trained(mask_rcnn, batch: List[Dict]) -> List[torch.Tensor]:
    """The objectness logits a trained RPN gives the anchors of `batch`: each anchor's best IoU
    with the image's GT boxes, as a logit (positive above IoU 0.5), in the RPN head's
    per-level layout (N, A, Hl, Wl)."""
    rpn = mask_rcnn.proposal_generator
    images = mask_rcnn.preprocess_image(batch)
    features = mask_rcnn.backbone(images.tensor)
    features = [features[f] for f in rpn.in_features]
    logits = []
    for anchors, feature in zip(rpn.anchor_generator(features), features):  # (Hl * Wl * A, 4)
        n, _, h, w = feature.shape
        ious = [pairwise_iou(anchors, x["instances"].gt_boxes).max(dim=1).values for x in batch]
        iou = torch.stack(ious).view(n, h, w, -1).permute(0, 3, 1, 2)  # (N, A, Hl, Wl)
        logits.append(10.0 * (iou - 0.5))
    return logits


def _rpn_as_trained(mask_rcnn, batch: List[Dict]):
    """Makes Mask R-CNN's RPN propose on `batch` as a trained one does (a forward hook; remove
    it with `.remove()`). Its outputs take the values of `_objectness_as_trained` while their
    gradients stay the head's: the same work, and the proposals of a trained RPN, hence the
    foreground RoIs (up to 128 per image) a trained model's box and mask heads train on. A random
    RPN proposes random anchors, so these heads train on the GT boxes alone (8 per image here)."""
    targets = _objectness_as_trained(mask_rcnn, batch)

    def hook(module, inputs, outputs):
        logits, deltas = outputs
        return [x + (t - x).detach() for x, t in zip(logits, targets)], deltas

    return mask_rcnn.proposal_generator.rpn_head.register_forward_hook(hook)


def training_step(models, repeats: int, size) -> Dict[str, Dict[str, float]]:
    """Seconds of one training iteration (forward, backward, SGD step) on the same batch:
    CondInst in float32 and with MODEL.CONDINST.BF16, Mask R-CNN with its RPN as trained
    (`_rpn_as_trained`) and as random; and the foreground RoIs per image that Mask R-CNN's heads
    trained on in each case."""
    batch = training_batch(*size)
    bf16 = copy.deepcopy(models["condinst"])
    bf16.bf16 = True  # what the config key sets at build
    random_rpn = copy.deepcopy(models["mask_rcnn"])
    hook = _rpn_as_trained(models["mask_rcnn"], batch)
    variants = {
        "condinst": models["condinst"],
        "condinst_bf16": bf16,
        "mask_rcnn": models["mask_rcnn"],
        "mask_rcnn_random_rpn": random_rpn,
    }
    fg_rois = {}
    steps = {}
    for name, model in variants.items():
        model.train()
        # lr 0: random weights would diverge; the step still runs (and is timed) in full.
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9
        )

        def step(name=name, model=model, optimizer=optimizer):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            if name.startswith("mask_rcnn"):
                fg_rois[name] = get_event_storage().latest()["roi_head/num_fg_samples"][0]

        steps[name] = step
    with EventStorage():  # Mask R-CNN logs training statistics there
        seconds = interleaved(steps, repeats)
    hook.remove()
    for model in models.values():
        model.eval()
    return {"seconds": seconds, "fg_rois_per_image": fg_rois}


@torch.no_grad()
def ablations(condinst, repeats: int, size) -> Dict[str, Dict[str, float]]:
    """condinst_d2's two inference speed-ups against what they replace, on the same inputs:
    pasting 100 masks only where they can be on vs the step-by-step chain, and a 256-channel
    3x3 conv in channels-last vs the standard layout."""
    x = image(*size)
    images = condinst.preprocess_image([{"image": x}])
    features = condinst.backbone(images.tensor)
    det = condinst.proposal_generator(images, features)[0][0]
    mask_feats, _ = condinst.mask_branch(features)
    probs = condinst.mask_probabilities(mask_feats, det)
    padded = tuple(images.tensor.shape[-2:])
    paste = interleaved(
        {
            "restricted": lambda: paste_masks(probs, padded, size, size),
            "step_by_step": lambda: paste_masks_by_steps(probs, padded, size, size),
        },
        repeats,
    )
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    feat = torch.randn(1, 256, size[0] // 8, size[1] // 8)
    feat_cl = feat.contiguous(memory_format=torch.channels_last)
    layouts = interleaved(
        {"channels_last": lambda: conv(feat_cl), "standard": lambda: conv(feat)}, repeats
    )
    return {"paste_100_masks": paste, "conv3x3_256": layouts}


@torch.no_grad()
def inference_options(condinst, repeats: int, size) -> Dict[str, float]:
    """CondInst end to end on the same image: as built (float32), with its batch norms folded
    (MODEL.CONDINST.FOLD_BATCHNORM) and with its dense convolutions in bf16 (MODEL.CONDINST.BF16)."""
    folded = copy.deepcopy(condinst)
    fold_batchnorm(folded)
    bf16 = copy.deepcopy(condinst)
    bf16.bf16 = True  # what the config key sets at build
    inputs = [{"image": image(*size)}]
    fns = {"float32": condinst, "folded": folded, "bf16": bf16}
    return interleaved({name: lambda m=m: m(inputs) for name, m in fns.items()}, repeats)


def conv_throughput(repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large 3x3 conv (256 -> 256 channels on 100x152) in its faster memory layout:
    this machine's reference rate in `dtype`. bfloat16 is timed in channels-last only: without
    bf16 hardware, its standard layout falls back to a path about 40x slower still."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dtype)
    x = torch.randn(1, 256, 100, 152, dtype=dtype)
    layouts = (
        [torch.channels_last]
        if dtype == torch.bfloat16
        else [torch.contiguous_format, torch.channels_last]
    )
    with torch.no_grad():
        seconds = min(
            median_time(lambda f=f: conv(x.contiguous(memory_format=f)), repeats) for f in layouts
        )
    return 2 * 256 * 256 * 9 * 100 * 152 / seconds


@torch.no_grad()
def flops(model, size) -> float:
    analysis = FlopCountAnalysis(model, [{"image": image(*size)}])
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return 2 * analysis.total()  # fvcore counts multiply-adds


def peak_memory(name: str, size, onnx_file: Optional[str] = None) -> float:
    """MiB of peak resident memory added by one inference on an image of `size` (own process):
    `build(name)` calibrated on that image, or with name "onnx" ONNX Runtime on `onnx_file`."""
    if name == "onnx":
        return _run_memory_worker(name, size, ["--onnx-file", onnx_file])
    with tempfile.TemporaryDirectory() as folder:
        # Calibrated here: the worker's only inference is the one measured.
        weights = os.path.join(folder, "calibrated.pth")
        torch.save(build(name, image(*size))[0].state_dict(), weights)
        return _run_memory_worker(name, size, ["--weights-file", weights])


def _run_memory_worker(name: str, size, extra: List[str]) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-worker", name, "--large-size", *map(str, size)]
        + extra,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _resident_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS: now, VmHWM: peak of this process image)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _memory_worker(name: str, size, model_file: str, threads: int) -> None:
    # VmHWM, unlike getrusage's ru_maxrss, does not inherit the parent's peak across fork + exec.
    if name == "onnx":
        runtime = CondInstOnnx(model_file, threads=threads)
        x = image(*size).round().to(torch.uint8).numpy()
        before = _resident_mib("VmRSS")
        detections = len(runtime.run(x, size).scores)
        print(json.dumps({"peak_mib": _resident_mib("VmHWM") - before, "detections": detections}))
        return
    model, _ = build(name, None)
    model.load_state_dict(torch.load(model_file))
    x = image(*size)
    before = _resident_mib("VmRSS")
    with torch.no_grad():
        detections = len(model([{"image": x}])[0]["instances"])
    print(json.dumps({"peak_mib": _resident_mib("VmHWM") - before, "detections": detections}))


@torch.no_grad()
def onnx_runtime(
    condinst, repeats: int, size, large_size, threads: int, pytorch_peak_mib: float
) -> Dict:
    """ONNX Runtime on the exported `condinst` vs `condinst` itself: latency at `size` on the
    same uint8 image (runs interleaved) and peak memory at `large_size` (own process), next to
    PyTorch's `pytorch_peak_mib` measured the same way."""
    x = image(*size).round().to(torch.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "condinst.onnx")
        with open(path, "wb") as f:
            f.write(
                export_onnx(
                    condinst,
                    x,
                    {
                        "input_format": "BGR",
                        "min_size_test": "0",
                        "max_size_test": "0",
                        "class_names": "[]",
                    },
                ).SerializeToString()
            )
        runtime = CondInstOnnx(path, threads=threads)
        inputs = [{"image": x.float()}]
        fns = {
            "onnxruntime": lambda: runtime.run(x.numpy(), size),
            "pytorch": lambda: condinst(inputs),
        }
        counts = {
            "onnxruntime": len(fns["onnxruntime"]().scores),
            "pytorch": len(fns["pytorch"]()[0]["instances"]),
        }
        times = interleaved(fns, repeats)
        memory = {
            "onnxruntime": peak_memory("onnx", large_size, path),
            "pytorch": pytorch_peak_mib,
        }
    return {
        "seconds": times,
        "detections": counts,
        "peak_memory_mib": memory,
        "onnxruntime_version": onnxruntime.__version__,
    }


# The project's targets for each ratio (CondInst / Mask R-CNN, or latency / FLOP floor).
TARGETS = {  # ratios at most these; bf16_speedup (float32 / bf16 latency) at least
    "end_to_end": 0.6,
    "mask_stage_100": 0.35,
    "slope": 0.33,
    "training": 0.8,
    "peak_memory": 0.5,
    "flop_floor": 1.2,
    "bf16_speedup": 1.6,
    "onnx_latency": 0.8,
    "onnx_memory": 1.0,
}


def _verdict(ratio: float, target: Optional[float]) -> str:
    """'<= target: met' / 'not met' for a ratio, or '' when it has no target."""
    if target is None:
        return ""
    return f"<= {target:.2f}: {'met' if ratio <= target else 'NOT MET'}"


def _row(
    name: str, condinst: float, mask_rcnn: float, unit: str = "s", target: Optional[float] = None
) -> str:
    ratio = condinst / mask_rcnn
    return f"| {name} | {condinst:.3f} {unit} | {mask_rcnn:.3f} {unit} | {ratio:.2f}x | {_verdict(ratio, target)} |"


def report(r: Dict) -> str:
    e2e, masks, train, mem = r["end_to_end"], r["mask_stage"], r["training"], r["peak_memory_mib"]
    size, large = r["size"], r["large_size"]
    rows = [
        "| measurement | CondInst | Mask R-CNN | CondInst / Mask R-CNN | target |",
        "|---|---|---|---|---|",
        _row(
            f"inference {size[0]}x{size[1]} ({e2e['condinst']['detections']} vs "
            f"{e2e['mask_rcnn']['detections']} detections)",
            e2e["condinst"]["seconds"],
            e2e["mask_rcnn"]["seconds"],
            target=TARGETS["end_to_end"],
        ),
    ]
    for k, t in masks.items():
        target = TARGETS["mask_stage_100"] if int(k) == 100 else None
        rows.append(
            _row(f"mask stage, K={k}", t["condinst"] * 1e3, t["mask_rcnn"] * 1e3, "ms", target)
        )
    rows.append(
        _row(
            "mask stage slope per instance",
            r["slope_ms"]["condinst"],
            r["slope_ms"]["mask_rcnn"],
            "ms",
            TARGETS["slope"],
        )
    )
    seconds, fg_rois = train["seconds"], train["fg_rois_per_image"]
    for name, rpn, target in (
        ("mask_rcnn", "as trained", TARGETS["training"]),
        ("mask_rcnn_random_rpn", "random", None),
    ):
        label = f"training iteration (2 images {size[0]}x{size[1]}; Mask R-CNN's RPN {rpn}: "
        label += f"{fg_rois[name]:.0f} foreground RoIs per image)"
        rows.append(_row(label, seconds["condinst"], seconds[name], target=target))
    rows.append(
        _row(
            f"peak inference memory {large[0]}x{large[1]}",
            mem["condinst"],
            mem["mask_rcnn"],
            "MiB",
            TARGETS["peak_memory"],
        )
    )
    hw = r["hardware"]
    floor_ratio = e2e["condinst"]["seconds"] / (hw["condinst_gflops"] / hw["conv_gflops"])
    rows += [
        "",
        f"3x3 conv throughput: {hw['conv_gflops']:.0f} GFLOP/s; CondInst {hw['condinst_gflops']:.0f} GFLOPs "
        f"-> {hw['condinst_gflops'] / hw['conv_gflops']:.2f} s at that rate; measured latency / that = "
        f"{floor_ratio:.2f} ({_verdict(floor_ratio, TARGETS['flop_floor'])}) "
        f"(Mask R-CNN: {hw['mask_rcnn_gflops']:.0f} GFLOPs, "
        f"{e2e['mask_rcnn']['seconds'] / (hw['mask_rcnn_gflops'] / hw['conv_gflops']):.2f})",
        f"score threshold 0.05 (both models' default); candidates before NMS at {size[0]}x{size[1]}: "
        f"CondInst {e2e['condinst']['candidates']}, Mask R-CNN {e2e['mask_rcnn']['candidates']}",
        f"threads: {r['threads']}, repeats: {r['repeats']}, torch {torch.__version__}",
        "",
        "CondInst speed-ups against what they replace (same inputs, same run):",
    ]
    paste, conv = r["ablations"]["paste_100_masks"], r["ablations"]["conv3x3_256"]
    rows.append(
        f"  paste {e2e['condinst']['detections']} masks: {paste['restricted'] * 1e3:.1f} ms where they can be on "
        f"vs {paste['step_by_step'] * 1e3:.1f} ms step by step ({paste['step_by_step'] / paste['restricted']:.1f}x)"
    )
    rows.append(
        f"  3x3 conv 256 ch: {conv['channels_last'] * 1e3:.1f} ms channels-last vs {conv['standard'] * 1e3:.1f} ms "
        f"standard layout ({conv['standard'] / conv['channels_last']:.2f}x)"
    )
    opts = r["ablations"]["inference_options"]
    bf16_floor = opts["bf16"] / (hw["condinst_gflops"] / hw["conv_gflops_bf16"])
    speedup = opts["float32"] / opts["bf16"]
    met = "met" if speedup >= TARGETS["bf16_speedup"] else "NOT MET"
    rows.append(
        f"  inference options, end to end: {opts['float32'] * 1e3:.0f} ms float32, "
        f"{opts['folded'] * 1e3:.0f} ms batch norms folded ({opts['float32'] / opts['folded']:.2f}x), "
        f"{opts['bf16'] * 1e3:.0f} ms bf16 ({speedup:.2f}x, >= {TARGETS['bf16_speedup']}: {met}; 3x3 conv "
        f"{hw['conv_gflops_bf16']:.0f} GFLOP/s in bf16 vs {hw['conv_gflops']:.0f} in float32; "
        f"bf16 latency / its FLOP floor at the bf16 rate = {bf16_floor:.2f})"
    )
    rows.append(
        f"  training iteration: {seconds['condinst']:.2f} s float32, {seconds['condinst_bf16']:.2f} s "
        f"bf16 ({seconds['condinst'] / seconds['condinst_bf16']:.2f}x)"
    )
    if "onnx" in r:
        rows += ["", *onnx_report(r["onnx"], size, large)]
    return "\n".join(rows)


def onnx_report(o: Dict, size, large) -> List[str]:
    """The ONNX Runtime table: exported CondInst vs the same model in PyTorch."""
    t, n, mem = o["seconds"], o["detections"], o["peak_memory_mib"]
    return [
        "| CondInst R-50 | ONNX Runtime | PyTorch | ONNX Runtime / PyTorch | target |",
        "|---|---|---|---|---|",
        _row(
            f"inference {size[0]}x{size[1]} ({n['onnxruntime']} vs {n['pytorch']} detections)",
            t["onnxruntime"],
            t["pytorch"],
            target=TARGETS["onnx_latency"],
        ),
        _row(
            f"peak inference memory {large[0]}x{large[1]}",
            mem["onnxruntime"],
            mem["pytorch"],
            "MiB",
            TARGETS["onnx_memory"],
        ),
        f"onnxruntime {o['onnxruntime_version']}",
    ]


def plot(r: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(r["mask_stage"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in (("condinst", "CondInst"), ("mask_rcnn", "Mask R-CNN")):
        ax.plot(ks, [r["mask_stage"][k][name] * 1e3 for k in ks], "o-", label=label)
    ax.set(
        xlabel="instances",
        ylabel="mask stage (ms)",
        title=f"Mask stage at {r['size'][0]}x{r['size'][1]}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _progress(what: str, value) -> None:
    print(f"[benchmark] {what}: {json.dumps(value)}", file=sys.stderr, flush=True)


def run(threads: int, repeats: int, size=SIZE, large_size=LARGE, onnx: bool = False) -> Dict:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    built = {name: build(name, image(*size)) for name in ("condinst", "mask_rcnn")}
    models = {name: model for name, (model, _) in built.items()}
    r = {"threads": threads, "repeats": repeats, "size": list(size), "large_size": list(large_size)}
    r["end_to_end"] = end_to_end(models, repeats, size)
    for name, (_, candidates) in built.items():
        r["end_to_end"][name]["candidates"] = candidates
    _progress("end to end", r["end_to_end"])
    r["mask_stage"] = mask_stage(models["condinst"], models["mask_rcnn"], repeats, size)
    r["slope_ms"] = {
        n: (r["mask_stage"][100][n] - r["mask_stage"][1][n]) / 99 * 1e3 for n in models
    }
    _progress("mask stage", r["mask_stage"])
    r["training"] = training_step(models, (repeats + 1) // 2, size)
    _progress("training", r["training"])
    r["hardware"] = {
        "conv_gflops": conv_throughput(repeats) / 1e9,
        "conv_gflops_bf16": conv_throughput(max(1, repeats // 5), torch.bfloat16) / 1e9,
        "condinst_gflops": flops(models["condinst"], size) / 1e9,
        "mask_rcnn_gflops": flops(models["mask_rcnn"], size) / 1e9,
    }
    _progress("hardware", r["hardware"])
    r["ablations"] = ablations(models["condinst"], repeats, size)
    r["ablations"]["inference_options"] = inference_options(models["condinst"], repeats, size)
    _progress("ablations", r["ablations"])
    r["peak_memory_mib"] = {n: peak_memory(n, large_size) for n in models}
    if onnx:
        r["onnx"] = onnx_runtime(
            models["condinst"], repeats, size, large_size, threads, r["peak_memory_mib"]["condinst"]
        )
        _progress("onnx", r["onnx"])
    return r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both models")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement")
    parser.add_argument("--plot", help="write a PNG of the mask stage times")
    parser.add_argument("--json", help="write all measurements as JSON")
    parser.add_argument(
        "--size", type=int, nargs=2, default=SIZE, metavar=("H", "W"), help="inference input"
    )
    parser.add_argument(
        "--large-size",
        type=int,
        nargs=2,
        default=LARGE,
        metavar=("H", "W"),
        help="peak-memory input",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also ONNX Runtime vs PyTorch (exports CondInst)"
    )
    parser.add_argument(
        "--memory-worker", choices=["condinst", "mask_rcnn", "onnx"], help=argparse.SUPPRESS
    )
    parser.add_argument("--onnx-file", help=argparse.SUPPRESS)
    parser.add_argument("--weights-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        torch.set_num_threads(args.threads)
        model_file = args.onnx_file if args.memory_worker == "onnx" else args.weights_file
        _memory_worker(args.memory_worker, args.large_size, model_file, args.threads)
        return 0
    results = run(args.threads, args.repeats, tuple(args.size), tuple(args.large_size), args.onnx)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
