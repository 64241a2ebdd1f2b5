/* fp8conv.accel._native: the compiled kernels, a plain C99 CPython extension over buffers (no numpy headers).

The numerics are the numpy reference's (kernels.py, microscale.py, observers.py), operation for
operation in float32, so codes, scales and statistics are bit for bit the same: built without
-ffast-math and with -ffp-contract=off (setup.py), so the compiler neither reassociates nor fuses a
multiply and an add. Scales and zero points are computed by the numpy reference from the tile ranges
these kernels return (a few numbers per tile); the kernels do the per-element work:

- tile_range: per tile max |x| (symmetric) or min and max (asymmetric), as the reference's tiles;
- quantize: codes of x / scale (+ zero point), clamped to the code range and rounded to nearest even
  (FP8 e4m3 / e5m2, or integers), with the error statistics in the reference's fixed order: per row,
  column c into lane c % 8, each lane a sequential float64 sum, the lanes added 0..7, rows in order;
- micro_encode / micro_stats: NVFP4 / MXFP4 / MXFP8 elements of each group and their statistics;
  micro_encode_stats: both in one pass over the rows (under the observers' scales); micro_quantize: the min-max
  group amax, scale codes and micro_encode_stats' work in one pass (what a min-max conversion calls); their rows
  run in AVX2 intrinsics where the CPU has it;
- mse_search: the mse observer's candidate evaluation over the groups along a source's rows (AVX-512 /
  AVX2 kernels chosen at run time; -DFP8CONV_NO_AVX512 leaves the AVX-512 one out); micro_search: the
  microscale observers' (mse, expanded) per-group search over scale codes (an AVX-512 clone besides AVX2).

Every source is bf16 (its bits as uint16), fp16 or float32, C order. NaN / Inf in a source are
reported (return value 1) and nothing else is promised: the caller takes the numpy path, which owns
the NaN / Inf policy. FP8 rounding is one float addition (fp_magnitude): branch free, so the row loops
vectorise.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>

#define LANES 8

/* Runtime choice of an AVX2 build of the hot loops on x86-64 with GCC / clang and ifunc support (the
   same C, vectorised 8 floats wide instead of 4; bench/RESULTS.md says whether it pays);
   -DFP8CONV_NO_CLONES or another platform: one portable build. */
#if defined(__x86_64__) && defined(__linux__) && !defined(FP8CONV_NO_CLONES) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 6))
#define CLONES __attribute__((target_clones("avx2", "default")))
/* mse_search's integer grids: explicit AVX-512 and AVX2 kernels (x86 intrinsics), chosen at run time. */
#define MSE_AVX2 1
#include <immintrin.h>
#define AVX2_HOT static inline __attribute__((always_inline, target("avx2")))
#if !defined(FP8CONV_NO_AVX512) && (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 8)
#define MSE_AVX512 1
#define AVX512_HOT static inline __attribute__((always_inline, target("avx512f,avx512vl")))
#endif
#else
#define CLONES
#endif
/* micro_search also gets an AVX-512 clone where the AVX-512 kernels are built: its 32 groups side by side
   are two float32 and four float64 registers (NVFP4's search about 1.3x, MX's about 1.4x faster than AVX2). */
#ifdef MSE_AVX512
#define SEARCH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEARCH_CLONES CLONES
#endif

/* Helpers of the hot loops are inlined into each clone, so they run in its instruction set (not
   inlined, they are compiled once, for the baseline: SSE2 on x86-64). */
#if defined(__GNUC__) || defined(__clang__)
#define HOT static inline __attribute__((always_inline))
#else
#define HOT static inline
#endif

enum { SRC_BF16 = 0, SRC_F32 = 1, SRC_F16 = 2 };

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint32_t half_bits(uint16_t h)
{
    /* fp16 -> float32 bit pattern (exact). */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0x1F) return sign | 0x7F800000u | (mant << 13);
    if (exp == 0) return sign | bits_of((float)mant * 5.9604644775390625e-08f); /* mant * 2^-24, exact */
    return sign | ((exp + 112u) << 23) | (mant << 13);
}

/* Row r of a source as float32 bit patterns into dst[0..n). */
HOT void load_row(const void *src, int kind, Py_ssize_t cols, Py_ssize_t r, Py_ssize_t c0, Py_ssize_t n,
                     uint32_t *restrict dst)
{
    Py_ssize_t i;
    if (kind == SRC_BF16) {
        const uint16_t *s = (const uint16_t *)src + r * cols + c0;
        for (i = 0; i < n; i++) dst[i] = (uint32_t)s[i] << 16;
    } else if (kind == SRC_F32) {
        memcpy(dst, (const uint32_t *)src + r * cols + c0, (size_t)n * 4);
    } else {
        const uint16_t *s = (const uint16_t *)src + r * cols + c0;
        for (i = 0; i < n; i++) dst[i] = half_bits(s[i]);
    }
}

/* ---- rounding -------------------------------------------------------------------------------- */

/* A float element format with subnormals, as the constants of fp_magnitude. */
typedef struct {
    uint32_t magic_shift, magic_floor, code_shift, code_offset;
} FloatFormat;

static FloatFormat float_format(int mbits, int bias)
{
    /* M = 2^(e + 23 - mbits) for a in [2^e, 2^(e+1)) (never below 2^(emin + 23 - mbits), emin = 1 - bias):
       a + M rounds a to a multiple of ulp(M) = the format's step there, to nearest even as float32
       additions round; (a + M) - M is exact; bits(a + M) - bits(M) counts steps above M (the mantissa
       with its implicit bit for a normal, the code for a subnormal); the exponent field comes from M. */
    FloatFormat f;
    uint32_t shift = 23u - (uint32_t)mbits;
    f.magic_shift = shift << 23;
    f.magic_floor = (uint32_t)(127 + 1 - bias + (int)shift) << 23;
    f.code_shift = shift;
    f.code_offset = (uint32_t)(127 + (int)shift - bias + 1) << mbits;
    return f;
}

/* Round a finite float32 magnitude a (already <= the format's max) to nearest even: its value, and its
   code (without the sign bit) in *code. */
static inline float fp_magnitude(float a, FloatFormat f, uint32_t *code)
{
    uint32_t m = (bits_of(a) & 0x7F800000u) + f.magic_shift;
    m = m > f.magic_floor ? m : f.magic_floor;
    float big = a + float_of(m);
    *code = bits_of(big) - m + (m >> f.code_shift) - f.code_offset;
    return big - float_of(m);
}

/* rint for |v| < 2^22, to nearest even (what float32 addition does). */
static inline float round_int(float v)
{
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

/* ---- argument helpers ----------------------------------------------------------------------- */

static int need(Py_buffer *b, Py_ssize_t bytes, const char *what)
{
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes given, %zd needed", what, b->len, bytes);
        return 0;
    }
    return 1;
}

static Py_ssize_t src_itemsize(int kind) { return kind == SRC_F32 ? 4 : 2; }

/* ---- tile ranges ----------------------------------------------------------------------------- */

/* tile_range's tiles of one tile row [r0, r1), generated once per element width: UT holds an element's bits,
   KT is the signed key type, TOP the sign bit's position, EXP the exponent mask, ROW(r) a pointer to row r's
   bits and WIDEN(u) float32's bits of u. Magnitudes order like their bit patterns with the sign cleared
   (NaN / Inf show as >= EXP); signed order as the key i ^ ((i >> TOP) & MAG), -0 just below +0 (the
   callers' clamp at 0 makes them the same), so integer max / min vectorise. bf16 runs on its 16-bit patterns
   themselves: they are float32's upper half, so the same rules give the same maxima and minima (the lower
   half of a key is a function of its sign), twice as many a vector and half the memory traffic; float32 and
   fp16 run on rows widened to float32's bits. Returns nonfinite. */
#define DEFINE_TILE_ROW(NAME, UT, KT, TOP, EXP, ROW, WIDEN)                                                      \
    HOT uint32_t NAME(const void *src, int kind, Py_ssize_t cols, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t tc,   \
                      Py_ssize_t gc, int is_signed, UT *restrict row, UT *restrict colmax, UT *restrict colmin,  \
                      float *out_lo, float *out_hi)                                                              \
    {                                                                                                            \
        const UT mag = (UT)(((UT)1 << (TOP)) - 1);                                                               \
        uint32_t bad = 0;                                                                                        \
        (void)kind; (void)row;                                                                                   \
        if (!is_signed) {                                                                                        \
            const UT *s0 = ROW(r0);                                                                              \
            for (Py_ssize_t c = 0; c < cols; c++) colmax[c] = s0[c] & mag;                                       \
            for (Py_ssize_t r = r0 + 1; r < r1; r++) {                                                           \
                const UT *sr = ROW(r);                                                                           \
                for (Py_ssize_t c = 0; c < cols; c++) {                                                          \
                    UT a = sr[c] & mag;                                                                          \
                    colmax[c] = colmax[c] > a ? colmax[c] : a;                                                   \
                }                                                                                                \
            }                                                                                                    \
            for (Py_ssize_t t = 0; t < gc; t++) {                                                                \
                Py_ssize_t c1 = (t + 1) * tc < cols ? (t + 1) * tc : cols;                                       \
                UT m = 0;                                                                                        \
                for (Py_ssize_t c = t * tc; c < c1; c++) m = m > colmax[c] ? m : colmax[c];                      \
                bad |= m >= (EXP);                                                                               \
                out_hi[t] = float_of(WIDEN(m));                                                                  \
            }                                                                                                    \
            return bad;                                                                                          \
        }                                                                                                        \
        KT *kmax = (KT *)colmax, *kmin = (KT *)colmin;                                                           \
        for (Py_ssize_t c = 0; c < cols; c++) { kmax[c] = (KT)(-(KT)mag - 1); kmin[c] = (KT)mag; }              \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                                   \
            const UT *sr = ROW(r);                                                                               \
            for (Py_ssize_t c = 0; c < cols; c++) {                                                              \
                KT i = (KT)sr[c];                                                                                \
                KT k = (KT)(i ^ ((i >> (TOP)) & (KT)mag));                                                       \
                bad |= (sr[c] & (EXP)) == (EXP);                                                                 \
                kmax[c] = k > kmax[c] ? k : kmax[c];                                                             \
                kmin[c] = k < kmin[c] ? k : kmin[c];                                                             \
            }                                                                                                    \
        }                                                                                                        \
        for (Py_ssize_t t = 0; t < gc; t++) {                                                                    \
            Py_ssize_t c1 = (t + 1) * tc < cols ? (t + 1) * tc : cols;                                           \
            KT a = (KT)(-(KT)mag - 1), b = (KT)mag;                                                              \
            for (Py_ssize_t c = t * tc; c < c1; c++) {                                                           \
                a = kmax[c] > a ? kmax[c] : a;                                                                   \
                b = kmin[c] < b ? kmin[c] : b;                                                                   \
            }                                                                                                    \
            out_hi[t] = float_of(WIDEN((UT)(a ^ ((a >> (TOP)) & (KT)mag))));                                     \
            out_lo[t] = float_of(WIDEN((UT)(b ^ ((b >> (TOP)) & (KT)mag))));                                     \
        }                                                                                                        \
        return bad;                                                                                              \
    }

#define BF16_ROW(r) ((const uint16_t *)src + (r) * cols)
#define BF16_WIDEN(u) ((uint32_t)(u) << 16)
#define WIDE_ROW(r) (load_row(src, kind, cols, (r), 0, cols, row), (const uint32_t *)row)
#define WIDE_WIDEN(u) ((uint32_t)(u))
DEFINE_TILE_ROW(bf16_tile_row, uint16_t, int16_t, 15, 0x7F80u, BF16_ROW, BF16_WIDEN)
DEFINE_TILE_ROW(wide_tile_row, uint32_t, int32_t, 31, 0x7F800000u, WIDE_ROW, WIDE_WIDEN)

/* tile_range(src, kind, rows, cols, tile_rows, tile_cols, lo, hi, signed) -> nonfinite
   lo / hi: float32 [grid_rows * grid_cols]. signed = 0: hi = max |x| (lo untouched); 1: lo = min x and
   hi = max x per tile (ragged edges: the reference pads with zeros, which only callers that clamp the
   range at 0 see, so the padding is left out here). */
CLONES static PyObject *tile_range(PyObject *self, PyObject *args)
{
    Py_buffer src, lo, hi;
    int kind, is_signed;
    Py_ssize_t rows, cols, tr, tc;
    if (!PyArg_ParseTuple(args, "y*innnnw*w*p", &src, &kind, &rows, &cols, &tr, &tc, &lo, &hi, &is_signed))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t gr = (rows + tr - 1) / tr, gc = (cols + tc - 1) / tc;
    uint32_t *row = NULL, *colmax = NULL, *colmin = NULL;
    if (tr < 1 || tc < 1 || rows < 0 || cols < 0 || !need(&src, rows * cols * src_itemsize(kind), "src")
        || !need(&hi, gr * gc * 4, "hi") || (is_signed && !need(&lo, gr * gc * 4, "lo")))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    colmax = malloc((size_t)(cols + 1) * 4);
    colmin = malloc((size_t)(cols + 1) * 4);
    if (!row || !colmax || !colmin) { PyErr_NoMemory(); goto done; }
    {
        float *out_lo = lo.buf, *out_hi = hi.buf;
        uint32_t bad = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t g = 0; g < gr; g++) {
            Py_ssize_t r0 = g * tr, r1 = r0 + tr < rows ? r0 + tr : rows;
            float *lo_g = is_signed ? out_lo + g * gc : NULL, *hi_g = out_hi + g * gc;
            bad |= kind == SRC_BF16
                ? bf16_tile_row(src.buf, kind, cols, r0, r1, tc, gc, is_signed, (uint16_t *)row,
                                (uint16_t *)colmax, (uint16_t *)colmin, lo_g, hi_g)
                : wide_tile_row(src.buf, kind, cols, r0, r1, tc, gc, is_signed, row, colmax, colmin, lo_g, hi_g);
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad != 0);
    }
done:
    free(row); free(colmax); free(colmin);
    PyBuffer_Release(&src); PyBuffer_Release(&lo); PyBuffer_Release(&hi);
    return result;
}

/* ---- fixed-order sums -------------------------------------------------------------------------- */

/* sum over a row of float32 v[0..n) squared, in the reference's order: column c into lane c % 8 (each
   lane sequential, float64, squares exact), then the lanes 0..7. */
HOT double lane_squares(const float *restrict v, Py_ssize_t n)
{
    double lane[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int j = 0; j < LANES; j++) {
            double d = (double)v[c + j];
            lane[j] += d * d;
        }
    for (int j = 0; c + j < n; j++) {
        double d = (double)v[c + j];
        lane[j] += d * d;
    }
    double total = lane[0];
    for (int j = 1; j < LANES; j++) total += lane[j];
    return total;
}

/* ---- quantize --------------------------------------------------------------------------------- */

/* An element format: integers (mbits 0), or floats with subnormals of mbits mantissa bits and exponent bias. */
typedef struct {
    int is_int;
    float lo, hi;           /* code range */
    FloatFormat ff;
} Encoding;

