// Whole-window LSTM and GRU recurrences for the CPU, forward and backward (loaded by native.py).
//
// Why: a recurrence written as TensorFlow ops pays the executor's dispatch for ~20 small ops
// per time step, forward and backward; on a 2-core CPU that, not FLOPs, is most of a step.
// Here one op runs every time step of the window. The batch rows are independent through the
// whole recurrence (row b of h_t needs only row b of h_{t-1}), so each intra-op thread takes a
// block of rows and runs all T steps on its own, with no synchronisation between steps; its
// per-step h @ W_h is a matrix product on its block. The cross-row reduction, the weight
// gradient, is left to the caller as ONE large matmul after the backward op.
//
// Layouts are batch-major, as the layers use them: x_proj [B, T, G*H] (input projection with
// its bias), outputs [B, T, H]. Gate order as in trainer/kernels: LSTM (i, f, g, o), GRU
// (z, r, n) with Keras' reset_after (n = tanh(x_n + r * (h W_n + b_n))). Inputs, outputs, state
// and gate math are float32. With compute_dtype = bfloat16 the per-step products (h_{t-1} @ W_h
// forward, d(pre-activation) @ W_hᵀ backward) take bfloat16 inputs with float32 accumulation,
// where the CPU has bfloat16 dot products (AMX, else AVX512-BF16, chosen at run time; see
// "bfloat16 products" below); elsewhere they stay float32.
//
// Why hand-written intrinsics and not oneDNN (which PyTorch's nn.LSTM calls; not measured here):
// the product is one small GEMM shape repeated T times on each thread's rows, with W_h converted
// once per call, and the rest of the op stays as it was; a few hundred lines do that with no new
// dependency (its AVX512-BF16 product, 32x512 @ 512x2048, ran at ~500 GFLOP/s on one core of
// the AMD EPYC here, where a loop of nothing but the dot product instruction ran at ~520), while linking oneDNN would add a 39 MB wheel and a second oneDNN
// beside the one TensorFlow links in, in one process.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define VERNE_X86_BF16 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "Eigen/Core"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace verne {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

using Row = Eigen::Map<Eigen::ArrayXf>;
using ConstRow = Eigen::Map<const Eigen::ArrayXf>;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMatrixMap = Eigen::Map<const Matrix>;
// Rows of a [B, T, W] tensor at one time step: row stride T * W.
using StridedRows = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;

// sigmoid through tanh: Eigen's vectorised tanh is about twice as fast as its logistic here.
template <typename Expr>
auto Sigmoid(const Expr& x) {
  return 0.5f + 0.5f * (0.5f * x).tanh();
}

// Splits the batch into one block of rows per intra-op thread and runs fn(first, last) on each.
template <typename Fn>
void ForEachRowBlock(OpKernelContext* ctx, int64_t rows, Fn fn) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, pool->NumThreads()));
  const int64_t block_size = (rows + blocks - 1) / blocks;
  pool->TransformRangeConcurrently(block_size, rows, [&](int64_t first, int64_t last) { fn(first, last); });
}

// Checks x_proj [B, T, gates * H], the [B, H] states and w_h [H, gates * H]; sets B, T, H.
bool CheckShapes(OpKernelContext* ctx, const Tensor& x_proj, const Tensor& w_h,
                 std::initializer_list<const Tensor*> states, int gates, int64_t* batch,
                 int64_t* steps, int64_t* units) {
  if (x_proj.dims() != 3 || w_h.dims() != 2) {
    ctx->SetStatus(InvalidArgument("x_proj must be [B, T, G*H] and w_h [H, G*H]"));
    return false;
  }
  *batch = x_proj.dim_size(0), *steps = x_proj.dim_size(1), *units = w_h.dim_size(0);
  bool ok = *steps > 0 && x_proj.dim_size(2) == gates * *units && w_h.dim_size(1) == gates * *units;
  for (const Tensor* s : states) ok = ok && s->dims() == 2 && s->dim_size(0) == *batch && s->dim_size(1) == *units;
  if (!ok) ctx->SetStatus(InvalidArgument("x_proj, w_h and the states disagree on batch, steps or width"));
  return ok;
}

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

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    default: return "none";
  }
}

