"""What both training commands (``pvt-d2-train`` and ``pvt-d2-lazy-train``) share, implemented once.

* :func:`run_command`: the process layout checked (``--num-gpus 0``, a
  rendezvous port in use), the run folder checked and locked, the run
  started in one process or launched in several, and every way it can end
  turned into one message: a user error (exit 2), SIGINT / SIGTERM (exit
  130 / 143, naming the last checkpoint and ``--resume``), a worker process
  that died or failed (naming the process and why; the others are stopped).
* :func:`run_worker`: the body of each worker process of a multi-process run.
* :func:`refuse_eval_without_weights`: ``--eval-only`` of a random model is refused.
* :func:`divergence_reported` / :func:`divergence_message`: a NaN/Inf loss ends
  in one paragraph whose advice (lower the learning rate, ``--resume``) works.
* :func:`snapshot_hyperparameters` / :func:`apply_config_after_resume`: on
  ``--resume`` the learning rate, weight decay and schedule of the *new*
  config are applied at the checkpoint's iteration (the checkpoint's optimizer
  and scheduler state would otherwise bring back the old ones), and every
  changed setting is logged with its old and new value.
"""
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch

__all__ = ["LaunchError", "NonFiniteLossError", "Terminated", "apply_config_after_resume", "changed_settings",
           "check_launch_args", "divergence_message", "divergence_reported", "interrupted_message",
           "refuse_eval_without_weights", "run_command", "run_worker", "snapshot_hyperparameters",
           "track_training"]

logger = logging.getLogger("pvt_d2")

#: Exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# How long the other processes wait before exiting on an error every process meets (the first one reports it).
QUIET_EXIT_DELAY_S = 5


class LaunchError(RuntimeError):
    """The processes of a run could not be started or one of them died; the message says which and why."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss (or the predictions) became NaN or infinite.

    ``all_processes`` is True when every process of a multi-process run
    raised it at the same iteration (the loss check), False when only this
    process did (non-finite predictions).
    """

    all_processes = False


class LossNotFiniteOnSomeProcess(FloatingPointError):
    """Raised by every process at once when any process has a non-finite loss."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received: raised like Ctrl-C's ``KeyboardInterrupt`` so that the run unwinds the same way."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises :class:`Terminated` (SIGINT already raises ``KeyboardInterrupt``), in the main thread."""
    with contextlib.suppress(ValueError):  # not the main thread: keep the default handlers
        signal.signal(signal.SIGTERM, _raise_terminated)


def _signum(error: BaseException) -> int:
    return getattr(error, "signum", signal.SIGINT)


# --------------------------------------------------------------------------- progress of the running trainer

_TRACKED: Dict[str, Any] = {"trainer": None}


def track_training(trainer) -> None:
    """Remember (weakly) the trainer of this process, so that an interruption can say at which iteration it
    stopped."""
    _TRACKED["trainer"] = weakref.ref(trainer) if trainer is not None else None


def _last_checkpoint(output_dir: str) -> Tuple[str, Optional[int]]:
    """``(path, iteration)`` of the checkpoint ``output_dir/last_checkpoint`` names, or ``("", None)``."""
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        return "", None
    path = os.path.join(output_dir, name)
    if not os.path.isfile(path):
        return "", None
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return path, (int(match.group(1)) + 1 if match else None)


def interrupted_message(signum: int, output_dir: str, *, evaluating: bool = False) -> str:
    """One line saying where an interrupted run stopped and how to continue it."""
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name
    if evaluating:
        return f"Interrupted by {name} during evaluation; nothing was written. Run the same command again."
    trainer = _TRACKED["trainer"]() if _TRACKED["trainer"] is not None else None
    at = ""
    if trainer is not None and getattr(trainer, "iter", None) is not None:
        at = f" at iteration {trainer.iter} of {trainer.max_iter}"
    path, iteration = _last_checkpoint(output_dir)
    if path:
        after = f" (after iteration {iteration})" if iteration is not None else ""
        how = (f"The last checkpoint is {path}{after}: run the same command with --resume to continue from it.")
    else:
        how = "No checkpoint was written yet: run the same command again to start over."
    return f"Training interrupted by {name}{at}. {how}"


# --------------------------------------------------------------------------- checks before any process starts


