/* Passes the fds of PATH... to itself over a socketpair through one chosen
 * entry point, so the probes must see compat (32-bit) system calls.
 * Built twice: xfer32 (gcc -m32 -D_FILE_OFFSET_BITS=64) and xfer64.
 *
 *   xfer MODE PATH...
 *   sendmsg          sendmsg/recvmsg as direct system calls (i386: 370/372,
 *                    which Debian's i386 libc never uses: it goes through socketcall)
 *   mmsg             libc sendmmsg/recvmmsg, 2 messages each carrying every fd
 *   recvmmsg64       (32-bit) libc sendmmsg, then recvmmsg_time64 (417) raw
 *   recvmmsg32       (32-bit) libc sendmmsg, then the old recvmmsg (337) raw
 *   socketcall       (32-bit) int $0x80 socketcall SYS_SENDMSG / SYS_RECVMSG
 *   socketcall_mmsg  (32-bit) int $0x80 socketcall SYS_SENDMMSG / SYS_RECVMMSG
 *   int80            (64-bit) socketcall SYS_SENDMSG / SYS_RECVMSG through
 *                    int $0x80: compat calls from a 64-bit program, with
 *                    32-bit structures placed below 4 GiB by hand
 */
#include "truth.h"

#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#define SC_SENDMSG 16
#define SC_RECVMSG 17
#define SC_RECVMMSG 19
#define SC_SENDMMSG 20

static int nfds, fds[MAXFD];

static void check(const char *what, long ret, long want)
{
    if (ret == want)
        return;
    if (ret == -1)
        die("%s: %s", what, strerror(errno));
    if (ret < 0)
        die("%s: %s", what, strerror((int)-ret));
    die("%s returned %ld, expected %ld", what, ret, want);
}

/* One native msghdr: to send (every fd in one SCM_RIGHTS cmsg) or to receive into. */
struct nmsg {
    struct msghdr h;
    struct iovec iov;
    char data;
    union {
        char buf[CMSG_SPACE(MAXFD * sizeof(int))];
        struct cmsghdr align;
    } ctrl;
};

static void prepare(struct nmsg *m, int sending)
{
    memset(m, 0, sizeof *m);
    m->data = 'x';
    m->iov.iov_base = &m->data;
    m->iov.iov_len = 1;
    m->h.msg_iov = &m->iov;
    m->h.msg_iovlen = 1;
    m->h.msg_control = m->ctrl.buf;
    m->h.msg_controllen = sizeof m->ctrl.buf;
    if (!sending)
        return;
    m->h.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&m->h);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
}

static void record(struct msgrec *r, struct nmsg *received)
{
    r->nsent = nfds;
    for (int i = 0; i < nfds; i++)
        r->sent[i] = stat_fd(fds[i]);
    r->nrecv = native_rights(&received->h, r->recv);
}

#ifdef __i386__
#define ABI "IA32"
_Static_assert(__NR_recvmmsg_time64 == 417 && __NR_recvmmsg == 337, "i386 recvmmsg numbers");

/* socketcall(2) the way libc would: int $0x80, eax 102, ebx the call, ecx its arguments. */
static long socketcall80(long call, unsigned long a0, unsigned long a1, unsigned long a2, unsigned long a3)
{
    unsigned long args[6] = {a0, a1, a2, a3, 0, 0};
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "0"(102L), "b"(call), "c"(args) : "memory");
    return ret;
}
#else
#define ABI "X86_64"

/* The compat (i386) layouts, all 32-bit fields: no padding on either ABI. */
struct msghdr32 {
    uint32_t name, namelen, iov, iovlen, control, controllen, flags;
};
struct iovec32 {
    uint32_t base, len;
};
struct cmsghdr32 {
    uint32_t len;
    int32_t level, type;
};
_Static_assert(sizeof(struct msghdr32) == 28 && sizeof(struct cmsghdr32) == 12, "compat layouts");

#define CTRL32 (sizeof(struct cmsghdr32) + MAXFD * 4)

