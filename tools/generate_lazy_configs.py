#!/usr/bin/env python
"""Write ``configs/lazy/<name>.py``, the LazyConfig twin of every generated YAML detector config.

Each file is plain detectron2 LazyConfig code on ``configs/lazy/common/``
(one model file per detector type, ``data.py``, ``optim.py``, ``train.py``):
the backbone's ``L(create_backbone)(...)`` call, the training recipe (batch,
augmentation, optimizer, schedule) and whatever else the YAML sets apart from
its detector's base (``configs/base/*.yaml``, which the common files mirror).
The numbers are read from ``configs/<name>.yaml`` (:func:`pvt_d2.config.load_config`);
the list of names is the YAML generator's table plus the quickstart::

    python tools/generate_lazy_configs.py          # write
    python tools/generate_lazy_configs.py --check  # fail if a file is stale
"""
import argparse
import functools
import inspect
import os
import sys
import textwrap
from typing import Any, Callable, Dict, Iterator, List, Tuple

if __package__:  # imported as tools.generate_lazy_configs (the tests)
    from .generate_configs import expected_files as yaml_files
else:  # run as a script: its folder tools/ is sys.path[0]
    from generate_configs import expected_files as yaml_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
LAZY_DIR = os.path.join(CONFIG_DIR, "lazy")
EXTRA = ("quickstart_pvt_v2_b0.yaml",)

# detector type -> the base YAML whose model configs/lazy/common/models/<type>.py states
BASES = {"retinanet": "base/retinanet_1x.yaml", "faster_rcnn": "base/faster_rcnn_1x.yaml",
         "mask_rcnn": "base/mask_rcnn_1x.yaml", "cascade_mask_rcnn": "base/cascade_mask_rcnn_3x.yaml"}
CASCADE_STAGES = 3


class Code(str):
    """Python source text written as is (``L(...)`` calls, expressions)."""


def py(value: Any) -> str:
    """``value`` as Python source: double-quoted strings, lists for tuples, :class:`Code` as is."""
    if isinstance(value, Code):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py(v) for v in value) + "]"
    return repr(value)


def call(name: str, **kwargs) -> Code:
    """``L(name)(k=v, ...)`` as source, one argument a line when it would not fit in a list line."""
    args = [f"{k}={py(v)}" for k, v in kwargs.items()]
    text = f"L({name})(" + ", ".join(args) + ")"
    if len(text) <= 110:
        return Code(text)
    return Code(f"L({name})(\n" + "".join(f"        {a},\n" for a in args) + "    )")


def detector_type(cfg) -> str:
    """``retinanet``, ``faster_rcnn``, ``mask_rcnn`` or ``cascade_mask_rcnn``: the common model file of ``cfg``."""
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return "retinanet"
    if cfg.MODEL.ROI_HEADS.NAME == "PaperCascadeROIHeads":
        return "cascade_mask_rcnn"
    return "mask_rcnn" if cfg.MODEL.MASK_ON else "faster_rcnn"


def level_channels(arch: str, level: str) -> int:
    """Channels of the backbone level ``level`` of variant ``arch``, from its constructor arguments (no model
    is built; ``tests/test_lazyconfig.py`` compares every variant with its built backbone)."""
    from pvt_d2.modeling.backbone import get_arch

    spec = get_arch(arch)
    params = inspect.signature(spec.model_cls.__init__).parameters
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    args.update(spec.kwargs)
    i = int(level[3:]) - 2
    if spec.family == "gcvit":
        return args["embed_dim"] * 2 ** i
    if spec.family == "levit":  # res2 / res3 are taps in the stem, then one level per stage
        dims = args["embed_dims"]
        return dims[0] // 4 if i == 0 else dims[0] // 2 if i == 1 else dims[i - 2]
    return args["embed_dims"][i]


