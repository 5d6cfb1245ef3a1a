"""What every stage (GRPO, SFT, rejection sampling, evaluation) does around its loop, written once.

    with RunContext(cfg) as run:                # inputs checked, run_dir made, its config.yaml written
        model_path = prepare_model(cfg)         # (before Ray: building a tiny model needs no cluster)
        run.connect()                           # join or start Ray; shut down at the end if this run started it
        pool = run.closing(RolloutPool(cfg, model_path), RolloutPool.shutdown)

Whatever is registered with ``closing`` is closed when the block ends, however it ends, newest first (loggers
before pools, pools before Ray), and a failure to close one does not skip the others. How a finished run's result
becomes the process's exit code is ``r1.monitoring.stop.exit_code``, the same for every launcher.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Self, TypeVar

from omegaconf import OmegaConf

from r1.config.public import public

T = TypeVar("T")


class RunContext:
    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        from r1.inputs import check_inputs

        check_inputs(self.cfg)  # before anything expensive: a wrong path fails in milliseconds, naming the key
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(public(self.cfg)))  # (no setup lines)
        self._stack.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    @property
    def config_dict(self) -> dict:
        """The resolved config as plain containers (what the loggers record), without the Slurm setup lines."""
        return OmegaConf.to_container(public(self.cfg), resolve=True)

    def connect(self) -> None:
        """Join the cluster's Ray (Slurm, Kubernetes, a given address) or start a private one, which is then shut
        down at the end."""
        import ray

        from r1.cluster import connect

        if connect(self.cfg.cluster):
            self._stack.callback(ray.shutdown)

    def closing(self, thing: T, close: Callable[[T], object]) -> T:
        """``thing``, to be closed with ``close(thing)`` at the end."""
        self._stack.callback(close, thing)
        return thing
