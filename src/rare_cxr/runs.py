"""Run lineage and mutual exclusion: one run id per `kedro run`, one run at a time per data folder.

* **Run id.** Kedro gives every versioned dataset of one run the same save version, the session
  id (a timestamp such as `2026-11-26T12.00.03.123Z`): that string *is* the run id. Each run
  also writes `<data_dir>/runs/<run id>.json`, its manifest: command, environment, pipelines,
  runtime parameters, git commit, start/end, status, and every dataset it loaded (with the
  version it got) and saved. A versioned output's folder name leads to its manifest.
* **Lock.** Two runs on one data folder would interleave versions: the second run's nodes
  would load the first run's newer outputs as "latest" and mix them with their own. So a run
  holds `<data_dir>/.rare-cxr.lock` (a POSIX record lock: owned by the run's process alone,
  never by its workers, and dropped by the kernel when that process dies, even on `kill -9`)
  from before its session is created to its end; a second run waits, naming the holder.
  Runs of different environments use different data folders and run side by side.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rare_cxr.atomic import write_atomic_text
from rare_cxr.ownership import env_owner

logger = logging.getLogger(__name__)

LOCK_NAME = ".rare-cxr.lock"
RUNS_FOLDER = "runs"
LOCKS_FOLDER = ".rare-cxr-locks"  # per-model and combined-output locks (see RunLocks)
# Run locks this process holds, by data folder: a nested acquire (the CLI, then the session's
# hook) must not wait on itself.
_HELD: dict[Path, RunLocks] = {}
# Every lock file this process holds, by path -> descriptor. A second descriptor of a held lock
# file must never be opened and closed here: closing it would drop the lock (POSIX semantics).
_LOCK_FDS: dict[Path, int] = {}


def _now() -> str:
    """Local time with milliseconds and offset (run ids are millisecond timestamps too)."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def distributed_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0") or 0)


@dataclass(frozen=True)
class RunConfig:
    """The folders a configuration environment uses, as absolute paths."""

    data_dir: Path  # everything the runs derive (`data_dir` global)
    data_root: Path  # the raw data, read only (`data_root` global; the phantom in `base`)
    configuration: str  # `demo` (conf/base: CPU models for the phantom) or `study` (conf/nih)


def run_config(
    project_path: str | os.PathLike,
    env: str | None,
    conf_source: str | None = None,
    runtime_params: dict[str, Any] | None = None,
) -> RunConfig:
    """The environment's folders, read exactly as `kedro run --env <env>` reads them.

    `env=None` is `kedro run` without `--env`: conf/base + conf/local. `runtime_params` may
    override `data_root` as `--params data_root=...` does in the catalog.
    """
    from kedro.framework.project import settings

    project_path = Path(project_path)
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=conf_source or str(project_path / settings.CONF_SOURCE),
        env=env,
        **settings.CONFIG_LOADER_ARGS,
    )
    found = loader["globals"]

    def absolute(value: Any) -> Path:
        path = Path(str(value)).expanduser()
        return path if path.is_absolute() else project_path / path

    runtime_root = (runtime_params or {}).get("data_root")
    return RunConfig(
        data_dir=absolute(found.get("data_dir", "data")),
        data_root=absolute(runtime_root or found.get("data_root", "data")),
        configuration=str(found.get("configuration", "study")),
    )


def data_dir_for(
    project_path: str | os.PathLike, env: str | None, conf_source: str | None = None
) -> Path:
    """The environment's `data_dir` global (see conf/<env>/globals.yml), made absolute."""
    return run_config(project_path, env, conf_source).data_dir


