"""train_net.py and the training pipeline: datasets from the command line, 2 CPU processes over
gloo (and Detectron2 left as it was), the data mapper on unusual images, learning on real photos,
eval-only on real COCO images."""

import json
import re
import subprocess
import sys

import cv2
import detectron2.engine
import detectron2.engine.defaults as d2_defaults
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.engine.hooks import CallbackHook
from detectron2.modeling import build_model

from condinst_d2.data import CondInstDatasetMapper, register_coco_dataset, write_coco_split
from condinst_d2.engine import Trainer, build_cfg
from condinst_d2.modeling import meta_arch

from helpers import ROOT, SHARED, write_boxes_only

SMALL = str(ROOT / "configs" / "CondInst" / "Small_R_18_CPU.yaml")
EFFICIENTNET = str(ROOT / "configs" / "CondInst" / "EfficientNetLite0_CPU.yaml")
EFFICIENTNET_BOXINST = str(ROOT / "configs" / "BoxInst" / "EfficientNetLite0_CPU.yaml")
# What BoxInst learns from boxes: the mask branch and the controller (checkpoint key prefixes).
MASK_PARTS = ("mask_branch.", "proposal_generator.fcos_head.controller.")
# 50 iterations from the detector at half its learning rate, after a 20-iteration warm-up, each
# parameter's gradient clipped to norm 1: without the clipping, the new masks went empty in 3 of 8
# runs of 40 iterations, when `loss_prj` started to fall (README, BoxInst).
BOXINST_RUN = ["SOLVER.MAX_ITER", 50, "SOLVER.BASE_LR", 0.005, "SOLVER.WARMUP_ITERS", 20]
BOXINST_RUN += ["SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm"]
BOXINST_RUN += ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0]
SEGM_FLOOR = 3  # the untrained mask branch gives 0.0
FRUITS = SHARED / "datasets" / "fruits_nuts" / "data"
COCO_SUBSET = SHARED / "datasets" / "coco_val2017_subset"


