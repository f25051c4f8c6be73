/*
 * fdpass.sinks._avro_to_native: Avro single-object messages -> one ClickHouse Native block.
 *
 * Why. ClickHouse's Avro input format costs ~9 CPU us per fdpass event (its
 * Avro parser, and LowCardinality columns filled row by row); the same rows
 * as a Native block cost ~1.2-1.4 us, plus ~0.4-0.7 us here. So the sink
 * hands ClickHouse Native blocks (INSERT ... FORMAT Native); ClickHouse's
 * Avro reader stays as the fallback for when this module is not built
 * (sinks/conversion.py).
 *
 * Generic over flat Avro records whose fields are string, int, long,
 * boolean, enum, or ["null", T] of those. No field is written here:
 * sinks/conversion.py derives the layout at import time from each shipped
 * writer schema (schemas/fdpass_event.v*.avsc, generated from
 * schemas/fields.py) and the ClickHouse types of schemas/clickhouse.py, and
 * passes it to Transcoder(header, fields).
 *
 * Input of Transcoder.transcode(values): a sequence of message values
 * (bytes; None counts as an empty message), meant to be of the one writer
 * schema whose 10-byte header (C3 01 + 8-byte fingerprint) the Transcoder
 * was made with.
 * Output: (block, rows, rejected)
 *   block     a Block (buffer protocol: memoryview(block), bytes(block)):
 *             one Native block as ClickHouse reads it over HTTP or in chDB
 *             (no BlockInfo): varuint columns, varuint rows, then per
 *             column a varuint-prefixed name, a varuint-prefixed type, data:
 *               String          per row: varuint length, bytes
 *               Int32 / Int64   little-endian, fixed width
 *               Bool            UInt8 0/1
 *               Enum8(...)      Int8: the Avro symbol index + 1
 *               Nullable(T)     one UInt8 per row (1 = NULL), then T's data
 *                               with T's default in the NULL rows
 *               LowCardinality(String), LowCardinality(Nullable(String))
 *                               for the fields the table keeps so: keys
 *                               version (UInt64 1), index type and flags
 *                               (UInt64: UInt8/16/32 keys | additional keys |
 *                               update dictionary), UInt64 number of keys, the
 *                               keys as Strings (the default "" first, after a
 *                               NULL placeholder when Nullable: ClickHouse's
 *                               own layout), UInt64 rows, one key per row.
 *                               Measured against plain String columns: a
 *                               block of 270 instead of 440 bytes per event,
 *                               ~0.25 CPU us less per event in ClickHouse,
 *                               ~0.13 more here.
 *             Empty (len 0) when no message was accepted.
 *   rows      rows in the block: the accepted messages, in input order
 *   rejected  [(index in values, reason, detail)], reason "truncated",
 *             "corrupt_body", "bad_magic" or "unknown_fingerprint" (the
 *             codec's DLQ vocabulary). A rejected message adds no row and no
 *             byte to any column or dictionary.
 *
 * Validation (strict; the Python codec, fdpass.schemas.codec, is the judge
 * of what is undecodable, and tests/test_avro_to_native.py checks with
 * random damage: codec rejects => rejected here; accepted here => the row
 * holds exactly codec.decode's values):
 *   - the message starts with the Transcoder's header;
 *   - every varint ends within 10 bytes and holds no bits beyond 64 (a 10th
 *     byte of 0 or 1 only);
 *   - an int fits 32 bits (codec.Decoder's rule too);
 *   - string lengths are >= 0 and within the body; strings are valid UTF-8
 *     by the strict rules of Python's decoder (no overlong forms, no
 *     surrogates, nothing above U+10FFFF);
 *   - enum indexes are 0..symbols-1, union indexes 0 (null) or 1;
 *   - a boolean byte is 0 or 1;
 *   - no bytes are left over after the record.
 * Stricter than fastavro, so codec.decode may accept what is rejected here
 * -- for these rules only; their details say so in these words and the
 * tests match them:
 *   "over-long varint"   fastavro reads any number of bytes and drops the
 *                        bits beyond 64;
 *   "boolean byte"       fastavro takes any non-zero byte as true;
 *   "enum index -N", "union index -N"
 *                        fastavro indexes a Python list: -1 is the last
 *                        symbol or branch.
 *
 * Speed: the work runs without the GIL (a tuple holds the values meanwhile),
 * so two writer threads transcode and insert in parallel. Column buffers and
 * block memory are reused across calls (a Transcoder keeps two of each):
 * fresh memory costs a page fault per 4 KiB, measured at more than the
 * transcoding itself for 100k-row blocks.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "Native columns are little-endian; this file copies integers as the CPU holds them"
#endif

#define HEADER_LEN 10
#define DETAIL_LEN 160
#define SPARES 2 /* reusable column sets and block buffers per Transcoder: one per writer thread */

/* K_DICT: a string column the table keeps as LowCardinality, sent dictionary-encoded */
enum kind { K_STRING, K_LONG, K_INT, K_BOOL, K_ENUM, K_DICT };

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

