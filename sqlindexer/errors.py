"""Typed errors raised by the core; cli.py turns each into a one-line message."""


def one_line(e: BaseException, *, named: bool = False) -> str:
    """The first line of an exception's text (a library's message can run to a traceback),
    after its type's name when named."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not named:
        return lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class IndexerError(Exception):
    """Base class for every error the tool reports to the user."""


class ConfigError(IndexerError):
    """The configuration (YAML file or options) is missing, malformed or inconsistent."""


class SchemaTooNewError(IndexerError):
    """The working database was written by a newer version of the tool."""


class DatabaseError(IndexerError):
    """The working database cannot be opened, read or written."""


class SourceIndexError(IndexerError):
    """A --source-index file cannot be read or holds a record we do not understand."""


class ModelLoadError(IndexerError):
    """The embedding model or its image processor cannot be loaded."""


class DeviceError(IndexerError):
    """The requested compute device is not available."""


class ExportError(IndexerError):
    """The index file could not be written."""


class Interrupted(IndexerError):
    """The run was stopped by a signal; committed work is kept."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"interrupted by {name}; committed work is kept, run the same command to resume")
        self.signum = signum


class SearchError(IndexerError):
    """A query cannot be answered: no database, no vectors of the model, a bad query image."""


class LockedError(IndexerError):
    """Another run holds the working database."""


class EmbedError(IndexerError):
    """The model produced something the index cannot hold (e.g. vectors of another size)."""


class RayError(IndexerError):
    """--engine ray cannot run: Ray is missing, the cluster cannot be reached, a node cannot
    see the inputs, or the Ray job failed."""


class PageError(IndexerError):
    """A results page (--html) cannot be written where it was asked for."""


class BackendError(IndexerError):
    """The requested inference backend (--backend) cannot run here: OpenVINO is not
    installed, refuses this CPU, or was asked to run on a GPU."""
