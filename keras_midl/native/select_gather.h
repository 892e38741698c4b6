/* The functions of select_gather.c that the C++ sources call (tf_ops.cc,
 * jax_ffi.cc): one declaration, which select_gather.c includes too, so
 * that the compiler checks it against the definitions. */
#ifndef KERAS_MIDL_SELECT_GATHER_H_
#define KERAS_MIDL_SELECT_GATHER_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int64_t midl_topk_mask(const float *scores, int64_t count, int64_t units,
                       int64_t k, float *mask, float *scratch,
                       int64_t threads);
void midl_mix(const float *mask, const float *full, const float *light,
              const float *bias, const float *light_bias, int64_t size,
              int64_t units, float *outputs, float *scratch);
void midl_mix_backward(const float *upstream, const float *mask,
                       const float *soft, const float *full,
                       const float *light, const float *bias,
                       const float *light_bias, int64_t size,
                       float temperature, const float *column, int64_t units,
                       float *d_full, float *d_light, float *d_logits,
                       float *d_bias, float *d_light_bias, float *scratch);

#ifdef __cplusplus
}
#endif

#endif /* KERAS_MIDL_SELECT_GATHER_H_ */
