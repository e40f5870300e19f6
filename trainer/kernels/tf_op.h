// What both TensorFlow op files (native_recurrences.cc, native_attention.cc) take from TensorFlow:
// the framework's names, and splitting independent work across the op's intra-op threads.
#ifndef VERNE_TF_OP_H_
#define VERNE_TF_OP_H_

#include <algorithm>
#include <cstdint>

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

// Splits items [0, count) (batch rows, heads) into one block per intra-op thread and runs
// fn(first, last) on each.
template <typename Fn>
void ForEachBlock(OpKernelContext* ctx, int64_t count, Fn fn) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(count, pool->NumThreads()));
  const int64_t block_size = (count + blocks - 1) / blocks;
  pool->TransformRangeConcurrently(block_size, count, [&](int64_t first, int64_t last) { fn(first, last); });
}

}  // namespace verne

#endif  // VERNE_TF_OP_H_
