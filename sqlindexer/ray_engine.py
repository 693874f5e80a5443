"""--engine ray: decode and embed the work list on a Ray cluster.

Only the work list (id, path, size, mtime of each pending file) goes to Ray Data: decoding
runs as CPU tasks (decode.prepare, as the local decode workers run it), embedding in a
pool of actors that each load the model once (embed.Embedder). Results stream back to the
driver in whatever order they finish, and run.py checks and commits each batch as it
arrives: the SQLite database is only ever written by the driver. A result that never comes
back (a driver killed, a job that failed) leaves its file pending, and the next run with
the same command embeds it. A --reindex gives files whose content the database holds
their vectors in the driver first (reuse.py): only what is left goes to the cluster, whose
decode tasks hash the bytes they decode, as the local workers do.

Ray is imported here only, and only when this engine is used: the local engine never
needs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import signals, state
from .config import Config
from .errors import IndexerError, RayError, one_line
from .decode import DecodeOptions, prepare

log = logging.getLogger(__name__)

MISSING_RAY = "--engine ray needs Ray: pip install 'image-indexer[ray]'"
# Images per decode task batch: small, so that decoded images reach the model actors early
# and a task lost with its node costs little to redo.
DECODE_BATCH = 8
# CPUs a decode task reserves: two per core, so that one decodes while the other waits on
# shared storage. (It also keeps Ray Data from fusing decoding into the model actors on a
# cluster without GPUs, where both would otherwise ask for one CPU.)
DECODE_CPUS = 0.5
# Work-list blocks handed to Ray Data: enough for every CPU of a large cluster to take
# some, few enough that scheduling them costs nothing next to decoding.
MAX_BLOCKS = 2000


def require_ray() -> None:
    """Fail at once, before any scan, when the ray extra is not installed; nothing is imported."""
    import importlib.util

    for name in ("ray", "pyarrow"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise RayError(MISSING_RAY)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra, not only ray core
    except ImportError:
        raise RayError(MISSING_RAY) from None
    return ray


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """ray.init(address) for the length of the block; a Ray already initialised in this
    process (a test, a notebook) is used as it is and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # ray.init installs its own SIGTERM handler in the driver; the CLI's (it records the
    # run as interrupted, then the generator's exit shuts Ray down) stays in charge.
    with signals.keep_sigterm():
        try:
            # Worker output stays in the cluster's log files: the CLI's stderr is for our
            # messages, and a failed task reaches the driver as an exception anyway.
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - connection, auth and start-up errors alike
            raise RayError(f"cannot start or join Ray at {address or 'this machine'}: {one_line(e, named=True)}") from None
    try:
        yield ray
    finally:
        with signals.keep_sigterm():
            ray.shutdown()


def _sizes(ray: Any, config: Config) -> tuple[float, int]:
    """(GPUs per model actor, number of model actors) for this cluster."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_worker = config.ray_gpus_per_worker
    if per_worker is None:
        per_worker = 1.0 if gpus else 0.0
    if per_worker > 0 and gpus < per_worker:
        raise RayError(f"--ray-gpus-per-worker {per_worker:g} but the Ray cluster has {gpus:g} GPUs")
    workers = config.ray_workers
    if workers is None:
        workers = max(1, int(gpus // per_worker)) if per_worker else 1
    return per_worker, workers


def check_nodes(ray: Any, config: Config) -> None:
    """Every alive node must see the input directories (and a model given as a folder) at
    the same paths as this machine: images are read where they are decoded."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted = [str(p) for p in config.input_paths]
    model = os.path.expanduser(config.model_name)
    if os.path.isdir(model):
        wanted.append(os.path.abspath(model))
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing_dirs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    futures = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(wanted)
        for n in nodes
    ]
    try:
        found = ray.get(futures)
    except Exception as e:  # noqa: BLE001 - a node lost while probing, a worker that cannot start
        raise RayError(f"cannot check the paths on the Ray nodes: {_ray_cause(e)}") from None
    for node, (host, missing) in zip(nodes, found):
        if missing:
            raise RayError(f"Ray node {host} ({node.get('NodeManagerAddress')}) cannot see {missing[0]}: image and "
                           f"model paths must be the same on every node (shared storage)")


def _missing_dirs(paths: list[str]) -> tuple[str, list[str]]:
    return socket.gethostname(), [p for p in paths if not os.path.isdir(p)]


def describe(config: Config) -> str:
    """How the images/s figure was reached, for the run's log line."""
    return "on Ray, actor start-up included"


