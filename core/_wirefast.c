/* Optional C fast path for spikevaediff.core.wire.decode (CPython C API only).
 *
 * parse(frames, params) recognises a well-formed message and returns its parts, or None.
 * None means "not sure": the caller then runs the pure-Python decode, which is the
 * reference and produces the precise WireError reason. So this file only has to be
 * right about what it ACCEPTS: every rule of docs/PROTOCOL.md section 5 is checked here
 * too, and anything unusual (an int where a float is usual, duplicate map keys, ext
 * types, bytes keys, odd buffers, non-finite numbers...) is simply handed back.
 *
 * The accepted message comes back as
 *   (kind_index, stream, seq, bin, t0, t1, stamps, wall_ns, meta, ((name, dtype, shape), ...))
 * with the same Python values msgpack.unpackb(raw=False) would have produced; the caller
 * builds the numpy views of the payload frames (already checked finite here).
 *
 * The kinds and their array rules come from Python (configure), so ARRAY_RULES in
 * wire_schema.py stays the one place they are written down.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_FRAMES 64   /* more frames than this: not our job (the caller's limit is 10) */
#define MAX_NDIM 32
#define MAX_KINDS 16
#define MAX_RULES 8
#define INT63 ((uint64_t)1 << 63)

/* ------------------------------------------------------------ dtypes (wire strings) */

typedef struct { const char *code; int itemsize; int is_float; } DType;

static const DType DTYPES[] = {
    {"|b1", 1, 0}, {"|u1", 1, 0}, {"|i1", 1, 0}, {"<u2", 2, 0}, {"<i2", 2, 0}, {"<u4", 4, 0},
    {"<i4", 4, 0}, {"<i8", 8, 0}, {"<f2", 2, 1}, {"<f4", 4, 1}, {"<f8", 8, 1},
};
#define N_DTYPES ((int)(sizeof(DTYPES) / sizeof(DTYPES[0])))
static PyObject *dtype_names[N_DTYPES];

static const char *const HEADER_KEYS[] = {
    "v", "kind", "stream", "seq", "bin", "t0", "t1", "stamps", "wall_ns", "meta", "arrays",
};
enum { K_V, K_KIND, K_STREAM, K_SEQ, K_BIN, K_T0, K_T1, K_STAMPS, K_WALL, K_META, K_ARRAYS, N_KEYS };

/* ------------------------------------------------------------ rules set by configure() */

typedef struct {
    char name[33];
    Py_ssize_t name_len;
    int ndim;
    unsigned dtype_mask;  /* bit per DTYPES index; all bits when any dtype goes */
    int required;
    long long last_dim;   /* -1: any */
} Rule;

typedef struct {
    char value[64];
    Py_ssize_t value_len;
    int n_rules;
    Rule rules[MAX_RULES];
} KindRules;

static long long schema_version = -1;
static int n_kinds = 0;
static int status_kind = -1;
static KindRules kinds[MAX_KINDS];

/* ------------------------------------------------------------ msgpack reading */

typedef struct { const unsigned char *p, *end; } Reader;

typedef struct { Py_ssize_t max_frames, max_header, max_payload, max_ndim, max_topic,
                 max_stamps, max_items, max_depth; } Params;

static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}
static inline int avail(const Reader *r, size_t n) { return (size_t)(r->end - r->p) >= n; }

/* An integer of any msgpack width. *big: an unsigned value above INT64_MAX (in *u). */
static int read_int(Reader *r, int64_t *v, uint64_t *u, int *big) {
    if (!avail(r, 1)) return 0;
    unsigned char b = *r->p;
    *big = 0;
    if (b <= 0x7f) { *v = b; r->p += 1; return 1; }
    if (b >= 0xe0) { *v = (int8_t)b; r->p += 1; return 1; }
    switch (b) {
    case 0xcc: if (!avail(r, 2)) return 0; *v = r->p[1]; r->p += 2; return 1;
    case 0xcd: if (!avail(r, 3)) return 0; *v = be16(r->p + 1); r->p += 3; return 1;
    case 0xce: if (!avail(r, 5)) return 0; *v = be32(r->p + 1); r->p += 5; return 1;
    case 0xcf: {
        if (!avail(r, 9)) return 0;
        uint64_t x = be64(r->p + 1);
        r->p += 9;
        if (x >= INT63) { *big = 1; *u = x; } else { *v = (int64_t)x; }
        return 1;
    }
    case 0xd0: if (!avail(r, 2)) return 0; *v = (int8_t)r->p[1]; r->p += 2; return 1;
    case 0xd1: if (!avail(r, 3)) return 0; *v = (int16_t)be16(r->p + 1); r->p += 3; return 1;
    case 0xd2: if (!avail(r, 5)) return 0; *v = (int32_t)be32(r->p + 1); r->p += 5; return 1;
    case 0xd3: if (!avail(r, 9)) return 0; *v = (int64_t)be64(r->p + 1); r->p += 9; return 1;
    default: return 0;
    }
}

