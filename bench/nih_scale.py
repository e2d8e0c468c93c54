"""The NIH-size rehearsal as a benchmark (issue 19): every stage's time, memory and outputs
against the number of films.

Runs `kedro run --env rehearsal --pipelines phantom,nih` (the whole `nih` composition, all six
models, on a phantom at NIH ChestX-ray14's row counts: conf/rehearsal) once per size -- by default
a tenth, a half and all of NIH's 30,805 patients -- with `rare_cxr.tracking.node_stats` recording
each node's wall time, peak resident memory and output sizes (RARE_CXR_NODE_STATS). Then it
writes, between the NIH-SCALE markers of docs/benchmarks.md (inside its hand-written section, so
`bench/run_all.py` keeps it): the command, the machine, a per-stage table (seconds at each size,
peak RSS, output size), a per-node table, each stage's log-log slope of time against films (1 =
linear; n log n over 11k..108k films is ~1.1), the size of every output, and the targets.

    python bench/nih_scale.py                          # 0.1, 0.5, 1.0 of NIH's patients
    python bench/nih_scale.py --fractions 0.1          # one size
    python bench/nih_scale.py --fractions 1.0 --pipelines reporting   # reporting alone

Why a subprocess per size and not one Python session: each size is what a user types (the real
`kedro` CLI), and each gets its own process, so one size's peak memory is not another's.
Sizes run one after the other in the environment's own data folder (data/rehearsal): each
regenerates the phantom (its fingerprint changes) and everything derived from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NIH_PATIENTS = 30_805
NIH_FILMS = 112_120
BEGIN = "<!-- BEGIN NIH-SCALE: written by bench/nih_scale.py -->"
END = "<!-- END NIH-SCALE -->"
HAND_END = "<!-- END HAND-WRITTEN -->"
# The stages of issue 19's targets (seconds, MB) on 2 CPU cores at NIH's size.
TARGET_REPORTING_S = 600
TARGET_PEAK_RSS_MB = 4096
TARGET_REPORT_HTML_MB = 10
# A stage is flagged when its slope exceeds n log n's (~1.1 between 11k and 108k films) by a
# margin, and it matters (timing noise on a shared machine moves sub-second stages a lot).
FLAG_SLOPE = 1.2
FLAG_MIN_SECONDS = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--fractions",
        default="0.1,0.5,1.0",
        help="sizes as fractions of NIH's 30,805 patients, run in this order (default 0.1,0.5,1.0)",
    )
    p.add_argument("--env", default="rehearsal", help="kedro environment (default rehearsal)")
    p.add_argument(
        "--pipelines", default="phantom,nih", help="kedro --pipelines (default phantom,nih)"
    )
    p.add_argument(
        "--params",
        default="",
        help="extra kedro --params, appended after phantom.n_patients (tests: tiny sizes)",
    )
    p.add_argument("--project", type=Path, default=ROOT, help="the Kedro project (default: here)")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the per-size JSON lines and logs go (default bench/results/nih_scale-<time>)",
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="the doc whose NIH-SCALE section is rewritten (default docs/benchmarks.md)",
    )
    p.add_argument(
        "--from-results",
        action="store_true",
        help="run nothing: rebuild the doc section from --results-dir's JSON lines",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per size (default none)")
    p.add_argument("--nice", type=int, default=0, help="run kedro under `nice -n N` (default 0)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- running


def kedro_command(args: argparse.Namespace, n_patients: int) -> list[str]:
    params = f"phantom.n_patients={n_patients}"
    if args.params:
        params += "," + args.params
    kedro = str(Path(sys.executable).with_name("kedro"))
    command = [kedro, "run", "--env", args.env, "--pipelines", args.pipelines, "--params", params]
    return (["nice", "-n", str(args.nice)] if args.nice else []) + command


def run_size(args: argparse.Namespace, fraction: float, results: Path) -> dict[str, Any]:
    """One `kedro run` at `fraction` of NIH's patients; its stats file and log under `results`."""
    n_patients = max(1, round(NIH_PATIENTS * fraction))
    label = f"{fraction:g}"
    stats, log = results / f"nodes-{label}.jsonl", results / f"kedro-{label}.log"
    stats.unlink(missing_ok=True)
    command = kedro_command(args, n_patients)
    print(f"[nih_scale] {fraction:g} x NIH = {n_patients} patients: {shlex.join(command)}")
    env = {**os.environ, "RARE_CXR_NODE_STATS": str(stats), "KEDRO_DISABLE_TELEMETRY": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            command,
            cwd=args.project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=args.timeout,
            check=False,
        )
    wall = time.perf_counter() - start
    meta = {
        "fraction": fraction,
        "n_patients": n_patients,
        "command": shlex.join(command),
        "returncode": done.returncode,
        "wall_s": round(wall, 1),
        "films": count_films(args.project, args.env),
    }
    (results / f"meta-{label}.json").write_text(json.dumps(meta, indent=1))
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"[nih_scale] kedro run failed at {fraction:g} (log {log}):\n{tail}")
    return meta


