"""LazyConfig twins (configs/lazy/*.py): the same model, optimizer groups and schedule as the YAML configs."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO, tiny_train_cfg

# one config of every detector type (pvt_v2_b0), then one of every family (tiny variants, rotating detector types)
DETECTOR_TYPES = ["retinanet_pvt_v2_b0.yaml", "faster_rcnn_pvt_v2_b0.yaml", "mask_rcnn_pvt_v2_b0.yaml",
                  "mask_rcnn_pvt_v2_b0_3x.yaml", "cascade_mask_rcnn_pvt_v2_b0_3x.yaml"]
FAMILIES = ["retinanet_pvt_t.yaml", "faster_rcnn_twins_pcpvt_s.yaml", "mask_rcnn_twins_svt_s.yaml",
            "cascade_mask_rcnn_gcvit_xxt_3x.yaml", "retinanet_levit_128s.yaml", "mask_rcnn_vip_s14_3x.yaml"]


LAZY = os.path.join(CONFIGS, "lazy")
# the num_classes override of every detector type, and what every head must then predict
NUM_CLASSES_KEY = {"retinanet": "model.num_classes"}
NO_PRETRAINED = "model.backbone.bottom_up.pretrained="


@pytest.mark.slow
def test_lazy_files_are_generated_from_the_table():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_lazy_configs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from tools.generate_configs import expected_files

    lazy = set(os.listdir(LAZY))
    assert {f"{os.path.splitext(n)[0]}.py" for n in expected_files()} | {"quickstart_pvt_v2_b0.py"} <= lazy


class _ModuleCounter:
    """Counts the sub-modules, parameters and buffers registered anywhere (torch's global registration hooks)."""

    def __enter__(self):
        from torch.nn.modules import module

        self.count = 0
        self.handles = [register(self._hook) for register in (
            module.register_module_module_registration_hook, module.register_module_parameter_registration_hook,
            module.register_module_buffer_registration_hook)]
        return self

    def _hook(self, *args):
        self.count += 1

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _load_without_building(names):
    """Load each LazyConfig file: nothing may create a module, parameter or buffer; each load under 1 s of CPU."""
    import time

    from detectron2.config import LazyConfig

    LazyConfig.load(os.path.join(LAZY, "retinanet_pvt_v2_b0.py"))  # imports detectron2's and pvt_d2's modules once
    slow = {}
    for name in names:
        with _ModuleCounter() as counter:
            start = time.process_time()  # CPU time: the machine's other jobs do not count
            cfg = LazyConfig.load(os.path.join(LAZY, name))
            seconds = time.process_time() - start
        assert counter.count == 0, f"{name}: loading it built {counter.count} module parts"
        assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys()), name
        assert "pretrained" not in cfg.train, name
        if seconds > 1.0:
            slow[name] = seconds
    assert not slow, slow


def test_lazy_files_of_every_detector_type_load_without_building_a_model():
    _load_without_building([f"{os.path.splitext(c)[0]}.py" for c in DETECTOR_TYPES] + ["quickstart_pvt_v2_b0.py"])


@pytest.mark.slow
def test_every_lazy_file_loads_without_building_a_model():
    _load_without_building(sorted(f for f in os.listdir(LAZY) if f.endswith(".py")))


def test_lazy_file_loads_with_detectron2_sections():
    from detectron2.config import LazyConfig
    from detectron2.modeling import RetinaNet
    from detectron2.modeling.backbone import FPN

    from pvt_d2.modeling.backbone.registry import LastLevelP6P7FromC5

    cfg = LazyConfig.load(os.path.join(LAZY, "retinanet_pvt_v2_b0.py"))
    assert cfg.model._target_ is RetinaNet and cfg.model.backbone._target_ is FPN
    bottom_up = cfg.model.backbone.bottom_up
    assert bottom_up._target_.__name__ == "create_backbone" and bottom_up.name == "pvt_v2_b0"
    assert bottom_up.drop_path_rate == 0.1 and list(bottom_up.out_features) == ["res3", "res4", "res5"]
    assert bottom_up.pretrained == "https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b0.pth"
    top = cfg.model.backbone.top_block
    assert top._target_ is LastLevelP6P7FromC5 and (top.in_channels, top.out_channels) == (256, 256)
    assert cfg.dataloader.train.dataset.names == ["coco_2017_train"]
    assert cfg.dataloader.evaluator.dataset_name == cfg.dataloader.test.dataset.names == "coco_2017_val"
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.params.weight_decay == cfg.optimizer.weight_decay == 1e-4
    assert cfg.train.max_iter == 87960 and cfg.train.output_dir.endswith("retinanet_1x_pvt_v2_b0")
    assert cfg.train.init_checkpoint == "" and cfg.train.amp.enabled


