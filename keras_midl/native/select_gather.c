/* MIDL's sparse inference, in C.
 *
 * `gather_selected` (internal): for each input row b and each of its k
 * selected neurons j:
 *
 *     outputs[b, j] = sum_i rows[b, i] * kernel[j, i] (+ bias[j])
 *
 * With several rows, each neuron selected by any row of a block of up to
 * 64 rows is read from memory once, not once per row (`gather_block`): at
 * batch 2 and k_ratio 0.45 the union of the selections is about 70% of
 * the neurons, not 90%.
 *
 * `midl_select_gather`: the selection too. From the gate logits it picks
 * the k neurons `keras_midl.ops.topk_mask` picks (NaN lowest,
 * subnormals as zero, ties at the threshold to the lowest indices), writes
 * their indices (increasing) and their full-path values into the output,
 * which holds the light path on entry. One call replaces the dozen small
 * tensor operations of the selection, the index computation and the
 * scatter.
 *
 * `midl_sparse_forward`: the whole forward of one layer, the gate and the
 * light path included (see its comment); `midl_sparse_forward_int8` the
 * same with an int8 kernel (`model.quantize("int8")`), whose selected rows
 * are read in place, a quarter of the float bytes. The three share the
 * selected neurons' dot products among up to `threads` threads (see
 * "Threads" below), with the same outputs, bit for bit, on any count.
 *
 * `midl_select_mix`: the masked path's output at inference from the
 * full and light paths computed without their biases, in one pass with
 * no mask (keras_midl/backend/torch.py).
 *
 * `midl_topk_mask`, `midl_mix` and `midl_mix_backward`: the training
 * selection (the same mask as `topk_mask`) and the straight-through mix
 * with its gradients, each one pass where eager frameworks run a dozen
 * kernels (keras_midl/backend/torch.py, tensorflow.py). The selections
 * take `threads` too; the mix and its gradients run on one thread.
 *
 * `kernel` is MIDL's `(units, dim)` layout, so each selected neuron is one
 * contiguous row that is read in place (nothing is copied). Eight neurons
 * are reduced at a time, one accumulator each: eight independent chains of
 * multiply-adds and eight memory streams, which the hardware prefetchers
 * follow (explicit prefetching measured slower), so the loop runs at the
 * memory bandwidth. One thread, d = n = 4096, k = 1843, AMD EPYC: eight
 * rows at a time took 0.92x the time of four, six 0.96x, twelve 1.19x
 * (more accumulators than AVX2 has registers).
 *
 * Built by keras_midl/native/build.py with the system C compiler; with
 * AVX2 and FMA (and AVX-512 VNNI for the int8 sums, MIDL_AVX512_VNNI)
 * where the CPU has them, portable C otherwise.
 */
#define _GNU_SOURCE /* pthreads and RTLD_DEFAULT under -std=c99 */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "select_gather.h"

#define GROUP 8

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

/* Dot products of the GROUP rows r[t] with x over [0, blocked). */
static void dot_group(const float *const r[GROUP], const float *x,
                      int64_t blocked, float out[GROUP]) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 a4 = _mm256_setzero_ps(), a5 = _mm256_setzero_ps();
  __m256 a6 = _mm256_setzero_ps(), a7 = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocked; i += BLOCK) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r[0] + i), xi, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r[1] + i), xi, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r[2] + i), xi, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r[3] + i), xi, a3);
    a4 = _mm256_fmadd_ps(_mm256_loadu_ps(r[4] + i), xi, a4);
    a5 = _mm256_fmadd_ps(_mm256_loadu_ps(r[5] + i), xi, a5);
    a6 = _mm256_fmadd_ps(_mm256_loadu_ps(r[6] + i), xi, a6);
    a7 = _mm256_fmadd_ps(_mm256_loadu_ps(r[7] + i), xi, a7);
  }
  out[0] = sum_lanes(a0);
  out[1] = sum_lanes(a1);
  out[2] = sum_lanes(a2);
  out[3] = sum_lanes(a3);
  out[4] = sum_lanes(a4);
  out[5] = sum_lanes(a5);
  out[6] = sum_lanes(a6);
  out[7] = sum_lanes(a7);
}
#else
#define BLOCK 8

/* Portable: BLOCK partial sums per row, which compilers vectorize (SSE,
 * NEON, ...). */
static void dot_group(const float *const r[GROUP], const float *x,
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

/* The GROUP dot products of x with the rows r[t], tails included. */
static void dots(const float *const r[GROUP], const float *x, int64_t dim,
                 float sums[GROUP]) {
  const int64_t blocked = dim - dim % BLOCK;
  dot_group(r, x, blocked, sums);
  for (int t = 0; t < GROUP; ++t) {
    for (int64_t i = blocked; i < dim; ++i) sums[t] += r[t][i] * x[i];
  }
}

/* int8 kernels (`model.quantize("int8")`): row j holds q[j, i] with
 * W[i, j] ~ q[j, i] / kernel_scale[j]. Two ways to take a dot product:
 *
 * - quantized inputs (Keras's default AbsMaxQuantizer): each input row is
 *   quantized as Keras quantizes it, xq = clip(round(x * s), -127, 127)
 *   with s = 127 / (max|x| + 1e-7), the products are summed exactly in
 *   int32, and the result is sum / (kernel_scale[j] * s): the value of
 *   Keras's int8 path, up to float rounding in the division;
 * - float inputs (a quantization config without an input quantizer):
 *   the int8 weights are converted to float in registers. */
#if defined(MIDL_AVX512_VNNI) && defined(__AVX2__) && \
    (defined(__GNUC__) || defined(__clang__))
/* AVX-512 VNNI (build.py defines MIDL_AVX512_VNNI where the CPU has it;
 * only this function is compiled for AVX-512, through its `target`
 * attribute, so the float paths keep their AVX2 code): `dpbusd` sums four
 * unsigned-by-signed byte products into each int32 lane, 64 bytes per
 * instruction. The inputs are offset to unsigned, u = xq + 128 (in `ax`),
 * and the offset's share, 128 * sum_i w[i], is subtracted by a second
 * `dpbusd` of the weights with a vector of 128s: exact int32 sums, in
 * three instructions per 64 bytes (load, two `dpbusd`) instead of five
 * per 32 (load, sign, maddubs, madd, add). Measured on a Xeon with
 * AVX-512 VNNI (d = n = 4096, k = 1843, warm caches): one row 0.43 ->
 * 0.40 ms (the read of the rows bounds it), eight rows 4.3 -> 4.0 ms. */
#define QBLOCK 64
#define QDOT_OFFSET 1

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void qdot_group(const int8_t *const r[GROUP], const int8_t *xq,
                       const int8_t *ax, int64_t blocked,
                       int32_t out[GROUP]) {
  (void)xq;
  const __m512i offset = _mm512_set1_epi8((char)128);
  __m512i a[GROUP], o[GROUP];
  for (int t = 0; t < GROUP; ++t) {
    a[t] = _mm512_setzero_si512();
    o[t] = _mm512_setzero_si512();
  }
  for (int64_t i = 0; i < blocked; i += QBLOCK) {
    const __m512i ui = _mm512_loadu_si512((const void *)(ax + i));
    for (int t = 0; t < GROUP; ++t) {
      const __m512i w = _mm512_loadu_si512((const void *)(r[t] + i));
      a[t] = _mm512_dpbusd_epi32(a[t], ui, w);
      o[t] = _mm512_dpbusd_epi32(o[t], offset, w);
    }
  }
  for (int t = 0; t < GROUP; ++t) {
    out[t] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a[t], o[t]));
  }
}
#else
/* Otherwise `ax` holds |xq|. */
#define QBLOCK 32
#define QDOT_OFFSET 0
#endif

