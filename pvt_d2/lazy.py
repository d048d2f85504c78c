"""detectron2 LazyConfig twins of the YAML detector configs.

``configs/lazy/<name>.py`` (written by ``tools/generate_configs.py`` from the
same table as ``configs/<name>.yaml``) calls :func:`lazy_detector`, which
turns the YAML config into the five sections detectron2's
``tools/lazyconfig_train_net.py`` expects -- ``model``, ``dataloader``,
``optimizer``, ``lr_multiplier`` and ``train`` -- so both formats always
describe the same detector and recipe (one source of numbers):

* ``model`` starts from detectron2's own ``common/models/retinanet.py`` /
  ``mask_rcnn_fpn.py`` (``model_zoo.get_config``); its backbone becomes the
  pvt_d2 backbone under detectron2's ``FPN`` and every other field is set to
  what the YAML's ``from_config`` gives. Cascade configs use pvt_d2's
  ``PaperCascadeROIHeads`` (one mask head per stage), whose stages are listed
  explicitly. The tree is plain LazyCall objects: any field can be overridden
  (``model.roi_heads.num_classes=3``).
* ``optimizer``: AdamW over :func:`pvt_d2.engine.optim.param_groups`
  (``optimizer.params.model`` is set by the training script, as in detectron2).
* ``dataloader``: detectron2's loaders with pvt_d2's robust mapper and a COCO evaluator.
* ``lr_multiplier``: warmup + multi-step decay of the YAML's ``SOLVER``.

Nothing here reads or runs user files; a LazyConfig file itself is Python and
is loaded only when the user names it (``tools/lazyconfig_train_net.py``).
"""
import copy
import dataclasses
import os
from typing import Any, Dict, List, Sequence, Tuple

import torch
from detectron2.config import LazyCall as L

__all__ = ["yaml_path", "lazy_detector", "lazy_model", "lazy_optimizer", "lazy_dataloader", "lazy_train",
           "lazy_lr_multiplier", "setup_lazy_datasets", "check_lazy_datasets", "check_lazy_num_classes",
           "dataset_names"]

from .model_zoo import CONFIG_ROOT as CONFIG_DIR


def yaml_path(name: str) -> str:
    """``configs/<name>`` for a bare file name, else ``name`` itself."""
    return name if os.path.isabs(name) or os.path.exists(name) else os.path.join(CONFIG_DIR, name)


def _common_model(name: str):
    from detectron2 import model_zoo

    return copy.deepcopy(model_zoo.get_config(f"common/models/{name}.py").model)