/* A float32 or float64 (msgpack float32 becomes the same Python float as unpackb's). */
static int read_float(Reader *r, double *out) {
    if (!avail(r, 1)) return 0;
    if (*r->p == 0xcb) {
        if (!avail(r, 9)) return 0;
        uint64_t bits = be64(r->p + 1);
        memcpy(out, &bits, 8);
        r->p += 9;
        return 1;
    }
    if (*r->p == 0xca) {
        if (!avail(r, 5)) return 0;
        uint32_t bits = be32(r->p + 1);
        float f;
        memcpy(&f, &bits, 4);
        *out = (double)f;
        r->p += 5;
        return 1;
    }
    return 0;
}

static int read_str(Reader *r, const char **s, Py_ssize_t *n) {
    if (!avail(r, 1)) return 0;
    unsigned char b = *r->p;
    size_t len, skip;
    if ((b & 0xe0) == 0xa0) { len = b & 0x1f; skip = 1; }
    else if (b == 0xd9) { if (!avail(r, 2)) return 0; len = r->p[1]; skip = 2; }
    else if (b == 0xda) { if (!avail(r, 3)) return 0; len = be16(r->p + 1); skip = 3; }
    else if (b == 0xdb) { if (!avail(r, 5)) return 0; len = be32(r->p + 1); skip = 5; }
    else return 0;
    if (!avail(r, skip + len)) return 0;
    *s = (const char *)r->p + skip;
    *n = (Py_ssize_t)len;
    r->p += skip + len;
    return 1;
}

static int read_array_len(Reader *r, size_t *n) {
    if (!avail(r, 1)) return 0;
    unsigned char b = *r->p;
    if ((b & 0xf0) == 0x90) { *n = b & 0x0f; r->p += 1; return 1; }
    if (b == 0xdc && avail(r, 3)) { *n = be16(r->p + 1); r->p += 3; return 1; }
    if (b == 0xdd && avail(r, 5)) { *n = be32(r->p + 1); r->p += 5; return 1; }
    return 0;
}

static int read_map_len(Reader *r, size_t *n) {
    if (!avail(r, 1)) return 0;
    unsigned char b = *r->p;
    if ((b & 0xf0) == 0x80) { *n = b & 0x0f; r->p += 1; return 1; }
    if (b == 0xde && avail(r, 3)) { *n = be16(r->p + 1); r->p += 3; return 1; }
    if (b == 0xdf && avail(r, 5)) { *n = be32(r->p + 1); r->p += 5; return 1; }
    return 0;
}

/* A str as unpackb(raw=False) decodes it: strict UTF-8. NULL (error cleared) when invalid. */
static PyObject *make_str(const char *s, Py_ssize_t n) {
    PyObject *out = PyUnicode_DecodeUTF8(s, n, NULL);
    if (out == NULL) PyErr_Clear();
    return out;
}

static int valid_chars(const char *s, Py_ssize_t n, Py_ssize_t max_len, int stream) {
    if (n < 1 || n > max_len) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'
                 || (stream && (c == '.' || c == ':' || c == '-'));
        if (!ok) return 0;
    }
    return 1;
}
#define valid_name(s, n) valid_chars(s, n, 32, 0)     /* [A-Za-z0-9_]{1,32} */
#define valid_stream(s, n) valid_chars(s, n, 64, 1)   /* [A-Za-z0-9_.:-]{1,64} */

