/*
 * fdpass.collector._capture: the capture hot path in C (issue 10).
 *
 * bcc's ring buffer consumer calls back into Python once per record, and each
 * record then takes the Python decode/enrich/encode path (~6 us): the
 * collector topped out near 50k events/s. Here Python runs once per batch:
 *
 * RingBuffer(map_fd, data_size)
 *     The BPF_MAP_TYPE_RINGBUF map mmapped from its fd (kernel/bpf/ringbuf.c):
 *     page 0 is the consumer position (read-write), then the producer
 *     position page and the data area, mapped twice back to back (read-only)
 *     so a record that wraps is still contiguous. Each record has an 8-byte
 *     header: u32 length with BUSY (1 << 31, not committed yet) and DISCARD
 *     (1 << 30) bits, u32 page offset; records are 8-byte aligned.
 *   .wait(timeout_ms) -> bool   epoll on the map fd (the kernel wakes it
 *                               every WAKE_EVERY records, so callers also
 *                               drain on a timer)
 *   .read(max_records) -> list[bytes]   committed records, oldest first,
 *                               copied out; their space is released
 *   .discard() -> int           release every committed record unread
 *                               (the benchmark's kernel-only floor)
 *
 * EventEncoder(header, id_prefix, task_part, file_types, abis, json=False)
 *     kernel records (struct fdp_event, bpf/fdpass.h) -> Avro single-object
 *     messages, the bytes codec.encode(Enricher.event(record)) gives, or
 *     with json=True the line json.dumps(Enricher.event(record)) gives
 *     (property tests compare them). The fields that are the same for every
 *     fd of one task, socket and syscall (host .. peer_sock_ino, with exe and
 *     container id from /proc) come from the Python callback task_part(raw)
 *     -> bytes, cached here by those record fields; the rest is written here.
 *   .encode(records, clock_offset_ns) -> (values, n_send, n_recv, others)
 *     others: records this encoder leaves to the Python path (loss records,
 *     short ones, values out of Avro's range, a failing task_part), so their
 *     accounting and error messages stay in one place.
 *   .clear()   forget the cached task parts (exe follows an exec)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "../bpf/fdpass.h"

/* ---------------------------------------------------------------- ring buffer */

#define RB_BUSY (1U << 31)
#define RB_DISCARD (1U << 30)
#define RB_HDR 8

typedef struct {
    PyObject_HEAD
    int epfd;
    size_t page, data_size;
    unsigned long *consumer; /* page 0 */
    unsigned long *producer; /* the read-only mapping's first page */
    unsigned char *data;
    size_t ro_len;
} RingBuffer;

