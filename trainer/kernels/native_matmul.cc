// The transformer's matmuls in bfloat16 inside an XLA-compiled step (loaded by native.py).
//
// Why: XLA's CPU dot gains nothing from bfloat16 (it computes bfloat16 dots no faster than
// float32 ones), and TensorFlow's oneDNN matmuls, which do, run only outside XLA (--xla=fusion,
// where the graph's per-op cost outweighs them on a small model). XLA does call out to named
// "custom call" targets registered in the process; this file registers one with XLA's FFI,
// `verne_bf16_matmul`, that runs a product on the bfloat16 kernels of bf16_products.h
// (AVX512-BF16, or AMX tiles on CPUs that have them) with float32 inputs, outputs and sums: the
// inputs are rounded to bfloat16 as they are laid out for the kernel, so no cast op runs around
// it. trainer/kernels/native.py emits it (a StableHLO custom call inside tf2xla's XlaCallModule)
// for the three products of a dense layer's step: x @ W forward, dy @ Wᵀ and xᵀ @ dy backward.
//
// Threads: a product's rows are split into 32-row chunks that the calling thread and XLA's own
// intra-op pool take in turn (the FFI hands the call that pool). An earlier version, on XLA's
// legacy custom-call interface (which gives a call no pool, hence tf2xla's XlaCustomCallV2), kept
// a helper thread of its own: inside gpt-baby's step XLA's pool, whose idle workers spin before
// they sleep, held the second core, and the products ran at about one thread's rate. On the pool,
// the step took 8-12% less (bench/README.md). The caller never waits for a pool task to start,
// only for chunks already taken, so a pool busy with other work (the other --batch_splits slice)
// costs a product its helpers, never a deadlock.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

#include "Eigen/Core"
#include "bf16_products.h"
#include "xla/ffi/api/ffi.h"

namespace xla::ffi {
// XLA's FFI table in this process (libtensorflow_cc exports it; its own header, ffi_api.h, pulls
// in XLA's internals).
const XLA_FFI_Api* GetXlaFfiApi();
}  // namespace xla::ffi

namespace verne {
namespace {

// C [m, n] = op(A) @ op(B): A stored [m, k] or, with transpose_a, [k, m]; B stored [k, n] or,
// with transpose_b, [n, k].
struct Product {
  int64_t m = 0, k = 0, n = 0;
  bool transpose_a = false, transpose_b = false;
};

// work(0) .. work(chunks - 1) on the calling thread and on `helpers` tasks of XLA's pool. A task
// may start after the caller has finished (every chunk taken): it then finds nothing to do and
// touches only the shared counters, which it holds a reference to.
struct Chunks {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
  std::function<void(int64_t)> work;

