// bfloat16 products with float32 sums, on AVX512-BF16 or AMX: the kernels both native CPU op
// files use (native_recurrences.cc's per-step products, native_matmul.cc's XLA custom call).
// Header-only (inline), so each file compiles on its own for the cross-CPU check.
#ifndef VERNE_BF16_PRODUCTS_H_
#define VERNE_BF16_PRODUCTS_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define VERNE_X86_BF16 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace verne {

// ---------------------------------------------------------------------------------------------
// bfloat16 products.
//
// W (float32) is rounded to bfloat16 once per op call and laid out in the order both bf16
// instruction sets read ("VNNI" pairs): blocks of 16 columns and, inside a block, for each pair
// of rows (k, k+1) of W the 16 columns' (W[k][j], W[k+1][j]), 64 bytes. One _mm512_dpbf16_ps
// adds a row's broadcast pair (a[k], a[k+1]) times those 64 bytes into 16 float32 sums, and 16
// such pairs of rows are exactly one AMX B tile (16 rows of 64 bytes). K is zero-padded to a
// multiple of 32 (an AMX A tile's width), the blocks to an even count (AMX takes two at a time).
// Each step the thread's rows of h (or of the pre-activation gradient) are rounded into a
// bfloat16 buffer [rows padded to 16, K padded]; products accumulate and are written in float32.

enum class Isa { kFloat32, kAvx512Bf16, kAmx };

inline const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    default: return "none";
  }
}

inline int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Round to nearest even, as VCVTNEPS2BF16 and tf.cast do; a NaN stays a (quiet) NaN.
inline uint16_t ToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Bf16Buffer = std::unique_ptr<uint16_t[], FreeDeleter>;

// Zeroed (the padding must read as 0) and 64-byte aligned (whole cache lines per AMX tile row).
inline Bf16Buffer NewBf16Buffer(int64_t elements) {
  const size_t bytes = RoundUp(std::max<int64_t>(elements, 1) * sizeof(uint16_t), 64);
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Bf16Buffer(static_cast<uint16_t*>(p));
}

struct PackedBf16 {
  int64_t k = 0, n = 0, k_pad = 0, blocks = 0;
  Bf16Buffer data;
  const uint16_t* Block(int64_t b) const { return data.get() + b * k_pad * 16; }
};

// W = w [rows, cols] (row-major float32), or its transpose, rounded and laid out as above. The
// loop follows w's memory order: the backward op's transpose is then read sequentially.
inline PackedBf16 PackBf16(const float* w, int64_t rows, int64_t cols, bool transpose) {
  PackedBf16 p;
  p.k = transpose ? cols : rows;
  p.n = transpose ? rows : cols;
  p.k_pad = RoundUp(p.k, 32);
  p.blocks = RoundUp((p.n + 15) / 16, 2);
  p.data = NewBf16Buffer(p.blocks * p.k_pad * 16);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t k = transpose ? c : r, j = transpose ? r : c;
      p.data[(j / 16) * p.k_pad * 16 + (k / 2) * 32 + (j % 16) * 2 + k % 2] = ToBf16(w[r * cols + c]);
    }
  }
  return p;
}

#ifdef VERNE_X86_BF16
// Function-level targets, not -march: the library is built for the machine it runs on, but a
// generic x86-64-v3 fallback build must still compile, and a CPU without these instructions
// never reaches them (Bf16Isa() checks the CPU at run time).
#define VERNE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define VERNE_AMX __attribute__((target("amx-tile,amx-bf16")))

// Rows r < n of a (row r at a + r * stride, k floats each) rounded into out (row stride k_pad).
inline VERNE_BF16 void RoundRows(const float* a, int64_t n, int64_t stride, int64_t k, int64_t k_pad, uint16_t* out) {
  for (int64_t r = 0; r < n; ++r) {
    const float* src = a + r * stride;
    uint16_t* dst = out + r * k_pad;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    }
    if (i < k) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1);
      _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i)));
    }
  }
}

// c[MR rows, up to NR * 16 columns (`cols` of them valid)] = a @ (NR blocks of W) over `pairs`
// pairs of K: MR * NR float32 accumulators in registers, each B vector reused by MR rows.
template <int MR, int NR>
inline VERNE_BF16 void Bf16Tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t block_stride, int64_t pairs,
                         float* c, int64_t ldc, int64_t cols) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + j * block_stride + p * 32);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const int64_t left = cols - 16 * j;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(c + i * ldc + 16 * j, mask, acc[i][j]);
  }
}

// 4 rows x 4 blocks: 16 accumulators hide the dot product's latency at two per cycle, and the
// 4 B vectors + 1 broadcast leave registers free; a block's 64 columns of W stay in L2 while
// every row block of the thread's rows passes over them.
constexpr int kTileRows = 4, kTileBlocks = 4;
using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t, int64_t);

