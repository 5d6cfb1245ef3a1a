"""``plan=true``: will this run fit, how fast will it go, how to split the GPUs - from the config alone.

``make_plan(cfg)`` reads the model's shape, the pools, their layouts, the context schedule and the batch, and
returns each pool's bytes per GPU against the GPU's memory, the step's phases, the node split that balances the two
pools and, for a pool that does not fit, the smallest change that does (docs/plan.md). Nothing is started: no Ray, no
engine, no model weights read.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace

from r1.plan import gpus as gpu_kinds
from r1.plan.gpus import GIB, GPUKind
from r1.plan.rollout_memory import EngineLayout, blocks_per_sequence, hf_rollout_memory, vllm_memory
from r1.plan.shape import ModelShape, of_model
from r1.plan.timing import Assumptions, generation_s, sync_s, training_s
from r1.plan.train_memory import TrainLayout, hf_memory, megatron_memory

RECOMPUTE_COST = {"none": 1.0, "selective": 1.02, "full": 4 / 3}  # training FLOPs relative to none


@dataclass
class PoolPlan:
    name: str  # training | rollout
    gpus: int  # GPUs of the pool (0: CPU workers)
    layout: str
    terms: dict[str, float]  # bytes per GPU (per worker on CPU)
    capacity: float  # bytes per GPU; 0 for CPU workers (not checked)
    problem: str = ""
    fix: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def used(self) -> float:
        return sum(v for k, v in self.terms.items() if k in USED_TERMS)

    @property
    def fits(self) -> bool:
        return not self.problem


USED_TERMS = ("weights", "gradients", "optimizer", "reference", "activations", "logprob_buffers", "non_torch",
              "kv_cache", "reserved")


@dataclass
class Plan:
    gpu: GPUKind
    gpu_source: str
    shape: ModelShape
    shape_source: str
    prompt_tokens: int
    longest_response: int
    train: PoolPlan | None  # None: the stage has no such pool (sft: no rollout pool; eval: no training pool)
    rollout: PoolPlan | None
    timing: dict[str, float] = field(default_factory=dict)
    splits: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pools(self) -> list[PoolPlan]:
        return [p for p in (self.train, self.rollout) if p is not None]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.pools)

    @property
    def refusal(self) -> str:
        return "\n".join(f"the {p.name} pool does not fit: {p.problem}" + (
            f"\n  fits with: {' '.join(p.fix)}" if p.fix else "") for p in self.pools if not p.fits)


# --- where the numbers come from -----------------------------------------------------------------------------------
def gpu_of(cfg) -> tuple[GPUKind, str]:
    """planner.gpu, else what the cluster says (the Slurm partition's gres types, a Kubernetes pool's node
    selector), else H100 80GB (said so in the plan)."""
    if cfg.planner.gpu:
        return gpu_kinds.kind(cfg.planner.gpu), "planner.gpu"
    kind = str(cfg.cluster.kind)
    if kind == "k8s":
        for pool in ("train", "rollout"):
            for key, value in (cfg.cluster.k8s[pool].node_selector or {}).items():
                found = gpu_kinds.from_label(f"{value}")
                if found:
                    return gpu_kinds.kind(found), f"cluster.k8s.{pool}.node_selector {key}={value}"
    if kind == "slurm" and cfg.cluster.slurm.partition and shutil.which("sinfo"):
        try:
            gres = subprocess.run(["sinfo", "-h", "-p", str(cfg.cluster.slurm.partition), "-o", "%G"],
                                  capture_output=True, text=True, timeout=20, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            gres = ""
        found = gpu_kinds.from_label(gres)
        if found:
            return gpu_kinds.kind(found), f"partition {cfg.cluster.slurm.partition}'s gres ({gres.strip()})"
    return gpu_kinds.kind("h100_80gb"), "assumed (set planner.gpu)"


def assumptions(cfg) -> Assumptions:
    p = cfg.planner
    return Assumptions(prompt_tokens=p.prompt_tokens, mean_response_share=p.mean_response_share,
                       train_mfu=p.train_mfu, decode_bandwidth_share=p.decode_bandwidth_share,
                       network_gbps=p.network_gbps)


def nodes_and_gpus_per_node(cfg) -> tuple[int, int] | None:
    """The job's nodes for both pools and GPUs per node (Slurm, Kubernetes), or None (local: no node split)."""
    kind = str(cfg.cluster.kind)
    if kind == "slurm":
        s = cfg.cluster.slurm
        return s.train_nodes + s.rollout_nodes, s.gpus_per_node
    if kind == "k8s":
        k = cfg.cluster.k8s
        return k.train.replicas + k.rollout.replicas, k.train.gpus
    return None


