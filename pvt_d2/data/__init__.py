"""Datasets: the built-in synthetic set, the presence and sanity checks, and the robust mapper."""
from .datasets import (DatasetError, DatasetNotFoundError, UnknownDatasetError, check_num_classes,
                       load_dataset_dicts, prepare_datasets, register_all)
from .mapper import BadImageError, RobustDatasetMapper
from .synthetic import CLASSES, dataset_root, ensure_synthetic_dataset, register_synthetic_datasets
from .validation import check_coco_json, check_datasets_for_config

__all__ = [
    "BadImageError",
    "CLASSES",
    "DatasetError",
    "DatasetNotFoundError",
    "RobustDatasetMapper",
    "UnknownDatasetError",
    "check_coco_json",
    "check_datasets_for_config",
    "check_num_classes",
    "dataset_root",
    "ensure_synthetic_dataset",
    "load_dataset_dicts",
    "prepare_datasets",
    "register_all",
    "register_synthetic_datasets",
]

register_all()
