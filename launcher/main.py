"""``r1-launch``: compose the Hydra config, validate it, and run the GRPO driver on the chosen cluster.

    r1-launch                                   # the embedded CPU default
    r1-launch +experiment=r1_zero cluster=local # the paper's settings
    r1-launch cluster=slurm cluster.slurm.partition=gpu cluster.slurm.shared_dir=/shared   # submit a Slurm job
    r1-launch status run_dir=/shared/outputs/x  # its job in Slurm's accounting, and the last progress line
    r1-launch cancel run_dir=/shared/outputs/x
    r1-launch cluster=k8s cluster.k8s.namespace=research   # a RayJob on KubeRay, through the helm/r1 chart
    r1-launch status release=r1-x namespace=research       # (cancel likewise)
    r1-launch +experiment=r1_zero cluster=slurm plan=true   # memory per GPU, step time, node split; nothing runs
    r1-launch --cfg job                         # print the resolved config and exit
    r1-launch run_dir=outputs/x resume=true     # continue a run from its latest checkpoint
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from r1.config.schema import register_configs
from r1.config.validate import ConfigError, check_key, validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
GROUPS = ("cluster", "model", "data", "rollout", "trainer", "algo", "reward", "logger", "experiment")


def check_overrides(args: list[str]) -> None:
    """Fail fast, with the valid keys, on an override whose key the schema does not have."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("hydra") or key in GROUPS or key.split("/")[0] in GROUPS and "." not in key:
            continue  # group choices are checked by Hydra, which lists the available options
        check_key(key)


def to_plain(cfg: DictConfig) -> DictConfig:
    """Resolved config with enums as strings: what workers receive (picklable, no Hydra resolvers needed)."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config ``r1-launch <overrides>`` would run, composed in-process (tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    check_overrides(list(overrides or []))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_plain(cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    cfg.choices = choices
    plain = to_plain(cfg)
    if plain.pipeline.stages:  # +pipeline=...: its stages, each an r1-launch run of its own
        from launcher.pipeline import run_pipeline

        sys.exit(run_pipeline(plain, list(HydraConfig.get().overrides.task)))
    try:
        for warning in validate(plain):
            logging.getLogger("r1").warning(warning)
        from r1.inputs import check_inputs

        if plain.cluster.kind != "k8s":  # (on Kubernetes the inputs are on the volume: the driver checks them there)
            check_inputs(plain)  # also the driver's first step; here so that a bad path is a clean exit 2
    except ConfigError as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        sys.exit(2)
    if plain.cluster.kind == "slurm":
        sys.exit(submit_to_slurm(plain))
    if plain.cluster.kind == "k8s":
        sys.exit(submit_to_k8s(plain))
    from r1.ray_auth import protect_private_cluster

    protect_private_cluster(plain.cluster)  # (before Ray is first imported: token auth for the instance it starts)
    from r1.stages import run

    try:
        result = run(plain)
    except ConfigError as err:  # found once the model is known (e.g. an architecture vLLM cannot serve)
        print(f"r1-launch: {err}", file=sys.stderr)
        sys.exit(2)
    from r1.monitoring.stop import exit_code

    sys.exit(exit_code(result))  # 0; 75 when it aborted itself (r1.health) after a checkpoint; 128 + signal


def print_plan(cfg) -> int:
    """``plan=true``: the plan of this run, printed; nothing started or submitted. Exit 0 when both pools fit, 1 when
    one does not (the refusal a submission would get), 2 for a config error."""
    from r1.plan import make_plan, render

    if cfg.pipeline.stages:
        print("r1-launch: plan=true plans one run: give a stage's experiment (+experiment=...) instead of +pipeline",
              file=sys.stderr)
        return 2
    try:
        for warning in validate(cfg):
            logging.getLogger("r1").warning(warning)
        plan = make_plan(cfg)
    except (ConfigError, ValueError) as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        return 2
    print(render(plan))
    if not plan.fits:
        print(f"\nr1-launch: {plan.refusal}", file=sys.stderr)
    return 0 if plan.fits else 1


def submit_to_slurm(cfg) -> int:
    """Render the job script next to the run's config and submit it; say where to follow it."""
    from launcher.slurm import SlurmError, submit

    try:
        script, job_id = submit(cfg)
    except (ConfigError, SlurmError) as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        return 2
    run_dir = script.parent
    if job_id is None:
        print(f"r1-launch: rendered {script} (cluster.dry_run=true: not submitted)")
    else:
        print(f"r1-launch: submitted Slurm job {job_id}\n  script  {script}\n  log     {run_dir}/slurm-{job_id}.out"
              f"\n  metrics {run_dir}/metrics.jsonl\n  follow  r1-launch status run_dir={run_dir}")
    if cfg.logger.backend == "wandb":
        from r1.monitoring.loggers import wandb_mode, wandb_run_id

        mode = wandb_mode(cfg.logger.mode)  # the job inherits this environment (sbatch exports it)
        where = "wandb.ai" if mode == "online" else f"offline, in {run_dir}/wandb: upload with wandb sync"
        print(f"  W&B     {cfg.logger.entity + '/' if cfg.logger.entity else ''}{cfg.logger.project}, run "
              f"{wandb_run_id(run_dir)} ({where})")
    return 0