def test_generated_backbone_takes_the_run_time_switches(tmp_path):
    """MODEL.PVT_D2.ACTIVATION_CHECKPOINT / FAST_INFERENCE reach the LazyConfig backbone as create_backbone
    arguments; the same fields can be added on the command line."""
    from detectron2.config import LazyConfig, instantiate

    from pvt_d2.inference import is_prepared
    from pvt_d2.modeling.backbone.pvt_v2 import PyramidVisionTransformerV2

    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", "/tmp/unused", [
        "MODEL.PVT_D2.ACTIVATION_CHECKPOINT", "True", "MODEL.PVT_D2.FAST_INFERENCE", "False"])
    lazy = LazyConfig.load(_write_lazy(tmp_path, "retinanet_pvt_v2_b0.yaml", cfg))
    assert (lazy.model.backbone.bottom_up.act_checkpoint, lazy.model.backbone.bottom_up.fast_inference) == (True, False)
    built = instantiate(lazy.model.backbone.bottom_up)
    assert isinstance(built, PyramidVisionTransformerV2)
    assert built.act_checkpoint and all(b.act_checkpoint for b in built.modules() if hasattr(type(b), "act_checkpoint"))
    assert not is_prepared(built)
    shipped = LazyConfig.load(os.path.join(LAZY, "retinanet_pvt_v2_b0.py"))
    shipped = LazyConfig.apply_overrides(shipped, [NO_PRETRAINED, "+model.backbone.bottom_up.act_checkpoint=True"])
    assert instantiate(shipped.model.backbone.bottom_up).act_checkpoint
    assert is_prepared(instantiate(shipped.model.backbone.bottom_up))  # fast_inference's default


def _write_lazy(tmp_path, config: str, cfg) -> str:
    """The LazyConfig text that tools/generate_lazy_configs.py writes for ``cfg`` (a YAML config, changed), written
    next to a copy of configs/lazy/common; its path."""
    import shutil

    from tools.generate_lazy_configs import render

    folder = tmp_path / "lazy"
    if not folder.exists():
        shutil.copytree(os.path.join(LAZY, "common"), folder / "common")
    path = folder / f"{os.path.splitext(config)[0]}.py"
    path.write_text(render(config, cfg))
    return str(path)


def test_generator_refuses_a_yaml_key_it_cannot_write():
    """A YAML value without a LazyConfig form in tools/generate_lazy_configs.py stops the generator, naming it."""
    from pvt_d2.config import load_config
    from tools.generate_lazy_configs import render

    cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b0.yaml"), ["MODEL.RPN.IOU_THRESHOLDS", "[0.2, 0.8]"])
    with pytest.raises(ValueError, match=r"MODEL.RPN.IOU_THRESHOLDS = \[0.2, 0.8\] \(base \[0.3, 0.7\]\)"):
        render("mask_rcnn_pvt_v2_b0.yaml", cfg)


