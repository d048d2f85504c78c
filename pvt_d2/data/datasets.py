"""Dataset registration, the check that a config's datasets are present and usable."""
import os
from typing import Iterable, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .synthetic import ensure_synthetic_dataset, register_synthetic_datasets

__all__ = ["DatasetNotFoundError", "DatasetError", "UnknownDatasetError", "register_all", "prepare_datasets",
           "load_dataset_dicts", "check_num_classes", "check_class_count", "num_classes_key"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset named in the config is not on disk; the message says how to set it up."""


class DatasetError(ValueError):
    """A dataset that is on disk but cannot be used (empty, malformed, wrong class count); the message says why."""


class UnknownDatasetError(DatasetError, KeyError):
    """A dataset name that is not registered (a ``KeyError`` too, as detectron2's catalog raises)."""

    __str__ = ValueError.__str__  # the message as written, not KeyError's quoted repr


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
        UnknownDatasetError: a name that is not registered at all (a ``KeyError``).
        DatasetNotFoundError: files of a registered dataset are missing.
    """
    register_all()
    for name in names:
        if name not in DatasetCatalog.list():
            known = sorted(n for n in DatasetCatalog.list() if "coco_2017" in n or "synthetic" in n)
            raise UnknownDatasetError(f"Dataset '{name}' is not registered. Registered datasets include: "
                                      f"{', '.join(known)}")
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
                f"For COCO 2017, download train2017/, val2017/ and annotations/ from cocodataset.org and lay them "
                f"out as\n"
                f"  {os.path.abspath(root)}/coco/annotations/instances_{{train,val}}2017.json\n"
                f"  {os.path.abspath(root)}/coco/{{train2017,val2017}}/*.jpg\n"
                f"or set DETECTRON2_DATASETS to the folder that contains coco/. "
                f"See datasets/README.md. To try pvt_d2 without COCO, use the built-in set: "
                f"DATASETS.TRAIN \"('synthetic_train',)\" DATASETS.TEST \"('synthetic_val',)\".")


def load_dataset_dicts(names: Sequence[str], **kwargs) -> List[dict]:
    """detectron2's ``get_detection_dataset_dicts`` with its bare assertions turned into :class:`DatasetError`.

    Keyword arguments are passed on (``filter_empty``, ``min_keypoints``, ``proposal_files``).

    Raises:
        DatasetError: a dataset without images, no image left after removing
            those without (non-crowd) annotations, or a malformed annotation
            file (e.g. an annotation whose ``category_id`` is not among its
            ``categories``).
    """
    from detectron2.data import get_detection_dataset_dicts

    names = list(names)
    if not names:
        raise DatasetError("No dataset given (DATASETS.TRAIN / DATASETS.TEST is empty).")
    try:
        return get_detection_dataset_dicts(names, **kwargs)
    except AssertionError as e:
        msg = str(e)
        if "is empty" in msg:
            hint = "its annotation file lists no images"
        elif "No valid data" in msg:
            hint = ("no image has a usable (non-crowd) annotation, and images without one are left out "
                    "in training (DATALOADER.FILTER_EMPTY_ANNOTATIONS True)")
        else:
            hint = "its annotations are inconsistent"
        raise DatasetError(f"Dataset {', '.join(repr(n) for n in names)} cannot be used: {hint} ({msg}).") from None
    except (KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise DatasetError(f"Dataset {', '.join(repr(n) for n in names)} cannot be loaded: {msg}") from None


def num_classes_key(cfg) -> str:
    """The config key holding the number of classes of the configured detector."""
    return ("MODEL.RETINANET.NUM_CLASSES" if cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
            else "MODEL.ROI_HEADS.NUM_CLASSES")


def check_num_classes(cfg, names: Iterable[str], training: bool, load_missing: bool = False) -> None:
    """Compare the detector's number of classes with the datasets' ``thing_classes`` (see :func:`check_class_count`).

    Raises:
        DatasetError: naming the key, its value, the dataset and its classes.
    """
    if cfg.MODEL.META_ARCHITECTURE not in ("RetinaNet", "GeneralizedRCNN"):
        return
    key = num_classes_key(cfg)
    expected = cfg.MODEL.RETINANET.NUM_CLASSES if key.startswith("MODEL.RETINANET") else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    check_class_count(key, expected, names, training, load_missing)


def check_class_count(key: str, expected: int, names: Iterable[str], training: bool, load_missing: bool = False,
                      assign: str = " ") -> None:
    """Compare a model's number of classes (the setting ``key`` = ``expected``) with the datasets' ``thing_classes``.

    A training set may not have more classes than the model (its labels would
    index past the classifier); an evaluation set must have exactly as many
    (COCO evaluation fails on a predicted class the dataset lacks). Datasets
    whose classes are unknown are skipped, unless ``load_missing`` is set: then
    the dataset is loaded once, which records them for COCO-json datasets.

    Args:
        key: the setting, as the user writes it (``MODEL.ROI_HEADS.NUM_CLASSES``, ``model.roi_heads.num_classes``).
        expected: its value.
        names: registered dataset names.
        training: the datasets are training sets.
        load_missing: load a dataset whose classes are not yet known.
        assign: what joins ``key`` and the value in the suggested fix (``" "`` YAML opts, ``"="`` LazyConfig).

    Raises:
        DatasetError: naming the key, its value, the dataset and its classes.
    """
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None and load_missing:
            load_dataset_dicts([name], filter_empty=False)
            classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            continue
        n = len(classes)
        if n > expected or (not training and n != expected):
            shown = ", ".join(classes[:8]) + (", ..." if n > 8 else "")
            consequence = ("its labels would index past the classifier" if n > expected else
                           "evaluation fails as soon as the model predicts a class the dataset does not have")
            raise DatasetError(
                f"{key} = {expected} but dataset '{name}' has {n} classes ({shown}): {consequence}. "
                f"Set {key}{assign}{n}.")
