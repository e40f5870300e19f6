// Causal self-attention of a window on its own, forward and backward, for the CPU (loaded by
// native.py; the transformer's training and evaluation windows under --precision bfloat16).
//
//   o = softmax(q kᵀ + mask) v      per head; q (already scaled), k, v, o: [B, T, H, D] float32
//
// where query i sees keys j with 0 <= i - j < window. The [B, T, H, D] layout is the projection's
// own: no transposes to heads first and back (each a pass over memory in the step). Why an op: the
// window's logits are [T, T] per head, and TensorFlow computes all of them, the masked half
// included, as batched products whose results then go through elementwise passes (mask, max, exp,
// sum, divide, casts, and their gradients) over [B, H, T, T] float32 in memory. At bench/train.py
// --shape gpt-small (T 256) those were ~17% of the step's thread time on a 2-core AMD EPYC
// (bench/README.md). Here each head's attention runs in 64-query blocks against only the keys the
// block can see (62.5% of the products at T 256), with the softmax done on the block while it is in
// cache. The backward recomputes the block's probabilities from the forward's row log-sum-exp
// (FlashAttention's trick: nothing [T, T] is kept between the two), and forms dq, then dk and dv
// as products with the probabilities and logit gradients transposed.
//
// Products take bfloat16 inputs (rounded to nearest even as they are laid out) with float32 sums,
// on bf16_products.h's AVX512-BF16 tiles; softmax and everything else in float32. Only CPUs with
// bfloat16 dot products run it (native.py checks `bf16_isa()`); elsewhere the op refuses to run.
// Why not a library: oneDNN's attention primitive ("SDPA" graph) is not reachable from
// TensorFlow's CPU build, and TensorFlow has no fused attention kernel for the CPU.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "Eigen/Core"
#include "bf16_products.h"
#include "tf_op.h"

namespace verne {
namespace {

// Queries per block: 64 keeps a block's [64, T] logits in L2 and skips 37.5% of the products at T 256.
constexpr int64_t kBlock = 64;

struct Dims {
  int64_t batch = 0, steps = 0, heads = 0, depth = 0, window = 0;
  int64_t units() const { return batch * heads; }
  int64_t stride() const { return heads * depth; }  // between a head's rows (time steps)
  // Where head n = b * H + h starts in a [B, T, H, D] tensor.
  int64_t Offset(int64_t n) const { return (n / heads) * steps * stride() + (n % heads) * depth; }
  int64_t depth_pad() const { return RoundUp(depth, 32); }
  int64_t steps_pad() const { return RoundUp(steps, 32); }
  // Keys the queries [first, last) may see: [first_key, last), first_key rounded down to a block
  // of 16 columns (the products' unit); keys before a row's window are zeroed, not skipped.
  int64_t FirstKey(int64_t first) const { return std::max<int64_t>(0, first - window + 1) / 16 * 16; }
  // Queries that see some key of [first, last): [first, end).
  int64_t LastQuery(int64_t last) const { return std::min(steps, RoundUp(last + window - 1, 16)); }
};

// Buffers of bfloat16 rows: `rows` rows of `width` padded elements, zeroed.
inline Bf16Buffer Rows(int64_t rows, int64_t width) { return NewBf16Buffer(RoundUp(rows, 16) * width); }

// Checks q, k, v (and the others) are [B, T, H, D] alike, T and D multiples of 16.
bool CheckShapes(OpKernelContext* ctx, std::initializer_list<int> inputs, int64_t window, Dims* d) {
  const Tensor& q = ctx->input(0);
  bool ok = q.dims() == 4;
  for (int i : inputs) ok = ok && ctx->input(i).shape() == q.shape();
  if (!ok) {
    ctx->SetStatus(InvalidArgument("queries, keys, values (and gradients) must be [B, T, H, D] alike"));
    return false;
  }
  d->batch = q.dim_size(0), d->steps = q.dim_size(1), d->heads = q.dim_size(2), d->depth = q.dim_size(3);
  d->window = window;
  if (d->steps % 16 || d->depth % 16 || window < 1) {
    ctx->SetStatus(InvalidArgument("causal attention needs T and D multiples of 16 and window >= 1"));
    return false;
  }
  return true;
}

#ifdef VERNE_X86_BF16

// c[rows, n0:n1] (c's columns absolute: column j at c + j) = a[rows, k0:k1] @ W[k0:k1, n0:n1],
// a pointing at its element k0 (bfloat16, row stride lda); k0 and k1 even, n0 a multiple of 16.
inline void Product(const uint16_t* a, int64_t lda, int64_t rows, const PackedBf16& w, int64_t k0, int64_t k1,
                    int64_t n0, int64_t n1, float* c, int64_t ldc) {
  const int64_t pairs = (k1 - k0) / 2, first = n0 / 16, last = (n1 + 15) / 16;
  for (int64_t b = first; b < last; b += kTileBlocks) {
    const int64_t nr = std::min<int64_t>(kTileBlocks, last - b);
    for (int64_t m = 0; m < rows; m += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, rows - m);
      kTiles[mr - 1][nr - 1](a + m * lda, lda, w.Block(b) + (k0 / 2) * 32, w.k_pad * 16, pairs, c + m * ldc + b * 16,
                             ldc, n1 - b * 16);
    }
  }
}

// e^x for x <= 0 (softmax's shifted logits): 2^n e^r with n = round(x log2 e), |r| <= ln2 / 2,
// e^r by Cephes expf's polynomial (relative error ~1e-7); below -87 it returns ~0.
inline VERNE_BF16 __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// row[lo, hi) = exp(row - shift) in place; returns their sum (shift: the row's max in the
// forward, its log-sum-exp in the backward, which makes the values the probabilities).
inline VERNE_BF16 float ExpInPlace(float* row, int64_t lo, int64_t hi, float shift) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (int64_t j = lo; j < hi; j += 16) {
    const __mmask16 m = FirstLanes(hi - j);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), s));
    _mm512_mask_storeu_ps(row + j, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(sum);
}