def _compare(config, tmp_path):
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler

    from pvt_d2.engine.optim import build_optimizer

    cfg = tiny_train_cfg(config, str(tmp_path), ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                                                 "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                                 "SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(60, 90)",
                                                 "SOLVER.WARMUP_ITERS", "10"])
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    lazy = LazyConfig.load(_write_lazy(tmp_path, config, cfg))
    lazy_built = instantiate(lazy.model).to(lazy.train.device)
    a, b = yaml_model.state_dict(), lazy_built.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert sum(p.numel() for p in yaml_model.parameters()) == sum(p.numel() for p in lazy_built.parameters())
    assert str(yaml_model) == str(lazy_built)  # the same modules with the same settings
    lazy_built.load_state_dict(a)
    yaml_model.eval()
    lazy_built.eval()
    image = torch.rand(3, 100, 124, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        out_a = yaml_model([{"image": image}])[0]["instances"]
        out_b = lazy_built([{"image": image}])[0]["instances"]
    assert len(out_a) == len(out_b) > 0
    for field in ("pred_boxes", "scores", "pred_classes") + (("pred_masks",) if out_a.has("pred_masks") else ()):
        x, y = out_a.get(field), out_b.get(field)
        x, y = (x.tensor, y.tensor) if hasattr(x, "tensor") else (x, y)
        assert torch.allclose(x.float(), y.float(), atol=1e-5), field
    # the same optimizer groups (parameter names, lr, weight decay) and the same schedule
    opt_a = build_optimizer(cfg, yaml_model)
    lazy.optimizer.params.model = lazy_built
    opt_b = instantiate(lazy.optimizer)
    _same_groups(yaml_model, opt_a, lazy_built, opt_b)
    sched_a = build_lr_scheduler(cfg, opt_a)
    multiplier = instantiate(lazy.lr_multiplier)
    assert lazy.train.max_iter == 100
    for it in range(100):
        assert abs(opt_a.param_groups[0]["lr"] - lazy.optimizer.lr * multiplier(it / 100)) < 1e-12, it
        sched_a.step()


def _same_groups(model_a, opt_a, model_b, opt_b):
    names_a = {id(p): n for n, p in model_a.named_parameters()}
    names_b = {id(p): n for n, p in model_b.named_parameters()}
    assert type(opt_a) is type(opt_b) and len(opt_a.param_groups) == len(opt_b.param_groups) > 1
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert [names_a[id(p)] for p in ga["params"]] == [names_b[id(p)] for p in gb["params"]]
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}


