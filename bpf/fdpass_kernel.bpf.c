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
 *   (collector/kernel_calls.py) until the thread's CALL_END record (fexit of
 *   __sys_{send,recv}msg, __sys_sendmmsg, do_recvmmsg or io_{send,recv}msg:
 *   syscall, abi, sock_fd, ret), which also carries the end of the call's
 *   last message (fexit of the unix socket's sendmsg/recvmsg: delivered or
 *   not, the socket); earlier messages of a sendmmsg/recvmmsg end in MSG_END
 *   records. A failed message or call drops them.
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
#ifndef SAME_FORM
#define SAME_FORM 0        /* probes.py sets 1, with RENAME_LOCK and MOUNT_LOCK (kernel addresses
                              from /proc/kallsyms), where the kernel names those two seqlocks */
#endif

#define MSG_CTRUNC_ 0x8
#define MSG_CMSG_COMPAT_ 0x80000000U
#define TS_COMPAT_ 0x0002  /* arch/x86/include/asm/thread_info.h */
#define PF_IO_WORKER_ 0x10 /* include/linux/sched.h */

/* What a thread is in the middle of, from its first moved fd to the end of
 * its call. Begun only by calls that move fds; the hooks every call passes
 * (the socket's sendmsg/recvmsg, the call's end, every fget_raw) find no
 * entry of theirs in one array slot and leave. */
struct kcall {
    u64 tid;        /* owner of a slot; 0 = free (u64: BPF cmpxchg is 64-bit here) */
    u64 scm;        /* the scm_cookie __scm_send is filling / scm_detach_fds is emptying; 0 between */
    u64 fpl;        /* its SCM_RIGHTS list */
    u64 xid;        /* that list's transfer id (0: not known) */
    u64 started;    /* bpf_ktime_get_ns() when the entry was made: names this call (task_cached) */
    u64 held_sock_ino;  /* the end of the call's last finished message, held for the */
    u64 held_peer_ino;  /* CALL_END record (or a MSG_END if another message follows) */
    u32 held_index;
    u32 msg_index;  /* messages of the call finished so far */
    u32 nfds;       /* FD records of the current message */
    u32 records;    /* FD records of the call */
    s32 uring_fd;   /* io_uring: the request's fd, read as it is issued (-1: a fixed file) */
    u16 held_fd_count; /* 0: no message end held */
    u8 held_ok;
    u8 held_flags;
    u8 direction;
    u8 spilled;     /* the entry is in kcall_spill, not in a slot */
#if SAME_FORM
    /* What a receive of the list needs to reuse this send's walks (same_*(),
     * docs/kernel.md "Receives reuse the send's walk"). */
    u32 same_emitted;  /* SEND: bit i = list index i's FD record is in the ring buffer */
    u32 same_slot;     /* RECV: 1 + the xid_slots index holding the list's send, 0: none usable */
    u64 same_seqs;     /* SEND: vfs_seqs() before the list's first walk */
    struct kpath same_root;             /* SEND: the sender's root */
    u64 same_files[FDP_SAME_FDS];       /* SEND: the struct file * of each such record */
#endif
};

#ifndef KCALL_SLOTS
#define KCALL_SLOTS 16384 /* power of two */
#endif
/* Per-call state by thread: slot tid % KCALL_SLOTS, claimed with a
 * compare-and-swap on its tid; a thread whose slot another live call holds
 * takes the spill map (LRU: an entry whose call end never came cannot fill
 * it), and kcall_spilled says whether any entry is there, so the usual case
 * makes no hash look-up at all (docs/kernel.md, "Cost"). */
BPF_ARRAY(kcall_slots, struct kcall, KCALL_SLOTS);
BPF_TABLE("lru_hash", u32, struct kcall, kcall_spill, 16384);
BPF_ARRAY(kcall_spilled, u64, 1); /* entries put in kcall_spill and not yet taken out */
/* Transfer ids by struct scm_fp_list address (docs/kernel.md, "transfer_id"):
 * a slot per address hash, holding the list a copy (scm_fp_dup) was made to
 * until a receiver installs from it (scm_detach_fds frees the slot: that list
 * is freed after the receive). A list freed unseen (a socket closed with fds
 * queued) leaves its slot taken until its address comes back in a new list;
 * a copy whose slot holds another list goes to xids, an LRU hash (taken
 * out by its receive too), and xids_spilled says whether anything ever did. */
