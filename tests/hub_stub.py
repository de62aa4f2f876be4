"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that download metadata.

:class:`HubStub` serves the files of one repository the way ``huggingface_hub.hf_hub_download``
expects (checked against huggingface_hub 2.4): ``HEAD`` and ``GET`` on
``/datasets/{repo_id}/resolve/{revision}/{filename}`` respond with the ``X-Repo-Commit``, ``ETag``
and ``Content-Length`` headers, and a missing repository, revision or file gets a 404 with the
``X-Error-Code`` that huggingface_hub turns into its own exceptions. Every request is recorded,
including the ``GET /api/agent-harnesses`` that huggingface_hub 2.4 sends to the endpoint at
most once a day per HF_HOME (it gets a 404), so count requests with :meth:`HubStub.requests_for`.

huggingface_hub reads ``HF_ENDPOINT`` once, at import, so :func:`point_hub_at` patches the
constants derived from it (and the copies in ``datasets.config``) for the current process and
sets ``HF_ENDPOINT`` for subprocesses.

Usage::

    with HubStub("azavras/GAIA", {"val_data.json": b"[]"}) as hub:
        hub.point_hub_at(monkeypatch)
        path = hf_hub_download("azavras/GAIA", "val_data.json", repo_type="dataset", cache_dir=...)
        assert hub.requests_for("val_data.json")
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

REPO_URL_PREFIXES = {"dataset": "datasets/", "model": "", "space": "spaces/"}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the stub received."""

    method: str
    path: str
    headers: dict[str, str]


class HubStub:
    """Serve ``files`` (name -> bytes) of repository ``repo_id`` at ``revision`` on 127.0.0.1.

    The commit hash in ``X-Repo-Commit`` is derived from the file contents, so replacing the
    files with :meth:`set_files` publishes a new commit. :meth:`fail_with` makes the stub respond
    to every request with one status code (for example 503) until it is called with None.
    """

    def __init__(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        revision: str = "main",
        repo_type: str = "dataset",
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.repo_type = repo_type
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._failure_status: int | None = None
        self._files: dict[str, bytes] = {}
        self.commit = ""
        self.set_files(files)
        self._server = _QuickStopServer(host="127.0.0.1", port=0, threaded=True)

    @property
    def endpoint(self) -> str:
        """The base URL to use as HF_ENDPOINT, without a trailing slash."""
        return self._server.url_for("/").rstrip("/")

    def start(self) -> None:
        """Start serving in a background thread."""
        self._server.expect_request(re.compile(".*")).respond_with_handler(self._respond)
        self._server.start()

    def stop(self) -> None:
        """Stop serving; raise if the request handler failed on any request."""
        if self._server.is_running():
            self._server.stop()
        self._server.check_handler_errors()

    def __enter__(self) -> HubStub:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def set_files(self, files: Mapping[str, bytes]) -> None:
        """Replace the served files and publish them as a new commit."""
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode())
            digest.update(hashlib.sha1(files[name]).digest())
        with self._lock:
            self._files = dict(files)
            self.commit = digest.hexdigest()

    def fail_with(self, status: int | None) -> None:
        """Respond to every request with ``status`` from now on; None serves the files again."""
        with self._lock:
            self._failure_status = status

    def requests_for(self, filename: str, method: str | None = None) -> list[RecordedRequest]:
        """Return the recorded requests for ``filename``, optionally of one method only."""
        suffix = f"/{filename}"
        with self._lock:
            recorded = list(self.requests)
        return [
            request
            for request in recorded
            if request.path.endswith(suffix) and (method is None or request.method == method)
        ]

    def environ(self) -> dict[str, str]:
        """Return the environment variables that point a subprocess at this stub."""
        return {"HF_ENDPOINT": self.endpoint}

    def point_hub_at(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point huggingface_hub and datasets at this stub for the rest of the test."""
        point_hub_at(monkeypatch, self.endpoint)

    def _respond(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(RecordedRequest(request.method, request.path, dict(request.headers)))
            failure_status = self._failure_status
            files = self._files
            commit = self.commit

        if failure_status is not None:
            return Response(f"stub failure {failure_status}\n", status=failure_status)

        repo_prefix = f"/{REPO_URL_PREFIXES[self.repo_type]}{self.repo_id}/resolve/"
        if not request.path.startswith(repo_prefix):
            return _hub_error(404, "RepoNotFound")

        # The revision is URL-quoted by huggingface_hub, and werkzeug has decoded it, so it may
        # contain "/" (refs/pr/1): match the known revisions instead of splitting the path.
        remainder = request.path[len(repo_prefix) :]
        for revision in (self.revision, commit):
            if remainder.startswith(f"{revision}/"):
                filename = remainder[len(revision) + 1 :]
                break
        else:
            return _hub_error(404, "RevisionNotFound")

        if filename not in files:
            return _hub_error(404, "EntryNotFound", commit=commit)
        return _file_response(request, files[filename], commit)


class _QuickStopServer(HTTPServer):
    """An HTTPServer that stops within 50 ms instead of the 0.5 s of serve_forever's default poll."""

    def thread_target(self) -> None:
        assert self.server is not None
        self.server.serve_forever(poll_interval=0.05)


def _file_response(request: Request, content: bytes, commit: str) -> Response:
    response = Response(content, content_type="application/octet-stream")
    response.headers["X-Repo-Commit"] = commit
    response.set_etag(hashlib.sha256(content).hexdigest())
    # werkzeug handles Range and If-None-Match requests (huggingface_hub resumes with Range).
    return response.make_conditional(request, accept_ranges=True, complete_length=len(content))


def _hub_error(status: int, error_code: str, *, commit: str | None = None) -> Response:
    response = Response(f"{error_code}\n", status=status)
    response.headers["X-Error-Code"] = error_code
    if commit is not None:
        response.headers["X-Repo-Commit"] = commit
    return response


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Make huggingface_hub and datasets send Hub requests to ``endpoint`` for one test.

    huggingface_hub 2.4 builds file URLs from ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` and names
    its host with ``constants.ENDPOINT``; datasets keeps its own copies in ``datasets.config``.
    ``HF_ENDPOINT`` is set too, for subprocesses started by the test.
    """
    import datasets.config
    from huggingface_hub import constants

    endpoint = endpoint.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )


def closed_port_endpoint() -> str:
    """Return an http URL on 127.0.0.1 whose port has no listener, so connections are refused.

    The port is bound and released at once. Another process could take it in between, which
    is unlikely on a test machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