typedef struct {
    enum kind kind;
    int nullable;
    int64_t nsym;          /* enum: number of symbols */
    char *name;            /* for details */
    uint8_t *head;         /* Native column header: name and type, varuint-prefixed */
    size_t head_len;
    double bytes_per_row;  /* string columns: size seen last time, to size buffers up front */
} field_t;

/* The dictionary of a K_DICT column for one block. */
typedef struct {
    uint64_t hash;
    uint32_t key;  /* index in the dictionary; EMPTY: a free slot */
    uint32_t len;
    size_t off;    /* where the key's bytes start in keys */
} slot_t;

#define EMPTY UINT32_MAX

typedef struct {
    buf_t keys;            /* as Native writes them: per key a varuint length, the bytes */
    uint32_t nkeys;
    slot_t *slots;         /* open addressing, a power of two of them */
    size_t nslots, used;
    uint32_t last_key, last_len; /* the previous row's value: runs of one host, comm, ... are common */
    size_t last_off;
    const uint8_t *pend;   /* this row's value, entered once the whole row is accepted */
    uint32_t pend_len;
    int pend_null;
} dict_t;

typedef struct {
    buf_t nulls;  /* Nullable: one byte per row */
    buf_t vals;   /* values: fixed width at row * width (K_DICT: UInt32 keys), or appended strings */
    size_t mark;  /* string columns: vals.len at the start of the current row */
    dict_t dict;  /* K_DICT */
} column_t;

typedef struct {
    PyObject_HEAD
    uint8_t header[HEADER_LEN];
    Py_ssize_t nfields;
    field_t *fields;
    Py_ssize_t nstrings;
    Py_ssize_t *strings;   /* indexes of the string fields (rolled back on a reject) */
    Py_ssize_t ndicts;
    Py_ssize_t *dicts;     /* indexes of the K_DICT fields (entered after the row) */
    PyObject *columns;     /* tuple of column names */
    /* Reused memory; touched only with the GIL held. */
    column_t *spare_cols[SPARES];
    int n_spare_cols;
    buf_t spare_mem[SPARES];
    int n_spare_mem;
} Transcoder;

typedef struct {
    PyObject_HEAD
    Transcoder *owner;  /* the memory goes back to the owner's spares */
    buf_t mem;
} Block;

/* One rejected message, collected without the GIL. */
typedef struct {
    Py_ssize_t index;
    const char *reason;
    char detail[DETAIL_LEN];
} reject_t;

typedef struct {
    reject_t *v;
    size_t len, cap;
} rejects_t;

static PyTypeObject BlockType;

/* -- small helpers ------------------------------------------------------------ */

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

/* An empty buffer of at least `cap` bytes (old contents are not kept). */
static int buf_empty(buf_t *b, size_t cap) {
    b->len = 0;
    if (b->cap >= cap)
        return 0;
    free(b->p);
    b->p = malloc(cap);
    b->cap = b->p ? cap : 0;
    return b->p ? 0 : -1;
}

static size_t put_varuint(uint8_t *out, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

/* Results of the readers below. */
enum { OK = 0, E_TRUNC, E_VARINT };

/* An Avro varint, at most 10 bytes, nothing beyond 64 bits. */
__attribute__((always_inline)) static inline int read_varint(const uint8_t **pp, const uint8_t *end,
                                                              uint64_t *out) {
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) { /* most of an event's varints: small ints, lengths, indexes */
        *out = *p;
        *pp = p + 1;
        return OK;
    }
    if (end - p >= 10) { /* unrolled, no bounds checks: 64-bit ids and times take 5-9 bytes */
        uint64_t v = p[0] & 0x7f, b;
#define STEP(k)                                   \
        b = p[k];                                 \
        v |= (b & 0x7f) << (7 * k);               \
        if (b < 0x80) {                           \
            *pp = p + k + 1;                      \
            *out = v;                             \
            return OK;                            \
        }
        STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7) STEP(8)
#undef STEP
        b = p[9];
        if (b > 1)
            return E_VARINT;
        *pp = p + 10;
        *out = v | b << 63;
        return OK;
    }
    uint64_t v = 0;
    for (int k = 0; k < 10; k++) {
        if (p >= end)
            return E_TRUNC;
        uint8_t b = *p++;
        if (k == 9 && b > 1)
            return E_VARINT;
        v |= (uint64_t)(b & 0x7f) << (7 * k);
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return OK;
        }
    }
    return E_VARINT; /* not reached: a 10th byte <= 1 has no continuation bit */
}

static inline int64_t unzigzag(uint64_t z) { return (int64_t)((z >> 1) ^ (~(z & 1) + 1)); }

static inline int is_ascii(const uint8_t *s, size_t n) {
    uint64_t acc = 0, w;
    if (n >= 8) {
        for (size_t i = 0; i + 8 <= n; i += 8) {
            memcpy(&w, s + i, 8);
            acc |= w;
        }
        memcpy(&w, s + n - 8, 8); /* the tail, overlapping */
        acc |= w;
    } else {
        for (size_t i = 0; i < n; i++)
            acc |= s[i];
    }
    return !(acc & 0x8080808080808080ULL);
}

