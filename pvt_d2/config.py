"""Config keys added by pvt_d2 on top of detectron2's defaults.

Call :func:`add_pvt_d2_config` on a detectron2 config before merging one of the
YAML files under ``configs/``. Every key is documented where it is defined.

A backbone setting has one default, the model's own: its family file's
constructor and variant table (``pvt_d2/modeling/backbone/<family>.py``).
The ``MODEL.PVT_D2`` keys that mirror one are unset (``None`` or ``[]``) here
and only override it when a config or the command line sets them; the
detector configs under ``configs/`` set the detection values (drop path per
variant, the family's detection keys) explicitly, from the family manifests.
The valid values of a family's keys and its levels are the manifest's too
(:mod:`pvt_d2.modeling.backbone.manifest`).
"""
import math

from detectron2.config import CfgNode as CN

from .modeling.backbone.base import DEFAULT_OUT_FEATURES

__all__ = ["add_pvt_d2_config", "get_pvt_d2_cfg", "load_config", "resolve_config_file", "validate_config",
           "ConfigError"]


def add_pvt_d2_config(cfg: CN) -> CN:
    """Add the ``MODEL.PVT_D2`` namespace and the training extras; returns ``cfg``."""
    cfg.MODEL.PVT_D2 = CN()
    # Variant name, e.g. "pvt_small", "pvt_v2_b2", "twins_svt_small", "gcvit_tiny".
    cfg.MODEL.PVT_D2.ARCH = "pvt_v2_b0"
    # Pyramid levels returned by the backbone (res2..res5 at strides 4..32).
    cfg.MODEL.PVT_D2.OUT_FEATURES = list(DEFAULT_OUT_FEATURES)
    # Stochastic depth: the rate of the last block, linearly increasing from 0.
    # None = the variant's own rate.
    cfg.MODEL.PVT_D2.DROP_PATH_RATE = None
    # Extra LayerNorm on every returned level.
    cfg.MODEL.PVT_D2.OUTPUT_NORM = False
    # ImageNet checkpoint (official or timm layout) loaded into the backbone
    # when the model is built; "" = none. MODEL.WEIGHTS, if set, loads after it.
    cfg.MODEL.PVT_D2.PRETRAINED = ""
    # Recompute every backbone block in the backward pass instead of keeping its
    # activations (training only; same gradients, less memory, ~1 extra forward).
    cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT = False
    # CPU float32 inference: linears on oneDNN-packed weights (GELU fused), LeViT's
    # BatchNorms folded into their projections. Same function, float32 rounding
    # differs (~1e-6); False = nn.Linear / separate BatchNorms (timm's kernels).
    cfg.MODEL.PVT_D2.FAST_INFERENCE = True

    # Twins: the official detection code's LayerNorm on every stage output
    # (it also feeds the next stage). None = variant default (on for SVT, off
    # for PCPVT); True / False forces it.
    cfg.MODEL.PVT_D2.TWINS = CN()
    cfg.MODEL.PVT_D2.TWINS.EXTRA_NORM = None

    # GC ViT: window side per stage; [] = the model's own, the ImageNet windows
    # 7, 7, 14, 7. The GC ViT detector configs set the official detection
    # code's 24 in every stage (NVlabs/GCVit detection/configs/gcvit/*.py).
    cfg.MODEL.PVT_D2.GCVIT = CN()
    cfg.MODEL.PVT_D2.GCVIT.WINDOW_SIZES = []

    # LeViT: "window" (attention inside tiles of the pretraining grid) or
    # "global" (whole map, bias table extended); norm "FrozenBN", "BN" or
    # "SyncBN". None = the model's own.
    cfg.MODEL.PVT_D2.LEVIT = CN()
    cfg.MODEL.PVT_D2.LEVIT.ATTN_MODE = None
    cfg.MODEL.PVT_D2.LEVIT.NORM = None

    # Training augmentation: "default" (detectron2's resize + flip from
    # INPUT.MIN_SIZE_TRAIN) or "official_3x" (the papers' 3x recipe, see
    # pvt_d2/data/augmentation.py): with probability 1 - CROP_PROB the default
    # resize; otherwise resize the short side to one of RESIZE_BEFORE_CROP,
    # crop a random CROP_SIZE = (min, max) px region, then resize as default.
    cfg.INPUT.AUGMENTATION = "default"
    cfg.INPUT.OFFICIAL_3X = CN()
    cfg.INPUT.OFFICIAL_3X.CROP_PROB = 0.5
    cfg.INPUT.OFFICIAL_3X.RESIZE_BEFORE_CROP = (400, 500, 600)
    cfg.INPUT.OFFICIAL_3X.CROP_SIZE = (384, 600)

    # Cascade heads (pvt_d2/modeling/roi_heads.py): loss weight of each stage.
    cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)

    # Optimizer: AdamW ("ADAMW") or detectron2's SGD ("SGD").
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # With AdamW, gradient clipping (when enabled) clips the norm of all
    # gradients together, as the papers' mmdetection recipes do.
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"

    # Your own datasets, each "NAME=path/annotations.json:path/images" (COCO
    # json) or "NAME=path/VOCfolder[:SPLIT]" (Pascal VOC); the tools' --dataset
    # flag adds to it. See pvt_d2/data/custom.py.
    cfg.DATASETS.CUSTOM = []
    return cfg