def _backbone_shapes(cfg) -> Dict[str, Any]:
    """Output shapes of the config's backbone (built once on the CPU; its weights are thrown away)."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE, cfg.MODEL.PVT_D2.PRETRAINED = "cpu", ""
    with torch.no_grad():
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    return backbone.output_shape(), backbone


def _lazy_backbone(cfg, backbone):
    """``FPN(bottom_up=<pvt_d2 backbone>)`` as LazyCall, with the same arguments as the YAML builder."""
    from detectron2.modeling.backbone import FPN
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    from .modeling.backbone.registry import LastLevelP6P7FromC5, backbone_kwargs_from_cfg, create_backbone

    _, kwargs = backbone_kwargs_from_cfg(cfg, len(cfg.MODEL.PIXEL_MEAN))
    # create_backbone, not the class: it also applies the run-time switches, which are no constructor arguments
    bottom_up = L(create_backbone)(name=cfg.MODEL.PVT_D2.ARCH, **kwargs,
                                   act_checkpoint=cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT,
                                   fast_inference=cfg.MODEL.PVT_D2.FAST_INFERENCE)
    name = cfg.MODEL.BACKBONE.NAME
    if name == "build_pvt_d2_backbone":
        return bottom_up
    if name == "build_pvt_d2_fpn_backbone":
        top = L(LastLevelMaxPool)()
    elif name == "build_pvt_d2_retinanet_fpn_backbone":
        in_feature = cfg.MODEL.FPN.IN_FEATURES[-1]
        top = L(LastLevelP6P7FromC5)(in_channels=backbone.bottom_up.output_shape()[in_feature].channels,
                                     out_channels=cfg.MODEL.FPN.OUT_CHANNELS, in_feature=in_feature)
    else:
        raise ValueError(f"MODEL.BACKBONE.NAME {name!r} has no LazyConfig form")
    return L(FPN)(bottom_up=bottom_up, in_features=list(cfg.MODEL.FPN.IN_FEATURES),
                  out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=top,
                  fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def _plain(value):
    """A ``from_config`` value as a LazyConfig value: helper objects become LazyCalls, modules are refused."""
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.matcher import Matcher
    from detectron2.modeling.poolers import ROIPooler

    if isinstance(value, Box2BoxTransform):
        return L(Box2BoxTransform)(weights=tuple(value.weights), scale_clamp=value.scale_clamp)
    if isinstance(value, Matcher):
        return L(Matcher)(thresholds=list(value.thresholds[1:-1]), labels=list(value.labels),
                          allow_low_quality_matches=value.allow_low_quality_matches)
    if isinstance(value, ROIPooler):
        first = value.level_poolers[0]
        pooler_type = {"ROIAlign": "ROIAlignV2" if getattr(first, "aligned", False) else "ROIAlign"}.get(
            type(first).__name__, type(first).__name__)
        return L(ROIPooler)(output_size=value.output_size, scales=[p.spatial_scale for p in value.level_poolers],
                            sampling_ratio=first.sampling_ratio, pooler_type=pooler_type,
                            canonical_box_size=value.canonical_box_size, canonical_level=value.canonical_level)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Box2BoxTransform, Matcher, ROIPooler)) for v in value):
        return [_plain(v) for v in value]
    if isinstance(value, torch.nn.Module):
        raise TypeError(f"{type(value).__name__} needs an explicit LazyConfig form")
    return value


def _lazy_from_config(cls, *args, **overrides):
    """``L(cls)(**cls.from_config(*args))`` with helper objects made lazy; ``overrides`` replace fields."""
    kwargs = {k: _plain(v) for k, v in cls.from_config(*args).items() if k not in overrides}
    return L(cls)(**kwargs, **overrides)


def _head_module(module, cfg, shape):
    """A built box / mask head or predictor as a LazyCall (its class's ``from_config`` with ``shape``)."""
    return _lazy_from_config(type(module), cfg, shape)


def _lazy_roi_heads(cfg, shapes):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

    cls = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    with torch.no_grad():
        built = cls.from_config(cfg, shapes)
    kwargs = {}
    for key, value in built.items():
        if key in ("box_head", "box_heads", "box_predictor", "box_predictors", "mask_head", "keypoint_head"):
            continue
        kwargs[key] = _plain(value)
    channels = shapes[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
    box_res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    pooled = ShapeSpec(channels=channels, height=box_res, width=box_res)
    box_cfg = cfg
    if "box_heads" in built:  # cascade: the heads may use another norm in this process (roi_heads.box_head_norm)
        from .modeling import roi_heads as pvt_roi_heads

        if hasattr(pvt_roi_heads, "box_head_norm"):
            box_cfg = cfg.clone()
            box_cfg.defrost()
            box_cfg.MODEL.ROI_BOX_HEAD.NORM = pvt_roi_heads.box_head_norm(cfg.MODEL.ROI_BOX_HEAD.NORM,
                                                                          cfg.MODEL.DEVICE)
        kwargs["box_heads"] = [_head_module(h, box_cfg, pooled) for h in built["box_heads"]]
        kwargs["box_predictors"] = [
            _lazy_from_config(type(p), cfg, h.output_shape, box2box_transform=_plain(p.box2box_transform),
                              loss_weight=dict(p.loss_weight))
            for h, p in zip(built["box_heads"], built["box_predictors"])]
    else:
        kwargs["box_head"] = _head_module(built["box_head"], cfg, pooled)
        kwargs["box_predictor"] = _lazy_from_config(type(built["box_predictor"]), cfg,
                                                    built["box_head"].output_shape)
    mask = built.get("mask_head")
    if mask is not None:
        res = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        mask_shape = ShapeSpec(channels=channels, height=res, width=res)
        kwargs["mask_head"] = ([_head_module(m, cfg, mask_shape) for m in mask] if isinstance(mask, (list, tuple))
                               else _head_module(mask, cfg, mask_shape))
    if built.get("keypoint_head") is not None:
        raise ValueError("keypoint heads have no LazyConfig form in pvt_d2")
    return L(cls)(**kwargs)


def lazy_model(cfg):
    """The detector of a YAML config as a LazyCall tree built on detectron2's ``common/models``."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.matcher import Matcher
    from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
    from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY

    shapes, backbone = _backbone_shapes(cfg)
    arch = cfg.MODEL.META_ARCHITECTURE
    common = dict(pixel_mean=list(cfg.MODEL.PIXEL_MEAN), pixel_std=list(cfg.MODEL.PIXEL_STD),
                  input_format=cfg.INPUT.FORMAT, vis_period=cfg.VIS_PERIOD)
    if arch == "RetinaNet":
        r = cfg.MODEL.RETINANET
        feature_shapes = [shapes[f] for f in r.IN_FEATURES]
        anchors = ANCHOR_GENERATOR_REGISTRY.get(cfg.MODEL.ANCHOR_GENERATOR.NAME)
        model = _common_model("retinanet")
        model.update(
            backbone=_lazy_backbone(cfg, backbone),
            head=_lazy_from_config(RetinaNetHead, cfg, feature_shapes),
            anchor_generator=_lazy_from_config(anchors, cfg, feature_shapes),
            box2box_transform=L(Box2BoxTransform)(weights=tuple(r.BBOX_REG_WEIGHTS)),
            anchor_matcher=L(Matcher)(thresholds=list(r.IOU_THRESHOLDS), labels=list(r.IOU_LABELS),
                                      allow_low_quality_matches=True),
            num_classes=r.NUM_CLASSES, head_in_features=list(r.IN_FEATURES),
            focal_loss_alpha=r.FOCAL_LOSS_ALPHA, focal_loss_gamma=r.FOCAL_LOSS_GAMMA,
            smooth_l1_beta=r.SMOOTH_L1_LOSS_BETA, box_reg_loss_type=r.BBOX_REG_LOSS_TYPE,
            test_score_thresh=r.SCORE_THRESH_TEST, test_topk_candidates=r.TOPK_CANDIDATES_TEST,
            test_nms_thresh=r.NMS_THRESH_TEST, max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            **common)
        return model
    if arch != "GeneralizedRCNN":
        raise ValueError(f"MODEL.META_ARCHITECTURE {arch!r} has no LazyConfig form")
    model = _common_model("mask_rcnn_fpn")
    rpn_cls = PROPOSAL_GENERATOR_REGISTRY.get(cfg.MODEL.PROPOSAL_GENERATOR.NAME)
    with torch.no_grad():
        rpn = rpn_cls.from_config(cfg, shapes)
    rpn_shapes = [shapes[f] for f in cfg.MODEL.RPN.IN_FEATURES]
    rpn["head"] = _lazy_from_config(RPN_HEAD_REGISTRY.get(cfg.MODEL.RPN.HEAD_NAME), cfg, rpn_shapes)
    rpn["anchor_generator"] = _lazy_from_config(ANCHOR_GENERATOR_REGISTRY.get(cfg.MODEL.ANCHOR_GENERATOR.NAME),
                                                cfg, rpn_shapes)
    model.update(backbone=_lazy_backbone(cfg, backbone),
                 proposal_generator=L(rpn_cls)(**{k: _plain(v) for k, v in rpn.items()}),
                 roi_heads=_lazy_roi_heads(cfg, shapes), **common)
    return model


def lazy_optimizer(cfg):
    """AdamW over :func:`~pvt_d2.engine.optim.param_groups`; ``optimizer.params.model`` is filled in later."""
    from .engine.optim import param_groups

    if cfg.SOLVER.OPTIMIZER.upper() != "ADAMW" or cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
        raise ValueError("LazyConfig twins are written for the AdamW recipe without gradient clipping")
    return L(torch.optim.AdamW)(params=L(param_groups)(model=None, weight_decay=cfg.SOLVER.WEIGHT_DECAY),
                                lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
                                weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def lazy_lr_multiplier(cfg):
    """detectron2's ``WarmupParamScheduler`` over a multi-step decay, as ``build_lr_scheduler`` makes it."""
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    s = cfg.SOLVER
    steps = [x for x in s.STEPS if x <= s.MAX_ITER]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[s.GAMMA ** k for k in range(len(steps) + 1)],
                                             milestones=steps, num_updates=s.MAX_ITER),
        warmup_length=s.WARMUP_ITERS / s.MAX_ITER, warmup_method=s.WARMUP_METHOD, warmup_factor=s.WARMUP_FACTOR,
        rescale_interval=s.get("RESCALE_INTERVAL", False))


