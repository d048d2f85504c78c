"""The evaluation report (pvt_d2.evaluation, tools/eval_report.py): every number on a hand-made case,
the same COCO numbers as pycocotools, bad inputs, --compare, and the page in a real headless Chromium."""
import contextlib
import io
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from pvt_d2.cli.eval_report import main as report_main
from pvt_d2.evaluation import analyze
from pvt_d2.evaluation.report import coco_from_dict

# ---------------------------------------------------------------------------------------------- tiny case
# Three 200x200 images, classes cat and dog (supercategory animal) and car (vehicle), 40x40 objects (medium).
#   image 1: cat A found (0.9); car B detected 20 px off (IoU 400/2800 = 0.14: a localisation error, 0.8)
#   image 2: dog C detected as a cat (0.95: a class confusion); car D not detected (a miss)
#   image 3: dog E found (0.95) + a low-scored duplicate (0.2); a car where there is nothing (background, 0.6)
CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]
R = 51 / 101  # AP of a class with half its objects found by its best-scored detections (recall points 0..0.5)


def _ann(i, img, cat, box):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": box, "score": score}


GT = {"images": [{"id": i, "file_name": f"im{i}.png", "height": 200, "width": 200} for i in (1, 2, 3)],
      "annotations": [_ann(1, 1, 1, [10, 10, 40, 40]), _ann(2, 1, 3, [100, 100, 40, 40]),
                      _ann(3, 2, 2, [10, 10, 40, 40]), _ann(4, 2, 3, [100, 100, 40, 40]),
                      _ann(5, 3, 2, [50, 50, 40, 40])],
      "categories": CATEGORIES}
DETS = [_det(1, 1, [10, 10, 40, 40], 0.9), _det(1, 3, [120, 120, 40, 40], 0.8), _det(2, 1, [10, 10, 40, 40], 0.95),
        _det(3, 2, [50, 50, 40, 40], 0.95), _det(3, 3, [150, 150, 40, 40], 0.6), _det(3, 2, [52, 50, 40, 40], 0.2)]


def _approx(d):
    return {k: pytest.approx(v, abs=1e-9) for k, v in d.items()}


def _write_case(root, dets=DETS, name="run"):
    """The tiny dataset (json + pictures) and a run folder holding ``dets``; returns (json, images, run)."""
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    for im in GT["images"]:
        picture = np.full((200, 200, 3), 90, np.uint8)
        cv2.circle(picture, (100, 100), 30 + 10 * im["id"], (30, 200, 200), -1)
        cv2.imwrite(os.path.join(images, im["file_name"]), picture)
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump(GT, f)
    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "inference", "tiny"), exist_ok=True)
    with open(os.path.join(run, "inference", "tiny", "coco_instances_results.json"), "w") as f:
        json.dump(dets, f)
    return ann, images, run


def _analyze(dets=DETS, **kw):
    return analyze(coco_from_dict(json.loads(json.dumps(GT))), json.loads(json.dumps(dets)), "tiny",
                   progress=False, **kw)


