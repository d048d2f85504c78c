"""LazyConfig helpers: what ``configs/lazy/*.py`` and ``pvt-d2-lazy-train`` use besides detectron2.

``configs/lazy/<name>.py`` states a detector as plain detectron2 LazyConfig
code on the shared files of ``configs/lazy/common/`` (models, data,
optimizer, train), as detectron2's ``projects/ViTDet/configs`` do; it is
written by ``tools/generate_lazy_configs.py`` from the numbers of
``configs/<name>.yaml``. Loading one builds nothing. This module holds what
those files and the training script need:

* :func:`dataset_dicts`: the ``dataloader.*.dataset`` callable (one name or a list, clear errors);
* :func:`skip_imagenet_weights`: blank the backbones' ``pretrained`` when a whole detector is loaded after;
* :func:`setup_lazy_datasets`, :func:`check_lazy_datasets`, :func:`check_lazy_num_classes`: the
  ``--dataset`` declarations and the dataset checks of ``pvt-d2-lazy-train``, as ``pvt-d2-train`` has them.
"""
import dataclasses
from typing import List, Sequence, Tuple

__all__ = ["dataset_dicts", "dataset_names", "skip_imagenet_weights", "setup_lazy_datasets",
           "check_lazy_datasets", "check_lazy_num_classes"]


def dataset_dicts(names, filter_empty: bool = True):
    """:func:`pvt_d2.data.load_dataset_dicts` of one dataset name or a list of them (clear errors).

    pvt_d2's built-in datasets are registered (and the synthetic set generated)
    first (:func:`pvt_d2.data.prepare_datasets`), so that any LazyConfig client,
    detectron2's own ``tools/lazyconfig_train_net.py`` included, finds them.
    """
    from .data import load_dataset_dicts, prepare_datasets

    names = [names] if isinstance(names, str) else list(names)
    prepare_datasets(names)
    return load_dataset_dicts(names, filter_empty=filter_empty)


