"""Every experiment x cluster x model composes and validates; typos fail with the key and the choices."""

import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from r1.config.validate import ConfigError, check_key, validate
from tests.conftest import CONF_DIR, REPO, compose

EXPERIMENTS = [None] + sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (CONF_DIR / "cluster").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_expected_models_exist():
    assert {"tiny", "qwen2_5_1_5b", "qwen2_5_7b", "qwen2_5_32b", "qwen2_5_math_7b", "llama3_1_8b",
            "llama3_1_70b"} <= set(MODELS)


def _own_values(group: str, choice: str) -> dict[str, object]:
    """The leaves a config file sets itself (not its defaults list), by their dotted key in the composed config,
    read with plain YAML: the reference the composition is checked against."""
    path = CONF_DIR / group / f"{choice}.yaml"
    text = path.read_text()
    body = yaml.safe_load(text) or {}
    body.pop("defaults", None)
    prefix = "" if "# @package _global_" in text else f"{group}."

    def leaves(node, key):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, f"{key}.{k}" if key else str(k))
        else:
            yield key, node

    return {prefix + k: v for k, v in leaves(body, "")}


def _same(expected, got) -> bool:
    """``got`` is what the file says: equal, or (list items typed by the schema) its entries with their defaults."""
    if expected == got:
        return True
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(_same(e, g) for e, g in zip(expected, got, strict=True))
    if isinstance(expected, dict) and isinstance(got, dict):
        return all(k in got and _same(v, got[k]) for k, v in expected.items())
    try:  # (PyYAML reads 1e-3 as a string, OmegaConf as a float)
        return float(expected) == float(got)
    except (TypeError, ValueError):
        return False


# All pairs (each experiment with each cluster, and with each model): a model file and a cluster file set disjoint
# keys (checked below), so what a pair composes is what the triple would
PAIRS = sorted({(e, c, None) for e in EXPERIMENTS for c in CLUSTERS} | {(e, "local", m) for e in EXPERIMENTS
                                                                        for m in MODELS}, key=str)


@pytest.mark.parametrize("experiment, cluster, model", PAIRS)
def test_every_pair_composes_validates_and_carries_each_files_own_values(experiment, cluster, model):
    """Composed and validated, the config holds every value the chosen model, cluster and experiment files set
    themselves (the experiment's winning where both set one), read independently with plain YAML - a layer that
    lands in the wrong package, or a schema default that silently wins over a file, fails here."""
    overrides = [f"cluster={cluster}", "run_dir=x"] + ([f"model={model}"] if model else [])
    if experiment:
        overrides.insert(0, f"+experiment={experiment}")
    cfg = compose(overrides)
    validate(cfg)
    expected = {**_own_values("cluster", cluster), **(_own_values("model", model) if model else {}),
                **(_own_values("experiment", experiment) if experiment else {})}
    assert expected
    for key, value in expected.items():
        if isinstance(value, str) and "${" in value:
            continue  # (an interpolation: resolved by OmegaConf, checked by the tests of what it points to)
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert _same(value, got), f"{key}: the file sets {value!r}, the composed config has {got!r}"


def test_model_and_cluster_files_set_disjoint_keys():
    """What lets the pairs above stand for every triple."""
    models = {k for m in MODELS for k in _own_values("model", m)}
    clusters = {k for c in CLUSTERS for k in _own_values("cluster", c)}
    assert not models & clusters


def test_r1_zero_carries_the_paper_settings():
    cfg = compose(["+experiment=r1_zero", "run_dir=x"])
    a = cfg.algo
    assert (a.name, a.group_size, a.prompts_per_step, a.kl_coef, a.kl_kind) == ("grpo", 16, 32, 0.001, "k3")
    assert a.ref_update_interval == 400 and a.loss_agg == "seq_mean_token_mean"
    assert cfg.trainer.lr == 3e-6 and cfg.rollout.temperature == 1.0
    assert [(s.from_step, s.max_tokens) for s in cfg.rollout.length_schedule] == [(0, 32768), (8200, 65536)]
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.k) == (0.6, 0.95, 16)
    assert [(t.name, t.weight) for t in cfg.reward.terms] == [("accuracy", 1.0), ("format", 1.0)]