def _train_net(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "train_net.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train = write_coco_split(str(root), "train", 8, (128, 160), seed=0)
    test = write_coco_split(str(root), "test", 4, (128, 160), seed=1)
    return (train, str(root / "train")), (test, str(root / "test"))


def test_two_cpu_processes_train_with_ddp_and_evaluate(shapes, tmp_path):
    (train_json, train_dir), (test_json, test_dir) = shapes
    result = _train_net(
        "--num-gpus",
        2,
        "--config-file",
        SMALL,
        "--train-dataset",
        train_json,
        train_dir,
        "--test-dataset",
        test_json,
        test_dir,
        "SOLVER.MAX_ITER",
        3,
        "SOLVER.IMS_PER_BATCH",
        4,
        "INPUT.MIN_SIZE_TRAIN",
        "(128,)",
        "INPUT.MIN_SIZE_TEST",
        128,
        "MODEL.FCOS.INFERENCE_TH_TEST",
        0.0,
        "OUTPUT_DIR",
        tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "World size: 2" in log
    assert (
        "DistributedDataParallel over 2 CPU processes (gloo)" in (tmp_path / "log.txt").read_text()
    )
    assert (tmp_path / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    trained = [m["iteration"] for m in metrics if "total_loss" in m]
    assert max(trained) == 2 and all(
        np.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m
    )
    assert re.search(r"Total inference time: .* on 2 devices", log)
    assert "Evaluation results for segm" in log and "Evaluation results for bbox" in log
    # The class names come from the JSON, and travel with the run; the AP tables are kept.
    assert "circle" in log and "triangle" in log
    assert "- triangle" in (tmp_path / "config.yaml").read_text()
    assert (
        torch.load(tmp_path / "model_final.pth", weights_only=False)["class_names"][2] == "triangle"
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"bbox", "segm"} and np.isfinite(results["segm"]["AP"])
    # Dataset names from the JSON's stem: results under a short path.
    assert (tmp_path / "inference" / "test_test" / "coco_instances_results.json").is_file()


def _one_iteration_cfg(shapes, output_dir):
    opts = ["SOLVER.MAX_ITER", 1, "INPUT.MIN_SIZE_TRAIN", "(128,)", "OUTPUT_DIR", str(output_dir)]
    return build_cfg(SMALL, opts, train_dataset=shapes[0])


def test_trainer_overrides_create_ddp_model_only_while_it_is_built(shapes, tmp_path):
    original = detectron2.engine.create_ddp_model  # bound when detectron2.engine was imported
    assert d2_defaults.create_ddp_model is original  # after importing condinst_d2
    during = []

    class RecordingTrainer(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):  # DefaultTrainer.__init__ calls it
            during.append(d2_defaults.create_ddp_model)
            return super().build_train_loader(cfg)

    RecordingTrainer(_one_iteration_cfg(shapes, tmp_path))
    assert during[0] is not original  # the CPU-aware wrapper
    assert d2_defaults.create_ddp_model is original


def test_cpu_training_flushes_denormals_and_restores_the_setting(shapes, tmp_path):
    def denormals_kept() -> bool:
        return torch.tensor([1e-39]).mul(1.0).item() != 0.0

    torch.set_flush_denormal(False)
    trainer = Trainer(_one_iteration_cfg(shapes, tmp_path))
    during = []
    trainer.register_hooks([CallbackHook(after_step=lambda _: during.append(denormals_kept()))])
    trainer.train()
    assert during == [False]
    assert denormals_kept()


def test_dataset_arguments_fail_clearly(tmp_path):
    missing = tmp_path / "missing.json"
    result = _train_net("--config-file", SMALL, "--train-dataset", missing, tmp_path, timeout=120)
    assert (
        result.returncode != 0
        and "missing.json" in result.stderr
        and "does not exist" in result.stderr
    )
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not_coco.json.*not a COCO instance JSON"):
        register_coco_dataset("t", str(not_coco), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        register_coco_dataset("t", str(broken), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no_images_here"):
        register_coco_dataset("t", str(not_coco), str(tmp_path / "no_images_here"))


def test_mapper_and_model_handle_crowd_only_and_unannotated_images(shapes, tmp_path):
    (train_json, train_dir), _ = shapes
    data = json.loads(open(train_json).read())
    first, second, third = data["images"][:3]
    keep = [a for a in data["annotations"] if a["image_id"] == first["id"]]
    crowd_mask = np.zeros((128, 160), dtype=np.uint8, order="F")
    crowd_mask[10:30, 10:30] = 1
    rle = mask_util.encode(crowd_mask)
    rle["counts"] = rle["counts"].decode()
    crowd = {
        "id": 10_000,
        "image_id": second["id"],
        "category_id": 1,
        "iscrowd": 1,
        "area": 400.0,
        "bbox": [10, 10, 20, 20],
        "segmentation": rle,
    }
    data.update(images=[first, second, third], annotations=keep + [crowd])
    path = tmp_path / "unusual.json"
    path.write_text(json.dumps(data))
    cfg = build_cfg(
        SMALL,
        [
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
            False,
            "SOLVER.IMS_PER_BATCH",
            3,
            "INPUT.MIN_SIZE_TRAIN",
            "(128,)",
        ],
        train_dataset=(str(path), train_dir),
    )
    batch = next(iter(build_detection_train_loader(cfg)))
    assert sorted(len(x["instances"]) for x in batch) == [0, 0, len(keep)]
    model = build_model(cfg).train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0


FRUITS_RUN = ["INPUT.MIN_SIZE_TRAIN", "(256, 288, 320)", "INPUT.MIN_SIZE_TEST", 288]
FRUITS_RUN += ["DATALOADER.NUM_WORKERS", 0, "SEED", 1]


def _train_fruits(out, opts):
    """Fast version of the README's fruits_nuts run: CondInst, 60 iterations on the 18 photos,
    with the config overrides `opts`. Returns its total losses, its results, its
    model_final.pth and the per-iteration values of every logged loss (name -> list)."""
    if not FRUITS.is_dir():
        pytest.skip(f"fruits_nuts dataset not at {FRUITS}")
    dataset = (str(FRUITS / "trainval.json"), str(FRUITS / "images"))
    opts = ["SOLVER.MAX_ITER", 60, "SOLVER.STEPS", "(48,)", "SOLVER.WARMUP_ITERS", 20] + opts
    cfg = build_cfg(
        EFFICIENTNET,
        opts + FRUITS_RUN + ["OUTPUT_DIR", str(out)],
        train_dataset=dataset,
        test_dataset=dataset,
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    histories = trainer.storage.histories()
    logged = {k: [v for v, _ in h.values()] for k, h in histories.items() if "loss" in k}
    return logged["total_loss"], results, out / "model_final.pth", logged


@pytest.fixture(scope="module")
def fruits_condinst(tmp_path_factory):
    """`_train_fruits`, logging the FCOS losses by level."""
    out = tmp_path_factory.mktemp("fruits_condinst")
    return _train_fruits(out, ["MODEL.FCOS.LOG_LEVEL_LOSSES", True])


def test_learns_on_real_photos_fruits_nuts(fruits_condinst):
    """The loss halves and segm AP exceeds 5."""
    losses, results, _, _ = fruits_condinst
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / 2, (first, last)
    assert results["segm"]["AP"] > 5, results
    assert results["bbox"]["AP"] > 5, results


def test_learns_in_bf16_on_real_photos_fruits_nuts(tmp_path):
    """MODEL.CONDINST.BF16 training: the loss halves, the box loss leaves its initial value,
    and segm and bbox AP exceed 5."""
    if not meta_arch._cpu_has_bf16():
        pytest.skip("this CPU has no bf16 arithmetic: bf16 training would be several times slower")
    losses, results, _, logged = _train_fruits(tmp_path, ["MODEL.CONDINST.BF16", True])
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / 2, (first, last)
    box = logged["loss_fcos_loc"]
    assert np.mean(box[-10:]) < 0.7 * np.mean(box[:10]), box
    assert results["segm"]["AP"] > 5, results
    assert results["bbox"]["AP"] > 5, results


def test_fcos_losses_by_level_add_up_and_are_plotted(fruits_condinst, tmp_path):
    """MODEL.FCOS.LOG_LEVEL_LOSSES: every iteration, the levels' shares sum to each FCOS loss;
    plot_metrics.py adds the row of losses by level."""
    _, _, weights, logged = fruits_condinst
    levels = ["p3", "p4", "p5", "p6", "p7"]
    for name in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
        shares = np.array([logged[f"fcos_{level}/{name}"] for level in levels])
        np.testing.assert_allclose(shares.sum(0), logged[name], rtol=1e-4, err_msg=name)
    output = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(weights.parent)]
        + ["--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(output)).shape == (900, 1800, 3), "2 rows of 3 panels"


def test_boxinst_learns_masks_from_the_boxes_of_real_photos(fruits_condinst, tmp_path):
    """Short version of the README's BoxInst fruits_nuts run. A BoxInst learning from scratch
    finds objects only after a few hundred iterations, so this one starts from the detector
    above (backbone, FCOS) with a new mask branch and controller, trains them on the photos'
    boxes alone, and is evaluated against the real masks: its masks come from the boxes."""
    _, _, condinst_weights, _ = fruits_condinst
    detector = tmp_path / "detector.pth"
    state = torch.load(condinst_weights, weights_only=False)["model"]
    torch.save(
        {"model": {k: v for k, v in state.items() if not k.startswith(MASK_PARTS)}}, detector
    )
    images = str(FRUITS / "images")
    boxes_only = write_boxes_only(json.loads((FRUITS / "trainval.json").read_text()), tmp_path)
    opts = [
        "MODEL.WEIGHTS",
        str(detector),
        "SOLVER.STEPS",
        "()",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    cfg = build_cfg(
        EFFICIENTNET_BOXINST,
        [str(x) for x in opts + BOXINST_RUN + FRUITS_RUN],
        train_dataset=(boxes_only, images),
        test_dataset=(str(FRUITS / "trainval.json"), images),
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    untrained = trainer.test(cfg, trainer.model)["segm"]["AP"]
    results = trainer.train()
    prj = [v for v, _ in trainer.storage.history("loss_prj").values()]
    assert np.isfinite(prj).all() and np.mean(prj[-5:]) < np.mean(prj[:5]) / 2, prj
    assert results["segm"]["AP"] > untrained + SEGM_FLOOR, (untrained, results)


@pytest.mark.skipif(not COCO_SUBSET.is_dir(), reason=f"COCO val2017 subset not at {COCO_SUBSET}")
def test_eval_only_on_real_coco_images_with_random_r50(tmp_path):
    result = _train_net(
        "--eval-only",
        "--config-file",
        ROOT / "configs" / "CondInst" / "MS_R_50_1x.yaml",
        "--test-dataset",
        COCO_SUBSET / "annotations" / "instances_val2017_subset.json",
        COCO_SUBSET / "val2017",
        "MODEL.WEIGHTS",
        "",
        "MODEL.FCOS.INFERENCE_TH_TEST",
        0.0,
        "MODEL.FCOS.POST_NMS_TOPK_TEST",
        20,  # 164 images x 20 detections: the evaluation's cost stays small
        "INPUT.MIN_SIZE_TEST",
        128,
        "INPUT.MAX_SIZE_TEST",
        192,
        "OUTPUT_DIR",
        tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Start inference on 164 batches" in log
    for task in ("bbox", "segm"):
        assert f"Evaluation results for {task}" in log
        assert re.search(
            rf"copypaste: Task: {task}\n.*\n.*copypaste: (\d+\.\d+,){{5}}\d+\.\d+", log
        )
    results = (
        tmp_path / "inference" / "test_instances_val2017_subset" / "coco_instances_results.json"
    )
    assert results.is_file()
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"bbox", "segm"}


def test_bitmask_ground_truth_trains_like_polygons(shapes):
    """INPUT.MASK_FORMAT bitmask: the mapper gives BitMasks, which CondInst pads to the batch."""
    losses = {}
    for mask_format in ("polygon", "bitmask"):
        cfg = build_cfg(
            SMALL,
            [
                "INPUT.MASK_FORMAT",
                mask_format,
                "SOLVER.IMS_PER_BATCH",
                2,
                "INPUT.MIN_SIZE_TRAIN",
                "(128,)",
                "INPUT.RANDOM_FLIP",
                "none",
                "DATALOADER.NUM_WORKERS",
                0,
            ],
            train_dataset=shapes[0],
        )
        mapper = CondInstDatasetMapper(cfg, is_train=True)
        batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
        assert (
            type(batch[0]["instances"].gt_masks).__name__
            == {"polygon": "PolygonMasks", "bitmask": "BitMasks"}[mask_format]
        )
        torch.manual_seed(0)
        model = build_model(cfg).train()
        losses[mask_format] = {k: v.item() for k, v in model(batch).items()}
    for key, value in losses["polygon"].items():  # the same masks, rasterised in two places
        assert losses["bitmask"][key] == pytest.approx(value, rel=0.05), key
