/* com.vlbatch::FusedAttention, an onnxruntime custom operator: a decoder layer's grouped-query attention read
 * straight from its 16-bit K/V history (batch/infer/runtime/native_attention.py builds this file and puts the node
 * in place of the layer graph's own attention, batch/infer/runtime/fused_layer.py).
 *
 * Inputs, as the exported layer graph holds them (batch/model/export/graphs.py, _attention):
 *   q       (B, kv_heads, group*S, D) float32  each KV head's query rows, head-in-group major, rotary applied
 *   K, V    (B, kv_heads, W, D)       float16  the history
 *   k, v    (B, kv_heads, S, D)       float32  the chunk's own keys and values
 *   mask    (B, S, W + S)             float32  added to the scores: 0 where a query sees a key, -65536 where not
 * Output: (B, kv_heads, group*S, D) float32, softmax(q . [K; k] * scale + mask) . [V; v]; attribute `scale`.
 *
 * The same arithmetic as the graph, in float32: the fp16 values are widened in registers as they are read, so the
 * history is read once, and never written out again in 32 bits as the graph's Cast does; the work is split over
 * onnxruntime's own thread pool by (row, KV head, block of queries). x86-64 with AVX-512F, F16C and FMA:
 * vlb_supported() says whether this CPU has them; the library is registered only where it does.
 */
#include <immintrin.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>

#include "onnxruntime_c_api.h"

#define TARGET __attribute__((target("avx512f,f16c,fma")))
#define INLINE static inline __attribute__((always_inline))
#define MAX_CHUNKS 16     /* head_dim up to 256, in chunks of 16 floats */
#define KEY_BLOCK 16      /* keys widened once per block and scored against every query of a task */
#define VALUE_BLOCK 32    /* values widened once per block and weighed for every query of a task */
#define QUERY_TILE 16     /* queries per task: a decode step's group is one task, a prompt chunk's several */
#define PREFETCH_BLOCKS 3 /* how many blocks ahead of the one being read the history is asked for */

int vlb_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

TARGET INLINE __m512 widen(const uint16_t *half16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)half16));
}

TARGET INLINE void prefetch(const uint16_t *from, long halves) {
    for (long line = 0; line < halves / 32; line++) _mm_prefetch((const char *)from + 64 * line, _MM_HINT_T0);
}

/* lane k = the sum of the lanes of a[k] */
TARGET INLINE __m512 sum_each(const __m512 a[16]) {
    __m512 pairs[8], quads[4], octs[2];
    for (int j = 0; j < 8; j++) /* 128-bit lanes 0-1: halves of a[2j] summed, lanes 2-3: of a[2j+1] */
        pairs[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                                 _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; j++) /* 128-bit lane l: four partial sums of a[4j + l] */
        quads[j] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * j], pairs[2 * j + 1], 0x88),
                                 _mm512_shuffle_f32x4(pairs[2 * j], pairs[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; j++) /* lane l, elements 0 and 2: a[8j + l]; 1 and 3: a[8j + 4 + l] */
        octs[j] = _mm512_add_ps(_mm512_unpacklo_ps(quads[2 * j], quads[2 * j + 1]),
                                _mm512_unpackhi_ps(quads[2 * j], quads[2 * j + 1]));
    /* element 4l + e holds a[l], a[l + 8], a[l + 4], a[l + 12] for e = 0 .. 3 */
    __m512 sums = _mm512_add_ps(_mm512_unpacklo_ps(octs[0], octs[1]), _mm512_unpackhi_ps(octs[0], octs[1]));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, sums);
}

TARGET INLINE float dot(const float *a, const float *b, int chunks) {
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int c = 1; c < chunks; c++) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * c), _mm512_loadu_ps(b + 16 * c), sum);
    return _mm512_reduce_add_ps(sum);
}

/* exp(x) for the x <= 0 of a softmax once its maximum is taken off: Cody-Waite reduction to r in [-ln2/2, ln2/2],
 * a degree-6 polynomial, scaled by 2^n (about 1 ulp); exactly 0 below -87, as a masked position's weight is */
TARGET INLINE __m512 exp_nonpositive(__m512 x) {
    __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
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
    return _mm512_maskz_scalef_ps(live, p, n);
}

