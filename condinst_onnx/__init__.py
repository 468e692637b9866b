"""condinst_onnx: run a CondInst model exported by condinst_d2's tools/export_onnx.py.

Needs only onnxruntime, numpy and opencv (no torch, no detectron2):

    from condinst_onnx import CondInstOnnx
    model = CondInstOnnx("model.onnx")
    det = model(cv2.imread("photo.jpg"))  # boxes (D, 4), scores, classes, masks (D, H, W) bool
"""

from .runtime import CondInstOnnx, Detections, NotCondInstOnnxError, resized_size

__all__ = ["CondInstOnnx", "Detections", "NotCondInstOnnxError", "resized_size"]
