"""Typed configuration: the single source of truth for every key r1 understands.

``conf/*.yaml`` only fill in values; Hydra merges them onto these dataclasses, so an unknown key or a value of the
wrong type fails at composition time with the key's name, before any process starts. Group yaml files exist for the
choices (``cluster=local``, ``model=qwen2_5_7b`` ...); this file says what each choice may contain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Stage(str, Enum):
    grpo = "grpo"  # reinforcement learning: GRPO through the training and rollout pools (r1/driver.py)
    sft = "sft"  # supervised fine-tuning on the training pool: cold start, SFT, distillation (r1/sft.py)
    eval = "eval"  # benchmarks through the rollout pool, one or several checkpoints (r1/eval/benchmarks.py)
    rejection_sampling = "rejection_sampling"  # N samples per prompt, keep the correct readable ones (r1/rejection_sampling.py)
    report = "report"  # a pipeline's report from its stages' directories (r1/report.py)


class ModelSource(str, Enum):
    pretrained = "pretrained"  # a local HF directory (or hub id already in the local HF cache)
    tiny = "tiny"  # built and pretrained offline by r1 itself (the embedded CPU default)


class PretrainSchedule(str, Enum):
    cosine = "cosine"  # warmup, then cosine decay to 0 over model.tiny.pretrain_steps
    constant = "constant"  # warmup, then a constant rate


class LossAgg(str, Enum):
    seq_mean_token_mean = "seq_mean_token_mean"
    token_mean = "token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"


class KLKind(str, Enum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class Advantage(str, Enum):
    group = "group"  # GRPO: (r - group mean) / group std (algo.std_normalize=false: Dr.GRPO, no std)
    rloo = "rloo"  # RLOO: r minus the mean of the prompt's other samples
    reinforce_pp = "reinforce_pp"  # REINFORCE++: rewards whitened over the batch's tokens
    reinforce_pp_baseline = "reinforce_pp_baseline"  # REINFORCE++-baseline: group mean subtracted, then whitened


class PolicyLoss(str, Enum):
    ppo = "ppo"  # PPO/GRPO clipped token ratio
    gspo = "gspo"  # GSPO: clipped sequence ratio (length-normalised)
    cispo = "cispo"  # CISPO: clipped, stop-gradient importance weight times log pi


class CorrectionLevel(str, Enum):
    none = "none"
    token = "token"
    sequence = "sequence"


class CanaryAction(str, Enum):
    log = "log"  # the incident is logged and recorded, nothing else
    alert = "alert"  # ... and a W&B alert
    mask = "mask"  # ... and the run escalates to masked IS (algo.mask_level=token) from the next step on
    stop = "stop"  # ... and the run stops after this step with a checkpoint, exit code 70 (not requeued)


class KLPlacement(str, Enum):
    loss = "loss"  # GRPO / DeepSeek-R1: coef * KL added to the policy loss
    reward = "reward"  # PPO-RLHF style: coef * sum KL subtracted from the sequence reward
    none = "none"  # no reference model at all (saves its memory and forward pass)


class RolloutPlacement(str, Enum):
    """Where the rollout engines run; the weight transport follows from it (docs/vllm.md, "How weights flow")."""

    separate = "separate"  # GPUs of their own: the pools overlap (asynchronous GRPO); weights by broadcast
    colocated = "colocated"  # engine i on training rank i's GPU, sharing its memory; weights by CUDA IPC / shm


class ClusterKind(str, Enum):
    local = "local"
    slurm = "slurm"
    k8s = "k8s"


class K8sMode(str, Enum):
    rayjob = "rayjob"  # a RayJob: KubeRay starts the Ray cluster, runs the driver, tears the cluster down
    raycluster = "raycluster"  # a long-lived RayCluster to submit runs to


class LoggerBackend(str, Enum):
    none = "none"
    wandb = "wandb"


class WandbMode(str, Enum):
    auto = "auto"  # online if WANDB_API_KEY is set, else offline
    online = "online"
    offline = "offline"


@dataclass
class SlurmConfig:
    """One Slurm job: a Ray cluster over ``train_nodes + rollout_nodes`` nodes, each pool on nodes of its own."""

    partition: str | None = None  # required
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"  # the job's time limit: [D-]HH:MM:SS, HH:MM:SS, MM:SS or minutes
    train_nodes: int = 1  # nodes of the training pool (the first ones; the driver runs on the first)
    rollout_nodes: int = 1  # nodes of the rollout pool
    gpus_per_node: int = 8
    cpus_per_node: int = 32
    mem: str = "0"  # memory per node, Slurm syntax ("0" = all of it)
    # The directory every node sees: run_dir and cache_dir must lie under it (checked before submission).
    shared_dir: str | None = None
    # Shell lines run first on every node (modules, a container, `source <venv>/bin/activate`); empty = the
    # submitting Python's environment (its bin/ first on PATH).
    setup: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. "--exclusive"
    # A container image for every step of the job (Slurm's pyxis plugin: srun --container-image), e.g.
    # "nvcr.io#nvidia/pytorch:25.01-py3" or a squashfs path; the Ray nodes and the driver run in it, the setup lines
    # too (first, in each step), and shared_dir is mounted at the same path. null: no container.
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)  # more "src:dst" mounts besides shared_dir
    # Slurm sends SIGUSR1 this long before the time limit (and at preemption, where the site sets
    # PreemptParameters=send_user_signal): the driver finishes its step, checkpoints, and the job requeues itself.
    # Make it longer than a step plus a checkpoint.
    signal_before_s: int = 600
    # Failed attempts (an error, or killed with a node) after which the job stops requeueing itself;
    # preemptions and time limits, which checkpoint, do not count.
    max_failed_attempts: int = 3
    # Slurm job ids this job waits for; it starts once all completed successfully (--dependency=afterok) and is
    # cancelled if one fails. Chains the stages of a multi-stage run.
    after: list[str] = field(default_factory=list)


@dataclass
class K8sPodsConfig:
    """The pods of the Ray head (one, no GPUs), and (K8sPoolConfig) of a pool."""

    cpu: str = "32"  # Kubernetes quantities, requested and limited
    memory: str = "256Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Any] = field(default_factory=list)  # (the GPU toleration is added where gpus > 0)
    affinity: dict[str, Any] = field(default_factory=dict)


@dataclass
class K8sPoolConfig(K8sPodsConfig):
    replicas: int = 1  # pods (Ray nodes) of the pool
    gpus: int = 8  # nvidia.com/gpu per pod; 0 = CPU only


def _k8s_head() -> K8sPodsConfig:
    return K8sPodsConfig(cpu="4", memory="16Gi")


@dataclass
class K8sNetworkConfig:
    """Fast networking between the pools' pods: NCCL over InfiniBand / RoCE instead of TCP. Off by default (each
    item depends on the cluster's network operator); applied to the train and rollout pods, not the head."""

    annotations: dict[str, str] = field(default_factory=dict)  # e.g. {k8s.v1.cni.cncf.io/networks: ib-net} (Multus)
    # RDMA device resources per pod, requested and limited, e.g. {rdma/rdma_shared_device_a: 1}; the pods then also
    # get the IPC_LOCK capability (RDMA pins memory)
    rdma_resources: dict[str, int] = field(default_factory=dict)
    nccl_env: dict[str, str] = field(default_factory=dict)  # e.g. {NCCL_IB_HCA: mlx5, NCCL_SOCKET_IFNAME: eth0}
    # The chart's NetworkPolicy lets only the release's own pods reach its pods (Ray's ports, the Jobs API); more
    # NetworkPolicy peers to let in, e.g. [{namespaceSelector: {matchLabels: {name: monitoring}}}] for Prometheus
    allow_ingress_from: list[dict] = field(default_factory=list)


