"""Faults (issue 27): interruption, restarts, the CPU, odd image files, the LazyConfig path, output paths.

Each test names the catalogue entries of ``tests/test_reliability.py`` it
covers (84-...) and asserts the outcome (iteration reached, files unchanged by
md5, pixels the model saw), not only the exit status.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, REPO, tiny_train_cfg
from test_safety import DEMO_OPTS, QUICKSTART, TINY, md5, md5_tree

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
RETINANET = os.path.join(CONFIGS, "retinanet_pvt_v2_b0.yaml")
LAZY_QUICKSTART = os.path.join(CONFIGS, "lazy", "quickstart_pvt_v2_b0.py")
# the LazyConfig quickstart twin shrunk for a CPU run of a few iterations
TINY_LAZY = ["train.device=cpu", "train.max_iter=2", "train.eval_period=0", "train.checkpointer.period=1",
             "dataloader.train.num_workers=0", "dataloader.train.total_batch_size=2",
             "dataloader.test.num_workers=0", "model.backbone.bottom_up.pretrained=''", "dataloader.evaluator=null"]


def _env(dataset_root):
    return {**os.environ, "DETECTRON2_DATASETS": dataset_root, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def _errors(text, prefix="ERROR"):
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- interruption (84-89)


def _terminal_like_signals():
    """In the child, before it execs Python: SIGINT back to its default, as in a terminal. pytest-xdist workers
    ignore SIGINT and a child inherits that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(path, proc, log, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, open(log).read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear in time"
        time.sleep(0.05)


@pytest.mark.slow  # three short training runs in subprocesses
def test_sigint_and_sigterm_stop_with_one_line_and_resume_continues(dataset_root, tmp_path):
    """84-85. SIGINT (Ctrl-C) and SIGTERM during training: one STOPPED line naming the iteration, the last
    checkpoint and --resume; exit status 130 / 143; the lock released, no traceback; --resume then reaches
    SOLVER.MAX_ITER from that checkpoint."""
    from pvt_d2.checkpoint.io import load_checkpoint_file
    from pvt_d2.engine.output_dir import LOCK_NAME

    out = tmp_path / "run"
    args = [TRAIN_NET, "--config-file", RETINANET, *TINY, "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "2",
            "OUTPUT_DIR", str(out)]
    for resume, signum, status in [([], signal.SIGINT, 130), (["--resume"], signal.SIGTERM, 143)]:
        before = (out / "last_checkpoint").read_text() if resume else ""
        log = tmp_path / f"{signum}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, *args[:1], *resume, *args[1:]], stdout=f, stderr=f,
                                    env=_env(dataset_root), preexec_fn=_terminal_like_signals)
            try:
                deadline = time.time() + 300
                while not (out / "last_checkpoint").exists() or (out / "last_checkpoint").read_text() == before:
                    assert proc.poll() is None, open(log).read()[-3000:]
                    assert time.time() < deadline
                    time.sleep(0.05)
                proc.send_signal(signum)
                proc.wait(timeout=120)
            finally:
                proc.kill()
        text = log.read_text()
        assert proc.returncode == status, text[-3000:]
        stopped = _errors(text, "STOPPED")
        name = "SIGINT \\(Ctrl-C\\)" if signum == signal.SIGINT else "SIGTERM"
        assert len(stopped) == 1 and re.match(
            rf"STOPPED: Training interrupted by {name} at iteration \d+ of 40\. The last checkpoint is "
            rf"{re.escape(str(out))}/model_\d{{7}}\.pth \(after iteration \d+\): run the same command with --resume",
            stopped[0]), text[-3000:]
        assert "Traceback" not in text and not _errors(text)
        assert not (out / LOCK_NAME).exists()  # released
    last = (out / "last_checkpoint").read_text()
    start = load_checkpoint_file(str(out / last))["iteration"] + 1
    proc = subprocess.run([sys.executable, TRAIN_NET, "--resume", *args[1:]], capture_output=True, text=True,
                          timeout=600, env=_env(dataset_root))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"Starting training from iteration {start}" in proc.stdout + proc.stderr
    assert load_checkpoint_file(str(out / "model_final.pth"))["iteration"] == 39


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow  # two training processes
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the worker processes through /proc")
def test_two_process_run_whose_worker_is_killed_stops_with_one_message(dataset_root, tmp_path):
    """87. --num-gpus 2, one worker SIGKILLed (as the out-of-memory killer does): the other is stopped, one
    ERROR names the process, its pid and the signal, and the checkpoint to --resume from; exit 1; no worker
    left running, the lock released."""
    from pvt_d2.engine.output_dir import LOCK_NAME

    out = tmp_path / "run"
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, TRAIN_NET, "--num-gpus", "2", "--config-file", RETINANET, *TINY,
                                 "SOLVER.MAX_ITER", "400", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)],
                                stdout=f, stderr=f, env=_env(dataset_root))
        try:
            _wait_for(str(out / "last_checkpoint"), proc, log)
            workers = sorted(c for c in _children(proc.pid) if "spawn_main" in _cmdline(c))
            assert len(workers) == 2, [_cmdline(c) for c in _children(proc.pid)]
            os.kill(workers[-1], signal.SIGKILL)
            proc.wait(timeout=180)
        finally:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    errors = _errors(text)
    assert len(errors) == 1 and re.match(
        rf"ERROR: Process \d of 2 \(pid {workers[-1]}\) was killed by SIGKILL \(often the system running out of "
        rf"memory\); the other processes were stopped\. The last checkpoint is {re.escape(str(out))}/model_\d{{7}}"
        rf"\.pth: fix the cause and run the same command with --resume\.", errors[0]), text[-3000:]
    assert not any(os.path.exists(f"/proc/{w}") and "spawn_main" in _cmdline(w) for w in workers)
    assert not (out / LOCK_NAME).exists()


