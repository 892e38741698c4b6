/* MIDL's sparse inference, in C.
 *
 * `gather_matvec` (internal): for each input row b and each of its k
 * selected neurons j:
 *
 *     values[b, j] = sum_i rows[b, i] * kernel[selected[b, j], i]
 *                    (+ bias[selected[b, j]])
 *
 * `midl_select_gather`: the selection too. From the gate logits it picks
 * the k neurons `keras_midl.selection.topk_mask` picks (NaN lowest,
 * subnormals as zero, ties at the threshold to the lowest indices), writes
 * their indices (increasing) and their full-path values into the output,
 * which holds the light path on entry. One call replaces the dozen small
 * tensor operations of the selection, the index computation and the
 * scatter.
 *
 * `midl_sparse_forward`: the whole forward of one layer, the gate and the
 * light path included (see its comment).
 *
 * `kernel` is MIDL's `(units, dim)` layout, so each selected neuron is one
 * contiguous row that is read in place (nothing is copied). Four neurons
 * are reduced at a time, one accumulator each: four independent chains of
 * multiply-adds and four memory streams, which the hardware prefetchers
 * follow (explicit prefetching measured slower), so the loop runs at the
 * memory bandwidth.
 *
 * Built by keras_midl/native/__init__.py with the system C compiler; with
 * AVX2 and FMA where the CPU has them, portable C otherwise.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define GROUP 4

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BLOCK 8

static float sum_lanes(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v);
  __m128 high = _mm256_extractf128_ps(v, 1);
  low = _mm_add_ps(low, high);
  low = _mm_hadd_ps(low, low);
  low = _mm_hadd_ps(low, low);
  return _mm_cvtss_f32(low);
}

/* Dot products of the four rows r[t] with x over [0, blocked). */
static void dot_four(const float *const r[GROUP], const float *x,
                     int64_t blocked, float out[GROUP]) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocked; i += BLOCK) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r[0] + i), xi, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r[1] + i), xi, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r[2] + i), xi, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r[3] + i), xi, a3);
  }
  out[0] = sum_lanes(a0);
  out[1] = sum_lanes(a1);
  out[2] = sum_lanes(a2);
  out[3] = sum_lanes(a3);
}
#else
#define BLOCK 8

/* Portable: BLOCK partial sums per row, which compilers vectorize (SSE,
 * NEON, ...). */
static void dot_four(const float *const r[GROUP], const float *x,
                     int64_t blocked, float out[GROUP]) {
  float partial[GROUP][BLOCK] = {{0}};
  for (int64_t i = 0; i < blocked; i += BLOCK) {
    for (int t = 0; t < GROUP; ++t) {
      for (int l = 0; l < BLOCK; ++l) {
        partial[t][l] += r[t][i + l] * x[i + l];
      }
    }
  }
  for (int t = 0; t < GROUP; ++t) {
    float sum = 0.0f;
    for (int l = 0; l < BLOCK; ++l) {
      sum += partial[t][l];
    }
    out[t] = sum;
  }
}
#endif

/* `rows`: (count, dim); `kernel`: (units, dim); `selected`: (count, k),
 * each in [0, units); `bias`: (units,) or NULL; `values`: (count, k).
 * Every array is C-contiguous float32 (int64 for `selected`). */
static void gather_matvec(const float *kernel, int64_t dim,
                          const float *rows, int64_t count,
                          const int64_t *selected, int64_t k,
                          const float *bias, float *values) {
  const int64_t blocked = dim - dim % BLOCK;
  for (int64_t b = 0; b < count; ++b) {
    const float *x = rows + b * dim;
    const int64_t *row_selected = selected + b * k;
    float *row_values = values + b * k;
    for (int64_t j = 0; j < k; j += GROUP) {
      /* A short last group repeats its last neuron. */
      int64_t neuron[GROUP];
      const float *r[GROUP];
      float sums[GROUP];
      for (int t = 0; t < GROUP; ++t) {
        neuron[t] = row_selected[j + t < k ? j + t : k - 1];
        r[t] = kernel + neuron[t] * dim;
      }
      dot_four(r, x, blocked, sums);
      for (int t = 0; t < GROUP && j + t < k; ++t) {
        float sum = sums[t];
        for (int64_t i = blocked; i < dim; ++i) {
          sum += r[t][i] * x[i];
        }
        row_values[j + t] = bias ? sum + bias[neuron[t]] : sum;
      }
    }
  }
}

/* The k-th largest of a[0..n) (1 <= k <= n), by quickselect; reorders a.
 * No NaN in a. */