#if defined(__AVX2__) && defined(__FMA__)
#if !QDOT_OFFSET
static int32_t sum_lanes_i32(__m256i v) {
  __m128i low = _mm256_castsi256_si128(v);
  __m128i high = _mm256_extracti128_si256(v, 1);
  low = _mm_add_epi32(low, high);
  low = _mm_hadd_epi32(low, low);
  low = _mm_hadd_epi32(low, low);
  return _mm_cvtsi128_si32(low);
}

/* Integer dot products of the GROUP int8 rows r[t] with xq (whose absolute
 * values are in ax) over [0, blocked), blocked a multiple of QBLOCK.
 * maddubs multiplies unsigned by signed bytes: |xq| times w with the sign
 * of xq; |xq|, |w| <= 127, so the int16 pair sums cannot saturate. */
static void qdot_group(const int8_t *const r[GROUP], const int8_t *xq,
                       const int8_t *ax, int64_t blocked,
                       int32_t out[GROUP]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a[GROUP];
  for (int t = 0; t < GROUP; ++t) a[t] = _mm256_setzero_si256();
  for (int64_t i = 0; i < blocked; i += QBLOCK) {
    const __m256i xi = _mm256_loadu_si256((const __m256i *)(xq + i));
    const __m256i ai = _mm256_loadu_si256((const __m256i *)(ax + i));
    for (int t = 0; t < GROUP; ++t) {
      const __m256i w = _mm256_loadu_si256((const __m256i *)(r[t] + i));
      const __m256i p = _mm256_maddubs_epi16(ai, _mm256_sign_epi8(w, xi));
      a[t] = _mm256_add_epi32(a[t], _mm256_madd_epi16(p, ones));
    }
  }
  for (int t = 0; t < GROUP; ++t) out[t] = sum_lanes_i32(a[t]);
}
#endif

/* Float inputs, int8 rows: eight weights at a time widened to float. */
static void fdot_group_i8(const int8_t *const r[GROUP], const float *x,
                          int64_t blocked, float out[GROUP]) {
  __m256 a[GROUP];
  for (int t = 0; t < GROUP; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocked; i += BLOCK) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    for (int t = 0; t < GROUP; ++t) {
      const __m128i w8 = _mm_loadl_epi64((const __m128i *)(r[t] + i));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8));
      a[t] = _mm256_fmadd_ps(w, xi, a[t]);
    }
  }
  for (int t = 0; t < GROUP; ++t) out[t] = sum_lanes(a[t]);
}
#else
static void qdot_group(const int8_t *const r[GROUP], const int8_t *xq,
                       const int8_t *ax, int64_t blocked,
                       int32_t out[GROUP]) {
  (void)ax;
  for (int t = 0; t < GROUP; ++t) {
    int32_t sum = 0;
    for (int64_t i = 0; i < blocked; ++i) sum += (int32_t)r[t][i] * xq[i];
    out[t] = sum;
  }
}

static void fdot_group_i8(const int8_t *const r[GROUP], const float *x,
                          int64_t blocked, float out[GROUP]) {
  float partial[GROUP][BLOCK] = {{0}};
  for (int64_t i = 0; i < blocked; i += BLOCK) {
    for (int t = 0; t < GROUP; ++t) {
      for (int l = 0; l < BLOCK; ++l) {
        partial[t][l] += (float)r[t][i + l] * x[i + l];
      }
    }
  }
  for (int t = 0; t < GROUP; ++t) {
    float sum = 0.0f;
    for (int l = 0; l < BLOCK; ++l) sum += partial[t][l];
    out[t] = sum;
  }
}
#endif

/* Keras's AbsMaxQuantizer on one row: xq, |xq| and the scale s. */
static float quantize_row(const float *x, int64_t dim, int8_t *xq,
                          int8_t *ax) {
  float peak = 0.0f;
  for (int64_t i = 0; i < dim; ++i) {
    const float v = fabsf(x[i]);
    if (v > peak) peak = v;
  }
  const float scale = 127.0f / (peak + 1e-7f);
  for (int64_t i = 0; i < dim; ++i) {
    float q = nearbyintf(x[i] * scale); /* half to even, as ops.round */
    q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
    xq[i] = (int8_t)q;
#if QDOT_OFFSET
    ax[i] = (int8_t)(uint8_t)(q + 128.0f); /* unsigned xq + 128 */
#else
    ax[i] = (int8_t)(q < 0 ? -q : q);
#endif
  }
  return scale;
}

/* What the gather reads: the kernel (float, or int8 with its per-neuron
 * scales) and the input rows (float; for int8 with quantized inputs also
 * their quantized values, absolute values and scales, `dim` bytes each). */
struct full_path {
  const float *kernel;
  const int8_t *qkernel;
  const float *kernel_scale;
  const float *bias;
  int64_t dim;
  const float *rows;
  const int8_t *qrows;
  const int8_t *arows;
  const float *row_scales;
};

