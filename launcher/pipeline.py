"""``r1-launch +pipeline=r1`` (or ``r1_distill``): the stages of ``pipeline.stages`` in order, each an ordinary r1 run
(``+experiment=<stage.experiment>``) in ``<pipeline.dir>/<stage.name>``, fed by the stages before it.

- Locally each stage is a ``python -m launcher.main`` process of its own (a clean Ray, a clean exit code); with
  ``cluster=slurm`` each stage is a Slurm job depending on the one before (``--dependency=afterok``, and
  ``--kill-on-invalid-dep``: a failed stage cancels the rest).
- A stage that finished (its ``stage.json``, ``r1.stages``) is skipped on a re-run; an unfinished one resumes from its
  checkpoint (``resume=true``) or its written shards.
- A failed stage stops the pipeline with its name, exit code and directory.

Each stage composes ``+experiment=<experiment>``, then the stage's own ``overrides``, the pipeline's
``pipeline.overrides`` and the command line's (``logger=none``, ``cluster=slurm``, sizes), later ones winning.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from r1.config.schema import under
from r1.stages import is_done

REPO = Path(__file__).resolve().parent.parent


def pipeline_dir(cfg) -> Path:
    shared = cfg.cluster.slurm.shared_dir if cfg.cluster.kind == "slurm" else None
    return Path(under(shared, cfg.pipeline.dir)).expanduser().absolute()


def user_overrides(args: list[str]) -> list[str]:
    """The command line's overrides without the pipeline's own (each stage gets its experiment and run_dir)."""
    return [a for a in args if not a.lstrip("+~").startswith(("pipeline=", "pipeline.", "run_dir=", "resume="))]


def base_model(cfg, args: list[str]) -> str:
    """The run's base model as a path (the tiny one is built, or found in the cache, here). Under Slurm the cache is
    the jobs' own, on the shared directory: the nodes that run the stages read the model from there."""
    from launcher.main import compose
    from r1.inputs import prepare_model

    base = compose(user_overrides(args))
    if base.cluster.kind == "slurm":
        from launcher.slurm import on_shared_dir

        on_shared_dir(base)
    return str(Path(prepare_model(base)).absolute())  # (stages run elsewhere: another cwd, another node)


def stage_args(cfg, stage, args: list[str], base: str | None) -> list[str]:
    root = pipeline_dir(cfg)

    def model_of(ref: str) -> str:
        if ref == "base":
            return base
        if ref == "teacher":
            if not cfg.pipeline.teacher:
                raise ValueError(f"pipeline {cfg.pipeline.name}: stage {stage.name} needs pipeline.teacher=<HF dir>")
            return str(Path(cfg.pipeline.teacher).expanduser().absolute())
        if ref in {s.name for s in cfg.pipeline.stages}:
            return str(root / ref / "policy")
        return str(Path(ref).expanduser().absolute())

    # later overrides win: the stage's own, the pipeline's, the command line's; then what wires the stages together
    out = [f"+experiment={stage.experiment}", *stage.overrides, *cfg.pipeline.overrides, *user_overrides(args),
           f"run_dir={root / stage.name}", f"name={cfg.pipeline.name}_{stage.name}", "resume=true"]
    if stage.model:
        out += ["model.source=pretrained", f"model.path={model_of(stage.model)}"]
    if stage.sft_data:
        out.append(f"sft.datasets.0.path={root / stage.sft_data / 'sft_data.jsonl'}")
    if stage.checkpoints:
        out.append(f"eval.checkpoints=[{','.join(model_of(c) for c in stage.checkpoints)}]")
        out.append(f"eval.labels=[{','.join(stage.checkpoints)}]")
    if stage.experiment == "report":
        before = [s.name for s in cfg.pipeline.stages][: [s.name for s in cfg.pipeline.stages].index(stage.name)]
        out += [f"report.dir={root}", f"report.stages=[{','.join(before)}]",
                f"report.title='{cfg.pipeline.name} pipeline'"]
    return out


def run_pipeline(cfg, args: list[str]) -> int:
    p = cfg.pipeline
    root = pipeline_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    needs_base = any("base" in (s.model, *s.checkpoints) for s in p.stages if not is_done(root / s.name))
    base = base_model(cfg, args) if needs_base else None
    slurm = cfg.cluster.kind == "slurm"
    previous_job = None
    for i, stage in enumerate(p.stages, start=1):
        where = root / stage.name
        if is_done(where):
            print(f"r1-launch: pipeline {p.name}: stage {i}/{len(p.stages)} {stage.name} finished already "
                  f"({where}/stage.json): skipped")
            continue
        stage_cmd = stage_args(cfg, stage, args, base)
        print(f"r1-launch: pipeline {p.name}: stage {i}/{len(p.stages)} {stage.name} (+experiment="
              f"{stage.experiment}) in {where}", flush=True)
        if slurm:
            ok, previous_job = submit_stage(stage_cmd, previous_job)
            if not ok:
                return 2
            continue
        code = subprocess.run([sys.executable, "-m", "launcher.main", *stage_cmd], cwd=REPO, check=False).returncode
        if code != 0 or not is_done(where):
            print(f"r1-launch: pipeline {p.name} stopped: stage {stage.name} failed (exit code {code}); its files "
                  f"and log are in {where}. Fix the cause and run the same command again: finished stages are "
                  f"skipped, this one resumes.", file=sys.stderr)
            return code or 1
    if not slurm:
        print(f"r1-launch: pipeline {p.name} finished: {root}" + (
            f" (report: {root / 'report.md'})" if (root / "report.md").is_file() else ""))
    return 0


def submit_stage(stage_cmd: list[str], after: str | None) -> tuple[bool, str | None]:
    """The stage as a Slurm job that starts once ``after`` (the stage before) succeeded: (submitted or rendered,
    its job id; None for cluster.dry_run)."""
    from launcher.main import compose
    from launcher.slurm import SlurmError, submit
    from r1.config.validate import ConfigError

    cmd = [*stage_cmd, *([f"cluster.slurm.after=[{after}]"] if after else [])]
    try:
        script, job = submit(compose(cmd))  # (the job checks its inputs when it starts: earlier stages make them)
    except (ConfigError, SlurmError) as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        return False, None
    print(f"r1-launch:   Slurm job {job or '(dry run: not submitted)'}" + (f" after {after}" if after else "")
          + f": {script}")
    return True, job