int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Round to nearest even, as VCVTNEPS2BF16 and tf.cast do; a NaN stays a (quiet) NaN.
uint16_t ToBf16(float value) {
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
Bf16Buffer NewBf16Buffer(int64_t elements) {
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
PackedBf16 PackBf16(const float* w, int64_t rows, int64_t cols, bool transpose) {
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
VERNE_BF16 void RoundRows(const float* a, int64_t n, int64_t stride, int64_t k, int64_t k_pad, uint16_t* out) {
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
VERNE_BF16 void Bf16Tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t block_stride, int64_t pairs,
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
const auto kTiles = TileTable(std::make_integer_sequence<int, kTileRows>());

// c [rows, w.n] (row stride ldc) = a [rows, w.k] (bfloat16, row stride w.k_pad) @ W.
void Avx512Bf16Times(const PackedBf16& w, const uint16_t* a, int64_t rows, float* c, int64_t ldc) {
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
thread_local Tile tiles[8];

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
VERNE_AMX void StoreTile(int tile, float* c, int64_t ldc, int64_t rows, int64_t cols) {
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
VERNE_AMX void AmxTimes(const PackedBf16& w, const uint16_t* a, int64_t rows, float* c, int64_t ldc) {
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
bool AmxPermitted() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// The AMX and AVX512-BF16 products of the same bfloat16 inputs sum the same exact products in
// float32, in different orders: they agree to float32 rounding, or the AMX code is wrong here.
bool AmxAgreesWithAvx512() {
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

Isa DetectIsa() {
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
Isa DetectIsa() { return Isa::kFloat32; }
#endif

// What the bfloat16 products run on here, decided once per process.
Isa Bf16Isa() {
  static const Isa isa = DetectIsa();
  return isa;
}

// The recurrent weight as one step's product uses it: W = w [rows, cols] or, with `transpose`,
// wᵀ; float32 (Eigen), or bfloat16 as above when `isa` names a bf16 instruction set.
class RecurrentWeight {
 public:
  RecurrentWeight(const float* w, int64_t rows, int64_t cols, bool transpose, Isa isa)
      : isa_(isa), in_(transpose ? cols : rows), out_(transpose ? rows : cols), transpose_(transpose), w_(w, rows, cols) {
    if (isa_ != Isa::kFloat32) {
      packed_ = PackBf16(w, rows, cols, transpose);
    } else if (transpose) {
      w_t_ = w_.transpose();  // laid out once per call: the per-step product then reads it row by row
    }
  }

  int64_t in() const { return in_; }

  // Per thread: room for `rows` rows rounded to bfloat16 (none on the float32 path).
  Bf16Buffer RowBuffer(int64_t rows) const {
    return isa_ == Isa::kFloat32 ? Bf16Buffer() : NewBf16Buffer(RoundUp(rows, 16) * packed_.k_pad);
  }

  // out [n, W's columns] = a @ W for the n rows of a, row r at a + r * stride.
  void Times(const float* a, int64_t n, int64_t stride, uint16_t* buffer, Matrix* out) const {
#ifdef VERNE_X86_BF16
    if (isa_ != Isa::kFloat32) {
      RoundRows(a, n, stride, in_, packed_.k_pad, buffer);
      (isa_ == Isa::kAmx ? AmxTimes : Avx512Bf16Times)(packed_, buffer, n, out->data(), out_);
      return;
    }
#endif
    const StridedRows rows(a, n, in_, Eigen::OuterStride<>(stride));
    if (transpose_) {
      out->noalias() = rows * w_t_;
    } else {
      out->noalias() = rows * w_;
    }
  }

 private:
  Isa isa_;
  int64_t in_, out_;
  bool transpose_;
  ConstMatrixMap w_;
  Matrix w_t_;
  PackedBf16 packed_;
};

// hw = h_{t-1} @ W for the rows [first, first + n): h0 at t = 0, else the outputs of step t - 1.
void PreviousStateTimes(const float* h0, const float* hs, int64_t first, int64_t n, int64_t t, int64_t steps,
                        const RecurrentWeight& w, uint16_t* buffer, Matrix* hw) {
  const int64_t units = w.in();
  if (t == 0) {
    w.Times(h0 + first * units, n, units, buffer, hw);
  } else {
    w.Times(hs + (first * steps + t - 1) * units, n, steps * units, buffer, hw);
  }
}

// out = seq[rows first.., step t] @ w_t for a [B, T, W] tensor seq: the gradient a step's
// pre-activations send back to the previous state.
void StepRowsTimes(const float* seq, int64_t first, int64_t n, int64_t t, int64_t steps, const RecurrentWeight& w_t,
                   uint16_t* buffer, Matrix* out) {
  const int64_t width = w_t.in();
  w_t.Times(seq + (first * steps + t) * width, n, steps * width, buffer, out);
}

// The ops' common attribute: compute_dtype = bfloat16 asks for the bfloat16 products, which run
// where the CPU has them (float32 elsewhere: emulated bf16 would be slower and less accurate).
class RecurrenceOp : public OpKernel {
 public:
  explicit RecurrenceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    tensorflow::DataType dtype;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("compute_dtype", &dtype));
    isa_ = dtype == tensorflow::DT_BFLOAT16 ? Bf16Isa() : Isa::kFloat32;
  }

 protected:
  Isa isa_ = Isa::kFloat32;
};

tensorflow::Status SameAs(InferenceContext* c, std::initializer_list<std::pair<int, int>> output_input) {
  for (auto [out, in] : output_input) c->set_output(out, c->input(in));
  return tensorflow::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// LSTM forward. Outputs: outputs [B, T, H], cs [B, T, H], gates [B, T, 4H] (activated), c_T.
REGISTER_OP("VerneLstmSequence")
    .Attr("compute_dtype: {float, bfloat16} = DT_FLOAT")
    .Input("x_proj: float")
    .Input("h0: float")
    .Input("c0: float")
    .Input("w_h: float")
    .Output("outputs: float")
    .Output("cs: float")
    .Output("gates: float")
    .Output("c_last: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      ShapeHandle seq = c->MakeShape({c->Dim(x, 0), c->Dim(x, 1), c->Dim(c->input(1), 1)});
      c->set_output(0, seq);
      c->set_output(1, seq);
      return SameAs(c, {{2, 0}, {3, 2}});
    });

class LstmSequenceOp : public RecurrenceOp {
 public:
  explicit LstmSequenceOp(OpKernelConstruction* ctx) : RecurrenceOp(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &x_proj = ctx->input(0), &h0 = ctx->input(1), &c0 = ctx->input(2), &w_h = ctx->input(3);
    int64_t B, T, H;
    if (!CheckShapes(ctx, x_proj, w_h, {&h0, &c0}, 4, &B, &T, &H)) return;
    Tensor *outputs, *cs, *gates, *c_last;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, T, H}), &outputs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, T, H}), &cs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({B, T, 4 * H}), &gates));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({B, H}), &c_last));
    const float* x = x_proj.flat<float>().data();
    const float* h0_p = h0.flat<float>().data();
    const float* c0_p = c0.flat<float>().data();
    const RecurrentWeight w(w_h.flat<float>().data(), H, 4 * H, /*transpose=*/false, isa_);
    float* hs = outputs->flat<float>().data();
    float* cs_p = cs->flat<float>().data();
    float* gates_p = gates->flat<float>().data();
    float* c_last_p = c_last->flat<float>().data();

    ForEachRowBlock(ctx, B, [&](int64_t first, int64_t last) {
      const int64_t n = last - first;
      Matrix hw(n, 4 * H);
      const Bf16Buffer buffer = w.RowBuffer(n);
      for (int64_t t = 0; t < T; ++t) {
        PreviousStateTimes(h0_p, hs, first, n, t, T, w, buffer.get(), &hw);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = first + r, bt = b * T + t;
          Row z(gates_p + bt * 4 * H, 4 * H);
          z = ConstRow(x + bt * 4 * H, 4 * H) + Eigen::Map<const Eigen::ArrayXf>(hw.data() + r * 4 * H, 4 * H);
          Row i(z.data(), H), f(z.data() + H, H), g(z.data() + 2 * H, H), o(z.data() + 3 * H, H);
          i = Sigmoid(i);
          f = Sigmoid(f);
          g = g.tanh();
          o = Sigmoid(o);
          const float* c_prev = t == 0 ? c0_p + b * H : cs_p + (bt - 1) * H;
          Row c(cs_p + bt * H, H);
          c = f * ConstRow(c_prev, H) + i * g;
          Row(hs + bt * H, H) = o * c.tanh();
        }
      }
      for (int64_t b = first; b < last; ++b) Row(c_last_p + b * H, H) = ConstRow(cs_p + (b * T + T - 1) * H, H);
    });
  }
};