def submit_to_k8s(cfg) -> int:
    """Render the chart from the config, create its objects, follow the RayJob until it ends."""
    from launcher import k8s

    release, namespace = k8s.release_name(cfg), str(cfg.cluster.k8s.namespace)
    try:
        records, objects = k8s.render(cfg)
        if cfg.cluster.dry_run:
            print(f"r1-launch: rendered {records}/manifests.yaml from {records}/values.yaml (cluster.dry_run=true: "
                  f"nothing created; helm install {release} {k8s.CHART} -n {namespace} -f {records}/values.yaml)")
            return 0
        k8s.create(objects, namespace)
    except (ConfigError, k8s.K8sError) as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        return 2
    print(f"r1-launch: created release {release} in namespace {namespace} ({', '.join(o['kind'] for o in objects)})"
          f"\n  follow  r1-launch status release={release} namespace={namespace}"
          f"\n  logs    kubectl -n {namespace} logs -f job/{release}", flush=True)
    try:
        return k8s.follow(release, namespace, cfg.cluster.k8s.poll_s, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"stopped following; the run goes on (r1-launch cancel release={release} namespace={namespace})")
        return 130


def job_command(command: str, args: list[str]) -> int:
    """``r1-launch status|cancel run_dir=DIR`` (the run's Slurm job) or ``... release=NAME [namespace=NS]`` (its
    RayJob on Kubernetes)."""
    given = dict(a.split("=", 1) for a in args if "=" in a)
    if "release" in given:
        from launcher import k8s

        release, namespace = given["release"], given.get("namespace", "default")
        try:
            print(k8s.status(release, namespace) if command == "status"
                  else "deleted " + " ".join(k8s.cancel(release, namespace)))
        except k8s.K8sError as err:
            print(f"r1-launch: {err}", file=sys.stderr)
            return 2
        return 0
    from launcher.slurm import SlurmError, cancel, status

    if "run_dir" not in given:
        print(f"r1-launch: usage: r1-launch {command} run_dir=<the run's directory> (Slurm) | release=<name> "
              f"[namespace=<ns>] (Kubernetes)", file=sys.stderr)
        return 2
    try:
        print(status(given["run_dir"]) if command == "status" else f"cancelled Slurm job {cancel(given['run_dir'])}")
    except SlurmError as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        return 2
    return 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("status", "cancel"):
        sys.exit(job_command(sys.argv[1], sys.argv[2:]))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    register_configs()
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"r1-launch: {err}", file=sys.stderr)
        sys.exit(2)
    if any(a.lower() in ("plan=true", "plan=1", "plan=yes") for a in sys.argv[1:]):
        # composed in-process (no run directory, no Hydra log): planning leaves nothing behind
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = compose(sys.argv[1:])
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            print(f"r1-launch: {err}", file=sys.stderr)
            sys.exit(2)
        sys.exit(print_plan(cfg))
    hydra_main()


if __name__ == "__main__":
    main()
