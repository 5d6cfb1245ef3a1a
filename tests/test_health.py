"""GPU health: the fake NVML against pynvml itself, the policy against hand-worked cases, the degrade path with the
real pynvml (no driver here), Prometheus export through Ray, and the actions end to end in real tiny runs: an alert,
a drain the run survives, an abort that checkpoints and exits with the requeue code, a hung step the watchdog
catches. (Slurm's exclusion of the sick node: tests/test_slurm.py.)"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pynvml
import pytest
from omegaconf import OmegaConf

from r1.config.schema import HealthConfig
from r1.health.policy import gpu_incidents
from r1.health.watchdog import ProgressWatchdog
from tests import fake_nvml
from tests.conftest import REPO, TINY
from tests.wandb_records import read_run


def _health_cfg(**overrides):
    cfg = OmegaConf.structured(HealthConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))  # (what workers get: plain strings)


# --- the fake is pynvml's shape ---------------------------------------------------------------------------------
def test_the_fake_nvml_has_pynvmls_names_signatures_types_and_errors(tmp_path, monkeypatch):
    for name in fake_nvml.EMULATED:
        assert inspect.signature(getattr(fake_nvml, name)) == inspect.signature(getattr(pynvml, name)), name
    # every NVML name r1's reader uses exists in pynvml (so the fake cannot hide a misspelt call)
    tree = ast.parse((REPO / "r1" / "health" / "nvml.py").read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and re.match(r"nvml[A-Z]|NVML", node.attr)}
    assert used and all(hasattr(pynvml, name) for name in used), sorted(n for n in used if not hasattr(pynvml, n))
    assert used - {"NVMLError", "NVMLError_Timeout"} <= set(fake_nvml.EMULATED) | {n for n in dir(pynvml) if n.isupper() or n.startswith("nvmlEventType")}

    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(tmp_path / "s.json"))
    fake_nvml.write_script(tmp_path / "s.json", {"gpus": 1, "faults": []})
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake_nvml.nvmlDeviceGetCount()
    fake_nvml.nvmlInit()
    try:
        handle = fake_nvml.nvmlDeviceGetHandleByIndex(0)
        assert isinstance(handle, pynvml.c_nvmlDevice_t)
        assert isinstance(fake_nvml.nvmlDeviceGetUtilizationRates(handle), pynvml.c_nvmlUtilization_t)
        assert isinstance(fake_nvml.nvmlDeviceGetMemoryInfo(handle), pynvml.c_nvmlMemory_t)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            fake_nvml.nvmlDeviceGetPcieReplayCounter(handle)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            fake_nvml.nvmlDeviceGetHandleByIndex(1)
        with pytest.raises(pynvml.NVMLError_Timeout):
            fake_nvml.nvmlEventSetWait_v2(fake_nvml.nvmlEventSetCreate(), 0)
    finally:
        fake_nvml.nvmlShutdown()


def test_a_gpu_nvml_cannot_open_is_left_out_and_the_others_keep_their_indices(tmp_path, monkeypatch):
    """Under a scheduler's device cgroup NVML counts every GPU of the node but opens only the job's: the others are
    reported unreadable, and the readable ones keep their NVML index (Ray's GPU ids use the same numbering)."""
    from r1.health.nvml import NodeGpus

    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(tmp_path / "s.json"))
    fake_nvml.write_script(tmp_path / "s.json", {"gpus": 3, "faults": [
        {"gpu": 1, "kind": "hidden"}, {"gpu": 2, "kind": "xid", "code": 31}]})
    fake_nvml.nvmlInit()
    gpus = NodeGpus(fake_nvml)
    try:
        assert sorted(gpus.uuids) == [0, 2] and gpus.uuids[2].endswith("-2")
        assert gpus.unreadable == {1: "NVMLError_NoPermission: Insufficient Permissions"}
        assert gpus.read(2)["temperature_c"] == 55.0
        assert gpus.wait_xids(1000) == [(2, 31)]
    finally:
        gpus.close()


