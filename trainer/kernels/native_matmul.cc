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
// call that finds the helper busy runs alone). So this library keeps one helper thread, and a
// product's rows are split into 64-row chunks that the caller and the helper take in turn: a helper
// slow to wake costs the caller no wait. Alone, two threads ran a product 1.6x as fast as one;
// inside gpt-baby's step the helper took 41% of the chunks yet the products ran at about one
// thread's rate, the second core being held by XLA's pool, whose idle workers spin before they
// sleep (bench/README.md).

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