struct xid_slot {
    u64 fpl;        /* 0 = free */
    u64 xid;
#if SAME_FORM
    /* The send's facts (struct kcall's same_*), for a copy made by the
     * sender's call; same_emitted 0 for any other copy (MSG_PEEK's). */
    u32 same_emitted;
    u32 _pad;
    u64 same_seqs;
    struct kpath same_root;
    u64 same_files[FDP_SAME_FDS];
#endif
};
#ifndef XID_SLOTS
#define XID_SLOTS 16384 /* power of two */
#endif
BPF_ARRAY(xid_slots, struct xid_slot, XID_SLOTS);
BPF_TABLE("lru_hash", u64, u64, xids, 16384);
BPF_ARRAY(xids_spilled, u64, 1);

static __always_inline u32 xid_slot_index(u64 fpl) {
    return (u32)((fpl * 0x9E3779B97F4A7C15ULL) >> 40) & (XID_SLOTS - 1);
}

static __always_inline struct xid_slot *xid_slot_of(u64 fpl) {
    u32 idx = xid_slot_index(fpl);
    return xid_slots.lookup(&idx);
}

/* The transfer id of list fpl, or 0. take: this receive installs from fpl,
 * which is freed after it, so its slot is freed now. */
static __always_inline u64 xid_of(u64 fpl, int take) {
    struct xid_slot *s = xid_slot_of(fpl);
    if (s && s->fpl == fpl) {
        u64 v = s->xid;
        if (take)
            __sync_val_compare_and_swap(&s->fpl, fpl, 0);
        return v;
    }
    u32 zero = 0;
    u64 *n = xids_spilled.lookup(&zero);
    if (!n || *n == 0)
        return 0;
    u64 *v = xids.lookup(&fpl);
    if (!v)
        return 0;
    u64 id = *v;
    if (take)
        xids.delete(&fpl);
    return id;
}

#if SAME_FORM
/* A copy's slot takes the send's facts from the call that made it (0: none). */
static __always_inline void same_keep(struct xid_slot *s, struct kcall *sender) {
    u32 emitted = sender ? sender->same_emitted : 0;
    s->same_emitted = emitted;
    if (!emitted)
        return;
    s->same_seqs = sender->same_seqs;
    s->same_root = sender->same_root;
    __builtin_memcpy(s->same_files, sender->same_files, sizeof(s->same_files));
}
#endif

/* List fpl (a copy just made, not yet queued or installed) belongs to
 * transfer v (0: not known; then an entry a freed list at that address left
 * must not name it). sender: the sending call's state when it made the copy
 * (its send's facts go with the slot), else 0. */
static __always_inline void xid_set(u64 fpl, u64 v, struct kcall *sender) {
    struct xid_slot *s = xid_slot_of(fpl);
    if (!s)
        return;
    if (!v) {
        __sync_val_compare_and_swap(&s->fpl, fpl, 0);
        u32 zero = 0;
        u64 *n = xids_spilled.lookup(&zero);
        if (n && *n)
            xids.delete(&fpl);
        return;
    }
    /* Its own address (a list freed unseen, now reused) or a free slot. */
    if (s->fpl == fpl || __sync_val_compare_and_swap(&s->fpl, 0, fpl) == 0) {
        s->xid = v;
#if SAME_FORM
        same_keep(s, sender);
#endif
        return;
    }
    u32 zero = 0;
    u64 *n = xids_spilled.lookup(&zero);
    if (n && *n == 0)
        __sync_fetch_and_add(n, 1);
    xids.update(&fpl, &v);
}
BPF_PERCPU_ARRAY(kwork, struct fdp_event, 1);
/* Whose task fields (fill_task) and root this CPU's kwork holds: thread and
 * call. The FD records of one call carry the same ones, so only its first
 * record on a CPU fills them; a MSG_END/CALL_END written there (which
 * rewrites part of them) clears this. */
struct kwork_owner {
    u64 started;
    struct kpath root;
    u32 tid;
};
BPF_PERCPU_ARRAY(kwork_owners, struct kwork_owner, 1);

static __always_inline struct kcall *kcall_of(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 idx = tid & (KCALL_SLOTS - 1), zero = 0;
    struct kcall *c = kcall_slots.lookup(&idx);
    if (c && c->tid == tid)
        return c;
    u64 *n = kcall_spilled.lookup(&zero);
    if (!n || *n == 0)
        return 0;
    return kcall_spill.lookup(&tid);
}

