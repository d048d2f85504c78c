"""The evaluation, visualization and analysis tools, end to end on the synthetic set and tiny models.

Covers ``tools/demo.py``, ``visualize_json_results.py``, ``visualize_data.py``,
``plot_metrics.py`` (``pvt_d2.utils.plot``), ``analyze_model.py``,
``benchmark.py`` and ``model_zoo.py`` (``pvt_d2.utils.analysis``).
"""
import json
import os
import re

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO

QUICKSTART = os.path.join(CONFIGS, "quickstart_pvt_v2_b0.yaml")
# Shrinks the quickstart Mask R-CNN so that one image takes a fraction of a second on the CPU.
TINY_OPTS = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "TEST.DETECTIONS_PER_IMAGE", "3",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.DEVICE", "cpu",
]


@pytest.fixture(scope="module")
def val_images(dataset_root):
    """Paths of the first synthetic validation images."""
    from pvt_d2.data.synthetic import dataset_root as synthetic_root

    folder = os.path.join(synthetic_root(dataset_root), "val")
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:3]]


def _read(path):
    img = cv2.imread(path)
    assert img is not None, f"{path} is not a readable image"
    return img


# --------------------------------------------------------------------------- drawing / demo


def test_draw_instances_draws_only_above_threshold():
    from detectron2.structures import Boxes, Instances

    from pvt_d2.utils.visualize import draw_instances

    img = (np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)
    inst = Instances((48, 64))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 30.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([1])
    mask = torch.zeros(1, 48, 64, dtype=torch.bool)
    mask[0, 14:28, 12:38] = True
    inst.pred_masks = mask
    drawn = draw_instances(img, inst, None, score_threshold=0.5)
    assert drawn.shape == img.shape and drawn.dtype == np.uint8
    changed = (drawn != img).any(axis=2)
    assert changed[14:28, 12:38].mean() > 0.9  # the mask is painted
    assert not changed[:, :6].any()  # left of the box (and its label) nothing changes
    assert np.array_equal(draw_instances(img, inst, None, score_threshold=0.95), img)


def test_demo_images_video_and_bad_inputs(tmp_path, val_images, capsys):
    from pvt_d2.cli import demo

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (80, 64))
    for k in range(3):
        writer.write(cv2.resize(_read(val_images[k]), (80, 64)))
    writer.release()
    out = tmp_path / "out"
    rc = demo.main(["--config-file", QUICKSTART, "--input", *val_images[:2], str(tmp_path / "missing.jpg"),
                    str(corrupt), str(tmp_path / "none_*.png"), video, "--output", str(out),
                    "--confidence-threshold", "0.0", "--opts", *TINY_OPTS])
    err = capsys.readouterr().err
    assert rc == 0
    assert "missing.jpg: file not found" in err
    assert "none_*.png: pattern matches no files" in err
    assert f"skipped {corrupt}: cannot be processed" in err
    for path in val_images[:2]:
        src, res = _read(path), _read(str(out / os.path.basename(path)))
        assert res.shape == src.shape
        assert (res != src).any(), "random-init model at threshold 0 must draw detections"
    assert not (out / "corrupt.png").exists()
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (64, 80, 3)


def test_demo_nothing_processed_is_an_error(tmp_path, capsys):
    from pvt_d2.cli import demo

    rc = demo.main(["--config-file", QUICKSTART, "--input", str(tmp_path / "a.png"), "--output",
                    str(tmp_path / "out"), "--opts", *TINY_OPTS])
    assert rc == 1
    assert "a.png: file not found" in capsys.readouterr().err


def test_demo_expand_inputs(tmp_path):
    from pvt_d2.cli.demo import expand_inputs

    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    paths, problems = expand_inputs([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "empty")])
    assert paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]  # folder sorted, duplicates dropped
    assert problems == [(str(tmp_path / "empty"), "folder contains no images")]


# --------------------------------------------------------------------------- dataset visualization


