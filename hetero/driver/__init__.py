"""The driver: the `torch.compile` entry (backend.py), what runs around the pass pipeline (capture,
binding kernels, compiling partitions, the executor, reports and dumps), `hetero.explain`, and the
check for experts a graph break left unlowered. It uses every layer below it: passes, backends,
runtime, compiler."""
