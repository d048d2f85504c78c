"""Convert an ImageNet checkpoint into a detectron2 ``MODEL.WEIGHTS`` file for a pvt_d2 backbone.

The input may be any supported family (PVT v1/v2, Twins, LeViT, GC ViT, ViP)
in its official repository's layout or in timm's, as ``.pth``, ``.pth.tar``,
``.bin`` or ``.safetensors``, possibly nested under ``model`` / ``state_dict``
/ ``model_ema``. Family, layout and variant are detected from the keys and
shapes (or forced with ``--arch`` / ``--layout``); the classifier is dropped;
the result is checked by loading it into the variant's backbone, which must
take every key (only modules that are new in the backbone may be missing).

Examples::

    pvt-d2-convert pvt_v2_b2.pth pvt_v2_b2_d2.pth
    pvt-d2-convert model.safetensors levit_128s_d2.pth --arch levit_128s --layout timm
    pvt-d2-train --config-file configs/retinanet_pvt_v2_b2.yaml MODEL.WEIGHTS pvt_v2_b2_d2.pth

The output keys are relative to the backbone and flagged with
``matching_heuristics``, so detectron2 maps them to ``backbone.bottom_up.*``
(FPN) or ``backbone.*`` (plain backbone). ``MODEL.PVT_D2.PRETRAINED`` accepts
the input file directly as well.

The input is read safely (``torch.load(weights_only=True)``, safetensors, or
the restricted unpickler for plain ``.pkl`` files: nothing in it can run) and
never written: an output that is the input file is refused (exit status 2),
and an existing output file is kept unless ``--force`` is given. A file that
cannot be converted (unreadable, of another model, or refused) ends with one
``ERROR:`` line and exit status 2, and nothing is written.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

from pvt_d2.checkpoint import CheckpointError, convert_checkpoint, load_converted, save_for_detectron2
from pvt_d2.modeling import create_backbone, list_architectures
from pvt_d2.utils.output import OutputPathError, check_output_path


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="ImageNet checkpoint (.pth, .pth.tar, .bin, .safetensors)")
    parser.add_argument("output", help="detectron2 weights file to write (.pth)")
    parser.add_argument("--arch", choices=list_architectures(), default=None,
                        help="variant the checkpoint must be (default: detected from its shapes)")
    parser.add_argument("--layout", choices=("official", "timm", "pvt_d2"), default=None,
                        help="key layout of the input (default: detected from its keys)")
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace the output file if it exists (never the input)")
    parser.add_argument("--key", default=None,
                        help="entry holding the weights, e.g. model_ema (default: model, state_dict, ... or top level)")
    return parser.parse_args(argv)


def output_problem(input_path: str, output_path: str, force: bool) -> Optional[str]:
    """Why writing ``output_path`` would destroy a file of the user's, or None."""
    if os.path.exists(input_path) and os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        return (f"the output {output_path} is the input file: converting would replace the source checkpoint. "
                f"Give another output file name. Nothing was written.")
    if os.path.isdir(output_path):
        return f"the output {output_path} is a folder; give a file name such as {output_path}/model_d2.pth"
    if os.path.exists(output_path) and not force:
        return (f"the output {output_path} exists already and is kept; pass --force to replace it or choose another "
                f"file name. Nothing was written.")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("pvt_d2.convert_pretrained")
    problem = output_problem(args.input, args.output, args.force)
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 2
    try:  # an unwritable folder is refused before the conversion is done (a missing one is made to write)
        check_output_path(args.output, "file", overwrite=args.force, what="the output", flag="--force", create=False)
    except OutputPathError as e:
        print(f"ERROR: {e} Nothing was written.", file=sys.stderr)
        return 2
    try:
        converted = convert_checkpoint(args.input, arch=args.arch, layout=args.layout, key=args.key)
        if converted.arch is None:
            raise CheckpointError(
                f"{args.input}: after renaming from the {converted.layout} layout, its shapes match no registered "
                f"{converted.family} variant ({', '.join(list_architectures(converted.family))}); wrong --layout? "
                f"Pass --arch to see how it differs from one")
        report = load_converted(create_backbone(converted.arch), converted)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)  # checked writable above
        save_for_detectron2(converted, args.output)
    except CheckpointError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    log.info(f"{converted.arch}: {len(report.loaded)} tensors from the {converted.layout} layout "
             f"({len(report.dropped)} classifier keys dropped, {len(report.new)} new backbone keys left at init) "
             f"written to {args.output}\nUse it with: MODEL.PVT_D2.ARCH {converted.arch} MODEL.WEIGHTS {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
