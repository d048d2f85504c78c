"""Draw the predictions saved by a COCO evaluation next to the ground truth.

    pvt-d2-visualize-results \\
        --input output/quickstart/inference/synthetic_val/coco_instances_results.json \\
        --output output/quickstart/vis_json

An evaluation (``pvt-d2-train --eval-only`` or the end of training)
writes ``<OUTPUT_DIR>/inference/<dataset>/coco_instances_results.json``. For
every image of the dataset this tool writes one image, the predictions
above ``--conf-threshold`` on the left and the ground truth on the right,
under the image's own file name. The dataset is taken from the path
(``inference/<dataset>/``) unless ``--dataset`` names it; ``--dataset
NAME=SPEC`` declares your own COCO json or VOC folder as the training tools do
(see ``pvt_d2/data/custom.py``).
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pvt_d2.data import DatasetError, DatasetNotFoundError, prepare_datasets
from pvt_d2.utils.output import OutputPathError, check_output_path
from pvt_d2.data.custom import register_dataset_spec


def predictions_to_instances(predictions: List[Dict], image_size, dataset_id_to_contiguous: Dict[int, int],
                             threshold: float):
    """COCO result entries of one image -> detectron2 ``Instances`` (boxes, classes, scores, masks)."""
    from detectron2.structures import Boxes, BoxMode, Instances

    kept = [p for p in predictions if p["score"] >= threshold]
    instances = Instances(image_size)
    boxes = np.array([p["bbox"] for p in kept], dtype=np.float64).reshape(-1, 4)
    instances.pred_boxes = Boxes(torch.as_tensor(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)))
    instances.scores = torch.tensor([float(p["score"]) for p in kept], dtype=torch.float32)
    instances.pred_classes = torch.tensor(
        [dataset_id_to_contiguous.get(p["category_id"], p["category_id"]) for p in kept], dtype=torch.int64)
    if kept and all("segmentation" in p for p in kept):
        from pycocotools import mask as mask_util

        masks = [mask_util.decode(p["segmentation"]) for p in kept]
        instances.pred_masks = torch.as_tensor(np.stack(masks).astype(bool))
    return instances


def _label(image: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner (white on a dark box)."""
    scale = max(0.35, min(image.shape[:2]) / 500)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(image, (0, 0), (tw + 6, th + base + 6), (0, 0, 0), thickness=-1)
    cv2.putText(image, text, (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def side_by_side(record: Dict, predictions: List[Dict], metadata, threshold: float) -> np.ndarray:
    """``[predictions | ground truth]`` for one dataset record, as an RGB image of ``H x 2W``."""
    from pvt_d2.data.mapper import read_image  # the reader of training and evaluation

    from pvt_d2.utils.visualize import draw_dataset_dict, draw_instances

    rgb = read_image(record["file_name"], format="RGB")
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", {})
    instances = predictions_to_instances(predictions, rgb.shape[:2], id_map, threshold)
    pred = draw_instances(rgb, instances, metadata, score_threshold=threshold)
    gt = draw_dataset_dict(rgb, record, metadata)
    pred = _label(np.ascontiguousarray(pred), f"prediction ({len(instances)})")
    gt = _label(np.ascontiguousarray(gt), f"ground truth ({len(record.get('annotations', []))})")
    return np.concatenate([pred, gt], axis=1)


def guess_dataset(json_path: str) -> str:
    """``.../inference/<dataset>/coco_instances_results.json`` -> ``<dataset>``."""
    return os.path.basename(os.path.dirname(os.path.abspath(json_path)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="coco_instances_results.json of an evaluation")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument("--dataset", help="registered dataset the predictions are for (default: the folder "
                                          "name, inference/<dataset>/), or your own as NAME=annotations.json:images "
                                          "(COCO json) or NAME=VOCfolder[:SPLIT] (Pascal VOC)")
    parser.add_argument("--conf-threshold", type=float, default=0.5, help="minimum score drawn (default 0.5)")
    parser.add_argument("--max-images", type=int, default=0, help="draw only the first N images (0 = all)")
    parser.add_argument("--overwrite", action="store_true", help="replace drawings that --output holds already")
    args = parser.parse_args(argv)

    from detectron2.data import DatasetCatalog, MetadataCatalog

    dataset = args.dataset or guess_dataset(args.input)
    try:
        if "=" in dataset:
            dataset = register_dataset_spec(dataset).name
        prepare_datasets([dataset])
    except KeyError as e:
        hint = "" if args.dataset else " (guessed from the path; pass --dataset)"
        print(f"ERROR: {e.args[0]}{hint}", file=sys.stderr)
        return 2
    except (DatasetNotFoundError, DatasetError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    try:
        with open(args.input) as f:
            predictions = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"ERROR: cannot read predictions {args.input}: {e}", file=sys.stderr)
        return 2
    by_image = defaultdict(list)
    for p in predictions:
        by_image[p["image_id"]].append(p)

    all_records = DatasetCatalog.get(dataset)  # also fills thing_dataset_id_to_contiguous_id
    metadata = MetadataCatalog.get(dataset)
    records = all_records[:args.max_images] if args.max_images > 0 else all_records
    unknown = set(by_image) - {r["image_id"] for r in all_records}
    if unknown:
        print(f"warning: {len(unknown)} image id(s) in the predictions are not in {dataset}", file=sys.stderr)
    targets = [os.path.join(args.output, os.path.basename(r["file_name"])) for r in records]
    try:  # before anything is drawn: the folder, and no earlier drawing replaced without --overwrite
        check_output_path(args.output, "dir", what="--output")
    except OutputPathError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.overwrite:
        print(f"ERROR: --output {args.output} holds {len(existing)} drawing(s) of these images already "
              f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace "
              f"them or choose another folder.", file=sys.stderr)
        return 2
    for record, target in tqdm(list(zip(records, targets)), desc="images", unit="img"):
        drawn = side_by_side(record, by_image.get(record["image_id"], []), metadata, args.conf_threshold)
        if not cv2.imwrite(target, drawn[:, :, ::-1]):
            print(f"ERROR: could not write {target}", file=sys.stderr)
            return 2
    print(f"{len(records)} images written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