@dataclass
class K8sConfig:
    """One run on KubeRay through the helm/r1 chart (docs/kubernetes.md); keys map onto the chart's values."""

    namespace: str = "default"
    release: str | None = None  # default: r1-<name>-<6 hex of run_dir>
    mode: K8sMode = K8sMode.rayjob
    image: str = "r1:0.1.0"  # built from the repository's Dockerfile, pushed where the cluster pulls from
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    head: K8sPodsConfig = field(default_factory=_k8s_head)
    train: K8sPoolConfig = field(default_factory=K8sPoolConfig)
    rollout: K8sPoolConfig = field(default_factory=K8sPoolConfig)
    # The volume every pod mounts at mount_path: run_dir, cache_dir and relative model/data paths go under it.
    mount_path: str = "/r1"
    persistent: bool = True  # false: an emptyDir per pod (nothing survives a pod)
    volume_claim: str | None = None  # an existing PVC; else the chart creates one:
    volume_size: str = "1Ti"
    storage_class: str | None = None
    shm_size: str = "64Gi"
    # Environment variables from existing Secrets, by reference: [{name: WANDB_API_KEY, secretName: ..., key: ...}],
    # on the head only (the driver) unless an entry names its pods: pods: [head, train, rollout]
    secret_env: list[Any] = field(default_factory=list)
    # The seccomp profile of the pods where the code sandbox runs (head, rollout pool): RuntimeDefault (forbids the
    # user namespaces bubblewrap needs: no code rewards) | Unconfined | Localhost:<path under the kubelet's seccomp
    # directory>, e.g. Localhost:r1/code-sandbox.json (helm/r1/files/seccomp/r1-code-sandbox.json on the nodes)
    sandbox_seccomp: str = "RuntimeDefault"
    backoff_limit: int = 3  # KubeRay retries of a failed run, each on a new cluster, each resuming
    network: K8sNetworkConfig = field(default_factory=K8sNetworkConfig)
    # SYS_PTRACE on every pod, for the watchdog's py-spy stack dumps of a stalled run (widens privileges: off)
    stack_dumps: bool = False
    poll_s: float = 10.0  # how often r1-launch reads the RayJob's status while following it


