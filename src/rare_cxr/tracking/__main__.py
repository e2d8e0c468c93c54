"""`python -m rare_cxr.tracking STORE`: point a moved MLflow store at its own artefacts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rare_cxr.tracking.store import DATABASE, relocate_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rare_cxr.tracking",
        description="Rewrite a moved MLflow store's artefact locations to its own artifacts/ "
        "folder (e.g. a store made in the Docker image, opened on the host).",
    )
    parser.add_argument("store", type=Path, help="the store folder (holds mlflow.db)")
    args = parser.parse_args(argv)
    if not (args.store / DATABASE).is_file():
        print(f"error: {args.store} holds no {DATABASE}", file=sys.stderr)
        return 2
    changed = relocate_store(args.store)
    print(f"{args.store}: {changed} location(s) rewritten" if changed else f"{args.store}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
