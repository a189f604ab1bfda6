"""What a command-line user reads when a command fails: one line saying what went wrong and
what to do. ``clipstream`` turns every exception into such a line (``explain``); the
traceback is shown only with ``--log-level debug``, for bug reports."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings

log = logging.getLogger("clipstream.cli")


class Failure(Exception):
    """An expected failure; its message is written for the user (what went wrong, what to do)."""


#: librdkafka errors that mean the cluster cannot be used with these settings
_UNREACHABLE = {
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._SSL,
    KafkaError._RESOLVE,
}


class _AtDebug:
    """A confluent-kafka ``logger`` that keeps librdkafka's lines at debug level: while we
    probe a cluster, its connection errors are what the one-line message reports."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        log.debug(fmt, *args)


def check_kafka(settings: Settings, hint: str, timeout: float = 5.0) -> None:
    """Raise Failure unless the cluster answers a metadata request within ``timeout``.

    librdkafka retries an unreachable cluster for as long as it is asked to, so without
    this a command against a wrong address waits out its full timeout (30 s and more) and
    then fails with a traceback. ``hint`` says what to do about it."""
    bootstrap = settings.require_bootstrap()
    errors: list[KafkaError] = []
    admin = AdminClient(settings.kafka(error_cb=errors.append, logger=_AtDebug()))
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=0.25)
            return
        except KafkaException:
            admin.poll(0)  # serves error_cb
        fatal = [e for e in errors if e.code() in _UNREACHABLE]
        if fatal or time.monotonic() >= deadline:
            detail = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
            reason = _plain(detail[-1].str()) if detail else f"no answer within {timeout:g} s"
            raise Failure(f"cannot reach Kafka at {bootstrap}: {reason}; {hint}")


def _plain(reason: str) -> str:
    """librdkafka's reason without the broker prefix and the connection-state suffix."""
    reason = re.sub(r"^\S+/(bootstrap|\d+): ", "", reason)
    return re.sub(r" \(after \d+ms in state \w+\)$", "", reason)


def explain(exc: BaseException) -> str:
    """The one line for an exception a command raised."""
    from clipstream.models.control.registry import RegistryError

    if isinstance(exc, Failure | RegistryError | topics.TopicRefused):
        return str(exc)
    if isinstance(exc, KafkaException):
        error = exc.args[0] if exc.args else None
        text = error.str() if isinstance(error, KafkaError) else str(exc)
        return f"Kafka: {text}"
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}" if str(exc) else "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return (
        f"unexpected {type(exc).__name__}: {exc} (a bug? run again with --log-level debug "
        "and report the traceback)"
    )


def workers_running(settings: Settings, timeout: float = 5.0) -> int:
    """Members of the group of workers that serve queries (0 also when Kafka cannot tell)."""
    admin = AdminClient(settings.kafka())
    try:
        (future,) = admin.describe_consumer_groups([topics.SERVING_GROUP]).values()
        return len(future.result(timeout).members)
    except Exception as exc:  # an unknown group is an error on some brokers: no workers
        log.debug("describing group %s: %s", topics.SERVING_GROUP, exc)
        return 0


def no_prediction(settings: Settings, app: str, timeout: float) -> Failure:
    """Why a query got no prediction in time, as far as Kafka and the registry can tell."""
    from clipstream.models.control.registry import current

    causes = []
    if workers_running(settings) == 0:
        causes.append("no worker is running (start one: `clipstream worker`)")
    else:
        causes.append("the worker did not answer (still starting? try a longer --timeout)")
    spec = current(settings).app(app)
    if spec is None:
        causes.append(f"app {app!r} is not registered (`clipstream app register {app} ...`)")
    elif spec["deadline_ms"] >= timeout * 1000:
        causes.append(
            f"app {app!r} answers by its deadline of {spec['deadline_ms']:g} ms, longer than "
            f"--timeout {timeout:g} s"
        )
    else:
        causes.append(f"app {app!r} has a deadline of {spec['deadline_ms']:g} ms")
    causes.append(f"the broker asked is {settings.bootstrap}")
    return Failure(f"no prediction within {timeout:g} s: {'; '.join(causes)}")