/* A meta value at `depth`, under the rules of wire._check_meta; NULL: hand back. */
static PyObject *read_meta(Reader *r, Py_ssize_t depth, const Params *pr) {
    if (depth > pr->max_depth || !avail(r, 1)) return NULL;
    unsigned char b = *r->p;
    if (b == 0xc0) { r->p += 1; Py_RETURN_NONE; }
    if (b == 0xc2) { r->p += 1; Py_RETURN_FALSE; }
    if (b == 0xc3) { r->p += 1; Py_RETURN_TRUE; }
    if (b == 0xca || b == 0xcb) {
        double x;
        if (!read_float(r, &x) || !isfinite(x)) return NULL;
        return PyFloat_FromDouble(x);
    }
    if (b <= 0x7f || b >= 0xe0 || (b >= 0xcc && b <= 0xcf) || (b >= 0xd0 && b <= 0xd3)) {
        int64_t v; uint64_t u; int big;
        if (!read_int(r, &v, &u, &big)) return NULL;
        return big ? PyLong_FromUnsignedLongLong(u) : PyLong_FromLongLong(v);
    }
    if ((b & 0xe0) == 0xa0 || b == 0xd9 || b == 0xda || b == 0xdb) {
        const char *s; Py_ssize_t n;
        if (!read_str(r, &s, &n)) return NULL;
        return make_str(s, n);
    }
    size_t n;
    if ((b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd) {
        if (!read_array_len(r, &n) || n > (size_t)pr->max_items) return NULL;
        PyObject *list = PyList_New((Py_ssize_t)n);
        if (list == NULL) { PyErr_Clear(); return NULL; }
        for (size_t i = 0; i < n; i++) {
            PyObject *item = read_meta(r, depth + 1, pr);
            if (item == NULL) { Py_DECREF(list); return NULL; }
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
        return list;
    }
    if ((b & 0xf0) == 0x80 || b == 0xde || b == 0xdf) {
        if (!read_map_len(r, &n) || n > (size_t)pr->max_items) return NULL;
        PyObject *dict = PyDict_New();
        if (dict == NULL) { PyErr_Clear(); return NULL; }
        for (size_t i = 0; i < n; i++) {
            const char *s; Py_ssize_t len;
            PyObject *key, *item;
            if (!read_str(r, &s, &len) || (key = make_str(s, len)) == NULL) { Py_DECREF(dict); return NULL; }
            item = read_meta(r, depth + 1, pr);
            if (item == NULL || PyDict_SetItem(dict, key, item) < 0) {
                PyErr_Clear(); Py_DECREF(key); Py_XDECREF(item); Py_DECREF(dict); return NULL;
            }
            Py_DECREF(key); Py_DECREF(item);
        }
        return dict;
    }
    return NULL;  /* bin, ext, 0xc1 */
}

/* ------------------------------------------------------------ payload finiteness */

/* 1 when every element of a little-endian float payload is finite. A value is inf or NaN
 * when its exponent bits are all ones; adding one unit of exponent to the masked exponent
 * then carries into the element's sign bit, and never beyond it. So one loop over 64-bit
 * words checks 4 halves, 2 singles or 1 double at a time (constants repeated per lane):
 * or-reduced in blocks, no early exit and no comparisons, so the compiler vectorises it
 * (numpy's isfinite().all() makes two passes and a temporary). */
static uint64_t or_block(const unsigned char *data, size_t words, uint64_t mask, uint64_t one) {
    uint64_t acc = 0;
    for (size_t i = 0; i < words; i++) {
        uint64_t x;
        memcpy(&x, data + 8 * i, 8);
        acc |= (x & mask) + one;
    }
    return acc;
}

static int all_finite(const unsigned char *data, size_t nbytes, int itemsize) {
    uint64_t mask, one, sign, tail = 0;
    if (itemsize == 2) { mask = 0x7c007c007c007c00ull; one = 0x0400040004000400ull; sign = 0x8000800080008000ull; }
    else if (itemsize == 4) { mask = 0x7f8000007f800000ull; one = 0x0080000000800000ull; sign = 0x8000000080000000ull; }
    else { mask = 0x7ff0000000000000ull; one = 0x0010000000000000ull; sign = 0x8000000000000000ull; }
    size_t words = nbytes / 8;
    for (size_t done = 0; done < words; done += 8192) {
        size_t block = words - done < 8192 ? words - done : 8192;
        if (or_block(data + 8 * done, block, mask, one) & sign) return 0;
    }
    memcpy(&tail, data + 8 * words, nbytes % 8);  /* the last elements; zero padding is finite */
    return !(((tail & mask) + one) & sign);
}

/* ------------------------------------------------------------ parse */

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    int dtype;
    int ndim;
    long long shape[MAX_NDIM];
} Spec;

static int read_spec(Reader *r, Spec *spec, const Params *pr) {
    size_t n;
    int seen = 0;
    if (!read_map_len(r, &n) || n != 3) return 0;
    for (int k = 0; k < 3; k++) {
        const char *key; Py_ssize_t key_len;
        if (!read_str(r, &key, &key_len)) return 0;
        if (key_len == 4 && memcmp(key, "name", 4) == 0 && !(seen & 1)) {
            seen |= 1;
            if (!read_str(r, &spec->name, &spec->name_len) || !valid_name(spec->name, spec->name_len)) return 0;
        } else if (key_len == 5 && memcmp(key, "dtype", 5) == 0 && !(seen & 2)) {
            const char *s; Py_ssize_t len;
            seen |= 2;
            if (!read_str(r, &s, &len) || len != 3) return 0;
            spec->dtype = -1;
            for (int d = 0; d < N_DTYPES; d++)
                if (memcmp(s, DTYPES[d].code, 3) == 0) spec->dtype = d;
            if (spec->dtype < 0) return 0;
        } else if (key_len == 5 && memcmp(key, "shape", 5) == 0 && !(seen & 4)) {
            size_t ndim;
            seen |= 4;
            if (!read_array_len(r, &ndim) || ndim > (size_t)pr->max_ndim || ndim > MAX_NDIM) return 0;
            spec->ndim = (int)ndim;
            for (size_t i = 0; i < ndim; i++) {
                int64_t v; uint64_t u; int big;
                if (!read_int(r, &v, &u, &big) || big || v < 0) return 0;
                spec->shape[i] = v;
            }
        } else {
            return 0;
        }
    }
    return seen == 7;
}

/* Checks a spec against its frame and the kind's rules; 1 when valid. */
static int check_spec(const Spec *spec, const Py_buffer *frame, const KindRules *kind, const Params *pr) {
    const DType *dtype = &DTYPES[spec->dtype];
    size_t nbytes = (size_t)frame->len, count = 1, expected;
    if ((Py_ssize_t)nbytes > pr->max_payload) return 0;
    for (int i = 0; i < spec->ndim; i++) {
        if (__builtin_mul_overflow(count, (size_t)spec->shape[i], &count)) return 0;
    }
    if (count == 0 && spec->ndim > 1) return 0;  /* zero-size with big dims: numpy may refuse it */
    if (__builtin_mul_overflow(count, (size_t)dtype->itemsize, &expected) || expected != nbytes) return 0;
    for (int i = 0; i < kind->n_rules; i++) {
        const Rule *rule = &kind->rules[i];
        if (rule->name_len != spec->name_len || memcmp(rule->name, spec->name, spec->name_len) != 0) continue;
        if (spec->ndim != rule->ndim) return 0;
        if (rule->last_dim >= 0 && (spec->ndim == 0 || spec->shape[spec->ndim - 1] != rule->last_dim)) return 0;
        if (!(rule->dtype_mask & (1u << spec->dtype))) return 0;
    }
    if (dtype->is_float && nbytes && !all_finite((const unsigned char *)frame->buf, nbytes, dtype->itemsize))
        return 0;
    return 1;
}

static int get_params(PyObject *tuple, Params *pr) {
    Py_ssize_t *fields[] = {&pr->max_frames, &pr->max_header, &pr->max_payload, &pr->max_ndim,
                            &pr->max_topic, &pr->max_stamps, &pr->max_items, &pr->max_depth};
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != 8) return 0;
    for (int i = 0; i < 8; i++) {
        *fields[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, i));
        if (*fields[i] == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        if (*fields[i] < 0) return 0;  /* a nonsense limit: leave it to the Python decode */
    }
    return 1;
}

