"""The `hetero` command.

    hetero demo                         the main job on zoo:deepseek-v3-tiny
    hetero explain TARGET [--json]      what runs where, and why
    hetero explain --list               the built-in zoo models
    hetero bench moe [--json]           one MoE layer: hetero vs eager, Inductor and the floor
    hetero bench engram|mla [--json]    the Engram block; the MLA prologue (GPU)
    hetero bench pipeline [--json]      pipelined stream schedule vs sequential, and its simulation

Exit codes: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hetero.compiler.errors import HeteroError

EXAMPLES = """examples:
  hetero demo
  hetero demo --dtype bf16 -O place='[{"match": "experts", "role": "accel"}]'
  hetero explain zoo:deepseek-v3-tiny
  hetero explain zoo:qwen3-moe-tiny --json -O accel_memory_budget=200KiB
  hetero explain path/to/model.py:make     # make() returns (model, example_inputs)
  hetero bench moe --json
"""


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
        name, help=help_text, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
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
        epilog=EXAMPLES,
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

    explain = _command(sub, "explain", "compile TARGET and report placement, partitions and transfers")
    explain.add_argument("target", nargs="?", help="zoo:NAME or path/to/file.py:factory")
    explain.add_argument(
        "--json", action="store_true", help="print the report as JSON (the summary.json dict)"
    )
    explain.add_argument("--list", action="store_true", help="list the zoo models and exit")
    _add_options_flag(explain)
    bench = _command(sub, "bench", "benchmarks: ratios measured side by side in one run")
    bench.add_argument(
        "name",
        choices=["moe", "engram", "mla", "pipeline"],
        help="moe: one MoE layer on the host; engram: the Engram block and the prefetch overlap; "
        "mla: the fused MLA prologue on the GPU; pipeline: the stream schedule against the sequential one",
    )
    bench.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from hetero.demo import run_demo

            return run_demo(args.model, args.dtype, args.steps, args.dump_dir, dict(args.option))
        if args.command == "explain":
            return _explain(parser, args)
        if args.command == "bench":
            import importlib

            return importlib.import_module(f"hetero.bench.{args.name}").main(as_json=args.json)
    except HeteroError as e:
        print(f"hetero: error: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return 2


def _explain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.list:
        from hetero import zoo

        print("\n".join(f"zoo:{name}" for name in zoo.names()))
        return 0
    if not args.target:
        parser.error("explain needs a TARGET (zoo:NAME or path/to/file.py:factory); see --list")
    import hetero
    from hetero.targets import load_target

    model, inputs = load_target(args.target)
    report = hetero.explain(model, *inputs, **dict(args.option))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