def embed(config: Config, options: DecodeOptions, pending: Iterable[state.Pending], embedder: Any, *,
          started: Callable[[], None] = lambda: None) -> Iterator[list[state.Result]]:
    """Yield the results of the pending files, a batch at a time, as the cluster finishes
    them (in no particular order). Vectors are set; the driver re-checks each file."""
    work = [{"id": p.id, "path": p.path, "size": p.size, "mtime_ns": p.mtime_ns} for p in pending]
    if not work:
        return
    with connected(config.ray_address) as ray:
        check_nodes(ray, config)
        per_worker, workers = _sizes(ray, config)
        log.info("embedding %d images on Ray: %d model actors, %g GPUs each", len(work), workers, per_worker)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        blocks = max(1, min(MAX_BLOCKS, math.ceil(len(work) / DECODE_BATCH)))
        ds = ray.data.from_items(work, override_num_blocks=blocks)
        del work
        ds = ds.map_batches(_decode_batch, fn_kwargs={"options": options}, batch_size=DECODE_BATCH,
                            batch_format="pyarrow", num_cpus=DECODE_CPUS)
        # Without GPUs an actor stands for one on a CPU (tests, a CPU cluster): it holds a
        # core, so the decode tasks never take them all.
        ds = ds.map_batches(_EmbedActor, batch_size=config.batch_size, batch_format="pyarrow",
                            fn_constructor_kwargs={"model_name": config.model_name, "device": config.device,
                                                   "dtype": config.dtype, "dim": embedder.dim,
                                                   "backend": config.backend},
                            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=per_worker,
                            num_cpus=1 if not per_worker else None)
        started()
        try:
            # batch_size=None: each block as the actors produced it, committed as it comes.
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                yield [_result(row) for row in table.to_pylist()]
        except IndexerError:
            raise
        except Exception as e:  # noqa: BLE001 - RayTaskError, RayActorError, lost nodes...
            raise RayError(f"the Ray job failed (what was committed is kept; run the same command to resume): "
                           f"{_ray_cause(e)}") from None


def _ray_cause(e: BaseException) -> str:
    # A RayTaskError wraps the worker's exception; its own text is a long traceback.
    cause = getattr(e, "cause", None)
    return one_line(cause if isinstance(cause, BaseException) else e, named=True)


def _result(row: dict[str, Any]) -> state.Result:
    item = state.Pending(row["id"], row["path"], row["size"], row["mtime_ns"])
    exif = json.loads(row["exif"]) if row["exif"] is not None else None
    return state.Result(item, vector=row["vector"], width=row["width"], height=row["height"], exif=exif,
                        error=row["error"], content=row["content"])


# -- on the cluster ----------------------------------------------------------------------
_DECODED = {"id": "int64", "path": "string", "size": "int64", "mtime_ns": "int64", "width": "int64",
            "height": "int64", "exif": "string", "error": "string", "content": "binary", "pixels": "binary",
            "shape": "list<int64>"}


def _decode_batch(batch: Any, options: DecodeOptions) -> Any:
    """Work rows -> decoded rows: the resized image as raw bytes and its shape, or an error."""
    import pyarrow as pa

    from . import images

    images.register_plugins()
    out: dict[str, list[Any]] = {k: [] for k in _DECODED}
    for row in batch.to_pylist():
        path = row["path"]
        try:
            os.stat(path)
        except OSError as e:
            # Not "disappeared": the driver saw it at scan time, so this node does not.
            p = None
            error = f"cannot be read on Ray node {socket.gethostname()}: {e.strerror or e} (image paths must be " \
                    f"the same on every node)"
        else:
            p = prepare(path, options)
            error = p.error
        for key in ("id", "path", "size", "mtime_ns"):
            out[key].append(row[key])
        ok = p is not None and p.error is None
        out["width"].append(p.width if p is not None else None)
        out["height"].append(p.height if p is not None else None)
        # Plain JSON: it crosses the cluster as text, not as a pickle.
        out["exif"].append(state.exif_json(p.exif) if p is not None else None)
        out["error"].append(error)
        out["content"].append(p.content if ok else None)
        out["pixels"].append(p.pixels.tobytes() if ok else None)
        out["shape"].append(list(p.pixels.shape) if ok else None)
    return pa.table(out, schema=_schema(_DECODED))


def _schema(columns: dict[str, str]) -> Any:
    import pyarrow as pa

    types = {"int64": pa.int64(), "string": pa.string(), "binary": pa.binary(), "list<int64>": pa.list_(pa.int64())}
    return pa.schema([(name, types[kind]) for name, kind in columns.items()])


_EMBEDDED = {"id": "int64", "path": "string", "size": "int64", "mtime_ns": "int64", "width": "int64",
             "height": "int64", "exif": "string", "error": "string", "content": "binary", "vector": "binary"}


class _EmbedActor:
    """One model per actor (per GPU), loaded once, embedding decoded rows batch by batch."""

    def __init__(self, model_name: str, device: str, dtype: str, dim: int, backend: str = "auto") -> None:
        from .embed import Embedder

        self.embedder = Embedder(model_name, device=device, dtype=dtype, backend=backend).load()
        self.dim = dim

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        rows = batch.to_pylist()
        vectors: list[bytes | None] = [None] * len(rows)
        ready = [(i, np.frombuffer(r["pixels"], dtype=np.uint8).reshape(r["shape"]))
                 for i, r in enumerate(rows) if r["error"] is None]
        if ready:
            # The same path as the local engine: decoded at target size, packed into patches.
            found = self.embedder.embed_resized([pixels for _, pixels in ready])
            # A whole vector or none: the bytes of one row of the batch's result.
            blobs = state.vector_blobs(found, dim=self.dim, model=self.embedder.model_name,
                                       where=f" on {socket.gethostname()}")
            for (i, _), blob in zip(ready, blobs):
                vectors[i] = blob
        out = {k: [r[k] for r in rows] for k in _EMBEDDED if k != "vector"}
        out["vector"] = vectors
        return pa.table(out, schema=_schema(_EMBEDDED))
