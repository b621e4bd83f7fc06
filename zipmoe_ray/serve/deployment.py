"""The Ray Serve application: one deployment owning a ZipMoEEngine, with a FastAPI ingress.

    from ray import serve
    from zipmoe_ray.serve import ServeConfig, build_app

    serve.run(build_app(ServeConfig("tiny-qwen.zmoe", engine={"memory_budget": "25%"})), route_prefix="/")

The replica is a Ray actor: the engine inside it attaches to the cluster Serve runs on and starts its stage
actors there (and kills them, never the cluster, when the replica stops).

No ``from __future__ import annotations`` here: FastAPI reads the route parameters' annotations at runtime.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .errors import error_body
from .handlers import OpenAIServer

__all__ = ["ZipMoEServer", "api", "build_app"]

api = FastAPI(title="zipmoe", docs_url=None, redoc_url=None, openapi_url=None)
log = logging.getLogger(__name__)


def _keep_replica_grpc_on_node_address() -> None:
    """Ray Serve (2.60) starts, in every replica, an inter-deployment gRPC server bound to ``[::]:0``: every
    interface, whatever the cluster's address. Rebind it to this node's address (127.0.0.1 on a one-node
    instance): it is only reached at that address. Without the hook (another Ray version) it is left as is,
    with a warning."""
    import ray
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "_zipmoe", False):
        if bind is None:
            log.warning("cannot keep Serve's replica gRPC server off other interfaces with this Ray version")
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def on_node(server, address: str):
        for wildcard in ("[::]:", "0.0.0.0:"):
            if address.startswith(wildcard):
                address = host + ":" + address[len(wildcard) :]
        return bind(server, address)

    on_node._zipmoe = True
    replica.add_port_to_grpc_server = on_node


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    msg = {404: f"no such endpoint: {request.method} {request.url.path}"}.get(
        exc.status_code, str(exc.detail)
    )
    return JSONResponse(error_body(msg, kind, code=str(exc.status_code)), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        error_body(f"invalid request: {exc.errors()[:1]}", "invalid_request_error"), status_code=400
    )


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        error_body("internal server error (logged on the server)", "server_error"), status_code=500
    )


@serve.deployment(name="ZipMoEServer", ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class ZipMoEServer:
    """Returns from its constructor at once; the engine starts in the background (``wait_ready``)."""

    def __init__(self, config: ServeConfig):
        _keep_replica_grpc_on_node_address()
        self.server = OpenAIServer(config)

    async def wait_ready(self) -> dict:
        """(Through a deployment handle.) Wait for the engine: ``{"state": "ready" | "failed", "error"}``."""
        return await self.server.wait_ready()

    @api.get("/health")
    async def health(self):
        return await self.server.health()

    @api.get("/metrics")
    async def metrics(self):
        return await self.server.metrics_text()

    @api.get("/v1/models")
    async def models(self, request: Request):
        return await self.server.handle("models", request, self.server.models)

    @api.get("/v1/models/{model:path}")
    async def model(self, request: Request):
        return await self.server.handle("models", request, self.server.model)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.server.handle("completions", request, self.server.completions)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.server.handle("chat", request, self.server.chat)

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


def build_app(config: ServeConfig):
    """The Serve application for ``config`` (pass it to ``serve.run``): one replica, admitting enough
    concurrent requests for a full batch, the queue and the 429 answers beyond it."""
    return ZipMoEServer.options(
        num_replicas=1, max_ongoing_requests=config.max_batch + config.max_queue + 64
    ).bind(config)