/* Codes of one row segment of n values x (float32 bits) under scale s (and zero point z), into codes;
   dequantized errors into err and the values into w; returns the segment's (saturated, flushed) counts
   and raises *max_err. */
static inline void encode_segment(const Encoding *e, const uint32_t *restrict xb, Py_ssize_t n, float s, float z,
                                  int has_zero, uint8_t *restrict codes, float *restrict w, float *restrict err,
                                  uint32_t *restrict counts, float *max_err)
{
    uint32_t saturated = 0, flushed = 0;
    uint32_t big = bits_of(*max_err);
    const float lo = e->lo, hi = e->hi;
    if (e->is_int) {
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = float_of(xb[i]);
            float v = x / s;
            if (has_zero) v = v + z;
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            float q = round_int(v);
            codes[i] = (uint8_t)(int8_t)(int32_t)q;
            float deq = has_zero ? (q - z) * s : q * s;
            float d = x - deq;
            w[i] = x;
            err[i] = d;
            saturated += (q <= lo) | (q >= hi);
            flushed += (deq == 0.0f) & (x != 0.0f);
            uint32_t ad = bits_of(d) & 0x7FFFFFFFu; /* |d| orders like its bits: an integer max vectorises */
            big = ad > big ? ad : big;
        }
    } else {
        const FloatFormat ff = e->ff;
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = float_of(xb[i]);
            float v = x / s;
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            uint32_t vb = bits_of(v), sign = vb & 0x80000000u, code;
            float mag = fp_magnitude(float_of(vb & 0x7FFFFFFFu), ff, &code);
            codes[i] = (uint8_t)(code | (sign >> 24));
            float y = float_of(bits_of(mag) | sign);
            float deq = y * s;
            float d = x - deq;
            w[i] = x;
            err[i] = d;
            saturated += (y <= lo) | (y >= hi);
            flushed += (deq == 0.0f) & (x != 0.0f);
            uint32_t ad = bits_of(d) & 0x7FFFFFFFu;
            big = ad > big ? ad : big;
        }
    }
    counts[0] += saturated;
    counts[1] += flushed;
    *max_err = float_of(big);
}

static int encoding_of(int mbits, int bias, float lo, float hi, Encoding *e)
{
    memset(e, 0, sizeof *e);
    e->is_int = mbits == 0;
    e->lo = lo;
    e->hi = hi;
    if (mbits < 0 || mbits > 10 || (mbits && (bias < 1 || bias > 126)) || !(lo <= hi)) {
        PyErr_Format(PyExc_ValueError, "element format: mantissa bits %d, bias %d, range [%g, %g]", mbits, bias,
                     (double)lo, (double)hi);
        return 0;
    }
    if (mbits) e->ff = float_format(mbits, bias);
    return 1;
}

HOT int any_nonfinite(const uint32_t *xb, Py_ssize_t n)
{
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) bad |= (xb[i] & 0x7F800000u) == 0x7F800000u;
    return bad != 0;
}

/* load_row of a whole row r, and whether it holds NaN / Inf: a bf16 row is checked on its 16-bit patterns in
   the loop that widens them (one pass over the row instead of two). */
HOT int load_row_finite(const void *src, int kind, Py_ssize_t cols, Py_ssize_t r, uint32_t *restrict dst)
{
    if (kind == SRC_BF16) {
        const uint16_t *s = (const uint16_t *)src + r * cols;
        uint32_t bad = 0;
        for (Py_ssize_t i = 0; i < cols; i++) {
            dst[i] = (uint32_t)s[i] << 16;
            bad |= (s[i] & 0x7F80u) == 0x7F80u;
        }
        return bad != 0;
    }
    load_row(src, kind, cols, r, 0, cols, dst);
    return any_nonfinite(dst, cols);
}

/* The rows of quantize (below), on raw pointers: the hot loop, compiled once per instruction set where
   the compiler can pick at run time (CLONES). Returns 1, committing nothing, when a row holds NaN / Inf. */
CLONES static int quantize_rows(const void *src, int kind, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t tr,
                                Py_ssize_t tc, const float *grid, const float *zgrid, const Encoding *e, uint8_t *out,
                                double *st, uint32_t *row, float *w, float *err)
{
    const Py_ssize_t gc = (cols + tc - 1) / tc;
    const int has_zero = zgrid != NULL;
    uint32_t counts[2] = {0, 0};
    float max_err = (float)st[2];
    double sum_ref = st[0], sum_err = st[1]; /* committed only when every row was finite */
    for (Py_ssize_t r = 0; r < rows; r++) {
        if (load_row_finite(src, kind, cols, r, row)) return 1;
        const float *srow = grid + (r / tr) * gc;
        const float *zrow = has_zero ? zgrid + (r / tr) * gc : NULL;
        for (Py_ssize_t t = 0; t < gc; t++) {
            Py_ssize_t c0 = t * tc, n = c0 + tc < cols ? tc : cols - c0;
            encode_segment(e, row + c0, n, srow[t], has_zero ? zrow[t] : 0.0f, has_zero, out + r * cols + c0,
                           w + c0, err + c0, counts, &max_err);
        }
        sum_ref += lane_squares(w, cols);
        sum_err += lane_squares(err, cols);
    }
    st[0] = sum_ref;
    st[1] = sum_err;
    st[2] = (double)max_err;
    st[3] += counts[0];
    st[4] += counts[1];
    return 0;
}

/* quantize(src, kind, rows, cols, tile_rows, tile_cols, scales, zeros or None, mbits, bias, lo, hi, codes, stats)
   mbits / bias: the element format (mbits 0: integers, codes their two's complement byte; else a float
   format with subnormals, codes sign | exponent | mantissa); lo / hi: the code range;
   -> nonfinite. scales (zeros): float32 [grid_rows, grid_cols]; codes: uint8 [rows, cols]; stats: float64[5]
   (sum x^2, sum err^2, max |err|, saturated, flushed), added to (max taken), so row pieces of a chunk
   taken in order give the chunk's sums. When a row holds NaN / Inf, returns True: codes and stats are then
   undefined. */
static PyObject *quantize(PyObject *self, PyObject *args)
{
    Py_buffer src, scales, codes, stats, zeros = {0};
    PyObject *zeros_obj;
    int kind, mbits, bias;
    Py_ssize_t rows, cols, tr, tc;
    float lo, hi;
    if (!PyArg_ParseTuple(args, "y*innnny*Oiiffw*w*", &src, &kind, &rows, &cols, &tr, &tc, &scales, &zeros_obj,
                          &mbits, &bias, &lo, &hi, &codes, &stats))
        return NULL;
    PyObject *result = NULL;
    int has_zero = zeros_obj != Py_None;
    uint32_t *row = NULL;
    float *w = NULL, *err = NULL;
    Encoding e;
    Py_ssize_t gr = (rows + tr - 1) / tr, gc = (cols + tc - 1) / tc;
    if (has_zero && PyObject_GetBuffer(zeros_obj, &zeros, PyBUF_SIMPLE) < 0) goto done;
    if (!encoding_of(mbits, bias, lo, hi, &e) || tr < 1 || tc < 1 || rows < 0 || cols < 0
        || !need(&src, rows * cols * src_itemsize(kind), "src") || !need(&scales, gr * gc * 4, "scales")
        || (has_zero && !need(&zeros, gr * gc * 4, "zeros")) || !need(&codes, rows * cols, "codes")
        || !need(&stats, 5 * 8, "stats"))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    w = malloc((size_t)(cols + 1) * 4);
    err = malloc((size_t)(cols + 1) * 4);
    if (!row || !w || !err) { PyErr_NoMemory(); goto done; }
    {
        const float *grid = scales.buf, *zgrid = has_zero ? zeros.buf : NULL;
        uint8_t *out = codes.buf;
        double *st = stats.buf;
        int bad = 0;
        Py_BEGIN_ALLOW_THREADS
        bad = quantize_rows(src.buf, kind, rows, cols, tr, tc, grid, zgrid, &e, out, st, row, w, err);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad);
    }
done:
    free(row); free(w); free(err);
    PyBuffer_Release(&src); PyBuffer_Release(&scales); PyBuffer_Release(&codes); PyBuffer_Release(&stats);
    if (has_zero && zeros.obj) PyBuffer_Release(&zeros);
    return result;
}

/* ---- microscaled formats ------------------------------------------------------------------------ */

/* 4-bit code of float32 y (finite): nearest even, saturating at qmax; the sign bit (bit 3) kept for any
   nonzero y (microscale._bf16_to_e2m1: an exact zero of either sign is code 0). */
static inline uint8_t nibble_code(float y, FloatFormat ff, float qmax)
{
    uint32_t b = bits_of(y), a = b & 0x7FFFFFFFu, code;
    float mag = float_of(a);
    mag = mag < qmax ? mag : qmax;
    (void)fp_magnitude(mag, ff, &code);
    return (uint8_t)(code | ((a != 0) & (b >> 31)) << 3);
}

/* 8-bit code of float32 y (finite) clamped to +-qmax, nearest even, sign bit kept (also for -0). */
static inline uint8_t byte_code(float y, FloatFormat ff, float qmax)
{
    y = y < -qmax ? -qmax : y;
    y = y > qmax ? qmax : y;
    uint32_t b = bits_of(y), code;
    (void)fp_magnitude(float_of(b & 0x7FFFFFFFu), ff, &code);
    return (uint8_t)(code | ((b >> 24) & 0x80u));
}

/* One row's element codes (micro_encode's loop): each group's values divided by (or times) its factor, then
   coded; a packed row is coded into tmp, then stored two codes a byte (element 2k in the low nibble) at out.
   Returns the row of codes, one a byte (tmp when packed, else out). */
HOT uint8_t *encode_row(const uint32_t *row, const float *fac, Py_ssize_t groups, Py_ssize_t gsz, int packed,
                        int divide, FloatFormat ff, float qmax, uint8_t *tmp, uint8_t *out)
{
    uint8_t *o = packed ? tmp : out;
    for (Py_ssize_t g = 0; g < groups; g++) {
        float f = fac[g];
        const uint32_t *x = row + g * gsz;
        uint8_t *cg = o + g * gsz;
        if (packed) {
            if (divide) for (Py_ssize_t i = 0; i < gsz; i++) cg[i] = nibble_code(float_of(x[i]) / f, ff, qmax);
            else for (Py_ssize_t i = 0; i < gsz; i++) cg[i] = nibble_code(float_of(x[i]) * f, ff, qmax);
        } else {
            if (divide) for (Py_ssize_t i = 0; i < gsz; i++) cg[i] = byte_code(float_of(x[i]) / f, ff, qmax);
            else for (Py_ssize_t i = 0; i < gsz; i++) cg[i] = byte_code(float_of(x[i]) * f, ff, qmax);
        }
    }
    if (packed)
        for (Py_ssize_t k = 0; k < groups * gsz / 2; k++) out[k] = (uint8_t)(tmp[2 * k] | (tmp[2 * k + 1] << 4));
    return o;
}

/* micro_encode(src, kind, rows, cols, group, factor, divide, mbits, bias, qmax, packed, out) -> nonfinite
   factor: float32 [rows, cols / group]; y = x / factor (divide) or x * factor, then a float element code
   (mbits / bias); packed: 4-bit codes, out uint8 [rows, cols / 2] with element 2k in the low nibble; else
   out uint8 [rows, cols]. */
CLONES static PyObject *micro_encode(PyObject *self, PyObject *args)
{
    Py_buffer src, factor, out;
    int kind, divide, mbits, bias, packed;
    Py_ssize_t rows, cols, group;
    float qmax;
    if (!PyArg_ParseTuple(args, "y*innny*piifpw*", &src, &kind, &rows, &cols, &group, &factor, &divide, &mbits, &bias,
                          &qmax, &packed, &out))
        return NULL;
    PyObject *result = NULL;
    uint32_t *row = NULL;
    uint8_t *tmp = NULL;
    Encoding e;
    if (!encoding_of(mbits, bias, -qmax, qmax, &e)) goto done;
    if (group < 1 || cols % group || (packed && cols % 2) || rows < 0 || e.is_int) {
        PyErr_SetString(PyExc_ValueError, "micro_encode: bad shape or element");
        goto done;
    }
    if (!need(&src, rows * cols * src_itemsize(kind), "src") || !need(&factor, rows * (cols / group) * 4, "factor")
        || !need(&out, rows * (packed ? cols / 2 : cols), "out"))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    tmp = malloc((size_t)cols + 1);
    if (!row || !tmp) { PyErr_NoMemory(); goto done; }
    {
        FloatFormat ff = e.ff;
        const float *fac = factor.buf;
        uint8_t *dst = out.buf;
        int bad = 0;
        const Py_ssize_t groups = cols / group, gsz = group; /* locals: stores through uint8_t * may alias the parsed ones */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (load_row_finite(src.buf, kind, cols, r, row)) { bad = 1; break; }
            encode_row(row, fac + r * groups, groups, gsz, packed, divide, ff, qmax, tmp,
                       dst + r * (packed ? cols / 2 : cols));
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad);
    }
done:
    free(row); free(tmp);
    PyBuffer_Release(&src); PyBuffer_Release(&factor); PyBuffer_Release(&out);
    return result;
}

/* Row r's code values through the format's value table: one byte a code, or two 4-bit codes a byte
   (element 2k in the low nibble), as the packed layouts store them. */
static inline void decode_row(const uint8_t *cd, const float *table, Py_ssize_t r, Py_ssize_t cols, int packed,
                              float *vals)
{
    if (packed) {
        const uint8_t *b = cd + r * (cols / 2);
        for (Py_ssize_t k = 0; k < cols / 2; k++) {
            vals[2 * k] = table[b[k] & 0xF];
            vals[2 * k + 1] = table[b[k] >> 4];
        }
    } else {
        const uint8_t *b = cd + r * cols;
        for (Py_ssize_t c = 0; c < cols; c++) vals[c] = table[b[c]];
    }
}

/* One row's statistics (micro_stats' and micro_encode_stats' shared loop, inlined into each):
   vals[c] = the code values (replaced by the source values x), err[c] = x - value * divisor of its group;
   the saturated / flushed counts and the largest |err| bit pattern carried in the pointers, and the row's
   sums of x^2 and err^2 added to st[0] / st[1] (rows in order, as the reference adds them). */
HOT void stats_row(const uint32_t *row, float *vals, float *err, const float *div, Py_ssize_t groups, Py_ssize_t gsz,
                   float qmax, uint32_t *saturated_p, uint32_t *flushed_p, uint32_t *big_p, double *st)
{
    uint32_t saturated = *saturated_p, flushed = *flushed_p, big = *big_p;
    for (Py_ssize_t g = 0; g < groups; g++) {
        const float dv = div[g];
        const uint32_t *xg = row + g * gsz;
        float *vg = vals + g * gsz, *eg = err + g * gsz;
        for (Py_ssize_t i = 0; i < gsz; i++) {
            float v = vg[i];
            float x = float_of(xg[i]);
            float deq = v * dv;
            float d = x - deq;
            saturated += float_of(bits_of(v) & 0x7FFFFFFFu) >= qmax;
            flushed += (deq == 0.0f) & (x != 0.0f);
            uint32_t ad = bits_of(d) & 0x7FFFFFFFu;
            big = ad > big ? ad : big;
            vg[i] = x;
            eg[i] = d;
        }
    }
    *saturated_p = saturated; *flushed_p = flushed; *big_p = big;
    st[0] += lane_squares(vals, groups * gsz);
    st[1] += lane_squares(err, groups * gsz);
}

