"""The run folder (``OUTPUT_DIR``): never overwrite another run, never share it with a live run.

* :func:`check_output_dir`: a new training run refuses a folder that holds
  another run's checkpoints (``last_checkpoint``, ``model_*.pth``) unless it
  resumes that run (``--resume``) or the user asks to replace it
  (``--overwrite``).
* :class:`OutputDirLock`: a lock file (``OUTPUT_DIR/.pvt_d2.lock``, holding the
  host and process id) taken for the whole run; a second run on the same
  folder is refused while the first one lives. A lock left by a run that was
  killed (its process is gone) is detected and taken over, with a log line.
"""
import json
import logging
import os
import socket
import time
from typing import List, Optional

__all__ = ["OutputDirError", "run_files", "check_output_dir", "OutputDirLock", "LOCK_NAME"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".pvt_d2.lock"


class OutputDirError(RuntimeError):
    """``OUTPUT_DIR`` holds another run, or a live run is using it; the message says what to do."""


def run_files(output_dir: str) -> List[str]:
    """Checkpoint files of a run in ``output_dir`` (``last_checkpoint``, ``model_*.pth``), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(f for f in os.listdir(output_dir)
                  if f == "last_checkpoint" or (f.startswith("model_") and f.endswith(".pth")))


def check_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder holding another run's checkpoints.

    Raises:
        OutputDirError: naming the folder, its checkpoint files and the options.
    """
    found = run_files(output_dir)
    if not found or resume or overwrite:
        if found and overwrite and not resume:
            logger.warning(f"--overwrite: the checkpoints in {output_dir} ({', '.join(found[:4])}) will be replaced "
                           f"by this run.")
        return
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise OutputDirError(
        f"OUTPUT_DIR {output_dir} holds the checkpoints of another run ({shown}); a new run there would replace "
        f"them. Continue that run with --resume, choose another folder (OUTPUT_DIR path), or replace it on "
        f"purpose with --overwrite.")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputDirLock:
    """Hold ``OUTPUT_DIR/.pvt_d2.lock`` while a run uses the folder (a context manager).

    Args:
        output_dir: the run folder (created if needed).
        what: what the run is, for the lock file and messages.
    """

    def __init__(self, output_dir: str, what: str = "training"):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.what = what
        self._held = False

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale

    def acquire(self) -> "OutputDirLock":
        """Take the lock.

        Raises:
            OutputDirError: a live process holds it.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "what": self.what}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and (host != me["host"] or _process_alive(pid)):
                    raise OutputDirError(
                        f"OUTPUT_DIR {self.output_dir} is in use by another run ({owner.get('what', 'a run')}, "
                        f"process {pid} on {host}, started {owner.get('started', '?')}): two runs in one folder "
                        f"would mix their checkpoints, logs and metrics. Wait for it to finish or choose another "
                        f"OUTPUT_DIR. If that process is not running any more, delete {self.path}.") from None
                logger.warning(f"Taking over the stale lock {self.path} of process {pid} ({owner.get('what', '?')}, "
                               f"started {owner.get('started', '?')}), which is no longer running.")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise OutputDirError(f"Could not take the lock {self.path}: another run keeps creating it.")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self._held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                os.remove(self.path)
            self._held = False

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
