"""``+pipeline=r1``: how each stage is fed by the ones before, and the whole pipeline end to end on the tiny model
(every stage a few steps): a failing stage stops it with its name, a re-run skips the finished stages and consumes
each stage's output in the next, and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher.pipeline import base_model, stage_args, user_overrides
from tests.conftest import REPO, TINY, compose


def always(response: str, reference: str) -> float:
    """A verifier that accepts everything: a model trained for 2 steps is never right, and the SFT stage after
    rejection sampling needs rows."""
    return 1.0


def test_each_stage_gets_the_outputs_of_the_ones_before(tmp_path):
    args = ["+pipeline=r1", f"pipeline.dir={tmp_path}", "logger=none", "trainer.total_steps=2", "run_dir=ignored"]
    cfg = compose(args)
    stages = {s.name: s for s in cfg.pipeline.stages}
    assert user_overrides(args) == ["logger=none", "trainer.total_steps=2"]

    rl = stage_args(cfg, stages["reasoning_rl"], args, base="/models/base")
    assert rl[0] == "+experiment=r1_reasoning_rl"
    assert f"model.path={tmp_path / 'cold_start' / 'policy'}" in rl and "model.source=pretrained" in rl
    assert f"run_dir={tmp_path / 'reasoning_rl'}" in rl and "resume=true" in rl
    sft = stage_args(cfg, stages["sft"], args, base="/models/base")
    assert f"sft.datasets.0.path={tmp_path / 'rejection_sampling' / 'sft_data.jsonl'}" in sft
    assert not any(a.startswith("model.path=") for a in sft)  # the base model, as in the paper
    ev = stage_args(cfg, stages["eval"], args, base="/models/base")
    assert (f"eval.checkpoints=[/models/base,{tmp_path}/cold_start/policy,{tmp_path}/reasoning_rl/policy,"
            f"{tmp_path}/sft/policy,{tmp_path}/all_scenario_rl/policy]") in ev
    assert "eval.labels=[base,cold_start,reasoning_rl,sft,all_scenario_rl]" in ev
    assert ev.index("eval.k=4") < ev.index("trainer.total_steps=2")  # the command line wins over the stage's own
    composed = compose(ev)  # what the stage's r1-launch composes
    assert composed.stage == "eval" and composed.eval.k == 4 and composed.trainer.total_steps == 2
    report = compose(stage_args(cfg, stages["report"], args, base=None))
    assert report.report.dir == str(tmp_path) and list(report.report.stages)[-2:] == ["all_scenario_rl", "eval"]

    distill = compose(["+pipeline=r1_distill", f"pipeline.dir={tmp_path}", "run_dir=x"])
    with pytest.raises(ValueError, match="needs pipeline.teacher"):
        stage_args(distill, distill.pipeline.stages[0], [], base=None)


def test_the_base_model_is_an_absolute_path_where_the_stages_run(tmp_path, monkeypatch):
    """Stages run from the repository (locally) or on other nodes (Slurm): a relative cache_dir, taken where r1-launch
    ran, must reach them as an absolute path."""
    monkeypatch.chdir(tmp_path)
    args = ["+pipeline=r1", *TINY, "cache_dir=cache", "run_dir=x"]
    base = base_model(compose(args), args)
    assert base.startswith(str(tmp_path / "cache" / "models")) and (Path(base) / "config.json").is_file()


SMALL = [
    "logger=none", "trainer.total_steps=2", "algo.group_size=2", "algo.prompts_per_step=2", "rollout.num_workers=1",
    "rollout.length_schedule=[{from_step: 0, max_tokens: 12}]", "eval.k=2", "eval.max_problems=3",
    "eval.max_new_tokens=12", "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=0",
    "sft.batch_size=4", "rejection.num_prompts=4", "rejection.prompts_per_shard=2", "rejection.samples_per_prompt=2",
    "rejection.max_new_tokens=12", "reward.model.tiny_train_steps=5", "health.enabled=false",
]
STAGE_3 = ["reward.terms=[{name: 'tests.test_pipeline:always', weight: 1.0}]",
           "rejection.correct_term='tests.test_pipeline:always'", "rejection.require_format=false",
           "rejection.min_language_consistency=0", "rejection.max_repetition=1", "rejection.keep_truncated=true"]
ACCEPT_ALL = "pipeline.stages.2.overrides=[" + ",".join(f'"{o}"' for o in STAGE_3) + "]"


def _pipeline(cache_dir, root, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.main", "+pipeline=r1", *TINY, *SMALL, f"cache_dir={cache_dir}",
           f"pipeline.dir={root}", ACCEPT_ALL, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)


@pytest.mark.slow
def test_the_r1_pipeline_runs_its_stages_skips_finished_ones_and_stops_at_a_failure(tiny_model, cache_dir,
                                                                                   tmp_path):
    root = tmp_path / "r1"
    # the first two stages finished before (as they leave themselves: a record and a policy; how each is fed is
    # test_each_stage_gets_the_outputs_of_the_ones_before's, and each stage's own test runs it)
    for stage in ("cold_start", "reasoning_rl"):
        (root / stage).mkdir(parents=True)
        (root / stage / "stage.json").write_text("{}")
        (root / stage / "policy").symlink_to(tiny_model)
    broken_sft = 'pipeline.stages.3.overrides=["model.source=pretrained","model.path=/no/such/model"]'
    failed = _pipeline(cache_dir, root, broken_sft)
    assert failed.returncode != 0
    assert "pipeline r1 stopped: stage sft failed" in failed.stderr, failed.stderr[-3000:]
    assert "stage 1/7 cold_start finished already" in failed.stdout
    assert (root / "rejection_sampling" / "stage.json").is_file() and not (root / "sft" / "stage.json").exists()

    done = _pipeline(cache_dir, root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage 3/7 rejection_sampling finished already" in done.stdout
    stages = ["cold_start", "reasoning_rl", "rejection_sampling", "sft", "all_scenario_rl", "eval", "report"]
    assert all((root / s / "stage.json").is_file() for s in stages)

    def config(stage):
        return OmegaConf.load(root / stage / "config.yaml")

    # each stage consumed the previous stage's output
    assert config("rejection_sampling").model.path == str(root / "reasoning_rl" / "policy")
    assert config("sft").sft.datasets[0].path == str(root / "rejection_sampling" / "sft_data.jsonl")
    assert config("all_scenario_rl").model.path == str(root / "sft" / "policy")
    sft_rows = (root / "rejection_sampling" / "sft_data.jsonl").read_text().splitlines()
    assert len(sft_rows) == 4 * 2  # every sample accepted (rejection.keep_per_prompt=2)
    steps = [json.loads(x) for x in (root / "all_scenario_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "reward/mean" in m] == [1, 2]
    assert "reward/reward_model" in steps[0]
    summary = json.loads((root / "eval" / "eval" / "summary.json").read_text())
    assert list(summary) == ["base", "cold_start", "reasoning_rl", "sft", "all_scenario_rl"]
    report = (root / "report.md").read_text()
    assert "| all_scenario_rl |" in report and (root / "report_stages.png").stat().st_size > 1000
    assert (root / "report_curves.png").stat().st_size > 1000

    again = _pipeline(cache_dir, root)
    assert again.returncode == 0 and again.stdout.count("finished already") == len(stages)


def test_the_report_shows_each_stage_from_what_it_left(tmp_path):
    from r1.report import build

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(tmp_path / "cold" / "metrics.jsonl", [{"step": 1, "train/nll": 2.5}, {"step": 2, "train/nll": 1.25}])
    write(tmp_path / "rl" / "metrics.jsonl", [{"step": 0, "eval/pass@1": 0.1}] + [
        {"step": s, "reward/mean": r, "reward/accuracy": r / 2, "response/length_mean": 10 + s}
        for s, r in ((1, 0.5), (2, 0.75))])
    write(tmp_path / "rs" / "metrics.jsonl", [{"step": 1, "rejection/kept": 3}])
    (tmp_path / "rs" / "rejection").mkdir()
    (tmp_path / "rs" / "rejection" / "summary.json").write_text(json.dumps(
        {"samples": 8, "kept": 3, "rejected/incorrect": 5, "rows": 3, "prompts": 4}))
    m = {"pass@1": 0.25, "cons@4": 0.5, "format_rate": 1.0, "language": 0.5, "response_length": 12.0, "problems": 8}
    (tmp_path / "ev" / "eval").mkdir(parents=True)
    (tmp_path / "ev" / "eval" / "summary.json").write_text(json.dumps({"base": {"aime": m}, "rl": {"aime": m}}))
    (tmp_path / "cold" / "stage.json").write_text(json.dumps({"stage": "sft"}))
    report = build(tmp_path, ["cold", "rl", "rs", "ev"], "tiny").read_text()
    assert "## aime (8 problems; cons@4)" in report
    assert "| rl | 25.0 | 50.0 | 100.0 | 50.0 | 12.0 |" in report
    assert "- cold: SFT, 2 steps, NLL per response token 2.500 -> 1.250" in report
    assert "- rl: GRPO, 2 steps, reward 0.500 -> 0.750" in report and "- rs:" not in report
    assert "3 rows kept of 8 samples for 4 prompts (rejected: incorrect 5)" in report
    assert "| cold | sft | yes |" in report and "| rl | - | no |" in report
    assert (tmp_path / "report_stages.png").stat().st_size > 1000 and (tmp_path / "report_curves.png").is_file()
