"""A flow's parameters are its config's fields, one by one.

A deployment run's parameters are merged with the deployment's own key by key, one level deep:
a flow taking one nested `config` parameter could not have a single field overridden (`--param
epochs=5`), and passing `config` replaced the whole dict, silently dropping the deployment's
other values. A flow decorated here takes every field of its config as a keyword parameter,
with the field's type, constraints and description (so the dashboard's run form shows each one),
and builds the one config object from them first thing.

"""

from __future__ import annotations

import inspect
from typing import Annotated, Callable, TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

Body = TypeVar("Body", bound=Callable)


def parameters_from(config_type: type[BaseModel]) -> Callable[[Body], Body]:
    """Gives a `def flow(**parameters)` the signature of `config_type`'s fields (keyword-only)."""

    def with_signature(body: Body) -> Body:
        fields = config_type.model_fields
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
