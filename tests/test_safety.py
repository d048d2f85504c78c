"""Safety (issue 13): no file runs code, no command destroys a user's file, bad data stops with a message.

Each test names the catalogue entries of ``tests/test_reliability.py`` it covers (41-...).
"""
import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, REPO, tiny_train_cfg

QUICKSTART = os.path.join(CONFIGS, "quickstart_pvt_v2_b0.yaml")
RETINANET = os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml")
# a tiny CPU RetinaNet on the synthetic set, as command-line overrides
TINY = ["DATASETS.TRAIN", "('synthetic_train',)", "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "4",
        "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
        "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.PVT_D2.PRETRAINED", ""]
DEMO_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.PVT_D2.PRETRAINED", "", "INPUT.MIN_SIZE_TEST", "64",
             "INPUT.MAX_SIZE_TEST", "96"]


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def md5_tree(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): md5(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


class _Marker:
    """Pickles as a call to ``os.system`` that creates a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_files(tmp_path):
    """The same payload as a detectron2-style .pkl, a pycls .pyth and a legacy torch .pth."""
    marker = tmp_path / "MARKER"
    files = {}
    for name in ("evil.pkl", "evil.pyth"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"model": {"w": _Marker(marker)}, "__author__": "x", "model_state": _Marker(marker)}, f,
                        protocol=2)
        files[name] = str(tmp_path / name)
    torch.save({"model": _Marker(marker)}, str(tmp_path / "evil.pth"), _use_new_zipfile_serialization=False)
    files["evil.pth"] = str(tmp_path / "evil.pth")
    return marker, files


def _tiny_model(num_classes=4, arch="pvt_v2_b0"):
    from detectron2.modeling import build_model

    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", "", ["MODEL.RETINANET.NUM_CLASSES", str(num_classes),
                                                           "DATASETS.TEST", "()", "MODEL.PVT_D2.ARCH", arch])
    return cfg, build_model(cfg)


# --------------------------------------------------------------------------- no pickle runs (41-44)


def test_restricted_unpickler_builds_plain_data_only(tmp_path):
    """41. plain pickles: dicts, lists, numbers, strings, numpy arrays load; any other global is refused,
    naming the file and the global."""
    from collections import OrderedDict

    from pvt_d2.checkpoint import CheckpointError
    from pvt_d2.checkpoint.io import load_checkpoint_file

    data = {"model": OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3)), "n": [1, 2.5, "s", (3,)],
            "scalar": np.float64(0.5), "__author__": "Detectron2 Model Zoo"}
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok_{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_checkpoint_file(str(path))
        assert np.array_equal(loaded["model"]["w"], data["model"]["w"]) and loaded["n"] == [1, 2.5, "s", (3,)]
    cases = {"builtins.eval": pickle.dumps({"x": _Reduce(eval, ("1+1",))}),
             "torch._utils._rebuild_tensor_v2": pickle.dumps({"w": torch.zeros(2)}),
             "posix.system": pickle.dumps(_Marker(tmp_path / "MARKER"))}
    for global_name, payload in cases.items():
        path = tmp_path / "bad.pkl"
        path.write_bytes(payload)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint_file(str(path))
        assert f"Refusing to load {path}" in str(e.value) and global_name in str(e.value), str(e.value)
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2)[:50])
    with pytest.raises(CheckpointError, match=f"{path} cannot be read as a pickle .truncated"):
        load_checkpoint_file(str(path))
    assert not (tmp_path / "MARKER").exists()


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_detectron2_model_zoo_pkl_loads_through_the_safe_reader(tmp_path):
    """42. a detectron2-format .pkl (numpy arrays, __author__) and a Caffe2-style one load into the model."""
    from pvt_d2.checkpoint import AtomicCheckpointer

    cfg, model = _tiny_model()
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    _, other = _tiny_model()
    AtomicCheckpointer(other, strict=True).resume_or_load(str(path), resume=False)
    assert all(np.array_equal(other.state_dict()[k].numpy(), v) for k, v in state.items())
    nan_path = tmp_path / "nan.pkl"
    state["head.cls_score.weight"][0, 0, 0, 0] = np.nan
    nan_path.write_bytes(pickle.dumps({"model": state, "__author__": "x"}, protocol=2))
    from pvt_d2.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensors \(head.cls_score.weight\)"):
        AtomicCheckpointer(other).resume_or_load(str(nan_path), resume=False)


def test_marker_pickle_never_runs_in_checkpointer_demo_convert(tmp_path, capsys):
    """43. the marker pickle as .pkl / .pyth / legacy .pth: refused by the checkpointer, tools/demo.py and
    tools/convert_pretrained.py, each naming the file; the marker is never created."""
    from pvt_d2.cli import demo
    from pvt_d2.cli.convert_pretrained import main as convert_main

    from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError

    marker, files = _evil_files(tmp_path)
    _, model = _tiny_model()
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(photo)
    for name, path in files.items():
        with pytest.raises(CheckpointError, match=f"Refusing to load {path}"):
            AtomicCheckpointer(model).resume_or_load(path, resume=False)
        capsys.readouterr()
        rc = demo.main(["--config-file", QUICKSTART, "--input", str(photo), "--output", str(tmp_path / f"{name}_drawn"),
                        "--opts", *DEMO_OPTS, "MODEL.WEIGHTS", path])
        err = capsys.readouterr().err
        assert rc == 2 and f"ERROR: Refusing to load {path}" in err and "Traceback" not in err, err
        assert convert_main([path, str(tmp_path / f"{name}.out.pth")]) == 2
        err = capsys.readouterr().err
        assert f"ERROR: Refusing to load {path}" in err, err
    assert not marker.exists()
    assert not any(p.name.endswith(".out.pth") for p in tmp_path.iterdir())


def test_quickstart_drawing_loads_weights_through_the_safe_reader(tmp_path):
    """43b. the quickstart draws with pvt_d2's Predictor (not detectron2's DefaultPredictor): the marker pickle as
    its MODEL.WEIGHTS is refused naming the file and never runs."""
    from pvt_d2.cli.quickstart import draw_validation_images

    from pvt_d2.checkpoint import CheckpointError
    from pvt_d2.config import load_config

    marker, files = _evil_files(tmp_path)
    for path in files.values():
        cfg = load_config(QUICKSTART, [*DEMO_OPTS, "MODEL.WEIGHTS", path])
        with pytest.raises(CheckpointError, match=f"Refusing to load {path}"):
            draw_validation_images(cfg, str(tmp_path / "vis"))
    assert not marker.exists()


@pytest.mark.slow
def test_marker_pickle_never_runs_in_train_net(dataset_root, tmp_path):
    """44. the marker pickle as MODEL.WEIGHTS of train_net (training and --eval-only): one ERROR naming the
    file, exit 2, no traceback, no marker."""
    marker, files = _evil_files(tmp_path)
    env = {**os.environ, "DETECTRON2_DATASETS": dataset_root, "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--eval-only"]):
        path = files["evil.pkl"]
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                               RETINANET, *extra, *TINY, "MODEL.WEIGHTS", path, "OUTPUT_DIR",
                               str(tmp_path / f"out{len(extra)}")], capture_output=True, text=True, timeout=300,
                              env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith(f"ERROR: Refusing to load {path}"), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_strict_load_refuses_another_architecture_naming_both(tmp_path, capsys):
    """45. weights recorded for pvt_v2_b1 into a pvt_v2_b0 model (demo, --eval-only): refused naming both."""
    from pvt_d2.cli import demo

    from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError, run_info_from_config

    cfg_b1, b1 = _tiny_model(arch="pvt_v2_b1")
    AtomicCheckpointer(b1, str(tmp_path), run_info=run_info_from_config(cfg_b1)).save("model_final")
    weights = str(tmp_path / "model_final.pth")
    cfg_b0, b0 = _tiny_model(arch="pvt_v2_b0")
    with pytest.raises(CheckpointError, match="holds a pvt_v2_b1 model but the config builds pvt_v2_b0"):
        AtomicCheckpointer(b0, strict=True, run_info=run_info_from_config(cfg_b0)).resume_or_load(weights,
                                                                                                   resume=False)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(photo)
    rc = demo.main(["--config-file", RETINANET, "--input", str(photo), "--output", str(tmp_path / "demo"),
                    "--opts", *DEMO_OPTS, "MODEL.RETINANET.NUM_CLASSES", "4", "MODEL.FPN.OUT_CHANNELS", "32",
                    "MODEL.WEIGHTS", weights])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a pvt_v2_b1 model but the config builds pvt_v2_b0" in err, err
    assert not (tmp_path / "demo").exists()
    # a missing weights file: one line
    rc = demo.main(["--config-file", QUICKSTART, "--input", str(photo), "--output", str(tmp_path / "demo"),
                    "--opts", *DEMO_OPTS, "MODEL.WEIGHTS", str(tmp_path / "absent.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and [line for line in err.splitlines() if line.startswith("ERROR")] == [
        f"ERROR: Checkpoint file not found: {tmp_path / 'absent.pth'} (MODEL.WEIGHTS). Check the path, or leave "
        f"MODEL.WEIGHTS empty to start from the initialisation."], err


def test_pretrained_with_nan_is_refused_naming_the_tensor(tmp_path):
    """46. MODEL.PVT_D2.PRETRAINED / convert input with an Inf: refused when loaded, naming the tensor."""
    from pvt_d2.checkpoint import CheckpointError, load_pretrained_backbone
    from pvt_d2.modeling import create_backbone

    model = create_backbone("pvt_v2_b0")
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key].view(-1)[0] = float("inf")
    path = str(tmp_path / "inf.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"inf.pth has NaN or infinite values in 1 tensors \({key}\)"):
        load_pretrained_backbone(model, path)


# --------------------------------------------------------------------------- no file destroyed (47-52)


def test_demo_never_writes_over_its_inputs(tmp_path, capsys):
    """47. demo --output equal to the input folder, inside it, or the input file: refused, photos unchanged;
    existing results are kept unless --overwrite."""
    from pvt_d2.cli import demo

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")
    before = md5_tree(photos)
    base = ["--config-file", QUICKSTART, "--confidence-threshold", "0.0"]
    for inputs, output, words in (
            ([str(photos)], str(photos), "is the input folder"),
            ([str(photos)], str(photos / "drawn"), "is the input folder"),
            ([str(photos / "p0.png")], str(photos / "p0.png"), "over the input file"),
            ([str(photos / "*.png")], str(photos), "over the input file")):
        rc = demo.main([*base, "--input", *inputs, "--output", output, "--opts", *DEMO_OPTS])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Nothing was written" in err, err
        assert md5_tree(photos) == before
    out = tmp_path / "out"
    assert demo.main([*base, "--input", str(photos), "--output", str(out), "--opts", *DEMO_OPTS]) == 0
    results = md5_tree(out)
    (out / "p0.png").write_bytes(b"user's own file")
    kept = md5(out / "p0.png")
    rc = demo.main([*base, "--input", str(photos), "--output", str(out), "--opts", *DEMO_OPTS])
    err = capsys.readouterr().err
    assert rc == 2 and "exist already" in err and "--overwrite" in err, err
    assert md5(out / "p0.png") == kept
    assert demo.main([*base, "--input", str(photos), "--output", str(out), "--overwrite", "--opts", *DEMO_OPTS]) == 0
    assert md5(out / "p0.png") != kept and set(md5_tree(out)) == set(results) and md5_tree(photos) == before


def test_convert_never_replaces_its_input_or_an_existing_output(tmp_path, capsys):
    """48. convert IN IN: refused, input unchanged; an existing output is kept unless --force."""
    from pvt_d2.cli.convert_pretrained import main as convert_main

    from pvt_d2.modeling import create_backbone

    src = str(tmp_path / "pvt_v2_b0.pth")
    torch.save(create_backbone("pvt_v2_b0").state_dict(), src)
    before = md5(src)
    assert convert_main([src, src]) == 2
    err = capsys.readouterr().err
    assert "ERROR: the output" in err and "is the input file" in err
    assert md5(src) == before
    out = tmp_path / "out.pth"
    out.write_bytes(b"precious")
    assert convert_main([src, str(out)]) == 2
    assert "exists already and is kept; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert convert_main([src, str(out), "--force"]) == 0
    assert out.read_bytes() != b"precious" and md5(src) == before


def _finished_run(folder):
    from pvt_d2.checkpoint import AtomicCheckpointer

    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), str(folder))
    ckpt.save("model_0000004", iteration=4)
    ckpt.save("model_final", iteration=9)
    return md5_tree(folder)


def test_new_run_refuses_the_folder_of_another_run(dataset_root, tmp_path, capsys):
    """49. train_net without --resume into a finished run's OUTPUT_DIR: refused, nothing changed;
    --resume and --overwrite are what the message offers."""
    from pvt_d2.cli import train_net

    run = tmp_path / "run"
    before = _finished_run(run)
    rc = train_net.cli(["--config-file", RETINANET, *TINY, "OUTPUT_DIR", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and f"ERROR: OUTPUT_DIR {run} holds the checkpoints of another run (last_checkpoint, " \
                       f"model_0000004.pth, model_final.pth)" in err and "--resume" in err and "--overwrite" in err
    assert md5_tree(run) == before


def test_lock_stops_a_second_live_run_and_stale_locks_are_taken_over(tmp_path, capsys):
    """50. a live run's lock: a second run on its OUTPUT_DIR is refused; 51. a killed run's lock is taken over."""
    from pvt_d2.cli import train_net

    from pvt_d2.engine.output_dir import LOCK_NAME, OutputDirError, OutputDirLock

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / LOCK_NAME
        lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "what": "training",
                                         "started": "today"}))
        with pytest.raises(OutputDirError, match=f"in use by another run .training, process {sleeper.pid}"):
            OutputDirLock(str(tmp_path)).acquire()
        rc = train_net.cli(["--config-file", RETINANET, *TINY, "OUTPUT_DIR", str(tmp_path)])
        assert rc == 2 and "is in use by another run" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputDirLock(str(tmp_path)):  # the sleeper is dead now: stale
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirError, match=f"process {os.getpid()}"):
            OutputDirLock(str(tmp_path)).acquire()
    assert not lock_file.exists()


def test_disk_full_during_save_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    """52. ENOSPC while saving: CheckpointError saying the disk is full and naming the last good checkpoint."""
    from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError

    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = md5_tree(tmp_path)

    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"The disk is full: checkpoint .*model_0000002.pth could not be "
                                              r"written.*last good checkpoint is still .*model_0000001.pth"):
        ckpt.save("model_0000002", iteration=2)
    assert md5_tree(tmp_path) == before


# --------------------------------------------------------------------------- resume / eval-only (53-55)


def test_resume_that_cannot_continue_says_why(tmp_path):
    """53. resume with another optimizer; 54. resume with MAX_ITER below the checkpoint's iteration."""
    from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError

    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    info = {"optimizer": "SGD", "max_iter": 100, "meta_architecture": "RetinaNet"}
    AtomicCheckpointer(model, str(tmp_path), run_info=info, optimizer=sgd).save("model_0000049", iteration=49)
    adamw = torch.optim.AdamW(model.parameters())
    ckpt = AtomicCheckpointer(model, str(tmp_path), run_info={**info, "optimizer": "ADAMW"}, optimizer=adamw)
    with pytest.raises(CheckpointError, match="trained with SOLVER.OPTIMIZER SGD but the config says ADAMW"):
        ckpt.resume_or_load("", resume=True)
    ckpt = AtomicCheckpointer(model, str(tmp_path), run_info={**info, "max_iter": 30}, optimizer=sgd)
    with pytest.raises(CheckpointError, match="at iteration 50 but SOLVER.MAX_ITER = 30"):
        ckpt.resume_or_load("", resume=True)
    ckpt = AtomicCheckpointer(model, str(tmp_path), run_info=info, optimizer=sgd)
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 49


