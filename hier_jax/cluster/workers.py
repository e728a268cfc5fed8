"""The edge and cloud workers: each a Ray actor, a process with its own JAX runtime running the library's steps."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from hier_jax.config import ExperimentConfig
from hier_jax.data import ImageDataset
from hier_jax.run.evaluate import accuracy


def start_jax(cores: Sequence[int] | None, platform: str) -> None:
    """Pin this process to `cores` and give JAX one device of `platform`; before JAX starts a backend.
    (Importing jax starts none, but it reads JAX_PLATFORMS then, so the platform goes to its config.)"""
    if cores:
        os.sched_setaffinity(0, set(cores))
    jax.config.update("jax_platforms", platform)
    from hier_jax import process

    process.setup(host_devices=1)


class _Side:
    """What an edge and the cloud worker share: a train.Setup built in this process."""

    def __init__(self, config: ExperimentConfig, dataset: ImageDataset, cores: Sequence[int] | None, platform: str):
        start_jax(cores, platform)
        from hier_jax import train

        device = f"{jax.default_backend()}:0"
        self.config = dataclasses.replace(config, edge_device=device, cloud_device=device, out="")
        self.setup = train.build(self.config, dataset)
        self.device = jax.devices()[0]

    def placement(self) -> str:
        cores = sorted(os.sched_getaffinity(0))
        return f"pid {os.getpid()}, {self.device.platform}:{self.device.id}, cores {cores}"


def _crash() -> None:
    """Fault injection: the process dies part-way through a step, as a crashed worker would.
    The pause lets the replies of the steps before leave first; exiting at once could also lose
    the previous step's reply, which a crash mid-step would not."""
    time.sleep(0.3)
    os._exit(1)


class EdgeWorker(_Side):
    def __init__(
        self,
        edge: int,
        config: ExperimentConfig,
        dataset: ImageDataset,
        steps: int,
        cores: Sequence[int] | None,
        kill_at: int | None,
    ):
        super().__init__(dataclasses.replace(config, max_steps=steps), dataset, cores, "cpu")
        from hier_jax import train

        self.edge, self.kill_at = edge, kill_at
        self.state = train.fresh_states(self.setup)[0]
        self.batches = iter(train.TrainBatches(self.setup))
        self.next_step = 0
        # Compile now, on a throwaway copy and the first batch, so that no timed step compiles.
        images, labels = next(iter(train.TrainBatches(self.setup)))
        jax.block_until_ready(self.setup.hierarchy.edge_step(train.fresh_states(self.setup)[0], images, labels))

    def step(self, t: int) -> tuple[Any, dict]:
        """Train edge step t; (the packed payload as numpy, metrics: loss, accuracy, step time, the
        payload's bytes and the wall-clock time it was ready, which the driver's link clock starts
        from). Steps come in order."""
        if t == self.kill_at:
            _crash()
        if t != self.next_step:
            raise RuntimeError(f"edge {self.edge} was asked for step {t}; its next step is {self.next_step}")
        start = time.perf_counter()
        payload, metrics = jax.device_get(self._train())
        step_s = time.perf_counter() - start
        return payload, {
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["accuracy"]),
            "step_s": step_s,
            "nbytes": payload.nbytes,
            "done_at": time.time(),
        }

    def _train(self) -> tuple[Any, dict]:
        images, labels = next(self.batches)
        self.state, payload, metrics = self.setup.hierarchy.edge_step(self.state, images, labels)
        self.next_step += 1
        return payload, metrics

    def resume(self, state: Any | None, start: int, until: int) -> None:
        """Come back after a crash: from `state` at step `start` (None: the initial state, step 0),
        train steps up to `until` again without sending anything (the cloud has their payloads)."""
        if state is not None:
            self.load(state, start)
        while self.next_step < until:
            self._train()
        jax.block_until_ready(self.state)

    def params(self) -> Any:
        return jax.device_get({"params": self.state["params"], "batch_stats": self.state["batch_stats"]})

    def state_now(self) -> Any:
        return jax.device_get(self.state)

    def load(self, state: Any, start: int) -> None:
        """Continue from a checkpoint: this state, and the batches from step `start` on."""
        from hier_jax import train

        self.state = jax.device_put(state, self.device)
        self.batches = iter(train.TrainBatches(self.setup, start))
        self.next_step = start

    def set_params(self, averaged: Any) -> None:
        self.state = {**self.state, **jax.device_put(averaged, self.device)}

    def evaluate(self) -> tuple[dict, list]:
        """(edge-exit accuracy, [(payload, labels, mask)] of the test split for the cloud exit)."""
        from hier_jax.data import eval_batches

        h, payloads, kept = self.setup.hierarchy, [], []

        def early_exit(images):
            logits, payload = h.edge_eval(self.state, images)
            payloads.append(payload)
            return logits

        def batches():
            for images, labels, mask in eval_batches(self.setup.dataset, self.config.batch_size, device=self.device):
                kept.append((labels, mask))
                yield images, labels, mask

        result = accuracy(early_exit, batches())
        bundle = [(payload, labels, mask) for payload, (labels, mask) in zip(payloads, kept, strict=True)]
        return {"edge_accuracy": result["accuracy"], "examples": result["examples"]}, jax.device_get(bundle)


class CloudWorker(_Side):
    def __init__(
        self,
        config: ExperimentConfig,
        dataset: ImageDataset,
        steps: int,
        cores: Sequence[int] | None,
        platform: str,
        kill_at: int,
    ):
        super().__init__(dataclasses.replace(config, max_steps=steps), dataset, cores, platform)
        self.kill_at, self.steps_done = kill_at, 0

        from hier_jax import train

        self.state = train.fresh_states(self.setup)[1]
        # Compile now on a zero payload of the edge's shape, so that no timed step compiles.
        images, labels = next(iter(train.TrainBatches(self.setup)))
        shape = jax.eval_shape(self.setup.hierarchy.edge_step, train.fresh_states(self.setup)[0], images, labels)[1]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=self.device), shape)
        jax.block_until_ready(self.setup.hierarchy.cloud_step(train.fresh_states(self.setup)[1], zeros))

    def step(self, edge: int, t: int, payload: Any, ready_at: float) -> dict:
        """Train on edge `edge`'s step-t payload, once it has arrived (`ready_at`, wall clock; 0: at
        once); its metrics, with the cloud's own step index."""
        index = self.steps_done
        if index == self.kill_at:
            _crash()
        self.steps_done += 1
        if (wait := ready_at - time.time()) > 0:
            time.sleep(wait)
        start = time.perf_counter()
        self.state, metrics = self.setup.hierarchy.cloud_step(self.state, jax.device_put(payload, self.device))
        metrics = jax.device_get(metrics)  # waits for the step
        return {
            "index": index,
            "edge": edge,
            "step": t,
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["accuracy"]),
            "step_s": time.perf_counter() - start,
        }

    def state_now(self) -> Any:
        return jax.device_get(self.state)

    def load(self, state: Any, steps_done: int) -> None:
        self.state, self.steps_done = jax.device_put(state, self.device), steps_done

    def evaluate(self, bundle: list) -> float:
        """The cloud exit's accuracy on one edge's test-split payloads."""

        def final_exit(payload):
            return self.setup.hierarchy.cloud_eval(self.state, jax.device_put(payload, self.device))

        return accuracy(final_exit, bundle)["accuracy"]
