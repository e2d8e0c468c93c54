"""`make clean-data`: one environment's derived data goes; the raw data, unmarked folders, link
targets rare-cxr did not claim, other environments and running work are left alone.

Every folder below is set up as a run leaves it: `claim_data_dir` writes the environment marker
exactly as a `kedro run` does on its first start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rare_cxr.clean_data import CleanDataError, clean
from rare_cxr.ownership import ENV_MARKER, claim_data_dir, claim_linked_layers

ROOT = Path(__file__).resolve().parents[1]


def _derived(data_dir: Path, env: str | None) -> None:
    """What a run leaves: the marker, an image cache, a manifest."""
    claim_data_dir(data_dir, env)
    (data_dir / "05_model_input" / "image_cache").mkdir(parents=True, exist_ok=True)
    (data_dir / "05_model_input" / "image_cache" / "train.npy").write_bytes(b"x" * 1000)
    (data_dir / "runs").mkdir(exist_ok=True)
    (data_dir / "runs" / "2026.json").write_text("{}")


def _download(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Data_Entry_2017_v2020.csv").write_text("the user's download")
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / "00000001_000.png").write_bytes(b"\x89PNG the user's image")
    return folder


def _make(project: Path, *args: str, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "make",
            "-f",
            str(ROOT / "Makefile"),
            "clean-data",
            *args,
            f"BIN={Path(sys.executable).parent}",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        stdin=stdin,
    )


def test_clean_data_removes_derived_data_keeps_data_root_links_and_other_envs(
    kedro_project, tmp_path
):
    project = kedro_project.path
    base, nih = project / "data" / "base", project / "data" / "nih"
    _derived(base, None)
    phantom = base / "01_raw" / "phantom"  # base's data_root: the phantom, inside data_dir
    phantom.mkdir(parents=True)
    (phantom / "Data_Entry_2017_v2020.csv").write_text("phantom labels")
    (phantom / ".rare-cxr-phantom.json").write_text('{"owner": "rare-cxr phantom"}')
    elsewhere = _download(tmp_path / "someone-elses")
    (base / "07_model_output").rmdir()
    (base / "07_model_output").symlink_to(elsewhere, target_is_directory=True)
    _derived(nih, "nih")
    said: list[str] = []

    deleted = clean(project, "base", assume_yes=True, out=said.append)

    assert not (base / "05_model_input" / "image_cache").exists()
    assert not (base / "runs").exists()
    assert base / "runs" in deleted
    assert (base / ENV_MARKER).is_file()  # ownership stays: the folder is still base's
    assert (phantom / "Data_Entry_2017_v2020.csv").read_text() == "phantom labels"  # data_root
    assert (base / "07_model_output").is_symlink()  # an unmarked link: untouched, and said so
    assert (elsewhere / "Data_Entry_2017_v2020.csv").read_text() == "the user's download"
    assert any("07_model_output" in line and "did not mark" in line for line in said)
    assert any("phantom" in line and "data_root" in line for line in said)
    assert (nih / "runs" / "2026.json").exists()  # another environment is never touched
    assert clean(project, "base", assume_yes=True, out=said.append) == []


def test_clean_data_never_deletes_a_download_left_inside_data_dir(kedro_project):
    """The old default data_root of conf/nih was data/nih/01_raw, inside data_dir: verified in
    the review, `clean-data --env nih --yes` deleted the download. Now the default lies outside
    (data/nih-download), and a download found inside stops the cleaning."""
    project = kedro_project.path
    nih = project / "data" / "nih"
    _derived(nih, "nih")
    download = _download(nih / "01_raw")
    with pytest.raises(CleanDataError, match="looks like a raw NIH download") as refused:
        clean(project, "nih", assume_yes=True)
    assert "mv" in str(refused.value) and "data/nih-download" in str(refused.value)
    assert (download / "Data_Entry_2017_v2020.csv").read_text() == "the user's download"
    assert (nih / "runs" / "2026.json").exists()  # nothing at all was deleted

    # ... and with a configuration whose data_root is that folder, it is kept, the rest goes
    globals_yml = project / "conf" / "nih" / "globals.yml"
    globals_yml.write_text(
        globals_yml.read_text().replace(
            "data_root: data/nih-download", "data_root: data/nih/01_raw"
        )
    )
    said: list[str] = []
    clean(project, "nih", assume_yes=True, out=said.append)
    assert (download / "images" / "00000001_000.png").exists()
    assert not (nih / "runs").exists()


def test_clean_data_refuses_a_data_dir_inside_data_root(kedro_project, tmp_path):
    project = kedro_project.path
    download = _download(tmp_path / "nih")
    (project / "conf" / "nih" / "globals.yml").write_text(
        f"data_dir: {download / 'derived'}\ndata_root: {download}\nconfiguration: study\n"
    )
    _derived(download / "derived", "nih")
    with pytest.raises(CleanDataError, match="inside data_root"):
        clean(project, "nih", assume_yes=True)
    assert (download / "derived" / "runs" / "2026.json").exists()


def test_clean_data_through_symbolic_links_only_into_marked_targets(kedro_project, tmp_path):
    project = kedro_project.path
    base = project / "data" / "base"
    # data/base itself a link to a fast disk (the usual way): the target carries the marker
    fast = tmp_path / "fast-disk" / "rare-cxr-base"
    fast.mkdir(parents=True)
    for child in base.iterdir():
        child.rmdir()
    base.rmdir()
    base.symlink_to(fast, target_is_directory=True)
    _derived(base, None)
    # a layer folder on yet another disk, claimed by a run while it was empty
    cache_disk = tmp_path / "cache-disk"
    cache_disk.mkdir()
    (base / "06_models").symlink_to(cache_disk, target_is_directory=True)
    assert claim_linked_layers(base, None) == [cache_disk.resolve()]
    (cache_disk / "model.pt").write_text("a checkpoint")

    clean(project, "base", assume_yes=True, out=lambda _: None)
    assert base.is_symlink() and (fast / ENV_MARKER).is_file()
    assert not (fast / "runs").exists() and not (fast / "05_model_input").exists()
    assert (base / "06_models").is_symlink()  # the link stays, its marked target is emptied
    assert not (cache_disk / "model.pt").exists() and (cache_disk / ENV_MARKER).is_file()

    # a link whose target lacks the marker: refused, nothing deleted
    stranger = tmp_path / "stranger"
    _download(stranger)
    (stranger / "notes.txt").write_text("mine")
    base.unlink()
    base.symlink_to(stranger, target_is_directory=True)
    with pytest.raises(CleanDataError, match="does not carry the ownership marker"):
        clean(project, "base", assume_yes=True)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_clean_data_follows_conf_local_like_kedro_run(kedro_project):
    """`conf/local` moves data_dir: the default run writes there, so clean-data cleans there."""
    project = kedro_project
    (project.path / "conf" / "local" / "globals.yml").write_text(
        "data_dir: data/mine\ndata_root: data/mine-phantom\n"
    )
    project.write_local_params({"phantom.n_patients": 12, "phantom.image_size": 32})
    project.cli("run", "--pipelines", "phantom,data_processing")
    mine = project.path / "data" / "mine"
    assert (mine / "02_intermediate" / "labels.parquet").is_file()  # kedro run wrote here
    assert (project.path / "data" / "base" / "02_intermediate").is_dir()  # ... not here
    done = _make(project.path, "ENV=base", "YES=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (mine / "02_intermediate").exists() and (mine / ENV_MARKER).is_file()
    assert (project.path / "data" / "mine-phantom" / "Data_Entry_2017_v2020.csv").is_file()


def test_clean_data_holds_the_lock_while_it_asks_and_a_run_waits(kedro_project):
    """A `kedro run` started while clean-data asks waits for it, then runs on what is left."""
    project = kedro_project
    _derived(project.data(), None)
    project.write_local_params({"phantom.n_patients": 12, "phantom.image_size": 32})
    run_output: list[str] = []
    started: list[subprocess.Popen] = []

    def ask(question: str) -> str:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("kedro")), "run", "--pipelines", "phantom"],
            cwd=project.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "400"},
        )
        started.append(process)
        assert process.stdout is not None

        def read() -> None:
            run_output.extend(process.stdout)  # type: ignore[arg-type]

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not any("another kedro run is using" in line for line in run_output):
            assert process.poll() is None, "".join(run_output)[-3000:]
            assert time.monotonic() < deadline, "the run never waited for clean-data"
            time.sleep(0.1)
        assert not (project.data("01_raw", "phantom")).exists()  # it has not started
        return "y"

    deleted = clean(project.path, "base", assume_yes=False, ask=ask, out=lambda _: None)
    assert deleted and not project.data("runs", "2026.json").exists()
    (process,) = started
    assert process.wait(timeout=300) == 0, "".join(run_output)[-3000:]
    log = "".join(run_output)
    assert f"(pid {os.getpid()}: " in log  # it named who held the lock: this process
    assert project.data("01_raw", "phantom", "Data_Entry_2017_v2020.csv").is_file()


def test_clean_data_refuses_while_a_run_holds_the_lock(kedro_project):
    project = kedro_project.path
    _derived(project / "data" / "base", None)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from rare_cxr.runs import RunLock
                sys.argv = ["kedro", "run", "--pipelines", "training"]
                RunLock({str(project / "data" / "base")!r}).acquire()
                print("held", flush=True)
                time.sleep(120)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CleanDataError, match="kedro run is using") as refused:
            clean(project, "base", assume_yes=True)
        assert f"pid {holder.pid}" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    assert (project / "data" / "base" / "runs" / "2026.json").exists()
    assert clean(project, "base", assume_yes=True, out=lambda _: None)  # the holder died


def test_clean_data_asks_and_a_no_deletes_nothing(kedro_project):
    _derived(kedro_project.path / "data" / "base", None)
    kept = clean(kedro_project.path, "base", assume_yes=False, ask=lambda _: "n", out=print)
    assert kept == []
    assert (kedro_project.path / "data" / "base" / "runs" / "2026.json").exists()


def test_clean_data_refuses_a_folder_without_the_environment_marker(kedro_project):
    base = kedro_project.path / "data" / "base"
    (base / "runs").mkdir()
    (base / "runs" / "2026.json").write_text("{}")
    with pytest.raises(CleanDataError, match="ownership marker"):
        clean(kedro_project.path, "base", assume_yes=True)
    assert (base / "runs" / "2026.json").exists()


def test_make_clean_data_as_documented(kedro_project):
    """`make clean-data ENV=nih YES=1` (README) through make and the module's command line."""
    project = kedro_project.path
    _derived(project / "data" / "nih", "nih")
    _derived(project / "data" / "base", None)
    done = _make(project, "ENV=nih", "YES=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (project / "data" / "nih" / "runs").exists()
    assert (project / "data" / "base" / "runs" / "2026.json").exists()
    # without YES and without a terminal: refuses, deletes nothing
    again = project / "data" / "nih" / "x.txt"
    again.write_text("x")
    done = _make(project, "ENV=nih", stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "pass --yes" in done.stderr
    assert again.exists()
