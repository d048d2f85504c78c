"""Look at the training data: the annotations, or the augmented images the model is fed.

    pvt-d2-visualize-data --config-file configs/quickstart_pvt_v2_b0.yaml \\
        --source annotation --output output/vis_data/annotation --num-images 10
    pvt-d2-visualize-data --config-file configs/quickstart_pvt_v2_b0.yaml \\
        --source dataloader --output output/vis_data/dataloader --num-images 10

``--source annotation`` draws the ground truth of the config's training
datasets on the original images. ``--source dataloader`` draws the batches of
detectron2's training data loader, after resizing, flipping and any other
augmentation of the config (``INPUT.*``), at the size the model sees them.
Images are written under their own file names (a suffix is added when an
image appears again). ``--dataset NAME=SPEC`` (repeatable) draws your own COCO
json or Pascal VOC folder (see ``pvt_d2/data/custom.py``)::

    pvt-d2-visualize-data --config-file configs/faster_rcnn_pvt_v2_b0.yaml --source annotation \
        --dataset trees=data/trees/train.json:data/trees/images --output output/vis_trees
"""
import argparse
import os
import sys

import cv2
from tqdm import tqdm

from pvt_d2.config import ConfigError, load_config
from pvt_d2.data import DatasetError, DatasetNotFoundError, prepare_datasets
from pvt_d2.data.custom import setup_custom_datasets
from pvt_d2.utils.output import OutputPathError, check_output_path


def _unique_path(out_dir: str, file_name: str, used: set) -> str:
    stem, ext = os.path.splitext(os.path.basename(file_name))
    name, k = f"{stem}{ext}", 1
    while name in used:
        name = f"{stem}_{k}{ext}"
        k += 1
    used.add(name)
    return os.path.join(out_dir, name)


def _existing_drawings(cfg, out_dir: str):
    """Files in ``out_dir`` that drawing the config's training images would replace."""
    from detectron2.data import DatasetCatalog

    names = {os.path.basename(r["file_name"]) for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)}
    return sorted(f for f in os.listdir(out_dir) if f in names)


def iter_annotations(cfg, limit: int):
    """``(file_name, rgb)`` of the training records with their ground truth drawn."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from pvt_d2.data.mapper import read_image  # the reader of training and evaluation

    from pvt_d2.utils.visualize import draw_dataset_dict

    count = 0
    for name in cfg.DATASETS.TRAIN:
        metadata = MetadataCatalog.get(name)
        for record in DatasetCatalog.get(name):
            if limit and count >= limit:
                return
            rgb = read_image(record["file_name"], format="RGB")
            yield record["file_name"], draw_dataset_dict(rgb, record, metadata)
            count += 1


def draw_training_sample(sample, input_format: str, metadata):
    """One data-loader dict (augmented ``image`` tensor and ``instances``) drawn as RGB."""
    from detectron2.data.detection_utils import convert_image_to_rgb
    from detectron2.utils.visualizer import Visualizer

    rgb = convert_image_to_rgb(sample["image"].permute(1, 2, 0).cpu().numpy(), input_format)
    vis = Visualizer(rgb, metadata)
    target = sample.get("instances")
    if target is None or len(target) == 0:
        return vis.output.get_image()
    classes = metadata.get("thing_classes", None)
    labels = [classes[i] if classes else str(i) for i in target.gt_classes.tolist()]
    return vis.overlay_instances(
        labels=labels,
        boxes=target.gt_boxes if target.has("gt_boxes") else None,
        masks=target.gt_masks if target.has("gt_masks") else None,
        keypoints=target.gt_keypoints if target.has("gt_keypoints") else None,
    ).get_image()


def iter_dataloader(cfg, limit: int):
    """``(file_name, rgb)`` of augmented training images, with their targets drawn."""
    from detectron2.data import MetadataCatalog, build_detection_train_loader

    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    count = 0
    for batch in build_detection_train_loader(cfg):
        for sample in batch:
            if count >= limit:
                return
            yield sample["file_name"], draw_training_sample(sample, cfg.INPUT.FORMAT, metadata)
            count += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--source", choices=["annotation", "dataloader"], required=True,
                        help="raw annotations, or the training data loader's augmented images")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument("--num-images", type=int, default=20,
                        help="how many images to draw (default 20; 0 = all, only for --source annotation)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                        help="your own dataset, NAME=annotations.json:images (COCO json) or NAME=VOCfolder[:SPLIT] "
                             "(Pascal VOC); drawn instead of DATASETS.TRAIN unless that names it (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace drawings of the same images that --output holds already")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.source == "dataloader" and args.num_images <= 0:
        parser.error("--source dataloader needs --num-images > 0 (the training loader never ends)")
    try:
        cfg = load_config(args.config_file, args.opts)
        declared = setup_custom_datasets(cfg, args.dataset, args.opts)
        if declared and not set(declared) & set(cfg.DATASETS.TRAIN):
            cfg.DATASETS.TRAIN = tuple(declared)  # draw the declared datasets
        cfg.freeze()
        prepare_datasets(cfg.DATASETS.TRAIN)
    except (ConfigError, DatasetNotFoundError, DatasetError, KeyError) as e:
        print(f"ERROR: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    try:  # before anything is drawn: the folder, and no earlier drawing replaced without --overwrite
        check_output_path(args.output, "dir", what="--output")
        existing = [] if args.overwrite else _existing_drawings(cfg, args.output)
    except OutputPathError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if existing:
        print(f"ERROR: --output {args.output} holds {len(existing)} drawing(s) of these images already "
              f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace "
              f"them or choose another folder.", file=sys.stderr)
        return 2
    source = iter_annotations if args.source == "annotation" else iter_dataloader
    used, written = set(), 0
    total = args.num_images or None
    for file_name, rgb in tqdm(source(cfg, args.num_images), total=total, desc=args.source, unit="img"):
        target = _unique_path(args.output, file_name, used)
        if not cv2.imwrite(target, rgb[:, :, ::-1]):
            print(f"ERROR: could not write {target}", file=sys.stderr)
            return 2
        written += 1
    print(f"{written} images written to {args.output}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