/* Strict UTF-8 (Unicode table 3-7, as Python decodes it); returns the offset
 * of the first bad sequence, or n if all is well. */
static size_t utf8_check(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF; /* range of the first continuation byte */
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c == 0xE0)
            need = 2, lo = 0xA0; /* no overlong forms */
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
            need = 2;
        else if (c == 0xED)
            need = 2, hi = 0x9F; /* no surrogates */
        else if (c == 0xF0)
            need = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            need = 3;
        else if (c == 0xF4)
            need = 3, hi = 0x8F; /* nothing above U+10FFFF */
        else
            return i;
        if (i + need >= n) /* the sequence runs past the end */
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
        i += need + 1;
    }
    return n;
}

/* memcmp(a, b, n) == 0 for the short strings of an event, without a library call; no over-read. */
static inline int same_bytes(const uint8_t *a, const uint8_t *b, size_t n) {
    uint64_t x, y, u, w;
    if (n >= 8) {
        size_t i = 0;
        for (; i + 8 < n; i += 8) {
            memcpy(&x, a + i, 8);
            memcpy(&y, b + i, 8);
            if (x != y)
                return 0;
        }
        memcpy(&x, a + n - 8, 8); /* the tail, overlapping */
        memcpy(&y, b + n - 8, 8);
        return x == y;
    }
    if (n >= 4) {
        uint32_t x4, y4, u4, w4;
        memcpy(&x4, a, 4), memcpy(&y4, b, 4), memcpy(&u4, a + n - 4, 4), memcpy(&w4, b + n - 4, 4);
        return x4 == y4 && u4 == w4;
    }
    u = w = 0;
    for (size_t i = 0; i < n; i++)
        u |= (uint64_t)a[i] << (8 * i), w |= (uint64_t)b[i] << (8 * i);
    (void)x, (void)y;
    return u == w;
}

/* memcpy of short strings without a library call; exact, no over-read. */
static inline void copy_bytes(uint8_t *d, const uint8_t *s, size_t n) {
    if (n >= 16) {
        memcpy(d, s, n);
    } else if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
    } else {
        for (size_t i = 0; i < n; i++)
            d[i] = s[i];
    }
}

static int add_reject(rejects_t *r, Py_ssize_t index, const reject_t *what) {
    if (r->len == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        reject_t *v = realloc(r->v, cap * sizeof *v);
        if (!v)
            return -1;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->len] = *what;
    r->v[r->len].index = index;
    r->len++;
    return 0;
}

static size_t width_of(enum kind k) {
    switch (k) {
    case K_LONG: return 8;
    case K_INT: case K_DICT: return 4;
    case K_BOOL: case K_ENUM: return 1;
    default: return 0;
    }
}

/* -- dictionaries (LowCardinality) -------------------------------------------------- */

static inline uint64_t hash_bytes(const uint8_t *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n, w;
    for (; n >= 8; s += 8, n -= 8) {
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 31;
    }
    w = 0;
    for (size_t i = 0; i < n; i++)
        w |= (uint64_t)s[i] << (8 * i);
    h = (h ^ w) * 0x94D049BB133111EBULL;
    return h ^ (h >> 29);
}

/* An empty dictionary: ClickHouse's layout puts the default value ("") first,
 * after a placeholder for NULL in a Nullable one. */
static int dict_reset(dict_t *d, int nullable) {
    d->keys.len = 0;
    if (buf_reserve(&d->keys, 2) < 0)
        return -1;
    d->keys.p[d->keys.len++] = 0;
    if (nullable)
        d->keys.p[d->keys.len++] = 0;
    d->nkeys = nullable ? 2 : 1;
    if (!d->slots) {
        d->nslots = 1024;
        if (!(d->slots = malloc(d->nslots * sizeof(slot_t))))
            return -1;
    }
    memset(d->slots, 0xFF, d->nslots * sizeof(slot_t)); /* key = EMPTY */
    d->used = 0;
    d->last_key = EMPTY;
    return 0;
}

static int dict_grow(dict_t *d) {
    size_t n = d->nslots * 2;
    slot_t *slots = malloc(n * sizeof(slot_t));
    if (!slots)
        return -1;
    memset(slots, 0xFF, n * sizeof(slot_t));
    for (size_t i = 0; i < d->nslots; i++) {
        if (d->slots[i].key == EMPTY)
            continue;
        size_t j = d->slots[i].hash & (n - 1);
        while (slots[j].key != EMPTY)
            j = (j + 1) & (n - 1);
        slots[j] = d->slots[i];
    }
    free(d->slots);
    d->slots = slots;
    d->nslots = n;
    return 0;
}