@dataclass
class ClusterConfig:
    kind: ClusterKind = ClusterKind.local
    # Address of an existing Ray cluster; null starts a private one on this machine (local) or is the job's own
    # Ray cluster (slurm).
    ray_address: str | None = None
    # Logical CPUs Ray may hand out on a local cluster (can exceed physical cores; torch threads are set per worker).
    num_cpus: int = 4
    # GPUs Ray may hand out on a local cluster (null: the ones CUDA sees). Ray only counts them: on a CPU machine,
    # declared GPUs give each worker that asks for one an index (CUDA_VISIBLE_DEVICES) and nothing else.
    num_gpus: int | None = None
    placement_strategy: str = "PACK"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    # slurm, k8s: render the job script / the chart's manifests (and check them), submit nothing
    dry_run: bool = False


@dataclass
class TinyModelSpec:
    """The offline base model of the embedded default: a small LM (model.arch) trained on a synthetic corpus."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 512
    max_position_embeddings: int = 256
    pretrain_docs: int = 40_000
    pretrain_steps: int = 900
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    pretrain_schedule: PretrainSchedule = PretrainSchedule.cosine
    # Share of each solution style in the pretraining corpus (see r1/data/arithmetic.py).
    style_mix: dict[str, float] = field(
        default_factory=lambda: {"careful": 0.35, "careless": 0.45, "malformed": 0.2}
    )
    seed: int = 0
    # Base-model selection: every select_every steps the model samples select_samples answers to each of
    # select_problems held-out problems (T=0.6, top-p 0.95, as the evaluation does); pretraining stops at the first
    # check whose pass@1 lies in select_band [low, high] and keeps that model (pretrain_steps is then the most it
    # may take; never in band: an error). null: train pretrain_steps and keep the last model.
    select_band: list[float] | None = None
    # ... and whose answers reached by thinking (a running sum in <think>) were right at least this often
    select_min_thinking_accuracy: float = 0.0
    select_every: int = 50
    select_problems: int = 128
    select_samples: int = 2
    # A Jinja chat template for the tokenizer (data.template=chat): a student of distillation speaks its own format.
    chat_template: str | None = None


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = ModelSource.pretrained
    # HF directory or hub id (must already be local: r1 never downloads at run time). Unused for source=tiny.
    path: str | None = None
    # qwen2 | llama: the tiny model is built as this architecture; engines that build the model themselves
    # (Megatron) read it too.
    arch: str = "qwen2"
    dtype: str = "float32"
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)


@dataclass
class DataConfig:
    # Generate the embedded arithmetic task's prompt files into the cache (ignored paths) or read user files.
    generator: str | None = None  # "arithmetic" | null
    train_path: str | None = None
    eval_path: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    tests_field: str = "tests"  # coding problems: stdin/stdout pairs or asserts (r1/data/prompts.py)
    # Rows with a prompt and neither answer nor tests are general prompts (all-scenario RL, scored by reward=...
    # reward_model); otherwise they are skipped and counted.
    allow_open_prompts: bool = False
    # arithmetic generator: this share of the training rows are general prompts without an answer ("Explain ...")
    open_fraction: float = 0.0
    # r1_zero (the paper's Table 1) | plain (the prompt as is) | chat (the tokenizer's own chat template, one user turn
    # and the assistant's generation prompt: instruct, cold-started and distilled models)
    template: str = "r1_zero"
    num_operands: int = 4  # arithmetic generator only
    operand_low: int = 0
    operand_high: int = 9


@dataclass
class LengthStage:
    """From ``from_step`` on, responses may be ``max_tokens`` long (the paper raises 32K -> 64K mid-training)."""

    from_step: int = 0
    max_tokens: int = 32768


@dataclass
class VLLMConfig:
    """vLLM engine settings (``rollout.engine=vllm``), one engine per rollout worker."""

    tensor_parallel_size: int = 1  # GPUs (or CPU worker processes) per engine; workers are data-parallel
    max_model_len: int | None = None  # prompt + response tokens per sequence; null = the model's context length
    # KV-cache size per engine (per tensor-parallel rank); 0 = vLLM's own sizing: what gpu_memory_utilization of the
    # GPU leaves (on CPU: of the node's RAM, less the engine's own - one engine per node)
    kv_cache_mb: int = 0
    gpu_memory_utilization: float = 0.85  # GPU share vLLM may use when kv_cache_mb is 0
    max_num_seqs: int = 256  # sequences decoded together (continuous batching)
    # vLLM's enforce_eager: no torch.compile of the model and no CUDA graphs. An engine then starts in ~20 s instead
    # of ~50 on a CPU (measured, tiny model), but decodes slower on GPUs: for tests, debugging and short CPU runs.
    enforce_eager: bool = False


@dataclass
class RolloutConfig:
    engine: str = "hf"
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    torch_threads: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    length_schedule: list[LengthStage] = field(default_factory=lambda: [LengthStage(0, 32768)])
    # Sequences per generate() call inside a rollout worker (bounds activation memory; not a training batch).
    generate_batch_size: int = 64
    # Prompt groups per generation request (the buffer's streaming unit); 0 = a step's prompts split evenly over
    # the workers, one request each. Smaller requests stream groups to the trainer sooner.
    groups_per_request: int = 0
    # A weight update reaches a request in flight between two decode steps (tokens record their version) instead
    # of waiting for the request to finish. Needs algo.max_staleness >= 1.
    partial_rollouts: bool = False
    # Emulate a large model's speed: each decode step takes at least this long and a request at least
    # max_tokens x this (orchestration benchmarks and fault drills on CPU; 0 = real speed).
    simulated_decode_step_s: float = 0.0
    # An engine with requests in flight that produces no token for this long is declared dead: its worker is
    # replaced and its requests redone once.
    stall_timeout_s: float = 300.0
    # separate | colocated: engine i runs on training rank i's GPU (one node, or one GPU: rollout.num_workers <=
    # trainer.num_workers, one GPU per engine, vLLM's gpu_memory_utilization leaving the trainer its share) and
    # gets each version through that GPU's memory (CUDA IPC; shared memory on CPU), not a collective. Stages
    # without a training pool (rejection sampling, evaluation) place engines on their own either way.
    placement: RolloutPlacement = RolloutPlacement.separate
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class MegatronConfig:
    """``trainer.engine=megatron``: data parallel = trainer.num_workers / (tensor x pipeline x context parallel)."""

    tensor_parallel: int = 1  # ranks splitting each layer's matrices (one node: NVLink)
    pipeline_parallel: int = 1  # ranks holding consecutive layers (micro-batches flow through them)
    context_parallel: int = 1  # ranks splitting each sequence (long contexts: 2 chunks of every sequence per rank)
    # Sequences are packed end to end (no padding) into micro-batches of at most this many tokens per model
    # replica (a longer sequence forms a micro-batch of its own); replaces trainer.micro_batch_size.
    micro_batch_tokens: int = 16384
    # Tokens per chunk of the vocabulary projection for log-probs: memory grows with this, not with the sequence.
    logprob_chunk_tokens: int = 4096
    # Activation recomputation: none | selective (core attention) | full (every layer, keeps only layer inputs).
    recompute: str = "none"
    # With tensor_parallel > 1: the TP ranks also split the sequence where they would each hold all of it (norms,
    # residuals, dropout), so those activations are 1/TP per rank (Megatron's sequence parallelism).
    sequence_parallel: bool = True
    # Gradients are reduce-scattered over data parallel bucket by bucket during the backward pass (overlapping it),
    # in the parameters' dtype (bf16 with model.dtype=bfloat16), which is also the dtype they accumulate in over a
    # step's micro-batches; grad_reduce_in_fp32 keeps both in fp32 (twice the gradient memory and traffic).
    overlap_grad_reduce: bool = True
    grad_reduce_in_fp32: bool = False


@dataclass
class TrainerConfig:
    engine: str = "hf"  # "hf" (torch + transformers, data parallel) | "megatron" (megatron-core, TP x PP x DP)
    num_workers: int = 1  # ranks of the training pool (data parallel x the model parallelism of the engine)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    torch_threads: int = 2
    total_steps: int = 100
    lr: float = 3e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    # Sequences per forward/backward pass of the hf engine (gradients accumulate over micro-batches up to the
    # mini-batch, see algo.minibatches_per_step); also the chunk size of its log-prob passes. (The megatron engine
    # packs micro-batches by tokens instead: trainer.megatron.micro_batch_tokens.)
    micro_batch_size: int = 32
    # hf engine: > 0 packs each micro-batch's rows into one sequence of up to this many tokens (sequence packing:
    # no padding; rows attend within themselves) instead of micro_batch_size padded rows. 0 = off.
    micro_batch_tokens: int = 0
    seed: int = 1
    # Emulate a large model's speed: each optimizer step takes at least this long (benchmarks; 0 = real speed).
    simulated_update_s: float = 0.0
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass
class AlgoConfig:
    name: str = "grpo"
    group_size: int = 16
    prompts_per_step: int = 32
    # Optimizer steps per rollout batch (the paper's 8192-output rollouts split into 16 mini-batches use 16).
    minibatches_per_step: int = 1
    std_normalize: bool = True  # false = Dr.GRPO
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = DAPO clip-higher
    loss_agg: LossAgg = LossAgg.seq_mean_token_mean
    kl_coef: float = 0.001
    kl_kind: KLKind = KLKind.k3
    kl_placement: KLPlacement = KLPlacement.loss
    ref_update_interval: int = 400  # steps between refreshes of the reference policy (0 = never)
    # DAPO dynamic sampling: drop groups whose rewards are all equal (no gradient) and sample more prompts in their
    # place, until the batch holds prompts_per_step groups or max_sampling_rounds batches' worth were examined.
    filter_uniform_groups: bool = False
    max_sampling_rounds: int = 4
    # Asynchronous GRPO: a sample may be up to this many policy versions old when trained on (0 = on-policy, the
    # synchronous loop). Generation of the next batches overlaps training of the current one.
    max_staleness: int = 0
    advantage: Advantage = Advantage.group
    policy_loss: PolicyLoss = PolicyLoss.ppo
    # Off-policy correction against the rollout engine's own log-probs mu (staleness and engine mismatch; pi_old is
    # the trainer's recompute before the update), r1/algo/offpolicy.py. Importance weight: token -> min(pi_old / mu,
    # is_cap) per token | sequence -> min(prod_t pi_old / mu, is_cap) per sequence | none. Mask: token -> tokens whose
    # pi_old / mu leaves [mask_low, mask_high] weigh 0 (IcePop) | sequence -> sequences whose geometric-mean ratio
    # leaves it weigh 0 | none.
    is_level: CorrectionLevel = CorrectionLevel.token
    is_cap: float = 2.0
    mask_level: CorrectionLevel = CorrectionLevel.none
    mask_low: float = 0.5
    mask_high: float = 5.0
    # DAPO's overlong reward shaping (r1/rewards/overlong.py): a penalty growing to -overlong_penalty over the last
    # overlong_buffer_share of the generation budget (DAPO: 4096 of 20480 tokens = 0.2). 0 = off.
    overlong_buffer_share: float = 0.0
    overlong_penalty: float = 1.0


@dataclass
class RewardTerm:
    name: str = MISSING  # "accuracy", "format" or "package.module:function"
    weight: float = 1.0


@dataclass
class SandboxConfig:
    """Limits of one run of an untrusted program (code rewards, r1/rewards/sandbox.py); see docs/code_rewards.md."""

    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU)
    wall_s: float = 10.0  # wall seconds, then the whole sandbox is killed
    memory_mb: int = 512  # address space per process (RLIMIT_AS)
    output_kb: int = 256  # per file written, stdout and stderr included (RLIMIT_FSIZE)
    processes: int = 16  # tasks it may start (RLIMIT_NPROC): fork bombs stop here
    disk_mb: int = 64  # each of /box, /tmp and /dev/shm (tmpfs, in memory); the rest of its tree is read-only
    parallel: int = 4  # programs run at once per rollout worker


@dataclass
class RewardModelConfig:
    """The reward model of the ``reward_model`` term (all-scenario RL's general prompts; r1/rewards/reward_model.py):
    a transformers sequence-classification model with one output, served by its own Ray actors."""

    # pretrained: an HF directory (path) | tiny: the embedded task's, trained offline from the tiny base model
    source: ModelSource = ModelSource.pretrained
    path: str | None = None
    num_workers: int = 1  # replicas
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 16  # sequences per forward pass
    tiny_train_steps: int = 150  # source=tiny: Bradley-Terry steps (16 preference pairs each)


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = field(
        default_factory=lambda: [RewardTerm("accuracy", 1.0), RewardTerm("format", 1.0)]
    )
    verify_workers: int = 1  # math-verify processes per rollout worker
    verify_timeout_s: float = 5.0
    # Where the answer is in a response (r1/rewards/extract.py): answer_tags (<answer>…</answer>, the R1-Zero
    # template) | boxed (the last \boxed{…}) | final_line (final_line_pattern's group on the last matching line).
    answer_extractor: str = "answer_tags"
    # The target language of the "language" term (the chain of thought's share of words in it): en | zh
    language: str = "en"
    final_line_pattern: str = r"^\s*####\s*(.+?)\s*$"
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # coding problems' programs run under these limits
    model: RewardModelConfig = field(default_factory=RewardModelConfig)  # the reward_model term's


@dataclass
class Benchmark:
    name: str = MISSING
    path: str = MISSING


@dataclass
class EvalConfig:
    every_steps: int = 50  # 0 = only at start and end
    at_start: bool = True
    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    max_problems: int | None = None  # null = the whole eval set
    # stage=eval: the benchmark files (jsonl/parquet, math rows with `answer` or code rows with `tests`; see
    # docs/evaluation.md); none = data's held-out set. And the models to compare (HF directories, e.g. each stage's
    # checkpoints/step_N/policy); none = the run's model.
    benchmarks: list[Benchmark] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # names for the checkpoints in the results; none = from paths
    # the prompt template of each checkpoint (a teacher's r1_zero beside its student's chat); none = data.template
    templates: list[str] = field(default_factory=list)


@dataclass
class SFTSource:
    """One set of an SFT mixture: a file, or the embedded task's generator."""

    path: str | None = None  # jsonl or parquet: prompt + response, or messages (r1/data/sft.py)
    # Instead of a file, the embedded task's sets, written into cache_dir: "arithmetic_long_cot" (long chains of
    # thought in the R1 format: reasoning with a check, then the answer) | "arithmetic_direct" (non-reasoning data:
    # two-number sums answered without a chain of thought).
    generator: str | None = None
    size: int = 2000  # rows the generator writes
    weight: float = 1.0  # its share of every batch (the weights of all sets are normalised)
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"


@dataclass
class SFTConfig:
    """stage=sft: cold start, SFT on rejection-sampled data, distillation (r1/sft.py). Steps: trainer.total_steps;
    optimizer, engine and pool: trainer.*; prompt template: data.template."""

    datasets: list[SFTSource] = field(default_factory=list)
    batch_size: int = 64  # sequences per optimizer step, drawn from the sets by weight
    max_tokens: int = 4096  # prompt + response; longer rows are skipped and counted


@dataclass
class RejectionConfig:
    """stage=rejection_sampling: samples of the model (model.path) for the data's training prompts through the
    rollout pool; the correct, readable ones become an SFT set (r1/data/filters.py, r1/rejection_sampling.py)."""

    samples_per_prompt: int = 16
    num_prompts: int | None = None  # the first N training prompts; null = all
    prompts_per_shard: int = 8  # one generation request, and the unit a killed run resumes by
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    # filters: each rejection is counted by its reason
    correct_term: str = "accuracy"  # the reward term that must be 1 for a sample to be correct (a user verifier too)
    max_response_tokens: int = 32768
    keep_truncated: bool = False  # keep samples cut off at max_new_tokens (their answer still verified)
    require_format: bool = True  # <think>…</think> <answer>…</answer>
    min_language_consistency: float = 0.95  # share of the chain of thought's words in reward.language
    max_repetition: float = 0.3  # share of word n-grams that repeat an earlier one
    repetition_ngram: int = 6
    keep_per_prompt: int = 4  # correct samples kept per prompt, after deduplication
    output: str = "sft_data.jsonl"  # under run_dir; .jsonl or .parquet


@dataclass
class ReportConfig:
    """stage=report (r1/report.py)."""

    dir: str | None = None  # the pipeline's directory: its stages are subdirectories
    stages: list[str] = field(default_factory=list)
    title: str = "r1 pipeline report"


@dataclass
class PipelineStage:
    """One stage of a pipeline: an experiment, run in ``<pipeline.dir>/<name>``, fed by earlier stages."""

    name: str = MISSING
    experiment: str = MISSING
    # model.path: "<stage name>" = that stage's final policy, "teacher" = pipeline.teacher, a path; null = the
    # experiment's own (e.g. the run's base model)
    model: str | None = None
    sft_data: str | None = None  # "<stage name>": that rejection-sampling stage's set as sft.datasets.0.path
    # stage=eval: the models to compare ("base" = the run's base model, "teacher", or stage names)
    checkpoints: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    """``+pipeline=r1`` / ``+pipeline=r1_distill`` (launcher/pipeline.py): stages in order, locally or as dependent
    Slurm jobs; a finished stage (its ``stage.json``) is skipped on a re-run."""

    name: str | None = None
    stages: list[PipelineStage] = field(default_factory=list)
    dir: str = "outputs/pipelines/${pipeline.name}"
    teacher: str | None = None  # r1_distill: the teacher's HF directory (e.g. <r1 pipeline>/all_scenario_rl/policy)
    overrides: list[str] = field(default_factory=list)  # added to every stage (e.g. the sizes of a quick run)


@dataclass
class CheckpointConfig:
    every_steps: int = 50  # 0 = only at the end
    keep_last: int = 2
    save_optimizer: bool = True


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.none
    project: str = "r1"
    entity: str | None = None
    mode: WandbMode = WandbMode.auto
    log_samples: int = 2  # responses printed/logged per step (0 = none)


@dataclass
class SyncConfig:
    """Trainer -> rollout weight sync: one broadcast from the trainer's rank 0 into every process that serves the
    weights (each vLLM worker), which stages it (docs/vllm.md, "How weights flow")."""

    bucket_mb: float = 64.0  # per broadcast; on GPUs also what each vLLM worker needs beyond gpu_memory_utilization
    timeout_s: float = 600.0  # a collective that waits longer fails (a dead peer); the group is re-formed


class HealthAction(str, Enum):
    """What an incident makes r1 do, in rising order: each does what the ones before it do."""

    log = "log"  # a line in the run log and <run_dir>/health/incidents.jsonl, a row in W&B's incident table
    alert = "alert"  # + a W&B alert (Slack/e-mail per the project's W&B alert settings)
    drain = "drain"  # + no more work for the GPU's workers: the rollout pool goes on without them (training: abort)
    abort = "abort"  # + checkpoint, then exit with the requeue code (Slurm requeues the job without the node)


@dataclass
class HealthActions:
    """The action per health signal (docs/sre.md says what each one means and what to do about it)."""

    xid_critical: HealthAction = HealthAction.abort  # an Xid in health.xid_critical_codes
    xid: HealthAction = HealthAction.alert  # any other Xid event
    ecc_uncorrectable: HealthAction = HealthAction.abort  # volatile uncorrected ECC count went up
    ecc_correctable: HealthAction = HealthAction.log
    retired_pages_pending: HealthAction = HealthAction.alert  # a page retirement waits for a GPU reset
    row_remap_pending: HealthAction = HealthAction.alert  # a row remap waits for a GPU reset
    row_remap_failure: HealthAction = HealthAction.abort  # the GPU ran out of spare rows
    thermal_slowdown: HealthAction = HealthAction.alert  # clocks lowered by a HW/SW thermal limit
    hw_slowdown: HealthAction = HealthAction.alert  # HW slowdown (power brake, thermal, external signal)
    power_slowdown: HealthAction = HealthAction.log  # clocks lowered by the software power cap
    temperature: HealthAction = HealthAction.alert  # GPU temperature >= health.temperature_c
    nvlink_errors: HealthAction = HealthAction.alert  # NVLink replay/recovery/CRC counters went up
    pcie_replay: HealthAction = HealthAction.log  # PCIe replay counter went up
    stall: HealthAction = HealthAction.abort  # no finished step and no generated token for health.stall_minutes


@dataclass
class CanaryConfig:
    """The rollout/trainer mismatch canary (r1/monitoring/canary.py, docs/algorithms.md): after each weight push the
    rollout engines answer a fixed probe greedily and the trainer scores their tokens; the mean |log pi_trainer -
    log mu| of each training batch is watched too. Past a threshold: ``action``, said in the health incident table."""

    enabled: bool = True
    probe_prompts: int = 4  # the first held-out prompts, the same at every push
    probe_tokens: int = 32  # greedy tokens per probe prompt
    every_pushes: int = 1  # probe after every n-th push (the initial weights are always probed)
    probe_threshold: float = 0.05  # mean |log pi_trainer - log mu| over the probe's tokens
    batch_threshold: float = 0.1  # train/is_log_ratio_abs_mean of a training batch (staleness included, if async)
    action: CanaryAction = CanaryAction.mask
    # Fire drill: pushes from drill_from_version on leave this tensor (HF name) out, as a broken name mapping would;
    # the canary must catch it on its first probe. Never set it in a real run.
    drill_skip_tensor: str | None = None
    drill_from_version: int = 1


@dataclass
class HealthConfig:
    """NVML health monitoring of every node of both pools, and the driver's progress watchdog (docs/sre.md)."""

    enabled: bool = True
    interval_s: float = 10.0  # seconds between two samples of a node (Xid events are waited for in between)
    temperature_c: float = 87.0  # the "temperature" signal fires at or above this (H100 slowdown starts near 90)
    # NVIDIA's Xid catalog: ECC, row remapping, NVLink, off the bus (Ampere and later), and Hopper's GSP firmware
    # timeout/error (119, 120), unrecovered ECC (140) and "recovery action changed" (154: reset or reboot required)
    xid_critical_codes: list[int] = field(default_factory=lambda: [48, 63, 64, 74, 79, 94, 95, 119, 120, 140, 154])
    # No finished step and no generated token for this long: dump every actor's stacks, then health.actions.stall
    # (0 = no watchdog). A step of the paper's run takes minutes; a hung collective never returns.
    stall_minutes: float = 30.0
    actions: HealthActions = field(default_factory=HealthActions)


@dataclass
class PlannerConfig:
    """What ``plan=true`` prints and what is checked before a Slurm or Kubernetes submission (r1/plan, docs/plan.md):
    each pool's memory per GPU, the step's phases, the split of nodes. The assumptions below are the model's inputs
    that the config does not hold; each one is printed with the plan."""

    # a100_40gb | a100_80gb | h100_80gb | h200_141gb; null: the Slurm partition's gres or a Kubernetes pool's node
    # selector where they name one, else h100_80gb
    gpu: str | None = None
    # cluster=slurm|k8s: refuse the submission when the training or rollout pool does not fit, showing the plan and
    # the change that fits; false submits anyway
    check: bool = True
    # the GPU image has Transformer Engine (flash attention for packed and context-parallel sequences); false: r1's
    # local attention, whose context-parallel mask is quadratic in the sequence
    transformer_engine: bool = True
    prompt_tokens: int = 512  # the longest prompt (with its template)
    mean_response_share: float = 0.5  # the mean response's share of the longest allowed
    train_mfu: float = 0.35  # model FLOPs utilisation of the training pool
    decode_bandwidth_share: float = 0.6  # share of HBM bandwidth a decode step reaches
    network_gbps: float = 400.0  # the link between the pools (one InfiniBand NDR port)
    reserved_gib: float = 3.0  # per GPU: CUDA context, NCCL, the caching allocator's fragmentation


@dataclass
class R1Config:
    name: str = "r1"
    seed: int = 0
    run_dir: str = MISSING
    cache_dir: str = ".r1_cache"
    # Continue from run_dir's latest checkpoint (nothing there: start afresh). On by default under cluster=slurm, and
    # always for a requeued Slurm attempt.
    resume: bool = False
    # Print the plan (memory per GPU of each pool, step time, the node split; r1/plan) and exit: nothing is started
    # or submitted
    plan: bool = False
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    stage: Stage = Stage.grpo  # what this run does: grpo (RL) | sft | eval | rejection_sampling | report
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # The choices of each config group, filled in by the launcher from Hydra (for the record, W&B, checkpoints).
    choices: dict[str, Any] = field(default_factory=dict)


def under(base: str | None, path: str) -> str:
    """``path`` as seen from ``base``: an absolute path stays; a relative one is taken under ``base`` (none: as is).
    Where a Slurm run lives: a relative run_dir/cache_dir is on ``cluster.slurm.shared_dir``."""
    return path if base is None or os.path.isabs(os.path.expanduser(path)) else os.path.join(base, path)


def register_configs() -> None:
    # ${r1.under:<base>,<path>}: cluster=slurm puts Hydra's own output dir where the run's files go
    OmegaConf.register_new_resolver("r1.under", under, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="r1_schema", node=R1Config)
