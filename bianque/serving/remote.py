"""Front ends answered by a running `python -m bianque serve` (``--server URL`` / ``BIANQUE_SERVER``).

``RemoteDoctor`` has the doctors' contract (``reply(turns, params)`` yielding text pieces,
``default_params``, ``fit``), so the CLI and the apps use it where they would use a loaded model;
``ServerClient.respond`` asks ``bianque-coq`` and reads the stage from the server's ``bianque``
object, so the server's router decides as the local one would. Replies stream over SSE; closing
a reply's iterator closes its HTTP stream and the server cancels the generation. Every failure is a
``RemoteError`` with a sentence for the user: an unreachable server names the URL and the command
to start one; a stream that breaks off raises rather than passing for a whole reply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import httpx

from ..prompt import DOCTOR, PATIENT, Fit, Turn
from ..sampling import SamplingParams

MODELS = {"v1": "bianque-1.0", "v2": "bianque-2.0"}
KINDS = {name: kind for kind, name in MODELS.items()}
START_HINT = "start one with `python -m bianque serve --v1-model DIR --v2-model DIR` or set --server / BIANQUE_SERVER"
# A server on CPU may think for minutes before its first piece (the questioner's whole reply
# is judged before the stage is known); a dead server closes the connection long before that.
TIMEOUT = httpx.Timeout(10.0, read=600.0)


class RemoteError(RuntimeError):
    """A server that cannot be reached or refused or broke off a reply; the message is for users."""


@dataclass(frozen=True)
class RemoteParams:
    """What a front end can ask the server for: the OpenAI request's sampling and length fields.
    ``max_tokens`` None leaves the server's own limit (BianQue-2.0's counts prompt + reply)."""

    sampling: SamplingParams
    max_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def default_params(kind: str) -> RemoteParams:
    """The models' own defaults (the original apps' settings), as the server applies them."""
    if kind == "v1":
        from ..t5 import V1Params

        p = V1Params()
        return RemoteParams(p.sampling, p.max_new_tokens)
    from ..glm import V2Params

    return RemoteParams(V2Params().sampling)


def request_fields(params: RemoteParams) -> dict[str, Any]:
    s = params.sampling
    fields: dict[str, Any] = {"temperature": s.temperature if s.do_sample else 0, "top_p": s.top_p, "top_k": s.top_k}
    if params.max_tokens is not None:
        fields["max_tokens"] = params.max_tokens
    if params.seed is not None:
        fields["seed"] = params.seed
    return fields


def messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """The dialogue as OpenAI messages; a doctor turn keeps its stage in the ``bianque`` object."""
    out = []
    for t in turns:
        m: dict[str, Any] = {"role": "user" if t.role == PATIENT else "assistant", "content": t.text}
        if t.role == DOCTOR and t.stage:
            m["bianque"] = {"stage": t.stage}
        out.append(m)
    return out


@dataclass
class RemoteReply:
    """A reply of ``bianque-coq``: the same shape as the router's ``DoctorReply``."""

    stage: str
    model: str
    chunks: Iterator[str]


class ServerClient:
    """One server: its URL, key and a pooled HTTP client, shared by every session of a process."""

    def __init__(self, url: str, api_key: str | None = None, timeout: httpx.Timeout = TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def unreachable(self, exc: Exception) -> RemoteError:
        return RemoteError(f"the BianQue server at {self.url} is unreachable ({type(exc).__name__}): {START_HINT}")

    def check(self, needed: Sequence[str]) -> list[str]:
        """The models the server lists; raises RemoteError unless it is up, ready and has ``needed``."""
        try:
            health = self.http.get("/health")
            if health.status_code == 503:
                state = health.json()
                detail = state.get("error") or "it is still loading its models; try again in a moment"
                raise RemoteError(f"the BianQue server at {self.url} is not ready: {detail}")
            listed = self.http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from None
        if listed.status_code != 200:
            raise self.refused(listed)
        models = [m["id"] for m in listed.json()["data"]]
        missing = [m for m in needed if m not in models]
        if missing:
            raise RemoteError(f"the BianQue server at {self.url} does not serve {', '.join(missing)} "
                              f"(it serves {', '.join(models) or 'nothing'}): start it with both models")
        return models

    def refused(self, r: httpx.Response) -> RemoteError:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.reason_phrase
        hint = " (set --api-key or BIANQUE_API_KEY to the server's key)" if r.status_code == 401 else ""
        return RemoteError(f"the BianQue server at {self.url} answered {r.status_code}: {message}{hint}")

    def events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The stream's JSON events up to ``[DONE]``; closing this closes the HTTP stream."""
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise self.refused(r)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RemoteError(f"the BianQue server at {self.url} could not finish the reply: "
                                          f"{event['error'].get('message')}")
                    yield event
        except httpx.HTTPError as exc:
            raise RemoteError(f"the connection to the BianQue server at {self.url} broke off "
                              f"({type(exc).__name__}); the reply is incomplete") from None
        raise RemoteError(f"the BianQue server at {self.url} ended the reply before it was complete")

    def body(self, model: str, turns: Sequence[Turn], params: RemoteParams | None) -> dict[str, Any]:
        body = {"model": model, "messages": messages(turns), "stream": True}
        return body | request_fields(params) if params is not None else body

    def reply(self, model: str, turns: Sequence[Turn], params: RemoteParams | None = None) -> Iterator[str]:
        return contents(self.events(self.body(model, turns, params)))

    def respond(self, turns: Sequence[Turn], advise_now: bool = False, max_questions: int | None = None,
                v1_params: RemoteParams | None = None, v2_params: RemoteParams | None = None) -> RemoteReply:
        """The Chain of Questioning on the server: the stage and model come with the first event."""
        options: dict[str, Any] = {"advise_now": advise_now}
        if max_questions is not None:
            options["max_questions"] = max_questions
        for key, params in (("questioner", v1_params), ("advisor", v2_params)):
            if params is not None:
                options[key] = request_fields(params)
        events = self.events(self.body("bianque-coq", turns, None) | {"bianque": options})
        first = next(events, None)
        if first is None or "bianque" not in first:
            events.close()
            raise RemoteError(f"the BianQue server at {self.url} sent a reply without its stage")
        info = first["bianque"]
        return RemoteReply(info["stage"], KINDS[info["model"]], contents(events, first))

    def close(self) -> None:
        self.http.close()


def contents(events: Iterator[dict[str, Any]], first: dict[str, Any] | None = None) -> Iterator[str]:
    """The text pieces of a stream's events; closing this closes the stream."""
    try:
        for event in ([first] if first else []):
            yield from piece(event)
        for event in events:
            yield from piece(event)
    finally:
        events.close()


def piece(event: dict[str, Any]) -> Iterator[str]:
    for choice in event.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            yield text


class RemoteDoctor:
    """One model on a server, with a loaded doctor's contract (what the CLI and the apps call)."""

    device = "server"

    def __init__(self, client: ServerClient, kind: str) -> None:
        self.server, self.kind = client, kind
        self.name = {"v1": "BianQue-1.0", "v2": "BianQue-2.0"}[kind]
        self.source = f"{client.url} ({MODELS[kind]})"
        self.dtype = "—"
        self.default_params = default_params(kind)

    def fit(self, turns: Sequence[Turn], params: Any = None) -> Fit:
        """The server fits the dialogue to its model's budget; nothing is known to be dropped here."""
        return Fit(tuple(turns))

    def reply(self, turns: Sequence[Turn], params: RemoteParams | None = None) -> Iterator[str]:
        return self.server.reply(MODELS[self.kind], turns, params or self.default_params)