/* The key of a value, entering it if new; EMPTY when out of memory. */
static uint32_t dict_key(dict_t *d, const uint8_t *p, uint32_t len, int nullable) {
    if (len == 0)
        return nullable ? 1 : 0;
    if (len == d->last_len && d->last_key != EMPTY && same_bytes(p, d->keys.p + d->last_off, len))
        return d->last_key;
    uint64_t h = hash_bytes(p, len);
    size_t mask = d->nslots - 1, i = h & mask;
    for (;; i = (i + 1) & mask) {
        slot_t *sl = &d->slots[i];
        if (sl->key == EMPTY)
            break;
        if (sl->hash == h && sl->len == len && same_bytes(p, d->keys.p + sl->off, len)) {
            d->last_key = sl->key, d->last_len = len, d->last_off = sl->off;
            return sl->key;
        }
    }
    if (d->nkeys == EMPTY - 1 || buf_reserve(&d->keys, (size_t)len + 10) < 0)
        return EMPTY;
    d->keys.len += put_varuint(d->keys.p + d->keys.len, len);
    size_t off = d->keys.len;
    memcpy(d->keys.p + off, p, len);
    d->keys.len += len;
    d->slots[i] = (slot_t){h, d->nkeys, len, off};
    d->last_key = d->nkeys, d->last_len = len, d->last_off = off;
    d->nkeys++;
    if (++d->used * 2 > d->nslots && dict_grow(d) < 0)
        return EMPTY;
    return d->last_key;
}

/* Bytes of a dictionary-encoded column's data in the block. */
static size_t dict_size(const dict_t *d, size_t rows) {
    size_t width = d->nkeys <= 256 ? 1 : d->nkeys <= 65536 ? 2 : 4;
    return 4 * 8 + d->keys.len + rows * width;
}

/* LowCardinality's Native serialization: keys version, index type and flags,
 * the dictionary (its keys as the inner type), the rows' keys. */
static uint8_t *dict_write(const dict_t *d, const uint32_t *keys, size_t rows, uint8_t *o) {
    uint64_t itype = d->nkeys <= 256 ? 0 : d->nkeys <= 65536 ? 1 : 2; /* UInt8, UInt16, UInt32 keys */
    uint64_t head[3] = {1,                                     /* SharedDictionariesWithAdditionalKeys */
                        itype | (1u << 9) | (1u << 10),        /* HasAdditionalKeys | NeedUpdateDictionary */
                        d->nkeys};
    memcpy(o, head, sizeof head);
    o += sizeof head;
    memcpy(o, d->keys.p, d->keys.len);
    o += d->keys.len;
    uint64_t n = rows;
    memcpy(o, &n, 8);
    o += 8;
    if (itype == 0)
        for (size_t r = 0; r < rows; r++)
            *o++ = (uint8_t)keys[r];
    else if (itype == 1)
        for (size_t r = 0; r < rows; r++, o += 2) {
            uint16_t k = (uint16_t)keys[r];
            memcpy(o, &k, 2);
        }
    else {
        memcpy(o, keys, rows * 4);
        o += rows * 4;
    }
    return o;
}

/* -- one message ---------------------------------------------------------------- */

