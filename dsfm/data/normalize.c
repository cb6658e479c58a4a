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
 * `dsfm_read_windows` does a reader's whole batch in one call: each window's positioned reads
 * straight into its place (for a CPU trainer, a scalar field's time steps scattered over their
 * slices of the batch by one preadv), then its normalization, so the per-window work costs no
 * Python.
 *
 * Built by dsfm/data/native.py with the system C compiler on first use; dsfm falls back to
 * NumPy when that is not possible.
 */
#define _GNU_SOURCE             /* preadv */
#define _FILE_OFFSET_BITS 64    /* 64-bit file offsets on 32-bit systems too */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

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

/* One destination range of a read: `bytes` bytes at `offset` from base `base` of the window
   (for a CPU trainer: 0 its row of x, 1 its row of y, 2 the staging buffer). */
typedef struct {
    int64_t offset;
    int64_t bytes;
    int32_t base;
    int32_t pad;
} dsfm_piece;

/* One positioned read: consecutive bytes of the file from `file_offset`, into pieces
   first .. first + n - 1 in turn. */
typedef struct {
    int64_t file_offset;
    int32_t fd;
    int32_t first;
    int32_t n;
    int32_t pad;
} dsfm_read;

#define DSFM_MAX_PIECES 1024    /* Linux's IOV_MAX */
#define DSFM_MAX_BASES 64

/* 0, or errno, or -1 when the file ends first. Short reads (signals, reads over 2 GB) go on
   where they stopped. */
static int read_one(const dsfm_read *r, const dsfm_piece *pieces, int64_t n_pieces,
                    char *const *bases, int32_t n_bases)
{
    struct iovec v[DSFM_MAX_PIECES], *cur = v;
    int n = r->n;
    int64_t want = 0;
    off_t at = (off_t)r->file_offset;
    if (n < 1 || n > DSFM_MAX_PIECES || r->first < 0 || r->first > n_pieces - n ||
            r->file_offset < 0)
        return EINVAL;
    for (int i = 0; i < n; i++) {
        const dsfm_piece *p = pieces + r->first + i;
        if (p->base < 0 || p->base >= n_bases || p->offset < 0 || p->bytes < 0)
            return EINVAL;
        if (p->bytes > INT64_MAX - want)        /* a total no read can have: not UB */
            return EINVAL;
        v[i].iov_base = bases[p->base] + p->offset;
        v[i].iov_len = (size_t)p->bytes;
        want += p->bytes;
    }
    while (want > 0) {
        ssize_t got = preadv(r->fd, cur, n, at);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (got == 0)
            return -1;
        want -= got;
        at += got;
        while (got > 0) {               /* skip the filled buffers, trim the one in progress */
            if ((size_t)got >= cur->iov_len) {
                got -= (ssize_t)cur->iov_len;
                cur++;
                n--;
            } else {
                cur->iov_base = (char *)cur->iov_base + got;
                cur->iov_len -= (size_t)got;
                got = 0;
            }
        }
    }
    return 0;
}

/* A reader's batch of `n_windows` windows. Window b has `n_bases` bases, base i at
   starts[i] + b * steps[i] (a step of 0: a buffer all windows share); it is read by
   reads[b * reads_per_window ...] into pieces (of `n_pieces`) relative to those bases, and
   right after its read k, planes[plane_first[k] .. plane_first[k + 1]) (of `n_planes`, on
   bases 0, 1 and 2 as in dsfm_normalize_planes) are normalized: each block of a window while
   it is in cache, however large the window. Returns the index of the first window that
   failed, or n_windows: status[0] is 1 when its results are not all finite (only with
   check_finite), 2 when a read failed, with status[1] the errno (-1: the file ended first;
   EINVAL: tables that do not fit together). */
int64_t dsfm_read_windows(const dsfm_read *reads, int64_t reads_per_window,
                          const dsfm_piece *pieces, int64_t n_pieces,
                          char *const *starts, const int64_t *steps,
                          int32_t n_bases, int64_t n_windows, const dsfm_plane *planes,
                          const int64_t *plane_first, int64_t n_planes, int64_t plane_floats,
                          const float *shift, const float *scale, int32_t check_finite,
                          int32_t *status)
{
    char *bases[DSFM_MAX_BASES];
    int ok = reads_per_window >= 0 && n_bases >= 0 && n_bases <= DSFM_MAX_BASES &&
             (n_planes == 0 || n_bases >= 3) && plane_first[0] == 0 &&
             plane_first[reads_per_window] == n_planes;     /* every plane, after some read */
    for (int64_t k = 0; ok && k < reads_per_window; k++)
        ok = plane_first[k] <= plane_first[k + 1];
    /* planes use this call's bases only (bases[n_bases..] are never set), with offsets and
       strides that cannot go backwards; their extents and channels are the caller's to
       check, as the pieces' extents are */
    for (int64_t q = 0; ok && q < n_planes; q++) {
        const dsfm_plane *p = planes + q;
        ok = p->dst_base >= 0 && p->dst_base < n_bases && p->src_base >= 0 &&
             p->src_base < n_bases && p->dst >= 0 && p->src >= 0 && p->stride >= 1 &&
             p->channel >= 0;
    }
    ok = ok && plane_floats >= 0;
    status[0] = status[1] = 0;
    if (!ok) {
        status[0] = 2;
        status[1] = EINVAL;
        return 0;
    }
    for (int64_t b = 0; b < n_windows; b++) {
        int bad = 0;
        for (int32_t i = 0; i < n_bases; i++)
            bases[i] = starts[i] + b * steps[i];
        for (int64_t k = 0; k < reads_per_window; k++) {
            int e = read_one(reads + b * reads_per_window + k, pieces, n_pieces, bases,
                             n_bases);
            if (e != 0) {
                status[0] = 2;
                status[1] = e;
                return b;
            }
            if (plane_first[k + 1] > plane_first[k])
                bad |= dsfm_normalize_planes(bases, planes + plane_first[k],
                                             plane_first[k + 1] - plane_first[k], plane_floats,
                                             shift, scale);
        }
        if (bad && check_finite) {
            status[0] = 1;
            return b;
        }
    }
    return n_windows;
}
