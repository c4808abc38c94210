// torch.ops.hetero_native.*: argument checks, scratch buffers and threads around kernels.cpp.
//
// Every check that protects a kernel from reading past a buffer or mixing up a layout is a
// TORCH_CHECK here, so a wrong call is an error and never a wrong result.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "at::parallel_for is OpenMP code in torch's headers: build with -fopenmp, or it runs on one thread"
#endif

namespace hetero_native {
namespace {

// Tiles per task: enough work per thread that scheduling costs nothing next to reading the weights.
constexpr int64_t kGrainTiles = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_supported() {
  TORCH_CHECK(cpu_supported(), "hetero_native: this CPU lacks AVX-512 VNNI (avx512f/bw/vl/dq/vnni)");
}

// The activations quantised per block of 32, [block][row] (kernels.h).
struct Activations {
  at::Tensor xq, dx, xc;
};

Activations quantize(const at::Tensor& x, int64_t nb, int32_t offset) {
  const int64_t M = x.size(0);
  Activations a{at::empty({nb, M, kBlock}, x.options().dtype(at::kChar)),
                at::empty({nb, M}, x.options().dtype(at::kFloat)), at::empty({nb, M}, x.options().dtype(at::kInt))};
  quantize_activations(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, x.size(1),
                       x.stride(0), offset, a.xq.data_ptr<int8_t>(), a.dx.data_ptr<float>(),
                       a.xc.data_ptr<int32_t>(), nb);
  return a;
}

at::Tensor check_x(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, ": x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.size(1) == k, op, ": x has K = ", x.size(1), " but the weight was packed for K = ", k);
  return x.stride(1) == 1 ? x : x.contiguous();
}

void check_packed(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == sizes && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous CPU ", dtype, " tensor of shape ", sizes, ", got ", t.scalar_type(), " ",
              t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

at::Tensor check_w(const at::Tensor& w_in, const char* op) {
  TORCH_CHECK(w_in.dim() == 2, op, ": weight must be 2-D [N, K], got ", w_in.sizes());
  TORCH_CHECK(w_in.device().is_cpu(), op, ": weight must be on the CPU, got ", w_in.device());
  const at::Tensor w = w_in.scalar_type() == at::kBFloat16 ? w_in : w_in.to(at::kFloat);
  return w.contiguous();
}

const void* w_data(const at::Tensor& w) {
  return w.scalar_type() == at::kBFloat16 ? static_cast<const void*>(w.data_ptr<at::BFloat16>())
                                          : static_cast<const void*>(w.data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor> pack_int8(const at::Tensor& w_in) {
  check_supported();
  const at::Tensor w = check_w(w_in, "hetero_native::pack_int8");
  const int64_t N = w.size(0), K = w.size(1), tiles = ceil_div(N, kTile), nb = ceil_div(K, kBlock);
  at::Tensor qweight = at::empty({tiles, nb, kInt8BlockBytes}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({tiles * kTile}, w.options().dtype(at::kFloat));
  std::atomic<bool> ok{true};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    if (!pack_int8_tiles(w_data(w), w.scalar_type() == at::kBFloat16, N, K, nb, t0, t1,
                         qweight.data_ptr<uint8_t>(), scales.data_ptr<float>()))
      ok = false;
  });
  TORCH_CHECK(ok.load(), "hetero_native::pack_int8: the weight has a NaN or an infinity");
  return {qweight, scales};
}

std::tuple<at::Tensor, at::Tensor> pack_int4(const at::Tensor& w_in, int64_t group_size) {
  check_supported();
  const at::Tensor w = check_w(w_in, "hetero_native::pack_int4");
  const int64_t N = w.size(0), K = w.size(1), tiles = ceil_div(N, kTile);
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && K % group_size == 0,
              "hetero_native::pack_int4: group_size ", group_size, " must be a multiple of ", kBlock,
              " that divides K = ", K);
  at::Tensor qweight = at::empty({tiles, K / kBlock, kInt4BlockBytes}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({tiles, K / group_size, kTile}, w.options().dtype(at::kHalf));
  std::atomic<bool> ok{true};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    if (!pack_int4_tiles(w_data(w), w.scalar_type() == at::kBFloat16, N, K, group_size, t0, t1,
                         qweight.data_ptr<uint8_t>(), reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>())))
      ok = false;
  });
  TORCH_CHECK(ok.load(), "hetero_native::pack_int4: the weight has a NaN or an infinity, or a group's scale "
              "does not fit float16");
  return {qweight, scales};
}

// Output channels per task of the bf16 kernel: 64 channels of K = 2048 are 256 KB of weights.
constexpr int64_t kGrainChannels = 64;

// Several weights, each against its own rows of x (counts[i] rows each, in order): a MoE layer's experts
// in one call, so that one parallel pass reads all their weights (per-expert calls each start and join
// the threads over a few MB). Tasks are 64-channel slices of all the weights together. One weight with
// all of x's rows is linear_bf16.
at::Tensor bf16_grouped(const char* op, const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef counts) {
  TORCH_CHECK(bf16_supported(), op, ": this CPU lacks AVX-512 BF16 (avx512_bf16)");
  TORCH_CHECK(weights.size() == counts.size() && !weights.empty(), op, ": one count per weight (",
              weights.size(), " weights, ", counts.size(), " counts)");
  TORCH_CHECK(weights[0].dim() == 2, op, ": weight must be 2-D [N, K], got ", weights[0].sizes());
  const int64_t n = weights[0].size(0), k = weights[0].size(1);
  int64_t rows = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.device().is_cpu() && w.size(0) == n &&
                    w.size(1) == k,
                op, ": weight ", i, " must be a bfloat16 CPU tensor [", n, ", ", k, "], got ", w.scalar_type(),
                " ", w.sizes());
    TORCH_CHECK(w.stride(1) == 1 && w.stride(0) >= k, op, ": weight ", i, " rows must be contiguous (strides ",
                w.strides(), ")");
    TORCH_CHECK(counts[i] >= 0, op, ": negative count");
    rows += counts[i];
  }
  const at::Tensor x = check_x(x_in, k, op);
  TORCH_CHECK(x.size(0) == rows, op, ": x has ", x.size(0), " rows, the counts add up to ", rows);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  std::vector<int64_t> first_row(weights.size());
  for (size_t i = 0, r = 0; i < weights.size(); r += counts[i], ++i) first_row[i] = r;
  const int64_t slices = ceil_div(n, kGrainChannels), groups = int64_t(weights.size());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* op_out = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, groups * slices, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / slices, n0 = (t % slices) * kGrainChannels, n1 = std::min(n, n0 + kGrainChannels);
      if (counts[g] == 0) continue;
      const at::Tensor& w = weights[g];
      linear_bf16_channels(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.stride(0), n0, n1,
                           xp + first_row[g] * x.stride(0), counts[g], k, x.stride(0), op_out + first_row[g] * n,
                           n);
    }
  });
  return out;
}