def check_launch_args(args) -> None:
    """Refuse a process layout that cannot start, before the config is even used.

    Raises:
        LaunchError: ``--num-gpus`` / ``--num-machines`` below 1, ``--machine-rank`` out of range, or a
            single-machine ``--dist-url`` whose port is already in use.
    """
    if args.num_gpus < 1:
        raise LaunchError(f"--num-gpus {args.num_gpus}: it is the number of processes per machine and must be at "
                          f"least 1 (one per GPU; on a machine without CUDA, CPU processes: use 1 for one process).")
    if args.num_machines < 1:
        raise LaunchError(f"--num-machines {args.num_machines}: must be at least 1.")
    if not 0 <= args.machine_rank < args.num_machines:
        raise LaunchError(f"--machine-rank {args.machine_rank} must be between 0 and --num-machines - 1 "
                          f"({args.num_machines - 1}).")
    if args.num_gpus * args.num_machines > 1 and args.num_machines == 1 and args.dist_url != "auto":
        host, port = _tcp_address(args.dist_url)
        if port is not None and host in ("127.0.0.1", "localhost") and not _port_free(host, port):
            raise LaunchError(_port_in_use_message(args.dist_url, port))


def _tcp_address(url: str) -> Tuple[str, Optional[int]]:
    parsed = urlparse(url)
    if parsed.scheme != "tcp":
        return "", None
    try:
        return parsed.hostname or "", parsed.port
    except ValueError:
        return "", None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _port_in_use_message(url: str, port: Optional[int]) -> str:
    return (f"The processes could not meet at --dist-url {url}: port {port} is in use (another run on this machine, "
            f"or another program). Pass --dist-url auto to pick a free port, or another port with --dist-url "
            f"tcp://127.0.0.1:PORT.")


def refuse_eval_without_weights(weights: str, *, can_resume: bool, key: str) -> None:
    """Refuse to evaluate a randomly initialised model.

    Args:
        weights: the weights to evaluate (``MODEL.WEIGHTS`` / ``train.init_checkpoint``).
        can_resume: ``--resume`` was given and the output folder has a checkpoint.
        key: the config key to name in the message.

    Raises:
        CheckpointError: neither weights nor a checkpoint to resume from.
    """
    from ..checkpoint import CheckpointError

    if not weights and not can_resume:
        raise CheckpointError(f"--eval-only needs trained weights: {key} is empty (and there is no checkpoint to "
                              f"--resume from in the output folder), so it would evaluate a randomly initialised "
                              f"model. Pass {key} path/to/model_final.pth.")


# --------------------------------------------------------------------------- divergence


class _HideDivergenceTraceback(logging.Filter):
    """Drop detectron2's "Exception during training" traceback for a divergence or a failed save (disk full);
    both are reported cleanly."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ..checkpoint import CheckpointError

        return not (record.exc_info and isinstance(record.exc_info[1], (FloatingPointError, CheckpointError)))


def _loss_terms(message: str) -> str:
    """``"loss_cls=nan, loss_box_reg=0.52"`` from detectron2's divergence message, or '' if it has none."""
    match = re.search(r"loss_dict = \{(.*)\}", message, re.S)
    if not match:
        return ""
    terms = re.findall(r"'(\w+)': (?:np\.float\d+\()?([^,)]+)\)?", match.group(1))
    return ", ".join(f"{name}={value.strip()}" for name, value in terms)


def divergence_message(error: BaseException, iteration: int, checkpointer, settings: Sequence[Tuple[str, Any]],
                       lr_key: str, clip_key: str) -> str:
    """The one-paragraph report of a diverged run.

    Args:
        error: detectron2's ``FloatingPointError``.
        iteration: the iteration that failed.
        checkpointer: the run's checkpointer (names the last checkpoint).
        settings: ``(key, value)`` pairs shown as the usual causes (learning rate, batch, warmup, AMP).
        lr_key: the learning-rate key the advice names.
        clip_key: the gradient-clipping key the advice names.
    """
    terms = _loss_terms(str(error))
    what = (f"the loss is not finite ({terms})" if terms
            else f"the model's outputs are not finite ({str(error).splitlines()[0]})")
    last = (f"the last checkpoint is {checkpointer.get_checkpoint_file()}"
            if checkpointer.has_checkpoint() else "no checkpoint was written yet")
    shown = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in settings)
    return (f"Training diverged at iteration {iteration}: {what}. Nothing after the last checkpoint was saved "
            f"({last}). Usual causes: a learning rate too high for the batch size, too short a warmup, fp16 "
            f"overflow with AMP, or bad annotations ({shown}). Lower the learning rate (e.g. {lr_key} "
            f"{_lowered(settings, lr_key)}) or enable {clip_key}, then start again (--resume continues from the "
            f"last checkpoint with the new value).")


def _lowered(settings, lr_key: str) -> str:
    lr = dict(settings).get(lr_key)
    return f"{lr / 10:g}" if isinstance(lr, (int, float)) and lr > 0 else "a tenth of it"


