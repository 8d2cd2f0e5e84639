"""Fuzz intake's OpenAPI with schemathesis (positive and negative examples, bounded), in process
against the real app (real Postgres, real broker): nothing a client sends produces a 500."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode

from services.intake.app import create_app
from tests.apps import bearer, running
from tests.integration.test_intake_api import identification

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30  # per operation and generation mode


def generate(operation, mode: GenerationMode, **fixed) -> list:
    out: list = []

    @settings(max_examples=MAX_EXAMPLES, database=None, deadline=None, phases=[Phase.generate], derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(mode, **fixed))
    def collect(case) -> None:
        out.append(case)

    collect()
    return out


async def test_schemathesis_finds_no_server_error(env):
    app = create_app(env, run_consumer=False)
    async with running(app) as client:
        token = bearer(env, sub="police.prizren.duty", agency="police", municipality="prizren",
                       roles=["reporter", "caseworker"])
        made = await client.post("/v1/identifications", json=identification(), headers=token)
        case_id = made.json()["case_id"]

        schema = schemathesis.openapi.from_dict(app.openapi())
        cases = []
        for result in schema.get_all_operations():
            op = result.ok()
            if not op.path.startswith("/v1/"):
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                cases += generate(op, mode)
                if "{case_id}" in op.path and mode is GenerationMode.POSITIVE:
                    cases += generate(op, mode, path_parameters={"case_id": case_id})
        assert len(cases) > 100

        statuses: dict[int, int] = {}
        failures = []
        for i, case in enumerate(cases):
            kwargs = case.as_transport_kwargs(base_url="http://test")
            headers = dict(kwargs.pop("headers") or {})
            if i % 5:  # mostly with a valid token, sometimes with whatever was generated
                headers["Authorization"] = token["Authorization"]
            kwargs.pop("cookies", None)
            try:
                request = client.build_request(headers=headers, **kwargs)
            except (httpx.LocalProtocolError, UnicodeEncodeError, ValueError, TypeError):
                continue  # not sendable over HTTP at all: the client refuses it, not our server
            response = await client.send(request)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:200]} | {case.as_curl_command()[:400]}")
        print("status counts:", dict(sorted(statuses.items())))
        assert not failures, "\n".join(failures[:5])
        # the fuzzing reached the success paths as well as the validation errors
        assert sum(n for code, n in statuses.items() if code < 300) > 0 and statuses.get(422, 0) > 0