/* row[0 .. n-1] <- softmax(row) */
TARGET INLINE void softmax(float *row, long n) {
    __m512 top = _mm512_set1_ps(-__builtin_inff());
    long t = 0;
    for (; t + 16 <= n; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + t));
    if (t < n) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, (__mmask16)((1u << (n - t)) - 1), row + t));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + t), m));
        _mm512_storeu_ps(row + t, e);
        total = _mm512_add_ps(total, e);
    }
    if (t < n) {
        __mmask16 tail = (__mmask16)((1u << (n - t)) - 1);
        __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + t), m)));
        _mm512_mask_storeu_ps(row + t, tail, e);
        total = _mm512_add_ps(total, e);
    }
    __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (t = 0; t + 16 <= n; t += 16) _mm512_storeu_ps(row + t, _mm512_mul_ps(_mm512_loadu_ps(row + t), inverse));
    if (t < n) {
        __mmask16 tail = (__mmask16)((1u << (n - t)) - 1);
        _mm512_mask_storeu_ps(row + t, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, row + t), inverse));
    }
}

typedef struct {
    const float *q, *k_new, *v_new, *mask;
    const uint16_t *k_hist, *v_hist;
    float *out, scale;
    long rows, kv_heads, queries, chunk, width, tiles; /* queries = group * chunk per (row, KV head) */
    int chunks;                                        /* head_dim / 16 */
    int failed;
} Job;

/* one task: queries [first, last) of one (row, KV head) */
TARGET INLINE void attend(const Job *job, long row, long head, long first, long last, float *scores, float *block,
                          int chunks) {
    const long dim = chunks * 16, span = job->width + job->chunk, n = last - first;
    const long pair = row * job->kv_heads + head;
    const float *q = job->q + (pair * job->queries + first) * dim;
    const uint16_t *keys = job->k_hist + pair * job->width * dim, *values = job->v_hist + pair * job->width * dim;
    const float *own_keys = job->k_new + pair * job->chunk * dim, *own_values = job->v_new + pair * job->chunk * dim;
    float *out = job->out + (pair * job->queries + first) * dim;
    const float *masks[QUERY_TILE];
    for (long i = 0; i < n; i++) masks[i] = job->mask + (row * job->chunk + (first + i) % job->chunk) * span;
    const __m512 scale = _mm512_set1_ps(job->scale);

    long t0 = 0;
    for (; t0 + KEY_BLOCK <= job->width; t0 += KEY_BLOCK) {
        prefetch(keys + (t0 + PREFETCH_BLOCKS * KEY_BLOCK) * dim, KEY_BLOCK * dim);
        for (long j = 0; j < KEY_BLOCK * chunks; j++) _mm512_store_ps(block + 16 * j, widen(keys + t0 * dim + 16 * j));
        for (long i = 0; i < n; i++) {
            __m512 partial[16];
            for (int j = 0; j < KEY_BLOCK; j++) {
                const float *key = block + j * dim, *qi = q + i * dim;
                __m512 acc = _mm512_mul_ps(_mm512_load_ps(key), _mm512_loadu_ps(qi));
                for (int c = 1; c < chunks; c++) acc = _mm512_fmadd_ps(_mm512_load_ps(key + 16 * c), _mm512_loadu_ps(qi + 16 * c), acc);
                partial[j] = acc;
            }
            __m512 s = _mm512_fmadd_ps(sum_each(partial), scale, _mm512_loadu_ps(masks[i] + t0));
            _mm512_storeu_ps(scores + i * span + t0, s);
        }
    }
    for (long t = t0; t < job->width; t++) {
        for (int c = 0; c < chunks; c++) _mm512_store_ps(block + 16 * c, widen(keys + t * dim + 16 * c));
        for (long i = 0; i < n; i++) scores[i * span + t] = dot(block, q + i * dim, chunks) * job->scale + masks[i][t];
    }
    for (long t = 0; t < job->chunk; t++)
        for (long i = 0; i < n; i++)
            scores[i * span + job->width + t] =
                dot(own_keys + t * dim, q + i * dim, chunks) * job->scale + masks[i][job->width + t];
    for (long i = 0; i < n; i++) softmax(scores + i * span, span);

    for (long i = 0; i < n; i++)
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + i * dim + 16 * c, _mm512_setzero_ps());
    for (t0 = 0; t0 < job->width; t0 += VALUE_BLOCK) {
        long count = job->width - t0 < VALUE_BLOCK ? job->width - t0 : VALUE_BLOCK;
        prefetch(values + (t0 + PREFETCH_BLOCKS * VALUE_BLOCK) * dim, VALUE_BLOCK * dim);
        for (long j = 0; j < count * chunks; j++) _mm512_store_ps(block + 16 * j, widen(values + t0 * dim + 16 * j));
        for (long i = 0; i < n; i++) {
            const float *p = scores + i * span + t0;
            __m512 acc[MAX_CHUNKS];
            for (int c = 0; c < chunks; c++) acc[c] = _mm512_loadu_ps(out + i * dim + 16 * c);
            for (long j = 0; j < count; j++) {
                __m512 weight = _mm512_set1_ps(p[j]);
                for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(weight, _mm512_load_ps(block + j * dim + 16 * c), acc[c]);
            }
            for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + i * dim + 16 * c, acc[c]);
        }
    }
    for (long i = 0; i < n; i++)
        for (long t = 0; t < job->chunk; t++) {
            __m512 weight = _mm512_set1_ps(scores[i * span + job->width + t]);
            for (int c = 0; c < chunks; c++)
                _mm512_storeu_ps(out + i * dim + 16 * c, _mm512_fmadd_ps(weight, _mm512_loadu_ps(own_values + t * dim + 16 * c),
                                                                     _mm512_loadu_ps(out + i * dim + 16 * c)));
        }
}

