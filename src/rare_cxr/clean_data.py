"""`make clean-data`: delete one environment's derived data, and nothing else.

    python -m rare_cxr.clean_data --env base          # lists what would go, asks to confirm
    python -m rare_cxr.clean_data --env nih --yes     # no question (scripts, CI)

What goes: everything under the environment's `data_dir` (`data/base`, `data/nih`: labels,
splits, image cache, training states, checkpoints, predictions, reports, run manifests, the
MLflow store), except the `.gitkeep` files that keep the folder layout. What never goes:

* anything outside `data_dir`. A symbolic link inside it (say `data/nih/01_raw -> /mnt/nih`)
  is removed as a link; what it points to is not touched, so a linked NIH download survives;
* the data of any other environment, or a data root configured with `--params data_root=...`
  (the NIH download lives there, outside `data_dir`);
* data in use: while a `kedro run` holds the environment's run lock, cleaning stops and names
  the run instead of deleting files under it.

Why a module rather than `rm -rf` in the Makefile: the folder comes from the environment's own
configuration (the same `data_dir_for` that the runs use), the lock check needs `flock`, and
`rm -rf` on a mistyped variable is how people lose downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
from pathlib import Path

from rare_cxr.runs import LOCK_NAME, data_dir_for

KEEP = ".gitkeep"


class CleanDataError(RuntimeError):
    """Cleaning refused: the message says why and what to do."""


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk does not follow links by default
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def plan(data_dir: Path) -> list[Path]:
    """The top-level entries to delete under `data_dir` (layer folders are emptied, kept)."""
    doomed: list[Path] = []
    if not data_dir.is_dir():
        return doomed
    for entry in sorted(data_dir.iterdir()):
        if entry.name in (KEEP, LOCK_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink() and (entry / KEEP).exists():
            # a layer folder of the committed layout: empty it, keep it and its .gitkeep
            doomed += [p for p in sorted(entry.iterdir()) if p.name != KEEP]
        else:
            doomed.append(entry)
    return doomed


def _refuse_if_running(data_dir: Path) -> None:
    lock = data_dir / LOCK_NAME
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text().strip() or "another process"
            raise CleanDataError(
                f"a kedro run is using {data_dir} ({holder}); let it finish or stop it, then "
                f"clean again"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete `path` without following links: a link is unlinked, never its target."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)  # rmtree unlinks links inside the tree, it does not follow them


def clean(project_path: Path, env: str, assume_yes: bool, ask=input, out=print) -> list[Path]:
    """Delete the derived data of `env` (see the module doc); returns what was deleted."""
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_path)  # the project's settings: how conf/<env>/globals.yml is read
    data_dir = data_dir_for(project_path, env)
    resolved_project = project_path.resolve()
    if data_dir.resolve() in (resolved_project, resolved_project.parent, Path("/")):
        raise CleanDataError(f"data_dir of env {env!r} is {data_dir}: refusing to clean that")
    _refuse_if_running(data_dir)
    doomed = plan(data_dir)
    if not doomed:
        out(f"nothing to clean in {data_dir}")
        return []
    total = sum(_size(p) for p in doomed)
    out(f"derived data of env {env!r} in {data_dir} ({total / 1e6:,.1f} MB):")
    for path in doomed:
        suffix = f" -> {os.readlink(path)} (the link only)" if path.is_symlink() else ""
        out(f"  {path.relative_to(data_dir)}{suffix}")
    if not assume_yes:
        if not sys.stdin.isatty() and ask is input:
            raise CleanDataError("not a terminal: pass --yes (make clean-data YES=1) to delete")
        if ask(f"delete these {len(doomed)} entries? [y/N] ").strip().lower() not in ("y", "yes"):
            out("nothing deleted")
            return []
    for path in doomed:
        remove(path)
    out(f"deleted {len(doomed)} entries from {data_dir}")
    return doomed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rare_cxr.clean_data", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--env", default="base", help="configuration environment (base, nih)")
    parser.add_argument("--yes", action="store_true", help="delete without asking")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project folder")
    args = parser.parse_args(argv)
    if not (args.project / "conf" / args.env).is_dir() and args.env != "base":
        print(f"error: no configuration environment conf/{args.env}", file=sys.stderr)
        return 2
    try:
        clean(args.project, args.env, args.yes)
    except CleanDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