def _coco_predictions(records, id_map, score):
    """COCO result entries made from the ground truth of ``records`` (boxes and RLE masks)."""
    from pycocotools import mask as mask_util

    to_dataset_id = {v: k for k, v in id_map.items()}
    results = []
    for r in records:
        for ann in r["annotations"]:
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], r["height"], r["width"]))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": r["image_id"], "category_id": to_dataset_id[ann["category_id"]],
                            "bbox": list(ann["bbox"]), "score": score, "segmentation": rle})
    return results


def test_visualize_json_results_side_by_side(tmp_path, dataset_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from pvt_d2.data import prepare_datasets
    from pvt_d2.cli import visualize_json_results

    prepare_datasets(["synthetic_val"])
    records = DatasetCatalog.get("synthetic_val")[:3]
    id_map = MetadataCatalog.get("synthetic_val").thing_dataset_id_to_contiguous_id
    preds = _coco_predictions(records[:1], id_map, 0.9) + _coco_predictions(records[1:2], id_map, 0.2)
    folder = tmp_path / "inference" / "synthetic_val"  # the dataset is read from the path
    folder.mkdir(parents=True)
    (folder / "coco_instances_results.json").write_text(json.dumps(preds))
    out = tmp_path / "vis"
    assert visualize_json_results.main(["--input", str(folder / "coco_instances_results.json"),
                                        "--output", str(out), "--max-images", "3"]) == 0
    for k, r in enumerate(records):
        src = _read(r["file_name"])
        res = _read(str(out / os.path.basename(r["file_name"])))
        h, w = src.shape[:2]
        assert res.shape == (h, 2 * w, 3)
        pred, gt = res[:, :w], res[:, w:]
        assert (gt[40:] != src[40:]).any(), "ground truth must be drawn"
        if k == 0:  # predictions above the threshold are drawn
            assert (pred[40:] != src[40:]).any()
        else:  # below the threshold / no predictions: only the corner label differs
            assert np.array_equal(pred[40:], src[40:])


def test_visualize_json_results_unknown_dataset(tmp_path, capsys):
    from pvt_d2.cli import visualize_json_results

    path = tmp_path / "results.json"
    path.write_text("[]")
    assert visualize_json_results.main(["--input", str(path), "--output", str(tmp_path / "o")]) == 2
    assert "pass --dataset" in capsys.readouterr().err


def test_visualize_data_annotation_and_dataloader(tmp_path, dataset_root):
    from detectron2.data import DatasetCatalog
    from detectron2.data.transforms import ResizeShortestEdge

    from pvt_d2.cli import visualize_data

    opts = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "2"]
    ann_out, dl_out = tmp_path / "ann", tmp_path / "dl"
    assert visualize_data.main(["--config-file", QUICKSTART, "--source", "annotation", "--output", str(ann_out),
                                "--num-images", "2", "--opts", *opts]) == 0
    records = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("synthetic_train")}
    written = sorted(os.listdir(ann_out))
    assert written == sorted(records)[:2]
    for name in written:
        src, res = _read(records[name]["file_name"]), _read(str(ann_out / name))
        assert res.shape == src.shape and (res != src).any()

    assert visualize_data.main(["--config-file", QUICKSTART, "--source", "dataloader", "--output", str(dl_out),
                                "--num-images", "3", "--opts", *opts]) == 0
    written = sorted(os.listdir(dl_out))
    assert len(written) == 3
    for name in written:
        original = records[re.sub(r"_\d+(\.png)$", r"\1", name)]  # "_1": the image came again
        expected = ResizeShortestEdge.get_output_shape(original["height"], original["width"], 64, 96)
        img = _read(str(dl_out / name))
        assert img.shape[:2] == tuple(expected), "augmented images are drawn at the size the model sees"
        assert img.std() > 5


# --------------------------------------------------------------------------- plots


