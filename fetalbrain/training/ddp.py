"""DDP on one node whose ranks run this run's config, not the command line.

Lightning's DDP starts ranks 1..N-1 by re-running the command line (``sys.argv``). Inside a Hydra
multirun that command is the whole sweep: each extra rank starts a sweep of its own (the known
Lightning + Hydra problem: a second sweep folder, N x the jobs). Here the job itself starts its ranks
as ``python -m fetalbrain.distributed RUN_DIR/ddp_config.yaml`` with the resolved config it runs, so one
job is one run folder whatever launched it. Cluster launchers that start every rank themselves (SLURM
tasks, torchrun) are left alone: Lightning's cluster environment reads their ranks.

Usage: ``with ranks(trainer, cfg, run_dir): trainer.fit(...)``; ``fetalbrain.distributed`` is the ranks' entry point.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RANK_CONFIG_FILE = "ddp_config.yaml"  # in the run folder while it trains: the resolved config every rank runs


# Set for the ranks, restored after the run (Lightning also splits the CPU threads between the ranks).
_RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


def must_start_ranks(trainer) -> bool:
    """A DDP run of several processes on this node that nobody else starts (no SLURM tasks, no torchrun)."""
    strategy = trainer.strategy
    return (
        isinstance(strategy, DDPStrategy)
        and getattr(strategy, "_start_method", "popen") == "popen"  # ddp_spawn forks its own workers
        and strategy.num_processes > 1
        and not strategy.cluster_environment.creates_processes_externally
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _RankWatcher(threading.Thread):
    """Stops this process when another rank dies while this one goes on: a rank blocked in a collective
    waits for the dead one forever (no timeout can interrupt it). Not when this rank leaves the run
    within ``grace_s`` (it raised too, e.g. a pruned trial or an error every rank hit)."""

    def __init__(self, children: list[subprocess.Popen], grace_s: float = 60.0):
        super().__init__(daemon=True, name="ddp-rank-watcher")
        self.children, self.grace_s, self.left = children, grace_s, threading.Event()

    def run(self) -> None:
        while not self.left.wait(1.0):
            failed = [c.returncode for c in self.children if c.poll() not in (None, 0)]
            if failed and not self.left.wait(self.grace_s):
                log.error("DDP: a rank exited with %s and this rank is stuck: stopping its process", failed)
                for child in self.children:
                    child.kill()
                os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def ranks(trainer, cfg: DictConfig, run_dir: Path):
    """Start this node's other ranks for a DDP run (a no-op otherwise); wait for them and clean up after.

    The environment, the threads and the process group are restored on exit, so that the next job of a
    multirun in this process starts its own ranks."""
    if not must_start_ranks(trainer):
        try:
            yield
        finally:
            _destroy_process_group()
        return
    strategy = trainer.strategy
    if strategy.num_nodes > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        raise ValueError(
            f"trainer.num_nodes={strategy.num_nodes} without a cluster launcher: set MASTER_ADDR and MASTER_PORT "
            "(and NODE_RANK) on every node, or use hydra/launcher=slurm, which starts every rank"
        )
    config_file = Path(run_dir) / RANK_CONFIG_FILE
    OmegaConf.save(cfg, config_file, resolve=True)
    saved_env, saved_threads = {key: os.environ.get(key) for key in _RANK_ENV}, torch.get_num_threads()
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    os.environ.update(
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        NODE_RANK=str(node_rank),
        WORLD_SIZE=str(strategy.num_processes * strategy.num_nodes),
        LOCAL_RANK="0",  # from now on Lightning sees processes created externally: it starts none
    )
    children = []
    for local_rank in range(1, strategy.num_processes):
        command = [sys.executable, "-m", "fetalbrain.distributed", str(config_file)]
        children.append(subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(local_rank)}))
    log.info("DDP: started %d more rank(s) on this node from %s", len(children), config_file)
    watcher = _RankWatcher(children)
    watcher.start()
    try:
        yield
    except BaseException:
        watcher.left.set()
        for child in children:  # they would wait for this rank forever
            child.kill()
        raise
    finally:
        watcher.left.set()
        for child in children:
            try:
                child.wait(timeout=300)  # a rank's own teardown (W&B, loaders) after this one finished
            except subprocess.TimeoutExpired:
                log.error("DDP: rank process %d did not exit: killed", child.pid)
                child.kill()
        config_file.unlink(missing_ok=True)  # the run keeps one resolved config: config.yaml
        _destroy_process_group()
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    failed = [child.returncode for child in children if child.returncode]
    if failed:
        raise RuntimeError(f"DDP: {len(failed)} rank(s) of {run_dir} exited with codes {failed}")


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
