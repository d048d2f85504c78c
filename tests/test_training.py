"""Short training runs of every detector type on the synthetic set, eval-only, and train_net's CLI."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_train_cfg


def _train(cfg):
    from pvt_d2.engine import Trainer

    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer.train()


@pytest.mark.parametrize("config", ["retinanet_pvt_v2_b0.yaml", "mask_rcnn_pvt_t.yaml",
                                    pytest.param("cascade_mask_rcnn_pvt_v2_b0_3x.yaml", marks=pytest.mark.slow)])
def test_train_few_iterations_and_evaluate(config, dataset_root, tmp_path):
    cfg = tiny_train_cfg(config, str(tmp_path), ["TEST.DETECTIONS_PER_IMAGE", "20"])
    results = _train(cfg)
    assert "bbox" in results
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(v == v and v < 1e4 for v in losses)
    assert os.path.exists(tmp_path / "model_final.pth")
    assert open(tmp_path / "last_checkpoint").read().strip() == "model_final.pth"


def test_optimizer_param_groups_exempt_norms_biases_and_tables():
    from pvt_d2.engine.optim import param_groups
    from pvt_d2.modeling import create_backbone

    model = create_backbone("pvt_tiny")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "stages.0.pos_embed.weight" in exempt
    assert "stages.0.blocks.0.norm1.weight" in exempt and "stages.0.blocks.0.attn.q.bias" in exempt
    assert "stages.0.blocks.0.attn.q.weight" not in exempt
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_full_model_gradient_clipping():
    import torch
    from pvt_d2.config import get_pvt_d2_cfg
    from pvt_d2.engine import build_optimizer

    cfg = get_pvt_d2_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(cfg, model)
    (model(torch.ones(1, 4)) * 1e3).sum().backward()
    opt.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total <= 0.5 + 1e-4


@pytest.mark.slow  # a subprocess: detectron2's import and a COCO evaluation (~30 s)
def test_eval_only_produces_coco_metrics(dataset_root, tmp_path):
    from detectron2.modeling import build_model

    from pvt_d2.engine import AtomicCheckpointer

    cfg = tiny_train_cfg("mask_rcnn_pvt_v2_b0.yaml", str(tmp_path))
    cfg.freeze()
    model = build_model(cfg)
    AtomicCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    weights = str(tmp_path / "model_random.pth")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "mask_rcnn_pvt_v2_b0.yaml"), "--eval-only",
         *_opts_of(cfg), "MODEL.WEIGHTS", weights],
        capture_output=True, text=True, timeout=600, env={**os.environ, "DETECTRON2_DATASETS": dataset_root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log
    assert os.path.exists(tmp_path / "inference" / "synthetic_val" / "coco_instances_results.json")


def _opts_of(cfg):
    """The overrides that turn a config into the tiny test config, as command-line pairs."""
    keys = ["DATASETS.TRAIN", "DATASETS.TEST", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.FPN.OUT_CHANNELS",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_MASK_HEAD.CONV_DIM", "MODEL.RPN.POST_NMS_TOPK_TEST",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "DATALOADER.NUM_WORKERS",
            "OUTPUT_DIR", "MODEL.PVT_D2.PRETRAINED"]
    opts = []
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
        opts += [key, str(node)]
    return opts


def test_train_net_missing_coco_gives_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "retinanet_pvt_s.yaml"), "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "nowhere")})
    assert proc.returncode == 2
    assert "Dataset 'coco_2017_train' not found" in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and "datasets/README.md" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_net_cpu_fallback_is_logged(dataset_root, tmp_path):
    """On a machine without CUDA the CLI switches to the CPU with AMP off and says so once."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "retinanet_pvt_v2_b0.yaml"),
         "DATASETS.TRAIN", "('synthetic_train',)", "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "4",
         "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)",
         "INPUT.MAX_SIZE_TRAIN", "96", "MODEL.FPN.OUT_CHANNELS", "16", "DATALOADER.NUM_WORKERS", "0",
         "MODEL.PVT_D2.PRETRAINED", "", "OUTPUT_DIR", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DETECTRON2_DATASETS": dataset_root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("CUDA is not available: running on the CPU") == 1
    saved = open(tmp_path / "config.yaml").read()
    assert "DEVICE: cpu" in saved


@pytest.mark.slow
@pytest.mark.parametrize("config,extra", [
    ("mask_rcnn_twins_svt_s.yaml", []),
    ("mask_rcnn_gcvit_xxt.yaml", []),
    ("mask_rcnn_levit_128s.yaml", ["MODEL.PVT_D2.LEVIT.ATTN_MODE", "window"]),
    ("mask_rcnn_levit_128s.yaml", ["MODEL.PVT_D2.LEVIT.ATTN_MODE", "global"]),
    ("mask_rcnn_vip_s7.yaml", []),
])
def test_family_mask_rcnn_trains(config, extra, dataset_root, tmp_path):
    """One short Mask R-CNN run per family beyond PVT: losses finite, checkpoint written."""
    cfg = tiny_train_cfg(config, str(tmp_path), ["DATASETS.TEST", "()"] + extra)
    _train(cfg)
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(v == v and v < 1e4 for v in losses)
    assert os.path.exists(tmp_path / "model_final.pth")
