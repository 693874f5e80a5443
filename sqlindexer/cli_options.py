"""The index command's options, made from config.FIELDS: one Click option per field, so
that a setting's flag, type, bounds, default and help are declared in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import config as cfg

F = TypeVar("F", bound=Callable[..., Any])


class _Checked(click.ParamType):
    """Click's own parsing of the text (an integer, a number, a string), then config.check(),
    so that a bad value is refused as a usage error in the same words as in a YAML file."""

    def __init__(self, field: cfg.Field) -> None:
        self.field = field
        self.base = {int: click.INT, float: click.FLOAT}.get(field.kind, click.STRING)
        self.name = self.base.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = self.base.convert(value, param, ctx)
        try:
            # A list option gets one item at a time.
            checked = cfg.check(self.field, (value,) if self.field.kind is list else value)
        except cfg.InvalidValue as e:
            self.fail(str(e), param, ctx)
        return value if self.field.kind is list else checked


class _FieldOption(click.Option):
    """Shows the field's bounds in --help the way click shows an IntRange's: [x>=1]."""

    def __init__(self, *args: Any, field: cfg.Field, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.field = field

    def get_help_extra(self, ctx: click.Context) -> Any:  # click >= 8.2; older ones show no range
        extra = super().get_help_extra(ctx)
        low, high = self.field.min, self.field.max
        if low is not None and high is not None:
            extra["range"] = f"{low}<=x<={high}"
        elif low is not None or high is not None:
            extra["range"] = f"x>={low}" if low is not None else f"x<={high}"
        return extra


def _option(field: cfg.Field) -> Callable[[F], F]:
    flag = f"{field.flag}/--no-{field.flag[2:]}" if field.kind is bool else field.flag
    decls = [field.name, *([field.short] if field.short else []), flag]
    kwargs: dict[str, Any] = {"cls": _FieldOption, "field": field, "help": field.help, "metavar": field.metavar}
    if field.kind is not bool:
        kwargs["type"] = click.Choice(field.choices, case_sensitive=False) if field.choices else _Checked(field)
    if field.kind is list:
        kwargs["multiple"] = True
    has_default = field.default is not None and field.default != ()
    if has_default:
        kwargs["default"] = field.default
    kwargs["show_default"] = field.default_text or has_default
    return click.option(*decls, **kwargs)


def field_option(name: str) -> Callable[[F], F]:
    """The option of one config field, for another command that takes the same setting."""
    return _option(cfg.FIELDS_BY_NAME[name])


def index_options(f: F) -> F:
    """Adds one option per config field, in FIELDS order. The defaults are there for --help:
    index() keeps only the options typed on the command line, and config.build() applies the
    defaults like any other value."""
    for field in reversed(cfg.FIELDS):
        f = _option(field)(f)
    return f