def get_pvt_d2_cfg() -> CN:
    """A fresh detectron2 default config with the pvt_d2 keys added."""
    from detectron2.config import get_cfg

    return add_pvt_d2_config(get_cfg())


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names it."""


def resolve_config_file(config_file: str) -> str:
    """``config_file`` if it is a file, else the shipped config of that name (``configs/<name>.yaml`` or
    ``<name>.yaml``, :mod:`pvt_d2.model_zoo`): a command written for a checkout works from any folder.

    Raises:
        ConfigError: neither exists.
    """
    import os

    from .model_zoo import get_config_file

    if os.path.isfile(config_file):
        return config_file
    try:
        return get_config_file(config_file)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {config_file}") from None


def load_config(config_file: str, opts=None) -> CN:
    """Read a pvt_d2 YAML config (with its ``_BASE_`` chain) and apply overrides.

    YAML files are parsed with the safe loader only: a file with Python object
    tags is refused, never executed.

    Args:
        config_file: path of the YAML file; a name that is not a file here
            (``retinanet_pvt_s.yaml``, ``configs/retinanet_pvt_s.yaml``) is
            looked up among the shipped configs (:mod:`pvt_d2.model_zoo`).
        opts: ``["KEY", "VALUE", ...]`` overrides as on the command line.

    Raises:
        ConfigError: missing file, unsafe or malformed YAML, unknown key, a
            value of the wrong type or an unusable value (see :func:`validate_config`).
    """

    import yaml

    config_file = resolve_config_file(config_file)
    cfg = get_pvt_d2_cfg()
    try:
        _check_base_chain(config_file)
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"Config file {config_file} (or one of its _BASE_ files) contains a YAML tag that "
                          f"is not plain data and is refused for safety: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {config_file} is not valid YAML: {e}") from None
    except KeyError as e:
        raise ConfigError(f"Config file {config_file}: {e.args[0] if e.args else e}") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"Config file {config_file}: {e}") from None
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"Overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
        try:
            cfg.merge_from_list(list(opts))
        except KeyError as e:
            raise ConfigError(f"Unknown config key in overrides: {e.args[0] if e.args else e}") from None
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"Bad override value: {e}") from None
    validate_config(cfg)
    return cfg


def _check_base_chain(config_file: str, chain=()) -> None:
    """Walk the ``_BASE_`` chain of a YAML config: every file exists, is a mapping, and no file includes itself.

    Raises:
        ConfigError: naming the file (and the chain that led to it).
    """
    import os

    import yaml

    path = os.path.abspath(config_file)
    via = f" (via {' -> '.join(chain)})" if chain else ""
    if path in {os.path.abspath(c) for c in chain}:
        raise ConfigError(f"Config file {config_file} includes itself through _BASE_: "
                          f"{' -> '.join([*chain, config_file])}")
    if not os.path.isfile(path):
        raise ConfigError(f"_BASE_ file not found: {config_file}{via}")
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {config_file}{via} holds a YAML {type(data).__name__}, not a mapping of "
                          f"keys (e.g. 'MODEL:' ...)")
    base = data.get("_BASE_")
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"Config file {config_file}: _BASE_ must be one file name, got {base!r}")
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(path), base)
        if not base.startswith(("https://", "http://")):
            _check_base_chain(base, (*chain, config_file))


# Builders of pvt_d2 backbones, and those of them that put an FPN on top.
_PVT_D2_BUILDERS = ("build_pvt_d2_backbone", "build_pvt_d2_fpn_backbone", "build_pvt_d2_retinanet_fpn_backbone")
_PVT_D2_FPN_BUILDERS = _PVT_D2_BUILDERS[1:]


def _value(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_config(cfg: CN) -> CN:
    """Refuse values that detectron2 would only trip over later, deep in a run.

    Checked: image sizes, batch size, iteration counts and periods are
    positive; learning rate, decay and schedule values are in range; class
    counts, pixel statistics and detections per image make sense; the
    backbone architecture is registered and an FPN only asks for levels the
    backbone returns. Keys of detectron2's own backbones are not looked at
    when ``MODEL.BACKBONE.NAME`` is not a pvt_d2 builder.

    Returns:
        ``cfg`` unchanged.

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.
    """
    def bad(key: str, allowed: str):
        raise ConfigError(f"{key} = {_value(cfg, key)!r} is not allowed: {allowed}.")

    def positive_int(key: str, minimum: int = 1):
        v = _value(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            bad(key, f"it must be an integer >= {minimum}")

    def finite_number(key: str, low: float, high: float = float("inf"), low_inclusive: bool = True):
        v = _value(cfg, key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v >= low if low_inclusive else v > low) and v <= high
        if not ok:
            bad(key, f"it must be a finite number {'>=' if low_inclusive else '>'} {low}"
                     + (f" and <= {high}" if math.isfinite(high) else ""))

    min_train = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = [min_train] if isinstance(min_train, int) else list(min_train)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        bad("INPUT.MIN_SIZE_TRAIN", "it must be one or more positive integers, e.g. (800,)")
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING not in ("choice", "range"):
        bad("INPUT.MIN_SIZE_TRAIN_SAMPLING", "use 'choice' or 'range'")
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
        bad("INPUT.MIN_SIZE_TRAIN", "with sampling 'range' it must be (low, high) with low <= high")
    positive_int("INPUT.MAX_SIZE_TRAIN")
    if cfg.INPUT.get("AUGMENTATION", "default") not in ("default", "official_3x"):
        bad("INPUT.AUGMENTATION", "use 'default' or 'official_3x'")
    positive_int("INPUT.MIN_SIZE_TEST", minimum=0)  # 0 disables resizing at test time
    positive_int("INPUT.MAX_SIZE_TEST")

    positive_int("SOLVER.IMS_PER_BATCH")
    positive_int("SOLVER.MAX_ITER")
    positive_int("SOLVER.CHECKPOINT_PERIOD")
    positive_int("SOLVER.WARMUP_ITERS", minimum=0)
    positive_int("TEST.EVAL_PERIOD", minimum=0)
    positive_int("TEST.DETECTIONS_PER_IMAGE")
    positive_int("DATALOADER.NUM_WORKERS", minimum=0)
    finite_number("SOLVER.BASE_LR", 0.0, low_inclusive=False)
    finite_number("SOLVER.WEIGHT_DECAY", 0.0)
    finite_number("SOLVER.MOMENTUM", 0.0)
    finite_number("SOLVER.GAMMA", 0.0, low_inclusive=False)
    finite_number("SOLVER.WARMUP_FACTOR", 0.0, 1.0)
    steps = list(cfg.SOLVER.STEPS)
    if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in steps) or steps != sorted(steps):
        bad("SOLVER.STEPS", "it must be increasing positive iteration numbers, e.g. (60000, 80000)")
    if str(cfg.SOLVER.get("OPTIMIZER", "SGD")).upper() not in ("ADAMW", "SGD"):
        bad("SOLVER.OPTIMIZER", "use 'ADAMW' or 'SGD'")
    if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
        finite_number("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.0, low_inclusive=False)

    positive_int("MODEL.ROI_HEADS.NUM_CLASSES")
    positive_int("MODEL.RETINANET.NUM_CLASSES")
    positive_int("MODEL.FPN.OUT_CHANNELS")
    if cfg.MODEL.ROI_HEADS.NAME == "PaperCascadeROIHeads":
        cascade = cfg.MODEL.ROI_BOX_CASCADE_HEAD
        if not len(cascade.IOUS) == len(cascade.BBOX_REG_WEIGHTS) == len(cascade.STAGE_LOSS_WEIGHTS) > 0:
            bad("MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS",
                f"give one value per cascade stage, as IOUS ({len(cascade.IOUS)}) and BBOX_REG_WEIGHTS "
                f"({len(cascade.BBOX_REG_WEIGHTS)})")
        if cascade.IOUS[0] != cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]:
            bad("MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "the first stage's IoU must equal MODEL.ROI_HEADS.IOU_THRESHOLDS[0]")
    if cfg.INPUT.FORMAT not in _INPUT_FORMATS:
        bad("INPUT.FORMAT", f"use one of {', '.join(_INPUT_FORMATS)}")
    channels = 1 if cfg.INPUT.FORMAT == "L" else 3
    if len(cfg.MODEL.PIXEL_MEAN) != channels:
        bad("MODEL.PIXEL_MEAN", f"INPUT.FORMAT {cfg.INPUT.FORMAT} has {channels} channel(s): give one value each")
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        if len(_value(cfg, key)) != len(cfg.MODEL.PIXEL_MEAN) or not len(_value(cfg, key)):
            bad(key, "MODEL.PIXEL_MEAN and MODEL.PIXEL_STD need one value per input channel")
    if any(not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0) for s in cfg.MODEL.PIXEL_STD):
        bad("MODEL.PIXEL_STD", "every value must be a finite number > 0")

    if cfg.MODEL.BACKBONE.NAME in _PVT_D2_BUILDERS:
        from .modeling import list_architectures

        if cfg.MODEL.PVT_D2.ARCH not in list_architectures():
            bad("MODEL.PVT_D2.ARCH", f"unknown architecture; valid names: {', '.join(list_architectures())}")
        if cfg.MODEL.PVT_D2.DROP_PATH_RATE is not None:
            finite_number("MODEL.PVT_D2.DROP_PATH_RATE", 0.0, 1.0)
        out = list(cfg.MODEL.PVT_D2.OUT_FEATURES)
        if not out or len(set(out)) != len(out):
            bad("MODEL.PVT_D2.OUT_FEATURES", "it must list distinct levels, e.g. ['res2', 'res3', 'res4', 'res5']")
        _validate_family_options(cfg, bad)
        if cfg.MODEL.BACKBONE.NAME in _PVT_D2_FPN_BUILDERS:
            missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in out]
            if missing or not cfg.MODEL.FPN.IN_FEATURES:
                raise ConfigError(
                    f"MODEL.FPN.IN_FEATURES = {list(cfg.MODEL.FPN.IN_FEATURES)!r} asks for "
                    f"{missing or 'no levels'} but MODEL.PVT_D2.OUT_FEATURES = {out!r}: the FPN can only use "
                    f"levels the backbone returns.")
    return cfg


# Image formats detectron2's readers produce.
_INPUT_FORMATS = ("BGR", "RGB", "L", "YUV-BT.601")


def _one_of(values) -> str:
    """``('a', 'b', 'c')`` -> ``"'a', 'b' or 'c'"``."""
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _validate_family_options(cfg: CN, bad) -> None:
    """Options of ``MODEL.PVT_D2`` that the model would only reject when built: levels, freezing, family keys.

    The levels and the allowed values of every family's keys are read from the family manifests.
    """
    from .modeling.backbone.manifest import families, get_variant

    family, _ = get_variant(cfg.MODEL.PVT_D2.ARCH)
    levels = list(family.levels)
    unknown = [f for f in cfg.MODEL.PVT_D2.OUT_FEATURES if f not in levels]
    if unknown:
        bad("MODEL.PVT_D2.OUT_FEATURES", f"{cfg.MODEL.PVT_D2.ARCH} has no level {', '.join(unknown)}; its levels "
                                         f"are {', '.join(levels)}")
    freeze = cfg.MODEL.BACKBONE.FREEZE_AT
    if isinstance(freeze, bool) or not isinstance(freeze, int) or not 0 <= freeze <= len(levels) + 1:
        bad("MODEL.BACKBONE.FREEZE_AT", f"it must be 0 (train everything), 1 (freeze the stem) or 2-{len(levels) + 1}"
                                        f" (also the stages up to res2-res{len(levels) + 1})")
    for manifest in families():
        node = cfg.MODEL.PVT_D2.get(manifest.cfg_node)
        for option in manifest.options:
            key = f"MODEL.PVT_D2.{manifest.cfg_node}.{option.key}"
            value = None if node is None else node.get(option.key)
            if value is None:
                continue
            if option.choices and value not in option.choices:
                bad(key, option.allowed or f"use {_one_of(option.choices)} (None: the model's own)")
            if option.check is not None and not option.check(list(value) if isinstance(value, tuple) else value):
                bad(key, option.allowed)
