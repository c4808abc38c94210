"""The stream schedule and its runtime: ordering properties on random graphs, concurrent callers, the
host fallback of a faulting accel task, and the timeline."""

from __future__ import annotations

import json
import random
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hetero
from hetero import zoo
from hetero.compiler import meta
from hetero.compiler.report import collect_reports
from hetero.compiler.schedule_ir import Schedule, Task
from hetero.numerics import TOLERANCE, rel_error
from hetero.passes import partition as partition_pass
from hetero.passes.schedule import check_schedule, order_tasks, schedule
from hetero.runtime import trace
from hetero.runtime.executor import Executor
from hetero.runtime.simulate import simulate_tasks
from tests.models import tiny_moe
from tests.passes_util import make_ctx
from tests.shared_compiles import SharedCompile
from tests.test_partition_properties import random_dags

EAGER = {"partition_compiler": "eager"}


def _delayed(kernel, rng: random.Random, max_s: float):
    delay = rng.uniform(0, max_s)

    def run(*args):
        assert all(a is not None for a in args), "a task ran before one of its inputs existed"
        time.sleep(delay)
        return kernel(*args)

    return run


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags(), st.integers(0, 2**31 - 1))
def test_pipelined_runs_equal_sequential_under_random_delays(case, seed: int) -> None:
    """Random partitioned graphs: every dependency is covered by stream order or an event (checked
    on the schedule), no task sees a missing input, and results equal the sequential run, with each
    task delayed at random so the streams interleave differently every time."""
    gm, n_inputs = case
    ctx = make_ctx()
    parted = partition_pass.partition(gm, ctx).gm
    plan = schedule(parted, ctx).gm.meta[meta.SCHEDULE]
    check_schedule(plan)
    assert Schedule.from_json(plan.to_json()) == plan
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(4, generator=g) for _ in range(n_inputs)]
    kernels = {t.name: getattr(parted, t.name) for t in plan.tasks if t.kind == "partition"}
    expected = Executor(plan, kernels, {}, mode="sequential")(list(inputs))
    rng = random.Random(seed)
    delayed = {name: _delayed(k, rng, 0.002) for name, k in kernels.items()}
    got = Executor(plan, delayed, {}, mode="pipelined")(list(inputs))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@st.composite
def task_dags(draw: st.DrawFn) -> list[Task]:
    """Tasks on random streams reading random earlier tasks' outputs (slot i = output of task i)."""
    tasks = []
    for i in range(draw(st.integers(1, 30))):
        reads = draw(st.lists(st.integers(0, max(i - 1, 0)), max_size=3)) if i else []
        stream = draw(st.sampled_from(["accel", "host", "copy", "prefetch"]))
        tasks.append(
            Task(i, "partition", f"t{i}", "accel", "cpu", tuple(sorted(set(reads))), (i,), stream=stream)
        )
    return tasks


@settings(max_examples=200, deadline=None)
@given(task_dags(), st.lists(st.floats(0, 1), min_size=30, max_size=30))
def test_list_scheduling_keeps_every_dependency(tasks: list[Task], costs: list[float]) -> None:
    ordered = order_tasks(tasks, lambda t: costs[int(t.name[1:])])
    assert sorted(t.name for t in ordered) == sorted(t.name for t in tasks)
    slot_of = {t.name: t.outputs[0] for t in tasks}
    renamed = {slot_of[t.name]: t.id for t in ordered}
    for t in ordered:  # inputs come from earlier tasks, and other streams' producers are waited for
        assert all(renamed[s] < t.id for s in t.inputs)
    plan = Schedule((), (), (), tasks=tuple(ordered), streams=_streams())
    check_schedule(plan)
    sim = simulate_tasks(ordered, lambda t: costs[int(t.name[1:])])
    assert sim.makespan <= sim.sequential + 1e-9
    for t in ordered:
        assert all(sim.end[w] <= sim.start[t.id] + 1e-9 for w in t.waits)


def _streams():
    from hetero.compiler.schedule_ir import Stream

    return tuple(Stream(n, "accel", "cpu", "compute") for n in ("accel", "host", "copy", "prefetch"))


def test_eight_threads_call_one_compiled_model(deepseek_on_cpu_no_cache: SharedCompile) -> None:
    shared = deepseek_on_cpu_no_cache.get()  # compiled for [2, 8] before the threads start
    built, compiled, reference = shared.built, shared.compiled, shared.reference
    inputs = [built.make_inputs(batch=2, seq=8, seed=300 + i)[0] for i in range(8)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(inputs[0], use_cache=False)
        want = [reference(ids, use_cache=False).logits for ids in inputs]
    got: list[torch.Tensor | None] = [None] * 8
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    got[i] = compiled(inputs[i], use_cache=False).logits
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) <= TOLERANCE[torch.float32]


