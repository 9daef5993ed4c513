"""The client's retry rule against an in-process fake of the service: what is retried, what never is.

The fake answers each call from a script (abort with a code, optionally a pushback; or an answer),
and records what it received, so each test can say how many attempts reached the service.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from fraudscore_client import (
    TIMEOUT_HEADER,
    AsyncFraudScoreClient,
    FraudScoreClient,
    RetryPolicy,
    ScoringError,
    Transaction,
)
from fraudscore_client._channel import ChannelConfig
from fraudscore_client._retry import pushback_s, retry_delay
from scoring_service.protos import scoring_pb2, scoring_pb2_grpc
from tests.servers.common import free_port

Step = tuple[grpc.StatusCode, str | None] | float | None  # abort (code, pushback ms) | sleep seconds | answer


@dataclass
class FakeScoring(scoring_pb2_grpc.FraudScoringServicer):
    script: list[Step] = field(default_factory=list)
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (request id, tx id, metadata)
    finished: threading.Event = field(default_factory=threading.Event)

    def Score(self, request, context):  # noqa: N802 - the gRPC method's name
        self.seen.append((request.request_id, request.transaction.transaction_id, dict(context.invocation_metadata())))
        step = self.script.pop(0) if self.script else None
        try:
            if isinstance(step, tuple):
                code, pushback = step
                if pushback is not None:
                    context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
                context.abort(code, f"scripted {code.name}")
            if isinstance(step, float):
                time.sleep(step)
            return scoring_pb2.ScoreResponse(request_id=request.request_id, transaction_id=request.transaction.transaction_id,
                                             risk_score=0.25, decision=scoring_pb2.APPROVE, source=scoring_pb2.MODEL)
        finally:
            self.finished.set()

    def ScoreBatch(self, request, context):  # noqa: N802
        return scoring_pb2.ScoreBatchResponse(responses=[self.Score(r, context) for r in request.requests])


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeScoring, str]]:
    fake = FakeScoring()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scoring_pb2_grpc.add_FraudScoringServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture()
def fake(fake_server: tuple[FakeScoring, str]) -> Iterator[FakeScoring]:
    servicer, _ = fake_server
    servicer.script.clear()
    servicer.seen.clear()
    servicer.finished.clear()
    yield servicer


@pytest.fixture()
def client(fake_server: tuple[FakeScoring, str]) -> Iterator[FraudScoreClient]:
    # the retry rule alone: adaptive throttling (random by design) is tested in test_client_throttle.py
    with FraudScoreClient(fake_server[1], timeout_s=2.0, retries=3, rng=random.Random(1), throttle=None) as c:
        yield c


def test_unavailable_is_retried_with_the_same_ids(fake: FakeScoring, client: FraudScoreClient) -> None:
    fake.script[:] = [(grpc.StatusCode.UNAVAILABLE, None), (grpc.StatusCode.UNAVAILABLE, None)]
    result = client.score("c1", "t1", 10.0)
    assert result.decision == "APPROVE" and result.risk_score == pytest.approx(0.25)
    assert len(fake.seen) == 3
    assert len({(rid, tid) for rid, tid, _ in fake.seen}) == 1  # one payment, however many attempts
    assert result.transaction_id == fake.seen[0][1]


def test_retries_stop_after_the_policy_s_attempts(fake: FakeScoring, client: FraudScoreClient) -> None:
    fake.script[:] = [(grpc.StatusCode.UNAVAILABLE, None)] * 10
    with pytest.raises(ScoringError) as exc:
        client.score("c1", "t1", 10.0)
    assert exc.value.code is grpc.StatusCode.UNAVAILABLE and exc.value.attempts == 4
    assert len(fake.seen) == 4


def test_overload_is_retried_after_the_server_s_pushback(fake: FakeScoring, client: FraudScoreClient) -> None:
    fake.script[:] = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "30")]
    assert client.score("c1", "t1", 10.0).source == "MODEL"
    assert len(fake.seen) == 2


def test_a_pushback_past_the_deadline_fails_at_once(fake: FakeScoring, fake_server: tuple[FakeScoring, str]) -> None:
    fake.script[:] = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "5000")]
    with FraudScoreClient(fake_server[1], timeout_s=1.0, retries=3) as short, pytest.raises(ScoringError) as exc:
        short.score("c1", "t1", 10.0)
    assert exc.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and exc.value.attempts == 1
    assert len(fake.seen) == 1


def test_overload_without_a_valid_pushback_is_final(fake: FakeScoring, client: FraudScoreClient) -> None:
    fake.script[:] = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None), (grpc.StatusCode.RESOURCE_EXHAUSTED, "-1")]
    for _ in range(2):
        with pytest.raises(ScoringError) as exc:
            client.score("c1", "t1", 10.0)
        assert exc.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and exc.value.attempts == 1
    assert len(fake.seen) == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL])
def test_final_codes_are_never_retried(fake: FakeScoring, client: FraudScoreClient, code: grpc.StatusCode) -> None:
    fake.script[:] = [(code, None)]
    with pytest.raises(ScoringError) as exc:
        client.score("c1", "t1", 10.0)
    assert exc.value.code is code and exc.value.details == f"scripted {code.name}"
    assert exc.value.code_name == code.name and str(exc.value) == f"{code.name}: scripted {code.name}"
    assert len(fake.seen) == 1


def test_a_deadline_exceeded_call_is_not_sent_again(fake: FakeScoring, fake_server: tuple[FakeScoring, str]) -> None:
    fake.script[:] = [0.6]  # the service is still working on it when the caller's deadline passes
    with FraudScoreClient(fake_server[1], timeout_s=0.2, retries=5) as c, pytest.raises(ScoringError) as exc:
        c.score("c1", "t1", 10.0)
    assert exc.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and exc.value.attempts == 1
    assert fake.finished.wait(5)
    assert len(fake.seen) == 1


def test_no_server_is_unavailable_after_retries_inside_the_deadline() -> None:
    with FraudScoreClient(f"127.0.0.1:{free_port()}", timeout_s=2.0, retries=2) as c, pytest.raises(ScoringError) as exc:
        c.health()
    assert exc.value.code is grpc.StatusCode.UNAVAILABLE and exc.value.attempts == 3


def test_the_api_key_goes_as_metadata_and_is_never_shown(fake: FakeScoring, fake_server: tuple[FakeScoring, str]) -> None:
    with FraudScoreClient(fake_server[1], timeout_s=2.0, api_key="s3cret-key") as c:
        c.score_batch([Transaction("c1", "t1", 1.0), Transaction("c2", "t2", 0.0)])
        assert "s3cret-key" not in repr(c)
    assert [m.get("x-api-key") for _, _, m in fake.seen] == ["s3cret-key", "s3cret-key"]


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ChannelConfig("127.0.0.1:1", tls_cert="cert.pem")
    with pytest.raises(ValueError, match="tls_ca: cannot read"):
        FraudScoreClient("127.0.0.1:1", tls_ca="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="timeout_s"):
        FraudScoreClient("127.0.0.1:1", timeout_s=0)


def test_the_async_client_follows_the_same_rule(fake: FakeScoring, fake_server: tuple[FakeScoring, str]) -> None:
    fake.script[:] = [(grpc.StatusCode.UNAVAILABLE, None), (grpc.StatusCode.INVALID_ARGUMENT, None)]

    async def run() -> ScoringError:
        async with AsyncFraudScoreClient(fake_server[1], timeout_s=2.0, retries=3) as c:
            with pytest.raises(ScoringError) as exc:
                await c.score("c1", "t1", 10.0)
            assert (await c.score("c1", "t1", 10.0)).decision == "APPROVE"
            return exc.value

    err = asyncio.run(run())
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and err.attempts == 2
    assert len(fake.seen) == 3


def test_pushback_parsing_and_the_deadline_rule() -> None:
    assert pushback_s([("grpc-retry-pushback-ms", "250")]) == pytest.approx(0.25)
    assert pushback_s([("grpc-retry-pushback-ms", b"0")]) == 0.0
    assert pushback_s([("grpc-retry-pushback-ms", "soon")]) is None
    assert pushback_s([("other", "1")]) is None and pushback_s(None) is None
    policy = RetryPolicy(max_attempts=3)
    pushed = [("grpc-retry-pushback-ms", "50")]
    assert retry_delay(policy, grpc.StatusCode.RESOURCE_EXHAUSTED, pushed, 1, 1.0) == pytest.approx(0.05)
    assert retry_delay(policy, grpc.StatusCode.RESOURCE_EXHAUSTED, pushed, 1, 0.05) is None  # no time left after it
    assert retry_delay(policy, grpc.StatusCode.RESOURCE_EXHAUSTED, pushed, 3, 1.0) is None  # attempts used up
    assert retry_delay(policy, grpc.StatusCode.DEADLINE_EXCEEDED, None, 1, 1.0) is None
    assert 0.0 <= (retry_delay(policy, grpc.StatusCode.UNAVAILABLE, None, 2, 1.0) or 0.0) <= 0.02
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_the_client_package_is_a_leaf_that_needs_only_the_stubs() -> None:
    """fraudscore_client ships in the same wheel but imports nothing of the service but the generated stubs."""
    import ast
    from pathlib import Path

    import fraudscore_client

    wrong = []
    for path in Path(fraudscore_client.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            wrong += [f"{path.name}: {n}" for n in names if n.startswith("scoring_service") and n != "scoring_service.protos"]
    assert not wrong, wrong
    assert (Path(fraudscore_client.__file__).parent / "py.typed").exists()


def test_each_attempt_sends_its_own_timeout_so_the_service_can_measure_its_wait(
        fake: FakeScoring, fake_server: tuple[FakeScoring, str]) -> None:
    fake.script[:] = [(grpc.StatusCode.UNAVAILABLE, None)]
    with FraudScoreClient(fake_server[1], timeout_s=1.5, retries=2, throttle=None) as c:
        c.score("c1", "t1", 1.0)
    sent = [float(m[TIMEOUT_HEADER]) for _, _, m in fake.seen]
    assert len(sent) == 2 and 1400 < sent[0] <= 1500.0 and sent[1] < sent[0]  # the retry has what is left
