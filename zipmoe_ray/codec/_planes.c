/* Bit-plane split and merge in one pass per element (zipmoe_ray/codec/planes.py has the layouts and the
 * numpy versions these must equal, bit for bit).
 *
 * The numpy merge of a BF16 tensor takes five passes over each block (widen the sign+mantissa byte, mask,
 * widen the exponent, shift, or): about half of a decode lane's time per expert, the other half being zstd.
 * Here each element is read once and written once (BF16 on x86: SSE2 with streaming stores for long ranges,
 * elsewhere a loop the compiler vectorises); the GIL is released while it runs, so decode lanes on threads
 * (the local backend, the executor's lanes) run it in parallel.
 *
 * Built by setup.py as an optional extension: where no C compiler is found the package installs without it
 * and planes.py uses numpy (planes.IMPLEMENTATION says which is in use).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict
#endif

enum kind { BF16 = 0, FP16 = 1, FP32 = 2 };

static const char *const kind_names[] = {"bfloat16", "float16", "float32"};
static const Py_ssize_t itemsizes[] = {2, 2, 4};
static const Py_ssize_t raw_widths[] = {1, 1, 3};

static inline uint16_t bf16_word(uint8_t ev, uint8_t sv) {
    return (uint16_t)(((sv & 0x80u) << 8) | ((uint16_t)ev << 7) | (sv & 0x7Fu));
}

/* Ranges at least this long are written with streaming stores on x86 (below). */
#define STREAM_MIN_ELEMS (1 << 16)

static void merge_bf16(const uint8_t *restrict e, const uint8_t *restrict s, uint16_t *restrict o,
                       Py_ssize_t a, Py_ssize_t b) {
    Py_ssize_t i = a;
#if defined(__SSE2__)
    /* A decoded expert (17.3 MB for Qwen1.5-MoE) is far larger than any cache and is next read by the model,
     * not by this core: non-temporal stores skip reading each output line before writing it, a third of the
     * merge's memory traffic. Measured on the 2-core VM, planes not in cache: 1.85 against 3.0 ms an expert. */
    if (b - a >= STREAM_MIN_ELEMS) {
        for (; i < b && ((uintptr_t)(o + i) & 15u) != 0; i++)
            o[i] = bf16_word(e[i], s[i]);
        const __m128i zero = _mm_setzero_si128(), sign = _mm_set1_epi16(0x80), mant = _mm_set1_epi16(0x7F);
        for (; i + 16 <= b; i += 16) {
            __m128i ev = _mm_loadu_si128((const __m128i *)(e + i));
            __m128i sv = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i e0 = _mm_unpacklo_epi8(ev, zero), e1 = _mm_unpackhi_epi8(ev, zero);
            __m128i s0 = _mm_unpacklo_epi8(sv, zero), s1 = _mm_unpackhi_epi8(sv, zero);
            __m128i w0 = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(s0, sign), 8),
                                      _mm_or_si128(_mm_slli_epi16(e0, 7), _mm_and_si128(s0, mant)));
            __m128i w1 = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(s1, sign), 8),
                                      _mm_or_si128(_mm_slli_epi16(e1, 7), _mm_and_si128(s1, mant)));
            _mm_stream_si128((__m128i *)(o + i), w0);
            _mm_stream_si128((__m128i *)(o + i + 8), w1);
        }
        _mm_sfence(); /* the streamed lines are visible to other threads before the caller hands them on */
    }
#endif
    for (; i < b; i++)
        o[i] = bf16_word(e[i], s[i]);
}

static void merge_fp16(const uint8_t *restrict e, const uint8_t *restrict s, uint16_t *restrict o,
                       Py_ssize_t a, Py_ssize_t b) {
    for (Py_ssize_t i = a; i < b; i++)
        o[i] = (uint16_t)(((uint16_t)e[i] << 8) | s[i]);
}

/* raw plane of n elements: n native uint16 (mantissa low 16 bits), then n bytes (sign | mantissa top 7) */
static void merge_fp32(const uint8_t *restrict e, const uint8_t *restrict r, uint32_t *restrict o,
                       Py_ssize_t n, Py_ssize_t a, Py_ssize_t b) {
    const uint8_t *hi = r + 2 * n;
    for (Py_ssize_t i = a; i < b; i++) {
        uint16_t lo;
        memcpy(&lo, r + 2 * i, 2);
        uint32_t h = hi[i];
        o[i] = ((h & 0x80u) << 24) | ((uint32_t)e[i] << 23) | ((h & 0x7Fu) << 16) | lo;
    }
}

static void split_bf16(const uint16_t *restrict w, uint8_t *restrict e, uint8_t *restrict s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t v = w[i];
        e[i] = (uint8_t)(v >> 7);
        s[i] = (uint8_t)(((v >> 8) & 0x80u) | (v & 0x7Fu));
    }
}

static void split_fp16(const uint16_t *restrict w, uint8_t *restrict e, uint8_t *restrict s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        e[i] = (uint8_t)(w[i] >> 8);
        s[i] = (uint8_t)w[i];
    }
}

static void split_fp32(const uint32_t *restrict w, uint8_t *restrict e, uint8_t *restrict r, Py_ssize_t n) {
    uint8_t *hi = r + 2 * n;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v = w[i];
        uint16_t lo = (uint16_t)v;
        e[i] = (uint8_t)(v >> 23);
        memcpy(r + 2 * i, &lo, 2);
        hi[i] = (uint8_t)(((v >> 24) & 0x80u) | ((v >> 16) & 0x7Fu));
    }
}

