"""Bytes per GPU of the training pool: Megatron-core (TP x PP x CP x DP, distributed optimizer) or the HF engine.

Static terms follow Megatron's own accounting (megatron-core 0.16.1): parameters in the compute dtype; the DDP
gradient buffer whole on every rank, in the parameters' dtype or fp32 (``grad_reduce_in_fp32``); the distributed
optimizer's fp32 master copies (bf16 runs only: fp32 parameters are their own masters) and Adam's two fp32 moments,
sharded over data parallel x context parallel (megatron-core's ``intra_dp_cp_group``) - Megatron's table "bf16
param, fp32 grads: 6 + 12/d bytes" (docs/user-guide/features/dist_optimizer.md) is ``param 2 + grad 4 + 12/d``;
with bf16 gradients the step's fp32 copy of the shard's gradient adds 4/d (``4 + 16/d``, as the table's fp16 row). The vocabulary is padded to a multiple of TP
(mbridge's ``make_vocab_size_divisible_by``) and split over TP, like every matrix; norms are replicated.

Activations are what autograd keeps per token and layer in Megatron's local layer spec (what r1 runs without
Transformer Engine), counted tensor by tensor with saved-tensor hooks on CPU (tests/test_plan_calibration.py) and
exact there; with Transformer Engine the core attention saves q, k, v, its output and the softmax statistics
(flash attention), the rest is assumed as in the local spec (TE's fused layers keep no more). Sequence parallelism
divides every one of them by TP; full recomputation keeps only each layer's input; selective keeps the attention's
q, k, v instead of its internals.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1.plan.shape import ModelShape

# the log-prob chunk's working set: fp32 logits, their shifted and exponentiated copies and, in the backward pass,
# their gradients - 6.0-6.1 fp32 logit-sized tensors alive at the peak, measured on CPU (r1.engines.megatron.logprobs
# with entropies, as the training step runs it; tests/test_plan_calibration.py)
LOGIT_COPIES = 6.0
# ... or, where the vocabulary slice is large against the chunk, the output layer's gradient being accumulated:
# three weight-sized tensors at the peak (measured likewise)
OUTPUT_GRAD_COPIES = 3


@dataclass(frozen=True)
class TrainLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = True
    bf16: bool = True
    grad_fp32: bool = False
    with_reference: bool = True
    micro_batch_tokens: int = 16384
    logprob_chunk_tokens: int = 4096
    transformer_engine: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        return (f"TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp}, recompute {self.recompute}"
                + (", SP" if self.sequence_parallel and self.tp > 1 else ""))


def optimizer_bytes_per_param(lay: TrainLayout) -> int:
    """The distributed optimizer's bytes per parameter of a DP x CP shard: Adam's two fp32 moments (8), and with
    bf16 parameters their fp32 masters (4) and, where the gradient buffer is bf16, the fp32 copy of the shard's
    gradient the step makes and keeps until the next step's zero_grad (4) (megatron/core/optimizer/
    distrib_optimizer.py, ``_copy_model_grads_to_main_grads``)."""
    if not lay.bf16:
        return 8
    return 12 if lay.grad_fp32 else 16


def padded_vocab(shape: ModelShape, tp: int) -> int:
    return -(-shape.vocab // tp) * tp


def params_per_rank(shape: ModelShape, tp: int, pp: int) -> int:
    """Parameters of the largest pipeline stage on one TP rank: its layers' matrices and biases split over TP, the
    norms whole; the first stage holds the embedding, the last the output layer (tied: a copy of the embedding when
    PP > 1) and the final norm."""
    norms = 2 * shape.hidden
    layer = (shape.layer_params() - norms) // tp + norms
    layers = -(-shape.layers // pp)
    embedding = padded_vocab(shape, tp) * shape.hidden // tp
    output = 0 if shape.tied and pp == 1 else embedding
    if pp == 1:
        return layers * layer + embedding + output + shape.hidden
    return layers * layer + max(embedding, output + shape.hidden)


def activation_bytes_per_token_layer(shape: ModelShape, lay: TrainLayout) -> float:
    """What one layer keeps for the backward pass per token of this rank's stream (bytes)."""
    b = 2 if lay.bf16 else 4
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d
    t = lay.tp
    norm_split = t if lay.sequence_parallel and t > 1 else 1
    if lay.recompute == "full":  # the layer's input, in the compute dtype and (norm) in fp32
        return (b + 4) * h / norm_split
    # the norm region (inputs and statistics of both RMSNorms, the QKV and FC1 inputs): 8 hidden-sized tensors, 5
    # of them in fp32 (the norms compute in fp32); the SwiGLU MLP: FC1's output (2 x intermediate), the SiLU, the
    # product (FC2's input) and one more; RoPE's cos/sin for q and k
    norm_region = (3 * b + 5 * 4) * h / norm_split
    mlp = 5 * i * b / t
    rope = 4 * d * b
    if lay.recompute == "selective":  # the core attention's inputs are kept, its internals recomputed
        attention = (2 * q + 3 * kv) * b / t
    elif lay.transformer_engine:  # flash attention: q, k, v, out, softmax log-sum-exp (fp32)
        attention = (2 * q + 2 * kv) * b / t + 4 * shape.heads / t
    else:  # r1's local attention: q and the output, keys and values repeated to every head (and gathered over CP)
        attention = (2 * q + 2 * lay.cp * q) * b / t + 4 * shape.heads / t + 32
    return norm_region + mlp + rope + attention


