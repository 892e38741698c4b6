// MIDL's training selection as an XLA FFI handler, for JAX on a CPU.
//
// `MidlTopkMask` runs `midl_topk_mask` (select_gather.c, the same mask as
// `keras_midl.ops.topk_mask`) inside a compiled JAX function: one call
// where the bisection runs 20-32 passes over the scores, its rows shared
// among up to `threads` threads (the same mask on any count). Built by
// keras_midl/native/build.py against the FFI headers of the installed
// jaxlib (`jax.ffi.include_dir()`), registered by keras_midl/backend/jax.py.
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "select_gather.h"

namespace ffi = xla::ffi;

static ffi::Error TopkMask(ffi::Buffer<ffi::F32> scores,
                           ffi::ResultBuffer<ffi::F32> mask, int64_t k,
                           int64_t threads) {
  const auto dimensions = scores.dimensions();
  if (dimensions.size() == 0) {
    return ffi::Error::InvalidArgument("scores must have a rank of 1 or more");
  }
  const int64_t units = dimensions.back();
  const int64_t total = static_cast<int64_t>(scores.element_count());
  if (total == 0) return ffi::Error::Success();
  if (k < 1 || k > units) {
    return ffi::Error::InvalidArgument("k must be in [1, units]");
  }
  if (threads < 1) {
    return ffi::Error::InvalidArgument("threads must be 1 or more");
  }
  std::vector<float> scratch(3 * units);
  midl_topk_mask(scores.typed_data(), total / units, units, k,
                 mask->typed_data(), scratch.data(), threads);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MidlTopkMask, TopkMask,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads"));
