"""Reliability: bad inputs get a clear error or a documented recovery, training survives interruptions.

Catalogue of bad inputs (each case is asserted by a test below; "skip" means
the sample is left out with a warning naming the file and training goes on):

Images (``pvt_d2/data/mapper.py``, used by the trainer's data loaders)
  1. image file missing (training): skipped, warning names the file
  2. image file corrupt (not an image): skipped, warning names the file
  3. image file truncated: skipped, warning names the file
  4. image size differs from the json's width/height: skipped, warning names file and sizes
  5. every image unreadable: BadImageError after 10 failed reads in a row, naming the files (no endless
     retry), also when raised in a data-loader worker process
  6. unreadable image in evaluation: BadImageError naming the file (skipping would change the metrics)
  7. grayscale (L) image: converted to 3 channels
  8. RGBA / LA / palette / CMYK image: converted, alpha dropped
  9. 16-bit grayscale PNG: scaled to 8 bits keeping its contrast (detectron2 alone gives a white image)
 10. 32-bit float TIFF: values in [0, 1] scaled to [0, 255]
 11. image smaller than the patch size (3x2): backbone returns ceil(H/s) x ceil(W/s) maps; detector runs
 12. image of 1 pixel: backbone and detector (inference and a training step) run
Annotations and datasets (``pvt_d2/data/datasets.py``)
 13. empty annotation list: left out of training by default, or a background-only image (finite loss)
 14. crowd-only image: same as 13
 15. degenerate boxes (zero width or height, negative size, outside the image, NaN): instances dropped,
     finite loss
 16. no image with a usable annotation: DatasetError explaining FILTER_EMPTY_ANNOTATIONS
 17. empty dataset split (json without images): DatasetError
 18. annotation category_id not among the json's categories: DatasetError naming the id
 19. NUM_CLASSES smaller than a training set's classes: DatasetError naming key, value and dataset
 20. NUM_CLASSES different from an evaluation set's classes: DatasetError before training starts
 21. dataset name not registered: UnknownDatasetError (a KeyError) listing registered names
 22. DATASETS.TRAIN empty: DatasetError
Config (``pvt_d2/config.py``: ``load_config`` -> ``validate_config``; train_net checks before spawning)
 23. unknown config key: ConfigError naming it
 24. unknown architecture (MODEL.PVT_D2.ARCH): ConfigError listing valid names
 25. FPN asking for a level missing from MODEL.PVT_D2.OUT_FEATURES: ConfigError; unknown level name:
     ConfigError at load time listing the architecture's levels (the backbone itself raises ValueError)
 26. zero / negative / out-of-range values (image sizes, batch, iterations, periods, lr, steps, pixel std,
     class counts, ...): ConfigError naming key and value
 27. YAML with Python object tags: refused, never executed (load_config and the train_net CLI)
 28. batch size not divisible by the number of processes: ConfigError before any worker starts
Checkpoints (``pvt_d2/checkpoint/checkpointer.py``)
 29. MODEL.WEIGHTS that does not exist: CheckpointError naming the path (CLI: exit 2, no traceback)
 30. truncated / corrupt checkpoint: CheckpointError naming the file
 31. checkpoint of another model sharing no tensor: CheckpointError
 32. checkpoint partly matching (other NUM_CLASSES): loaded with a warning table when fine-tuning;
     CheckpointError with the table when resuming or evaluating (strict)
 33. checkpoint with NaN weights: CheckpointError
 34. last_checkpoint naming a deleted file (--resume): CheckpointError naming both
 35. save interrupted by an exception: previous checkpoint and last_checkpoint intact, no temporary file
 36. process SIGKILLed while saving: previous checkpoint and last_checkpoint intact, resume loads it
Training (``pvt_d2/engine/trainer.py``, ``tools/train_net.py``)
 37. training SIGKILLed between checkpoints: --resume continues from the last complete checkpoint and
     ends at the same final iteration
 38. non-finite loss: NonFiniteLossError naming the iteration and the loss terms; no checkpoint or
     final evaluation of the diverged model; CLI prints one ERROR paragraph, exit 2, no traceback
 39. non-finite predictions (NaN features into the RPN): NonFiniteLossError
 40. two CPU processes (gloo): training and evaluation gathered across processes, metrics equal to a
     single-process evaluation of the same weights
Safety (issue 13; asserted in ``tests/test_safety.py``)
 41. plain pickle naming any global but numpy arrays/dtypes, OrderedDict: "Refusing to load FILE: ... would
     import or run Python code (MODULE.NAME)"; dicts, lists, numbers, strings, numpy arrays load
 42. detectron2 model-zoo .pkl (numpy arrays) loads through the safe reader; NaN in it refused
 43. marker pickle (.pkl, .pyth, legacy .pth) to the checkpointer, tools/demo.py, convert_pretrained.py: refused
     naming the file, marker never created
 44. the same as MODEL.WEIGHTS of train_net, training and --eval-only: one ERROR, exit 2 (slow)
 45. weights of another architecture (strict: demo, --eval-only, resume): "holds a pvt_v2_b1 model but the
     config builds pvt_v2_b0"; missing weights file: one ERROR line
 46. MODEL.PVT_D2.PRETRAINED / convert input with NaN/Inf: refused naming the tensor
 47. demo --output = input folder, inside it, or an input file: refused, photos unchanged (md5); existing
     results kept unless --overwrite
 48. convert IN IN: refused, input unchanged (md5); existing output kept unless --force
 49. new run in the OUTPUT_DIR of a finished run (no --resume): refused naming its checkpoints, run unchanged
     (md5); --resume / --overwrite offered
 50. a second run on an OUTPUT_DIR whose lock belongs to a live process: refused naming process and host
 51. a lock left by a killed run: taken over with a warning
 52. disk full (ENOSPC) while saving: "The disk is full ... The last good checkpoint is still ..."; files unchanged
 53. resume with another SOLVER.OPTIMIZER: refused naming both
 54. resume with SOLVER.MAX_ITER below the checkpoint's iteration: refused, says how to continue
 55. --eval-only with MODEL.WEIGHTS empty: refused (would evaluate a random model)
 56-68. annotation json empty, truncated, invalid, a list, without categories / images, image without height,
     width 0, duplicate image ids, boxes as strings, Inf box, NaN / non-numeric polygon coordinates:
     DatasetError naming the file and the field (e.g. "annotations[0].bbox")
 69. box-only annotations under MODEL.MASK_ON: DatasetError saying MODEL.MASK_ON False / RetinaNet / Faster R-CNN
 70. RLE masks with INPUT.MASK_FORMAT polygon: DatasetError saying INPUT.MASK_FORMAT bitmask
 71. polygons with fewer than 3 points: counted and reported in one warning
 72. a small dataset whose images are all unreadable: the broken-dataset BadImageError, not a ValueError
 73-80. LEVIT.ATTN_MODE, LEVIT.NORM, GCVIT.WINDOW_SIZES, TWINS.EXTRA_NORM, OUT_FEATURES outside the
     architecture's levels, FREEZE_AT out of range, INPUT.FORMAT, PIXEL_MEAN length: ConfigError at load time
 81-83. missing _BASE_, _BASE_ cycle, YAML whose top level is a list: ConfigError naming the file
Faults (issue 27; asserted in ``tests/test_faults.py``, shared code in ``pvt_d2/engine/run.py``)
 84. SIGINT (Ctrl-C) during training: "STOPPED: Training interrupted by SIGINT (Ctrl-C) at iteration N of M. The
     last checkpoint is ... run the same command with --resume", exit 130, lock released, no traceback (slow)
 85. SIGTERM: the same with exit 143; --resume then reaches SOLVER.MAX_ITER from that checkpoint (slow)
 86. the interruption line names the trainer's iteration and last_checkpoint's file; none yet: start again;
     during evaluation: nothing was written
 87. a worker of a multi-process run killed (SIGKILL: "often out of memory"), raising, or unable to bind the
     rendezvous port: one message naming the process (rank, pid) and why, the others stopped; the failed
     worker's traceback kept in OUTPUT_DIR/process_N_error.txt
 88. --num-gpus 0 (was ZeroDivisionError), --machine-rank out of range, a --dist-url port in use: one ERROR
     before any process starts (both training commands)
 89. OUTPUT_DIR under a file or read-only (was a PermissionError traceback): one ERROR, the file unchanged (md5)
 90. resume after a divergence with a lower SOLVER.BASE_LR (the message's advice): every param group at the new
     rate (the checkpoint's scheduler state no longer wins), changes logged old -> new, MAX_ITER reached (slow)
 91. resume without changes: learning rate and optimizer moments exactly the checkpoint's (slow)
 92. MODEL.DEVICE cpu with SOLVER.AMP.ENABLED (was "[AMPTrainer] CUDA is required"): AMP off, one log line
 93. an AMP config trains on the CPU with train_net and the LazyConfig command, the line logged once (slow)
 94. 8/16-bit, gray, palette, RGBA, LA, CMYK, float / int32 TIFF, EXIF-rotated: demo and data loader give the
     model the same array, with the expected values (16-bit 30000 -> 117, float 0.5 -> 128)
 95. visualize_json_results and export --sample-image read with the same reader (16-bit drawn with contrast)
 96. LazyConfig --eval-only without train.init_checkpoint: refused (was a random model evaluated, exit 0)
 97. LazyConfig: evaluator output under train.output_dir (was ./output/...); an override of a missing key
     refused with the closest key ("did you mean train.max_iter?"); ~key a ConfigError (was NotImplementedError)
 98-99. LazyConfig divergence: the same one paragraph naming optimizer.lr and --resume; --resume with a new
     optimizer.lr trains at that rate (metrics.json) and reaches train.max_iter (slow)
 100. demo / export / convert: an output under a file, or of the wrong kind, refused before any model is built;
     missing folders created; files unchanged (md5)
 101. visualizers keep earlier drawings (md5) unless --overwrite
 102. MODEL.WEIGHTS / PRETRAINED as malformed or empty safetensors, a folder, an unreachable URL (was a URLError
     traceback): CheckpointError naming the source
"""
import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, REPO, tiny_train_cfg
from pvt_d2.config import ConfigError, load_config

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(("circle", "square", "triangle", "star"))]
# a tiny CPU RetinaNet on the synthetic set, as command-line overrides
TINY_RETINANET = [
    "DATASETS.TRAIN", "('synthetic_train',)", "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "4",
    "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "7",
    "MODEL.PVT_D2.PRETRAINED", "",  # offline and from scratch: the configs name ImageNet checkpoints
]


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def captured_log(name):
    """Records logged to logger ``name`` (works whatever propagation detectron2's setup left)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    log = logging.getLogger(name)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _messages(records):
    return "\n".join(r.getMessage() for r in records)


def _picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = (250, 30, 30)
    return img


def _box_ann(x, y, w, h, cat=1, crowd=0):
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {"bbox": [x, y, w, h], "category_id": cat, "iscrowd": crowd, "area": abs(w * h),
            "segmentation": [[float(v) for v in poly]]}


def write_coco(folder, images, categories=CATEGORIES):
    """Write images and a COCO json; ``images`` are dicts with file_name, height, width, annotations and
    one of ``pil`` (a PIL image to save), ``raw`` (bytes to write) or nothing (file left absent)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    coco_images, anns = [], []
    for i, spec in enumerate(images, start=1):
        path = os.path.join(folder, "images", spec["file_name"])
        if "pil" in spec:
            spec["pil"].save(path)
        elif "raw" in spec:
            with open(path, "wb") as f:
                f.write(spec["raw"])
        coco_images.append({"id": i, "file_name": spec["file_name"], "height": spec["height"],
                            "width": spec["width"]})
        for ann in spec.get("annotations", []):
            anns.append({**ann, "id": len(anns) + 1, "image_id": i})
    json_file = os.path.join(folder, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": coco_images, "annotations": anns, "categories": categories}, f)
    return json_file, os.path.join(folder, "images")


@pytest.fixture
def register(tmp_path):
    """Register COCO-json datasets under fresh names; removed again after the test."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = []

    def _register(images, categories=CATEGORIES):
        name = f"rel_{uuid.uuid4().hex[:8]}"
        json_file, image_root = write_coco(str(tmp_path / name), images, categories)
        register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def good_image(name, h=80, w=96, seed=0, anns=None):
    return {"file_name": name, "height": h, "width": w, "pil": Image.fromarray(_picture(h, w, seed)),
            "annotations": anns if anns is not None else [_box_ann(20, 20, 30, 25, 1 + seed % 4)]}


def png_bytes(h, w):
    buf = io.BytesIO()
    Image.fromarray(_picture(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def special_images():
    """One image per tolerated oddity (catalogue 7-15), each with its expected mapped size."""
    gray16 = (np.linspace(0, 65535, 64 * 72).reshape(64, 72)).astype(np.uint16)
    return [
        good_image("ok.png"),
        {**good_image("gray.png", seed=1), "pil": Image.fromarray(_picture(80, 96, 1)).convert("L")},
        {**good_image("rgba.png", seed=2), "pil": Image.fromarray(_picture(80, 96, 2)).convert("RGBA")},
        {**good_image("la.png", seed=3), "pil": Image.fromarray(_picture(80, 96, 3)).convert("LA")},
        {**good_image("palette.png", seed=4), "pil": Image.fromarray(_picture(80, 96, 4)).convert("P")},
        {**good_image("cmyk.jpg", seed=5), "pil": Image.fromarray(_picture(80, 96, 5)).convert("CMYK")},
        {"file_name": "gray16.png", "height": 64, "width": 72, "pil": Image.fromarray(gray16),
         "annotations": [_box_ann(10, 10, 20, 20)]},
        {"file_name": "float.tif", "height": 40, "width": 50,
         "pil": Image.fromarray(np.full((40, 50), 0.5, np.float32)), "annotations": [_box_ann(5, 5, 20, 20)]},
        {**good_image("tiny.png", h=2, w=3), "annotations": []},
        {**good_image("pixel.png", h=1, w=1), "annotations": []},
        {**good_image("empty.png"), "annotations": []},
        {**good_image("crowd.png"), "annotations": [_box_ann(20, 20, 30, 25, crowd=1)]},
        {**good_image("degenerate.png"), "annotations": [
            _box_ann(10, 10, 0, 20), _box_ann(10, 10, 20, 0), _box_ann(40, 40, -15, -10),
            _box_ann(500, 500, 30, 30), _box_ann(-80, -80, 30, 30), _box_ann(float("nan"), 5, 10, 10),
            _box_ann(30, 30, 20, 20, 2)]},
    ]


def bad_images():
    """Catalogue 1-4: images that cannot be read."""
    return [
        {"file_name": "missing.png", "height": 80, "width": 96, "annotations": [_box_ann(5, 5, 20, 20)]},
        {"file_name": "corrupt.png", "height": 80, "width": 96, "raw": b"this is not an image" * 50,
         "annotations": [_box_ann(5, 5, 20, 20)]},
        {"file_name": "truncated.png", "height": 80, "width": 96, "raw": png_bytes(80, 96)[:2000],
         "annotations": [_box_ann(5, 5, 20, 20)]},
        {**good_image("wrong_size.png"), "height": 50, "width": 60},
    ]


def mapper_cfg(extra=()):
    from pvt_d2.config import get_pvt_d2_cfg

    cfg = get_pvt_d2_cfg()
    cfg.merge_from_list(["INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
                         "INPUT.MIN_SIZE_TEST", "0", "INPUT.RANDOM_FLIP", "none", "MODEL.MASK_ON", "True",
                         *extra])
    return cfg


def run_cli(args, env_root, timeout=420, **kwargs):
    return subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DETECTRON2_DATASETS": env_root, "OMP_NUM_THREADS": "1"}, **kwargs)


# --------------------------------------------------------------------------- images (catalogue 1-12)


def test_image_modes_are_converted(register):
    """Grayscale, RGBA, LA, palette, CMYK, 16-bit and float images become 3-channel uint8 RGB."""
    from detectron2.data import DatasetCatalog

    from pvt_d2.data import RobustDatasetMapper

    name = register(special_images())
    mapper = RobustDatasetMapper(mapper_cfg(), is_train=False)  # MIN_SIZE_TEST 0: no resizing
    out = {os.path.basename(d["file_name"]): mapper(d) for d in DatasetCatalog.get(name)}
    for file_name, sample in out.items():
        image = sample["image"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3, file_name
        assert tuple(image.shape[1:]) == (sample["height"], sample["width"]), file_name
    gray = out["gray.png"]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgb = torch.as_tensor(_picture(80, 96, 2)).permute(2, 0, 1)
    assert torch.equal(out["rgba.png"]["image"], rgb)  # alpha dropped, colours untouched
    g16 = out["gray16.png"]["image"][0].float()
    assert g16.min() == 0 and g16.max() == 255 and len(torch.unique(g16)) > 200  # contrast kept, not clipped
    assert torch.all(out["float.tif"]["image"] == 128)
    assert tuple(out["pixel.png"]["image"].shape) == (3, 1, 1)


def test_bad_images_are_skipped_in_training_and_named(register):
    from detectron2.data import DatasetCatalog
    from detectron2.data.common import MapDataset

    from pvt_d2.data import RobustDatasetMapper

    name = register(bad_images() + [good_image("fine.png")])
    dicts = DatasetCatalog.get(name)
    mapper = RobustDatasetMapper(mapper_cfg(), is_train=True)
    with captured_log("pvt_d2.data.mapper") as records:
        sample = MapDataset(dicts, mapper)[0]  # the missing image: another (the only good) one comes instead
        for d in dicts[:4]:
            assert mapper(d) is None
    assert sample["file_name"].endswith("fine.png") and len(sample["instances"]) == 1
    log = _messages(records)
    for file_name in ("missing.png", "corrupt.png", "truncated.png", "wrong_size.png"):
        assert file_name in log
    assert "No such file" in log and "cannot identify image" in log and "truncated" in log.lower()
    assert "(96, 80), expect (60, 50)" in log
    assert sum("missing.png" in r.getMessage() for r in records) == 1  # each bad file is reported once


def test_all_images_bad_stops_with_clear_error(register):
    from detectron2.data import DatasetCatalog
    from detectron2.data.common import MapDataset

    from pvt_d2.data import BadImageError, RobustDatasetMapper
    from pvt_d2.data.mapper import MAX_CONSECUTIVE_FAILURES

    name = register(bad_images()[:3] * 4)
    pattern = (f"{MAX_CONSECUTIVE_FAILURES} images in a row could not be read.*(missing|corrupt|truncated)\\.png"
               ".*dataset looks broken")
    dataset = MapDataset(DatasetCatalog.get(name), RobustDatasetMapper(mapper_cfg(), is_train=True))
    with pytest.raises(BadImageError, match=pattern):
        dataset[0]
    # the same from a data-loader worker process: re-raised in the main process with its type and message
    dataset = MapDataset(DatasetCatalog.get(name), RobustDatasetMapper(mapper_cfg(), is_train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=list)
    with pytest.raises(BadImageError, match=pattern):
        next(iter(loader))


def test_bad_image_in_evaluation_is_an_error_naming_it(register):
    from detectron2.data import DatasetCatalog

    from pvt_d2.data import BadImageError, RobustDatasetMapper

    name = register(bad_images())
    mapper = RobustDatasetMapper(mapper_cfg(), is_train=False)
    for d, reason in zip(DatasetCatalog.get(name), ("No such file", "cannot identify", "truncated", "Mismatched")):
        with pytest.raises(BadImageError, match=rf"Cannot use image .*{d['file_name'].split('/')[-1]}.*{reason}"):
            mapper(d)


@pytest.mark.parametrize("arch", ["pvt_v2_b0", "pvt_tiny"])
def test_backbone_tiny_images(arch):
    """Images smaller than the patch size, and of one pixel, give ceil(H/s) x ceil(W/s) maps."""
    from pvt_d2.modeling import create_backbone

    model = create_backbone(arch).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (3, 2), (2, 9)]:
            out = model(torch.rand(1, 3, h, w))
            for name, feat in out.items():
                s = model.output_shape()[name].stride
                assert tuple(feat.shape[-2:]) == (math.ceil(h / s), math.ceil(w / s)), (arch, h, w, name)
                assert torch.isfinite(feat).all()


def test_odd_images_train_and_infer_in_a_detector(register, tmp_path):
    """A Mask R-CNN training step on a batch of every tolerated oddity has finite losses; inference works."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from pvt_d2.data import RobustDatasetMapper

    name = register(special_images())
    cfg = tiny_train_cfg("mask_rcnn_pvt_v2_b0.yaml", str(tmp_path), ["DATASETS.TRAIN", f"('{name}',)",
                                                                      "DATASETS.TEST", "()"])
    model = build_model(cfg)
    mapper = RobustDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(name)]
    by_name = {os.path.basename(b["file_name"]): b for b in batch}
    assert len(by_name["degenerate.png"]["instances"]) == 1  # only the valid box survives
    assert len(by_name["crowd.png"]["instances"]) == 0 and len(by_name["empty.png"]["instances"]) == 0
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.full((3, 1, 1), 100, dtype=torch.uint8), "height": 1, "width": 1},
                     {"image": torch.randint(0, 255, (3, 3, 2), dtype=torch.uint8), "height": 3, "width": 2}])
    assert out[0]["instances"].image_size == (1, 1) and out[1]["instances"].image_size == (3, 2)


