"""The GPU kit (issue 19, item 4): bench/gpu_kit.sh + bench/gpu_check.sh on a stock PyTorch image.

A GPU node often has a stock PyTorch image (torch, torchvision, numpy, pandas, scikit-learn, ...:
STOCK_IMAGE below) and no package index. bench/gpu_kit.sh downloads, elsewhere, the wheels the
project needs beyond that image (bench/gpu-kit.txt); bench/gpu_check.sh installs them with
`pip install --no-index --no-deps --target <tmp>` and runs against the image's own torch.

The end-to-end test simulates such an image honestly: a fresh virtual environment (no pip
install at all) whose only packages are symlinks to STOCK_IMAGE and their own dependencies
(read from the installed distributions' metadata) in this machine's environment. kedro,
pydantic, omegaconf, mlflow ... are provably absent there. As docs/benchmarks.md says, the kit
is built in the repository (for this interpreter's Python: the script's `--python-version`),
the repository is copied to the "node", and the check's CPU path runs there.

The kit is downloaded from the package index, as on a real build machine. Where no index is
reachable the test skips with the reason, except under CI=true, where it fails (conftest's rule
for what CI always has).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
KIT_LIST = ROOT / "bench" / "gpu-kit.txt"
LOCK = ROOT / "requirements-lock.txt"

# What a stock PyTorch GPU image holds (/work/shared/STACK-NOTES.md; pip is in every image);
# their own dependencies come along (stock_distributions).
STOCK_IMAGE = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "pillow",
    "onnx",
    "onnxruntime",
    "jinja2",
    "tqdm",
    "rich",
    "click",
    "pyyaml",
    "pytest",
    "pip",
)
# kedro's dependencies the kit leaves out on purpose (bench/gpu-kit.txt says why)
LEFT_OUT = {"build", "cookiecutter", "gitpython", "kedro-telemetry"}
# importable in the image only once the kit is installed
NEEDS_KIT = ("kedro", "kedro_datasets", "omegaconf", "pydantic", "pydantic_core", "dynaconf")
NEVER_NEEDED = ("mlflow", "kedro_viz", "pydicom")
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")


def kit_pins() -> dict[str, str]:
    pins = {}
    for line in KIT_LIST.read_text().splitlines():
        match = PIN.match(line.split("#", 1)[0].strip())
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _installed() -> dict[str, md.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}


def _requirements(dist: md.Distribution, extra: str = "") -> list[Requirement]:
    """The distribution's requirements that apply here, with `extra` selected (or none)."""
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None:
            if not extra:
                out.append(req)
        elif req.marker.evaluate({"extra": extra}):
            out.append(req)
    return out


def stock_distributions() -> set[str]:
    """STOCK_IMAGE and everything they require (extras they ask for included), by name."""
    installed = _installed()
    seen: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(name), "") for name in STOCK_IMAGE]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for req in _requirements(installed[name], extra):
            dep = canonicalize_name(req.name)
            todo += [(dep, ""), *((dep, e) for e in req.extras)]
    return {name for name, _ in seen}


def link_stock_image(folder: Path) -> set[str]:
    """Symlink the stock distributions' files (packages, modules, dist-info) into `folder`.

    A top-level folder that other distributions share (a namespace such as `google/`) is made
    for real and only the stock distributions' subfolders are linked into it."""
    installed, names = _installed(), stock_distributions()

    def entries(dist: md.Distribution) -> set[tuple[str, ...]]:
        return {Path(f).parts[:2] for f in dist.files or [] if not str(f).startswith("..")}

    owners: dict[str, set[str]] = defaultdict(set)
    for name, dist in installed.items():
        for parts in entries(dist):
            owners[parts[0]].add(name)
    links: set[tuple[str, ...]] = set()
    for name in names:
        for parts in entries(installed[name]):
            links.add(parts[:1] if len(parts) == 1 or owners[parts[0]] <= names else parts)
    site = Path(installed["torch"].locate_file(""))
    for parts in sorted(links):
        target = folder.joinpath(*parts)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(site.joinpath(*parts))
    return names


def make_stock_image(where: Path) -> Path:
    """A fresh venv (nothing pip-installed) seeing only the stock image's packages; its python."""
    venv, packages = where / "venv", where / "stock-site-packages"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    link_stock_image(packages)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "stock-image.pth").write_text(f"{packages}\n")
    return python