static int RingBuffer_init(RingBuffer *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"map_fd", "data_size", NULL};
    int fd;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "in", kwlist, &fd, &size))
        return -1;
    self->page = (size_t)sysconf(_SC_PAGESIZE);
    if (size <= 0 || (size & (size - 1)) || (size_t)size % self->page) {
        PyErr_Format(PyExc_ValueError, "ring buffer size %zd is not a power-of-two number of pages", size);
        return -1;
    }
    self->data_size = (size_t)size;
    void *c = mmap(NULL, self->page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (c == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->consumer = c;
    self->ro_len = self->page + 2 * self->data_size;
    void *p = mmap(NULL, self->ro_len, PROT_READ, MAP_SHARED, fd, (off_t)self->page);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        munmap(c, self->page);
        self->consumer = NULL;
        return -1;
    }
    self->producer = p;
    self->data = (unsigned char *)p + self->page;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void RingBuffer_dealloc(RingBuffer *self) {
    if (self->producer)
        munmap(self->producer, self->ro_len);
    if (self->consumer)
        munmap(self->consumer, self->page);
    if (self->epfd > 0)
        close(self->epfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *RingBuffer_wait(RingBuffer *self, PyObject *arg) {
    int timeout = (int)PyLong_AsLong(arg);
    if (timeout == -1 && PyErr_Occurred())
        return NULL;
    struct epoll_event ev;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(self->epfd, &ev, 1, timeout);
    Py_END_ALLOW_THREADS
    if (n < 0 && errno != EINTR)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(n > 0);
}

/* Walk committed records from the consumer position; copy each out when `out`
 * is given. The consumer position is published once at the end (the kernel
 * only reads it to see how much space is free). */
static Py_ssize_t rb_take(RingBuffer *self, PyObject *out, Py_ssize_t max) {
    size_t mask = self->data_size - 1;
    unsigned long cons = __atomic_load_n(self->consumer, __ATOMIC_ACQUIRE);
    unsigned long prod = __atomic_load_n(self->producer, __ATOMIC_ACQUIRE);
    Py_ssize_t n = 0;
    while (cons < prod && n < max) {
        uint32_t *hdr = (uint32_t *)(self->data + (cons & mask));
        uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
        if (len & RB_BUSY)
            break; /* reserved, not committed yet: later records wait behind it */
        uint32_t body = len & ~(RB_BUSY | RB_DISCARD);
        if (!(len & RB_DISCARD)) {
            if (out) {
                PyObject *b = PyBytes_FromStringAndSize((const char *)hdr + RB_HDR, body);
                if (!b || PyList_Append(out, b) < 0) {
                    Py_XDECREF(b);
                    break; /* leave this record for the next read */
                }
                Py_DECREF(b);
            }
            n++;
        }
        cons += (body + RB_HDR + 7) & ~7UL;
        if (cons >= prod)
            prod = __atomic_load_n(self->producer, __ATOMIC_ACQUIRE);
    }
    __atomic_store_n(self->consumer, cons, __ATOMIC_RELEASE);
    return n;
}

static PyObject *RingBuffer_read(RingBuffer *self, PyObject *arg) {
    Py_ssize_t max = PyLong_AsSsize_t(arg);
    if (max == -1 && PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    rb_take(self, out, max);
    if (PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *RingBuffer_discard(RingBuffer *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(rb_take(self, NULL, PY_SSIZE_T_MAX));
}

static PyMethodDef RingBuffer_methods[] = {
    {"wait", (PyCFunction)RingBuffer_wait, METH_O, "wait(timeout_ms) -> bool: epoll on the map fd"},
    {"read", (PyCFunction)RingBuffer_read, METH_O, "read(max_records) -> list of committed records (bytes)"},
    {"discard", (PyCFunction)RingBuffer_discard, METH_NOARGS, "release every committed record unread; -> count"},
    {NULL},
};

static PyTypeObject RingBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fdpass.collector._capture.RingBuffer",
    .tp_basicsize = sizeof(RingBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RingBuffer_init,
    .tp_dealloc = (destructor)RingBuffer_dealloc,
    .tp_methods = RingBuffer_methods,
};

/* ---------------------------------------------------------------- encoder */

#define HEADER_SIZE offsetof(struct fdp_event, path)

/* Superblock magics (collector/records.py, include/uapi/linux/magic.h). */
#define SOCKFS_MAGIC 0x534F434B
#define PIPEFS_MAGIC 0x50495045
#define ANON_INODE_FS_MAGIC 0x09041934
#define NSFS_MAGIC 0x6E736673
#define DMA_BUF_MAGIC 0x444D4142

enum { FT_REGULAR, FT_DIRECTORY, FT_CHAR, FT_BLOCK, FT_FIFO, FT_SOCKET, FT_SYMLINK, FT_ANON, FT_UNKNOWN, FT_N };
enum { ABI_N = 4 };

typedef struct {
    PyObject_HEAD
    char header[16];
    Py_ssize_t header_len;
    char prefix[256];
    Py_ssize_t prefix_len;
    PyObject *task_part; /* callable raw -> bytes */
    PyObject *cache;     /* dict: task key (bytes) -> encoded task part (bytes) */
    unsigned char file_types[FT_N]; /* enum index of each FT_* in the schema */
    unsigned char abis[ABI_N];      /* enum index of abi code 0..3 (unknown codes: X86_64) */
    int json;                       /* write JSON lines instead of Avro messages */
} EventEncoder;

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} buf;

static int b_reserve(buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int b_put(buf *b, const void *s, Py_ssize_t n) {
    if (b_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static inline int b_long(buf *b, int64_t n) {
    if (b_reserve(b, 10) < 0)
        return -1;
    uint64_t z = ((uint64_t)n << 1) ^ (uint64_t)(n >> 63);
    while (z > 0x7F) {
        b->p[b->len++] = (char)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    b->p[b->len++] = (char)z;
    return 0;
}

static inline int b_str(buf *b, const char *s, Py_ssize_t n) {
    return b_long(b, n) < 0 ? -1 : b_put(b, s, n);
}

static int EventEncoder_init(EventEncoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"header", "id_prefix", "task_part", "file_types", "abis", "json", NULL};
    const char *header, *prefix, *ft, *abis;
    Py_ssize_t hlen, plen, ftlen, abilen;
    PyObject *task_part;
    int json = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y#s#Oy#y#|p", kwlist, &header, &hlen, &prefix, &plen,
                                     &task_part, &ft, &ftlen, &abis, &abilen, &json))
        return -1;
    self->json = json;
    if (hlen > (Py_ssize_t)sizeof(self->header) || plen > (Py_ssize_t)sizeof(self->prefix) - 1 ||
        ftlen != FT_N || abilen != ABI_N) {
        PyErr_SetString(PyExc_ValueError, "EventEncoder: header, prefix or enum tables of the wrong size");
        return -1;
    }
    memcpy(self->header, header, hlen);
    self->header_len = hlen;
    memcpy(self->prefix, prefix, plen);
    self->prefix_len = plen;
    memcpy(self->file_types, ft, FT_N);
    memcpy(self->abis, abis, ABI_N);
    Py_INCREF(task_part);
    Py_XSETREF(self->task_part, task_part);
    Py_XSETREF(self->cache, PyDict_New());
    return self->cache ? 0 : -1;
}

static void EventEncoder_dealloc(EventEncoder *self) {
    Py_XDECREF(self->task_part);
    Py_XDECREF(self->cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The record fields Enricher._task_part() reads (collector/enrich.py
 * _TASK_FIELDS, and whether peer_sock_ino is known): equal keys, equal part. */
struct task_key {
    uint64_t cgroup_id, sock_ino, peer_sock_ino;
    uint32_t pid, tid, ppid, uid, gid, mntns_id, pidns_id, netns_id;
    int32_t sock_fd;
    uint8_t direction, syscall, abi, probe, peer;
    char comm[FDP_COMM_LEN], parent_comm[FDP_COMM_LEN];
};

static int file_type(const struct fdp_event *e) {
    if (e->flags & FDP_F_NO_FILE)
        return FT_UNKNOWN;
    if (e->sb_magic == ANON_INODE_FS_MAGIC)
        return FT_ANON;
    switch (e->i_mode & 0170000) {
    case 0100000: return FT_REGULAR;
    case 0040000: return FT_DIRECTORY;
    case 0020000: return FT_CHAR;
    case 0060000: return FT_BLOCK;
    case 0010000: return FT_FIFO;
    case 0140000: return FT_SOCKET;
    case 0120000: return FT_SYMLINK;
    }
    return FT_UNKNOWN;
}

/* A kernel name as records.decode_name() renders it: UTF-8 as is, any other
 * byte as \xNN (Python's own decoder does the rare non-ASCII case). */
static int put_name(buf *b, const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] >= 0x80) {
            PyObject *u = PyUnicode_DecodeUTF8(s, n, "backslashreplace");
            if (!u)
                return -1;
            Py_ssize_t ulen;
            const char *utf8 = PyUnicode_AsUTF8AndSize(u, &ulen);
            int rc = utf8 ? b_put(b, utf8, ulen) : -1;
            Py_DECREF(u);
            return rc;
        }
    }
    return b_put(b, s, n);
}

/* file_path as records.render_path() gives it, into b (without Avro framing).
 * raw holds components leaf first, each NUL-terminated: Python splits it on
 * NUL and drops a trailing empty piece; here the pieces are walked in place. */
static int render_path(buf *b, const struct fdp_event *e, const char *raw, Py_ssize_t n) {
    if (e->flags & FDP_F_NO_FILE)
        return 0;
    char tmp[64];
    if (e->flags & FDP_F_DNAME) {
        const char *nul = memchr(raw, 0, n);
        Py_ssize_t len0 = nul ? nul - raw : n; /* the first component (none: empty) */
        switch (e->sb_magic) {
        case SOCKFS_MAGIC:
            return b_put(b, tmp, snprintf(tmp, sizeof tmp, "socket:[%llu]", (unsigned long long)e->file_ino));
        case PIPEFS_MAGIC:
            return b_put(b, tmp, snprintf(tmp, sizeof tmp, "pipe:[%llu]", (unsigned long long)e->file_ino));
        case NSFS_MAGIC:
            return b_put(b, tmp, snprintf(tmp, sizeof tmp, "nsfs:[%llu]", (unsigned long long)e->file_ino));
        case ANON_INODE_FS_MAGIC:
            return b_put(b, "anon_inode:", 11) < 0 || put_name(b, raw, len0) < 0 ? -1 : 0;
        case DMA_BUF_MAGIC:
            return b_put(b, "/", 1) < 0 || put_name(b, raw, len0) < 0 ? -1 : 0;
        }
        /* simple_dname(): memfd, shmem and other alloc_file_pseudo() files */
        return b_put(b, "/", 1) < 0 || put_name(b, raw, len0) < 0 || b_put(b, " (deleted)", 10) < 0 ? -1 : 0;
    }
    if ((e->flags & FDP_F_PATH_TRUNC) && b_put(b, "...", 3) < 0)
        return -1;
    if (b_put(b, "/", 1) < 0)
        return -1;
    if (n > 0) {
        Py_ssize_t end = raw[n - 1] == 0 ? n - 1 : n;
        for (int first = 1;; first = 0) { /* root-most component first */
            Py_ssize_t s = end;
            while (s > 0 && raw[s - 1] != 0)
                s--;
            if ((!first && b_put(b, "/", 1) < 0) || put_name(b, raw + s, end - s) < 0)
                return -1;
            if (s == 0)
                break;
            end = s - 1;
        }
    }
    if ((e->flags & FDP_F_DELETED) && b_put(b, " (deleted)", 10) < 0)
        return -1;
    return 0;
}

/* The cached task part, or a new one from the Python callback; NULL with no
 * exception set means "leave this record to the Python path". Borrowed. */
static PyObject *task_part(EventEncoder *self, PyObject *raw, const struct fdp_event *e) {
    struct task_key k;
    memset(&k, 0, sizeof k);
    k.cgroup_id = e->cgroup_id, k.sock_ino = e->sock_ino, k.peer_sock_ino = e->peer_sock_ino;
    k.pid = e->pid, k.tid = e->tid, k.ppid = e->ppid, k.uid = e->uid, k.gid = e->gid;
    k.mntns_id = e->mntns_id, k.pidns_id = e->pidns_id, k.netns_id = e->netns_id;
    k.sock_fd = e->sock_fd, k.direction = e->direction, k.syscall = e->syscall;
    k.abi = e->abi, k.probe = e->probe, k.peer = e->flags & FDP_F_PEER;
    memcpy(k.comm, e->comm, FDP_COMM_LEN);
    memcpy(k.parent_comm, e->parent_comm, FDP_COMM_LEN);
    PyObject *key = PyBytes_FromStringAndSize((const char *)&k, sizeof k);
    if (!key)
        return NULL;
    PyObject *part = PyDict_GetItemWithError(self->cache, key);
    if (!part && !PyErr_Occurred()) {
        part = PyObject_CallOneArg(self->task_part, raw);
        if (!part || !PyBytes_Check(part)) {
            /* The Python path meets the same failure and reports it there. */
            Py_XDECREF(part);
            PyErr_Clear();
            Py_DECREF(key);
            return NULL;
        }
        if (PyDict_GET_SIZE(self->cache) >= 4096)
            PyDict_Clear(self->cache);
        int rc = PyDict_SetItem(self->cache, key, part);
        Py_DECREF(part); /* the cache holds it */
        if (rc < 0)
            part = NULL;
    }
    Py_DECREF(key);
    return part;
}

/* ---- JSON lines: json.dumps(event, separators=(",", ":")) + "\n", exactly */

static const char *FILE_TYPE_NAMES[FT_N] = {"REGULAR", "DIRECTORY", "CHAR", "BLOCK", "FIFO",
                                            "SOCKET", "SYMLINK", "ANON", "UNKNOWN"};
static const char *ABI_NAMES[ABI_N] = {"X86_64", "X86_64", "IA32", "X32"}; /* records.ABIS, X86_64 if unknown */

/* records.PROBES: the hook kind that saw the transfer. */
static const char *probe_name(unsigned char probe) {
    switch (probe) {
    case FDP_PROBE_RAW_TRACEPOINT: return "raw_tracepoint";
    case FDP_PROBE_FENTRY: return "fentry";
    default: return "tracepoint";
    }
}

static inline void put_u(buf *b, unsigned cp) {
    static const char hex[] = "0123456789abcdef"; /* json's escapes are lower case */
    char *o = b->p + b->len;
    o[0] = '\\', o[1] = 'u', o[2] = hex[cp >> 12], o[3] = hex[(cp >> 8) & 15], o[4] = hex[(cp >> 4) & 15],
    o[5] = hex[cp & 15];
    b->len += 6;
}

/* A JSON string of valid UTF-8 text as json.dumps writes it (ensure_ascii):
 * printable ASCII as is, short escapes for " \ \b \f \n \r \t, every other
 * character as \uXXXX (UTF-16 surrogate pairs past the BMP). */
static int json_str(buf *b, const char *s, Py_ssize_t n) {
    if (b_reserve(b, 6 * n + 2) < 0)
        return -1;
    b->p[b->len++] = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c <= 0x7E && c != '"' && c != '\\') {
            b->p[b->len++] = (char)c;
            continue;
        }
        const char *esc = NULL;
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        }
        if (esc) {
            b->p[b->len++] = esc[0];
            b->p[b->len++] = esc[1];
            continue;
        }
        unsigned cp = c;
        int more = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
        if (c >= 0x80)
            cp &= 0x3F >> more;
        for (; more > 0 && i + 1 < n; more--)
            cp = (cp << 6) | ((unsigned char)s[++i] & 0x3F);
        if (cp >= 0x10000) {
            cp -= 0x10000;
            put_u(b, 0xD800 | (cp >> 10));
            put_u(b, 0xDC00 | (cp & 0x3FF));
        } else {
            put_u(b, cp);
        }
    }
    b->p[b->len++] = '"';
    return 0;
}

/* A 128-bit integer in decimal (time_ns = a u64 + an offset, unbounded like Python's int). */
static int put_i128(buf *b, __int128 v) {
    char tmp[48], *o = tmp + sizeof tmp;
    unsigned __int128 u = v < 0 ? -(unsigned __int128)v : (unsigned __int128)v;
    do {
        *--o = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (v < 0)
        *--o = '-';
    return b_put(b, o, tmp + sizeof tmp - o);
}

static int json_event(buf *b, buf *path, const struct fdp_event *e, PyObject *part, const char *id, int idlen,
                      __int128 time_ns) {
    char num[700];
    b->len = 0;
    if (b_put(b, "{\"event_id\":", 12) < 0 || json_str(b, id, idlen) < 0 || b_put(b, ",\"time_ns\":", 11) < 0 ||
        put_i128(b, time_ns) < 0 || b_put(b, ",", 1) < 0 ||
        b_put(b, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part)) < 0 ||
        b_put(b, num, snprintf(num, sizeof num, ",\"fd\":%d,\"fd_index\":%u,\"fd_count\":%u,\"file_path\":",
                               e->fd, e->fd_index, e->fd_count)) < 0 ||
        json_str(b, path->p, path->len) < 0)
        return -1;
    unsigned char f = e->flags;
#define TF(bit) ((f & (bit)) ? "true" : "false")
    int n = snprintf(num, sizeof num,
                     ",\"file_ino\":%llu,\"file_dev\":%llu,\"file_type\":\"%s\",\"file_flags\":%u,\"ret\":%lld,"
                     "\"probe\":\"%s\",\"msg_index\":%u,\"seq\":%llu,\"path_truncated\":%s,\"fds_truncated\":%s,"
                     "\"msg_ctrunc\":%s,\"abi\":\"%s\",\"file_verified\":%s,\"transfer_id\":",
                     (unsigned long long)e->file_ino,
                     (unsigned long long)makedev(e->file_dev >> 20, e->file_dev & 0xFFFFF),
                     FILE_TYPE_NAMES[file_type(e)], e->file_flags, (long long)e->ret,
                     probe_name(e->probe), e->msg_index,
                     (unsigned long long)e->seq, TF(FDP_F_PATH_TRUNC), TF(FDP_F_FDS_TRUNC), TF(FDP_F_CTRUNC),
                     ABI_NAMES[e->abi < ABI_N ? e->abi : 0], TF(FDP_F_VERIFIED));
#undef TF
    if (b_put(b, num, n) < 0)
        return -1;
    if (e->transfer_id)
        n = snprintf(num, sizeof num, "%llu}\n", (unsigned long long)e->transfer_id);
    else
        n = snprintf(num, sizeof num, "null}\n");
    return b_put(b, num, n);
}

/* One event's message into b; 1 = leave it to the Python path, -1 = error. */
static int encode_one(EventEncoder *self, buf *b, buf *path, PyObject *raw, int64_t offset) {
    Py_ssize_t size = PyBytes_GET_SIZE(raw);
    if (size < (Py_ssize_t)HEADER_SIZE)
        return 1;
    struct fdp_event e;
    memcpy(&e, PyBytes_AS_STRING(raw), HEADER_SIZE);
    if (e.kind == FDP_KIND_LOSS)
        return 1;
    /* Avro longs and ints are signed: values past them are the Python path's
     * EncodeError to report. JSON numbers have no bound, as Python's ints. */
    __int128 time_ns = (__int128)e.ktime_ns + offset;
    if (!self->json && (time_ns > INT64_MAX || e.file_ino > INT64_MAX || e.seq > INT64_MAX ||
                        e.transfer_id > INT64_MAX || e.file_flags > INT32_MAX))
        return 1;
    PyObject *part = task_part(self, raw, &e);
    if (!part)
        return PyErr_Occurred() ? -1 : 1;

    const char *dir = e.direction == FDP_DIR_RECV ? "RECV" : "SEND";
    char id[400];
    int idlen = snprintf(id, sizeof id, "%.*s%llu:%u:%s:%u:%u", (int)self->prefix_len, self->prefix,
                         (unsigned long long)e.ktime_ns, e.tid, dir, e.msg_index, e.fd_index);
    Py_ssize_t plen = e.path_len;
    if (plen > size - (Py_ssize_t)HEADER_SIZE)
        plen = size - (Py_ssize_t)HEADER_SIZE;
    if (self->json) {
        path->len = 0;
        if (render_path(path, &e, PyBytes_AS_STRING(raw) + HEADER_SIZE, plen) < 0)
            return -1;
        return json_event(b, path, &e, part, id, idlen, time_ns);
    }
    b->len = 0;
    if (b_put(b, self->header, self->header_len) < 0 || b_str(b, id, idlen) < 0 || b_long(b, (int64_t)time_ns) < 0 ||
        b_put(b, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part)) < 0 || b_long(b, e.fd) < 0 ||
        b_long(b, e.fd_index) < 0 || b_long(b, e.fd_count) < 0)
        return -1;
    /* file_path: rendered after a 10-byte gap (an Avro long's most), then its length written in front */
    Py_ssize_t at = b->len;
    if (b_reserve(b, 10) < 0)
        return -1;
    b->len += 10;
    if (render_path(b, &e, PyBytes_AS_STRING(raw) + HEADER_SIZE, plen) < 0)
        return -1;
    Py_ssize_t slen = b->len - at - 10;
    char lenbuf[10];
    buf lb = {lenbuf, 0, sizeof lenbuf};
    b_long(&lb, slen);
    memmove(b->p + at + lb.len, b->p + at + 10, slen);
    memcpy(b->p + at, lenbuf, lb.len);
    b->len = at + lb.len + slen;

    const char *probe = probe_name(e.probe);
    unsigned char flags = e.flags;
    if (b_long(b, (int64_t)e.file_ino) < 0 ||
        b_long(b, (int64_t)makedev(e.file_dev >> 20, e.file_dev & 0xFFFFF)) < 0 ||
        b_long(b, self->file_types[file_type(&e)]) < 0 || b_long(b, e.file_flags) < 0 || b_long(b, e.ret) < 0 ||
        b_str(b, probe, (Py_ssize_t)strlen(probe)) < 0 || b_long(b, e.msg_index) < 0 ||
        b_long(b, (int64_t)e.seq) < 0 || b_reserve(b, 4) < 0)
        return -1;
    b->p[b->len++] = (flags & FDP_F_PATH_TRUNC) ? 1 : 0;
    b->p[b->len++] = (flags & FDP_F_FDS_TRUNC) ? 1 : 0;
    b->p[b->len++] = (flags & FDP_F_CTRUNC) ? 1 : 0;
    if (b_long(b, self->abis[e.abi < ABI_N ? e.abi : 0]) < 0 || b_reserve(b, 1) < 0)
        return -1;
    b->p[b->len++] = (flags & FDP_F_VERIFIED) ? 1 : 0;
    if (e.transfer_id == 0) {
        if (b_reserve(b, 1) < 0)
            return -1;
        b->p[b->len++] = 0;
    } else {
        if (b_reserve(b, 1) < 0)
            return -1;
        b->p[b->len++] = 2;
        if (b_long(b, (int64_t)e.transfer_id) < 0)
            return -1;
    }
    return 0;
}

static PyObject *EventEncoder_encode(EventEncoder *self, PyObject *args) {
    PyObject *records;
    long long offset;
    if (!PyArg_ParseTuple(args, "O!L", &PyList_Type, &records, &offset))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *values = PyList_New(0), *others = PyList_New(0);
    buf b = {NULL, 0, 0}, path = {NULL, 0, 0};
    long n_send = 0, n_recv = 0;
    if (!values || !others)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *raw = PyList_GET_ITEM(records, i);
        if (!PyBytes_Check(raw)) {
            PyErr_SetString(PyExc_TypeError, "records must be bytes");
            goto fail;
        }
        int rc = encode_one(self, &b, &path, raw, offset);
        if (rc < 0)
            goto fail;
        if (rc > 0) {
            if (PyList_Append(others, raw) < 0)
                goto fail;
            continue;
        }
        PyObject *v = PyBytes_FromStringAndSize(b.p, b.len);
        int bad = !v || PyList_Append(values, v) < 0;
        Py_XDECREF(v);
        if (bad)
            goto fail;
        if (((const struct fdp_event *)PyBytes_AS_STRING(raw))->direction == FDP_DIR_RECV)
            n_recv++;
        else
            n_send++;
    }
    PyMem_Free(b.p);
    PyMem_Free(path.p);
    return Py_BuildValue("(NllN)", values, n_send, n_recv, others);
fail:
    PyMem_Free(b.p);
    PyMem_Free(path.p);
    Py_XDECREF(values);
    Py_XDECREF(others);
    return NULL;
}

