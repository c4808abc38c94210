"""The `hetero` command.

    hetero demo                         the main job on zoo:deepseek-v3-tiny
    hetero explain TARGET [--json]      what runs where, and why
    hetero explain --list               the built-in zoo models
    hetero passes [TARGET] [FLAGS]      the pipeline; or compile TARGET with print/stop/disable/bisect flags
    hetero viz TARGET --out DIR         graph.svg, timeline.svg and report.html of a compiled model
    hetero diff DIR_A DIR_B             two dump folders compared pass by pass
    hetero generate PATH|zoo:NAME       tokens from a checkpoint folder, streamed; then tok/s and memory
    hetero bench moe [--json]           one MoE layer: hetero vs eager, Inductor and the floor
    hetero bench moe --memory           peak/steady memory compiling an 8-layer V2-Lite-width model
    hetero bench engram|mla [--json]    the Engram block; the MLA prologue (GPU)
    hetero bench e2e [--json] [--peers] a whole V2-Lite-width model: tok/s vs eager, Inductor, llama.cpp
    hetero bench pipeline [--json]      pipelined stream schedule vs sequential, and its simulation
    hetero calibrate [--out FILE]       measure this machine into the profile the cost model uses
    hetero plan MODEL [--profile P]     what goes where and how fast, for a full-size model, no weights

Exit codes: 0 success, 1 a run that failed or a check that differed, 2 a usage or configuration error
(or a checkpoint folder hetero cannot load).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hetero import zoo
from hetero.bench import calibrate as bench_calibrate
from hetero.bench import e2e as bench_e2e
from hetero.bench import engram as bench_engram
from hetero.bench import machine, report
from hetero.bench import memory as bench_memory
from hetero.bench import mla as bench_mla
from hetero.bench import moe as bench_moe
from hetero.bench import pipeline as bench_pipeline
from hetero.commands import calibrate, diff, generate, passes, plan, viz
from hetero.commands.architectures import table as architectures_table
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import CheckpointError, ConfigError, HeteroError, TargetError
from hetero.compiler.units import parse_size
from hetero.demo import run_demo
from hetero.driver.explain import explain
from hetero.targets import load_target
from hetero.zoo import architectures

# `hetero bench NAME`: each benchmark's entry point.
BENCHES = {
    "moe": bench_moe.main,
    "engram": bench_engram.main,
    "mla": bench_mla.main,
    "pipeline": bench_pipeline.main,
    "e2e": bench_e2e.main,
}

EXAMPLES = {
    "": """examples:
  hetero demo
  hetero explain zoo:deepseek-v3-tiny
  hetero passes zoo:deepseek-v3-tiny --print-after=partition
  hetero viz zoo:deepseek-v3-tiny --out viz/
  hetero generate zoo:deepseek-v3-tiny --max-new-tokens 16
  hetero bench pipeline
""",
    "demo": """examples:
  hetero demo
  hetero demo --dtype bf16 -O place='[{"match": "experts", "role": "accel"}]'
""",
    "explain": """examples:
  hetero explain zoo:deepseek-v3-tiny
  hetero explain zoo:qwen3-moe-tiny --json -O accel_memory_budget=200KiB
  hetero explain arch:gpt_oss                 # a tiny transformers MoE architecture
  hetero explain --architectures              # every one of them: what hetero does with its experts
  hetero explain path/to/model.py:make     # make() returns (model, example_inputs)
  hetero explain --list
""",
    "passes": """examples:
  hetero passes                                               # the passes, in order, with what each does
  hetero passes zoo:deepseek-v3-tiny --print-after=partition  # each op with its role, in its partition
  hetero passes zoo:deepseek-v3-tiny --disable-pass=fuse_accel --check
  hetero passes zoo:deepseek-v3-tiny --bisect                 # find the first rewrite that breaks --check
  hetero passes zoo:deepseek-v3-tiny --bisect-limit=3 --check
  hetero passes zoo:deepseek-v3-tiny --pass-timing --verify-each --dump-dir=dumps/
  hetero passes model.py:make --add-pass lower_host=mypasses.py:my_pass --print-after-change
""",
    "viz": """examples:
  hetero viz zoo:deepseek-v3-tiny --out viz/                  # graph.dot/.svg, timeline.svg, report.html
  hetero viz zoo:qwen3-moe-tiny --out viz/ --depth 4          # one box per module, 4 names deep
  hetero viz hetero-dumps/demo/000-graph_0_0 --out viz/       # from dumps written earlier
