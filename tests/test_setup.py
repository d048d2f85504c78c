"""The set-up where users are: the Makefile runs the environment install.sh chose, also an activated one."""
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_dry_run(target, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PVT_D2_VENV")}
    env.update(env_vars)
    out = subprocess.run(["make", "-n", target], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


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
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PVT_D2_VENV")}
    env["PVT_D2_NO_ONNX"] = "1"
    script = f'source "{env_dir}/bin/activate" && make install && make -n quickstart'
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[install] torch==" not in proc.stdout  # the environment's own torch is used, nothing downloaded
    assert "[install] keeping existing detectron2" in proc.stdout
    assert "[install] ok: torch" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"{env_dir}/bin/python tools/quickstart.py"
    assert (env_dir / ".pvt_d2_install_stamp").is_file()
    check = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import pvt_d2, sys; print(pvt_d2.__file__)"],
                           cwd=str(tmp_path), capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith(REPO), check.stderr[-2000:]
