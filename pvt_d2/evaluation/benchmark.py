"""Time the report on a large synthetic evaluation, without a model.

    python -m pvt_d2.evaluation.benchmark --images 5000 --dets 30 [--masks] [--classes 80] [--keep DIR]

Writes a split of the built-in synthetic shapes set with ``--images`` images
(pictures and COCO json, :func:`pvt_d2.data.synthetic.generate_split`), makes
detections for it with :func:`fake_results` (each object found, mislocalised,
confused with another class or missed at random, plus background detections
and duplicates up to ``--dets`` per image, scores that favour the good ones),
then runs ``pvt_d2.cli.eval_report`` on it and prints the seconds it took.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

__all__ = ["fake_results", "relabel", "main"]


def _jitter(rng: np.random.Generator, box, amount: float) -> List[float]:
    x, y, w, h = box
    dx, dy = rng.normal(0, amount * w), rng.normal(0, amount * h)
    sw, sh = np.exp(rng.normal(0, amount, size=2))
    return [float(x + dx), float(y + dy), float(max(1.0, w * sw)), float(max(1.0, h * sh))]


def _box_mask(box, height: int, width: int) -> Dict:
    from pycocotools import mask as mask_util

    x, y, w, h = box
    rle = mask_util.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)
    rle = mask_util.merge(rle)
    rle["counts"] = rle["counts"].decode("ascii")  # as detectron2 writes its json
    return rle


def fake_results(gt: Dict, *, seed: int = 0, dets_per_image: int = 30, masks: bool = False,
                 p_found: float = 0.7, p_loc: float = 0.1, p_cls: float = 0.08) -> List[Dict]:
    """COCO results for the COCO dict ``gt`` with errors of every kind, reproducible from ``seed``.

    Each object is found (small jitter, high score) with probability ``p_found``, mislocalised (large
    jitter) with ``p_loc``, detected as another class with ``p_cls``, else missed; every image is then
    filled up to ``dets_per_image`` with background boxes and duplicates of low score.
    """
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    by_image: Dict[int, list] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            by_image[a["image_id"]].append(a)
    out = []
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        dets = []
        for a in by_image[im["id"]]:
            u = rng.random()
            if u < p_found:
                dets.append((a["category_id"], _jitter(rng, a["bbox"], 0.04), rng.uniform(0.5, 1.0)))
            elif u < p_found + p_loc:
                dets.append((a["category_id"], _jitter(rng, a["bbox"], 0.35), rng.uniform(0.3, 0.9)))
            elif u < p_found + p_loc + p_cls:
                other = int(rng.choice([c for c in cats if c != a["category_id"]] or cats))
                dets.append((other, _jitter(rng, a["bbox"], 0.05), rng.uniform(0.3, 0.9)))
        while len(dets) < dets_per_image:
            if by_image[im["id"]] and rng.random() < 0.3:  # a duplicate near an object
                a = by_image[im["id"]][int(rng.integers(len(by_image[im["id"]])))]
                dets.append((int(rng.choice(cats)), _jitter(rng, a["bbox"], 0.2), rng.uniform(0.05, 0.5)))
            else:  # background
                bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
                box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)]
                dets.append((int(rng.choice(cats)), box, rng.uniform(0.05, 0.6)))
        for cat, box, score in dets:
            r = {"image_id": im["id"], "category_id": int(cat), "bbox": [round(v, 2) for v in box],
                 "score": round(float(score), 4)}
            if masks:
                r["segmentation"] = _box_mask(box, h, w)
            out.append(r)
    return out


def relabel(gt: Dict, num_classes: int, seed: int = 0) -> None:
    """Give ``gt`` ``num_classes`` categories (``class_<k>``, supercategory ``group_<k // 8>``) and each object
    one of them at random, in place."""
    rng = np.random.default_rng(seed)
    gt["categories"] = [{"id": k + 1, "name": f"class_{k + 1}", "supercategory": f"group_{k // 8}"}
                        for k in range(num_classes)]
    for a in gt["annotations"]:
        a["category_id"] = int(rng.integers(num_classes)) + 1


def main(argv=None) -> int:
    """Generate the set and the detections, time the report; prints the seconds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=30, help="detections per image")
    parser.add_argument("--masks", action="store_true", help="also mask results (adds the segm evaluation)")
    parser.add_argument("--classes", type=int, default=0,
                        help="relabel the objects at random into this many classes (80: COCO's count; "
                             "supercategories of 8 classes each); default: the set's 4 shapes")
    parser.add_argument("--keep", help="write everything here and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    from pvt_d2.cli.eval_report import main as report_main
    from pvt_d2.data.synthetic import generate_split

    root = args.keep or tempfile.mkdtemp(prefix="pvt_d2_report_bench_")
    try:
        t0 = time.time()
        json_file = generate_split(root, "bench", args.images, seed=123)
        with open(json_file) as f:
            gt = json.load(f)
        if args.classes:
            relabel(gt, args.classes)
            with open(json_file, "w") as f:
                json.dump(gt, f)
        results = fake_results(gt, dets_per_image=args.dets, masks=args.masks)
        run = os.path.join(root, "run", "inference", "bench")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "coco_instances_results.json"), "w") as f:
            json.dump(results, f)
        print(f"{args.images} images, {len(gt['annotations'])} objects, {len(results)} detections "
              f"written in {time.time() - t0:.0f} s", flush=True)
        t1, c1 = time.time(), time.process_time()
        rc = report_main([os.path.join(root, "run"), "--dataset", f"bench={json_file}:{os.path.join(root, 'bench')}",
                          "--overwrite"])
        seconds, cpu = time.time() - t1, time.process_time() - c1
        print(f"report on {args.images} images: {seconds:.1f} s wall, {cpu:.1f} s CPU (exit status {rc})")
        return rc
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
