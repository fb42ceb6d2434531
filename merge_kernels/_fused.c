/* Fused CPU merge loops: every input read once, in its stored dtype, straight from memory.
 *
 * The torch path of a merge converts each input to float32 in a buffer, runs the kernel's
 * steps as separate passes and casts the result. These loops do the same arithmetic per
 * entry in one pass (widen to float32, the same float32 operations in the same order, one
 * rounding to the output dtype), so their output is bit-identical to the torch path's;
 * tests/merge_kernels/test_fused.py checks that against the torch kernels.
 *
 * dtype codes: 0 float32, 1 bfloat16, 2 float16 (the last only where the compiler has
 * _Float16). Pointers arrive as integers from torch's data_ptr(); the GIL is released while
 * a loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#if defined(__FLT16_MAX__)
#define HAS_F16 1
typedef _Float16 half_t;
#else
#define HAS_F16 0
#endif

#define MAX_INPUTS 8

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch's vectorised float32 -> bfloat16 cast (NaN -> 0xFFFF). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0xFFFFu : (uint16_t)rounded;
}

static inline float load(const void *p, int64_t j, int dtype) {
    if (dtype == BF16) return from_bf16(((const uint16_t *)p)[j]);
#if HAS_F16
    if (dtype == F16) return (float)((const half_t *)p)[j];
#endif
    return ((const float *)p)[j];
}

static inline void store(void *p, int64_t j, int dtype, float v) {
    if (dtype == BF16) {
        ((uint16_t *)p)[j] = to_bf16(v);
#if HAS_F16
    } else if (dtype == F16) {
        ((half_t *)p)[j] = (half_t)v;
#endif
    } else {
        ((float *)p)[j] = v;
    }
}

/* The (input dtype, output dtype) pairs each loop is built for; TIES, whose loop is large,
 * for the usual ones only (each pair is 8 specialisations of k, times the CPU clones). */
#if HAS_F16
#define TIES_PAIRS(X) X(BF16, BF16) X(BF16, F32) X(F32, F32) X(F32, BF16) X(F16, F16) X(F16, F32)
#define WEIGHTED_PAIRS(X) TIES_PAIRS(X) X(BF16, F16) X(F32, F16) X(F16, BF16)
#else
#define TIES_PAIRS(X) X(BF16, BF16) X(BF16, F32) X(F32, F32) X(F32, BF16)
#define WEIGHTED_PAIRS(X) TIES_PAIRS(X)
#endif

/* The input dtypes of the one-input passes (the trim's bracket, the tie search). */
#if HAS_F16
#define INPUT_DTYPES(X) X(BF16) X(F32) X(F16)
#else
#define INPUT_DTYPES(X) X(BF16) X(F32)
#endif

/* ---------------------------------------------------------------------------------------
 * DARE's keyed hash (merge_kernels/methods/random_mask.py gives the specification): per
 * element, two lowbias32 xorshift-multiply rounds of the flat index under the key words
 * (k0, k1), the index's high 32 bits folded into k1. Pure 32-bit integer arithmetic, so the
 * loops that use it vectorise; the bits are those of the torch int32 lanes.
 */
#define DARE_LANE_MUL 0x9E3779B1u
#define DARE_MUL_1 0x7FEB352Du
#define DARE_MUL_2 0x846CA68Bu

static uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= DARE_MUL_1;
    x ^= x >> 15;
    x *= DARE_MUL_2;
    return x ^ (x >> 16);
}

/* u for the index whose low word is lo, under (k0, k1). */
static inline __attribute__((always_inline)) uint32_t dare_u32(uint32_t lo, uint32_t k0,
                                                               uint32_t k1) {
    uint32_t x = lo * DARE_LANE_MUL + k0;
    x ^= x >> 16;
    x *= DARE_MUL_1;
    x ^= k1;
    x ^= x >> 15;
    x *= DARE_MUL_2;
    return x + 0x80000000u;
}

/* The low words of the flat indices [offset + j, offset + j + m) that share offset + j's
 * high word: m, at most left, up to the next multiple of 2^32 (where k1 changes). */
static inline int64_t dare_run_length(uint64_t index, int64_t left) {
    const uint64_t room = ((uint64_t)1 << 32) - (uint32_t)index;
    return (uint64_t)left < room ? left : (int64_t)room;
}

/* DARE's drop inside the weighted and TIES loops: per model, the key words for the run's
 * high word, the keep threshold and the rescale divisor. An entry at flat index lo + q of
 * the run keeps t when its hash is below thr (or always, under a density of 1), then is
 * divided by its density, as random_drop does with torch: (t * keep) / density, two
 * roundings (the extension is built with -ffp-contract=off). */
typedef struct {
    uint64_t key[MAX_INPUTS];   /* dare_key(seed, model index, tensor name) */
    uint32_t k0[MAX_INPUTS], k1[MAX_INPUTS];
    uint32_t thr[MAX_INPUTS];   /* keep when u < thr */
    uint32_t all[MAX_INPUTS];   /* all ones: keep every entry (density 1) */
    float density[MAX_INPUTS];  /* the rescale divisor (1: no rescale) */
    uint64_t offset;            /* flat index of entry 0 of the call */
    uint32_t lo;                /* low word of the flat index of the run's entry 0 */
} drop_consts;

/* Set the key words for the run starting at flat index `index`. */
static void drop_start_run(drop_consts *d, int k, uint64_t index) {
    const uint32_t high = mix32((uint32_t)(index >> 32));
    for (int i = 0; i < k; i++) {
        const uint64_t expanded = splitmix64(d->key[i]);
        d->k0[i] = (uint32_t)expanded;
        d->k1[i] = (uint32_t)(expanded >> 32) ^ high;
    }
    d->lo = (uint32_t)index;
}

/* NAME(fn, a, dare): fn over a's entries, in runs whose flat indices share their high word
 * under DARE (the drop's key words change with it). One definition for the weighted and the
 * TIES arguments, which both hold x, base, out, n, k, the dtypes and the drop. */