static __always_inline struct kcall *kcall_begin(u8 direction, int fresh_call) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct kcall *c = kcall_of();
    if (c && c->direction == direction && !fresh_call)
        return c;
    struct kcall fresh = {.tid = tid, .direction = direction, .uring_fd = -1, .started = bpf_ktime_get_ns()};
    if (c) { /* this thread's entry of an earlier call whose end was not seen */
        fresh.spilled = c->spilled;
        *c = fresh;
        return c;
    }
    u32 idx = tid & (KCALL_SLOTS - 1), zero = 0;
    c = kcall_slots.lookup(&idx);
    if (!c)
        return 0;
    /* Claim the slot atomically: two CPUs may find it free at once. */
    if (__sync_val_compare_and_swap(&c->tid, 0, (u64)tid) == 0) {
        *c = fresh;
        return c;
    }
    /* Another live call holds the slot. */
    fresh.spilled = 1;
    u64 *n = kcall_spilled.lookup(&zero);
    if (!n || kcall_spill.update(&tid, &fresh) != 0) {
        stat_inc(FDP_STAT_PENDING_FULL);
        return 0;
    }
    __sync_fetch_and_add(n, 1);
    stat_inc(FDP_STAT_SPILLED);
    return kcall_spill.lookup(&tid);
}

/* The call is over: free its slot or spill entry. */
static __always_inline void kcall_end(struct kcall *c) {
    if (!c->spilled) {
        c->tid = 0;
        return;
    }
    u32 tid = (u32)bpf_get_current_pid_tgid(), zero = 0;
    u64 *n = kcall_spilled.lookup(&zero);
    if (kcall_spill.delete(&tid) == 0 && n)
        __sync_fetch_and_add(n, (u64)-1);
}

static __always_inline struct fdp_event *scratch(void) {
    u32 zero = 0;
    return kwork.lookup(&zero);
}

/* ev's task fields for the current thread's call c, and the task's root
 * (where paths start): filled by the call's first record on this CPU, kept by
 * the next ones (see kwork_owners). */
static __always_inline struct kwork_owner *task_fields(struct fdp_event *ev, struct kcall *c) {
    u32 zero = 0, tid = (u32)bpf_get_current_pid_tgid();
    struct kwork_owner *o = kwork_owners.lookup(&zero);
    if (!o)
        return 0;
    if (o->tid == tid && o->started == c->started) {
        ev->ktime_ns = bpf_ktime_get_ns();
        return o;
    }
    o->tid = 0;
    u64 task = bpf_get_current_task();
    if (fill_task(ev, task, KREAD(u32, task, OFF_TASK_FLAGS) & PF_IO_WORKER_) != 0)
        return 0;
    task_root(task, &o->root);
    o->tid = tid;
    o->started = c->started;
    return o;
}

#if SAME_FORM
/* Receives reuse the send's walk (docs/kernel.md, "Receives reuse the send's
 * walk"). A path can change only by a rename (every d_move runs under
 * rename_lock's write side), a mount change (mount_lock's) or the file's own
 * dentry being dropped (unlink: FDP_F_DELETED, read again at the receive); a
 * receive whose sequences are the send's saw none since the send's walk. */
static __always_inline u64 vfs_seqs(void) {
    return ((u64)KREAD(u32, RENAME_LOCK, 0) << 32) | KREAD(u32, MOUNT_LOCK, 0);
}
#define SEQS_ODD 0x100000001ULL /* a writer in its section: no reuse */
#define XID_N(x) ((x) & 0xFFFFFFFFFFFFULL)

/* What the receive itself reads of its file for an FDP_KIND_FD_SAME record:
 * the open flags (fcntl F_SETFL changes them on the shared file) and whether
 * its dentry is dropped now (walk_path's d_unlinked() test). */
static __always_inline void same_file_now(struct fdp_event *ev, u64 file) {
    struct kpath fp = {};
#if WINDOWS
    u64 w[(FILE_HI - FILE_LO + 7) / 8];
    WIN_READ(w, file, FILE_LO, FILE_HI);
    ev->file_flags = WIN_AT(u32, w, FILE_LO, OFF_FILE_F_FLAGS);
    fp.dentry = WIN_AT(u64, w, FILE_LO, OFF_FILE_F_PATH + 8);
#else
    ev->file_flags = KREAD(u32, file, OFF_FILE_F_FLAGS);
    fp.dentry = KREAD(u64, file, OFF_FILE_F_PATH + 8);
#endif
    struct dent d = {};
    read_dent(fp.dentry, &d, 1);
    if (!d.pprev && d.parent != fp.dentry)
        ev->flags |= FDP_F_DELETED;
}

