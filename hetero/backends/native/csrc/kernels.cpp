// The AVX-512 VNNI kernels behind hetero_native (layouts: kernels.h).
//
// Every function that uses AVX-512 carries HN_TARGET instead of the whole file being compiled with
// -mavx512*: the file stays loadable on any x86-64, and nothing here may run before cpu_supported().
// No torch header is included, so no inline torch function is ever compiled for AVX-512 either.
//
// Why the kernels look as they do: at decode every weight byte is read once, so a kernel is fast when
// it keeps the memory bus busy and does little per byte. Sixteen output channels sit in the 16 int32
// lanes of one register, so one vpdpbusd reads 64 weight bytes and one broadcast of 4 activation
// bytes, each block's int32 sums need one conversion and one fma for 16 channels, and the weight
// scales of a block are 16 contiguous values. Up to 8 activation rows share each weight register,
// which is what keeps a few rows (decode, small MoE batches) at the cost of one.

#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define HN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define HN_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace hetero_native {
namespace {

constexpr int kMaxRows = 8;  // activation rows per pass over a weight tile: 2 x 8 accumulators fit

// float32 -> bf16 bits, round to nearest even; a NaN stays a (quiet) NaN.
inline uint16_t round_bf16(float y) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof u);
  if (std::isnan(y)) return 0x7FC0;
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

HN_TARGET inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Round to nearest even, NaN kept a (quiet) NaN.
HN_TARGET inline void store_bf16(uint16_t* dst, __m512 y, __mmask16 mask) {
  __m512i u = _mm512_castps_si512(y);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(r));
}

// Each block's weight lines are prefetched 4 KB ahead into L2 (T1: L2 tracks more misses in flight
// than L1). Measured on the 2-core Xeon, 2 threads, against no prefetch: int8 at one row 19 -> 23 GB/s,
// int4 16 -> 22 GB/s; 2 KB into L1 and 16 KB into L2 were within the noise of 4 KB.
constexpr int64_t kPrefetchAhead = 4096;

template <int64_t kBytes>
inline void prefetch_block(const uint8_t* block) {
#pragma GCC unroll 8
  for (int64_t line = 0; line < kBytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchAhead + line), _MM_HINT_T1);
}

inline __mmask16 lane_mask(int64_t valid) {
  return valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
}

// One weight tile (16 channels) against MT activation rows. The activations of a block lie together
// ([block][row], kernels.h), so one pointer each reaches every row; `rows` is their stride per block.
template <int MT>
HN_TARGET void int8_rows(const uint8_t* wt, __m512 row_scale, int64_t nb, const int8_t* xq, const float* dx,
                         const int32_t* xc, int64_t rows, uint16_t* out, int64_t ldo, __mmask16 mask) {
  __m512 acc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, xq += rows * kBlock, dx += rows, xc += rows) {
    const uint8_t* wb = wt + b * kInt8BlockBytes;
    prefetch_block<kInt8BlockBytes>(wb);
    __m512i ia[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) ia[m] = _mm512_set1_epi32(xc[m]);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512i w = _mm512_loadu_si512(wb + 64 * j);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m)
        ia[m] = _mm512_dpbusd_epi32(ia[m], w, _mm512_set1_epi32(load_i32(xq + m * kBlock + 4 * j)));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m]), _mm512_set1_ps(dx[m]), acc[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) store_bf16(out + m * ldo, _mm512_mul_ps(acc[m], row_scale), mask);
}