def test_error_breakdown_every_number():
    a = _analyze()
    assert a.iou_types == ["bbox"]
    per = {c: a.breakdown_table("bbox", "all", k) for k, c in enumerate(a.classes)}
    # cat: the confusion (0.95, on the dog) outranks the hit (0.9): precision 1/2 at every recall up to 1;
    # forgiving confusions with the similar class (dog) removes it
    assert per["cat"] == _approx({"C75": 0.5, "C50": 0.5, "Loc": 0.5, "Sim": 1, "Oth": 1, "BG": 1, "FN": 1})
    # dog: half found, nothing else wrong among its own detections
    assert per["dog"] == _approx({"C75": R, "C50": R, "Loc": R, "Sim": R, "Oth": R, "BG": R, "FN": 1})
    # car: the mislocalised box only counts at IoU 0.1; the background box and the miss cost the rest
    assert per["car"] == _approx({"C75": 0, "C50": 0, "Loc": R, "Sim": R, "Oth": R, "BG": R, "FN": 1})
    overall = {"C75": (0.5 + R) / 3, "C50": (0.5 + R) / 3, "Loc": (0.5 + 2 * R) / 3, "Sim": (1 + 2 * R) / 3,
               "Oth": (1 + 2 * R) / 3, "BG": (1 + 2 * R) / 3, "FN": 1}
    assert a.breakdown_table("bbox", "all") == _approx(overall)
    assert a.breakdown_table("bbox", "medium") == _approx(overall)  # every object is medium
    assert a.breakdown_table("bbox", "small") == {t: -1.0 for t in overall}  # no object: left out, not 0
    assert a.breakdown_table("bbox", "large") == {t: -1.0 for t in overall}
    # the COCO numbers
    s = a.summary["bbox"]
    assert s["AP"] == pytest.approx((0.5 + R) / 3) and s["AP50"] == pytest.approx((0.5 + R) / 3)
    assert s["APm"] == pytest.approx((0.5 + R) / 3) and s["APs"] == -1 and s["APl"] == -1
    assert s["AR100"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert [round(r["AP"], 9) for r in a.per_class["bbox"]] == [0.5, round(R, 9), 0.0]


def test_confusion_matrix_and_images_every_number():
    a = _analyze(score_thr=0.5, iou_thr=0.5)
    #            cat dog car background(missed)
    expected = [[1, 0, 0, 0],   # cat A found
                [1, 1, 0, 0],   # dog C detected as cat, dog E found
                [0, 0, 0, 2],   # car B (only a mislocalised box) and car D missed
                [0, 0, 2, 0]]   # background: the mislocalised car box and the car on nothing
    assert a.confusion["bbox"].tolist() == expected
    rows = {c: a.per_class["bbox"][k] for k, c in enumerate(a.classes)}
    assert {c: (r["GT"], r["dets"], r["TP"], r["FP"], r["FN"]) for c, r in rows.items()} == {
        "cat": (1, 2, 1, 1, 0), "dog": (2, 2, 1, 0, 1), "car": (2, 2, 0, 2, 2)}
    images = {im.image_id: im for im in a.images}
    assert [(images[i].missed, images[i].false, images[i].count("gts", "tp")) for i in (1, 2, 3)] == [
        (1, 1, 1), (2, 1, 0), (0, 1, 1)]
    # the drawn states: the confused detection and object name each other's class
    assert sorted((d[4], d[5]) for d in images[2].dets) == [("cls", 2)]
    assert sorted((g[3], g[4]) for g in images[2].gts) == [("cls", 1), ("fn", None)]
    # a lower score threshold lets the duplicate dog (0.2) in: one more background detection of dog
    low = _analyze(score_thr=0.1)
    expected[3][1] = 1
    assert low.confusion["bbox"].tolist() == expected
    # a looser IoU (0.1) turns the mislocalised car box into a hit
    loose = _analyze(iou_thr=0.1)
    assert loose.confusion["bbox"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]]


def test_similar_class_and_other_class_differ():
    # a dog box (0.99) on car D: a confusion across supercategories, forgiven by Oth but not by Sim
    a = _analyze(DETS + [_det(2, 2, [100, 100, 40, 40], 0.99)])
    dog = a.breakdown_table("bbox", "all", 1)
    assert dog == _approx({"C75": R / 2, "C50": R / 2, "Loc": R / 2, "Sim": R / 2, "Oth": R, "BG": R, "FN": 1})
    assert a.confusion["bbox"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 2, 0]]


def _cocoeval_stats(gt_dict, results, iou_type):
    """pycocotools run as detectron2's COCOEvaluator runs it (the box dropped before a segm evaluation)."""
    gt = coco_from_dict(json.loads(json.dumps(gt_dict)))
    res = json.loads(json.dumps(results))
    if iou_type == "segm":
        for r in res:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(res), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco_numbers_equal_pycocotools(dataset_root):
    """Box and mask numbers on the synthetic validation set with generated detections = COCOeval's own."""
    from pvt_d2.data.synthetic import dataset_root as synthetic_root
    from pvt_d2.evaluation.benchmark import fake_results

    with open(os.path.join(synthetic_root(dataset_root), "annotations", "instances_val.json")) as f:
        gt = json.load(f)
    results = fake_results(gt, seed=3, dets_per_image=12, masks=True)
    a = analyze(coco_from_dict(json.loads(json.dumps(gt))), results, "synthetic_val",
                progress=False)
    assert a.iou_types == ["bbox", "segm"]
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for t in ("bbox", "segm"):
        assert [a.summary[t][k] for k in keys] == pytest.approx(list(_cocoeval_stats(gt, results, t)), abs=1e-12)
    # each detection (score >= 0.5) and each object is counted once in the confusion matrix
    cm = a.confusion["bbox"]
    assert cm[:-1].sum(axis=1).tolist() == [sum(1 for x in gt["annotations"] if x["category_id"] == c)
                                            for c in (1, 2, 3, 4)]
    assert cm[:, :-1].sum(axis=0).tolist() == [sum(1 for r in results if r["category_id"] == c and r["score"] >= 0.5)
                                               for c in (1, 2, 3, 4)]


