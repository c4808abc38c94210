"""batching: prove an inference graph separable along the batch, and rewrite it for one micro-batch.

Expects: a functional ATen inference graph (AOTAutograd) with a static batch, whose size B is baked
into `view`/`expand`/`new_empty`/... arguments (a dynamic KV-cache length may be a SymInt input);
placeholders carry `val` (FakeTensor or SymInt) and parameters `hetero.param`; MoE and router code
carries `hetero.region` (canonicalize). The batch is dim 0 of the first non-parameter tensor input.
Guarantees: `analyze` returns a BatchPlan only when each row of each batched output depends on the
same row of the batched inputs (and on the shared inputs) alone, else the reason, naming the node.
`split(gm, plan, n)` returns a copy computing one micro-batch of B/n rows: run on the n chunks of the
batched inputs (shared inputs whole), its batched outputs concatenate to gm's and its shared outputs
equal gm's. Only size arguments at a value's batch position change; `val` (and `tensor_meta`) are
recomputed for the new shapes, every other meta key is kept. Neither function changes gm.

How: each value's fact is the dim whose outermost factor is the batch (None: the same for every
micro-batch), propagated through the per-op rules of `RULES` (rules.py). Reading a batched value with
an op that has no rule, or a rule failing (a reduction, sort, cat, slice or index across rows of the batch, a
view that buries the batch inside a dim), rejects the graph; `assert all(x)` over the batch is kept,
as it holds iff it holds per micro-batch. MoE and router regions are token-wise as a whole: inside
them, sorting and permuting the tokens is allowed (positions become local to the micro-batch) and
counts over the tokens are "local" values that must not leave the region. Some values are choices,
revisited when a rule fails on them: non-parameter inputs with B rows (batched, else shared); uniform
values (zeros, full, new_empty, an expand of a shared value, `arange` in a region) that may hold the
batch in any dim of a multiple of B; and `arange(B)`, the rows' own numbers, which may only index the
batch rows. The rewrite divides the size argument at each value's batch position by n (a symbolic
one through a new `floordiv` node) and reruns FakeTensorProp on fakes of the micro-batch's inputs.

    before (B=4):  %view : f32[20,64] = aten.view(%x, [20, 64])              # x : f32[4,5,64]
                   %mm : f32[20,32] = aten.mm(%view, %t)
                   %out : f32[4,5,32] = aten._unsafe_view(%mm, [4, 5, 32])
    after (n=2):   %view : f32[10,64] = aten.view(%x, [10, 64])              # x : f32[2,5,64]
                   %mm : f32[10,32] = aten.mm(%view, %t)
                   %out : f32[2,5,32] = aten._unsafe_view(%mm, [2, 5, 32])

Modules, each importing only those after it here: rewrite (`split`); solve (`analyze`: propagation and
the search over choices); rules (the table); index_rules, view_rules (the rules); facts (BatchPlan, the
facts, the graph and its choices, what a rule sees); shapes (a node's arguments and sizes).
"""

from __future__ import annotations

from hetero.passes.batching.facts import BatchPlan
from hetero.passes.batching.rewrite import split
from hetero.passes.batching.solve import analyze

__all__ = ["BatchPlan", "analyze", "split"]