/* Full-path values of neurons `neuron[0..GROUP)` for row `b`. */
static void path_dots(const struct full_path *p, const int64_t *neuron,
                      int64_t b, float sums[GROUP]) {
  const int64_t dim = p->dim;
  if (!p->qkernel) {
    const float *r[GROUP];
    for (int t = 0; t < GROUP; ++t) r[t] = p->kernel + neuron[t] * dim;
    dots(r, p->rows + b * dim, dim, sums);
  } else if (p->qrows) {
    const int8_t *r[GROUP];
    const int8_t *xq = p->qrows + b * dim, *ax = p->arows + b * dim;
    int32_t acc[GROUP];
    const int64_t blocked = dim - dim % QBLOCK;
    for (int t = 0; t < GROUP; ++t) r[t] = p->qkernel + neuron[t] * dim;
    qdot_group(r, xq, ax, blocked, acc);
    for (int t = 0; t < GROUP; ++t) {
      for (int64_t i = blocked; i < dim; ++i) acc[t] += (int32_t)r[t][i] * xq[i];
      const float scale = p->kernel_scale[neuron[t]] * p->row_scales[b];
      sums[t] = (float)acc[t] / scale;
    }
  } else {
    const int8_t *r[GROUP];
    const float *x = p->rows + b * dim;
    const int64_t blocked = dim - dim % BLOCK;
    for (int t = 0; t < GROUP; ++t) r[t] = p->qkernel + neuron[t] * dim;
    fdot_group_i8(r, x, blocked, sums);
    for (int t = 0; t < GROUP; ++t) {
      for (int64_t i = blocked; i < dim; ++i) sums[t] += r[t][i] * x[i];
      sums[t] /= p->kernel_scale[neuron[t]];
    }
  }
  if (p->bias) {
    for (int t = 0; t < GROUP; ++t) sums[t] += p->bias[neuron[t]];
  }
}

/* One row: outputs[selected[j]] = x . kernel[selected[j]] (+ bias), for
 * the groups of GROUP selected neurons [first, end). */
static void gather_row(const struct full_path *p, int64_t b,
                       const int64_t *selected, int64_t k, float *outputs,
                       int64_t first, int64_t end) {
  for (int64_t j = first * GROUP; j < k && j < end * GROUP; j += GROUP) {
    /* A short last group repeats its last neuron. */
    int64_t neuron[GROUP];
    float sums[GROUP];
    for (int t = 0; t < GROUP; ++t) {
      neuron[t] = selected[j + t < k ? j + t : k - 1];
    }
    path_dots(p, neuron, b, sums);
    for (int t = 0; t < GROUP && j + t < k; ++t) outputs[neuron[t]] = sums[t];
  }
}

/* Threads. A call of the gathered forward may share its dot products
 * among up to `threads` threads (the caller's intra-op thread count):
 * at batch 1 the selected rows of a 4096 x 4096 kernel are 30 MB, which
 * one thread reads at one core's share of the memory bandwidth, while
 * the frameworks' Dense reads its whole kernel on every core. Each output
 * is computed by one thread, in the same order whatever the thread
 * count, so the outputs are bitwise the same for any count. Threads run
 * only where each gets at least MIN_BYTES_PER_THREAD of kernel rows. The
 * selection (`midl_topk_mask`, `midl_select_mix`) shares its rows the
 * same way (see MIN_SCORES_PER_THREAD).
 *
 * Which threads: where the process has loaded GNU OpenMP into its global
 * scope (PyTorch's CPU builds, for their intra-op threads), that
 * runtime's team: the threads PyTorch's last operation ran on, which
 * spin for the next parallel region for milliseconds and would hold the
 * cores that threads of our own need (two threads of our own ran no
 * faster than one in a PyTorch process here). Elsewhere (TensorFlow,
 * JAX, whose pools park their threads), threads of our own, started per
 * call on the CPUs the caller is not on (`away_from_this_cpu`). The
 * tasks are shared in chunks (`shared_tasks`), so a thread that starts
 * late, or not at all, leaves its chunks to the others. */
#define MAX_THREADS 64
#define MIN_BYTES_PER_THREAD ((int64_t)1 << 20)

/* At most `threads` threads, at least one, and `least` or more of
 * `amount` each. */
static int64_t threads_sharing(int64_t amount, int64_t least,
                               int64_t threads) {
  const int64_t useful = amount / least;
  if (threads > useful) threads = useful;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  return threads < 1 ? 1 : threads;
}

/* The threads for reading `bytes` of kernel rows. */
static int64_t threads_for(int64_t bytes, int64_t threads) {
  return threads_sharing(bytes, MIN_BYTES_PER_THREAD, threads);
}

/* GNU OpenMP's entry point in the process's global scope, where it is
 * loaded: the call GCC compiles `#pragma omp parallel` to. */
typedef void (*omp_parallel_fn)(void (*)(void *), void *, unsigned,
                                unsigned);

static omp_parallel_fn loaded_openmp(void) {
  omp_parallel_fn parallel;
  *(void **)&parallel = dlsym(RTLD_DEFAULT, "GOMP_parallel");
  return parallel;
}

/* The tasks [0, count) of one `parallel_for`, in chunks that each thread
 * takes in turn from a shared counter until none is left: a thread that
 * starts late takes fewer, instead of holding up the call with a fixed
 * share. `threads` counts the threads that took part. */
struct shared_tasks {
  void (*run)(const void *context, int64_t first, int64_t end, int64_t slot);
  const void *context;
  int64_t count, chunk, next_chunk, threads;
};

static void take_chunks(struct shared_tasks *tasks) {
  const int64_t slot =
      __atomic_fetch_add(&tasks->threads, 1, __ATOMIC_RELAXED);
  for (;;) {
    const int64_t first =
        __atomic_fetch_add(&tasks->next_chunk, 1, __ATOMIC_RELAXED) *
        tasks->chunk;
    if (first >= tasks->count) return;
    const int64_t end = first + tasks->chunk < tasks->count
                            ? first + tasks->chunk
                            : tasks->count;
    tasks->run(tasks->context, first, end, slot);
  }
}

static void *take_chunks_thread(void *tasks) {
  take_chunks(tasks);
  return NULL;
}

static void take_chunks_team(void *tasks) { take_chunks(tasks); }

#define CHUNKS_PER_THREAD 32

/* Thread attributes that keep a new thread off the calling thread's CPU
 * (Linux; on the process's other CPUs). Left to the scheduler, a thread
 * started after the machine idled for 5 ms began 1.9 ms later here
 * (median), and on the caller's own CPU in most calls, taking turns with
 * the caller; kept off it, 0.09 ms later. Returns 0 where not set. */
