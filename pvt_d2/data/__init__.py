"""Datasets: the built-in synthetic set and the presence check for COCO."""
from .datasets import DatasetNotFoundError, prepare_datasets, register_all
from .synthetic import CLASSES, dataset_root, ensure_synthetic_dataset, register_synthetic_datasets

register_all()
