"""One small Registry type, and one registry per buildable kind.

A registry entry is a pydantic model (a *spec*): its fields are the recipe fields of that
component, its ``name`` field is a ``Literal`` equal to the registry name, and its
``create(**context)`` returns the working object (the spec itself for SDEs and truncation
distributions; a module, dataset or callable for the others).  The recipe schema is the
discriminated union of every spec of a registry, so recipe sections and registry names can
never drift apart.  The models that hold such unions are marked with `live_unions`: registering
a component later (from a user's own package, after `import stcli.components.recipe`) rebuilds them, so
recipes accept it at once.
"""

from __future__ import annotations

import difflib
import importlib
import types
from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from stcli.infra.errors import UserError


def _scalars(annotation) -> set:
    """The kinds of value a field annotation accepts: its types, the types of its Literal
    values, and `list` for a list or tuple."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _scalars(args[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_scalars(a) for a in args))
    if origin is Literal:
        return {type(a) for a in args}
    return {list} if origin in (list, tuple) else {annotation}


def _items(annotation) -> set:
    """The kinds of value the items of a list field accept (empty for other fields)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _items(args[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_items(a) for a in args))
    if origin not in (list, tuple):
        return set()
    return set().union(*(_scalars(a) for a in args if a is not Ellipsis))


BIGGEST_WHOLE = 2**63  # a whole-number setting stops below (a seed, a count: int64)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _not_a_number(value: Any, kinds: set) -> str | None:
    """Why `value` is refused by a number field accepting `kinds` (None: it is not refused)."""
    if not kinds & {int, float} or bool in kinds:
        return None
    if isinstance(value, bool):
        return "is a boolean, not a number"
    if isinstance(value, str) and str not in kinds and _numeric(value):
        return "is text, not a number (write it without quotes)"  # other text: pydantic says it
    if float not in kinds and isinstance(value, int | float) and abs(value) >= BIGGEST_WHOLE:
        return "is too large (whole-number settings stop at 2^63)"
    return None


class Strict(BaseModel):
    """Recipe models: unknown fields are errors, values immutable and finite, and a boolean is
    not a number (pydantic would read `steps: true` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """A number field refuses a boolean, quoted text and (whole numbers) values past 2^53:
        pydantic would read `steps: true` as 1 and `hidden: "32"` as 32."""
        if not isinstance(data, dict):
            return data
        for name, info in cls.model_fields.items():
            value = data.get(name)
            listed = isinstance(value, list | tuple) and list in _scalars(info.annotation)
            kinds = _items(info.annotation) if listed else _scalars(info.annotation)
            for item in value if listed else [value]:
                why = _not_a_number(item, kinds)
                if why is not None:
                    shown = str(item).lower() if isinstance(item, bool) else repr(item)
                    where = f" (in {str(value).lower()})" if listed else ""
                    raise PydanticCustomError("not_a_number", "{value} " + why + where,
                                              {"field": name, "value": shown})
        return data


class Component(Strict):
    """Base of every registry entry: strict (unknown fields are errors) and immutable."""

    name: str

    def create(self, **context: Any) -> Any:
        if context:
            raise TypeError(f"{type(self).__name__} takes no build context, got {sorted(context)}")
        return self


C = TypeVar("C", bound=Component)


def _literal_name(cls: type[Component]) -> str:
    annotation = cls.model_fields["name"].annotation
    if get_origin(annotation) is not Literal or len(get_args(annotation)) != 1:
        raise TypeError(f"{cls.__name__}.name must be annotated as Literal['<registry name>']")
    return get_args(annotation)[0]


class Registry(Generic[C]):
    """Maps names to component specs; validates parameters; says what exists."""

    def __init__(self, kind: str, *modules: str):
        self.kind, self.modules = kind, modules  # importing `modules` registers the entries
        self._entries: dict[str, type[C]] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(module)

    def register(self, cls: type[C]) -> type[C]:
        name = _literal_name(cls)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = cls
        _rebuild(self)
        return cls

    def unregister(self, name: str) -> None:
        """Remove entry `name` (a plugin's, e.g. at the end of a test); recipes refuse it again."""
        del self._entries[name]
        _rebuild(self)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def spec(self, name: str) -> type[C]:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}.{hint}"
            )
        return self._entries[name]

    def validate(self, name: str, **params: Any) -> C:
        """The validated spec of ``name`` with ``params`` (a clear UserError otherwise)."""
        cls = self.spec(name)
        try:
            return cls.model_validate({"name": name, **params})
        except ValidationError as err:
            raise UserError(format_validation_error(err, prefix=self.kind)) from None

    def build(self, name: str, **params: Any) -> Any:
        """Validate the spec's own fields from ``params`` and create it with the rest as context."""
        fields = self.spec(name).model_fields
        own = {k: v for k, v in params.items() if k in fields}
        context = {k: v for k, v in params.items() if k not in fields}
        return self.validate(name, **own).create(**context)

    def union(self) -> Any:
        """The pydantic type of a recipe section: one of the registered specs, by ``name``."""
        members = tuple(self._entries[n] for n in self.names())
        if len(members) == 1:
            return members[0]
        return Annotated[Union[members], Field(discriminator="name")]  # noqa: UP007