@pytest.mark.parametrize("config", DETECTOR_TYPES)
def test_lazy_and_yaml_build_the_same_detector(config, tmp_path):
    _compare(config, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", FAMILIES)
def test_lazy_and_yaml_same_detector_every_family(config, tmp_path):
    _compare(config, tmp_path)


@pytest.mark.slow
def test_res5_channels_written_for_retinanet_are_the_backbones():
    """tools/generate_lazy_configs.py writes each variant's level channels without building it: every registered
    variant's numbers against its built backbone (on the meta device: no memory, no weights)."""
    from pvt_d2.modeling.backbone import create_backbone, list_architectures
    from tools.generate_lazy_configs import level_channels

    for arch in list_architectures():
        with torch.device("meta"):
            shapes = create_backbone(arch).output_shape()
        assert {level: level_channels(arch, level) for level in shapes} == {
            level: shape.channels for level, shape in shapes.items()}, arch


def _heads_num_classes(model):
    """``{head: number of classes it predicts}`` for every classifier of a built detector."""
    from detectron2.modeling import RetinaNet

    if isinstance(model, RetinaNet):
        head = model.head
        return {"model.num_classes": model.num_classes,
                "head.cls_score": head.cls_score.out_channels // model.anchor_generator.num_cell_anchors[0]}
    roi = model.roi_heads
    predictors = roi.box_predictor if isinstance(roi.box_predictor, torch.nn.ModuleList) else [roi.box_predictor]
    found = {"roi_heads.num_classes": roi.num_classes}
    for i, p in enumerate(predictors):
        found[f"box_predictor{i}.cls_score"] = p.cls_score.out_features - 1
        if p.bbox_pred.out_features != 4:  # class-specific regression
            found[f"box_predictor{i}.bbox_pred"] = p.bbox_pred.out_features // 4
        found[f"box_predictor{i}.num_classes"] = p.num_classes
    if getattr(roi, "mask_on", False):
        masks = roi.mask_head if isinstance(roi.mask_head, torch.nn.ModuleList) else [roi.mask_head]
        for i, m in enumerate(masks):
            found[f"mask_head{i}.predictor"] = m.predictor.out_channels
    return found


@pytest.mark.parametrize("config", ["retinanet_pvt_v2_b0.py", "faster_rcnn_pvt_v2_b0.py", "mask_rcnn_pvt_v2_b0.py",
                                    "cascade_mask_rcnn_pvt_v2_b0_3x.py", "quickstart_pvt_v2_b0.py"])
def test_num_classes_override_reaches_every_head(config):
    """detectron2's interpolation is kept: one override of num_classes sets every box predictor (of every cascade
    stage), every mask head and RetinaNet's head."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(LAZY, config))
    key = NUM_CLASSES_KEY.get(config.split("_pvt")[0], "model.roi_heads.num_classes")
    cfg = LazyConfig.apply_overrides(cfg, [f"{key}=3", NO_PRETRAINED, "model.backbone.out_channels=32"])
    found = _heads_num_classes(instantiate(cfg.model))
    assert len(found) >= (2 if config.startswith("retinanet") else 4 if config.startswith("faster") else 5)
    if config.startswith("cascade"):
        assert sum(k.endswith(".cls_score") for k in found) == 3 and sum(k.startswith("mask_head") for k in found) == 3
    assert found == {k: 3 for k in found}, found


def test_lazyconfig_train_net_errors_are_one_line(tmp_path, capsys):
    from pvt_d2.cli.lazyconfig_train_net import cli

    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    cases = {
        "missing": (["--config-file", str(tmp_path / "nope.py")], "Config file not found"),
        "yaml": (["--config-file", os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml")],
                 "use|tools/train_net.py|pvt-d2-train"),
        "raises": (["--config-file", str(broken)], "failed to load: RuntimeError: boom"),
        "override": (["--config-file", os.path.join(CONFIGS, "lazy", "retinanet_pvt_v2_b0.py"),
                      "train.max_iter"], "Bad override"),
        "no_coco": (["--config-file", os.path.join(CONFIGS, "lazy", "retinanet_pvt_v2_b0.py"),
                     f"train.output_dir={tmp_path / 'o'}", "dataloader.train.dataset.names=[no_such_set]"],
                    "not registered"),
    }
    for name, (argv, message) in cases.items():
        assert cli(argv) == 2, name
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ERROR")]
        assert len(err) == 1 and any(m in err[0] for m in message.split("|")), (name, err)


# ------------------------------------------------------------------- the quickstart twin trains the same way
QUICKSTART_LAZY = os.path.join(CONFIGS, "lazy", "quickstart_pvt_v2_b0.py")


def _first_batches(loader, count):
    """``[(image_id, image, gt_boxes), ...]`` of the first ``count`` batches of a training loader."""
    batches, it = [], iter(loader)
    for _ in range(count):
        batches.append([(d["image_id"], d["image"], d["instances"].gt_boxes.tensor) for d in next(it)])
    return batches


@pytest.mark.usefixtures("dataset_root")
def test_quickstart_twin_trains_like_the_yaml_quickstart(tmp_path):
    """tools/quickstart.py and its LazyConfig twin with the same seed: the same initial weights, the same
    images in the same order with the same augmentations, the same parameter groups and schedule."""
    from detectron2.config import instantiate
    from pvt_d2.cli import quickstart
    from pvt_d2.cli.lazyconfig_train_net import build_training, get_parser, setup

    from pvt_d2.engine import Trainer

    cfg = quickstart.setup(["OUTPUT_DIR", str(tmp_path / "yaml")])
    trainer = Trainer(cfg)
    yaml_batches = _first_batches(trainer.data_loader, 3)
    args = get_parser().parse_args(["--config-file", QUICKSTART_LAZY, f"train.output_dir={tmp_path / 'lazy'}"])
    lazy_cfg = setup(args)
    model, optimizer, loader = build_training(lazy_cfg)
    lazy_batches = _first_batches(loader, 3)

    a, b = trainer.model.state_dict(), model.state_dict()
    assert list(a) == list(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit-identical initial weights
    for batch_a, batch_b in zip(yaml_batches, lazy_batches):  # order, resize choice, flips, pixels, boxes
        assert [d[0] for d in batch_a] == [d[0] for d in batch_b]
        for (_, image_a, boxes_a), (_, image_b, boxes_b) in zip(batch_a, batch_b):
            assert image_a.shape == image_b.shape and torch.equal(image_a, image_b)
            assert torch.equal(boxes_a, boxes_b)
    assert len({tuple(d[1].shape[1:]) for batch in yaml_batches for d in batch}) > 1  # augmented sizes vary
    names_a = {id(p): n for n, p in trainer.model.named_parameters()}
    names_b = {id(p): n for n, p in model.named_parameters()}
    assert len(trainer.optimizer.param_groups) == len(optimizer.param_groups) > 1
    for ga, gb in zip(trainer.optimizer.param_groups, optimizer.param_groups):
        assert [names_a[id(p)] for p in ga["params"]] == [names_b[id(p)] for p in gb["params"]]
        # the YAML trainer's scheduler has set the warmup lr already; the LazyConfig hook does so in before_train
        ga = {k: v for k, v in ga.items() if k not in ("params", "lr")}
        assert ga.pop("initial_lr") == gb["lr"]
        assert ga == {k: v for k, v in gb.items() if k not in ("params", "lr")}
    assert lazy_cfg.train.max_iter == cfg.SOLVER.MAX_ITER and lazy_cfg.train.seed == cfg.SEED
    multiplier = instantiate(lazy_cfg.lr_multiplier)
    steps = cfg.SOLVER.MAX_ITER  # 0.1 ** 2 is written 0.01 in the file
    assert [trainer.scheduler._multiplier(i / steps) for i in range(steps)] == pytest.approx(
        [multiplier(i / steps) for i in range(steps)], rel=1e-12)


# ------------------------------------------------------------------------------- train.output_dir and --dataset
def _lock(folder):
    import json
    import socket

    from pvt_d2.engine.output_dir import LOCK_NAME

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                "what": "training", "started": "today"}))


def _error_lines(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("ERROR")]


def test_quickstart_refuses_a_locked_output_dir(tmp_path, capsys):
    from pvt_d2.cli import quickstart

    _lock(tmp_path)
    assert quickstart.main(["OUTPUT_DIR", str(tmp_path)]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and f"ERROR: OUTPUT_DIR {tmp_path} is in use by another run (training, process " \
                               f"{os.getpid()}" in err[0], err
    assert sorted(os.listdir(tmp_path)) == [".pvt_d2.lock"]  # nothing written
    assert quickstart.main(["SOLVER.NO_SUCH_KEY", "1"]) == 2
    assert len(_error_lines(capsys)) == 1


def test_lazyconfig_train_net_refuses_a_locked_or_used_output_dir(tmp_path, capsys):
    from pvt_d2.cli.lazyconfig_train_net import cli

    _lock(tmp_path / "live")
    assert cli(["--config-file", QUICKSTART_LAZY, f"train.output_dir={tmp_path / 'live'}"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "is in use by another run (training, process" in err[0], err
    done = tmp_path / "done"
    done.mkdir()
    (done / "model_final.pth").write_bytes(b"")
    assert cli(["--config-file", QUICKSTART_LAZY, f"train.output_dir={done}"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and f"OUTPUT_DIR {done} holds the checkpoints of another run (model_final.pth)" in err[0]
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert sorted(os.listdir(done)) == ["model_final.pth"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A box-only two-class COCO set (category ids 3 and 7), written by tests/test_own_data.py's helper."""
    from test_own_data import write_coco

    root = tmp_path_factory.mktemp("lazy_trees")
    write_coco(str(root))
    return root


def _declare(trees):
    return ["--dataset", f"ltrees_train={trees / 'train.json'}:{trees / 'images'}",
            "--dataset", f"ltrees_val={trees / 'val.json'}:{trees / 'images'}"]


USE_TREES = ["dataloader.train.dataset.names=[ltrees_train]", "dataloader.test.dataset.names=ltrees_val"]


@pytest.mark.parametrize("config", ["faster_rcnn_pvt_v2_b0.py", "retinanet_pvt_v2_b0.py",
                                    "cascade_mask_rcnn_pvt_v2_b0_3x.py"])
def test_lazy_dataset_declarations_set_the_class_count(config, trees):
    from pvt_d2.cli.lazyconfig_train_net import get_parser, load_lazy_config

    from pvt_d2.lazy import setup_lazy_datasets

    args = get_parser().parse_args(["--config-file", os.path.join(CONFIGS, "lazy", config), *_declare(trees),
                                    *USE_TREES])
    cfg = load_lazy_config(args.config_file, args.opts)
    if config.startswith("cascade"):  # box-only data and a mask head: refused with the hint
        from pvt_d2.data import DatasetError

        with pytest.raises(DatasetError, match="boxes but no masks.*configs/lazy/faster_rcnn_<variant>.py"):
            setup_lazy_datasets(cfg, args.dataset, args.opts)
        return
    assert setup_lazy_datasets(cfg, args.dataset, args.opts) == ["ltrees_train", "ltrees_val"]
    if config.startswith("retinanet"):
        assert cfg.model.num_classes == cfg.model.head.num_classes == 2
    else:
        assert cfg.model.roi_heads.num_classes == cfg.model.roi_heads.box_predictor.num_classes == 2


def test_lazy_dataset_errors_are_one_line(trees, tmp_path, capsys):
    from pvt_d2.cli.lazyconfig_train_net import cli

    faster = os.path.join(CONFIGS, "lazy", "faster_rcnn_pvt_v2_b0.py")
    out = f"train.output_dir={tmp_path / 'o'}"
    cases = {
        "mismatch": ([QUICKSTART_LAZY, *_declare(trees), *USE_TREES, out],
                     "model.roi_heads.num_classes = 4 is set in the config, but dataset 'ltrees_train' has 2 "
                     "classes"),
        "override": ([faster, *_declare(trees), *USE_TREES, "model.roi_heads.num_classes=5", out],
                     "model.roi_heads.num_classes = 5 is set in the config"),
        "unused": ([faster, *_declare(trees), out], "are declared but dataloader.train.dataset.names"),
        "missing": ([faster, "--dataset", f"x={tmp_path / 'none.json'}", "dataloader.train.dataset.names=[x]", out],
                    "none.json"),
    }
    for name, (argv, message) in cases.items():
        assert cli(["--config-file", *argv]) == 2, name
        err = _error_lines(capsys)
        assert len(err) == 1 and message in err[0], (name, err)


# --------------------------------------------------------------------- annotation checks and a --dataset run
def _with_string_box(trees, tmp_path, split):
    """A copy of the trees set's ``split``.json whose first box is given as strings (detectron2 drops it silently)."""
    import json

    data = json.loads((trees / f"{split}.json").read_text())
    data["annotations"][0]["bbox"] = [str(v) for v in data["annotations"][0]["bbox"]]
    path = tmp_path / f"bad_{split}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval_only"])
