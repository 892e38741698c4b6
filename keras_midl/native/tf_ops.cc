// MIDL's training selection and straight-through mix as TensorFlow ops,
// for TensorFlow's training graphs on a CPU (Keras's `fit` and
// `train_on_batch` without XLA).
//
// `MidlTopkMask` runs `midl_topk_mask` (select_gather.c, the same mask as
// `keras_midl.ops.topk_mask`, on the intra-op pool's threads), `MidlMix`
// and `MidlMixGrad` the mix and its gradients (`midl_mix`,
// `midl_mix_backward`): one kernel each where the graph ran a
// `tf.numpy_function` (a Python call per step) and a dozen elementwise
// kernels. Built by keras_midl/native/build.py against
// the installed TensorFlow's headers, loaded and wrapped in a custom
// gradient by keras_midl/backend/tensorflow.py. An empty `light`, bias or
// `column` stands for none (NULL in the C functions). The mix adds the
// paths' biases and its gradient sums theirs, where the graph ran two
// adds and two sums over the rows.
#include <cstdint>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

#include "select_gather.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::InferenceContext;

// The data of a float tensor, or NULL where it is empty (none).
const float *DataOrNull(const Tensor &tensor) {
  return tensor.NumElements() ? tensor.flat<float>().data() : nullptr;
}

float *MutableDataOrNull(Tensor *tensor) {
  return tensor->NumElements() ? tensor->flat<float>().data() : nullptr;
}

// Whether `vector` is empty (none) or holds one float per unit.
bool IsNoneOrPerUnit(const Tensor &vector, int64_t units) {
  return vector.NumElements() == 0 ||
         (vector.dims() == 1 && vector.dim_size(0) == units);
}

// `3 * units` floats of scratch for `midl_mix` and `midl_mix_backward`.
tensorflow::Status MixScratch(OpKernelContext *context, int64_t units,
                              Tensor *scratch) {
  return context->allocate_temp(tensorflow::DT_FLOAT,
                                TensorShape({3 * units}), scratch);
}

// The threads of TensorFlow's intra-op pool, which share the rows of
// `midl_topk_mask` (the same mask on any count); one where the device
// has none.
int64_t IntraOpThreads(OpKernelContext *context) {
  const auto *pool = context->device()->tensorflow_cpu_worker_threads();
  return pool != nullptr && pool->num_threads > 1 ? pool->num_threads : 1;
}

class TopkMaskOp : public OpKernel {
 public:
  explicit TopkMaskOp(OpKernelConstruction *context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("k", &k_));
  }

  void Compute(OpKernelContext *context) override {
    const Tensor &scores = context->input(0);
    OP_REQUIRES(context, scores.dims() >= 1,
                InvalidArgument("scores must have a rank of 1 or more"));
    Tensor *mask = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, scores.shape(), &mask));
    if (scores.NumElements() == 0) return;
    const int64_t units = scores.dim_size(scores.dims() - 1);
    OP_REQUIRES(context, k_ <= units,
                InvalidArgument("k must be in [1, units]: k=", k_,
                                ", units=", units));
    Tensor scratch;
    OP_REQUIRES_OK(context,
                   context->allocate_temp(tensorflow::DT_FLOAT,
                                          TensorShape({3 * units}), &scratch));
    midl_topk_mask(scores.flat<float>().data(), scores.NumElements() / units,
                   units, k_, mask->flat<float>().data(),
                   scratch.flat<float>().data(), IntraOpThreads(context));
  }

 private:
  int64_t k_;
};

class MixOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext *context) override {
    const Tensor &mask = context->input(0);
    const Tensor &full = context->input(1);
    const Tensor &light = context->input(2);
    const Tensor &bias = context->input(3);
    const Tensor &light_bias = context->input(4);
    OP_REQUIRES(context, mask.shape() == full.shape(),
                InvalidArgument("mask and full must have one shape"));
    OP_REQUIRES(context,
                light.NumElements() == 0 || light.shape() == full.shape(),
                InvalidArgument("light must be empty or of full's shape"));
    OP_REQUIRES(context, full.dims() >= 1,
                InvalidArgument("full must have a rank of 1 or more"));
    const int64_t units = full.dim_size(full.dims() - 1);
    OP_REQUIRES(context,
                IsNoneOrPerUnit(bias, units) &&
                    IsNoneOrPerUnit(light_bias, units),
                InvalidArgument("bias and light_bias must be empty or hold "
                                "units floats"));
    Tensor *outputs = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, full.shape(), &outputs));
    if (full.NumElements() == 0) return;
    Tensor scratch;
    OP_REQUIRES_OK(context, MixScratch(context, units, &scratch));
    midl_mix(mask.flat<float>().data(), full.flat<float>().data(),
             DataOrNull(light), DataOrNull(bias), DataOrNull(light_bias),
             full.NumElements(), units, outputs->flat<float>().data(),
             scratch.flat<float>().data());
  }
};

