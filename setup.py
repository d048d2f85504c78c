"""Install pvt_d2: pyramid vision transformer and MLP backbones for detectron2.

The configs are edited in the repository's top-level ``configs/`` and shipped
inside the package as ``pvt_d2/model_zoo/configs`` (as detectron2 ships its
own): a link in the checkout, followed when the wheel is built. detectron2 is
not on PyPI under its own name, so it is not a requirement here: ``install.sh``
installs it (see README.md); ``import pvt_d2`` without it says how.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def model_zoo_configs():
    """Make ``pvt_d2/model_zoo/configs`` point at ``configs/`` (link, or a copy where links fail); its files."""
    source = os.path.join(HERE, "configs")
    target = os.path.join(HERE, "pvt_d2", "model_zoo", "configs")
    if os.path.isdir(source) and not os.path.exists(target):
        try:
            os.symlink(os.path.join("..", "..", "configs"), target)
        except OSError:
            shutil.copytree(source, target)
    files = glob.glob(os.path.join(target, "**", "*.yaml"), recursive=True)
    files += glob.glob(os.path.join(target, "**", "*.py"), recursive=True)
    return [os.path.relpath(f, os.path.dirname(target)) for f in files]


COMMANDS = {
    "pvt-d2-train": "train_net:cli",
    "pvt-d2-evaluate": "train_net:evaluate_cli",
    "pvt-d2-lazy-train": "lazyconfig_train_net:cli",
    "pvt-d2-quickstart": "quickstart:main",
    "pvt-d2-demo": "demo:main",
    "pvt-d2-export": "export_model:main",
    "pvt-d2-convert": "convert_pretrained:main",
    "pvt-d2-benchmark": "benchmark:main",
    "pvt-d2-benchmark-timm": "benchmark_timm:main",
    "pvt-d2-analyze": "analyze_model:main",
    "pvt-d2-plot-metrics": "plot_metrics:main",
    "pvt-d2-report": "eval_report:main",
    "pvt-d2-visualize-data": "visualize_data:main",
    "pvt-d2-visualize-results": "visualize_json_results:main",
}

setup(
    name="pvt_d2",
    version="0.1.0",
    description="PVT, PVTv2, Twins, LeViT, GC ViT and Vision Permutator backbones for detectron2",
    packages=find_packages(include=["pvt_d2", "pvt_d2.*"]),
    package_data={"pvt_d2.model_zoo": model_zoo_configs()},
    python_requires=">=3.9",
    # what pvt_d2 imports at run time (torch / torchvision: pick the build for your machine first, see README.md)
    install_requires=["torch>=2.1", "torchvision", "timm>=1.0", "safetensors", "fvcore", "pycocotools",
                      "opencv-python-headless", "numpy", "Pillow", "matplotlib", "omegaconf>=2.1", "hydra-core",
                      "PyYAML", "tabulate", "tqdm"],
    # pvt-d2-export --format onnx (onnxscript: torch.onnx; onnxruntime: runs the check)
    extras_require={"onnx": ["onnx", "onnxscript", "onnxruntime"]},
    entry_points={"console_scripts": [f"{name} = pvt_d2.cli.{target}" for name, target in COMMANDS.items()]},
)