def test_interrupted_message_names_checkpoint_iteration_and_resume(tmp_path):
    """86. the interruption line: the trainer's iteration, the checkpoint last_checkpoint names, --resume; none
    yet: start again; during evaluation: nothing written."""
    from pvt_d2.engine import run

    class _Trainer:
        iter, max_iter = 17, 90

    trainer = _Trainer()
    run.track_training(trainer)
    try:
        assert run.interrupted_message(signal.SIGINT, str(tmp_path)) == (
            "Training interrupted by SIGINT (Ctrl-C) at iteration 17 of 90. No checkpoint was written yet: run the "
            "same command again to start over.")
        (tmp_path / "model_0000009.pth").write_bytes(b"x")
        (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
        assert run.interrupted_message(signal.SIGTERM, str(tmp_path)) == (
            f"Training interrupted by SIGTERM at iteration 17 of 90. The last checkpoint is "
            f"{tmp_path / 'model_0000009.pth'} (after iteration 10): run the same command with --resume to "
            f"continue from it.")
        assert "during evaluation" in run.interrupted_message(signal.SIGINT, str(tmp_path), evaluating=True)
    finally:
        run.track_training(None)


def test_worker_failures_name_the_process_and_why(tmp_path):
    """87. a multi-process run whose worker dies (SIGKILL), raises, or cannot bind the rendezvous port: one
    message naming the process (rank and pid) and why; the traceback of a failed worker is kept in a file."""
    from argparse import Namespace

    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from pvt_d2.engine.run import _describe_worker_failure

    args = Namespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="tcp://127.0.0.1:50123")
    (tmp_path / "model_0000003.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    killed = ProcessExitedException("x", error_index=1, error_pid=4242, exit_code=-9, signal_name="SIGKILL")
    message, status = _describe_worker_failure(killed, args, str(tmp_path))
    assert status == 1 and message.startswith("Process 1 of 2 (pid 4242) was killed by SIGKILL (often the system "
                                              "running out of memory); the other processes were stopped.")
    assert f"The last checkpoint is {tmp_path / 'model_0000003.pth'}" in message and "--resume" in message
    raised = ProcessRaisedException("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: boom\n",
                                    error_index=0, error_pid=4141)
    message, status = _describe_worker_failure(raised, args, str(tmp_path))
    assert status == 1 and message.startswith("Process 0 of 2 (pid 4141) failed with RuntimeError: CUDA error: boom")
    assert "CUDA error: boom" in (tmp_path / "process_0_error.txt").read_text()
    port = ProcessRaisedException("torch.distributed.DistNetworkError: The server socket has failed to listen "
                                  "on any local network address. port: 50123, useIpv6: false, code: -98, name: "
                                  "EADDRINUSE, message: address already in use", error_index=0, error_pid=1)
    message, status = _describe_worker_failure(port, args, str(tmp_path))
    assert status == 2 and "port 50123 is in use" in message and "--dist-url auto" in message


@pytest.mark.parametrize("script", ["train_net", "lazyconfig_train_net"])
def test_process_layout_and_port_are_checked_before_launch(script, tmp_path, capsys):
    """88. --num-gpus 0 (was ZeroDivisionError), --machine-rank out of range, a --dist-url port in use: one
    ERROR line, exit 2, no process started, nothing written; the same code for both training commands."""
    import importlib

    cli = importlib.import_module(f"pvt_d2.cli.{script}").cli
    config = ["--config-file", RETINANET if script == "train_net" else LAZY_QUICKSTART]
    out = tmp_path / "out"
    opts = ["OUTPUT_DIR", str(out)] if script == "train_net" else [f"train.output_dir={out}"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cases = {
            "--num-gpus 0": (["--num-gpus", "0"], r"--num-gpus 0: it is the number of processes per machine"),
            "--machine-rank": (["--num-machines", "2", "--machine-rank", "2"], r"--machine-rank 2 must be between"),
            "port": (["--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{port}"],
                     rf"port {port} is in use .* --dist-url auto"),
        }
        for name, (argv, pattern) in cases.items():
            assert cli([*config, *argv, *opts]) == 2, name
            err = capsys.readouterr().err
            assert len(_errors(err)) == 1 and re.search(pattern, _errors(err)[0]), (name, err)
            assert "Traceback" not in err
    assert not out.exists()


def test_unwritable_output_dir_is_one_error(dataset_root, tmp_path, capsys):
    """89. OUTPUT_DIR under a file, or read-only (was a PermissionError traceback): one ERROR line, exit 2, the
    file unchanged."""
    from pvt_d2.cli.train_net import cli

    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    digest = md5(blocker)
    assert cli(["--config-file", RETINANET, *TINY, "OUTPUT_DIR", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert _errors(err) == [f"ERROR: the output folder {blocker / 'run'}: {blocker} is a file, not a folder, so "
                            f"nothing can be written under it."], err
    assert md5(blocker) == digest
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "readonly"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert cli(["--config-file", RETINANET, *TINY, "OUTPUT_DIR", str(locked / "run")]) == 2
            assert "cannot create the folder" in capsys.readouterr().err
        finally:
            locked.chmod(0o700)


# --------------------------------------------------------------------------- restarts (90-92)


def _train(cfg, resume=False):
    from pvt_d2.engine import Trainer

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


@pytest.mark.slow  # trains a tiny detector (30-50 s on 2 cores)
@pytest.mark.usefixtures("dataset_root")
def test_divergence_advice_works_resume_with_a_lower_learning_rate(tmp_path, caplog):
    """90. The divergence message's advice as written: lower SOLVER.BASE_LR and --resume. The resumed
    optimizer runs at the new learning rate (not the checkpoint's), rebuilt at the checkpoint's iteration,
    the change is logged old -> new, and the run reaches SOLVER.MAX_ITER."""
    from pvt_d2.checkpoint.io import load_checkpoint_file
    from pvt_d2.engine.run import NonFiniteLossError
    from test_reliability import _diverge_at

    opts = ["SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "(3,)", "DATASETS.TEST", "()"]
    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), opts)
    cfg.freeze()
    trainer = _train(cfg)
    old_base = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    _diverge_at(trainer, 2, "loss")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "Lower the learning rate (e.g. SOLVER.BASE_LR 0.002)" in message and "--resume" in message
    assert load_checkpoint_file(str(tmp_path / "model_0000001.pth"))["iteration"] == 1

    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), opts + ["SOLVER.BASE_LR", "0.002",
                                                                             "SOLVER.MAX_ITER", "5"])
    cfg.freeze()
    with caplog.at_level("INFO", logger="pvt_d2"):
        trainer = _train(cfg, resume=True)
    assert trainer.start_iter == 2
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([lr / 10 for lr in old_base])  # every group
    assert [g["lr"] for g in groups] == pytest.approx([lr / 10 for lr in old_base])  # iteration 2: before the step
    assert trainer.scheduler.base_lrs == pytest.approx([lr / 10 for lr in old_base])
    changes = [r.getMessage() for r in caplog.records if "settings changed since the checkpoint" in r.getMessage()]
    assert len(changes) == 1 and "SOLVER.BASE_LR 0.02 -> 0.002" in changes[0] and "SOLVER.MAX_ITER 4 -> 5" in \
        changes[0], changes
    trainer.train()
    assert load_checkpoint_file(str(tmp_path / "model_final.pth"))["iteration"] == 4
    lrs = {m["iteration"]: m["lr"] for m in map(json.loads, open(tmp_path / "metrics.json")) if "lr" in m}
    assert lrs[4] == pytest.approx(0.002 * 0.1)  # the new base, after the step at 3 (the old one: 0.002)


@pytest.mark.slow  # trains a tiny detector (30-50 s on 2 cores)
@pytest.mark.usefixtures("dataset_root")
def test_resume_without_changes_continues_exactly(tmp_path):
    """91. a resume with the same config keeps the checkpoint's learning rate and optimizer state exactly
    (the new-config rebuild changes nothing then)."""
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2",
            "DATASETS.TEST", "()"]
    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), opts + ["SOLVER.MAX_ITER", "2"])
    cfg.freeze()
    first = _train(cfg)
    first.train()
    saved_lrs = [g["lr"] for g in first.optimizer.param_groups]
    saved_state = {k: v["exp_avg"].clone() for k, v in first.optimizer.state_dict()["state"].items()
                   if "exp_avg" in v}
    cfg = tiny_train_cfg("retinanet_pvt_v2_b0.yaml", str(tmp_path), opts)
    cfg.freeze()
    resumed = _train(cfg, resume=True)
    # the schedule of MAX_ITER 3 at iteration 2 (warmup over): the same as the old one at that point
    assert resumed.start_iter == 2
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(saved_lrs, rel=1e-6) or \
        [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
            [g["initial_lr"] * resumed.scheduler._multiplier(2 / 3) for g in resumed.optimizer.param_groups])
    state = resumed.optimizer.state_dict()["state"]
    assert saved_state and all(torch.equal(state[k]["exp_avg"], v) for k, v in saved_state.items())