/* The statistics a microscale kernel carried through its rows, stored into stats as quantize's: st[2] the largest
   |err| (from its bit pattern), st[3] / st[4] the saturated / flushed counts added. */
static inline void stats_store(double *st, uint32_t big, uint32_t saturated, uint32_t flushed)
{
    st[2] = (double)float_of(big);
    st[3] += saturated;
    st[4] += flushed;
}

/* micro_stats(src, kind, rows, cols, group, codes, packed, values, divisor, qmax, stats)
   values: float32[16] (e2m1) or [256] (e4m3) code values; divisor float32 [rows, cols / group];
   w' = value(code) * divisor; stats as quantize's (added to). */
CLONES static PyObject *micro_stats(PyObject *self, PyObject *args)
{
    Py_buffer src, codes, values, divisor, stats;
    int kind, packed;
    Py_ssize_t rows, cols, group;
    float qmax;
    if (!PyArg_ParseTuple(args, "y*innny*py*y*fw*", &src, &kind, &rows, &cols, &group, &codes, &packed, &values,
                          &divisor, &qmax, &stats))
        return NULL;
    PyObject *result = NULL;
    uint32_t *row = NULL;
    float *w = NULL, *err = NULL;
    if (group < 1 || cols % group || (packed && cols % 2) || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "micro_stats: bad shape");
        goto done;
    }
    if (!need(&src, rows * cols * src_itemsize(kind), "src") || !need(&codes, rows * (packed ? cols / 2 : cols), "codes")
        || !need(&values, (packed ? 16 : 256) * 4, "values") || !need(&divisor, rows * (cols / group) * 4, "divisor")
        || !need(&stats, 40, "stats"))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    w = malloc((size_t)(cols + 1) * 4);
    err = malloc((size_t)(cols + 1) * 4);
    if (!row || !w || !err) { PyErr_NoMemory(); goto done; }
    {
        const float *table = values.buf, *div = divisor.buf;
        const uint8_t *cd = codes.buf;
        double *st = stats.buf;
        Py_ssize_t groups = cols / group;
        Py_BEGIN_ALLOW_THREADS
        uint32_t saturated = 0, flushed = 0;
        uint32_t big = bits_of((float)st[2]);
        const Py_ssize_t gsz = group;
        float *vals = w; /* the row's code values, then (reused) its source values */
        for (Py_ssize_t r = 0; r < rows; r++) {
            decode_row(cd, table, r, cols, packed, vals);
            load_row(src.buf, kind, cols, r, 0, cols, row);
            stats_row(row, vals, err, div + r * groups, groups, gsz, qmax, &saturated, &flushed, &big, st);
        }
        stats_store(st, big, saturated, flushed);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
done:
    free(row); free(w); free(err);
    PyBuffer_Release(&src); PyBuffer_Release(&codes); PyBuffer_Release(&values); PyBuffer_Release(&divisor);
    PyBuffer_Release(&stats);
    return result;
}

/* micro_encode_stats' rows in AVX2 (x86 intrinsics, chosen at run time where the CPU has it; elsewhere, and with
   -DFP8CONV_NO_CLONES, the portable encode_row + stats_row above). Eight elements a step, each lane the scalar
   expressions' exact operations: nibble_code / byte_code (minps(v, q) is `v < q ? v : q`, maxps(-q, y)
   `-q > y ? -q : y`: Intel's definitions, as in mse_tile_avx2), fp_magnitude (the unsigned max is vpmaxud), and
   stats_row. A code's value is its rounded magnitude with the code's sign bit, which is the format's value of that
   code (the table micro_stats decodes with: e2m1's 16, e4m3's 256 below the NaN codes), so no lookup is made.
   The squares go to float64 lanes: element c of a row in lane c % 8, each lane sequential, the lanes added 0..7
   at the row's end: lane_squares' order, bit for bit. Groups are a multiple of 8 elements (NVFP4 16, MX 32);
   the caller takes the portable rows otherwise. No FMA (target avx2 alone, -ffp-contract=off). */
#ifdef MSE_AVX2
typedef struct {
    __m256i saturated, flushed; /* minus the counts (compare masks are -1) */
    __m256i big;                /* largest |err| bit pattern per lane */
    __m256i nonfinite;          /* a NaN / Inf source element in the lane */
} MicroLanes;

/* Lanes that start counting at zero, the largest |err| pattern so far in every lane. */
__attribute__((target("avx2"))) static inline MicroLanes micro_lanes_start(uint32_t big)
{
    MicroLanes acc;
    acc.saturated = acc.flushed = acc.nonfinite = _mm256_setzero_si256();
    acc.big = _mm256_set1_epi32((int)big);
    return acc;
}

/* The AVX2 microscale row drivers are compiled once per (bf16 source, packed codes, divide by the scale)
   variant so that each inner loop has no branch on them: CALL(B, P, D) names one variant; this picks it at run
   time from kind, packed and divide (in scope where it is used). */
#define MICRO_VARIANT(CALL)                                                                                      \
    (kind == SRC_BF16                                                                                            \
         ? (packed ? (divide ? CALL(1, 1, 1) : CALL(1, 1, 0)) : (divide ? CALL(1, 0, 1) : CALL(1, 0, 0)))       \
         : (packed ? (divide ? CALL(0, 1, 1) : CALL(0, 1, 0)) : (divide ? CALL(0, 0, 1) : CALL(0, 0, 0))))

/* Add the lanes' counts to *saturated / *flushed and their largest |err| pattern into *big. */
__attribute__((target("avx2"))) static inline void micro_lanes_fold(const MicroLanes *acc, uint32_t *saturated,
                                                                   uint32_t *flushed, uint32_t *big)
{
    uint32_t s[8], f[8], b[8];
    _mm256_storeu_si256((__m256i *)s, acc->saturated);
    _mm256_storeu_si256((__m256i *)f, acc->flushed);
    _mm256_storeu_si256((__m256i *)b, acc->big);
    for (int j = 0; j < 8; j++) {
        *saturated -= s[j];
        *flushed -= f[j];
        *big = b[j] > *big ? b[j] : *big;
    }
}

/* One row of cols = groups * gsz elements: src as bf16 bits (bf16) or float32; codes into out (packed: two a
   byte, element 2k in the low nibble); the row's sums of x^2 and err^2 added to st[0] / st[1]. */
AVX2_HOT void micro_row_avx2(const void *src, const int bf16, const float *fac, const float *div, Py_ssize_t groups,
                             Py_ssize_t gsz, const int packed, const int divide, FloatFormat ff, float qmax,
                             uint8_t *out, MicroLanes *acc, double *st)
{
    const __m256 qv = _mm256_set1_ps(qmax), nqv = _mm256_set1_ps(-qmax), zero = _mm256_setzero_ps();
    const __m256i expo = _mm256_set1_epi32(0x7F800000), absm = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i signm = _mm256_set1_epi32((int)0x80000000u);
    const __m256i mshift = _mm256_set1_epi32((int)ff.magic_shift), mfloor = _mm256_set1_epi32((int)ff.magic_floor);
    const __m256i coff = _mm256_set1_epi32((int)ff.code_offset);
    const __m128i cshift = _mm_cvtsi32_si128((int)ff.code_shift);
    const __m128i pair_bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i saturated = acc->saturated, flushed = acc->flushed, big = acc->big, nonfinite = acc->nonfinite;
    __m256d sx0 = _mm256_setzero_pd(), sx1 = sx0, se0 = sx0, se1 = sx0;
    for (Py_ssize_t g = 0; g < groups; g++) {
        const __m256 f = _mm256_set1_ps(fac[g]), dv = _mm256_set1_ps(div[g]);
        for (Py_ssize_t i = 0; i < gsz; i += 8) {
            const Py_ssize_t c = g * gsz + i;
            __m256i xb;
            if (bf16)
                xb = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + c))), 16);
            else
                xb = _mm256_loadu_si256((const __m256i *)((const uint32_t *)src + c));
            nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(_mm256_and_si256(xb, expo), expo));
            const __m256 x = _mm256_castsi256_ps(xb);
            __m256 y = divide ? _mm256_div_ps(x, f) : _mm256_mul_ps(x, f);
            __m256 mag;
            __m256i sign;
            if (packed) { /* nibble_code */
                const __m256i b = _mm256_castps_si256(y), a = _mm256_and_si256(b, absm);
                mag = _mm256_min_ps(_mm256_castsi256_ps(a), qv);
                sign = _mm256_andnot_si256(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()), _mm256_and_si256(b, signm));
            } else { /* byte_code */
                y = _mm256_min_ps(qv, _mm256_max_ps(nqv, y));
                const __m256i b = _mm256_castps_si256(y);
                mag = _mm256_castsi256_ps(_mm256_and_si256(b, absm));
                sign = _mm256_and_si256(b, signm);
            }
            /* fp_magnitude */
            __m256i m = _mm256_max_epu32(_mm256_add_epi32(_mm256_and_si256(_mm256_castps_si256(mag), expo), mshift), mfloor);
            const __m256 bigm = _mm256_add_ps(mag, _mm256_castsi256_ps(m));
            __m256i code = _mm256_sub_epi32(_mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(bigm), m),
                                                             _mm256_srl_epi32(m, cshift)), coff);
            code = _mm256_or_si256(code, _mm256_srli_epi32(sign, packed ? 28 : 24));
            const __m256 q = _mm256_sub_ps(bigm, _mm256_castsi256_ps(m));
            /* the eight codes (each < 256) as bytes, in order */
            __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
            if (packed) { /* element 2k | element 2k+1 << 4 in the low byte of 32-bit lane k, then those bytes */
                c16 = _mm_shuffle_epi8(_mm_or_si128(c16, _mm_srli_epi32(c16, 12)), pair_bytes);
                const uint32_t word = (uint32_t)_mm_cvtsi128_si32(c16);
                memcpy(out + c / 2, &word, 4);
            } else {
                _mm_storel_epi64((__m128i *)(out + c), _mm_packus_epi16(c16, c16));
            }
            /* stats_row: value (the code's), w' = value * divisor, err = x - w' */
            const __m256 v = _mm256_or_ps(q, _mm256_castsi256_ps(sign));
            const __m256 deq = _mm256_mul_ps(v, dv);
            const __m256 d = _mm256_sub_ps(x, deq);
            saturated = _mm256_add_epi32(saturated, _mm256_castps_si256(_mm256_cmp_ps(q, qv, _CMP_GE_OQ)));
            flushed = _mm256_add_epi32(flushed, _mm256_castps_si256(_mm256_and_ps(_mm256_cmp_ps(deq, zero, _CMP_EQ_OQ),
                                                                                     _mm256_cmp_ps(x, zero, _CMP_NEQ_UQ))));
            big = _mm256_max_epu32(big, _mm256_and_si256(_mm256_castps_si256(d), absm));
            const __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
            const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
            sx0 = _mm256_add_pd(sx0, _mm256_mul_pd(x0, x0));
            sx1 = _mm256_add_pd(sx1, _mm256_mul_pd(x1, x1));
            se0 = _mm256_add_pd(se0, _mm256_mul_pd(d0, d0));
            se1 = _mm256_add_pd(se1, _mm256_mul_pd(d1, d1));
        }
    }
    acc->saturated = saturated; acc->flushed = flushed; acc->big = big; acc->nonfinite = nonfinite;
    double lx[8], le[8];
    _mm256_storeu_pd(lx, sx0); _mm256_storeu_pd(lx + 4, sx1);
    _mm256_storeu_pd(le, se0); _mm256_storeu_pd(le + 4, se1);
    double tx = lx[0], te = le[0];
    for (int j = 1; j < 8; j++) { tx += lx[j]; te += le[j]; }
    st[0] += tx;
    st[1] += te;
}

/* The rows of micro_encode_stats with bf16 / packed / divide constant (each combination compiled branch free);
   an fp16 source is widened into row first. Returns 1 at the end of the first row holding NaN / Inf. */
AVX2_HOT int micro_rows_avx2_v(const void *src, int kind, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gsz,
                               const float *fac, const float *div, const int bf16, const int packed, const int divide,
                               FloatFormat ff, float qmax, uint8_t *dst, uint32_t *row, double *st, MicroLanes *acc)
{
    const Py_ssize_t groups = cols / gsz;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const void *xs = (const char *)src + r * cols * src_itemsize(kind);
        if (kind == SRC_F16) {
            load_row(src, kind, cols, r, 0, cols, row);
            xs = row;
        }
        micro_row_avx2(xs, bf16, fac + r * groups, div + r * groups, groups, gsz, packed, divide, ff, qmax,
                       dst + r * (packed ? cols / 2 : cols), acc, st);
        if (!_mm256_testz_si256(acc->nonfinite, acc->nonfinite)) return 1;
    }
    return 0;
}

/* micro_encode_stats' loop in AVX2: its counts and largest error carried in (and out of) the pointers. */
__attribute__((target("avx2"))) static int micro_rows_avx2(const void *src, int kind, Py_ssize_t rows, Py_ssize_t cols,
                                                          Py_ssize_t gsz, const float *fac, const float *div,
                                                          int packed, int divide, FloatFormat ff, float qmax,
                                                          uint8_t *dst, uint32_t *row, double *st,
                                                          uint32_t *saturated, uint32_t *flushed, uint32_t *big)
{
    MicroLanes acc = micro_lanes_start(*big);
#define MICRO_ROWS(B, P, D) micro_rows_avx2_v(src, kind, rows, cols, gsz, fac, div, B, P, D, ff, qmax, dst, row, st, &acc)
    int bad = MICRO_VARIANT(MICRO_ROWS);
#undef MICRO_ROWS
    micro_lanes_fold(&acc, saturated, flushed, big);
    return bad;
}
#endif

/* micro_encode_stats(src, kind, rows, cols, group, factor, divide, mbits, bias, qmax, packed, out, values, divisor,
                      stats) -> nonfinite
   micro_encode and micro_stats in one pass over the rows: each row's codes are made (micro_encode's loop),
   then its statistics taken from them while the row is in cache (micro_stats' loop, the same order and
   precision: rows in order, each row's lane sums added as micro_stats adds them), so out and stats are
   those of the two calls, bit for bit. On a NaN / Inf (return 1) out and stats are partly written. */