  void Take() {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      work(i);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

void OnPool(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> work) {
  auto chunks = std::make_shared<Chunks>();
  chunks->count = count, chunks->work = std::move(work);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([chunks] { chunks->Take(); });
  chunks->Take();
  while (chunks->done.load(std::memory_order_acquire) != count) std::this_thread::yield();  // helpers' last
}

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const Matrix>;
using Map = Eigen::Map<Matrix>;

// Where the CPU has no bfloat16 dot product: float32 (native.py routes no product here then;
// this keeps the target defined and correct).
void Float32Product(const Product& p, const float* a, const float* b, float* c) {
  const ConstMap a_map(a, p.transpose_a ? p.k : p.m, p.transpose_a ? p.m : p.k);
  const ConstMap b_map(b, p.transpose_b ? p.n : p.k, p.transpose_b ? p.k : p.n);
  Map c_map(c, p.m, p.n);
  if (p.transpose_a && p.transpose_b) {
    c_map.noalias() = a_map.transpose() * b_map.transpose();
  } else if (p.transpose_a) {
    c_map.noalias() = a_map.transpose() * b_map;
  } else if (p.transpose_b) {
    c_map.noalias() = a_map * b_map.transpose();
  } else {
    c_map.noalias() = a_map * b_map;
  }
}

#ifdef VERNE_X86_BF16
// Rows [first, last) of A = aᵀ for a stored [k, m], rounded into out (its row 0 is A's row first,
// row stride k_pad): rows r, r + 1 of a interleave into pairs along a's columns; 16 such vectors,
// transposed, are 16 pairs of K for each of 16 rows of A.
VERNE_BF16 void RoundColumns(const float* a, int64_t k, int64_t m, int64_t first, int64_t last, int64_t k_pad,
                             uint16_t* out) {
  __m512i pairs[16];
  for (int64_t r = 0; r < k; r += 32) {
    for (int64_t c = first; c < last; c += 16) {
      for (int64_t q = 0; q < 16; ++q) {
        const int64_t row = r + 2 * q;
        const __m512 lo = row < k ? LoadUpTo16(a + row * m + c, last - c) : _mm512_setzero_ps();
        const __m512 hi = row + 1 < k ? LoadUpTo16(a + (row + 1) * m + c, last - c) : _mm512_setzero_ps();
        pairs[q] = Interleave(lo, hi);
      }
      Transpose16x16(pairs);
      for (int64_t i = 0; i < std::min<int64_t>(16, last - c); ++i) {
        _mm512_storeu_si512(out + (c - first + i) * k_pad + r, pairs[i]);
      }
    }
  }
}

void Bf16Product(const Product& p, Isa isa, const float* a, const float* b, float* c, xla::ffi::ThreadPool& pool) {
  // Padding (K to 32, rows to 16, blocks to an even count) must read as zero.
  const bool padded = p.k % 32 != 0 || p.n % 32 != 0 || p.m % 16 != 0;
  const PackedBf16 w = p.transpose_b ? PackTransposed(b, p.n, p.k, padded) : PackRows(b, p.k, p.n, padded);
  const Bf16Buffer rounded = NewBuffer(RoundUp(p.m, 16) * w.k_pad, padded);
  const auto times = isa == Isa::kAmx ? AmxTimes : Avx512Bf16Times;
  // Chunks of 32 rows (whole 16-row AMX tiles): each rounds its rows of A, then multiplies them.
  // Against the earlier helper-thread call, gpt-baby's step took 11-11.5% less with 32-row chunks
  // and 8% less with 64; 16 rows was no better than 32 (bench/README.md).
  constexpr int64_t kChunk = 32;
  OnPool(pool, (p.m + kChunk - 1) / kChunk, [&](int64_t chunk) {
    const int64_t first = chunk * kChunk, last = std::min(p.m, first + kChunk);
    uint16_t* mine = rounded.get() + first * w.k_pad;
    if (p.transpose_a) {
      RoundColumns(a, p.k, p.m, first, last, w.k_pad, mine);
    } else {
      RoundRows(a + first * p.k, last - first, p.k, p.k, w.k_pad, mine);
    }
    times(w, mine, last - first, c + first * p.n, p.n);
  });
}
#endif

namespace ffi = xla::ffi;

// The product of a [rows, cols] and b, each read as its transpose where asked; a's and b's shapes
// give m, k and n.
ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto a_dims = a.dimensions(), b_dims = b.dimensions(), c_dims = c->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || c_dims.size() != 2) {
    return ffi::Error::InvalidArgument("verne_bf16_matmul takes 2-D operands");
  }
  Product p;
  p.transpose_a = transpose_a, p.transpose_b = transpose_b;
  p.m = a_dims[transpose_a ? 1 : 0], p.k = a_dims[transpose_a ? 0 : 1];
  p.n = b_dims[transpose_b ? 0 : 1];
  if (b_dims[transpose_b ? 1 : 0] != p.k || c_dims[0] != p.m || c_dims[1] != p.n) {
    return ffi::Error::InvalidArgument("verne_bf16_matmul: operand and result shapes do not agree");
  }
  const Isa isa = Bf16Isa();
#ifdef VERNE_X86_BF16
  if (isa != Isa::kFloat32) {
    Bf16Product(p, isa, a.typed_data(), b.typed_data(), c->typed_data(), pool);
    return ffi::Error::Success();
  }
#endif
  Float32Product(p, a.typed_data(), b.typed_data(), c->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16MatmulHandler, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

}  // namespace verne

XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "verne_bf16_matmul", "Host", verne::Bf16MatmulHandler);