def test_training_run_survives_bad_and_odd_images(register, tmp_path):
    """End to end: a RetinaNet run on a dataset mixing unreadable files with odd images completes."""
    from pvt_d2.engine import Trainer

    # a NaN box stops training before it starts (DatasetError, tests/test_safety.py); the other odd boxes are dropped
    images = [{**im, "annotations": [a for a in im["annotations"] if all(math.isfinite(v) for v in a["bbox"])]}
              for im in special_images()]
    name = register(images + bad_images())
    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), [
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        "SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "4", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "96"])
    cfg.freeze()
    with captured_log("pvt_d2.data.mapper") as records:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    assert trainer.iter == 6
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    assert any(f in _messages(records) for f in ("missing.png", "corrupt.png", "truncated.png", "wrong_size"))


# --------------------------------------------------------------------------- datasets (catalogue 13-22)


def test_empty_and_crowd_only_images_are_left_out_by_default(register):
    from pvt_d2.data import load_dataset_dicts

    name = register([good_image("a.png"), {**good_image("e.png"), "annotations": []},
                     {**good_image("c.png"), "annotations": [_box_ann(1, 1, 9, 9, crowd=1)]}])
    assert [os.path.basename(d["file_name"]) for d in load_dataset_dicts([name], filter_empty=True)] == ["a.png"]
    assert len(load_dataset_dicts([name], filter_empty=False)) == 3


def test_dataset_errors(register, tmp_path):
    from pvt_d2.data import DatasetError, load_dataset_dicts

    only_empty = register([{**good_image("e.png"), "annotations": []},
                           {**good_image("c.png"), "annotations": [_box_ann(1, 1, 9, 9, crowd=1)]}])
    with pytest.raises(DatasetError, match=f"'{only_empty}' cannot be used: no image has a usable.*"
                                           "FILTER_EMPTY_ANNOTATIONS"):
        load_dataset_dicts([only_empty], filter_empty=True)
    empty = register([])
    with pytest.raises(DatasetError, match=f"'{empty}' cannot be used: its annotation file lists no images"):
        load_dataset_dicts([empty])
    bad_cat = register([good_image("a.png", anns=[_box_ann(1, 1, 9, 9, cat=17)])])
    with pytest.raises(DatasetError, match=f"'{bad_cat}' cannot be loaded: .*category_id=17"):
        load_dataset_dicts([bad_cat])


def test_num_classes_mismatch_is_refused_before_training(dataset_root, register, tmp_path):
    from pvt_d2.data import DatasetError
    from pvt_d2.engine import Trainer

    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), ["MODEL.RETINANET.NUM_CLASSES", "3",
                                                                      "DATASETS.TEST", "()"])
    with pytest.raises(DatasetError, match=r"MODEL.RETINANET.NUM_CLASSES = 3 but dataset 'synthetic_train' has "
                                           r"4 classes \(circle, square, triangle, star\).*Set "
                                           r"MODEL.RETINANET.NUM_CLASSES 4"):
        Trainer(cfg)
    # a json dataset whose classes are only known once loaded, used for evaluation: 5 > 4 classes
    five = register([good_image("a.png")], categories=CATEGORIES + [{"id": 5, "name": "hexagon"}])
    cfg = tiny_train_cfg("mask_rcnn_pvt_v2_b0.yaml", str(tmp_path), ["DATASETS.TEST", f"('{five}',)"])
    with pytest.raises(DatasetError, match=f"MODEL.ROI_HEADS.NUM_CLASSES = 4 but dataset '{five}' has 5 classes"):
        Trainer(cfg)
    assert not os.path.exists(tmp_path / "metrics.json")