CLONES static PyObject *micro_encode_stats(PyObject *self, PyObject *args)
{
    Py_buffer src, factor, out, values, divisor, stats;
    int kind, divide, mbits, bias, packed;
    Py_ssize_t rows, cols, group;
    float qmax;
    if (!PyArg_ParseTuple(args, "y*innny*piifpw*y*y*w*", &src, &kind, &rows, &cols, &group, &factor, &divide, &mbits,
                          &bias, &qmax, &packed, &out, &values, &divisor, &stats))
        return NULL;
    PyObject *result = NULL;
    uint32_t *row = NULL;
    uint8_t *tmp = NULL;
    float *vals = NULL, *err = NULL;
    Encoding e;
    if (!encoding_of(mbits, bias, -qmax, qmax, &e)) goto done;
    if (group < 1 || cols % group || (packed && cols % 2) || rows < 0 || e.is_int) {
        PyErr_SetString(PyExc_ValueError, "micro_encode_stats: bad shape or element");
        goto done;
    }
    if (!need(&src, rows * cols * src_itemsize(kind), "src") || !need(&factor, rows * (cols / group) * 4, "factor")
        || !need(&out, rows * (packed ? cols / 2 : cols), "out") || !need(&values, (packed ? 16 : 256) * 4, "values")
        || !need(&divisor, rows * (cols / group) * 4, "divisor") || !need(&stats, 40, "stats"))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    tmp = malloc((size_t)cols + 1);
    vals = malloc((size_t)(cols + 1) * 4);
    err = malloc((size_t)(cols + 1) * 4);
    if (!row || !tmp || !vals || !err) { PyErr_NoMemory(); goto done; }
    {
        FloatFormat ff = e.ff;
        const float *fac = factor.buf, *table = values.buf, *div = divisor.buf;
        uint8_t *dst = out.buf;
        double *st = stats.buf;
        int bad = 0;
        const Py_ssize_t groups = cols / group, gsz = group; /* locals: stores through uint8_t * may alias the parsed ones */
        Py_BEGIN_ALLOW_THREADS
        uint32_t saturated = 0, flushed = 0;
        uint32_t big = bits_of((float)st[2]);
#ifdef MSE_AVX2
        if (gsz % 8 == 0 && __builtin_cpu_supports("avx2"))
            bad = micro_rows_avx2(src.buf, kind, rows, cols, gsz, fac, div, packed, divide, ff, qmax, dst, row, st,
                                  &saturated, &flushed, &big);
        else
#endif
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (load_row_finite(src.buf, kind, cols, r, row)) { bad = 1; break; }
            uint8_t *o = encode_row(row, fac + r * groups, groups, gsz, packed, divide, ff, qmax, tmp,
                                    dst + r * (packed ? cols / 2 : cols));
            /* the code values, as micro_stats decodes them (a 4-bit code's value is that of its nibble) */
            for (Py_ssize_t c = 0; c < cols; c++) vals[c] = table[o[c]];
            stats_row(row, vals, err, div + r * groups, groups, gsz, qmax, &saturated, &flushed, &big, st);
        }
        stats_store(st, big, saturated, flushed);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad);
    }
done:
    free(row); free(tmp); free(vals); free(err);
    PyBuffer_Release(&src); PyBuffer_Release(&factor); PyBuffer_Release(&out); PyBuffer_Release(&values);
    PyBuffer_Release(&divisor); PyBuffer_Release(&stats);
    return result;
}

/* ---- microscaled formats: min-max group scales and elements in one pass ------------------------------------ */

/* The min-max group scale rule of microscale.py (nvfp4_group_scales, e8m0_from_amax) on one group amax. */
typedef struct {
    int global;              /* NVFP4: float (e4m3) scales relative to a float32 global scale; else MX: E8M0 */
    int arith;               /* NVFP4: the dtype the scale arithmetic rounds to (SRC_BF16 / SRC_F16 / SRC_F32) */
    float gs, elem_max, scale_max, zero_scale;
    int emax;                /* MX: floor(log2(element max)) */
    FloatFormat e4m3, f16;
    uint32_t zero_code;
} ScaleRule;

/* 2^k, exact, for -149 <= k <= 127. */
static inline float pow2f(int k)
{
    return k >= -126 ? float_of((uint32_t)(k + 127) << 23) : float_of(1u << (k + 149));
}

/* float32 a >= 0 (finite) rounded as the scale arithmetic's dtype stores it (microscale._in_arith): bf16 by
   round_bf16's bit rule, fp16 to nearest even with subnormals (Inf from 65520 up, as numpy's cast). */
static inline float in_arith(float a, const ScaleRule *s)
{
    if (s->arith == SRC_BF16) {
        uint32_t b = bits_of(a);
        b += 0x7FFFu + ((b >> 16) & 1u);
        return float_of(b & 0xFFFF0000u);
    }
    if (s->arith == SRC_F16) {
        uint32_t code;
        return a >= 65520.0f ? INFINITY : fp_magnitude(a, s->f16, &code);
    }
    return a;
}

/* The scale code of a group with largest |x| amax (finite), its divisor (w' = value * divisor) and the factor
   the elements are divided by (NVFP4: the divisor) or multiplied with (MX: its reciprocal, exact). NVFP4:
   e4m3(min(gs * arith(amax / 6), 448)), a zero code replaced by 0.125's, divisor = value / gs in float32. MX:
   the amax's exponent, rounded up from significand 1.75, minus emax, plus 127, clamped to [0, 254]. */
static inline uint8_t micro_scale(float amax, const ScaleRule *s, float *divisor, float *factor)
{
    if (s->global) {
        float scaled = s->gs * in_arith(amax / s->elem_max, s);
        scaled = scaled > s->scale_max ? s->scale_max : scaled; /* np.minimum (a NaN would pass; none occurs) */
        uint32_t code;
        float value = fp_magnitude(scaled, s->e4m3, &code);
        if (!(code & 0x7Fu)) { code = s->zero_code; value = s->zero_scale; }
        *divisor = value / s->gs;
        *factor = *divisor;
        return (uint8_t)code;
    }
    int32_t biased = (int32_t)(((bits_of(amax) & 0x7FFFFFFFu) + (1u << 21)) >> 23);
    biased = biased == 0 ? 0 : biased - s->emax;
    biased = biased < 0 ? 0 : biased > 254 ? 254 : biased;
    *divisor = pow2f(biased - 127);
    *factor = pow2f(127 - biased);
    return (uint8_t)biased;
}

/* One row's group amax (float32 bits as in micro_encode_stats' rows), scale codes, divisors and factors. */
HOT void row_scales(const uint32_t *row, Py_ssize_t groups, Py_ssize_t gsz, const ScaleRule *s, uint8_t *codes,
                    float *div, float *fac)
{
    for (Py_ssize_t g = 0; g < groups; g++) {
        uint32_t top = 0;
        for (Py_ssize_t i = 0; i < gsz; i++) {
            uint32_t a = row[g * gsz + i] & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
        codes[g] = micro_scale(float_of(top), s, div + g, fac + g);
    }
}

/* The scale rule from micro_quantize's / micro_scales' arguments; 0 (a ValueError set) when they make none. */
static int scale_rule_of(int global, int kind, float gs, float elem_max, int scale_mbits, int scale_bias,
                         float scale_max, float zero_scale, int emax, ScaleRule *rule)
{
    Encoding scale_e;
    memset(rule, 0, sizeof *rule);
    if (!encoding_of(scale_mbits, scale_bias, 0, scale_max, &scale_e)) return 0;
    if (kind < SRC_BF16 || kind > SRC_F16
        || (global && !(gs > 0 && gs <= 3.4e38f && zero_scale > 0 && zero_scale <= scale_max && elem_max > 0))) {
        PyErr_SetString(PyExc_ValueError, "microscale: bad source kind or scale rule");
        return 0;
    }
    rule->global = global; rule->arith = kind; rule->gs = gs; rule->elem_max = elem_max; rule->scale_max = scale_max;
    rule->zero_scale = zero_scale; rule->emax = emax; rule->e4m3 = scale_e.ff; rule->f16 = float_format(10, 15);
    (void)fp_magnitude(zero_scale, rule->e4m3, &rule->zero_code);
    return 1;
}

/* micro_scales(src, kind, rows, cols, group, global, gs, elem_max, scale_mbits, scale_bias, scale_max, zero_scale,
                emax, scale_codes) -> nonfinite
   The min-max scale codes of micro_quantize alone (uint8 [rows, cols / group]), for the observers to search from. */
CLONES static PyObject *micro_scales(PyObject *self, PyObject *args)
{
    Py_buffer src, scodes;
    int kind, global, scale_mbits, scale_bias, emax;
    Py_ssize_t rows, cols, group;
    float gs, elem_max, scale_max, zero_scale;
    if (!PyArg_ParseTuple(args, "y*innnpffiiffiw*", &src, &kind, &rows, &cols, &group, &global, &gs, &elem_max,
                          &scale_mbits, &scale_bias, &scale_max, &zero_scale, &emax, &scodes))
        return NULL;
    PyObject *result = NULL;
    uint32_t *row = NULL;
    float *div = NULL, *fac = NULL;
    ScaleRule rule;
    if (!scale_rule_of(global, kind, gs, elem_max, scale_mbits, scale_bias, scale_max, zero_scale, emax, &rule))
        goto done;
    if (group < 1 || cols % group || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "micro_scales: bad shape");
        goto done;
    }
    if (!need(&src, rows * cols * src_itemsize(kind), "src") || !need(&scodes, rows * (cols / group), "scale_codes"))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    div = malloc((size_t)(cols / group + 1) * 4);
    fac = malloc((size_t)(cols / group + 1) * 4);
    if (!row || !div || !fac) { PyErr_NoMemory(); goto done; }
    {
        uint8_t *sc = scodes.buf;
        int bad = 0;
        const Py_ssize_t groups = cols / group, gsz = group;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (load_row_finite(src.buf, kind, cols, r, row)) { bad = 1; break; }
            row_scales(row, groups, gsz, &rule, sc + r * groups, div, fac);
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad);
    }
done:
    free(row); free(div); free(fac);
    PyBuffer_Release(&src); PyBuffer_Release(&scodes);
    return result;
}

#ifdef MSE_AVX2
/* row_scales in AVX2 on a bf16 (bits) or float32 row: the amax as an integer max over the magnitude bits. */
AVX2_HOT void row_scales_avx2(const void *src, const int bf16, Py_ssize_t groups, Py_ssize_t gsz, const ScaleRule *s,
                              uint8_t *codes, float *div, float *fac)
{
    const __m256i absm = _mm256_set1_epi32(0x7FFFFFFF);
    for (Py_ssize_t g = 0; g < groups; g++) {
        __m256i top = _mm256_setzero_si256();
        for (Py_ssize_t i = 0; i < gsz; i += 8) {
            const Py_ssize_t c = g * gsz + i;
            __m256i xb;
            if (bf16)
                xb = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + c))), 16);
            else
                xb = _mm256_loadu_si256((const __m256i *)((const uint32_t *)src + c));
            top = _mm256_max_epu32(top, _mm256_and_si256(xb, absm));
        }
        __m128i t = _mm_max_epu32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
        t = _mm_max_epu32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_max_epu32(t, _mm_shuffle_epi32(t, 0xB1));
        codes[g] = micro_scale(float_of((uint32_t)_mm_cvtsi128_si32(t)), s, div + g, fac + g);
    }
}

/* micro_quantize's rows in AVX2 with bf16 / packed / divide constant: scales, then micro_row_avx2. Returns 1 at
   the end of the first row holding NaN / Inf. */
AVX2_HOT int micro_quantize_rows_avx2_v(const void *src, int kind, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gsz,
                                        const ScaleRule *s, const int bf16, const int packed, const int divide,
                                        FloatFormat ff, float qmax, uint8_t *dst, uint8_t *scale_codes, uint32_t *row,
                                        float *div, float *fac, double *st, MicroLanes *acc)
{
    const Py_ssize_t groups = cols / gsz;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const void *xs = (const char *)src + r * cols * src_itemsize(kind);
        if (kind == SRC_F16) {
            load_row(src, kind, cols, r, 0, cols, row);
            xs = row;
        }
        row_scales_avx2(xs, bf16, groups, gsz, s, scale_codes + r * groups, div, fac);
        micro_row_avx2(xs, bf16, fac, div, groups, gsz, packed, divide, ff, qmax,
                       dst + r * (packed ? cols / 2 : cols), acc, st);
        if (!_mm256_testz_si256(acc->nonfinite, acc->nonfinite)) return 1;
    }
    return 0;
}

__attribute__((target("avx2"))) static int micro_quantize_avx2(const void *src, int kind, Py_ssize_t rows,
                                                              Py_ssize_t cols, Py_ssize_t gsz, const ScaleRule *s,
                                                              int packed, int divide, FloatFormat ff, float qmax,
                                                              uint8_t *dst, uint8_t *scale_codes, uint32_t *row,
                                                              float *div, float *fac, double *st, uint32_t *counts,
                                                              uint32_t *big)
{
    MicroLanes acc = micro_lanes_start(*big);
#define MICRO_Q(B, P, D) micro_quantize_rows_avx2_v(src, kind, rows, cols, gsz, s, B, P, D, ff, qmax, dst, scale_codes, \
                                                    row, div, fac, st, &acc)
    int bad = MICRO_VARIANT(MICRO_Q);
#undef MICRO_Q
    micro_lanes_fold(&acc, &counts[0], &counts[1], big);
    return bad;
}
#endif

/* micro_quantize(src, kind, rows, cols, group, global, gs, elem_max, scale_mbits, scale_bias, scale_max, zero_scale,
                  emax, mbits, bias, qmax, packed, out, scale_codes, values, stats) -> nonfinite
   A min-max NVFP4 / MX quantization in one pass over the rows: each row's group amax, its scale codes (micro_scale:
   microscale.py's rule, the weight's dtype `kind` as the NVFP4 scale arithmetic's), then its element codes and
   statistics as micro_encode_stats makes them from those scales; out, scale_codes uint8 [rows, cols / group] and
   stats are bit for bit those of the numpy path. On a NaN / Inf (return 1) they are partly written. */
