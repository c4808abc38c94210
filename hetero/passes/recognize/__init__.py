"""Recognisers: what a subgraph computes, found by structure and confirmed by numerics where structure
is ambiguous. Library code for the passes (canonicalize, place, partition, fuse_accel, ...); none of
these modules is a pass, and none imports one.

- regions: the model region (attention, moe, router, ...) a node ran in, from its module stack
- params: the parameters a node reads, through views
- moe, moe_recipes: a MoE layer's routed experts, and how to read their weights
- engram: Engram memory lookups and their blocks
- rope, mla: RoPE, RMSNorm and DeepSeek's MLA prologue (nodes: the queries they share)
"""