def _write_metrics(path):
    lines = []
    for it in (19, 39, 59, 79, 99):
        lines.append(json.dumps({"iteration": it, "total_loss": 3.0 - it / 50, "loss_cls": 1.0 - it / 200,
                                 "loss_box_reg": 0.5, "lr": 1e-4 * min(1.0, (it + 1) / 50), "time": 0.5}))
    lines.append(json.dumps({"iteration": 99, "bbox/AP": 12.5, "bbox/AP50": 30.0, "bbox/AP75": 8.0,
                             "bbox/AP-circle": 20.0, "segm/AP": 10.0}))
    lines.append(json.dumps({"iteration": 59, "total_loss": 9.0}))  # a resumed run rewrites iteration 59
    lines.append('{"iteration": 119, "total_lo')  # cut short by a killed run
    path.write_text("\n".join(lines) + "\n")


def test_plot_metrics_writes_pngs(tmp_path):
    from pvt_d2.utils.plot import load_metrics, metric_series, plot_metrics

    metrics = tmp_path / "metrics.json"
    _write_metrics(metrics)
    series = metric_series(load_metrics(str(metrics)))
    assert series["total_loss"][0] == [19, 39, 59, 79, 99] and series["total_loss"][1][2] == 9.0
    assert series["bbox/AP"] == ([99], [12.5])
    paths = plot_metrics(str(metrics), str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in paths] == ["losses.png", "lr.png", "ap.png"]
    for p in paths:
        img = _read(p)
        assert img.shape == (500, 800, 3) and img.std() > 10


