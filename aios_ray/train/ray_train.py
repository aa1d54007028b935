"""Ray Train touch points: the worker context, and the TorchTrainer that runs ``train_worker``.

Labelled as in Ray's own examples: prepare (device, DDP wrap), report (+ checkpoint), trainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from aios_ray.config import Config, StoreConfig
from aios_ray.errors import user_error_behind
from aios_ray.store.backend import Workers
from aios_ray.store.record import ExpertLayout
from aios_ray.tracking.jsonl import say
from aios_ray.train.gauges import TrainGauges
from aios_ray.train.loop import train_worker
from aios_ray.train.plan import RunPlan, TrainData


class RayTrainContext:
    def __init__(self, run: str) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()  # prepare: the worker's device
        self.run = run
        self.gauges: TrainGauges | None = None
        self.node_id = ray.get_runtime_context().get_node_id()
        self.local_rank, self.local_world_size = self._place_on_node()

    def _place_on_node(self) -> tuple[int, int]:
        """This worker's rank among the workers on its node, and how many there are. Told apart by Ray node id,
        not by IP as Ray Train's own local rank is: simulated nodes (``ray.cluster_utils.Cluster``) share one IP."""
        if self.world_size == 1 or not dist.is_initialized():
            return 0, 1
        nodes: list[Any] = [None] * self.world_size
        dist.all_gather_object(nodes, self.node_id)
        return nodes[:self.rank].count(self.node_id), nodes.count(self.node_id)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        # prepare: DDP only when there is more than one worker; the model is already on its device.
        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        # report: a barrier across workers; only rank 0 attaches the checkpoint directory.
        plain = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        ray.train.report(plain, checkpoint=Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    def publish(self, event: str, fields: dict[str, Any]) -> None:
        # Created on first use: only the chief publishes, and a gauge needs a connected Ray worker.
        if self.gauges is None:
            self.gauges = TrainGauges(self.run)
        self.gauges.publish(event, fields)

    def any_rank(self, flag: bool) -> bool:
        if self.world_size == 1 or not dist.is_initialized():
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def min_over_ranks(self, value: int) -> int:
        if self.world_size == 1 or not dist.is_initialized():
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """After a worker failure Ray restarts the function; it resumes from the last reported checkpoint."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            say(f"resuming from Ray Train checkpoint {directory}")
            yield Path(directory)

    def workers(self, config: StoreConfig) -> Workers:
        return Workers(self.rank, self.world_size, self.local_rank, self.local_world_size,
                       per_worker_hot_tier=config.hot_tier_per_worker)

    def open_expert_store(self, config: StoreConfig, layout: ExpertLayout) -> Any:
        """This node's store: its actors found again by name or created on this node (where its workers map the
        hot slabs), detached: they outlive a worker that Ray Train restarts, and ``fit_on_ray`` ends them when
        the run ends. Workers on several nodes: one store per node, named after the node (a worker restarted on
        a node without one creates it and rebuilds it from the checkpoint). Each worker first creates its own
        hot tier (on its own GPU with per-worker tiers), then, once every worker has, finds all of its node's."""
        from actors.tier_actors import create_store

        workers = self.workers(config)
        node_id = self.node_id
        if workers.nodes_many:
            config = config.for_node(node_id)
        cuda = gpu_uuid_name(self.device) if config.device == "cuda" else None
        create_store(config, layout, node_id=node_id, detached=True, hot_tiers=[workers.hot_tier], cuda_device=cuda)
        workers.barrier()
        return create_store(config, layout, node_id=node_id, detached=True, hot_tiers=range(workers.hot_tiers))


def _worker_loop(config: dict[str, Any]) -> None:
    plan: RunPlan = config["plan"]
    if not plan.config.cluster.verbose:
        _quiet_worker_logs()
    data: TrainData = ray.get(config["data"])
    train_worker(plan, data, RayTrainContext(plan.config.train.brain_name))


# Ray Train's per-report line ("Reporting training result N: TrainingReport(...)") comes from a logger named
# after its module's file path, not "ray.train.*", so RunConfig's LoggingConfig level does not reach it.
_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def _quiet_worker_logs() -> None:
    import importlib

    logger = getattr(importlib.import_module(_REPORT_LOGGER_MODULE), "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)
    # A streamed run (--data) reads through Ray Data
    quiet_ray_data_logs()


def quiet_ray_data_logs() -> None:
    """Ray Data's INFO lines (each execution's start and end, and its progress logged every few seconds where
    the console is not a terminal) and its warning that progress bars are off: where a command prints its own
    progress, they are shown only with --verbose."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ray_train_logging(cfg: Config) -> LoggingConfig:
    """Ray Train's INFO lines (resource requests, worker group start, checkpoint paths) only with --verbose;
    its warnings and errors always."""
    return LoggingConfig(log_level="INFO" if cfg.cluster.verbose else "WARNING")


def ensure_ray(address: str | None) -> None:
    """No --address: start a local embedded Ray. Inside `ray job submit`, 'auto' joins the cluster."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local" if not _inside_ray_job() else None, log_to_driver=True)


def _inside_ray_job() -> bool:
    return "RAY_JOB_ID" in os.environ or "RAY_ADDRESS" in os.environ


def _worker_resources(cfg: Config) -> dict[str, float]:
    """One CPU (and one GPU with --use-gpu): a hot tier on a GPU takes no GPU from Ray; it is created by the
    worker it serves and told to use that worker's GPU (``open_expert_store``)."""
    return {"CPU": 1, "GPU": 1} if cfg.cluster.use_gpu else {"CPU": 1}


def gpu_uuid_name(device: torch.device) -> str:
    """The worker's GPU as CUDA_VISIBLE_DEVICES names it for another process (``GPU-<uuid>``): an index would
    mean another GPU in a process with another visible set."""
    from aios_ray.store.slab import gpu_uuid

    uuid = gpu_uuid(device)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def fit_on_ray(plan: RunPlan, data: TrainData, max_failures: int = 1) -> dict[str, Any]:
    cfg: Config = plan.config
    ensure_ray(cfg.cluster.address)
    storage = Path(cfg.cluster.storage_path or Path(plan.bundle_root) / "ray_results").resolve()
    use_gpu = cfg.cluster.use_gpu
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"plan": plan, "data": ray.put(data)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=_worker_resources(cfg)),
        run_config=RunConfig(
            name=f"{cfg.train.brain_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            logging_config=ray_train_logging(cfg),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        user_error = user_error_behind(exc)
        if user_error is not None:  # bad input found by a worker: one line and exit 2, as without Ray
            raise user_error from None
        raise
    finally:
        if cfg.store.tiered:  # the workers created the store's actors detached: end them here
            from actors.tier_actors import shutdown_store

            shutdown_store(cfg.store)
    summary = dict(result.metrics or {})
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return summary
