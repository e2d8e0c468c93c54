"""Per-node wall time, peak memory and output sizes of a run, as JSON lines (a benchmark probe).

Set `RARE_CXR_NODE_STATS=/path/to/stats.jsonl` and run any `kedro run`: every node gets one
line -- its wall time (split into loading its inputs, running, saving its outputs and the other
hooks' work), the peak resident memory of the Kedro process while it ran, the largest worker
process it waited for, and the size on disk of every output it saved -- plus a line at the start
and at the end of the run. Without the variable the hook does nothing. `bench/nih_scale.py` reads
these lines for the NIH-size rehearsal (docs/benchmarks.md).

Why a hook and not a profiler: Kedro calls hooks around every dataset load, node call and save
(`before_dataset_loaded` ... `after_dataset_saved`), in that order, one node at a time on the
SequentialRunner, so a node's span is exact: from the first hook call that names it to the first
that names the next node (or the run's end). Everything in between is that node's cost: loading,
the function, saving, and the other hooks' work for it (the run manifest, MLflow logging).

Peak memory per node: Linux keeps a process's high-water mark of resident memory (`VmHWM` in
/proc/self/status) and resets it when "5" is written to /proc/self/clear_refs (Linux >= 4.0), so
the mark read at the end of a node is that node's own peak, however short it was. Where that
reset is refused, a thread samples the resident size (`VmRSS`) every 20 ms instead (a peak
shorter than that can be missed); the lines say which (`rss_method`). Worker processes (the image
cache's decode pool, the phantom's render pool) are not in the Kedro process's figure: the
kernel reports the largest worker waited for so far (`getrusage(RUSAGE_CHILDREN)`), recorded on
the node during which it grew (`children_peak_mb`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import threading
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)

ENV_VAR = "RARE_CXR_NODE_STATS"
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_KIB = 1024
_MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A `Vm*` line of /proc/self/status in KiB (None where /proc is absent)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib * _KIB / _MIB, 1)


def children_peak_kib() -> int:
    """The largest resident size of any worker process waited for so far (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


class PeakRss:
    """Peak resident memory of this process between `reset()` and `peak_kib()`.

    VmHWM reset through /proc/self/clear_refs where allowed, else a sampling thread (module
    docstring); `method` says which.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self._sampled = 0
        self._stop: threading.Event | None = None
        self.method = "VmHWM reset per node (/proc/self/clear_refs)"
        if not self._clear():
            self.method = f"VmRSS sampled every {int(interval_s * 1000)} ms"
            self._start_sampler()

    @staticmethod
    def _clear() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def _start_sampler(self) -> None:
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self._sampled = max(self._sampled, _status_kib("VmRSS") or 0)

        threading.Thread(target=sample, name="rare-cxr-rss-sampler", daemon=True).start()

    def reset(self) -> None:
        if self._stop is None:
            self._clear()
        else:
            self._sampled = _status_kib("VmRSS") or 0

    def peak_kib(self) -> int | None:
        if self._stop is None:
            return _status_kib("VmHWM")
        return max(self._sampled, _status_kib("VmRSS") or 0) or None

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()


def output_bytes(dataset: Any) -> int | None:
    """Bytes on disk of what `dataset` just saved (its save version when versioned; every file
    of a folder dataset); None for a dataset with no file (MemoryDataset).

    Kedro has no public accessor for a dataset's path: `_filepath`/`_get_versioned_path` are the
    ones kedro-datasets' file datasets use themselves, `_path`/`_root` the project's folder ones.
    """
    path = None
    filepath = getattr(dataset, "_filepath", None)
    if filepath is not None:
        version = None
        if hasattr(dataset, "resolve_save_version"):
            try:
                version = dataset.resolve_save_version()
            except Exception:  # an unversioned dataset
                version = None
        path = Path(str(dataset._get_versioned_path(version) if version else filepath))
    else:
        for attribute in ("_path", "_root"):
            if getattr(dataset, attribute, None) is not None:
                path = Path(str(getattr(dataset, attribute)))
                break
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while walking (a swept temporary)
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


class NodeStatsHooks:
    """Writes one JSON line per node (and per run start/end) to `$RARE_CXR_NODE_STATS`."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._catalog: Any = None
        self._peak: PeakRss | None = None
        self._current: dict[str, Any] | None = None
        self._run: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ helpers

    def _write(self, record: dict[str, Any]) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def _enter(self, node: Any, phase: str) -> dict[str, Any] | None:
        """The record of `node`, starting it (and closing the previous node's) if it is new."""
        if self._path is None:
            return None
        now = time.perf_counter()
        if self._current is None or self._current["node"] != node.name:
            self._close(now)
            if self._peak is not None:
                self._peak.reset()
            self._current = {
                "kind": "node",
                "run_id": self._run.get("run_id"),
                "node": node.name,
                "namespace": node.namespace,
                "func": getattr(getattr(node, "func", None), "__name__", None),
                # the pipeline package of the function (bench/nih_scale.py groups by it)
                "module": getattr(getattr(node, "func", None), "__module__", None),
                "tags": sorted(getattr(node, "tags", ()) or ()),
                "_start": now,
                "_marks": {"load": now},
                "rss_start_mb": _mib(_status_kib("VmRSS")),
                "_children": children_peak_kib(),
                "outputs": {},
            }
        self._current["_marks"].setdefault(phase, now)
        return self._current

    def _close(self, now: float, error: BaseException | None = None) -> None:
        record, self._current = self._current, None
        if record is None:
            return
        marks = record.pop("_marks")
        start = record.pop("_start")
        run = marks.get("run", start)
        done = marks.get("done", now)
        record["seconds"] = round(now - start, 4)
        record["load_s"] = round(run - start, 4)
        record["run_s"] = round(done - run, 4)
        record["save_s"] = round(now - done, 4)
        peak = self._peak.peak_kib() if self._peak is not None else None
        record["peak_rss_mb"] = _mib(peak)
        record["rss_end_mb"] = _mib(_status_kib("VmRSS"))
        children_before = record.pop("_children")
        children = children_peak_kib()
        record["children_peak_mb"] = _mib(children) if children > children_before else None
        record["rss_method"] = self._peak.method if self._peak is not None else None
        if error is not None:
            record["error"] = repr(error)[:500]
        self._run["peak_rss_kib"] = max(self._run.get("peak_rss_kib", 0), peak or 0)
        self._write(record)

    # ------------------------------------------------------------------------------ hooks

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        target = os.environ.get(ENV_VAR, "").strip()
        self._path = Path(target) if target else None
        if self._path is None:
            return
        self._catalog = catalog
        self._peak = PeakRss()
        self._current = None
        self._run = {"run_id": str(run_params.get("run_id")), "_start": time.perf_counter()}
        self._write(
            {
                "kind": "run",
                "event": "start",
                "run_id": self._run["run_id"],
                "env": run_params.get("env"),
                "pipelines": run_params.get("pipeline_names"),
                "runtime_params": run_params.get("runtime_params"),
                "nodes": len(pipeline.nodes),
                "rss_method": self._peak.method,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            }
        )
        logger.info("node statistics of this run go to %s (%s)", self._path, ENV_VAR)

    @hook_impl(tryfirst=True)
    def before_dataset_loaded(self, dataset_name: str, node: Any) -> None:
        self._enter(node, "load")

    @hook_impl(tryfirst=True)
    def before_node_run(self, node: Any) -> None:
        self._enter(node, "run")

    @hook_impl(trylast=True)
    def after_node_run(self, node: Any) -> None:
        self._enter(node, "done")

    @hook_impl(trylast=True)
    def after_dataset_saved(self, dataset_name: str, node: Any) -> None:
        record = self._enter(node, "done")
        if record is None:
            return
        try:
            size = output_bytes(self._catalog.get(dataset_name))
        except Exception:  # a dataset the catalog cannot describe: size unknown
            size = None
        record["outputs"][dataset_name] = size

    @hook_impl(trylast=True)
    def on_node_error(self, error: Exception, node: Any) -> None:
        if self._enter(node, "done") is not None:
            self._close(time.perf_counter(), error)

    def _finish(self, status: str, error: BaseException | None = None) -> None:
        if self._path is None:
            return
        self._close(time.perf_counter())
        start = self._run.pop("_start", time.perf_counter())
        self._write(
            {
                "kind": "run",
                "event": "end",
                "run_id": self._run.get("run_id"),
                "status": status,
                "error": repr(error)[:500] if error is not None else None,
                "seconds": round(time.perf_counter() - start, 3),
                # the largest node peak (getrusage's ru_maxrss is no use here: resetting VmHWM
                # per node resets it too)
                "peak_rss_mb": _mib(self._run.get("peak_rss_kib")),
                "children_peak_mb": _mib(children_peak_kib()),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            }
        )
        if self._peak is not None:
            self._peak.close()
        self._path = self._catalog = self._peak = None

    # trylast: after TrackingHooks has finished the MLflow runs (their cost is the run's)
    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        self._finish("finished")

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error: Exception) -> None:
        self._finish("failed", error)
