/* fdpass kernel side: SCM_RIGHTS transfers seen from tracepoints only.
 *
 * docs/kernel.md explains the why of every choice here; in short:
 * - Hooks: the machines fdpass must run on have no kprobes and refuse fentry.
 *   Native 64-bit calls come from syscalls:sys_{enter,exit}_{send,recv}{,m}msg;
 *   32-bit (compat) calls never fire those, so raw_syscalls sys_enter/sys_exit
 *   catch them (an id test, then the task's TS_COMPAT bit); io_uring requests
 *   make no syscall at all: io_uring:io_uring_submit_req / io_uring_complete.
 * - No struct types: the kernel headers bcc compiles against may not match the
 *   running kernel, so every kernel struct member is read at a byte offset
 *   (OFF_*) that collector/probes.py takes from /sys/kernel/btf/vmlinux and
 *   passes in with -D. User-space ABI structs (msghdr, mmsghdr, cmsghdr, in
 *   their 64-bit and compat layouts) are stable and read at fixed offsets.
 * - Verification: user memory (the control buffer) and the fd table can be
 *   changed by another thread while the call runs, so the file an fd number
 *   names at exit need not be the one the kernel moved. The kernel's own
 *   record of the transfer is the struct scm_fp_list on the queued skb
 *   (UNIXCB(skb).fp). SEND takes the file identity from it; RECV checks the
 *   files it finds installed against a snapshot of it. Events say which
 *   (FDP_F_VERIFIED).
 *
 * Flow, per traced call:
 *   enter: read msg_control/msg_controllen; no control data -> leave at once.
 *          Resolve the socket; not AF_UNIX -> leave. Count the call in the
 *          socket's sk_state (so exit can tell whether it ran alone on the
 *          socket) and, for RECV, snapshot the SCM_RIGHTS list at the head of
 *          the receive queue. Remember all of it by thread id (a slot array
 *          indexed by tid, with a hash map for the rare slot collision), or
 *          by request for io_uring.
 *   exit:  forget the pending entry; if the call failed, stop. Otherwise fill
 *          the per-task part of the record once, find the kernel's SCM_RIGHTS
 *          list (SEND) or the snapshot (RECV) and tail-call `walk`.
 *   walk:  a state machine over messages (sendmmsg/recvmmsg: only the `ret`
 *          messages the kernel handled) and their SCM_RIGHTS fds; per fd it
 *          resolves the file, walks the dentry chain into a path and emits one
 *          record. WALK_STEPS steps per invocation, re-invoking itself by tail
 *          call (the kernel allows 33), so 253 fds (SCM_MAX_FD) fit; whatever
 *          exceeds the budget is reported as a LOSS record, never cut silently.
 * Records go to a ring buffer without per-record wakeups; user space drains it
 * on a short timer, and every WAKE_EVERY-th record forces a wakeup.
 */
#include "fdpass_common.h"

#ifndef WALK_STEPS
#define WALK_STEPS 8       /* fds or messages handled per walk invocation */
#endif
#ifndef COMPAT
#define COMPAT 1           /* probes.py sets 0 where BTF has no thread_info.status (not x86) */
#endif
#ifndef URING
#define URING 1            /* probes.py sets 0 where the io_uring tracepoints are missing */
#endif
#define MAX_CMSGS 16       /* control messages parsed per message */
#define MAX_MSGS 1024      /* UIO_MAXIOV: sendmmsg/recvmmsg vlen limit */
#define SCM_MAX_FD 253
#define FDS_SLOTS 512      /* 2 * 256: masked offsets stay in bounds */
#define QUEUE_WALK 4       /* skbs looked at on a receive queue */
#define SNAP_FDS 16        /* fds of one SCM_RIGHTS list a RECV snapshot keeps (snap_files unrolls 16) */

#define AF_UNIX_ 1
#define SOCK_STREAM_ 1
#define SOL_SOCKET_ 1
#define SCM_RIGHTS_ 1
#define MSG_CTRUNC_ 0x8
#define MSG_PEEK_ 0x2
#define TS_COMPAT_ 0x0002  /* arch/x86/include/asm/thread_info.h */
#define X32_BIT 0x40000000ULL

/* struct user_msghdr (uapi, x86_64): msg_control at 32, then msg_controllen
 * (u64), msg_flags (u32). struct compat_msghdr: seven u32, msg_control at 16.
 * struct mmsghdr: 64 bytes; compat_mmsghdr: 32. cmsghdr: {u64 len; int level,
 * type} = 16 bytes, 8-aligned; compat_cmsghdr: {u32 len; int level, type} =
 * 12 bytes, 4-aligned. */
#define MSGHDR_CONTROL 32
#define MMSGHDR_SIZE 64
#define CMSG_HDR 16
#define C_MSGHDR_CONTROL 16
#define C_MMSGHDR_SIZE 32
#define C_CMSG_HDR 12

/* ia32 and x32 syscall numbers (arch/x86/entry/syscalls/syscall_{32,64}.tbl) */
#define NR32_SOCKETCALL 102
#define NR32_RECVMMSG 337
#define NR32_SENDMMSG 345
#define NR32_SENDMSG 370
#define NR32_RECVMSG 372
#define NR32_RECVMMSG_TIME64 417
#define NRX32_SENDMSG 518
#define NRX32_RECVMSG 519
#define NRX32_RECVMMSG 537
#define NRX32_SENDMMSG 538
/* socketcall's call numbers (include/uapi/linux/net.h) */
#define SYS_SENDMSG_ 16
#define SYS_RECVMSG_ 17
#define SYS_RECVMMSG_ 19
#define SYS_SENDMMSG_ 20

struct pending {
    u64 msgvec;  /* user pointer: msghdr, or mmsghdr array */
    u64 tid;     /* owner of a slot; 0 = free (u64: BPF cmpxchg is 64-bit here) */
    u64 sk;      /* the unix socket's struct sock */
    u64 fpl;     /* RECV: the SCM_RIGHTS list snapshotted at entry; SEND: the list this call */
    u64 skb;     /* queued, once found (0: none); and the skb it is on */
    u64 xid;     /* that list's transfer id (RECV: as seen while the list was queued) */
    u32 fcount;  /* SEND: files in that list */
    u64 enter_ns; /* when the call began */
    u64 peer;    /* SEND: the peer socket at entry, and the tail of its receive */
    u64 tail0;   /*       queue then: only an skb queued after it can be this call's */
    u64 ticket;  /* this call's number in sk_state (send or recv side) */
    u32 before;  /* calls of the same side in progress on sk at entry */
    s32 sock_fd;
    u32 flags;   /* RECV: the call's flags (MSG_PEEK) */
    u64 sk_ino;  /* the socket's inode number: with sk, its sk_states key */
    u8 syscall;
    u8 direction;
    u8 abi;
    u8 probe;
    u8 first;    /* SEND: the list found was at the head of the peer's queue */
    u8 count_only; /* counted on its socket, nothing reported (see on_enter) */
};

#ifndef PENDING_SLOTS
#define PENDING_SLOTS 65536 /* power of two */
#endif

/* Per unix socket: how many sends/receives have started and are in
 * progress. A call that ran alone on its socket (nothing else of its side
 * started or was running during it) knows that the newest SCM_RIGHTS skb its
 * socket queued is its own (docs/kernel.md, "Verification"). Each side's two
 * counts share one word, started in the high half and in progress in the
 * low, so that one atomic add takes a call's ticket and its count of calls
 * in progress together: with two adds, a call could take its ticket before
 * another's and count itself in progress after it, and neither test would
 * see it. Keyed by the socket's address and inode number: addresses are
 * reused as soon as a socket is freed, and a new socket must not inherit
 * (or race to reset) a dead one's counts. */
struct sk_key {
    u64 sk;
    u64 ino;
};

struct sk_state {
    u64 send;      /* started << 32 | in progress */
    u64 recv;
    u64 send_tid;  /* the thread of the last send that started with none in progress */
};