""",
    "diff": """examples:
  hetero passes zoo:deepseek-v3-tiny --dump-dir=a/
  hetero passes zoo:deepseek-v3-tiny --dump-dir=b/ --disable-pass=fuse_accel
  hetero diff a/ b/                   # options that differ, first pass that differs, its graph diff
""",
    "generate": """examples:
  hetero generate path/to/folder --prompt "Once upon a time" --max-new-tokens 64
  hetero generate path/to/folder --ids 1,2,3 --temperature 0.8 --top-p 0.95 --seed 1
  hetero generate path/to/folder --batch 4 -O host_dtype=int4   # 4 copies of the prompt at once
  hetero generate zoo:deepseek-v3-tiny --ids "1,2,3;4,5,6"        # two requests of one length
  hetero generate zoo:llama-tiny --dtype fp32 -O accel=cpu --ignore-eos
""",
    "plan": """examples:
  hetero plan deepseek-v3 --profile rtx4090-ddr5 --host-memory 512GiB --host-dtype int4
  hetero plan qwen3-30b-a3b                     # on the profile in use (hetero calibrate --show)
  hetero plan path/to/folder --json             # a folder holding a config.json, or the file
  hetero plan zoo:deepseek-v3-tiny --batch 4 --prompt-len 256
built-in models: deepseek-v3, kimi-k2, qwen3-235b-a22b, qwen3-30b-a3b, mixtral-8x22b, gpt-oss-120b
""",
    "calibrate": """examples:
  hetero calibrate                    # measure (under a minute), write ~/.cache/hetero/profile.json
  hetero calibrate --quick --out box.json --threads 2
  hetero calibrate --show             # the profile the cost model uses now, and where it comes from
  hetero calibrate --show h100-xeon8480
  hetero calibrate --list-presets
""",
    "bench": """examples:
  hetero bench moe
  hetero bench pipeline --json
  hetero bench e2e                    # decode and prefill tok/s of a 4-layer V2-Lite-width model
  hetero bench e2e --peers --json     # and llama.cpp on the same weights (after `make peers`)
  hetero bench e2e --layers 2         # a smaller model (built once into ~/.cache/hetero/bench)
