"""Project CLI: Kedro's own `kedro run`, with one default changed for `--namespaces`.

Why this file exists (Kedro's documented way to modify a built-in command, loaded from
`<package>.cli`): `kedro run --namespaces densenet121` filters the *default* pipeline, and the
default pipeline here is the CPU demo, which deliberately leaves the five baselines out (they
take ~9 minutes on 2 CPU cores). Kedro would then stop with "Pipeline does not contain nodes
with namespaces ['densenet121']". So when `--namespaces` is given without `--pipeline(s)`,
the namespaces are selected from `all_models` (every stage for all six models) instead. Every
other option, and every other command, is Kedro's, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run

from rare_cxr.pipeline_registry import ALL_MODELS_PIPELINE

logger = logging.getLogger(__name__)


@click.group(name="rare-cxr")
def cli() -> None:
    """rare-cxr project commands (Kedro's, with `run` adjusted for `--namespaces`)."""


@cli.command(
    name="run",
    params=list(kedro_run.params),
    help=kedro_run.help,
    short_help=kedro_run.short_help,
    context_settings=kedro_run.context_settings,
)
def run(**kwargs: Any) -> dict[str, Any]:
    """Kedro's `run`; `--namespaces` alone selects from every model's pipeline."""
    if kwargs.get("namespaces") and not kwargs.get("pipeline") and not kwargs.get("pipelines"):
        kwargs["pipelines"] = [ALL_MODELS_PIPELINE]
        logger.info(
            "--namespaces %s without --pipelines: selecting them from the %r pipeline "
            "(the default demo pipeline holds only multiscale_resnet)",
            ",".join(kwargs["namespaces"]),
            ALL_MODELS_PIPELINE,
        )
    assert kedro_run.callback is not None
    return kedro_run.callback(**kwargs)