#define CNT_STARTED(w) ((u32)((w) >> 32))
#define CNT_ACTIVE(w) ((u32)(w))
#define CNT_ONE_STARTED (1ULL << 32)
#define CNT_START (CNT_ONE_STARTED | 1) /* one more started, and in progress */

/* One passed file as a RECV checks it: the same struct file, still on the
 * same inode, with the same open flags. */
struct snap_item {
    u64 file;
    u64 inode;
    u32 flags;
    u32 _pad;
};

/* One SCM_RIGHTS list in flight: its struct scm_fp_list and the skb it rides
 * on. Both addresses are reused as soon as they are freed (the next message
 * often gets the same pair), so the RECV that takes a list deletes its entry,
 * and an entry older than the SEND that claims it is stale. */
struct xfer_key {
    u64 fpl;
    u64 skb;
};

/* What fdpass knows of one list: its transfer id and, for a RECV to check
 * what it installed against, its files. */
struct xfer {
    u64 transfer_id;
    u64 created_ns;
    u64 owner_sk;     /* the send that queued it, once known: its socket (0: not known) */
    u64 owner_ticket; /*   and its ticket there */
    u32 count;
    u32 nsnap;   /* items[] filled (0: id only) */
    u64 first;   /* the skb was at the head of its queue when its SEND saw it */
    u64 state;   /* XF_* (u64: BPF's fetching atomics are 64-bit here) */
    struct snap_item items[SNAP_FDS];
};

/* An entry lives until both its owning SEND's exit and the RECV that takes
 * the list are done with it (the one that comes second deletes it, so the
 * LRU map never fills with spent entries and evicts live ones); an entry
 * with no owner, until that RECV's exit. A taken entry is stale: the list's
 * addresses are free for the next one. */
#define XF_SENT 1    /* the owning SEND's exit has passed */
#define XF_TAKEN 2   /* a RECV (not MSG_PEEK) installed the list */

struct work {
    struct fdp_event ev; /* shared header; per-fd fields overwritten */
    struct xfer x;       /* RECV: the snapshot the installed files are checked against */
    struct xfer_key key;
    u64 msgvec;
    struct kpath root;   /* the task's root: where paths start */
    u64 fd_array;        /* current->files->fdt->fd */
    u64 fpl;             /* SEND: the message's scm_fp_list (0: not found) */
    u64 skb;             /* SEND: the skb carrying fpl */
    u32 fpl_count;
    u32 max_fds;
    u32 nmsgs;           /* messages to examine */
    u32 msgs_total;      /* messages the kernel handled (ret) */
    u32 msg_idx;         /* next message to load */
    u32 nfds;            /* fds in the loaded message */
    u32 fd_pos;          /* next fd to emit */
    u64 cmsg_off;        /* parse position in the control buffer */
    u8 is_mmsg;
    u8 compat;
    u8 msg_flags;        /* FDP_F_* bits of the loaded message */
    u8 verify;           /* the loaded message has a kernel list (SEND) or snapshot (RECV) */
    u8 alone;            /* no other call of its side overlapped this one on its socket */
    s32 fds[FDS_SLOTS];
};

BPF_ARRAY(pending_slots, struct pending, PENDING_SLOTS);
BPF_HASH(pending_spill, u32, struct pending, 16384);
BPF_ARRAY(spilled, u64, 1); /* entries in pending_spill: exit skips its lookup at 0 */
/* io_uring: by struct io_kiocb address. A plain hash, not an LRU one: an LRU
 * map full of requests parked on purpose (receives on an empty socket) would
 * evict live entries, and their transfers would go unreported and uncounted;
 * a full plain map refuses the newcomer, which is counted (uring_full). */
BPF_HASH(uring_pending, u64, struct pending, 16384);
BPF_TABLE("lru_hash", struct sk_key, struct sk_state, sk_states, 65536);
BPF_TABLE("lru_hash", struct xfer_key, struct xfer, xfers, 16384);
BPF_PERCPU_ARRAY(work, struct work, 1);
BPF_PROG_ARRAY(progs, 1);
BPF_PROG_ARRAY(progs_raw, 1);

/* The struct sock of a socket file if it is a unix socket, else 0. */
static __always_inline u64 unix_sk_of_file(u64 file) {
    if (!file)
        return 0;
    u64 socket = KREAD(u64, file, OFF_FILE_PRIVATE_DATA);
    u64 sk = KREAD(u64, socket, OFF_SOCKET_SK);
    if (!sk || KREAD(u16, sk, OFF_SOCK_FAMILY) != AF_UNIX_)
        return 0;
    return sk;
}

static __always_inline u64 unix_sk_of_fd(s32 fd) {
    u32 max_fds = 0;
    u64 arr = fd_array_of(bpf_get_current_task(), &max_fds);
    if (fd < 0 || (u32)fd >= max_fds)
        return 0;
    return unix_sk_of_file(KREAD(u64, arr, (u64)fd * 8));
}

static __always_inline u64 skb_fpl(u64 skb) {
    return KREAD(u64, skb, OFF_SK_BUFF_CB + OFF_UNIX_SKB_PARMS_FP);
}