def test_misspelt_key_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        check_key("algo.kl_coeff")
    msg = str(err.value)
    assert "kl_coeff" in msg and "Did you mean 'algo.kl_coef'" in msg and "group_size" in msg
    with pytest.raises(ConfigError, match="Valid keys of the top level"):
        check_key("algorithm.group_size")
    check_key("model.tiny.style_mix.careful")  # dict-typed fields take any key


def test_semantic_errors_are_listed():
    cfg = compose(["run_dir=x", "algo.group_size=1", "rollout.temperature=0"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "algo.group_size=1" in str(err.value) and "rollout.temperature" in str(err.value)


def test_base_model_selection_options_are_checked():
    cfg = compose(["run_dir=x", "model.tiny.select_band=[0.3,0.1]", "model.tiny.select_every=0",
                   "model.tiny.select_min_thinking_accuracy=2", "+model.tiny.style_mix.sloppy=1"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "model.tiny.select_band=[0.3, 0.1]: [low, high] with 0 <= low <= high <= 1" in text
    assert "model.tiny.select_every, select_problems and select_samples must be >= 1" in text
    assert "model.tiny.select_min_thinking_accuracy=2" in text
    assert "model.tiny.style_mix: styles ['sloppy'] -- the styles are ['careful', 'careless', 'malformed', " in text
    validate(compose(["run_dir=x", "model.tiny.select_band=null"]))


def test_async_options_are_checked():
    cfg = compose(["run_dir=x", "rollout.partial_rollouts=true", "algo.max_staleness=-1", "algo.is_cap=0.5"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "partial_rollouts=true needs algo.max_staleness >= 1" in text
    assert "algo.max_staleness must be >= 0" in text and "algo.is_cap=0.5" in text
    validate(compose(["run_dir=x", "rollout.partial_rollouts=true", "algo.max_staleness=1"]))


def test_a_vllm_engine_gets_one_gpu_per_tensor_parallel_rank():
    """vLLM's tensor-parallel ranks are processes of the rollout worker, on the GPUs Ray gave it."""
    cfg = compose(["run_dir=x", "rollout=vllm", "rollout.gpus_per_worker=1", "rollout.vllm.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"rollout.gpus_per_worker=1 must equal rollout.vllm.tensor_parallel_size=2"):
        validate(cfg)
    validate(compose(["run_dir=x", "rollout=vllm", "rollout.gpus_per_worker=2", "rollout.vllm.tensor_parallel_size=2"]))


def test_megatron_layout_is_checked_against_the_pool_and_the_model(tiny_model):
    cfg = compose(["run_dir=x", "trainer=megatron", "trainer.num_workers=3", "trainer.megatron.tensor_parallel=2"])
    with pytest.raises(ConfigError, match=r"trainer.num_workers=3 is not a multiple of .* = 2"):
        validate(cfg)
    validate(compose(["run_dir=x", "trainer=megatron", "trainer.num_workers=4", "trainer.megatron.tensor_parallel=2"]))
    cfg = compose(["run_dir=x", "trainer=megatron", "trainer.num_workers=2", "trainer.megatron.context_parallel=2",
                   "trainer.megatron.recompute=partial"])
    with pytest.raises(ConfigError, match=r"recompute='partial': choose one of \['none', 'selective', 'full'\]"):
        validate(cfg)
    # the tiny test model has one KV head: two tensor-parallel ranks cannot split it (said before any process group)
    from r1.engines.megatron.engine import MegatronTrainEngine
    from r1.engines.megatron.layout import ParallelLayout

    with pytest.raises(ValueError, match="tensor_parallel=2 does not divide the model's 2 attention heads and 1"):
        MegatronTrainEngine(tiny_model, layout=ParallelLayout(tp=2), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0,
                            warmup_steps=0, grad_clip=1.0, micro_batch_tokens=64, with_reference=False)


def _launch(*args):
    return subprocess.run([sys.executable, "-m", "launcher.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_typo_in_key_fails_before_anything_starts():
    out = _launch("algo.kl_coeff=0.1")
    assert out.returncode == 2
    assert "Did you mean 'algo.kl_coef'" in out.stderr


def test_cli_typo_in_group_choice_lists_options():
    out = _launch("cluster=slrum")
    assert out.returncode != 0
    assert "cluster/slrum" in out.stderr and "local" in out.stderr


def test_cli_wrong_type_names_the_key():
    out = _launch("algo.group_size=many")
    assert out.returncode != 0 and "algo.group_size" in out.stderr


def test_cli_wrong_enum_lists_valid_values():
    out = _launch("algo.loss_agg=sum")
    assert out.returncode != 0 and "token_mean" in out.stderr


def test_cli_prints_resolved_config():
    out = _launch("+experiment=r1_zero", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "group_size: 16" in out.stdout and "lr: 3.0e-06" in out.stdout


def test_kl_k1_in_the_loss_is_an_error_and_stale_samples_without_correction_a_warning():
    with pytest.raises(ConfigError, match="expectation under pi is zero"):
        validate(compose(["run_dir=x", "algo.kl_kind=k1", "algo.kl_placement=loss", "algo.kl_coef=0.01"]))
    assert validate(compose(["run_dir=x", "algo.kl_kind=k1", "algo.kl_placement=reward"])) == []
    assert validate(compose(["run_dir=x", "algo.kl_kind=k1", "algo.kl_coef=0"])) == []  # no KL term at all
    [warning] = validate(compose(["run_dir=x", "algo.max_staleness=2", "algo.is_level=none"]))
    assert "algo.max_staleness=2 with algo.is_level=none and algo.mask_level=none" in warning and "biased" in warning
    assert validate(compose(["run_dir=x", "algo.max_staleness=2"])) == []


def test_user_files_with_the_generator_still_on_is_an_error():
    with pytest.raises(ConfigError, match="data.generator=null"):
        validate(compose(["run_dir=x", "data.train_path=mine.jsonl"]))


def test_missing_model_weights_fail_at_once_naming_model_path_and_r1_models(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launcher.main", "model=qwen2_5_7b", f"cache_dir={tmp_path}",
                          f"run_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "R1_MODELS": str(tmp_path / "no-models-here")}, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"model.path={tmp_path / 'no-models-here'}/Qwen/Qwen2.5-7B" in out.stderr
    assert "R1_MODELS" in out.stderr and "Traceback" not in out.stderr


def test_missing_prompt_file_fails_before_the_tiny_model_is_pretrained(tmp_path):
    out = _launch("data.generator=null", "data.train_path=/missing/train.jsonl",
                  f"data.eval_path={tmp_path / 'eval.jsonl'}", f"cache_dir={tmp_path / 'cache'}",
                  f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "data.train_path=/missing/train.jsonl does not exist" in out.stderr
    assert f"data.eval_path={tmp_path / 'eval.jsonl'} does not exist" in out.stderr
    assert not (tmp_path / "cache").exists(), "pretraining started before the paths were checked"


def test_the_hf_engine_refuses_a_model_it_cannot_hold_and_r1_zero_trains_on_megatron(tmp_path):
    """Qwen2.5-7B (its published config: 7,615,616,512 parameters) on an 80 GB GPU: the HF engine's fp32 weights,
    gradients, AdamW state and reference are 142 GiB before any activation - refused before anything is allocated.
    The paper's experiment runs on Megatron, with a layout the pool's 8 ranks hold."""
    from transformers import Qwen2Config

    from r1.engines.hf_train import check_fits, count_parameters

    Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(tmp_path)
    params = count_parameters(str(tmp_path))
    assert params == 7_615_616_512
    with pytest.raises(ValueError, match=r"7.62B parameters need 142 GiB .* has 80 GiB. Use trainer=megatron"):
        check_fits(params, 80 * 2**30, with_reference=True, what="GPU H100")
    check_fits(params, 80 * 2**30 * 2, with_reference=True, what="two H100s' worth")
    cfg = compose(["+experiment=r1_zero", "run_dir=x"])
    validate(cfg)
    m = cfg.trainer.engine, cfg.trainer.megatron
    assert m[0] == "megatron" and (m[1].tensor_parallel, m[1].context_parallel, m[1].recompute) == (2, 2, "full")
    assert m[1].sequence_parallel and m[1].overlap_grad_reduce and m[1].grad_reduce_in_fp32  # (fp32: see the yaml)
    assert cfg.trainer.num_workers == 8 and cfg.trainer.num_workers // (2 * 2) == 2  # data parallel 2