/* Decode one body into the columns at row `row`: OK, 1 with rej filled, or -1 (no memory). */
static int decode_row(const Transcoder *t, column_t *cols, size_t row, const uint8_t *p, const uint8_t *end,
                      reject_t *rej) {
    const uint8_t *start = p;
    for (Py_ssize_t f = 0; f < t->nfields; f++) {
        const field_t *fd = &t->fields[f];
        column_t *c = &cols[f];
        uint64_t z;
        int rc;
        if (fd->nullable) {
            if ((rc = read_varint(&p, end, &z)) != OK)
                goto varint_error;
            int64_t branch = unzigzag(z);
            if (branch == 0) {
                switch (fd->kind) { /* the null map, and the inner type's default in this row */
                case K_STRING: c->vals.p[c->vals.len++] = 0; break; /* the row start reserved this byte */
                case K_LONG: memset(c->vals.p + row * 8, 0, 8); break;
                case K_INT: memset(c->vals.p + row * 4, 0, 4); break;
                case K_ENUM: c->vals.p[row] = 1; break; /* a value the Enum8 declares */
                case K_BOOL: c->vals.p[row] = 0; break;
                case K_DICT: c->dict.pend_null = 1; continue; /* NULL is key 0; no null map */
                }
                c->nulls.p[row] = 1;
                continue;
            }
            if (branch != 1) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: union index %lld is neither 0 (null) nor 1",
                         fd->name, (long long)branch);
                goto corrupt;
            }
            if (fd->kind != K_DICT)
                c->nulls.p[row] = 0;
        }
        switch (fd->kind) {
        case K_LONG: {
            if ((rc = read_varint(&p, end, &z)) != OK)
                goto varint_error;
            int64_t v = unzigzag(z);
            memcpy(c->vals.p + row * 8, &v, 8);
            break;
        }
        case K_INT: {
            if ((rc = read_varint(&p, end, &z)) != OK)
                goto varint_error;
            int64_t v = unzigzag(z);
            if (v < INT32_MIN || v > INT32_MAX) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: int %lld beyond 32 bits", fd->name, (long long)v);
                goto corrupt;
            }
            int32_t v32 = (int32_t)v;
            memcpy(c->vals.p + row * 4, &v32, 4);
            break;
        }
        case K_BOOL:
            if (p >= end) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: body ends before the boolean", fd->name);
                goto truncated;
            }
            if (*p > 1) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: boolean byte 0x%02x is neither 0 nor 1", fd->name, *p);
                goto corrupt;
            }
            c->vals.p[row] = *p++;
            break;
        case K_ENUM: {
            if ((rc = read_varint(&p, end, &z)) != OK)
                goto varint_error;
            int64_t v = unzigzag(z);
            if (v < 0 || v >= fd->nsym) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: enum index %lld out of range 0..%lld", fd->name,
                         (long long)v, (long long)(fd->nsym - 1));
                goto corrupt;
            }
            c->vals.p[row] = (uint8_t)(v + 1);
            break;
        }
        case K_DICT:
        case K_STRING: {
            if ((rc = read_varint(&p, end, &z)) != OK)
                goto varint_error;
            int64_t n = unzigzag(z);
            if (n < 0) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: negative string length %lld", fd->name, (long long)n);
                goto corrupt;
            }
            if ((uint64_t)n > (uint64_t)(end - p)) {
                snprintf(rej->detail, DETAIL_LEN, "field %s: string of %lld bytes, only %lld left in the body",
                         fd->name, (long long)n, (long long)(end - p));
                goto truncated;
            }
            if (!is_ascii(p, (size_t)n)) {
                size_t bad = utf8_check(p, (size_t)n);
                if (bad != (size_t)n) {
                    snprintf(rej->detail, DETAIL_LEN, "field %s: invalid UTF-8 at byte %zu of the string", fd->name,
                             bad);
                    goto corrupt;
                }
            }
            if (fd->kind == K_DICT) {
                if (n > UINT32_MAX - 16) {
                    snprintf(rej->detail, DETAIL_LEN, "field %s: string of %lld bytes", fd->name, (long long)n);
                    goto corrupt;
                }
                c->dict.pend = p, c->dict.pend_len = (uint32_t)n, c->dict.pend_null = 0;
                p += n;
                break;
            }
            if (buf_reserve(&c->vals, (size_t)n + 10) < 0)
                return -1;
            c->vals.len += put_varuint(c->vals.p + c->vals.len, (uint64_t)n);
            copy_bytes(c->vals.p + c->vals.len, p, (size_t)n);
            c->vals.len += (size_t)n;
            p += n;
            break;
        }
        }
        continue;
    varint_error:
        if (rc == E_TRUNC) {
            snprintf(rej->detail, DETAIL_LEN, "field %s: body ends inside a varint (%lld-byte body)", fd->name,
                     (long long)(end - start));
            goto truncated;
        }
        snprintf(rej->detail, DETAIL_LEN, "field %s: over-long varint (more than 10 bytes or 64 bits)", fd->name);
        goto corrupt;
    }
    if (p != end) {
        snprintf(rej->detail, DETAIL_LEN, "%lld bytes left over after the %lld-byte record", (long long)(end - p),
                 (long long)(p - start));
        goto corrupt;
    }
    return OK;
truncated:
    rej->reason = "truncated";
    return 1;
corrupt:
    rej->reason = "corrupt_body";
    return 1;
}

/* A message whose header is not this writer schema's: what is wrong with it. */
static void header_reject(const Transcoder *t, const uint8_t *msg, Py_ssize_t len, reject_t *rej) {
    if (len >= 2 && (msg[0] != t->header[0] || msg[1] != t->header[1])) {
        rej->reason = "bad_magic";
        snprintf(rej->detail, DETAIL_LEN, "message starts with %02x%02x, not c301 (Avro single-object encoding)",
                 msg[0], msg[1]);
    } else if (len < HEADER_LEN) {
        rej->reason = "truncated";
        snprintf(rej->detail, DETAIL_LEN, "message of %lld bytes is shorter than the %d-byte header", (long long)len,
                 HEADER_LEN);
    } else {
        rej->reason = "unknown_fingerprint";
        snprintf(rej->detail, DETAIL_LEN, "writer schema fingerprint is not the one this transcoder reads");
    }
}