def test_without_a_driver_the_real_pynvml_fails_and_the_monitor_reports_cpu_and_memory_only(monkeypatch):
    """The degrade path with the real library: on this machine ``nvmlInit`` raises NVMLError_LibraryNotFound."""
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine: there is no degrade path to test")
    except pynvml.NVMLError_LibraryNotFound:
        pass
    from r1.health.monitor import NodeMonitor

    monkeypatch.delenv("R1_NVML_MODULE", raising=False)
    monitor = NodeMonitor(_health_cfg(interval_s=0.05))
    try:
        time.sleep(0.3)
        report = monitor.report()
    finally:
        monitor.close()
    assert report["nvml"] is False and report["why_no_nvml"].startswith("NVMLError_LibraryNotFound")
    assert report["gpus"] == {} and report["incidents"] == [] and report["monitor"]["samples"] >= 2
    assert report["host"]["mem_total_gb"] == pytest.approx(psutil.virtual_memory().total / 2**30)


# --- the policy, by hand ----------------------------------------------------------------------------------------
def test_the_policy_fires_state_signals_on_the_edge_and_counters_on_an_increase():
    cfg = _health_cfg(temperature_c=85)
    run = lambda before, now, xids=(): [(i.signal, i.action, i.xid) for i in
                                         gpu_incidents(cfg, "n1", 0, "GPU-x", before, now, list(xids))]
    cool, hot = {"temperature_c": 70.0}, {"temperature_c": 85.0}
    assert run(None, cool) == [] and run(cool, hot) == [("temperature", "alert", None)]
    assert run(hot, {"temperature_c": 91.0}) == []  # still hot: said once
    assert run(None, hot) == [("temperature", "alert", None)]  # hot from the first sample
    # Xids: the critical list aborts, others alert
    assert run(cool, cool, [79, 13]) == [("xid_critical", "abort", 79), ("xid", "alert", 13)]
    # clock-event reasons: 0x40 HW thermal, 0x08 HW slowdown, 0x04 SW power cap
    assert run({"clocks_event_reasons": 0}, {"clocks_event_reasons": 0x40 | 0x08}) == [
        ("thermal_slowdown", "alert", None), ("hw_slowdown", "alert", None)]
    assert run(None, {"clocks_event_reasons": 0x04}) == [("power_slowdown", "log", None)]
    # volatile uncorrected ECC counts from zero (a GPU that has them already is reported at once); the other
    # counters count from the first sample
    assert run(None, {"ecc_volatile_uncorrected": 1.0, "ecc_volatile_corrected": 5.0, "nvlink_errors": 9.0}) == [
        ("ecc_uncorrectable", "abort", None)]
    assert run({"ecc_volatile_corrected": 5.0, "nvlink_errors": 9.0, "pcie_replay": 1.0},
               {"ecc_volatile_corrected": 6.0, "nvlink_errors": 9.0, "pcie_replay": 4.0}) == [
        ("ecc_correctable", "log", None), ("pcie_replay", "log", None)]
    assert run({"remapped_rows_pending": 0.0}, {"remapped_rows_pending": 1.0, "remapped_rows_failure": 1.0}) == [
        ("row_remap_pending", "alert", None), ("row_remap_failure", "abort", None)]
    drain = _health_cfg(**{"actions.xid_critical": "drain"})
    assert [i.action for i in gpu_incidents(drain, "n1", 0, "u", cool, cool, [48])] == ["drain"]


def test_a_workers_gpu_is_found_in_nvml_by_its_uuid_not_its_cuda_index():
    """A job given GPUs 2 and 3 of a node under device cgroups: its processes call them CUDA devices 0 and 1, NVML
    calls them 2 and 3. The UUID names the same GPU for both (torch reports it without NVML's ``GPU-`` prefix)."""
    from r1.cluster import device_uuids
    from r1.health.nvml import nvml_index

    nvml = {0: "GPU-aa01", 1: "GPU-bb02", 2: "GPU-CC03", 3: "GPU-dd04"}
    assert nvml_index("0", "GPU-cc03", nvml) == 2 and nvml_index("1", "dd04", nvml) == 3
    assert nvml_index("0", "GPU-ee05", nvml) is None  # not a GPU of this node: never someone else's
    assert nvml_index("1", None, nvml) == 1  # no UUID known (no CUDA in the worker): Ray's id taken as the index
    # Ray's ids are CUDA_VISIBLE_DEVICES entries, which may themselves be UUIDs (this machine has no CUDA)
    assert device_uuids(["GPU-bb02", "3"]) == ["GPU-bb02", None]
    assert nvml_index("GPU-bb02", "GPU-bb02", nvml) == 1