template <int MR, int... NR>
constexpr std::array<TileFn, sizeof...(NR)> TileRow(std::integer_sequence<int, NR...>) {
  return {&Bf16Tile<MR, NR + 1>...};
}
template <int... MR>
constexpr std::array<std::array<TileFn, kTileBlocks>, sizeof...(MR)> TileTable(std::integer_sequence<int, MR...>) {
  return {TileRow<MR + 1>(std::make_integer_sequence<int, kTileBlocks>())...};
}
// kTiles[mr - 1][nr - 1]: the edge tiles too, so no row or block count needs padding.
inline const auto kTiles = TileTable(std::make_integer_sequence<int, kTileRows>());

// c [rows, w.n] (row stride ldc) = a [rows, w.k] (bfloat16, row stride w.k_pad) @ W.
inline void Avx512Bf16Times(const PackedBf16& w, const uint16_t* a, int64_t rows, float* c, int64_t ldc) {
  const int64_t pairs = (w.k + 1) / 2, blocks = (w.n + 15) / 16;
  for (int64_t b = 0; b < blocks; b += kTileBlocks) {
    const int64_t nr = std::min<int64_t>(kTileBlocks, blocks - b);
    for (int64_t m = 0; m < rows; m += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, rows - m);
      kTiles[mr - 1][nr - 1](a + m * w.k_pad, w.k_pad, w.Block(b), w.k_pad * 16, pairs, c + m * ldc + b * 16, ldc,
                             w.n - b * 16);
    }
  }
}

// The vectorised packers (first written for native_matmul.cc, shared with native_attention.cc).
// 32 bfloat16 of lo[0..15] and hi[0..15] interleaved (lo0 hi0 lo1 hi1 ...): pairs along K.
inline VERNE_BF16 __m512i Interleave(__m512 lo, __m512 hi) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // [lo 0..15 | hi 0..15]
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

inline VERNE_BF16 __mmask16 FirstLanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << count) - 1);
}

inline VERNE_BF16 __m512 LoadUpTo16(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(FirstLanes(count), p);
}

// Uninitialised where the shapes leave no padding to zero (the common case: every buffer is
// written whole), zeroed otherwise.
inline Bf16Buffer NewBuffer(int64_t elements, bool padded) {
  if (padded) return NewBf16Buffer(elements);
  const size_t bytes = RoundUp(std::max<int64_t>(elements, 1) * sizeof(uint16_t), 64);
  void* memory = std::aligned_alloc(64, bytes);
  if (memory == nullptr) throw std::bad_alloc();
  return Bf16Buffer(static_cast<uint16_t*>(memory));
}

// W = b [k, n] (row r at b + r * stride; stride 0: n), laid out as PackBf16 does, vectorised:
// rows k and k + 1 of a 16-column block interleave into one 64-byte pair row.
inline VERNE_BF16 PackedBf16 PackRows(const float* b, int64_t k, int64_t n, bool padded, int64_t stride = 0) {
  PackedBf16 p;
  p.k = k, p.n = n, p.k_pad = RoundUp(k, 32), p.blocks = RoundUp((n + 15) / 16, 2);
  p.data = NewBuffer(p.blocks * p.k_pad * 16, padded);
  if (stride == 0) stride = n;
  for (int64_t r = 0; r < k; r += 2) {
    const float* first = b + r * stride;
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 lo = LoadUpTo16(first + j, n - j);
      const __m512 hi = r + 1 < k ? LoadUpTo16(first + stride + j, n - j) : _mm512_setzero_ps();
      _mm512_storeu_si512(p.data.get() + (j / 16) * p.k_pad * 16 + (r / 2) * 32, Interleave(lo, hi));
    }
  }
  return p;
}

// rows[i] lane j becomes rows[j] lane i: a 16 x 16 transpose of 32-bit lanes (each one bfloat16
// pair), in registers. A scatter store, the obvious alternative, is microcoded on AMD Zen: packing
// with it took as long as the product it fed.
inline VERNE_BF16 void Transpose16x16(__m512i rows[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  // u[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c.
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i low01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), high01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
    const __m512i low23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    rows[c] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    rows[4 + c] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
    rows[8 + c] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    rows[12 + c] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
  }
}

