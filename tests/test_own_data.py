"""Your own data in one command: COCO json and Pascal VOC datasets declared with ``--dataset``.

The end-to-end test runs the commands of the own-data example in docs/OWN_DATA.md,
as written there, on a tiny box-only dataset it writes in both
layouts (plus size overrides that make the runs take seconds).
"""
import json
import os
import re
import shlex
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO

# Non-contiguous COCO category ids, as exported by many annotation tools.
CATEGORIES = {3: "apple", 7: "leaf"}
COLORS = {"apple": (40, 40, 220), "leaf": (40, 200, 40)}  # BGR
SPLITS = {"train": 6, "val": 3}

# What makes the example's commands a few-second CPU run (appended to their overrides).
TINY = [
    "MODEL.PVT_D2.PRETRAINED", "", "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0",
]


def _image(rng, index):
    """A 96x112 BGR image with 1-2 coloured rectangles; returns it and ``[(class, x0, y0, x1, y1)]``."""
    h, w = 96, 112
    img = (rng.normal(128, 20, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
    objects = []
    for k in range(1 + index % 2):
        name = ("apple", "leaf")[(index + k) % 2]
        x0 = 8 + 50 * k + int(rng.integers(0, 8))
        y0 = int(rng.integers(8, 40))
        x1, y1 = x0 + int(rng.integers(24, 40)), y0 + int(rng.integers(24, 44))
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), COLORS[name], thickness=-1)
        objects.append((name, x0, y0, x1, y1))
    return img, objects


def write_coco(root):
    """``root/{train,val}.json`` (box-only, category ids 3 and 7) and ``root/images/*.png``."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    ids = {v: k for k, v in CATEGORIES.items()}
    rng = np.random.default_rng(0)
    for split, count in SPLITS.items():
        images, annotations = [], []
        for i in range(count):
            img, objects = _image(rng, i)
            file_name = f"{split}_{i:02d}.png"
            cv2.imwrite(os.path.join(root, "images", file_name), img)
            images.append({"id": 100 + i, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
            for name, x0, y0, x1, y1 in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": ids[name],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations,
                       "categories": [{"id": k, "name": v} for k, v in CATEGORIES.items()]}, f)


VOC_XML = """<annotation>
  <folder>JPEGImages</folder><filename>{file}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJECT = """  <object><name>{name}</name><difficult>{difficult}</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
"""