inline VERNE_BF16 float RowMax(const float* row, int64_t lo, int64_t hi) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t j = lo; j < hi; j += 16) {
    best = _mm512_mask_max_ps(best, FirstLanes(hi - j), best, _mm512_maskz_loadu_ps(FirstLanes(hi - j), row + j));
  }
  return _mm512_reduce_max_ps(best);
}

// Zeroes row[from, lo) and row[hi, to): the keys a query may not see, within what a product reads.
inline void ZeroOutside(float* row, int64_t from, int64_t lo, int64_t hi, int64_t to) {
  if (lo > from) std::memset(row + from, 0, (lo - from) * sizeof(float));
  if (to > hi) std::memset(row + hi, 0, (to - hi) * sizeof(float));
}

// out [cols, rows] (row stride ldo) = aᵀ for a [rows, cols] (row stride lda; rows a multiple
// of 16): each 16 values of an output row gathered from 16 rows of a at once. perf put a third of
// the backward op's own samples in a scalar loop here, yet the gather measured no faster end to
// end (23.6 against 23.7 ms at gpt-small's slice): the time is the strided reads, not the copies.
inline VERNE_BF16 void Transpose(const float* a, int64_t rows, int64_t cols, int64_t lda, float* out, int64_t ldo) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(lda)));
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c = 0; c < cols; ++c) {
      _mm512_storeu_ps(out + c * ldo + r0, _mm512_i32gather_ps(offsets, a + r0 * lda + c, 4));
    }
  }
}

// a [rows, cols] float32 (row stride lda) transposed and rounded into out [cols, rows] (row stride ld).
inline void TransposeRound(const float* a, int64_t rows, int64_t cols, int64_t lda, int64_t ld, uint16_t* out,
                           std::vector<float>& scratch) {
  Transpose(a, rows, cols, lda, scratch.data(), rows);
  RoundRows(scratch.data(), cols, rows, rows, ld, out);
}

// What one thread's heads reuse, allocated once per op call and thread. (The packed matrices are
// allocated per head by bf16_products.h's packers: reusing them measured no faster.)
struct ForwardScratch {
  explicit ForwardScratch(const Dims& d)
      : logits(kBlock * d.steps), inverse(kBlock), rows(Rows(d.steps, d.depth_pad())),
        probs(Rows(kBlock, d.steps_pad())) {}
  std::vector<float> logits, inverse;
  Bf16Buffer rows, probs;
};

struct BackwardScratch {
  explicit BackwardScratch(const Dims& d)
      : probs(d.steps * d.steps), d_logits(d.steps * d.steps), dk_t(d.depth * d.steps), dv_t(d.depth * d.steps),
        q(Rows(std::max(d.steps, d.depth), std::max(d.depth_pad(), d.steps_pad()))),
        d_o(Rows(std::max(d.steps, d.depth), std::max(d.depth_pad(), d.steps_pad()))),
        block(Rows(kBlock, d.steps_pad())) {}
  std::vector<float> probs, d_logits, dk_t, dv_t;
  Bf16Buffer q, d_o, block;
};