TARGET static void attend_128(const Job *job, long row, long head, long first, long last, float *scores, float *block) {
    attend(job, row, head, first, last, scores, block, 8); /* InternVL3's head_dim: the loops over chunks unrolled */
}

TARGET static void attend_any(const Job *job, long row, long head, long first, long last, float *scores, float *block) {
    attend(job, row, head, first, last, scores, block, job->chunks);
}

static void task(void *data, size_t index) {
    Job *job = (Job *)data;
    long tile = (long)index % job->tiles, pair = (long)index / job->tiles;
    long first = tile * QUERY_TILE, last = first + QUERY_TILE < job->queries ? first + QUERY_TILE : job->queries;
    float *scores = malloc(sizeof(float) * QUERY_TILE * (job->width + job->chunk));
    float *block = aligned_alloc(64, sizeof(float) * VALUE_BLOCK * MAX_CHUNKS * 16);
    if (!scores || !block) {
        job->failed = 1;
    } else if (job->chunks == 8) {
        attend_128(job, pair / job->kv_heads, pair % job->kv_heads, first, last, scores, block);
    } else {
        attend_any(job, pair / job->kv_heads, pair % job->kv_heads, first, last, scores, block);
    }
    free(scores);
    free(block);
}

/* ---- the operator, through onnxruntime's C API ---- */

static const OrtApi *ort;

typedef struct {
    float scale;
} Kernel;

#define CHECK(call)                          \
    do {                                     \
        OrtStatus *status_ = (call);         \
        if (status_) return status_;         \
    } while (0)

