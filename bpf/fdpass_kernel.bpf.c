/* fdpass kernel side, second backend: SCM_RIGHTS transfers seen where the
 * kernel moves the files (fentry/fexit), for kernels that allow it.
 *
 * docs/kernel.md ("The in-kernel backend") explains the choices; in short:
 * - Exact by construction. A SEND's fd numbers and files are the pair the
 *   kernel itself makes: fget_raw(fd) called by __scm_send() (fexit: the fd
 *   argument and the struct file * it returned, while __scm_send holds that
 *   reference). A RECV's are the pair the kernel installs: __receive_fd() (Linux
 *   5.13-6.6) or receive_fd() (later), called by scm_detach_fds() with the file
 *   from the list and returning the new fd. Nothing here reads user memory or
 *   the fd table, so nothing a process does can change what is reported.
 * - Every entry point at once: native, compat (32-bit, x32, socketcall),
 *   io_uring (inline or io-wq) and whatever comes later all reach these
 *   functions; the call's own hooks only name it (syscall, abi, sock_fd, ret).
 * - The outcome comes later than the files: a send whose files were taken can
 *   still fail (peer shut down, EAGAIN), and the call's return value is known
 *   only at its end. So FD records leave at once and user space holds them
 *   (collector/kernel_calls.py) until the thread's MSG_END (fexit of the unix
 *   socket's sendmsg/recvmsg: delivered or not, the socket) and CALL_END
 *   (fexit of __sys_{send,recv}msg, __sys_sendmmsg, do_recvmmsg or
 *   io_{send,recv}msg: syscall, abi, sock_fd, ret) records; a failed message
 *   or call drops them.
 * - transfer_id: the sender's struct scm_fp_list gets an id when its first
 *   file is taken; scm_fp_dup() (the copy that rides on the skb, and the one
 *   MSG_PEEK installs from) passes it on; the receiver reads it by its list.
 * Functions that differ between kernels are chosen by collector/probes.py
 * from BTF (RECEIVE_FD_HOOK, URING, URING_SENDMSG_ZC).
 */
#include "fdpass_common.h"

#ifndef URING
#define URING 1            /* probes.py sets 0 where io_sendmsg/io_recvmsg are missing */
#endif
#ifndef URING_SENDMSG_ZC
#define URING_SENDMSG_ZC 1 /* probes.py sets 0 where io_sendmsg_zc is missing */
#endif

#define MSG_CTRUNC_ 0x8
#define MSG_CMSG_COMPAT_ 0x80000000U
#define TS_COMPAT_ 0x0002  /* arch/x86/include/asm/thread_info.h */
#define PF_IO_WORKER_ 0x10 /* include/linux/sched.h */

/* What a thread is in the middle of, from its first moved fd to the end of
 * its call. Created only by calls that move fds; the hooks every call passes
 * (the socket's sendmsg/recvmsg, the call's end) cost one missed look-up. */
struct kcall {
    u64 scm;        /* the scm_cookie __scm_send is filling / scm_detach_fds is emptying; 0 between */
    u64 fpl;        /* its SCM_RIGHTS list */
    u64 xid;        /* that list's transfer id (0: not known) */
    u64 started;    /* bpf_ktime_get_ns() when the entry was made: names this call (task_cached) */
    u32 msg_index;  /* messages of the call finished so far */
    u32 nfds;       /* FD records of the current message */
    u32 records;    /* FD records of the call */
    s32 uring_fd;   /* io_uring: the request's fd, read as it is issued (-1: a fixed file) */
    u8 direction;
};

BPF_TABLE("lru_hash", u32, struct kcall, kcalls, 16384);
BPF_TABLE("lru_hash", u64, u64, xids, 16384); /* struct scm_fp_list address -> transfer id */
BPF_PERCPU_ARRAY(kwork, struct fdp_event, 1);
/* Whose task fields (fill_task) this CPU's kwork holds: thread and call. The
 * FD records of one call carry the same ones, so only its first record on a
 * CPU fills them; any other record written there (another thread's, or a
 * MSG_END/CALL_END, which rewrite part of them) clears or changes this. */