def image_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would reach its own packages."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def importable(python: Path, modules: tuple[str, ...], env: dict[str, str]) -> dict[str, str]:
    """module -> "ok" or the import error, as the image's interpreter sees it."""
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(m); out[m] = 'ok'\n"
        "    except ImportError as e:\n"
        "        out[m] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(python), "-c", script, *modules], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def copy_checkout(dest: Path) -> Path:
    """The repository as one copies it to a GPU node: its files (tracked, or new and not
    ignored), without the virtual environment."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if name.split("/")[0] == ".venv" or not source.is_file() or source.is_symlink():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
    return dest


# ---- the list ---------------------------------------------------------------------------------


def test_kit_pins_are_the_lock_files_versions():
    lock = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            lock[canonicalize_name(match[1])] = match[2]
    pins = kit_pins()
    assert len(pins) >= 10
    assert {name: lock.get(name) for name in pins} == pins
    assert not {"torch", "torchvision", "mlflow", "kedro-viz"} & set(pins)


def test_kit_closes_over_what_its_packages_require_beyond_the_stock_image():
    """Every requirement of a kit package is in the kit at a version it accepts, in the stock
    image, or left out on purpose (and said so in the list); nothing of the image is in it
    except typing-extensions, whose newer copy pydantic needs."""
    installed, pins, stock = _installed(), kit_pins(), stock_distributions()
    problems = []
    for name, version in pins.items():
        assert installed[name].version == version, f"{name}: installed here differs from the kit"
        for req in _requirements(installed[name]):
            dep = canonicalize_name(req.name)
            if dep in pins:
                if not req.specifier.contains(pins[dep], prereleases=True):
                    problems.append(f"{name} needs {req}, the kit pins {dep}=={pins[dep]}")
            elif dep not in stock and dep not in LEFT_OUT:
                problems.append(f"{name} needs {req}: neither in the kit nor in the stock image")
    assert problems == []
    assert set(pins) & stock == {"typing-extensions"}
    text = KIT_LIST.read_text()
    for name in LEFT_OUT | {"mlflow", "kedro-viz", "pydicom"}:
        assert name in text, f"{name}: the list must say why it is left out"


def test_gpu_kit_refuses_a_list_that_is_not_exact_pins(tmp_path):
    loose = tmp_path / "loose.txt"
    loose.write_text("kedro>=1.7\n")
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_kit.sh"), "--list", str(loose), "--dest", "kit"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "'kedro>=1.7' is not an exact pin" in done.stderr
    assert not (tmp_path / "kit").exists()


# ---- the kit on a simulated stock image -------------------------------------------------------


def build_kit(checkout: Path, python_version: str) -> subprocess.CompletedProcess[str]:
    """The documented command, `bash bench/gpu_kit.sh` (default destination bench/gpu-kit/),
    for `python_version`, in `checkout`."""
    # a dead index must fail in seconds, not after pip's default 5 retries of 180 s
    env = {**os.environ, "PYTHON": sys.executable, "PIP_DEFAULT_TIMEOUT": "30", "PIP_RETRIES": "1"}
    return subprocess.run(
        ["bash", "bench/gpu_kit.sh", "--python-version", python_version],
        cwd=checkout,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def index_reachable(where: Path) -> bool:
    """Can pip download the kit's first pin alone (no cache)? Tells a missing index apart from
    a broken script."""
    name, version = next(iter(kit_pins().items()))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir"]
        + ["--only-binary=:all:", "-d", str(where), f"{name}=={version}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_DEFAULT_TIMEOUT": "30", "PIP_RETRIES": "1"},
        timeout=300,
        check=False,
    )
    return done.returncode == 0


@pytest.mark.slow
def test_kit_makes_the_gpu_check_run_on_a_stock_image(tmp_path):
    from conftest import shared_data_missing

    python = make_stock_image(tmp_path / "image")
    env = image_env()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"

    # the simulated image: torch and friends (its own copies), none of what the kit brings
    before = importable(python, ("torch", "pandas", "sklearn", "onnxruntime", "pytest"), env)
    assert set(before.values()) == {"ok"}, before
    missing = importable(python, (*NEEDS_KIT, *NEVER_NEEDED, "rare_cxr"), env)
    assert all(v.startswith("ModuleNotFoundError") for v in missing.values()), missing

    # without a kit, the check stops at once and says what to do
    (tmp_path / "empty").mkdir()
    check = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--python", str(python)]
    refused = subprocess.run(
        [*check, "--kit", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        env={**env, "OUT": str(tmp_path / "refused")},
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "holds no wheel" in refused.stdout and "bench/gpu_kit.sh" in refused.stdout

    # as documented: the kit built in the repository (for this interpreter's Python; a stock
    # image's would be 3.12, the default), the repository with it copied to the node
    node = copy_checkout(tmp_path / "node")
    kit = node / "bench" / "gpu-kit"
    built = build_kit(node, version)
    if built.returncode != 0:
        if not index_reachable(tmp_path / "probe"):
            shared_data_missing("no package index reachable: bench/gpu_kit.sh cannot download")
        pytest.fail(f"bench/gpu_kit.sh failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}")
    wheels = sorted(kit.glob("*.whl"))
    assert len(wheels) == len(kit_pins())
    info = dict(line.split("=", 1) for line in (kit / "KIT-INFO").read_text().splitlines())
    assert info["python_version"] == version
    assert int(info["bytes"]) == sum(w.stat().st_size for w in wheels) <= 64 * 2**20
    size_line = re.search(r"kit: \d+ wheels, ([\d.]+) MiB in total \(limit 64 MiB\)", built.stdout)
    assert size_line, built.stdout[-2000:]
    print(f"GPU kit for Python {version}: {len(wheels)} wheels, {size_line[1]} MiB")

    # a kit for another Python is refused with the command that rebuilds it
    other = tmp_path / "other-kit"
    shutil.copytree(kit, other)
    (other / "KIT-INFO").write_text("python_version=3.99\n")
    wrong = subprocess.run(
        [*check, "--kit", str(other)],
        capture_output=True,
        text=True,
        env={**env, "OUT": str(tmp_path / "wrong")},
        timeout=120,
        check=False,
    )
    assert wrong.returncode == 2, wrong.stdout[-3000:]
    assert f"rebuild it with bash bench/gpu_kit.sh --python-version {version}" in wrong.stdout

    # the check's CPU path on the node, as documented: the image's python3 (first on PATH),
    # bench/gpu-kit/ found by default
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    path = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--python", "python3", "--cpu-smoke"],
        cwd=node,
        capture_output=True,
        text=True,
        env={**env, "PATH": path, "OUT": str(out), "TMPDIR": str(scratch)},
        timeout=600,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    stock = tmp_path / "image" / "stock-site-packages"
    kit_site = re.escape(str(scratch / "rare-cxr-gpu-kit.")) + r"\w+"
    assert f"installing the kit ({len(wheels)} wheels from {kit})" in log
    assert f"[gpu_check] torch {md.version('torch')} from {stock / 'torch'}" in log  # the image's
    for module in ("kedro", "pydantic", "omegaconf"):  # from the kit
        assert re.search(
            rf"\[gpu_check\] {module} {md.version(module)} from {kit_site}/{module}", log
        )
    assert f"rare_cxr (this checkout) from {node / 'src' / 'rare_cxr'}" in log
    assert "[gpu_check] mlflow absent" in log
    # (a) the gpu tests collected and skipped with their reason; (b) training steps on the CPU
    assert "SKIPPED" in log and "no CUDA device: the gpu tests need one" in log
    (row,) = [json.loads(line) for line in (out / "gpu_steps.jsonl").read_text().splitlines()]
    assert row["mode"] == "cpu" and row["steps"] == 12 and row["steady_images_per_s"] > 0
    # (c) the scripts of the benchmark suite start
    assert "bench/run_all.py and the 3 scripts it runs start" in log
    assert "[gpu_check] CPU path passed" in log
    assert (out / "gpu_check.log").read_text().count("CPU path passed") == 1

    # the kit went into a temporary folder, now gone; the image itself is unchanged
    assert not list(scratch.glob("rare-cxr-gpu-kit.*"))
    after = importable(python, NEEDS_KIT, env)
    assert all(v.startswith("ModuleNotFoundError") for v in after.values()), after