static int away_from_this_cpu(pthread_attr_t *attributes) {
#ifdef __linux__
  cpu_set_t cpus;
  const int here = sched_getcpu();
  if (here < 0 || here >= CPU_SETSIZE ||
      sched_getaffinity(0, sizeof cpus, &cpus) != 0) {
    return 0;
  }
  CPU_CLR(here, &cpus);
  if (CPU_COUNT(&cpus) == 0 || pthread_attr_init(attributes) != 0) return 0;
  if (pthread_attr_setaffinity_np(attributes, sizeof cpus, &cpus) != 0) {
    pthread_attr_destroy(attributes);
    return 0;
  }
  return 1;
#else
  (void)attributes;
  return 0;
#endif
}

/* run(context, first, end, slot) over [0, count) in chunks, on up to
 * `threads` threads (the calling thread one of them); `slot`, in [0,
 * threads), tells the threads apart (their own scratch). Returns the
 * threads that took part. */
static int64_t parallel_for(int64_t count, int64_t threads,
                            void (*run)(const void *, int64_t, int64_t,
                                        int64_t),
                            const void *context) {
  if (threads > count) threads = count;
  if (threads <= 1) {
    run(context, 0, count, 0);
    return 1;
  }
  const int64_t chunks = threads * CHUNKS_PER_THREAD;
  struct shared_tasks tasks = {run, context, count,
                               (count + chunks - 1) / chunks, 0, 0};
  const omp_parallel_fn omp_parallel = loaded_openmp();
  if (omp_parallel) {
    omp_parallel(take_chunks_team, &tasks, (unsigned)threads, 0);
    return tasks.threads;
  }
  pthread_attr_t attributes;
  const int away = away_from_this_cpu(&attributes);
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int64_t t = 1; t < threads; ++t) {
    started[t] = pthread_create(&ids[t], away ? &attributes : NULL,
                                take_chunks_thread, &tasks) == 0;
  }
  if (away) pthread_attr_destroy(&attributes);
  take_chunks(&tasks);
  for (int64_t t = 1; t < threads; ++t) {
    if (started[t]) pthread_join(ids[t], NULL);
  }
  return tasks.threads;
}

/* Kernel bytes of one neuron's row. */
static int64_t row_bytes(const struct full_path *p) {
  return p->dim * (p->qkernel ? 1 : (int64_t)sizeof(float));
}

/* `gather_row` of one row's groups, as a part of `parallel_for`. */
struct row_work {
  const struct full_path *path;
  int64_t b, k;
  const int64_t *selected;
  float *outputs;
};

static void gather_row_part(const void *context, int64_t first,
                            int64_t end, int64_t slot) {
  (void)slot;
  const struct row_work *w = context;
  gather_row(w->path, w->b, w->selected, w->k, w->outputs, first, end);
}

#define BATCH_BLOCK 64
/* Kernel bytes of one window of the union (see `gather_block`). */
#define WINDOW_BYTES (256 * 1024)
#define MAX_WINDOW 256

/* Neurons per window: WINDOW_BYTES of kernel rows, a multiple of GROUP
 * between GROUP and MAX_WINDOW. */
static int64_t window_size(const struct full_path *p) {
  const int64_t bytes = row_bytes(p);
  int64_t size = WINDOW_BYTES / (bytes > 0 ? bytes : 1);
  size -= size % GROUP;
  if (size < GROUP) size = GROUP;
  return size > MAX_WINDOW ? MAX_WINDOW : size;
}

/* Several rows: the union of their selections is read from memory once
 * per block of up to 64 rows (`first` .. `first + count`). The union (in
 * increasing order) is taken a window of neurons at a time, whose kernel
 * rows (WINDOW_BYTES) stay in cache while every row of the block takes
 * the dot products of the neurons it selected in the window, GROUP at a
 * time: only selected pairs are computed, but for the repeats that pad a
 * row's last group in each window. (Groups of the union taken whole for
 * every row that selected any of their neurons computed about 2.2x the
 * selected pairs at k_ratio 0.45.) Windows are the threads' parts: each
 * writes the outputs of its own neurons. */
struct block_work {
  const struct full_path *path;
  int64_t first, count, window;
  const uint64_t *masks; /* `units` words; bit b: row b selected it */
  const int64_t *members; /* the union, `size` indices */
  int64_t size, units;
  float *outputs;
};

static void gather_windows(const void *context, int64_t first_window,
                           int64_t end_window, int64_t slot) {
  (void)slot;
  const struct block_work *w = context;
  int64_t picked[MAX_WINDOW];
  for (int64_t window = first_window; window < end_window; ++window) {
    const int64_t g = window * w->window;
    const int64_t end = g + w->window < w->size ? g + w->window : w->size;
    for (int64_t b = 0; b < w->count; ++b) {
      const uint64_t bit = (uint64_t)1 << b;
      int64_t chosen = 0;
      for (int64_t j = g; j < end; ++j) {
        if (w->masks[w->members[j]] & bit) picked[chosen++] = w->members[j];
      }
      float *row_outputs = w->outputs + b * w->units;
      for (int64_t q = 0; q < chosen; q += GROUP) {
        /* A short last group repeats its last neuron. */
        int64_t neuron[GROUP];
        float sums[GROUP];
        for (int t = 0; t < GROUP; ++t) {
          neuron[t] = picked[q + t < chosen ? q + t : chosen - 1];
        }
        path_dots(w->path, neuron, w->first + b, sums);
        for (int t = 0; t < GROUP && q + t < chosen; ++t) {
          row_outputs[neuron[t]] = sums[t];
        }
      }
    }
  }
}

/* `masks`: `units` words; `members`: `units` indices (scratch). Returns
 * the threads that ran. */
static int64_t gather_block(const struct full_path *p, int64_t first,
                            int64_t count, const int64_t *selected,
                            int64_t k, float *outputs, int64_t units,
                            uint64_t *masks, int64_t *members,
                            int64_t threads) {
  for (int64_t j = 0; j < units; ++j) masks[j] = 0;
  for (int64_t b = 0; b < count; ++b) {
    for (int64_t j = 0; j < k; ++j) {
      masks[selected[b * k + j]] |= (uint64_t)1 << b;
    }
  }
  int64_t size = 0;
  for (int64_t j = 0; j < units; ++j) {
    if (masks[j]) members[size++] = j;
  }
  const struct block_work work = {p, first, count, window_size(p), masks,
                                  members, size, units, outputs};
  const int64_t windows = (size + work.window - 1) / work.window;
  return parallel_for(windows, threads_for(size * row_bytes(p), threads),
                      gather_windows, &work);
}