/* Receive of list index i of file into ev (header filled): the short
 * record when the list's send left an FD record for this very file, from the
 * same root, with no rename or mount change since; 0 when it left, else the
 * caller walks. The ring buffer place is taken BEFORE the id counter is read:
 * every record ahead of this one then carries an id below the value read, so
 * user space, which forgets a transfer only after a SEND record FDP_SAME_SPAN
 * ids later (bpf/fdpass.h), still has this one's SEND record. */
static __always_inline int emit_same(struct kcall *c, struct fdp_event *ev, const struct kpath *root, u32 i,
                                     u64 file) {
    if (!c->same_slot || i >= FDP_SAME_FDS)
        return -1;
    u32 idx = c->same_slot - 1;
    struct xid_slot *s = xid_slots.lookup(&idx);
    if (!s || s->fpl != c->fpl || !((s->same_emitted >> i) & 1) ||
        s->same_files[i & (FDP_SAME_FDS - 1)] != file || s->same_root.mnt != root->mnt ||
        s->same_root.dentry != root->dentry)
        return -1;
    struct fdp_event *r = events.ringbuf_reserve(offsetof(struct fdp_event, path));
    if (!r)
        return -1;
    u32 one = 1;
    u64 *n = seqno.lookup(&one);
    if (!n || *n - XID_N(c->xid) >= FDP_SAME_SPAN) {
        events.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
        return -1;
    }
    ev->kind = FDP_KIND_FD_SAME;
    ev->path_len = 0;
    ev->ncomp = 0;
    ev->file_ino = 0;
    ev->file_dev = 0;
    ev->i_mode = 0;
    ev->sb_magic = 0;
    same_file_now(ev, file);
    ev->seq = next_id(0);
    __builtin_memcpy(r, ev, offsetof(struct fdp_event, path));
    events.ringbuf_submit(r, wake_flag(ev->seq));
    stat_inc(FDP_STAT_EVENTS);
    return 0;
}
#endif

/* One passed fd, while the kernel holds a reference to its file. */
static __always_inline void emit_fd(void *ctx, struct kcall *c, s32 fd, u64 file) {
    struct fdp_event *ev = scratch();
    if (!ev)
        return;
    struct kwork_owner *o = task_fields(ev, c);
    if (!o)
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
    u32 i = c->nfds;
    c->nfds += 1;
    c->records += 1;
#if SAME_FORM
    if (c->direction == FDP_DIR_RECV && emit_same(c, ev, &o->root, i, file) == 0)
        return;
#endif
    fill_file(ev, file, &o->root);
    int sent = emit_event(ctx, ev);
#if SAME_FORM
    if (c->direction == FDP_DIR_SEND && sent == 0 && i < FDP_SAME_FDS) {
        c->same_files[i & (FDP_SAME_FDS - 1)] = file;
        c->same_emitted |= 1U << i;
        c->same_root = o->root;
    }
#endif
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
        /* Each message's list is new (scm_send starts it empty), even where
         * the allocator hands it the address of the one a sendmmsg freed
         * after its previous message: its first file takes a new id, and
         * its address is read once, at the exit. */
        c->fpl = 0;
    }
    return 0;
}

/* scm_fp_copy() (inlined into __scm_send) takes each fd's file with fget_raw. */
#define LIST_PENDING 1 /* kcall.fpl of a send whose list has files, until __scm_send's exit */
KRETFUNC_PROBE(fget_raw, unsigned int fd, void *file) {
    if (!file)
        return 0;
    struct kcall *c = kcall_of();
    if (!c || !c->scm || c->direction != FDP_DIR_SEND)
        return 0;
    if (!c->fpl) {
        /* No xids entry for it: receivers install from its copies (scm_fp_dup). */
        c->fpl = LIST_PENDING;
        c->xid = next_id(1);
#if SAME_FORM
        c->same_emitted = 0;
        c->same_seqs = vfs_seqs(); /* before the list's first walk */
#endif
    }
    emit_fd(ctx, c, (s32)fd, (u64)file);
    return 0;
}

KRETFUNC_PROBE(__scm_send, void *sock, void *msg, void *scm, int ret) {
    struct kcall *c = kcall_of();
    if (!c)
        return 0;
    if (c->fpl == LIST_PENDING) /* its copy (scm_fp_dup, next) is known by this address */
        c->fpl = KREAD(u64, scm, OFF_SCM_COOKIE_FP);
    c->scm = 0;
    return 0;
}

