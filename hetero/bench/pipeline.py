"""hetero bench pipeline: the pipelined stream schedule against the sequential one, and the simulation.

The model is DeepSeek-V3 (transformers) scaled so that each MoE layer's two halves weigh the same:
routed experts on the host (oneDNN), shared experts on accel, as many shared experts as experts
per token, and a batch of one-token sequences (a decode step's shape, without a cache): 32 on a
GPU, 128 with accel = cpu, where at 32 both stages are bound by the memory bandwidth the two cores
share (measured 1.27x there, against 1.41x at 128). One
compile; its executor runs the same schedule sequentially (every task in order on the calling
thread) and pipelined (one worker per stream), alternating, 9 rounds, medians.

With accel = cpu both roles share the CPU: the run uses one intra-op thread per worker (one core
per role, as host kernels get their own cores in KTransformers), so the sequential schedule keeps
one core busy and the pipelined one up to two. The simulation takes each task's median duration from
the sequential runs and predicts the pipelined makespan from the schedule alone; the cost model's
prediction (from FLOPs and bytes, before anything ran) is shown beside it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hetero.bench import report
from hetero.numerics import rel_error
from hetero.runtime import trace
from hetero.runtime.executor import live_executors
from hetero.runtime.simulate import simulate

SIZES = {
    "layers": 4,
    "hidden": 512,
    "moe_inter": 512,
    "experts": 16,
    "top_k": 4,
    "shared": 4,
    "heads": 4,
    "batch": 32,  # one-token sequences; on a CPU accel 128 (CPU_BATCH)
    "seq": 1,
}
CPU_BATCH = 128  # with accel = cpu both stages share memory bandwidth; more rows make them compute-bound
ROUNDS = 9


@dataclass
class Result:
    device: str
    sizes: dict[str, int]
    threads: int
    micro_batches: int
    ms: dict[str, float] = field(default_factory=dict)  # sequential, pipelined (medians)
    speedup: float = 0.0
    predicted_ms: dict[str, float] = field(default_factory=dict)  # simulation from measured tasks
    cost_model_ms: dict[str, float] = field(default_factory=dict)
    prediction_error: float = 0.0  # |simulated - measured| / measured, pipelined
    error_vs_eager: float = 0.0
    tasks: int = 0
    streams: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(sizes: dict[str, int] = SIZES, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=1024,
        hidden_size=sizes["hidden"],
        intermediate_size=2 * sizes["hidden"],
        moe_intermediate_size=sizes["moe_inter"],
        num_hidden_layers=sizes["layers"],
        first_k_dense_replace=0,
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["heads"],
        n_routed_experts=sizes["experts"],
        n_shared_experts=sizes["shared"],
        num_experts_per_tok=sizes["top_k"],
        n_group=1,
        topk_group=1,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV3ForCausalLM(config)
    return model.to(dtype).eval(), config


def run(progress: Any = print, micro_batches: int = 1, sizes: dict[str, int] | None = None) -> Result:
    threads = torch.get_num_threads()
    try:
        return _run(progress, micro_batches, sizes)
    finally:
        torch.set_num_threads(threads)


def _run(progress: Any, micro_batches: int, sizes: dict[str, int] | None) -> Result:
    accel = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if accel == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if sizes is None:
        sizes = dict(SIZES, batch=CPU_BATCH) if accel == "cpu" else dict(SIZES)
    if accel == "cpu":
        threads = 1
        torch.set_num_threads(1)  # before the workers start: they inherit it
    model, config = build_model(sizes, dtype=dtype)
    reference, _ = build_model(sizes, dtype=dtype)
    device = torch.device(accel)
    model, reference = model.to(device), reference.to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (sizes["batch"], sizes["seq"]), generator=g).to(device)
    progress(f"compiling ({accel}, {micro_batches} micro-batch(es))...")
    options = {"micro_batches": micro_batches}
    compiled = torch.compile(model, backend="hetero", options=options)
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
        want = reference(ids, use_cache=False).logits
    ids_of = {id(p) for p in model.parameters()}
    (executor,) = [e for e in live_executors() if e.param_ids & ids_of]
    plan = executor.schedule
    times: dict[str, list[float]] = defaultdict(list)
    durations: dict[int, list[float]] = defaultdict(list)
    progress(f"timing {ROUNDS} rounds of sequential and pipelined...")
    with torch.no_grad():
        for mode in ("sequential", "pipelined"):  # warm both
            executor.mode = mode
            compiled(ids, use_cache=False)
        for _ in range(ROUNDS):
            for mode in ("sequential", "pipelined"):
                executor.mode = mode
                with trace.record() as spans:
                    _sync(device)
                    start = time.perf_counter()
                    compiled(ids, use_cache=False)
                    _sync(device)
                    times[mode].append(time.perf_counter() - start)
                if mode == "sequential":
                    index = {(t.name, t.micro_batch): t.id for t in plan.tasks}
                    for s in spans:
                        durations[index[(s.name, s.micro_batch)]].append(s.end - s.start)
    executor.mode = "pipelined"
    ms = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    measured = {t.id: statistics.median(durations[t.id]) if durations[t.id] else 0.0 for t in plan.tasks}
    sim = simulate(plan, lambda t: measured[t.id])
    cost = simulate(plan)
    overhead = ms["sequential"] - sim.sequential * 1e3  # call overhead outside the tasks
    predicted = {"sequential": ms["sequential"], "pipelined": sim.makespan * 1e3 + overhead}
    return Result(
        device=_device_name(device),
        sizes=dict(sizes),
        threads=threads,
        micro_batches=micro_batches,
        ms=ms,
        speedup=ms["sequential"] / ms["pipelined"],
        predicted_ms=predicted,
        cost_model_ms={"sequential": cost.sequential * 1e3, "pipelined": cost.makespan * 1e3},
        prediction_error=abs(predicted["pipelined"] - ms["pipelined"]) / ms["pipelined"],
        error_vs_eager=rel_error(got, want),
        tasks=len(plan.tasks),
        streams=sorted({t.stream for t in plan.tasks}),
    )


def table(r: Result) -> str:
    lines = [
        f"pipeline: DeepSeek-V3 scaled {r.sizes}, {r.device}, {r.threads} intra-op thread(s) per worker, "
        f"{r.micro_batches} micro-batch(es), {r.tasks} tasks on streams {', '.join(r.streams)}",
        "",
        "| schedule | measured ms (median) | simulated ms (measured tasks) | cost model ms |",
        "| --- | --- | --- | --- |",
    ]
    for mode in ("sequential", "pipelined"):
        lines.append(
            f"| {mode} | {r.ms[mode]:.2f} | {r.predicted_ms[mode]:.2f} | {r.cost_model_ms[mode]:.2f} |"
        )
    lines += [
        "",
        f"pipelined throughput: {r.speedup:.2f}x the sequential schedule's; simulation off by "
        f"{100 * r.prediction_error:.0f}%; output vs eager: rel. error {r.error_vs_eager:.1e}",
    ]
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU (accel = cpu)"


def main(as_json: bool = False) -> int:
    return report(run, table, as_json)