def env_globals(project: Path, env: str) -> dict[str, Any]:
    """conf/base's globals under the environment's (what `${globals:...}` resolves to)."""
    import yaml

    merged: dict[str, Any] = {}
    for folder in ("base", env):
        path = project / "conf" / folder / "globals.yml"
        if path.exists():
            merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def count_films(project: Path, env: str) -> int | None:
    """Rows of the environment's data entry CSV (the phantom just generated)."""
    g = env_globals(project, env)
    path = project / str(g.get("data_root", "")) / str(g.get("data_entry_file", ""))
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return max(0, sum(1 for _ in handle) - 1)  # minus the header


# --------------------------------------------------------------------------------- reading


def read_size(results: Path, label: str, project: Path, env: str) -> dict[str, Any]:
    """One size's figures. A run cut short (no meta file: killed or timed out) is read as far
    as it got and marked `partial`; its films are counted in the data folder, which holds that
    size's phantom as long as no other size ran after it."""
    meta_path = results / f"meta-{label}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        fraction = float(label)
        meta = {
            "fraction": fraction,
            "n_patients": max(1, round(NIH_PATIENTS * fraction)),
            "command": "(cut short; see the node log)",
            "returncode": None,
            "wall_s": None,
            "films": count_films(project, env),
            "partial": True,
        }
    lines = [
        json.loads(line)
        for line in (results / f"nodes-{label}.jsonl").read_text().splitlines()
        if line.strip()
    ]
    meta["nodes"] = [r for r in lines if r.get("kind") == "node"]
    meta["run_end"] = next((r for r in lines if r.get("event") == "end"), {})
    return meta


def stage_of(node: dict[str, Any]) -> str:
    """A node's stage: its function (the same stage of every model is one row)."""
    return str(node.get("func") or node["node"].split(".")[-1])


