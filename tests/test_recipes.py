"""The detectors are the papers' detectors: every recipe point checked on the built config, model,
optimizer and mapper (issue 12; the table of points and sources is docs/RECIPES.md)."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks, pairwise_iou
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from conftest import CONFIGS
from pvt_d2.config import load_config

SMALL = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
         "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu"]


def _cfg(name, *opts):
    return load_config(os.path.join(CONFIGS, name), ["MODEL.DEVICE", "cpu", "MODEL.PVT_D2.PRETRAINED", ""]
                       + list(opts))


class _MetaParameters(TorchFunctionMode):
    """Create parameters on the meta device (no memory, no init cost); small index tensors stay on the CPU."""

    _CPU = {torch.linspace, torch.arange, torch.tensor, torch.as_tensor, torch.zeros, torch.ones}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and kwargs.get("device") is None and func not in self._CPU:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _meta_model(name):
    cfg = _cfg(name)
    with _MetaParameters():
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


# ---------------------------------------------------------------- RetinaNet


def test_retinanet_p6_from_res5_and_no_relu_before_p7():
    model = build_model(_cfg("retinanet_pvt_v2_b0.yaml", "MODEL.FPN.OUT_CHANNELS", "64")).eval()
    fpn = model.backbone
    top = fpn.top_block
    res5 = fpn.bottom_up.output_shape()["res5"].channels
    assert top.in_feature == "res5" and top.p6.in_channels == res5 == 256 != fpn._out_feature_channels["p5"]
    assert (top.p6.kernel_size, top.p6.stride) == ((3, 3), (2, 2)) and top.p7.in_channels == 64
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in top.modules())
    c5 = torch.randn(1, res5, 5, 7)
    with torch.no_grad():
        p6, p7 = top(c5)
        assert (p6 < 0).any()  # so a ReLU would change P7
        torch.testing.assert_close(p7, top.p7(p6))
        assert not torch.allclose(p7, top.p7(torch.relu(p6)))
        feats = fpn(torch.zeros(1, 3, 64, 96))
    assert [k for k in feats] == ["p3", "p4", "p5", "p6", "p7"] and feats["p7"].shape[-2:] == (1, 1)


def test_retinanet_box_loss_is_l1():
    from detectron2.modeling.box_regression import _dense_box_regression_loss

    model = build_model(_cfg("retinanet_pvt_v2_b0.yaml"))
    assert model.box_reg_loss_type == "smooth_l1" and model.smooth_l1_beta == 0.0
    anchors = [Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0]]))]
    deltas = torch.tensor([[[0.3, -0.2, 0.1, 0.05], [-0.4, 0.2, -0.3, 0.1]]])
    gt = [torch.tensor([[1.0, 2.0, 12.0, 9.0], [4.0, 6.0, 33.0, 18.0]])]
    fg = torch.ones(1, 2, dtype=torch.bool)
    loss = _dense_box_regression_loss(anchors, model.box2box_transform, [deltas], gt, fg,
                                      box_reg_loss_type=model.box_reg_loss_type,
                                      smooth_l1_beta=model.smooth_l1_beta)
    targets = model.box2box_transform.get_deltas(anchors[0].tensor, gt[0])
    torch.testing.assert_close(loss, (deltas[0] - targets).abs().sum())


# ---------------------------------------------------------------- Cascade Mask R-CNN


def test_cascade_head_structure():
    from pvt_d2.modeling.roi_heads import PaperCascadeROIHeads

    heads = _meta_model("cascade_mask_rcnn_pvt_v2_b2_3x.yaml").roi_heads
    assert type(heads) is PaperCascadeROIHeads and heads.num_cascade_stages == 3
    assert [m.thresholds[1] for m in heads.proposal_matchers] == [0.5, 0.6, 0.7]
    assert heads.stage_loss_weights == (1.0, 0.5, 0.25)
    for k, (head, predictor) in enumerate(zip(heads.box_head, heads.box_predictor)):
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        fcs = [m for m in head.modules() if isinstance(m, nn.Linear)]
        assert len(convs) == 4 and all(c.out_channels == 256 and c.bias is None for c in convs)
        assert all(isinstance(c.norm, nn.BatchNorm2d) for c in convs)  # SyncBN -> BN in a single process
        assert [f.out_features for f in fcs] == [1024]
        assert predictor.bbox_pred.out_features == 80 * 4  # class-specific regression
        assert predictor.cls_score.out_features == 81
        assert predictor.box_reg_loss_type == "giou"
        assert predictor.loss_weight == {"loss_cls": heads.stage_loss_weights[k],
                                         "loss_box_reg": 10.0 * heads.stage_loss_weights[k]}
        assert predictor.box2box_transform.weights == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)][k]
    assert isinstance(heads.mask_head, nn.ModuleList) and len(heads.mask_head) == 3
    assert len({id(m) for m in heads.mask_head}) == 3
    assert all(sum(isinstance(m, nn.Conv2d) for m in h.modules()) == 5 for h in heads.mask_head)  # 4 convs + logits


def test_box_head_norm_choice(monkeypatch):
    from detectron2.utils import comm

    from pvt_d2.modeling.roi_heads import box_head_norm

    assert box_head_norm("SyncBN", "cuda") == "BN" and box_head_norm("GN", "cpu") == "GN"
    monkeypatch.setattr(comm, "get_world_size", lambda: 8)
    assert box_head_norm("SyncBN", "cuda:0") == "SyncBN" and box_head_norm("SyncBN", "cpu") == "naiveSyncBN"


@pytest.fixture(scope="module")
def tiny_cascade():
    torch.manual_seed(0)
    return build_model(_cfg("cascade_mask_rcnn_pvt_v2_b0_3x.yaml", *SMALL))


def _proposals(image_size=(64, 64)):
    p = Instances(image_size)
    p.proposal_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 30.0], [10.0, 8.0, 50.0, 40.0], [0.0, 0.0, 8.0, 8.0]]))
    p.gt_boxes = Boxes(torch.tensor([[5.0, 5.0, 28.0, 33.0], [12.0, 6.0, 47.0, 44.0], [0.0, 0.0, 1.0, 1.0]]))
    p.gt_classes = torch.tensor([2, 0, 4])  # the last is background
    return p


def test_cascade_giou_loss_on_decoded_class_specific_boxes(tiny_cascade):
    from fvcore.nn import giou_loss

    predictor = tiny_cascade.roi_heads.box_predictor[1]
    proposals = _proposals()
    torch.manual_seed(1)
    logits, deltas = torch.randn(3, 5), torch.randn(3, 16) * 0.5
    with torch.no_grad():
        from detectron2.utils.events import EventStorage

        with EventStorage():
            losses = predictor.losses((logits, deltas), [proposals])
    fg = [0, 1]
    chosen = deltas.view(3, 4, 4)[fg, proposals.gt_classes[fg]]  # the deltas of each box's ground-truth class
    decoded = predictor.box2box_transform.apply_deltas(chosen, proposals.proposal_boxes.tensor[fg])
    expected = giou_loss(decoded, proposals.gt_boxes.tensor[fg], reduction="sum") / 3 * 10.0 * 0.5
    torch.testing.assert_close(losses["loss_box_reg"], expected)


def test_cascade_refines_with_the_class_regression(tiny_cascade):
    heads = tiny_cascade.roi_heads
    proposals = _proposals()
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0, 9.0], [0.0, 3.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0, 0.0]])
    deltas = torch.zeros(3, 16)
    deltas.view(3, 4, 4)[:, :, 0] = torch.arange(4.0) * 0.1  # each class shifts x differently
    predictions = (logits, deltas)
    heads.eval()
    test_boxes = heads._refined_boxes(0, predictions, [proposals])[0]
    heads.train()
    train_boxes = heads._refined_boxes(0, predictions, [proposals])[0]
    all_boxes = heads.box_predictor[0].predict_boxes(predictions, [proposals])[0].view(3, 4, 4)
    # test time: best non-background class (2, 1, 0); training: the ground-truth class of foreground boxes
    torch.testing.assert_close(test_boxes, all_boxes[[0, 1, 2], [2, 1, 0]])
    torch.testing.assert_close(train_boxes, all_boxes[[0, 1, 2], [2, 0, 0]])


def test_cascade_test_time_masks_are_the_stage_average(tiny_cascade):
    heads = tiny_cascade.roi_heads.eval()
    features = {f"p{i}": torch.randn(1, 32, 64 // 2 ** i, 64 // 2 ** i) for i in range(2, 7)}
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 30.0], [10.0, 8.0, 50.0, 40.0]]))
    inst.pred_classes = torch.tensor([3, 1])
    with torch.no_grad():
        out = heads._forward_mask(features, [inst])[0].pred_masks
        pooled = heads.mask_pooler([features[f] for f in heads.mask_in_features], [inst.pred_boxes])
        per_stage = [h.layers(pooled)[[0, 1], [3, 1]].sigmoid() for h in heads.mask_head]
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out[:, 0], sum(per_stage) / 3)
    assert not torch.allclose(out[:, 0], per_stage[-1])


def test_cascade_trains_every_mask_head(tiny_cascade):
    from detectron2.utils.events import EventStorage

    inst = Instances((64, 96))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]))
    inst.gt_classes = torch.tensor([1, 3])
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 8:50, 8:40] = True
    masks[1, 10:60, 30:90] = True
    inst.gt_masks = BitMasks(masks)
    tiny_cascade.train()
    with EventStorage():
        losses = tiny_cascade([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "instances": inst}])
    assert {f"loss_mask_stage{k}" for k in range(3)} <= set(losses)
    assert {f"loss_box_reg_stage{k}" for k in range(3)} <= set(losses)
    sum(losses.values()).backward()
    for head in tiny_cascade.roi_heads.mask_head:
        assert head.predictor.weight.grad is not None and head.predictor.weight.grad.abs().sum() > 0
    tiny_cascade.zero_grad()


# ---------------------------------------------------------------- solver recipes


@pytest.mark.parametrize("name,lr,wd,batch,max_iter,steps,warmup", [
    ("retinanet_pvt_s.yaml", 1e-4, 1e-4, 16, 87960, (58640, 80630), 500),
    ("mask_rcnn_pvt_s.yaml", 2e-4, 1e-4, 16, 87960, (58640, 80630), 500),
    ("mask_rcnn_pvt_v2_b2.yaml", 2e-4, 1e-4, 16, 87960, (58640, 80630), 500),
    ("mask_rcnn_twins_pcpvt_s.yaml", 2e-4, 1e-4, 16, 87960, (58640, 80630), 500),
    ("retinanet_twins_svt_s.yaml", 1e-4, 1e-4, 16, 87960, (58640, 80630), 500),
    ("mask_rcnn_twins_svt_b_3x.yaml", 1e-4, 0.05, 16, 263880, (197910, 241890), 500),
    ("mask_rcnn_pvt_v2_b2_3x.yaml", 1e-4, 0.05, 16, 263880, (197910, 241890), 500),
    ("cascade_mask_rcnn_pvt_v2_b2_3x.yaml", 1e-4, 0.05, 16, 263880, (197910, 241890), 500),
    ("mask_rcnn_gcvit_t_3x.yaml", 1e-4, 0.05, 16, 263880, (197910, 241890), 2500),
    ("cascade_mask_rcnn_gcvit_t_3x.yaml", 1e-4, 0.05, 16, 263880, (197910, 241890), 2500),
    # the papers' large variants: 1 image per GPU on 8 GPUs and lr / 1.4, for the same 12 epochs
    ("mask_rcnn_pvt_l.yaml", 2e-4 / 1.4, 1e-4, 8, 175908, (117272, 161249), 500),
    ("retinanet_pvt_v2_b5.yaml", 1e-4 / 1.4, 1e-4, 8, 175908, (117272, 161249), 500),
    ("mask_rcnn_pvt_v2_b4.yaml", 2e-4 / 1.4, 1e-4, 8, 175908, (117272, 161249), 500),
    ("retinanet_pvt_l.yaml", 1e-4, 1e-4, 16, 87960, (58640, 80630), 500),  # official: 2 images per GPU
])
def test_solver_recipe(name, lr, wd, batch, max_iter, steps, warmup):
    from pvt_d2.engine import build_optimizer

    cfg = _cfg(name)
    s = cfg.SOLVER
    assert s.OPTIMIZER == "ADAMW" and s.IMS_PER_BATCH == batch and s.WARMUP_FACTOR == 0.001
    assert (s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == (max_iter, steps, warmup)
    epochs = 36 if "3x" in name else 12
    per_epoch = max_iter // epochs
    assert per_epoch == -(-117266 // batch)  # COCO train2017 images with annotations
    assert tuple(st // per_epoch for st in steps) == ((8, 11) if epochs == 12 else (27, 33))
    optimizer = build_optimizer(cfg, nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == pytest.approx(lr) and optimizer.param_groups[0]["weight_decay"] == wd


def test_three_x_schedule_arithmetic():
    from pvt_d2.model_zoo.recipes import COCO_TRAIN_IMAGES, iters_per_epoch, recipe

    assert iters_per_epoch(16) == 7330 and COCO_TRAIN_IMAGES == 117266
    r = recipe("pvt_v2_b2", "cascade_mask_rcnn_3x")
    assert r["MAX_ITER"] == 36 * 7330 == 263880 and r["STEPS"] == (27 * 7330, 33 * 7330)


@pytest.mark.parametrize("name,rate", [("mask_rcnn_pvt_m.yaml", 0.0), ("retinanet_pvt_l.yaml", 0.0),
                                       ("mask_rcnn_pvt_s.yaml", 0.1), ("mask_rcnn_twins_svt_s.yaml", 0.2),
                                       ("cascade_mask_rcnn_gcvit_t_3x.yaml", 0.2)])
def test_drop_path(name, rate):
    assert _cfg(name).MODEL.PVT_D2.DROP_PATH_RATE == rate


def _drop_rates(name):
    from detectron2.modeling import build_backbone

    with _MetaParameters():
        backbone = build_backbone(_cfg(name)).bottom_up
    return [m.drop_prob for m in backbone.modules() if hasattr(m, "drop_prob")]


def test_drop_path_zero_builds_no_drop_path():
    assert all(r == 0.0 for r in _drop_rates("mask_rcnn_pvt_m.yaml"))
    assert max(_drop_rates("mask_rcnn_pvt_s.yaml")) == pytest.approx(0.1)


def test_no_weight_decay_group_holds_twins_peg_weights():
    from pvt_d2.engine import build_optimizer

    cfg = _cfg("mask_rcnn_twins_pcpvt_s_3x.yaml", *SMALL)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.05, 0.0}
    peg = {n for n in names.values() if ".pos_block." in n and n.endswith(".weight")}
    assert peg and peg <= groups[0.0]
    assert any(p.ndim == 4 for n, p in model.named_parameters() if n in peg)  # the 3x3 depthwise conv kernels
    assert any(n.endswith("attn.q.weight") for n in groups[0.05])  # other matrices keep their decay
    assert all(p.ndim <= 1 or names[id(p)] in peg for p in optimizer.param_groups[1]["params"])


@pytest.mark.parametrize("arch,expected", [("pvt_tiny", "pos_embed"), ("gcvit_xxtiny", "relative_position_bias_table"),
                                           ("levit_128s", "attention_biases"), ("twins_svt_small", "pos_block")])
def test_backbones_declare_no_weight_decay(arch, expected):
    from pvt_d2.engine.optim import no_weight_decay_names
    from pvt_d2.modeling import create_backbone

    backbone = create_backbone(arch)
    names = backbone.no_weight_decay()
    assert names and all(expected in n for n in names)
    wrapped = nn.ModuleDict({"bottom_up": backbone})
    assert no_weight_decay_names(wrapped) == {f"bottom_up.{n}" for n in names}


# ---------------------------------------------------------------- 3x augmentation


def test_official_3x_augmentation_has_both_branches():
    from pvt_d2.data.augmentation import PolygonShiftCropTransform, ResizeOrResizeCropResize, build_train_augmentation

    augs = build_train_augmentation(_cfg("mask_rcnn_pvt_v2_b2_3x.yaml"))
    first = augs[0]
    assert isinstance(first, ResizeOrResizeCropResize) and isinstance(augs[1], T.RandomFlip)
    assert first.short_edges == tuple(range(480, 801, 32)) and first.max_size == 1333
    assert first.short_edges_before_crop == (400, 500, 600) and first.crop_size == (384, 600)
    np.random.seed(0)
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    kinds = {"resize": 0, "crop": 0}
    for _ in range(40):
        tfm = first.get_transform(image)
        if isinstance(tfm, T.ResizeTransform):
            kinds["resize"] += 1
            assert min(tfm.new_h, tfm.new_w) in first.short_edges
        else:
            kinds["crop"] += 1
            r1, crop, r2 = tfm.transforms
            assert isinstance(crop, PolygonShiftCropTransform)
            assert min(r1.new_h, r1.new_w) in (400, 500, 600)
            assert 384 <= crop.h <= min(600, r1.new_h) and 384 <= crop.w <= min(600, r1.new_w)
            assert (r2.h, r2.w) == (crop.h, crop.w) and max(r2.new_h, r2.new_w) <= 1333
            assert min(r2.new_h, r2.new_w) in first.short_edges or max(r2.new_h, r2.new_w) == 1333
    assert kinds["resize"] >= 10 and kinds["crop"] >= 10, kinds
    assert build_train_augmentation(_cfg("mask_rcnn_pvt_v2_b2.yaml"))[0].__class__.__name__ == "ResizeShortestEdge"


class _FixedTransform(T.Augmentation):
    def __init__(self, tfm):
        super().__init__()
        self.tfm = tfm

    def get_transform(self, image):
        return self.tfm


def test_crop_moves_boxes_and_masks_and_drops_cut_instances(tmp_path):
    """Through the train mapper: a crop keeps the instance inside it and drops the one cut away."""
    from PIL import Image

    from pvt_d2.data.augmentation import PolygonShiftCropTransform
    from pvt_d2.data.mapper import RobustDatasetMapper

    cfg = _cfg("mask_rcnn_pvt_v2_b2_3x.yaml")
    mapper = RobustDatasetMapper(cfg, is_train=True)
    assert type(mapper.augmentations.augs[0]).__name__ == "ResizeOrResizeCropResize"  # hooked into the mapper
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((100, 120, 3), dtype=np.uint8)).save(path)
    crop = PolygonShiftCropTransform(20, 10, 60, 50, orig_w=120, orig_h=100)  # x 20..80, y 10..60
    mapper.augmentations = T.AugmentationList([_FixedTransform(crop)])
    inside = [30.0, 20.0, 70.0, 20.0, 70.0, 50.0, 30.0, 50.0]  # box 30..70 x 20..50
    outside = [90.0, 70.0, 110.0, 70.0, 110.0, 90.0, 90.0, 90.0]  # entirely below/right of the crop
    straddle = [70.0, 40.0, 100.0, 40.0, 100.0, 55.0, 70.0, 55.0]  # half outside on the right
    annos = [{"bbox": [min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])], "bbox_mode": 0,
              "segmentation": [p], "category_id": i, "iscrowd": 0}
             for i, p in enumerate([inside, outside, straddle])]
    out = mapper({"file_name": str(path), "height": 100, "width": 120, "image_id": 1, "annotations": annos})
    inst = out["instances"]
    assert out["image"].shape == (3, 50, 60)
    assert inst.gt_classes.tolist() == [0, 2]  # the instance cut away is dropped
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[10.0, 10.0, 50.0, 40.0], [50.0, 30.0, 60.0, 45.0]]))
    assert isinstance(inst.gt_masks, PolygonMasks)
    polygon = inst.gt_masks.polygons[0][0]
    np.testing.assert_allclose(polygon, np.array(inside) - np.array([20.0, 10.0] * 4))


def test_augmentation_key_is_validated():
    from pvt_d2.config import ConfigError

    with pytest.raises(ConfigError, match="INPUT.AUGMENTATION"):
        _cfg("mask_rcnn_pvt_v2_b2_3x.yaml", "INPUT.AUGMENTATION", "mosaic")


# ---------------------------------------------------------------- parameters vs the papers


@pytest.mark.slow
def test_parameters_match_the_papers():
    """Every detector whose size the papers publish (the manifests' ``published_params``), within 1.5%.

    40 models, parameters on the meta device. Twins' published counts include the ImageNet
    classifier its official detection backbone carries unused; it is added to ours for the comparison.
    """
    from pvt_d2.model_zoo.table import published_classifier_params, published_params

    assert len(published_params()) == 40
    for name, paper in published_params().items():
        model = _meta_model(name + ".yaml")
        ours = sum(p.numel() for p in model.parameters())
        arch = _cfg(name + ".yaml").MODEL.PVT_D2.ARCH
        comparable = (ours + published_classifier_params(arch)) / 1e6
        assert abs(comparable - paper) / paper <= 0.015, (name, ours / 1e6, paper)
        if not name.startswith(("retinanet_twins", "mask_rcnn_twins")):
            assert published_classifier_params(arch) == 0


def test_cascade_stage_settings_are_validated():
    from pvt_d2.config import ConfigError

    with pytest.raises(ConfigError, match="STAGE_LOSS_WEIGHTS .* one value per cascade stage"):
        _cfg("cascade_mask_rcnn_pvt_v2_b0_3x.yaml", "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", "(1.0, 0.5)")
    with pytest.raises(ConfigError, match="MODEL.ROI_BOX_CASCADE_HEAD.IOUS"):
        _cfg("cascade_mask_rcnn_pvt_v2_b0_3x.yaml", "MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "(0.4, 0.6, 0.7)")


def test_cascade_resamples_every_stage_with_the_ground_truth(tiny_cascade):
    """Each stage: input ground-truth boxes dropped, ground truth added again, matched at its IoU, sub-sampled."""
    from detectron2.utils.events import EventStorage

    heads = tiny_cascade.roi_heads
    target = Instances((64, 64))
    target.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 30.0, 60.0, 60.0]]))
    target.gt_classes = torch.tensor([1, 2])
    target.gt_masks = BitMasks(torch.ones(2, 64, 64, dtype=torch.bool))
    boxes = Boxes(torch.tensor([[5.0, 4.0, 30.0, 31.0], [4.0, 4.0, 24.0, 24.0], [40.0, 0.0, 60.0, 20.0]] * 20))
    with EventStorage():
        sample = heads._sample_stage([boxes], [target], 2)[0]  # IoU 0.7
    assert len(sample) <= heads.batch_size_per_image and sample.is_gt.sum() == 2
    fg = sample.gt_classes < heads.num_classes
    iou = torch.diag(pairwise_iou(sample.proposal_boxes[fg], sample.gt_boxes[fg]))
    assert (iou >= 0.7).all() and fg.sum() >= 2
    assert int(fg.sum()) <= int(heads.batch_size_per_image * heads.positive_fraction)
    assert len(sample.gt_masks) == len(sample)