def backbone_call(cfg) -> Code:
    """``L(create_backbone)(...)`` with the arguments the YAML backbone builder passes (defaults left out)."""
    from pvt_d2.modeling.backbone import get_arch

    p = cfg.MODEL.PVT_D2
    kwargs: Dict[str, Any] = {"name": p.ARCH}
    if p.DROP_PATH_RATE is not None:
        kwargs["drop_path_rate"] = p.DROP_PATH_RATE
    kwargs["out_features"] = list(p.OUT_FEATURES)
    family_kwargs = getattr(get_arch(p.ARCH).model_cls, "family_kwargs_from_cfg", None)
    if family_kwargs is not None:
        kwargs.update({k: v for k, v in family_kwargs(cfg).items() if v is not None})
    for key, value, default in (("output_norm", p.OUTPUT_NORM, False), ("freeze_at", cfg.MODEL.BACKBONE.FREEZE_AT, 0),
                                ("act_checkpoint", p.ACTIVATION_CHECKPOINT, False),
                                ("fast_inference", p.FAST_INFERENCE, True)):
        if value != default:
            kwargs[key] = value
    kwargs["pretrained"] = p.PRETRAINED
    if len(cfg.MODEL.PIXEL_MEAN) != 3:
        kwargs["in_chans"] = len(cfg.MODEL.PIXEL_MEAN)
    lines = [f"    {k}={py(v)}," for k, v in kwargs.items()]
    return Code("L(create_backbone)(\n" + "\n".join(lines) + "\n)")


# ------------------------------------------------------------------ YAML keys apart from the base -> LazyConfig fields
Fields = List[Tuple[str, Any]]


def _stages(kind: str, single: str, many: str) -> List[str]:
    """The node path of a box head / predictor / mask head: one, or one per cascade stage."""
    return [f"{many}[{i}]" for i in range(CASCADE_STAGES)] if kind == "cascade_mask_rcnn" else [single]


def _predictors(kind):
    return _stages(kind, "model.roi_heads.box_predictor", "model.roi_heads.box_predictors")


def _box_heads(kind):
    return _stages(kind, "model.roi_heads.box_head", "model.roi_heads.box_heads")


def _mask_heads(kind):
    return _stages(kind, "model.roi_heads.mask_head", "model.roi_heads.mask_head")


def _test_resize(cfg, kind) -> Fields:
    return [("dataloader.test.mapper.augmentations",
             [call("T.ResizeShortestEdge", short_edge_length=cfg.INPUT.MIN_SIZE_TEST,
                   max_size=cfg.INPUT.MAX_SIZE_TEST)])]


def _detections(cfg, kind) -> Fields:
    if kind == "retinanet":
        return [("model.max_detections_per_image", cfg.TEST.DETECTIONS_PER_IMAGE)]
    return [(f"{p}.test_topk_per_image", cfg.TEST.DETECTIONS_PER_IMAGE) for p in _predictors(kind)]


def _anchors(field: str):
    def fields(cfg, kind):
        node = "model.anchor_generator" if kind == "retinanet" else "model.proposal_generator.anchor_generator"
        return [(f"{node}.{field}", getattr(cfg.MODEL.ANCHOR_GENERATOR, field.upper()))]
    return fields


def _topk(which: str):
    def fields(cfg, kind):
        r = cfg.MODEL.RPN
        return [(f"model.proposal_generator.{which}_nms_topk",
                 [r[f"{which.upper()}_NMS_TOPK_TRAIN"], r[f"{which.upper()}_NMS_TOPK_TEST"]])]
    return fields


def _box_fc(cfg, kind) -> Fields:
    b = cfg.MODEL.ROI_BOX_HEAD
    return ([(f"{h}.fc_dims", [b.FC_DIM] * b.NUM_FC) for h in _box_heads(kind)]
            + [(f"{p}.input_shape.channels", b.FC_DIM) for p in _predictors(kind)])