# --- the training pool ---------------------------------------------------------------------------------------------
def train_layout(cfg, gpus: int) -> TrainLayout:
    t, m = cfg.trainer, cfg.trainer.megatron
    bf16 = cfg.model.dtype == "bfloat16"
    reference = str(cfg.algo.kl_placement) != "none" and str(cfg.stage) == "grpo"  # (SFT has none)
    model_parallel = m.tensor_parallel * m.pipeline_parallel * m.context_parallel
    return TrainLayout(tp=m.tensor_parallel, pp=m.pipeline_parallel, cp=m.context_parallel,
                       dp=max(1, gpus // model_parallel), recompute=m.recompute,
                       sequence_parallel=m.sequence_parallel, bf16=bf16, grad_fp32=m.grad_reduce_in_fp32,
                       with_reference=reference, micro_batch_tokens=m.micro_batch_tokens, logprob_chunk_tokens=m.logprob_chunk_tokens,
                       transformer_engine=cfg.planner.transformer_engine) if t.engine == "megatron" else TrainLayout(
        dp=gpus, bf16=bf16, with_reference=reference, transformer_engine=False)


def train_terms(cfg, shape: ModelShape, lay: TrainLayout, longest: int, reserved: float) -> dict[str, float]:
    if cfg.trainer.engine == "megatron":
        terms = megatron_memory(shape, lay, longest)
    else:
        tokens = cfg.trainer.micro_batch_tokens or cfg.trainer.micro_batch_size * longest
        terms = hf_memory(shape, bf16=lay.bf16, with_reference=lay.with_reference, micro_batch_tokens=tokens)
    return terms | {"reserved": reserved}


def layouts_for(shape: ModelShape, gpus: int, per_node: int, base: TrainLayout):
    """Megatron layouts of ``gpus`` ranks: TP within a node dividing the (KV) heads, CP, PP dividing the layers,
    each recomputation choice; the base layout's other settings kept."""
    tps = [t for t in (1, 2, 4, 8) if t <= per_node and shape.heads % t == 0 and shape.kv_heads % t == 0]
    for tp, cp, pp, recompute in itertools.product(tps, (1, 2, 4, 8, 16), (1, 2, 4, 8), RECOMPUTE_COST):
        if gpus % (tp * cp * pp) or shape.layers % pp:
            continue
        yield replace(base, tp=tp, cp=cp, pp=pp, dp=gpus // (tp * cp * pp), recompute=recompute)


def _cost(lay: TrainLayout) -> float:
    """Relative training time of a layout (more model parallelism: more communication; recomputation: FLOPs)."""
    return RECOMPUTE_COST[lay.recompute] * (1 + 0.08 * (lay.tp - 1) + 0.05 * (lay.cp - 1) + 0.1 * (lay.pp - 1))


def best_layout(shape, gpus, per_node, base, longest, capacity, reserved) -> tuple[TrainLayout, float] | None:
    fitting = []
    for lay in layouts_for(shape, gpus, per_node, base):
        used = sum(megatron_memory(shape, lay, longest).values()) + reserved
        if used <= capacity:
            fitting.append((_cost(lay), lay, used))
    if not fitting:
        return None
    _, lay, used = min(fitting, key=lambda f: f[0])
    return lay, used


def layout_overrides(lay: TrainLayout, base: TrainLayout, engine: str, gpus: int, gpus_now: int) -> list[str]:
    out = [] if engine == "megatron" else ["trainer=megatron"]
    if gpus != gpus_now:
        out.append(f"trainer.num_workers={gpus}")
    for key, attr in (("tensor_parallel", "tp"), ("context_parallel", "cp"), ("pipeline_parallel", "pp"),
                      ("recompute", "recompute")):
        if getattr(lay, attr) != getattr(base, attr) or engine != "megatron":
            out.append(f"trainer.megatron.{key}={getattr(lay, attr)}")
    return out


def more_nodes(cfg, pool: str, gpus: int) -> list[str]:
    """The node count a pool of ``gpus`` GPUs needs, where the cluster has fewer."""
    kind = str(cfg.cluster.kind)
    if kind == "slurm":
        key, have, per_node = f"{pool}_nodes", cfg.cluster.slurm[f"{pool}_nodes"], cfg.cluster.slurm.gpus_per_node
        need = -(-gpus // per_node)
        return [f"cluster.slurm.{key}={need}"] if need > have else []
    if kind == "k8s":
        group = cfg.cluster.k8s[pool]
        need = -(-gpus // max(1, group.gpus))
        return [f"cluster.k8s.{pool}.replicas={need}"] if need > group.replicas else []
    return []


def plan_train(cfg, shape, gpu: GPUKind, longest: int, per_node: int) -> PoolPlan:
    t = cfg.trainer
    gpus = t.num_workers * int(t.gpus_per_worker) if t.gpus_per_worker >= 1 else 0
    reserved = cfg.planner.reserved_gib * GIB if gpus else 0.0
    lay = train_layout(cfg, max(gpus, t.num_workers))
    terms = train_terms(cfg, shape, lay, longest, reserved)
    name = (f"Megatron {lay.describe()}" if t.engine == "megatron" else f"HF engine, DP {lay.dp}")
    capacity = float(gpu.memory_bytes)
    if str(cfg.rollout.placement) == "colocated" and cfg.rollout.engine == "vllm":
        # each engine takes its gpu_memory_utilization of a training rank's GPU; the rank keeps the rest
        capacity *= 1 - cfg.rollout.vllm.gpu_memory_utilization
    pool = PoolPlan("training", gpus, name, terms, capacity if gpus else 0.0)
    if not gpus:
        pool.notes.append("CPU workers: host memory, not checked")
        return pool
    if capacity < gpu.memory_bytes:
        pool.notes.append(f"colocated: the rollout engine on each GPU takes rollout.vllm.gpu_memory_utilization="
                          f"{cfg.rollout.vllm.gpu_memory_utilization}, this pool the rest")
    if t.engine == "megatron" and t.num_workers % (lay.tp * lay.pp * lay.cp):
        pool.problem = (f"trainer.num_workers={t.num_workers} is not a multiple of TP x PP x CP = "
                        f"{lay.tp * lay.pp * lay.cp}")
    elif pool.used > pool.capacity:
        pool.problem = (f"{pool.used / GIB:.1f} GiB per GPU at a {longest}-token sequence, the {gpu.name} leaves it "
                        f"{capacity / GIB:.1f} GiB")
    if pool.problem:
        base = lay if t.engine == "megatron" else replace(lay, transformer_engine=cfg.planner.transformer_engine,
                                                          micro_batch_tokens=longest)
        for more in (gpus, 2 * gpus, 4 * gpus, 8 * gpus, 16 * gpus, 32 * gpus):
            found = best_layout(shape, more, per_node, base, longest, capacity, reserved)
            if found:
                fixed, used = found
                pool.fix = layout_overrides(fixed, base, t.engine, more, gpus) + more_nodes(cfg, "train", more)
                pool.notes.append(f"with {fixed.describe()} on {more} GPUs: {used / GIB:.1f} GiB per GPU")
                break
    return pool


# --- the rollout pool ----------------------------------------------------------------------------------------------
def engine_layout(cfg, shape: ModelShape, longest: int) -> EngineLayout:
    v = cfg.rollout.vllm
    return EngineLayout(tp=v.tensor_parallel_size, max_model_len=v.max_model_len or shape.max_positions or longest,
                        max_num_seqs=v.max_num_seqs, gpu_memory_utilization=v.gpu_memory_utilization,
                        kv_cache_bytes=v.kv_cache_mb * 2**20)


def _vllm_problem(terms, eng: EngineLayout, gpu_bytes: float, longest: int) -> str:
    fixed = terms["weights"] + terms["activations"] + terms["non_torch"]
    if fixed > terms["budget"]:
        return (f"weights {terms['weights'] / GIB:.1f} GiB + profiled activations {terms['activations'] / GIB:.1f} "
                f"GiB + {terms['non_torch'] / GIB:.1f} GiB outside torch exceed gpu_memory_utilization "
                f"{eng.gpu_memory_utilization} x {gpu_bytes / GIB:.1f} GiB")
    if terms["kv_blocks"] - 1 < blocks_per_sequence(eng.max_model_len):
        return (f"the KV cache holds {terms['kv_tokens']} tokens, one sequence of max_model_len "
                f"{eng.max_model_len} does not fit (vLLM refuses to start)")
    if eng.max_model_len <= longest:
        return (f"max_model_len {eng.max_model_len} leaves no room for a prompt before a {longest}-token response")
    return ""


def plan_rollout(cfg, shape, gpu: GPUKind, longest: int, per_node: int) -> PoolPlan:
    r = cfg.rollout
    gpus = r.num_workers * int(r.gpus_per_worker) if r.gpus_per_worker >= 1 else 0
    prompt = cfg.planner.prompt_tokens
    if r.engine != "vllm":
        dtype_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
        terms = hf_rollout_memory(shape, batch=r.generate_batch_size, max_len=prompt + longest,
                                  dtype_bytes=dtype_bytes)
        pool = PoolPlan("rollout", gpus, f"HF generate, {r.num_workers} engine(s)",
                        terms | {"reserved": cfg.planner.reserved_gib * GIB if gpus else 0.0},
                        gpu.memory_bytes if gpus else 0.0)
        if gpus and pool.used > pool.capacity:
            per_seq = (terms["kv_cache"] + terms["activations"]) / r.generate_batch_size
            room = (pool.capacity - terms["weights"] - cfg.planner.reserved_gib * GIB) // per_seq
            pool.problem = (f"{pool.used / GIB:.1f} GiB per GPU: {r.generate_batch_size} sequences of "
                            f"{prompt + longest} tokens in flight, the {gpu.name} has {gpu.memory_bytes / GIB:.1f}")
            pool.fix = ([f"rollout.generate_batch_size={int(room)}"] if room >= 1 else ["rollout=vllm"])
        return pool
    eng = engine_layout(cfg, shape, longest)
    # CPU engines size an automatic cache from the node's RAM (vllm/v1/worker/cpu_worker.py), as GPUs from theirs
    capacity = gpu.memory_bytes if gpus else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    terms = vllm_memory(shape, capacity, eng)
    pool = PoolPlan("rollout", gpus, f"vLLM, {r.num_workers} engine(s) x TP {eng.tp}", terms,
                    gpu.memory_bytes if gpus else 0.0)
    pool.notes.append(f"KV cache {terms['kv_cache'] / GIB:.1f} GiB = {terms['kv_tokens']} tokens: "
                      f"{terms['in_flight_at_max_len']:.1f} sequences of max_model_len {eng.max_model_len} in flight"
                      f" (max_num_seqs {eng.max_num_seqs})")
    if shape.max_positions and prompt + longest > shape.max_positions:
        pool.notes.append(f"the model was trained on {shape.max_positions} positions, the run needs "
                          f"{prompt + longest}: vLLM refuses a longer max_model_len unless VLLM_ALLOW_LONG_MAX_MODEL"
                          f"_LEN=1 (and the quality past it is the model's own question)")
    if eng.max_model_len > prompt + longest and not r.vllm.max_model_len:
        shorter = vllm_memory(shape, capacity, replace(eng, max_model_len=prompt + longest))
        pool.notes.append(f"max_model_len defaults to the model's {eng.max_model_len}: vLLM profiles a forward pass "
                          f"that long; rollout.vllm.max_model_len={prompt + longest} frees "
                          f"{(terms['activations'] - shorter['activations']) / GIB:.1f} GiB for the KV cache")
    if not gpus:
        pool.notes.append("CPU engines: KV cache of rollout.vllm.kv_cache_mb, host memory not checked")
        return pool
    pool.problem = _vllm_problem(terms, eng, gpu.memory_bytes, longest)
    if pool.problem:
        tps = [t for t in (1, 2, 4, 8) if t >= eng.tp and t <= per_node and shape.heads % t == 0]
        lengths = sorted({min(eng.max_model_len, prompt + longest), eng.max_model_len})
        options = [(tp, length, util) for tp in tps for length in lengths for util in
                   sorted({eng.gpu_memory_utilization, 0.9, 0.95}) if util >= eng.gpu_memory_utilization]
        for tp, length, util in options:
            trial = replace(eng, tp=tp, max_model_len=max(length, prompt + longest), gpu_memory_utilization=util)
            if not _vllm_problem(vllm_memory(shape, gpu.memory_bytes, trial), trial, gpu.memory_bytes, longest):
                fix = []
                if tp != eng.tp:  # (the pool's GPUs, fewer engines on more GPUs each)
                    workers = max(1, gpus // tp)
                    fix += [f"rollout.vllm.tensor_parallel_size={tp}", f"rollout.gpus_per_worker={tp}"]
                    fix += [f"rollout.num_workers={workers}"] if workers != r.num_workers else []
                    fix += more_nodes(cfg, "rollout", workers * tp)
                if trial.max_model_len != eng.max_model_len:
                    fix.append(f"rollout.vllm.max_model_len={trial.max_model_len}")
                if util != eng.gpu_memory_utilization:
                    fix.append(f"rollout.vllm.gpu_memory_utilization={util}")
                pool.fix = fix
                break
    return pool


# --- time, and the split -------------------------------------------------------------------------------------------
def step_times(cfg, shape, gpu, a: Assumptions, *, train_gpus: int, train_lay: TrainLayout, engines: int,
               engine_tp: int, concurrency: float, max_tokens: int) -> dict[str, float]:
    sequences = cfg.algo.group_size * cfg.algo.prompts_per_step
    gen = generation_s(shape, gpu, a, sequences=sequences, engines=engines, tp=engine_tp, max_tokens=max_tokens,
                       concurrency=concurrency)
    train = training_s(shape, gpu, a, sequences=sequences, max_tokens=max_tokens, gpus=train_gpus,
                       recompute_full=train_lay.recompute == "full", reference=train_lay.with_reference)
    train *= _cost(replace(train_lay, recompute="none"))
    sync = sync_s(shape, gpu, a)
    overlapped = cfg.algo.max_staleness >= 1
    step = max(gen["generation_s"], train + sync) if overlapped else gen["generation_s"] + train + sync
    return {"generation_s": gen["generation_s"], "training_s": train, "sync_s": sync, "step_s": step,
            "decode_tokens_s": gen["decode_tokens_s"], "in_flight": gen["in_flight"],
            "tail_bound": gen["tail_bound"], "overlapped": float(overlapped)}


def _concurrency(terms: dict, eng: EngineLayout, a: Assumptions, max_tokens: int) -> float:
    mean_len = a.prompt_tokens + a.mean_response_share * max_tokens
    return min(eng.max_num_seqs, terms["kv_tokens"] / mean_len)


def splits(cfg, shape, gpu, a, longest_response: int, base: TrainLayout, eng: EngineLayout) -> list[dict]:
    """Every split of the job's nodes between the pools, each with its best fitting training layout."""
    nodes_gpn = nodes_and_gpus_per_node(cfg)
    if nodes_gpn is None or str(cfg.rollout.placement) == "colocated" or cfg.rollout.engine != "vllm":
        return []
    nodes, per_node = nodes_gpn
    out = []
    reserved = cfg.planner.reserved_gib * GIB
    terms = vllm_memory(shape, gpu.memory_bytes, eng)
    for train_nodes in range(1, nodes):
        found = best_layout(shape, train_nodes * per_node, per_node, base, a.prompt_tokens + longest_response,
                            gpu.memory_bytes, reserved)
        engines = (nodes - train_nodes) * per_node // eng.tp
        if not found or not engines:
            out.append({"train_nodes": train_nodes, "rollout_nodes": nodes - train_nodes, "fits": False})
            continue
        lay, _ = found
        times = step_times(cfg, shape, gpu, a, train_gpus=train_nodes * per_node, train_lay=lay, engines=engines,
                           engine_tp=eng.tp, concurrency=_concurrency(terms, eng, a, longest_response),
                           max_tokens=longest_response)
        out.append({"train_nodes": train_nodes, "rollout_nodes": nodes - train_nodes, "fits": True,
                    "layout": lay.describe(), **times})
    return out


def make_plan(cfg) -> Plan:
    """The plan of ``cfg``'s run (its stage's pools: GRPO both, SFT the training pool, evaluation and rejection
    sampling the rollout pool)."""
    shape, shape_source = of_model(cfg.model)
    gpu, gpu_source = gpu_of(cfg)
    a = assumptions(cfg)
    stage = str(cfg.stage)
    longest = max(s.max_tokens for s in cfg.rollout.length_schedule)
    longest_rollout = max(longest, cfg.eval.max_new_tokens)
    if stage == "rejection_sampling":
        longest_rollout = cfg.rejection.max_new_tokens
    nodes_gpn = nodes_and_gpus_per_node(cfg)
    per_node = nodes_gpn[1] if nodes_gpn else 8
    train = rollout = None
    if stage in ("grpo", "sft"):
        sequence = cfg.sft.max_tokens if stage == "sft" else a.prompt_tokens + longest
        train = plan_train(cfg, shape, gpu, sequence, per_node)
    if stage in ("grpo", "eval", "rejection_sampling"):
        rollout = plan_rollout(cfg, shape, gpu, longest_rollout, per_node)
    plan = Plan(gpu, gpu_source, shape, shape_source, a.prompt_tokens, longest, train, rollout)
    if stage != "grpo":
        plan.notes.append(f"stage={stage}: " + ("no pool" if not plan.pools else f"only the {plan.pools[0].name} "
                                                 "pool; no GRPO step time"))
    elif train.gpus and rollout.gpus and cfg.rollout.engine == "vllm" and rollout.fits:
        eng = engine_layout(cfg, shape, longest_rollout)
        lay = train_layout(cfg, train.gpus)
        plan.splits = splits(cfg, shape, gpu, a, longest, lay, eng)
        if not train.fits:
            plan.notes.append("no step time for a training pool that does not fit")
            return plan
        plan.timing = step_times(cfg, shape, gpu, a, train_gpus=train.gpus, train_lay=lay,
                                 engines=cfg.rollout.num_workers, engine_tp=eng.tp,
                                 concurrency=_concurrency(rollout.terms, eng, a, longest), max_tokens=longest)
    return plan
