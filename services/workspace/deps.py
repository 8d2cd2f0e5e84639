"""What the workspace's pages and use cases need, built once by the lifespan in `create_app` and
handed to the routes through `DepsDep` (helpers that only have the request use `deps_of`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, Request

from services.workspace.sessions import Sessions
from shared.auth import Verifier
from shared.settings import Settings


@dataclass(frozen=True)
class Deps:
    """The settings, the sessions (in this process's memory), the one HTTP client to the four
    public APIs and the identity provider, and the verifier of the provider's tokens."""

    settings: Settings
    sessions: Sessions
    client: httpx.AsyncClient
    verifier: Verifier

    def url(self, service: str, path: str) -> str:
        return self.settings.api_url(service) + path


def deps_of(request: Request) -> Deps:
    return request.app.state.deps


DepsDep = Annotated[Deps, Depends(deps_of)]