def test_eval_only_without_weights_is_refused(dataset_root, tmp_path, capsys):
    """55. --eval-only with MODEL.WEIGHTS empty: refused instead of evaluating a random model."""
    from pvt_d2.cli import train_net

    rc = train_net.cli(["--config-file", RETINANET, "--eval-only", *TINY, "DATASETS.TEST", "('synthetic_val',)",
                        "OUTPUT_DIR", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "ERROR: --eval-only needs trained weights: MODEL.WEIGHTS is empty" in err, err


# --------------------------------------------------------------------------- datasets (56-67)


def _coco(tmp_path, mutate):
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 10], "iscrowd": 0, "area": 200,
             "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]}]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    mutated = mutate(data)
    data = data if mutated is None else mutated
    path = tmp_path / f"{uuid.uuid4().hex[:6]}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("mutate,words", [
    (lambda d: "", "is empty"),
    (lambda d: json.dumps(d)[:40], "is not valid json.*truncated"),
    (lambda d: "{'images': []}", "is not valid json"),
    (lambda d: [d], "holds a json list"),
    (lambda d: d.pop("categories") and None, "has no 'categories' field"),
    (lambda d: d.pop("images") and None, "has no 'images' field"),
    (lambda d: d["images"][1].pop("height") and None, r"images\[1\] has no 'height'"),
    (lambda d: d["images"][0].update(width=0), r"images\[0\].width = 0"),
    (lambda d: d["images"][1].update(id=1), "image id.s. are used more than once .e.g. id 1 for 1.png, 2.png"),
    (lambda d: d["annotations"][0].update(bbox=["4", "4", "20", "10"]), r"annotations\[0\].bbox = \['4'"),
    (lambda d: d["annotations"][0].update(bbox=[4, 4, float("inf"), 10]), "NaN or infinite coordinates"),
    (lambda d: d["annotations"][0].update(segmentation=[[4, 4, float("nan"), 4, 24, 14]]),
     r"annotations\[0\].segmentation\[0\] .* NaN or infinite"),
    (lambda d: d["annotations"][0].update(segmentation=[[4, "x", 24, 4, 24, 14]]), "holds 'x'"),
])
def test_bad_annotation_files_name_file_and_field(tmp_path, mutate, words):
    """56-68. malformed / empty / truncated json, missing fields and sizes, duplicate ids, non-numeric and
    non-finite boxes and polygons: DatasetError naming the file and the field."""
    from pvt_d2.data import DatasetError
    from pvt_d2.data.validation import check_coco_json

    path = _coco(tmp_path, mutate)
    with pytest.raises(DatasetError, match=words) as e:
        check_coco_json(path)
    assert path in str(e.value)


