"""Where trials run: a Dask ``LocalCluster`` of worker processes, or an existing scheduler.

Local workers are processes with one thread each (each trial also pins torch to one thread), so
N workers train N networks at once. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in each
worker's environment before spawning it (its docs advise a low value to hand freed memory back to
the OS); for single-threaded torch training that made every step about 55 % slower here
(REFERENCE.md, "Distributed sweeps"), so local workers get glibc's default instead (the setting
is removed from ``distributed.nanny.pre-spawn-environ``; a value in the environment still wins).
Workers take one task at a time (``worker-saturation`` 1.0): trials are long, so queueing them
on the scheduler balances the load better than prefetching.

On a cluster started by hand, give the workers the same setting with a Dask config file on each
worker machine (``~/.config/dask/selfscale.yaml``; an environment variable cannot unset it)::

    distributed:
      nanny:
        pre-spawn-environ:
          MALLOC_TRIM_THRESHOLD_: null

and start them with one thread each: ``dask scheduler`` on one machine, ``dask worker
tcp://HOST:8786 --nworkers N --nthreads 1`` on each. :func:`dask_client` warns when the workers
of a scheduler it connects to still have a trim threshold below :data:`SLOW_TRIM`.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from selfscale.errors import ConfigError

CONNECT_TIMEOUT = 5
"""Seconds to reach a scheduler given by --address (the whole attempt stays under 10 s)."""
MAX_WORKERS = 1024
SLOW_TRIM = 1 << 20
"""A MALLOC_TRIM_THRESHOLD_ below this (bytes) on a worker is reported as slowing training."""
LOCAL_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.scheduler.worker-saturation": 1.0,
}
"""Dask settings for a local cluster (see the module docstring)."""


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def check_workers(n: int) -> int:
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_WORKERS):
        raise ConfigError(f"--workers: must be an integer from 1 to {MAX_WORKERS}, got {n!r}")
    return n


def check_address(address: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` → (host, port); anything else → a one-line error naming it."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ConfigError(f"--address: expected tcp://HOST:PORT, got {address!r}")
    return parts.hostname, port


@contextmanager
def dask_client(*, workers: int | None = None, address: str | None = None) -> Iterator:
    """A ``distributed.Client`` on a new local cluster of ``workers`` processes (default: one
    per core), or on the scheduler at ``address``; closed (and the local cluster shut down) on
    exit. An unreachable address → ConfigError within :data:`CONNECT_TIMEOUT` seconds."""
    import dask
    from distributed import Client, LocalCluster

    if address is not None:
        host, port = check_address(address)
        try:  # a plain TCP connect first: a closed port fails at once, not after retries
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
            client = Client(address, timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - OSError, timeouts, a port that is not Dask's
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ConfigError(f"--address: cannot reach a Dask scheduler at {address} "
                              f"({reason})") from None
        with client:
            _warn_slow_trim(client, address)
            yield client
        return
    n = check_workers(workers if workers is not None else default_workers())
    saved = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS",
                                            "MKL_NUM_THREADS")}
    try:
        with dask.config.set(LOCAL_CONFIG), \
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                             dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
    finally:  # the nanny sets its pre-spawn variables in this process too; put them back
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def _warn_slow_trim(client, address: str) -> None:
    """Warn (one line) when a worker's MALLOC_TRIM_THRESHOLD_ is below :data:`SLOW_TRIM`."""
    try:
        values = client.run(_trim_threshold)
    except Exception:  # noqa: BLE001 - a check only; the trials say what really fails
        return
    slow = sorted({v for v in values.values() if v is not None and v.isdigit()
                   and int(v) < SLOW_TRIM})
    if slow:
        warnings.warn(f"--address: workers at {address} have MALLOC_TRIM_THRESHOLD_="
                      f"{', '.join(slow)}, which made torch training about 55 % slower here; "
                      "unset it in their Dask config (see selfscale.study.cluster)", stacklevel=3)


def describe(client, address: str | None = None) -> str:
    """What ran the trials, for the summary and study.json: ``"a local cluster of 2 workers ×
    1 thread"`` or ``"2 workers × 1 thread at tcp://…"``."""
    threads = client.nthreads()
    per = sorted(set(threads.values()))
    shape = (f"{len(threads)} worker{'s' if len(threads) != 1 else ''} × "
             f"{'/'.join(map(str, per)) or 0} thread{'s' if per != [1] else ''}")
    return f"{shape} at {address}" if address else f"a local cluster of {shape}"