#define DEFINE_RUN_IN_RUNS(NAME, ARGS, CONST, FN)                                             \
    static void NAME(FN fn, CONST ARGS *a, int dare) {                                        \
        if (!dare) {                                                                          \
            fn(a);                                                                            \
            return;                                                                           \
        }                                                                                     \
        const size_t in_size = dtype_size(a->in_dtype), out_size = dtype_size(a->out_dtype); \
        ARGS run = *a;                                                                        \
        for (int64_t j = 0; j < a->n;) {                                                      \
            const uint64_t index = a->drop.offset + (uint64_t)j;                              \
            const int64_t m = dare_run_length(index, a->n - j);                               \
            for (int i = 0; i < a->k; i++) run.x[i] = (const char *)a->x[i] + j * in_size;    \
            run.base = (const char *)a->base + j * in_size;                                   \
            run.out = (char *)a->out + j * out_size;                                          \
            run.n = m;                                                                        \
            drop_start_run(&run.drop, a->k, index);                                           \
            fn(&run);                                                                         \
            j += m;                                                                           \
        }                                                                                     \
    }

static inline __attribute__((always_inline)) float drop_one(const drop_consts *d, int i,
                                                            uint32_t lo, float t) {
    const float keep = ((dare_u32(lo, d->k0[i], d->k1[i]) < d->thr[i]) | d->all[i]) ? 1.0f : 0.0f;
    return (t * keep) / d->density[i];
}

/* The loop with k (the number of models) a compile-time constant, so that the loop over
 * models unrolls and the loop over entries vectorises. */
#define SWITCH_K(LOOP, a, IN, OUT)                \
    switch ((a)->k) {                             \
        case 1: LOOP(a, 1, IN, OUT); break;       \
        case 2: LOOP(a, 2, IN, OUT); break;       \
        case 3: LOOP(a, 3, IN, OUT); break;       \
        case 4: LOOP(a, 4, IN, OUT); break;       \
        case 5: LOOP(a, 5, IN, OUT); break;       \
        case 6: LOOP(a, 6, IN, OUT); break;       \
        case 7: LOOP(a, 7, IN, OUT); break;       \
        default: LOOP(a, 8, IN, OUT); break;      \
    }

/* ---------------------------------------------------------------------------------------
 * Weighted sums: linear (no base) and task arithmetic (with a base).
 *
 *   linear:           m = x0*w0; m = fma(xi, wi, m) ...; m = m / divisor (if divide); out = m
 *   task arithmetic:  ti = xi - b; m = t0*w0; m = fma(ti, wi, m) ...; m /= divisor;
 *                     out = fma(m, lambda, b)
 * which is torch.mul, add_(alpha=w), div_ and torch.add(base, m, alpha=lambda) per entry.
 */
typedef struct {
    const void *x[MAX_INPUTS];
    const void *base;
    float w[MAX_INPUTS];
    float divisor;
    int divide;
    float lambda;
    void *out;
    int64_t n;
    int k, in_dtype, out_dtype;
    drop_consts drop; /* the DARE loops' drop (with a base only) */
} weighted_args;

static inline __attribute__((always_inline)) void weighted_loop(
    const weighted_args *a, const int k, const int in_dtype, const int out_dtype, const int dare) {
    const void *x[MAX_INPUTS];
    float w[MAX_INPUTS];
    for (int i = 0; i < k; i++) {
        x[i] = a->x[i];
        w[i] = a->w[i];
    }
    const void *base = a->base;
    const float divisor = a->divisor, lambda = a->lambda;
    const int divide = a->divide;
    void *out = a->out;
    const int64_t n = a->n;
    if (base == NULL) {
        for (int64_t j = 0; j < n; j++) {
            float m = load(x[0], j, in_dtype) * w[0];
            for (int i = 1; i < k; i++) m = fmaf(load(x[i], j, in_dtype), w[i], m);
            if (divide) m = m / divisor;
            store(out, j, out_dtype, m);
        }
    } else if (!dare) {
        for (int64_t j = 0; j < n; j++) {
            const float b = load(base, j, in_dtype);
            float m = (load(x[0], j, in_dtype) - b) * w[0];
            for (int i = 1; i < k; i++) m = fmaf(load(x[i], j, in_dtype) - b, w[i], m);
            if (divide) m = m / divisor;
            store(out, j, out_dtype, fmaf(m, lambda, b));
        }
    } else {
        /* DARE-linear: each task vector dropped and rescaled before it is weighted. */
        const drop_consts d = a->drop;
        for (int64_t j = 0; j < n; j++) {
            const float b = load(base, j, in_dtype);
            const uint32_t lo = d.lo + (uint32_t)j;
            float m = drop_one(&d, 0, lo, load(x[0], j, in_dtype) - b) * w[0];
            for (int i = 1; i < k; i++)
                m = fmaf(drop_one(&d, i, lo, load(x[i], j, in_dtype) - b), w[i], m);
            if (divide) m = m / divisor;
            store(out, j, out_dtype, fmaf(m, lambda, b));
        }
    }
}

#define weighted_plain(a, k, IN, OUT) weighted_loop(a, k, IN, OUT, 0)
#define weighted_dare(a, k, IN, OUT) weighted_loop(a, k, IN, OUT, 1)

#define DEFINE_WEIGHTED(IN, OUT)                                                                      \
    CLONES static void weighted_##IN##_##OUT(const weighted_args *a) { SWITCH_K(weighted_plain, a, IN, OUT) } \
    CLONES static void weighted_dare_##IN##_##OUT(const weighted_args *a) { SWITCH_K(weighted_dare, a, IN, OUT) }
WEIGHTED_PAIRS(DEFINE_WEIGHTED)

typedef void (*weighted_fn)(const weighted_args *);

static weighted_fn pick_weighted(int in_dtype, int out_dtype, int dare) {
#define PICK(IN, OUT) \
    if (in_dtype == IN && out_dtype == OUT) return dare ? weighted_dare_##IN##_##OUT : weighted_##IN##_##OUT;
    WEIGHTED_PAIRS(PICK)
#undef PICK
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Argument parsing shared by the entry points.
 */
static int valid_dtype(int dtype) { return dtype == F32 || dtype == BF16 || (HAS_F16 && dtype == F16); }

static int parse_pointers(PyObject *seq, const void **out, int *count, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL) return -1;
    Py_ssize_t size = PySequence_Fast_GET_SIZE(fast);
    if (size < 1 || size > MAX_INPUTS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: between 1 and %d inputs, got %zd", what, MAX_INPUTS, size);
        return -1;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        void *p = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(fast, i));
        if (p == NULL) {
            Py_DECREF(fast);
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: null pointer", what);
            return -1;
        }
        out[i] = p;
    }
    *count = (int)size;
    Py_DECREF(fast);
    return 0;
}

