"""Every detectron2 client builds the same detector from a pvt_d2 config as pvt_d2's own trainer.

detectron2's ``DefaultTrainer`` (with and without :class:`pvt_d2.engine.RecipeMixin`),
``DefaultPredictor``, ``build_model`` and :func:`pvt_d2.model_zoo.get` are
compared with :class:`pvt_d2.engine.Trainer`: same ImageNet backbone weights
after build, same optimizer groups and learning rates, and an AdamW config
never trains with detectron2's SGD silently. (The LazyConfig client is in
``tests/test_lazyconfig.py``.)
"""
import os

import pytest
import torch
from conftest import tiny_train_cfg

CONFIG = "mask_rcnn_pvt_v2_b0.yaml"


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A PVT v2-b0 "ImageNet checkpoint" in timm's layout with recognisable random weights."""
    from pvt_d2 import create_backbone

    torch.manual_seed(123)
    backbone = create_backbone("pvt_v2_b0")
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.02)
    path = str(tmp_path_factory.mktemp("imagenet") / "pvt_v2_b0_in1k.pth")
    torch.save(backbone.state_dict(), path)
    return path


def _cfg(tmp_path, dataset_root, *opts):
    # no evaluation at the end of the short runs (DATASETS.TEST empty): the runs compare training only
    cfg = tiny_train_cfg(CONFIG, str(tmp_path / "out"), ["DATASETS.TEST", "()"] + list(opts))
    cfg.freeze()
    return cfg


def _bottom_up(model):
    return model.backbone.bottom_up


def _assert_backbone_is(model, path):
    expected = torch.load(path, weights_only=True)
    state = _bottom_up(model).state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _groups(optimizer):
    return [(type(optimizer).__name__, g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"]))
            for g in optimizer.param_groups]


def test_defaulttrainer_with_recipe_mixin_equals_our_trainer(tmp_path, dataset_root, imagenet_file):
    from detectron2.engine import DefaultTrainer

    from pvt_d2.engine import RecipeMixin, Trainer

    class MyTrainer(RecipeMixin, DefaultTrainer):
        pass

    cfg = _cfg(tmp_path, dataset_root, "MODEL.PVT_D2.PRETRAINED", imagenet_file)
    ours = Trainer.build_model(cfg)
    theirs = MyTrainer.build_model(cfg)
    _assert_backbone_is(ours, imagenet_file)
    _assert_backbone_is(theirs, imagenet_file)
    ours_opt, theirs_opt = Trainer.build_optimizer(cfg, ours), MyTrainer.build_optimizer(cfg, theirs)
    assert isinstance(theirs_opt, torch.optim.AdamW)
    assert _groups(theirs_opt) == _groups(ours_opt)
    assert [g["weight_decay"] for g in theirs_opt.param_groups] == [cfg.SOLVER.WEIGHT_DECAY, 0.0]
    trainer = MyTrainer(cfg)  # detectron2's constructor end to end, then two iterations on the synthetic set
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # detectron2 counts past the last iteration


def test_plain_defaulttrainer_stops_instead_of_training_sgd(tmp_path, dataset_root, imagenet_file):
    from detectron2.engine import DefaultTrainer

    from pvt_d2.engine import OptimizerMismatchError

    cfg = _cfg(tmp_path, dataset_root, "MODEL.PVT_D2.PRETRAINED", imagenet_file)
    model = DefaultTrainer.build_model(cfg)
    _assert_backbone_is(model, imagenet_file)  # the ImageNet weights reach detectron2's own trainer too
    trainer = DefaultTrainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    with pytest.raises(OptimizerMismatchError, match=r"SOLVER.OPTIMIZER ADAMW.*SGD.*RecipeMixin"):
        trainer.train()
    assert trainer.iter == 0  # stopped before the first update


def test_sgd_on_purpose_is_accepted(tmp_path, dataset_root):
    from detectron2.engine import DefaultTrainer

    cfg = _cfg(tmp_path, dataset_root, "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.001")
    trainer = DefaultTrainer(cfg)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # detectron2 counts past the last iteration


def test_defaultpredictor_and_build_model_load_the_imagenet_weights(tmp_path, dataset_root, imagenet_file):
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    cfg = _cfg(tmp_path, dataset_root, "MODEL.PVT_D2.PRETRAINED", imagenet_file)
    _assert_backbone_is(DefaultPredictor(cfg).model, imagenet_file)
    _assert_backbone_is(build_model(cfg), imagenet_file)


def test_model_weights_replace_the_imagenet_weights_without_fetching_them(tmp_path, dataset_root):
    """With MODEL.WEIGHTS the builder never touches MODEL.PVT_D2.PRETRAINED (here an unreachable URL)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    cfg = _cfg(tmp_path, dataset_root)
    model = build_model(cfg)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    DetectionCheckpointer(model, cfg.OUTPUT_DIR).save("detector")
    weights = os.path.join(cfg.OUTPUT_DIR, "detector.pth")
    cfg = _cfg(tmp_path, dataset_root, "MODEL.PVT_D2.PRETRAINED", "http://127.0.0.1:9/none.pth",
               "MODEL.WEIGHTS", weights)
    predictor = DefaultPredictor(cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[key], value), key


def test_model_zoo_get_equals_build_model(imagenet_file):
    from pvt_d2 import model_zoo

    model = model_zoo.get(CONFIG, device="cpu", overrides=["MODEL.PVT_D2.PRETRAINED", imagenet_file,
                                                           "MODEL.FPN.OUT_CHANNELS", "32"])
    _assert_backbone_is(model, imagenet_file)
    assert type(model).__name__ == "GeneralizedRCNN" and model.roi_heads.num_classes == 80
    with pytest.raises(ValueError, match="no trained detectors"):
        model_zoo.get(CONFIG, trained=True)


def test_model_zoo_config_files():
    from pvt_d2 import model_zoo

    path = model_zoo.get_config_file("retinanet_pvt_s.yaml")
    assert os.path.isfile(path) and path.endswith(os.path.join("configs", "retinanet_pvt_s.yaml"))
    assert model_zoo.get_config_file("configs/retinanet_pvt_s.yaml") == path
    assert os.path.isfile(model_zoo.get_config_file("lazy/retinanet_pvt_s.py"))
    assert model_zoo.get_config("retinanet_pvt_s.yaml").MODEL.PVT_D2.ARCH == "pvt_small"
    assert "mask_rcnn_pvt_v2_b2.yaml" in model_zoo.list_configs()
    with pytest.raises(FileNotFoundError, match="did you mean retinanet_pvt_s.yaml"):
        model_zoo.get_config_file("retinanet_pvt_ss.yaml")
