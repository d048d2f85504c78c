"""Install pvt_d2: pyramid vision transformer and MLP backbones for detectron2."""
from setuptools import find_packages, setup

setup(
    name="pvt_d2",
    version="0.1.0",
    description="PVT, PVTv2, Twins, LeViT, GC ViT and Vision Permutator backbones for detectron2",
    packages=find_packages(include=["pvt_d2", "pvt_d2.*"]),
    python_requires=">=3.9",
    install_requires=["timm>=1.0", "safetensors", "fvcore", "pycocotools", "opencv-python-headless"],
    # tools/export_model.py --format onnx (onnxscript: torch.onnx; onnxruntime: runs the check)
    extras_require={"onnx": ["onnx", "onnxscript", "onnxruntime"]},
    include_package_data=True,
)
