"""A detectron2 checkpointer whose files are never visible half-written.

It also loads defensively: a missing, truncated or corrupt file, a file whose
weights are NaN/Inf, or the checkpoint of another model raise
:class:`CheckpointError` naming the file instead of a bare assertion or, worse,
a model that silently keeps its random initialisation.
"""
import logging
import os
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .finetune import reinitialise_class_heads
from .io import CheckpointError, atomic_torch_save, load_checkpoint_file

__all__ = ["AtomicCheckpointer"]

logger = logging.getLogger(__name__)

# Rows of the mismatch table written when a checkpoint loads only partly.
_TABLE_ROWS = 20


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
      missing or mismatched tensor raises :class:`CheckpointError`.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self._strict_now = strict
        self._loading = ""

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
        if path and not urlparse(path).scheme and not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint file not found: {what}. Check the path, or leave MODEL.WEIGHTS "
                                  f"empty to start from the initialisation.")
        try:
            return super().load(path, *args, **kwargs)
        except AssertionError as e:  # fvcore's "Checkpoint ... not found!" for paths resolved by PathManager
            raise CheckpointError(f"Cannot load checkpoint {what}: {e}") from None
        finally:
            self._parsed_url_during_load = None  # detectron2 leaves it set after a failed load

    def _torch_load(self, f: str):
        return load_checkpoint_file(f)

    def _load_model(self, checkpoint):
        weights = checkpoint.get("model")
        if not isinstance(weights, dict) or not weights:
            raise CheckpointError(f"Checkpoint {self._loading or '(file)'} holds no model weights.")
        params = dict(self.model.named_parameters())  # buffers may hold -inf masks on purpose
        bad = [k for k, v in weights.items() if k.replace("module.", "", 1) in params and isinstance(v, torch.Tensor)
               and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(
                f"Checkpoint {self._loading or '(file)'} has NaN or infinite values in {len(bad)} tensors "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): it was saved from a diverged run.")
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
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
        os.replace(tmp, path)