// One head's forward: o [T, D] and the rows' log-sum-exp lse [T] from q, k, v [T, D] (rows of
// q, k, v and o d.stride() apart). The block's probabilities go into the product unnormalised
// (e^(s - max), in (0, 1]) and o's rows are divided by their sums after it: D values a row to
// scale instead of up to T.
void ForwardHead(const Dims& d, const float* q, const float* k, const float* v, float* o, float* lse,
                 ForwardScratch& s) {
  const int64_t T = d.steps, D = d.depth, S = d.stride();
  const PackedBf16 keys_t = PackTransposed(k, T, D, /*padded=*/true, S);  // [D, T]
  const PackedBf16 values = PackRows(v, T, D, /*padded=*/true, S);        // [T, D]
  RoundRows(q, T, S, D, d.depth_pad(), s.rows.get());
  for (int64_t first = 0; first < T; first += kBlock) {
    const int64_t last = std::min(T, first + kBlock), rows = last - first, lo = d.FirstKey(first);
    Product(s.rows.get() + first * d.depth_pad(), d.depth_pad(), rows, keys_t, 0, D, lo, last, s.logits.data(), T);
    for (int64_t i = first; i < last; ++i) {
      float* row = s.logits.data() + (i - first) * T;
      const int64_t seen = std::max<int64_t>(0, i - d.window + 1);
      const float top = RowMax(row, seen, i + 1);
      const float sum = ExpInPlace(row, seen, i + 1, top);
      ZeroOutside(row, lo, seen, i + 1, last);
      s.inverse[i - first] = 1.0f / sum;
      lse[i] = top + std::log(sum);
    }
    RoundRows(s.logits.data() + lo, rows, T, last - lo, d.steps_pad(), s.probs.get());
    Product(s.probs.get(), d.steps_pad(), rows, values, lo, last, 0, D, o + first * S, S);
    for (int64_t i = first; i < last; ++i) {
      Eigen::Map<Eigen::ArrayXf>(o + i * S, D) *= s.inverse[i - first];
    }
  }
}

// One head's backward: dq, dk, dv [T, D] from the forward's inputs, o, lse and do.
void BackwardHead(const Dims& d, const float* q, const float* k, const float* v, const float* o, const float* lse,
                  const float* d_o, float* dq, float* dk, float* dv, BackwardScratch& s) {
  const int64_t T = d.steps, D = d.depth, S = d.stride();
  const PackedBf16 keys_t = PackTransposed(k, T, D, /*padded=*/true, S);    // [D, T]
  const PackedBf16 values_t = PackTransposed(v, T, D, /*padded=*/true, S);  // [D, T]
  const PackedBf16 keys = PackRows(k, T, D, /*padded=*/true, S);            // [T, D]
  RoundRows(q, T, S, D, d.depth_pad(), s.q.get());
  RoundRows(d_o, T, S, D, d.depth_pad(), s.d_o.get());
  for (int64_t first = 0; first < T; first += kBlock) {
    const int64_t last = std::min(T, first + kBlock), rows = last - first, lo = d.FirstKey(first);
    float* p = s.probs.data() + first * T;
    float* ds = s.d_logits.data() + first * T;
    Product(s.q.get() + first * d.depth_pad(), d.depth_pad(), rows, keys_t, 0, D, lo, last, p, T);
    Product(s.d_o.get() + first * d.depth_pad(), d.depth_pad(), rows, values_t, 0, D, lo, last, ds, T);
    for (int64_t i = first; i < last; ++i) {
      float* p_row = p + (i - first) * T;
      float* ds_row = ds + (i - first) * T;
      const int64_t seen = std::max<int64_t>(0, i - d.window + 1);
      ExpInPlace(p_row, seen, i + 1, lse[i]);
      // d(logit) = p (dp - Σ_j p dp) and Σ_j p dp = do · o.
      const float row_dot = Eigen::Map<const Eigen::VectorXf>(d_o + i * S, D).dot(
          Eigen::Map<const Eigen::VectorXf>(o + i * S, D));
      for (int64_t j = seen; j <= i; ++j) ds_row[j] = p_row[j] * (ds_row[j] - row_dot);
      ZeroOutside(p_row, 0, seen, i + 1, last);
      ZeroOutside(ds_row, 0, seen, i + 1, last);
    }
    RoundRows(ds + lo, rows, T, last - lo, d.steps_pad(), s.block.get());
    Product(s.block.get(), d.steps_pad(), rows, keys, lo, last, 0, D, dq + first * S, S);
  }
  // dkᵀ = qᵀ d(logits) and dvᵀ = doᵀ p, key block by key block over the queries that see it.
  const PackedBf16 probs = PackRows(s.probs.data(), T, T, /*padded=*/true);
  const PackedBf16 d_logits = PackRows(s.d_logits.data(), T, T, /*padded=*/true);
  TransposeRound(q, T, D, S, d.steps_pad(), s.q.get(), s.dk_t);  // dk_t as scratch until the products
  TransposeRound(d_o, T, D, S, d.steps_pad(), s.d_o.get(), s.dk_t);
  for (int64_t first = 0; first < T; first += kBlock) {
    const int64_t last = std::min(T, first + kBlock), end = d.LastQuery(last);
    Product(s.q.get() + first, d.steps_pad(), D, d_logits, first, end, first, last, s.dk_t.data(), T);
    Product(s.d_o.get() + first, d.steps_pad(), D, probs, first, end, first, last, s.dv_t.data(), T);
  }
  Transpose(s.dk_t.data(), D, T, T, dk, S);
  Transpose(s.dv_t.data(), D, T, T, dv, S);
}

