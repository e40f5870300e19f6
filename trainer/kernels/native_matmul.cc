// The transformer's matmuls in bfloat16 inside an XLA-compiled step (loaded by native.py).
//
// Why: XLA's CPU dot gains nothing from bfloat16 (it computes bfloat16 dots no faster than
// float32 ones), and TensorFlow's oneDNN matmuls, which do, run only outside XLA (--xla=fusion,
// where the graph's per-op cost outweighs them on a small model). XLA does call out to named
// "custom call" targets registered in the process; this file registers one, `verne_bf16_matmul`,
// that runs a product on the bfloat16 kernels of bf16_products.h (AVX512-BF16, or AMX tiles on
// CPUs that have them) with float32 inputs, outputs and sums: the inputs are rounded to bfloat16
// as they are laid out for the kernel, so no cast op runs around it. trainer/kernels/native.py
// emits it (tf2xla's XlaCustomCallV2) for the three products of a dense layer's step: x @ W
// forward, dy @ Wᵀ and xᵀ @ dy backward.
//
// XLA's legacy custom-call interface gives the call no thread pool, and XLA runs the custom calls
// of one chain of work one after another (those of two --batch_splits slices may run at once; a
// call that finds the helper busy runs alone). So this library keeps one helper thread, and a product's rows are split into
// 64-row chunks that the caller and the helper take in turn: a helper slow to wake costs the
// caller no wait. Alone, two threads ran a product 1.6x as fast as one; inside gpt-baby's step
// the helper took 41% of the chunks yet the products ran at about one thread's rate, the second
// core being held by XLA's pool, whose idle workers spin before they sleep (bench/README.md).

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <string>
#include <thread>
#include <utility>

#include "Eigen/Core"
#include "bf16_products.h"
#include "xla/service/custom_call_status.h"
#include "xla/service/custom_call_target_registry.h"

namespace verne {
namespace {

// C [m, n] = op(A) @ op(B): A stored [m, k] or, with transpose_a, [k, m]; B stored [k, n] or,
// with transpose_b, [n, k]. The call's backend_config string, "m,k,n,transpose_a,transpose_b".
struct Product {
  int64_t m = 0, k = 0, n = 0;
  bool transpose_a = false, transpose_b = false;
};

bool ParseProduct(const char* opaque, size_t length, Product* p) {
  const std::string config(opaque, length);
  long long m, k, n;
  int ta, tb;
  if (std::sscanf(config.c_str(), "%lld,%lld,%lld,%d,%d", &m, &k, &n, &ta, &tb) != 5 || m <= 0 || k <= 0 ||
      n <= 0) {
    return false;
  }
  *p = {m, k, n, ta != 0, tb != 0};
  return true;
}

// The helper thread and the chunks it shares with a caller (see the top of the file).
class Team {
 public:
  Team() { std::thread([this] { Loop(); }).detach(); }

  // work(0) .. work(chunks - 1), on the caller and the helper; on the caller alone while another
  // call has the helper.
  void Run(int64_t chunks, const std::function<void(int64_t)>& work) {
    std::unique_lock<std::mutex> mine(call_, std::try_to_lock);
    if (!mine.owns_lock() || chunks < 2) {
      for (int64_t i = 0; i < chunks; ++i) work(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      work_ = &work, chunks_ = chunks, ++generation_;
      next_.store(0, std::memory_order_relaxed);
    }
    wake_.notify_one();
    Take(work, chunks);
    {
      std::lock_guard<std::mutex> lock(mu_);
      work_ = nullptr;  // a helper that wakes from now on finds nothing to join
    }
    while (inside_.load(std::memory_order_acquire) != 0) std::this_thread::yield();  // its last chunk
  }

 private:
  void Take(const std::function<void(int64_t)>& work, int64_t chunks) {
    for (int64_t i = next_.fetch_add(1); i < chunks; i = next_.fetch_add(1)) work(i);
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* work;
      int64_t chunks;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return work_ != nullptr && generation_ != seen; });
        seen = generation_, work = work_, chunks = chunks_;
        inside_.fetch_add(1, std::memory_order_relaxed);
      }
      Take(*work, chunks);
      inside_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex call_, mu_;
  std::condition_variable wake_;
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t chunks_ = 0;
  uint64_t generation_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> inside_{0};
};

Team& TheTeam() {
  static Team* team = new Team();  // never destroyed: its thread outlives static teardown
  return *team;
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
// 32 bfloat16 of lo[0..15] and hi[0..15] interleaved (lo0 hi0 lo1 hi1 ...): pairs along K.
VERNE_BF16 __m512i Interleave(__m512 lo, __m512 hi) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // [lo 0..15 | hi 0..15]
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

VERNE_BF16 __mmask16 FirstLanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << count) - 1);
}

VERNE_BF16 __m512 LoadUpTo16(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(FirstLanes(count), p);
}

// Uninitialised where the shapes leave no padding to zero (the common case: every buffer is
// written whole), zeroed otherwise.
Bf16Buffer NewBuffer(int64_t elements, bool padded) {
  if (padded) return NewBf16Buffer(elements);
  const size_t bytes = RoundUp(std::max<int64_t>(elements, 1) * sizeof(uint16_t), 64);
  void* memory = std::aligned_alloc(64, bytes);
  if (memory == nullptr) throw std::bad_alloc();
  return Bf16Buffer(static_cast<uint16_t*>(memory));
}