CLONES static PyObject *micro_quantize(PyObject *self, PyObject *args)
{
    Py_buffer src, out, scodes, values, stats;
    int kind, global, scale_mbits, scale_bias, emax, mbits, bias, packed;
    Py_ssize_t rows, cols, group;
    float gs, elem_max, scale_max, zero_scale, qmax;
    if (!PyArg_ParseTuple(args, "y*innnpffiiffiiifpw*w*y*w*", &src, &kind, &rows, &cols, &group, &global, &gs, &elem_max,
                          &scale_mbits, &scale_bias, &scale_max, &zero_scale, &emax, &mbits, &bias, &qmax, &packed, &out,
                          &scodes, &values, &stats))
        return NULL;
    PyObject *result = NULL;
    uint32_t *row = NULL;
    uint8_t *tmp = NULL;
    float *vals = NULL, *err = NULL, *div = NULL, *fac = NULL;
    Encoding e;
    ScaleRule rule;
    if (!encoding_of(mbits, bias, -qmax, qmax, &e)
        || !scale_rule_of(global, kind, gs, elem_max, scale_mbits, scale_bias, scale_max, zero_scale, emax, &rule))
        goto done;
    if (group < 1 || cols % group || (packed && cols % 2) || rows < 0 || e.is_int) {
        PyErr_SetString(PyExc_ValueError, "micro_quantize: bad shape or element");
        goto done;
    }
    if (!need(&src, rows * cols * src_itemsize(kind), "src") || !need(&out, rows * (packed ? cols / 2 : cols), "out")
        || !need(&scodes, rows * (cols / group), "scale_codes") || !need(&values, (packed ? 16 : 256) * 4, "values")
        || !need(&stats, 40, "stats"))
        goto done;
    row = malloc((size_t)(cols + 1) * 4);
    tmp = malloc((size_t)cols + 1);
    vals = malloc((size_t)(cols + 1) * 4);
    err = malloc((size_t)(cols + 1) * 4);
    div = malloc((size_t)(cols / group + 1) * 4);
    fac = malloc((size_t)(cols / group + 1) * 4);
    if (!row || !tmp || !vals || !err || !div || !fac) { PyErr_NoMemory(); goto done; }
    {
        FloatFormat ff = e.ff;
        const float *table = values.buf;
        uint8_t *dst = out.buf, *sc = scodes.buf;
        double *st = stats.buf;
        int bad = 0;
        const Py_ssize_t groups = cols / group, gsz = group; /* locals: stores through uint8_t * may alias the parsed ones */
        const int divide = global;
        Py_BEGIN_ALLOW_THREADS
        uint32_t counts[2] = {0, 0};
        uint32_t big = bits_of((float)st[2]);
#ifdef MSE_AVX2
        if (gsz % 8 == 0 && __builtin_cpu_supports("avx2"))
            bad = micro_quantize_avx2(src.buf, kind, rows, cols, gsz, &rule, packed, divide, ff, qmax, dst, sc, row, div,
                                      fac, st, counts, &big);
        else
#endif
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (load_row_finite(src.buf, kind, cols, r, row)) { bad = 1; break; }
            row_scales(row, groups, gsz, &rule, sc + r * groups, div, fac);
            uint8_t *o = encode_row(row, fac, groups, gsz, packed, divide, ff, qmax, tmp,
                                    dst + r * (packed ? cols / 2 : cols));
            for (Py_ssize_t c = 0; c < cols; c++) vals[c] = table[o[c]];
            stats_row(row, vals, err, div, groups, gsz, qmax, &counts[0], &counts[1], &big, st);
        }
        stats_store(st, big, counts[0], counts[1]);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad);
    }
done:
    free(row); free(tmp); free(vals); free(err); free(div); free(fac);
    PyBuffer_Release(&src); PyBuffer_Release(&out); PyBuffer_Release(&scodes); PyBuffer_Release(&values);
    PyBuffer_Release(&stats);
    return result;
}

/* ---- dequantize ----------------------------------------------------------------------------------- */

/* dequantize(codes, rows, cols, tile_rows, tile_cols, table, scales, zeros or None, to_bf16, out)
   codes: one byte per element (its uint8 view); table: float32[256], the value of every byte; scales
   (zeros): float32 grids; out: float32 [rows, cols], or bf16 bits (uint16) when to_bf16: w' = (value -
   zero point) * scale in float32, then rounded to nearest even on the bit pattern
   (numerics/dequantize.py, bit for bit). */