// W = bᵀ for b stored [n, k] (row j at b + j * stride; stride 0: k): row j of b holds column j
// of W with its K pairs adjacent. For 16
// rows of b and 32 values of K, 16 vectors of pairs, transposed: one pair row of the block each.
inline VERNE_BF16 PackedBf16 PackTransposed(const float* b, int64_t n, int64_t k, bool padded, int64_t stride = 0) {
  PackedBf16 p;
  p.k = k, p.n = n, p.k_pad = RoundUp(k, 32), p.blocks = RoundUp((n + 15) / 16, 2);
  p.data = NewBuffer(p.blocks * p.k_pad * 16, padded);
  if (stride == 0) stride = k;
  __m512i pairs[16];
  for (int64_t j = 0; j < n; j += 16) {
    uint16_t* block = p.data.get() + (j / 16) * p.k_pad * 16;
    for (int64_t c = 0; c < k; c += 32) {
      for (int64_t i = 0; i < 16; ++i) {
        const float* row = b + (j + i) * stride + c;
        pairs[i] = j + i < n ? (__m512i)_mm512_cvtne2ps_pbh(LoadUpTo16(row + 16, k - c - 16), LoadUpTo16(row, k - c))
                             : _mm512_setzero_si512();
      }
      Transpose16x16(pairs);
      for (int64_t q = 0; q < 16; ++q) _mm512_storeu_si512(block + (c / 2 + q) * 32, pairs[q]);
    }
  }
  return p;
}

#ifdef VERNE_AMX_EMULATION
// Each tile instruction as its scalar definition (Intel SDM, TILELOADD/TILESTORED/TILEZERO/
// TDPBF16PS), for CPUs without AMX: tests/test_native_build.py builds the op with
// -DVERNE_AMX_EMULATION and runs the AMX code's tiling, padding and edges through it against
// the bfloat16 reference. Never in a real build.
namespace amx_emulation {
struct Tile {
  int rows = 0, colsb = 0;
  uint8_t data[16][64] = {};
};
inline thread_local Tile tiles[8];

inline float Bf16ToFloat(const uint8_t* p) {
  uint16_t half;
  std::memcpy(&half, p, sizeof half);
  const uint32_t bits = uint32_t(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline void LoadConfig(const void* config) {
  const auto* bytes = static_cast<const uint8_t*>(config);
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, bytes + 16 + 2 * t, sizeof colsb);
    tiles[t].colsb = colsb;
    tiles[t].rows = bytes[48 + t];
  }
}

inline void Load(int t, const void* base, int64_t stride) {
  for (int r = 0; r < tiles[t].rows; ++r) {
    std::memcpy(tiles[t].data[r], static_cast<const uint8_t*>(base) + r * stride, tiles[t].colsb);
  }
}

inline void Store(int t, void* base, int64_t stride) {
  for (int r = 0; r < tiles[t].rows; ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles[t].data[r], tiles[t].colsb);
  }
}

inline void Zero(int t) { std::memset(tiles[t].data, 0, sizeof tiles[t].data); }

// C[m][n] += sum over pairs p of A[m][2p] B[p][2n] + A[m][2p+1] B[p][2n+1] (bf16 in, float32 sums).
inline void DotBf16(int c, int a, int b) {
  Tile &tc = tiles[c], &ta = tiles[a], &tb = tiles[b];
  for (int m = 0; m < tc.rows; ++m) {
    for (int n = 0; n < tc.colsb / 4; ++n) {
      float sum;
      std::memcpy(&sum, tc.data[m] + 4 * n, sizeof sum);
      for (int p = 0; p < ta.colsb / 4; ++p) {
        sum += Bf16ToFloat(ta.data[m] + 4 * p) * Bf16ToFloat(tb.data[p] + 4 * n) +
               Bf16ToFloat(ta.data[m] + 4 * p + 2) * Bf16ToFloat(tb.data[p] + 4 * n + 2);
      }
      std::memcpy(tc.data[m] + 4 * n, &sum, sizeof sum);
    }
  }
}
}  // namespace amx_emulation

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) amx_emulation::LoadConfig(config)
#define _tile_loadd(t, base, stride) amx_emulation::Load(t, base, stride)
#define _tile_stored(t, base, stride) amx_emulation::Store(t, base, stride)
#define _tile_zero(t) amx_emulation::Zero(t)
#define _tile_dpbf16ps(c, a, b) amx_emulation::DotBf16(c, a, b)
#define _tile_release() static_cast<void>(0)
#endif