template <int MT>
HN_TARGET void int4_rows(const uint8_t* wt, const uint16_t* st, int64_t nb, int64_t bpg, const int8_t* xq,
                         const float* dx, const int32_t* xc, int64_t rows, uint16_t* out, int64_t ldo,
                         __mmask16 mask) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  __m512 ws = _mm512_setzero_ps();
  for (int64_t b = 0, in_group = 0; b < nb; ++b, xq += rows * kBlock, dx += rows, xc += rows) {
    const uint8_t* wb = wt + b * kInt4BlockBytes;
    prefetch_block<kInt4BlockBytes>(wb);
    if (in_group == 0) ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st)));
    if (++in_group == bpg) in_group = 0, st += kTile;
    __m512i ia[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) ia[m] = _mm512_set1_epi32(xc[m]);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      __m512i v = _mm512_loadu_si512(wb + 64 * s);
      __m512i lo = _mm512_and_si512(v, low4);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const int8_t* x = xq + m * kBlock + 8 * s;
        ia[m] = _mm512_dpbusd_epi32(ia[m], lo, _mm512_set1_epi32(load_i32(x)));
        ia[m] = _mm512_dpbusd_epi32(ia[m], hi, _mm512_set1_epi32(load_i32(x + 4)));
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m]), _mm512_mul_ps(ws, _mm512_set1_ps(dx[m])), acc[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) store_bf16(out + m * ldo, acc[m], mask);
}

#define HN_DISPATCH_ROWS(rows, FN, ...)    \
  switch (rows) {                          \
    case 1: FN<1>(__VA_ARGS__); break;     \
    case 2: FN<2>(__VA_ARGS__); break;     \
    case 3: FN<3>(__VA_ARGS__); break;     \
    case 4: FN<4>(__VA_ARGS__); break;     \
    case 5: FN<5>(__VA_ARGS__); break;     \
    case 6: FN<6>(__VA_ARGS__); break;     \
    case 7: FN<7>(__VA_ARGS__); break;     \
    default: FN<8>(__VA_ARGS__); break;    \
  }

inline void load_row(const void* w, bool w_bf16, int64_t n, int64_t K, float* dst) {
  if (w_bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(w) + n * K;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits = uint32_t(src[k]) << 16;
      std::memcpy(dst + k, &bits, sizeof(float));
    }
  } else {
    std::memcpy(dst, static_cast<const float*>(w) + n * K, K * sizeof(float));
  }
}

// Candidate scales for a group: d = mx / -(8 + t), mx the value of largest magnitude. t = 0 is Q4_0's
// choice; each candidate's rounding then gets its least-squares scale, so the chosen group is never
// worse than Q4_0's (up to the float16 rounding of the scale, which Q4_0 has too).
constexpr float kInt4Candidates[] = {-1.0f, -0.8f, -0.6f, -0.4f, -0.2f, 0.0f, 0.2f, 0.4f,
                                     0.6f,  0.8f,  1.0f,  1.2f,  1.4f,  1.6f, 1.8f, 2.0f};

HN_TARGET inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// x: G floats (G a multiple of 32); q: G values in [0, 15]. Returns false if not representable.
HN_TARGET bool quantize_group_int4(const float* x, int64_t G, uint8_t* q, uint16_t* d16) {
  float amax = 0.0f, mx = 0.0f;
  for (int64_t k = 0; k < G; ++k) {
    if (!std::isfinite(x[k])) return false;
    if (std::fabs(x[k]) > amax) amax = std::fabs(x[k]), mx = x[k];
  }
  float d = 0.0f;
  if (amax > 0.0f) {
    const __m512 qmin = _mm512_set1_ps(-8.0f), qmax = _mm512_set1_ps(7.0f);
    float best = -1.0f;
    for (float t : kInt4Candidates) {
      const __m512 is = _mm512_set1_ps(-(8.0f + t) / mx);
      __m512 sqg = _mm512_setzero_ps(), sqq = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, is), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(r, qmin), qmax);
        sqg = _mm512_fmadd_ps(r, v, sqg);
        sqq = _mm512_fmadd_ps(r, r, sqq);
      }
      const float g = hsum(sqg), qq = hsum(sqq);
      if (qq > 0.0f && g * g > best * qq) best = g * g / qq, d = g / qq;
    }
  }
  *d16 = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  d = _cvtsh_ss(*d16);
  if (!std::isfinite(d)) return false;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int64_t k = 0; k < G; ++k) {
    float r = std::nearbyint(x[k] * id);
    q[k] = uint8_t(std::min(7.0f, std::max(-8.0f, r)) + 8.0f);
  }
  return true;
}

