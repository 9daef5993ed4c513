"""``fraudscore``: one command line for the service, the model registry and the batch jobs.

Each module registers its commands on the one Typer app: ``serve`` (the online service),
``models`` (train, the registry, the database), ``client`` (score, health) and ``batch``
(nightly, replay, events). Every command builds what it needs through ``scoring_service.bootstrap``.
"""

from __future__ import annotations

import sys

import typer

from scoring_service.cli import batch, client, data, keys, models, rollout, serve

app = typer.Typer(
    name="fraudscore",
    help="Real-time fraud scoring: a gRPC Score() service over a Redis cache of entity risk, "
    "GBDT models for unseen entities, and Kafka-fed batch jobs that refresh the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for _module in (serve, models, rollout, client, batch, keys, data):
    _module.register(app)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