# --------------------------------------------------------------------------- CPU whatever the config says (92-93)


def test_model_device_cpu_turns_amp_off_with_one_line():
    """92. MODEL.DEVICE cpu with SOLVER.AMP.ENABLED (every paper config): AMP off and one line saying so (was
    "AssertionError: [AMPTrainer] CUDA is required"); a CUDA config without CUDA: CPU and AMP off."""
    from pvt_d2.config import load_config
    from pvt_d2.engine import use_cpu_if_no_cuda

    cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b2.yaml"), ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.ENABLED
    cfg.freeze()
    note = use_cpu_if_no_cuda(cfg)
    assert note == "MODEL.DEVICE is cpu: AMP (SOLVER.AMP.ENABLED) needs CUDA, so it is off."
    assert cfg.MODEL.DEVICE == "cpu" and not cfg.SOLVER.AMP.ENABLED and cfg.is_frozen()
    assert use_cpu_if_no_cuda(cfg) == ""  # once
    if not torch.cuda.is_available():
        cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b2.yaml"), ["MODEL.DEVICE", "cuda"])
        assert use_cpu_if_no_cuda(cfg) == ("CUDA is not available: running on the CPU (MODEL.DEVICE=cpu) with AMP "
                                           "off.")


@pytest.mark.slow  # trains a tiny detector (30-50 s on 2 cores)
@pytest.mark.usefixtures("dataset_root")
def test_amp_config_trains_on_the_cpu_in_both_entry_points(tmp_path, capsys):
    """93. a config with AMP on and MODEL.DEVICE cpu trains to its last iteration with train_net and with the
    LazyConfig command (train.device=cpu train.amp.enabled=True), each logging the AMP line once."""
    from pvt_d2.checkpoint.io import load_checkpoint_file
    from pvt_d2.cli import lazyconfig_train_net, train_net

    out = tmp_path / "yaml"
    assert train_net.cli(["--config-file", RETINANET, *TINY, "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "1",
                          "OUTPUT_DIR", str(out)]) == 0, capsys.readouterr().err[-2000:]
    log = (out / "log.txt").read_text()
    assert log.count("MODEL.DEVICE is cpu: AMP (SOLVER.AMP.ENABLED) needs CUDA, so it is off.") == 1
    assert load_checkpoint_file(str(out / "model_final.pth"))["iteration"] == 0
    out = tmp_path / "lazy"
    assert lazyconfig_train_net.cli(["--config-file", LAZY_QUICKSTART, *TINY_LAZY, "train.max_iter=1",
                                     "train.amp.enabled=True", f"train.output_dir={out}"]) == 0, \
        capsys.readouterr().err[-2000:]
    log = (out / "log.txt").read_text()
    assert log.count("train.device is cpu: AMP (train.amp.enabled) needs CUDA, so it is off.") == 1
    assert load_checkpoint_file(str(out / "model_final.pth"))["iteration"] == 0