/* The core, without the GIL: fills cols, returns the accepted rows or -1 (no memory). */
static Py_ssize_t transcode_all(const Transcoder *t, column_t *cols, const uint8_t *const *data,
                                const Py_ssize_t *lens, Py_ssize_t n, rejects_t *rejects) {
    size_t row = 0;
    reject_t rej;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *msg = data[i];
        Py_ssize_t len = lens[i];
        if (len < HEADER_LEN || memcmp(msg, t->header, HEADER_LEN) != 0) {
            header_reject(t, msg, len, &rej);
            if (add_reject(rejects, i, &rej) < 0)
                return -1;
            continue;
        }
        /* Marks for a rollback, and the one byte a NULL string takes. */
        for (Py_ssize_t k = 0; k < t->nstrings; k++) {
            column_t *c = &cols[t->strings[k]];
            if (buf_reserve(&c->vals, 1) < 0)
                return -1;
            c->mark = c->vals.len;
        }
        int rc = decode_row(t, cols, row, msg + HEADER_LEN, msg + len, &rej);
        if (rc < 0)
            return -1;
        if (rc == OK) {
            for (Py_ssize_t k = 0; k < t->ndicts; k++) {
                Py_ssize_t f = t->dicts[k];
                dict_t *d = &cols[f].dict;
                uint32_t key = d->pend_null ? 0 : dict_key(d, d->pend, d->pend_len, t->fields[f].nullable);
                if (key == EMPTY)
                    return -1;
                ((uint32_t *)cols[f].vals.p)[row] = key;
            }
            row++;
            continue;
        }
        for (Py_ssize_t k = 0; k < t->nstrings; k++)
            cols[t->strings[k]].vals.len = cols[t->strings[k]].mark;
        if (add_reject(rejects, i, &rej) < 0)
            return -1;
    }
    return (Py_ssize_t)row;
}

/* -- reused memory (GIL held) --------------------------------------------------- */

static void free_column_set(column_t *cols, Py_ssize_t n) {
    if (!cols)
        return;
    for (Py_ssize_t i = 0; i < n; i++) {
        free(cols[i].nulls.p);
        free(cols[i].vals.p);
        free(cols[i].dict.keys.p);
        free(cols[i].dict.slots);
    }
    free(cols);
}

/* A column set with room for n rows. */
static column_t *take_column_set(Transcoder *t, Py_ssize_t n) {
    column_t *cols = t->n_spare_cols ? t->spare_cols[--t->n_spare_cols] : calloc((size_t)t->nfields, sizeof(column_t));
    if (!cols)
        return NULL;
    for (Py_ssize_t f = 0; f < t->nfields; f++) {
        const field_t *fd = &t->fields[f];
        size_t cap = fd->kind == K_STRING ? (size_t)(fd->bytes_per_row * 1.1 * (double)n) + 64
                                           : width_of(fd->kind) * (size_t)n + 8;
        int nulls = fd->nullable && fd->kind != K_DICT; /* a dictionary's NULL is key 0 */
        if (buf_empty(&cols[f].vals, cap) < 0 || (nulls && buf_empty(&cols[f].nulls, (size_t)n + 8) < 0) ||
            (fd->kind == K_DICT && dict_reset(&cols[f].dict, fd->nullable) < 0)) {
            free_column_set(cols, t->nfields);
            return NULL;
        }
    }
    return cols;
}

static void give_column_set(Transcoder *t, column_t *cols) {
    if (t->n_spare_cols < SPARES)
        t->spare_cols[t->n_spare_cols++] = cols;
    else
        free_column_set(cols, t->nfields);
}

static int take_mem(Transcoder *t, size_t size, buf_t *out) {
    *out = (buf_t){NULL, 0, 0};
    if (t->n_spare_mem)
        *out = t->spare_mem[--t->n_spare_mem];
    return buf_empty(out, size);
}

static void give_mem(Transcoder *t, buf_t mem) {
    if (mem.p && t->n_spare_mem < SPARES)
        t->spare_mem[t->n_spare_mem++] = mem;
    else
        free(mem.p);
}

/* -- Block ------------------------------------------------------------------------ */

static void Block_dealloc(Block *b) {
    if (b->owner) {
        give_mem(b->owner, b->mem);
        Py_DECREF(b->owner);
    } else {
        free(b->mem.p);
    }
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static int Block_getbuffer(Block *b, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)b, b->mem.p ? b->mem.p : (uint8_t *)"", (Py_ssize_t)b->mem.len, 1,
                             flags);
}

static Py_ssize_t Block_len(Block *b) { return (Py_ssize_t)b->mem.len; }

static PyBufferProcs Block_as_buffer = {(getbufferproc)Block_getbuffer, NULL};
static PySequenceMethods Block_as_sequence = {.sq_length = (lenfunc)Block_len};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fdpass.sinks._avro_to_native.Block",
    .tp_doc = "One ClickHouse Native block (read it through the buffer protocol: memoryview(block), bytes(block)).",
    .tp_basicsize = sizeof(Block),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Block_dealloc,
    .tp_as_buffer = &Block_as_buffer,
    .tp_as_sequence = &Block_as_sequence,
};

/* -- Transcoder ----------------------------------------------------------------- */

static void free_fields(Transcoder *t) {
    if (t->fields) {
        for (Py_ssize_t i = 0; i < t->nfields; i++) {
            PyMem_Free(t->fields[i].name);
            PyMem_Free(t->fields[i].head);
        }
        PyMem_Free(t->fields);
        t->fields = NULL;
    }
    PyMem_Free(t->strings);
    PyMem_Free(t->dicts);
    t->strings = t->dicts = NULL;
    t->nfields = t->nstrings = t->ndicts = 0;
}

