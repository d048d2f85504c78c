"""The family manifests: every fact read from them, and docs/ADDING_A_FAMILY.md walked with a toy family."""
import os

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from torch import nn

from conftest import CONFIGS
from pvt_d2.checkpoint.convert import convert_state_dict, load_converted
from pvt_d2.checkpoint.sources import SOURCES, get_source
from pvt_d2.config import ConfigError, load_config
from pvt_d2.model_zoo import table
from pvt_d2.model_zoo.generate import expected_files
from pvt_d2.model_zoo.recipes import official_config, recipe
from pvt_d2.modeling import create_backbone, get_arch, list_architectures
from pvt_d2.modeling.backbone import FAMILY_MODULES, PyramidBackbone, families, variants
from pvt_d2.modeling.backbone.key_mapping import MAPPINGS, FamilyMapping, identity, shape_at
from pvt_d2.modeling.backbone.manifest import (
    FamilyManifest,
    Variant,
    Weights,
    get_variant,
    register_family,
    registered_family,
)


# ---------------------------------------------------------------------------
# Step 1 of docs/ADDING_A_FAMILY.md: the model file (model, checkpoint mapping, manifest)
# ---------------------------------------------------------------------------
class ToyBackbone(PyramidBackbone):
    """Four strided convolutions: the smallest pyramid a family can be."""

    def __init__(self, embed_dims=(8, 16, 32, 64), in_chans: int = 3, drop_path_rate: float = 0.0,
                 out_features=None, output_norm: bool = False, freeze_at: int = 0):
        super().__init__()
        dims = (in_chans, *embed_dims)
        self.stages = nn.ModuleList(
            nn.Conv2d(dims[i], dims[i + 1], kernel_size=4 if i == 0 else 2, stride=4 if i == 0 else 2)
            for i in range(4))
        self._init_pyramid(embed_dims, out_features=out_features, output_norm=output_norm, freeze_at=freeze_at)

    def frozen_modules(self, freeze_at):
        return list(self.stages[:max(min(freeze_at, 4), 0)])

    def forward_features(self, x, needed):
        return self.run_stages(x, self.stages, needed)


TOY_MAPPING = FamilyMapping(
    "toy", "Toy",
    markers={"pvt_d2": (r"^stages\.0\.weight$", r"^stages\.3\.bias$")},
    converters={"pvt_d2": identity},
    hparams=lambda sd: {"embed_dims": tuple(shape_at(sd, f"stages.{i}.weight") for i in range(4))},
    hparams_of_kwargs=lambda kw: {"embed_dims": tuple(kw["embed_dims"])})

TOY = FamilyManifest(
    ToyBackbone, TOY_MAPPING,
    variants=(
        Variant("toy_tiny", dict(embed_dims=(8, 16, 32, 64)), Weights("", "{arch}.pth", note="never trained"),
                short="toy_t", drop_path=0.1, published_ap={"retinanet_1x": "12.3"},
                published_params={"retinanet_1x": 1.5}),
        Variant("toy_small", dict(embed_dims=(16, 32, 64, 128)), Weights("", "{arch}.pth"), short="toy_s",
                drop_path=0.2, small_batch=("mask_rcnn_1x",)),
    ),
    official_configs={"retinanet_1x": "example/toy detection/retinanet_{v}.py"},
    recipe={"3x": {"WARMUP_ITERS": 1000}},
    paper="A. Toy, \"Toys\", 2026", cite="Toy, 2026", params_source="Table 1")

TOY_FILES = {f"{prefix}toy_{size}{suffix}.yaml" for size in ("t", "s")
             for prefix, suffix in (("retinanet_", ""), ("mask_rcnn_", ""), ("faster_rcnn_", ""),
                                    ("mask_rcnn_", "_3x"), ("cascade_mask_rcnn_", "_3x"))}


@pytest.fixture
def toy_configs(tmp_path):
    """The toy family registered (step 2) and its generated configs written (step 5) to ``tmp_path``."""
    with registered_family(TOY):
        os.symlink(os.path.join(CONFIGS, "base"), tmp_path / "base")
        files = {name: text for name, text in expected_files().items() if name in TOY_FILES}
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        yield tmp_path, files


def test_toy_family_gets_configs(toy_configs):
    folder, files = toy_configs
    assert set(files) == TOY_FILES
    assert "Follows example/toy detection/retinanet_toy_tiny.py." in files["retinanet_toy_t.yaml"]
    for name in sorted(files):
        cfg = load_config(str(folder / name), ["MODEL.DEVICE", "cpu"])
        assert cfg.MODEL.PVT_D2.ARCH == ("toy_tiny" if "toy_t" in name else "toy_small")
        assert cfg.MODEL.PVT_D2.DROP_PATH_RATE == (0.1 if "toy_t" in name else 0.2)
        assert cfg.SOLVER.WARMUP_ITERS == (1000 if name.endswith("_3x.yaml") else 500)
        assert isinstance(build_backbone(cfg).bottom_up, ToyBackbone)
    small_batch = load_config(str(folder / "mask_rcnn_toy_s.yaml"))
    assert small_batch.SOLVER.IMS_PER_BATCH == 8 and small_batch.SOLVER.BASE_LR == pytest.approx(2e-4 / 1.4)
    model = build_model(load_config(str(folder / "retinanet_toy_t.yaml"), ["MODEL.DEVICE", "cpu"])).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)}])
    assert out[0]["instances"].image_size == (64, 96)
    with pytest.raises(ConfigError, match="toy_tiny has no level res6"):
        load_config(str(folder / "retinanet_toy_t.yaml"), ["MODEL.PVT_D2.OUT_FEATURES", "['res5', 'res6']"])