# --------------------------------------------------------------------------- one image reader (94-95)


def _image_kinds(folder):
    """One file per kind of image, with the RGB pixel the model must see for uniform ones (None: compared
    between the readers only)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    kinds = {
        "rgb8.png": (Image.fromarray(rgb), None),
        "gray8.png": (Image.fromarray(rgb).convert("L"), None),
        "palette.png": (Image.fromarray(rgb).convert("P"), None),
        "rgba.png": (Image.fromarray(np.dstack([np.full((30, 40, 3), (10, 20, 30), np.uint8),
                                                np.zeros((30, 40), np.uint8)])), (10, 20, 30)),
        "la.png": (Image.fromarray(rgb).convert("LA"), None),
        "cmyk.jpg": (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), None),
        "gray16.png": (Image.fromarray(np.full((30, 40), 30000, np.uint16)), (117, 117, 117)),
        "float.tif": (Image.fromarray(np.full((30, 40), 0.5, np.float32)), (128, 128, 128)),
        "int32.tif": (Image.fromarray(np.full((30, 40), 65535, np.int32)), (255, 255, 255)),
    }
    paths = {}
    for name, (image, expected) in kinds.items():
        path = os.path.join(folder, name)
        image.save(path)
        paths[name] = (path, expected)
    rotated = Image.fromarray(rgb)  # stored 40 wide, 30 high; EXIF orientation 6: shown rotated, 30 x 40
    exif = rotated.getexif()
    exif[0x0112] = 6
    path = os.path.join(folder, "exif_rotated.jpg")
    rotated.save(path, exif=exif)
    paths["exif_rotated.jpg"] = (path, None)
    return paths


def test_demo_and_data_loader_give_the_model_the_same_pixels(tmp_path):
    """94. 8/16-bit, grayscale, palette, RGBA, LA, CMYK, float and 32-bit TIFF, EXIF orientation: the demo and
    the evaluation data loader give the model the same array (was: a 16-bit PNG all white in the demo); the
    values are the expected ones (16-bit 30000 -> 117, float 0.5 -> 128, RGBA alpha dropped) and the EXIF
    rotation is applied."""
    from detectron2.structures import Boxes, Instances

    from pvt_d2.cli import demo
    from pvt_d2.config import load_config
    from pvt_d2.data import RobustDatasetMapper

    cfg = load_config(QUICKSTART, DEMO_OPTS)
    cfg.freeze()
    app = demo.Demo(cfg, 0.5)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, inputs):
            seen.append(inputs[0]["image"].clone())
            empty = Instances((inputs[0]["height"], inputs[0]["width"]), pred_boxes=Boxes(torch.zeros(0, 4)),
                              scores=torch.zeros(0), pred_classes=torch.zeros(0, dtype=torch.long))
            return [{"instances": empty}]

    app.predictor.model = Recorder()
    mapper = RobustDatasetMapper(cfg, False)
    for name, (path, expected) in _image_kinds(str(tmp_path)).items():
        app.run_image(path, str(tmp_path / f"drawn_{name}.png"))
        shown = seen.pop()
        with Image.open(path) as im:
            width, height = im.size
        if name.startswith("exif"):
            width, height = height, width
        loaded = mapper({"file_name": path, "height": height, "width": width, "image_id": 0})["image"]
        assert shown.dtype == torch.float32 and torch.equal(loaded.float(), shown), name
        assert (shown.shape[1] > shown.shape[2]) == name.startswith("exif"), name  # portrait only when rotated
        if expected is not None:
            fmt = cfg.INPUT.FORMAT
            pixel = expected if fmt == "RGB" else expected[::-1]
            assert shown.reshape(3, -1).unique(dim=1).T.tolist() == [list(map(float, pixel))], name


def test_visualizers_and_export_use_the_same_reader(tmp_path):
    """95. visualize_json_results draws a 16-bit image with its contrast and export's --sample-image reads
    the pixels the data loader reads (the one reader, pvt_d2.data.mapper.read_image)."""
    from pvt_d2.cli.export_model import sample_image
    from pvt_d2.cli.visualize_json_results import side_by_side
    from pvt_d2.config import load_config
    from pvt_d2.data.mapper import read_image

    paths = _image_kinds(str(tmp_path))
    path, _ = paths["gray16.png"]
    drawn = side_by_side({"file_name": path, "image_id": 1, "annotations": []}, [], {}, 0.5)
    assert drawn.shape[:2] == (30, 80)
    assert drawn[-1, 0].tolist() == drawn[-1, -1].tolist() == [117, 117, 117]  # both halves; not white (255)
    cfg = load_config(QUICKSTART, DEMO_OPTS)
    for name in ("float.tif", "cmyk.jpg", "exif_rotated.jpg"):
        path, _ = paths[name]
        image = sample_image(cfg, path, 0, 0)
        assert torch.equal(image, torch.as_tensor(read_image(path, cfg.INPUT.FORMAT).transpose(2, 0, 1).copy()
                                                  .astype("float32"))), name


# --------------------------------------------------------------------------- the LazyConfig path (96-99)


def test_lazy_eval_only_without_weights_is_refused(tmp_path, capsys):
    """96. pvt-d2-lazy-train --eval-only without train.init_checkpoint (was: a random model evaluated, exit 0):
    one ERROR naming train.init_checkpoint, exit 2."""
    from pvt_d2.cli.lazyconfig_train_net import cli

    assert cli(["--config-file", LAZY_QUICKSTART, "--eval-only", *TINY_LAZY, "train.init_checkpoint=''",
                f"train.output_dir={tmp_path}"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "--eval-only needs trained weights: train.init_checkpoint is empty" in err[0], err
    assert not list(tmp_path.glob("inference*"))


def test_lazy_outputs_follow_train_output_dir_and_unknown_keys_are_refused(tmp_path):
    """97. the evaluator writes under train.output_dir (was ./output/..., shared by every run); an override of
    a key the config lacks is refused naming the closest valid key (was: accepted, full schedule trained); an
    argument the lazy call takes but does not list yet, and +key, are accepted."""
    from pvt_d2.cli.lazyconfig_train_net import check_override_keys, load_lazy_config
    from pvt_d2.config import ConfigError

    cfg = load_lazy_config(LAZY_QUICKSTART, [f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.dataloader.evaluator.output_dir == str(tmp_path / "run" / "inference")
    cfg = load_lazy_config(LAZY_QUICKSTART, [f"train.output_dir={tmp_path}",
                                             f"dataloader.evaluator.output_dir={tmp_path / 'mine'}"])
    assert cfg.dataloader.evaluator.output_dir == str(tmp_path / "mine")
    for override, words in [("train.max_iters=2", "did you mean train.max_iter?"),
                            ("optimizer.learning_rate=0.1", "the LazyConfig has no optimizer.learning_rate"),
                            ("trian.max_iter=2", "did you mean train.max_iter?")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_override_keys(cfg, [override])
    with pytest.raises(ConfigError, match="set the key to null instead"):  # detectron2: NotImplementedError
        load_lazy_config(LAZY_QUICKSTART, ["~train.max_iter"])
    cfg = load_lazy_config(LAZY_QUICKSTART, ["model.backbone.bottom_up.drop_path_rate=0.2", "+train.note=hello"])
    assert cfg.model.backbone.bottom_up.drop_path_rate == 0.2 and cfg.train.note == "hello"


@pytest.mark.slow  # two short LazyConfig trainings
@pytest.mark.usefixtures("dataset_root")
def test_lazy_divergence_and_resume_with_a_new_learning_rate(tmp_path, capsys):
    """98-99. LazyConfig: a NaN loss is the same one paragraph as train_net's (naming optimizer.lr and
    --resume), not a traceback; --resume with a new optimizer.lr trains at that rate (metrics.json), logs
    the change, and reaches train.max_iter."""
    from pvt_d2.checkpoint.io import load_checkpoint_file
    from pvt_d2.cli.lazyconfig_train_net import cli

    out = tmp_path / "run"
    assert cli(["--config-file", LAZY_QUICKSTART, *TINY_LAZY, "optimizer.lr=1e30",
                f"train.output_dir={out}"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and re.match(r"ERROR: Training diverged at iteration \d+: the (loss is|model's outputs are) "
                                             r"not finite", err[0])
    assert "optimizer.lr = 1e+30" in err[0] and "--resume continues from the last checkpoint" in err[0]

    out = tmp_path / "ok"
    assert cli(["--config-file", LAZY_QUICKSTART, *TINY_LAZY, "optimizer.lr=0.0001", "lr_multiplier.warmup_length=0",
                f"train.output_dir={out}"]) == 0
    assert cli(["--config-file", LAZY_QUICKSTART, "--resume", *TINY_LAZY, "optimizer.lr=0.00002",
                "lr_multiplier.warmup_length=0", "train.max_iter=3", f"train.output_dir={out}"]) == 0
    log = (out / "log.txt").read_text()
    assert "optimizer.lr 0.0001 -> 2e-05" in log and "train.max_iter 2 -> 3" in log
    assert load_checkpoint_file(str(out / "model_final.pth"))["iteration"] == 2
    lrs = {m["iteration"]: m["lr"] for m in map(json.loads, open(out / "metrics.json")) if "lr" in m}
    assert lrs[2] == pytest.approx(0.00002, rel=0.5) and lrs[2] < 0.00005  # the new rate, not 1e-4


# --------------------------------------------------------------------------- output paths and weights (100-103)


def test_tools_check_their_output_path_before_the_work(tmp_path, capsys):
    """100. demo, export and convert: an --output under a file, or an existing folder / file of the wrong kind,
    is refused before any model is built (nothing computed then lost); a missing folder is created; nothing of
    the user's changes (md5)."""
    from pvt_d2.checkpoint import save_for_detectron2  # noqa: F401  (the converter's writer, imported early)
    from pvt_d2.cli import demo, export_model
    from pvt_d2.cli.convert_pretrained import main as convert_main
    from pvt_d2.modeling import create_backbone

    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(photo)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep")
    before = md5_tree(tmp_path)
    rc = demo.main(["--config-file", QUICKSTART, "--input", str(photo), "--output", str(blocker / "drawn"),
                    "--opts", *DEMO_OPTS])
    err = capsys.readouterr().err
    assert rc == 2 and f"{blocker} is a file, not a folder" in err and "Nothing was written" in err, err
    rc = export_model.main(["--config-file", QUICKSTART, "--format", "torchscript", "--output", str(blocker),
                            "--opts", *DEMO_OPTS])
    err = capsys.readouterr().err
    assert rc == 2 and f"--output {blocker} is an existing file, not a folder" in err, err
    assert md5_tree(tmp_path) == before

    weights = tmp_path / "in.pth"
    torch.save(create_backbone("pvt_v2_b0").state_dict(), str(weights))
    before = md5_tree(tmp_path)
    assert convert_main([str(weights), str(blocker / "out.pth")]) == 2
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    assert md5_tree(tmp_path) == before
    assert convert_main([str(weights), str(tmp_path / "new" / "deep" / "out.pth")]) == 0  # folders created
    assert (tmp_path / "new" / "deep" / "out.pth").stat().st_size > 0 and md5(weights) == before["in.pth"]


