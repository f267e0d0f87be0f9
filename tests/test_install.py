"""The first hour: ``scripts/install.sh`` and the Makefile as a fresh machine meets them.

- a half-made venv (an install that failed or was interrupted) is made
  again, and a failed install never leaves a venv that looks complete;
- a venv whose python is gone is reinstalled by ``make`` even when its
  stamp is newer than everything;
- ``pyproject.toml`` builds without setuptools' deprecation warnings;
- the README names every prerequisite that the install steps do not install.

These run the real script and the real make; pip is kept offline
(``PIP_NO_INDEX``), so the install fails fast at the point that matters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install.sh"


def offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    return {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_CONFIG_FILE": os.devnull}


def test_a_half_made_venv_is_made_again_and_a_failed_install_leaves_no_stamp(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3")  # what an interrupted install leaves
    (venv / "junk").write_text("from the failed attempt")
    proc = subprocess.run(["bash", str(INSTALL), "venv", str(venv)], cwd=REPO, env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "offline, installing fusepath's dependencies must fail"
    assert "half-made" in proc.stderr, proc.stderr
    assert not (venv / "junk").exists(), "the half-made venv was not made again"
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "pass"], timeout=60).returncode == 0
    assert not (venv / ".installed").exists(), "a failed install must not look complete"

    # A venv that works but was never completed (no stamp) is half-made too.
    (venv / "junk").write_text("again")
    proc = subprocess.run(["bash", str(INSTALL), "venv", str(venv)], cwd=REPO, env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert "half-made" in proc.stderr and not (venv / "junk").exists(), proc.stderr


def test_make_reinstalls_a_venv_whose_python_is_gone(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than pyproject.toml and install.sh
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), f"VENV={venv}", "test"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"scripts/install.sh venv {venv}" in dry.stdout, dry.stdout


def test_pyproject_has_no_deprecated_setuptools_configuration() -> None:
    """setuptools warns on every install that the `project.license` table stops working in 2027."""
    from setuptools.config.pyprojecttoml import apply_configuration  # a dev extra: missing is a failure
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_configuration(Distribution(), str(REPO / "pyproject.toml"))
    text = (REPO / "pyproject.toml").read_text()
    required = re.search(r'requires = \["setuptools>=(\d+)', text)
    assert required and int(required.group(1)) >= 77, "an SPDX `license` string needs setuptools >= 77"


def test_readme_names_every_prerequisite_install_sh_does_not_install() -> None:
    readme = (REPO / "README.md").read_text()
    line = next((l for l in readme.splitlines() if l.startswith("**Prerequisites")), "")
    for needed in ("make", "git", "python3", "3.11", "python3-venv", "root"):
        assert needed in line, f"README's prerequisites line does not name {needed!r}: {line!r}"
    script = INSTALL.read_text()
    for package in re.findall(r"\(([^)]*)\)", "\n".join(l for l in script.splitlines() if "_PACKAGES=(" in l)):
        for name in package.split():
            assert name in readme, f"README does not say that install.sh installs {name}"
    assert sys.version_info >= (3, 11)
