"""The effective configuration of a run: YAML file, then command-line overrides, then defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .yaml_file import read_yaml  # noqa: F401 - part of this module's API (cli.py)
from .yaml_file import short_repr as _short

DEFAULT_MODEL = "google/siglip2-base-patch16-naflex"
DEVICES = ("auto", "cpu", "cuda", "mps")
OUTPUT_FORMATS = ("jsonl", "pkl")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "openvino")
ENGINES = ("local", "ray")
# Pillow's own default (Image.MAX_IMAGE_PIXELS), written out so that reading the config
# does not import Pillow.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class Field:
    """One setting, declared once: the Config field and YAML key `name`, the command-line
    option --name-with-dashes (and `short`), its type, bounds, default and help. Config,
    check() and the Click options (cli_options.py) are all made from FIELDS."""

    name: str
    kind: type  # bool, int, float, str, or list: a list of strings, kept as a tuple
    default: Any  # None: worked out during the run (default_text says how)
    help: str
    short: str | None = None  # a one-letter flag besides --name-with-dashes
    choices: tuple[str, ...] = ()  # for str; matched case-insensitively, kept as spelled here
    min: int | float | None = None  # for int and float, inclusive
    max: int | float | None = None
    metavar: str | None = None
    default_text: str | None = None  # what --help says for a default of None
    noun: str = ""  # for messages: what a list holds ("a list of directory paths"), what a number counts

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def annotation(self) -> Any:
        base: Any = tuple[str, ...] if self.kind is list else self.kind
        return base | None if self.default is None else base

    @property
    def range_text(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {self.min} and {self.max}"
        if self.min is not None:
            if self.min == 1 and self.kind is int:
                return f"a positive number of {self.noun}" if self.noun else "a positive integer"
            return f"at least {self.min}"
        return f"at most {self.max}"


FIELDS: tuple[Field, ...] = (
    Field("input_dirs", list, (), "Directories to scan recursively; repeat -i or list several after it.",
          short="-i", metavar="DIR...", noun="directory paths"),
    Field("output_file", str, None, "Index file to write (jsonl or pkl).", short="-o", metavar="FILE"),
    Field("model_name", str, DEFAULT_MODEL, "Hugging Face model id or local folder of a SigLIP 2 checkpoint.",
          metavar="NAME"),
    Field("batch_size", int, 32, "Images per model batch.", min=1, max=65536, metavar="N"),
    Field("device", str, "auto", "Where to run the model; auto picks CUDA, then MPS, then CPU.", choices=DEVICES),
    Field("output_format", str, None, "Index file format.", choices=OUTPUT_FORMATS,
          default_text="from the output suffix: .pkl -> pkl, else jsonl"),
    Field("log_level", str, "INFO", "Logging level (to stderr).", choices=LOG_LEVELS),
    Field("reindex", bool, False,
          "Only process new or modified files and drop deleted ones; unchanged files keep their vectors."),
    Field("source_index", str, None,
          "Existing index (ours or the original tool's, jsonl or pkl) whose vectors --reindex keeps.",
          metavar="FILE", default_text="the output file"),
    Field("state_db", str, None, "Working SQLite database of file state and vectors.", metavar="FILE",
          default_text="output file with suffix .sqlite"),
    Field("include_hidden", bool, False, "Also index hidden files and folders (names starting with '.')."),
    Field("follow_symlinks", bool, False, "Follow symlinks to directories (loops are detected)."),
    Field("exclude", list, (),
          "Skip files and folders matching this gitignore-style pattern, relative to each input directory "
          "(e.g. '@eaDir/', '*_thumb.jpg'); repeat for several. Files now excluded leave the index.",
          metavar="PATTERN", noun="gitignore patterns"),
    Field("workers", int, None, "Processes that decode and resize images ahead of the model; 0 decodes in-process.",
          min=0, max=256, metavar="N", default_text="number of usable CPU cores"),
    Field("dtype", str, "auto", "Model precision; auto is bfloat16 (or float16) on CUDA, and on a CPU bfloat16 "
          "where it computes it natively (AVX512-BF16, AMX, Arm BF16), else float32.", choices=DTYPES),
    Field("backend", str, "auto", "What runs the vision tower; auto is OpenVINO on a CPU where it is installed "
          "(pip install 'image-indexer[openvino]'), else torch.", choices=BACKENDS),
    # No maximum and no "unlimited": that would let one file take all the memory there is.
    Field("max_image_pixels", int, DEFAULT_MAX_IMAGE_PIXELS,
          "Larger images fail as decompression bombs (Pillow's limit).", min=1, metavar="N", noun="pixels"),
    Field("engine", str, "local",
          "Where to decode and embed: this machine, or a Ray cluster (pip install 'image-indexer[ray]').",
          choices=ENGINES),
    Field("ray_address", str, None, "Ray cluster for --engine ray: ray://host:10001, host:6379 or auto.",
          metavar="ADDRESS", default_text="the local Ray instance, started if none"),
    Field("ray_workers", int, None, "Model actors for --engine ray.", min=1, max=4096, metavar="N",
          default_text="one per GPU of the cluster, 1 without GPUs"),
    # A float: a fraction packs several model actors on one GPU.
    Field("ray_gpus_per_worker", float, None, "GPUs each model actor reserves (--engine ray).", min=0, max=64,
          metavar="G", default_text="1 if the cluster has GPUs, else 0"),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


class _Derived:
    """What Config works out from its fields, once validate() has passed."""

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


# A frozen dataclass with one field per Field, in FIELDS order, so that a new setting is
# one line in FIELDS. __module__ is set so that pickle (worker processes, Ray) finds it.
Config = dataclasses.make_dataclass(
    "Config",
    [(f.name, f.annotation, dataclasses.field(default=f.default)) for f in FIELDS],
    bases=(_Derived,),
    frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "Everything a run needs to know: one field per entry of FIELDS, named as the YAML key."},
)


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


class InvalidValue(ValueError):
    """A value that does not fit its Field. The message says what is wrong ("must be ...,
    got ..."), not where the value came from: build() and the Click options add that."""


def _wrong(expected: str, value: Any) -> InvalidValue:
    return InvalidValue(f"must be {expected}, got {type(value).__name__} {_short(value)}")


def check(field: Field, value: Any) -> Any:
    """The value type-checked against field and normalised: a list (or one string) to a
    tuple, an int to float for a float field, a choice to its spelling in field.choices."""
    if value is None and field.default is None:
        return None
    if field.kind is list:
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise _wrong(f"a list of {field.noun or 'strings'}", value)
        if not all(os.fspath(v) for v in value):
            raise InvalidValue("must not hold an empty string")
        return tuple(os.fspath(v) for v in value)
    if field.kind is bool:
        if not isinstance(value, bool):
            raise _wrong("true or false", value)
        return value
    if field.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if field.kind is int else (int, float)):
            raise _wrong("an integer" if field.kind is int else "a number", value)
        # Written so that NaN, which compares false with everything, is out of range.
        if not ((field.min is None or value >= field.min) and (field.max is None or value <= field.max)):
            raise InvalidValue(f"must be {field.range_text}, got {_short(value)}")
        return field.kind(value)
    if not isinstance(value, str) or not value:
        raise _wrong("a non-empty string", value)
    if field.choices:
        # Log levels are spelled in capitals, everything else in lower case.
        normalised = value.upper() if all(c.isupper() for c in field.choices) else value.lower()
        if normalised not in field.choices:
            raise InvalidValue(f"must be one of {', '.join(field.choices)}, got {_short(value)}")
        return normalised
    return value