def test_toy_family_gets_a_model_zoo_row(toy_configs):
    folder, _ = toy_configs
    entries = table.list_configs(config_dir=str(folder))
    assert {e["arch"] for e in entries} == {"toy_tiny", "toy_small"} and len(entries) == 8
    data = table.measure(entries, flops=False, latency=False, log=lambda *_: None)
    run_info = {"date": "today", "machine": "test", "load_start": "0", "load_end": "0", "minutes": 0.1,
                "size": [800, 1333], "latency_iters": 1, "latency_budget_s": 20}
    text = table.render(entries, data, run_info)
    assert "### Toy" in text and "| `toy_tiny` | Toy |" in text
    row = next(line for line in text.splitlines() if line.startswith("| [retinanet_toy_t]"))
    assert "| RetinaNet 1x | `toy_tiny` |" in row and "| 1.5 |" in row and row.endswith("| 12.3 |")
    assert "Toy (Toy, 2026)" in text


def test_toy_family_gets_a_checkpoint_mapping():
    with registered_family(TOY):
        trained = create_backbone("toy_small")
        converted = convert_state_dict(trained.state_dict())
        assert (converted.family, converted.layout, converted.arch) == ("toy", "pvt_d2", "toy_small")
        fresh = create_backbone("toy_small", output_norm=True)
        report = load_converted(fresh, converted)
        assert report.ok and report.new and all(k.startswith("output_norms.") for k in report.new)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items())
        assert get_source("toy_small").filename == "toy_small.pth" and not get_source("toy_small").available


def test_unregistering_forgets_the_toy_family():
    with registered_family(TOY):
        assert "toy_tiny" in list_architectures() and "toy" in MAPPINGS and "toy_tiny" in SOURCES
    assert "toy_tiny" not in list_architectures() and "toy" not in MAPPINGS and "toy_tiny" not in SOURCES
    assert not TOY_FILES & set(expected_files())
    assert "toy" not in [m.name for m in families()]


def test_a_variant_or_short_name_is_registered_once():
    with registered_family(TOY):
        with pytest.raises(KeyError, match="registered twice"):
            register_family(TOY)
    taken = FamilyManifest(ToyBackbone, TOY_MAPPING, variants=(
        Variant("toy_other", {}, Weights("", "x.pth"), short="pvt_s", drop_path=0.0),))
    with pytest.raises(KeyError, match="short name 'pvt_s'"):
        register_family(taken)
    assert "toy_other" not in list_architectures()


# ---------------------------------------------------------------------------
# The shipped families: every consumer reads the manifests
# ---------------------------------------------------------------------------
def test_family_modules_are_the_registered_families():
    assert tuple(m.name for m in families()) == FAMILY_MODULES
    assert sorted(v.name for v in variants()) == list_architectures()
    for manifest in families():
        for variant in manifest.variants:
            spec = get_arch(variant.name)
            assert (spec.family, spec.model_cls, spec.kwargs) == (manifest.name, manifest.model_cls, variant.kwargs)
            assert SOURCES[variant.name] is variant.weights and variant.weights.arch == variant.name


def test_generated_configs_state_the_manifests():
    files = expected_files()
    assert len(files) == 5 * len(variants())
    for variant in variants():
        text = files[f"retinanet_{variant.short}.yaml"]
        assert f'ARCH: "{variant.name}"' in text and f"DROP_PATH_RATE: {variant.drop_path}\n" in text
        assert f'PRETRAINED: "{variant.weights.url}"' in text
    gcvit = load_config(os.path.join(CONFIGS, "mask_rcnn_gcvit_t_3x.yaml"))
    assert list(gcvit.MODEL.PVT_D2.GCVIT.WINDOW_SIZES) == [24, 24, 24, 24]
    assert gcvit.SOLVER.WARMUP_ITERS == 2500
    assert official_config("twins_pcpvt_large", "mask_rcnn_3x")[0] is None  # the pattern's file does not exist
    official, _ = official_config("twins_svt_small", "retinanet_1x")
    assert official.endswith("retinanet_alt_gvt_s_fpn_1x_coco_pvt_setting.py")
    assert recipe("pvt_large", "mask_rcnn_1x")["IMS_PER_BATCH"] == 8


def test_model_zoo_tables_are_the_manifests():
    assert table.family_names() == {m.name: m.display for m in families()}
    assert table.published_ap()[("pvt_v2_b2", "cascade_mask_rcnn_3x")] == "51.1 / 44.4"
    assert table.published_params()["mask_rcnn_twins_svt_b"] == 76.3
    assert table.published_classifier_params("twins_svt_base") == 768 * 1000 + 1000
    assert table.published_classifier_params("twins_pcpvt_small") == 512 * 1000 + 1000
    assert table.published_classifier_params("pvt_v2_b2") == 0
    family, variant = get_variant("levit_256")
    assert family.levels[-1] == "res6" and variant.weights.origin == "official"
