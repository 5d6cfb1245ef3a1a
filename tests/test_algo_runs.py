"""Every algorithm choice added with GSPO/CISPO/RLOO/REINFORCE++ trains 2 steps of the default experiment end to end
(real Ray pools, HF engines, weight sync), and the mismatch canary acts on real runs: a weight push that leaves a
tensor out (the fire drill) is caught at that push and stops the run with a checkpoint; a batch threshold below what
the engines give escalates the run to masked IS from the next step, and a resumed run stays masked."""

import json

import pytest
import torch
from safetensors.torch import load_file

from r1.driver import run
from r1.monitoring.stop import HALT_EXIT, exit_code
from tests.test_end_to_end import _cfg

pytestmark = pytest.mark.slow


def _steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _incidents(run_dir):
    path = run_dir / "health" / "incidents.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _moved(run_dir, tiny_model, step):
    base = load_file(f"{tiny_model}/model.safetensors")
    trained = load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "policy" / "model.safetensors"))
    return [n for n in base if not torch.equal(base[n], trained[n])]


# (each also runs one canary setting: probes after every push; every second push - the start's probe of version 0
# is step 1's; none)
CANARY = {"gspo": ([], [1, 2]), "cispo": (["canary.every_pushes=2"], [0, 2]), "reinforce_pp": (["canary.enabled=false"], [])}


@pytest.mark.parametrize("algo", ["gspo", "cispo", "reinforce_pp"])
def test_each_new_algorithm_trains_two_steps(ray_local, tiny_model, cache_dir, tmp_path, algo):
    run_dir = tmp_path / algo
    canary, probed = CANARY[algo]
    out = run(_cfg(cache_dir, run_dir, total_steps=2, extra=[f"algo={algo}", "algo.group_size=4",
                                                             "algo.prompts_per_step=4",
                                                             "algo.overlong_buffer_share=0.25", *canary]))
    steps = _steps(run_dir)
    assert [m["canary/probe_version"] for m in steps if "canary/probe_version" in m] == probed
    assert (out["step"], out["version"], len(steps)) == (2, 2, 2)
    assert _moved(run_dir, tiny_model, 2), "no weight moved in two steps"
    for m in steps:
        assert torch.isfinite(torch.tensor(m["train/pg_loss"])) and m["train/optimizer_steps"] == 1
        # on-policy (one minibatch): pi = pi_old, so every ratio is 1 and nothing is clipped - GSPO's sequence ratio
        # and CISPO's weight included
        assert m["train/ratio_mean"] == pytest.approx(1.0) and m["train/clip_fraction"] == 0.0
        if "canary/probe_version" in m:
            assert m["canary/probe_logp_diff_mean"] < 1e-3  # (fp32 engines on both sides: they agree)
        # DAPO's overlong penalty, a reward term: budget 12, buffer 3 -> a cut response (12 tokens) gets -1, so the
        # mean is at most minus the cut share; and it is part of the reward the advantages were computed from
        assert -1.0 <= m["reward/overlong"] <= -m["response/truncated_fraction"]
        terms = ("accuracy", "format", "tests.test_end_to_end:digit_reward", "overlong")
        assert m["reward/mean"] == pytest.approx(sum(m[f"reward/{t}"] for t in terms), abs=1e-6)
    if algo == "reinforce_pp":  # token-mean of advantages whitened over the batch's tokens is 0: so is -A * 1
        assert all(abs(m["train/pg_loss"]) < 1e-5 for m in steps)


def test_rloo_with_a_drill_push_is_caught_at_that_push_and_halts(ray_local, tiny_model, cache_dir, tmp_path):
    """Version 2's push leaves q_proj of layer 0 out (the engine keeps version 1's): the probe after version 1 agrees,
    the one after version 2 does not; canary.action=stop halts the run with a checkpoint, exit 70.

    Measured here: the fp32 HF engines' teacher-forced probes agree exactly (0.0: the same forward as the
    trainer's), the stale q_proj (one update at lr 1e-3 behind) differs by ~7e-6 (mean |delta log p|): a threshold
    of 1e-6 separates them. (With bf16 engines the noise floor is higher and
    one step of a stale tensor can hide under it; see docs/algorithms.md.)"""
    run_dir = tmp_path / "drill"
    out = run(_cfg(cache_dir, run_dir, total_steps=3, extra=[
        "algo=rloo", "algo.group_size=4", "algo.prompts_per_step=4", "canary.action=stop",
        "canary.drill_skip_tensor=model.layers.0.self_attn.q_proj.weight", "canary.drill_from_version=2",
        "canary.probe_threshold=1e-6"]))
    steps = _steps(run_dir)
    assert [m["canary/probe_logp_diff_mean"] < 1e-6 for m in steps] == [True, False]
    [incident] = _incidents(run_dir)
    assert incident["signal"] == "mismatch_probe" and incident["action"] == "stop"
    assert "policy version 2" in incident["detail"] and "canary.probe_threshold=1e-06" in incident["detail"]
    assert out["step"] == 2 and out["halted"]["signal"] == "mismatch_probe" and exit_code(out) == HALT_EXIT
    assert (run_dir / "checkpoints" / "step_000002").is_dir()  # stopped with a checkpoint of where it was


def test_a_batch_threshold_below_the_engines_escalates_to_masked_is(ray_local, tiny_model, cache_dir, tmp_path):
    """The engines disagree by float noise (~1e-7); a threshold below it fires at step 1 and, with
    canary.action=mask, the loss masks from step 2 on: with algo.mask_low = mask_high = 1 every token whose ratio is
    not exactly 1 is dropped, so step 1 drops none and step 2 some. A resumed run stays masked."""
    run_dir = tmp_path / "mask"
    extra = ["algo=cispo", "algo.group_size=4", "algo.prompts_per_step=4", "canary.action=mask",
             "canary.batch_threshold=1e-12", "algo.mask_low=1.0", "algo.mask_high=1.0"]
    run(_cfg(cache_dir, run_dir, total_steps=2, extra=extra))
    first, second = _steps(run_dir)
    assert first["train/is_log_ratio_abs_mean"] > 1e-12  # (the premise: the engines are not bit-identical)
    assert first["train/mask_token_fraction"] == 0.0 and second["train/mask_token_fraction"] > 0.0
    assert (first["canary/escalated"], second["canary/escalated"]) == (1.0, 1.0)
    incidents = _incidents(run_dir)
    assert [i["action"] for i in incidents] == ["mask", "alert"]  # escalated once, then said again
    assert all(i["signal"] == "mismatch_batch" for i in incidents)
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "driver_state.json").read_text())
    assert state["canary"]["escalated"] is True and len(state["canary"]["sequences"]) == 4  # (+ the fixed probe)
    run(_cfg(cache_dir, run_dir, total_steps=3, resume=True, extra=extra[:-3] + ["algo.mask_low=1.0",
                                                                               "algo.mask_high=1.0"]))
    third = _steps(run_dir)[-1]
    assert third["canary/escalated"] == 1.0 and third["train/mask_token_fraction"] > 0.0