def test_visualizer_keeps_earlier_drawings_unless_overwrite(dataset_root, tmp_path, capsys):
    """101. visualize_json_results into a folder holding its earlier drawings: refused (md5 unchanged) unless
    --overwrite."""
    from pvt_d2.cli.visualize_json_results import main as visualize

    predictions = tmp_path / "inference" / "synthetic_val" / "coco_instances_results.json"
    predictions.parent.mkdir(parents=True)
    predictions.write_text("[]")
    out = tmp_path / "drawn"
    assert visualize(["--input", str(predictions), "--output", str(out), "--max-images", "2"]) == 0
    before = md5_tree(out)
    assert len(before) == 2
    assert visualize(["--input", str(predictions), "--output", str(out), "--max-images", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 drawing(s) of these images already" in err and "--overwrite" in err
    assert md5_tree(out) == before
    assert visualize(["--input", str(predictions), "--output", str(out), "--max-images", "2", "--overwrite"]) == 0


def test_every_weights_source_fails_with_one_line(tmp_path):
    """102. MODEL.WEIGHTS / MODEL.PVT_D2.PRETRAINED as a malformed or empty safetensors file, a folder, an
    unreachable URL: CheckpointError naming the source (was a URLError traceback for MODEL.WEIGHTS URLs)."""
    from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError
    from pvt_d2.modeling import create_backbone

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(b"{broken json!!}").to_bytes(8, "little") + b"{broken json!!}")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = torch.nn.Linear(2, 2)
    for source, words in [(bad, "is corrupt"), (empty, "is empty"), (tmp_path, "is a folder, not a checkpoint"),
                          (f"http://127.0.0.1:{port}/model.pth", "Cannot download checkpoint http://127.0.0.1")]:
        with pytest.raises(CheckpointError, match=re.escape(words)):
            AtomicCheckpointer(model).resume_or_load(str(source), resume=False)
    for source in (bad, empty):
        with pytest.raises(CheckpointError, match=re.escape(str(source))):
            create_backbone("pvt_v2_b0", pretrained=str(source))