/* `selected`: (count, k), increasing, each in [0, units); `outputs`:
 * (count, units), written at the selected neurons only. Every array is
 * C-contiguous. With an int8 kernel and `quantize_inputs`, the rows are
 * quantized first (a scratch of 2 * count * dim bytes; without memory,
 * the float-input product runs instead). Up to `threads` threads share
 * the dot products. Returns the most threads that ran, or -1 when `p`
 * has neither kernel. */
static int64_t gather_selected(struct full_path *p, int64_t count,
                               const int64_t *selected, int64_t k,
                               float *outputs, int64_t units,
                               int quantize_inputs, int64_t threads) {
  if (!p->kernel && !p->qkernel) return -1;
  int8_t *quantized = NULL;
  float *row_scales = NULL;
  if (p->qkernel && quantize_inputs) {
    quantized = malloc(2 * count * p->dim);
    row_scales = malloc(count * sizeof *row_scales);
    if (quantized && row_scales) {
      for (int64_t b = 0; b < count; ++b) {
        row_scales[b] = quantize_row(p->rows + b * p->dim, p->dim,
                                     quantized + b * p->dim,
                                     quantized + (count + b) * p->dim);
      }
      p->qrows = quantized;
      p->arows = quantized + count * p->dim;
      p->row_scales = row_scales;
    }
  }
  uint64_t *masks = NULL;
  int64_t *members = NULL;
  int64_t most = 1;
  if (count > 1) {
    masks = malloc(units * sizeof *masks);
    members = malloc(units * sizeof *members);
  }
  if (!masks || !members) { /* one row, or no memory: row by row */
    const int64_t groups = (k + GROUP - 1) / GROUP;
    const int64_t row_threads = threads_for(k * row_bytes(p), threads);
    for (int64_t b = 0; b < count; ++b) {
      const struct row_work work = {p, b, k, selected + b * k,
                                    outputs + b * units};
      const int64_t ran =
          parallel_for(groups, row_threads, gather_row_part, &work);
      if (ran > most) most = ran;
    }
  } else {
    for (int64_t b = 0; b < count; b += BATCH_BLOCK) {
      const int64_t block = count - b < BATCH_BLOCK ? count - b : BATCH_BLOCK;
      const int64_t ran =
          gather_block(p, b, block, selected + b * k, k, outputs + b * units,
                       units, masks, members, threads);
      if (ran > most) most = ran;
    }
  }
  free(masks);
  free(members);
  free(quantized);
  free(row_scales);
  return most;
}

/* The key of a float, from its bits, in an unsigned order that is the
 * float order (no NaN; -0.0 is cleaned to 0.0 before): the sign bit set
 * for non-negative floats, every bit flipped for negative ones. */
static uint32_t sortable_key(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

static float key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

/* The k-th largest of a few keys (1 <= k <= n): the largest key with at
 * least k keys at or above it. */
static uint32_t kth_largest_of_few(const uint32_t *keys, int64_t n,
                                   int64_t k) {
  uint32_t kth = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t at_least = 0;
    for (int64_t j = 0; j < n; ++j) at_least += keys[j] >= keys[i];
    if (at_least >= k && keys[i] > kth) kth = keys[i];
  }
  return kth;
}

/* Below this many candidates the radix selection stops and compares
 * them all (its remaining steps would each scan a 256-bin histogram). */
#define FEW_KEYS 16

/* The k-th largest of keys[0..n) (1 <= k <= n), by a radix selection on
 * 8-bit digits from the top: a histogram of the candidates' digit, the
 * digit that holds the k-th largest, and only the candidates with that
 * digit kept for the next digit, until few are left. Each step is a
 * branch-free pass over the candidates; quickselect, whose comparisons
 * mispredict half the time on random scores, took 3-4x longer at 1024
 * scores. `top_histogram`: the histogram of the top digit of all n keys
 * (the caller counts it while it makes the keys). `candidates`: n keys
 * of scratch. */
static uint32_t kth_largest_key(const uint32_t *keys, int64_t n, int64_t k,
                                const uint32_t *top_histogram,
                                uint32_t *candidates) {
  const uint32_t *from = keys;
  int64_t count = n;
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t histogram[256];
    if (shift == 24) {
      memcpy(histogram, top_histogram, sizeof histogram);
    } else {
      memset(histogram, 0, sizeof histogram);
      for (int64_t i = 0; i < count; ++i) {
        ++histogram[(from[i] >> shift) & 255];
      }
    }
    int digit = 255;
    while ((int64_t)histogram[digit] < k) k -= histogram[digit--];
    prefix |= (uint32_t)digit << shift;
    if (shift == 0 || (int64_t)histogram[digit] == count) continue;
    /* Keep the candidates with this digit: those in [prefix, prefix +
     * 2^shift), their higher digits being the prefix's already. */
    const uint32_t width = 1u << shift;
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      candidates[kept] = from[i];
      kept += (int64_t)(from[i] - prefix < width);
    }
    from = candidates;
    count = kept;
    if (count <= FEW_KEYS) return kth_largest_of_few(from, count, k);
  }
  return prefix;
}

/* One row's scores as `topk_mask` ranks them (NaN as -inf, subnormals and
 * -0.0 as 0.0) into `clean`, and their k-th largest. The clean-up works
 * on the bits (a loop the compiler vectorizes); the histogram of the keys'
 * top digit is counted in four parts, so that equal digits in a row (most
 * scores share a few exponents) do not wait on each other's increment.
 * `keys`: 2 * units keys of scratch. */
static float row_threshold(const float *logits, int64_t units, int64_t k,
                           float *clean, uint32_t *keys) {
  for (int64_t j = 0; j < units; ++j) {
    uint32_t bits;
    memcpy(&bits, logits + j, sizeof bits);
    const uint32_t magnitude = bits & 0x7FFFFFFFu;
    bits = magnitude > 0x7F800000u ? 0xFF800000u : bits; /* NaN: -inf */
    bits = magnitude < 0x00800000u ? 0u : bits; /* below FLT_MIN: 0 */
    memcpy(clean + j, &bits, sizeof bits);
    keys[j] = sortable_key(bits);
  }
  uint32_t parts[4][256];
  memset(parts, 0, sizeof parts);
  int64_t j = 0;
  for (; j + 4 <= units; j += 4) {
    ++parts[0][keys[j] >> 24];
    ++parts[1][keys[j + 1] >> 24];
    ++parts[2][keys[j + 2] >> 24];
    ++parts[3][keys[j + 3] >> 24];
  }
  for (; j < units; ++j) ++parts[0][keys[j] >> 24];
  for (int digit = 0; digit < 256; ++digit) {
    parts[0][digit] += parts[1][digit] + parts[2][digit] + parts[3][digit];
  }
  return key_to_float(kth_largest_key(keys, units, k, parts[0], keys + units));
}