def _describe_pid(pid: int) -> str:
    """`pid 123: kedro run --env nih` from /proc (Linux), or just the pid elsewhere."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    command = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return f"pid {pid}: `{command}`" if command else f"pid {pid}"


class ProcessLock:
    """A POSIX record lock (`fcntl(F_SETLK)`) on one file, exclusive or shared.

    Why POSIX record locks and not `flock`: a `flock` belongs to the open file description, so
    every process forked while it is held (the image cache's decode pool, a DataLoader worker)
    holds it too, and a run killed with `kill -9` left orphaned workers that kept the lock and
    made every later run wait forever. A record lock belongs to the *process*: children never
    inherit it, and the kernel drops it the moment the process dies, however it dies. The
    kernel also names the holder (`F_GETLK` gives its pid), so a waiting run says who it waits
    for instead of trusting a file that a dead process may have left behind.

    The one trap of record locks (closing *any* descriptor of the file in the holding process
    releases the lock) is avoided by never opening a lock file twice in one process:
    `_HELD` maps each held path to its lock, and nested acquires reuse it.
    """

    def __init__(
        self, path: str | os.PathLike, *, shared: bool = False, announce_every_s: float = 60.0
    ) -> None:
        self.path = Path(path).absolute()
        self.shared = shared
        self.announce_every_s = announce_every_s
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _try(self, fd: int) -> bool:
        kind = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def holder_pid(self, fd: int | None = None) -> int | None:
        """The pid of a process whose lock conflicts with ours (the kernel's answer), or None."""
        if fd is None and self.path in _LOCK_FDS:
            fd = _LOCK_FDS[self.path]  # held here: reuse it, never open (and close) a second one
        own = fd is None
        if own:
            if not self.path.exists():
                return None
            fd = os.open(self.path, os.O_RDONLY if self.shared else os.O_RDWR)
        try:
            wanted = fcntl.F_RDLCK if self.shared else fcntl.F_WRLCK
            request = struct.pack(_FLOCK, wanted, os.SEEK_SET, 0, 0, 0) + _FLOCK_PAD
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, request)
            kind, _whence, _start, _length, pid = struct.unpack(_FLOCK, answer[:_FLOCK_SIZE])
        except OSError:
            return None
        finally:
            if own:
                os.close(fd)
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None

    def describe_holder(self, fd: int | None = None) -> str:
        pid = self.holder_pid(fd)
        return _describe_pid(pid) if pid else "another process"

    def acquire(self, poll_s: float = 0.5, *, wait: bool = True, what: str = "") -> bool:
        """Take the lock; wait (announcing the holder every `announce_every_s`) or, with
        `wait=False`, return False at once if it is held. Returns True when held."""
        if self._fd is not None:
            return True
        if self.path in _LOCK_FDS:
            raise RuntimeError(
                f"{self.path} is already locked by this process; a second lock object on it "
                "would release the first when it closes (POSIX record locks)"
            )
        fd = self._open()
        waited_since, announced = time.monotonic(), 0.0
        try:
            while not self._try(fd):
                if not wait:
                    os.close(fd)
                    return False
                waited = time.monotonic() - waited_since
                if announced == 0.0 or waited - announced >= self.announce_every_s:
                    self._announce(fd, waited, what)
                    announced = max(waited, 1e-9)
                time.sleep(poll_s)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _LOCK_FDS[self.path] = fd
        if time.monotonic() - waited_since > 1.0:
            logger.info("%s: lock acquired; this run starts now", what or self.path)
        return True

    def _announce(self, fd: int, waited: float, what: str) -> None:
        logger.warning(
            "%s is in use by %s; waiting for it to finish (waited %.0f s; Ctrl-C to give up -- "
            "nothing of this run has started yet)",
            what or self.path,
            self.describe_holder(fd),
            waited,
        )

    def release(self) -> None:
        if self._fd is None:
            return
        _LOCK_FDS.pop(self.path, None)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


# struct flock on Linux/BSD: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t
# l_pid (+ padding); F_GETLK writes the answer back into the same buffer.
_FLOCK = "@hhqqi"
_FLOCK_SIZE = struct.calcsize(_FLOCK)
_FLOCK_PAD = b"\0" * 8


class RunLock(ProcessLock):
    """One lock file of a data folder, held from before the session is created to the run's end.

    `name=None` is the environment's lock `<data_dir>/.rare-cxr.lock`: exclusive for a run that
    writes the shared stages (phantom, labels, split, image cache), shared for runs that only
    train, predict or report models. `name="<model>"` is one model's lock
    (`<data_dir>/.rare-cxr-locks/<model>.lock`) and `name="combined"` the lock of the outputs
    that combine models (report.html, inference). See `RunLocks`.

    An exclusive holder writes its pid, host, start and command into the file and empties it on
    release; a run that finds a record when it gets the lock knows the previous holder died
    without releasing it (the kernel already dropped its lock), says so, and takes over.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        announce_every_s: float = 60.0,
        *,
        name: str | None = None,
        shared: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.name = name
        path = self.data_dir / (LOCK_NAME if name is None else f"{LOCKS_FOLDER}/{name}.lock")
        super().__init__(path, shared=shared, announce_every_s=announce_every_s)

    @classmethod
    def held(cls, data_dir: str | os.PathLike) -> RunLocks | None:
        """The locks this process holds on `data_dir` (taken by the CLI or the run's hook)."""
        return _HELD.get(Path(data_dir).resolve())

    def _announce(self, fd: int, waited: float, what: str) -> None:
        scope = "" if self.name is None else f" for {self.name}"
        logger.warning(
            "another kedro run is using %s%s (%s); waiting for it to finish (waited %.0f s; "
            "Ctrl-C to give up -- nothing of this run has started yet)",
            self.data_dir,
            scope,
            self.describe_holder(fd),
            waited,
        )

    def _recorded_holder(self, fd: int) -> dict[str, Any] | None:
        try:
            text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
            info = json.loads(text) if text else None
        except (OSError, ValueError):
            return {"pid": "?", "command": "unreadable lock record"}
        return info if isinstance(info, dict) else None

    def acquire(self, poll_s: float = 0.5, *, wait: bool = True, what: str = "") -> bool:
        if self._fd is not None:
            return True
        if not super().acquire(poll_s, wait=wait, what=what):
            return False
        assert self._fd is not None
        stale = self._recorded_holder(self._fd)
        if stale:  # only an exclusive holder writes one, and no exclusive holder is alive now
            logger.warning(
                "the previous holder of %s (pid %s on %s, started %s: `%s`) ended without "
                "releasing it (killed?); the kernel has dropped its lock, this run takes over",
                self.path,
                stale.get("pid"),
                stale.get("host"),
                stale.get("started"),
                stale.get("command"),
            )
            os.ftruncate(self._fd, 0)
        if not self.shared:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "command": " ".join(sys.argv),
            }
            os.pwrite(self._fd, json.dumps(info).encode(), 0)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(self._fd, 0)
        finally:
            super().release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# Tag of nodes that only read models' outputs and write outputs of their own (combined reports,
# inference): they run beside trainings of other models (see `plan_locks`).
DOWNSTREAM_TAG = "downstream"
COMBINED_LOCK = "combined"


@dataclass(frozen=True)
class LockPlan:
    """Which locks a run takes: the environment's lock (exclusive when the run writes the shared
    stages), each model's lock (exclusive when it trains, predicts or reports that model, shared
    when it only reads its outputs), and the lock of the combined outputs."""

    exclusive: bool
    models: tuple[tuple[str, bool], ...] = ()  # (model, exclusive), sorted by name
    combined: bool = False

    def describe(self) -> str:
        if self.exclusive:
            return "the whole data folder (it writes the shared stages)"
        parts = [f"{m} ({'writes' if ex else 'reads'})" for m, ex in self.models]
        if self.combined:
            parts.append("the combined reports")
        return ", ".join(parts) or "nothing but the shared stages (read)"


EXCLUSIVE_PLAN = LockPlan(exclusive=True)


def plan_locks(pipeline: Any, models: Iterable[str]) -> LockPlan:
    """The locks of a run of `pipeline`, from its nodes alone.

    * a node in a model's namespace (training, prediction, that model's reporting) locks that
      model exclusively: two runs of one model wait for each other;
    * a node tagged `downstream` (combined reports, inference) locks the combined outputs
      exclusively and every model whose datasets it reads shared: it waits for a model that is
      being trained now, and for nothing that is not running;
    * any other node (phantom, labels, split, image cache -- what every model reads) makes the
      environment's lock exclusive: the run waits for every other run, and they for it.

    Anything not recognised falls to the exclusive case: a new pipeline is safe by default.
    """
    models = set(models)
    exclusive: dict[str, bool] = {}
    combined = False
    for node in pipeline.nodes:
        namespace = (node.namespace or "").split(".")[0]
        if namespace in models:
            exclusive[namespace] = True
        elif DOWNSTREAM_TAG in node.tags:
            combined = True
            for name in node.inputs:
                model = name.split(".")[0]
                if "." in name and model in models:
                    exclusive.setdefault(model, False)
        else:
            return EXCLUSIVE_PLAN
    return LockPlan(False, tuple(sorted(exclusive.items())), combined)


class RunLocks:
    """The locks of one run on one data folder (a `LockPlan`), taken in one fixed order
    (environment, models by name, combined) so that runs waiting for each other never deadlock,
    and released in reverse."""

    def __init__(self, data_dir: str | os.PathLike, plan: LockPlan = EXCLUSIVE_PLAN) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.plan = plan
        self.locks = [RunLock(self.data_dir, shared=not plan.exclusive)]
        if not plan.exclusive:
            self.locks += [RunLock(self.data_dir, name=m, shared=not ex) for m, ex in plan.models]
            if plan.combined:
                self.locks.append(RunLock(self.data_dir, name=COMBINED_LOCK))

    def acquire(self) -> None:
        if _HELD.get(self.data_dir) is self:
            return
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self._release_all()
            raise
        _HELD[self.data_dir] = self
        if not self.plan.exclusive:
            logger.info("run locks on %s: %s", self.data_dir, self.plan.describe())

    def _release_all(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def release(self) -> None:
        if _HELD.get(self.data_dir) is self:
            del _HELD[self.data_dir]
        self._release_all()

    def __enter__(self) -> RunLocks:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_lock_holder(data_dir: str | os.PathLike) -> int | None:
    """The pid of a process holding any part of `data_dir`'s environment lock (kernel's
    answer), or None when it is free (nobody runs there)."""
    if RunLock.held(data_dir) is not None:
        return os.getpid()
    return RunLock(data_dir).holder_pid()


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


def later_runs(data_dir: Path, run_id: str, datasets: Iterable[str] | None = None) -> list[str]:
    """Ids of runs recorded in `data_dir` that started after `run_id` (ids sort by time); with
    `datasets`, only those that saved one of them (runs of other models may run alongside)."""
    folder = Path(data_dir) / RUNS_FOLDER
    if not folder.is_dir():
        return []
    later = sorted(p for p in folder.glob("*.json") if p.stem > run_id)
    if datasets is None:
        return [p.stem for p in later]
    wanted, touching = set(datasets), []
    for path in later:
        try:
            saved = json.loads(path.read_text()).get("saved") or {}
        except (OSError, ValueError):
            saved = {}  # unreadable: the run is counted, to be safe
            touching.append(path.stem)
            continue
        if wanted & set(saved):
            touching.append(path.stem)
    return touching