def test_the_watchdog_fires_once_per_stall():
    signs, fired = [0], []
    dog = ProgressWatchdog(0.4, lambda: signs[0], fired.append)
    try:
        for _ in range(6):  # progress every 0.1 s: no stall
            time.sleep(0.1)
            signs[0] += 1
        assert fired == []
        time.sleep(1.5)  # then none: one stall, however long it lasts
        assert len(fired) == 1 and fired[0] >= 0.4
    finally:
        dog.close()


# --- Prometheus, through Ray's metrics export -------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_readings_are_exported_for_prometheus_by_ray(ray_local, tmp_path):
    from r1.health.monitor import NodeMonitor

    script = tmp_path / "nvml.json"
    fake_nvml.write_script(script, {"gpus": 1, "faults": [{"gpu": 0, "kind": "temperature", "start_c": 61,
                                                           "rise_c": 0}]})
    monitor = ray_local.remote(NodeMonitor).options(num_cpus=0, runtime_env={"env_vars": {
        "R1_NVML_MODULE": "tests.fake_nvml", "FAKE_NVML_SCRIPT": str(script), "PYTHONPATH": str(REPO)}}).remote(
        _health_cfg(interval_s=0.2))
    node = ray_local.get(monitor.describe.remote())["node"]
    head = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics"
    try:
        deadline, lines = time.monotonic() + 90, []
        while not lines and time.monotonic() < deadline:  # Ray exports on its own schedule (seconds)
            time.sleep(1)
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            lines = [x for x in text.splitlines() if x.startswith("ray_r1_gpu_temperature_c{")]
        assert lines, f"no ray_r1_gpu_temperature_c at {url}"
        assert f'node="{node}"' in lines[0] and 'gpu="0"' in lines[0] and lines[0].endswith(" 61.0")
    finally:
        ray_local.get(monitor.close.remote())
        ray_local.kill(monitor)


def test_health_disabled_starts_no_monitor_and_no_watchdog(tmp_path):
    """health.enabled=false: no monitor, nothing read; health.stall_minutes=0: no watchdog thread."""
    from types import SimpleNamespace

    from r1.health.supervisor import HealthSupervisor
    from r1.monitoring.stop import GracefulStop

    cfg = SimpleNamespace(health=_health_cfg(enabled=False, stall_minutes=0))
    pool = SimpleNamespace(actors=[], drained=set())
    with HealthSupervisor(cfg, tmp_path, logger=None, train=pool, workers=SimpleNamespace(pool=pool),
                          stop=GracefulStop()) as health:
        health.watch(lambda: 0)
        assert health.monitors == {} and not any(t.name == "r1-watchdog" for t in threading.enumerate())
        assert health.check() == {"health/incidents_total": 0, "health/drained_workers": 0}
        assert not (tmp_path / "health" / "gpus.json").exists()


# --- end to end: real tiny runs ---------------------------------------------------------------------------------
RUN = [*TINY, "logger=wandb", "logger.mode=offline", "trainer.total_steps=40", "algo.group_size=4",
       "algo.prompts_per_step=4", "eval.at_start=false", "eval.every_steps=0", "checkpoint.every_steps=0",
       "health.interval_s=0.2"]


def _start(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    with open(tmp_path / "out.txt", "w") as out:  # (the child keeps its own copy of the descriptor)
        proc = subprocess.Popen([sys.executable, "-m", "launcher.main", *RUN, f"run_dir={run_dir}",
                                 f"cache_dir={tmp_path / 'cache'}", *overrides], cwd=REPO,
                                env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    return proc, run_dir


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x) for x in lines if '"reward/mean"' in x]


def _until(what, proc, tmp_path, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"run ended (rc {proc.returncode}) or timed out:\n"
                                 f"{(tmp_path / 'out.txt').read_text()[-5000:]}")
        time.sleep(0.3)
    return found


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # (gone meanwhile)
        return ""


