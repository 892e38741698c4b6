// MIDL's sparse inference forward as an XLA FFI custom call, for JAX on
// CPU: `midl_sparse_forward` (select_gather.c) on XLA's buffers, in place,
// inside a jitted function. Built with select_gather.c by
// keras_midl/native/__init__.py against jaxlib's FFI headers, registered
// as the target "keras_midl_sparse_forward". An empty (0-element) buffer
// stands for a missing weight (a bias, or the light kernel of
// light_path="zero").
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void midl_sparse_forward(
    const float *rows, int64_t count, int64_t dim, const float *projection,
    int64_t rank, const float *gate_kernel, const float *gate_bias,
    const float *light_kernel, const float *light_bias, const float *kernel,
    const float *bias, int64_t units, int64_t k, float *outputs,
    int64_t *selected, float *scratch);

static const float *OrNull(ffi::Buffer<ffi::F32> &buffer) {
  return buffer.element_count() ? buffer.typed_data() : nullptr;
}

static ffi::Error SparseForward(
    ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::F32> projection,
    ffi::Buffer<ffi::F32> gate_kernel, ffi::Buffer<ffi::F32> gate_bias,
    ffi::Buffer<ffi::F32> light_kernel, ffi::Buffer<ffi::F32> light_bias,
    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias, int64_t k,
    ffi::ResultBuffer<ffi::F32> outputs) {
  const auto rows_dims = rows.dimensions();
  const auto kernel_dims = kernel.dimensions();
  const auto projection_dims = projection.dimensions();
  if (rows_dims.size() != 2 || kernel_dims.size() != 2 ||
      projection_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "keras_midl_sparse_forward: rows, kernel and projection must be 2-D");
  }
  const int64_t count = rows_dims[0], dim = rows_dims[1];
  const int64_t units = kernel_dims[0], rank = projection_dims[1];
  if (kernel_dims[1] != dim || projection_dims[0] != dim || k < 1 ||
      k > units) {
    return ffi::Error::InvalidArgument(
        "keras_midl_sparse_forward: mismatched shapes or k");
  }
  std::vector<int64_t> selected(count * k);
  std::vector<float> scratch(rank + 3 * units);
  midl_sparse_forward(rows.typed_data(), count, dim, projection.typed_data(),
                      rank, gate_kernel.typed_data(), OrNull(gate_bias),
                      OrNull(light_kernel), OrNull(light_bias),
                      kernel.typed_data(), OrNull(bias), units, k,
                      outputs->typed_data(), selected.data(), scratch.data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MidlSparseForward, SparseForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>());
