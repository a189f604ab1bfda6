"""A Kafka cluster on one machine: several nodes, each broker and KRaft controller, in a
static quorum, from the same jars as the one-node dev broker. For the fault tests of what a
cluster promises (a broker's death loses nothing) and for trying a deployment locally."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from confluent_kafka.admin import AdminClient

from clipstream.streams.broker import EmbeddedBroker, new_cluster_id
from clipstream.streams.runtime.ports import HOST, free_port


class KafkaCluster:
    """``nodes`` Kafka nodes on 127.0.0.1 set up for durability as a production cluster is:
    every topic gets ``nodes`` replicas by default and a write needs ``nodes - 1`` of them
    in sync, so one node can die without losing an acknowledged record or availability."""

    def __init__(self, nodes: int = 3, data_dir: Path | None = None, heap: str = "512m") -> None:
        if nodes < 3:
            raise ValueError("a cluster that survives a node's death needs at least 3 nodes")
        root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="clipstream-cluster-"))
        taken: list[int] = []
        for _ in range(2 * nodes):
            taken.append(free_port(exclude=tuple(taken)))
        ports, controllers = taken[:nodes], taken[nodes:]
        voters = ",".join(f"{i + 1}@{HOST}:{c}" for i, c in enumerate(controllers))
        in_sync = str(nodes - 1)
        durable = {
            "default.replication.factor": str(nodes),
            "min.insync.replicas": in_sync,
            "offsets.topic.replication.factor": str(nodes),
            "transaction.state.log.replication.factor": str(nodes),
            "transaction.state.log.min.isr": in_sync,
            "share.coordinator.state.topic.replication.factor": str(nodes),
            "share.coordinator.state.topic.min.isr": in_sync,
            "controller.quorum.voters": voters,
            # a killed node's replicas are moved out of the ISR this fast (30 s by default),
            # so writes with acks=all stop waiting for it within seconds
            "replica.lag.time.max.ms": "5000",
        }
        shared_id = new_cluster_id()
        self.nodes = [
            EmbeddedBroker(
                port=ports[i],
                controller_port=controllers[i],
                data_dir=root / f"node-{i + 1}",
                heap=heap,
                extra_config={**durable, "node.id": str(i + 1)},
                cluster_id=shared_id,
            )
            for i in range(nodes)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def start(self, timeout: float = 180.0) -> None:
        """Start every node at once (a node answers only once a quorum of controllers is up)
        and return when all are members of the cluster."""
        self._each(lambda node: node.start(timeout), range(len(self.nodes)))
        self.wait_for_brokers(len(self.nodes), timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self._each(lambda node: node.stop(timeout), range(len(self.nodes)))

    def kill(self, index: int) -> None:
        """SIGKILL one node, as a crashed machine: no clean shutdown, no leadership hand-off."""
        self.nodes[index].kill()

    def start_node(self, index: int, timeout: float = 120.0) -> None:
        """Start a stopped node again with its log dir, so it rejoins and catches up."""
        self.nodes[index].start(timeout)

    def wait_for_brokers(self, count: int, timeout: float = 60.0) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while len(admin.list_topics(timeout=timeout).brokers) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} brokers in the cluster after {timeout}s")
            time.sleep(0.1)  # poll interval

    def leader_of(self, topic: str, partition: int) -> int:
        """The index in ``nodes`` of the node leading a partition."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        meta = admin.list_topics(topic, timeout=30).topics[topic].partitions[partition]
        return meta.leader - 1

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _each(self, action: Callable[[EmbeddedBroker], None], indices: Iterable[int]) -> None:
        """Run ``action`` on the nodes in parallel threads; raise the first error."""
        errors: list[BaseException] = []

        def run(node: EmbeddedBroker) -> None:
            try:
                action(node)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(self.nodes[i],)) for i in indices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
