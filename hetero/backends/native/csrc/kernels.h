// hetero_native: weight-only int8 / int4 kernels for few rows (decode), AVX-512 VNNI, and a bf16 one
// (AVX-512 BF16) on the model's own weights.
//
// This header knows no torch: ops.cpp owns tensors, checks and threads; kernels.cpp owns the
// layouts and the instructions. Every function here except cpu_supported() may run only after
// cpu_supported() returned true.
//
// Layouts (both formats tile output channels by 16 and the reduction dimension by blocks of 32;
// a block of one tile is what one VNNI step of 16 lanes = 16 output channels reads):
//   int8: wq[tile][block][j = 0..7][row = 0..15][i = 0..3] = w[16 tile + row][32 block + 4 j + i] + 128
//         (uint8), scale[n] = amax(w[n]) / 127 (float32). K is zero-padded to a multiple of 32.
//   int4: wq[tile][block][s = 0..3][row][i] = q[.., 32 block + 8 s + i] | q[.., 32 block + 8 s + 4 + i] << 4
//         with q = round(w / d) + 8 in [0, 15]; d[tile][group][row] is float16, one per group_size
//         columns (a multiple of 32). Value = (q - 8) * d (symmetric, like Q4_0, scale searched).
//   N is padded to a multiple of 16 with zero rows; their outputs are never written.
// Activations are quantised per row per block of 32 (like Q8_0): xq = round(x * 127 / amax),
// dx = amax / 127, xc = -offset * (sum of the block's xq): the weights are stored unsigned (w + offset,
// offset 128 for int8, 8 for int4), so each block's integer dot product starts at xc to cancel the
// offset exactly. They are laid out [block][row] (xq [block][row][32]): a block's rows lie together.
#pragma once

#include <cstdint>

namespace hetero_native {

constexpr int64_t kTile = 16;
constexpr int64_t kBlock = 32;
constexpr int64_t kInt8BlockBytes = kTile * kBlock;      // 512
constexpr int64_t kInt4BlockBytes = kTile * kBlock / 2;  // 256

bool cpu_supported();
// cpu_supported() and AVX-512 BF16: linear_bf16_channels may run.
bool bf16_supported();

// bf16: the weight is the model's own, row-major (w[n][k] at w + n * ldw), not packed. Output channels
// [n0, n1) for all M rows of x (bf16 bits, row m at x + m * ldx); out is bf16 bits [M][ldo]. Sums in
// float32 (vdpbf16ps), rounded to bf16 once. Rows go 4 at a time: more rows read the weights again.
constexpr int64_t kBf16MaxRows = 4;
void linear_bf16_channels(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, const uint16_t* x, int64_t M,
                          int64_t K, int64_t ldx, uint16_t* out, int64_t ldo);

// x: bf16 bits, row m at x + m * ldx, K valid columns; writes xq[nb][M][32], dx[nb][M], xc[nb][M].
void quantize_activations(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int32_t offset, int8_t* xq,
                          float* dx, int32_t* xc, int64_t nb);

// Output tiles [t0, t1) for all M rows; out is bf16 bits [M][ldo], N valid columns.
void linear_int8_tiles(const uint8_t* wq, const float* wscale, int64_t nb, int64_t t0, int64_t t1,
                       const int8_t* xq, const float* dx, const int32_t* xc, int64_t M, uint16_t* out,
                       int64_t ldo, int64_t N);
void linear_int4_tiles(const uint8_t* wq, const uint16_t* wscale, int64_t nb, int64_t blocks_per_group,
                       int64_t t0, int64_t t1, const int8_t* xq, const float* dx, const int32_t* xc,
                       int64_t M, uint16_t* out, int64_t ldo, int64_t N);

// Pack tiles [t0, t1) of w [N][K] (float32, or bf16 bits when w_bf16). Return false when a weight
// is not finite or (int4) a scale does not fit float16; the tiles are then incomplete.
bool pack_int8_tiles(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t nb, int64_t t0, int64_t t1,
                     uint8_t* wq, float* wscale);
bool pack_int4_tiles(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t group_size, int64_t t0,
                     int64_t t1, uint8_t* wq, uint16_t* wscale);

}  // namespace hetero_native