def write_voc(root, difficult_first=False):
    """A Pascal VOC folder: ``Annotations/*.xml``, ``JPEGImages/*.jpg``, ``ImageSets/Main/{train,val}.txt``."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(1)
    for split, count in SPLITS.items():
        ids = []
        for i in range(count):
            img, objects = _image(rng, i)
            file_id = f"{split}_{i:02d}"
            cv2.imwrite(os.path.join(root, "JPEGImages", f"{file_id}.jpg"), img)
            xml_objects = "".join(
                VOC_OBJECT.format(name=name, x0=x0 + 1, y0=y0 + 1, x1=x1, y1=y1,  # VOC: 1-based, inclusive
                                  difficult=int(difficult_first and j == 0 and i == 0))
                for j, (name, x0, y0, x1, y1) in enumerate(objects))
            with open(os.path.join(root, "Annotations", f"{file_id}.xml"), "w") as f:
                f.write(VOC_XML.format(file=f"{file_id}.jpg", w=img.shape[1], h=img.shape[0], objects=xml_objects))
            ids.append(file_id)
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    write_coco(str(root / "trees"))
    write_voc(str(root / "VOC_trees"), difficult_first=True)
    return root


# ------------------------------------------------------------------------------------------ declarations
def test_parse_dataset_spec(tmp_path):
    from pvt_d2.data import DatasetError
    from pvt_d2.data.custom import parse_dataset_spec

    spec = parse_dataset_spec("a_train=data/a.json:data/img")
    assert (spec.name, spec.kind, spec.path, spec.image_root) == (
        "a_train", "coco", os.path.abspath("data/a.json"), os.path.abspath("data/img"))
    assert parse_dataset_spec("a=x/a.json").image_root == os.path.abspath("x")
    voc = parse_dataset_spec(f"v={tmp_path}:trainval")
    assert (voc.kind, voc.path, voc.split, voc.image_root) == ("voc", str(tmp_path), "trainval",
                                                               os.path.join(str(tmp_path), "JPEGImages"))
    assert parse_dataset_spec(f"v={tmp_path}").split is None
    assert parse_dataset_spec(voc.text) == voc
    for bad in ("no_equals_sign", "=a.json", "a=", "a b=x.json"):
        with pytest.raises(DatasetError, match="NAME=SPEC|may only use"):
            parse_dataset_spec(bad)


def test_coco_declaration_classes_and_ids(own_data):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from pvt_d2.data.custom import register_dataset_spec

    spec = register_dataset_spec(f"t_coco_train={own_data}/trees/train.json:{own_data}/trees/images")
    meta = MetadataCatalog.get(spec.name)
    assert meta.thing_classes == ["apple", "leaf"]  # known before loading
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.box_only
    records = DatasetCatalog.get(spec.name)
    assert len(records) == SPLITS["train"]
    assert sorted({a["category_id"] for r in records for a in r["annotations"]}) == [0, 1]
    assert register_dataset_spec(spec.text) == spec  # same declaration again: no-op


def test_voc_declaration_boxes_difficult_and_split(own_data):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    from pvt_d2.data.custom import register_dataset_spec

    train = register_dataset_spec(f"t_voc_train={own_data}/VOC_trees:train")
    every = register_dataset_spec(f"t_voc_all={own_data}/VOC_trees")
    assert MetadataCatalog.get(train.name).thing_classes == ["apple", "leaf"]
    records = DatasetCatalog.get(train.name)
    assert len(records) == SPLITS["train"] and len(DatasetCatalog.get(every.name)) == sum(SPLITS.values())
    assert [r["image_id"] for r in records] == list(range(SPLITS["train"]))
    first = records[0]
    assert first["file_name"].endswith("JPEGImages/train_00.jpg") and (first["height"], first["width"]) == (96, 112)
    # written as the pixel box (x0, y0, x1, y1) -> VOC 1-based inclusive -> back to (x0, y0, x1, y1)
    _, objects = _image(np.random.default_rng(1), 0)
    ann = first["annotations"][0]
    assert ann["bbox_mode"] == BoxMode.XYXY_ABS and ann["bbox"] == [float(v) for v in objects[0][1:]]
    assert ann["iscrowd"] == 1  # <difficult>1</difficult>
    assert records[1]["annotations"][0]["iscrowd"] == 0


def test_voc_refuses_doctype_and_reports_bad_files(tmp_path):
    from pvt_d2.data import DatasetError
    from pvt_d2.data.custom import read_voc_xml, register_dataset_spec

    evil = tmp_path / "evil.xml"
    evil.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx"><!ENTITY y "&x;&x;&x;">]>'
                    "<annotation><filename>&y;</filename></annotation>")
    with pytest.raises(DatasetError, match="DOCTYPE/ENTITY declaration"):
        read_voc_xml(str(evil))
    broken = tmp_path / "broken.xml"
    broken.write_text("<annotation><object>")
    with pytest.raises(DatasetError, match="not valid XML"):
        read_voc_xml(str(broken))
    (tmp_path / "voc" / "Annotations").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"lacks JPEGImages, ImageSets/Main/val.txt"):
        register_dataset_spec(f"t_bad_voc={tmp_path}/voc:val")
    with pytest.raises(DatasetError, match="not found"):
        register_dataset_spec(f"t_bad_coco={tmp_path}/nope.json:{tmp_path}")
    with pytest.raises(DatasetError, match="already taken by a built-in dataset"):
        register_dataset_spec(f"coco_2017_val={tmp_path}/nope.json:{tmp_path}")


def _cfg(name, opts=()):
    from pvt_d2.config import load_config

    # offline: the configs name ImageNet checkpoints, which the builder would fetch
    return load_config(os.path.join(CONFIGS, name), ["MODEL.PVT_D2.PRETRAINED", ""] + list(opts))


def test_num_classes_from_training_set_and_mismatch(own_data):
    from pvt_d2.data import DatasetError
    from pvt_d2.data.custom import setup_custom_datasets

    train = f"n_train={own_data}/trees/train.json:{own_data}/trees/images"
    val = f"n_val={own_data}/trees/val.json:{own_data}/trees/images"
    opts = ["DATASETS.TRAIN", "('n_train',)", "DATASETS.TEST", "('n_val',)"]
    cfg = _cfg("faster_rcnn_pvt_v2_b0.yaml", opts)
    assert setup_custom_datasets(cfg, [train, val], opts, require_used=True) == ["n_train", "n_val"]
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2 and cfg.MODEL.RETINANET.NUM_CLASSES == 2
    assert cfg.DATASETS.CUSTOM == [train, val]  # canonical form: absolute paths
    explicit = opts + ["MODEL.RETINANET.NUM_CLASSES", "5"]
    cfg = _cfg("retinanet_pvt_v2_b0.yaml", explicit)
    with pytest.raises(DatasetError, match=r"MODEL.RETINANET.NUM_CLASSES = 5 is set in the config, but dataset "
                                           r"'n_train' has 2 classes"):
        setup_custom_datasets(cfg, [train, val], explicit)
    cfg = _cfg("retinanet_pvt_v2_b0.yaml")
    with pytest.raises(DatasetError, match=r"declared but DATASETS.TRAIN = \('coco_2017_train',\).*"
                                           r"DATASETS.TRAIN \"\('n_train',\)\" DATASETS.TEST \"\('n_val',\)\""):
        setup_custom_datasets(cfg, [train, val], require_used=True)
    cfg = _cfg("mask_rcnn_pvt_v2_b0.yaml", opts)
    with pytest.raises(DatasetError, match=r"boxes but no masks.*faster_rcnn_<variant>.yaml.*MODEL.MASK_ON False"):
        setup_custom_datasets(cfg, [train, val], opts)
    cfg = _cfg("mask_rcnn_pvt_v2_b0.yaml", opts + ["MODEL.MASK_ON", "False"])
    setup_custom_datasets(cfg, [train, val], opts)
    # the config key does the same as --dataset
    cfg = _cfg("retinanet_pvt_v2_b0.yaml", opts + ["DATASETS.CUSTOM", repr([train, val])])
    assert setup_custom_datasets(cfg) == ["n_train", "n_val"] and cfg.MODEL.RETINANET.NUM_CLASSES == 2


# ------------------------------------------------------------------------------------------ fine-tuning
@pytest.mark.parametrize("config", ["retinanet_pvt_v2_b0.yaml", "faster_rcnn_pvt_v2_b0.yaml",
                                    "cascade_mask_rcnn_pvt_v2_b0_3x.yaml"])
def test_finetune_reinitialises_class_dependent_layers(config, tmp_path, caplog):
    from detectron2.modeling import build_model

    from pvt_d2.checkpoint import AtomicCheckpointer
    from pvt_d2.checkpoint.finetune import class_dependent_keys

    small = ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
             "MODEL.ROI_MASK_HEAD.CONV_DIM", "32"]
    torch.manual_seed(0)
    coco = build_model(_cfg(config, small + ["MODEL.ROI_HEADS.NUM_CLASSES", "80", "MODEL.RETINANET.NUM_CLASSES", "80"]))
    path = str(tmp_path / "coco.pth")
    torch.save({"model": coco.state_dict()}, path)
    torch.manual_seed(1)
    mine = build_model(_cfg(config, small + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3"]))
    fresh = {k: v.clone() for k, v in mine.state_dict().items()}
    dependent = class_dependent_keys(mine)
    coco_state = coco.state_dict()
    # exactly the tensors whose shape depends on the class count
    assert set(dependent) == {k for k, v in fresh.items() if v.shape != coco_state[k].shape}
    if config.startswith("retinanet"):
        assert set(dependent) == {"head.cls_score.weight", "head.cls_score.bias"}
    elif config.startswith("faster"):
        assert set(dependent) == {f"roi_heads.box_predictor.{p}.{t}" for p in ("cls_score", "bbox_pred")
                                  for t in ("weight", "bias")}
    else:  # every cascade stage, and the mask predictor(s)
        assert {f"roi_heads.box_predictor.{i}.cls_score.weight" for i in range(3)} <= set(dependent)
        assert any("mask_head" in k and "predictor" in k for k in dependent)
    with caplog.at_level("WARNING", logger="pvt_d2"):
        AtomicCheckpointer(mine).resume_or_load(path, resume=False)
    text = caplog.text
    assert "trained with 80 classes, for 3 classes" in text, text
    assert f"{len(dependent)} class-dependent tensors are re-initialised" in text
    assert "matches this model only partly" not in text  # nothing else was left out
    for key, value in mine.state_dict().items():
        source = fresh if key in dependent else coco_state
        assert torch.equal(value, source[key]), key


# ------------------------------------------------------------------------------------ docs/OWN_DATA.md, end to end
def readme_commands():
    """The ``python tools/...`` commands of the own-data example of docs/OWN_DATA.md, as argv lists."""
    with open(os.path.join(REPO, "docs", "OWN_DATA.md")) as f:
        text = f.read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands, variables = [], {}
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if re.fullmatch(r"[A-Z_]+=.*", words[0]) and len(words) == 1:
            name, value = words[0].split("=", 1)
            variables[name] = value
            continue
        assert words[0] == "python", line
        commands.append(words[1:])
    return commands, variables


DRIVER = """
import contextlib, importlib, io, json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[2])
results = []
for argv in json.loads(sys.argv[3]):
    module = importlib.import_module("tools." + os.path.splitext(os.path.basename(argv[0]))[0])
    run = getattr(module, "cli", None) or module.main
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = run(argv[1:])
    except BaseException:
        rc, err = "exception", io.StringIO(traceback.format_exc())
    results.append([rc, err.getvalue()[-3000:]])
