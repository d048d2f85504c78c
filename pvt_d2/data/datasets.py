"""Dataset registration and the check that a config's datasets are present."""
import os
from typing import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog

from .synthetic import ensure_synthetic_dataset, register_synthetic_datasets

__all__ = ["DatasetNotFoundError", "register_all", "prepare_datasets"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset named in the config is not on disk; the message says how to set it up."""


def register_all() -> None:
    """Register pvt_d2's own datasets next to detectron2's builtin ones (COCO etc.)."""
    import detectron2.data.datasets.builtin  # noqa: F401  (registers coco_2017_* at import)

    register_synthetic_datasets()


def prepare_datasets(names: Iterable[str]) -> None:
    """Make sure every dataset in ``names`` can be loaded, before any model is built.

    The synthetic set is generated if needed. For file-based datasets (COCO and
    anything registered with ``json_file`` / ``image_root`` metadata) missing
    files raise :class:`DatasetNotFoundError` naming the paths and the fix.

    Raises:
        KeyError: a name that is not registered at all.
        DatasetNotFoundError: files of a registered dataset are missing.
    """
    register_all()
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(f"Dataset '{name}' is not registered. Registered datasets include: "
                           f"{', '.join(sorted(n for n in DatasetCatalog.list() if 'coco_2017' in n or 'synthetic' in n))}")
        meta = MetadataCatalog.get(name)
        if meta.get("synthetic", False):
            ensure_synthetic_dataset()
            continue
        missing = [p for p in (meta.get("json_file"), meta.get("image_root")) if p and not os.path.exists(p)]
        if missing:
            root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
            raise DatasetNotFoundError(
                f"Dataset '{name}' not found: missing {', '.join(missing)}.\n"
                f"pvt_d2 looks for datasets under $DETECTRON2_DATASETS (now: {os.path.abspath(root)}). "
                f"For COCO 2017, download train2017/, val2017/ and annotations/ from cocodataset.org and lay them out as\n"
                f"  {os.path.abspath(root)}/coco/annotations/instances_{{train,val}}2017.json\n"
                f"  {os.path.abspath(root)}/coco/{{train2017,val2017}}/*.jpg\n"
                f"or set DETECTRON2_DATASETS to the folder that contains coco/. "
                f"See datasets/README.md. To try pvt_d2 without COCO, use the built-in set: "
                f"DATASETS.TRAIN \"('synthetic_train',)\" DATASETS.TEST \"('synthetic_val',)\".")