def test_unknown_dataset_and_empty_train_list(dataset_root, tmp_path):
    from pvt_d2.data import DatasetError, UnknownDatasetError, prepare_datasets
    from pvt_d2.engine import Trainer

    with pytest.raises(KeyError, match="Dataset 'nope_train' is not registered.*synthetic_train") as info:
        prepare_datasets(["nope_train"])
    assert isinstance(info.value, UnknownDatasetError) and str(info.value).startswith("Dataset 'nope_train'")
    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetError, match="DATASETS.TRAIN is empty"):
        Trainer(cfg)


# --------------------------------------------------------------------------- config (catalogue 23-28)


BAD_VALUES = [
    ("INPUT.MIN_SIZE_TRAIN", "(0,)"), ("INPUT.MIN_SIZE_TRAIN", "(-800,)"), ("INPUT.MIN_SIZE_TRAIN", "()"),
    ("INPUT.MAX_SIZE_TRAIN", "0"), ("INPUT.MAX_SIZE_TEST", "-1"), ("INPUT.MIN_SIZE_TEST", "-5"),
    ("SOLVER.IMS_PER_BATCH", "0"), ("SOLVER.IMS_PER_BATCH", "-2"), ("SOLVER.MAX_ITER", "-1"),
    ("SOLVER.MAX_ITER", "0"), ("SOLVER.CHECKPOINT_PERIOD", "0"), ("SOLVER.BASE_LR", "0.0"),
    ("SOLVER.BASE_LR", "-0.1"), ("SOLVER.WARMUP_ITERS", "-1"), ("SOLVER.WEIGHT_DECAY", "-0.05"),
    ("SOLVER.STEPS", "(80000, 60000)"), ("SOLVER.STEPS", "(0,)"), ("SOLVER.WARMUP_FACTOR", "2.0"),
    ("SOLVER.GAMMA", "0.0"), ("TEST.EVAL_PERIOD", "-100"), ("TEST.DETECTIONS_PER_IMAGE", "0"),
    ("DATALOADER.NUM_WORKERS", "-1"), ("MODEL.RETINANET.NUM_CLASSES", "0"), ("MODEL.FPN.OUT_CHANNELS", "0"),
    ("MODEL.PIXEL_STD", "[0.0, 57.12, 57.375]"), ("MODEL.PIXEL_STD", "[58.395, 57.12]"),
    ("MODEL.PVT_D2.DROP_PATH_RATE", "1.5"), ("SOLVER.OPTIMIZER", "'LAMB'"),
    ("INPUT.MIN_SIZE_TRAIN_SAMPLING", "'uniform'"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_values_are_refused_naming_key_and_value(key, value):
    cfg_file = os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml")
    with pytest.raises(ConfigError, match=re.escape(key) + " = "):
        load_config(cfg_file, [key, value])


def test_config_errors_name_the_problem():
    cfg_file = os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b0.yaml")
    with pytest.raises(ConfigError, match="MODEL.PVT_D2.NOPE"):
        load_config(cfg_file, ["MODEL.PVT_D2.NOPE", "1"])
    with pytest.raises(ConfigError, match="MODEL.PVT_D2.ARCH = 'pvt_v9' .*valid names: .*pvt_v2_b0"):
        load_config(cfg_file, ["MODEL.PVT_D2.ARCH", "pvt_v9"])
    with pytest.raises(ConfigError, match=r"MODEL.FPN.IN_FEATURES .* asks for \['res2'\] but "
                                          r"MODEL.PVT_D2.OUT_FEATURES = \['res3', 'res4', 'res5'\]"):
        load_config(cfg_file, ["MODEL.PVT_D2.OUT_FEATURES", "['res3', 'res4', 'res5']"])
    with pytest.raises(ConfigError, match="distinct levels"):
        load_config(cfg_file, ["MODEL.PVT_D2.OUT_FEATURES", "['res2', 'res2', 'res3', 'res4', 'res5']"])
    # an unknown level name is refused at load time, naming the architecture's levels (issue 13) ...
    with pytest.raises(ConfigError, match=r"MODEL.PVT_D2.OUT_FEATURES = .*pvt_v2_b0 has no level res9; its levels "
                                          r"are res2, res3, res4, res5"):
        load_config(cfg_file, ["MODEL.PVT_D2.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5', 'res9']"])
    # ... and the backbone itself (built from Python) lists the levels it has
    from pvt_d2.modeling import create_backbone

    with pytest.raises(ValueError, match=r"unknown out_features \['res9'\].*provides \['res2', 'res3', 'res4', "
                                         r"'res5'\]"):
        create_backbone("pvt_v2_b0", out_features=["res2", "res9"])
    # every shipped config passes validation, with the values the quick tests use
    assert load_config(cfg_file, ["SOLVER.BASE_LR", "1e30", "INPUT.MIN_SIZE_TEST", "0"]).SOLVER.BASE_LR == 1e30


# --------------------------------------------------------------------------- checkpoints (catalogue 29-36)


def _tiny_retinanet(tmp_path, num_classes=4):
    from detectron2.modeling import build_model

    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path),
                         ["MODEL.RETINANET.NUM_CLASSES", str(num_classes), "DATASETS.TEST", "()"])
    return build_model(cfg)


