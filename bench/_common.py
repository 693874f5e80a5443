"""Helpers shared by the benchmarks: timing, peak RSS of child processes, result tables."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cli(*args: Any, env: dict[str, str] | None = None, check: bool = True) -> tuple[float, int, str]:
    """Run `python -m sqlindexer ARGS` in a child; return (seconds, peak RSS in bytes, stderr)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return child([sys.executable, "-m", "sqlindexer", *map(str, args)], env=e, check=check)


def child(cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> tuple[float, int, str]:
    """Run cmd in a fresh process; return (seconds, peak RSS of it and its children summed, stderr).

    RSS is sampled from /proc every 50 ms over the whole process tree, so worker
    processes count too (ru_maxrss would only give the largest single process). The
    sampling runs in a thread, so the time is taken when the process exits, not at the
    next sample."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()
    err_chunks: list[str] = []

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, tree_rss(proc.pid))

    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    sampler = threading.Thread(target=sample, daemon=True)
    reader.start()
    sampler.start()
    proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    reader.join()
    err = "".join(err_chunks)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak, err


def tree_rss(root: int) -> int:
    """Resident bytes of root and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def self_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def save(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {path}")