class MixGradOp : public OpKernel {
 public:
  explicit MixGradOp(OpKernelConstruction *context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("temperature", &temperature_));
  }

  void Compute(OpKernelContext *context) override {
    const Tensor &full = context->input(3);
    const Tensor &light = context->input(4);
    const Tensor &bias = context->input(5);
    const Tensor &light_bias = context->input(6);
    const Tensor &column = context->input(7);
    for (int i = 0; i < 3; ++i) {
      OP_REQUIRES(context, context->input(i).shape() == full.shape(),
                  InvalidArgument("upstream, mask, soft and full must have "
                                  "one shape"));
    }
    OP_REQUIRES(context,
                light.NumElements() == 0 || light.shape() == full.shape(),
                InvalidArgument("light must be empty or of full's shape"));
    OP_REQUIRES(context, full.dims() >= 1,
                InvalidArgument("full must have a rank of 1 or more"));
    const int64_t units = full.dim_size(full.dims() - 1);
    OP_REQUIRES(context,
                IsNoneOrPerUnit(bias, units) &&
                    IsNoneOrPerUnit(light_bias, units) &&
                    IsNoneOrPerUnit(column, units),
                InvalidArgument("bias, light_bias and column must be empty "
                                "or hold units floats"));
    // A light bias without a light path gets no gradient (an empty one).
    const bool light_bias_used =
        light.NumElements() != 0 && light_bias.NumElements() != 0;
    Tensor *d_full = nullptr, *d_light = nullptr, *d_logits = nullptr;
    Tensor *d_bias = nullptr, *d_light_bias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, full.shape(), &d_full));
    OP_REQUIRES_OK(context,
                   context->allocate_output(1, light.shape(), &d_light));
    OP_REQUIRES_OK(context,
                   context->allocate_output(2, full.shape(), &d_logits));
    OP_REQUIRES_OK(context,
                   context->allocate_output(3, bias.shape(), &d_bias));
    OP_REQUIRES_OK(context,
                   context->allocate_output(
                       4, light_bias_used ? light_bias.shape()
                                          : TensorShape({0}),
                       &d_light_bias));
    // The sums of no rows, where `full` is empty.
    if (d_bias->NumElements()) d_bias->flat<float>().setZero();
    if (d_light_bias->NumElements()) d_light_bias->flat<float>().setZero();
    if (full.NumElements() == 0) return;
    Tensor scratch;
    OP_REQUIRES_OK(context, MixScratch(context, units, &scratch));
    midl_mix_backward(
        context->input(0).flat<float>().data(),
        context->input(1).flat<float>().data(),
        context->input(2).flat<float>().data(), full.flat<float>().data(),
        DataOrNull(light), DataOrNull(bias),
        light_bias_used ? DataOrNull(light_bias) : nullptr,
        full.NumElements(), temperature_, DataOrNull(column), units,
        d_full->flat<float>().data(), MutableDataOrNull(d_light),
        d_logits->flat<float>().data(), MutableDataOrNull(d_bias),
        MutableDataOrNull(d_light_bias), scratch.flat<float>().data());
  }

 private:
  float temperature_;
};

}  // namespace

REGISTER_OP("MidlTopkMask")
    .Input("scores: float")
    .Attr("k: int >= 1")
    .Output("mask: float")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);
REGISTER_KERNEL_BUILDER(Name("MidlTopkMask").Device(DEVICE_CPU), TopkMaskOp);

REGISTER_OP("MidlMix")
    .Input("mask: float")
    .Input("full: float")
    .Input("light: float")
    .Input("bias: float")
    .Input("light_bias: float")
    .Output("outputs: float")
    .SetShapeFn([](InferenceContext *context) {
      context->set_output(0, context->input(1));
      return tensorflow::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("MidlMix").Device(DEVICE_CPU), MixOp);

REGISTER_OP("MidlMixGrad")
    .Input("upstream: float")
    .Input("mask: float")
    .Input("soft: float")
    .Input("full: float")
    .Input("light: float")
    .Input("bias: float")
    .Input("light_bias: float")
    .Input("column: float")
    .Attr("temperature: float")
    .Output("d_full: float")
    .Output("d_light: float")
    .Output("d_logits: float")
    .Output("d_bias: float")
    .Output("d_light_bias: float")
    .SetShapeFn([](InferenceContext *context) {
      context->set_output(0, context->input(3));
      context->set_output(1, context->input(4));
      context->set_output(2, context->input(3));
      context->set_output(3, context->input(5));
      context->set_output(4, context->UnknownShapeOfRank(1));
      return tensorflow::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("MidlMixGrad").Device(DEVICE_CPU), MixGradOp);
