"""`make clean-data`: delete one environment's derived data, and nothing else.

    python -m rare_cxr.clean_data --env base          # lists what would go, asks to confirm
    python -m rare_cxr.clean_data --env nih --yes     # no question (scripts, CI)

What goes: what `kedro run` derived under the environment's `data_dir` (`data/base`,
`data/nih`: labels, splits, image cache, training states, checkpoints, predictions, reports,
run manifests, the MLflow store), except the `.gitkeep` files, the ownership marker and the lock
file. The folder is resolved exactly as `kedro run` resolves it for the same `--env`
(`conf/local` included for the default environment).

What never goes, whatever the configuration:

* `data_root` (the raw download; in `base` the phantom) and everything inside it. If
  `data_dir` itself lies inside `data_root`, nothing is cleaned;
* anything that looks like a raw NIH download (a `Data_Entry_2017*` label table) and is not a
  phantom rare-cxr generated: cleaning stops and says where it is;
* a `data_dir` that does not carry the environment's ownership marker (`.rare-cxr-env.json`,
  written by the first run): rare-cxr cleans only folders it created;
* what a symbolic link points to, unless the target carries this environment's marker (a
  `data_dir` or layer folder that the runs claimed); other links are left as they are;
* the data of another environment;
* data in use: cleaning takes the environment's run lock *before* it lists anything and holds
  it to the last deletion, so a `kedro run` started meanwhile waits, and a running one makes
  cleaning stop with its name.

Why a module rather than `rm -rf` in the Makefile: the folder comes from the environment's own
configuration (the same `data_dir_for` that the runs use), the lock needs the run's own locking,
and `rm -rf` on a mistyped variable is how people lose downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rare_cxr.ownership import ENV_MARKER, PHANTOM_MARKER, env_owner, marked_for_env
from rare_cxr.runs import LOCK_NAME, LOCKS_FOLDER, RunLock, run_config

KEEP = ".gitkeep"
NEVER_DELETED = (KEEP, LOCK_NAME, LOCKS_FOLDER, ENV_MARKER)
# What a raw NIH ChestX-ray14 download holds at its top level (any revision, gzipped or not).
RAW_LABEL_TABLE = "Data_Entry_2017*"


class CleanDataError(RuntimeError):
    """Cleaning refused: the message says why and what to do."""


@dataclass
class CleanPlan:
    """What cleaning would delete, and what it keeps on purpose (with the reason)."""

    data_dir: Path
    doomed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk does not follow links by default
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def looks_like_raw_download(folder: Path) -> Path | None:
    """The label table of a raw NIH download at `folder` or one level below, unless it is a
    phantom that rare-cxr generated (those carry the phantom marker)."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    for candidate in (folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())):
        tables = sorted(candidate.glob(RAW_LABEL_TABLE))
        if tables and not (candidate / PHANTOM_MARKER).is_file():
            return tables[0]
    return None


def plan(data_dir: Path, owner: str, protected: Iterable[Path] = ()) -> CleanPlan:
    """Walk `data_dir` (already resolved) and decide, entry by entry, what goes.

    A folder that holds a protected path (`data_root`) is descended into, so only its other
    entries go; a symbolic link is followed only into a folder marked for `owner`.
    """
    protected = [p.resolve() for p in protected]
    result = CleanPlan(data_dir)

    def visit(folder: Path, top: bool) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.name in NEVER_DELETED and (top or entry.name == KEEP):
                continue
            if entry.is_symlink():
                target = entry.resolve()
                if (
                    target.is_dir()
                    and marked_for_env(target, owner)
                    and not any(_inside(target, p) or _inside(p, target) for p in protected)
                ):
                    visit(target, top=True)  # a layer folder on another disk, claimed by a run
                else:
                    result.kept.append(
                        (entry, f"a link to {target}, which rare-cxr did not mark as {owner!r}'s")
                    )
                continue
            resolved = entry.resolve()
            if any(_inside(resolved, p) for p in protected):
                result.kept.append((entry, "data_root: the raw data is never deleted"))
                continue
            if entry.is_dir() and any(_inside(p, resolved) for p in protected):
                visit(entry, top=False)  # e.g. 01_raw holding the phantom (data_root)
                continue
            if entry.is_dir() and (entry / KEEP).exists():
                visit(entry, top=False)  # a layer folder of the committed layout: kept, emptied
                continue
            raw = looks_like_raw_download(entry) if entry.is_dir() else None
            if raw is not None:
                raise CleanDataError(
                    f"{entry} looks like a raw NIH download ({raw.name}), and rare-cxr never "
                    "deletes raw data: nothing was deleted. Move it out of the data folder "
                    f"(the nih environment reads data/nih-download by default: `mkdir -p "
                    f"data/nih-download && mv {entry}/* data/nih-download/`), then clean again."
                )
            result.doomed.append(entry)

    visit(data_dir, top=True)
    return result


