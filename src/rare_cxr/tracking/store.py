"""The MLflow store's artefact locations follow the store when it moves.

MLflow writes every artefact location into its database as an absolute `file://` URI (it turns
a relative location into an absolute one when the experiment is created; checked with MLflow
3.17). A store made inside the Docker image (`/app/data/nih/mlflow`) and opened on the host
(`./data/nih/mlflow`), or a data folder copied to another disk, then lists its runs but finds
none of their artefacts. `relocate_store` rewrites those locations to the store's current
`artifacts/` folder: the artefacts always live inside the store (`tracking.store`), so the
rewrite is exact. The run's hook calls it whenever it opens a store; a user can run it by hand
before `mlflow ui`:

    python -m rare_cxr.tracking data/nih/mlflow

Plain `sqlite3` on MLflow's two columns that hold locations (`experiments.artifact_location`,
`runs.artifact_uri`), so mlflow is not imported.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

logger = logging.getLogger(__name__)

DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"


def relocate_store(store: str | Path) -> int:
    """Point every experiment and run of the store at `<store>/artifacts`; return how many
    locations changed (0 when the store never moved, or does not exist yet)."""
    store = Path(store)
    database = store / DATABASE
    if not database.is_file():
        return 0
    here = (store / ARTIFACTS).resolve().as_uri()
    changed = 0
    with sqlite3.connect(database) as connection:
        experiments = connection.execute(
            "SELECT experiment_id, artifact_location FROM experiments"
        ).fetchall()
        for experiment_id, location in experiments:
            if not location or location == here:
                continue
            if not location.rstrip("/").endswith(f"/{ARTIFACTS}"):
                continue  # not a location this project made (an experiment of another tool)
            old = location.rstrip("/")
            cursor = connection.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                (here, len(old) + 1, experiment_id, len(old), old),
            )
            connection.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                (here, experiment_id),
            )
            changed += 1 + cursor.rowcount
            logger.info("MLflow store %s moved: artefacts %s -> %s", store, old, here)
    return changed