def _box_conv(cfg, kind) -> Fields:
    b = cfg.MODEL.ROI_BOX_HEAD
    return [(f"{h}.conv_dims", [b.CONV_DIM] * b.NUM_CONV) for h in _box_heads(kind)]


def _mask_conv(cfg, kind) -> Fields:
    m = cfg.MODEL.ROI_MASK_HEAD
    return [(f"{h}.conv_dims", [m.CONV_DIM] * (m.NUM_CONV + 1)) for h in _mask_heads(kind)]


def _per_predictor(field: str, value: Callable):
    return lambda cfg, kind: [(f"{p}.{field}", value(cfg)) for p in _predictors(kind)]


def _test_names(cfg, kind) -> Fields:
    names = list(cfg.DATASETS.TEST)
    if len(names) > 1:
        raise ValueError(f"DATASETS.TEST {names}: a LazyConfig evaluates on one dataset")
    return [("dataloader.test.dataset.names", names[0] if names else "")]


def _one(key: str, value: Callable = None):
    return lambda cfg, kind: [(key, value(cfg))]


MODEL_FIELDS: Dict[str, Callable[[Any, str], Fields]] = {
    "MODEL.PIXEL_MEAN": _one("model.pixel_mean", lambda c: list(c.MODEL.PIXEL_MEAN)),
    "MODEL.PIXEL_STD": _one("model.pixel_std", lambda c: list(c.MODEL.PIXEL_STD)),
    "MODEL.FPN.OUT_CHANNELS": _one("model.backbone.out_channels", lambda c: c.MODEL.FPN.OUT_CHANNELS),
    "MODEL.FPN.IN_FEATURES": _one("model.backbone.in_features", lambda c: list(c.MODEL.FPN.IN_FEATURES)),
    "MODEL.FPN.NORM": _one("model.backbone.norm", lambda c: c.MODEL.FPN.NORM),
    "MODEL.ANCHOR_GENERATOR.SIZES": _anchors("sizes"),
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": _anchors("aspect_ratios"),
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": _topk("pre"),
    "MODEL.RPN.PRE_NMS_TOPK_TEST": _topk("pre"),
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": _topk("post"),
    "MODEL.RPN.POST_NMS_TOPK_TEST": _topk("post"),
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": _one("model.proposal_generator.batch_size_per_image",
                                           lambda c: c.MODEL.RPN.BATCH_SIZE_PER_IMAGE),
    "MODEL.RPN.NMS_THRESH": _one("model.proposal_generator.nms_thresh", lambda c: c.MODEL.RPN.NMS_THRESH),
    "MODEL.ROI_HEADS.NUM_CLASSES": _one("model.roi_heads.num_classes", lambda c: c.MODEL.ROI_HEADS.NUM_CLASSES),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": _one("model.roi_heads.batch_size_per_image",
                                                 lambda c: c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE),
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": _per_predictor("test_score_thresh",
                                                        lambda c: c.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": _per_predictor("test_nms_thresh", lambda c: c.MODEL.ROI_HEADS.NMS_THRESH_TEST),
    "MODEL.ROI_BOX_HEAD.FC_DIM": _box_fc,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": _box_conv,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": _one("model.roi_heads.box_pooler.sampling_ratio",
                                                     lambda c: c.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO),
    "MODEL.ROI_MASK_HEAD.CONV_DIM": _mask_conv,
    "MODEL.ROI_MASK_HEAD.NUM_CONV": _mask_conv,
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": _one("model.roi_heads.mask_pooler.sampling_ratio",
                                                      lambda c: c.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO),
    "MODEL.RETINANET.NUM_CLASSES": _one("model.num_classes", lambda c: c.MODEL.RETINANET.NUM_CLASSES),
    "MODEL.RETINANET.SCORE_THRESH_TEST": _one("model.test_score_thresh",
                                              lambda c: c.MODEL.RETINANET.SCORE_THRESH_TEST),
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": _one("model.test_topk_candidates",
                                                 lambda c: c.MODEL.RETINANET.TOPK_CANDIDATES_TEST),
    "MODEL.RETINANET.NMS_THRESH_TEST": _one("model.test_nms_thresh", lambda c: c.MODEL.RETINANET.NMS_THRESH_TEST),
    "TEST.DETECTIONS_PER_IMAGE": _detections,
}
DATA_FIELDS = {  # with the optimizer's betas (written before the schedule)
    "SOLVER.BETAS": _one("optimizer.betas", lambda c: list(c.SOLVER.BETAS)),
    "DATASETS.TRAIN": _one("dataloader.train.dataset.names", lambda c: list(c.DATASETS.TRAIN)),
    "DATASETS.TEST": _test_names,
    "DATALOADER.NUM_WORKERS": _one("dataloader.train.num_workers", lambda c: c.DATALOADER.NUM_WORKERS),
    "INPUT.MIN_SIZE_TEST": _test_resize,
    "INPUT.MAX_SIZE_TEST": _test_resize,
    "INPUT.MASK_FORMAT": _one("dataloader.train.mapper.instance_mask_format", lambda c: c.INPUT.MASK_FORMAT),
}
TRAIN_FIELDS = {
    "MODEL.DEVICE": _one("train.device", lambda c: c.MODEL.DEVICE),
    "MODEL.WEIGHTS": _one("train.init_checkpoint", lambda c: c.MODEL.WEIGHTS),
    "SOLVER.AMP.ENABLED": _one("train.amp.enabled", lambda c: c.SOLVER.AMP.ENABLED),
    "SOLVER.CHECKPOINT_PERIOD": _one("train.checkpointer.period", lambda c: c.SOLVER.CHECKPOINT_PERIOD),
    "TEST.EVAL_PERIOD": _one("train.eval_period", lambda c: c.TEST.EVAL_PERIOD),
    "SEED": _one("train.seed", lambda c: c.SEED),
}
# written in every file (the recipe) or in the backbone call
ALWAYS = ("MODEL.PVT_D2.", "MODEL.BACKBONE.FREEZE_AT", "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN",
          "INPUT.MIN_SIZE_TRAIN_SAMPLING", "INPUT.AUGMENTATION", "INPUT.OFFICIAL_3X.", "SOLVER.IMS_PER_BATCH",
          "SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS",
          "SOLVER.WARMUP_FACTOR", "SOLVER.GAMMA", "OUTPUT_DIR")


