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
// bf16_products.h, shared with native_matmul.cc); elsewhere they stay float32.
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

#include "Eigen/Core"
#include "bf16_products.h"  // the bfloat16 products, shared with native_matmul.cc
#include "tf_op.h"

namespace verne {

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

    ForEachBlock(ctx, B, [&](int64_t first, int64_t last) {
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

    ForEachBlock(ctx, B, [&](int64_t first, int64_t last) {
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

    ForEachBlock(ctx, B, [&](int64_t first, int64_t last) {
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

    ForEachBlock(ctx, B, [&](int64_t first, int64_t last) {
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