def _checked(field: Field, value: Any, where: str) -> Any:
    try:
        return check(field, value)
    except InvalidValue as e:
        raise ConfigError(f"{where} {e}") from None


def build(yaml_values: dict[str, Any] | None, cli_values: dict[str, Any], *, source: str = "config file") -> Config:
    """Merge YAML values and command-line overrides (None or an empty list = not given)
    into a valid Config."""
    merged: dict[str, Any] = {}
    for key, value in (yaml_values or {}).items():
        field = FIELDS_BY_NAME.get(key)
        if field is None:
            known = ", ".join(sorted(FIELDS_BY_NAME))
            raise ConfigError(f"unknown key {_short(key)} in {source} (known keys: {known})")
        merged[key] = _checked(field, value, f"{key} in {source}")
    for key, value in cli_values.items():
        field = FIELDS_BY_NAME[key]
        if value is None or (field.kind is list and not value):
            continue
        merged[key] = _checked(field, value, field.flag)
    config = Config(**merged)
    validate(config)
    return config


def check_output_file(output_file: str) -> Path:
    """The absolute path of an index file to write; ConfigError if it cannot be written."""
    out = absolute(output_file)
    if problem := why_unwritable(out, f"output file {output_file}"):
        raise ConfigError(problem)
    return out


def why_unwritable(out: Path, name: str) -> str | None:
    """Why a file cannot be written at the absolute path out (called name in the message),
    or None when it can."""
    if out.is_dir():
        return f"{name} is a directory"
    if not out.parent.is_dir():
        return f"folder of {name} does not exist"
    if not os.access(out.parent, os.W_OK | os.X_OK):
        return f"folder of {name} is not writable"
    return None


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
    out = check_output_file(config.output_file)
    if config.state_db_path == out:
        raise ConfigError(f"state_db and output_file are the same file: {out}")
    if config.source_index and not config.source_index_path.is_file():
        raise ConfigError(f"source index {config.source_index} does not exist")
    if config.exclude:
        from .scan import exclude_spec

        try:
            exclude_spec(config.exclude)
        except ValueError as e:
            raise ConfigError(f"exclude pattern {e}") from None