static float kth_largest(float *a, int64_t n, int64_t k) {
  int64_t low = 0, high = n - 1;
  const int64_t target = k - 1; /* position in decreasing order */
  while (low < high) {
    const float pivot = a[low + (high - low) / 2];
    int64_t i = low, j = high;
    while (i <= j) {
      while (a[i] > pivot) ++i;
      while (a[j] < pivot) --j;
      if (i <= j) {
        const float swap = a[i];
        a[i] = a[j];
        a[j] = swap;
        ++i;
        --j;
      }
    }
    /* a[low..j] >= pivot, a[i..high] <= pivot, a[j+1..i-1] == pivot. */
    if (target <= j) {
      high = j;
    } else if (target >= i) {
      low = i;
    } else {
      return a[target];
    }
  }
  return a[target];
}

/* `logits`: (count, units) float32; `kernel`: (units, dim); `rows`:
 * (count, dim); `bias`: (units,) or NULL; `outputs`: (count, units), the
 * light path on entry; `selected`: (count, k) int64, written; `scratch`:
 * 2 * units floats. 1 <= k <= units. */
void midl_select_gather(const float *logits, int64_t units,
                        const float *kernel, int64_t dim, const float *rows,
                        int64_t count, int64_t k, const float *bias,
                        float *outputs, int64_t *selected, float *scratch) {
  float *clean = scratch, *order = scratch + units;
  for (int64_t b = 0; b < count; ++b) {
    const float *row_logits = logits + b * units;
    for (int64_t j = 0; j < units; ++j) {
      float v = row_logits[j];
      if (isnan(v)) v = -INFINITY;
      if (fabsf(v) < FLT_MIN) v = 0.0f;
      clean[j] = order[j] = v;
    }
    const float threshold = kth_largest(order, units, k);
    int64_t above = 0;
    for (int64_t j = 0; j < units; ++j) above += clean[j] > threshold;
    int64_t tied_needed = k - above, slot = 0;
    int64_t *row_selected = selected + b * k;
    for (int64_t j = 0; j < units && slot < k; ++j) {
      if (clean[j] > threshold) {
        row_selected[slot++] = j;
      } else if (clean[j] == threshold && tied_needed > 0) {
        row_selected[slot++] = j;
        --tied_needed;
      }
    }
    float *values = order; /* the copy is no longer needed */
    gather_matvec(kernel, dim, rows + b * dim, 1, row_selected, k, bias,
                  values);
    float *row_outputs = outputs + b * units;
    for (int64_t j = 0; j < k; ++j) row_outputs[row_selected[j]] = values[j];
  }
}

/* The whole inference forward of one MIDL layer (before the activation):
 *
 *     z = x V;  s = z G + c;  h = z U + b_lite  (or 0);
 *     y = h, with y[j] = x . kernel[j] + b[j] for the k neurons of s.
 *
 * `projection` V: (dim, rank); `gate_kernel` G, `light_kernel` U:
 * (rank, units); `gate_bias` c, `light_bias`, `bias`: (units,) or NULL
 * (`light_kernel` NULL: h = 0). `outputs`: (count, units); `selected`:
 * (count, k); `scratch`: rank + 3 * units floats. The gate's sums run in
 * this order, not BLAS's: where two logits are within rounding of each
 * other at the threshold, the selection may differ from a BLAS gate's. */
void midl_sparse_forward(const float *rows, int64_t count, int64_t dim,
                         const float *projection, int64_t rank,
                         const float *gate_kernel, const float *gate_bias,
                         const float *light_kernel, const float *light_bias,
                         const float *kernel, const float *bias,
                         int64_t units, int64_t k, float *outputs,
                         int64_t *selected, float *scratch) {
  float *code = scratch, *logits = scratch + rank;
  float *select_scratch = logits + units;
  for (int64_t b = 0; b < count; ++b) {
    const float *x = rows + b * dim;
    float *y = outputs + b * units;
    for (int64_t r = 0; r < rank; ++r) code[r] = 0.0f;
    for (int64_t i = 0; i < dim; ++i) {
      const float xi = x[i];
      const float *v = projection + i * rank;
      for (int64_t r = 0; r < rank; ++r) code[r] += xi * v[r];
    }
    for (int64_t j = 0; j < units; ++j) {
      logits[j] = gate_bias ? gate_bias[j] : 0.0f;
      y[j] = light_bias && light_kernel ? light_bias[j] : 0.0f;
    }
    for (int64_t r = 0; r < rank; ++r) {
      const float zr = code[r];
      const float *g = gate_kernel + r * units;
      for (int64_t j = 0; j < units; ++j) logits[j] += zr * g[j];
      if (light_kernel) {
        const float *u = light_kernel + r * units;
        for (int64_t j = 0; j < units; ++j) y[j] += zr * u[j];
      }
    }
    midl_select_gather(logits, units, kernel, dim, x, 1, k, bias, y,
                       selected + b * k, select_scratch);
  }
}
