"""Ray Serve: `python -m bianque serve --ray` spreads model replicas over GPUs and machines.

One deployment per model; each replica loads its doctor with the same loader (and engine) as
`python -m bianque serve` and streams ``reply`` pieces. The ingress is api.py's own FastAPI app
(``create_app``) whose doctors are ``ReplicaDoctor`` proxies: every handler, the router for
``bianque-coq``, streaming, auth and metrics are the plain server's code. Replicas, resources and
routing are configuration (``build_app``), not code in the models.

A replica that dies is replaced by Ray. A request it had not started answering is sent again (to
another replica); a stream it was in the middle of breaks, and api.py ends that stream with an
``error`` event, so a client never mistakes a cut-off reply for a whole one.

Ray is an optional extra (``pip install -e ".[ray]"``); nothing here is imported by the plain server.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Sequence

import anyio
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from ..prompt import Turn
from ..settings import Settings
from .api import MODEL_NAMES, completion_tokens, create_app, prompt_tokens

log = logging.getLogger(__name__)

RETRIES = 20  # a request no replica has started yet is retried while Ray replaces a dead one
RETRY_DELAY_S = 0.5
INGRESS_CPUS = 0.1  # it only translates HTTP: leave the cores to the models
MODEL_MAX_ONGOING = 32  # requests one replica takes at once (its engine batches them)
INGRESS_MAX_ONGOING = 1024


class BianqueModel:
    """One replica of one model: the doctor the plain server would load, answering over Ray."""

    def __init__(self, kind: str, settings: Settings) -> None:
        from ..cli import load_doctors

        self.doctor = load_doctors(kind, settings)[kind]

    def default_params(self) -> Any:
        return self.doctor.default_params

    def max_batch(self) -> int:
        engine = getattr(self.doctor, "engine", None)
        return engine.runner.max_batch if engine is not None else 0

    async def reply(self, turns: Sequence[Turn], params: Any):
        """The reply's pieces; when the caller cancels, the doctor's iterator is closed (its
        generation cancelled) once the piece being made is done."""
        chunks = iter(self.doctor.reply(list(turns), params))
        try:
            while (piece := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
                yield piece
        finally:
            getattr(chunks, "close", lambda: None)()

    def count_prompt_tokens(self, turns: Sequence[Turn], params: Any) -> int:
        return prompt_tokens(self.doctor, list(turns), params)

    def count_completion_tokens(self, text: str) -> int:
        return completion_tokens(self.doctor, text)


class ReplicaDoctor:
    """A model deployment seen as a doctor by api.py (called from its worker threads)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self.default_params = self._call("default_params")
        self.max_batch = self._call("max_batch")  # of one replica (all load alike)

    def _call(self, method: str, *args: Any) -> Any:
        for attempt in range(RETRIES):
            try:
                return getattr(self.handle, method).remote(*args).result()
            except RayActorError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(RETRY_DELAY_S)

    def reply(self, turns: Sequence[Turn], params: Any = None) -> Iterator[str]:
        params = self.default_params if params is None else params
        stream = self.handle.options(stream=True)
        for attempt in range(RETRIES):
            response = stream.reply.remote(list(turns), params)
            started = False
            try:
                for piece in response:
                    started = True
                    yield piece
                return
            except RayActorError:
                if started or attempt == RETRIES - 1:
                    raise  # the client gets an error event, never a silently short reply
                log.warning("a replica died before answering; sending the request again")
                time.sleep(RETRY_DELAY_S)
            finally:
                response.cancel()  # a no-op once finished; cancels the replica's generation otherwise

    def count_prompt_tokens(self, turns: Sequence[Turn], params: Any) -> int:
        return self._call("count_prompt_tokens", list(turns), params)

    def count_completion_tokens(self, text: str) -> int:
        return self._call("count_completion_tokens", text)


class Ingress:
    """api.py's app over the model deployments' handles."""

    def __init__(self, handles: dict[str, DeploymentHandle], api_key: str | None, max_questions: int) -> None:
        self.handles, self.api_key, self.max_questions = handles, api_key, max_questions

    def __serve_build_asgi_app__(self):
        def load() -> dict[str, ReplicaDoctor]:
            return {kind: ReplicaDoctor(handle) for kind, handle in self.handles.items()}

        return create_app(load, self.api_key, self.max_questions)


def build_app(mode: str, settings: Settings, v1_replicas: int = 1, v2_replicas: int = 1,
              gpus_per_replica: float = 0, cpus_per_replica: float = 1, api_key: str | None = None,
              max_ongoing: int = MODEL_MAX_ONGOING):
    """The Serve application: a deployment per model this mode needs, and the ingress. A replica
    takes ``max_ongoing`` requests at once; Ray queues the rest until one has room."""
    kinds = {"v1": ("v1",), "v2": ("v2",), "coq": ("v1", "v2")}[mode]
    replicas = {"v1": v1_replicas, "v2": v2_replicas}
    model = serve.deployment(BianqueModel)
    handles = {
        kind: model.options(name=MODEL_NAMES[kind], num_replicas=replicas[kind], max_ongoing_requests=max_ongoing,
                            ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                            health_check_period_s=2).bind(kind, settings)
        for kind in kinds
    }
    ingress = serve.deployment(serve.ingress()(Ingress))
    return ingress.options(name="ingress", max_ongoing_requests=INGRESS_MAX_ONGOING,
                           ray_actor_options={"num_cpus": INGRESS_CPUS}).bind(handles, api_key, settings.max_questions)


def serve_on_ray(args: Any, settings: Settings, api_key: str | None) -> int:
    """Start (or join, with ``--address``) a Ray instance and run the application until interrupted."""
    import ray

    ray.init(address=args.address, logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(args.mode, settings, args.v1_replicas, args.v2_replicas, args.gpus_per_replica,
                    args.cpus_per_replica, api_key)
    log.warning("serving on http://%s:%d through Ray Serve (GET /health)", args.host, args.port)
    serve.run(app, name="bianque", route_prefix="/", blocking=True)
    return 0