def _incidents(run_dir: Path) -> list[dict]:
    path = run_dir / "health" / "incidents.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_sick_gpu_is_alerted_drained_and_aborts_the_run_with_a_checkpoint(tmp_path):
    """Three GPUs (fake NVML behind Ray's GPU accounting): the trainer's and one per rollout worker. A rollout GPU
    throttles and heats up (two alerts), the other rollout worker's GPU raises Xid 79 (drain, by this run's policy): the run goes on
    with one rollout worker and loses nothing; then the trainer's GPU reports an uncorrectable ECC error (abort): a
    checkpoint of that step, exit code 75."""
    script = tmp_path / "nvml.json"
    faults = []
    fake_nvml.write_script(script, {"gpus": 3, "faults": faults})
    proc, run_dir = _start(tmp_path, "cluster.num_gpus=3", "trainer.gpus_per_worker=1", "rollout.gpus_per_worker=1",
                           "health.actions.xid_critical=drain",
                           "rollout.simulated_decode_step_s=0.02",  # >= 1.3 s a request: in flight at the drain
                           env={"R1_NVML_MODULE": "tests.fake_nvml", "FAKE_NVML_SCRIPT": str(script)})
    try:
        gpus = _until(lambda: (run_dir / "health" / "gpus.json").exists() and json.loads(
            (run_dir / "health" / "gpus.json").read_text()), proc, tmp_path)
        node = gpus[0]["node"]
        gpu_of = {w: g["gpu"] for g in gpus for w in g["workers"]}
        assert sorted(gpu_of) == ["rollout 0", "rollout 1", "train 0"] and len(set(gpu_of.values())) == 3
        faults += [{"gpu": gpu_of["rollout 0"], "kind": "throttle", "reasons": 0x40},  # HW thermal slowdown: now
                   {"gpu": gpu_of["rollout 0"], "kind": "temperature", "start_c": 80, "rise_c": 1}]  # 87 C: later
        fake_nvml.write_script(script, {"gpus": 3, "faults": faults})
        _until(lambda: len(_steps(run_dir)) >= 2 and len(_incidents(run_dir)) == 2, proc, tmp_path)
        faults.append({"gpu": gpu_of["rollout 1"], "kind": "xid", "code": 79})
        fake_nvml.write_script(script, {"gpus": 3, "faults": faults})
        drained_at = _until(lambda: next((s["step"] for s in _steps(run_dir) if s["health/drained_workers"]), None),
                            proc, tmp_path)
        _until(lambda: len(_steps(run_dir)) >= drained_at + 3, proc, tmp_path)  # it goes on with one worker
        faults.append({"gpu": gpu_of["train 0"], "kind": "ecc_uncorrectable", "count": 1})
        fake_nvml.write_script(script, {"gpus": 3, "faults": faults})
        assert proc.wait(timeout=240) == 75, (tmp_path / "out.txt").read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    incidents = _incidents(run_dir)
    assert [(i["signal"], i["action"], i["gpu"], i["xid"]) for i in incidents] == [
        ("thermal_slowdown", "alert", gpu_of["rollout 0"], None), ("temperature", "alert", gpu_of["rollout 0"], None),
        ("xid_critical", "drain", gpu_of["rollout 1"], 79), ("ecc_uncorrectable", "abort", gpu_of["train 0"], None)]
    assert incidents[0]["detail"] == "clocks event reasons 0x40, SM clock 1980 MHz"
    assert incidents[2]["detail"] == "Xid 79; drained: rollout worker 1"
    assert incidents[0]["uuid"] == f"GPU-fake-{node}-{gpu_of['rollout 0']}"

    steps = _steps(run_dir)
    last = steps[-1]["step"]
    assert [s["step"] for s in steps] == list(range(1, last + 1)) and last >= drained_at + 3
    # the drain: worker 1's two groups in flight were redone on worker 0, and it got nothing after
    redone = [s["buffer/redone_after_worker_loss_total"] for s in steps]
    assert redone == [0] * drained_at + [2] * (last - drained_at), redone
    assert steps[-1]["rollout/workers_replaced_total"] == 0
    ledger = [json.loads(x) for x in (run_dir / "groups.jsonl").read_text().splitlines()]
    assert len({row["uid"] for row in ledger}) == len(ledger) == 4 * last  # every group once, nothing lost
    temps = [s[f"health/{node}/gpu{gpu_of['rollout 0']}/temperature_c"] for s in steps]
    assert temps == sorted(temps) and temps[-1] > 87  # rising, and past the limit
    # the abort: a checkpoint of exactly the last step
    state = json.loads((run_dir / "checkpoints" / f"step_{last:06d}" / "driver_state.json").read_text())
    assert state["step"] == last

    # W&B (offline files): the readings, an alert per incident at its level, the incident table
    wandb_dir = next((run_dir / "wandb").glob("offline-run-*"))
    record = read_run(next(wandb_dir.glob("run-*.wandb")))
    where = lambda worker: f"{node} gpu{gpu_of[worker]} (GPU-fake-{node}-{gpu_of[worker]})"
    assert [(a["level"], a["title"]) for a in record["alerts"]] == [
        ("WARN", f"r1 alert: thermal_slowdown on {where('rollout 0')}"),
        ("WARN", f"r1 alert: temperature on {where('rollout 0')}"),
        ("ERROR", f"r1 drain: xid_critical (Xid 79) on {where('rollout 1')}"),
        ("ERROR", f"r1 abort: ecc_uncorrectable on {where('train 0')}")]
    assert any(f"health/{node}/gpu{gpu_of['train 0']}/ecc_volatile_uncorrected" in h for h in record["history"])
    table = max((json.loads(p.read_text()) for p in wandb_dir.glob("files/media/table/health/incidents_summary_*.table.json")),
                key=lambda t: len(t["data"]))  # (the latest version of the summary's table)
    assert [row[1:3] for row in table["data"]] == [["thermal_slowdown", "alert"], ["temperature", "alert"],
                                                   ["xid_critical", "drain"], ["ecc_uncorrectable", "abort"]]