def test_timeline_has_one_track_per_stream_and_shared_experts_overlap(
    deepseek_on_cpu_no_cache: SharedCompile,
) -> None:
    """deepseek-v3-tiny: each MoE layer's shared experts (accel) run while the host runs its routed
    experts; the dump's timeline shows both, on their streams."""
    shared = deepseek_on_cpu_no_cache.get()  # accel on the CPU, dumps in shared.dump
    compiled = shared.compiled
    (ids,) = shared.built.make_inputs(batch=2, seq=8, seed=7)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(ids, use_cache=False)
        with trace.record() as spans:
            compiled(ids, use_cache=False)
    (folder,) = [p for p in shared.dump.iterdir() if p.is_dir()]
    plan = Schedule.from_json((folder / "schedule.json").read_text())
    check_schedule(plan)

    def only_shared(t: Task) -> bool:
        return any("shared_experts" in r for r in t.regions) and not any(
            r.startswith(("attention:", "moe:")) for r in t.regions
        )

    shared = [t for t in plan.tasks if t.role == "accel" and only_shared(t)]
    routed = [t for t in plan.tasks if t.role == "host" and t.kind == "partition"]
    assert len(shared) == len(routed) == 2
    for s, r in zip(shared, routed, strict=True):  # neither waits for the other
        assert r.id not in s.waits and s.id not in r.waits
    timeline = json.loads((folder / "timeline.json").read_text())
    tracks = {e["args"]["name"] for e in timeline["traceEvents"] if e["ph"] == "M"}
    assert tracks == {"accel", "host"}
    slices = [e for e in timeline["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["partition"] for e in slices if e["cat"] == "partition"} == {
        t.name for t in plan.tasks if t.kind == "partition"
    }
    assert {s.stream for s in spans} == {"accel", "host"}


def test_faulting_accel_task_reruns_on_host_and_reset_retries() -> None:
    model, _ = tiny_moe()
    torch._dynamo.reset()
    options = {**EAGER, "accel": "cpu", "inject_fault": "part_0"}
    compiled = torch.compile(model, backend="hetero", options=options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), collect_reports() as reports, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [torch.randint(0, 16, (4,), generator=g) for _ in range(3)]
        for x in batches:
            assert rel_error(compiled(x), model(x)) <= TOLERANCE[torch.float32]
    (report,) = reports
    assert report.runtime_fallbacks == {"part_0": 1}  # recorded once, then served from the host
    (fault,) = [f for f in report.fallbacks if f["node"] == "part_0"]
    assert "InjectedFault" in fault["reason"]
    faults = [w for w in caught if "re-running it on the host" in str(w.message)]
    assert len(faults) == 1  # warned once
    assert hetero.reset(model) == 1  # back to the accelerator: it faults again, and falls back again
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = batches[0]
        assert rel_error(compiled(x), model(x)) <= TOLERANCE[torch.float32]
    assert report.runtime_fallbacks == {"part_0": 2}
    assert hetero.reset(torch.nn.Linear(2, 2)) == 0  # another model's graphs are left alone


def test_a_failing_host_task_raises_to_the_caller_and_the_next_call_works() -> None:
    model, (ids,) = tiny_moe()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="hetero", options={**EAGER, "accel": "cpu"})
    with torch.no_grad():
        compiled(ids)
    (executor,) = [
        e for e in hetero.runtime.executor.live_executors() if id(model.lm_head.weight) in e.param_ids
    ]
    host = next(t for t in executor.schedule.tasks if t.role == "host" and t.kind == "partition")
    original = executor._kernels[host.name]

    def broken(*args):
        raise ValueError("host kernel broke")

    executor._kernels = {**executor._kernels, host.name: broken}
    with torch.no_grad(), pytest.raises(ValueError, match="host kernel broke"):
        compiled(ids)
    executor._kernels = {**executor._kernels, host.name: original}
    with torch.no_grad():
        assert rel_error(compiled(ids), model(ids)) <= TOLERANCE[torch.float32]


def _overlap(slices: list[dict], a: str, b: str) -> bool:
    first = [(e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid_name"] == a]
    second = [(e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid_name"] == b]
    return any(s1 < e2 and s2 < e1 for s1, e1 in first for s2, e2 in second)


@pytest.mark.slow
def test_deepseek_micro_batches_match_eager_and_overlap(tmp_path: Path) -> None:
    """micro_batches=2: prefill and decode equal eager; the timeline shows host and accel slices
    overlapping in time; schedule.json reloads to an equal schedule."""
    from hetero.numerics import compare_generation

    built, reference = zoo.build("deepseek-v3-tiny"), zoo.build("deepseek-v3-tiny")
    torch._dynamo.reset()
    options = {"accel": "cpu", "micro_batches": 2, "dump_dir": str(tmp_path / "d")}
    compiled = torch.compile(built.model, backend="hetero", options=options)
    (ids,) = built.make_inputs(batch=4, seq=8, seed=21)
    with collect_reports() as reports, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = compare_generation(compiled, reference.model, ids, built.new_cache, steps=3)
    assert max(errors) <= TOLERANCE[torch.float32], errors
    assert len(reports) >= 2 and all(r.schedule["micro_batches"] == 2 for r in reports)  # prefill, decode
    assert all(not r.fallbacks for r in reports)
    folder = sorted(p for p in (tmp_path / "d").iterdir() if p.is_dir())[-1]  # the decode graph
    text = (folder / "schedule.json").read_text()
    plan = Schedule.from_json(text)
    assert Schedule.from_json(plan.to_json()) == plan and plan.to_json() == text.rstrip("\n")
    assert plan.batch is not None and plan.batch.n == 2
    check_schedule(plan)
    overlapped = False
    cache = built.new_cache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(ids, past_key_values=cache)
        for step in range(5):  # each decode call rewrites the timeline; one overlap is enough
            compiled(ids[:, step : step + 1], past_key_values=cache)
            timeline = json.loads((folder / "timeline.json").read_text())
            names = {e["tid"]: e["args"]["name"] for e in timeline["traceEvents"] if e["ph"] == "M"}
            slices = [{**e, "tid_name": names[e["tid"]]} for e in timeline["traceEvents"] if e["ph"] == "X"]
            assert {e["args"]["micro_batch"] for e in slices} == {0, 1}
            overlapped = overlapped or _overlap(slices, "host", "accel")
    assert overlapped, "no host slice ever overlapped an accel slice"