CLONES static PyObject *dequantize(PyObject *self, PyObject *args)
{
    Py_buffer codes, table, scales, out, zeros = {0};
    PyObject *zeros_obj;
    Py_ssize_t rows, cols, tr, tc;
    int to_bf16;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*Opw*", &codes, &rows, &cols, &tr, &tc, &table, &scales, &zeros_obj,
                          &to_bf16, &out))
        return NULL;
    PyObject *result = NULL;
    const int has_zero = zeros_obj != Py_None;
    const Py_ssize_t gr = (rows + tr - 1) / tr, gc = (cols + tc - 1) / tc;
    if (has_zero && PyObject_GetBuffer(zeros_obj, &zeros, PyBUF_SIMPLE) < 0) goto done;
    if (tr < 1 || tc < 1 || rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "dequantize: bad shape");
        goto done;
    }
    if (!need(&codes, rows * cols, "codes") || !need(&table, 256 * 4, "table") || !need(&scales, gr * gc * 4, "scales")
        || (has_zero && !need(&zeros, gr * gc * 4, "zeros")) || !need(&out, rows * cols * (to_bf16 ? 2 : 4), "out"))
        goto done;
    {
        const uint8_t *cd = codes.buf;
        const float *tab = table.buf, *grid = scales.buf, *zgrid = has_zero ? zeros.buf : NULL;
        float *o32 = out.buf;
        uint16_t *o16 = out.buf;
        const Py_ssize_t nr = rows, nc = cols, ntr = tr, ntc = tc; /* locals: the stores may not alias them */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < nr; r++) {
            const float *srow = grid + (r / ntr) * gc;
            const float *zrow = has_zero ? zgrid + (r / ntr) * gc : NULL;
            for (Py_ssize_t t = 0; t < gc; t++) {
                const Py_ssize_t c0 = t * ntc, n = c0 + ntc < nc ? ntc : nc - c0;
                const float s = srow[t], z = has_zero ? zrow[t] : 0.0f;
                const uint8_t *c = cd + r * nc + c0;
                if (to_bf16) {
                    uint16_t *o = o16 + r * nc + c0;
                    for (Py_ssize_t i = 0; i < n; i++) {
                        float v = tab[c[i]];
                        if (has_zero) v = v - z;
                        uint32_t b = bits_of(v * s);
                        o[i] = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
                    }
                } else {
                    float *o = o32 + r * nc + c0;
                    for (Py_ssize_t i = 0; i < n; i++) {
                        float v = tab[c[i]];
                        if (has_zero) v = v - z;
                        o[i] = v * s;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&codes); PyBuffer_Release(&table); PyBuffer_Release(&scales); PyBuffer_Release(&out);
    if (has_zero && zeros.obj) PyBuffer_Release(&zeros);
    return result;
}

/* micro_dequantize(codes, rows, cols, group, packed, table, divisor, to_bf16, out): w' = value(code) *
   divisor of its group in float32 (4-bit codes two per byte, element 2k in the low nibble; table float32[16]
   or [256]; divisor float32 [rows, cols / group]), rounded to nearest even into bf16 bits when to_bf16
   (numerics/microscale.py's dequantize_nvfp4 / dequantize_mx, bit for bit). */
CLONES static PyObject *micro_dequantize(PyObject *self, PyObject *args)
{
    Py_buffer codes, table, divisor, out;
    Py_ssize_t rows, cols, group;
    int packed, to_bf16;
    if (!PyArg_ParseTuple(args, "y*nnnpy*y*pw*", &codes, &rows, &cols, &group, &packed, &table, &divisor, &to_bf16,
                          &out))
        return NULL;
    PyObject *result = NULL;
    float *vals = NULL;
    if (group < 1 || rows < 0 || cols < 0 || cols % group || (packed && cols % 2)) {
        PyErr_SetString(PyExc_ValueError, "micro_dequantize: bad shape");
        goto done;
    }
    if (!need(&codes, rows * (packed ? cols / 2 : cols), "codes") || !need(&table, (packed ? 16 : 256) * 4, "table")
        || !need(&divisor, rows * (cols / group) * 4, "divisor") || !need(&out, rows * cols * (to_bf16 ? 2 : 4), "out"))
        goto done;
    vals = malloc((size_t)(cols + 1) * 4);
    if (!vals) { PyErr_NoMemory(); goto done; }
    {
        const uint8_t *cd = codes.buf;
        const float *tab = table.buf, *div = divisor.buf;
        float *o32 = out.buf;
        uint16_t *o16 = out.buf;
        const Py_ssize_t nr = rows, nc = cols, gsz = group, groups = cols / group;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < nr; r++) {
            decode_row(cd, tab, r, nc, packed, vals);
            for (Py_ssize_t g = 0; g < groups; g++) {
                const float d = div[r * groups + g];
                const float *v = vals + g * gsz;
                if (to_bf16) {
                    uint16_t *o = o16 + r * nc + g * gsz;
                    for (Py_ssize_t i = 0; i < gsz; i++) {
                        uint32_t b = bits_of(v[i] * d);
                        o[i] = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
                    }
                } else {
                    float *o = o32 + r * nc + g * gsz;
                    for (Py_ssize_t i = 0; i < gsz; i++) o[i] = v[i] * d;
                }
            }
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
done:
    free(vals);
    PyBuffer_Release(&codes); PyBuffer_Release(&table); PyBuffer_Release(&divisor); PyBuffer_Release(&out);
    return result;
}

/* ---- the mse observer --------------------------------------------------------------------------- */

/* One tile's error sums for one integer-grid candidate (scale s, zero point z): per lane j (element c in
   lane c % LANES), the sums in element order of d^2 and of |d|^exponent, d = (round(clamp(x / s (+ z))) (- z)) * s
   - x, then the lanes added 0..LANES-1 (observers._Scratch.errors through lanes.lane_sums, bit for bit). The
   reference's lanes are vector lanes here: one step quantizes LANES floats and widens them to float64, and each
   lane's sums stay sequential. `has_zero` and `exponent` are constants at each call, so every variant is
   compiled branch free. Three builds: AVX2 intrinsics (mse_tile_avx2, chosen at run time where the CPU has
   AVX2), GCC / clang vector extensions (below), plain C (other compilers, or -DFP8CONV_NO_VECTORS). */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(FP8CONV_NO_VECTORS)
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
#define MSE_VECTORS 1
#endif

#ifdef MSE_VECTORS
/* GCC 12 reports every slot of sv / zv as maybe uninitialized in the default (SSE2) clone, sv[0] included,
   although the loop below sets them all: a false positive of its split 32-byte vectors. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
/* IEEE lanes, the scalar expressions' exact operations: `v < lo ? lo : v` as a mask select (a NaN stays NaN). */
#define SELECT8(mask, a, b) ((v8f)(((mask) & (v8i)(a)) | (~(mask) & (v8i)(b))))
/* MSE_TILES tiles side by side (independent dependency chains: a tile of 64 elements is only 8 steps). */
#define MSE_TILES 4
HOT void mse_tile_int(const float *restrict x, Py_ssize_t m, const float *s, const float *z, const int has_zero,
                      const int exponent, float lo, float hi, double *obj, double *sq, const int width)
{
    const v8f lov = {lo, lo, lo, lo, lo, lo, lo, lo}, hiv = {hi, hi, hi, hi, hi, hi, hi, hi};
    const v8f magic = {12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f,
                       12582912.0f, 12582912.0f};
    const v4l abs_mask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    v8f sv[MSE_TILES], zv[MSE_TILES];
    v4d l0[MSE_TILES], l1[MSE_TILES], p0[MSE_TILES], p1[MSE_TILES];
    for (int t = 0; t < MSE_TILES; t++) { /* every slot set (those past `width` unused) */
        const float st = s[t < width ? t : 0], zt = z[t < width ? t : 0];
        sv[t] = st - (v8f){0}; /* the broadcast: x - (+0) is x for every x, -0 included */
        zv[t] = zt - (v8f){0};
        l0[t] = l1[t] = p0[t] = p1[t] = (v4d){0, 0, 0, 0};
    }
    for (Py_ssize_t c = 0; c < m; c += LANES) {
        for (int t = 0; t < width; t++) {
            v8f xv;
            memcpy(&xv, x + t * m + c, sizeof xv);
            v8f v = xv / sv[t];
            if (has_zero) v = v + zv[t];
            v = SELECT8(v < lov, lov, v);
            v = SELECT8(v > hiv, hiv, v);
            v8f q = (v + magic) - magic;
            if (has_zero) q = q - zv[t];
            v8f d = q * sv[t] - xv;
            v4f dlo = __builtin_shufflevector(d, d, 0, 1, 2, 3), dhi = __builtin_shufflevector(d, d, 4, 5, 6, 7);
            v4d a0 = __builtin_convertvector(dlo, v4d), a1 = __builtin_convertvector(dhi, v4d);
            v4d s0 = a0 * a0, s1 = a1 * a1;
            l0[t] += s0;
            l1[t] += s1;
            if (exponent == 3) {
                p0[t] += (v4d)((v4l)a0 & abs_mask) * s0;
                p1[t] += (v4d)((v4l)a1 & abs_mask) * s1;
            }
            if (exponent == 4) {
                p0[t] += s0 * s0;
                p1[t] += s1 * s1;
            }
        }
    }
    for (int t = 0; t < width; t++) {
        double total = l0[t][0];
        for (int j = 1; j < 4; j++) total += l0[t][j];
        for (int j = 0; j < 4; j++) total += l1[t][j];
        sq[t] = total;
        if (exponent == 2) { obj[t] = total; continue; }
        double power = p0[t][0];
        for (int j = 1; j < 4; j++) power += p0[t][j];
        for (int j = 0; j < 4; j++) power += p1[t][j];
        obj[t] = power;
    }
}
#else
#define MSE_TILES 1
HOT void mse_tile_int(const float *restrict x, Py_ssize_t m, const float *sp, const float *zp, const int has_zero,
                      const int exponent, float lo, float hi, double *obj, double *sq, const int width)
{
    const float s = sp[0], z = zp[0];
    (void)width;
    double l[LANES] = {0}, p[LANES] = {0};
    for (Py_ssize_t c = 0; c < m; c += LANES) {
        float d[LANES];
        for (int j = 0; j < LANES; j++) {
            float v = x[c + j] / s;
            if (has_zero) v = v + z;
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            float q = round_int(v);
            if (has_zero) q = q - z;
            d[j] = q * s - x[c + j];
        }
        for (int j = 0; j < LANES; j++) {
            double a = (double)d[j], a2 = a * a;
            l[j] += a2;
            if (exponent == 3) p[j] += fabs(a) * a2;
            if (exponent == 4) p[j] += a2 * a2;
        }
    }
    double total = l[0];
    for (int j = 1; j < LANES; j++) total += l[j];
    *sq = total;
    if (exponent == 2) { *obj = total; return; }
    double power = p[0];
    for (int j = 1; j < LANES; j++) power += p[j];
    *obj = power;
}
#endif

#ifdef MSE_VECTORS
#pragma GCC diagnostic pop
#endif

/* Every candidate of n integer-grid tiles (x_all: float32 [n, m]), MSE_TILES tiles at a time (then one by one):
   the body of the portable, AVX2 and AVX-512 drivers, KERNEL their tile kernel. Candidate k of tile i at
   sc[k * ns + i] (zs the same), its sums at out[j * ns + i] (mse_search's layout; ns >= n: these n tiles are
   part of a row of tiles). */
#define MSE_TILES_BODY(KERNEL)                                                                                    \
    for (Py_ssize_t i0 = 0; i0 < n; i0 += MSE_TILES) {                                                          \
        const int width = n - i0 >= MSE_TILES ? MSE_TILES : 1;                                                   \
        for (Py_ssize_t i = i0; i < i0 + MSE_TILES && i < n; i += width) {                                      \
            const float *x = x_all + i * m;                                                                      \
            double best[MSE_TILES], best_sq[MSE_TILES];                                                          \
            int32_t chosen[MSE_TILES];                                                                           \
            for (Py_ssize_t k = 0; k < k_count; k++) {                                                           \
                double obj[MSE_TILES], sq[MSE_TILES];                                                            \
                if (width == MSE_TILES)                                                                          \
                    KERNEL(x, m, sc + k * ns + i, zs + k * ns + i, has_zero, exponent, lo, hi, obj, sq, MSE_TILES); \
                else                                                                                             \
                    KERNEL(x, m, sc + k * ns + i, zs + k * ns + i, has_zero, exponent, lo, hi, obj, sq, 1);        \
                for (int t = 0; t < width; t++) {                                                                \
                    if (k == 0) {                                                                                \
                        best[t] = obj[t];                                                                        \
                        best_sq[t] = sq[t];                                                                      \
                        chosen[t] = 0;                                                                           \
                        out[2 * ns + i + t] = obj[t];                                                             \
                        out[3 * ns + i + t] = sq[t];                                                              \
                    } else if (obj[t] < best[t] * (1.0 - margin)) {                                              \
                        best[t] = obj[t];                                                                        \
                        best_sq[t] = sq[t];                                                                      \
                        chosen[t] = (int32_t)k;                                                                  \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
            for (int t = 0; t < width; t++) {                                                                    \
                idx[i + t] = chosen[t];                                                                          \
                out[i + t] = best[t];                                                                            \
                out[ns + i + t] = best_sq[t];                                                                     \
            }                                                                                                    \
        }                                                                                                        \
    }

#define MSE_TILES_ARGS                                                                                            \
    const float *x_all, Py_ssize_t n, Py_ssize_t m, Py_ssize_t ns, const float *sc, const float *zs,             \
    Py_ssize_t k_count, const int has_zero, const int exponent, float lo, float hi, double margin, int32_t *idx, double *out

/* Call FN, a variant compiled with has_zero HZ and the exponent as constants, for the run-time exponent (2, 3, 4):
   the dispatch every mse_tiles_* entry makes. */
#define MSE_TILES_CALL(FN, HZ)                                                                                     \
    do {                                                                                                           \
        if (exponent == 2) FN(x_all, n, m, ns, sc, zs, k_count, HZ, 2, lo, hi, margin, idx, out);                  \
        else if (exponent == 3) FN(x_all, n, m, ns, sc, zs, k_count, HZ, 3, lo, hi, margin, idx, out);             \
        else FN(x_all, n, m, ns, sc, zs, k_count, HZ, 4, lo, hi, margin, idx, out);                                \
    } while (0)

HOT void mse_tiles_int(MSE_TILES_ARGS) { MSE_TILES_BODY(mse_tile_int) }

/* Symmetric integer grids, pruned by bounds (the AVX-512 and AVX2 drivers; EXACT the tile kernel, APPROX its
   float32 estimate in VLANES lanes): every candidate after the first is first evaluated approximately (the
   reference's codes and float32 d, then |d|^exponent in float32, summed in VLANES float32 lanes), which bounds the
   exact objective E (float64, the reference's) within A (1 +- eps) +- delta. A candidate is decided from the bounds
   where they are clear of the threshold best * (1 - margin); otherwise, and where A is not finite (float32
   overflow), the exact objectives are computed and compared as the reference does. So each decision, the chosen
   candidate and every output are the reference's, bit for bit; the exact sums of candidate 0 and of the chosen
   one come from EXACT. Bounds (u = 2^-24): each float32 power is within 3u of |d|^exponent (2 or 3 roundings),
   each lane sums m / VLANES of them (m / VLANES roundings) and the lanes are added in 4 more (AVX-512, float32) or
   in float64 (AVX2): within (7 + m / VLANES)u relative (eps takes 1.25 times that); float32 underflow, within
   2^-146 per element (delta). */
#define MSE_PRUNED_BODY(EXACT, APPROX, VLANES)                                                                   \
    static const float no_zero[MSE_TILES] = {0};                                                                 \
    const double u = 0x1p-24;                                                                                    \
    const double eps = (7.0 + (double)m / (VLANES)) * u * 1.25 + 0x1p-40, delta = (double)m * 0x1p-146;          \
    const double keep = 1.0 - margin;                                                                            \
    (void)zs; (void)has_zero;                                                                                    \
    for (Py_ssize_t i0 = 0; i0 < n; i0 += MSE_TILES) {                                                           \
        const int width = n - i0 >= MSE_TILES ? MSE_TILES : (int)(n - i0);                                       \
        const float *x = x_all + i0 * m;                                                                         \
        double best[MSE_TILES], best_sq[MSE_TILES], low[MSE_TILES], high[MSE_TILES], approx[MSE_TILES];          \
        int32_t chosen[MSE_TILES];                                                                               \
        int known[MSE_TILES];                                                                                    \
        EXACT(x, m, sc + i0, no_zero, 0, exponent, lo, hi, best, best_sq, width);                                \
        for (int t = 0; t < width; t++) {                                                                        \
            out[2 * ns + i0 + t] = best[t];                                                                      \
            out[3 * ns + i0 + t] = best_sq[t];                                                                   \
            low[t] = high[t] = best[t];                                                                          \
            chosen[t] = 0;                                                                                       \
            known[t] = 1;                                                                                        \
        }                                                                                                        \
        for (Py_ssize_t k = 1; k < k_count; k++) {                                                               \
            const float *sk = sc + k * ns + i0;                                                                  \
            APPROX(x, m, sk, lo, hi, exponent, approx, width);                                                   \
            for (int t = 0; t < width; t++) {                                                                    \
                const double a = approx[t];                                                                      \
                if (isfinite(a)) {                                                                               \
                    const double lk = fmax(a * (1.0 - eps) - delta, 0.0), hk = a * (1.0 + eps) + delta;          \
                    if (hk < low[t] * keep * (1.0 - 0x1p-50)) { /* better, certainly */                          \
                        chosen[t] = (int32_t)k;                                                                  \
                        low[t] = lk;                                                                             \
                        high[t] = hk;                                                                            \
                        known[t] = 0;                                                                            \
                        continue;                                                                                \
                    }                                                                                            \
                    if (lk >= high[t] * keep * (1.0 + 0x1p-50)) continue; /* not better, certainly */            \
                }                                                                                                \
                if (!known[t]) { /* the reference's comparison, on exact objectives */                           \
                    EXACT(x + t * m, m, sc + chosen[t] * ns + i0 + t, no_zero, 0, exponent, lo, hi,              \
                                    best + t, best_sq + t, 1);                                                   \
                    known[t] = 1;                                                                                \
                }                                                                                                \
                double obj, sq;                                                                                  \
                EXACT(x + t * m, m, sk + t, no_zero, 0, exponent, lo, hi, &obj, &sq, 1);                         \
                if (obj < best[t] * keep) {                                                                      \
                    chosen[t] = (int32_t)k;                                                                      \
                    best[t] = obj;                                                                               \
                    best_sq[t] = sq;                                                                             \
                }                                                                                                \
                low[t] = high[t] = best[t];                                                                      \
            }                                                                                                    \
        }                                                                                                        \
        int unknown = 0;                                                                                         \
        float s_chosen[MSE_TILES];                                                                               \
        for (int t = 0; t < width; t++) {                                                                        \
            unknown |= !known[t];                                                                                \
            s_chosen[t] = sc[chosen[t] * ns + i0 + t];                                                           \
        }                                                                                                        \
        if (unknown) { /* the chosen candidates' exact sums, the block's tiles side by side */                   \
            double obj[MSE_TILES], sq[MSE_TILES];                                                                \
            EXACT(x, m, s_chosen, no_zero, 0, exponent, lo, hi, obj, sq, width);                                 \
            for (int t = 0; t < width; t++)                                                                      \
                if (!known[t]) {                                                                                 \
                    best[t] = obj[t];                                                                            \
                    best_sq[t] = sq[t];                                                                          \
                }                                                                                                \
        }                                                                                                        \
        for (int t = 0; t < width; t++) {                                                                        \
            idx[i0 + t] = chosen[t];                                                                             \
            out[i0 + t] = best[t];                                                                               \
            out[ns + i0 + t] = best_sq[t];                                                                       \
        }                                                                                                        \
    }

#ifdef MSE_AVX2
/* The AVX2 build of the same: x86 intrinsics, so that the float64 widening is one vcvtps2pd per 4 lanes and the
   clamps are vmaxps / vminps. maxps(lo, v) is `lo > v ? lo : v` and minps(hi, v) `hi < v ? hi : v` (Intel's
   definition, a NaN v passing through), so the clamps are the scalar expressions exactly; no FMA (the target
   is avx2 alone and -ffp-contract=off). */
AVX2_HOT void mse_tile_avx2(const float *restrict x, Py_ssize_t m, const float *s, const float *z,
                            const int has_zero, const int exponent, float lo, float hi, double *obj, double *sq,
                            const int width)
{
    const __m256 lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi), magic = _mm256_set1_ps(12582912.0f);
    const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(INT64_MAX));
    __m256 sv[MSE_TILES], zv[MSE_TILES];
    __m256d l0[MSE_TILES], l1[MSE_TILES], p0[MSE_TILES], p1[MSE_TILES];
    for (int t = 0; t < MSE_TILES; t++) {
        sv[t] = _mm256_set1_ps(s[t < width ? t : 0]);
        zv[t] = _mm256_set1_ps(z[t < width ? t : 0]);
        l0[t] = l1[t] = p0[t] = p1[t] = _mm256_setzero_pd();
    }
    for (Py_ssize_t c = 0; c < m; c += LANES) {
        for (int t = 0; t < width; t++) {
            const __m256 xv = _mm256_loadu_ps(x + t * m + c);
            __m256 v = _mm256_div_ps(xv, sv[t]);
            if (has_zero) v = _mm256_add_ps(v, zv[t]);
            v = _mm256_max_ps(lov, v);
            v = _mm256_min_ps(hiv, v);
            __m256 q = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
            if (has_zero) q = _mm256_sub_ps(q, zv[t]);
            const __m256 d = _mm256_sub_ps(_mm256_mul_ps(q, sv[t]), xv);
            const __m256d a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), a1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
            const __m256d s0 = _mm256_mul_pd(a0, a0), s1 = _mm256_mul_pd(a1, a1);
            l0[t] = _mm256_add_pd(l0[t], s0);
            l1[t] = _mm256_add_pd(l1[t], s1);
            if (exponent == 3) {
                p0[t] = _mm256_add_pd(p0[t], _mm256_mul_pd(_mm256_and_pd(a0, abs_mask), s0));
                p1[t] = _mm256_add_pd(p1[t], _mm256_mul_pd(_mm256_and_pd(a1, abs_mask), s1));
            }
            if (exponent == 4) {
                p0[t] = _mm256_add_pd(p0[t], _mm256_mul_pd(s0, s0));
                p1[t] = _mm256_add_pd(p1[t], _mm256_mul_pd(s1, s1));
            }
        }
    }
    for (int t = 0; t < width; t++) {
        double lanes[8];
        _mm256_storeu_pd(lanes, l0[t]);
        _mm256_storeu_pd(lanes + 4, l1[t]);
        double total = lanes[0];
        for (int j = 1; j < 8; j++) total += lanes[j];
        sq[t] = total;
        if (exponent == 2) { obj[t] = total; continue; }
        _mm256_storeu_pd(lanes, p0[t]);
        _mm256_storeu_pd(lanes + 4, p1[t]);
        double power = lanes[0];
        for (int j = 1; j < 8; j++) power += lanes[j];
        obj[t] = power;
    }
}

AVX2_HOT void mse_tiles_avx2_v(MSE_TILES_ARGS) { MSE_TILES_BODY(mse_tile_avx2) }

/* The float32 estimate of mse_tile_avx2's objective (MSE_PRUNED_BODY): 8 float32 lanes, added in float64. */
AVX2_HOT void mse_tile_approx_avx2(const float *restrict x, Py_ssize_t m, const float *s, float lo, float hi,
                                   const int exponent, double *approx, const int width)
{
    const __m256 lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi), magic = _mm256_set1_ps(12582912.0f);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 sv[MSE_TILES], acc[MSE_TILES];
    for (int t = 0; t < MSE_TILES; t++) {
        sv[t] = _mm256_set1_ps(s[t < width ? t : 0]);
        acc[t] = _mm256_setzero_ps();
    }
    for (Py_ssize_t c = 0; c < m; c += LANES) {
        for (int t = 0; t < width; t++) {
            const __m256 xv = _mm256_loadu_ps(x + t * m + c);
            __m256 v = _mm256_div_ps(xv, sv[t]);
            v = _mm256_max_ps(lov, v);
            v = _mm256_min_ps(hiv, v);
            const __m256 q = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
            const __m256 d = _mm256_sub_ps(_mm256_mul_ps(q, sv[t]), xv);
            const __m256 d2 = _mm256_mul_ps(d, d);
            if (exponent == 2) acc[t] = _mm256_add_ps(acc[t], d2);
            if (exponent == 3) acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(d2, _mm256_and_ps(d, abs_mask)));
            if (exponent == 4) acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(d2, d2));
        }
    }
    for (int t = 0; t < width; t++) {
        float lanes[LANES];
        _mm256_storeu_ps(lanes, acc[t]);
        double total = 0.0;
        for (int j = 0; j < LANES; j++) total += (double)lanes[j];
        approx[t] = total;
    }
}

AVX2_HOT void mse_tiles_pruned_avx2_v(MSE_TILES_ARGS) { MSE_PRUNED_BODY(mse_tile_avx2, mse_tile_approx_avx2, 8) }

/* One instantiation per (has_zero, exponent), as in mse_search's portable dispatch; symmetric grids pruned by
   bounds (MSE_PRUNED_BODY; on an AVX2-only CPU the INT4 group-128 search 1.4x faster, bench/RESULTS.md). */
__attribute__((target("avx2"))) static void mse_tiles_avx2(MSE_TILES_ARGS)
{
    if (has_zero) MSE_TILES_CALL(mse_tiles_avx2_v, 1);
    else MSE_TILES_CALL(mse_tiles_pruned_avx2_v, 0);
}
#endif

#ifdef MSE_AVX512
/* The AVX-512 build of the same: 16 elements of a tile per step, and the reference's 8 float64 lanes in one
   register (lane j of element c + j, then of c + 8 + j: each lane's sums stay in element order). For exponent 3
   the magnitude |d| is taken in float32 before the widening (exact; (double)|d| = |(double)d|), so d^2 and
   |d|^3 = |d| * d^2 are the AVX2 kernel's products. Clamps as vmaxps / vminps (see the AVX2 kernel). */
AVX512_HOT __m512d mse_square_sum(__m512d acc, __m512d a) { return _mm512_add_pd(acc, _mm512_mul_pd(a, a)); }

AVX512_HOT void mse_tile_avx512(const float *restrict x, Py_ssize_t m, const float *s, const float *z,
                                const int has_zero, const int exponent, float lo, float hi, double *obj, double *sq,
                                const int width)
{
    const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi), magic = _mm512_set1_ps(12582912.0f);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512 sv[MSE_TILES], zv[MSE_TILES];
    __m512d l[MSE_TILES], p[MSE_TILES];
    for (int t = 0; t < MSE_TILES; t++) {
        sv[t] = _mm512_set1_ps(s[t < width ? t : 0]);
        zv[t] = _mm512_set1_ps(z[t < width ? t : 0]);
        l[t] = p[t] = _mm512_setzero_pd();
    }