struct kwork_owner {
    u64 started;
    u32 tid;
};
BPF_PERCPU_ARRAY(kwork_owners, struct kwork_owner, 1);
/* kcalls entries in existence, all threads together. The hooks every call
 * passes (the socket's sendmsg/recvmsg, the call's end, every fget_raw) read
 * this one slot first and leave when it is 0, without hashing the thread id:
 * on a machine that is not passing fds at that moment a plain sendmsg costs
 * no map look-up (docs/kernel.md, "Cost"). It can only be too high (an entry
 * the LRU evicted, or whose call end was never seen, is not subtracted),
 * which costs the look-up again, never an event. */
BPF_ARRAY(kcalls_live, u64, 1);

static __always_inline void kcalls_live_add(u64 n) {
    u32 zero = 0;
    u64 *live = kcalls_live.lookup(&zero);
    if (live)
        __sync_fetch_and_add(live, n);
}

static __always_inline struct kcall *kcall_of(void) {
    u32 zero = 0;
    u64 *live = kcalls_live.lookup(&zero);
    if (live && *live == 0)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    return kcalls.lookup(&tid);
}

static __always_inline struct kcall *kcall_begin(u8 direction, int fresh_call) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct kcall *c = kcalls.lookup(&tid);
    if (c && c->direction == direction && !fresh_call)
        return c;
    int existed = c != 0;
    struct kcall fresh = {.direction = direction, .uring_fd = -1, .started = bpf_ktime_get_ns()};
    kcalls.update(&tid, &fresh);
    c = kcalls.lookup(&tid);
    if (!c)
        stat_inc(FDP_STAT_PENDING_FULL);
    else if (!existed)
        kcalls_live_add(1);
    return c;
}

static __always_inline struct fdp_event *scratch(void) {
    u32 zero = 0;
    return kwork.lookup(&zero);
}

/* ev's task fields for the current thread's call c: filled by the call's
 * first record on this CPU, kept by the next ones (see kwork_owners). */
static __always_inline int task_fields(struct fdp_event *ev, struct kcall *c, u64 task) {
    u32 zero = 0, tid = (u32)bpf_get_current_pid_tgid();
    struct kwork_owner *o = kwork_owners.lookup(&zero);
    if (!o)
        return -1;
    if (o->tid == tid && o->started == c->started) {
        ev->ktime_ns = bpf_ktime_get_ns();
        return 0;
    }
    o->tid = 0;
    if (fill_task(ev, task, KREAD(u32, task, OFF_TASK_FLAGS) & PF_IO_WORKER_) != 0)
        return -1;
    o->tid = tid;
    o->started = c->started;
    return 0;
}

/* One passed fd, while the kernel holds a reference to its file. */
static __always_inline void emit_fd(void *ctx, struct kcall *c, s32 fd, u64 file) {
    struct fdp_event *ev = scratch();
    if (!ev)
        return;
    u64 task = bpf_get_current_task();
    if (task_fields(ev, c, task) != 0)
        return;
    ev->kind = FDP_KIND_FD;
    ev->direction = c->direction;
    ev->probe = FDP_PROBE_FENTRY;
    ev->flags = FDP_F_VERIFIED;
    ev->fd = fd;
    ev->fd_index = c->nfds;
    ev->msg_index = c->msg_index;
    ev->transfer_id = c->xid;
    /* Known only at the message's and the call's end: user space fills them in. */
    ev->fd_count = 0;
    ev->sock_fd = -1;
    ev->sock_ino = 0;
    ev->peer_sock_ino = 0;
    ev->syscall = 0;
    ev->abi = 0;
    ev->ret = 0;
    struct kpath root = {};
    task_root(task, &root);
    fill_file(ev, file, &root);
    c->nfds += 1;
    c->records += 1;
    emit_event(ctx, ev);
}

