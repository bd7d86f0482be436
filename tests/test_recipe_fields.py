"""No dead configuration: every field of the recipe schema (every section, every registered
component's spec) is read somewhere in the package, beyond its own declaration."""

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from stcli.components.recipe import Recipe

PACKAGE = Path(__file__).resolve().parents[1] / "stcli"
DECLARATION = re.compile(r"^\s+\w+\s*:\s*[^=\s]")  # `    field: type = default` in a class body

# Fields that no code names but that are consumed another way, each with the reason.
REVIEWED: dict[str, str] = {}


def package_source() -> str:
    """The package's code without field declarations (a field's own line does not read it)."""
    return "\n".join(line for p in sorted(PACKAGE.rglob("*.py")) for line in p.read_text().splitlines()
                     if not DECLARATION.match(line) or "def " in line)


def models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def unread_fields(root: type[BaseModel], source: str) -> list[str]:
    """Fields of `root` and every model it nests (union members included) that `source`
    never reads as `.field`, `"field"` or `field=`."""
    seen, unread, todo = set(), [], [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, field in cls.model_fields.items():
            key = f"{cls.__name__}.{name}"
            read = re.search(rf"\.{name}\b|[\"']{name}[\"']|\b{name}=", source)
            if name != "name" and not read and key not in REVIEWED:
                unread.append(key)
            todo.extend(models_in(field.annotation))
    return sorted(unread)


def test_the_walker_finds_an_unread_field():
    class Inner(BaseModel):
        used_field: int = 0
        never_read_anywhere: int = 0

    class Outer(BaseModel):
        inner: Inner | None = None

    assert unread_fields(Outer, "x.used_field + y.inner") == ["Inner.never_read_anywhere"]


def test_every_recipe_field_is_read():
    assert unread_fields(Recipe, package_source()) == []