/* A frame as Python's memoryview(frame) sees it: 1-D unsigned bytes, contiguous. */
static int get_frame(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO) < 0) { PyErr_Clear(); return 0; }
    if (view->ndim != 1 || view->itemsize != 1 || (view->format && strcmp(view->format, "B") != 0)
        || (view->strides && view->len > 1 && view->strides[0] != 1)) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static PyObject *build_specs(const Spec *specs, Py_ssize_t n) {
    PyObject *out = PyTuple_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Spec *spec = &specs[i];
        PyObject *shape = PyTuple_New(spec->ndim), *name, *item;
        if (shape == NULL) { Py_DECREF(out); return NULL; }
        for (int d = 0; d < spec->ndim; d++) {
            PyObject *dim = PyLong_FromLongLong(spec->shape[d]);
            if (dim == NULL) { Py_DECREF(shape); Py_DECREF(out); return NULL; }
            PyTuple_SET_ITEM(shape, d, dim);
        }
        name = PyUnicode_FromStringAndSize(spec->name, spec->name_len);  /* ASCII: checked */
        if (name == NULL) { Py_DECREF(shape); Py_DECREF(out); return NULL; }
        Py_INCREF(dtype_names[spec->dtype]);
        item = PyTuple_Pack(3, name, dtype_names[spec->dtype], shape);
        Py_DECREF(name); Py_DECREF(dtype_names[spec->dtype]); Py_DECREF(shape);
        if (item == NULL) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, i, item);
    }
    return out;
}

/* The header fields, once the whole message is known to be valid. */
typedef struct {
    int kind;
    const char *stream; Py_ssize_t stream_len;
    int64_t seq, bin, wall_ns;
    double t0, t1;
    PyObject *stamps, *meta;
    Spec specs[MAX_FRAMES];
    Py_ssize_t n_specs;
} Header;

