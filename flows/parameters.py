"""A flow's parameters are its config's fields, one by one.

A deployment run's parameters are merged with the deployment's own key by key, one level deep:
a flow taking one nested `config` parameter could not have a single field overridden (`--param
epochs=5`), and passing `config` replaced the whole dict, silently dropping the deployment's
other values. A flow decorated here takes every field of its config as a keyword parameter,
with the field's type, constraints and description (so the dashboard's run form shows each one),
and builds the one config object from them first thing.

"""

from __future__ import annotations

import argparse
import inspect
from types import UnionType
from typing import Annotated, Any, Callable, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

Body = TypeVar("Body", bound=Callable)


def parameters_from(config_type: type[BaseModel]) -> Callable[[Body], Body]:
    """Gives a `def flow(**parameters)` the signature of `config_type`'s fields (keyword-only)."""

    def with_signature(body: Body) -> Body:
        fields = config_fields(config_type)
        body.__signature__ = inspect.Signature(
            [_parameter(name, field) for name, field in fields.items()],
            return_annotation=inspect.signature(body).return_annotation,
        )
        # Prefect reads each parameter's description from the docstring's Args section.
        described = [
            f"    {name}: {' '.join(field.description.split())}" for name, field in fields.items() if field.description
        ]
        body.__doc__ = inspect.cleandoc(body.__doc__ or "") + "\n\nArgs:\n" + "\n".join(described)
        return body

    return with_signature


def _parameter(name: str, field) -> inspect.Parameter:
    # The constraints (ge, le, ...) travel in Annotated; the default stays the parameter's own.
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    default = inspect.Parameter.empty if field.default is PydanticUndefined else field.default
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def config_fields(config_type: type[BaseModel]) -> dict[str, FieldInfo]:
    """A config's options by their flat names: a sectioned config's (TrainConfig.options), else its fields."""
    if hasattr(config_type, "options"):
        return {name: field for name, (_, _, field) in config_type.options().items()}
    return dict(config_type.model_fields)


def add_config_options(
    parser: argparse.ArgumentParser, config_type: type[BaseModel], positional: tuple[str, ...] = ()
) -> None:
    """Adds one command-line option per config option (`--fine-tune-epochs` for fine_tune_epochs),
    typed and described from its field; a boolean is a switch that turns its default around
    (`--fine-tune`, `--no-gate`). Options left out stay absent from the parsed arguments (give the
    parser `argument_default=argparse.SUPPRESS`), so the config's own defaults apply. The options
    named in `positional` are the command's arguments instead (a tuple of them: one or more)."""
    for name, field in config_fields(config_type).items():
        annotation = _without_none(field.annotation)
        if name in positional:
            several = get_origin(annotation) is tuple
            parser.add_argument(name, nargs="+" if several else None, metavar=name.upper(), help=_help(field))
            continue
        flag = (field.json_schema_extra or {}).get("flag")
        spelled = name.replace("_", "-")
        if annotation is bool:
            flag = flag or (f"--no-{spelled}" if field.default else f"--{spelled}")
            parser.add_argument(flag, dest=name, action="store_const", const=not field.default, help=_help(field))
            continue
        kind: dict[str, Any] = {"type": annotation if annotation in (int, float) else str}
        if get_origin(annotation) is Literal:
            kind = {"choices": get_args(annotation)}
        elif get_origin(annotation) is tuple:
            kind = {"type": _comma_separated}
        parser.add_argument(flag or f"--{spelled}", dest=name, required=field.is_required(), help=_help(field), **kind)


def _without_none(annotation):
    """`X` for `Optional[X]`; any other annotation as it is."""
    if get_origin(annotation) in (Union, UnionType):
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return annotation


def _help(field: FieldInfo) -> str:
    bounds = [
        f"{symbol} {getattr(limit, key)}" for limit in field.metadata for key, symbol in _BOUNDS if hasattr(limit, key)
    ]
    default = "" if field.is_required() or field.default is None or isinstance(field.default, bool) else field.default
    notes = ([f"default {default}"] if default != "" else []) + ([", ".join(bounds)] if bounds else [])
    # argparse formats help with %: a literal percent sign must be doubled.
    return ((field.description or "") + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _comma_separated(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
