"""Benchmarks: `hetero bench NAME [--json]`. Each reports ratios measured side by side in one run."""