# keys the detector type does not read
UNUSED = {"retinanet": ("MODEL.RPN.", "MODEL.ROI_"), "faster_rcnn": ("MODEL.RETINANET.", "MODEL.ROI_MASK_HEAD."),
          "mask_rcnn": ("MODEL.RETINANET.",), "cascade_mask_rcnn": ("MODEL.RETINANET.",)}


def _flat(node, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", _plain(value)


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=None)
def _base_values(base: str) -> Dict[str, Any]:
    from pvt_d2.config import load_config

    return dict(_flat(load_config(os.path.join(CONFIG_DIR, base))))


def fields_apart_from_base(cfg, kind: str) -> Tuple[Fields, Fields, Fields]:
    """``(model, data, train)`` fields for the keys where ``cfg`` differs from its detector's base YAML.

    The keys in :data:`ALWAYS` are written in every file and skipped here.

    Raises:
        ValueError: a key that differs and has no LazyConfig form here (add it to the tables above).
    """
    base = _base_values(BASES[kind])
    values = dict(_flat(cfg))
    apart = [k for k, v in values.items()
             if base.get(k, object()) != v and not k.startswith(ALWAYS + UNUSED[kind])]
    known = set().union(MODEL_FIELDS, DATA_FIELDS, TRAIN_FIELDS)
    unknown = [k for k in apart if k not in known]
    if unknown:
        raise ValueError(", ".join(f"{k} = {values[k]!r} (base {base.get(k)!r})" for k in unknown)
                         + ": no LazyConfig form in tools/generate_lazy_configs.py")
    out: Tuple[Fields, Fields, Fields] = ([], [], [])
    for table, fields in zip((MODEL_FIELDS, DATA_FIELDS, TRAIN_FIELDS), out):
        for key, to_fields in table.items():  # in the tables' order
            if key in apart:
                fields.extend(f for f in to_fields(cfg, kind) if f not in fields)
    return out


