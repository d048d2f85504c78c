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


def test_lazy_files_are_generated_from_the_table():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_lazy_configs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from tools.generate_configs import expected_files

    lazy = set(os.listdir(os.path.join(CONFIGS, "lazy")))
    assert {f"{os.path.splitext(n)[0]}.py" for n in expected_files()} | {"quickstart_pvt_v2_b0.py"} <= lazy


def test_lazy_file_loads_with_detectron2_sections():
    from detectron2.config import LazyConfig
    from detectron2.modeling import RetinaNet
    from detectron2.modeling.backbone import FPN

    cfg = LazyConfig.load(os.path.join(CONFIGS, "lazy", "retinanet_pvt_v2_b0.py"))
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    assert cfg.model._target_ is RetinaNet and cfg.model.backbone._target_ is FPN
    assert cfg.model.backbone.bottom_up._target_.__name__ == "PyramidVisionTransformerV2"
    assert cfg.dataloader.train.dataset.names == ["coco_2017_train"]
    assert cfg.optimizer.params.model is None  # set by the training script, as in detectron2
    assert cfg.train.max_iter > 0 and cfg.train.output_dir.endswith("retinanet_1x_pvt_v2_b0")


def _compare(config, tmp_path):
    from detectron2.config import instantiate
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler

    from pvt_d2.engine.optim import build_optimizer
    from pvt_d2.lazy import lazy_lr_multiplier, lazy_model, lazy_optimizer

    cfg = tiny_train_cfg(config, str(tmp_path), ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                                                 "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                                 "SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(60, 90)",
                                                 "SOLVER.WARMUP_ITERS", "10", "MODEL.PVT_D2.PRETRAINED", ""])
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    lazy = lazy_model(cfg)
    lazy_built = instantiate(lazy)
    a, b = yaml_model.state_dict(), lazy_built.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
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
    lazy_opt = lazy_optimizer(cfg)
    lazy_opt.params.model = lazy_built
    opt_b = instantiate(lazy_opt)
    names_a = {id(p): n for n, p in yaml_model.named_parameters()}
    names_b = {id(p): n for n, p in lazy_built.named_parameters()}
    assert type(opt_a) is type(opt_b) and len(opt_a.param_groups) == len(opt_b.param_groups)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert [names_a[id(p)] for p in ga["params"]] == [names_b[id(p)] for p in gb["params"]]
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
    sched_a = build_lr_scheduler(cfg, opt_a)
    multiplier = instantiate(lazy_lr_multiplier(cfg))
    for it in range(100):
        assert abs(opt_a.param_groups[0]["lr"] - cfg.SOLVER.BASE_LR * multiplier(it / 100)) < 1e-12, it
        sched_a.step()


@pytest.mark.parametrize("config", DETECTOR_TYPES)
def test_lazy_and_yaml_build_the_same_detector(config, tmp_path):
    _compare(config, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", FAMILIES)
def test_lazy_and_yaml_same_detector_every_family(config, tmp_path):
    _compare(config, tmp_path)


def test_lazyconfig_train_net_errors_are_one_line(tmp_path, capsys):
    from tools.lazyconfig_train_net import cli

    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    cases = {
        "missing": (["--config-file", str(tmp_path / "nope.py")], "Config file not found"),
        "yaml": (["--config-file", os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml")], "use|tools/train_net.py"),
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
