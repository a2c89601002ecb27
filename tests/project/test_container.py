"""The ``Containerfile``: built with podman and the demo run in the image (slow).

No image registry is reachable here, so the base image is made on the spot, as the Containerfile's
default one would be: Debian bookworm with its Python 3.11, by ``debootstrap``, imported with
``podman import`` (kept between runs under ``BASE_IMAGE``). The build has no network either: the
wheels are built on the host into a wheelhouse that the build mounts (``PIP_OPTIONS``). The
runtime flags (``runc``, explicit ulimits) are what nested containers need on this machine: crun
refuses its hybrid cgroups, and the default ulimits exceed what the sandbox may set.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/dualwrite-test-base:bookworm"
#: Debian's packages the test needs, and how to get them (`.ci/run` installs them).
TOOLS = ("podman", "runc", "debootstrap")
INSTALL_HINT = "apt-get install -y podman runc debootstrap"
#: What nested containers need here (see the module docstring).
RUN_FLAGS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "none")

pytestmark = pytest.mark.slow


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``podman --runtime runc ARGS``; the test fails with its output when it fails."""
    result = subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"podman {args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def base_image(workdir: Path) -> str:
    """Debian bookworm with python3 and venv, as an image (made once, then reused)."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return BASE_IMAGE
    root = workdir / "rootfs"
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    archive = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True, timeout=300)
    podman("import", str(archive), BASE_IMAGE)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Containerfile built into an image of this run's own (removed afterwards)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)
    workdir = tmp_path_factory.mktemp("container")
    base = base_image(workdir)
    wheels = workdir / "wheels"
    # The project and its requirements, plus the build backend and what the image's Python
    # (bookworm's 3.11.2) needs beyond this interpreter's (redis wants async-timeout before 3.11.3).
    requirements = [f"{REPO}[demo]", "hatchling", "async-timeout>=4.0.3"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            *requirements,
        ],
        check=True,
        timeout=900,
    )
    tag = f"localhost/dualwrite-test:{uuid.uuid4().hex[:12]}"
    podman(
        "build",
        *RUN_FLAGS,
        "--volume",
        f"{wheels}:/wheels:ro",
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        "PIP_OPTIONS=--no-index --find-links /wheels",
        "--tag",
        tag,
        "--file",
        str(REPO / "Containerfile"),
        str(REPO),
        timeout=900,
    )
    yield tag
    subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, timeout=120)


def test_demo_runs_in_the_image(image):
    """``podman run IMAGE demo``: the whole dual write on the embedded Redis and stand-in, as
    the non-root user, ending with the report and what to try next."""
    result = podman("run", "--rm", *RUN_FLAGS, image, "demo", "--events", "60", timeout=600)
    assert "Try next:" in result.stdout, result.stdout
    assert "parity" in result.stdout
    user = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "id", image, "-u")
    assert user.stdout.strip() == "10001"


def test_default_command_is_the_proxy(image):
    """Without arguments the image runs ``dualwrite serve`` on 0.0.0.0:8080."""
    inspected = podman("image", "inspect", "--format", "{{json .Config.Cmd}}", image)
    assert inspected.stdout.strip() == '["serve","--host","0.0.0.0","--port","8080"]'
    version = podman("run", "--rm", *RUN_FLAGS, image, "--version")
    assert "dualwrite" in version.stdout