static int read_header(Reader *r, Header *h, Py_ssize_t n_payloads, const Params *pr) {
    size_t n;
    unsigned seen = 0;
    if (!read_map_len(r, &n) || n != N_KEYS) return 0;
    for (size_t entry = 0; entry < N_KEYS; entry++) {
        const char *key; Py_ssize_t key_len;
        int k = -1;
        if (!read_str(r, &key, &key_len)) return 0;
        for (int i = 0; i < N_KEYS; i++)
            if ((Py_ssize_t)strlen(HEADER_KEYS[i]) == key_len && memcmp(HEADER_KEYS[i], key, key_len) == 0) k = i;
        if (k < 0 || (seen & (1u << k))) return 0;
        seen |= 1u << k;
        int64_t v; uint64_t u; int big;
        const char *s; Py_ssize_t len;
        switch (k) {
        case K_V:
            if (!read_int(r, &v, &u, &big) || big || v != schema_version) return 0;
            break;
        case K_KIND:
            if (!read_str(r, &s, &len)) return 0;
            h->kind = -1;
            for (int i = 0; i < n_kinds; i++)
                if (kinds[i].value_len == len && memcmp(kinds[i].value, s, len) == 0) h->kind = i;
            if (h->kind < 0) return 0;
            break;
        case K_STREAM:
            if (!read_str(r, &h->stream, &h->stream_len) || !valid_stream(h->stream, h->stream_len)) return 0;
            break;
        case K_SEQ: case K_WALL:
            if (!read_int(r, &v, &u, &big) || big || v < 0) return 0;
            *(k == K_SEQ ? &h->seq : &h->wall_ns) = v;
            break;
        case K_BIN:
            if (!read_int(r, &v, &u, &big) || big || v < -1) return 0;
            h->bin = v;
            break;
        case K_T0: case K_T1: {
            double x;
            if (!read_float(r, &x) || !isfinite(x)) return 0;
            *(k == K_T0 ? &h->t0 : &h->t1) = x;
            break;
        }
        case K_STAMPS:
            if (!read_map_len(r, &n) || n > (size_t)pr->max_stamps || (h->stamps = PyDict_New()) == NULL) return 0;
            for (size_t i = 0; i < n; i++) {
                PyObject *name, *value;
                int failed;
                if (!read_str(r, &s, &len) || !valid_name(s, len) || !read_int(r, &v, &u, &big) || big || v < 0)
                    return 0;
                name = PyUnicode_FromStringAndSize(s, len);  /* ASCII: checked */
                value = PyLong_FromLongLong(v);
                failed = name == NULL || value == NULL || PyDict_SetItem(h->stamps, name, value) < 0;
                Py_XDECREF(name); Py_XDECREF(value);
                if (failed) return 0;
            }
            break;
        case K_META:
            if (!avail(r, 1) || !((*r->p & 0xf0) == 0x80 || *r->p == 0xde || *r->p == 0xdf)) return 0;
            /* wire._check_meta runs only on a non-empty meta (depth 0); an empty one always passes */
            if (*r->p == 0x80) {
                r->p += 1;
                if ((h->meta = PyDict_New()) == NULL) return 0;
            } else if ((h->meta = read_meta(r, 0, pr)) == NULL) {
                return 0;
            }
            break;
        case K_ARRAYS:
            if (!read_array_len(r, &n) || (Py_ssize_t)n != n_payloads) return 0;
            for (size_t i = 0; i < n; i++)
                if (!read_spec(r, &h->specs[i], pr)) return 0;
            h->n_specs = (Py_ssize_t)n;
            break;
        }
    }
    return r->p == r->end && h->t0 <= h->t1;
}

/* Cross-field rules: topic, status state, array rules and payloads, required arrays. */
static int check_message(const Header *h, const Py_buffer *views) {
    const KindRules *kind = &kinds[h->kind];
    const Py_buffer *topic = &views[0];
    if (topic->len != kind->value_len + 1 + h->stream_len
        || memcmp(topic->buf, kind->value, kind->value_len) != 0
        || ((const char *)topic->buf)[kind->value_len] != '/'
        || memcmp((const char *)topic->buf + kind->value_len + 1, h->stream, h->stream_len) != 0)
        return 0;
    if (h->kind == status_kind) {
        PyObject *state = PyDict_GetItemString(h->meta, "state");  /* borrowed */
        if (state == NULL || !PyUnicode_CheckExact(state)) return 0;
    }
    return 1;
}

static int check_arrays(const Header *h, const Py_buffer *views, const Params *pr) {
    const KindRules *kind = &kinds[h->kind];
    for (Py_ssize_t i = 0; i < h->n_specs; i++) {
        const Spec *spec = &h->specs[i];
        for (Py_ssize_t j = 0; j < i; j++)
            if (h->specs[j].name_len == spec->name_len && memcmp(h->specs[j].name, spec->name, spec->name_len) == 0)
                return 0;
        if (!check_spec(spec, &views[i + 2], kind, pr)) return 0;
    }
    for (int i = 0; i < kind->n_rules; i++) {
        const Rule *rule = &kind->rules[i];
        int found = 0;
        if (!rule->required) continue;
        for (Py_ssize_t j = 0; j < h->n_specs; j++)
            if (h->specs[j].name_len == rule->name_len && memcmp(h->specs[j].name, rule->name, rule->name_len) == 0)
                found = 1;
        if (!found) return 0;
    }
    return 1;
}

static PyObject *wf_parse(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Params pr;
    Py_buffer views[MAX_FRAMES];
    Py_ssize_t n_frames, n_views = 0;
    Header h;  /* not zeroed (it is large): read_header sets every field it accepts */
    PyObject *result = NULL;
    h.stamps = h.meta = NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse(frames, params)");
        return NULL;
    }
#if PY_BIG_ENDIAN
    Py_RETURN_NONE;  /* the payload checks read little-endian words */
