"""A Python client of the fraudscore gRPC service (``fraudscore.v1.FraudScoring``).

    from fraudscore_client import FraudScoreClient, ScoringError

    with FraudScoreClient("scorer:50051", timeout_s=0.1, tls_ca="ca.pem", api_key=key) as client:
        try:
            result = client.score("card-42", "terminal-17", 99.5)
        except ScoringError as exc:   # exc.code: a grpc.StatusCode, exc.details: the server's words
            ...                       # your fallback
        result.decision, result.risk_score, result.source

Retries are made only where the service did not run the call (UNAVAILABLE, and RESOURCE_EXHAUSTED
with the server's ``grpc-retry-pushback-ms``), always inside the call's one deadline; see
``docs/client.md``. While the service refuses calls for overload, the client refuses some itself
(adaptive throttling, ``throttle=``), so that refusals do not eat the service's capacity.
"""

from fraudscore_client._aio import AsyncFraudScoreClient
from fraudscore_client._channel import API_KEY_HEADER, TIMEOUT_HEADER, ChannelConfig, open_aio_channel, open_channel
from fraudscore_client._errors import ScoringError
from fraudscore_client._messages import Reason, ScoreResult, Transaction
from fraudscore_client._retry import NO_RETRY, RetryPolicy
from fraudscore_client._sync import DEFAULT_TIMEOUT_S, FraudScoreClient
from fraudscore_client._throttle import AdaptiveThrottle

__all__ = [
    "API_KEY_HEADER",
    "AdaptiveThrottle",
    "DEFAULT_TIMEOUT_S",
    "NO_RETRY",
    "TIMEOUT_HEADER",
    "AsyncFraudScoreClient",
    "ChannelConfig",
    "FraudScoreClient",
    "Reason",
    "RetryPolicy",
    "ScoreResult",
    "ScoringError",
    "Transaction",
    "open_aio_channel",
    "open_channel",
]