// x's rows, or 0 where x is not 2-D (check_x then says so).
int64_t rows_of(const at::Tensor& x) { return x.dim() == 2 ? x.size(0) : 0; }

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight) {
  return bf16_grouped("hetero_native::linear_bf16", x, {weight}, {rows_of(x)});
}

at::Tensor linear_bf16_grouped(const at::Tensor& x, at::TensorList weights, at::IntArrayRef counts) {
  return bf16_grouped("hetero_native::linear_bf16_grouped", x, weights, counts);
}

// Weight-only int8 / int4 over several weights of one shape, each against its own rows of x (counts[i]
// rows, in order): a MoE layer's experts in one call, as linear_bf16_grouped. Each group's rows are
// quantised on their own (as a call per weight would), then one parallel pass runs every group's tiles.
// One weight with all of x's rows is linear_int8 / linear_int4.
template <typename Tiles>
at::Tensor linear_quant_grouped(const char* op, const at::Tensor& x_in, at::TensorList qweights,
                                at::TensorList scales, at::IntArrayRef counts, int64_t n, int64_t k, int32_t offset,
                                at::ScalarType scale_type, at::IntArrayRef qweight_shape,
                                at::IntArrayRef scale_shape, int64_t nb, const Tiles& tiles_fn) {
  check_supported();
  TORCH_CHECK(qweights.size() == counts.size() && scales.size() == counts.size() && !counts.empty(), op,
              ": one qweight, one scales and one count per group (", qweights.size(), ", ", scales.size(), ", ",
              counts.size(), ")");
  int64_t rows = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    check_packed(qweights[i], at::kByte, qweight_shape, (std::string(op) + ": qweight").c_str());
    check_packed(scales[i], scale_type, scale_shape, (std::string(op) + ": scales").c_str());
    TORCH_CHECK(counts[i] >= 0, op, ": negative count");
    rows += counts[i];
  }
  const at::Tensor x = check_x(x_in, k, op);
  TORCH_CHECK(x.size(0) == rows, op, ": x has ", x.size(0), " rows, the counts add up to ", rows);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return out;
  const int64_t groups = int64_t(counts.size()), tiles = ceil_div(n, kTile), chunks = ceil_div(tiles, kGrainTiles);
  std::vector<Activations> acts(groups);
  std::vector<int64_t> first_row(groups);
  for (int64_t g = 0, r = 0; g < groups; r += counts[g], ++g) {
    first_row[g] = r;
    if (counts[g] > 0) acts[g] = quantize(x.narrow(0, r, counts[g]), nb, offset);
  }
  auto* op_out = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, groups * chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c / chunks, t0 = (c % chunks) * kGrainTiles, t1 = std::min(tiles, t0 + kGrainTiles);
      if (counts[g] == 0) continue;
      const Activations& a = acts[g];
      tiles_fn(qweights[g], scales[g], t0, t1, a, counts[g], op_out + first_row[g] * n);
    }
  });
  return out;
}