/* Everything one compat socketcall reads or writes; lives in a MAP_32BIT page. */
struct low {
    uint32_t args[6];
    struct msghdr32 h;
    struct iovec32 iov;
    char data;
    uint32_t ctrl[CTRL32 / 4];
};

static uint32_t lo32(const void *p)
{
    uintptr_t v = (uintptr_t)p;
    if (v >> 32)
        die("%p is above 4 GiB", p);
    return (uint32_t)v;
}

static long int80_socketcall(long call, struct low *l)
{
    long ret;
    __asm__ volatile("int $0x80"
                     : "=a"(ret)
                     : "0"(102L), "b"(call), "c"((long)lo32(l->args))
                     : "memory", "r8", "r9", "r10", "r11");
    return (int)ret;
}

static struct low *low_page(int sock)
{
    struct low *l = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (l == MAP_FAILED)
        die("mmap MAP_32BIT: %s", strerror(errno));
    l->data = 'x';
    l->iov.base = lo32(&l->data);
    l->iov.len = 1;
    l->h.iov = lo32(&l->iov);
    l->h.iovlen = 1;
    l->h.control = lo32(l->ctrl);
    l->h.controllen = CTRL32;
    l->args[0] = sock;
    l->args[1] = lo32(&l->h);
    l->args[2] = 0;
    return l;
}

static void int80_transfer(int s, int r, struct msgrec *rec)
{
    struct low *snd = low_page(s), *rcv = low_page(r);
    struct cmsghdr32 hdr = {sizeof hdr + nfds * 4, SOL_SOCKET, SCM_RIGHTS};
    memcpy(snd->ctrl, &hdr, sizeof hdr);
    memcpy((char *)snd->ctrl + sizeof hdr, fds, nfds * 4);
    snd->h.controllen = sizeof hdr + nfds * 4;
    check("int $0x80 socketcall(SYS_SENDMSG)", int80_socketcall(SC_SENDMSG, snd), 1);
    check("int $0x80 socketcall(SYS_RECVMSG)", int80_socketcall(SC_RECVMSG, rcv), 1);

    if (rcv->h.flags & MSG_CTRUNC)
        die("MSG_CTRUNC on the compat receive");
    rec->nsent = nfds;
    for (int i = 0; i < nfds; i++)
        rec->sent[i] = stat_fd(fds[i]);
    rec->nrecv = 0;
    const char *p = (const char *)rcv->ctrl;
    for (uint32_t off = 0; off + sizeof hdr <= rcv->h.controllen;) {
        struct cmsghdr32 c;
        memcpy(&c, p + off, sizeof c);
        if (c.len < sizeof c || off + c.len > rcv->h.controllen)
            die("bad compat cmsg at %u", off);
        if (c.level == SOL_SOCKET && c.type == SCM_RIGHTS)
            for (uint32_t i = 0; i < (c.len - sizeof c) / 4; i++) {
                int fd;
                memcpy(&fd, p + off + sizeof c + 4 * i, 4);
                if (rec->nrecv == MAXFD)
                    die("more than %d fds received", MAXFD);
                rec->recv[rec->nrecv++] = stat_fd(fd);
            }
        off += (c.len + 3) & ~3u;
    }
}
#endif

enum how { SYSCALL_MSG, LIBC_MMSG, RAW_417, RAW_337, SOCKETCALL_MSG, SOCKETCALL_MMSG };

