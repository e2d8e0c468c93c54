"""Which models exist, and their roles: read from the parameters alone.

A model is a top-level parameter block whose `model:` key is a mapping, the model's spec (the
block's name is the model's namespace and must equal `model.name`):

    densenet121:                  # namespace of its nodes and catalog entries
      model: {name: densenet121, architecture: densenet121, scales: [64], ...}
      role: baseline              # main (exactly one: the study's model) | baseline (default)
      reference: multiscale_resnet  # paired comparison "this model - reference";
                                    # default: the main model; null: none

Adding a model is adding such a block (conf/<env>/parameters_*.yml): the pipelines
(`rare_cxr.pipeline_registry`) and the catalog's dataset factories (`{namespace}.checkpoint`, ...)
follow. Only the architecture must be one the factory knows (`models.factory.ARCHITECTURES`).

Roles: the `training` pipeline trains the main model, `baselines` every other one, the default
run the main model and its reference (the ablation pair), `nih`/`all_models` all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from rare_cxr.models.factory import ModelSpec
from rare_cxr.parameters import ParameterError, Params, check


class ModelBlock(Params):
    """One model's top-level parameter block."""

    model: ModelSpec
    role: Literal["main", "baseline"] = "baseline"
    reference: str | None = Field(None, min_length=1)


def is_model_block(value: Any) -> bool:
    """A top-level parameter block that describes a model: its `model:` key is a mapping (a
    spec). (`inference.model: multiscale_resnet` names a model; it does not describe one.)"""
    return isinstance(value, Mapping) and isinstance(value.get("model"), Mapping | ModelSpec)


@dataclass(frozen=True)
class Roster:
    """The configured models: `models` in report order (the main model, its reference, then
    the others in parameter order), and each model's paired-comparison reference."""

    models: tuple[str, ...]
    main: str
    references: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def baselines(self) -> list[str]:
        return [m for m in self.models if m != self.main]

    @property
    def default_models(self) -> list[str]:
        """The default run's models: the main model and its reference (the ablation pair)."""
        reference = self.references.get(self.main)
        return [self.main, *([reference] if reference else [])]

    def ordered(self, names: Iterable[str]) -> list[str]:
        wanted = set(names)
        return [m for m in self.models if m in wanted]

    def pairs(self, among: Iterable[str]) -> list[tuple[str, str]]:
        """(model, reference) comparisons whose two models are both in `among`."""
        present = set(among)
        return [
            (m, ref)
            for m in self.models
            if m in present and (ref := self.references.get(m)) is not None and ref in present
        ]

    def check_names(self, names: Sequence[str], where: str) -> list[str]:
        """`names` in roster order; an unknown name is an error naming `where`."""
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise ParameterError(
                f"{where}: unknown model(s) {unknown}; the configured models are "
                f"{list(self.models)} (a model is a parameter block with a `model:` key)"
            )
        return self.ordered(names)


def roster_from_parameters(params: Mapping[str, Any]) -> Roster:
    """Validate every model block (and `reporting.models`) and return the roster; one
    ParameterError lists every problem, each naming its key."""
    problems: list[str] = []
    blocks: dict[str, ModelBlock] = {}
    failed: list[str] = []
    raw_training = params.get("training")
    for namespace, value in params.items():
        if not is_model_block(value):
            continue
        try:
            block = check(ModelBlock, value, namespace)
        except ParameterError as error:
            problems.append(str(error))
            failed.append(namespace)
            continue
        raw_model = value["model"]
        name = raw_model.name if isinstance(raw_model, ModelSpec) else raw_model.get("name")
        if name != namespace:
            problems.append(
                f"{namespace}.model.name: must be {namespace!r}, the block's own name (the "
                f"namespace of its nodes, catalog entries and training state), got {name!r}"
            )
        problems += _merged_training_problems(namespace, block, raw_training)
        blocks[namespace] = block
    mains = [n for n, b in blocks.items() if b.role == "main"]
    if len(mains) > 1 or (not mains and not failed):
        problems.append(
            "models: exactly one model block needs `role: main` (the study's model, trained by "
            f"the `training` pipeline and compared with the others), found {mains or 'none'}"
        )
    references: dict[str, str | None] = {}
    for namespace, block in blocks.items():
        if "reference" in block.model_fields_set:
            ref = block.reference
        else:
            ref = None if block.role == "main" or not mains else mains[0]
        if ref is not None and ref not in blocks and ref not in failed:
            problems.append(
                f"{namespace}.reference: unknown model {ref!r}; configured: {list(blocks)}"
            )
        elif ref == namespace:
            problems.append(f"{namespace}.reference: a model cannot be its own reference")
        references[namespace] = ref
    reporting = params.get("reporting")
    listed = getattr(reporting, "models", None) or (
        reporting.get("models") if isinstance(reporting, Mapping) else None
    )
    if isinstance(listed, list | tuple):
        unknown = [m for m in listed if m not in blocks and m not in failed]
        if unknown:
            problems.append(
                f"reporting.models: unknown model(s) {unknown}; the configured models are "
                f"{[*blocks, *failed]} (a model is a parameter block with a `model:` spec)"
            )
    if problems:
        raise ParameterError("\n".join(problems))
    main = mains[0]
    reference = references[main]
    order = [main, *([reference] if reference else [])]
    order += [n for n in blocks if n not in order]
    return Roster(tuple(order), main, references)


def _merged_training_problems(namespace: str, block: ModelBlock, shared: Any) -> list[str]:
    """A model's `training:` overrides, merged over the shared block, must be consistent too."""
    from rare_cxr.parameters import plain
    from rare_cxr.training.config import TrainingParams, merge_overrides

    if block.model.training is None:
        return []
    overrides = block.model.training.model_dump(exclude_unset=True)
    try:
        check(TrainingParams, merge_overrides(plain(shared or {}), overrides), "training")
    except ParameterError as error:
        return [f"{namespace}.model.training merged over the shared block: {error}"]
    return []
