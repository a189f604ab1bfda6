"""The naive loop: what a user writes today with confluent-kafka and scikit-learn.

Consume one query, predict one row, produce one prediction, repeat. No batching, no
cache, no deadlines; the same model file and the same Avro records as clipstream, so the
bench's client code is the same for both.

Run as ``python -m clipstream.streams.bench.naive --model FILE.skops --prefix bench.naive``.
"""

from __future__ import annotations

import argparse

import numpy as np

from clipstream.models.files import load_model
from clipstream.streams.bench.floor import loop_clients, prediction_for, stop_on_signal
from clipstream.streams.wire import codec
from clipstream.streams.wire.config import Settings


def run(settings: Settings, model_path: str, prefix: str, stop: list[bool]) -> None:
    model = load_model(model_path)
    classes = [str(c) for c in model.classes_]
    consumer, producer = loop_clients(settings, f"{prefix}-loop")
    consumer.subscribe([f"{prefix}.queries"])
    out = f"{prefix}.predictions"
    try:
        while not stop[0]:
            msg = consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            query = codec.decode("Query", msg.value())
            proba = model.predict_proba(np.asarray(query["features"]).reshape(1, -1))[0]
            best = int(proba.argmax())
            producer.produce(out, prediction_for(query, classes[best], float(proba[best])))
            producer.poll(0)
    finally:
        producer.flush(5)
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prefix", default="bench.naive")
    args = parser.parse_args()
    run(Settings.from_env(), args.model, args.prefix, stop_on_signal())


if __name__ == "__main__":
    main()
