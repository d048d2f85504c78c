"""Every YAML under configs/ builds its detector; small variants also run a forward pass."""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model

from conftest import CONFIGS
from pvt_d2.config import ConfigError, load_config
from pvt_d2.modeling import get_arch

ALL_CONFIGS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
# variants cheap enough to also run a forward pass in every detector type
SMALL_ARCHS = {"pvt_tiny", "pvt_v2_b0", "levit_128s", "gcvit_xxtiny", "twins_svt_small", "twins_pcpvt_small",
               "vip_s14"}
DETECTORS = {"retinanet_": "RetinaNet", "mask_rcnn_": "GeneralizedRCNN", "cascade_mask_rcnn_": "GeneralizedRCNN",
             "faster_rcnn_": "GeneralizedRCNN"}


def _arch_of(name):
    return load_config(os.path.join(CONFIGS, name)).MODEL.PVT_D2.ARCH


def test_required_configs_exist():
    assert "retinanet_pvt_s.yaml" in ALL_CONFIGS
    assert "quickstart_pvt_v2_b0.yaml" in ALL_CONFIGS
    # one config per detector for every registered variant (the family manifests)
    from pvt_d2.model_zoo.generate import expected_files
    from pvt_d2.model_zoo.recipes import DETECTORS as GENERATED
    from pvt_d2.modeling.backbone import variants

    assert set(expected_files()) <= set(ALL_CONFIGS)
    assert len(variants()) * len(GENERATED) == len(expected_files())


def test_generated_configs_are_up_to_date():
    from pvt_d2.model_zoo.generate import main

    assert main(["--check"]) == 0


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_builds(name):
    cfg = load_config(os.path.join(CONFIGS, name), ["MODEL.DEVICE", "cpu", "MODEL.PVT_D2.PRETRAINED", ""])
    arch = cfg.MODEL.PVT_D2.ARCH
    try:
        get_arch(arch)
    except KeyError:
        pytest.fail(f"{name} names an unregistered architecture {arch}")
    if arch not in SMALL_ARCHS and "quickstart" not in name:
        # large variants: build the backbone only (the heads are the same as the small ones')
        from detectron2.modeling import build_backbone

        backbone = build_backbone(cfg)
        assert backbone.size_divisibility == 32
        return
    model = build_model(cfg).eval()
    prefix = next(p for p in sorted(DETECTORS, key=len, reverse=True) if os.path.basename(name).startswith(p)) \
        if "quickstart" not in name else "mask_rcnn_"
    assert type(model).__name__ == DETECTORS[prefix]
    # the FPN pads inputs to the stride of its coarsest input level (P6/P7 use padded strided convs)
    assert model.backbone.size_divisibility == 32
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 72, 100), dtype=torch.uint8), "height": 72, "width": 100}])
    assert out[0]["instances"].image_size == (72, 100)


def test_three_x_configs_use_multiscale_and_papers_recipe():
    cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_s_3x.yaml"))
    # 36 epochs of 7,330 iterations, steps after epochs 27 and 33 (details: tests/test_recipes.py)
    assert cfg.SOLVER.MAX_ITER == 263880 and tuple(cfg.SOLVER.STEPS) == (197910, 241890)
    assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 480 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 800
    assert cfg.SOLVER.WEIGHT_DECAY == 0.05 and cfg.INPUT.AUGMENTATION == "official_3x"
    one_x = load_config(os.path.join(CONFIGS, "retinanet_pvt_s.yaml"))
    assert one_x.SOLVER.MAX_ITER == 87960 and tuple(one_x.SOLVER.STEPS) == (58640, 80630)
    assert one_x.SOLVER.WEIGHT_DECAY == 1e-4 and one_x.SOLVER.BASE_LR == 1e-4
    assert one_x.SOLVER.OPTIMIZER == "ADAMW" and one_x.SOLVER.IMS_PER_BATCH == 16
    assert one_x.SOLVER.AMP.ENABLED and one_x.INPUT.FORMAT == "RGB"
    assert list(one_x.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.PVT_D2.NOPE"):
        load_config(os.path.join(CONFIGS, "retinanet_pvt_s.yaml"), ["MODEL.PVT_D2.NOPE", "1"])


def test_python_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f'_BASE_: "{os.path.join(CONFIGS, "retinanet_pvt_s.yaml")}"\n'
                   f'OUTPUT_DIR: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="refused for safety"):
        load_config(str(bad))
    assert not marker.exists()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="Config file not found: .*nope.yaml"):
        load_config("configs/nope.yaml")