// W = b [k, n] (row-major), laid out as PackBf16 does, vectorised: rows k and k + 1 of a
// 16-column block interleave into one 64-byte pair row.
VERNE_BF16 PackedBf16 PackRows(const float* b, int64_t k, int64_t n, bool padded) {
  PackedBf16 p;
  p.k = k, p.n = n, p.k_pad = RoundUp(k, 32), p.blocks = RoundUp((n + 15) / 16, 2);
  p.data = NewBuffer(p.blocks * p.k_pad * 16, padded);
  for (int64_t r = 0; r < k; r += 2) {
    const float* first = b + r * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 lo = LoadUpTo16(first + j, n - j);
      const __m512 hi = r + 1 < k ? LoadUpTo16(first + n + j, n - j) : _mm512_setzero_ps();
      _mm512_storeu_si512(p.data.get() + (j / 16) * p.k_pad * 16 + (r / 2) * 32, Interleave(lo, hi));
    }
  }
  return p;
}

// rows[i] lane j becomes rows[j] lane i: a 16 x 16 transpose of 32-bit lanes (each one bfloat16
// pair), in registers. A scatter store, the obvious alternative, is microcoded on AMD Zen: packing
// with it took as long as the product it fed.
VERNE_BF16 void Transpose16x16(__m512i rows[16]) {
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

// W = bᵀ for b stored [n, k]: row j of b holds column j of W with its K pairs adjacent. For 16
// rows of b and 32 values of K, 16 vectors of pairs, transposed: one pair row of the block each.
VERNE_BF16 PackedBf16 PackTransposed(const float* b, int64_t n, int64_t k, bool padded) {
  PackedBf16 p;
  p.k = k, p.n = n, p.k_pad = RoundUp(k, 32), p.blocks = RoundUp((n + 15) / 16, 2);
  p.data = NewBuffer(p.blocks * p.k_pad * 16, padded);
  __m512i pairs[16];
  for (int64_t j = 0; j < n; j += 16) {
    uint16_t* block = p.data.get() + (j / 16) * p.k_pad * 16;
    for (int64_t c = 0; c < k; c += 32) {
      for (int64_t i = 0; i < 16; ++i) {
        const float* row = b + (j + i) * k + c;
        pairs[i] = j + i < n ? (__m512i)_mm512_cvtne2ps_pbh(LoadUpTo16(row + 16, k - c - 16), LoadUpTo16(row, k - c))
                             : _mm512_setzero_si512();
      }
      Transpose16x16(pairs);
      for (int64_t q = 0; q < 16; ++q) _mm512_storeu_si512(block + (c / 2 + q) * 32, pairs[q]);
    }
  }
  return p;
}

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

void Bf16Product(const Product& p, Isa isa, const float* a, const float* b, float* c) {
  // Padding (K to 32, rows to 16, blocks to an even count) must read as zero.
  const bool padded = p.k % 32 != 0 || p.n % 32 != 0 || p.m % 16 != 0;
  const PackedBf16 w = p.transpose_b ? PackTransposed(b, p.n, p.k, padded) : PackRows(b, p.k, p.n, padded);
  const Bf16Buffer rounded = NewBuffer(RoundUp(p.m, 16) * w.k_pad, padded);
  const auto times = isa == Isa::kAmx ? AmxTimes : Avx512Bf16Times;
  // Chunks of 64 rows (whole 16-row AMX tiles): each rounds its rows of A, then multiplies them.
  constexpr int64_t kChunk = 64;
  TheTeam().Run((p.m + kChunk - 1) / kChunk, [&](int64_t chunk) {
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

// Whether p lies in the calling thread's stack. XLA hands a call with one (non-tuple) result its
// buffer, but a step that TensorFlow's persistent compile cache restores hands it a one-element
// array of result pointers instead (the thunk's tuple flag does not survive the cache: a step
// with a 2-tuple result went wrong the other way). That array is a local of XLA's caller, on this
// thread's stack, where no XLA buffer ever is, so the call can tell which it got.
bool OnThisThreadsStack(const void* p) {
  thread_local const std::pair<uintptr_t, uintptr_t> stack = [] {
    pthread_attr_t attr;
    void* base = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &base, &size);
      pthread_attr_destroy(&attr);
    }
    const auto low = reinterpret_cast<uintptr_t>(base);
    return std::make_pair(low, low + size);
  }();
  const auto address = reinterpret_cast<uintptr_t>(p);
  return address >= stack.first && address < stack.second;
}

}  // namespace

// XLA's status-returning custom-call signature: out, operands (a, b), backend_config, status.
// `out` is the result's buffer, or, in a step restored from TensorFlow's persistent compile cache,
// an array holding it (OnThisThreadsStack).
extern "C" void verne_bf16_matmul(void* out, const void** in, const char* opaque, size_t opaque_length,
                                  XlaCustomCallStatus* status) {
  Product p;
  if (!ParseProduct(opaque, opaque_length, &p)) {
    // Only native.py emits this call, with a well-formed config; XLA's failure reporting
    // (XlaCustomCallStatusSetFailure) is not exported by TensorFlow's libraries.
    std::fprintf(stderr, "verne_bf16_matmul: bad backend_config (want \"m,k,n,transpose_a,transpose_b\")\n");
    std::abort();
  }
  const auto* a = static_cast<const float*>(in[0]);
  const auto* b = static_cast<const float*>(in[1]);
  auto* c = static_cast<float*>(OnThisThreadsStack(out) ? *static_cast<void**>(out) : out);
  const Isa isa = Bf16Isa();
#ifdef VERNE_X86_BF16
  if (isa != Isa::kFloat32) {
    Bf16Product(p, isa, a, b, c);
    return;
  }
#endif
  Float32Product(p, a, b, c);
}

}  // namespace verne

XLA_REGISTER_CUSTOM_CALL_TARGET_WITH_SYM("verne_bf16_matmul", verne::verne_bf16_matmul, "Host");