def slope(films: list[float], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(films); None under two usable points."""
    pts = [(math.log(f), math.log(s)) for f, s in zip(films, seconds, strict=True) if f and s > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def node_rows(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per node (in the order of the largest run): seconds per size, peak RSS and
    output bytes at the largest size, slope."""
    order: list[str] = []
    per: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for size in sizes:
        for n in size["nodes"]:
            if n["node"] not in order:
                order.append(n["node"])
            per[n["node"]][f"{size['fraction']:g}"] = n
    rows = []
    films = [float(s["films"] or 0) for s in sizes]
    for name in order:
        cells = [per[name].get(f"{s['fraction']:g}") for s in sizes]
        last = next((c for c in reversed(cells) if c), {})
        secs = [c["seconds"] if c else None for c in cells]
        usable = [(f, s) for f, s in zip(films, secs, strict=True) if s is not None]
        rows.append(
            {
                "node": name,
                "stage": stage_of(last),
                "seconds": secs,
                "peak_rss_mb": last.get("peak_rss_mb"),
                "children_peak_mb": last.get("children_peak_mb"),
                "output_bytes": sum(v or 0 for v in (last.get("outputs") or {}).values()),
                "outputs": last.get("outputs") or {},
                "slope": slope([f for f, _ in usable], [s for _, s in usable]),
            }
        )
    return rows


def stage_rows(nodes: list[dict[str, Any]], films: list[float]) -> list[dict[str, Any]]:
    """Nodes summed per stage (every model's node of one function); slope of the sums."""
    order: list[str] = []
    sums: dict[str, list[float]] = {}
    rss: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    out: dict[str, int] = defaultdict(int)
    for row in nodes:
        st = row["stage"]
        if st not in sums:
            order.append(st)
            sums[st] = [0.0] * len(films)
        for i, s in enumerate(row["seconds"]):
            sums[st][i] += s or 0.0
        rss[st] = max(rss[st], row["peak_rss_mb"] or 0.0, row["children_peak_mb"] or 0.0)
        count[st] += 1
        out[st] += row["output_bytes"]
    return [
        {
            "stage": st,
            "nodes": count[st],
            "seconds": sums[st],
            "peak_rss_mb": rss[st] or None,
            "output_bytes": out[st],
            "slope": slope(films, sums[st]),
        }
        for st in order
    ]


# --------------------------------------------------------------------------------- writing


def _s(value: float | None) -> str:
    return "--" if value is None else f"{value:,.1f}"


def _mb(n: float | None) -> str:
    return "--" if not n else f"{n / 2**20:,.1f}"


def _slope(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}"


def render(sizes: list[dict[str, Any]], machine: dict[str, Any], argv: list[str]) -> str:
    films = [float(s["films"] or 0) for s in sizes]
    heads = [f"{s['fraction']:g}x: {int(s['films'] or 0):,} films (s)" for s in sizes]
    nodes = node_rows(sizes)
    stages = stage_rows(nodes, films)
    lines = [
        BEGIN,
        "",
        "## NIH-size rehearsal: every stage against the number of films",
        "",
        f"Measured {machine['date']} by `python bench/nih_scale.py {shlex.join(argv)}`"
        " (regenerate with the same command; `--from-results DIR` rebuilds this section from a"
        " run's JSON lines).",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} usable cores,"
        f" {machine.get('memory_gib', '?')} GiB RAM, GPU: {machine.get('gpu') or 'none'};"
        f" Python {machine['python']}, torch {machine.get('torch')}.",
        "- Data: the phantom at NIH's row counts and prevalences (conf/rehearsal: 96 px films, 75"
        " px image cache, tiny model inputs, 2 training steps of 64 films per model, 1,000"
        " patient-bootstrap resamples), not NIH's films: the times are the pipeline's, the"
        " models' numbers mean nothing.",
        "",
        "| size | patients | films | command | wall (s) | peak RSS, Kedro process (MB) |"
        " largest worker (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        end = s["run_end"]
        peak = end.get("peak_rss_mb") or max(
            (n.get("peak_rss_mb") or 0 for n in s["nodes"]), default=0
        )
        workers = end.get("children_peak_mb") or max(
            (n.get("children_peak_mb") or 0 for n in s["nodes"]), default=0
        )
        cut = f" (cut short after {len(s['nodes'])} nodes)" if s.get("partial") else ""
        lines.append(
            f"| {s['fraction']:g}{cut} | {s['n_patients']:,} | {int(s['films'] or 0):,} |"
            f" `{_short(s['command'])}` | {_s(s['wall_s'])} | {_s(peak or None)}"
            f" | {_s(workers or None)} |"
        )
    lines += [
        "",
        "### Per stage (a stage = one node function, summed over the models)",
        "",
        "Slope: least-squares slope of log(seconds) against log(films) over the sizes run (1 ="
        " linear; n log n between these sizes is ~1.1; a constant cost gives ~0). Flagged (!):"
        f" slope above {FLAG_SLOPE} with at least {FLAG_MIN_SECONDS:g} s at the largest size.",
        "",
        "| stage | nodes | " + " | ".join(heads) + " | slope | peak RSS (MB) | outputs (MB) |",
        "|---|---|" + "---|" * len(heads) + "---|---|---|",
    ]
    for st in stages:
        flag = (
            " (!)"
            if st["slope"] is not None
            and st["slope"] > FLAG_SLOPE
            and st["seconds"][-1] >= FLAG_MIN_SECONDS
            else ""
        )
        lines.append(
            f"| {st['stage']} | {st['nodes']} | "
            + " | ".join(_s(v) for v in st["seconds"])
            + f" | {_slope(st['slope'])}{flag} | {_s(st['peak_rss_mb'])}"
            + f" | {_mb(st['output_bytes'])} |"
        )
    lines += [
        "",
        "<details><summary>Per node (peak RSS: the Kedro process during the node; worker:"
        " the largest worker process it waited for)</summary>",
        "",
        "| node | " + " | ".join(heads) + " | slope | peak RSS (MB) | worker (MB) | outputs (MB) |",
        "|---|" + "---|" * len(heads) + "---|---|---|---|",
    ]
    for row in nodes:
        lines.append(
            f"| {row['node']} | "
            + " | ".join(_s(v) for v in row["seconds"])
            + f" | {_slope(row['slope'])} | {_s(row['peak_rss_mb'])} |"
            f" {_s(row['children_peak_mb'])} | {_mb(row['output_bytes'])} |"
        )
    lines += [
        "",
        "</details>",
        "",
        f"<details><summary>Every output at {sizes[-1]['fraction']:g}x (bytes on disk; --:"
        " in memory only)</summary>",
        "",
        "| output | node | bytes |",
        "|---|---|---|",
    ]
    for row in nodes:
        for name, size in sorted(row["outputs"].items()):
            lines.append(f"| {name} | {row['node']} | {'--' if size is None else f'{size:,}'} |")
    lines += ["", "</details>", "", *targets(sizes[-1], stages), "", END]
    return "\n".join(lines) + "\n"


def _short(command: str) -> str:
    """The command without the venv's absolute path."""
    parts = shlex.split(command)
    return shlex.join([Path(p).name if p.endswith("/kedro") else p for p in parts])


def targets(largest: dict[str, Any], stages: list[dict[str, Any]]) -> list[str]:
    """Issue 19's targets, measured at the largest size run."""
    reporting = sum(n["seconds"] for n in largest["nodes"] if _is_reporting(n))
    peak = max(
        [n.get("peak_rss_mb") or 0 for n in largest["nodes"]]
        + [n.get("children_peak_mb") or 0 for n in largest["nodes"]]
        + [0]
    )
    html = next(
        (
            size
            for n in largest["nodes"]
            for name, size in (n.get("outputs") or {}).items()
            if name == "report_html"
        ),
        None,
    )
    flagged = [
        st["stage"]
        for st in stages
        if st["slope"] is not None
        and st["slope"] > FLAG_SLOPE
        and st["seconds"][-1] >= FLAG_MIN_SECONDS
    ]
    where = f"at {largest['fraction']:g}x ({int(largest['films'] or 0):,} films)"
    html_text = "not written" if html is None else f"{html / 2**20:.2f} MB"
    caveat = []
    if largest["fraction"] < 1 or largest.get("partial"):
        caveat = [
            f"Not NIH's size: the largest size run is {largest['fraction']:g}x"
            + (", cut short" if largest.get("partial") else "")
            + "; the targets below are checked there only.",
            "",
        ]
    return [
        f"### Targets, measured {where}",
        "",
        *caveat,
        f"- Reporting nodes (every node of the `reporting` pipeline), summed: {reporting:,.0f} s"
        f" (target <= {TARGET_REPORTING_S} s): {_met(reporting <= TARGET_REPORTING_S)}.",
        f"- Peak RSS (the Kedro process or its largest worker): {peak:,.0f} MB (target <="
        f" {TARGET_PEAK_RSS_MB} MB): {_met(bool(peak) and peak <= TARGET_PEAK_RSS_MB)}.",
        f"- report.html: {html_text} (target <= {TARGET_REPORT_HTML_MB} MB): "
        + _met(html is not None and html <= TARGET_REPORT_HTML_MB * 2**20)
        + ".",
        "- Stages above n log n (flagged): " + (", ".join(flagged) if flagged else "none") + ".",
    ]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _is_reporting(node: dict[str, Any]) -> bool:
    """Whether a node record is one of the `reporting` pipeline's (its function's package)."""
    return ".pipelines.reporting" in str(node.get("module") or "")


def write_doc(doc: Path, section: str) -> None:
    """Replace the NIH-SCALE section of `doc` (or add it at the end of the hand-written part,
    which bench/run_all.py keeps verbatim)."""
    from rare_cxr.atomic import write_atomic_text

    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    elif HAND_END in text:
        head, tail = text.split(HAND_END, 1)
        text = head.rstrip("\n") + "\n\n" + section + "\n" + HAND_END + tail
    else:
        text = text + ("\n" if text else "") + section
    write_atomic_text(doc, text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.project = args.project.resolve()
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise SystemExit(f"--fractions: expected fractions in (0, 1], got {args.fractions!r}")
    results = args.results_dir or ROOT / "bench" / "results" / time.strftime(
        "nih_scale-%Y%m%d-%H%M%S"
    )
    results = results.resolve()  # the kedro run's working directory is the project
    results.mkdir(parents=True, exist_ok=True)
    if not args.from_results:
        for fraction in fractions:
            run_size(args, fraction, results)
    sizes = [read_size(results, f"{f:g}", args.project, args.env) for f in fractions]
    section = render(sizes, machine_info(), argv)
    (results / "section.md").write_text(section)
    write_doc(args.doc, section)
    print(f"[nih_scale] wrote {args.doc} (raw: {results})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