@contextlib.contextmanager
def divergence_reported(trainer, checkpointer, settings: Callable[[], Sequence[Tuple[str, Any]]], lr_key: str,
                        clip_key: str):
    """Around ``trainer.train()``: a NaN/Inf loss becomes :class:`NonFiniteLossError` with one paragraph.

    detectron2's own traceback of the divergence is kept out of the log.
    """
    loop_logger = logging.getLogger("detectron2.engine.train_loop")
    hide = _HideDivergenceTraceback()
    loop_logger.addFilter(hide)
    try:
        yield
    except FloatingPointError as e:
        message = divergence_message(e, trainer.iter, checkpointer, settings(), lr_key, clip_key)
        logger.error(message)
        error = NonFiniteLossError(message)
        error.all_processes = isinstance(e, LossNotFiniteOnSomeProcess)
        raise error from e
    finally:
        loop_logger.removeFilter(hide)


# --------------------------------------------------------------------------- resume with a changed config


def snapshot_hyperparameters(optimizer) -> List[Dict[str, Any]]:
    """The hyperparameters (everything but the parameters) of each of ``optimizer``'s groups, as built from
    the config, to be re-applied after a checkpoint's optimizer state is loaded."""
    groups = []
    for group in optimizer.param_groups:
        fresh = {k: v for k, v in group.items() if k != "params"}
        fresh.setdefault("initial_lr", fresh["lr"])
        groups.append(fresh)
    return groups


def apply_config_after_resume(optimizer, snapshot: List[Dict[str, Any]], scheduler=None) -> None:
    """Put the config's hyperparameters back after a resume loaded the checkpoint's (keeping momentum etc.).

    The optimizer's per-parameter state (moments, momentum buffers) stays the
    checkpoint's; its groups' learning rate, weight decay and the like become
    the new config's. With a ``scheduler`` already loaded from the checkpoint
    (its ``last_epoch`` is the checkpoint's iteration), its base learning rates
    become the new ones and the current learning rate is recomputed from the
    new schedule at that iteration. Without one (a scheduler still to be built
    from ``initial_lr``, as detectron2's ``LRScheduler`` hook does) the
    ``initial_lr`` of each group is the new base learning rate.
    """
    if len(snapshot) != len(optimizer.param_groups):
        return  # torch's load_state_dict has refused such a checkpoint already
    for group, fresh in zip(optimizer.param_groups, snapshot):
        group.update(fresh)
    if scheduler is not None and isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.base_lrs = [fresh["initial_lr"] for fresh in snapshot]
        lrs = scheduler.get_lr()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)