# ---------------------------------------------------------------------------------------------- the file
def _train_augmentations(cfg) -> List[Code]:
    i = cfg.INPUT
    if i.RANDOM_FLIP != "horizontal":
        raise ValueError("the LazyConfig twins are written for INPUT.RANDOM_FLIP 'horizontal'")
    sizes = [i.MIN_SIZE_TRAIN] if isinstance(i.MIN_SIZE_TRAIN, int) else list(i.MIN_SIZE_TRAIN)
    if i.AUGMENTATION == "official_3x":
        c = i.OFFICIAL_3X
        first = call("ResizeOrResizeCropResize", short_edges=sizes, max_size=i.MAX_SIZE_TRAIN,
                     crop_prob=c.CROP_PROB, short_edges_before_crop=list(c.RESIZE_BEFORE_CROP),
                     crop_size=list(c.CROP_SIZE))
    else:
        first = call("T.ResizeShortestEdge", short_edge_length=sizes, max_size=i.MAX_SIZE_TRAIN,
                     sample_style=i.MIN_SIZE_TRAIN_SAMPLING)
    return [first, call("T.RandomFlip", horizontal=True)]


def _assign(key: str, value: Any) -> str:
    text = f"{key} = {py(value)}"
    if len(text) <= 120 or not isinstance(value, list):
        return text
    return f"{key} = [\n" + "".join(f"    {py(v)},\n" for v in value) + "]"


def _header(yaml_name: str) -> List[str]:
    """The YAML file's own comment lines (which official config it follows), without its "Generated" line."""
    with open(os.path.join(CONFIG_DIR, yaml_name)) as f:
        comments = [line.rstrip() for line in f if line.startswith("#")]
    lines = []
    for line in comments:
        if len(line) > 120:
            lines += ["# " + part for part in textwrap.wrap(line[2:], 116, break_on_hyphens=False)]
        elif not line.startswith("# Generated by"):
            lines.append(line)
    return lines