// bf16 x bf16 on the model's own row-major weight (no packing: the weight is read where it lies).
// vdpbf16ps multiplies 32 bf16 pairs and adds each pair's sum into 16 float32 lanes, so one register
// holds the partial sums of one output channel over 32 inputs; each channel's 16 lanes are added once,
// at the end. R channels are read side by side (R streams) and each of the M activation rows is loaded
// once per 32 inputs and reused across them: R x M accumulators, R = 8 at one row and 4 at up to 4.
template <int R, int M>
HN_TARGET_BF16 void bf16_channels(const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx, int64_t K,
                                  uint16_t* out, int64_t ldo) {
  __m512 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * ldw + k);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  if (k < K) {  // the last K % 32 inputs; the masked-off lanes are zeros on both sides
    const __mmask32 mask = __mmask32((1u << (K - k)) - 1);
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * ldw + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * ldo + r] = round_bf16(_mm512_reduce_add_ps(acc[r][m]));
}

template <int M>
HN_TARGET_BF16 void bf16_rows(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, const uint16_t* x,
                              int64_t ldx, int64_t K, uint16_t* out, int64_t ldo) {
  constexpr int R = M <= 2 ? 8 : 4;
  int64_t n = n0;
  for (; n + R <= n1; n += R) bf16_channels<R, M>(w + n * ldw, ldw, x, ldx, K, out + n, ldo);
  for (; n < n1; ++n) bf16_channels<1, M>(w + n * ldw, ldw, x, ldx, K, out + n, ldo);
}

}  // namespace

bool bf16_supported() {
  __builtin_cpu_init();
  return cpu_supported() && __builtin_cpu_supports("avx512bf16");
}

void linear_bf16_channels(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, const uint16_t* x, int64_t M,
                          int64_t K, int64_t ldx, uint16_t* out, int64_t ldo) {
  for (int64_t m = 0; m < M; m += kBf16MaxRows) {  // more rows than 4: one pass over the weights per 4
    const uint16_t* xm = x + m * ldx;
    uint16_t* om = out + m * ldo;
    switch (std::min<int64_t>(M - m, kBf16MaxRows)) {
      case 1: bf16_rows<1>(w, ldw, n0, n1, xm, ldx, K, om, ldo); break;
      case 2: bf16_rows<2>(w, ldw, n0, n1, xm, ldx, K, om, ldo); break;
      case 3: bf16_rows<3>(w, ldw, n0, n1, xm, ldx, K, om, ldo); break;
      default: bf16_rows<4>(w, ldw, n0, n1, xm, ldx, K, om, ldo); break;
    }
  }
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

HN_TARGET void quantize_activations(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int32_t offset,
                                    int8_t* xq, float* dx, int32_t* xc, int64_t nb) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * kBlock, len = std::min<int64_t>(kBlock, K - k0), at = b * M + m;
      const __mmask32 mask = len >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << len) - 1);
      const __m512i raw = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k0);
      const __m512 f0 = bf16x16_to_f32(_mm512_castsi512_si256(raw));
      const __m512 f1 = bf16x16_to_f32(_mm512_extracti64x4_epi64(raw, 1));
      const __m512 a0 = _mm512_abs_ps(f0), a1 = _mm512_abs_ps(f1);
      int8_t* q = xq + at * kBlock;
      // A NaN or an infinity makes the block's scale NaN, so every output it reaches is NaN.
      if (_mm512_cmp_ps_mask(a0, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(a1, inf, _CMP_NLT_UQ)) {
        std::memset(q, 0, kBlock);
        dx[at] = NAN;
        xc[at] = 0;
        continue;
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(f0, _mm512_set1_ps(id)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(f1, _mm512_set1_ps(id)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(q1));
      dx[at] = amax / 127.0f;
      xc[at] = -offset * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
  }
}

HN_TARGET void linear_int8_tiles(const uint8_t* wq, const float* wscale, int64_t nb, int64_t t0, int64_t t1,
                                 const int8_t* xq, const float* dx, const int32_t* xc, int64_t M,
                                 uint16_t* out, int64_t ldo, int64_t N) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = wq + t * nb * kInt8BlockBytes;
    const __m512 rs = _mm512_loadu_ps(wscale + t * kTile);
    const __mmask16 mask = lane_mask(N - t * kTile);
    // Rows in passes of up to kMaxRows; each pass after the first reads the tile from cache.
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      HN_DISPATCH_ROWS(std::min<int64_t>(kMaxRows, M - m0), int8_rows, wt, rs, nb, xq + m0 * kBlock, dx + m0,
                       xc + m0, M, out + m0 * ldo + t * kTile, ldo, mask)
    }
  }
}