def _mapper(config_file: str, opts: Sequence[str], is_train: bool):
    """pvt_d2's robust dataset mapper for a YAML config (its ``INPUT`` section)."""
    from .config import load_config
    from .data.mapper import RobustDatasetMapper

    return RobustDatasetMapper(load_config(config_file, list(opts)), is_train)


def dataset_dicts(names, filter_empty: bool = True):
    """:func:`pvt_d2.data.load_dataset_dicts` of one dataset name or a list of them (clear errors)."""
    from .data import load_dataset_dicts

    return load_dataset_dicts([names] if isinstance(names, str) else list(names), filter_empty=filter_empty)


def lazy_dataloader(cfg, config_file: str, opts: Sequence[str] = ()):
    """``dataloader.train`` / ``.test`` / ``.evaluator`` as detectron2's LazyConfig tools expect."""
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.evaluation import COCOEvaluator
    from omegaconf import OmegaConf

    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    return OmegaConf.create(dict(
        train=L(build_detection_train_loader)(
            dataset=L(dataset_dicts)(names=list(cfg.DATASETS.TRAIN),
                                          filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS),
            mapper=L(_mapper)(config_file=config_file, opts=list(opts), is_train=True),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, num_workers=cfg.DATALOADER.NUM_WORKERS,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING),
        test=L(build_detection_test_loader)(
            dataset=L(dataset_dicts)(names=cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "",
                                          filter_empty=False),
            mapper=L(_mapper)(config_file=config_file, opts=list(opts), is_train=False),
            num_workers=cfg.DATALOADER.NUM_WORKERS),
        evaluator=L(COCOEvaluator)(dataset_name="${..test.dataset.names}", tasks=tasks,
                                   output_dir=os.path.join(cfg.OUTPUT_DIR, "inference")),
    ))