static int kind_of(int kind) {
    if (kind < BF16 || kind > FP32) {
        PyErr_Format(PyExc_ValueError, "unknown plane layout %d (0 bfloat16, 1 float16, 2 float32)", kind);
        return -1;
    }
    return 0;
}

/* three contiguous buffers; bit k of ``writable`` marks buffer k as written */
static int get_buffers(PyObject *objs[3], Py_buffer bufs[3], int writable) {
    for (int k = 0; k < 3; k++) {
        if (PyObject_GetBuffer(objs[k], &bufs[k], (writable >> k) & 1 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            for (int j = 0; j < k; j++)
                PyBuffer_Release(&bufs[j]);
            return -1;
        }
    }
    return 0;
}

/* the kernels' pointers are restrict: the output may not overlap what it is made from */
static int overlap(const Py_buffer *a, const Py_buffer *b) {
    const char *x = (const char *)a->buf, *y = (const char *)b->buf;
    return a->len > 0 && b->len > 0 && x < y + b->len && y < x + a->len;
}

static void release(Py_buffer bufs[3]) {
    for (int k = 0; k < 3; k++)
        PyBuffer_Release(&bufs[k]);
}

PyDoc_STRVAR(merge_doc,
             "merge(kind, exp, raw, out, start, stop)\n\n"
             "Write elements [start, stop) of ``out`` (the tensor's words: n elements) from the full planes "
             "``exp`` (n bytes) and ``raw`` (n * raw width bytes). kind: 0 bfloat16, 1 float16, 2 float32.");

static PyObject *py_merge(PyObject *self, PyObject *args) {
    int kind;
    PyObject *exp, *raw, *out;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "iOOOnn:merge", &kind, &exp, &raw, &out, &start, &stop) || kind_of(kind) < 0)
        return NULL;
    Py_ssize_t itemsize = itemsizes[kind];
    PyObject *objs[3] = {out, exp, raw};
    Py_buffer b[3];
    if (get_buffers(objs, b, 1) < 0) /* only the output is written */
        return NULL;
    Py_ssize_t n = b[0].len / itemsize;
    const char *bad = NULL;
    if (b[0].len % itemsize != 0 || ((uintptr_t)b[0].buf) % (uintptr_t)itemsize != 0)
        bad = "the output is not whole aligned elements";
    else if (start < 0 || start > stop || stop > n)
        bad = "the element range is outside the output";
    else if (b[1].len < stop)
        bad = "the exponent plane is shorter than the range";
    else if (kind == FP32 ? b[2].len < 3 * n : b[2].len < stop)
        bad = "the raw plane is shorter than the range";
    else if (overlap(&b[0], &b[1]) || overlap(&b[0], &b[2]))
        bad = "the output overlaps a plane";
    if (bad != NULL) {
        PyErr_Format(PyExc_ValueError, "%s merge: %s (%zd elements, range [%zd, %zd))", kind_names[kind], bad, n,
                     start, stop);
        release(b);
        return NULL;
    }
    const uint8_t *e = (const uint8_t *)b[1].buf, *r = (const uint8_t *)b[2].buf;
    Py_BEGIN_ALLOW_THREADS
    if (kind == BF16)
        merge_bf16(e, r, (uint16_t *)b[0].buf, start, stop);
    else if (kind == FP16)
        merge_fp16(e, r, (uint16_t *)b[0].buf, start, stop);
    else
        merge_fp32(e, r, (uint32_t *)b[0].buf, n, start, stop);
    Py_END_ALLOW_THREADS
    release(b);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(split_doc,
             "split(kind, words, exp_out, raw_out)\n\n"
             "Fill ``exp_out`` (n bytes) and ``raw_out`` (n * raw width bytes) from ``words`` (n elements). "
             "kind: 0 bfloat16, 1 float16, 2 float32.");

static PyObject *py_split(PyObject *self, PyObject *args) {
    int kind;
    PyObject *objs[3];
    if (!PyArg_ParseTuple(args, "iOOO:split", &kind, &objs[0], &objs[1], &objs[2]) || kind_of(kind) < 0)
        return NULL;
    Py_ssize_t itemsize = itemsizes[kind];
    Py_buffer b[3];
    if (get_buffers(objs, b, 6) < 0) /* the planes are written */
        return NULL;
    Py_ssize_t n = b[0].len / itemsize;
    if (b[0].len % itemsize != 0 || ((uintptr_t)b[0].buf) % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s split: the words are not whole aligned elements", kind_names[kind]);
        release(b);
        return NULL;
    }
    if (overlap(&b[0], &b[1]) || overlap(&b[0], &b[2]) || overlap(&b[1], &b[2])) {
        PyErr_Format(PyExc_ValueError, "%s split: the words and the planes overlap", kind_names[kind]);
        release(b);
        return NULL;
    }
    if (b[1].len < n || b[2].len < n * raw_widths[kind]) {
        PyErr_Format(PyExc_ValueError, "%s split: planes too short for %zd elements (exponent %zd, raw %zd bytes)",
                     kind_names[kind], n, b[1].len, b[2].len);
        release(b);
        return NULL;
    }
    uint8_t *e = (uint8_t *)b[1].buf, *r = (uint8_t *)b[2].buf;
    Py_BEGIN_ALLOW_THREADS
    if (kind == BF16)
        split_bf16((const uint16_t *)b[0].buf, e, r, n);
    else if (kind == FP16)
        split_fp16((const uint16_t *)b[0].buf, e, r, n);
    else
        split_fp32((const uint32_t *)b[0].buf, e, r, n);
    Py_END_ALLOW_THREADS
    release(b);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"merge", py_merge, METH_VARARGS, merge_doc},
    {"split", py_split, METH_VARARGS, split_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_planes", "Bit-plane split and merge in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