static __always_inline u64 sk_ino_of(u64 sk) {
    return KREAD(u64, KREAD(u64, sk, OFF_SOCK_SK_SOCKET), OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
}

static __always_inline struct sk_state *sk_state_of(u64 sk, u64 ino) {
    struct sk_key key = {.sk = sk, .ino = ino};
    return sk_states.lookup(&key);
}

/* Has the call with this ticket run alone so far on the side whose counts
 * are w (it was alone at entry: before == 0)? */
static __always_inline int none_started_since(u64 w, u64 ticket) {
    return CNT_STARTED(w) == (u32)(ticket + 1);
}

/* Count this call in its socket's sk_state (before = ~0U: untracked). */
static __always_inline void count_start(struct pending *p) {
    p->sk_ino = sk_ino_of(p->sk);
    struct sk_key key = {.sk = p->sk, .ino = p->sk_ino};
    struct sk_state zero = {};
    struct sk_state *st = sk_states.lookup(&key);
    if (!st) {
        sk_states.insert(&key, &zero);
        st = sk_states.lookup(&key);
    }
    if (!st) {
        p->before = ~0U; /* cannot tell: never "alone" */
        return;
    }
    u64 old = __sync_fetch_and_add(p->direction == FDP_DIR_SEND ? &st->send : &st->recv, CNT_START);
    p->ticket = CNT_STARTED(old);
    p->before = CNT_ACTIVE(old);
    if (p->direction == FDP_DIR_SEND && p->before == 0)
        st->send_tid = p->tid;
}

/* Close this call's count; 1 when no other call of its side overlapped it. */
static __always_inline int count_end(struct pending *p) {
    struct sk_state *st = sk_state_of(p->sk, p->sk_ino);
    if (!st || p->before == ~0U)
        return 0;
    u64 old = __sync_fetch_and_add(p->direction == FDP_DIR_SEND ? &st->send : &st->recv, -1ULL);
    return p->before == 0 && none_started_since(old, p->ticket);
}

/* Copy the first SNAP_FDS files of an SCM_RIGHTS list into x. */
static __always_inline void snap_files(struct xfer *x, u64 fpl) {
    u32 n = x->count < SNAP_FDS ? x->count : SNAP_FDS;
    x->nsnap = n;
    /* Unrolled by hand, each index a constant: older verifiers (6.1) lose
     * the bound of a loop index that clang turns into a pointer walk. */
#define SNAP_ONE(i)                                                              \
    if (n > i) {                                                                 \
        u64 file = KREAD(u64, fpl, OFF_SCM_FP_LIST_FP + i * 8);                  \
        x->items[i].file = file;                                                 \
        x->items[i].inode = KREAD(u64, file, OFF_FILE_F_INODE);                  \
        x->items[i].flags = KREAD(u32, file, OFF_FILE_F_FLAGS);                  \
    }
    SNAP_ONE(0) SNAP_ONE(1) SNAP_ONE(2) SNAP_ONE(3) SNAP_ONE(4) SNAP_ONE(5) SNAP_ONE(6) SNAP_ONE(7)
    SNAP_ONE(8) SNAP_ONE(9) SNAP_ONE(10) SNAP_ONE(11) SNAP_ONE(12) SNAP_ONE(13) SNAP_ONE(14) SNAP_ONE(15)
#undef SNAP_ONE
}

/* Do two snapshots of lists name the same files? Only the items both hold
 * are compared (an entry made by a SEND's claim and a RECV's snapshot of the
 * same list hold the same ones). */
static __always_inline int same_files(struct xfer *a, struct xfer *b) {
    if (a->count != b->count)
        return 0;
    u32 n = a->nsnap < b->nsnap ? a->nsnap : b->nsnap;
#define SAME_ONE(i)                                                              \
    if (n > i && a->items[i].file != b->items[i].file)                           \
        return 0;
    SAME_ONE(0) SAME_ONE(1) SAME_ONE(2) SAME_ONE(3) SAME_ONE(4) SAME_ONE(5) SAME_ONE(6) SAME_ONE(7)
    SAME_ONE(8) SAME_ONE(9) SAME_ONE(10) SAME_ONE(11) SAME_ONE(12) SAME_ONE(13) SAME_ONE(14) SAME_ONE(15)
#undef SAME_ONE
    return 1;
}

/* The one entry of a list in `xfers`: the first SEND or RECV that sees the
 * list inserts it with a new transfer id, a racing one reads the winner's.
 * An entry that a RECV took, that was created before `fresh_ns` (a SEND's
 * entry: the list did not exist then) or whose files differ from x's is
 * stale (its addresses were reused) and is replaced, unless it already names
 * the calling SEND (`owner`, 0 for a RECV) as its owner: a receiver handed it
 * the list (hand_to_sender) and may have taken it since. Files (x->nsnap)
 * are added when the entry has none yet. *created says whether this call
 * inserted the entry (a racing insert that lost reads the winner's). */
static __always_inline struct xfer *publish(struct xfer_key *k, struct xfer *x, u64 fresh_ns, struct pending *owner,
                                            int *created) {
    struct xfer *known = xfers.lookup(k);
    *created = 0;
    x->state = 0;
    x->owner_sk = 0;
    x->owner_ticket = 0;
    int files_differ = known && x->nsnap && known->nsnap && !same_files(known, x);
    int mine = known && owner && known->owner_sk == owner->sk && known->owner_ticket == owner->ticket;
    if (known && !mine && ((known->state & XF_TAKEN) || known->created_ns < fresh_ns || files_differ)) {
        *created = 1;
        x->transfer_id = next_id(1);
        x->created_ns = bpf_ktime_get_ns();
        xfers.update(k, x);
        return xfers.lookup(k);
    }
    if (mine && files_differ)
        return 0; /* cannot be: its own list holds other files */
    if (!known) {
        x->transfer_id = next_id(1);
        x->created_ns = bpf_ktime_get_ns();
        *created = xfers.insert(k, x) == 0;
        known = xfers.lookup(k);
        if (!known)
            return 0;
    }
    if (x->first)
        known->first = 1;
    if (!known->nsnap && x->nsnap) {
        for (int i = 0; i < SNAP_FDS; i++)
            known->items[i] = x->items[i];
        known->nsnap = x->nsnap;
    }
    return known;
}

/* A RECV found a list no SEND has claimed yet (its receiver was running, so
 * the sender woke nobody, and this receive may take the list before the
 * send's exit can find it). If the list's sending socket has exactly one send
 * in progress, that send has run alone so far, and the list's skb was queued
 * after the tail that send saw at its entry, the list is that send's: it gets
 * the list and its id. Queued after it: the old tail is not the skb itself
 * nor any skb behind it (FIFO; had the tail been taken, everything queued
 * now came later). Should the old tail's address have been reused by an skb
 * queued since, the send just gets nothing. */
static __always_inline void hand_to_sender(struct pending *r, u64 skb, u64 fpl, struct xfer *known) {
    u64 from = KREAD(u64, skb, OFF_SK_BUFF_SK);
    if (!from)
        return;
    u64 from_ino = sk_ino_of(from);
    struct sk_state *st = sk_state_of(from, from_ino);
    if (!st || CNT_ACTIVE(st->send) != 1)
        return;
    u32 tid = (u32)st->send_tid;
    u32 idx = tid & (PENDING_SLOTS - 1);
    struct pending *s = pending_slots.lookup(&idx);
    if (!s || s->tid != tid || s->sk != from || s->sk_ino != from_ino || s->direction != FDP_DIR_SEND ||
        s->fpl || s->before != 0 ||
        s->syscall == FDP_SYS_SENDMMSG || s->peer != r->sk)
        return;
    u64 head = r->sk + OFF_SOCK_SK_RECEIVE_QUEUE, tail0 = s->tail0, n = skb;
    for (int i = 0; i < QUEUE_WALK; i++) {
        if (n == tail0)
            return; /* queued before the send began */
        n = KREAD(u64, n, OFF_SK_BUFF_NEXT);
        if (!n)
            return;
        if (n == head)
            break;
    }
    if (n != head)
        return; /* more of the queue than walked: cannot tell */
    u64 ticket = s->ticket;
    if (!none_started_since(st->send, ticket))
        return;
    /* The owner is the send with the ticket checked above: should the slot
     * have passed to the thread's next call meanwhile, that call's exit finds
     * another ticket in the entry and takes nothing from it. */
    known->owner_sk = from;
    known->owner_ticket = ticket;
    s->skb = skb;
    s->fcount = known->count;
    s->xid = known->transfer_id;
    s->first = 0; /* being taken: nothing for sched_waking to hand on */
    s->fpl = fpl;
}

/* RECV entry: the first SCM_RIGHTS list at the head of sk's receive queue is
 * what this call is about to install (a stream read stops at the first skb
 * with fds). Snapshot its files into `xfers`, keeping the transfer id a SEND
 * gave it. Notes the list and its skb in p (fpl 0: none). */
static __always_inline void snapshot_head(struct pending *p) {
    u64 sk = p->sk;
    u64 skb = KREAD(u64, sk, OFF_SOCK_SK_RECEIVE_QUEUE); /* queue.next */
    u64 head = sk + OFF_SOCK_SK_RECEIVE_QUEUE;
    u64 fpl = 0;
    for (int i = 0; i < QUEUE_WALK; i++) {
        if (!skb || skb == head)
            return;
        fpl = skb_fpl(skb);
        if (fpl)
            break;
        skb = KREAD(u64, skb, OFF_SK_BUFF_NEXT);
    }
    if (!fpl)
        return;
    u32 zero = 0;
    struct work *w = work.lookup(&zero);
    if (!w)
        return;
    struct xfer *x = &w->x;
    x->count = (u32)KREAD(s16, fpl, OFF_SCM_FP_LIST_COUNT);
    x->first = 0;
    snap_files(x, fpl);
    /* Still queued with this list: everything above was read while the list
     * held its files. Otherwise another reader took it meanwhile. */
    if (skb_fpl(skb) != fpl)
        return;
    struct xfer_key k = {.fpl = fpl, .skb = skb};
    int created;
    struct xfer *known = publish(&k, x, 0, 0, &created);
    if (known) {
        p->fpl = fpl;
        p->skb = skb;
        p->xid = known->transfer_id; /* checked against the entry found at exit */
        if (created)
            hand_to_sender(p, skb, fpl, known);
    }
}

/* SEND, for a call that has run alone on its socket so far: an skb on the
 * peer's queue that our socket sent with an SCM_RIGHTS list, queued after the
 * tail the call saw at entry, can only be this call's (unix queues are FIFO:
 * had the receiver taken it, it would have taken every older one too). Notes
 * it in p and gives it its transfer id. Its files are kept in the list's
 * entry: for the send's exit, should a receiver take the list first, and, at
 * the head of the queue, for a receiver asleep in recvmsg, whose entry found
 * nothing to snapshot (see sched_waking). x receives the snapshot (nsnap 0:
 * no list claimed). */
static __always_inline void claim_sent_list(struct pending *p, struct xfer *x) {
    u64 head = p->peer + OFF_SOCK_SK_RECEIVE_QUEUE;
    u64 skb = KREAD(u64, p->peer, OFF_SOCK_SK_RECEIVE_QUEUE + 8); /* queue.prev: the tail */
    u64 fpl = 0;
    for (int i = 0; i < QUEUE_WALK; i++) {
        if (!skb || skb == head || skb == p->tail0)
            return;
        if (KREAD(u64, skb, OFF_SK_BUFF_SK) == p->sk) { /* sent by our socket */
            fpl = skb_fpl(skb);
            if (fpl)
                break;
        }
        skb = KREAD(u64, skb, OFF_SK_BUFF_PREV);
    }
    if (!fpl)
        return;
    struct xfer_key k = {.fpl = fpl, .skb = skb};
    x->count = (u32)KREAD(s16, fpl, OFF_SCM_FP_LIST_COUNT);
    x->first = KREAD(u64, p->peer, OFF_SOCK_SK_RECEIVE_QUEUE) == skb;
    snap_files(x, fpl);
    /* Read while still queued, or not at all: a receiver may have taken and
     * freed the list meanwhile. And still alone now, after the walk: a send
     * that started after the caller's test of that (or the receiver's, in
     * hand_to_sender) may have queued the list just found (seen with
     * io_uring sends beside a sendmsg(2)). One that started before this
     * call did not run during it (it was alone at entry) and queued before
     * the tail the walk stops at; one that starts from here on queues after
     * what the walk saw. */
    struct sk_state *st = sk_state_of(p->sk, p->sk_ino);
    if (skb_fpl(skb) != fpl || !st || !none_started_since(st->send, p->ticket)) {
        x->nsnap = 0;
        return;
    }
    int created;
    struct xfer *known = publish(&k, x, p->enter_ns, p, &created);
    if (!known) {
        x->nsnap = 0;
        return;
    }
    /* Between the test above and the insert, a receiver may have taken the
     * list and, at its exit, deleted the entry it had made for it (no send
     * had claimed it): then the id inserted here is a second one for the
     * same list, and the two sides would be paired with different ids. A
     * list still queued after the insert cannot have been taken before it. */
    if (created && skb_fpl(skb) != fpl) {
        if (known->transfer_id == x->transfer_id)
            xfers.delete(&k);
        x->nsnap = 0;
        return;
    }
    known->owner_sk = p->sk;
    known->owner_ticket = p->ticket;
    p->fpl = fpl;
    p->skb = skb;
    p->fcount = x->count;
    p->xid = known->transfer_id;
    p->first = x->first;
}

/* Everything an enter probe does once it has a unix socket with control data. */
static __always_inline void begin_call(struct pending *p) {
    count_start(p);
    if (p->count_only)
        return;
    if (p->direction == FDP_DIR_RECV) {
        snapshot_head(p);
    } else {
        p->peer = KREAD(u64, p->sk, OFF_UNIX_SOCK_PEER);
        if (p->peer)
            p->tail0 = KREAD(u64, p->peer, OFF_SOCK_SK_RECEIVE_QUEUE + 8); /* queue.prev */
    }
}

static __always_inline void remember(u64 msgvec, s32 sock_fd, u8 syscall, u8 direction, u8 abi, u8 probe,
                                     u32 flags, u8 count_only) {
    u64 sk = unix_sk_of_fd(sock_fd);
    if (!sk)
        return; /* only unix sockets carry SCM_RIGHTS; other families ignore the cmsg */
    /* A process outside the filter is counted all the same: its sends and
     * receives on a socket it shares with one inside must keep those from
     * looking alone. */
    if (filtered_out())
        count_only = 1;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending p = {.msgvec = msgvec, .sock_fd = sock_fd, .tid = tid, .sk = sk, .syscall = syscall,
                        .direction = direction, .abi = abi, .probe = probe, .flags = flags,
                        .enter_ns = bpf_ktime_get_ns(), .count_only = count_only};
    u32 idx = tid & (PENDING_SLOTS - 1);
    struct pending *slot = pending_slots.lookup(&idx);
    if (!slot)
        return;
    /* Claim the slot atomically: two CPUs may find it free at once. */
    if (slot->tid == tid || __sync_val_compare_and_swap(&slot->tid, 0, (u64)tid) == 0) {
        begin_call(&p);
        slot->msgvec = p.msgvec;
        slot->sock_fd = p.sock_fd;
        slot->sk = p.sk;
        slot->fpl = p.fpl;
        slot->skb = p.skb;
        slot->xid = p.xid; /* RECV: the id seen at entry; a SEND claims at its exit or wakeup */
        slot->fcount = p.fcount;
        slot->first = p.first;
        slot->count_only = p.count_only;
        slot->enter_ns = p.enter_ns;
        slot->peer = p.peer;
        slot->tail0 = p.tail0;
        slot->ticket = p.ticket;
        slot->sk_ino = p.sk_ino;
        slot->before = p.before;
        slot->flags = p.flags;
        slot->syscall = p.syscall;
        slot->direction = p.direction;
        slot->abi = p.abi;
        slot->probe = p.probe;
        return;
    }
    /* Another live thread holds the slot (e.g. blocked in recvmsg). */
    u32 zero = 0;
    u64 *n = spilled.lookup(&zero);
    begin_call(&p);
    if (pending_spill.update(&tid, &p) != 0) {
        /* Not tracked: its count stays open (see on_uring_submit); a loss
         * only for a call that would have been reported. */
        if (!p.count_only)
            stat_inc(FDP_STAT_PENDING_FULL);
    } else {
        stat_inc(FDP_STAT_SPILLED);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
}

/* A single-message SEND that has run alone on its socket and not found its
 * list yet looks for it in the peer's queue, with its pending slot still
 * held and still counted as in progress (the slot is written only if the
 * thread still owns it). Used at the sender's wakeups and just before its
 * exit gives the slot up: a receiver that takes the list meanwhile finds the
 * send still there and hands the list over (hand_to_sender) instead of
 * deleting an entry the claim has not seen yet. x receives the snapshot. */
static __always_inline void claim_in_slot(struct pending *slot, u32 tid, struct xfer *x) {
    if (slot->tid != tid || slot->direction != FDP_DIR_SEND || slot->fpl || !slot->peer || slot->before != 0 ||
        slot->syscall == FDP_SYS_SENDMMSG)
        return;
    struct sk_state *st = sk_state_of(slot->sk, slot->sk_ino);
    if (!st || !none_started_since(st->send, slot->ticket))
        return; /* another send started on the socket since: not alone */
    struct pending p = *slot;
    claim_sent_list(&p, x);
    if (!p.fpl || slot->tid != tid)
        return;
    slot->fpl = p.fpl;
    slot->skb = p.skb;
    slot->fcount = p.fcount;
    slot->xid = p.xid;
    slot->first = p.first;
}

/* Take this thread's pending entry of the given probe kind, if any, at the
 * exit of its call (ret: the call's result); a SEND claims its list first. */
static __always_inline int take_pending(struct pending *out, u8 probe, long ret) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 idx = tid & (PENDING_SLOTS - 1);
    struct pending *slot = pending_slots.lookup(&idx);
    u32 zero = 0;
    if (slot && slot->tid == tid) {
        if (slot->probe != probe)
            return 0;
        if (ret > 0 && slot->direction == FDP_DIR_SEND && !slot->count_only) {
            struct work *w = work.lookup(&zero);
            if (w)
                claim_in_slot(slot, tid, &w->x);
        }
        *out = *slot;
        slot->tid = 0;
    } else {
        u64 *n = spilled.lookup(&zero);
        if (!n || *n == 0)
            return 0;
        struct pending *pp = pending_spill.lookup(&tid);
        if (!pp || pp->probe != probe)
            return 0;
        *out = *pp;
        pending_spill.delete(&tid);
        __sync_fetch_and_add(n, -1);
    }
    if (out->count_only) { /* counted, not reported */
        count_end(out);
        return 0;
    }
    return 1;
}

/* Enough room for one cmsghdr carrying one int? Anything less cannot pass an fd. */
static __always_inline int has_control(u64 msghdr, u8 compat) {
    if (compat) {
        struct { u32 control; u32 controllen; } c = {};
        if (bpf_probe_read_user(&c, sizeof(c), (void *)(msghdr + C_MSGHDR_CONTROL)) != 0)
            return 0;
        return c.control != 0 && c.controllen >= C_CMSG_HDR + 4;
    }
    struct { u64 control; u64 controllen; } c = {};
    if (bpf_probe_read_user(&c, sizeof(c), (void *)(msghdr + MSGHDR_CONTROL)) != 0)
        return 0;
    return c.control != 0 && c.controllen >= CMSG_HDR + 4;
}

/* sendmmsg/recvmmsg: trace the call if any examined message has control data. */
static __always_inline int any_control(u64 vec, u32 vlen, u8 compat) {
    u64 stride = compat ? C_MMSGHDR_SIZE : MMSGHDR_SIZE;
    for (u32 i = 0; i < 64; i++) {
        if (i >= vlen)
            return 0;
        if (has_control(vec + (u64)i * stride, compat))
            return 1;
    }
    return 1; /* more than 64 messages: let the exit side look */
}

/* One entry point for every ABI and hook: msgvec is a msghdr (or mmsghdr
 * array of vlen). A call on a unix socket without control data (as read
 * here) is still counted on its socket: the length is user memory that
 * another thread can change between this read and the kernel's copy, and
 * a call passing fds unseen must not let another call on its socket look
 * alone and take its list (tests/test_blindspots.py, the hidden control
 * race; docs/kernel.md). */
static __always_inline void on_enter(u64 msgvec, u32 vlen, s32 fd, u8 syscall, u8 direction, u8 abi, u8 probe,
                                     u32 flags) {
    u8 compat = abi != FDP_ABI_X86_64;
    int mmsg = syscall == FDP_SYS_SENDMMSG || syscall == FDP_SYS_RECVMMSG;
    int control = mmsg ? any_control(msgvec, vlen, compat) : has_control(msgvec, compat);
    remember(msgvec, fd, syscall, direction, abi, probe, flags, !control);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    on_enter((u64)args->msg, 1, (s32)args->fd, FDP_SYS_SENDMSG, FDP_DIR_SEND, FDP_ABI_X86_64, FDP_PROBE_TRACEPOINT, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) {
    on_enter((u64)args->mmsg, (u32)args->vlen, (s32)args->fd, FDP_SYS_SENDMMSG, FDP_DIR_SEND, FDP_ABI_X86_64,
             FDP_PROBE_TRACEPOINT, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) {
    on_enter((u64)args->msg, 1, (s32)args->fd, FDP_SYS_RECVMSG, FDP_DIR_RECV, FDP_ABI_X86_64, FDP_PROBE_TRACEPOINT,
             (u32)args->flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg) {
    on_enter((u64)args->mmsg, (u32)args->vlen, (s32)args->fd, FDP_SYS_RECVMMSG, FDP_DIR_RECV, FDP_ABI_X86_64,
             FDP_PROBE_TRACEPOINT, (u32)args->flags);
    return 0;
}

#if COMPAT
/* Compat calls (32-bit programs, int $0x80, x32): raw_syscalls, which fire for
 * every syscall of every task, so the common case must leave after one
 * compare. The numbers are ia32's; 102 is also getuid for 64-bit tasks, hence
 * the TS_COMPAT test of the task (what in_ia32_syscall() reads). */
RAW_TRACEPOINT_PROBE(sys_enter) {
    u64 id = ctx->args[1];
    u8 abi = FDP_ABI_IA32;
    if (id & X32_BIT) {
        id &= ~X32_BIT;
        if (id != NRX32_SENDMSG && id != NRX32_RECVMSG && id != NRX32_RECVMMSG && id != NRX32_SENDMMSG)
            return 0;
        abi = FDP_ABI_X32;
    } else {
        if (id != NR32_SENDMSG && id != NR32_RECVMSG && id != NR32_SENDMMSG && id != NR32_RECVMMSG &&
            id != NR32_RECVMMSG_TIME64 && id != NR32_SOCKETCALL)
            return 0;
        u64 task = bpf_get_current_task();
        if (!(KREAD(u32, task, OFF_TASK_TI_STATUS) & TS_COMPAT_))
            return 0;
    }
    u64 regs = ctx->args[0];
    u32 a0, a1, a2, a3;
    if (abi == FDP_ABI_X32) { /* x32 passes arguments as x86_64 does */
        a0 = (u32)KREAD(u64, regs, OFF_PT_REGS_DI);
        a1 = (u32)KREAD(u64, regs, OFF_PT_REGS_SI);
        a2 = (u32)KREAD(u64, regs, OFF_PT_REGS_DX);
        a3 = (u32)KREAD(u64, regs, OFF_PT_REGS_R10);
    } else {
        a0 = (u32)KREAD(u64, regs, OFF_PT_REGS_BX);
        a1 = (u32)KREAD(u64, regs, OFF_PT_REGS_CX);
        a2 = (u32)KREAD(u64, regs, OFF_PT_REGS_DX);
        a3 = (u32)KREAD(u64, regs, OFF_PT_REGS_SI);
    }
    if (id == NR32_SOCKETCALL) {
        /* socketcall(call, u32 args[]): the real arguments are in user memory */
        u32 call = a0;
        if (call != SYS_SENDMSG_ && call != SYS_RECVMSG_ && call != SYS_SENDMMSG_ && call != SYS_RECVMMSG_)
            return 0;
        u32 sargs[4] = {};
        if (bpf_probe_read_user(sargs, sizeof(sargs), (void *)(u64)a1) != 0)
            return 0;
        a0 = sargs[0];
        a1 = sargs[1];
        a2 = sargs[2];
        a3 = sargs[3];
        id = call == SYS_SENDMSG_ ? NR32_SENDMSG : call == SYS_RECVMSG_ ? NR32_RECVMSG
           : call == SYS_SENDMMSG_ ? NR32_SENDMMSG : NR32_RECVMMSG;
    }
    switch (id) {
    case NR32_SENDMSG:
    case NRX32_SENDMSG:
        on_enter(a1, 1, (s32)a0, FDP_SYS_SENDMSG, FDP_DIR_SEND, abi, FDP_PROBE_RAW_TRACEPOINT, 0);
        break;
    case NR32_RECVMSG:
    case NRX32_RECVMSG:
        on_enter(a1, 1, (s32)a0, FDP_SYS_RECVMSG, FDP_DIR_RECV, abi, FDP_PROBE_RAW_TRACEPOINT, a2);
        break;
    case NR32_SENDMMSG:
    case NRX32_SENDMMSG:
        on_enter(a1, a2, (s32)a0, FDP_SYS_SENDMMSG, FDP_DIR_SEND, abi, FDP_PROBE_RAW_TRACEPOINT, 0);
        break;
    default: /* the recvmmsg variants */
        on_enter(a1, a2, (s32)a0, FDP_SYS_RECVMMSG, FDP_DIR_RECV, abi, FDP_PROBE_RAW_TRACEPOINT, a3);
        break;
    }
    return 0;
}
#endif

/* current->files->fdt->fd[fd], or 0. */
static __always_inline u64 fd_file(struct work *w, s32 fd) {
    if (fd < 0 || (u32)fd >= w->max_fds)
        return 0;
    return KREAD(u64, w->fd_array, (u64)fd * 8);
}

/* Fill the per-task, per-call part of the record. Returns 0 to go on. */
static __always_inline int begin(struct work *w, struct pending *p, long ret, int alone) {
    u64 task = bpf_get_current_task();
    struct fdp_event *ev = &w->ev;

    w->fd_array = fd_array_of(task, &w->max_fds);
    u64 sk = p->sk;
    u64 socket = KREAD(u64, sk, OFF_SOCK_SK_SOCKET);
    /* A 0-byte send on a stream socket queues nothing, so passes no fds. */
    if ((p->syscall == FDP_SYS_SENDMSG || p->syscall == FDP_SYS_URING_SENDMSG) && ret == 0 &&
        KREAD(u16, socket, OFF_SOCKET_TYPE) == SOCK_STREAM_)
        return -1;

    /* io-wq workers are named iou-wrk-PID: name the ring owner's process */
    if (fill_task(ev, task, p->probe == FDP_PROBE_TRACEPOINT && p->syscall >= FDP_SYS_URING_SENDMSG) != 0)
        return -1;

    ev->sock_fd = p->sock_fd;
    /* SOCK_INODE(): the inode sits beside the socket in struct socket_alloc */
    ev->sock_ino = KREAD(u64, socket, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
    ev->peer_sock_ino = 0;
    u8 peer_flag = 0;
    u64 peer = KREAD(u64, sk, OFF_UNIX_SOCK_PEER);
    if (peer) {
        u64 psocket = KREAD(u64, peer, OFF_SOCK_SK_SOCKET);
        if (psocket) {
            ev->peer_sock_ino = KREAD(u64, psocket, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
            peer_flag = FDP_F_PEER;
        }
    }
    ev->ret = ret;
    ev->syscall = p->syscall;
    ev->direction = p->direction;
    ev->abi = p->abi;
    ev->probe = p->probe;
    ev->kind = FDP_KIND_FD;
    ev->flags = peer_flag;
    ev->transfer_id = 0;

    task_root(task, &w->root);

    w->msgvec = p->msgvec;
    w->compat = p->abi != FDP_ABI_X86_64;
    w->is_mmsg = p->syscall == FDP_SYS_SENDMMSG || p->syscall == FDP_SYS_RECVMMSG;
    w->msgs_total = w->is_mmsg ? (u32)ret : 1;
    w->nmsgs = w->msgs_total > MAX_MSGS ? MAX_MSGS : w->msgs_total;
    w->msg_idx = 0;
    w->nfds = 0;
    w->fd_pos = 0;
    w->msg_flags = 0;
    w->verify = 0;
    w->fpl = 0;
    w->skb = 0;
    w->x.nsnap = 0;

    if (p->direction == FDP_DIR_SEND) {
        /* Only a single message is matched to its skb (sendmmsg's messages
         * are not told apart: docs/kernel.md). */
        if (!p->fpl && alone && p->peer && w->msgs_total == 1)
            claim_sent_list(p, &w->x);
        if (p->fpl && w->msgs_total == 1) { /* found here, at its wakeup, or by its receiver */
            /* The list's entry must still name this call as its owner: else
             * its addresses went to another list, or the id was handed to
             * another call of this thread (see hand_to_sender). */
            struct xfer_key k = {.fpl = p->fpl, .skb = p->skb};
            struct xfer *x = xfers.lookup(&k);
            if (x && x->transfer_id == p->xid && x->owner_sk == p->sk && x->owner_ticket == p->ticket) {
                w->fpl = p->fpl;
                w->skb = p->skb;
                w->fpl_count = p->fcount;
                ev->transfer_id = p->xid;
                /* The files the list held when claimed: what verifies the
                 * fds should a receiver take the list before they are read. */
                w->x = *x;
                if (__sync_fetch_and_or(&x->state, XF_SENT) & XF_TAKEN)
                    xfers.delete(&k);
            }
        }
    } else {
        /* The snapshot taken at entry, or handed over by the sender that woke
         * this receiver from its sleep in the call (sched_waking), found by
         * the id seen while the list was still queued: once this receive has
         * freed the skb and its list, the next message can reuse both
         * addresses and its SEND replaces the entry (seen in the close race).
         * An entry with another id is another list's: no snapshot, so nothing
         * verified and no transfer named (docs/kernel.md). */
        struct xfer_key k = {.fpl = p->fpl, .skb = p->skb};
        struct xfer *x = k.fpl ? xfers.lookup(&k) : 0;
        if (x && x->transfer_id == p->xid) {
            if (x->nsnap)
                w->x = *x;
            if (!(p->flags & MSG_PEEK_) && (!x->owner_sk || (__sync_fetch_and_or(&x->state, XF_TAKEN) & XF_SENT)))
                xfers.delete(&k);
        }
    }
    w->alone = alone;
    return 0;
}

static __always_inline void emit(void *ctx, struct work *w) { emit_event(ctx, &w->ev); }

/* Is file the one a snapshot saw at position index: the same struct file,
 * on the same inode, with the same open flags? */
static __always_inline int snap_holds(struct xfer *x, u32 index, u64 file) {
    if (index >= x->nsnap || index >= SNAP_FDS)
        return 0;
    struct snap_item *it = &x->items[index & (SNAP_FDS - 1)];
    return it->file == file && it->inode == KREAD(u64, file, OFF_FILE_F_INODE) &&
           it->flags == KREAD(u32, file, OFF_FILE_F_FLAGS);
}

/* The file to report for fd at position index, and whether it is verified. */
static __always_inline u64 file_for(struct work *w, s32 fd, u32 index, u8 *verified) {
    *verified = 0;
    if (w->ev.direction == FDP_DIR_SEND) {
        /* The files the list held when the send claimed it (the snapshot)
         * are the truth; the sender's fd table only for a message whose
         * list was not found. */
        if (w->verify && index < w->fpl_count && index < SCM_MAX_FD) {
            /* From the list while it is still queued, if it still holds the
             * claimed file there: its receiver may have taken it, and its
             * two addresses gone to another list since (seen with io_uring
             * sends beside a sendmsg(2)), which looks just as queued. */
            u64 file = KREAD(u64, w->fpl, OFF_SCM_FP_LIST_FP + (u64)(index & 255) * 8);
            if (file && skb_fpl(w->skb) == w->fpl && snap_holds(&w->x, index, file)) {
                *verified = 1;
                return file;
            }
            /* Else from the sender's fd table, if fd still holds that same
             * file, on the same inode with the same flags (a freed and reused
             * struct file does not pass). */
            file = fd_file(w, fd);
            if (file && snap_holds(&w->x, index, file))
                *verified = 1;
            return file;
        }
        return fd_file(w, fd);
    }
    /* RECV: what the fd holds now, confirmed if it is the snapshot's file. */
    u64 file = fd_file(w, fd);
    if (w->verify && file && snap_holds(&w->x, index, file))
        *verified = 1;
    return file;
}

static __always_inline void emit_fd(void *ctx, struct work *w, s32 fd, u32 index) {
    struct fdp_event *ev = &w->ev;
    ev->kind = FDP_KIND_FD;
    ev->fd = fd;
    ev->fd_index = index;
    ev->flags = (ev->flags & FDP_F_PEER) | w->msg_flags;
    ev->ncomp = 0;
    ev->file_ino = 0;
    ev->file_dev = 0;
    ev->file_flags = 0;
    ev->sb_magic = 0;
    ev->i_mode = 0;

    u8 verified = 0;
    u64 file = file_for(w, fd, index, &verified);
    if (!file) {
        ev->flags |= FDP_F_NO_FILE;
        ev->path_len = 0;
        emit(ctx, w);
        return;
    }
    fill_file(ev, file, &w->root);
    /* The reads above were of the snapshot's file only if it is still that
     * file now: it may have been closed, freed and reused meanwhile (the
     * sender's or receiver's fd, or the list, let go of it). */
    if (verified && !snap_holds(&w->x, index, file))
        verified = 0;
    if (verified)
        ev->flags |= FDP_F_VERIFIED;
    /* A RECV names its list's transfer only when the list is certainly what
     * it installed: verified, and no other receive overlapped on the socket. */
    if (ev->direction == FDP_DIR_RECV)
        ev->transfer_id = verified && w->alone ? w->x.transfer_id : 0;
    emit(ctx, w);
}

/* Read message msg_idx's control data: collect its SCM_RIGHTS fds in order
 * (several SCM_RIGHTS cmsgs concatenate, as the kernel's scm_fp_copy does). */
static __always_inline void load_msg(struct work *w) {
    u32 idx = w->msg_idx;
    u8 compat = w->compat;
    u64 msghdr = w->msgvec + (w->is_mmsg ? (u64)idx * (compat ? C_MMSGHDR_SIZE : MMSGHDR_SIZE) : 0);
    u64 control = 0, controllen = 0;
    u32 mflags = 0;
    w->msg_idx = idx + 1;
    w->nfds = 0;
    w->fd_pos = 0;
    w->msg_flags = 0;
    w->ev.msg_index = idx;
    if (compat) {
        struct { u32 control; u32 controllen; u32 flags; } h = {};
        if (bpf_probe_read_user(&h, sizeof(h), (void *)(msghdr + C_MSGHDR_CONTROL)) != 0)
            goto parsed;
        control = h.control;
        controllen = h.controllen;
        mflags = h.flags;
    } else {
        struct { u64 control; u64 controllen; u32 flags; } h = {};
        if (bpf_probe_read_user(&h, sizeof(h), (void *)(msghdr + MSGHDR_CONTROL)) != 0)
            goto parsed;
        control = h.control;
        controllen = h.controllen;
        mflags = h.flags;
    }
    if (!control)
        goto parsed;
    if (w->ev.direction == FDP_DIR_RECV && (mflags & MSG_CTRUNC_))
        w->msg_flags |= FDP_F_CTRUNC;
    u64 hdr = compat ? C_CMSG_HDR : CMSG_HDR;
    u64 align = compat ? 3 : 7;
    /* Running offset and count in map memory, for the reason given at walk_path(). */
    w->cmsg_off = 0;
    for (int c = 0; c < MAX_CMSGS; c++) {
        u64 off = w->cmsg_off;
        u32 n = w->nfds;
        if (off + hdr > controllen)
            goto parsed;
        /* Header and the first two fds in one read when the buffer holds
         * them (the common 1-2 fd case then costs one user read, not two). */
        u8 raw[24] = {};
        int inline_fds = off + hdr + 8 <= controllen &&
                         bpf_probe_read_user(raw, hdr + 8, (void *)(control + off)) == 0;
        if (!inline_fds && bpf_probe_read_user(raw, hdr, (void *)(control + off)) != 0)
            goto parsed;
        u64 len;
        s32 level, type, fd0, fd1;
        if (compat) {
            len = *(u32 *)&raw[0];
            level = *(s32 *)&raw[4];
            type = *(s32 *)&raw[8];
            fd0 = *(s32 *)&raw[12];
            fd1 = *(s32 *)&raw[16];
        } else {
            len = *(u64 *)&raw[0];
            level = *(s32 *)&raw[8];
            type = *(s32 *)&raw[12];
            fd0 = *(s32 *)&raw[16];
            fd1 = *(s32 *)&raw[20];
        }
        if (len < hdr || len > controllen - off)
            goto parsed;
        if (level == SOL_SOCKET_ && type == SCM_RIGHTS_) {
            u32 cnt = (u32)((len - hdr) / 4);
            if (n + cnt > SCM_MAX_FD) {
                cnt = SCM_MAX_FD - n;
                w->msg_flags |= FDP_F_FDS_TRUNC;
            }
            if (inline_fds && cnt <= 2) {
                if (cnt > 0)
                    w->fds[n & 255] = fd0;
                if (cnt > 1)
                    w->fds[(n + 1) & 255] = fd1;
            } else if (cnt > 0 && cnt <= 255 && n <= 255) {
                bpf_probe_read_user(&w->fds[n & 255], (cnt & 255) * 4, (void *)(control + off + hdr));
            }
            w->nfds = n + cnt;
        }
        w->cmsg_off = off + ((len + align) & ~align);
    }
    if (w->cmsg_off + hdr <= controllen)
        w->msg_flags |= FDP_F_FDS_TRUNC; /* more cmsgs than MAX_CMSGS */
parsed:
    w->ev.fd_count = w->nfds;
    /* The kernel's list (SEND) or the snapshot (RECV) stands for this message
     * only if it carries as many files as the message names. */
    if (w->ev.direction == FDP_DIR_SEND)
        w->verify = w->fpl && w->fpl_count == w->nfds;
    else
        w->verify = idx == 0 && w->x.nsnap && w->x.count == w->nfds;
}

static __always_inline int walk_impl(void *ctx, int raw) {
    u32 zero = 0;
    struct work *w = work.lookup(&zero);
    if (!w)
        return 0;
    for (int i = 0; i < WALK_STEPS; i++) {
        if (w->fd_pos >= w->nfds) {
            if (w->msg_idx >= w->nmsgs)
                return 0;
            load_msg(w);
            continue;
        }
        u32 pos = w->fd_pos;
        emit_fd(ctx, w, w->fds[pos & (FDS_SLOTS - 1)], pos);
        w->fd_pos = pos + 1;
    }
    if (w->fd_pos >= w->nfds && w->msg_idx >= w->nmsgs)
        return 0;
    if (raw)
        progs_raw.call(ctx, 0);
    else
        progs.call(ctx, 0);
    /* Tail-call budget spent: say what is left unreported. */
    stat_inc(FDP_STAT_BUDGET);
    struct fdp_event *ev = &w->ev;
    ev->kind = FDP_KIND_LOSS;
    ev->fd = -1;
    ev->fd_index = w->fd_pos;
    /* fds left in this message; 0 = unknown when whole messages remain */
    ev->fd_count = w->msg_idx < w->nmsgs ? 0 : (u16)(w->nfds - w->fd_pos);
    ev->flags = FDP_F_FDS_TRUNC;
    ev->ncomp = 0;
    ev->path_len = 0;
    emit(ctx, w);
    return 0;
}

int walk(void *ctx) { return walk_impl(ctx, 0); }
int walk_raw(void *ctx) { return walk_impl(ctx, 1); }

static __always_inline int finish(void *ctx, struct pending *p, long ret, int raw) {
    int alone = count_end(p);
    if (ret < 0)
        return 0;
    if ((p->syscall == FDP_SYS_SENDMMSG || p->syscall == FDP_SYS_RECVMMSG) && ret == 0)
        return 0;
    u32 zero = 0;
    struct work *w = work.lookup(&zero);
    if (!w || begin(w, p, ret, alone) != 0)
        return 0;
    if (raw)
        progs_raw.call(ctx, 0);
    else
        progs.call(ctx, 0);
    return 0;
}

static __always_inline int on_exit(void *ctx, long ret) {
    struct pending p = {};
    if (!take_pending(&p, FDP_PROBE_TRACEPOINT, ret))
        return 0;
    return finish(ctx, &p, ret, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return on_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) { return on_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return on_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { return on_exit(args, args->ret); }

#if COMPAT
/* Every syscall's exit: one slot look-up by tid, and out unless a compat call
 * of this thread is pending. */
RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pending p = {};
    if (!take_pending(&p, FDP_PROBE_RAW_TRACEPOINT, (long)ctx->args[1]))
        return 0;
    return finish(ctx, &p, (long)ctx->args[1], 1);
}
#endif

/* The sender wakes a receiver asleep in recvmsg (or in poll) right after it
 * queued the skb, in its own context, before the woken task can run and
 * before the sender's own exit: the moment to find the skb, which the exit
 * could find taken. And if the woken task is asleep in a receive on the peer
 * socket and the skb is at the head of the queue, that is the list it will
 * take: hand it over, as the snapshot its entry could not take (its queue was
 * empty). One slot look-up per wakeup otherwise. */
BPF_PERCPU_ARRAY(wake_scratch, struct xfer, 1);
RAW_TRACEPOINT_PROBE(sched_waking) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 idx = tid & (PENDING_SLOTS - 1);
    struct pending *slot = pending_slots.lookup(&idx);
    if (!slot || slot->tid != tid || slot->direction != FDP_DIR_SEND)
        return 0;
    u32 zero = 0;
    struct xfer *x = wake_scratch.lookup(&zero);
    if (x)
        claim_in_slot(slot, tid, x);
    if (!slot->fpl || !slot->first)
        return 0;
    u32 wtid = KREAD(u32, ctx->args[0], OFF_TASK_PID);
    u32 widx = wtid & (PENDING_SLOTS - 1);
    struct pending *r = pending_slots.lookup(&widx);
    if (r && r->tid == wtid && r->direction == FDP_DIR_RECV && r->sk == slot->peer && !r->fpl) {
        r->skb = slot->skb;
        r->xid = slot->xid;
        r->fpl = slot->fpl;
    }
    return 0;
}

#if URING
/* The file in slot idx of the ring's registered-file table, or 0. Newer
 * kernels (6.18 here) keep an array of resource nodes, older ones (6.1 here)
 * an array of io_fixed_file; collector/probes.py tells which from BTF. The low
 * bits of file_ptr are FFS_* flags (NOWAIT, ISREG, and SCM on older kernels). */
static __always_inline u64 uring_fixed_file(u64 ctxp, u32 idx) {
#if URING_FIXED_NODES
    u64 data = ctxp + OFF_IO_RING_CTX_FILE_TABLE + OFF_IO_FILE_TABLE_DATA;
    if (idx >= KREAD(u32, data, OFF_IO_RSRC_DATA_NR))
        return 0;
    u64 node = KREAD(u64, KREAD(u64, data, OFF_IO_RSRC_DATA_NODES), (u64)idx * 8);
    return node ? KREAD(u64, node, OFF_IO_RSRC_NODE_FILE_PTR) & ~7ULL : 0;
#else
    if (idx >= KREAD(u32, ctxp, OFF_IO_RING_CTX_NR_USER_FILES))
        return 0;
    u64 files = KREAD(u64, ctxp, OFF_IO_RING_CTX_FILE_TABLE + OFF_IO_FILE_TABLE_FILES);
    return KREAD(u64, files, (u64)idx * 8) & ~7ULL; /* struct io_fixed_file { file_ptr } */
#endif
}

/* io_uring: a request is prepared (its user msghdr pointer known) when
 * io_uring_submit_req fires, in the submitter; it may run later, inline or in
 * an io-wq worker thread of the same process (same fd table, same memory),
 * and io_uring_complete fires with its result. Pending entries are keyed by
 * the request. */
static __always_inline int on_uring_submit(u64 req, u8 op) {
    u8 syscall, direction;
    if (op == IORING_OP_SENDMSG_) {
        syscall = FDP_SYS_URING_SENDMSG;
        direction = FDP_DIR_SEND;
    } else if (op == IORING_OP_RECVMSG_) {
        syscall = FDP_SYS_URING_RECVMSG;
        direction = FDP_DIR_RECV;
#ifdef IORING_OP_SENDMSG_ZC_
    } else if (op == IORING_OP_SENDMSG_ZC_) {
        syscall = FDP_SYS_URING_SENDMSG_ZC;
        direction = FDP_DIR_SEND;
#endif
    } else {
        return 0;
    }
    u64 ctxp = KREAD(u64, req, OFF_IO_KIOCB_CTX);
    u8 abi = (KREAD(u8, ctxp, OFF_IO_RING_CTX_COMPAT_BYTE) >> OFF_IO_RING_CTX_COMPAT_BIT) & 1 ? FDP_ABI_IA32
                                                                                           : FDP_ABI_X86_64;
    u64 umsg = KREAD(u64, req, OFF_IO_KIOCB_CMD + OFF_IO_SR_MSG_UMSG);
    /* Without control data (as read now: user memory the kernel reads
     * later), or outside the filter: counted all the same (see on_enter). */
    u8 count_only = !has_control(umsg, abi != FDP_ABI_X86_64) || filtered_out();
    s32 fd = KREAD(s32, req, OFF_IO_KIOCB_CQE + OFF_IO_CQE_FD);
    u32 rflags = KREAD(u32, req, OFF_IO_KIOCB_CMD + OFF_IO_SR_MSG_MSG_FLAGS);
    struct pending p = {.msgvec = umsg, .sock_fd = fd, .tid = (u32)bpf_get_current_pid_tgid(), .syscall = syscall,
                        .direction = direction, .abi = abi, .probe = FDP_PROBE_TRACEPOINT, .flags = rflags,
                        .enter_ns = bpf_ktime_get_ns(), .count_only = count_only};
    u64 rqflags = KREAD(u64, req, OFF_IO_KIOCB_FLAGS);
    if (!(rqflags & 1 /* REQ_F_FIXED_FILE */)) {
        p.sk = unix_sk_of_fd(fd);
        if (!p.sk)
            return 0;
        begin_call(&p);
    } else {
        /* A fixed-file request names a slot of the ring's table, not an fd.
         * It is counted on the socket the slot holds now, like any other
         * send: uncounted, it would let a send(2) running beside it on the
         * same socket take its list for its own (tests/test_blindspots.py,
         * the fixed-file race). Any other file: tracked uncounted, the
         * socket is taken from the request at completion. */
        p.sock_fd = -1;
        p.sk = unix_sk_of_file(uring_fixed_file(ctxp, (u32)fd));
        if (p.sk)
            begin_call(&p);
        else if (count_only)
            return 0; /* nothing to count on */
        else
            p.before = ~0U;
    }
    /* IOSQE_CQE_SKIP_SUCCESS: a success posts no CQE, so io_uring_complete
     * never fires for it and the transfer cannot be reported (a failure
     * does fire, and reports nothing). Counted, never silent; and, like any
     * call that is not tracked, its count stays open, so its socket's calls
     * of its side stay "not alone" (unverified) rather than ever taking its
     * list for their own. docs/kernel.md, "What is not seen". */
    if (rqflags & REQ_F_CQE_SKIP_) {
        if (!count_only)
            stat_inc(FDP_STAT_URING_UNSEEN);
        return 0;
    }
    if (uring_pending.update(&req, &p) != 0 && !count_only)
        stat_inc(FDP_STAT_URING_FULL);
    return 0;
}

/* Linux 6.0-6.3 name it io_uring_submit_sqe, later kernels io_uring_submit_req. */
#if URING_SUBMIT_SQE
TRACEPOINT_PROBE(io_uring, io_uring_submit_sqe) { return on_uring_submit((u64)args->req, args->opcode); }
#else
TRACEPOINT_PROBE(io_uring, io_uring_submit_req) { return on_uring_submit((u64)args->req, args->opcode); }
#endif

TRACEPOINT_PROBE(io_uring, io_uring_complete) {
    u64 req = (u64)args->req;
    struct pending *pp = uring_pending.lookup(&req);
    if (!pp)
        return 0;
    struct pending p = *pp;
    uring_pending.delete(&req);
    /* The socket the request really used: req->file (the first member of io_sr_msg too). */
    u64 sk = unix_sk_of_file(KREAD(u64, req, OFF_IO_KIOCB_CMD));
    if (!sk) {
        count_end(&p);
        return 0;
    }
    u64 ino = sk_ino_of(sk);
    if (p.sk != sk || p.sk_ino != ino) { /* not the socket counted at submit (its fd or slot was replaced meanwhile) */
        count_end(&p);
        p.sk = sk;
        p.sk_ino = ino;
        p.before = ~0U;
        /* This call ran uncounted on sk: a call of its side still running
         * there must not look alone at its exit (docs/kernel.md). */
        struct sk_state *st = sk_state_of(sk, p.sk_ino);
        if (st)
            __sync_fetch_and_add(p.direction == FDP_DIR_SEND ? &st->send : &st->recv, CNT_ONE_STARTED);
    }
    if (p.count_only) {
        count_end(&p);
        return 0;
    }
    return finish(args, &p, args->res, 0);
}
#endif