/* The number of `clean` scores above `threshold`. */
static int64_t count_above(const float *clean, int64_t units,
                           float threshold) {
  int64_t above = 0;
  for (int64_t j = 0; j < units; ++j) above += clean[j] > threshold;
  return above;
}

/* The k neurons of one row of logits that `topk_mask` selects, into
 * `selected` (increasing). `scratch`: 3 * units floats. */
static void select_row(const float *logits, int64_t units, int64_t k,
                       int64_t *selected, float *scratch) {
  float *clean = scratch;
  const float threshold = row_threshold(logits, units, k, clean,
                                        (uint32_t *)(scratch + units));
  int64_t tied_needed = k - count_above(clean, units, threshold), slot = 0;
  for (int64_t j = 0; j < units && slot < k; ++j) {
    if (clean[j] > threshold) {
      selected[slot++] = j;
    } else if (clean[j] == threshold && tied_needed > 0) {
      selected[slot++] = j;
      --tied_needed;
    }
  }
}

/* The selection's threads (`midl_topk_mask`, `midl_select_mix`): at
 * most `threads`, at least one, MIN_SCORES_PER_THREAD scores or more
 * each. Each thread takes whole rows, so the outputs are the same, bit
 * for bit, on any count. In a NumPy process (threads of our own), one
 * thread took 0.41 ms at 256 x 1024 scores here, two 0.29 ms (256 x
 * 4096: 1.56 and 1.07 ms); 128 x 1024 0.19 and 0.18 ms, a gain too small
 * to start a thread for. The mix and its gradients (`midl_mix`,
 * `midl_mix_backward`) stay on one thread: a pass over memory, which a
 * second thread made slower at 256 x 1024 (0.15 against 0.25 ms; the
 * gradients, split by columns to keep each bias sum in order, 0.31
 * against 0.65 ms). */
#define MIN_SCORES_PER_THREAD ((int64_t)1 << 17)

static int64_t threads_for_scores(int64_t scores, int64_t threads) {
  return threads_sharing(scores, MIN_SCORES_PER_THREAD, threads);
}

/* Scratch of `floats` floats per thread for up to `threads` threads
 * (`parallel_for`'s slots): `given` for the first, one allocation
 * (`*extra`, freed by the caller) for the others. Returns the threads it
 * has scratch for: one where that allocation fails. */
static int64_t scratch_per_thread(int64_t floats, int64_t threads,
                                  float **extra) {
  *extra = NULL;
  if (threads <= 1) return 1;
  *extra = malloc((size_t)((threads - 1) * floats) * sizeof **extra);
  return *extra ? threads : 1;
}

static float *slot_scratch(float *given, float *extra, int64_t floats,
                           int64_t slot) {
  return slot == 0 ? given : extra + (slot - 1) * floats;
}

/* run(work, first, end, slot) over the `count` rows of a selection of
 * `units` scores each, on the threads `threads_for_scores` allows, each
 * with 3 * units floats of scratch (`*extra`, in `work`, holds the
 * others' while it runs). Returns the threads that ran. */
static int64_t select_rows(int64_t count, int64_t units, int64_t threads,
                           void (*run)(const void *, int64_t, int64_t,
                                       int64_t),
                           const void *work, float **extra) {
  threads = threads_for_scores(count * units, threads);
  if (threads > count) threads = count;
  threads = scratch_per_thread(3 * units, threads, extra);
  const int64_t ran = parallel_for(count, threads, run, work);
  free(*extra);
  *extra = NULL;
  return ran;
}

/* Rows [first, end) of `midl_topk_mask`, as a part of `parallel_for`. */
struct topk_work {
  const float *scores;
  int64_t units, k;
  float *mask, *scratch, *extra;
};

static void topk_rows(const void *context, int64_t first, int64_t end,
                      int64_t slot) {
  const struct topk_work *w = context;
  const int64_t units = w->units, k = w->k;
  float *scratch = slot_scratch(w->scratch, w->extra, 3 * units, slot);
  float *clean = scratch;
  for (int64_t b = first; b < end; ++b) {
    float *out = w->mask + b * units;
    const float threshold =
        row_threshold(w->scores + b * units, units, k, clean,
                      (uint32_t *)(scratch + units));
    /* The mask of the scores at least the threshold, counted as it is
     * written: right unless ties at the threshold are more than needed. */
    int64_t at_least = 0;
    for (int64_t j = 0; j < units; ++j) {
      const int chosen = clean[j] >= threshold;
      at_least += chosen;
      out[j] = chosen ? 1.0f : 0.0f;
    }
    if (at_least == k) continue;
    int64_t tied_needed = k - count_above(clean, units, threshold);
    for (int64_t j = 0; j < units; ++j) {
      const int tied = clean[j] == threshold && tied_needed > 0;
      tied_needed -= tied;
      out[j] = (clean[j] > threshold || tied) ? 1.0f : 0.0f;
    }
  }
}

/* `keras_midl.ops.topk_mask` of each row of `scores` (count, units): 1.0f
 * at the k selected neurons, 0.0f elsewhere, into `mask` (count, units).
 * `scratch`: 3 * units floats. 1 <= k <= units. Up to `threads` threads
 * take rows (`threads_for_scores`). Returns the threads that ran. */
int64_t midl_topk_mask(const float *scores, int64_t count, int64_t units,
                       int64_t k, float *mask, float *scratch,
                       int64_t threads) {
  struct topk_work work = {scores, units, k, mask, scratch, NULL};
  return select_rows(count, units, threads, topk_rows, &work, &work.extra);
}

/* `units` floats of -0.0f, where a bias or a column is missing: adding
 * -0.0f changes no float (not even -0.0), so the missing one adds
 * nothing. `spare`: `units` floats of scratch for them. */
static const float *or_negative_zeros(const float *given, int64_t units,
                                      float *spare) {
  if (given) return given;
  for (int64_t j = 0; j < units; ++j) spare[j] = -0.0f;
  return spare;
}

/* `keep ? chosen : other`, taken by a bit mask: the compiler vectorizes
 * a loop of these, where it compiles a `?:` of two sums as a branch. */
static inline float select_float(int keep, float chosen, float other) {
  uint32_t a, b;
  memcpy(&a, &chosen, sizeof a);
  memcpy(&b, &other, sizeof b);
  const uint32_t mask = -(uint32_t)keep;
  const uint32_t bits = (a & mask) | (b & ~mask);
  float result;
  memcpy(&result, &bits, sizeof result);
  return result;
}