def remove(path: Path) -> None:
    """Delete `path` without following links: a link is unlinked, never its target."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)  # rmtree unlinks links inside the tree, it does not follow them


def _checked_data_dir(project_path: Path, kedro_env: str | None) -> tuple[Path, Path, list[Path]]:
    """(data_dir as configured, its resolved folder, protected paths) or a refusal."""
    config = run_config(project_path, kedro_env)
    data_dir, owner = config.data_dir, env_owner(kedro_env)
    resolved = data_dir.resolve()
    project = project_path.resolve()
    if resolved in (project, project.parent, Path.home().resolve(), Path("/")):
        raise CleanDataError(f"data_dir of env {owner!r} is {data_dir}: refusing to clean that")
    data_root = config.data_root.resolve()
    if _inside(resolved, data_root):
        raise CleanDataError(
            f"data_dir of env {owner!r} ({data_dir}) lies inside data_root ({config.data_root}), "
            "the raw data, which rare-cxr never deletes: nothing was cleaned. Give the "
            "environment a data_dir outside its data_root (conf/<env>/globals.yml)."
        )
    if resolved.is_dir() and not marked_for_env(resolved, owner):
        where = f"{data_dir} -> {resolved}" if data_dir.is_symlink() else str(data_dir)
        raise CleanDataError(
            f"{where} does not carry the ownership marker of environment {owner!r} "
            f"({ENV_MARKER}, written by its first `kedro run`), so rare-cxr did not create it "
            "and will not clean it: nothing was deleted. Delete its content by hand if you are "
            "sure it is derived data."
        )
    return data_dir, resolved, [data_root]


def clean(
    project_path: Path,
    env: str,
    assume_yes: bool,
    ask: Callable[[str], str] = input,
    out: Callable[[str], None] = print,
) -> list[Path]:
    """Delete the derived data of `env` (see the module doc); returns what was deleted."""
    from kedro.framework.startup import bootstrap_project

    project_path = Path(project_path)
    bootstrap_project(project_path)  # the project's settings: how conf/<env>/globals.yml is read
    kedro_env = None if env_owner(env) == "base" else env  # as `kedro run` without --env
    owner = env_owner(kedro_env)
    data_dir, resolved, protected = _checked_data_dir(project_path, kedro_env)
    if not resolved.is_dir():
        out(f"nothing to clean in {data_dir}")
        return []
    lock = RunLock(resolved)
    if not lock.acquire(wait=False):
        raise CleanDataError(
            f"a kedro run is using {data_dir} ({lock.describe_holder()}); let it finish or stop "
            "it, then clean again"
        )
    try:  # held from the listing to the last deletion: a run started meanwhile waits
        to_clean = plan(resolved, owner, protected)
        for path, why in to_clean.kept:
            out(f"  kept {path}: {why}")
        if not to_clean.doomed:
            out(f"nothing to clean in {data_dir}")
            return []
        total = sum(_size(p) for p in to_clean.doomed)
        out(f"derived data of env {owner!r} in {data_dir} ({total / 1e6:,.1f} MB):")
        for path in to_clean.doomed:
            shown = path.relative_to(resolved) if _inside(path, resolved) else path
            out(f"  {shown}")
        if not assume_yes:
            if not sys.stdin.isatty() and ask is input:
                raise CleanDataError("not a terminal: pass --yes (make clean-data YES=1) to delete")
            answer = ask(f"delete these {len(to_clean.doomed)} entries? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                out("nothing deleted")
                return []
        for path in to_clean.doomed:
            remove(path)
        out(f"deleted {len(to_clean.doomed)} entries from {data_dir}")
        return to_clean.doomed
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rare_cxr.clean_data", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--env", default="base", help="configuration environment (base, nih)")
    parser.add_argument("--yes", action="store_true", help="delete without asking")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project folder")
    args = parser.parse_args(argv)
    if env_owner(args.env) != "base" and not (args.project / "conf" / args.env).is_dir():
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