HN_TARGET void linear_int4_tiles(const uint8_t* wq, const uint16_t* wscale, int64_t nb, int64_t bpg,
                                 int64_t t0, int64_t t1, const int8_t* xq, const float* dx, const int32_t* xc,
                                 int64_t M, uint16_t* out, int64_t ldo, int64_t N) {
  const int64_t groups = nb / bpg;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = wq + t * nb * kInt4BlockBytes;
    const uint16_t* st = wscale + t * groups * kTile;
    const __mmask16 mask = lane_mask(N - t * kTile);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      HN_DISPATCH_ROWS(std::min<int64_t>(kMaxRows, M - m0), int4_rows, wt, st, nb, bpg, xq + m0 * kBlock,
                       dx + m0, xc + m0, M, out + m0 * ldo + t * kTile, ldo, mask)
    }
  }
}

bool pack_int8_tiles(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t nb, int64_t t0, int64_t t1,
                     uint8_t* wq, float* wscale) {
  std::vector<float> row(K);
  for (int64_t t = t0; t < t1; ++t) {
    uint8_t* wt = wq + t * nb * kInt8BlockBytes;
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t n = t * kTile + r;
      float amax = 0.0f;
      if (n < N) {
        load_row(w, w_bf16, n, K, row.data());
        for (float v : row) {
          if (!std::isfinite(v)) return false;
          amax = std::max(amax, std::fabs(v));
        }
      }
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      wscale[n] = amax / 127.0f;
      for (int64_t k = 0; k < nb * kBlock; ++k) {
        const float v = (n < N && k < K) ? std::nearbyint(row[k] * id) : 0.0f;
        const int64_t b = k / kBlock, j = (k % kBlock) / 4, i = k % 4;
        wt[b * kInt8BlockBytes + j * 64 + r * 4 + i] = uint8_t(int(std::min(127.0f, std::max(-127.0f, v))) + 128);
      }
    }
  }
  return true;
}

HN_TARGET bool pack_int4_tiles(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t group_size,
                               int64_t t0, int64_t t1, uint8_t* wq, uint16_t* wscale) {
  const int64_t nb = K / kBlock, groups = K / group_size;
  std::vector<float> row(K);
  std::vector<uint8_t> q(K);
  for (int64_t t = t0; t < t1; ++t) {
    uint8_t* wt = wq + t * nb * kInt4BlockBytes;
    uint16_t* st = wscale + t * groups * kTile;
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t n = t * kTile + r;
      if (n < N) {
        load_row(w, w_bf16, n, K, row.data());
        for (int64_t g = 0; g < groups; ++g)
          if (!quantize_group_int4(row.data() + g * group_size, group_size, q.data() + g * group_size,
                                   st + g * kTile + r))
            return false;
      } else {
        std::fill(q.begin(), q.end(), uint8_t(8));
        for (int64_t g = 0; g < groups; ++g) st[g * kTile + r] = 0;
      }
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t s = 0; s < 4; ++s)
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t k = b * kBlock + 8 * s + i;
            wt[b * kInt4BlockBytes + s * 64 + r * 4 + i] = uint8_t(q[k] | (q[k + 4] << 4));
          }
    }
  }
  return true;
}

}  // namespace hetero_native