def _backbone_nodes(node):
    """Every ``L(create_backbone)(...)`` node of a LazyConfig tree."""
    from omegaconf import DictConfig, ListConfig

    from .modeling.backbone import create_backbone

    if isinstance(node, DictConfig):
        if node.get("_target_") is create_backbone:
            yield node
        for key in node.keys():
            if isinstance(node[key], (DictConfig, ListConfig)):
                yield from _backbone_nodes(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            yield from _backbone_nodes(item)


def skip_imagenet_weights(model_cfg) -> List[str]:
    """Set ``pretrained=""`` on every ``create_backbone`` node of ``model_cfg`` (in place).

    For a run that loads a whole detector (``train.init_checkpoint``, ``--eval-only``,
    ``--resume``): its backbone weights replace the ImageNet ones, which are then
    neither downloaded nor read (as ``MODEL.WEIGHTS`` does for the YAML configs).

    Returns:
        The ``pretrained`` values that were set.
    """
    skipped = []
    for node in _backbone_nodes(model_cfg):
        if node.get("pretrained"):
            skipped.append(node.pretrained)
            node.pretrained = ""
    return skipped


def _num_classes_nodes(node, path: str = "model"):
    """``(dotted path, parent node)`` of every ``num_classes`` field of a LazyConfig tree that holds a value.

    Fields that interpolate another (``num_classes="${..num_classes}"``, every
    head of the shipped configs) follow that one and are skipped.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        for key in node.keys():
            if key == "num_classes":
                if not OmegaConf.is_interpolation(node, key):
                    yield f"{path}.{key}", node
            elif isinstance(node[key], (DictConfig, ListConfig)):
                yield from _num_classes_nodes(node[key], f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _num_classes_nodes(item, f"{path}.{i}")


def dataset_names(value) -> List[str]:
    """A LazyConfig ``dataset.names`` value (one name or a sequence of names) as a list."""
    return [value] if isinstance(value, str) and value else ([] if isinstance(value, str) else list(value or []))


def setup_lazy_datasets(cfg, specs: Sequence[str] = (), overrides: Sequence[str] = ()) -> List[str]:
    """Register ``--dataset NAME=SPEC`` declarations for a LazyConfig and fit its model's class count to them.

    The LazyConfig form of :func:`pvt_d2.data.custom.setup_custom_datasets`:
    each declaration is parsed and registered by
    :func:`~pvt_d2.data.custom.register_dataset_spec`; the class list of the
    declared datasets named in ``dataloader.train.dataset.names`` (else
    ``dataloader.test.dataset.names``) gives every ``num_classes`` field of
    ``cfg.model`` that holds a number (``model.roi_heads.num_classes``,
    RetinaNet's ``model.num_classes``; the heads that interpolate it follow).

    Args:
        cfg: the loaded LazyConfig (changed in place).
        specs: the ``NAME=SPEC`` declarations.
        overrides: the command-line ``key=value`` overrides, to tell a class count set on purpose.

    Returns:
        The names of the declared datasets.

    Raises:
        DatasetError: a bad declaration; a declared dataset that neither loader names; training and test
            sets with different classes; a class count that the file (other than detectron2's default 80)
            or an override sets to another number (both numbers named); box-only data with a mask head.
    """
    from detectron2.data import MetadataCatalog

    from .data import DatasetError
    from .data.custom import DEFAULT_NUM_CLASSES, is_box_only, parse_dataset_spec, register_dataset_spec

    declared = {}
    for text in specs:
        spec = parse_dataset_spec(text)
        if spec.name in declared and declared[spec.name] != spec:
            raise DatasetError(f"Dataset '{spec.name}' is declared twice, as {declared[spec.name].text} "
                               f"and as {spec.text}.")
        declared[spec.name] = register_dataset_spec(spec)
    if not declared:
        return []
    train = [n for n in dataset_names(cfg.dataloader.train.dataset.names) if n in declared]
    test = [n for n in dataset_names(cfg.dataloader.test.dataset.names) if n in declared]
    names = list(declared)
    if not train and not test:
        raise DatasetError(
            f"Dataset(s) {', '.join(names)} are declared but dataloader.train.dataset.names = "
            f"{dataset_names(cfg.dataloader.train.dataset.names)} and dataloader.test.dataset.names = "
            f"{cfg.dataloader.test.dataset.names!r} name none of them; add e.g. "
            f"'dataloader.train.dataset.names=[{names[0]}]'"
            + (f" dataloader.test.dataset.names={names[1]}" if len(names) > 1 else "") + ".")
    source = (train or test)[0]
    classes = list(MetadataCatalog.get(source).thing_classes)
    for name in train + test:
        other = list(MetadataCatalog.get(name).thing_classes)
        if other != classes:
            raise DatasetError(f"Datasets '{source}' and '{name}' have different classes ({classes} vs {other}); "
                               f"training and evaluation sets must share one class list.")
    nodes = list(_num_classes_nodes(cfg.model))
    if not nodes:
        raise DatasetError(f"The model of this LazyConfig has no num_classes field to fit to dataset '{source}'.")
    key, parent = nodes[0]
    current = parent.num_classes
    overridden = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    if current != len(classes) and (current != DEFAULT_NUM_CLASSES or overridden & {k for k, _ in nodes}):
        raise DatasetError(f"{key} = {current} is set in the config, but dataset '{source}' has {len(classes)} "
                           f"classes; remove the setting (it is then taken from the dataset) or set "
                           f"{key}={len(classes)}.")
    for _, parent in nodes:
        parent.num_classes = len(classes)
    boxes = [n for n in train + test if is_box_only(n)]
    if boxes and _has_mask_head(cfg):
        raise DatasetError(
            f"Dataset '{boxes[0]}' has objects with boxes but no masks (segmentation), and this LazyConfig has a "
            f"mask head, which needs a mask for every object. For box-only data use "
            f"configs/lazy/faster_rcnn_<variant>.py or configs/lazy/retinanet_<variant>.py.")
    return names


def _has_mask_head(cfg) -> bool:
    """Whether the LazyConfig's model has a mask head (``model.roi_heads.mask_head``)."""
    roi_heads = cfg.model.get("roi_heads")
    return roi_heads is not None and roi_heads.get("mask_head") is not None


def _mask_format(mapper) -> Tuple[str, str]:
    """``(mask format, the setting that holds it)`` of a training mapper node of a LazyConfig.

    detectron2's ``DatasetMapper`` (and pvt_d2's ``RobustDatasetMapper``) take
    ``instance_mask_format``, polygons by default.
    """
    if mapper is not None and "instance_mask_format" in mapper:
        return mapper.instance_mask_format, "dataloader.train.mapper.instance_mask_format"
    return "polygon", "dataloader.train.mapper.instance_mask_format (default polygon)"


def check_lazy_datasets(cfg, training: bool = True) -> None:
    """Check the annotation files of the datasets a LazyConfig trains and evaluates on, as the YAML path does.

    :func:`pvt_d2.data.validation.check_datasets` on the COCO-json datasets
    named in ``dataloader.train.dataset.names`` (when ``training``) and
    ``dataloader.test.dataset.names``: each file is read once and checked
    (json, image ids and sizes, boxes, polygons), and its masks are compared
    with the model (a mask head needs a mask for every instance; RLE masks need
    the training mapper's mask format ``bitmask``; evaluation reads no masks).
    The datasets must be registered (:func:`pvt_d2.data.prepare_datasets`).

    Args:
        cfg: the loaded LazyConfig (after :func:`setup_lazy_datasets`).
        training: check the training sets too (False for ``--eval-only``).

    Raises:
        DatasetError: naming the dataset, the file and the field or the mismatch.
    """
    from .data.validation import MaskNeeds, check_datasets

    needs = MaskNeeds(masks=_has_mask_head(cfg), mask_head="this LazyConfig has a mask head",
                      boxes_only="use configs/lazy/faster_rcnn_<variant>.py or configs/lazy/retinanet_<variant>.py")
    if training:
        mask_format, key = _mask_format(cfg.dataloader.train.get("mapper"))
        check_datasets(dataset_names(cfg.dataloader.train.dataset.get("names")),
                       dataclasses.replace(needs, mask_format=mask_format, format_key=key))
    check_datasets(dataset_names(cfg.dataloader.test.dataset.get("names")),
                   dataclasses.replace(needs, mask_format=None))


def check_lazy_num_classes(cfg, training: bool = True) -> None:
    """Compare a LazyConfig model's class count with its datasets, as the YAML path does.

    :func:`pvt_d2.data.datasets.check_class_count` with the model's first
    ``num_classes`` field (``model.roi_heads.num_classes``, RetinaNet's
    ``model.num_classes``): a training set in ``dataloader.train.dataset.names``
    (when ``training``) may not have more classes, a set in
    ``dataloader.test.dataset.names`` must have exactly as many (loaded once
    if its classes are not yet known). Datasets declared with ``--dataset`` were
    fitted by :func:`setup_lazy_datasets`; this catches built-in or separately
    registered ones before hours of training end in a failed evaluation.

    Raises:
        DatasetError: naming the field, its value, the dataset and its classes.
    """
    from .data.datasets import check_class_count

    nodes = list(_num_classes_nodes(cfg.model))
    if not nodes:
        return
    key, parent = nodes[0]
    if training:
        check_class_count(key, parent.num_classes, dataset_names(cfg.dataloader.train.dataset.get("names")),
                          training=True, assign="=")
    check_class_count(key, parent.num_classes, dataset_names(cfg.dataloader.test.dataset.get("names")),
                      training=False, load_missing=True, assign="=")
