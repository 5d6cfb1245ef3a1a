"""One rank of the training pool: a train engine, the pool's process group, and a weight-sync source (rank 0; with
colocated engines, each rank that shares its GPU with one)."""

from __future__ import annotations

import functools
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from r1.checkpoint import fsync_tree
from r1.cluster import placement
from r1.data.tokens import load_tokenizer
from r1.distributed.bucketed_broadcast import GroupMembership, free_port, manifest_of, node_ip
from r1.distributed.ipc_channel import IpcSender
from r1.engines.registry import build_train_engine
from r1.health.heartbeat import decoder_layers


def rng_state() -> dict:
    """This process's torch, NumPy and Python generator states as plain JSON (read back without unpickling)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def on_compute_thread(method):
    """Run ``method`` on the worker's one compute thread (see ``TrainWorker``)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return self.compute_thread.submit(method, self, *args, **kwargs).result()

    return run


class TrainWorker:
    """Every torch call of the worker runs on one thread of its own, whichever of Ray's threads received the call.

    Ray runs a threaded actor's methods on a pool of threads, and each thread that starts an OpenMP region gets an
    OpenMP team of its own. Once there are more OpenMP threads than cores, libgomp stops spin-waiting between
    regions, so every one of the thousands of small regions in a step pays a futex wake-up: ~8K context switches/s
    and a tiny-model update 1.4x slower than the same call in a plain process (benchmarks/RESULTS.md, issue 16).
    The methods that touch no tensors (``address``, ``init_sync``, ``manifest``) stay on Ray's threads, so the sync
    group can be re-formed while a broadcast is stuck on a dead peer.
    """

    def __init__(self, cfg, model_path: str, rank: int, world_size: int):
        self.compute_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1-compute")
        self.compute_thread.submit(torch.set_num_threads, max(1, cfg.trainer.torch_threads)).result()
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self.engine = None
        self.sync = GroupMembership()  # re-formed when a rollout worker is replaced
        self.ipc: IpcSender | None = None  # colocated engines: this rank hands them its weights (no collective)
        self._manifest = None  # what broadcast_weights sends, in order (set by manifest(), before any send)
        self.beats = 0  # decoder-layer forwards and emulated-update slices (the watchdog's sign of progress)

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def placement(self) -> tuple[str, list[int]]:
        return placement()

    @on_compute_thread
    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the pool's process group (gloo on CPU, NCCL on GPU) and build the engine."""
        if self.world_size > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                world_size=self.world_size, timeout=timedelta(seconds=self.cfg.sync.timeout_s),
            )
        self.engine = build_train_engine(self.cfg, self.model_path)
        for layer in decoder_layers(self.engine):  # a beat per layer forward: progress inside a long step
            layer.register_forward_pre_hook(self._beat)

    def _beat(self, *_) -> None:
        self.beats += 1

    def heartbeat(self) -> int:
        """Beats so far (``r1.health.heartbeat``): answered on Ray's thread while the compute thread works."""
        return self.beats

    # --- compute ----------------------------------------------------------------------------------------------
    @on_compute_thread
    def compute_logprobs(self, batch, temperature: float, reference: bool) -> tuple[torch.Tensor, float]:
        """The log-probs, and the seconds this rank spent on them (the pool tells its Ray overhead from that)."""
        start = time.perf_counter()
        logprobs = self.engine.compute_logprobs(batch, temperature=temperature, reference=reference)
        return logprobs, time.perf_counter() - start

    @on_compute_thread
    def train_step(self, batch, loss_fn) -> dict[str, float]:
        start = time.perf_counter()
        stats = self.engine.train_step(batch, loss_fn)
        # emulated update latency (trainer.simulated_update_s) for orchestration benchmarks and fault drills; it
        # beats once a second, as the layers of a model that slow would
        while (left := start + self.cfg.trainer.simulated_update_s - time.perf_counter()) > 0:
            time.sleep(min(1.0, left))
            self._beat()
        return stats | {"worker_s": time.perf_counter() - start}

    @on_compute_thread
    def update_reference(self) -> None:
        self.engine.update_reference()

    def data_parallel(self) -> tuple[int, int, bool]:
        """(data-parallel rank, data-parallel size, whether export/save/load are collective) of this rank."""
        return self.engine.data_parallel_rank, self.engine.data_parallel_size, self.engine.collective

    # --- weight sync (rank 0 sends; with a sharded model every rank takes part in gathering the tensors) ------
    @on_compute_thread
    def manifest(self):
        """Names, shapes and dtypes of the weights, in the order ``broadcast_weights`` sends them (kept: the
        sender streams against it)."""
        self._manifest = manifest_of(self.engine.named_weights())
        return self._manifest

    def init_sync(self, host: str, port: int, world_size: int, members: list[int] | None = None) -> None:
        """Join a (re-formed) sync group: rank 0 broadcasts to every member. ``members`` (colocated engines): the
        group's ranks on this rank's GPU, which this rank hands every version through that GPU's memory
        (``r1.distributed.ipc_channel``); rank 0 also hosts the group's store."""
        if members is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self.sync.join(host, port, 0, world_size, backend=backend, timeout_s=self.cfg.sync.timeout_s)
            return
        timeout = timedelta(seconds=self.cfg.sync.timeout_s)
        store = dist.TCPStore(host, port, is_master=self.rank == 0, wait_for_workers=False, timeout=timeout)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.ipc = IpcSender(store, self.rank, members, device, self.cfg.sync.timeout_s)

    @on_compute_thread
    def broadcast_weights(self, version: int) -> int:
        """Send ``version`` to the rollout pool: rank 0 to all, or (colocated) each rank to the engines on its GPU;
        the other ranks of a sharded model gather with them."""
        named = self.engine.named_weights()
        if self.ipc is not None and self.ipc.members:
            return self.ipc.send(named, self._manifest, int(self.cfg.sync.bucket_mb * 2**20), version)
        if self.rank != 0 or self.ipc is not None:
            for _ in named:  # the export is collective: each full tensor is gathered from every shard
                pass
            return 0
        # streamed: each bucket leaves as soon as its tensors are gathered
        return self.sync.group.send(named, self._manifest, int(self.cfg.sync.bucket_mb * 2**20), version)

    # --- checkpoints ------------------------------------------------------------------------------------------
    @on_compute_thread
    def save(self, path: str, with_optimizer: bool) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)  # every rank writes here; none may wait for rank 0 to create it
        if self.rank == 0 or self.engine.collective:
            self.engine.save(Path(path), with_optimizer=with_optimizer)
        if self.rank == 0:  # a checkpoint's policy/ is a complete HF model directory: weights, config and tokenizer
            load_tokenizer(self.model_path).save_pretrained(Path(path) / "policy")
        (Path(path) / f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))
        fsync_tree(Path(path))  # (what this rank wrote: on a shared filesystem only its own client can flush it)

    @on_compute_thread
    def load(self, path: str) -> None:
        self.engine.load(Path(path))
        rng_file = Path(path) / f"rng_rank{self.rank}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()))