def render(yaml_name: str, cfg=None) -> str:
    """The LazyConfig text of ``configs/<yaml_name>`` (or of ``cfg``, loaded from it or changed)."""
    from pvt_d2.config import load_config

    if cfg is None:
        cfg = load_config(os.path.join(CONFIG_DIR, yaml_name))
    s = cfg.SOLVER
    if s.OPTIMIZER.upper() != "ADAMW" or s.CLIP_GRADIENTS.ENABLED or s.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        raise ValueError(f"{yaml_name}: the LazyConfig twins are written for AdamW, no gradient clipping and "
                         f"WarmupMultiStepLR")
    kind = detector_type(cfg)
    model_fields, data_fields, train_fields = fields_apart_from_base(cfg, kind)
    name = os.path.splitext(yaml_name)[0]
    official_3x = cfg.INPUT.AUGMENTATION == "official_3x"
    lines = [f"# LazyConfig twin of configs/{yaml_name}: the same detector and recipe.",
             "# Generated by tools/generate_lazy_configs.py from the YAML file; regenerate it, do not edit it."]
    lines += _header(yaml_name)
    lines += [f'"""LazyConfig twin of configs/{yaml_name}.', "",
              f"    pvt-d2-lazy-train --config-file configs/lazy/{name}.py [key=value ...]",
              '"""',
              "from detectron2.config import LazyCall as L",
              "from detectron2.data import transforms as T",
              "from detectron2.solver import WarmupParamScheduler",
              "from fvcore.common.param_scheduler import MultiStepParamScheduler", ""]
    if official_3x:
        lines.append("from pvt_d2.data.augmentation import ResizeOrResizeCropResize")
    lines.append("from pvt_d2.modeling.backbone import create_backbone")
    if kind == "retinanet":
        lines.append("from pvt_d2.modeling.backbone.registry import LastLevelP6P7FromC5")
    lines += ["", "from .common.data import dataloader", f"from .common.models.{kind} import model",
              "from .common.optim import optimizer", "from .common.train import train", ""]

    lines.append(f"model.backbone.bottom_up = {backbone_call(cfg)}")
    if kind == "retinanet":
        level = cfg.MODEL.FPN.IN_FEATURES[-1]
        channels = level_channels(cfg.MODEL.PVT_D2.ARCH, level)
        lines.append(f"model.backbone.top_block = L(LastLevelP6P7FromC5)(\n    in_channels={channels}, "
                     f'out_channels="${{..out_channels}}", in_feature="{level}"\n)')
    lines += [_assign(k, v) for k, v in model_fields]

    batch, steps = s.IMS_PER_BATCH, [x for x in s.STEPS if x <= s.MAX_ITER]
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    lines += ["", f"# Data: {batch} images per batch, "
              + ("the papers' 3x augmentation (pvt_d2/data/augmentation.py)" if official_3x else
                 f"short side {', '.join(str(x) for x in sizes)} (long side at most {cfg.INPUT.MAX_SIZE_TRAIN})")
              + ", horizontal flips"]
    lines += [_assign(k, v) for k, v in data_fields]
    if kind == "faster_rcnn":
        lines.append("dataloader.train.mapper.use_instance_mask = False")
    lines.append(f"dataloader.train.total_batch_size = {batch}")
    lines.append(_assign("dataloader.train.mapper.augmentations", _train_augmentations(cfg)))

    values = [float(f"{s.GAMMA ** k:.12g}") for k in range(len(steps) + 1)]
    lines += ["", f"# Optimizer and schedule: AdamW, {s.MAX_ITER} iterations, lr x{s.GAMMA:g} at "
              + (" and ".join(str(x) for x in steps) or "no step") + f", {s.WARMUP_ITERS} warmup iterations",
              f"optimizer.lr = {py(s.BASE_LR)}",
              f"optimizer.weight_decay = {py(s.WEIGHT_DECAY)}",
              f"train.max_iter = {s.MAX_ITER}",
              "lr_multiplier = L(WarmupParamScheduler)(",
              "    scheduler=L(MultiStepParamScheduler)(",
              f"        values={py(values)}, milestones={py(steps)}, num_updates=train.max_iter",
              "    ),",
              f"    warmup_length={s.WARMUP_ITERS} / train.max_iter,",
              f"    warmup_factor={py(s.WARMUP_FACTOR)},",
              ")"]
    lines += [_assign(k, v) for k, v in train_fields]
    lines.append(f"train.output_dir = {py(cfg.OUTPUT_DIR)}")
    return "\n".join(lines) + "\n"


def expected_files() -> Dict[str, str]:
    """File name -> content of every LazyConfig file."""
    names = sorted(yaml_files()) + list(EXTRA)
    return {f"{os.path.splitext(y)[0]}.py": render(y) for y in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    files = expected_files()
    stale = []
    os.makedirs(LAZY_DIR, exist_ok=True)
    for name, text in files.items():
        path = os.path.join(LAZY_DIR, name)
        if os.path.exists(path) and open(path).read() == text:
            continue
        stale.append(name)
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
    extra = sorted(set(f for f in os.listdir(LAZY_DIR) if f.endswith(".py")) - set(files))
    if args.check and (stale or extra):
        print("stale or missing lazy configs: " + ", ".join(stale) + (f"; not in the table: {', '.join(extra)}"
                                                                        if extra else ""))
        return 1
    print(f"{len(files)} lazy configs, {len(stale)} {'stale' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