static void Transcoder_dealloc(Transcoder *t) {
    while (t->n_spare_cols)
        free_column_set(t->spare_cols[--t->n_spare_cols], t->nfields);
    while (t->n_spare_mem)
        free(t->spare_mem[--t->n_spare_mem].p);
    free_fields(t);
    Py_CLEAR(t->columns);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int kind_of(const char *s, enum kind *out) {
    static const struct { const char *name; enum kind k; } kinds[] = {
        {"string", K_STRING}, {"long", K_LONG}, {"int", K_INT}, {"boolean", K_BOOL}, {"enum", K_ENUM}};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (strcmp(s, kinds[i].name) == 0) {
            *out = kinds[i].k;
            return 0;
        }
    return -1;
}

/* Transcoder(header: bytes, fields: [(name, Avro kind, nullable, enum symbols, ClickHouse type)]) */
static int Transcoder_init(Transcoder *t, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"header", "fields", NULL};
    Py_buffer header;
    PyObject *fields;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*O", kwlist, &header, &fields))
        return -1;
    if (t->fields) { /* another thread may be transcoding with these fields, without the GIL */
        PyErr_SetString(PyExc_TypeError, "a Transcoder is configured once");
        PyBuffer_Release(&header);
        return -1;
    }
    if (header.len != HEADER_LEN) {
        PyErr_Format(PyExc_ValueError, "header must be %d bytes, got %zd", HEADER_LEN, header.len);
        PyBuffer_Release(&header);
        return -1;
    }
    memcpy(t->header, header.buf, HEADER_LEN);
    PyBuffer_Release(&header);
    PyObject *seq = PySequence_Fast(fields, "fields must be a sequence");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "a record needs at least one field");
        goto fail;
    }
    t->fields = PyMem_Calloc((size_t)n, sizeof(field_t));
    t->strings = PyMem_Calloc((size_t)n, sizeof(Py_ssize_t));
    t->dicts = PyMem_Calloc((size_t)n, sizeof(Py_ssize_t));
    t->columns = PyTuple_New(n);
    if (!t->fields || !t->strings || !t->dicts || !t->columns) {
        PyErr_NoMemory();
        goto fail;
    }
    t->nfields = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *name, *kind, *type;
        Py_ssize_t name_len, type_len;
        int nullable, dictionary;
        long long nsym;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "s#spLs#p;each field is (name, kind, nullable, "
                              "symbols, type, low cardinality)", &name, &name_len, &kind, &nullable, &nsym, &type,
                              &type_len, &dictionary))
            goto fail;
        field_t *fd = &t->fields[i];
        if (kind_of(kind, &fd->kind) < 0) {
            PyErr_Format(PyExc_ValueError, "field %s: unsupported kind %s", name, kind);
            goto fail;
        }
        if (dictionary) {
            if (fd->kind != K_STRING) {
                PyErr_Format(PyExc_ValueError, "field %s: LowCardinality is supported for strings only", name);
                goto fail;
            }
            fd->kind = K_DICT;
            t->dicts[t->ndicts++] = i;
        }
        if (fd->kind == K_ENUM && (nsym < 1 || nsym > 127)) {
            PyErr_Format(PyExc_ValueError, "field %s: an Enum8 holds 1..127 symbols, not %lld", name, nsym);
            goto fail;
        }
        if (fd->kind == K_STRING)
            t->strings[t->nstrings++] = i;
        fd->nullable = nullable;
        fd->nsym = nsym;
        fd->bytes_per_row = 16;
        fd->name = PyMem_Malloc((size_t)name_len + 1);
        fd->head = PyMem_Malloc((size_t)name_len + (size_t)type_len + 20);
        if (!fd->name || !fd->head) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(fd->name, name, (size_t)name_len);
        fd->name[name_len] = 0;
        size_t h = put_varuint(fd->head, (uint64_t)name_len);
        memcpy(fd->head + h, name, (size_t)name_len);
        h += (size_t)name_len;
        h += put_varuint(fd->head + h, (uint64_t)type_len);
        memcpy(fd->head + h, type, (size_t)type_len);
        fd->head_len = h + (size_t)type_len;
        PyObject *col = PyUnicode_FromStringAndSize(name, name_len);
        if (!col)
            goto fail;
        PyTuple_SET_ITEM(t->columns, i, col);
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    free_fields(t);
    Py_CLEAR(t->columns);
    return -1;
}

/* The block: counts, then each column's header, null map and values. */
static void assemble(const Transcoder *t, const column_t *cols, Py_ssize_t rows, buf_t *out) {
    uint8_t *o = out->p;
    o += put_varuint(o, (uint64_t)t->nfields);
    o += put_varuint(o, (uint64_t)rows);
    for (Py_ssize_t f = 0; f < t->nfields; f++) {
        const field_t *fd = &t->fields[f];
        memcpy(o, fd->head, fd->head_len);
        o += fd->head_len;
        if (fd->kind == K_DICT) {
            o = dict_write(&cols[f].dict, (const uint32_t *)cols[f].vals.p, (size_t)rows, o);
            continue;
        }
        if (fd->nullable) {
            memcpy(o, cols[f].nulls.p, (size_t)rows);
            o += rows;
        }
        memcpy(o, cols[f].vals.p, cols[f].vals.len);
        o += cols[f].vals.len;
    }
    out->len = (size_t)(o - out->p);
}

