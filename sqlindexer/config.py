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
ENGINES = ("local", "ray")
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

_CHOICES = {"device": DEVICES, "output_format": OUTPUT_FORMATS, "log_level": LOG_LEVELS, "dtype": DTYPES,
            "engine": ENGINES}


def absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute and normalised (no '..', no '.'), without resolving symlinks.

    Symlinks are kept so that a file is stored under the path the user reaches it by;
    scan.py resolves them only to detect a file reached twice.
    """
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


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