#define MSE_AVX512_LANES(a)                                                                                       \
    do {                                                                                                          \
        const __m512d sq_ = _mm512_mul_pd(a, a);                                                                  \
        l[t] = _mm512_add_pd(l[t], sq_);                                                                          \
        if (exponent == 3) p[t] = _mm512_add_pd(p[t], _mm512_mul_pd(a, sq_));                                     \
        if (exponent == 4) p[t] = _mm512_add_pd(p[t], _mm512_mul_pd(sq_, sq_));                                   \
    } while (0)
    Py_ssize_t c = 0;
    for (; c + 16 <= m; c += 16) {
        for (int t = 0; t < width; t++) {
            const __m512 xv = _mm512_loadu_ps(x + t * m + c);
            __m512 v = _mm512_div_ps(xv, sv[t]);
            if (has_zero) v = _mm512_add_ps(v, zv[t]);
            v = _mm512_max_ps(lov, v);
            v = _mm512_min_ps(hiv, v);
            __m512 q = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
            if (has_zero) q = _mm512_sub_ps(q, zv[t]);
            __m512 d = _mm512_sub_ps(_mm512_mul_ps(q, sv[t]), xv);
            if (exponent == 3) d = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(d), abs_mask));
            const __m512d a0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
            const __m512d a1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
            MSE_AVX512_LANES(a0);
            MSE_AVX512_LANES(a1);
        }
    }
    if (c < m) { /* m % 16 == 8: the last 8 elements, 256 bits wide */
        for (int t = 0; t < width; t++) {
            const __m256 xv = _mm256_loadu_ps(x + t * m + c), s8 = _mm512_castps512_ps256(sv[t]);
            const __m256 z8 = _mm512_castps512_ps256(zv[t]);
            __m256 v = _mm256_div_ps(xv, s8);
            if (has_zero) v = _mm256_add_ps(v, z8);
            v = _mm256_max_ps(_mm512_castps512_ps256(lov), v);
            v = _mm256_min_ps(_mm512_castps512_ps256(hiv), v);
            const __m256 magic8 = _mm512_castps512_ps256(magic);
            __m256 q = _mm256_sub_ps(_mm256_add_ps(v, magic8), magic8);
            if (has_zero) q = _mm256_sub_ps(q, z8);
            __m256 d = _mm256_sub_ps(_mm256_mul_ps(q, s8), xv);
            if (exponent == 3) d = _mm256_and_ps(d, _mm256_castsi256_ps(_mm512_castsi512_si256(abs_mask)));
            const __m512d a0 = _mm512_cvtps_pd(d);
            MSE_AVX512_LANES(a0);
        }
    }
#undef MSE_AVX512_LANES
    for (int t = 0; t < width; t++) {
        double lanes[8];
        _mm512_storeu_pd(lanes, l[t]);
        double total = lanes[0];
        for (int j = 1; j < 8; j++) total += lanes[j];
        sq[t] = total;
        if (exponent == 2) { obj[t] = total; continue; }
        _mm512_storeu_pd(lanes, p[t]);
        double power = lanes[0];
        for (int j = 1; j < 8; j++) power += lanes[j];
        obj[t] = power;
    }
}

AVX512_HOT void mse_tiles_avx512_v(MSE_TILES_ARGS) { MSE_TILES_BODY(mse_tile_avx512) }

/* The float32 estimate of mse_tile_avx512's objective (MSE_PRUNED_BODY), 16 lanes. */
AVX512_HOT void mse_tile_approx512(const float *restrict x, Py_ssize_t m, const float *s, float lo, float hi,
                                   const int exponent, double *approx, const int width)
{
    const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi), magic = _mm512_set1_ps(12582912.0f);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512 sv[MSE_TILES], acc[MSE_TILES];
    for (int t = 0; t < MSE_TILES; t++) {
        const float st = s[t < width ? t : 0];
        sv[t] = _mm512_set1_ps(st);
        acc[t] = _mm512_setzero_ps();
    }
    for (Py_ssize_t c = 0; c < m; c += 16) {
        const __mmask16 mask = m - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF; /* m % 16 == 8: zeros add 0 */
        for (int t = 0; t < width; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * m + c);
            __m512 v = _mm512_div_ps(xv, sv[t]);
            v = _mm512_max_ps(lov, v);
            v = _mm512_min_ps(hiv, v);
            __m512 q = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
            const __m512 d = _mm512_sub_ps(_mm512_mul_ps(q, sv[t]), xv);
            const __m512 d2 = _mm512_mul_ps(d, d);
            if (exponent == 2) acc[t] = _mm512_add_ps(acc[t], d2);
            if (exponent == 3)
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(d2, _mm512_castsi512_ps(
                                                   _mm512_and_si512(_mm512_castps_si512(d), abs_mask))));
            if (exponent == 4) acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(d2, d2));
        }
    }
    for (int t = 0; t < width; t++) approx[t] = (double)_mm512_reduce_add_ps(acc[t]);
}

AVX512_HOT void mse_tiles_pruned_v(MSE_TILES_ARGS) { MSE_PRUNED_BODY(mse_tile_avx512, mse_tile_approx512, 16) }

__attribute__((target("avx512f,avx512vl"))) static void mse_tiles_avx512(MSE_TILES_ARGS)
{
    if (has_zero) MSE_TILES_CALL(mse_tiles_avx512_v, 1);
    else MSE_TILES_CALL(mse_tiles_pruned_v, 0); /* pruned: see mse_tiles_pruned_v */
}
#endif

/* Float grids (FP8): every candidate of n tiles (MSE_TILES_ARGS' layout), a whole tile quantized into d, then
   its lane sums; d: float32 scratch [m]. */
HOT void mse_tiles_fp(const Encoding *e, MSE_TILES_ARGS, float *restrict d)
{
    (void)has_zero; /* float grids have no zero point */
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *x = x_all + i * m;
        double best = 0, best_sq = 0;
        int32_t chosen = 0;
        for (Py_ssize_t k = 0; k < k_count; k++) {
            float s = sc[k * ns + i];
            for (Py_ssize_t c = 0; c < m; c++) {
                float v = x[c] / s;
                v = v < lo ? lo : v;
                v = v > hi ? hi : v;
                uint32_t vb = bits_of(v), code;
                float mag = fp_magnitude(float_of(vb & 0x7FFFFFFFu), e->ff, &code);
                d[c] = float_of(bits_of(mag) | (vb & 0x80000000u)) * s - x[c];
            }
            double l[LANES] = {0}, p[LANES] = {0};
            /* One loop per exponent (no branch inside: the lanes vectorise); d^2 exact, |d|^3 = d^2 * |d|
               and d^4 = d^2 * d^2 each rounded once, as observers._Scratch.errors. */
            if (exponent == 2) {
                for (Py_ssize_t c = 0; c < m; c += LANES)
                    for (int j = 0; j < LANES; j++) { double a = (double)d[c + j]; l[j] += a * a; }
            } else if (exponent == 3) {
                for (Py_ssize_t c = 0; c < m; c += LANES)
                    for (int j = 0; j < LANES; j++) {
                        double a = (double)d[c + j], sq = a * a;
                        l[j] += sq;
                        p[j] += fabs(a) * sq;
                    }
            } else {
                for (Py_ssize_t c = 0; c < m; c += LANES)
                    for (int j = 0; j < LANES; j++) {
                        double a = (double)d[c + j], sq = a * a;
                        l[j] += sq;
                        p[j] += sq * sq;
                    }
            }
            double sq_total = l[0], obj = 0;
            for (int j = 1; j < LANES; j++) sq_total += l[j];
            if (exponent == 2) obj = sq_total;
            else {
                obj = p[0];
                for (int j = 1; j < LANES; j++) obj += p[j];
            }
            if (k == 0) {
                best = obj;
                best_sq = sq_total;
                out[2 * ns + i] = obj;
                out[3 * ns + i] = sq_total;
            } else if (obj < best * (1.0 - margin)) {
                best = obj;
                best_sq = sq_total;
                chosen = (int32_t)k;
            }
        }
        idx[i] = chosen;
        out[i] = best;
        out[ns + i] = best_sq;
    }
}

/* The integer-grid kernel of this CPU: AVX-512, AVX2, else the portable build; one instantiation per (has_zero,
   exponent), the variants without a branch in the element loop. */
CLONES static void mse_tiles_any(MSE_TILES_ARGS)
{
#ifdef MSE_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
        mse_tiles_avx512(x_all, n, m, ns, sc, zs, k_count, has_zero, exponent, lo, hi, margin, idx, out);
        return;
    }
#endif
#ifdef MSE_AVX2
    if (__builtin_cpu_supports("avx2")) {
        mse_tiles_avx2(x_all, n, m, ns, sc, zs, k_count, has_zero, exponent, lo, hi, margin, idx, out);
        return;
    }
#endif
    if (has_zero) MSE_TILES_CALL(mse_tiles_int, 1);
    else MSE_TILES_CALL(mse_tiles_int, 0);
}

/* mse_search(src, kind, rows, cols, group, scales, zeros, k_count, has_zero, mbits, bias, lo, hi, margin, exponent,
              index, sums, by_key, keys) -> nonfinite
   The tiles are the groups of `group` consecutive elements along each row of a bf16 / fp16 / float32 source
   [rows, cols], in row-major grid order, n = rows * ceil(cols / group) of them; a ragged last group is
   zero-padded and every tile to a multiple of 8 elements (observers.tiles_of and observers.mse: zeros add no
   error). A float32 [n, m] array of tiles is the source with rows = n, cols = group = m. scales / zeros float32
   [k_count, n], candidate 0 the min-max one; per tile the candidate with the smallest sum |d|^exponent,
   d = (round(clamp(x / s (+ z))) (- z)) * s - x (a later candidate wins only when smaller by more than the
   relative margin); sums float64 [4, n]: its objective, its squared error, candidate 0's objective and squared
   error (observers.mse, bit for bit). Each row is widened to float32 once, then searched from the cache.
   by_key (a bf16 / fp16 source, symmetric): `scales` is a table float32 [65536, k_count] instead, tile i's
   candidate k at table[keys[i]][k] (one cache line a tile), keys[i] = its max |x| as bit pattern (the largest of bits & 0x7FFF), written to
   keys uint16 [n]; zeros is not read.
   Returns True, with the outputs undefined, when the source holds NaN / Inf. */
CLONES static PyObject *mse_search(PyObject *self, PyObject *args)
{
    Py_buffer src, scales, zeros, index, sums, keys;
    int kind, by_key;
    Py_ssize_t rows, cols, group, k_count;
    int has_zero, mbits, bias, exponent;
    float lo, hi;
    double margin;
    if (!PyArg_ParseTuple(args, "y*innny*y*npiiffdiw*w*pw*", &src, &kind, &rows, &cols, &group, &scales, &zeros,
                          &k_count, &has_zero, &mbits, &bias, &lo, &hi, &margin, &exponent, &index, &sums, &by_key,
                          &keys))
        return NULL;
    PyObject *result = NULL;
    uint32_t *row = NULL, *raw = NULL;
    float *d = NULL, *row_sc = NULL;
    double *row_out = NULL;
    int32_t *row_idx = NULL;
    Encoding e;
    if (!encoding_of(mbits, bias, lo, hi, &e) || rows < 0 || cols < 0 || group < 1 || k_count < 1 || exponent < 2
        || exponent > 4 || (by_key && (kind == SRC_F32 || has_zero))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "mse_search: bad arguments");
        goto done;
    }
    Py_ssize_t gc = (cols + group - 1) / group, n = rows * gc, gp = (group + LANES - 1) / LANES * LANES;
    if (!need(&src, rows * cols * src_itemsize(kind), "src")
        || !need(&scales, k_count * (by_key ? 65536 : n) * 4, "scales")
        || !need(&zeros, by_key ? 0 : k_count * n * 4, "zeros") || !need(&index, n * 4, "index")
        || !need(&sums, 4 * n * 8, "sums") || !need(&keys, by_key ? n * 2 : 0, "keys"))
        goto done;
    row = malloc((size_t)(gc * gp + 1) * 4);
    raw = malloc((size_t)(cols + 1) * 4);
    d = malloc((size_t)(gp + 1) * 4);
    row_sc = malloc((size_t)(k_count * gc + 1) * 4);
    row_out = malloc((size_t)(4 * gc + 1) * 8);
    row_idx = malloc((size_t)(gc + 1) * 4);
    if (!row || !raw || !d || !row_sc || !row_out || !row_idx) { PyErr_NoMemory(); goto done; }
    {
        const float *sc = scales.buf, *zs = by_key ? scales.buf : zeros.buf;
        int32_t *idx = index.buf;
        double *out = sums.buf;
        uint16_t *key = keys.buf;
        uint32_t bad = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows && !bad; r++) {
            if (gp == group) { /* the row as its tiles, zeros past its end */
                load_row(src.buf, kind, cols, r, 0, cols, row);
                for (Py_ssize_t c = cols; c < gc * gp; c++) row[c] = 0;
            } else { /* each group at a multiple of 8, zero-padded */
                load_row(src.buf, kind, cols, r, 0, cols, raw);
                for (Py_ssize_t g = 0; g < gc; g++) {
                    Py_ssize_t c0 = g * group, w = cols - c0 < group ? cols - c0 : group;
                    memcpy(row + g * gp, raw + c0, (size_t)w * 4);
                    for (Py_ssize_t c = w; c < gp; c++) row[g * gp + c] = 0;
                }
            }
            for (Py_ssize_t c = 0; c < gc * gp; c++) bad |= (row[c] & 0x7F800000u) == 0x7F800000u;
            if (bad) break;
            const Py_ssize_t i = r * gc;
            if (by_key) { /* the row's candidates from the table, searched in row-local arrays */
                const uint16_t *h = (const uint16_t *)src.buf + r * cols;
                for (Py_ssize_t g = 0; g < gc; g++) {
                    Py_ssize_t c1 = (g + 1) * group < cols ? (g + 1) * group : cols;
                    uint16_t top = 0;
                    for (Py_ssize_t c = g * group; c < c1; c++) {
                        uint16_t a = h[c] & 0x7FFFu;
                        top = a > top ? a : top;
                    }
                    key[i + g] = top;
                    for (Py_ssize_t k = 0; k < k_count; k++) row_sc[k * gc + g] = sc[top * k_count + k];
                }
                if (e.is_int)
                    mse_tiles_any((const float *)row, gc, gp, gc, row_sc, row_sc, k_count, 0, exponent, lo, hi, margin,
                                  row_idx, row_out);
                else
                    mse_tiles_fp(&e, (const float *)row, gc, gp, gc, row_sc, row_sc, k_count, 0, exponent, lo, hi,
                                 margin, row_idx, row_out, d);
                for (Py_ssize_t g = 0; g < gc; g++) {
                    idx[i + g] = row_idx[g];
                    for (int j = 0; j < 4; j++) out[j * n + i + g] = row_out[j * gc + g];
                }
            } else if (e.is_int)
                mse_tiles_any((const float *)row, gc, gp, n, sc + i, zs + i, k_count, has_zero, exponent, lo, hi,
                              margin, idx + i, out + i);
            else
                mse_tiles_fp(&e, (const float *)row, gc, gp, n, sc + i, zs + i, k_count, has_zero, exponent, lo, hi,
                             margin, idx + i, out + i, d);
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad != 0);
    }
done:
    free(row); free(raw); free(d); free(row_sc); free(row_out); free(row_idx);
    PyBuffer_Release(&src); PyBuffer_Release(&scales); PyBuffer_Release(&zeros); PyBuffer_Release(&index);
    PyBuffer_Release(&sums); PyBuffer_Release(&keys);
    return result;
}