def test_checkpoint_load_errors(tmp_path):
    from pvt_d2.engine import AtomicCheckpointer
    from pvt_d2.checkpoint import CheckpointError

    model = _tiny_retinanet(tmp_path)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    missing = str(tmp_path / "no" / "model_final.pth")
    with pytest.raises(CheckpointError, match=f"Checkpoint file not found: {re.escape(missing)} \\(MODEL.WEIGHTS\\)"):
        ckpt.resume_or_load(missing, resume=False)
    ckpt.save("model_good")
    good = tmp_path / "model_good.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(truncated))}.*(truncated|corrupt)"):
        ckpt.resume_or_load(str(truncated), resume=False)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match=re.escape(str(garbage))):
        ckpt.resume_or_load(str(garbage), resume=False)
    # a classifier checkpoint (no tensor in common with the detector)
    other = tmp_path / "classifier.pth"
    torch.save({"model": {"features.0.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}}, other)
    with pytest.raises(CheckpointError, match="does not match this model at all.*(fc.weight|features.0.weight)"):
        ckpt.resume_or_load(str(other), resume=False)
    # NaN weights (saved from a diverged run)
    state = torch.load(good, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)
    state["model"][name] = state["model"][name] * float("nan")
    nan_file = tmp_path / "nan.pth"
    torch.save(state, nan_file)
    with pytest.raises(CheckpointError, match=f"NaN or infinite values in 1 tensors \\({re.escape(name)}\\)"):
        ckpt.resume_or_load(str(nan_file), resume=False)
    # --resume with last_checkpoint naming a deleted file
    ckpt.tag_last_checkpoint("model_deleted.pth")
    with pytest.raises(CheckpointError, match=r"model_deleted.pth \(named by .*last_checkpoint, --resume\)"):
        ckpt.resume_or_load("", resume=True)


def test_checkpoint_of_another_model_warns_or_fails(tmp_path):
    from pvt_d2.engine import AtomicCheckpointer
    from pvt_d2.checkpoint import CheckpointError

    four = _tiny_retinanet(tmp_path, 4)
    AtomicCheckpointer(four, save_dir=str(tmp_path)).save("four_classes")
    weights = str(tmp_path / "four_classes.pth")
    two = _tiny_retinanet(tmp_path, 2)
    with captured_log("pvt_d2.checkpoint.checkpointer") as records:
        AtomicCheckpointer(two).resume_or_load(weights, resume=False)  # fine-tuning: loud warning, loads the rest
    log = _messages(records)
    # the class-dependent layers are re-initialised (pvt_d2/checkpoint/finetune.py) and listed
    assert "head.cls_score.weight: re-initialised (checkpoint (36, 32, 3, 3) vs model (18, 32, 3, 3))" in log
    assert "head.cls_score.bias: re-initialised (checkpoint (36,) vs model (18,))" in log
    assert torch.equal(two.state_dict()["head.cls_subnet.0.weight"], four.state_dict()["head.cls_subnet.0.weight"])
    with pytest.raises(CheckpointError, match=r"only partly.*must load completely.*\n.*head.cls_score.weight"):
        AtomicCheckpointer(two, strict=True).resume_or_load(weights, resume=False)
    # resuming is always strict: OUTPUT_DIR holding another model's checkpoint
    AtomicCheckpointer(four, save_dir=str(tmp_path / "run")).save("model_0000009")
    with pytest.raises(CheckpointError, match="model_0000009.pth .*--resume.*only partly"):
        AtomicCheckpointer(two, save_dir=str(tmp_path / "run")).resume_or_load("", resume=True)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """An exception in the middle of torch.save leaves no partial file and the previous checkpoint intact."""
    from pvt_d2.engine import AtomicCheckpointer

    model = torch.nn.Linear(4, 4)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000003", iteration=3)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert AtomicCheckpointer(torch.nn.Linear(4, 4), save_dir=str(tmp_path)).resume_or_load("")["iteration"] == 1


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: the previous one stays the last complete checkpoint."""
    from pvt_d2.engine import AtomicCheckpointer

    model = torch.nn.Linear(4, 4)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    pid = os.fork()
    if pid == 0:  # child: die half-way through writing the next checkpoint
        try:
            def dying_save(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = dying_save
            ckpt.save("model_0000003", iteration=3)
        finally:
            os._exit(1)
    deadline = time.time() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child process did not finish")
        time.sleep(0.05)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    files = sorted(os.listdir(tmp_path))
    assert "model_0000003.pth" not in files and "model_0000001.pth" in files
    assert any(f.startswith("model_0000003.pth.tmp.") for f in files)  # the partial write is under another name
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    fresh = torch.nn.Linear(4, 4)
    assert AtomicCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("")["iteration"] == 1
    assert torch.equal(fresh.weight, model.weight)


# --------------------------------------------------------------------------- training (catalogue 37-40)


def test_training_killed_between_checkpoints_resumes(dataset_root, tmp_path):
    """SIGKILL once a checkpoint exists; --resume continues from the last complete one to MAX_ITER."""
    from pvt_d2.checkpoint.io import load_checkpoint_file

    out = tmp_path / "run"
    args = ["--config-file", os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml"), *TINY_RETINANET,
            "SOLVER.MAX_ITER", "16", "SOLVER.CHECKPOINT_PERIOD", "4", "OUTPUT_DIR", str(out)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, TRAIN_NET, *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "DETECTRON2_DATASETS": dataset_root, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 300
            while not (out / "last_checkpoint").exists():
                assert proc.poll() is None, open(tmp_path / "first.log").read()[-3000:]
                assert time.time() < deadline, "no checkpoint was written in time"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists(), "the run ended before it could be killed"
    last = (out / "last_checkpoint").read_text()
    assert re.fullmatch(r"model_\d{7}\.pth", last)
    start = load_checkpoint_file(str(out / last))["iteration"] + 1
    assert start in (4, 8, 12)
    for f in os.listdir(out):  # every visible checkpoint is complete (partial writes have a .tmp name)
        if f.endswith(".pth"):
            assert "model" in load_checkpoint_file(str(out / f)), f

    proc = run_cli(["--resume", *args], dataset_root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = proc.stdout + proc.stderr
    assert f"Loading from {out / last}" in log and f"Starting training from iteration {start}" in log
    assert load_checkpoint_file(str(out / "model_final.pth"))["iteration"] == 15
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert metrics[-1]["iteration"] == 15


def _diverge_at(trainer, iteration, how):
    """Make the model's loss (``how="loss"``) or its backbone features (``"features"``) NaN from ``iteration``."""
    calls = {"n": 0}
    if how == "loss":
        forward = trainer.model.forward

        def nan_loss(batched_inputs):
            losses = forward(batched_inputs)
            calls["n"] += 1
            if calls["n"] > iteration:
                losses["loss_cls"] = losses["loss_cls"] * float("nan")
            return losses

        trainer.model.forward = nan_loss
    else:
        backbone = trainer.model.backbone
        forward = backbone.forward

        def nan_features(x):
            feats = forward(x)
            calls["n"] += 1
            if calls["n"] > iteration:
                feats = {k: v * float("nan") for k, v in feats.items()}
            return feats

        backbone.forward = nan_features


@pytest.mark.parametrize("config,how,expected", [
    ("retinanet_pvt_v2_b0.yaml", "loss", r"the loss is not finite \(loss_cls=nan, loss_box_reg=[^)]+\)"),
    ("mask_rcnn_pvt_v2_b0.yaml", "features", r"the model's outputs are not finite \(Predicted boxes or scores"),
])
def test_non_finite_loss_stops_with_clear_error(config, how, expected, dataset_root, tmp_path):
    from pvt_d2.engine import Trainer
    from pvt_d2.engine.trainer import NonFiniteLossError

    cfg = tiny_train_cfg(config, str(tmp_path), ["SOLVER.MAX_ITER", "2", "TEST.DETECTIONS_PER_IMAGE", "5"])
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    _diverge_at(trainer, 1, how)
    with captured_log("detectron2.engine.train_loop") as records:
        with pytest.raises(NonFiniteLossError) as info:
            trainer.train()
    message = str(info.value)
    assert re.search(r"Training diverged at iteration 1: " + expected, message), message
    assert "SOLVER.BASE_LR" in message and "\n" not in message
    assert not [r for r in records if r.exc_info]  # detectron2's traceback is not repeated in the log
    # the last iteration failed: neither a final checkpoint nor a final evaluation of the diverged model
    assert not os.path.exists(tmp_path / "model_final.pth") and not os.path.exists(tmp_path / "inference")
    assert isinstance(info.value, FloatingPointError)


@pytest.mark.slow  # two training processes
def test_two_process_divergence_is_one_paragraph_not_a_hang(dataset_root, tmp_path):
    """With two processes a NaN loss stops both at the same iteration: one ERROR paragraph, exit 2."""
    proc = run_cli(["--num-gpus", "2", "--config-file", os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml"),
                    *TINY_RETINANET, "SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "1e30", "OUTPUT_DIR", str(tmp_path)],
                   dataset_root, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and re.match(r"ERROR: Training diverged at iteration \d+: the loss is not finite "
                                         r"\(loss_cls=nan", errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


CLI_DRIVER = """
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])
from pvt_d2.cli.train_net import cli
results = {}
for name, argv in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli(argv)
    except BaseException:
        rc, err = "exception", io.StringIO(traceback.format_exc())
    results[name] = [rc, err.getvalue()]
print("RESULTS=" + json.dumps(results))
"""


def test_train_net_user_errors(dataset_root, tmp_path):
    """train_net turns config, dataset and checkpoint problems into one ERROR paragraph and exit status 2."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'_BASE_: "{os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml")}"\n'
                    f'OUTPUT_DIR: !!python/object/apply:os.system ["touch {marker}"]\n')
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    base = ["--config-file", os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml"), *TINY_RETINANET,
            "OUTPUT_DIR", str(tmp_path / "out")]
    evaluate = base[:2] + ["--eval-only"] + base[2:] + ["DATASETS.TEST", "('synthetic_val',)"]
    cases = {
        "python_tags": ["--config-file", str(evil)],
        "zero_batch": base + ["SOLVER.IMS_PER_BATCH", "0"],
        "batch_per_process": ["--num-gpus", "2"] + base + ["SOLVER.IMS_PER_BATCH", "3"],
        "unknown_arch": base + ["MODEL.PVT_D2.ARCH", "pvt_v9"],
        "missing_config": ["--config-file", str(tmp_path / "nope.yaml")],
        "num_classes": base + ["MODEL.RETINANET.NUM_CLASSES", "2"],
        "missing_weights": evaluate + ["MODEL.WEIGHTS", str(tmp_path / "nowhere" / "model.pth")],
        "corrupt_weights": evaluate + ["MODEL.WEIGHTS", str(corrupt)],
        "diverged": base + ["SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "1e30"],
    }
    proc = subprocess.run([sys.executable, "-c", CLI_DRIVER, REPO, json.dumps(cases)], capture_output=True,
                          text=True, timeout=400, env={**os.environ, "DETECTRON2_DATASETS": dataset_root})
    found = re.search(r"^RESULTS=(.*)$", proc.stdout, re.M)
    assert proc.returncode == 0 and found, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads(found.group(1))
    expected = {
        "python_tags": "refused for safety",
        "zero_batch": "SOLVER.IMS_PER_BATCH = 0 is not allowed",
        "batch_per_process": r"SOLVER.IMS_PER_BATCH = 3 must be a multiple of the number of processes \(2",
        "unknown_arch": "MODEL.PVT_D2.ARCH = 'pvt_v9' is not allowed: unknown architecture",
        "missing_config": "Config file not found: .*nope.yaml",
        "num_classes": "MODEL.RETINANET.NUM_CLASSES = 2 but dataset 'synthetic_train' has 4 classes",
        "missing_weights": f"Checkpoint file not found: {re.escape(str(tmp_path / 'nowhere' / 'model.pth'))}",
        "corrupt_weights": f"{re.escape(str(corrupt))} .*(truncated|corrupt)",
        "diverged": r"Training diverged at iteration \d+: the loss is not finite \(loss_cls=nan",
    }
    for name, pattern in expected.items():
        rc, err = results[name]
        assert rc == 2, (name, err[-2000:])
        errors = [line for line in err.splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and re.search(pattern, errors[0]), (name, err[-2000:])
        assert "Traceback" not in err, name
    assert not marker.exists()


def _copypaste(log, task="bbox"):
    """The metrics of ``task`` from detectron2's ``copypaste:`` log lines."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    i = lines.index(f"Task: {task}")
    return dict(zip(lines[i + 1].split(","), (float(v) for v in lines[i + 2].split(","))))


@pytest.mark.slow  # three training processes
def test_two_cpu_processes_train_and_evaluate_like_one(dataset_root, tmp_path):
    """--num-gpus 2 on CPU (gloo): trains, evaluates with results gathered from both processes, and the
    metrics equal a single-process evaluation of the saved weights."""
    from pvt_d2.engine import AtomicCheckpointer, Trainer

    out = tmp_path / "ddp"
    opts = [*TINY_RETINANET, "DATASETS.TEST", "('synthetic_val',)", "SOLVER.MAX_ITER", "3",
            "SOLVER.BASE_LR", "0.0005", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
            "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "10"]
    proc = run_cli(["--num-gpus", "2", "--dist-url", "auto", "--config-file",
                    os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml"), *opts, "OUTPUT_DIR", str(out)], dataset_root)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "World size: 2" in log
    for rank_log in ("log.txt", "log.txt.rank1"):  # 40 images, half on each process
        assert open(out / rank_log).read().count("Start inference on 20 batches") == 1
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 2
    ddp_metrics = _copypaste(open(out / "log.txt").read())
    ddp_dets = json.load(open(out / "inference" / "synthetic_val" / "coco_instances_results.json"))
    assert {d["image_id"] for d in ddp_dets} == set(range(1, 41))  # gathered from both processes

    cfg = load_config(os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml"), [*opts, "OUTPUT_DIR", str(tmp_path / "one")])
    cfg.freeze()
    model = Trainer.build_model(cfg)
    AtomicCheckpointer(model, strict=True).resume_or_load(str(out / "model_final.pth"), resume=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker (OMP_NUM_THREADS=1)
    try:
        single = Trainer.test(cfg, model)["bbox"]  # one test set: detectron2 returns its results directly
    finally:
        torch.set_num_threads(threads)
    assert set(single) >= set(ddp_metrics)
    for key, value in ddp_metrics.items():
        assert (math.isnan(value) and math.isnan(single[key])) or abs(single[key] - value) < 1e-3, (key, single,
                                                                                                      ddp_metrics)
    one_dets = json.load(open(tmp_path / "one" / "inference" / "synthetic_val" / "coco_instances_results.json"))

    assert len(ddp_dets) == len(one_dets) == 400
    unmatched = list(one_dets)
    for a in ddp_dets:  # the same detections, up to the order of equal scores
        match = next((b for b in unmatched if b["image_id"] == a["image_id"] and b["category_id"] == a["category_id"]
                      and abs(a["score"] - b["score"]) < 1e-4 and np.allclose(a["bbox"], b["bbox"], atol=1e-2)), None)
        assert match is not None, a
        unmatched.remove(match)