static int transfer(enum how send, enum how recv, int s, int r, struct msgrec *rec)
{
    struct nmsg out[2], in[2];
    struct mmsghdr vout[2], vin[2];
    int n = send == SYSCALL_MSG || send == SOCKETCALL_MSG ? 1 : 2;
    for (int i = 0; i < n; i++) {
        prepare(&out[i], 1);
        prepare(&in[i], 0);
        vout[i] = (struct mmsghdr){out[i].h, 0};
        vin[i] = (struct mmsghdr){in[i].h, 0};
    }
    switch (send) {
    case SYSCALL_MSG:
        check("sendmsg", syscall(SYS_sendmsg, s, &out[0].h, 0), 1);
        break;
    case LIBC_MMSG:
        check("sendmmsg", sendmmsg(s, vout, 2, 0), 2);
        break;
#ifdef __i386__
    case SOCKETCALL_MSG:
        check("socketcall(SYS_SENDMSG)", socketcall80(SC_SENDMSG, s, (unsigned long)&out[0].h, 0, 0), 1);
        break;
    case SOCKETCALL_MMSG:
        check("socketcall(SYS_SENDMMSG)", socketcall80(SC_SENDMMSG, s, (unsigned long)vout, 2, 0), 2);
        break;
#endif
    default:
        die("unsupported send method");
    }
    switch (recv) {
    case SYSCALL_MSG:
        check("recvmsg", syscall(SYS_recvmsg, r, &in[0].h, 0), 1);
        break;
    case LIBC_MMSG:
        check("recvmmsg", recvmmsg(r, vin, 2, 0, NULL), 2);
        break;
#ifdef __i386__
    case RAW_417:
        check("recvmmsg_time64", syscall(__NR_recvmmsg_time64, r, vin, 2, 0, NULL), 2);
        break;
    case RAW_337:
        check("recvmmsg (337)", syscall(__NR_recvmmsg, r, vin, 2, 0, NULL), 2);
        break;
    case SOCKETCALL_MSG:
        check("socketcall(SYS_RECVMSG)", socketcall80(SC_RECVMSG, r, (unsigned long)&in[0].h, 0, 0), 1);
        break;
    case SOCKETCALL_MMSG:
        check("socketcall(SYS_RECVMMSG)", socketcall80(SC_RECVMMSG, r, (unsigned long)vin, 2, 0), 2);
        break;
#endif
    default:
        die("unsupported receive method");
    }
    for (int i = 0; i < n; i++) {
        if (n == 2) /* the kernel updated the vector's copies of the headers */
            in[i].h = vin[i].msg_hdr;
        record(&rec[i], &in[i]);
    }
    return n;
}

static const struct {
    const char *mode;
    enum how send, recv;
    int type;
} MODES[] = {
    {"sendmsg", SYSCALL_MSG, SYSCALL_MSG, SOCK_STREAM},
    {"mmsg", LIBC_MMSG, LIBC_MMSG, SOCK_SEQPACKET},
#ifdef __i386__
    {"recvmmsg64", LIBC_MMSG, RAW_417, SOCK_SEQPACKET},
    {"recvmmsg32", LIBC_MMSG, RAW_337, SOCK_SEQPACKET},
    {"socketcall", SOCKETCALL_MSG, SOCKETCALL_MSG, SOCK_STREAM},
    {"socketcall_mmsg", SOCKETCALL_MMSG, SOCKETCALL_MMSG, SOCK_SEQPACKET},
#else
    {"int80", SOCKETCALL_MSG, SOCKETCALL_MSG, SOCK_STREAM}, /* by int80_transfer */
#endif
};

int main(int argc, char **argv)
{
    if (argc < 3)
        die("usage: %s MODE PATH...", argv[0]);
    int m = -1;
    for (unsigned i = 0; i < sizeof MODES / sizeof MODES[0]; i++)
        if (strcmp(argv[1], MODES[i].mode) == 0)
            m = i;
    if (m < 0)
        die("%s: mode %s is not available in this (%s) build", argv[0], argv[1], ABI);
    nfds = open_paths(argc - 2, argv + 2, fds);
    int sv[2];
    if (socketpair(AF_UNIX, MODES[m].type, 0, sv) != 0)
        die("socketpair: %s", strerror(errno));

    struct msgrec rec[2];
    struct truth t = {ABI, MODES[m].mode, gettid(), gettid(), sv[0], sv[1], 0, rec, NULL};
#ifndef __i386__
    if (strcmp(argv[1], "int80") == 0) {
        t.abi = "IA32";
        int80_transfer(sv[0], sv[1], rec);
        t.nmsg = 1;
        print_truth(&t);
        return 0;
    }
#endif
    t.nmsg = transfer(MODES[m].send, MODES[m].recv, sv[0], sv[1], rec);
    print_truth(&t);
    return 0;
}