static PyObject *Transcoder_transcode(Transcoder *t, PyObject *values) {
    if (!t->fields) {
        PyErr_SetString(PyExc_RuntimeError, "Transcoder not initialised");
        return NULL;
    }
    PyObject *items = PySequence_Tuple(values); /* holds every value while the GIL is released */
    if (!items)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    const uint8_t **data = PyMem_Malloc(sizeof(*data) * (size_t)(n ? n : 1));
    Py_ssize_t *lens = PyMem_Malloc(sizeof(*lens) * (size_t)(n ? n : 1));
    column_t *cols = NULL;
    rejects_t rejects = {NULL, 0, 0};
    Block *block = NULL;
    PyObject *result = NULL, *rejected = NULL;
    if (!data || !lens) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(items, i);
        if (PyBytes_Check(v)) {
            data[i] = (const uint8_t *)PyBytes_AS_STRING(v);
            lens[i] = PyBytes_GET_SIZE(v);
        } else if (v == Py_None) { /* a Kafka message without a value */
            data[i] = (const uint8_t *)"";
            lens[i] = 0;
        } else {
            PyErr_Format(PyExc_TypeError, "values[%zd] is %.100s, not bytes", i, Py_TYPE(v)->tp_name);
            goto done;
        }
    }
    if (!(cols = take_column_set(t, n))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t rows;
    Py_BEGIN_ALLOW_THREADS
    rows = transcode_all(t, cols, data, lens, n, &rejects);
    Py_END_ALLOW_THREADS
    if (rows < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(block = PyObject_New(Block, &BlockType)))
        goto done;
    block->owner = NULL;
    block->mem = (buf_t){NULL, 0, 0};
    if (rows > 0) {
        size_t total = 20; /* the two counts */
        for (Py_ssize_t f = 0; f < t->nfields; f++) {
            field_t *fd = &t->fields[f];
            if (fd->kind == K_STRING)
                fd->bytes_per_row = (double)cols[f].vals.len / (double)rows;
            else
                cols[f].vals.len = width_of(fd->kind) * (size_t)rows;
            if (fd->kind == K_DICT)
                total += fd->head_len + dict_size(&cols[f].dict, (size_t)rows);
            else
                total += fd->head_len + cols[f].vals.len + (fd->nullable ? (size_t)rows : 0);
        }
        if (take_mem(t, total, &block->mem) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        Py_INCREF(t);
        block->owner = t;
        Py_BEGIN_ALLOW_THREADS
        assemble(t, cols, rows, &block->mem);
        Py_END_ALLOW_THREADS
    }
    if (!(rejected = PyList_New((Py_ssize_t)rejects.len)))
        goto done;
    for (size_t i = 0; i < rejects.len; i++) {
        PyObject *item = Py_BuildValue("(nss)", rejects.v[i].index, rejects.v[i].reason, rejects.v[i].detail);
        if (!item)
            goto done;
        PyList_SET_ITEM(rejected, (Py_ssize_t)i, item);
    }
    result = Py_BuildValue("(OnO)", (PyObject *)block, rows, rejected);
done:
    Py_XDECREF((PyObject *)block);
    Py_XDECREF(rejected);
    if (cols)
        give_column_set(t, cols);
    free(rejects.v);
    PyMem_Free(data);
    PyMem_Free(lens);
    Py_DECREF(items);
    return result;
}

static PyObject *Transcoder_columns(Transcoder *t, void *closure) {
    (void)closure;
    if (!t->columns)
        Py_RETURN_NONE;
    return Py_NewRef(t->columns);
}

static PyMethodDef Transcoder_methods[] = {
    {"transcode", (PyCFunction)Transcoder_transcode, METH_O,
     "transcode(values) -> (block, rows, rejected): message values of this writer schema -> one Native block.\n"
     "rejected lists (index, reason, detail) of the messages that added no row."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Transcoder_getset[] = {
    {"columns", (getter)Transcoder_columns, NULL, "the block's column names, in order", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TranscoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fdpass.sinks._avro_to_native.Transcoder",
    .tp_doc = "Transcoder(header, fields): Avro single-object messages of one writer schema -> ClickHouse Native.\n"
              "fields: [(name, kind, nullable, enum symbols, ClickHouse type)], kind one of string, long, int,\n"
              "boolean, enum.",
    .tp_basicsize = sizeof(Transcoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Transcoder_init,
    .tp_dealloc = (destructor)Transcoder_dealloc,
    .tp_methods = Transcoder_methods,
    .tp_getset = Transcoder_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_avro_to_native",
    .m_doc = "Avro single-object messages -> one ClickHouse Native block (see Transcoder).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__avro_to_native(void) {
    if (PyType_Ready(&TranscoderType) < 0 || PyType_Ready(&BlockType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Transcoder", (PyObject *)&TranscoderType) < 0 ||
        PyModule_AddObjectRef(m, "Block", (PyObject *)&BlockType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