// AMX (Intel since Sapphire Rapids). NOT RUN on an AMX CPU yet (verne was developed on AMD, no
// AMX): it compiles in the -march=sapphirerapids check of tests/test_native_build.py, its tiling
// runs there through the scalar emulation above, and before first use on a real AMX CPU it must
// agree with the AVX512-BF16 path on a product with edge tiles (AmxAgreesWithAvx512), else that
// path runs instead.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C tile `tile` (16 x 16 float32) into c, clipped to rows x cols (the edges go through a buffer).
// The tile number must be a literal in the instruction, hence the switch.
inline VERNE_AMX void StoreTile(int tile, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  alignas(64) float buffer[16 * 16];
  const bool whole = rows >= 16 && cols >= 16;
  float* dst = whole ? c : buffer;
  const int64_t stride = (whole ? ldc : 16) * static_cast<int64_t>(sizeof(float));
  switch (tile) {
    case 0: _tile_stored(0, dst, stride); break;
    case 1: _tile_stored(1, dst, stride); break;
    case 2: _tile_stored(2, dst, stride); break;
    default: _tile_stored(3, dst, stride); break;
  }
  if (whole) return;
  for (int64_t r = 0; r < std::min<int64_t>(rows, 16); ++r) {
    std::memcpy(c + r * ldc, buffer + r * 16, std::min<int64_t>(cols, 16) * sizeof(float));
  }
}

// As Avx512Bf16Times, with tiles: C tiles 0-3 (2 row tiles x 2 column blocks), A tiles 4-5 (16
// rows x 32 values of K), B tiles 6-7 (16 pairs of K x 16 columns). a has its rows padded to 16.
inline VERNE_AMX void AmxTimes(const PackedBf16& w, const uint16_t* a, int64_t rows, float* c, int64_t ldc) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);
  const int64_t a_stride = w.k_pad * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t m = 0; m < rows; m += 32) {
    const bool two_row_tiles = m + 16 < rows;
    for (int64_t b = 0; b * 16 < w.n; b += 2) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < w.k_pad; k += 32) {
        _tile_loadd(4, a + m * w.k_pad + k, a_stride);
        _tile_loadd(6, w.Block(b) + k * 16, 64);
        _tile_loadd(7, w.Block(b + 1) + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_row_tiles) {
          _tile_loadd(5, a + (m + 16) * w.k_pad + k, a_stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* tile_c = c + m * ldc + b * 16;
      const int64_t cols = w.n - b * 16;
      StoreTile(0, tile_c, ldc, rows - m, cols);
      StoreTile(1, tile_c + 16, ldc, rows - m, cols - 16);
      if (two_row_tiles) {
        StoreTile(2, tile_c + 16 * ldc, ldc, rows - m - 16, cols);
        StoreTile(3, tile_c + 16 * ldc + 16, ldc, rows - m - 16, cols - 16);
      }
    }
  }
  _tile_release();
}

// Linux hands out the AMX tile state only on request, once per process (arch_prctl).
inline bool AmxPermitted() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// The AMX and AVX512-BF16 products of the same bfloat16 inputs sum the same exact products in
// float32, in different orders: they agree to float32 rounding, or the AMX code is wrong here.
inline bool AmxAgreesWithAvx512() {
  const int64_t rows = 37, k = 70, n = 45;  // two row tiles, a partial one, partial K and blocks
  std::vector<float> w(k * n), a(rows * k), amx(rows * n), avx(rows * n);
  uint32_t state = 12345;
  auto next = [&state] { state = state * 1664525u + 1013904223u; return (state >> 8) / 16777216.0f - 0.5f; };
  for (float& x : w) x = next();
  for (float& x : a) x = next();
  const PackedBf16 packed = PackBf16(w.data(), k, n, false);
  const Bf16Buffer rounded = NewBf16Buffer(RoundUp(rows, 16) * packed.k_pad);
  RoundRows(a.data(), rows, k, k, packed.k_pad, rounded.get());
  AmxTimes(packed, rounded.get(), rows, amx.data(), n);
  Avx512Bf16Times(packed, rounded.get(), rows, avx.data(), n);
  for (int64_t i = 0; i < rows * n; ++i) {
    if (!(std::abs(amx[i] - avx[i]) <= 1e-4f * (1.0f + std::abs(avx[i])))) return false;
  }
  return true;
}

inline Isa DetectIsa() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))) {
    return Isa::kFloat32;
  }
#ifdef VERNE_AMX_EMULATION
  const bool amx = true;
#else
  const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && AmxPermitted();
#endif
  if (amx) {
    if (AmxAgreesWithAvx512()) return Isa::kAmx;
    std::fprintf(stderr, "verne: the AMX bfloat16 product disagrees with the AVX512-BF16 one on this CPU: "
                         "using AVX512-BF16 (please report this)\n");
  }
  return Isa::kAvx512Bf16;
}
#else
inline Isa DetectIsa() { return Isa::kFloat32; }
#endif

// What the bfloat16 products run on here, decided once per process.
inline Isa Bf16Isa() {
  static const Isa isa = DetectIsa();
  return isa;
}

}  // namespace verne

#endif  // VERNE_BF16_PRODUCTS_H_