print("RESULTS=" + json.dumps(results))
"""


def _expand(word, variables):
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: variables[m.group(1) or m.group(2)], word)


def test_readme_own_data_example_end_to_end(own_data, tmp_path):
    """docs/OWN_DATA.md's example, verbatim, on the tiny data: fine-tune RetinaNet on the COCO json from a
    detector with other classes, Faster R-CNN on the VOC folder, both evaluated; draw detections.
    The detector types are then swapped (Faster R-CNN on COCO, RetinaNet on VOC)."""
    commands, variables = readme_commands()
    assert [c[0] for c in commands] == ["tools/train_net.py", "tools/train_net.py", "tools/demo.py",
                                        "tools/visualize_json_results.py"]
    # a "COCO-trained" RetinaNet: 4 classes (the synthetic set's), random weights
    from detectron2.modeling import build_model

    other = build_model(_cfg("retinanet_pvt_v2_b0.yaml", TINY + ["MODEL.RETINANET.NUM_CLASSES", "4"]))
    weights = tmp_path / "retinanet_other_classes.pth"
    torch.save({"model": other.state_dict()}, str(weights))
    variables.update(DATA=str(own_data / "trees"), VOC=str(own_data / "VOC_trees"), WEIGHTS=str(weights))

    def tiny(argv):
        argv = [_expand(w, variables) for w in argv]
        if argv[0].endswith("train_net.py"):
            return argv + TINY
        if argv[0].endswith("demo.py"):
            return argv + TINY[:16] + ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]
        return argv

    os.symlink(CONFIGS, tmp_path / "configs")  # run from a folder like the repository root, outputs under it
    runs = [tiny(c) for c in commands]
    swapped = []
    for argv in runs[:2]:
        a = list(argv)
        i = a.index("--config-file") + 1
        a[i] = (a[i].replace("retinanet", "faster_rcnn") if "retinanet" in a[i]
                else a[i].replace("faster_rcnn", "retinanet"))
        a[a.index("OUTPUT_DIR") + 1] += "_swapped"
        if "MODEL.WEIGHTS" in a:
            a[a.index("MODEL.WEIGHTS") + 1] = ""
        swapped.append(a)
    proc = subprocess.run([sys.executable, "-c", DRIVER, REPO, str(tmp_path), json.dumps(runs + swapped)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS=")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(line[0][len("RESULTS="):])
    for argv, (rc, err) in zip(runs + swapped, results):
        assert rc in (0, None), f"{argv[0]}: {rc}\n{err}"
    out = tmp_path / "output"
    for run in ("trees_retinanet", "trees_faster_rcnn", "trees_retinanet_swapped", "trees_faster_rcnn_swapped"):
        assert (out / run / "model_final.pth").is_file(), run
        metrics = [json.loads(x) for x in (out / run / "metrics.json").read_text().splitlines()]
        assert any("bbox/AP" in m for m in metrics), run  # evaluated on the val set at the end
    log = (out / "trees_retinanet" / "log.txt").read_text()
    assert "trained with 4 classes, for 2 classes: 2 class-dependent tensors are re-initialised" in log
    assert "NUM_CLASSES: 2" in (out / "trees_faster_rcnn" / "config.yaml").read_text()
    drawn = sorted(os.listdir(out / "trees_demo"))
    assert len(drawn) == sum(SPLITS.values()) and all(cv2.imread(str(out / "trees_demo" / n)) is not None
                                                       for n in drawn)
    assert len(os.listdir(out / "trees_vis")) == SPLITS["val"]


def test_cli_errors_are_one_line(own_data, tmp_path, capsys):
    """Bad declarations and box-only data with Mask R-CNN: one ERROR line, exit status 2, in every tool."""
    from pvt_d2.cli import demo, visualize_data, visualize_json_results
    from pvt_d2.cli.train_net import cli

    data = own_data / "trees"
    train, val = f"e_train={data}/train.json:{data}/images", f"e_val={data}/val.json:{data}/images"
    use = ["DATASETS.TRAIN", "('e_train',)", "DATASETS.TEST", "('e_val',)", "OUTPUT_DIR", str(tmp_path / "o")]
    cases = {
        "mask_rcnn_box_only": (cli, ["--config-file", os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b0.yaml"),
                                     "--dataset", train, "--dataset", val, *use],
                               r"has objects with boxes but no masks .* configs/faster_rcnn_<variant>.yaml"),
        "num_classes": (cli, ["--config-file", os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml"),
                              "--dataset", train, "--dataset", val, *use, "MODEL.RETINANET.NUM_CLASSES", "3"],
                        r"MODEL.RETINANET.NUM_CLASSES = 3 is set in the config, but dataset 'e_train' has 2 classes"),
        "missing_json": (cli, ["--config-file", os.path.join(CONFIGS, "faster_rcnn_pvt_v2_b0.yaml"),
                               "--dataset", f"e_train={data}/nope.json:{data}/images", *use],
                         r"Dataset 'e_train': .*nope.json not found"),
        "unused": (cli, ["--config-file", os.path.join(CONFIGS, "faster_rcnn_pvt_v2_b0.yaml"), "--dataset", train],
                   r"declared but DATASETS.TRAIN"),
        "demo_bad_spec": (demo.main, ["--config-file", os.path.join(CONFIGS, "faster_rcnn_pvt_v2_b0.yaml"),
                                      "--dataset", "oops", "--input", str(data / "images")], r"is not NAME=SPEC"),
        "visualize_data_voc": (visualize_data.main, ["--config-file",
                                                     os.path.join(CONFIGS, "faster_rcnn_pvt_v2_b0.yaml"),
                                                     "--source", "annotation", "--output", str(tmp_path / "v"),
                                                     "--dataset", f"e_voc={tmp_path}:train"],
                               r"lacks Annotations"),
        "visualize_json": (visualize_json_results.main, ["--input", str(tmp_path / "r.json"), "--output",
                                                         str(tmp_path / "v"), "--dataset", "e_x=/nope/a.json"],
                           r"not found"),
    }
    for name, (run, argv, message) in cases.items():
        assert run(argv) == 2, name
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ERROR")]
        assert len(err) == 1 and re.search(message, err[0]), (name, err)


def test_visualize_data_draws_declared_voc(own_data, tmp_path):
    from pvt_d2.cli import visualize_data

    out = tmp_path / "vis"
    assert visualize_data.main(["--config-file", os.path.join(CONFIGS, "faster_rcnn_pvt_v2_b0.yaml"),
                                "--source", "annotation", "--output", str(out), "--num-images", "0",
                                "--dataset", f"d_voc={own_data}/VOC_trees:val"]) == 0
    assert sorted(os.listdir(out)) == [f"val_{i:02d}.jpg" for i in range(SPLITS["val"])]