/* The microscale search of one chunk of CHUNK groups, transposed so that the groups run side by side (lanes
   of vectors): |element c| of group j at ax[c * CHUNK + j] (float32; axd: the same in float64). For every
   candidate code of each group, the sum over the group's elements, in order, of (float64(value(y) * d) - x)^2
   with y = x / d (divide) or x * reciprocal, clamped to +-qmax (observers.microscale_errors). Computed on
   magnitudes: d > 0, so y, value(y) and value(y) * d are x's sign times those of |x| (IEEE rounding is
   symmetric), and the square of the difference is the same. Each group's sum stays sequential in its own
   lane, so it is the reference's float64 sum bit for bit. `divide` is a constant at each call, so each
   variant is compiled branch free. 32 groups, and the candidates after the first two at a time over the same
   elements: the float64 sums of eight AVX-512 registers per element step, independent chains that hide the
   additions' latency (NVFP4 search 1.4x faster than 16 groups one candidate at a time; 64 groups: slower; a
   pair is decided in order, as one at a time; bench/RESULTS.md). */
#define CHUNK 32
/* Candidate k's divisors (reciprocals) of the chunk's groups. */
HOT void micro_candidate(const int32_t *first, int32_t step, int low, int high, const float *div_table,
                         const float *rcp_table, float *restrict d, float *restrict r)
{
    for (int j = 0; j < CHUNK; j++) {
        int32_t code = first[j] + step;
        code = code < low ? low : code;
        code = code > high ? high : code;
        d[j] = div_table[code];
        r[j] = rcp_table[code];
    }
}

/* One element's squared error under divisor d (reciprocal r where not `divide`): what a group's sum adds. */
HOT double micro_term(float x, double xd, float d, float r, const int divide, FloatFormat ff, uint32_t qbits)
{
    uint32_t yb = bits_of(divide ? x / d : x * r), code;
    yb = yb < qbits ? yb : qbits; /* magnitudes order like their bit patterns */
    double diff = (double)(fp_magnitude(float_of(yb), ff, &code) * d) - xd;
    return diff * diff;
}

HOT void micro_search_chunk(const float *restrict ax, const double *restrict axd, Py_ssize_t group,
                            const int32_t *first, const int32_t *steps, Py_ssize_t k_count, int low, int high,
                            const float *div_table, const float *rcp_table, const int divide, FloatFormat ff,
                            uint32_t qbits, double keep, uint8_t *restrict codes, double *restrict best,
                            double *restrict minmax)
{
    double chosen[CHUNK]; /* the index of each group's best candidate so far (a double: the lanes of best's) */
    {
        float d[CHUNK], r[CHUNK];
        double acc[CHUNK];
        micro_candidate(first, steps[0], low, high, div_table, rcp_table, d, r);
        for (int j = 0; j < CHUNK; j++) acc[j] = 0.0;
        for (Py_ssize_t c = 0; c < group; c++) {
            const float *x = ax + c * CHUNK;
            const double *xd = axd + c * CHUNK;
            for (int j = 0; j < CHUNK; j++) acc[j] += micro_term(x[j], xd[j], d[j], r[j], divide, ff, qbits);
        }
        for (int j = 0; j < CHUNK; j++) {
            best[j] = minmax[j] = acc[j];
            chosen[j] = 0.0;
        }
    }
    /* Later candidates two at a time (sharing the loads), then decided in order, as one at a time. */
    for (Py_ssize_t k = 1; k < k_count; k += 2) {
        const Py_ssize_t k2 = k + 1 < k_count ? k + 1 : k;
        float d[CHUNK], r[CHUNK], d2[CHUNK], r2[CHUNK];
        double acc[CHUNK], acc2[CHUNK];
        micro_candidate(first, steps[k], low, high, div_table, rcp_table, d, r);
        micro_candidate(first, steps[k2], low, high, div_table, rcp_table, d2, r2);
        for (int j = 0; j < CHUNK; j++) acc[j] = acc2[j] = 0.0;
        for (Py_ssize_t c = 0; c < group; c++) {
            const float *x = ax + c * CHUNK;
            const double *xd = axd + c * CHUNK;
            for (int j = 0; j < CHUNK; j++) {
                acc[j] += micro_term(x[j], xd[j], d[j], r[j], divide, ff, qbits);
                acc2[j] += micro_term(x[j], xd[j], d2[j], r2[j], divide, ff, qbits);
            }
        }
        const double kk = (double)k, kk2 = (double)k2;
        for (int j = 0; j < CHUNK; j++) {
            int better = acc[j] < best[j] * keep;
            best[j] = better ? acc[j] : best[j];
            chosen[j] = better ? kk : chosen[j];
            better = k2 != k && acc2[j] < best[j] * keep;
            best[j] = better ? acc2[j] : best[j];
            chosen[j] = better ? kk2 : chosen[j];
        }
    }
    for (int j = 0; j < CHUNK; j++) {
        int code = (int)first[j] + steps[(int)chosen[j]];
        code = code < low ? low : code;
        codes[j] = (uint8_t)(code > high ? high : code);
    }
}

/* micro_search(src, kind, n, group, first, steps, low, high, div_table, rcp_table, divide, mbits, bias, qmax,
   margin, codes, error, minmax_error, has_rule, global, gs, elem_max, scale_mbits, scale_bias, scale_max,
   zero_scale, emax) -> nonfinite
   src: n consecutive groups of `group` elements (bf16 / float32 / fp16, as the other kernels'); first: uint8
   [n] min-max scale codes, or, with has_rule, not read: each group's min-max code is made here from its amax
   by micro_scales' rule (the following arguments, as micro_scales'), in the pass that reads the group for the
   search (the weight is then read once instead of twice); steps: int32 [k_count], steps[0] = 0; candidate k of group i is the code
   clamp(first[i] + steps[k], low, high), whose divisor (and reciprocal, for MX's multiplication) is
   div_table[code] (rcp_table[code]), float32 [256]. Per group the candidate with the smallest squared error
   (a later one wins only when smaller by more than the relative margin; observers.mse_microscale):
   codes uint8 [n], its error and candidate 0's, float64 [n]. */
SEARCH_CLONES static PyObject *micro_search(PyObject *self, PyObject *args)
{
    Py_buffer src, first, steps, div_table, rcp_table, codes, error, minmax_error;
    Py_ssize_t n, group;
    int kind, low, high, divide, mbits, bias, has_rule, global, scale_mbits, scale_bias, emax;
    float qmax, gs, elem_max, scale_max, zero_scale;
    double margin;
    if (!PyArg_ParseTuple(args, "y*inny*y*iiy*y*piifdw*w*w*pp" "ffiiffi", &src, &kind, &n, &group, &first, &steps,
                          &low, &high, &div_table, &rcp_table, &divide, &mbits, &bias, &qmax, &margin, &codes, &error,
                          &minmax_error, &has_rule, &global, &gs, &elem_max, &scale_mbits, &scale_bias, &scale_max,
                          &zero_scale, &emax))
        return NULL;
    PyObject *result = NULL;
    uint32_t *raw = NULL;
    float *xt = NULL;
    double *xd = NULL;
    Encoding e;
    ScaleRule rule;
    const Py_ssize_t k_count = steps.len / 4;
    if (!encoding_of(mbits, bias, -qmax, qmax, &e)) goto done;
    if (has_rule
        && !scale_rule_of(global, kind, gs, elem_max, scale_mbits, scale_bias, scale_max, zero_scale, emax, &rule))
        goto done;
    if (e.is_int || n < 0 || group < 1 || k_count < 1 || low < 0 || high > 255 || low > high
        || ((const int32_t *)steps.buf)[0] != 0) {
        PyErr_SetString(PyExc_ValueError, "micro_search: bad arguments");
        goto done;
    }
    if (!need(&src, n * group * src_itemsize(kind), "src") || (!has_rule && !need(&first, n, "first"))
        || !need(&div_table, 256 * 4, "div_table") || !need(&rcp_table, 256 * 4, "rcp_table")
        || !need(&codes, n, "codes") || !need(&error, n * 8, "error") || !need(&minmax_error, n * 8, "minmax_error"))
        goto done;
    raw = malloc((size_t)(CHUNK * group) * 4);
    xt = malloc((size_t)(CHUNK * group) * 4);
    xd = malloc((size_t)(CHUNK * group) * 8);
    if (!raw || !xt || !xd) { PyErr_NoMemory(); goto done; }
    {
        const uint8_t *fc = first.buf;
        const int32_t *st = steps.buf;
        const float *dt = div_table.buf, *rt = rcp_table.buf;
        uint8_t *out = codes.buf;
        double *err = error.buf, *mm = minmax_error.buf;
        const FloatFormat ff = e.ff;
        const uint32_t qbits = bits_of(qmax);
        const double keep = 1.0 - margin;
        int bad = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t g0 = 0; g0 < n; g0 += CHUNK) {
            /* A last chunk of fewer groups is padded with all-zero groups at code `low` (results dropped). */
            Py_ssize_t width = n - g0 < CHUNK ? n - g0 : CHUNK;
            int32_t fpad[CHUNK];
            uint8_t cpad[CHUNK];
            double bpad[CHUNK], mpad[CHUNK];
            load_row(src.buf, kind, n * group, 0, g0 * group, width * group, raw);
            if (width < CHUNK) memset(raw + width * group, 0, (size_t)((CHUNK - width) * group) * 4);
            uint32_t nonfinite = 0, top[CHUNK];
            for (Py_ssize_t j = 0; j < CHUNK; j++) {
                fpad[j] = j < width && !has_rule ? (int32_t)fc[g0 + j] : low;
                top[j] = 0;
            }
            for (Py_ssize_t c = 0; c < group; c++)
                for (int j = 0; j < CHUNK; j++) {
                    uint32_t b = raw[j * group + c] & 0x7FFFFFFFu;
                    nonfinite |= b >= 0x7F800000u;
                    top[j] = b > top[j] ? b : top[j]; /* magnitudes order like their bit patterns */
                    xt[c * CHUNK + j] = float_of(b);
                }
            for (Py_ssize_t i = 0; i < CHUNK * group; i++) xd[i] = (double)xt[i];
            if (nonfinite) { bad = 1; break; }
            if (has_rule)
                for (Py_ssize_t j = 0; j < width; j++) {
                    float unused_div, unused_fac;
                    fpad[j] = micro_scale(float_of(top[j]), &rule, &unused_div, &unused_fac);
                }
            if (divide)
                micro_search_chunk(xt, xd, group, fpad, st, k_count, low, high, dt, rt, 1, ff, qbits, keep, cpad,
                                   bpad, mpad);
            else
                micro_search_chunk(xt, xd, group, fpad, st, k_count, low, high, dt, rt, 0, ff, qbits, keep, cpad,
                                   bpad, mpad);
            for (Py_ssize_t j = 0; j < width; j++) {
                out[g0 + j] = cpad[j];
                err[g0 + j] = bpad[j];
                mm[g0 + j] = mpad[j];
            }
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad);
    }
done:
    free(raw); free(xt); free(xd);
    PyBuffer_Release(&src); PyBuffer_Release(&first); PyBuffer_Release(&steps); PyBuffer_Release(&div_table);
    PyBuffer_Release(&rcp_table); PyBuffer_Release(&codes); PyBuffer_Release(&error); PyBuffer_Release(&minmax_error);
    return result;
}

/* ---- packing ------------------------------------------------------------------------------------- */

/* pack_fields(codes, rows, cols, bits, out): integer codes (int8 [rows, cols], two's complement) into
   compressed-tensors' pack-quantized bytes: field = code + 2^(bits-1) as an unsigned byte, 8 / bits fields
   a byte, the first in the low bits; out uint8 [rows, row_bytes], its bytes past the last field zero
   (integer.pack_int32, byte for byte, also for codes out of range). */
CLONES static PyObject *pack_fields(PyObject *self, PyObject *args)
{
    Py_buffer codes, out;
    Py_ssize_t rows, cols, row_bytes;
    int bits;
    if (!PyArg_ParseTuple(args, "y*nninw*", &codes, &rows, &cols, &bits, &row_bytes, &out))
        return NULL;
    PyObject *result = NULL;
    const int per = bits > 0 && bits <= 8 && 8 % bits == 0 ? 8 / bits : 0;
    if (!per || rows < 0 || cols < 0 || row_bytes * per < cols) {
        PyErr_SetString(PyExc_ValueError, "pack_fields: bad shape or bits");
        goto done;
    }
    if (!need(&codes, rows * cols, "codes") || !need(&out, rows * row_bytes, "out")) goto done;
    {
        const uint8_t *cd = codes.buf;
        uint8_t *dst = out.buf;
        const uint8_t offset = (uint8_t)(1u << (bits - 1));
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint8_t *restrict c = cd + r * cols;
            uint8_t *restrict o = dst + r * row_bytes;
            Py_ssize_t k = 0;
            if (per == 2) {
                const Py_ssize_t pairs = cols / 2;
                for (; k < pairs; k++) {
                    uint8_t lo = (uint8_t)(c[2 * k] + offset), hi = (uint8_t)(c[2 * k + 1] + offset);
                    o[k] = (uint8_t)(lo | (uint8_t)(hi << 4));
                }
            }
            for (; k < row_bytes; k++) {
                uint8_t byte = 0;
                for (int j = 0; j < per; j++) {
                    Py_ssize_t i = k * per + j;
                    if (i < cols) byte |= (uint8_t)((uint8_t)(c[i] + offset) << (j * bits));
                }
                o[k] = byte;
            }
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&codes); PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"tile_range", tile_range, METH_VARARGS, "per tile max |x| (or min and max) of a bf16/fp16/float32 source"},
    {"quantize", quantize, METH_VARARGS, "codes and error statistics of a source under given scales"},
    {"micro_encode", micro_encode, METH_VARARGS, "NVFP4 / MX element codes"},
    {"micro_stats", micro_stats, METH_VARARGS, "error statistics of NVFP4 / MX codes"},
    {"micro_encode_stats", micro_encode_stats, METH_VARARGS, "NVFP4 / MX codes and their statistics in one pass"},
    {"micro_scales", micro_scales, METH_VARARGS, "min-max NVFP4 / MX group scale codes"},
    {"micro_quantize", micro_quantize, METH_VARARGS, "min-max NVFP4 / MX scales, codes and statistics in one pass"},
    {"dequantize", dequantize, METH_VARARGS, "(code value - zero point) * scale, to float32 or bf16"},
    {"micro_dequantize", micro_dequantize, METH_VARARGS, "NVFP4 / MX values times their group's divisor"},
    {"mse_search", mse_search, METH_VARARGS, "the mse observer's candidate evaluation"},
    {"micro_search", micro_search, METH_VARARGS, "the microscale observers' per-group search of scale codes"},
    {"pack_fields", pack_fields, METH_VARARGS, "integer codes packed as compressed-tensors' pack-quantized bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "fp8conv's compiled kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    /* native.ABI must match: raise both when a function is added, removed or changes its arguments, so that a
       build left from an older source is not called. */
    if (m && PyModule_AddIntConstant(m, "ABI", 10) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