// ---------------------------------------------------------------------------------------------
// LSTM backward. Inputs: the forward's inputs and outputs, d_outputs [B, T, H], dh_T, dc_T.
// Outputs: dz [B, T, 4H] (the gradient of x_proj, and of h_{t-1} @ W_h), dh0, dc0.
REGISTER_OP("VerneLstmSequenceGrad")
    .Attr("compute_dtype: {float, bfloat16} = DT_FLOAT")
    .Input("h0: float")
    .Input("c0: float")
    .Input("w_h: float")
    .Input("cs: float")
    .Input("gates: float")
    .Input("d_outputs: float")
    .Input("dh_last: float")
    .Input("dc_last: float")
    .Output("dz: float")
    .Output("dh0: float")
    .Output("dc0: float")
    .SetShapeFn([](InferenceContext* c) { return SameAs(c, {{0, 4}, {1, 0}, {2, 1}}); });

class LstmSequenceGradOp : public RecurrenceOp {
 public:
  explicit LstmSequenceGradOp(OpKernelConstruction* ctx) : RecurrenceOp(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &h0 = ctx->input(0), &c0 = ctx->input(1), &w_h = ctx->input(2), &cs = ctx->input(3),
                 &gates = ctx->input(4), &d_out = ctx->input(5), &dh_T = ctx->input(6), &dc_T = ctx->input(7);
    int64_t B, T, H;
    if (!CheckShapes(ctx, gates, w_h, {&h0, &c0, &dh_T, &dc_T}, 4, &B, &T, &H)) return;
    OP_REQUIRES(ctx, cs.NumElements() == B * T * H && d_out.NumElements() == B * T * H,
                InvalidArgument("cs and d_outputs must be [B, T, H]"));
    Tensor *dz_t, *dh0, *dc0;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, T, 4 * H}), &dz_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, H}), &dh0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({B, H}), &dc0));
    const float* c0_p = c0.flat<float>().data();
    const RecurrentWeight w_t(w_h.flat<float>().data(), H, 4 * H, /*transpose=*/true, isa_);
    const float* cs_p = cs.flat<float>().data();
    const float* gates_p = gates.flat<float>().data();
    const float* d_out_p = d_out.flat<float>().data();
    float* dz_p = dz_t->flat<float>().data();
    float* dh0_p = dh0->flat<float>().data();
    float* dc0_p = dc0->flat<float>().data();

    ForEachRowBlock(ctx, B, [&](int64_t first, int64_t last) {
      const int64_t n = last - first;
      const Bf16Buffer buffer = w_t.RowBuffer(n);
      // dh_rec = dz_{t+1} @ W_hᵀ and the carried dc, for this block's rows.
      Matrix dh_rec = Eigen::Map<const Matrix>(dh_T.flat<float>().data() + first * H, n, H);
      Matrix dc = Eigen::Map<const Matrix>(dc_T.flat<float>().data() + first * H, n, H);
      Eigen::ArrayXf dh(H), tanh_c(H);
      for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = first + r, bt = b * T + t;
          const float* gb = gates_p + bt * 4 * H;
          ConstRow i(gb, H), f(gb + H, H), g(gb + 2 * H, H), o(gb + 3 * H, H);
          ConstRow c(cs_p + bt * H, H);
          ConstRow c_prev(t == 0 ? c0_p + b * H : cs_p + (bt - 1) * H, H);
          Row dc_r(dc.data() + r * H, H);
          dh = ConstRow(d_out_p + bt * H, H) + Row(dh_rec.data() + r * H, H);
          tanh_c = c.tanh();
          dc_r += dh * o * (1.0f - tanh_c.square());
          float* dzb = dz_p + bt * 4 * H;
          Row(dzb, H) = dc_r * g * i * (1.0f - i);
          Row(dzb + H, H) = dc_r * c_prev * f * (1.0f - f);
          Row(dzb + 2 * H, H) = dc_r * i * (1.0f - g.square());
          Row(dzb + 3 * H, H) = dh * tanh_c * o * (1.0f - o);
          dc_r *= f;
        }
        StepRowsTimes(dz_p, first, n, t, T, w_t, buffer.get(), &dh_rec);
      }
      Eigen::Map<Matrix>(dh0_p + first * H, n, H) = dh_rec;
      Eigen::Map<Matrix>(dc0_p + first * H, n, H) = dc;
    });
  }
};

