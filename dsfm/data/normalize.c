/* dsfm: the CPU trainer's fused normalization, run by the prefetcher's reader processes.
 *
 * A window read into its place in the assembled batch [T, C, *spatial] is normalized plane by
 * plane (one time step of one channel, `plane_floats` floats) while it is still in cache:
 *
 *     out = (in - shift[channel]) / scale[channel]
 *
 * with exactly the float32 operations NumPy performs for the same expression (a subtraction
 * rounded to float32, then a correctly rounded division; built without fast-math and without
 * FMA contraction), so batches stay bit-identical to the NumPy path and to upstream's reader.
 * The same pass tells whether every result is finite, which the NumPy path needs a third pass
 * (and a temporary array) for.
 *
 * `in` is the plane itself (a scalar field read straight into place), or every `stride`-th
 * float of a staging buffer: a field stored with its components last, e.g. a velocity
 * [T, *spatial, 2], so taking its components apart costs no pass of its own.
 *
 * Built by dsfm/data/native.py with the system C compiler on first use; dsfm falls back to
 * NumPy when that is not possible.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(DSFM_NO_CLONES)
/* one object code per vector width, chosen when the library is loaded: a build cached in a
   shared home directory stays correct and fast on every node of a heterogeneous cluster */
#define DSFM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSFM_CLONES
#endif

#define EXPONENT 0x7f800000u    /* all ones in the exponent: Inf or NaN */

typedef struct {
    int64_t dst;        /* byte offset of the output plane from bases[dst_base] */
    int64_t src;        /* byte offset of its first input float from bases[src_base] */
    int32_t dst_base;
    int32_t src_base;
    int32_t stride;     /* floats from one input element to the next (1: the plane itself) */
    int32_t channel;    /* index into shift and scale */
} dsfm_plane;

static inline uint32_t exponent_bits(float v)
{
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b & EXPONENT;
}

/* One result, whose exponent field is folded into *top: after a plane, *top is EXPONENT if and
   only if some result is Inf or NaN. Inlined into each loop below, which the compiler vectorizes
   (top becomes a vector maximum). */
static inline float normalize_one(float x, float shift, float scale, uint32_t *top)
{
    float v = (x - shift) / scale;
    uint32_t e = exponent_bits(v);
    *top = e > *top ? e : *top;
    return v;
}

DSFM_CLONES
static uint32_t plane_in_place(float *p, int64_t n, float shift, float scale)
{
    uint32_t top = 0;
    for (int64_t i = 0; i < n; i++)
        p[i] = normalize_one(p[i], shift, scale, &top);
    return top;
}

DSFM_CLONES
static uint32_t plane_from_pairs(float *restrict out, const float *restrict in, int64_t n,
                                 float shift, float scale)
{
    uint32_t top = 0;
    for (int64_t i = 0; i < n; i++)
        out[i] = normalize_one(in[2 * i], shift, scale, &top);
    return top;
}

DSFM_CLONES
static uint32_t plane_from_strided(float *restrict out, const float *restrict in, int64_t n,
                                   int64_t stride, float shift, float scale)
{
    uint32_t top = 0;
    for (int64_t i = 0; i < n; i++)
        out[i] = normalize_one(in[stride * i], shift, scale, &top);
    return top;
}

/* Normalize `n_planes` planes of `plane_floats` floats each; returns 1 if any result is not
   finite, else 0. An in-place plane has the same base and offset for input and output. */
int dsfm_normalize_planes(char *const *bases, const dsfm_plane *planes, int64_t n_planes,
                          int64_t plane_floats, const float *shift, const float *scale)
{
    uint32_t top = 0;
    for (int64_t q = 0; q < n_planes; q++) {
        const dsfm_plane *p = planes + q;
        float *out = (float *)(bases[p->dst_base] + p->dst);
        const float *in = (const float *)(bases[p->src_base] + p->src);
        float m = shift[p->channel], s = scale[p->channel];
        uint32_t e;
        if (p->stride == 1 && (const float *)out == in)
            e = plane_in_place(out, plane_floats, m, s);
        else if (p->stride == 2)
            e = plane_from_pairs(out, in, plane_floats, m, s);
        else
            e = plane_from_strided(out, in, plane_floats, p->stride, m, s);
        top = e > top ? e : top;
    }
    return top == EXPONENT;
}
