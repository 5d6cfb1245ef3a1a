"""Device mistakes fail on CPU as they would on a GPU (tests/device_discipline.py): the engines' steps run with every
tensor r1 creates naming its device, and a scan of the engine code finds no factory call that does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils._device import _device_constructors

from tests.device_discipline import DeviceMistake, strict_devices
from tests.gloo_ranks import run_ranks
from tests.test_megatron_bridge import _save_hf
from tests.test_megatron_engine import OPTIM, _batch, _loss

REPO = Path(__file__).resolve().parent.parent
# the code that runs on the model's device: engines, their packing and collectives, the weight transport
DEVICE_CODE = ["r1/engines", "r1/distributed"]


def _made_without_a_device():
    return torch.zeros(3)


def test_the_harness_rejects_a_tensor_made_without_a_device_and_only_that():
    here = (str(Path(__file__).resolve()),)
    with strict_devices(include=here) as mode:
        with pytest.raises(DeviceMistake, match=r"torch.zeros without device= at .*test_device_discipline.py:\d+ "
                                                r"\(_made_without_a_device\)"):
            _made_without_a_device()
        torch.zeros(3, device="cpu")
        torch.as_tensor(torch.ones(2, device="cpu"))  # (from a tensor: its device)
        torch.nn.Linear(2, 2)  # torch's own factory calls are not this file's
        assert mode.checked == 3
    _made_without_a_device()  # outside the region: allowed


def test_the_engine_code_names_the_device_of_every_tensor_it_makes():
    """Every torch factory call in the device code names its device (the branches no test runs included)."""
    factories = {f.__name__ for f in _device_constructors()}
    found = []
    for root in DEVICE_CODE:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                        and node.func.attr in factories and not any(k.arg == "device" for k in node.keywords)):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} torch.{node.func.attr}")
    assert not found, "factory calls without device=:\n" + "\n".join(found)


def _hf_steps(rank: int, world: int, hf_dir: str, micro_batch_tokens: int):
    from r1.engines.hf_train import HFTrainEngine

    engine = HFTrainEngine(hf_dir, micro_batch_size=3, micro_batch_tokens=micro_batch_tokens, with_reference=True,
                           **OPTIM)
    batch = _batch()
    shard = batch.select(torch.arange(len(batch))[rank::world]) if world > 1 else batch
    with strict_devices() as mode:
        engine.compute_logprobs(shard, temperature=0.9, reference=True)
        stats = engine.train_step(shard, _loss())
        weights = dict(engine.named_weights())
    return mode.checked, stats, weights


@pytest.mark.parametrize("micro_batch_tokens", [0, 25], ids=["padded", "packed"])
def test_the_hf_engines_step_names_every_device(tmp_path, micro_batch_tokens):
    """Two data-parallel ranks (the gradient and the token-count all-reduces), padded and packed micro-batches."""
    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    results = run_ranks(_hf_steps, 2, hf_dir, micro_batch_tokens, tmp_path=tmp_path)
    assert all(checked > 0 for checked, _, _ in results)
    torch.testing.assert_close(results[0][2], results[1][2])  # (the ranks agree: the reduce ran)


def _megatron_steps(rank: int, world: int, hf_dir: str):
    from r1.engines.megatron.engine import MegatronTrainEngine
    from r1.engines.megatron.layout import ParallelLayout

    engine = MegatronTrainEngine(hf_dir, layout=ParallelLayout(tp=1, pp=1, cp=2), micro_batch_tokens=25,
                                 with_reference=True, logprob_chunk_tokens=7, **OPTIM)
    with strict_devices() as mode:
        engine.compute_logprobs(_batch(), temperature=0.9)
        engine.train_step(_batch(), _loss())
        dict(engine.named_weights())
    return mode.checked


@pytest.mark.slow
def test_the_megatron_engines_step_names_every_device(tmp_path):
    """Context parallelism (the gathers and the packed attention), several packed micro-batches, the reference."""
    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    assert all(checked > 0 for checked in run_ranks(_megatron_steps, 2, hf_dir, tmp_path=tmp_path))