# (model, field, registry, optional) of every field typed by a registry union, in definition order
_LIVE: list[tuple[type[BaseModel], str, Registry, bool]] = []


def live_unions(**fields: Registry) -> Callable[[type[BaseModel]], type[BaseModel]]:
    """Class decorator: `fields` (name=registry) are that registry's union (or None, if the
    field's default is None) and follow later registrations."""

    def mark(cls: type[BaseModel]) -> type[BaseModel]:
        for name, registry in fields.items():
            _LIVE.append((cls, name, registry, cls.model_fields[name].default is None))
        return cls

    return mark


def _rebuild(changed: Registry) -> None:
    """Retype the fields of `changed`'s union, then rebuild every live model (the later ones
    embed the earlier ones' schemas)."""
    if not any(registry is changed for _, _, registry, _ in _LIVE):
        return
    for cls, name, registry, optional in _LIVE:
        if registry is changed:
            field, union = cls.model_fields[name], registry.union()
            if optional:  # the discriminated union inside Optional
                field.annotation, field.discriminator = Union[union, None], None  # noqa: UP007
                continue
            args = get_args(union) if get_origin(union) is Annotated else (union,)
            field.annotation = args[0]
            field.discriminator = next((m.discriminator for m in args[1:]
                                        if isinstance(m, FieldInfo)), None)
    for cls in dict.fromkeys(cls for cls, _, _, _ in _LIVE):
        cls.model_rebuild(force=True)


def format_validation_error(err: ValidationError, prefix: str = "", data: Any = None) -> str:
    """One line per problem: the dotted path of the field, then what is wrong with it."""
    lines = []
    for e in err.errors():
        path = _dotted(e["loc"], data)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "not_a_number":  # raised for the model: name the field
            path = ".".join(p for p in (path, e["ctx"]["field"]) if p)
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path, tag = f"{path}.name".lstrip("."), e.get("ctx", {}).get("tag")
            expected = e.get("ctx", {}).get("expected_tags", "")
            msg = (f"unknown name {tag!r}" if tag else "missing") + f"; available: {expected}"
        where = ".".join(p for p in (prefix, path) if p) or "(top level)"
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def _dotted(loc: tuple, data: Any) -> str:
    """Dotted path of a pydantic error location, leaving out discriminator tags."""
    parts, node = [], data
    for p in loc:
        is_tag = isinstance(node, dict) and p not in node and node.get("name") == p
        if is_tag or (isinstance(p, str) and "[" in p):  # a union member's tag or label
            continue
        parts.append(str(p))
        if isinstance(node, dict):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            node = None
    return ".".join(parts)


SDES: Registry = Registry("sde", "stcli.components.sdes")
NETS: Registry = Registry("net", "stcli.components.nets")
TRUNCATIONS: Registry = Registry("truncation", "stcli.components.truncation")
SAMPLERS: Registry = Registry("sampler", "stcli.components.samplers")
METRICS: Registry = Registry("metric", "stcli.components.metrics")
DATASETS: Registry = Registry("dataset", "stcli.components.data")
TARGETS: Registry = Registry("target", "stcli.components.targets", "stcli.components.stf")
LOGGERS: Registry = Registry("logger", "stcli.components.tracking")