at::Tensor int8_grouped(const char* op, const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                        at::IntArrayRef counts, int64_t n, int64_t k) {
  const int64_t tiles = ceil_div(n, kTile), nb = ceil_div(k, kBlock);
  return linear_quant_grouped(
      op, x, qweights, scales, counts, n, k, 128, at::kFloat,
      {tiles, nb, kInt8BlockBytes}, {tiles * kTile}, nb,
      [&](const at::Tensor& q, const at::Tensor& sc, int64_t t0, int64_t t1, const Activations& a, int64_t M,
          uint16_t* out) {
        linear_int8_tiles(q.data_ptr<uint8_t>(), sc.data_ptr<float>(), nb, t0, t1, a.xq.data_ptr<int8_t>(),
                          a.dx.data_ptr<float>(), a.xc.data_ptr<int32_t>(), M, out, n, n);
      });
}

at::Tensor int4_grouped(const char* op, const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                        at::IntArrayRef counts, int64_t n, int64_t k, int64_t group_size) {
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && k % group_size == 0, op, ": group_size ", group_size,
              " must be a multiple of ", kBlock, " that divides K = ", k);
  const int64_t tiles = ceil_div(n, kTile), nb = k / kBlock;
  return linear_quant_grouped(
      op, x, qweights, scales, counts, n, k, 8, at::kHalf,
      {tiles, nb, kInt4BlockBytes}, {tiles, k / group_size, kTile}, nb,
      [&](const at::Tensor& q, const at::Tensor& sc, int64_t t0, int64_t t1, const Activations& a, int64_t M,
          uint16_t* out) {
        linear_int4_tiles(q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), nb,
                          group_size / kBlock, t0, t1, a.xq.data_ptr<int8_t>(), a.dx.data_ptr<float>(),
                          a.xc.data_ptr<int32_t>(), M, out, n, n);
      });
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t n,
                       int64_t k) {
  return int8_grouped("hetero_native::linear_int8", x, {qweight}, {scales}, {rows_of(x)}, n, k);
}

at::Tensor linear_int8_grouped(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                               at::IntArrayRef counts, int64_t n, int64_t k) {
  return int8_grouped("hetero_native::linear_int8_grouped", x, qweights, scales, counts, n, k);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t n,
                       int64_t k, int64_t group_size) {
  return int4_grouped("hetero_native::linear_int4", x, {qweight}, {scales}, {rows_of(x)}, n, k, group_size);
}

at::Tensor linear_int4_grouped(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                               at::IntArrayRef counts, int64_t n, int64_t k, int64_t group_size) {
  return int4_grouped("hetero_native::linear_int4_grouped", x, qweights, scales, counts, n, k, group_size);
}

}  // namespace
}  // namespace hetero_native

using namespace hetero_native;

TORCH_LIBRARY(hetero_native, m) {
  m.def("cpu_supported() -> bool", [] { return cpu_supported(); });
  m.def("bf16_supported() -> bool", [] { return bf16_supported(); });
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("linear_bf16_grouped(Tensor x, Tensor[] weights, int[] counts) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales, int n, int k) -> Tensor");
  m.def("linear_int8_grouped(Tensor x, Tensor[] qweights, Tensor[] scales, int[] counts, int n, int k) -> Tensor");
  m.def("linear_int4_grouped(Tensor x, Tensor[] qweights, Tensor[] scales, int[] counts, int n, int k, "
        "int group_size) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scales, int n, int k, int group_size) -> Tensor");
  m.def("pack_int8(Tensor weight) -> (Tensor, Tensor)");
  m.def("pack_int4(Tensor weight, int group_size) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hetero_native, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_bf16_grouped", &linear_bf16_grouped);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int8_grouped", &linear_int8_grouped);
  m.impl("linear_int4_grouped", &linear_int4_grouped);
  m.impl("linear_int4", &linear_int4);
  m.impl("pack_int8", &pack_int8);
  m.impl("pack_int4", &pack_int4);
}