// ---------------------------------------------------------------------------------------------
// GRU forward. Outputs: outputs [B, T, H], gates [B, T, 4H] = (z, r, n, hz_n) where
// hz_n = h_{t-1} W_n + b_n (the recurrent part of n before the reset gate).
REGISTER_OP("VerneGruSequence")
    .Attr("compute_dtype: {float, bfloat16} = DT_FLOAT")
    .Input("x_proj: float")
    .Input("h0: float")
    .Input("w_h: float")
    .Input("b_h: float")
    .Output("outputs: float")
    .Output("gates: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      auto units = c->Dim(c->input(1), 1);
      tensorflow::shape_inference::DimensionHandle four_h;
      TF_RETURN_IF_ERROR(c->Multiply(units, 4, &four_h));
      c->set_output(0, c->MakeShape({c->Dim(x, 0), c->Dim(x, 1), units}));
      c->set_output(1, c->MakeShape({c->Dim(x, 0), c->Dim(x, 1), four_h}));
      return tensorflow::OkStatus();
    });

class GruSequenceOp : public RecurrenceOp {
 public:
  explicit GruSequenceOp(OpKernelConstruction* ctx) : RecurrenceOp(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &x_proj = ctx->input(0), &h0 = ctx->input(1), &w_h = ctx->input(2), &b_h = ctx->input(3);
    int64_t B, T, H;
    if (!CheckShapes(ctx, x_proj, w_h, {&h0}, 3, &B, &T, &H)) return;
    OP_REQUIRES(ctx, b_h.NumElements() == 3 * H, InvalidArgument("b_h must be [3H]"));
    Tensor *outputs, *gates;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, T, H}), &outputs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, T, 4 * H}), &gates));
    const float* x = x_proj.flat<float>().data();
    const float* h0_p = h0.flat<float>().data();
    const float* bh = b_h.flat<float>().data();
    const RecurrentWeight w(w_h.flat<float>().data(), H, 3 * H, /*transpose=*/false, isa_);
    float* hs = outputs->flat<float>().data();
    float* gates_p = gates->flat<float>().data();

    ForEachRowBlock(ctx, B, [&](int64_t first, int64_t last) {
      const int64_t n = last - first;
      Matrix hw(n, 3 * H);
      const Bf16Buffer buffer = w.RowBuffer(n);
      for (int64_t t = 0; t < T; ++t) {
        PreviousStateTimes(h0_p, hs, first, n, t, T, w, buffer.get(), &hw);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = first + r, bt = b * T + t;
          const float* xb = x + bt * 3 * H;
          const float* hwb = hw.data() + r * 3 * H;
          float* gb = gates_p + bt * 4 * H;
          Row zr(gb, 2 * H), n_gate(gb + 2 * H, H), hz_n(gb + 3 * H, H);
          zr = Sigmoid(ConstRow(xb, 2 * H) + ConstRow(hwb, 2 * H) + ConstRow(bh, 2 * H));
          hz_n = ConstRow(hwb + 2 * H, H) + ConstRow(bh + 2 * H, H);
          n_gate = (ConstRow(xb + 2 * H, H) + Row(gb + H, H) * hz_n).tanh();
          ConstRow h_prev(t == 0 ? h0_p + b * H : hs + (bt - 1) * H, H);
          Row(hs + bt * H, H) = n_gate + Row(gb, H) * (h_prev - n_gate);
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// GRU backward. Outputs: dx [B, T, 3H] (the gradient of x_proj), dhz [B, T, 3H] (of
// h_{t-1} W_h + b_h: the caller reduces it to dW_h and db_h), dh0.
REGISTER_OP("VerneGruSequenceGrad")
    .Attr("compute_dtype: {float, bfloat16} = DT_FLOAT")
    .Input("h0: float")
    .Input("w_h: float")
    .Input("outputs: float")
    .Input("gates: float")
    .Input("d_outputs: float")
    .Input("dh_last: float")
    .Output("dx: float")
    .Output("dhz: float")
    .Output("dh0: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle seq;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &seq));
      ShapeHandle three = c->MakeShape({c->Dim(seq, 0), c->Dim(seq, 1), c->Dim(c->input(1), 1)});
      c->set_output(0, three);
      c->set_output(1, three);
      return SameAs(c, {{2, 0}});
    });

class GruSequenceGradOp : public RecurrenceOp {
 public:
  explicit GruSequenceGradOp(OpKernelConstruction* ctx) : RecurrenceOp(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &h0 = ctx->input(0), &w_h = ctx->input(1), &outputs = ctx->input(2), &gates = ctx->input(3),
                 &d_out = ctx->input(4), &dh_T = ctx->input(5);
    OP_REQUIRES(ctx, outputs.dims() == 3, InvalidArgument("outputs must be [B, T, H]"));
    const int64_t B = outputs.dim_size(0), T = outputs.dim_size(1), H = outputs.dim_size(2);
    OP_REQUIRES(ctx, w_h.dims() == 2 && w_h.dim_size(0) == H && w_h.dim_size(1) == 3 * H &&
                     gates.NumElements() == B * T * 4 * H && d_out.NumElements() == B * T * H &&
                     h0.NumElements() == B * H && dh_T.NumElements() == B * H,
                InvalidArgument("h0, w_h, outputs, gates, d_outputs and dh_last disagree on shape"));
    Tensor *dx_t, *dhz_t, *dh0;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, T, 3 * H}), &dx_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, T, 3 * H}), &dhz_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({B, H}), &dh0));
    const float* h0_p = h0.flat<float>().data();
    const RecurrentWeight w_t(w_h.flat<float>().data(), H, 3 * H, /*transpose=*/true, isa_);
    const float* hs = outputs.flat<float>().data();
    const float* gates_p = gates.flat<float>().data();
    const float* d_out_p = d_out.flat<float>().data();
    float* dx_p = dx_t->flat<float>().data();
    float* dhz_p = dhz_t->flat<float>().data();
    float* dh0_p = dh0->flat<float>().data();

    ForEachRowBlock(ctx, B, [&](int64_t first, int64_t last) {
      const int64_t n = last - first;
      const Bf16Buffer buffer = w_t.RowBuffer(n);
      // The carried dh_{t-1} contribution: dh_t z_t + dhz_t @ W_hᵀ, for this block's rows.
      Matrix carry = Eigen::Map<const Matrix>(dh_T.flat<float>().data() + first * H, n, H);
      Matrix direct(n, H);
      Eigen::ArrayXf dh(H), dz_pre(H), dn_pre(H);
      for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = first + r, bt = b * T + t;
          const float* gb = gates_p + bt * 4 * H;
          ConstRow z(gb, H), rg(gb + H, H), n_gate(gb + 2 * H, H), hz_n(gb + 3 * H, H);
          ConstRow h_prev(t == 0 ? h0_p + b * H : hs + (bt - 1) * H, H);
          dh = ConstRow(d_out_p + bt * H, H) + Row(carry.data() + r * H, H);
          dz_pre = dh * (h_prev - n_gate) * z * (1.0f - z);
          dn_pre = dh * (1.0f - z) * (1.0f - n_gate.square());
          float* dxb = dx_p + bt * 3 * H;
          float* dhzb = dhz_p + bt * 3 * H;
          Row(dxb, H) = dz_pre;
          Row(dhzb, H) = dz_pre;
          Row(dxb + H, H) = dn_pre * hz_n * rg * (1.0f - rg);
          Row(dhzb + H, H) = Row(dxb + H, H);
          Row(dxb + 2 * H, H) = dn_pre;
          Row(dhzb + 2 * H, H) = dn_pre * rg;
          Row(direct.data() + r * H, H) = dh * z;
        }
        StepRowsTimes(dhz_p, first, n, t, T, w_t, buffer.get(), &carry);
        carry += direct;
      }
      Eigen::Map<Matrix>(dh0_p + first * H, n, H) = carry;
    });
  }
};

// ---------------------------------------------------------------------------------------------
// What compute_dtype = bfloat16 runs on this CPU: "amx", "avx512_bf16" or "none" (float32).
REGISTER_OP("VerneBf16Isa").Output("isa: string").SetShapeFn(tensorflow::shape_inference::ScalarShape);

class Bf16IsaOp : public OpKernel {
 public:
  explicit Bf16IsaOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Tensor* isa;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &isa));
    isa->scalar<tensorflow::tstring>()() = IsaName(Bf16Isa());
  }
};

REGISTER_KERNEL_BUILDER(Name("VerneBf16Isa").Device(DEVICE_CPU), Bf16IsaOp);
REGISTER_KERNEL_BUILDER(Name("VerneLstmSequence").Device(DEVICE_CPU), LstmSequenceOp);
REGISTER_KERNEL_BUILDER(Name("VerneLstmSequenceGrad").Device(DEVICE_CPU), LstmSequenceGradOp);
REGISTER_KERNEL_BUILDER(Name("VerneGruSequence").Device(DEVICE_CPU), GruSequenceOp);
REGISTER_KERNEL_BUILDER(Name("VerneGruSequenceGrad").Device(DEVICE_CPU), GruSequenceGradOp);

}  // namespace verne