def changed_settings(saved: Optional[Dict[str, Any]], current: Dict[str, Any]) -> List[str]:
    """``"KEY old -> new"`` for each setting recorded in a checkpoint that the new config changes."""
    if not isinstance(saved, dict):
        return []
    return [f"{k} {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]


def log_resume_changes(changes: List[str], iteration: int) -> None:
    """One log line listing the settings a resume applies from the new config."""
    if changes:
        logger.info(f"Resuming at iteration {iteration} with settings changed since the checkpoint, applied from the "
                    f"new config (the learning rate schedule is rebuilt at that iteration): {'; '.join(changes)}.")


# --------------------------------------------------------------------------- running the command


def _report(error: BaseException, rank: int = 0) -> None:
    print(f"ERROR{f' (process {rank})' if rank else ''}: {error}", file=sys.stderr, flush=True)


def run_worker(main: Callable, args, user_errors: tuple, shared_errors: tuple = ()) -> Any:
    """``main(args)`` in a worker process of a multi-process run.

    A user error ends the process with status 2, printed once (by the first
    process when every process meets it, otherwise by the process that did);
    SIGINT / SIGTERM end it quietly with 130 / 143 (the launching process
    reports the interruption).
    """
    from detectron2.utils import comm

    install_signal_handlers()
    try:
        return main(args)
    except user_errors as e:
        shared = isinstance(e, shared_errors) or getattr(e, "all_processes", False)
        if comm.get_rank() == 0 or not shared:
            _report(e, comm.get_rank())
        else:
            time.sleep(QUIET_EXIT_DELAY_S)  # launch stops everyone when one exits: let the first one report
        sys.exit(2)
    except KeyboardInterrupt as e:
        sys.exit(SIGNAL_EXIT.get(_signum(e), 130))


def _stop_children() -> None:
    """Stop the worker processes this process started (SIGTERM, then SIGKILL after 30 s)."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(Exception):
            child.terminate()
    deadline = time.time() + 30
    for child in children:
        child.join(max(0.1, deadline - time.time()))
        if child.is_alive():
            child.kill()
            child.join(5)


def _describe_worker_failure(error: BaseException, args, output_dir: str) -> Tuple[str, int]:
    """``(message, exit status)`` for a worker process that died or raised."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    world = args.num_gpus * args.num_machines
    rank = args.machine_rank * args.num_gpus + error.error_index
    who = f"Process {rank} of {world} (pid {error.error_pid})"
    path, _ = _last_checkpoint(output_dir)
    resume = (f" The last checkpoint is {path}: fix the cause and run the same command with --resume."
              if path else "")
    if isinstance(error, ProcessExitedException):
        if error.exit_code in (130, 143):
            signum = signal.SIGINT if error.exit_code == 130 else signal.SIGTERM
            return (f"{who} was stopped by {signal.Signals(signum).name}; the other processes were stopped."
                    f"{resume}"), error.exit_code
        if error.signal_name:
            why = f"was killed by {error.signal_name}"
            if error.signal_name == "SIGKILL":
                why += " (often the system running out of memory)"
        else:
            why = f"exited with status {error.exit_code}"
        return f"{who} {why}; the other processes were stopped.{resume}", 1
    text = str(error.msg) if isinstance(error, ProcessRaisedException) else str(error)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return _port_in_use_message(args.dist_url, _tcp_address(args.dist_url)[1]), 2
    if "DistNetworkError" in text or "Connection refused" in text or "timed out" in text.lower():
        return (f"{who} could not connect to the other processes at --dist-url {args.dist_url} (is the first "
                f"machine running and the address reachable? On one machine use --dist-url auto)."), 2
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "an error"
    saved = ""
    if output_dir and os.path.isdir(output_dir):
        saved_path = os.path.join(output_dir, f"process_{rank}_error.txt")
        with contextlib.suppress(OSError), open(saved_path, "w") as f:
            f.write(text)
            saved = f" Its traceback is in {saved_path}."
    return f"{who} failed with {last}; the other processes were stopped.{saved}{resume}", 1


def run_command(args, check: Callable, main: Callable, worker: Callable, output_dir_of: Callable[[Any], str],
                user_errors: tuple) -> int:
    """Run a training command from its parsed ``args``; returns the exit status.

    Args:
        args: detectron2's parsed training arguments (``--num-gpus``, ``--eval-only``, ``--dist-url``, ...).
        check: ``check(args) -> cfg``, the checks made once before any process starts.
        main: ``main(args)``, the run in one process.
        worker: ``worker(args)``, the run in each process of a multi-process run (a module-level function
            calling :func:`run_worker`).
        output_dir_of: the run folder of a config.
        user_errors: exceptions whose message tells the user what to fix: one ``ERROR:`` line, exit 2.

    Exit status: 0 done, 2 a user error, 130 / 143 SIGINT / SIGTERM, 1 a worker process that failed.
    """
    previous = signal.getsignal(signal.SIGTERM)
    install_signal_handlers()
    try:
        return _run_command(args, check, main, worker, output_dir_of, user_errors)
    finally:
        with contextlib.suppress(ValueError, TypeError):  # the caller's handler again (e.g. a test runner's)
            signal.signal(signal.SIGTERM, previous)


def _run_command(args, check, main, worker, output_dir_of, user_errors) -> int:
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from ..utils.output import OutputPathError, check_output_path
    from .output_dir import OutputDirLock

    output_dir = ""
    try:
        check_launch_args(args)
        cfg = check(args)
        output_dir = output_dir_of(cfg)
        check_output_path(output_dir, kind="dir", what="the output folder")
        with OutputDirLock(output_dir, "evaluation" if args.eval_only else "training") \
                if args.machine_rank == 0 else contextlib.nullcontext():
            if args.num_gpus * args.num_machines > 1:
                from detectron2.engine import launch

                launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                       dist_url=args.dist_url, args=(args,))
            else:
                main(args)
    except user_errors + (LaunchError, OutputPathError) as e:
        _report(e)
        return 2
    except KeyboardInterrupt as e:
        _stop_children()
        print(f"STOPPED: {interrupted_message(_signum(e), output_dir, evaluating=args.eval_only)}",
              file=sys.stderr, flush=True)
        return SIGNAL_EXIT.get(_signum(e), 130)
    except (ProcessExitedException, ProcessRaisedException) as e:
        if isinstance(e, ProcessExitedException) and e.exit_code == 2:  # a worker printed its user error
            return 2
        message, status = _describe_worker_failure(e, args, output_dir)
        print(f"{'STOPPED' if status in (130, 143) else 'ERROR'}: {message}", file=sys.stderr, flush=True)
        return status
    return 0
