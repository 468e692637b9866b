"""condinst_d2: CondInst (Tian, Shen, Chen, ECCV 2020) as a Detectron2 project extension."""

import os
import re

from setuptools import find_packages, setup


def _version() -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "condinst_d2", "__init__.py")
    with open(path) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="condinst_d2",
    version=_version(),
    description="CondInst instance segmentation for Detectron2, faithful to the authors' model zoo",
    # condinst_onnx: the torch-free runtime of exported ONNX models.
    packages=find_packages(include=["condinst_d2", "condinst_d2.*", "condinst_onnx"]),
    python_requires=">=3.10",
    # detectron2 is deliberately not listed: users keep the one they built; install.sh adds one.
    install_requires=["torch>=2.0", "torchvision", "fvcore", "pycocotools", "opencv-python"],
    extras_require={"test": ["pytest"]},
)