def lazy_train(cfg):
    """The ``train`` section of detectron2's ``common/train.py`` filled from the YAML."""
    from detectron2 import model_zoo

    train = copy.deepcopy(model_zoo.get_config("common/train.py").train)
    train.update(output_dir=cfg.OUTPUT_DIR, init_checkpoint=cfg.MODEL.WEIGHTS, max_iter=cfg.SOLVER.MAX_ITER,
                 eval_period=cfg.TEST.EVAL_PERIOD or cfg.SOLVER.MAX_ITER, log_period=20,
                 device=cfg.MODEL.DEVICE, seed=cfg.SEED, pretrained=cfg.MODEL.PVT_D2.PRETRAINED)
    train.amp.enabled = cfg.SOLVER.AMP.ENABLED
    train.checkpointer.period = cfg.SOLVER.CHECKPOINT_PERIOD
    return train


def lazy_detector(config: str, opts: Sequence[str] = ()):
    """``(model, dataloader, optimizer, lr_multiplier, train)`` of the YAML config ``config`` (+ ``opts``)."""
    from .config import load_config
    from . import modeling  # noqa: F401  (registers backbones and heads)

    path = yaml_path(config)
    cfg = load_config(path, list(opts))
    return (lazy_model(cfg), lazy_dataloader(cfg, path, opts), lazy_optimizer(cfg), lazy_lr_multiplier(cfg),
            lazy_train(cfg))


def _num_classes_nodes(node, path: str = "model"):
    """``(dotted path, parent node)`` of every ``num_classes`` field in a LazyConfig tree."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        for key in node.keys():
            if key == "num_classes":
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
    ``cfg.model`` (``model.roi_heads.num_classes``, the box predictors, the
    mask heads; RetinaNet's ``model.num_classes`` and ``model.head.num_classes``).

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

    pvt_d2's mapper (:func:`_mapper`) reads ``INPUT.MASK_FORMAT`` of its YAML
    config; detectron2's ``DatasetMapper`` takes ``instance_mask_format``;
    another mapper is assumed to read polygons, as detectron2's default.
    """
    if mapper is not None and "instance_mask_format" in mapper:
        return mapper.instance_mask_format, "dataloader.train.mapper.instance_mask_format"
    if mapper is not None and "config_file" in mapper and "opts" in mapper:
        from .config import load_config

        fmt = load_config(mapper.config_file, list(mapper.opts or [])).INPUT.MASK_FORMAT
        return fmt, f"INPUT.MASK_FORMAT (of {mapper.config_file}, set in dataloader.train.mapper.opts)"
    return "polygon", "the training mapper's mask format"


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