#endif  // VERNE_X86_BF16

// Ops on CPUs without bfloat16 dot products refuse (native.py never calls them there).
bool CheckIsa(OpKernelContext* ctx) {
  if (Bf16Isa() != Isa::kFloat32) return true;
  ctx->SetStatus(tensorflow::errors::Unimplemented("verne's causal attention op needs bfloat16 dot products"));
  return false;
}

class AttentionOp : public OpKernel {
 public:
  explicit AttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("window", &window_));
  }

 protected:
  int64_t window_ = 0;
};

}  // namespace

REGISTER_OP("VerneCausalAttention")
    .Attr("window: int")
    .Input("q: float")
    .Input("k: float")
    .Input("v: float")
    .Output("o: float")
    .Output("lse: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
      c->set_output(0, q);
      c->set_output(1, c->MakeShape({c->Dim(q, 0), c->Dim(q, 2), c->Dim(q, 1)}));
      return tensorflow::OkStatus();
    });

class CausalAttentionOp : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!CheckShapes(ctx, {1, 2}, window_, &d) || !CheckIsa(ctx)) return;
    Tensor *o, *lse;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &o));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({d.batch, d.heads, d.steps}), &lse));
#ifdef VERNE_X86_BF16
    const float* q = ctx->input(0).flat<float>().data();
    const float* k = ctx->input(1).flat<float>().data();
    const float* v = ctx->input(2).flat<float>().data();
    float* o_p = o->flat<float>().data();
    float* lse_p = lse->flat<float>().data();
    ForEachBlock(ctx, d.units(), [&](int64_t first, int64_t last) {
      ForwardScratch scratch(d);
      for (int64_t n = first; n < last; ++n) {
        const int64_t at = d.Offset(n);
        ForwardHead(d, q + at, k + at, v + at, o_p + at, lse_p + n * d.steps, scratch);
      }
    });
#endif
  }
};

REGISTER_OP("VerneCausalAttentionGrad")
    .Attr("window: int")
    .Input("q: float")
    .Input("k: float")
    .Input("v: float")
    .Input("o: float")
    .Input("lse: float")
    .Input("d_o: float")
    .Output("dq: float")
    .Output("dk: float")
    .Output("dv: float")
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < 3; ++i) c->set_output(i, c->input(i));
      return tensorflow::OkStatus();
    });

class CausalAttentionGradOp : public AttentionOp {
 public:
  using AttentionOp::AttentionOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!CheckShapes(ctx, {1, 2, 3, 5}, window_, &d) || !CheckIsa(ctx)) return;
    OP_REQUIRES(ctx, ctx->input(4).shape() == TensorShape({d.batch, d.heads, d.steps}),
                InvalidArgument("lse must be [B, H, T]"));
    Tensor *dq, *dk, *dv;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(0).shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(0).shape(), &dv));
#ifdef VERNE_X86_BF16
    const float* in[6];
    for (int i = 0; i < 6; ++i) in[i] = ctx->input(i).flat<float>().data();
    float* out[3] = {dq->flat<float>().data(), dk->flat<float>().data(), dv->flat<float>().data()};
    ForEachBlock(ctx, d.units(), [&](int64_t first, int64_t last) {
      BackwardScratch scratch(d);
      for (int64_t n = first; n < last; ++n) {
        const int64_t at = d.Offset(n);
        BackwardHead(d, in[0] + at, in[1] + at, in[2] + at, in[3] + at, in[4] + n * d.steps, in[5] + at,
                     out[0] + at, out[1] + at, out[2] + at, scratch);
      }
    });
#endif
  }
};

REGISTER_KERNEL_BUILDER(Name("VerneCausalAttention").Device(DEVICE_CPU), CausalAttentionOp);
REGISTER_KERNEL_BUILDER(Name("VerneCausalAttentionGrad").Device(DEVICE_CPU), CausalAttentionGradOp);

}  // namespace verne