def test_plot_metrics_cli(tmp_path, capsys):
    from pvt_d2.cli import plot_metrics as tool

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"iteration": 0, "lr": 0.1}) + "\n")
    assert tool.main([str(run)]) == 0
    assert os.path.isfile(run / "plots" / "lr.png") and not os.path.exists(run / "plots" / "ap.png")
    assert tool.main([str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- analysis


def test_parse_size():
    from pvt_d2.utils.analysis import parse_size

    assert parse_size("1333x800") == (800, 1333)
    assert parse_size("512") == (512, 512)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("big")


def test_sdpa_flops_are_counted():
    from pvt_d2.utils.analysis import flop_analysis

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 5)
    analysis = flop_analysis(Attn(), (q, k, v))
    assert analysis.total() == 2 * 3 * 10 * 7 * (8 + 5)
    assert not analysis.unsupported_ops()


def test_peak_memory_cpu_sees_a_large_allocation():
    from pvt_d2.utils.analysis import PeakMemory

    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2 ** 20 // 4 * 3)  # 192 MiB, touched
        mem.sample()  # deterministic: the background thread may not run in time on a loaded machine
        del x
    assert mem.peak_bytes > 150 * 2 ** 20


def test_peak_memory_cpu_sees_memory_reused_from_the_free_heap():
    """Freed tensors below glibc's mmap threshold stay resident; a block reusing them must still count."""
    from pvt_d2.utils.analysis import PeakMemory

    raise_threshold = torch.ones(30 * 2 ** 20 // 4)  # freeing a 30 MB mmapped chunk raises glibc's threshold
    del raise_threshold
    heap = [torch.ones(24 * 2 ** 20 // 4) for _ in range(12)]  # now heap allocations
    del heap[:-1]  # 264 MB free below a live chunk: resident, not trimmed from the top
    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2 ** 20 // 4 * 3)  # 192 MiB: fits in the free heap
        mem.sample()
        del x
    del heap
    assert mem.peak_bytes > 150 * 2 ** 20  # 0.03 MB without releasing the free heap first


def test_peak_memory_cpu_thread_samples_a_held_allocation():
    import time

    from pvt_d2.utils.analysis import PeakMemory

    with PeakMemory("cpu", interval_s=0.001) as mem:
        x = torch.ones(64 * 2 ** 20 // 4 * 3)  # 192 MiB, touched
        deadline = time.monotonic() + 30
        while mem._sampled_peak - mem.baseline_bytes < 150 * 2 ** 20 and time.monotonic() < deadline:
            time.sleep(0.01)  # held until the thread has seen it (at most 30 s)
        del x
    assert mem.peak_bytes > 150 * 2 ** 20


def test_analyze_model_numbers_come_from_the_model():
    from conftest import tiny_train_cfg
    from pvt_d2.utils.analysis import build_detector, count_parameters
    from pvt_d2.cli.analyze_model import analyze, format_report

    cfg = tiny_train_cfg("mask_rcnn_pvt_v2_b0.yaml", "/tmp/unused", ["MODEL.BACKBONE.FREEZE_AT", "2"])
    result = analyze(cfg, ["parameter", "flop"], 64, 96)
    model = build_detector(cfg)
    p = result["params"]
    assert p["detector"] == count_parameters(model)
    assert p["backbone"] == sum(q.numel() for q in model.backbone.bottom_up.parameters())
    assert p["trainable"] < p["detector"]  # FREEZE_AT 2 freezes the stem and stage 1
    assert 0 < result["flops"]["backbone"] < result["flops"]["detector"]
    assert "aten::scaled_dot_product_attention" not in result["unsupported_ops"]["backbone"]
    assert "backbone" in format_report(result)


def test_benchmark_cli(tmp_path):
    from pvt_d2.cli import benchmark

    out = tmp_path / "bench.json"
    rc = benchmark.main(["--config-file", QUICKSTART, "--device", "cpu", "--size", "96x64", "--iters", "2",
                         "--warmup", "1", "--batch-size", "2", "--json", str(out), "--opts", *TINY_OPTS])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["backbone", "detector"]
    for r in data["results"]:
        assert len(r["times_s"]) == 2 and r["mean_ms"] > 0 and r["peak_memory_bytes"] >= 0
        assert (r["height"], r["width"], r["batch_size"], r["amp"]) == (64, 96, 2, False)
        assert r["images_per_s"] == pytest.approx(2 / (sum(r["times_s"]) / 2))
    assert benchmark.main(["--config-file", QUICKSTART, "--size", "huge"]) == 2


def test_run_benchmark_amp_and_time_budget():
    from pvt_d2.utils.analysis import run_benchmark

    calls = []

    def forward():
        calls.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return torch.zeros(1)

    result = run_benchmark(forward, name="x", iters=5, warmup=1, amp=True, max_seconds=0.0, measure_memory=False)
    assert len(result.times_s) == 1 and len(calls) == 2  # warm-up + one timed pass, then the budget stops it
    assert calls[-1] == torch.bfloat16
    assert result.precision == "bfloat16 autocast" and "bfloat16 autocast" in result.summary()


def test_run_benchmark_times_no_pass_beside_the_memory_sampler():
    """The RSS sampling thread competes for the cores: it runs only on the extra, untimed memory pass."""
    import threading
    import time

    from pvt_d2.utils.analysis import SAMPLER_THREAD_NAME, run_benchmark

    sampler_alive = []

    def forward():
        sampler_alive.append(any(t.name == SAMPLER_THREAD_NAME for t in threading.enumerate()))
        x = torch.ones(64 * 2 ** 20 // 4 * 3)  # 192 MiB, touched, freed at return
        if sampler_alive[-1]:
            time.sleep(0.2)  # the GIL is free: the thread samples while x is held
        return x.sum()

    result = run_benchmark(forward, name="x", iters=3, warmup=1)
    assert sampler_alive == [False, False, False, False, True]  # warm-up, 3 timed passes, the memory pass
    assert len(result.times_s) == 3
    assert result.peak_memory_bytes > 150 * 2 ** 20
    assert result.precision == "float32" and "float32" in result.summary()


# --------------------------------------------------------------------------- model zoo


def test_model_zoo_numbers_come_from_the_code(tmp_path):
    from pvt_d2.config import load_config
    from pvt_d2.modeling import create_backbone
    from pvt_d2.utils.analysis import build_detector, count_parameters, flop_analysis, random_images
    from pvt_d2.model_zoo import table as model_zoo

    entries = model_zoo.list_configs(only=["pvt_v2_b0"])
    assert [e["detector"] for e in entries] == list(model_zoo.DETECTORS)
    data = model_zoo.measure(entries, latency_iters=1, size=(64, 96), log=lambda *_: None)
    stats = data["archs"]["pvt_v2_b0"]
    backbone = create_backbone("pvt_v2_b0").eval()
    assert stats["params"] == sum(p.numel() for p in backbone.parameters())
    assert stats["gflops"] == pytest.approx(flop_analysis(backbone, (random_images(1, 64, 96),)).total() / 1e9)
    assert stats["latency_ms"] > 0 and stats["latency_passes"] == 1
    for name in ("retinanet_pvt_v2_b0", "mask_rcnn_pvt_v2_b0"):
        cfg = load_config(os.path.join(CONFIGS, f"{name}.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.PVT_D2.PRETRAINED", ""])
        assert data["configs"][name]["detector_params"] == count_parameters(build_detector(cfg))
        assert data["configs"][name]["backbone_params"] == stats["params"]

    run_info = {"date": "today", "machine": "test", "load_start": "0", "load_end": "0", "minutes": 0.1,
                "size": [800, 1333], "latency_iters": 1, "latency_budget_s": 20}
    path = tmp_path / "zoo.md"
    path.write_text(model_zoo.render(entries, data, run_info))
    text = path.read_text()
    assert "| [mask_rcnn_pvt_v2_b0](configs/mask_rcnn_pvt_v2_b0.yaml) | Mask R-CNN 1x | `pvt_v2_b0` |" in text
    assert "38.2 / 36.2 |" in text and "not reproduced" in text
    assert model_zoo.check(str(path), entries, ["pvt_v2_b0"]) == []
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| [retinanet_pvt_v2_b0]"))
    lines[row] = lines[row].replace(f"| {stats['params'] / 1e6:.2f} |", "| 9.99 |", 1)
    path.write_text("\n".join(lines))
    assert any("params 9.99" in p for p in model_zoo.check(str(path), entries, ["pvt_v2_b0"]))


def test_model_zoo_published_ap_refers_to_real_configs():
    from pvt_d2.modeling import get_arch
    from pvt_d2.model_zoo import table as model_zoo

    entries = model_zoo.list_configs()
    assert len(entries) == 4 * len({e["arch"] for e in entries}) and len(entries) >= 4 * 31
    assert not any(e["name"].startswith("quickstart") for e in entries)
    have = {(e["arch"], e["detector"]) for e in entries}
    for (arch, detector), ap in model_zoo.published_ap().items():
        get_arch(arch)
        assert detector in model_zoo.DETECTORS or detector in model_zoo.EXTRA_DETECTORS
        if detector in model_zoo.DETECTORS:
            assert (arch, detector) in have
        assert all(0 < float(x) < 100 for x in ap.split(" / "))


def test_model_zoo_md_lists_every_config():
    from pvt_d2.model_zoo import table as model_zoo

    path = os.path.join(REPO, "MODEL_ZOO.md")
    if not os.path.isfile(path):
        pytest.skip("MODEL_ZOO.md not generated yet")
    listed = set()
    with open(path) as f:
        for line in f:
            m = model_zoo._ROW.match(line)
            if m:
                listed.add(m.group("name"))
    assert listed == {e["name"] for e in model_zoo.list_configs()}


# --------------------------------------------------------------------------- comparison with timm


def test_benchmark_timm_table_ratios():
    from pvt_d2.cli.benchmark_timm import markdown_table, paired_ratio

    results = {("pvt_v2_b2", "224"): {"ours": [0.6, 0.9, 0.5], "timm": [1.0, 1.0, 0.5],
                                      "ours_cpu": [1.2, 1.8, 1.0], "timm_cpu": [2.0, 2.0, 1.0]},
               ("pvt_tiny", "800x1344"): {"ours": [2.0], "timm": [], "ours_cpu": [4.0], "timm_cpu": []}}
    assert paired_ratio([0.6, 0.9, 0.5], [1.0, 1.0, 0.5]) == pytest.approx(0.9)  # rounds 0.6, 0.9, 1.0
    lines = markdown_table(results, baseline=False, cpu_time=True).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|")
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    # medians 600 / 1000 ms: ratio 0.60; rounds' ratios 0.6, 0.9, 1.0: paired 0.90; CPU 1200 / 2000
    assert cells == ["pvt_v2_b2", "224x224 (8)", "600.0", "1000.0", "0.60", "0.90", "0.60 0.90 1.00",
                     "1200.0", "2000.0", "0.60"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]][3:7] == ["n/a", "n/a", "n/a", "n/a"]


def test_benchmark_timm_table_paired_against_the_baseline():
    from pvt_d2.cli.benchmark_timm import markdown_table

    results = {("twins_pcpvt_small", "224"): {"ours": [0.5, 1.1, 0.9], "timm": [1.0, 1.0, 1.0],
                                              "before": [0.5, 1.0, 1.0], "ours_cpu": [1.0, 2.0, 2.0],
                                              "timm_cpu": [2.0, 2.0, 2.0], "before_cpu": [1.0, 2.5, 1.0]}}
    lines = markdown_table(results, baseline=True, cpu_time=True).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    cells = dict(zip([c.strip() for c in lines[0].split("|")[1:-1]], [c.strip() for c in lines[2].split("|")[1:-1]]))
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    row = [c.strip() for c in lines[2].split("|")[1:-1]]
    at = head.index("pvt_d2 / before")
    # medians 900 / 1000 ms: 0.90; rounds' ratios 1.0, 1.1, 0.9: paired 1.00
    assert row[at:at + 3] == ["0.90", "1.00", "1.00 1.10 0.90"]
    at = head.index("pvt_d2 / before CPU")
    # CPU medians 2000 / 1000 ms: 2.00; rounds' ratios 1.0, 0.8, 2.0: paired 1.00
    assert row[at:at + 3] == ["2.00", "1.00", "1.00 0.80 2.00"]
    assert cells["before ms"] == "1000.0"


@pytest.mark.parametrize("steady", [False, True])
def test_benchmark_timm_steady_malloc_reaches_every_worker(monkeypatch, steady):
    import subprocess
    import types

    from pvt_d2.cli import benchmark_timm

    envs = []

    def fake_run(cmd, env, **kwargs):
        envs.append(env)
        return types.SimpleNamespace(returncode=0, stdout='{"median": 1.0, "min": 1.0, "cpu_median": 2.0, '
                                                          '"cpu_min": 2.0}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    args = types.SimpleNamespace(threads=1, warmup=0, iters=1, steady_malloc=steady)
    for impl in ("ours", "timm"):
        assert benchmark_timm._measure(impl, "pvt_v2_b2", "224", args, None)["cpu_median"] == 2.0
    assert len(envs) == 2
    for env in envs:
        assert env["OMP_NUM_THREADS"] == "1"
        if steady:
            assert env["MALLOC_TRIM_THRESHOLD_"] == str(4 * 2 ** 30)
            assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2 ** 20)
        else:
            assert "MALLOC_TRIM_THRESHOLD_" not in env


def test_benchmark_timm_bad_arguments_are_one_error():
    from pvt_d2.cli import benchmark_timm

    assert benchmark_timm.main(["--rounds", "0"]) == 2
    assert benchmark_timm.main(["--baseline-root", "/nonexistent/checkout"]) == 2


@pytest.mark.slow
def test_benchmark_timm_runs_both_sides(tmp_path, capsys):
    from pvt_d2.cli import benchmark_timm

    out = tmp_path / "bt.json"
    assert benchmark_timm.main(["--variants", "levit_256", "--sizes", "224", "--rounds", "1", "--iters", "1",
                                "--warmup", "0", "--json", str(out)]) == 0
    (entry,) = json.loads(out.read_text())
    assert (entry["variant"], entry["size"]) == ("levit_256", "224")
    assert len(entry["ours"]) == len(entry["timm"]) == 1 and entry["ours"][0] > 0 and entry["timm"][0] > 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| levit_256")]
    assert len(row) == 1 and f"{entry['ours'][0] / entry['timm'][0]:.2f}" in row[0]