/* seq as a fast sequence of exactly ``expected`` items, or NULL with an error set. */
static PyObject *sequence_of(PyObject *seq, int expected, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast != NULL && PySequence_Fast_GET_SIZE(fast) != expected) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: expected %d values", what, expected);
        return NULL;
    }
    return fast;
}

static int parse_floats(PyObject *seq, float *out, int expected, const char *what) {
    PyObject *fast = sequence_of(seq, expected, what);
    if (fast == NULL) return -1;
    for (int i = 0; i < expected; i++) {
        double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (float)v;
    }
    Py_DECREF(fast);
    return 0;
}

static int parse_int64s(PyObject *seq, int64_t *out, int expected, const char *what) {
    PyObject *fast = sequence_of(seq, expected, what);
    if (fast == NULL) return -1;
    for (int i = 0; i < expected; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (int64_t)v;
    }
    Py_DECREF(fast);
    return 0;
}

static size_t dtype_size(int dtype) { return dtype == F32 ? 4 : 2; }

/* The DARE arguments of weighted() and ties(): each model's key (below 2^63), keep threshold
 * (random_mask's round(density * 2^32), above 2^32 - 1 for "keep all") and rescale divisor,
 * and the flat index of entry 0. Returns 1 when given (keys not None), 0 when not, -1 on
 * error. */
static int parse_drop(PyObject *keys, PyObject *thresholds, PyObject *densities,
                      unsigned long long offset, int k, int64_t n, drop_consts *d) {
    if (keys == NULL || keys == Py_None) return 0;
    int64_t key[MAX_INPUTS], thr[MAX_INPUTS];
    if (thresholds == NULL || densities == NULL) {
        PyErr_SetString(PyExc_TypeError, "dare: keys, thresholds and densities go together");
        return -1;
    }
    if (parse_int64s(keys, key, k, "dare keys") < 0 ||
        parse_int64s(thresholds, thr, k, "dare thresholds") < 0 ||
        parse_floats(densities, d->density, k, "dare densities") < 0)
        return -1;
    if (n < 0 || offset > ((uint64_t)1 << 63) - (uint64_t)n) {
        PyErr_SetString(PyExc_ValueError, "dare: offset + n must not exceed 2^63");
        return -1;
    }
    for (int i = 0; i < k; i++) {
        if (key[i] < 0 || thr[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "dare: negative key or threshold");
            return -1;
        }
        d->key[i] = (uint64_t)key[i];
        d->all[i] = thr[i] > 0xFFFFFFFFll ? 0xFFFFFFFFu : 0u;
        d->thr[i] = thr[i] > 0xFFFFFFFFll ? 0xFFFFFFFFu : (uint32_t)thr[i];
    }
    d->offset = offset;
    return 1;
}

PyDoc_STRVAR(weighted_doc,
             "weighted(out, out_dtype, inputs, in_dtype, weights, divide, divisor, base, lam, n, "
             "keys=None, thresholds=None, densities=None, offset=0)"
             "\n\nΣ wᵢ·xᵢ (÷ divisor if divide) into out; with a base pointer (not 0, in the "
             "inputs' dtype), base + lam·Σ wᵢ·(xᵢ − base). Pointers are integers; n entries. "
             "With keys (a base needed), DARE-linear: each xᵢ − base dropped where the hash "
             "u(keysᵢ, offset + j) is not below thresholdsᵢ (none dropped above 2^32 - 1), "
             "then divided by densitiesᵢ.");

DEFINE_RUN_IN_RUNS(run_weighted, weighted_args, const, weighted_fn)

static PyObject *py_weighted(PyObject *self, PyObject *args) {
    weighted_args a;
    memset(&a, 0, sizeof(a));
    PyObject *out_obj, *inputs, *weights, *base_obj;
    PyObject *keys = NULL, *thresholds = NULL, *densities = NULL;
    unsigned long long offset = 0;
    double divisor, lambda;
    long long n;
    if (!PyArg_ParseTuple(args, "OiOiOpdOdL|OOOK", &out_obj, &a.out_dtype, &inputs, &a.in_dtype,
                          &weights, &a.divide, &divisor, &base_obj, &lambda, &n, &keys,
                          &thresholds, &densities, &offset))
        return NULL;
    if (!valid_dtype(a.in_dtype) || !valid_dtype(a.out_dtype)) {
        PyErr_SetString(PyExc_ValueError, "weighted: unsupported dtype code");
        return NULL;
    }
    a.out = PyLong_AsVoidPtr(out_obj);
    if (a.out == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "weighted: null output");
        return NULL;
    }
    if (parse_pointers(inputs, a.x, &a.k, "weighted inputs") < 0) return NULL;
    if (parse_floats(weights, a.w, a.k, "weighted weights") < 0) return NULL;
    a.base = PyLong_AsVoidPtr(base_obj); /* 0 -> NULL: no base */
    if (a.base == NULL && PyErr_Occurred()) return NULL;
    a.divisor = (float)divisor;
    a.lambda = (float)lambda;
    a.n = (int64_t)n;
    const int dare = parse_drop(keys, thresholds, densities, offset, a.k, a.n, &a.drop);
    if (dare < 0) return NULL;
    if (dare && a.base == NULL) {
        PyErr_SetString(PyExc_ValueError, "weighted: DARE needs a base");
        return NULL;
    }
    weighted_fn fn = pick_weighted(a.in_dtype, a.out_dtype, dare);
    if (fn == NULL) {
        PyErr_SetString(PyExc_ValueError, "weighted: unsupported dtype pair");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS run_weighted(fn, &a, dare);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}


/* ---------------------------------------------------------------------------------------
 * TIES: the magnitude trim with given thresholds, the sign election and the disjoint mean.
 *
 * Per entry, as merge_kernels/methods/steps.py does it with torch:
 *   ti = xi - b;  keep_i = |ti| > thr_i, or |ti| == thr_i and the entry's index is at most
 *   cutoff_i (the last tied entry kept: under exact_k the first keep_at_i tied entries in
 *   flat order are kept, which is every tied entry up to the keep_at_i-th one; under the
 *   "threshold" rule cutoff_i >= n keeps them all);  tt_i = ti * keep_i
 *   e_i = tt_i (or tt_i * wi, weighted election);  vote = e_0 + e_1 + ... (or the sum of
 *   sign(e_i));  gamma = vote >= 0 ? 1 : -1;  agree_i = e_i * gamma > 0
 *   total = fma(tt_i * agree_i, wi, total) from +0;  divided by max(count of agreeing, 1),
 *   or by the sum of agreeing weights (1 where it is 0), or not at all;
 *   out = fma(total, lambda, b).
 * Magnitudes are compared as bit patterns with the sign cleared, as the torch path does.
 * Which tied entries survive is thus a comparison of indices, branch-free like the rest:
 * whatever the number of ties, the loop is one vectorised pass. It also counts each
 * model's tied entries (the next piece's "ties before").
 */