static OrtStatus *shape_of(const OrtValue *value, int64_t *dims, size_t rank) {
    OrtTensorTypeAndShapeInfo *info;
    size_t count;
    CHECK(ort->GetTensorTypeAndShape(value, &info));
    OrtStatus *status = ort->GetDimensionsCount(info, &count);
    if (!status && count != rank) status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "FusedAttention: an input of the wrong rank");
    if (!status) status = ort->GetDimensions(info, dims, rank);
    ort->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *context) {
    const OrtValue *in[6];
    int64_t q[4], k[4], v[4], kn[4], vn[4], mask[3];
    for (size_t i = 0; i < 6; i++) CHECK(ort->KernelContext_GetInput(context, i, &in[i]));
    CHECK(shape_of(in[0], q, 4));
    CHECK(shape_of(in[1], k, 4));
    CHECK(shape_of(in[2], v, 4));
    CHECK(shape_of(in[3], kn, 4));
    CHECK(shape_of(in[4], vn, 4));
    CHECK(shape_of(in[5], mask, 3));
    Job job = {.rows = q[0], .kv_heads = q[1], .queries = q[2], .chunk = kn[2], .width = k[2], .chunks = (int)(q[3] / 16)};
    int fits = q[3] % 16 == 0 && q[3] <= 16 * MAX_CHUNKS && job.chunk > 0 && job.queries % job.chunk == 0;
    for (int i = 0; i < 4; i++) fits = fits && k[i] == v[i] && kn[i] == vn[i];
    fits = fits && k[0] == q[0] && k[1] == q[1] && k[3] == q[3] && kn[0] == q[0] && kn[1] == q[1] && kn[3] == q[3];
    fits = fits && mask[0] == q[0] && mask[1] == job.chunk && mask[2] == job.width + job.chunk;
    if (!fits) return ort->CreateStatus(ORT_INVALID_ARGUMENT, "FusedAttention: inputs of shapes it does not take");
    OrtValue *output;
    CHECK(ort->KernelContext_GetOutput(context, 0, q, 4, &output));
    void *data[7];
    for (size_t i = 0; i < 6; i++) CHECK(ort->GetTensorMutableData((OrtValue *)in[i], &data[i]));
    CHECK(ort->GetTensorMutableData(output, &data[6]));
    job.q = data[0], job.k_hist = data[1], job.v_hist = data[2], job.k_new = data[3], job.v_new = data[4];
    job.mask = data[5], job.out = data[6], job.scale = ((Kernel *)kernel)->scale;
    job.tiles = (job.queries + QUERY_TILE - 1) / QUERY_TILE;
    size_t total = (size_t)(job.rows * job.kv_heads * job.tiles);
    if (total) CHECK(ort->KernelContext_ParallelFor(context, task, total, 0, &job));
    if (job.failed) return ort->CreateStatus(ORT_FAIL, "FusedAttention: out of memory for its scores");
    return NULL;
}

static OrtStatus *ORT_API_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                             void **out) {
    (void)op;
    Kernel *kernel = malloc(sizeof *kernel);
    if (!kernel) return api->CreateStatus(ORT_FAIL, "FusedAttention: out of memory");
    OrtStatus *status = api->KernelInfoGetAttribute_float(info, "scale", &kernel->scale);
    if (status) {
        free(kernel);
        return status;
    }
    *out = kernel;
    return NULL;
}

static void ORT_API_CALL destroy_kernel(void *kernel) { free(kernel); }
static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return "FusedAttention"; }
static const char *ORT_API_CALL provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return 6; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 1; }
static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index == 1 || index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL memory_type(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return OrtMemTypeDefault;
}
static int ORT_API_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL newest(const OrtCustomOp *op) { (void)op; return INT_MAX; }

static OrtCustomOp fused_attention = {
    .version = ORT_API_VERSION,
    .GetName = name,
    .GetExecutionProviderType = provider,
    .GetInputType = input_type,
    .GetInputTypeCount = input_count,
    .GetOutputType = output_type,
    .GetOutputTypeCount = output_count,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = required,
    .GetOutputCharacteristic = required,
    .GetInputMemoryType = memory_type,
    .GetVariadicInputMinArity = one,
    .GetVariadicInputHomogeneity = one,
    .GetVariadicOutputMinArity = one,
    .GetVariadicOutputHomogeneity = one,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
    .GetStartVersion = one,
    .GetEndVersion = newest,
};

/* what SessionOptions.register_custom_ops_library calls: the domain com.vlbatch with FusedAttention in it */
OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    ort = base->GetApi(ORT_API_VERSION);
    if (!ort) return NULL; /* an onnxruntime older than the API this was built for: it says so itself */
    if (!vlb_supported()) return ort->CreateStatus(ORT_FAIL, "FusedAttention needs a CPU with AVX-512F, F16C and FMA");
    OrtCustomOpDomain *domain;
    CHECK(ort->CreateCustomOpDomain("com.vlbatch", &domain));
    CHECK(ort->CustomOpDomain_Add(domain, &fused_attention));
    return ort->AddCustomOpDomain(options, domain);
}