def test_lazy_bad_annotation_file_is_one_error_line_before_training(eval_only, trees, tmp_path, capsys):
    """The annotation checks of tools/train_net.py (pvt_d2/data/validation.py) run on the training set (and,
    with --eval-only, on the test set): exit status 2, one ERROR line naming the file and the field, nothing
    written to train.output_dir."""
    from pvt_d2.cli.lazyconfig_train_net import cli

    split = "val" if eval_only else "train"
    files = {"train": trees / "train.json", "val": trees / "val.json"}
    files[split] = bad = _with_string_box(trees, tmp_path, split)
    train, val = f"lbad_{split}_train", f"lbad_{split}_val"
    out = tmp_path / "o"
    argv = (["--eval-only"] if eval_only else []) + [
        "--config-file", os.path.join(CONFIGS, "lazy", "faster_rcnn_pvt_v2_b0.py"),
        "--dataset", f"{train}={files['train']}:{trees / 'images'}",
        "--dataset", f"{val}={files['val']}:{trees / 'images'}",
        f"dataloader.train.dataset.names=[{train}]", f"dataloader.test.dataset.names={val}",
        f"train.output_dir={out}"]
    assert cli(argv) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and f"ERROR: {bad}: annotations[0].bbox = ['" in err[0], err
    assert "a box is four numbers [x, y, width, height]" in err[0]
    assert not out.exists() or not list(out.rglob("*.pth"))