/* `midl_select_mix`'s pass over one row without ties at its threshold:
 * both sums computed and one taken (`select_float`), a loop the compiler
 * vectorizes; `restrict`: no buffer overlaps another. `other` NULL: 0
 * elsewhere. */
static void mix_row(float *restrict out, const float *restrict clean,
                    float threshold, const float *restrict add,
                    const float *restrict other,
                    const float *restrict light_add, int64_t units) {
  for (int64_t j = 0; j < units; ++j) {
    const float unchosen = other ? other[j] + light_add[j] : 0.0f;
    out[j] = select_float(clean[j] >= threshold, out[j] + add[j], unchosen);
  }
}

/* Rows [first, end) of `midl_select_mix`, as a part of `parallel_for`. */
struct select_mix_work {
  const float *logits;
  int64_t units, k;
  float *full;
  const float *bias, *light, *light_bias;
  float *scratch, *extra;
};

static void select_mix_rows(const void *context, int64_t first, int64_t end,
                            int64_t slot) {
  const struct select_mix_work *w = context;
  const int64_t units = w->units, k = w->k;
  float *scratch = slot_scratch(w->scratch, w->extra, 3 * units, slot);
  float *clean = scratch, *zeros = scratch + units;
  for (int64_t b = first; b < end; ++b) {
    float *out = w->full + b * units;
    const float *other = w->light ? w->light + b * units : NULL;
    const float threshold =
        row_threshold(w->logits + b * units, units, k, clean,
                      (uint32_t *)(scratch + units));
    /* The keys are spent: their scratch holds the missing biases. */
    const float *add = or_negative_zeros(w->bias, units, zeros);
    const float *light_add = or_negative_zeros(w->light_bias, units, zeros);
    int64_t at_least = 0;
    for (int64_t j = 0; j < units; ++j) at_least += clean[j] >= threshold;
    if (at_least == k) {
      mix_row(out, clean, threshold, add, other, light_add, units);
      continue;
    }
    int64_t tied_needed = k - count_above(clean, units, threshold);
    for (int64_t j = 0; j < units; ++j) {
      const int tied = clean[j] == threshold && tied_needed > 0;
      tied_needed -= tied;
      if (clean[j] > threshold || tied) {
        out[j] += add[j];
      } else {
        out[j] = other ? other[j] + light_add[j] : 0.0f;
      }
    }
  }
}

/* The masked path's inference output, with no mask: `full[b, j] +
 * bias[j]` at the k neurons of row b that `topk_mask` selects from
 * `logits`, `light[b, j] + light_bias[j]` (0 where `light` is NULL) at
 * the others, written over `full` (count, units). `bias`, `light_bias`:
 * (units,) or NULL. Each value is the one float addition of the masked
 * path's bias add (a missing bias adds -0.0f, which changes no float),
 * so the output is the masked path's bit for bit. Rows without ties at
 * their threshold take one branch-free pass. `scratch`: 3 * units
 * floats. 1 <= k <= units. Up to `threads` threads take rows. Returns
 * the threads that ran. */
int64_t midl_select_mix(const float *logits, int64_t count, int64_t units,
                        int64_t k, float *full, const float *bias,
                        const float *light, const float *light_bias,
                        float *scratch, int64_t threads) {
  struct select_mix_work work = {logits, units, k, full, bias,
                                 light, light_bias, scratch, NULL};
  return select_rows(count, units, threads, select_mix_rows, &work,
                     &work.extra);
}

/* One row of `midl_mix`: `n` elements; `light` NULL or not in each call's
 * own source, so that the compiler specializes both into branch-free
 * loops it vectorizes. */
static inline void mix_span(const float *restrict mask,
                            const float *restrict full,
                            const float *restrict light,
                            const float *restrict bias,
                            const float *restrict light_bias, int64_t n,
                            float *restrict outputs) {
  for (int64_t j = 0; j < n; ++j) {
    const float other = light ? light[j] + light_bias[j] : 0.0f;
    outputs[j] = select_float(mask[j] > 0.0f, full[j] + bias[j], other);
  }
}

/* The value of `keras_midl.ops.straight_through_mix` with the paths'
 * biases added: `outputs[b, j] = full[b, j] + bias[j]` where `mask[b, j]
 * > 0`, `light[b, j] + light_bias[j]` (0 where `light` is NULL)
 * elsewhere; `size` elements of each, rows of `units`. `bias`,
 * `light_bias`: `units` floats or NULL (none). Each value is the masked
 * path's bias add, bit for bit, without the two passes that write the
 * biased paths. `scratch`: 2 * units floats. */
void midl_mix(const float *mask, const float *full, const float *light,
              const float *bias, const float *light_bias, int64_t size,
              int64_t units, float *outputs, float *scratch) {
  bias = or_negative_zeros(bias, units, scratch);
  light_bias = or_negative_zeros(light_bias, units, scratch + units);
  for (int64_t start = 0; start + units <= size; start += units) {
    if (light) {
      mix_span(mask + start, full + start, light + start, bias, light_bias,
               units, outputs + start);
    } else {
      mix_span(mask + start, full + start, NULL, bias, light_bias, units,
               outputs + start);
    }
  }
}

/* One row of `midl_mix_backward`: `n` elements, `light` NULL or not in
 * each call's own source (see `mix_span`). */
static inline void mix_backward_span(
    const float *restrict upstream, const float *restrict mask,
    const float *restrict soft, const float *restrict full,
    const float *restrict light, const float *restrict bias,
    const float *restrict light_bias, const float *restrict column,
    int64_t n, float temperature, float *restrict d_full,
    float *restrict d_light, float *restrict d_logits) {
  for (int64_t j = 0; j < n; ++j) {
    const float u = upstream[j];
    const int selected = mask[j] > 0.0f;
    d_full[j] = selected ? u : 0.0f;
    if (light) d_light[j] = selected ? 0.0f : u;
    const float other = light ? light[j] + light_bias[j] : 0.0f;
    const float slope = soft[j] * (1.0f - soft[j]) / temperature;
    d_logits[j] = (u * ((full[j] + bias[j]) - other) + column[j]) * slope;
  }
}

/* `sums[j] += row[j]`, `n` of them: a row of a bias's gradient, still in
 * the cache from the pass that wrote it. Summed inside that pass instead,
 * the backward took 3.7x longer at 256 x 1024 (1.26 ms against 0.34 ms
 * here): the compiler's loop was much slower. */
static inline void add_row(float *restrict sums, const float *restrict row,
                           int64_t n) {
  for (int64_t j = 0; j < n; ++j) sums[j] += row[j];
}