enum { DIV_COUNT = 0, DIV_WEIGHT_SUM = 1, DIV_NONE = 2 };
#define TIE_BLOCK 1024 /* entries per block: tie counts and the NaN check are summed per block */

typedef struct {
    const void *x[MAX_INPUTS];
    const void *base;
    void *out;
    float w[MAX_INPUTS];
    uint32_t thr[MAX_INPUTS];
    int64_t cutoff[MAX_INPUTS]; /* the last index whose tie is kept (-1: none) */
    int64_t ties[MAX_INPUTS];   /* out: entries at the threshold, kept or not */
    float lambda;
    int64_t n;
    int k, in_dtype, out_dtype;
    int weighted_election, frequency, divisor;
    int nan_seen;
    drop_consts drop; /* DARE-TIES: the drop replaces the trim */
} ties_args;

static inline uint32_t magnitude_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u & 0x7FFFFFFFu;
}

static inline float sign_of(float v) { return (float)(v > 0.0f) - (float)(v < 0.0f); }

/* The loop's invariants in locals, so that nothing in the loop reads through the args. */
typedef struct {
    float w[MAX_INPUTS];
    float elect[MAX_INPUTS]; /* wi for a weighted election, else 1 (tt * 1 is exact) */
    float lambda;
    int frequency;
    uint32_t by_count, by_weight, by_one; /* all ones for the divisor in use, else 0 */
} ties_consts;

/* One entry, given which models keep it; branch-free so the loop vectorises. */
static inline __attribute__((always_inline)) float ties_combine(
    const ties_consts *c, const int k, const float *t, const float *keepf, const float b) {
    float tt[MAX_INPUTS], e[MAX_INPUTS];
    for (int i = 0; i < k; i++) {
        tt[i] = t[i] * keepf[i];
        e[i] = tt[i] * c->elect[i];
    }
    float total_vote = e[0], sign_vote = sign_of(e[0]);
    for (int i = 1; i < k; i++) {
        total_vote = total_vote + e[i];
        sign_vote = sign_vote + sign_of(e[i]);
    }
    const float vote = c->frequency ? sign_vote : total_vote;
    const float gamma = vote >= 0.0f ? 1.0f : -1.0f;
    float total = 0.0f, count = 0.0f, weights = 0.0f;
    for (int i = 0; i < k; i++) {
        const float agree = (e[i] * gamma > 0.0f) ? 1.0f : 0.0f;
        total = fmaf(tt[i] * agree, c->w[i], total);
        count = count + agree;
        weights = fmaf(agree, c->w[i], weights);
    }
    /* x / 1 is exactly x, so "no divisor" divides by 1. The choice is made with bit masks:
     * a conditional here keeps the loop from vectorising. */
    const float by_count = count < 1.0f ? 1.0f : count;
    const float by_weight = weights == 0.0f ? 1.0f : weights;
    uint32_t count_bits, weight_bits, one_bits, divisor_bits;
    const float one = 1.0f;
    memcpy(&count_bits, &by_count, 4);
    memcpy(&weight_bits, &by_weight, 4);
    memcpy(&one_bits, &one, 4);
    divisor_bits = (count_bits & c->by_count) | (weight_bits & c->by_weight) | (one_bits & c->by_one);
    float divisor;
    memcpy(&divisor, &divisor_bits, 4);
    return fmaf(total / divisor, c->lambda, b);
}

static inline __attribute__((always_inline)) void ties_loop(
    ties_args *a, const int k, const int in_dtype, const int out_dtype, const int dare) {
    const int64_t n = a->n;
    const void *x[MAX_INPUTS];
    uint32_t thr[MAX_INPUTS];
    ties_consts c;
    for (int i = 0; i < k; i++) {
        x[i] = a->x[i];
        thr[i] = a->thr[i];
        c.w[i] = a->w[i];
        c.elect[i] = a->weighted_election ? a->w[i] : 1.0f;
    }
    c.lambda = a->lambda;
    c.frequency = a->frequency;
    c.by_count = a->divisor == DIV_COUNT ? 0xFFFFFFFFu : 0u;
    c.by_weight = a->divisor == DIV_WEIGHT_SUM ? 0xFFFFFFFFu : 0u;
    c.by_one = a->divisor == DIV_NONE ? 0xFFFFFFFFu : 0u;
    const void *base = a->base;
    void *out = a->out;
    const drop_consts d = a->drop;
    for (int64_t start = 0; start < n; start += TIE_BLOCK) {
        const int32_t len = (int32_t)(n - start < TIE_BLOCK ? n - start : TIE_BLOCK);
        /* Each model's cutoff relative to the block, clamped to [-1, len]: 32-bit lanes. */
        int32_t last[MAX_INPUTS];
        for (int i = 0; i < k; i++) {
            const int64_t rel = a->cutoff[i] - start;
            last[i] = (int32_t)(rel < -1 ? -1 : (rel > len ? len : rel));
        }
        uint32_t nan = 0;
        uint32_t ties[MAX_INPUTS] = {0};
        for (int32_t q = 0; q < len; q++) {
            const int64_t j = start + q;
            const float b = load(base, j, in_dtype);
            float t[MAX_INPUTS], keepf[MAX_INPUTS];
            for (int i = 0; i < k; i++) {
                t[i] = load(x[i], j, in_dtype) - b;
                if (dare) { /* no trim, no ties, and NaN merges as torch merges it */
                    t[i] = drop_one(&d, i, d.lo + (uint32_t)j, t[i]);
                    keepf[i] = 1.0f;
                    continue;
                }
                const uint32_t m = magnitude_bits(t[i]);
                const uint32_t at = m == thr[i];
                keepf[i] = ((m > thr[i]) | (at & (q <= last[i]))) ? 1.0f : 0.0f;
                ties[i] += at;
                nan |= (m > 0x7F800000u);
            }
            store(out, j, out_dtype, ties_combine(&c, k, t, keepf, b));
        }
        if (nan) {
            a->nan_seen = 1;
            return;
        }
        for (int i = 0; i < k; i++) a->ties[i] += ties[i];
    }
}

