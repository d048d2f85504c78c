"""A detectron2 checkpointer whose files are never visible half-written.

It also loads defensively: a missing, truncated or corrupt file, a file whose
weights are NaN/Inf, or the checkpoint of another model raise
:class:`CheckpointError` naming the file instead of a bare assertion or, worse,
a model that silently keeps its random initialisation.
"""
import errno
import logging
import os
from collections.abc import Mapping
from typing import Any, Dict, Optional
from urllib.parse import parse_qs, urlparse

from detectron2.checkpoint import DetectionCheckpointer

from .finetune import reinitialise_class_heads
from .io import CheckpointError, atomic_torch_save, check_finite, load_checkpoint_file

__all__ = ["AtomicCheckpointer", "run_info_from_config"]

#: Entry of a saved checkpoint describing the run that wrote it (see :func:`run_info_from_config`).
RUN_INFO_KEY = "pvt_d2"

logger = logging.getLogger(__name__)

# Rows of the mismatch table written when a checkpoint loads only partly.
_TABLE_ROWS = 20


#: The training settings a checkpoint records, compared on ``--resume`` (changes are applied and logged).
RESUME_SETTINGS = ("SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.GAMMA", "SOLVER.LR_SCHEDULER_NAME",
                   "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_FACTOR", "SOLVER.IMS_PER_BATCH", "SOLVER.WEIGHT_DECAY",
                   "SOLVER.MOMENTUM", "SOLVER.OPTIMIZER", "SOLVER.BACKBONE_MULTIPLIER")