/* A header-only record (MSG_END, CALL_END) of the current thread. */
static __always_inline struct fdp_event *marker(u8 kind, struct kcall *c) {
    struct fdp_event *ev = scratch();
    u32 zero = 0;
    struct kwork_owner *o = kwork_owners.lookup(&zero);
    if (!ev || !o)
        return 0;
    o->tid = 0; /* the task fields below are this record's, not a call's FD records' */
    u64 pid_tgid = bpf_get_current_pid_tgid();
    ev->ktime_ns = bpf_ktime_get_ns();
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->kind = kind;
    ev->direction = c->direction;
    ev->probe = FDP_PROBE_FENTRY;
    ev->flags = 0;
    ev->path_len = 0;
    ev->ncomp = 0;
    ev->msg_index = c->msg_index;
    return ev;
}

/* ---------------------------------------------------------------- SEND */

KFUNC_PROBE(__scm_send, void *sock, void *msg, void *scm) {
    if (filtered_out())
        return 0;
    struct kcall *c = kcall_begin(FDP_DIR_SEND, 0);
    if (c) {
        c->scm = (u64)scm;
        c->nfds = 0;
    }
    return 0;
}

/* scm_fp_copy() (inlined into __scm_send) takes each fd's file with fget_raw. */
KRETFUNC_PROBE(fget_raw, unsigned int fd, void *file) {
    if (!file)
        return 0;
    struct kcall *c = kcall_of();
    if (!c || !c->scm || c->direction != FDP_DIR_SEND)
        return 0;
    u64 fpl = KREAD(u64, c->scm, OFF_SCM_COOKIE_FP);
    if (fpl != c->fpl) {
        c->fpl = fpl;
        c->xid = next_id(1);
        xids.update(&fpl, &c->xid);
    }
    emit_fd(ctx, c, (s32)fd, (u64)file);
    return 0;
}

KRETFUNC_PROBE(__scm_send, void *sock, void *msg, void *scm, int ret) {
    struct kcall *c = kcall_of();
    if (c)
        c->scm = 0;
    return 0;
}

/* The copy of the list that rides on the skb (unix_attach_fds), and the one a
 * MSG_PEEK receive installs from: the same transfer. */
KRETFUNC_PROBE(scm_fp_dup, void *fpl, void *dup) {
    if (!dup)
        return 0;
    u64 from = (u64)fpl, to = (u64)dup;
    u64 *xid = xids.lookup(&from);
    if (xid) {
        u64 v = *xid;
        xids.update(&to, &v);
    }
    return 0;
}

/* ---------------------------------------------------------------- RECV */

KFUNC_PROBE(scm_detach_fds, void *msg, void *scm) {
    if (filtered_out())
        return 0;
    struct kcall *c = kcall_begin(FDP_DIR_RECV, 0);
    if (!c)
        return 0;
    u64 fpl = KREAD(u64, scm, OFF_SCM_COOKIE_FP);
    u64 *xid = xids.lookup(&fpl);
    c->scm = (u64)scm;
    c->fpl = fpl;
    c->xid = xid ? *xid : 0;
    c->nfds = 0;
    return 0;
}

KRETFUNC_PROBE(scm_detach_fds, void *msg, void *scm) {
    struct kcall *c = kcall_of();
    if (c)
        c->scm = 0;
    return 0;
}

/* ufd: where scm_detach_fds has the new fd written in the receiver's control
 * buffer (NULL for pidfd_getfd and seccomp, which are not SCM_RIGHTS). */
static __always_inline int on_receive(void *ctx, void *file, void *ufd, int ret) {
    if (ret < 0 || !ufd)
        return 0;
    struct kcall *c = kcall_of();
    if (!c || !c->scm || c->direction != FDP_DIR_RECV)
        return 0;
    emit_fd(ctx, c, ret, (u64)file);
    return 0;
}

