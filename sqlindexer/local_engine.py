"""Embedding on this machine: decode workers feed the model, batch by batch.

The same shape as ray_engine: pending files in, batches of results out (vectors set,
nothing committed: the run checks and commits each batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

from . import images, state
from .config import Config
from .decode import Decoder, DecodeOptions, Prepared, usable_cpus


def workers(config: Config) -> int:
    return config.workers if config.workers is not None else usable_cpus()


def describe(config: Config) -> str:
    """How the images/s figure was reached, for the run's log line."""
    return f"{workers(config)} decode workers"


def embed(config: Config, options: DecodeOptions, pending: Iterator[state.Pending], embedder: Any, *,
          started: Callable[[], None]) -> Iterator[list[state.Result]]:
    """started() is called once the model is ready, before the first batch is embedded."""
    n = workers(config)
    # The weights load in a thread while the first images decode in the workers.
    with ThreadPoolExecutor(1) as loader, Decoder(options, workers=n, ahead=2 * config.batch_size + n) as decoder:
        loading = loader.submit(embedder.load)
        stream = decoder.map(pending, lambda p: p.path)
        while batch := list(islice(stream, config.batch_size)):
            loading.result()
            started()
            yield _embed_batch(batch, embedder)


def _embed_batch(batch: list[tuple[state.Pending, Prepared]], embedder: Any) -> list[state.Result]:
    results: list[state.Result] = []
    ready: list[tuple[state.Result, Any]] = []
    for item, p in batch:
        result = state.Result(item, width=p.width, height=p.height, exif=p.exif, error=p.error, content=p.content)
        # A file that changed since the scan is not worth embedding (the run drops it).
        if result.error is None and images.stat_matches(item.path, item.size, item.mtime_ns):
            ready.append((result, p.pixels))
        results.append(result)
    if ready:
        vectors = embedder.embed_resized([pixels for _, pixels in ready])
        blobs = state.vector_blobs(vectors, dim=embedder.dim, model=embedder.model_name)
        for (result, _), blob in zip(ready, blobs):
            result.vector = blob
    return results