""",
}


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _command(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_options_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-O",
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="a hetero option, e.g. -O accel=cpu -O strict=true (VALUE is JSON or a string); repeatable",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES[""],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = _command(sub, "demo", "compile zoo:deepseek-v3-tiny, prefill + decode, check against eager")
    demo.add_argument("--model", default="deepseek-v3-tiny", help="zoo model (default: deepseek-v3-tiny)")
    demo.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    demo.add_argument("--steps", type=int, default=8, help="decode steps after the prefill (default: 8)")
    demo.add_argument(
        "--dump-dir", default="hetero-dumps/demo", help="where dumps go (default: hetero-dumps/demo)"
    )
    _add_options_flag(demo)

    _explain_parser(sub)
    _passes_parser(sub)
    _viz_parser(sub)
    _diff_parser(sub)
    _generate_parser(sub)
    _calibrate_parser(sub)
    _plan_parser(sub)
    bench = _command(sub, "bench", "benchmarks: ratios measured side by side in one run")
    bench.add_argument(
        "name",
        choices=list(BENCHES),
        help="moe: one MoE layer on the host; engram: the Engram block and the prefetch overlap; "
        "mla: the fused MLA prologue on the GPU; pipeline: the stream schedule against the sequential one; "
        "e2e: a whole DeepSeek-V2-Lite-width model, decode and prefill tok/s, eager / Inductor / hetero "
        "bf16, int8, int4 (and llama.cpp with --peers)",
    )
    bench.add_argument("--json", action="store_true", help="print the numbers as JSON")
    bench.add_argument(
        "--memory",
        action="store_true",
        help="moe only: peak and steady memory of compiling an 8-layer DeepSeek-V2-Lite-width model",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="e2e only: llama.cpp at bf16 / Q8_0 / Q4_0 on the same weights (needs `make peers`)",
    )
    bench.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help=f"e2e only: decoder layers of the model (default {bench_e2e.LAYERS}; the first is dense)",
    )
    return parser


def _explain_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "explain", "compile TARGET and report placement, partitions and transfers")
    p.add_argument("target", nargs="?", help="zoo:NAME or path/to/file.py:factory")
    p.add_argument("--json", action="store_true", help="print the report as JSON (the summary.json dict)")
    p.add_argument("--list", action="store_true", help="list the zoo models and exit")
    p.add_argument(
        "--architectures",
        action="store_true",
        help="compile every transformers MoE architecture (tiny, arch:MODEL_TYPE) and print what each gets",
    )
    _add_options_flag(p)


def _passes_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "passes", "list the passes; or compile TARGET and show what each pass did")
    p.add_argument("target", nargs="?", help="zoo:NAME or path/to/file.py:factory; none: list the passes")
    p.add_argument("--print-before", metavar="NAME[,NAME]", help="print the graph before these passes")
    p.add_argument("--print-after", metavar="NAME[,NAME]", help="print the graph after these passes")
    p.add_argument("--print-after-all", action="store_true", help="print the graph after every pass")
    p.add_argument(
        "--print-after-change", action="store_true", help="print the graph after every pass that changed it"
    )
    p.add_argument("--stop-after", metavar="NAME", help="stop the pipeline after this pass")
    p.add_argument(
        "--disable-pass", metavar="NAME[,NAME]", action="append", default=[], help="skip optional passes"
    )
    p.add_argument(
        "--bisect-limit",
        metavar="N",
        type=int,
        help="run only the first N optional steps (rewrites, or whole optional passes); logs each on stderr",
    )
    p.add_argument(
        "--bisect",
        action="store_true",
        help="find the first optional step after which the model no longer matches eager (~log2 N compiles)",
    )
    p.add_argument(
        "--add-pass",
        metavar="AFTER=SPEC",
        action="append",
        default=[],
        help="run a user pass after pass AFTER; SPEC is package.module:function or file.py:function",
    )
    p.add_argument("--verify-each", action="store_true", help="check the graph's invariants after every pass")
    p.add_argument("--pass-timing", action="store_true", help="print how long each pass took")
    p.add_argument("--dump-dir", metavar="DIR", help="write the dumps (graph text per pass, ...) under DIR")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare the compiled model with eager; print the error per output",
    )
    _add_options_flag(p)


def _viz_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "viz", "draw a compiled model: partitioned graph, timeline, one-file HTML report")
    p.add_argument("target", help="zoo:NAME, path/to/file.py:factory, or a dump folder")
    p.add_argument(
        "--out", required=True, type=Path, help="folder to write into (new, empty or hetero's own)"
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="ops per box: 0 = one box per partition, N = per module path cut to N names "
        "(default: one box per layer and partition)",
    )
    _add_options_flag(p)


def _diff_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "diff", "compare two dump folders pass by pass (exit code 1 when they differ)")
    p.add_argument("a", type=Path, help="dump folder (a dump_dir, or one graph's folder in it)")
    p.add_argument("b", type=Path, help="the dump folder to compare with")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context around changes (default 3)")
    p.add_argument(
        "--max-lines", type=int, default=200, help="diff lines shown at most (default 200; 0 = all)"
    )


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "generate", "generate tokens with a compiled checkpoint folder: streamed, then tok/s")
    p.add_argument("target", help="a checkpoint folder (config.json + safetensors) or zoo:NAME")
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--prompt",
        metavar="TEXT",
        help=f"the prompt, read by the folder's tokenizer (default: {generate.DEFAULT_PROMPT!r})",
    )
    given.add_argument(
        "--ids",
        metavar="1,2,3",
        help="token ids in place of a prompt; 'a,b;c,d' gives one request each, of one length "
        f"(default without a tokenizer: {','.join(map(str, generate.DEFAULT_IDS))})",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="at most N new tokens (32)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="serve B copies of the prompt at once")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from this much probability mass (1.0)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (0)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="the model's dtype (default: the checkpoint's; bf16 for zoo models)",
    )
    _add_options_flag(p)


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "calibrate", "measure this machine (host, CUDA accel, link) into a cost-model profile")
    p.add_argument(
        "--out", type=Path, metavar="FILE", help="write the profile here (default: the cache file)"
    )
    p.add_argument("--quick", action="store_true", help="a few seconds, less exact (smaller working sets)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--threads", type=int, metavar="N", help="host threads to measure with (default: torch's)")
    p.add_argument(
        "--show",
        nargs="?",
        const="",
        metavar="FILE|PRESET",
        help="print a profile without measuring (none given: the one the cost model uses now)",
    )
    p.add_argument("--list-presets", action="store_true", help="the presets' names and machines")


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "plan", "what goes where and how fast, for a model of any size, before loading it")
    p.add_argument("model", help="a config.json, a folder holding one, a built-in real model, or a zoo name")
    p.add_argument("--profile", metavar="FILE|PRESET", help="machine profile (default: the one in use)")
    p.add_argument(
        "--accel-memory", metavar="SIZE", help="GPU memory to plan for, e.g. 24GiB (the profile's)"
    )
    p.add_argument("--host-memory", metavar="SIZE", help="host RAM to plan for, e.g. 512GiB (the profile's)")
    p.add_argument(
        "--host-dtype",
        choices=["fp32", "bf16", "int8", "int4"],
        default="bf16",
        help="format of the weights the host runs (default bf16)",
    )
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences per call (1)")
    p.add_argument("--prompt-len", type=int, default=128, metavar="P", help="prompt tokens (128)")
    p.add_argument(
        "--zipf",
        type=float,
        default=0.0,
        metavar="S",
        help="routing skew: expert e gets picks in proportion to (e+1)^-S (0, the default: uniform); "
        "the hot experts (-O accel_experts=N) are the most picked",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_options_flag(p)


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    sizes = {}
    for flag, text in (("accel", args.accel_memory), ("host", args.host_memory)):
        if text is not None:
            try:
                sizes[flag] = parse_size(text)
            except ValueError as e:
                raise ConfigError(f"plan: --{flag}-memory: {e}") from None
    if args.batch < 1 or args.prompt_len < 1:
        raise ConfigError("plan: --batch and --prompt-len must be 1 or more")
    if args.zipf < 0:
        raise ConfigError(f"plan: --zipf must be 0 (uniform routing) or more, got {args.zipf}")
    return plan.run(
        args.model,
        profile=args.profile,
        accel_memory=sizes.get("accel"),
        host_memory=sizes.get("host"),
        host_dtype=args.host_dtype,
        batch=args.batch,
        prompt_len=args.prompt_len,
        options=_options(parser, args.option),
        zipf=args.zipf,
        as_json=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.model, args.dtype, args.steps, args.dump_dir, _options(parser, args.option))
        if args.command == "explain":
            return _explain(parser, args)
        if args.command == "passes":
            return _passes(parser, args, argv)
        if args.command == "viz":
            if args.depth is not None and args.depth < 0:
                parser.error("viz: --depth must be 0 or more")
            return viz.run(args.target, args.out, args.depth, _options(parser, args.option))
        if args.command == "diff":
            return diff.run(args.a, args.b, args.context, args.max_lines or None)
        if args.command == "generate":
            return generate.run(_generate_request(parser, args), machine.rss_bytes)
        if args.command == "calibrate":
            return _calibrate(parser, args)
        if args.command == "plan":
            return _plan(parser, args)
        if args.command == "bench":
            if args.memory and args.name != "moe":
                raise ConfigError(
                    f"--memory is a mode of `hetero bench moe`, not of `hetero bench {args.name}`"
                )
            if args.memory:
                return report(bench_memory.run, bench_memory.table, args.json)
            if args.name == "e2e":
                return _bench_e2e(args)
            for flag, given in (("--peers", args.peers), ("--layers", args.layers is not None)):
                if given:
                    raise ConfigError(
                        f"{flag} is a flag of `hetero bench e2e`, not of `hetero bench {args.name}`"
                    )
            return BENCHES[args.name](as_json=args.json)
    except (ConfigError, TargetError, CheckpointError) as e:  # what was asked for cannot be had: usage error
        print(f"hetero: error: {e}", file=sys.stderr)
        return 2
    except HeteroError as e:
        print(f"hetero: error: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return 2


def _generate_request(parser: argparse.ArgumentParser, args: argparse.Namespace) -> generate.Request:
    if args.max_new_tokens < 1:
        parser.error("generate: --max-new-tokens must be 1 or more")
    if args.batch < 1:
        parser.error("generate: --batch must be 1 or more")
    if args.temperature < 0:
        parser.error("generate: --temperature must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        parser.error("generate: --top-p must be in (0, 1]")
    ids = None
    if args.ids is not None:
        try:
            ids = generate.parse_ids(args.ids)
        except ValueError:
            parser.error(f"generate: --ids wants token ids like 1,2,3 (or 1,2;3,4); got {args.ids!r}")
    return generate.Request(
        target=args.target,
        prompt=args.prompt,
        ids=ids,
        batch=len(ids) if ids and len(ids) > 1 and args.batch == 1 else args.batch,
        max_new_tokens=args.max_new_tokens,
        sampling=generate.Sampling(args.temperature, args.top_p, args.seed),
        ignore_eos=args.ignore_eos,
        dtype=args.dtype,
        options=_options(parser, args.option),
    )


def _calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    measuring = [
        f for f, given in (("--out", args.out), ("--quick", args.quick), ("--threads", args.threads)) if given
    ]
    if (args.show is not None or args.list_presets) and measuring:
        parser.error(f"calibrate: {measuring[0]} measures; --show and --list-presets do not")
    if args.threads is not None and args.threads < 1:
        parser.error("calibrate: --threads must be 1 or more")
    if args.list_presets:
        return calibrate.list_presets()
    if args.show is not None:
        return calibrate.show(args.show, args.json)
    return calibrate.run(
        lambda: bench_calibrate.calibrate(args.quick, args.threads), args.out, args.json, args.quick
    )


def _bench_e2e(args: argparse.Namespace) -> int:
    layers = bench_e2e.LAYERS if args.layers is None else args.layers
    if layers < 1:
        raise ConfigError(f"--layers must be 1 or more, got {layers}")
    return bench_e2e.main(as_json=args.json, layers=layers, peers=args.peers)


def _options(parser: argparse.ArgumentParser, pairs: list[tuple[str, Any]], **more: Any) -> dict[str, Any]:
    """-O options plus the command's own; a bad one is a usage error (exit code 2)."""
    options = {**dict(pairs), **{k: v for k, v in more.items() if v is not None}}
    try:
        HeteroConfig.build(options)
    except ConfigError as e:
        parser.error(str(e))
    return options