#if RECEIVE_FD_HOOK == 1
KRETFUNC_PROBE(__receive_fd, void *file, void *ufd, unsigned int o_flags, int ret) {
    return on_receive(ctx, file, ufd, ret);
}
#else
KRETFUNC_PROBE(receive_fd, void *file, void *ufd, unsigned int o_flags, int ret) {
    return on_receive(ctx, file, ufd, ret);
}
#endif

/* ------------------------------------------------ message and call ends */

/* The unix socket's sendmsg/recvmsg returned: one message done. ok: its fds
 * reached the peer's queue (a 0-byte stream send queues nothing) or, for a
 * receive, were installed. */
static __always_inline int msg_end(void *ctx, u64 sock, int ok, u64 msg) {
    struct kcall *c = kcall_of();
    if (!c)
        return 0;
    if (c->nfds) {
        struct fdp_event *ev = marker(FDP_KIND_MSG_END, c);
        if (ev) {
            ev->fd_count = c->nfds;
            ev->fd_index = ok;
            /* SOCK_INODE(): the inode sits beside the socket in struct socket_alloc */
            ev->sock_ino = KREAD(u64, sock, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
            ev->peer_sock_ino = 0;
            u64 peer = KREAD(u64, KREAD(u64, sock, OFF_SOCKET_SK), OFF_UNIX_SOCK_PEER);
            u64 psocket = peer ? KREAD(u64, peer, OFF_SOCK_SK_SOCKET) : 0;
            if (psocket) {
                ev->peer_sock_ino = KREAD(u64, psocket, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
                ev->flags |= FDP_F_PEER;
            }
            if (msg && (KREAD(u32, msg, OFF_MSGHDR_MSG_FLAGS) & MSG_CTRUNC_))
                ev->flags |= FDP_F_CTRUNC;
            emit_event(ctx, ev);
        }
    }
    c->msg_index += 1;
    c->nfds = 0;
    return 0;
}

KRETFUNC_PROBE(unix_stream_sendmsg, void *sock, void *msg, u64 len, int ret) {
    return msg_end(ctx, (u64)sock, ret > 0, 0);
}

/* unix_seqpacket_sendmsg calls this one too. */
KRETFUNC_PROBE(unix_dgram_sendmsg, void *sock, void *msg, u64 len, int ret) {
    return msg_end(ctx, (u64)sock, ret >= 0, 0);
}

KRETFUNC_PROBE(unix_stream_recvmsg, void *sock, void *msg, u64 size, int flags, int ret) {
    return msg_end(ctx, (u64)sock, 1, (u64)msg);
}

/* Datagram and seqpacket receives both run this (not unix_dgram_recvmsg:
 * Debian's 6.1 inlines that into unix_seqpacket_recvmsg). */
KRETFUNC_PROBE(__unix_dgram_recvmsg, void *sk, void *msg, u64 size, int flags, int ret) {
    return msg_end(ctx, KREAD(u64, sk, OFF_SOCK_SK_SOCKET), 1, (u64)msg);
}

static __always_inline int call_end(void *ctx, u8 syscall, u8 abi, s32 sock_fd, long ret) {
    struct kcall *c = kcall_of();
    if (!c)
        return 0;
    if (c->records) {
        struct fdp_event *ev = marker(FDP_KIND_CALL_END, c);
        if (ev) {
            ev->syscall = syscall;
            ev->abi = abi;
            ev->sock_fd = sock_fd;
            ev->ret = ret;
            emit_event(ctx, ev);
        }
    }
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (kcalls.delete(&tid) == 0)
        kcalls_live_add((u64)-1);
    return 0;
}

/* MSG_CMSG_COMPAT marks the compat entry points (32-bit programs, int $0x80,
 * x32); of those, ia32 tasks have TS_COMPAT set for the call. */
static __always_inline u8 abi_of(u32 flags) {
    if (!(flags & MSG_CMSG_COMPAT_))
        return FDP_ABI_X86_64;
    return KREAD(u32, bpf_get_current_task(), OFF_TASK_TI_STATUS) & TS_COMPAT_ ? FDP_ABI_IA32 : FDP_ABI_X32;
}

KRETFUNC_PROBE(__sys_sendmsg, int fd, void *msg, unsigned int flags, int forbid, long ret) {
    return call_end(ctx, FDP_SYS_SENDMSG, abi_of(flags), fd, ret);
}

KRETFUNC_PROBE(__sys_sendmmsg, int fd, void *mmsg, unsigned int vlen, unsigned int flags, int forbid, int ret) {
    return call_end(ctx, FDP_SYS_SENDMMSG, abi_of(flags), fd, ret);
}

KRETFUNC_PROBE(__sys_recvmsg, int fd, void *msg, unsigned int flags, int forbid, long ret) {
    return call_end(ctx, FDP_SYS_RECVMSG, abi_of(flags), fd, ret);
}

/* Not __sys_recvmmsg: Debian's 6.1 inlines it into the native syscall, so
 * its fexit sees only the compat calls. Every recvmmsg runs do_recvmmsg. */
KRETFUNC_PROBE(do_recvmmsg, int fd, void *mmsg, unsigned int vlen, unsigned int flags, void *timeout, int ret) {
    return call_end(ctx, FDP_SYS_RECVMMSG, abi_of(flags), fd, ret);
}

#if URING
/* io_uring: the request's fd is in its CQE's fd field until the result is
 * set (the field is shared with the CQE flags), so it is read as the request
 * is issued; a fixed-file request names a slot, not an fd. The result is in
 * the CQE once the handler returns 0 (IOU_OK); -EAGAIN means it runs again
 * later (async), and what this attempt moved failed with it. */
static __always_inline int uring_begin(u64 req, u8 direction) {
    if (filtered_out())
        return 0;
    struct kcall *c = kcall_begin(direction, 1);
    if (c)
        c->uring_fd = KREAD(u64, req, OFF_IO_KIOCB_FLAGS) & 1 /* REQ_F_FIXED_FILE */ ? -1
                    : KREAD(s32, req, OFF_IO_KIOCB_CQE + OFF_IO_CQE_FD);
    return 0;
}

static __always_inline int uring_end(void *ctx, u64 req, u8 syscall, int ret) {
    struct kcall *c = kcall_of();
    if (!c)
        return 0;
    long res = ret == 0 ? (long)KREAD(s32, req, OFF_IO_KIOCB_CQE + OFF_IO_CQE_RES) : ret;
    u64 ring = KREAD(u64, req, OFF_IO_KIOCB_CTX);
    u8 abi = (KREAD(u8, ring, OFF_IO_RING_CTX_COMPAT_BYTE) >> OFF_IO_RING_CTX_COMPAT_BIT) & 1 ? FDP_ABI_IA32
                                                                                          : FDP_ABI_X86_64;
    return call_end(ctx, syscall, abi, c->uring_fd, res);
}

KFUNC_PROBE(io_sendmsg, void *req, unsigned int issue_flags) { return uring_begin((u64)req, FDP_DIR_SEND); }

KRETFUNC_PROBE(io_sendmsg, void *req, unsigned int issue_flags, int ret) {
    return uring_end(ctx, (u64)req, FDP_SYS_URING_SENDMSG, ret);
}

KFUNC_PROBE(io_recvmsg, void *req, unsigned int issue_flags) { return uring_begin((u64)req, FDP_DIR_RECV); }

KRETFUNC_PROBE(io_recvmsg, void *req, unsigned int issue_flags, int ret) {
    return uring_end(ctx, (u64)req, FDP_SYS_URING_RECVMSG, ret);
}

#if URING_SENDMSG_ZC
KFUNC_PROBE(io_sendmsg_zc, void *req, unsigned int issue_flags) { return uring_begin((u64)req, FDP_DIR_SEND); }

KRETFUNC_PROBE(io_sendmsg_zc, void *req, unsigned int issue_flags, int ret) {
    return uring_end(ctx, (u64)req, FDP_SYS_URING_SENDMSG_ZC, ret);
}
#endif
#endif