def test_dataset_checks_against_the_config(tmp_path, caplog):
    """69. box-only annotations under MASK_ON (says how to train boxes only); 70. RLE masks with MASK_FORMAT
    polygon; 71. polygons with fewer than 3 points counted and reported."""
    from detectron2.data import MetadataCatalog

    from pvt_d2.config import get_pvt_d2_cfg
    from pvt_d2.data import DatasetError, check_datasets_for_config

    cfg = get_pvt_d2_cfg()
    cfg.MODEL.MASK_ON = True

    def registered(mutate):
        name = f"safety_{uuid.uuid4().hex[:6]}"
        MetadataCatalog.get(name).set(json_file=_coco(tmp_path, mutate))
        return name

    box_only = registered(lambda d: d["annotations"][0].pop("segmentation") and None)
    with pytest.raises(DatasetError, match="1 of 1 annotations have no 'segmentation', but MODEL.MASK_ON is True.*"
                                           "set MODEL.MASK_ON False, or use a RetinaNet or Faster R-CNN"):
        check_datasets_for_config(cfg, [box_only])
    cfg.MODEL.MASK_ON = False
    check_datasets_for_config(cfg, [box_only])
    cfg.MODEL.MASK_ON = True
    rle = registered(lambda d: d["annotations"][0].update(segmentation={"counts": "abc", "size": [48, 64]}))
    with pytest.raises(DatasetError, match="has 1 RLE masks but INPUT.MASK_FORMAT is 'polygon'.*bitmask"):
        check_datasets_for_config(cfg, [rle])
    cfg.INPUT.MASK_FORMAT = "bitmask"
    check_datasets_for_config(cfg, [rle])
    short = registered(lambda d: d["annotations"][0]["segmentation"].append([1, 1, 5, 5]))
    with caplog.at_level("WARNING", logger="pvt_d2.data.validation"):
        check_datasets_for_config(cfg, [short])
    assert "1 polygon(s) have fewer than 3 points (e.g. annotations[0].segmentation[1]" in caplog.text


