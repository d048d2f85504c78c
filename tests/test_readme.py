"""Every command block of README.md runs as written.

The ```bash blocks run in order, from the root of a copy of the checkout (so the
quickstart's outputs exist for the blocks after it and the checkout itself is
not written to), with this environment's commands on the PATH as after
``source .venv/bin/activate``; the ```python blocks run with this python. The
only changes are arguments appended to a command (:data:`APPENDED`) that make
it small: fewer iterations, no evaluation of a random-init detector. A README
command that fails fails this test.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

#: command start -> arguments appended to that command (never an edit of what the README says).
APPENDED = {
    "make quickstart": ' ARGS="SOLVER.MAX_ITER 20"',
    "make test": " PYTEST_ARGS=--collect-only",  # the suite itself runs in CI; here: it starts and collects
    "pvt-d2-train --config-file configs/retinanet_pvt_s.yaml": ' SOLVER.MAX_ITER 2 DATASETS.TEST "()"',
    "pvt-d2-benchmark ": " --iters 2 --warmup 1",
}


def readme_blocks(language: str):
    """The fenced blocks of README.md in ``language``, in order."""
    with open(README) as f:
        return re.findall(rf"^```{language}\n(.*?)^```", f.read(), re.S | re.M)


def with_appended(block: str) -> str:
    """``block`` with :data:`APPENDED` arguments added at the end of each matching command (before a comment)."""
    lines = block.splitlines()
    out, pending = [], None
    for line in lines:
        if pending is None:
            pending = next((extra for start, extra in APPENDED.items() if line.lstrip().startswith(start)), None)
        if pending is not None and not line.rstrip().endswith("\\"):
            code, hash_, comment = line.partition("  #")
            line = code.rstrip() + pending + (f"  #{comment}" if hash_ else "")
            pending = None
        out.append(line)
    return "\n".join(out) + "\n"


def test_readme_blocks_are_found_and_overrides_apply():
    bash = readme_blocks("bash")
    assert any("make quickstart" in b for b in bash) and any("pvt-d2-export" in b for b in bash)
    assert with_appended("make quickstart\nmake test\n") == \
        'make quickstart ARGS="SOLVER.MAX_ITER 20"\nmake test PYTEST_ARGS=--collect-only\n'
    assert with_appended("pvt-d2-benchmark --config-file X \\\n    --size 2x2  # a\n") == \
        "pvt-d2-benchmark --config-file X \\\n    --size 2x2 --iters 2 --warmup 1  # a\n"


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the quickstart, a few short trainings, the tools and two exports
def test_every_readme_command_block_runs(tmp_path):
    # the copy's install.sh must find this environment up to date (same stamp), or it would re-point the editable
    # install of pvt_d2 at the copy: bring the stamp up to date from the checkout itself first
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "DETECTRON2_DATASETS")}
    env.update(PVT_D2_VENV=sys.prefix, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],
               PVT_D2_NO_ONNX="1")
    install = subprocess.run(["bash", "install.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    copy = tmp_path / "checkout"
    for name in tracked.stdout.splitlines():
        src, dst = os.path.join(REPO, name), copy / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)
    for i, block in enumerate(readme_blocks("bash")):
        script = with_appended(block)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(copy), env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"README bash block {i + 1} failed:\n{script}\n{proc.stderr[-4000:]}"
        assert "[install] creating" not in proc.stdout and "(editable)" not in proc.stdout  # the env was reused
    for i, block in enumerate(readme_blocks("python")):
        proc = subprocess.run([sys.executable, "-c", block], cwd=str(copy), env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"README python block {i + 1} failed:\n{block}\n{proc.stderr[-4000:]}"
    assert (copy / "output" / "quickstart" / "model_final.pth").is_file()
    assert (copy / "output" / "export").is_dir()
