"""The effective configuration of a run: YAML file, then command-line overrides, then defaults."""

from __future__ import annotations

import dataclasses
import functools
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_MODEL = "google/siglip2-base-patch16-naflex"
DEVICES = ("auto", "cpu", "cuda", "mps")
OUTPUT_FORMATS = ("jsonl", "pkl")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("local", "ray")
# A config file is a handful of keys; anything bigger is a mistake or an attack.
MAX_CONFIG_BYTES = 1 << 20
# Bounds on the YAML document, checked while it is composed, before any value is built.
# An alias repeats a node without repeating its text, so a few hundred bytes can stand for
# billions of values (a "billion laughs"); PyYAML shares aliased values, but its merge key
# (<<) copies them, and anything that walks the values expands them. Values are counted as
# if every alias were expanded. Deep nesting would exhaust Python's stack in the composer.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32
# Pillow's own default (Image.MAX_IMAGE_PIXELS), written out so that reading the config
# does not import Pillow.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class Config:
    """Everything a run needs to know. Field names are the YAML keys."""

    input_dirs: tuple[str, ...] = ()
    output_file: str | None = None
    model_name: str = DEFAULT_MODEL
    batch_size: int = 32
    device: str = "auto"
    output_format: str | None = None  # None: from the output file's suffix, else jsonl
    log_level: str = "INFO"
    reindex: bool = False
    source_index: str | None = None  # None: the output file
    state_db: str | None = None  # None: next to the output file, suffix .sqlite
    include_hidden: bool = False
    follow_symlinks: bool = False
    workers: int | None = None  # None: the number of usable CPU cores; 0: decode in-process
    dtype: str = "auto"  # auto: bfloat16/float16 on CUDA, float32 elsewhere
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images fail as decompression bombs
    engine: str = "local"  # ray: decode and embed on a Ray cluster (the ray extra)
    ray_address: str | None = None  # None: join the local Ray instance, or start one
    ray_workers: int | None = None  # model actors; None: one per GPU of the cluster, or 1 without GPUs
    ray_gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0

    # Derived values, after validate().
    @property
    def output_path(self) -> Path:
        assert self.output_file is not None
        return absolute(self.output_file)

    @property
    def resolved_output_format(self) -> str:
        if self.output_format:
            return self.output_format
        return "pkl" if self.output_path.suffix.lower() in (".pkl", ".pickle") else "jsonl"

    @property
    def state_db_path(self) -> Path:
        if self.state_db:
            return absolute(self.state_db)
        return self.output_path.with_suffix(".sqlite")

    @property
    def source_index_path(self) -> Path:
        return absolute(self.source_index) if self.source_index else self.output_path

    @property
    def input_paths(self) -> tuple[Path, ...]:
        return tuple(absolute(d) for d in self.input_dirs)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Values are quoted in error messages through a bounded repr: a YAML alias bomb (billion
# laughs) is a small object graph whose full repr() would be exponentially large.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _short(value: Any) -> str:
    return _SHORT.repr(value)


_CHOICES = {"device": DEVICES, "output_format": OUTPUT_FORMATS, "log_level": LOG_LEVELS, "dtype": DTYPES,
            "engine": ENGINES}


def absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute and normalised (no '..', no '.'), without resolving symlinks.

    Symlinks are kept so that a file is stored under the path the user reaches it by;
    scan.py resolves them only to detect a file reached twice.
    """
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def looks_like_path(name: str) -> bool:
    """Whether a model name is a local folder: hub ids are "org/name"; anything absolute,
    relative-dotted or home-based is a folder."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.sep + os.sep in name


class _YamlRefused(Exception):
    """A YAML document that is valid but too large, too deep or self-referential."""

    def __init__(self, problem: str, line: int, key: str | None) -> None:
        where = f"the value of {_short(key)}" if key is not None else "the document"
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
                None, None, f"the tag {_short(tag)} is not allowed (a config file holds plain values only)",
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


def _check_value(key: str, value: Any, source: str) -> Any:
    """Type-check and normalise one value; source names where it came from for the error."""
    where = f"{key} in {source}" if source != "command line" else f"--{key.replace('_', '-')}"

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where} must be {expected}, got {type(value).__name__} {_short(value)}")

    if key == "input_dirs":
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise wrong("a list of directory paths")
        return tuple(os.fspath(v) for v in value)
    if key in ("reindex", "include_hidden", "follow_symlinks"):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if key == "workers":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if not 0 <= value <= 256:
            raise ConfigError(f"{where} must be between 0 and 256, got {value}")
        return value
    if key == "ray_workers":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if not 1 <= value <= 4096:
            raise ConfigError(f"{where} must be between 1 and 4096, got {value}")
        return value
    if key == "ray_gpus_per_worker":
        # A fraction packs several model actors on one GPU.
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        if not 0 <= value <= 64:
            raise ConfigError(f"{where} must be between 0 and 64, got {value}")
        return float(value)
    if key == "batch_size":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if not 1 <= value <= 65536:
            raise ConfigError(f"{where} must be between 1 and 65536, got {value}")
        return value
    if key == "max_image_pixels":
        # No "unlimited": that would let one file take all the memory there is.
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if value < 1:
            raise ConfigError(f"{where} must be a positive number of pixels, got {value}")
        return value
    # The remaining keys are strings (or null for the optional ones).
    if value is None and _FIELDS[key].default is None:
        return None
    if not isinstance(value, str) or not value:
        raise wrong("a non-empty string")
    if key in _CHOICES:
        choices = _CHOICES[key]
        normalised = value.upper() if key == "log_level" else value.lower()
        if normalised not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {_short(value)}")
        return normalised
    return value


def build(yaml_values: dict[str, Any] | None, cli_values: dict[str, Any], *, source: str = "config file") -> Config:
    """Merge YAML values and command-line overrides (None = not given) into a valid Config."""
    merged: dict[str, Any] = {}
    for key, value in (yaml_values or {}).items():
        if key not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"unknown key {_short(key)} in {source} (known keys: {known})")
        merged[key] = _check_value(key, value, source)
    for key, value in cli_values.items():
        if value is None or (key == "input_dirs" and not value):
            continue
        merged[key] = _check_value(key, value, "command line")
    config = Config(**merged)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that need the file system; all of them run before any model is loaded."""
    if not config.input_dirs:
        raise ConfigError("no input directories: pass -i DIR or set input_dirs in the config file")
    if not config.output_file:
        raise ConfigError("no output file: pass -o FILE or set output_file in the config file")
    for raw, path in zip(config.input_dirs, config.input_paths):
        if not path.exists():
            raise ConfigError(f"input directory {raw} does not exist")
        if not path.is_dir():
            raise ConfigError(f"input directory {raw} is not a directory")
    out = config.output_path
    if out.is_dir():
        raise ConfigError(f"output file {config.output_file} is a directory")
    if not out.parent.is_dir():
        raise ConfigError(f"folder of output file {config.output_file} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"folder of output file {config.output_file} is not writable")
    if config.state_db_path == out:
        raise ConfigError(f"state_db and output_file are the same file: {out}")
    if config.source_index and not config.source_index_path.is_file():
        raise ConfigError(f"source index {config.source_index} does not exist")