def test_small_dataset_of_unreadable_images_is_the_broken_dataset_message(tmp_path):
    """72. three images, all unreadable: the broken-dataset BadImageError, not MapDataset's ValueError."""
    from detectron2.data.datasets import register_coco_instances

    from pvt_d2.data import BadImageError
    from pvt_d2.engine import Trainer

    folder = tmp_path / "broken"
    (folder / "images").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2, 3)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 10], "iscrowd": 0, "area": 200}
            for i in (1, 2, 3)]
    for i in (1, 2, 3):
        (folder / "images" / f"{i}.png").write_bytes(b"not an image")
    (folder / "a.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": [{"id": 1, "name": "thing"}]}))
    name = f"broken_{uuid.uuid4().hex[:6]}"
    register_coco_instances(name, {}, str(folder / "a.json"), str(folder / "images"))
    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), [
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "1"])
    loader = Trainer.build_train_loader(cfg)
    with pytest.raises(BadImageError, match="3 images in a row could not be read.*dataset looks broken"):
        next(iter(loader))


# --------------------------------------------------------------------------- config at load time (73-84)


@pytest.mark.parametrize("key,value,words", [
    ("MODEL.PVT_D2.LEVIT.ATTN_MODE", "local", "use 'window' or 'global'"),
    ("MODEL.PVT_D2.LEVIT.NORM", "GN", "use 'FrozenBN', 'BN' or 'SyncBN'"),
    ("MODEL.PVT_D2.GCVIT.WINDOW_SIZES", "[7, 7]", "4 positive integers"),
    ("MODEL.PVT_D2.TWINS.EXTRA_NORM", "'yes'", "None .the variant's default., True or False"),
    ("MODEL.PVT_D2.OUT_FEATURES", "['res2', 'res6']", "pvt_v2_b0 has no level res6; its levels are res2"),
    ("MODEL.BACKBONE.FREEZE_AT", "99", "it must be 0 .train everything."),
    ("INPUT.FORMAT", "RGBA", "use one of BGR, RGB, L"),
    ("MODEL.PIXEL_MEAN", "[1.0, 2.0]", "INPUT.FORMAT RGB has 3 channel"),
])
def test_family_and_input_options_are_checked_at_load_time(key, value, words):
    """73-80. family options, OUT_FEATURES against the architecture's levels, FREEZE_AT range, INPUT.FORMAT and
    PIXEL_MEAN length: ConfigError at load time naming key and value."""
    from pvt_d2.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words) as e:
        load_config(RETINANET, [key, value])
    assert str(e.value).startswith(f"{key} = ")


def test_base_chain_errors_are_config_errors(tmp_path):
    """81. missing _BASE_; 82. _BASE_ cycle; 83. YAML whose top level is a list: ConfigError naming the file."""
    from pvt_d2.config import ConfigError, load_config

    (tmp_path / "missing.yaml").write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"_BASE_ file not found: .*nowhere.yaml \(via .*missing.yaml\)"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"includes itself through _BASE_: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "list.yaml").write_text("- MODEL\n- SOLVER\n")
    with pytest.raises(ConfigError, match=r"list.yaml holds a YAML list, not a mapping"):
        load_config(str(tmp_path / "list.yaml"))