@pytest.mark.slow
def test_a_hung_step_is_caught_by_the_watchdog_which_dumps_stacks_and_aborts(tmp_path):
    """Training steps longer than health.stall_minutes are no stall: the training rank beats inside them (the driver
    sees no new step and no new group meanwhile). Then a rollout worker frozen mid-step (SIGSTOP: alive to Ray,
    doing nothing): after health.stall_minutes the watchdog writes every process's stacks, raises the stall
    incident and aborts: checkpoint, exit code 75. The run has no NVML (the real pynvml, no driver): it says so
    once and goes on."""
    proc, run_dir = _start(tmp_path, "health.stall_minutes=0.1", "trainer.simulated_update_s=7")
    frozen = None
    try:
        _until(lambda: len(_steps(run_dir)) >= 1, proc, tmp_path)
        assert _steps(run_dir)[0]["time/train_s"] > 6  # an update longer than the 6 s allowed
        assert not _incidents(run_dir), "a long healthy step was taken for a stall"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)  # (this run's Ray: the driver's)
                   if _title(p).startswith("ray::RolloutWorker")]
        assert len(workers) == 2
        frozen = workers[0]
        frozen.send_signal(signal.SIGSTOP)
        stacks = _until(lambda: next((run_dir / "health").glob("stacks-*"), None), proc, tmp_path)
        _until(lambda: _incidents(run_dir), proc, tmp_path)
        if frozen.is_running():
            frozen.send_signal(signal.SIGCONT)  # (the abort is decided: let the pool shut down quickly)
        rc = proc.wait(timeout=240)
    finally:
        if frozen is not None and frozen.is_running():
            frozen.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "out.txt").read_text()
    assert rc == 75, out[-5000:]
    [stall] = _incidents(run_dir)
    assert (stall["signal"], stall["action"], stall["node"]) == ("stall", "abort", "driver")
    assert str(stacks) in stall["detail"]
    # the driver waits on the frozen worker: for its groups (the buffer's take()) or for it to take a weight push
    driver = (stacks / "driver.txt").read_text()
    assert "rollout_buffer.py" in driver or "weight_sync.py" in driver, driver
    dumps = {p.name: p.read_text() for p in stacks.glob("*-*.txt")}
    frozen_dump = next(text for name, text in dumps.items() if name.endswith(f"-{frozen.pid}.txt"))
    # py-spy read the frozen process: its title, and the threads of a rollout worker (its asyncio event loop)
    assert frozen_dump.startswith(f"# {frozen.pid} ray::RolloutWorker") and '"AsyncIO Thread: default"' in frozen_dump
    last = _steps(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step_{last:06d}").is_dir()
    assert out.count("no NVML on") == 1 and "NVMLError_LibraryNotFound" in out  # said once, by the driver
    record = read_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    assert [(a["level"], a["title"]) for a in record["alerts"]] == [("ERROR", "r1 abort: stall on driver")]
