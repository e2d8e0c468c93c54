"""Run lineage and mutual exclusion: one run id per `kedro run`, one run at a time per data folder.

* **Run id.** Kedro gives every versioned dataset of one run the same save version, the session
  id (a timestamp such as `2026-11-26T12.00.03.123Z`): that string *is* the run id. Each run
  also writes `<data_dir>/runs/<run id>.json`, its manifest: command, environment, pipelines,
  runtime parameters, git commit, start/end, status, and every dataset it loaded (with the
  version it got) and saved. A versioned output's folder name leads to its manifest.
* **Lock.** Two runs on one data folder would interleave versions: the second run's nodes
  would load the first run's newer outputs as "latest" and mix them with their own. So a run
  holds `<data_dir>/.rare-cxr.lock` (an `flock`, released by the kernel even on `kill -9`) from
  before its session is created to its end; a second run waits, saying who holds the lock.
  Runs of different environments use different data folders and run side by side.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rare_cxr.atomic import write_atomic_text
from rare_cxr.ownership import env_owner

logger = logging.getLogger(__name__)

LOCK_NAME = ".rare-cxr.lock"
RUNS_FOLDER = "runs"
# Locks this process holds, by data folder: a nested acquire (the CLI, then the session's
# hook) must not wait on itself.
_HELD: dict[Path, RunLock] = {}


def _now() -> str:
    """Local time with milliseconds and offset (run ids are millisecond timestamps too)."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def distributed_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0") or 0)


def data_dir_for(
    project_path: str | os.PathLike, env: str | None, conf_source: str | None = None
) -> Path:
    """The environment's `data_dir` global (see conf/<env>/globals.yml), made absolute."""
    from kedro.framework.project import settings

    project_path = Path(project_path)
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=conf_source or str(project_path / settings.CONF_SOURCE),
        env=env,
        **settings.CONFIG_LOADER_ARGS,
    )
    data_dir = Path(str(loader["globals"].get("data_dir", "data")))
    return data_dir if data_dir.is_absolute() else project_path / data_dir


class RunLock:
    """An exclusive `flock` on `<data_dir>/.rare-cxr.lock`; waits, announcing the holder."""

    def __init__(self, data_dir: str | os.PathLike, announce_every_s: float = 60.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.path = self.data_dir / LOCK_NAME
        self.announce_every_s = announce_every_s
        self._fd: int | None = None

    @classmethod
    def held(cls, data_dir: str | os.PathLike) -> RunLock | None:
        return _HELD.get(Path(data_dir).resolve())

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return (
            f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"`{info.get('command')}`"
        )

    def acquire(self, poll_s: float = 0.5) -> None:
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        waited_since, announced = time.monotonic(), 0.0
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - waited_since
                    if announced == 0.0 or waited - announced >= self.announce_every_s:
                        logger.warning(
                            "another kedro run is using %s (%s); waiting for it to finish "
                            "(waited %.0f s; Ctrl-C to give up — nothing of this run has "
                            "started yet)",
                            self.data_dir,
                            self._holder(),
                            waited,
                        )
                        announced = max(waited, 1e-9)
                    time.sleep(poll_s)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[self.data_dir] = self
        if time.monotonic() - waited_since > 1.0:
            logger.info("lock on %s acquired; this run starts now", self.data_dir)

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.pop(self.data_dir, None)
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _git_commit(project_path: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_path,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


class RunManifest:
    """`<data_dir>/runs/<run id>.json`, rewritten atomically as the run goes."""

    def __init__(self, data_dir: Path, run_params: dict[str, Any]) -> None:
        self.run_id = str(run_params["run_id"])
        self.path = Path(data_dir) / RUNS_FOLDER / f"{self.run_id}.json"
        project_path = Path(run_params.get("project_path") or ".")
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "status": "running",
            "env": env_owner(run_params.get("env")),
            "kedro_env": run_params.get("env") or "local (default)",
            "command": " ".join(sys.argv),
            "pipelines": run_params.get("pipeline_names") or ["__default__"],
            "namespaces": run_params.get("namespaces"),
            "tags": list(run_params.get("tags") or []),
            "runtime_params": run_params.get("runtime_params") or {},
            "load_versions": run_params.get("load_versions") or {},
            "project_path": str(project_path),
            "git_commit": _git_commit(project_path),
            "kedro_version": run_params.get("kedro_version"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "finished": None,
            "error": None,
            "loaded": {},
            "saved": {},
        }

    def write(self) -> None:
        text = json.dumps(self.record, indent=2, default=str) + "\n"
        write_atomic_text(self.path, text)

    def dataset(self, kind: str, name: str, version: str | None) -> None:
        self.record[kind][name] = version or "unversioned"

    def finish(self, error: BaseException | None = None) -> None:
        self.record["status"] = "failed" if error is not None else "completed"
        self.record["error"] = None if error is None else f"{type(error).__name__}: {error}"
        self.record["finished"] = _now()
        self.write()


def later_runs(data_dir: Path, run_id: str) -> list[str]:
    """Ids of runs recorded in `data_dir` that started after `run_id` (ids sort by time)."""
    folder = Path(data_dir) / RUNS_FOLDER
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.stem > run_id)