/* Its gradients, in one pass over the tensors (the same products, in the
 * same order, as the `keras.ops` gradient of `straight_through_mix` of
 * the biased paths; each row's bias sums read the row from the cache):
 *
 *     d_full  = mask ? upstream : 0;   d_light = mask ? 0 : upstream;
 *     d_logits = (upstream * ((full + bias) - (light + light_bias))
 *                 + column) * (soft * (1 - soft) / t)
 *     d_bias = sum over the rows of d_full (d_light_bias: of d_light)
 *
 * `soft` = sigmoid(logits / t); `size` elements, rows of `units`;
 * `light`, `d_light` and `d_light_bias` may be NULL (a zero light path);
 * `bias`, `light_bias` and `column` (`units` floats each) may be NULL
 * (none), and `d_bias`, `d_light_bias` (`units` floats, written) NULL
 * where not wanted. `column`, added to every row, is the gradient of the
 * selection frequencies over the rows (`straight_through_mix` with
 * `return_frequencies`), which reaches the logits through the same
 * slope. x / 1.0f == x, so dividing by a temperature of 1 changes
 * nothing. The biases' sums run over the rows in order, in float32.
 * `scratch`: 3 * units floats. No two buffers overlap. */
void midl_mix_backward(const float *upstream, const float *mask,
                       const float *soft, const float *full,
                       const float *light, const float *bias,
                       const float *light_bias, int64_t size,
                       float temperature, const float *column, int64_t units,
                       float *d_full, float *d_light, float *d_logits,
                       float *d_bias, float *d_light_bias, float *scratch) {
  bias = or_negative_zeros(bias, units, scratch);
  light_bias = or_negative_zeros(light_bias, units, scratch + units);
  column = or_negative_zeros(column, units, scratch + 2 * units);
  if (d_bias) memset(d_bias, 0, units * sizeof *d_bias);
  if (d_light_bias) memset(d_light_bias, 0, units * sizeof *d_light_bias);
  for (int64_t start = 0; start + units <= size; start += units) {
    if (light) {
      mix_backward_span(upstream + start, mask + start, soft + start,
                        full + start, light + start, bias, light_bias,
                        column, units, temperature, d_full + start,
                        d_light + start, d_logits + start);
      if (d_light_bias) add_row(d_light_bias, d_light + start, units);
    } else {
      mix_backward_span(upstream + start, mask + start, soft + start,
                        full + start, NULL, bias, light_bias, column, units,
                        temperature, d_full + start, NULL, d_logits + start);
    }
    if (d_bias) add_row(d_bias, d_full + start, units);
  }
}

/* `logits`: (count, units) float32; `kernel`: (units, dim); `rows`:
 * (count, dim); `bias`: (units,) or NULL; `outputs`: (count, units), the
 * light path on entry; `selected`: (count, k) int64, written; `scratch`:
 * 3 * units floats. 1 <= k <= units; `threads`: at most this many
 * threads compute the dot products (see `parallel_for`). Returns the
 * most threads that ran. */
int64_t midl_select_gather(const float *logits, int64_t units,
                           const float *kernel, int64_t dim, const float *rows,
                           int64_t count, int64_t k, const float *bias,
                           float *outputs, int64_t *selected, float *scratch,
                           int64_t threads) {
  for (int64_t b = 0; b < count; ++b) {
    select_row(logits + b * units, units, k, selected + b * k, scratch);
  }
  struct full_path path = {kernel, NULL, NULL, bias, dim, rows,
                           NULL, NULL, NULL};
  return gather_selected(&path, count, selected, k, outputs, units, 0,
                         threads);
}

/* The gate, the light path and the selection of one layer's inference
 * forward (see `midl_sparse_forward`). */
static void gate_and_light(const float *rows, int64_t count, int64_t dim,
                           const float *projection, int64_t rank,
                           const float *gate_kernel, const float *gate_bias,
                           const float *light_kernel,
                           const float *light_bias, int64_t units,
                           int64_t k, float *outputs, int64_t *selected,
                           float *scratch) {
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
    select_row(logits, units, k, selected + b * k, select_scratch);
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
 * (count, k); `scratch`: rank + 4 * units floats; `threads`: at most
 * this many threads compute the full path (see `parallel_for`; the gate
 * and the light path run in the calling thread); returns the most
 * threads that ran. The gate's sums run in this order, not BLAS's: where
 * two logits are within rounding of each other at the threshold, the
 * selection may differ from a BLAS gate's. */
int64_t midl_sparse_forward(const float *rows, int64_t count, int64_t dim,
                            const float *projection, int64_t rank,
                            const float *gate_kernel, const float *gate_bias,
                            const float *light_kernel, const float *light_bias,
                            const float *kernel, const float *bias,
                            int64_t units, int64_t k, float *outputs,
                            int64_t *selected, float *scratch,
                            int64_t threads) {
  gate_and_light(rows, count, dim, projection, rank, gate_kernel, gate_bias,
                 light_kernel, light_bias, units, k, outputs, selected,
                 scratch);
  struct full_path path = {kernel, NULL, NULL, bias, dim, rows,
                           NULL, NULL, NULL};
  return gather_selected(&path, count, selected, k, outputs, units, 0,
                         threads);
}

/* `midl_sparse_forward` with an int8 kernel (units, dim) and its
 * per-neuron `kernel_scale` (units,): the full path of the selected
 * neurons is `(x . q[j]) / kernel_scale[j]` (+ bias), with `x` quantized
 * per row as Keras's AbsMaxQuantizer does when `quantize_inputs` is
 * non-zero (see above), in float otherwise. */
int64_t midl_sparse_forward_int8(const float *rows, int64_t count, int64_t dim,
                                 const float *projection, int64_t rank,
                                 const float *gate_kernel,
                                 const float *gate_bias,
                                 const float *light_kernel,
                                 const float *light_bias, const int8_t *kernel,
                                 const float *kernel_scale, const float *bias,
                                 int64_t units, int64_t k, int quantize_inputs,
                                 float *outputs, int64_t *selected,
                                 float *scratch, int64_t threads) {
  gate_and_light(rows, count, dim, projection, rank, gate_kernel, gate_bias,
                 light_kernel, light_bias, units, k, outputs, selected,
                 scratch);
  struct full_path path = {NULL, kernel, kernel_scale, bias, dim, rows,
                           NULL, NULL, NULL};
  return gather_selected(&path, count, selected, k, outputs, units,
                         quantize_inputs, threads);
}
