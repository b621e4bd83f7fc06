"""What `zipmoe serve` runs: Ray (started on loopback, or attached to with an address), Serve's HTTP proxy,
the application, and an orderly shutdown of everything it started.

    stop = threading.Event()          # set it (e.g. from a signal handler) to shut down
    run(config, stop, on_ready=print)  # blocks until then

Never stops what it did not start: on a cluster given by address it deletes only its application (and
Serve itself only if Serve was not running before), and it never stops that cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from ..errors import ConfigError
from .config import ServeConfig

__all__ = ["APP_NAME", "preflight", "require_serve", "run"]

log = logging.getLogger(__name__)
APP_NAME = "zipmoe"


def require_serve() -> None:
    """Raise ConfigError naming the extra when Ray Serve, FastAPI or prometheus_client is missing."""
    missing = []
    for mod in ("ray.serve", "fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(
            f"serving needs {', '.join(missing)}: install the serve extra (scripts/install.sh --serve, or "
            "pip install 'zipmoe-ray[serve]')"
        )


def preflight(config: ServeConfig) -> None:
    """Fail fast, before Ray starts, on what would otherwise fail inside the replica: the store, the engine
    options, the budget, a plan or trace file, the tokenizer, and a port already taken. Raises ZipMoEError subclasses."""
    from ..cache.layout import ModelLayout
    from ..runtime.budget import Budget
    from ..runtime.config import EngineConfig
    from ..store import open_store

    require_serve()
    EngineConfig(**config.engine)
    store = open_store(config.store_dir)
    layout = ModelLayout.of_store(store)
    budget = Budget.parse(config.engine["memory_budget"], layout)
    budget.require(layout)
    if config.plan is not None:
        from ..preflight import checked_plan

        checked_plan(config.plan, store, config.store_dir, budget.bytes)
    if config.trace_out is not None:
        from ..store.durable import check_writable
        from ..trace.recorder import TraceRecorder

        check_writable(config.trace_out, "trace (--trace-out)")
        TraceRecorder.for_store(config.trace_out, config.store_dir, store, layout, budget.bytes)
    if not (store.path / "tokenizer_config.json").is_file() and not (store.path / "tokenizer.json").is_file():
        raise ConfigError(f"{store.path} has no tokenizer; a server answers text and needs one")
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((config.host, config.port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port} ({e.strerror}); pick another --port"
            ) from None


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def run(
    config: ServeConfig,
    stop: threading.Event,
    *,
    address: str | None = None,
    dashboard: bool = False,
    num_cpus: int | None = None,
    on_ready: Callable[[str], None] | None = None,
    signals: bool = False,
) -> None:
    """Serve ``config`` until ``stop`` is set, then shut down what this call started. Blocks. Without
    ``address`` it starts a Ray instance of its own (every listener on 127.0.0.1, ``num_cpus`` CPUs, the
    dashboard only if asked for) and stops it at the end. Raises ConfigError when the application fails to
    start (with the replica's error). ``signals`` (main thread only): SIGINT and SIGTERM set ``stop``; they
    are installed after ``ray.init``, which installs handlers of its own."""
    import sys

    if address is None and "ray" not in sys.modules:
        # a single-node instance: keep Ray's listeners on loopback (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    preflight(config)
    import ray
    from ray import serve

    from . import build_app

    started_ray = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        if address is None:
            ray.init(
                address="local",  # a new instance, never one found through RAY_ADDRESS or `ray start`
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                log_to_driver=False,
            )
        else:
            ray.init(address=address, log_to_driver=False)
    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    had_serve = _serve_running()
    try:
        if had_serve:
            log.warning("Serve already runs on this cluster: its HTTP options stay as they are")
        app = build_app(config)
        try:
            _deploy(app, config, had_serve)
        except RuntimeError as e:  # the replica failed to start: its last error line says why
            lines = [x for x in str(e).splitlines() if x.strip()]
            why = next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else str(e))
            raise ConfigError(f"the server failed to start: {why.strip()}") from None
        state = serve.get_app_handle(APP_NAME).wait_ready.remote().result()
        if state["state"] != "ready":
            raise ConfigError(f"the engine failed to start: {state['error']}")
        if on_ready is not None:
            on_ready(config.url)
        stop.wait()
    finally:
        _shutdown(had_serve, started_ray)


def _deploy(app, config: ServeConfig, had_serve: bool) -> None:
    """Start Serve's HTTP proxy on ``config``'s host and port and deploy ``app`` at "/"; blocks until the
    replica runs. ``serve.start`` returns only once the proxy listens, and until the application's route
    reaches it the proxy answers 404 to everything; so the application is deployed while the proxy is still
    starting: its first answers then come from the application."""
    from ray import serve

    if had_serve:
        serve.run(app, name=APP_NAME, route_prefix="/")
        return
    box: dict[str, BaseException] = {}

    def start():
        try:
            serve.start(http_options={"host": config.host, "port": config.port}, proxy_location="HeadOnly")
        except BaseException as e:  # re-raised below
            box["error"] = e

    starter = threading.Thread(target=start, name="zipmoe-serve-start", daemon=True)
    starter.start()
    while starter.is_alive() and not _serve_running():
        starter.join(0.05)
    if "error" in box:
        raise box["error"]
    serve.run(app, name=APP_NAME, route_prefix="/")
    starter.join()
    if "error" in box:
        raise box["error"]


def _shutdown(had_serve: bool, started_ray: bool) -> None:
    import ray
    from ray import serve

    def work():
        with contextlib.suppress(Exception):
            if had_serve:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()

    t = threading.Thread(target=work, name="zipmoe-serve-shutdown", daemon=True)
    t.start()
    # A cluster going down under us (a SIGTERM to the whole process group stops Ray's own processes too) must
    # not hang the exit; an instance we started goes with ray.shutdown anyway, Serve's actors included.
    t.join(3 if started_ray else 30)
    if started_ray and ray.is_initialized():
        ray.shutdown()