def _plain(value):
    """A config value as plain data (tuples as lists), safe for ``torch.load(weights_only=True)``."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def run_info_from_config(cfg) -> Dict[str, Any]:
    """What a checkpoint records about its run, and what loading it checks: architecture, detector,
    optimizer and schedule length, and the ``settings`` (:data:`RESUME_SETTINGS`) a resume compares."""
    info = {"meta_architecture": cfg.MODEL.META_ARCHITECTURE, "optimizer": str(cfg.SOLVER.get("OPTIMIZER", "SGD")),
            "max_iter": int(cfg.SOLVER.MAX_ITER)}
    if cfg.MODEL.BACKBONE.NAME.startswith("build_pvt_d2"):
        info["arch"] = cfg.MODEL.PVT_D2.ARCH
    settings = {}
    for key in RESUME_SETTINGS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            settings[key] = _plain(node)
    info["settings"] = settings
    return info


class AtomicCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` writing checkpoints and ``last_checkpoint`` atomically.

    A run killed while saving leaves the previous complete checkpoint (and the
    ``last_checkpoint`` pointer to it) untouched, so ``--resume`` always finds
    a loadable file.

    Loading (``MODEL.WEIGHTS``, or the last checkpoint on ``--resume``):

    * a local file that does not exist, cannot be read, or holds NaN/Inf
      weights raises :class:`CheckpointError` naming it;
    * a checkpoint sharing no tensor with the model (another architecture)
      raises :class:`CheckpointError`;
    * a partial match (e.g. fine-tuning with another number of classes) is
      loaded with a warning table of the skipped and missing tensors, unless
      the load is strict: always when resuming (the checkpoint must be of this
      very model), and when ``strict=True`` is given (evaluation), where any
      missing or mismatched tensor raises :class:`CheckpointError`;
    * every file is read by :func:`~pvt_d2.checkpoint.io.load_checkpoint_file`
      (never plain ``pickle`` / ``torch.load``): detectron2 model-zoo ``.pkl``
      files through the restricted unpickler, ``.pyth`` and everything else
      with ``torch.load(weights_only=True)`` or safetensors;
    * with ``run_info`` (:func:`run_info_from_config`), saved checkpoints
      record it; a strict load refuses a checkpoint recorded for another
      architecture (naming both), and a resume refuses one written with
      another optimizer or at an iteration the schedule has already passed.

    Saving: a full disk (``ENOSPC``) raises :class:`CheckpointError` naming the
    last good checkpoint, which is left as it was.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False,
                 run_info: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self.run_info = dict(run_info or {})
        self._strict_now = strict
        self._loading = ""
        #: the run info recorded in the last checkpoint loaded ({} if it had none)
        self.loaded_run_info: Dict[str, Any] = {}

    def resume_or_load(self, path: str, *, resume: bool = True):
        resuming = resume and self.has_checkpoint()
        self._strict_now = self.strict or resuming
        try:
            if resuming:
                last = self.get_checkpoint_file()
                self._loading = f"{last} (named by {os.path.join(self.save_dir, 'last_checkpoint')}, --resume)"
                return self.load(last)
            self._loading = f"{path} (MODEL.WEIGHTS)"
            return self.load(path, checkpointables=[])
        finally:
            self._strict_now = self.strict
            self._loading = ""

    def load(self, path: str, *args, **kwargs):
        what = self._loading or path
        if path and not urlparse(path).scheme and os.path.isdir(path):
            raise CheckpointError(f"Checkpoint {what} is a folder, not a checkpoint file: name the .pth / .pkl / "
                                  f".safetensors file inside it.")
        if path and not urlparse(path).scheme and not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint file not found: {what}. Check the path, or leave MODEL.WEIGHTS "
                                  f"empty to start from the initialisation.")
        try:
            return super().load(path, *args, **kwargs)
        except AssertionError as e:  # fvcore's "Checkpoint ... not found!" for paths resolved by PathManager
            raise CheckpointError(f"Cannot load checkpoint {what}: {e}") from None
        except OSError as e:  # a URL that cannot be downloaded now (urllib's URLError is an OSError)
            if not urlparse(path).scheme:
                raise
            reason = getattr(e, "reason", None) or e
            raise CheckpointError(f"Cannot download checkpoint {what}: {reason}. Check the address and the network, "
                                  f"or download the file yourself and give its local path.") from None
        finally:
            self._parsed_url_during_load = None  # detectron2 leaves it set after a failed load

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """Read ``filename`` safely, in the forms detectron2 accepts (model-zoo ``.pkl``, pycls ``.pyth``, torch)."""
        data = load_checkpoint_file(filename)
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{self._loading or filename} holds a {type(data).__name__}, not a checkpoint")
        data = dict(data)
        if filename.endswith(".pkl"):
            if "model" in data and "__author__" in data:  # detectron2 model zoo
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            weights = data.get("blobs", data)  # Caffe2 / Detectron1 model zoo
            if not isinstance(weights, Mapping):
                raise CheckpointError(f"{self._loading or filename} holds no weights")
            weights = {k: v for k, v in weights.items() if not k.endswith("_momentum")}
            return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            if not isinstance(data.get("model_state"), Mapping):
                raise CheckpointError(f"Cannot load .pyth file {self._loading or filename}: pycls checkpoints "
                                      f"must contain 'model_state'.")
            weights = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": weights, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in data:
            data = {"model": data}
        if self._parsed_url_during_load is not None:
            queries = parse_qs(self._parsed_url_during_load.query)
            if queries.pop("matching_heuristics", "False") == ["True"]:
                data["matching_heuristics"] = True
            if queries:
                raise CheckpointError(f"Unsupported query {queries} in {self._parsed_url_during_load.geturl()}")
        return data

    def _check_run_info(self, checkpoint) -> None:
        """Refuse a strict load of another architecture, and a resume that cannot continue."""
        saved = checkpoint.get(RUN_INFO_KEY)
        self.loaded_run_info = dict(saved) if isinstance(saved, Mapping) else {}
        if not isinstance(saved, Mapping) or not self.run_info:
            return
        where = self._loading or "(file)"
        ours, theirs = self.run_info.get("arch"), saved.get("arch")
        if ours and theirs and ours != theirs:
            message = (f"Checkpoint {where} holds a {theirs} model but the config builds {ours} "
                       f"(MODEL.PVT_D2.ARCH)")
            if self._strict_now:
                raise CheckpointError(f"{message}: its weights cannot be used. Use the config the checkpoint "
                                      f"was trained with, or set MODEL.PVT_D2.ARCH {theirs}.")
            logger.warning(f"{message}; only the tensors that match are loaded.")
        if "optimizer" not in self.checkpointables or "iteration" not in checkpoint:
            return  # not a resume
        if saved.get("optimizer") and self.run_info.get("optimizer") and \
                saved["optimizer"].upper() != self.run_info["optimizer"].upper():
            raise CheckpointError(
                f"Cannot resume from {where}: it was trained with SOLVER.OPTIMIZER {saved['optimizer']} but the "
                f"config says {self.run_info['optimizer']}; the optimizer state cannot continue. Resume with "
                f"SOLVER.OPTIMIZER {saved['optimizer']}, or start a new run (another OUTPUT_DIR, MODEL.WEIGHTS "
                f"{where.split(' ')[0]}).")
        max_iter = self.run_info.get("max_iter")
        if max_iter is not None and int(checkpoint["iteration"]) + 1 > max_iter:
            raise CheckpointError(
                f"Cannot resume from {where}: it is at iteration {int(checkpoint['iteration']) + 1} but "
                f"SOLVER.MAX_ITER = {max_iter}, so there is nothing left to train. Raise SOLVER.MAX_ITER above "
                f"{int(checkpoint['iteration']) + 1} to train longer, or evaluate it with --eval-only.")

    def _load_model(self, checkpoint):
        weights = checkpoint.get("model")
        if not isinstance(weights, Mapping) or not weights:
            raise CheckpointError(f"Checkpoint {self._loading or '(file)'} holds no model weights.")
        # only parameters are checked: buffers may hold -inf masks on purpose
        params = {k for k, _ in self.model.named_parameters()}
        check_finite(weights, self._loading or "(file)",
                     names={k for k in weights if k.replace("module.", "", 1) in params})
        self._check_run_info(checkpoint)
        # fine-tuning into other classes: class-dependent head layers start afresh (finetune.py)
        reinit = reinitialise_class_heads(self.model, weights) if not self._strict_now else None
        incompatible = super()._load_model(checkpoint)
        if reinit and reinit.rows:
            logger.warning(reinit.table(self._loading or "the checkpoint"))
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in reinit.keys]
        self._check_match(incompatible)
        return incompatible

    def _check_match(self, incompatible) -> None:
        """Raise or warn when the checkpoint does not cover the model."""
        model_keys = list(self.model.state_dict().keys())
        missing = set(incompatible.missing_keys)
        shapes = {k: (a, b) for k, a, b in incompatible.incorrect_shapes}
        loaded = [k for k in model_keys if k not in missing and k not in shapes]
        where = self._loading or "(file)"
        if not loaded:
            raise CheckpointError(
                f"Checkpoint {where} does not match this model at all: none of its {len(model_keys)} tensors "
                f"were found with the right name and shape (e.g. the checkpoint has "
                f"{', '.join(list(incompatible.unexpected_keys)[:3]) or 'no usable keys'}). "
                f"Is it the checkpoint of another architecture (MODEL.PVT_D2.ARCH) or detector?")
        if not missing and not shapes:
            return
        rows = [f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, (a, b) in shapes.items()]
        rows += [f"  {k}: not in the checkpoint" for k in model_keys if k in missing and k not in shapes]
        table = "\n".join(rows[:_TABLE_ROWS]) + (f"\n  ... and {len(rows) - _TABLE_ROWS} more"
                                                  if len(rows) > _TABLE_ROWS else "")
        summary = (f"Checkpoint {where} matches this model only partly: {len(loaded)} of {len(model_keys)} "
                   f"tensors loaded, {len(shapes)} skipped for a shape mismatch, "
                   f"{len(missing - set(shapes))} not in the checkpoint")
        if self._strict_now:
            raise CheckpointError(f"{summary}. A resumed or evaluated model must load completely; use the "
                                  f"checkpoint of this config (or a new OUTPUT_DIR).\n{table}")
        logger.warning(f"{summary} (left at their initial values):\n{table}")

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.run_info:
            data[RUN_INFO_KEY] = dict(self.run_info)
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        try:
            atomic_torch_save(data, save_file)
            self.tag_last_checkpoint(basename)
        except OSError as e:
            if not _is_disk_full(e):
                raise
            last = self.get_checkpoint_file() if self.has_checkpoint() else ""
            raise CheckpointError(
                f"The disk is full: checkpoint {save_file} could not be written and was not kept. "
                + (f"The last good checkpoint is still {last}: free some space and continue with --resume."
                   if last else "No checkpoint of this run was written yet: free some space and start again.")) \
                from None

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
        os.replace(tmp, path)


def _is_disk_full(error: BaseException) -> bool:
    """Whether a save failed because the disk (or the quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
