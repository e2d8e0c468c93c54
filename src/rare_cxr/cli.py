"""Project CLI: Kedro's own `kedro run`, with two adjustments (`--namespaces`, `--params`).

Why this file exists (Kedro's documented way to modify a built-in command, loaded from
`<package>.cli`): `kedro run --namespaces densenet121` filters the *default* pipeline, and the
default pipeline here is the CPU demo, which deliberately leaves the five baselines out (they
take ~9 minutes on 2 CPU cores). Kedro would then stop with "Pipeline does not contain nodes
with namespaces ['densenet121']". So when `--namespaces` is given without `--pipeline(s)`,
the namespaces are selected from `all_models` (every stage for all six models) instead.

`--params` is made bracket-aware: Kedro splits its value on *every* comma before OmegaConf
parses it, so a list value (`multiscale_resnet.model.scales=[64,128,256]`, the paper's central
knob) failed with "Item `128` must contain a key and a value". Here commas inside `[...]`,
`{...}` or quotes belong to the value; the items are then parsed by OmegaConf exactly as Kedro
does.

The run also takes the data folder's run locks (`rare_cxr.runs.RunLocks`: the whole folder for
a run that writes the shared stages, else one lock per model it trains or reports, so runs of
different models proceed side by side) *before* Kedro creates its session: the session id is
the run id and every output's version, so a run that waited for another must get its id after
that run ends, or its outputs would sort before what it loads.
Every other option, and every other command, is Kedro's, unchanged.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run
from omegaconf import OmegaConf

from rare_cxr.pipeline_registry import ALL_MODELS_PIPELINE
from rare_cxr.runs import LockPlan, RunLocks, data_dir_for, distributed_rank, plan_locks

logger = logging.getLogger(__name__)


@click.group(name="rare-cxr")
def cli() -> None:
    """rare-cxr project commands (Kedro's, with `run` adjusted for `--namespaces`)."""


_OPENING = {"[": "]", "{": "}"}


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes.

    Why hand-written: Kedro's own splitter is a plain `str.split(",")`, and neither click nor
    OmegaConf offers a dot-list splitter. Unbalanced brackets or quotes are an error that names
    the offending text, never a silent mis-split.
    """
    items, current, stack, quote = [], [], [], ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPENING:
            stack.append(char)
        elif char in "]}":
            if not stack or _OPENING[stack.pop()] != char:
                raise click.BadParameter(f"unbalanced {char!r} in {text!r}")
        elif char == "," and not stack:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if stack or quote:
        raise click.BadParameter(f"unclosed {(stack[-1:] or [quote])[0]!r} in {text!r}")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def split_params(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """`--params "a.b=1,c.d=[64,128]"` -> `{"a": {"b": 1}, "c": {"d": [64, 128]}}`.

    A dict (from `kedro run --config run.yml`) passes through unchanged, as in Kedro.
    """
    if isinstance(value, dict):
        return value
    dot_list = []
    for item in split_top_level(value or ""):
        key, equals, val = item.partition("=")
        if not equals or not key.strip():
            raise click.BadParameter(
                f"item {item!r} must be key=value (e.g. training.epochs=3 or "
                "multiscale_resnet.model.scales=[64,128,256])",
                ctx=ctx,
                param=param,
            )
        dot_list.append(f"{key.strip()}={val}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(dot_list))


def _with_bracket_aware_params(params: list[click.Parameter]) -> list[click.Parameter]:
    out = []
    for option in params:
        if option.name == "params":
            bracket_aware = copy.copy(option)
            bracket_aware.callback = split_params
            out.append(bracket_aware)
        else:
            out.append(option)
    return out


@cli.command(
    name="run",
    params=_with_bracket_aware_params(list(kedro_run.params)),
    help=kedro_run.help,
    short_help=kedro_run.short_help,
    context_settings=kedro_run.context_settings,
)
def run(**kwargs: Any) -> dict[str, Any]:
    """Kedro's `run`; `--namespaces` alone selects from every model's pipeline; `--params`
    accepts list values."""
    if kwargs.get("namespaces") and not kwargs.get("pipeline") and not kwargs.get("pipelines"):
        kwargs["pipelines"] = [ALL_MODELS_PIPELINE]
        logger.info(
            "--namespaces %s without --pipelines: selecting them from the %r pipeline "
            "(the default demo pipeline holds only multiscale_resnet)",
            ",".join(kwargs["namespaces"]),
            ALL_MODELS_PIPELINE,
        )
    assert kedro_run.callback is not None
    from rare_cxr.parameters import ParameterError

    try:
        with _run_lock(kwargs) or nullcontext():
            return kedro_run.callback(**kwargs)
    except ParameterError as error:
        # a mistake in the configuration: the keys and what is wrong, not a Python traceback
        raise click.ClickException(str(error)) from None


def _run_lock(kwargs: dict[str, Any]) -> RunLocks | None:
    """The locks of the data folder this run will write (`rare_cxr.runs.plan_locks`), or None
    (torchrun rank > 0, or a configuration that cannot be read here: the session's hook then
    locks, and reports the configuration error properly)."""
    if distributed_rank() != 0:
        return None
    try:
        from kedro.utils import find_kedro_project

        project = find_kedro_project(Path.cwd()) or Path.cwd()
        env = kwargs.get("env") or os.environ.get("KEDRO_ENV")
        data_dir = data_dir_for(project, env, kwargs.get("conf_source"))
        return RunLocks(data_dir, _probe_lock_plan(project, kwargs))
    except Exception as err:  # the session reports configuration errors properly
        logger.debug("run lock deferred to the session hook: %s", err)
        return None


def _probe_lock_plan(project: Path, kwargs: dict[str, Any]) -> LockPlan:
    """Which locks the run needs, from the pipeline it will run, before its session exists.

    The run id (Kedro's session id) must be drawn *after* the locks are held, or a run that
    waited would write versions older than those it loads; so the pipeline is resolved here in
    a probe session (the same selection and filters as `KedroSession.run`), which runs no node
    and writes nothing.
    """
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.pipeline import Pipeline

    from rare_cxr.pipeline_registry import current_roster

    names = list(kwargs.get("pipelines") or [])
    if kwargs.get("pipeline"):  # the deprecated singular option
        names = [kwargs["pipeline"]]
    with KedroSession.create(
        project_path=project,
        env=kwargs.get("env"),
        conf_source=kwargs.get("conf_source"),
        runtime_params=kwargs.get("params") or {},
    ) as probe:
        pipelines.set_requested(names or None)
        probe.load_context()
        combined = sum((pipelines[name] for name in names or ["__default__"]), Pipeline([]))
        selected = combined.filter(
            tags=tuple(kwargs.get("tags") or ()),
            from_nodes=kwargs.get("from_nodes"),
            to_nodes=kwargs.get("to_nodes"),
            node_names=tuple(kwargs.get("node_names") or ()),
            from_inputs=kwargs.get("from_inputs"),
            to_outputs=kwargs.get("to_outputs"),
            node_namespaces=kwargs.get("namespaces"),
        )
        return plan_locks(selected, current_roster().models)
