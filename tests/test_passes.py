"""Pass tests: a tiny graph, the passes, the formatted graph against expected text.

Refresh the expected texts with EXPECTTEST_ACCEPT=1 and review the diff.
"""

from __future__ import annotations

import expecttest
import torch

from hetero.compiler import meta
from hetero.compiler.format import format_graph
from hetero.driver.capture import capture_graph
from tests.models import tiny_moe
from tests.passes_util import run_passes


def _captured() -> torch.fx.GraphModule:
    torch._dynamo.reset()
    model, inputs = tiny_moe()
    return capture_graph(model, *inputs)


class TestPasses(expecttest.TestCase):
    def test_canonicalize_tags_regions(self) -> None:
        gm, _ = run_passes(_captured(), ("canonicalize",))
        self.assertExpectedInline(
            format_graph(gm),
            """\
%arg0_1 : f32[16,8] = input param embed_tokens.weight
%arg1_1 : i64[4] = input
%arg2_1 : f32[8] = input param norm.weight
%arg3_1 : f32[8,8] = input param self_attn.proj.weight
%arg4_1 : f32[4,8] = input param mlp.gate.weight
%arg5_1 : f32[4,8,8] = input param mlp.experts.weight
%arg6_1 : f32[16,8] = input param lm_head.weight
%embedding : f32[4,8] = aten.embedding(%arg0_1, %arg1_1)  embedding:embed_tokens
%pow_1 : f32[4,8] = aten.pow.Tensor_Scalar(%embedding, 2)  norm:norm
%mean : f32[4,1] = aten.mean.dim(%pow_1, [-1], True)  norm:norm
%add : f32[4,1] = aten.add.Tensor(%mean, 1e-06)  norm:norm
%rsqrt : f32[4,1] = aten.rsqrt(%add)  norm:norm
%mul : f32[4,8] = aten.mul.Tensor(%embedding, %rsqrt)  norm:norm
%mul_1 : f32[4,8] = aten.mul.Tensor(%mul, %arg2_1)  norm:norm
%t : f32[8,8] = aten.t(%arg3_1)  attention:self_attn
%mm : f32[4,8] = aten.mm(%mul_1, %t)  attention:self_attn
%_softmax : f32[4,8] = aten._softmax(%mm, -1, False)  attention:self_attn
%add_1 : f32[4,8] = aten.add.Tensor(%embedding, %_softmax)
%t_1 : f32[8,4] = aten.t(%arg4_1)  router:mlp.gate
%mm_1 : f32[4,4] = aten.mm(%add_1, %t_1)  router:mlp.gate
%_softmax_1 : f32[4,4] = aten._softmax(%mm_1, -1, False)
%unsqueeze : f32[4,8,1] = aten.unsqueeze(%add_1, 2)  moe:mlp.experts
%unsqueeze_1 : f32[4,8,1,1] = aten.unsqueeze(%unsqueeze, 3)  moe:mlp.experts
%permute : f32[4,1,1,8] = aten.permute(%unsqueeze_1, [0, 2, 3, 1])  moe:mlp.experts
%unsqueeze_2 : f32[4,8,8,1] = aten.unsqueeze(%arg5_1, 3)  moe:mlp.experts
%permute_1 : f32[1,4,8,8] = aten.permute(%unsqueeze_2, [3, 0, 2, 1])  moe:mlp.experts
%permute_2 : f32[4,8,1,1] = aten.permute(%permute, [0, 3, 1, 2])  moe:mlp.experts
%view : f32[1,4,8] = aten.view(%permute_2, [1, 4, 8])  moe:mlp.experts
%permute_3 : f32[8,4,8,1] = aten.permute(%permute_1, [3, 1, 2, 0])  moe:mlp.experts
%clone : f32[8,4,8,1] = aten.clone(%permute_3, memory_format=contiguous_format)  moe:mlp.experts
%_unsafe_view : f32[1,8,32] = aten._unsafe_view(%clone, [1, 8, 32])  moe:mlp.experts
%bmm : f32[1,4,32] = aten.bmm(%view, %_unsafe_view)  moe:mlp.experts
%view_1 : f32[4,1,4,8] = aten.view(%bmm, [4, 1, 4, 8])  moe:mlp.experts
%permute_4 : f32[4,4,8,1] = aten.permute(%view_1, [0, 2, 3, 1])  moe:mlp.experts
%view_2 : f32[4,4,8] = aten.view(%permute_4, [4, 4, 8])  moe:mlp.experts
%unsqueeze_3 : f32[4,4,1] = aten.unsqueeze(%_softmax_1, -1)  moe:mlp.experts
%mul_2 : f32[4,4,8] = aten.mul.Tensor(%view_2, %unsqueeze_3)  moe:mlp.experts
%sum_1 : f32[4,8] = aten.sum.dim_IntList(%mul_2, [1])  moe:mlp.experts
%add_2 : f32[4,8] = aten.add.Tensor(%add_1, %sum_1)
%t_2 : f32[8,16] = aten.t(%arg6_1)  head:lm_head
%mm_2 : f32[4,16] = aten.mm(%add_2, %t_2)  head:lm_head
return (%mm_2,)
""",
        )

    def test_place_puts_experts_on_host(self) -> None:
        gm, _ = run_passes(_captured(), ("canonicalize", "analyze_cost", "place"))
        self.assertExpectedInline(
            format_graph(gm),
            """\
%arg0_1 : f32[16,8] = input param embed_tokens.weight
%arg1_1 : i64[4] = input
%arg2_1 : f32[8] = input param norm.weight
%arg3_1 : f32[8,8] = input param self_attn.proj.weight
%arg4_1 : f32[4,8] = input param mlp.gate.weight
%arg5_1 : f32[4,8,8] = input param mlp.experts.weight
%arg6_1 : f32[16,8] = input param lm_head.weight
%embedding : f32[4,8] = aten.embedding(%arg0_1, %arg1_1)  @accel  embedding:embed_tokens
%pow_1 : f32[4,8] = aten.pow.Tensor_Scalar(%embedding, 2)  @accel  norm:norm
%mean : f32[4,1] = aten.mean.dim(%pow_1, [-1], True)  @accel  norm:norm
%add : f32[4,1] = aten.add.Tensor(%mean, 1e-06)  @accel  norm:norm
%rsqrt : f32[4,1] = aten.rsqrt(%add)  @accel  norm:norm
%mul : f32[4,8] = aten.mul.Tensor(%embedding, %rsqrt)  @accel  norm:norm
%mul_1 : f32[4,8] = aten.mul.Tensor(%mul, %arg2_1)  @accel  norm:norm
%t : f32[8,8] = aten.t(%arg3_1)  @accel  attention:self_attn
%mm : f32[4,8] = aten.mm(%mul_1, %t)  @accel  attention:self_attn
%_softmax : f32[4,8] = aten._softmax(%mm, -1, False)  @accel  attention:self_attn
%add_1 : f32[4,8] = aten.add.Tensor(%embedding, %_softmax)  @accel
%t_1 : f32[8,4] = aten.t(%arg4_1)  @accel  router:mlp.gate
%mm_1 : f32[4,4] = aten.mm(%add_1, %t_1)  @accel  router:mlp.gate
%_softmax_1 : f32[4,4] = aten._softmax(%mm_1, -1, False)  @accel
%unsqueeze : f32[4,8,1] = aten.unsqueeze(%add_1, 2)  @host  moe:mlp.experts
%unsqueeze_1 : f32[4,8,1,1] = aten.unsqueeze(%unsqueeze, 3)  @host  moe:mlp.experts
%permute : f32[4,1,1,8] = aten.permute(%unsqueeze_1, [0, 2, 3, 1])  @host  moe:mlp.experts
%unsqueeze_2 : f32[4,8,8,1] = aten.unsqueeze(%arg5_1, 3)  @host  moe:mlp.experts
%permute_1 : f32[1,4,8,8] = aten.permute(%unsqueeze_2, [3, 0, 2, 1])  @host  moe:mlp.experts
%permute_2 : f32[4,8,1,1] = aten.permute(%permute, [0, 3, 1, 2])  @host  moe:mlp.experts
%view : f32[1,4,8] = aten.view(%permute_2, [1, 4, 8])  @host  moe:mlp.experts
%permute_3 : f32[8,4,8,1] = aten.permute(%permute_1, [3, 1, 2, 0])  @host  moe:mlp.experts
%clone : f32[8,4,8,1] = aten.clone(%permute_3, memory_format=contiguous_format)  @host  moe:mlp.experts
%_unsafe_view : f32[1,8,32] = aten._unsafe_view(%clone, [1, 8, 32])  @host  moe:mlp.experts
%bmm : f32[1,4,32] = aten.bmm(%view, %_unsafe_view)  @host  moe:mlp.experts
%view_1 : f32[4,1,4,8] = aten.view(%bmm, [4, 1, 4, 8])  @host  moe:mlp.experts
%permute_4 : f32[4,4,8,1] = aten.permute(%view_1, [0, 2, 3, 1])  @host  moe:mlp.experts
%view_2 : f32[4,4,8] = aten.view(%permute_4, [4, 4, 8])  @host  moe:mlp.experts
%unsqueeze_3 : f32[4,4,1] = aten.unsqueeze(%_softmax_1, -1)  @host  moe:mlp.experts
%mul_2 : f32[4,4,8] = aten.mul.Tensor(%view_2, %unsqueeze_3)  @host  moe:mlp.experts
%sum_1 : f32[4,8] = aten.sum.dim_IntList(%mul_2, [1])  @host  moe:mlp.experts
%add_2 : f32[4,8] = aten.add.Tensor(%add_1, %sum_1)  @accel
%t_2 : f32[8,16] = aten.t(%arg6_1)  @accel  head:lm_head
%mm_2 : f32[4,16] = aten.mm(%add_2, %t_2)  @accel  head:lm_head
return (%mm_2,)
""",
        )

    def test_partition_splits_by_role_with_transfers(self) -> None:
        gm, _ = run_passes(_captured(), ("canonicalize", "analyze_cost", "place", "partition"))
        self.assertExpectedInline(
            format_graph(gm),
            """\
%arg0_1 : f32[16,8] = input param embed_tokens.weight
%arg1_1 : i64[4] = input
%arg2_1 : f32[8] = input param norm.weight
%arg3_1 : f32[8,8] = input param self_attn.proj.weight
%arg4_1 : f32[4,8] = input param mlp.gate.weight
%arg5_1 : f32[4,8,8] = input param mlp.experts.weight
%arg6_1 : f32[16,8] = input param lm_head.weight
%part_0 : (f32[4,8], f32[4,4]) = partition 0 @accel cpu (%arg0_1, %arg1_1, %arg2_1, %arg3_1, %arg4_1) {
    %arg0_1 : f32[16,8] = input param embed_tokens.weight
    %arg1_1 : i64[4] = input
    %arg2_1 : f32[8] = input param norm.weight
    %arg3_1 : f32[8,8] = input param self_attn.proj.weight
    %arg4_1 : f32[4,8] = input param mlp.gate.weight
    %embedding : f32[4,8] = aten.embedding(%arg0_1, %arg1_1)  @accel  embedding:embed_tokens
    %pow_1 : f32[4,8] = aten.pow.Tensor_Scalar(%embedding, 2)  @accel  norm:norm
    %mean : f32[4,1] = aten.mean.dim(%pow_1, [-1], True)  @accel  norm:norm
    %add : f32[4,1] = aten.add.Tensor(%mean, 1e-06)  @accel  norm:norm
    %rsqrt : f32[4,1] = aten.rsqrt(%add)  @accel  norm:norm
    %mul : f32[4,8] = aten.mul.Tensor(%embedding, %rsqrt)  @accel  norm:norm
    %mul_1 : f32[4,8] = aten.mul.Tensor(%mul, %arg2_1)  @accel  norm:norm
    %t : f32[8,8] = aten.t(%arg3_1)  @accel  attention:self_attn
    %mm : f32[4,8] = aten.mm(%mul_1, %t)  @accel  attention:self_attn
    %_softmax : f32[4,8] = aten._softmax(%mm, -1, False)  @accel  attention:self_attn
    %add_1 : f32[4,8] = aten.add.Tensor(%embedding, %_softmax)  @accel
    %t_1 : f32[8,4] = aten.t(%arg4_1)  @accel  router:mlp.gate
    %mm_1 : f32[4,4] = aten.mm(%add_1, %t_1)  @accel  router:mlp.gate
    %_softmax_1 : f32[4,4] = aten._softmax(%mm_1, -1, False)  @accel
    return (%add_1, %_softmax_1)
}
%add_1 : f32[4,8] = getitem(%part_0, 0)
%_softmax_1 : f32[4,4] = getitem(%part_0, 1)
%add_1_to_host : f32[4,8] = transfer(%add_1, 'cpu')  # activation accel->host 128 B
%_softmax_1_to_host : f32[4,4] = transfer(%_softmax_1, 'cpu')  # activation accel->host 64 B
%part_1 : (f32[4,8]) = partition 1 @host cpu (%add_1_to_host, %arg5_1, %_softmax_1_to_host) {
    %add_1 : f32[4,8] = input
    %arg5_1 : f32[4,8,8] = input param mlp.experts.weight
    %_softmax_1 : f32[4,4] = input
    %unsqueeze : f32[4,8,1] = aten.unsqueeze(%add_1, 2)  @host  moe:mlp.experts
    %unsqueeze_1 : f32[4,8,1,1] = aten.unsqueeze(%unsqueeze, 3)  @host  moe:mlp.experts
    %permute : f32[4,1,1,8] = aten.permute(%unsqueeze_1, [0, 2, 3, 1])  @host  moe:mlp.experts
    %unsqueeze_2 : f32[4,8,8,1] = aten.unsqueeze(%arg5_1, 3)  @host  moe:mlp.experts
    %permute_1 : f32[1,4,8,8] = aten.permute(%unsqueeze_2, [3, 0, 2, 1])  @host  moe:mlp.experts
    %permute_2 : f32[4,8,1,1] = aten.permute(%permute, [0, 3, 1, 2])  @host  moe:mlp.experts
    %view : f32[1,4,8] = aten.view(%permute_2, [1, 4, 8])  @host  moe:mlp.experts
    %permute_3 : f32[8,4,8,1] = aten.permute(%permute_1, [3, 1, 2, 0])  @host  moe:mlp.experts
    %clone : f32[8,4,8,1] = aten.clone(%permute_3, memory_format=contiguous_format)  @host  moe:mlp.experts
    %_unsafe_view : f32[1,8,32] = aten._unsafe_view(%clone, [1, 8, 32])  @host  moe:mlp.experts
    %bmm : f32[1,4,32] = aten.bmm(%view, %_unsafe_view)  @host  moe:mlp.experts
    %view_1 : f32[4,1,4,8] = aten.view(%bmm, [4, 1, 4, 8])  @host  moe:mlp.experts
    %permute_4 : f32[4,4,8,1] = aten.permute(%view_1, [0, 2, 3, 1])  @host  moe:mlp.experts
    %view_2 : f32[4,4,8] = aten.view(%permute_4, [4, 4, 8])  @host  moe:mlp.experts
    %unsqueeze_3 : f32[4,4,1] = aten.unsqueeze(%_softmax_1, -1)  @host  moe:mlp.experts
    %mul_2 : f32[4,4,8] = aten.mul.Tensor(%view_2, %unsqueeze_3)  @host  moe:mlp.experts
    %sum_1 : f32[4,8] = aten.sum.dim_IntList(%mul_2, [1])  @host  moe:mlp.experts
    return (%sum_1,)
}
%sum_1 : f32[4,8] = getitem(%part_1, 0)
%sum_1_to_accel : f32[4,8] = transfer(%sum_1, 'cpu')  # activation host->accel 128 B
%part_2 : (f32[4,16]) = partition 2 @accel cpu (%add_1, %sum_1_to_accel, %arg6_1) {
    %add_1 : f32[4,8] = input
    %sum_1 : f32[4,8] = input
    %arg6_1 : f32[16,8] = input param lm_head.weight
    %add_2 : f32[4,8] = aten.add.Tensor(%add_1, %sum_1)  @accel
    %t_2 : f32[8,16] = aten.t(%arg6_1)  @accel  head:lm_head
    %mm_2 : f32[4,16] = aten.mm(%add_2, %t_2)  @accel  head:lm_head
    return (%mm_2,)
}
%mm_2 : f32[4,16] = getitem(%part_2, 0)
return (%mm_2,)
""",
        )

    def test_user_rule_keeps_experts_on_accel(self) -> None:
        gm, _ = run_passes(
            _captured(),
            ("canonicalize", "analyze_cost", "place", "partition"),
            place=[{"match": "experts", "role": "accel"}],
        )
        self.assertExpectedInline(
            format_graph(gm),
            """\
%arg0_1 : f32[16,8] = input param embed_tokens.weight
%arg1_1 : i64[4] = input
%arg2_1 : f32[8] = input param norm.weight
%arg3_1 : f32[8,8] = input param self_attn.proj.weight
%arg4_1 : f32[4,8] = input param mlp.gate.weight
%arg5_1 : f32[4,8,8] = input param mlp.experts.weight
%arg6_1 : f32[16,8] = input param lm_head.weight
%part_0 : (f32[4,16]) = partition 0 @accel cpu (%arg0_1, %arg1_1, %arg2_1, %arg3_1, %arg4_1, %arg5_1, %arg6_1) {
    %arg0_1 : f32[16,8] = input param embed_tokens.weight
    %arg1_1 : i64[4] = input
    %arg2_1 : f32[8] = input param norm.weight
    %arg3_1 : f32[8,8] = input param self_attn.proj.weight
    %arg4_1 : f32[4,8] = input param mlp.gate.weight
    %arg5_1 : f32[4,8,8] = input param mlp.experts.weight
    %arg6_1 : f32[16,8] = input param lm_head.weight
    %embedding : f32[4,8] = aten.embedding(%arg0_1, %arg1_1)  @accel  embedding:embed_tokens
    %pow_1 : f32[4,8] = aten.pow.Tensor_Scalar(%embedding, 2)  @accel  norm:norm
    %mean : f32[4,1] = aten.mean.dim(%pow_1, [-1], True)  @accel  norm:norm
    %add : f32[4,1] = aten.add.Tensor(%mean, 1e-06)  @accel  norm:norm
    %rsqrt : f32[4,1] = aten.rsqrt(%add)  @accel  norm:norm
    %mul : f32[4,8] = aten.mul.Tensor(%embedding, %rsqrt)  @accel  norm:norm
    %mul_1 : f32[4,8] = aten.mul.Tensor(%mul, %arg2_1)  @accel  norm:norm
    %t : f32[8,8] = aten.t(%arg3_1)  @accel  attention:self_attn
    %mm : f32[4,8] = aten.mm(%mul_1, %t)  @accel  attention:self_attn
    %_softmax : f32[4,8] = aten._softmax(%mm, -1, False)  @accel  attention:self_attn
    %add_1 : f32[4,8] = aten.add.Tensor(%embedding, %_softmax)  @accel
    %t_1 : f32[8,4] = aten.t(%arg4_1)  @accel  router:mlp.gate
    %mm_1 : f32[4,4] = aten.mm(%add_1, %t_1)  @accel  router:mlp.gate
    %_softmax_1 : f32[4,4] = aten._softmax(%mm_1, -1, False)  @accel
    %unsqueeze : f32[4,8,1] = aten.unsqueeze(%add_1, 2)  @accel  moe:mlp.experts
    %unsqueeze_1 : f32[4,8,1,1] = aten.unsqueeze(%unsqueeze, 3)  @accel  moe:mlp.experts
    %permute : f32[4,1,1,8] = aten.permute(%unsqueeze_1, [0, 2, 3, 1])  @accel  moe:mlp.experts
    %unsqueeze_2 : f32[4,8,8,1] = aten.unsqueeze(%arg5_1, 3)  @accel  moe:mlp.experts
    %permute_1 : f32[1,4,8,8] = aten.permute(%unsqueeze_2, [3, 0, 2, 1])  @accel  moe:mlp.experts
    %permute_2 : f32[4,8,1,1] = aten.permute(%permute, [0, 3, 1, 2])  @accel  moe:mlp.experts
    %view : f32[1,4,8] = aten.view(%permute_2, [1, 4, 8])  @accel  moe:mlp.experts
    %permute_3 : f32[8,4,8,1] = aten.permute(%permute_1, [3, 1, 2, 0])  @accel  moe:mlp.experts
    %clone : f32[8,4,8,1] = aten.clone(%permute_3, memory_format=contiguous_format)  @accel  moe:mlp.experts
    %_unsafe_view : f32[1,8,32] = aten._unsafe_view(%clone, [1, 8, 32])  @accel  moe:mlp.experts
    %bmm : f32[1,4,32] = aten.bmm(%view, %_unsafe_view)  @accel  moe:mlp.experts
    %view_1 : f32[4,1,4,8] = aten.view(%bmm, [4, 1, 4, 8])  @accel  moe:mlp.experts
    %permute_4 : f32[4,4,8,1] = aten.permute(%view_1, [0, 2, 3, 1])  @accel  moe:mlp.experts
    %view_2 : f32[4,4,8] = aten.view(%permute_4, [4, 4, 8])  @accel  moe:mlp.experts
    %unsqueeze_3 : f32[4,4,1] = aten.unsqueeze(%_softmax_1, -1)  @accel  moe:mlp.experts
    %mul_2 : f32[4,4,8] = aten.mul.Tensor(%view_2, %unsqueeze_3)  @accel  moe:mlp.experts
    %sum_1 : f32[4,8] = aten.sum.dim_IntList(%mul_2, [1])  @accel  moe:mlp.experts
    %add_2 : f32[4,8] = aten.add.Tensor(%add_1, %sum_1)  @accel
    %t_2 : f32[8,16] = aten.t(%arg6_1)  @accel  head:lm_head
    %mm_2 : f32[4,16] = aten.mm(%add_2, %t_2)  @accel  head:lm_head
    return (%mm_2,)
}
%mm_2 : f32[4,16] = getitem(%part_0, 0)
return (%mm_2,)
""",
        )

    def test_cost_of_a_matmul_counts_its_weight(self) -> None:
        gm, _ = run_passes(_captured(), ("canonicalize", "analyze_cost"))
        mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
        head = next(n for n in mms if meta.region(n) and meta.region(n).kind == "head")
        cost = meta.cost(head)
        assert cost.flops == 2 * 4 * 8 * 16  # [4,8] @ [8,16]
        assert cost.param_bytes == 16 * 8 * 4  # lm_head.weight, f32, read through aten.t
        assert cost.bytes == (4 * 8 + 8 * 16 + 4 * 16) * 4