#define ties_plain(a, k, IN, OUT) ties_loop(a, k, IN, OUT, 0)
#define ties_dare(a, k, IN, OUT) ties_loop(a, k, IN, OUT, 1)
#define DEFINE_TIES(IN, OUT)                                                                \
    CLONES static void ties_##IN##_##OUT(ties_args *a) { SWITCH_K(ties_plain, a, IN, OUT) } \
    CLONES static void ties_dare_##IN##_##OUT(ties_args *a) { SWITCH_K(ties_dare, a, IN, OUT) }
TIES_PAIRS(DEFINE_TIES)

typedef void (*ties_fn)(ties_args *);

static ties_fn pick_ties(int in_dtype, int out_dtype, int dare) {
#define PICK(IN, OUT) \
    if (in_dtype == IN && out_dtype == OUT) return dare ? ties_dare_##IN##_##OUT : ties_##IN##_##OUT;
    TIES_PAIRS(PICK)
#undef PICK
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * The trim threshold's bracket pass over one model: |x - b| against a bracket (lo, hi).
 * Counts the entries above hi, at hi and at lo, and collects those strictly inside into
 * cand, in flat order (up to cap of them; the returned inside count may be larger). With
 * chunk_counts, it also records per chunk of BRACKET_CHUNK entries how many were at hi, at
 * lo and inside (three rows of int32): whichever of them turns out to be the threshold,
 * the tied entry where exact_k stops keeping is then found without another pass.
 */
#define BRACKET_CHUNK 2048

typedef struct {
    const void *x, *base;
    float *cand;
    int32_t *chunk_counts; /* NULL, or 3 rows of ceil(n / BRACKET_CHUNK) */
    int64_t n, cap;
    uint32_t lo, hi; /* magnitude bit patterns, lo < hi */
    int in_dtype;
    int64_t above, at_hi, at_lo, inside;
    int nan_seen;
} bracket_args;

static inline __attribute__((always_inline)) void bracket_loop(bracket_args *a, const int in_dtype) {
    const uint32_t lo = a->lo, hi = a->hi;
    const void *x = a->x, *base = a->base;
    float *cand = a->cand;
    int64_t above = 0, at_hi = 0, at_lo = 0, inside = 0;
    uint32_t nan = 0;
    const int64_t n = a->n, cap = a->cap;
    /* Counts over a chunk in vector registers, then, only where the chunk has entries
     * inside the bracket, a look at each group of 16 for the ones to collect. */
    enum { CHUNK = BRACKET_CHUNK, GROUP = 16 };
    uint32_t mags[CHUNK];
    int32_t *rows = a->chunk_counts;
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t len = n - start < CHUNK ? n - start : CHUNK;
        uint32_t c_above = 0, c_hi = 0, c_lo = 0, c_in = 0, c_nan = 0;
        for (int64_t j = 0; j < len; j++) {
            const uint32_t m =
                magnitude_bits(load(x, start + j, in_dtype) - load(base, start + j, in_dtype));
            mags[j] = m;
            c_above += m > hi;
            c_hi += m == hi;
            c_lo += m == lo;
            c_in += (m > lo) & (m < hi);
            c_nan |= m > 0x7F800000u;
        }
        above += c_above;
        at_hi += c_hi;
        at_lo += c_lo;
        nan |= c_nan;
        if (rows != NULL) {
            const int64_t chunk = start / CHUNK;
            rows[chunk] = (int32_t)c_hi;
            rows[chunks + chunk] = (int32_t)c_lo;
            rows[2 * chunks + chunk] = (int32_t)c_in;
        }
        if (!c_in) continue;
        int64_t j = 0;
        for (; j + GROUP <= len; j += GROUP) {
            uint32_t any = 0;
            for (int q = 0; q < GROUP; q++) any |= (mags[j + q] > lo) & (mags[j + q] < hi);
            if (!any) continue;
            for (int q = 0; q < GROUP; q++) { /* branch-free: slot cap takes the overflow */
                const uint32_t m = mags[j + q];
                memcpy(&cand[inside < cap ? inside : cap], &m, 4);
                inside += (m > lo) & (m < hi);
            }
        }
        for (; j < len; j++) {
            const uint32_t m = mags[j];
            if (m > lo && m < hi) {
                if (inside < cap) memcpy(&cand[inside], &m, 4);
                inside++;
            }
        }
    }
    a->above = above;
    a->at_hi = at_hi;
    a->at_lo = at_lo;
    a->inside = inside;
    a->nan_seen = nan != 0;
}

#define DEFINE_BRACKET(IN) \
    CLONES static void bracket_##IN(bracket_args *a) { bracket_loop(a, IN); }
INPUT_DTYPES(DEFINE_BRACKET)

static void (*pick_bracket(int in_dtype))(bracket_args *) {
#define PICK(IN) \
    if (in_dtype == IN) return bracket_##IN;
    INPUT_DTYPES(PICK)
#undef PICK
    return NULL;
}

PyDoc_STRVAR(bracket_doc,
             "bracket(x, base, dtype, n, lo_bits, hi_bits, cand, cap, chunk_counts=0)\n\n"
             "Over |x - base|: (above hi, at hi, at lo, inside, nan_seen); the magnitudes "
             "strictly inside (lo, hi) go to cand in flat order (float32, up to cap of them; "
             "cand has room for cap + 1). chunk_counts (int32, 3 rows of "
             "ceil(n / BRACKET_CHUNK), or 0) gets per chunk the entries at hi, at lo, inside.");