# ------------------------------------------------------------------------------------------------- CLI
def _cli(args, capsys):
    rc = report_main([str(x) for x in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _spec(ann, images):
    return f"tiny={ann}:{images}"


def test_cli_writes_report_and_refuses_bad_input(tmp_path, capsys):
    ann, images, run = _write_case(str(tmp_path))
    rc, out, err = _cli([run, "--dataset", _spec(ann, images)], capsys)
    assert rc == 0, err
    report = os.path.join(run, "report")
    page = open(os.path.join(report, "index.html")).read()
    assert "Error breakdown" in page and "Confusion matrix" in page and "http" not in page.replace(
        "http-equiv", "")  # nothing fetched from the network
    numbers = json.load(open(os.path.join(report, "report.json")))
    assert numbers["confusion"]["bbox"]["rows_ground_truth"][1] == [1, 1, 0, 0]
    assert numbers["breakdown"]["bbox"]["per_class"]["car"]["Loc"] == pytest.approx(R)
    before = sorted(os.listdir(report))
    other = str(tmp_path / "other.json")  # another dataset: the same pictures under other image ids
    with open(other, "w") as f:
        json.dump(dict(GT, images=[dict(im, id=im["id"] + 10) for im in GT["images"]], annotations=[]), f)

    bad_cases = [
        ([str(tmp_path / "missing_run")], "does not exist"),
        ([ann, "--dataset", _spec(ann, images), "--output", report], "annotation file"),
        ([run, "--dataset", f"other={other}:{images}", "--output", report], "another dataset"),
        ([str(tmp_path)], "no coco_instances_results.json"),
    ]
    for args, words in bad_cases:
        rc, out, err = _cli(args, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("ERROR: ") and words in lines[0], (args, err)
    assert sorted(os.listdir(report)) == before  # the earlier report is intact

    # a folder the tool did not write is kept unless --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, out, err = _cli([run, "--dataset", _spec(ann, images), "--output", mine], capsys)
    assert rc == 2 and err.startswith("ERROR: ") and "--overwrite" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    rc, out, err = _cli([run, "--dataset", _spec(ann, images), "--output", mine, "--overwrite"], capsys)
    assert rc == 0 and (mine / "index.html").exists() and not (mine / "notes.txt").exists()
    # its own report is replaced without asking
    rc, out, err = _cli([run, "--dataset", _spec(ann, images), "--output", mine], capsys)
    assert rc == 0, err


@pytest.mark.slow
def test_tool_script_bad_input_exit_status(tmp_path):
    """The script as a user runs it: an annotation file given as results -> exit 2, one ERROR line, last."""
    import subprocess
    import sys

    ann, images, _ = _write_case(str(tmp_path))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(repo, "tools", "eval_report.py"), ann, "--dataset",
                           _spec(ann, images)], capture_output=True, text=True, env=env, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
    assert proc.returncode == 2 and len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "annotation file" in errors[0] and not os.path.exists(os.path.join(str(tmp_path), "report"))


def test_cli_dataset_from_the_run_config(tmp_path, capsys):
    ann, images, run = _write_case(str(tmp_path))
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(f"DATASETS:\n  CUSTOM: ['{_spec(ann, images)}']\n  TEST: ['tiny']\n  TRAIN: ['tiny']\n")
    rc, out, err = _cli([os.path.join(run, "inference", "tiny", "coco_instances_results.json")], capsys)
    assert rc == 0, err
    assert os.path.isfile(os.path.join(run, "report", "index.html"))  # <run>/report found from the json's path
    assert "bbox AP 33.5" in out


def test_report_for_run_as_the_quickstart_calls_it(tmp_path, capsys):
    from pvt_d2.cli.eval_report import report_for_run

    ann, images, run = _write_case(str(tmp_path))
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(f"DATASETS:\n  CUSTOM: ['{_spec(ann, images)}']\n  TEST: ['tiny']\n")
    assert report_for_run(run) == os.path.join(run, "report", "index.html")
    assert report_for_run(run) == os.path.join(run, "report", "index.html")  # a second run replaces its own
    assert report_for_run(str(tmp_path / "nothing")) is None
    assert "warning: no evaluation report: " in capsys.readouterr().err


def test_quickstart_command_reads_its_overrides(monkeypatch, capsys):
    """``pvt-d2-quickstart`` / ``tools/quickstart.py`` call ``main()``: the overrides come from the command line
    (a bad key is refused before any training, so this takes no time)."""
    from pvt_d2.cli import quickstart

    monkeypatch.setattr("sys.argv", ["pvt-d2-quickstart", "SOLVER.NO_SUCH_KEY", "1"])
    monkeypatch.setattr(quickstart, "_run", lambda argv: 0)  # overrides ignored: no training, exit 0
    assert quickstart.main() == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err


def test_compare(tmp_path, capsys, dataset_root):
    ann, images, run_a = _write_case(str(tmp_path), name="run_a")
    # B finds car D and drops the background car: it disagrees with A on image 2 (D) and image 3 (one false less)
    dets_b = [d for d in DETS if d["bbox"] != [150, 150, 40, 40]] + [_det(2, 3, [100, 100, 40, 40], 0.7)]
    _, _, run_b = _write_case(str(tmp_path), dets=dets_b, name="run_b")
    out_dir = tmp_path / "a_vs_b"
    rc, out, err = _cli(["--compare", run_a, run_b, "--dataset", _spec(ann, images), "--output", out_dir], capsys)
    assert rc == 0, err
    for page in ("index.html", "a/index.html", "b/index.html"):
        assert (out_dir / page).is_file()
    cmp = json.load(open(out_dir / "comparison.json"))
    assert cmp["disagreements"] == [{"image_id": 2, "score": 1}, {"image_id": 3, "score": 1}]
    assert cmp["summary"]["bbox"]["B"]["AP"] > cmp["summary"]["bbox"]["A"]["AP"]
    assert (out_dir / "img" / "disagree_2.jpg").is_file()
    # two runs on different datasets are refused
    _, _, run_c = _write_case(str(tmp_path), name="run_c")
    with open(os.path.join(run_c, "config.yaml"), "w") as f:
        f.write("DATASETS:\n  TEST: ['synthetic_val']\n")
    with open(os.path.join(run_a, "config.yaml"), "w") as f:
        f.write(f"DATASETS:\n  CUSTOM: ['{_spec(ann, images)}']\n  TEST: ['tiny']\n")
    rc, out, err = _cli(["--compare", run_a, run_c, "--output", tmp_path / "x"], capsys)
    assert rc == 2 and err.startswith("ERROR: ") and "different datasets" in err


# --------------------------------------------------------------------------------------------- browser
def _browser():
    """A headless Chromium driven by selenium, or a skip (a failure under PVT_D2_REQUIRE_BROWSER=1)."""
    missing = [p for p in ("chromium", "chromedriver") if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"headless browser test needs {', '.join(missing)} (.ci/install_browser.sh installs them)"
        if os.environ.get("PVT_D2_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    return webdriver, Service


def _open_and_check(webdriver, service_cls, page: str, profile: str):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=service_cls(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get("file://" + page)
        driver.execute_script("document.querySelectorAll('details').forEach(function (d) { d.open = true; });")
        driver.execute_script("document.querySelector('table.sortable th').click();")  # the sorting script runs
        images = driver.execute_async_script("""
            var done = arguments[arguments.length - 1];
            var imgs = Array.prototype.slice.call(document.images);
            Promise.all(imgs.map(function (im) {
                return im.complete ? Promise.resolve() : new Promise(function (ok) { im.onload = im.onerror = ok; });
            })).then(function () {
                done(imgs.map(function (im) { return [im.getAttribute('src'), im.naturalWidth]; }));
            });""")
        logs = driver.get_log("browser")
        title = driver.title
    finally:
        driver.quit()
    return title, images, logs


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, capsys):
    webdriver, service = _browser()
    ann, images_dir, run_a = _write_case(str(tmp_path), name="run_a")
    _, _, run_b = _write_case(str(tmp_path), dets=DETS[:4], name="run_b")
    assert _cli([run_a, "--dataset", _spec(ann, images_dir)], capsys)[0] == 0
    assert _cli(["--compare", run_a, run_b, "--dataset", _spec(ann, images_dir), "--output", tmp_path / "cmp"],
                capsys)[0] == 0
    pages = [os.path.join(run_a, "report", "index.html"), str(tmp_path / "cmp" / "index.html"),
             str(tmp_path / "cmp" / "b" / "index.html")]
    for k, page in enumerate(pages):
        title, images, logs = _open_and_check(webdriver, service, page, str(tmp_path / f"profile{k}"))
        assert "report" in title.lower() or "comparison" in title.lower()
        referenced = {src for src, _ in images}
        assert len(images) >= (1 if k == 1 else 8), images  # the comparison page shows the disagreements only
        assert [src for src, width in images if not width] == [], f"images that did not load in {page}"
        on_disk = {os.path.relpath(os.path.join(d, f), os.path.dirname(page))
                   for d, _, files in os.walk(os.path.join(os.path.dirname(page), "img")) for f in files}
        assert on_disk <= referenced  # every picture written is shown
        assert [entry for entry in logs if entry.get("level") in ("SEVERE", "WARNING")] == []