@pytest.mark.slow
def test_lazy_trains_and_evaluates_a_declared_coco_json(trees, tmp_path, capsys):
    """tools/lazyconfig_train_net.py --dataset NAME=SPEC end to end: a tiny Faster R-CNN LazyConfig (the
    overrides of tests/test_own_data.py) trains 2 iterations on the trees COCO json and evaluates on its
    val json (2 classes taken from the data)."""
    import json

    from test_own_data import TINY
    from pvt_d2.cli.lazyconfig_train_net import cli

    out = tmp_path / "out"
    from pvt_d2.config import load_config

    cfg = load_config(os.path.join(CONFIGS, "faster_rcnn_pvt_v2_b0.yaml"),
                      TINY + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)])
    config = _write_lazy(tmp_path, "faster_rcnn_pvt_v2_b0.yaml", cfg)
    assert cli(["--config-file", config, *_declare(trees), *USE_TREES]) == 0, _error_lines(capsys)
    assert (out / "model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in log and "copypaste: Task: bbox" in log
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any("bbox/AP" in m for m in metrics)  # the evaluation at the end, as in the YAML runs


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval_only"])
def test_lazy_class_count_of_a_builtin_dataset_is_checked_before_training(eval_only, tmp_path, capsys):
    """A LazyConfig on built-in datasets (no --dataset to fit num_classes): a training set with more classes
    than the model, or an evaluation set with another count, is one ERROR line naming the field, exit 2."""
    from pvt_d2.cli.lazyconfig_train_net import cli

    out = tmp_path / "o"
    argv = (["--eval-only"] if eval_only else []) + [
        "--config-file", os.path.join(CONFIGS, "lazy", "faster_rcnn_pvt_v2_b0.py"),
        "dataloader.train.dataset.names=[synthetic_train]", "dataloader.test.dataset.names=synthetic_val",
        f"train.output_dir={out}"] + ([] if eval_only else ["model.roi_heads.num_classes=2"])
    assert cli(argv) == 2
    err = _error_lines(capsys)
    assert len(err) == 1, err
    if eval_only:  # 80 COCO classes against the 4 synthetic ones
        assert err[0].startswith("ERROR: model.roi_heads.num_classes = 80 but dataset 'synthetic_val' has 4 classes")
        assert "evaluation fails" in err[0] and err[0].endswith("Set model.roi_heads.num_classes=4.")
    else:
        assert err[0].startswith("ERROR: model.roi_heads.num_classes = 2 but dataset 'synthetic_train' has 4 classes")
        assert "its labels would index past the classifier" in err[0]
    assert not out.exists() or not list(out.rglob("*.pth"))


def test_lazy_class_count_check_accepts_fewer_training_classes():
    from detectron2.config import LazyConfig

    from pvt_d2.data import DatasetError, prepare_datasets
    from pvt_d2.lazy import check_lazy_num_classes

    cfg = LazyConfig.load(os.path.join(CONFIGS, "lazy", "faster_rcnn_pvt_v2_b0.py"))
    cfg.dataloader.train.dataset.names = ["synthetic_train"]  # 4 classes < 80: trains
    cfg.dataloader.test.dataset.names = "synthetic_val"
    prepare_datasets(["synthetic_train", "synthetic_val"])
    with pytest.raises(DatasetError, match="num_classes = 80 but dataset 'synthetic_val' has 4"):
        check_lazy_num_classes(cfg, training=True)
    cfg.model.roi_heads.num_classes = 4
    check_lazy_num_classes(cfg, training=True)  # no error
    cfg.dataloader.test.dataset.names = []
    cfg.model.roi_heads.num_classes = 80
    check_lazy_num_classes(cfg, training=True)  # fewer training classes than the model: allowed


# --------------------------------------------------- detectron2's own tools/lazyconfig_train_net.py logic as a client
D2_TINY = ["model.backbone.out_channels=32", "model.roi_heads.batch_size_per_image=32",
           "model.roi_heads.box_head.fc_dims=[64,64]", "model.roi_heads.box_predictor.input_shape.channels=64",
           "model.roi_heads.mask_head.conv_dims=[32,32,32,32,32]", "model.roi_heads.num_classes=4",
           "model.proposal_generator.post_nms_topk=[64,32]", "model.proposal_generator.pre_nms_topk=[2000,200]",
           "dataloader.train.dataset.names=[synthetic_train]", "dataloader.test.dataset.names=synthetic_val",
           "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
           "dataloader.train.mapper.augmentations.0.short_edge_length=[96,128]",
           "dataloader.train.mapper.augmentations.0.max_size=160",
           "train.device=cpu", "train.amp.enabled=False", "train.max_iter=2"]
YAML_TINY = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
             "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
             "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A small "ImageNet" checkpoint of pvt_v2_b0 (a fresh backbone's weights, pvt_d2 layout)."""
    from pvt_d2.modeling.backbone import create_backbone

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("imagenet") / "pvt_v2_b0_in1k.pth"
    torch.save(create_backbone("pvt_v2_b0").state_dict(), path)
    return str(path)


@pytest.mark.usefixtures("dataset_root")
def test_detectron2_lazyconfig_train_net_logic_builds_and_trains_our_detector(imagenet_file, tmp_path):
    """What detectron2's tools/lazyconfig_train_net.py does with configs/lazy/mask_rcnn_pvt_v2_b0.py (model, .to,
    optimizer over optimizer.params.model, train loader, train.init_checkpoint, SimpleTrainer / AMPTrainer with the
    lr_multiplier) against our YAML path (pvt_d2.engine.Trainer.build_model / build_optimizer): both start from the
    same ImageNet file, so the same seed gives the same weights, and the same parameter groups and learning rates."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, hooks

    from pvt_d2.config import load_config
    from pvt_d2.data import prepare_datasets
    from pvt_d2.engine import Trainer

    cfg = LazyConfig.load(os.path.join(LAZY, "mask_rcnn_pvt_v2_b0.py"))
    cfg = LazyConfig.apply_overrides(cfg, D2_TINY + [f"model.backbone.bottom_up.pretrained={imagenet_file}",
                                                     f"train.output_dir={tmp_path / 'lazy'}"])
    prepare_datasets(["synthetic_train"])
    torch.manual_seed(0)
    model = instantiate(cfg.model)  # detectron2's do_train, step by step
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    yaml_cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b0.yaml"),
                           YAML_TINY + ["MODEL.PVT_D2.PRETRAINED", imagenet_file])
    torch.manual_seed(0)
    yaml_model = Trainer.build_model(yaml_cfg)
    yaml_optim = Trainer.build_optimizer(yaml_cfg, yaml_model)
    a, b = yaml_model.state_dict(), model.state_dict()
    assert list(a) == list(b) and [k for k in a if not torch.equal(a[k], b[k])] == []  # the same weights
    imagenet = torch.load(imagenet_file)
    assert all(torch.equal(b[f"backbone.bottom_up.{k}"], v) for k, v in imagenet.items())  # ImageNet loaded
    _same_groups(yaml_model, yaml_optim, model, optim)
    assert optim.param_groups[0]["lr"] == yaml_cfg.SOLVER.BASE_LR == 2e-4

    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=False)  # "": nothing to load, as configured
    trainer.train(0, cfg.train.max_iter)
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    assert {"loss_mask", "loss_box_reg", "loss_rpn_cls"} <= set(trainer.storage.histories())


def test_init_checkpoint_skips_the_imagenet_weights(tmp_path):
    """With train.init_checkpoint, pvt-d2-lazy-train blanks the backbone's pretrained (a file that does not exist
    is then never read); detectron2's own script loads both, with the same result."""
    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig

    from pvt_d2.cli.lazyconfig_train_net import build_training

    cfg = LazyConfig.load(os.path.join(LAZY, "faster_rcnn_pvt_v2_b0.py"))
    missing = str(tmp_path / "no_such_imagenet.pth")
    cfg = LazyConfig.apply_overrides(cfg, D2_TINY[:5] + [f"model.backbone.bottom_up.pretrained={missing}",
                                                         f"train.init_checkpoint={tmp_path / 'detector.pth'}",
                                                         "train.device=cpu", "dataloader.train.num_workers=0"])
    cfg.dataloader.train = L(list)()  # the loader is not what this test is about
    model, optimizer, _ = build_training(cfg)
    assert cfg.model.backbone.bottom_up.pretrained == "" and len(optimizer.param_groups) == 2