static PyObject *py_bracket(PyObject *self, PyObject *args) {
    bracket_args a;
    memset(&a, 0, sizeof(a));
    PyObject *x_obj, *base_obj, *cand_obj, *rows_obj = NULL;
    long long n, cap;
    unsigned long lo, hi;
    if (!PyArg_ParseTuple(args, "OOiLkkOL|O", &x_obj, &base_obj, &a.in_dtype, &n, &lo, &hi,
                          &cand_obj, &cap, &rows_obj))
        return NULL;
    a.x = PyLong_AsVoidPtr(x_obj);
    a.base = PyLong_AsVoidPtr(base_obj);
    a.cand = (float *)PyLong_AsVoidPtr(cand_obj);
    if (rows_obj != NULL) a.chunk_counts = (int32_t *)PyLong_AsVoidPtr(rows_obj);
    if (PyErr_Occurred()) return NULL;
    if (a.x == NULL || a.base == NULL || (a.cand == NULL && cap > 0) || lo >= hi) {
        PyErr_SetString(PyExc_ValueError, "bracket: null pointer or empty bracket");
        return NULL;
    }
    a.n = (int64_t)n;
    a.cap = (int64_t)cap;
    a.lo = (uint32_t)lo;
    a.hi = (uint32_t)hi;
    void (*fn)(bracket_args *) = pick_bracket(a.in_dtype);
    if (fn == NULL) {
        PyErr_SetString(PyExc_ValueError, "bracket: unsupported dtype code");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS fn(&a);
    Py_END_ALLOW_THREADS return Py_BuildValue("LLLLi", (long long)a.above, (long long)a.at_hi,
                                               (long long)a.at_lo, (long long)a.inside,
                                               a.nan_seen);
}


/* ---------------------------------------------------------------------------------------
 * Where the r-th entry (1-based, in flat order) with |x - b| at a threshold sits: the last
 * tied entry that exact_k keeps in a piece whose tie budget is r. Stops there; reads the
 * whole piece only when it holds fewer than r such entries.
 */
typedef struct {
    const void *x, *base;
    int64_t n, r;
    uint32_t thr;
    int64_t index, count; /* out: the index or -1; the tied entries met up to it */
} locate_args;

static inline __attribute__((always_inline)) void locate_loop(locate_args *a, const int in_dtype) {
    const void *x = a->x, *base = a->base;
    const uint32_t thr = a->thr;
    int64_t count = 0;
    a->index = -1;
    enum { CHUNK = 4096 };
    for (int64_t start = 0; start < a->n; start += CHUNK) {
        const int64_t stop = a->n - start < CHUNK ? a->n : start + CHUNK;
        uint32_t c = 0;
        for (int64_t j = start; j < stop; j++)
            c += magnitude_bits(load(x, j, in_dtype) - load(base, j, in_dtype)) == thr;
        if (count + c < a->r) {
            count += c;
            continue;
        }
        for (int64_t j = start; j < stop; j++) {
            count += magnitude_bits(load(x, j, in_dtype) - load(base, j, in_dtype)) == thr;
            if (count == a->r) {
                a->index = j;
                break;
            }
        }
        break;
    }
    a->count = count;
}

#define DEFINE_LOCATE(IN) \
    CLONES static void locate_##IN(locate_args *a) { locate_loop(a, IN); }
INPUT_DTYPES(DEFINE_LOCATE)

static void (*pick_locate(int in_dtype))(locate_args *) {
#define PICK(IN) \
    if (in_dtype == IN) return locate_##IN;
    INPUT_DTYPES(PICK)
#undef PICK
    return NULL;
}

PyDoc_STRVAR(locate_doc,
             "locate_tie(x, base, dtype, n, thr_bits, r)\n\n"
             "(index, count): the index of the r-th of n entries (r >= 1, flat order) whose "
             "|x - base| has the magnitude bit pattern thr_bits and count = r, or (-1, how "
             "many there are) when there are fewer.");

static PyObject *py_locate_tie(PyObject *self, PyObject *args) {
    locate_args a;
    memset(&a, 0, sizeof(a));
    PyObject *x_obj, *base_obj;
    int dtype;
    long long n, r;
    unsigned long thr;
    if (!PyArg_ParseTuple(args, "OOiLkL", &x_obj, &base_obj, &dtype, &n, &thr, &r)) return NULL;
    a.x = PyLong_AsVoidPtr(x_obj);
    a.base = PyLong_AsVoidPtr(base_obj);
    if (PyErr_Occurred()) return NULL;
    if (a.x == NULL || a.base == NULL || r < 1) {
        PyErr_SetString(PyExc_ValueError, "locate_tie: null pointer or r < 1");
        return NULL;
    }
    a.n = (int64_t)n;
    a.r = (int64_t)r;
    a.thr = (uint32_t)thr;
    void (*fn)(locate_args *) = pick_locate(dtype);
    if (fn == NULL) {
        PyErr_SetString(PyExc_ValueError, "locate_tie: unsupported dtype code");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS fn(&a);
    Py_END_ALLOW_THREADS return Py_BuildValue("LL", (long long)a.index, (long long)a.count);
}

PyDoc_STRVAR(ties_doc,
             "ties(out, out_dtype, inputs, base, in_dtype, weights, thresholds, cutoffs, "
             "weighted_election, frequency, divisor, lam, n)\n\n"
             "The TIES merge of n entries into out, given each model's trim threshold (bit "
             "pattern) and the last index whose tied entry is kept (-1: none, n or more: all); "
             "returns (each model's count of tied entries, nan_seen). With keys, thresholds, "
             "densities and offset (as weighted() takes them), DARE-TIES: the drop replaces "
             "the trim (thresholds and cutoffs are ignored, no ties are counted and NaN is "
             "merged, not reported).");

DEFINE_RUN_IN_RUNS(run_ties, ties_args, , ties_fn)

static PyObject *py_ties(PyObject *self, PyObject *args) {
    ties_args a;
    memset(&a, 0, sizeof(a));
    PyObject *out_obj, *inputs, *base_obj, *weights, *thresholds, *cutoffs;
    PyObject *keys = NULL, *drop_thresholds = NULL, *densities = NULL;
    unsigned long long offset = 0;
    double lambda;
    long long n;
    if (!PyArg_ParseTuple(args, "OiOOiOOOppidL|OOOK", &out_obj, &a.out_dtype, &inputs, &base_obj,
                          &a.in_dtype, &weights, &thresholds, &cutoffs, &a.weighted_election,
                          &a.frequency, &a.divisor, &lambda, &n, &keys, &drop_thresholds,
                          &densities, &offset))
        return NULL;
    a.out = PyLong_AsVoidPtr(out_obj);
    a.base = PyLong_AsVoidPtr(base_obj);
    if (PyErr_Occurred()) return NULL;
    if (a.out == NULL || a.base == NULL) {
        PyErr_SetString(PyExc_ValueError, "ties: null pointer");
        return NULL;
    }
    if (parse_pointers(inputs, a.x, &a.k, "ties inputs") < 0) return NULL;
    if (parse_floats(weights, a.w, a.k, "ties weights") < 0) return NULL;
    int64_t thr[MAX_INPUTS];
    if (parse_int64s(thresholds, thr, a.k, "ties thresholds") < 0) return NULL;
    for (int i = 0; i < a.k; i++) a.thr[i] = (uint32_t)thr[i];
    if (parse_int64s(cutoffs, a.cutoff, a.k, "ties cutoffs") < 0) return NULL;
    if (a.divisor < DIV_COUNT || a.divisor > DIV_NONE) {
        PyErr_SetString(PyExc_ValueError, "ties: unknown divisor");
        return NULL;
    }
    a.lambda = (float)lambda;
    a.n = (int64_t)n;
    const int dare = parse_drop(keys, drop_thresholds, densities, offset, a.k, a.n, &a.drop);
    if (dare < 0) return NULL;
    ties_fn fn = pick_ties(a.in_dtype, a.out_dtype, dare);
    if (fn == NULL) {
        PyErr_SetString(PyExc_ValueError, "ties: unsupported dtype pair");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS run_ties(fn, &a, dare);
    Py_END_ALLOW_THREADS PyObject *counts = PyTuple_New(a.k);
    if (counts == NULL) return NULL;
    for (int i = 0; i < a.k; i++) PyTuple_SET_ITEM(counts, i, PyLong_FromLongLong(a.ties[i]));
    return Py_BuildValue("Ni", counts, a.nan_seen);
}

/* ---------------------------------------------------------------------------------------
 * DARE's keyed keep masks (merge_kernels/methods/random_mask.py gives the specification):
 * per element, two lowbias32 xorshift-multiply rounds of the flat index under the key words
 * (k0, k1), the index's high 32 bits folded into k1. One pass of pure 32-bit integer
 * arithmetic, so the loop vectorises; the bits are those of the torch int32 lanes.
 */
enum { DARE_MASK = 0, DARE_UNIFORM = 1, DARE_PROB_F32 = 2, DARE_PROB_F64 = 3 };

typedef struct {
    uint64_t key, offset;
    int64_t n;
    uint32_t threshold;     /* DARE_MASK: keep when u < threshold */
    const void *probs;      /* DARE_PROB_*: keep when u < round(p * 2^32) */
    void *out;              /* uint8 (masks) or uint32 (DARE_UNIFORM) */
    int64_t invalid;        /* out: probabilities outside [0, 1], NaN included */
} dare_args;

/* One run of m elements from out/probs position j, whose indices share the high word:
 * the switch on the mode sits outside the element loop so each loop vectorises. */
static inline __attribute__((always_inline)) int64_t dare_run(dare_args *a, int mode, int64_t j,
                                                              uint32_t lo, int64_t m, uint32_t k0,
                                                              uint32_t k1) {
    int64_t invalid = 0;
    if (mode == DARE_MASK) {
        uint8_t *out = (uint8_t *)a->out + j;
        const uint32_t t = a->threshold;
        for (int64_t q = 0; q < m; q++) out[q] = dare_u32(lo + (uint32_t)q, k0, k1) < t;
    } else if (mode == DARE_UNIFORM) {
        uint32_t *out = (uint32_t *)a->out + j;
        for (int64_t q = 0; q < m; q++) out[q] = dare_u32(lo + (uint32_t)q, k0, k1);
    } else if (mode == DARE_PROB_F32) {
        uint8_t *out = (uint8_t *)a->out + j;
        const float *p = (const float *)a->probs + j;
        for (int64_t q = 0; q < m; q++) {
            /* p·2^32 is exact in double; rint rounds half to even, as torch's round_. */
            const double limit = rint((double)p[q] * 4294967296.0);
            out[q] = (double)dare_u32(lo + (uint32_t)q, k0, k1) < limit;
            invalid += !(p[q] >= 0.0f && p[q] <= 1.0f);
        }
    } else {
        uint8_t *out = (uint8_t *)a->out + j;
        const double *p = (const double *)a->probs + j;
        for (int64_t q = 0; q < m; q++) {
            const double limit = rint(p[q] * 4294967296.0);
            out[q] = (double)dare_u32(lo + (uint32_t)q, k0, k1) < limit;
            invalid += !(p[q] >= 0.0 && p[q] <= 1.0);
        }
    }
    return invalid;
}

static inline __attribute__((always_inline)) void dare_loop(dare_args *a, const int mode) {
    const uint64_t expanded = splitmix64(a->key);
    const uint32_t k0 = (uint32_t)expanded;
    int64_t invalid = 0;
    for (int64_t j = 0; j < a->n;) {
        const uint64_t index = a->offset + (uint64_t)j;
        const uint32_t lo = (uint32_t)index;
        /* Up to the next multiple of 2^32, where the high word, and so k1, changes. */
        const uint64_t room = ((uint64_t)1 << 32) - lo;
        const int64_t m = (uint64_t)(a->n - j) < room ? a->n - j : (int64_t)room;
        const uint32_t k1 = (uint32_t)(expanded >> 32) ^ mix32((uint32_t)(index >> 32));
        invalid += dare_run(a, mode, j, lo, m, k0, k1);
        j += m;
    }
    a->invalid = invalid;
}

CLONES static void dare_mask(dare_args *a) { dare_loop(a, DARE_MASK); }
CLONES static void dare_uniform(dare_args *a) { dare_loop(a, DARE_UNIFORM); }
CLONES static void dare_prob_f32(dare_args *a) { dare_loop(a, DARE_PROB_F32); }
CLONES static void dare_prob_f64(dare_args *a) { dare_loop(a, DARE_PROB_F64); }

PyDoc_STRVAR(dare_doc,
             "dare(out, mode, key, offset, n, threshold=0, probs=0)\n\n"
             "DARE's hash u(key, i) for i in [offset, offset + n) (key < 2^63, offset + n <= "
             "2^63). mode 0: out (uint8) gets u < threshold (threshold < 2^32); mode 1: out "
             "(uint32) gets u; mode 2 / 3: out (uint8) gets u < round(p * 2^32) for the float32 "
             "/ float64 probabilities at probs. Returns how many probabilities lie outside "
             "[0, 1] (NaN included); 0 for modes 0 and 1.");

static PyObject *py_dare(PyObject *self, PyObject *args) {
    dare_args a;
    memset(&a, 0, sizeof(a));
    PyObject *out_obj, *probs_obj = NULL;
    int mode;
    unsigned long long key, offset, threshold = 0;
    long long n;
    if (!PyArg_ParseTuple(args, "OiKKL|KO", &out_obj, &mode, &key, &offset, &n, &threshold,
                          &probs_obj))
        return NULL;
    a.out = PyLong_AsVoidPtr(out_obj);
    if (probs_obj != NULL) a.probs = PyLong_AsVoidPtr(probs_obj);
    if (PyErr_Occurred()) return NULL;
    const int with_probs = mode == DARE_PROB_F32 || mode == DARE_PROB_F64;
    if (mode < DARE_MASK || mode > DARE_PROB_F64 || n < 0 || key >> 63 ||
        offset > ((uint64_t)1 << 63) - (uint64_t)n || threshold >> 32 ||
        (n > 0 && (a.out == NULL || (with_probs && a.probs == NULL)))) {
        PyErr_SetString(PyExc_ValueError, "dare: bad mode, range, threshold or null pointer");
        return NULL;
    }
    a.key = key;
    a.offset = offset;
    a.n = (int64_t)n;
    a.threshold = (uint32_t)threshold;
    void (*fn)(dare_args *) = mode == DARE_MASK      ? dare_mask
                              : mode == DARE_UNIFORM ? dare_uniform
                              : mode == DARE_PROB_F32 ? dare_prob_f32
                                                      : dare_prob_f64;
    Py_BEGIN_ALLOW_THREADS fn(&a);
    Py_END_ALLOW_THREADS return PyLong_FromLongLong((long long)a.invalid);
}

/* ---------------------------------------------------------------------------------------
 * CRC-32 (zlib's: reflected polynomial 0xEDB88320), the shard checksum. With PCLMULQDQ the
 * buffer is folded 64 bytes at a time with carry-less multiplies (Gopal et al., "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ Instruction", Intel 2009); the
 * 16 bytes left are then run through the byte table from a zero register, which is the same
 * reduction modulo the polynomial. Equal to zlib.crc32 for every input (tested).
 */
static uint32_t crc_table[256];

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int b = 0; b < 8; b++) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[i] = c;
    }
}