def outside_layers_bytes_per_token(shape: ModelShape) -> float:
    """Kept once per micro-batch, not per layer: position ids and the rotary table (fp32)."""
    return 4 * shape.head_dim + 32


def logprob_working_bytes(shape: ModelShape, lay: TrainLayout, tokens: float) -> float:
    """The peak of one log-prob chunk's forward and backward (``r1.engines.megatron.logprobs``): its logits'
    copies, or the output layer's gradient accumulating, whichever is larger; plus the gradient of the hidden
    states it projects (fp32)."""
    vocab = padded_vocab(shape, lay.tp) / lay.tp
    logits = LOGIT_COPIES * 4 * min(lay.logprob_chunk_tokens, tokens) * vocab
    output_grad = OUTPUT_GRAD_COPIES * vocab * shape.hidden * (2 if lay.bf16 else 4)
    return max(logits, output_grad) + 4 * tokens * shape.hidden


def local_attention_mask_bytes(tokens_per_rank: int, lay: TrainLayout) -> float:
    """r1's local attention under CP builds an explicit [queries x keys] mask, kept in the compute dtype: quadratic
    in the sequence, per layer (one sequence per micro-batch; Transformer Engine needs none)."""
    if lay.transformer_engine or lay.cp == 1 or lay.recompute in ("full", "selective"):
        return 0.0
    return tokens_per_rank * tokens_per_rank * lay.cp * (2 if lay.bf16 else 4)


def megatron_memory(shape: ModelShape, lay: TrainLayout, longest_sequence: int) -> dict[str, float]:
    """Bytes per GPU of the busiest rank, by term; ``longest_sequence`` = prompt + the longest response."""
    p = params_per_rank(shape, lay.tp, lay.pp)
    b = 2 if lay.bf16 else 4
    micro_batch = max(lay.micro_batch_tokens, longest_sequence)
    tokens = micro_batch / lay.cp  # this rank's share of the micro-batch's stream
    layers = -(-shape.layers // lay.pp)
    in_flight = lay.pp  # 1F1B: the first stage holds PP micro-batches' activations at its peak
    per_layer = activation_bytes_per_token_layer(shape, lay) * tokens + local_attention_mask_bytes(int(tokens), lay)
    outside = in_flight * outside_layers_bytes_per_token(shape) * tokens
    terms = {
        "weights": p * b,
        "gradients": p * (4 if lay.grad_fp32 or not lay.bf16 else 2),
        "optimizer": p * optimizer_bytes_per_param(lay) / (lay.dp * lay.cp),
        "reference": p * b if lay.with_reference else 0.0,
        "activations": in_flight * layers * per_layer + outside,
    }
    if lay.recompute == "full":  # in the backward pass one layer at a time is recomputed whole
        whole = TrainLayout(**{**lay.__dict__, "recompute": "none"})
        terms["activations"] += activation_bytes_per_token_layer(shape, whole) * tokens
    # the last stage's hidden states (fp32), and the log-prob chunks' working set
    terms["logprob_buffers"] = 4 * tokens * shape.hidden + logprob_working_bytes(shape, lay, tokens)
    return terms


def hf_memory(shape: ModelShape, *, bf16: bool, with_reference: bool, micro_batch_tokens: int) -> dict[str, float]:
    """The HF engine keeps the whole model on every rank: fp32 masters, fp32 gradients, AdamW's two moments and an
    fp32 reference (r1.engines.hf_train.training_bytes); activations as Megatron's local spec at TP 1, and the
    logits of the whole micro-batch (no chunking)."""
    p = shape.params()
    lay = TrainLayout(bf16=bf16, transformer_engine=False)
    return {
        "weights": 4.0 * p, "gradients": 4.0 * p, "optimizer": 8.0 * p,
        "reference": 4.0 * p if with_reference else 0.0,
        "activations": shape.layers * activation_bytes_per_token_layer(shape, lay) * micro_batch_tokens,
        "logprob_buffers": LOGIT_COPIES * 4 * micro_batch_tokens * shape.vocab,
    }
