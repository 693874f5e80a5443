"""Reading a YAML config file safely: a size cap, plain values only, and bounds on the
document checked while it is composed, before any value is built."""

from __future__ import annotations

import functools
import os
import reprlib
from pathlib import Path
from typing import Any

from .errors import ConfigError

# A config file is a handful of keys; anything bigger is a mistake or an attack.
MAX_CONFIG_BYTES = 1 << 20
# An alias repeats a node without repeating its text, so a few hundred bytes can stand for
# billions of values (a "billion laughs"); PyYAML shares aliased values, but its merge key
# (<<) copies them, and anything that walks the values expands them. Values are counted as
# if every alias were expanded. Deep nesting would exhaust Python's stack in the composer.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32

# Values are quoted in error messages through a bounded repr: a YAML alias bomb (billion
# laughs) is a small object graph whose full repr() would be exponentially large.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def short_repr(value: Any) -> str:
    """repr() bounded in length and depth, for quoting a hostile value in a message."""
    return _SHORT.repr(value)


class _YamlRefused(Exception):
    """A YAML document that is valid but too large, too deep or self-referential."""

    def __init__(self, problem: str, line: int, key: str | None) -> None:
        where = f"the value of {short_repr(key)}" if key is not None else "the document"
        super().__init__(f"{where} {problem}")
        self.line = line


@functools.lru_cache(maxsize=None)
def _bounded_loader() -> type:
    """yaml.SafeLoader (plain values only: no python/ tags) that refuses documents that
    expand past MAX_YAML_VALUES values or nest past MAX_YAML_DEPTH levels."""
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._depth = 0
            self._key: str | None = None  # the top-level key being read, for messages
            # id(node) -> (node, its value count with aliases expanded); the node is kept
            # so that its id is not reused.
            self._weights: dict[int, tuple[Any, int]] = {}

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self._depth == 1 and parent is not None and isinstance(index, yaml.ScalarNode):
                self._key = str(index.value)
            event = self.peek_event()
            line = event.start_mark.line + 1
            alias = isinstance(event, yaml.AliasEvent)
            if self._depth >= MAX_YAML_DEPTH:
                raise _YamlRefused(f"is nested more than {MAX_YAML_DEPTH} levels deep", line, self._key)
            self._depth += 1
            try:
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            known = self._weights.get(id(node))
            if alias:
                # An alias to a node that is still being composed: a structure that
                # contains itself, which no config value is.
                if known is None:
                    raise _YamlRefused("refers to itself through an alias", line, self._key)
                return node
            weight = 1
            if isinstance(node, yaml.SequenceNode):
                weight += sum(self._weights[id(item)][1] for item in node.value)
            elif isinstance(node, yaml.MappingNode):
                weight += sum(self._weights[id(k)][1] + self._weights[id(v)][1] for k, v in node.value)
            if weight > MAX_YAML_VALUES:
                raise _YamlRefused(
                    f"expands to more than {MAX_YAML_VALUES} values through aliases (a billion-laughs bomb?)",
                    line, self._key,
                )
            self._weights[id(node)] = (node, weight)
            return node

        def construct_undefined(self, node: Any) -> Any:
            tag = str(node.tag)
            if tag.startswith("tag:yaml.org,2002:"):
                tag = "!!" + tag[len("tag:yaml.org,2002:"):]
            raise yaml.constructor.ConstructorError(
                None, None, f"the tag {short_repr(tag)} is not allowed (a config file holds plain values only)",
                node.start_mark,
            )

    BoundedSafeLoader.add_constructor(None, BoundedSafeLoader.construct_undefined)
    return BoundedSafeLoader


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML config file with the safe loader (bounded: see MAX_YAML_VALUES) into a
    plain dict."""
    import yaml

    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory")
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        loaded = yaml.load(data, Loader=_bounded_loader())  # noqa: S506 - a SafeLoader subclass
    except _YamlRefused as e:
        raise ConfigError(f"config file {p} is refused (line {e.line}): {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML{line}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, not a {type(loaded).__name__}")
    return loaded