#endif
    if (n_kinds == 0 || !get_params(args[1], &pr)) Py_RETURN_NONE;
    if (!PyList_CheckExact(args[0]) && !PyTuple_CheckExact(args[0])) Py_RETURN_NONE;
    /* a tuple of the frames: a buffer exporter's code cannot change what we iterate */
    PyObject *frames = PySequence_Tuple(args[0]);
    if (frames == NULL) { PyErr_Clear(); Py_RETURN_NONE; }
    n_frames = PyTuple_GET_SIZE(frames);
    if (n_frames < 2 || n_frames > pr.max_frames || n_frames > MAX_FRAMES) goto done;
    for (; n_views < n_frames; n_views++)
        if (!get_frame(PyTuple_GET_ITEM(frames, n_views), &views[n_views])) goto done;
    if (views[0].len > pr.max_topic || views[1].len > pr.max_header) goto done;

    Reader reader = {(const unsigned char *)views[1].buf, (const unsigned char *)views[1].buf + views[1].len};
    if (!read_header(&reader, &h, n_frames - 2, &pr) || !check_message(&h, views) || !check_arrays(&h, views, &pr))
        goto done;

    PyObject *stream = PyUnicode_FromStringAndSize(h.stream, h.stream_len);  /* ASCII: checked */
    PyObject *specs = build_specs(h.specs, h.n_specs);
    if (stream != NULL && specs != NULL)
        result = Py_BuildValue("(iNLLddOLON)", h.kind, stream, (long long)h.seq, (long long)h.bin,
                               h.t0, h.t1, h.stamps, (long long)h.wall_ns, h.meta, specs);
    else {
        Py_XDECREF(stream);
        Py_XDECREF(specs);
    }
done:
    if (result == NULL) PyErr_Clear();  /* e.g. MemoryError: the Python decode meets it again */
    Py_XDECREF(h.stamps);
    Py_XDECREF(h.meta);
    for (Py_ssize_t i = 0; i < n_views; i++) PyBuffer_Release(&views[i]);
    Py_DECREF(frames);
    if (result == NULL) Py_RETURN_NONE;
    return result;
}

/* ------------------------------------------------------------ encode: the header

 * pack_header(kind, stream, seq, bin, t0, t1, stamps, wall_ns, meta, specs) writes the
 * header map exactly as msgpack.Packer(use_bin_type=True) packs wire.encode's dict (same
 * key order, smallest int and str forms, float64). Only exact built-in types are taken;
 * anything else (numpy scalars, subclasses, ints beyond 64 bits, deep nesting) returns
 * None and wire.encode packs it with msgpack, which converts or refuses it. */

typedef struct { char *buf; size_t len, cap; char small[2048]; } Out;

static int out_reserve(Out *o, size_t extra) {
    if (o->len + extra <= o->cap) return 1;
    size_t cap = o->cap * 2 > o->len + extra ? o->cap * 2 : o->len + extra;
    char *grown = o->buf == o->small ? PyMem_Malloc(cap) : PyMem_Realloc(o->buf, cap);
    if (grown == NULL) return 0;
    if (o->buf == o->small) memcpy(grown, o->small, o->len);
    o->buf = grown;
    o->cap = cap;
    return 1;
}

static int put(Out *o, const void *data, size_t n) {
    if (!out_reserve(o, n)) return 0;
    memcpy(o->buf + o->len, data, n);
    o->len += n;
    return 1;
}

static int put_tagged(Out *o, unsigned char tag, uint64_t value, int bytes) {
    unsigned char b[9];
    b[0] = tag;
    for (int i = 0; i < bytes; i++) b[1 + i] = (unsigned char)(value >> (8 * (bytes - 1 - i)));
    return put(o, b, 1 + bytes);
}

static int put_ll(Out *o, long long v) {
    if (v < -(1LL << 5)) {
        if (v < -(1LL << 31)) return put_tagged(o, 0xd3, (uint64_t)v, 8);
        if (v < -(1LL << 15)) return put_tagged(o, 0xd2, (uint64_t)v, 4);
        if (v < -(1LL << 7)) return put_tagged(o, 0xd1, (uint64_t)v, 2);
        return put_tagged(o, 0xd0, (uint64_t)v, 1);
    }
    if (v < (1LL << 7)) { unsigned char b = (unsigned char)v; return put(o, &b, 1); }
    if (v < (1LL << 8)) return put_tagged(o, 0xcc, (uint64_t)v, 1);
    if (v < (1LL << 16)) return put_tagged(o, 0xcd, (uint64_t)v, 2);
    if (v < (1LL << 32)) return put_tagged(o, 0xce, (uint64_t)v, 4);
    return put_tagged(o, 0xcf, (uint64_t)v, 8);
}

static int put_int(Out *o, PyObject *obj) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    if (overflow > 0) {  /* 2**63 <= v < 2**64 still fits msgpack's uint64 */
        unsigned long long u = PyLong_AsUnsignedLongLong(obj);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        return put_tagged(o, 0xcf, u, 8);
    }
    return overflow == 0 && put_ll(o, v);
}

static int put_float(Out *o, double x) {
    uint64_t bits;
    memcpy(&bits, &x, 8);
    return put_tagged(o, 0xcb, bits, 8);
}

static int put_len(Out *o, size_t n, unsigned char fix, size_t fix_max, unsigned char t8,
                   unsigned char t16, unsigned char t32) {
    if (n <= fix_max) { unsigned char b = (unsigned char)(fix | n); return put(o, &b, 1); }
    if (t8 && n < 256) return put_tagged(o, t8, n, 1);
    if (n < 65536) return put_tagged(o, t16, n, 2);
    if (n <= 0xffffffffu) return put_tagged(o, t32, n, 4);
    return 0;
}

