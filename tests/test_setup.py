"""The set-up where users are: the Makefile runs the environment install.sh chose, also an activated one."""
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_dry_run(target, **env_vars):
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PVT_D2_VENV", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(env_vars)
    out = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    return [line.rstrip() for line in out.stdout.splitlines()]


@pytest.mark.parametrize("variables, python", [
    ({}, ".venv/bin/python"),
    ({"VIRTUAL_ENV": "/opt/my-venv"}, "/opt/my-venv/bin/python"),
    ({"CONDA_PREFIX": "/opt/conda/envs/det"}, "/opt/conda/envs/det/bin/python"),
    ({"VIRTUAL_ENV": "/opt/my-venv", "PVT_D2_VENV": "/data/env"}, "/data/env/bin/python"),
])
def test_make_runs_the_python_of_the_environment_install_sh_chose(variables, python):
    lines = _make_dry_run("quickstart", **variables)
    assert lines == ["bash install.sh", f"{python} tools/quickstart.py"]
    assert _make_dry_run("test", **variables)[-1].startswith(f"{python} -m pytest")


@pytest.mark.slow
def test_install_step_under_an_activated_virtualenv(tmp_path):
    """`source ENV/bin/activate && make install` installs pvt_d2 into ENV and the Makefile then runs ENV's python.

    The new environment sees this venv's packages through a .pth file (no multi-GB torch download), so
    install.sh keeps torch and detectron2 and installs pvt_d2 itself into it, as for a user's own environment.
    """
    env_dir = tmp_path / "user env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "outer_site.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PVT_D2_VENV", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env["PVT_D2_NO_ONNX"] = "1"
    script = f'source "{env_dir}/bin/activate" && make install && make -n quickstart'
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[install] torch==" not in proc.stdout  # the environment's own torch is used, nothing downloaded
    assert "[install] keeping existing detectron2" in proc.stdout
    assert "[install] ok: torch" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].rstrip() == f"{env_dir}/bin/python tools/quickstart.py"
    assert (env_dir / ".pvt_d2_install_stamp").is_file()
    check = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import pvt_d2, sys; print(pvt_d2.__file__)"],
                           cwd=str(tmp_path), capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith(REPO), check.stderr[-2000:]


@pytest.mark.slow
def test_pip_install_non_editable_then_train_from_another_folder(tmp_path):
    """`pip install <checkout>` (not editable) ships the configs and the commands: from another folder the model
    zoo finds ``retinanet_pvt_s.yaml`` and ``pvt-d2-train`` trains it for 2 iterations on the synthetic set."""
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "outer_site.pth"), "w") as f:  # torch, detectron2, ... of this venv
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", REPO],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = str(env_dir / "bin" / "python")
    found = subprocess.run([python, "-c", "from pvt_d2 import model_zoo; "
                            "print(model_zoo.get_config_file('retinanet_pvt_s.yaml'))"],
                           cwd=str(elsewhere), capture_output=True, text=True)
    path = found.stdout.strip()
    assert found.returncode == 0 and path.startswith(site) and os.path.isfile(path), found.stderr[-2000:]
    assert os.path.isfile(os.path.join(site, "pvt_d2", "model_zoo", "configs", "lazy", "retinanet_pvt_s.py"))
    env = dict(os.environ, PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", DETECTRON2_DATASETS="datasets")
    train = subprocess.run(
        ["pvt-d2-train", "--config-file", "retinanet_pvt_s.yaml", "DATASETS.TRAIN", "('synthetic_train',)",
         "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "4", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH",
         "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192", "MODEL.PVT_D2.PRETRAINED", "",
         "OUTPUT_DIR", "out"], cwd=str(elsewhere), env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert '"iteration": 1' in (elsewhere / "out" / "metrics.json").read_text()
    assert (elsewhere / "out" / "model_final.pth").is_file()