def _passes(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    flags = [
        args.print_before,
        args.print_after,
        args.print_after_all,
        args.print_after_change,
        args.stop_after,
        args.disable_pass,
        args.bisect_limit is not None,
        args.bisect,
        args.add_pass,
        args.verify_each,
        args.pass_timing,
        args.dump_dir,
        args.check,
        args.option,
    ]
    if args.target is None:
        if any(flags):
            parser.error("passes: these flags need a TARGET (zoo:NAME or path/to/file.py:factory)")
        print(passes.list_passes(), end="")
        return 0
    if args.bisect and (args.bisect_limit is not None or args.stop_after):
        parser.error("passes: --bisect finds the limit itself; leave out --bisect-limit and --stop-after")
    print_after = (
        _split(args.print_after) + ["all"] * args.print_after_all + ["changed"] * args.print_after_change
    )
    extra = []
    for text in args.add_pass:
        after, sep, spec = text.partition("=")
        if not sep:
            parser.error(
                f"passes: --add-pass wants AFTER=SPEC, e.g. lower_host=my_passes.py:my_pass; got {text!r}"
            )
        extra.append({"after": after, "pass": spec})
    options = _options(
        parser,
        args.option,
        print_before=_split(args.print_before) or None,
        print_after=print_after or None,
        stop_after=args.stop_after,
        disable_pass=[n for text in args.disable_pass for n in _split(text)] or None,
        bisect_limit=args.bisect_limit,
        extra_passes=extra or None,
        verify_each=args.verify_each or None,
        dump_dir=args.dump_dir,
    )
    return passes.run(
        args.target, options, check=args.check, pass_timing=args.pass_timing, bisect=args.bisect, command=argv
    )


def _split(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _explain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(f"zoo:{name}" for name in zoo.names()))
        print("\n".join(f"arch:{name}" for name in architectures.names()))
        return 0
    if args.architectures:
        print(architectures_table(_options(parser, args.option), as_json=args.json), end="")
        return 0
    if not args.target:
        parser.error("explain needs a TARGET (zoo:NAME or path/to/file.py:factory); see --list")
    options = _options(parser, args.option)
    model, inputs = load_target(args.target)
    report = explain(model, *inputs, **options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