static PyObject *EventEncoder_clear(EventEncoder *self, PyObject *Py_UNUSED(ignored)) {
    PyDict_Clear(self->cache);
    Py_RETURN_NONE;
}

static PyMethodDef EventEncoder_methods[] = {
    {"encode", (PyCFunction)EventEncoder_encode, METH_VARARGS,
     "encode(records, clock_offset_ns) -> (values, n_send, n_recv, others)"},
    {"clear", (PyCFunction)EventEncoder_clear, METH_NOARGS, "forget the cached task parts"},
    {NULL},
};

static PyTypeObject EventEncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fdpass.collector._capture.EventEncoder",
    .tp_basicsize = sizeof(EventEncoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EventEncoder_init,
    .tp_dealloc = (destructor)EventEncoder_dealloc,
    .tp_methods = EventEncoder_methods,
};

static struct PyModuleDef capture_module = {
    PyModuleDef_HEAD_INIT, "fdpass.collector._capture",
    "Batched ring buffer reads and record -> Avro encoding (collector/capture.c)", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capture(void) {
    if (PyType_Ready(&RingBufferType) < 0 || PyType_Ready(&EventEncoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&capture_module);
    if (!m)
        return NULL;
    Py_INCREF(&RingBufferType);
    Py_INCREF(&EventEncoderType);
    if (PyModule_AddObject(m, "RingBuffer", (PyObject *)&RingBufferType) < 0 ||
        PyModule_AddObject(m, "EventEncoder", (PyObject *)&EventEncoderType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", (long)HEADER_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