/* The copy of the list that rides on the skb (unix_attach_fds, in the
 * sender's call: its id is the call's), and the one a MSG_PEEK receive
 * installs from (a copy of the skb's list): the same transfer. */
/* An fexit argument's address as a plain number: the verifier types BTF
 * pointer arguments and refuses the hash's multiply on a pointer. */
static __always_inline u64 addr_of(void *p) {
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), &p);
    return v;
}

KRETFUNC_PROBE(scm_fp_dup, void *fpl, void *dup) {
    if (!dup)
        return 0;
    u64 from = addr_of(fpl), v;
    struct kcall *c = kcall_of();
    if (c && c->direction == FDP_DIR_SEND && c->fpl == from) {
        v = c->xid;
    } else {
        v = xid_of(from, 0);
        c = 0; /* a MSG_PEEK copy: its receive walks */
    }
    xid_set(addr_of(dup), v, c);
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
    c->scm = (u64)scm;
    c->fpl = fpl;
    c->nfds = 0;
#if SAME_FORM
    /* The list's slot is freed at the exit, not here: the installs read the
     * send's facts in it (the list, alive until after the exit, keeps any
     * other list from its address). */
    c->same_slot = 0;
    u32 idx = xid_slot_index(fpl);
    struct xid_slot *s = xid_slots.lookup(&idx);
    if (s && s->fpl == fpl) {
        c->xid = s->xid;
        if (s->same_emitted && !(s->same_seqs & SEQS_ODD) && s->same_seqs == vfs_seqs())
            c->same_slot = idx + 1;
        return 0;
    }
#endif
    c->xid = xid_of(fpl, 1);
    return 0;
}

KRETFUNC_PROBE(scm_detach_fds, void *msg, void *scm) {
    struct kcall *c = kcall_of();
    if (!c)
        return 0;
    c->scm = 0;
#if SAME_FORM
    if (c->direction == FDP_DIR_RECV) {
        struct xid_slot *s = xid_slot_of(c->fpl);
        if (s)
            __sync_val_compare_and_swap(&s->fpl, c->fpl, 0);
        c->same_slot = 0;
    }
#endif
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

/* The end of the call's held message into ev (MSG_END fields; also carried
 * by the CALL_END record that ends the call). */
static __always_inline void held_end(struct fdp_event *ev, struct kcall *c) {
    ev->msg_index = c->held_index;
    ev->fd_count = c->held_fd_count;
    ev->fd_index = c->held_ok;
    ev->sock_ino = c->held_sock_ino;
    ev->peer_sock_ino = c->held_peer_ino;
    ev->flags |= c->held_flags;
}

/* The unix socket's sendmsg/recvmsg returned: one message done. ok: its fds
 * reached the peer's queue (a 0-byte stream send queues nothing) or, for a
 * receive, were installed. Its end is held in c, not sent: the call's
 * CALL_END record carries it (one record per single-message call); only when
 * another message of the call ends after it does it leave as a MSG_END. */
static __always_inline int msg_end(void *ctx, u64 sock, int ok, u64 msg) {
    struct kcall *c = kcall_of();
    if (!c)
        return 0;
    if (c->nfds) {
        if (c->held_fd_count) {
            struct fdp_event *ev = marker(FDP_KIND_MSG_END, c);
            if (ev) {
                held_end(ev, c);
                emit_event(ctx, ev);
            }
        }
        c->held_index = c->msg_index;
        c->held_fd_count = c->nfds;
        c->held_ok = ok;
        c->held_flags = 0;
        /* SOCK_INODE(): the inode sits beside the socket in struct socket_alloc */
        c->held_sock_ino = KREAD(u64, sock, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
        c->held_peer_ino = 0;
        u64 peer = KREAD(u64, KREAD(u64, sock, OFF_SOCKET_SK), OFF_UNIX_SOCK_PEER);
        u64 psocket = peer ? KREAD(u64, peer, OFF_SOCK_SK_SOCKET) : 0;
        if (psocket) {
            c->held_peer_ino = KREAD(u64, psocket, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
            c->held_flags |= FDP_F_PEER;
        }
        if (msg && (KREAD(u32, msg, OFF_MSGHDR_MSG_FLAGS) & MSG_CTRUNC_))
            c->held_flags |= FDP_F_CTRUNC;
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
            ev->fd_count = 0;
            if (c->held_fd_count)
                held_end(ev, c); /* and the end of its last message: fd_count > 0 says so */
            emit_event(ctx, ev);
        }
    }
    kcall_end(c);
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