/* The raw register (no pre- or post-inversion) after n more bytes. */
static uint32_t crc_bytes(uint32_t reg, const uint8_t *p, size_t n) {
    while (n--) reg = crc_table[(reg ^ *p++) & 0xFFu] ^ (reg >> 8);
    return reg;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAS_CLMUL_CODE 1

__attribute__((target("pclmul,sse4.1"))) static inline __m128i fold(__m128i x, __m128i k,
                                                                    __m128i next) {
    const __m128i low = _mm_clmulepi64_si128(x, k, 0x00);
    const __m128i high = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(low, high), next);
}

/* The register after the whole 16-byte blocks of p (n >= 64); *done gets their length. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(uint32_t reg,
                                                                  const uint8_t *p, size_t n,
                                                                  size_t *done) {
    const __m128i by4 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i by1 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const uint8_t *start = p;
    __m128i x0 = _mm_loadu_si128((const __m128i *)p);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)reg));
    p += 64;
    n -= 64;
    while (n >= 64) {
        x0 = fold(x0, by4, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, by4, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, by4, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, by4, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x1 = fold(x0, by1, x1);
    x2 = fold(x1, by1, x2);
    x3 = fold(x2, by1, x3);
    while (n >= 16) {
        x3 = fold(x3, by1, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    uint8_t last[16];
    _mm_storeu_si128((__m128i *)last, x3);
    *done = (size_t)(p - start);
    return crc_bytes(0, last, 16);
}
#else
#define HAS_CLMUL_CODE 0
#endif

static int has_clmul(void) {
#if HAS_CLMUL_CODE
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#else
    return 0;
#endif
}

static int clmul_ok = 0;

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t reg = ~crc;
#if HAS_CLMUL_CODE
    if (clmul_ok && n >= 64) {
        size_t done = 0;
        reg = crc_fold(reg, p, n, &done);
        p += done;
        n -= done;
    }
#endif
    return ~crc_bytes(reg, p, n);
}

PyDoc_STRVAR(crc32_doc,
             "crc32(data, value=0)\n\nzlib.crc32 of a bytes-like object, continuing from "
             "value; folded with carry-less multiplies where the CPU has them.");

static PyObject *py_crc32(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &value)) return NULL;
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS crc = crc32_update(value, (const uint8_t *)view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef methods[] = {
    {"weighted", py_weighted, METH_VARARGS, weighted_doc},
    {"ties", py_ties, METH_VARARGS, ties_doc},
    {"bracket", py_bracket, METH_VARARGS, bracket_doc},
    {"locate_tie", py_locate_tie, METH_VARARGS, locate_doc},
    {"crc32", py_crc32, METH_VARARGS, crc32_doc},
    {"dare", py_dare, METH_VARARGS, dare_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "merge_kernels._fused",
    "Fused CPU merge loops (see merge_kernels/fused.py).", -1, methods, NULL, NULL, NULL, NULL,
};

/* A set of the (input, output) dtype code pairs that LIST names. */
#define PAIR_ITEM(IN, OUT)                                                  \
    if (ok) {                                                              \
        PyObject *item = Py_BuildValue("(ii)", IN, OUT);                   \
        ok = item != NULL && PySet_Add(set, item) == 0;                    \
        Py_XDECREF(item);                                                  \
    }
#define PAIR_SET(LIST, name)                                                \
    {                                                                      \
        PyObject *set = PyFrozenSet_New(NULL);                             \
        int ok = set != NULL;                                              \
        LIST(PAIR_ITEM)                                                    \
        if (!ok || PyModule_AddObject(m, name, set) < 0) {                 \
            Py_XDECREF(set);                                               \
            Py_DECREF(m);                                                  \
            return NULL;                                                   \
        }                                                                  \
    }

PyMODINIT_FUNC PyInit__fused(void) {
    crc_table_init();
    clmul_ok = has_clmul();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "HAS_F16", HAS_F16) < 0 ||
        PyModule_AddIntConstant(m, "MAX_INPUTS", MAX_INPUTS) < 0 ||
        PyModule_AddIntConstant(m, "BRACKET_CHUNK", BRACKET_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "HAS_CLMUL", clmul_ok) < 0 ||
        PyModule_AddIntConstant(m, "DARE_LOOPS", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PAIR_SET(WEIGHTED_PAIRS, "WEIGHTED_PAIRS")
    PAIR_SET(TIES_PAIRS, "TIES_PAIRS")
    return m;
}
