"""Parameter validation: one pydantic model per parameter block, errors that name the full key.

Kedro 1.7's documented way ("Parameter validation",
https://docs.kedro.org/en/stable/configure/parameter_validation/): a node whose `params:` input
is annotated with a pydantic model gets a validated instance of it; Kedro builds the instances
when it creates the catalog, before any node runs. Every node of this project that reads a
parameter block is annotated that way, and every model forbids unknown keys at every level.

What this module adds, and why:

* **Readable errors with the full key path.** Kedro wraps pydantic's multi-line dump
  ("1 validation error for TrainingParams / batch_size / Input should be greater than or equal
  to 1 [type=greater_than_equal, ...]"). `check` turns each problem into one sentence that
  names the key as it is written in the YAML files, namespace included:
  `densenet121.model.scales: expected at least 1 item(s), got []`.
* **All blocks at once, when the run starts** (`rare_cxr.configuration.validate_parameters`,
  which knows every block; this module knows none, so any layer may use it without importing
  the model or training code).

Models use strict types (`True` is not an integer, `"128"` is not a number: the YAML must say
what it means) and `extra="forbid"`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

logger = logging.getLogger(__name__)


class ParameterError(ValueError):
    """A parameter is missing, unknown or has a wrong value; the message names its key."""


class KeyProblem(ValueError):
    """Raised inside a model validator to blame one key of the model (not the whole block).

    `message` may say `{parent}` where the block's own path belongs (e.g.
    `"must divide {parent}.batch_size"`), so that sibling keys are named in full too.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class Params(BaseModel):
    """Base of every parameter model: unknown keys are errors, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


M = TypeVar("M", bound=BaseModel)


def check(model: type[M], value: Any, where: str, *, context: Any = None) -> M:
    """`value` (a mapping, None = all defaults, or an instance) as a `model`, or ParameterError.

    `where` is the block's key path in the parameters (`training`, `vgg16.model`).
    """
    if isinstance(value, model):
        return value
    try:
        return model.model_validate({} if value is None else value, context=context)
    except ValidationError as error:
        raise ParameterError(describe(error, model, where)) from None


def plain(value: Any) -> Any:
    """A parameter value as plain Python (models dumped to dicts), e.g. for JSON or logging."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------ error messages


def _path(where: str, loc: tuple[Any, ...]) -> str:
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc` (for listing its known keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """`X | None` / `list[X]` / `Annotated[X, ...]` -> the model class X inside, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is None:
        return None
    for arg in get_args(annotation):
        inner = _unwrap(arg)
        if inner is not None:
            return inner
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_SIMPLE = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a text value",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping of keys to values",
    "model_type": "expected a mapping of keys to values",
    "model_attributes_type": "expected a mapping of keys to values",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _sentence(error: Mapping[str, Any], model: type[BaseModel], where: str) -> str:
    kind, loc = error["type"], tuple(error["loc"])
    ctx = error.get("ctx") or {}
    got = f", got {_shown(error.get('input'))}"
    problem = ctx.get("error")
    if isinstance(problem, KeyProblem):
        loc = (*loc, *problem.key.split("."))
        text = problem.message.replace("{parent}", _path(where, loc[:-1]))
        return f"{_path(where, loc)}: {text}"
    path = _path(where, loc)
    if kind in ("value_error", "assertion_error"):
        text = str(problem) if problem is not None else error["msg"]
        # messages of shared helpers may already start with the full key (reporting.long_tail...)
        return text if where and text.startswith(where) else f"{path}: {text}"
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        known = sorted(owner.model_fields) if owner is not None else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return (
            f"{path}: unknown key"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + (f"; known keys: {', '.join(known)}" if known else "")
        )
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "literal_error":
        return f"{path}: expected one of {ctx.get('expected')}{got}"
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return f"{path}: expected a value {sign} {ctx.get(key)}{got}"
    if kind == "too_short":
        return f"{path}: expected at least {ctx.get('min_length')} item(s){got}"
    if kind == "too_long":
        return f"{path}: expected at most {ctx.get('max_length')} item(s){got}"
    if kind in _SIMPLE:
        return f"{path}: {_SIMPLE[kind]}{got}"
    message = str(error["msg"])
    return f"{path}: {message[:1].lower()}{message[1:]}{got}"


def describe(error: ValidationError, model: type[BaseModel], where: str) -> str:
    """pydantic's errors as one sentence per problem, each naming the full key path."""
    sentences = list(
        dict.fromkeys(_sentence(e, model, where) for e in error.errors(include_url=False))
    )
    return "\n".join(sentences)