static int put_str(Out *o, PyObject *obj) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(obj, &n);  /* strict: lone surrogates fail */
    if (s == NULL) { PyErr_Clear(); return 0; }
    return put_len(o, (size_t)n, 0xa0, 31, 0xd9, 0xda, 0xdb) && put(o, s, (size_t)n);
}

static int put_value(Out *o, PyObject *obj, int depth) {
    if (depth > 64) return 0;
    if (obj == Py_None) return put(o, "\xc0", 1);
    if (obj == Py_True) return put(o, "\xc3", 1);
    if (obj == Py_False) return put(o, "\xc2", 1);
    if (PyLong_CheckExact(obj)) return put_int(o, obj);
    if (PyFloat_CheckExact(obj)) return put_float(o, PyFloat_AS_DOUBLE(obj));
    if (PyUnicode_CheckExact(obj)) return put_str(o, obj);
    if (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        PyObject **items = PySequence_Fast_ITEMS(obj);
        if (!put_len(o, (size_t)n, 0x90, 15, 0, 0xdc, 0xdd)) return 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (!put_value(o, items[i], depth + 1)) return 0;
        return 1;
    }
    if (PyDict_CheckExact(obj)) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        if (!put_len(o, (size_t)PyDict_GET_SIZE(obj), 0x80, 15, 0, 0xde, 0xdf)) return 0;
        while (PyDict_Next(obj, &pos, &key, &value))
            if (!put_value(o, key, depth + 1) || !put_value(o, value, depth + 1)) return 0;
        return 1;
    }
    return 0;
}

static int put_key(Out *o, const char *key) {
    size_t n = strlen(key);
    unsigned char b = (unsigned char)(0xa0 | n);
    return put(o, &b, 1) && put(o, key, n);
}

static PyObject *wf_pack_header(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Out o;
    PyObject *result = NULL, *key, *value;
    Py_ssize_t pos = 0;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "pack_header takes 10 arguments");
        return NULL;
    }
    PyObject *kind = args[0], *stream = args[1], *seq = args[2], *bin = args[3], *t0 = args[4],
             *t1 = args[5], *stamps = args[6], *wall_ns = args[7], *meta = args[8], *specs = args[9];
    o.buf = o.small;
    o.len = 0;
    o.cap = sizeof(o.small);
    if (schema_version < 0 || !PyUnicode_CheckExact(kind) || !PyUnicode_CheckExact(stream)
        || !PyLong_CheckExact(seq) || !PyLong_CheckExact(bin) || !PyLong_CheckExact(wall_ns)
        || !PyFloat_CheckExact(t0) || !PyFloat_CheckExact(t1) || !PyDict_CheckExact(stamps))
        goto done;
    if (!put(&o, "\x8b", 1)  /* fixmap of the 11 header keys, in wire.encode's order */
        || !put_key(&o, "v") || !put_ll(&o, schema_version)
        || !put_key(&o, "kind") || !put_str(&o, kind) || !put_key(&o, "stream") || !put_str(&o, stream)
        || !put_key(&o, "seq") || !put_int(&o, seq) || !put_key(&o, "bin") || !put_int(&o, bin)
        || !put_key(&o, "t0") || !put_float(&o, PyFloat_AS_DOUBLE(t0))
        || !put_key(&o, "t1") || !put_float(&o, PyFloat_AS_DOUBLE(t1))
        || !put_key(&o, "stamps") || !put_len(&o, (size_t)PyDict_GET_SIZE(stamps), 0x80, 15, 0, 0xde, 0xdf))
        goto done;
    while (PyDict_Next(stamps, &pos, &key, &value))
        if (!PyUnicode_CheckExact(key) || !PyLong_CheckExact(value) || !put_str(&o, key) || !put_int(&o, value))
            goto done;
    if (!put_key(&o, "wall_ns") || !put_int(&o, wall_ns) || !put_key(&o, "meta") || !put_value(&o, meta, 1)
        || !put_key(&o, "arrays") || !put_value(&o, specs, 1))
        goto done;
    result = PyBytes_FromStringAndSize(o.buf, (Py_ssize_t)o.len);
    if (result == NULL) PyErr_Clear();
done:
    if (o.buf != o.small) PyMem_Free(o.buf);
    if (result == NULL) Py_RETURN_NONE;
    return result;
}

/* ------------------------------------------------------------ configure */

static int dtype_index(PyObject *code) {
    const char *s = PyUnicode_Check(code) ? PyUnicode_AsUTF8(code) : NULL;
    if (s == NULL) return -1;
    for (int d = 0; d < N_DTYPES; d++)
        if (strcmp(s, DTYPES[d].code) == 0) return d;
    return -1;
}

static int copy_str(PyObject *obj, char *out, size_t size, Py_ssize_t *len) {
    Py_ssize_t n;
    const char *s = PyUnicode_Check(obj) ? PyUnicode_AsUTF8AndSize(obj, &n) : NULL;
    if (s == NULL || (size_t)n >= size) return 0;
    memcpy(out, s, n + 1);
    *len = n;
    return 1;
}

/* configure(version, status_kind_index, ((kind_value, ((name, ndim, dtypes|None, required, last_dim|None), ...)), ...)) */
static PyObject *wf_configure(PyObject *self, PyObject *args) {
    long long version;
    int status;
    PyObject *table;
    if (!PyArg_ParseTuple(args, "LiO!", &version, &status, &PyTuple_Type, &table)) return NULL;
    n_kinds = 0;  /* disabled until the whole table is read */
    Py_ssize_t count = PyTuple_GET_SIZE(table);
    if (count > MAX_KINDS) goto bad;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyTuple_GET_ITEM(table, i), *rules;
        KindRules *kind = &kinds[i];
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) goto bad;
        if (!copy_str(PyTuple_GET_ITEM(entry, 0), kind->value, sizeof(kind->value), &kind->value_len)) goto bad;
        rules = PyTuple_GET_ITEM(entry, 1);
        if (!PyTuple_Check(rules) || PyTuple_GET_SIZE(rules) > MAX_RULES) goto bad;
        kind->n_rules = (int)PyTuple_GET_SIZE(rules);
        for (int j = 0; j < kind->n_rules; j++) {
            PyObject *rule = PyTuple_GET_ITEM(rules, j), *dtypes, *last;
            Rule *out = &kind->rules[j];
            if (!PyTuple_Check(rule) || PyTuple_GET_SIZE(rule) != 5) goto bad;
            if (!copy_str(PyTuple_GET_ITEM(rule, 0), out->name, sizeof(out->name), &out->name_len)) goto bad;
            out->ndim = (int)PyLong_AsLong(PyTuple_GET_ITEM(rule, 1));
            out->required = PyObject_IsTrue(PyTuple_GET_ITEM(rule, 3));
            dtypes = PyTuple_GET_ITEM(rule, 2);
            last = PyTuple_GET_ITEM(rule, 4);
            out->last_dim = last == Py_None ? -1 : PyLong_AsLongLong(last);
            if (PyErr_Occurred()) return NULL;
            if (dtypes == Py_None) {
                out->dtype_mask = (1u << N_DTYPES) - 1;
            } else {
                if (!PyTuple_Check(dtypes)) goto bad;
                out->dtype_mask = 0;
                for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(dtypes); d++) {
                    int index = dtype_index(PyTuple_GET_ITEM(dtypes, d));
                    if (index < 0) goto bad;
                    out->dtype_mask |= 1u << index;
                }
            }
        }
    }
    schema_version = version;
    status_kind = status;
    n_kinds = (int)count;
    Py_RETURN_NONE;
bad:
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "_wirefast.configure: malformed rule table");
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse", (PyCFunction)(void (*)(void))wf_parse, METH_FASTCALL,
     "parse(frames, params) -> parts of a valid message, or None (use the Python decode)"},
    {"pack_header", (PyCFunction)(void (*)(void))wf_pack_header, METH_FASTCALL,
     "pack_header(kind, stream, seq, bin, t0, t1, stamps, wall_ns, meta, specs) -> msgpack bytes, or None"},
    {"configure", wf_configure, METH_VARARGS, "configure(version, status_index, kinds_and_rules)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wirefast",
                                    "C fast path for spikevaediff.core.wire.decode", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__wirefast(void) {
    PyObject *m = PyModule_Create(&module), *keys, *codes, *floats;
    if (m == NULL) return NULL;
    keys = PyTuple_New(N_KEYS);
    codes = PyTuple_New(N_DTYPES);
    if (keys == NULL || codes == NULL) goto fail;
    for (int i = 0; i < N_KEYS; i++) {
        PyObject *key = PyUnicode_FromString(HEADER_KEYS[i]);
        if (key == NULL) goto fail;
        PyTuple_SET_ITEM(keys, i, key);
    }
    for (int d = 0; d < N_DTYPES; d++) {
        dtype_names[d] = PyUnicode_InternFromString(DTYPES[d].code);
        if (dtype_names[d] == NULL) goto fail;
        Py_INCREF(dtype_names[d]);
        PyTuple_SET_ITEM(codes, d, dtype_names[d]);
    }
    if (PyModule_AddObject(m, "HEADER_KEYS", keys) < 0) goto fail;
    keys = NULL;
    if (PyModule_AddObject(m, "DTYPES", codes) < 0) goto fail;
    codes = NULL;
    {
        Py_ssize_t n_floats = 0, at = 0;
        for (int d = 0; d < N_DTYPES; d++) n_floats += DTYPES[d].is_float;
        if ((floats = PyTuple_New(n_floats)) == NULL) goto fail;
        for (int d = 0; d < N_DTYPES; d++)
            if (DTYPES[d].is_float) {
                Py_INCREF(dtype_names[d]);
                PyTuple_SET_ITEM(floats, at++, dtype_names[d]);
            }
        if (PyModule_AddObject(m, "FLOAT_DTYPES", floats) < 0) { Py_DECREF(floats); goto fail; }
    }
    return m;
fail:
    Py_XDECREF(keys);
    Py_XDECREF(codes);
    Py_DECREF(m);
    return NULL;
}
