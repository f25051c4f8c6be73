/* fdpass kernel side: SCM_RIGHTS transfers seen from the syscall tracepoints.
 *
 * Why tracepoints: the machines fdpass must run on have no kprobes and refuse
 * fentry (DESIGN.md). Why no struct types: the kernel headers bcc compiles
 * against may not match the running kernel, so every kernel struct member is
 * read at a byte offset (OFF_*) that collector/probes.py takes from
 * /sys/kernel/btf/vmlinux and passes in with -D. User-space ABI structs
 * (msghdr, mmsghdr, cmsghdr) are stable and read at their fixed offsets.
 *
 * Flow, per traced syscall:
 *   enter: one user read of msg_control/msg_controllen; no control data ->
 *          leave at once. Otherwise remember (msghdr pointer, socket fd) by
 *          thread id (a slot array indexed by tid, with a hash map for the
 *          rare slot collision: a hash update costs ~300 ns, a slot ~10).
 *   exit:  forget the pending entry; if the call failed, stop (a failed
 *          sendmsg passed nothing). Otherwise fill the per-task part of the
 *          record once and tail-call `walk`.
 *   walk:  a state machine over messages (sendmmsg/recvmmsg: only the `ret`
 *          messages the kernel handled) and their SCM_RIGHTS fds; per fd it
 *          resolves current->files->fdt->fd[fd] and walks the dentry chain
 *          into a path, then emits one record. WALK_STEPS steps per
 *          invocation, re-invoking itself by tail call (the kernel allows 33),
 *          so 253 fds (SCM_MAX_FD) fit; whatever exceeds the budget is
 *          reported as a LOSS record, never cut silently.
 *   SEND reads the control data the sender supplied (validated by the kernel
 *   since the call succeeded); RECV reads what the kernel wrote back, so the
 *   fd numbers are the receiver's new ones.
 * Records go to a ring buffer without per-record wakeups; user space drains it
 * on a short timer, and every WAKE_EVERY-th record forces a wakeup.
 */
#include "fdpass.h"

#ifndef WALK_STEPS
#define WALK_STEPS 8       /* fds or messages handled per walk invocation */
#endif
#ifndef PATH_DEPTH
#define PATH_DEPTH 40      /* dentry components walked per path */
#endif
#ifndef RUN_ID
#define RUN_ID 0          /* collector/probes.py numbers each start within a boot */
#endif
#ifndef WAKE_EVERY
#define WAKE_EVERY 256     /* power of two */
#endif
#define MAX_CMSGS 16       /* control messages parsed per message */
#define MAX_MSGS 1024      /* UIO_MAXIOV: sendmmsg/recvmmsg vlen limit */
#define SCM_MAX_FD 253
#define FDS_SLOTS 512      /* 2 * 256: masked offsets stay in bounds */

#define AF_UNIX_ 1
#define SOCK_STREAM_ 1
#define SOL_SOCKET_ 1
#define SCM_RIGHTS_ 1
#define MSG_CTRUNC_ 0x8

/* struct user_msghdr (uapi, x86_64) */
#define MSGHDR_CONTROL 32  /* msg_control, then msg_controllen (u64), msg_flags (u32) */
#define MMSGHDR_SIZE 64

/* Read a kernel value of type T at base + off. */
#define KREAD(T, base, off) ({ T _v = 0; bpf_probe_read_kernel(&_v, sizeof(_v), (void *)((u64)(base) + (off))); _v; })

struct pending {
    u64 msgvec;  /* user pointer: msghdr, or mmsghdr array */
    u64 tid;     /* owner of a slot; 0 = free (u64: BPF cmpxchg is 64-bit here) */
    s32 sock_fd;
    u8 syscall;
    u8 direction;
};

#ifndef PENDING_SLOTS
#define PENDING_SLOTS 65536 /* power of two */
#endif

struct work {
    struct fdp_event ev; /* shared header; per-fd fields overwritten */
    u64 msgvec;
    u64 root_dentry;
    u64 root_mnt;
    u64 fd_array;        /* current->files->fdt->fd */
    u32 max_fds;
    u32 nmsgs;           /* messages to examine */
    u32 msgs_total;      /* messages the kernel handled (ret) */
    u32 msg_idx;         /* next message to load */
    u32 nfds;            /* fds in the loaded message */
    u32 fd_pos;          /* next fd to emit */
    u64 cmsg_off;        /* parse position in the control buffer */
    u8 is_mmsg;
    u8 msg_flags;        /* FDP_F_* bits of the loaded message */
    s32 fds[FDS_SLOTS];
};

/* Per-process facts that cost ~10 reads to gather and rarely change: kept by
 * tgid, and trusted only while the task's real_parent and nsproxy pointers
 * are still the ones they were read through (reparenting, setns and unshare
 * all replace one of them). */
struct proc_info {
    u64 real_parent;
    u64 nsproxy;
    u32 ppid;
    u32 mntns_id;
    u32 netns_id;
    u32 pidns_id;
};

BPF_ARRAY(pending_slots, struct pending, PENDING_SLOTS);
BPF_HASH(pending_spill, u32, struct pending, 16384);
BPF_ARRAY(spilled, u64, 1); /* entries in pending_spill: exit skips its lookup at 0 */
BPF_TABLE("lru_hash", u32, struct proc_info, procs, 8192);
BPF_PERCPU_ARRAY(work, struct work, 1);
BPF_PERCPU_ARRAY(stats, u64, FDP_STAT_N);
BPF_ARRAY(seqno, u64, 1);
BPF_PROG_ARRAY(progs, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#ifdef FILTER_MNTNS
BPF_HASH(mntns_filter, u32, u8, 1024);
#endif

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline u32 task_mntns(u64 task) {
    u64 nsproxy = KREAD(u64, task, OFF_TASK_NSPROXY);
    u64 mnt_ns = KREAD(u64, nsproxy, OFF_NSPROXY_MNT_NS);
    return KREAD(u32, mnt_ns, OFF_MNT_NAMESPACE_INUM);
}

/* Filters run on enter, after the cheap "is there control data" test. */
static __always_inline int filtered_out(void) {
#ifdef FILTER_PID
    if ((bpf_get_current_pid_tgid() >> 32) != FILTER_PID)
        return 1;
#endif
#ifdef FILTER_MNTNS
    u32 ns = task_mntns(bpf_get_current_task());
    if (!mntns_filter.lookup(&ns))
        return 1;
#endif
    return 0;
}

static __always_inline void remember(u64 msgvec, s32 sock_fd, u8 syscall, u8 direction) {
    if (filtered_out())
        return;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending p = {.msgvec = msgvec, .sock_fd = sock_fd, .tid = tid, .syscall = syscall, .direction = direction};
    u32 idx = tid & (PENDING_SLOTS - 1);
    struct pending *slot = pending_slots.lookup(&idx);
    if (!slot)
        return;
    /* Claim the slot atomically: two CPUs may find it free at once. */
    if (slot->tid == tid || __sync_val_compare_and_swap(&slot->tid, 0, (u64)tid) == 0) {
        slot->msgvec = p.msgvec;
        slot->sock_fd = p.sock_fd;
        slot->syscall = p.syscall;
        slot->direction = p.direction;
        return;
    }
    /* Another live thread holds the slot (e.g. blocked in recvmsg). */
    u32 zero = 0;
    u64 *n = spilled.lookup(&zero);
    if (pending_spill.update(&tid, &p) != 0)
        stat_inc(FDP_STAT_PENDING_FULL);
    else {
        stat_inc(FDP_STAT_SPILLED);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
}

/* Take this thread's pending entry, if any. */
static __always_inline int take_pending(struct pending *out) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 idx = tid & (PENDING_SLOTS - 1);
    struct pending *slot = pending_slots.lookup(&idx);
    if (slot && slot->tid == tid) {
        *out = *slot;
        slot->tid = 0;
        return 1;
    }
    u32 zero = 0;
    u64 *n = spilled.lookup(&zero);
    if (!n || *n == 0)
        return 0;
    struct pending *pp = pending_spill.lookup(&tid);
    if (!pp)
        return 0;
    *out = *pp;
    pending_spill.delete(&tid);
    __sync_fetch_and_add(n, -1);
    return 1;
}

/* Enough room for one cmsghdr carrying one int? Anything less cannot pass an fd. */
static __always_inline int has_control(u64 msghdr) {
    struct { u64 control; u64 controllen; } c = {};
    if (bpf_probe_read_user(&c, sizeof(c), (void *)(msghdr + MSGHDR_CONTROL)) != 0)
        return 0;
    return c.control != 0 && c.controllen >= 16 + 4;
}

/* sendmmsg/recvmmsg: trace the call if any examined message has control data. */
static __always_inline int any_control(u64 vec, u32 vlen) {
    for (u32 i = 0; i < 64; i++) {
        if (i >= vlen)
            return 0;
        if (has_control(vec + (u64)i * MMSGHDR_SIZE))
            return 1;
    }
    return 1; /* more than 64 messages: let the exit side look */
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    if (has_control((u64)args->msg))
        remember((u64)args->msg, (s32)args->fd, FDP_SYS_SENDMSG, FDP_DIR_SEND);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) {
    if (any_control((u64)args->mmsg, (u32)args->vlen))
        remember((u64)args->mmsg, (s32)args->fd, FDP_SYS_SENDMMSG, FDP_DIR_SEND);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) {
    if (has_control((u64)args->msg))
        remember((u64)args->msg, (s32)args->fd, FDP_SYS_RECVMSG, FDP_DIR_RECV);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg) {
    if (any_control((u64)args->mmsg, (u32)args->vlen))
        remember((u64)args->mmsg, (s32)args->fd, FDP_SYS_RECVMMSG, FDP_DIR_RECV);
    return 0;
}

/* current->files->fdt->fd[fd], or 0. */
static __always_inline u64 fd_file(struct work *w, s32 fd) {
    if (fd < 0 || (u32)fd >= w->max_fds)
        return 0;
    return KREAD(u64, w->fd_array, (u64)fd * 8);
}

static __always_inline void load_fd_table(struct work *w, u64 task) {
    u64 files = KREAD(u64, task, OFF_TASK_FILES);
    u64 fdt = KREAD(u64, files, OFF_FILES_FDT);
#if OFF_FDTABLE_FD == OFF_FDTABLE_MAX_FDS + 8
    struct { u32 max_fds; u32 pad; u64 fd; } t = {};  /* adjacent: one read */
    bpf_probe_read_kernel(&t, sizeof(t), (void *)(fdt + OFF_FDTABLE_MAX_FDS));
    w->max_fds = t.max_fds;
    w->fd_array = t.fd;
#else
    w->max_fds = KREAD(u32, fdt, OFF_FDTABLE_MAX_FDS);
    w->fd_array = KREAD(u64, fdt, OFF_FDTABLE_FD);
#endif
}

/* struct path is { vfsmount *mnt; dentry *dentry; } on every kernel: one read. */
struct kpath {
    u64 mnt;
    u64 dentry;
};

static __always_inline struct proc_info *proc_info(u64 task, u32 tgid) {
    u64 parent = KREAD(u64, task, OFF_TASK_REAL_PARENT);
    u64 nsproxy = KREAD(u64, task, OFF_TASK_NSPROXY);
    struct proc_info *pi = procs.lookup(&tgid);
    if (pi && pi->real_parent == parent && pi->nsproxy == nsproxy)
        return pi;
    struct proc_info fresh = {.real_parent = parent, .nsproxy = nsproxy};
    fresh.ppid = KREAD(u32, parent, OFF_TASK_TGID);
    fresh.mntns_id = KREAD(u32, KREAD(u64, nsproxy, OFF_NSPROXY_MNT_NS), OFF_MNT_NAMESPACE_INUM);
    fresh.netns_id = KREAD(u32, KREAD(u64, nsproxy, OFF_NSPROXY_NET_NS), OFF_NET_INUM);
    /* The active pid namespace: thread_pid->numbers[level].ns (fixed for a task's life) */
    u64 tpid = KREAD(u64, task, OFF_TASK_THREAD_PID);
    u32 level = KREAD(u32, tpid, OFF_PID_LEVEL);
    u64 pidns = KREAD(u64, tpid, OFF_PID_NUMBERS + (u64)(level & 31) * SIZEOF_UPID + OFF_UPID_NS);
    fresh.pidns_id = KREAD(u32, pidns, OFF_PID_NAMESPACE_INUM);
    procs.update(&tgid, &fresh);
    return procs.lookup(&tgid);
}

/* Fill the per-task, per-syscall part of the record. Returns 0 to go on. */
static __always_inline int begin(struct work *w, struct pending *p, long ret) {
    u64 task = bpf_get_current_task();
    struct fdp_event *ev = &w->ev;

    load_fd_table(w, task);
    u64 sfile = fd_file(w, p->sock_fd);
    if (!sfile)
        return -1;
    u64 socket = KREAD(u64, sfile, OFF_FILE_PRIVATE_DATA);
    u64 sk = KREAD(u64, socket, OFF_SOCKET_SK);
    /* Only unix sockets carry SCM_RIGHTS; other families ignore the cmsg. */
    if (KREAD(u16, sk, OFF_SOCK_FAMILY) != AF_UNIX_)
        return -1;
    /* A 0-byte send on a stream socket queues nothing, so passes no fds. */
    if (p->syscall == FDP_SYS_SENDMSG && ret == 0 && KREAD(u16, socket, OFF_SOCKET_TYPE) == SOCK_STREAM_)
        return -1;

    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    ev->ktime_ns = bpf_ktime_get_ns();
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->uid = (u32)uid_gid;
    ev->gid = uid_gid >> 32;
    ev->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(ev->comm, sizeof(ev->comm));
    struct proc_info *pi = proc_info(task, ev->pid);
    if (!pi)
        return -1;
    ev->ppid = pi->ppid;
    ev->mntns_id = pi->mntns_id;
    ev->netns_id = pi->netns_id;
    ev->pidns_id = pi->pidns_id;
    /* Read every time: the parent may have exec'd since it was cached. */
    bpf_probe_read_kernel(ev->parent_comm, sizeof(ev->parent_comm), (void *)(pi->real_parent + OFF_TASK_COMM));

    ev->sock_fd = p->sock_fd;
    ev->sock_ino = KREAD(u64, KREAD(u64, sfile, OFF_FILE_F_INODE), OFF_INODE_I_INO);
    ev->peer_sock_ino = 0;
    u8 peer_flag = 0;
    u64 peer = KREAD(u64, sk, OFF_UNIX_SOCK_PEER);
    if (peer) {
        u64 psocket = KREAD(u64, peer, OFF_SOCK_SK_SOCKET);
        if (psocket) {
            /* SOCK_INODE(): the inode sits beside the socket in struct socket_alloc */
            ev->peer_sock_ino = KREAD(u64, psocket, OFF_SOCKET_ALLOC_VFS_INODE + OFF_INODE_I_INO);
            peer_flag = FDP_F_PEER;
        }
    }
    ev->ret = ret;
    ev->syscall = p->syscall;
    ev->direction = p->direction;
    ev->kind = FDP_KIND_FD;
    ev->flags = peer_flag;

    struct kpath root = {};
    bpf_probe_read_kernel(&root, sizeof(root), (void *)(KREAD(u64, task, OFF_TASK_FS) + OFF_FS_ROOT));
    w->root_mnt = root.mnt;
    w->root_dentry = root.dentry;

    w->msgvec = p->msgvec;
    w->is_mmsg = p->syscall == FDP_SYS_SENDMMSG || p->syscall == FDP_SYS_RECVMMSG;
    w->msgs_total = w->is_mmsg ? (u32)ret : 1;
    w->nmsgs = w->msgs_total > MAX_MSGS ? MAX_MSGS : w->msgs_total;
    w->msg_idx = 0;
    w->nfds = 0;
    w->fd_pos = 0;
    w->msg_flags = 0;
    return 0;
}

/* Send w->ev (header + ev.path_len bytes of path) to user space. */
static __always_inline void emit(void *ctx, struct work *w) {
    struct fdp_event *ev = &w->ev;
    u32 zero = 0;
    u64 *seq = seqno.lookup(&zero);
    ev->seq = ((u64)RUN_ID << 48) | (seq ? __sync_fetch_and_add(seq, 1) : 0);
    u64 size = offsetof(struct fdp_event, path) + ev->path_len;
    /* Keep the bound check and the use on one register, or clang may test a
     * copy and the verifier sees an unbounded size. */
    asm volatile("" : "+r"(size));
    if (size > sizeof(struct fdp_event))
        size = sizeof(struct fdp_event);
    asm volatile("" : "+r"(size));
    /* Wake the reader once every WAKE_EVERY records, not per record (a wakeup
     * costs ~5 us); it also drains on a short timer, so nothing waits long. */
    u64 wake = (ev->seq & (WAKE_EVERY - 1)) == 0 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
    if (events.ringbuf_output(ev, size, wake) != 0)
        stat_inc(FDP_STAT_RB_DROPS);
    else
        stat_inc(FDP_STAT_EVENTS);
}

/* Walk dentries from the file up to the task's root, crossing mounts, writing
 * names leaf first into ev->path. Mirrors the kernel's d_path()/prepend_path().
 *
 * The running length and count live in the map value (ev->path_len,
 * ev->ncomp), not in locals: the verifier tracks locals precisely, so a
 * length that differs between the "cross a mount" and "take a name" branches
 * would keep it from merging states and it would explore every combination
 * of branches over PATH_DEPTH steps. Values loaded from map memory are
 * unknown scalars, bounded by the mask, and the states merge. */
static __always_inline void walk_path(struct work *w, u64 dentry, u64 vfsmnt) {
    struct fdp_event *ev = &w->ev;
    u64 mount = vfsmnt - OFF_MOUNT_MNT;
    ev->path_len = 0;
    ev->ncomp = 0;

    /* Pseudo files (sockets, pipes, anon inodes, memfds) name themselves
     * through d_op->d_dname, unless the dentry is its mount's root. */
    u64 dop = KREAD(u64, dentry, OFF_DENTRY_D_OP);
    if (dop && KREAD(u64, dop, OFF_DENTRY_OPERATIONS_D_DNAME)) {
        u64 parent = KREAD(u64, dentry, OFF_DENTRY_D_PARENT);
        if (parent != dentry || dentry != KREAD(u64, vfsmnt, OFF_VFSMOUNT_MNT_ROOT)) {
            u64 name = KREAD(u64, dentry, OFF_DENTRY_D_NAME_NAME);
            long n = bpf_probe_read_kernel_str(ev->path, FDP_NAME_MAX, (void *)name);
            ev->flags |= FDP_F_DNAME;
            ev->ncomp = 1;
            ev->path_len = n > 0 ? (u16)n : 0;
            return;
        }
    }
    /* d_unlinked(): unhashed and not a root */
    if (!KREAD(u64, dentry, OFF_DENTRY_D_HASH_PPREV) && KREAD(u64, dentry, OFF_DENTRY_D_PARENT) != dentry)
        ev->flags |= FDP_F_DELETED;

    for (int i = 0; i < PATH_DEPTH; i++) {
        if (dentry == w->root_dentry && vfsmnt == w->root_mnt)
            return;
        u64 mnt_root = KREAD(u64, vfsmnt, OFF_VFSMOUNT_MNT_ROOT);
        if (dentry == mnt_root) {
            u64 parent_mount = KREAD(u64, mount, OFF_MOUNT_MNT_PARENT);
            if (parent_mount == mount)
                return; /* global root, or a detached mount */
            dentry = KREAD(u64, mount, OFF_MOUNT_MNT_MOUNTPOINT);
            mount = parent_mount;
            vfsmnt = mount + OFF_MOUNT_MNT;
            continue;
        }
        u64 parent = KREAD(u64, dentry, OFF_DENTRY_D_PARENT);
        if (parent == dentry)
            return; /* an unreachable root: the kernel stops here too */
        u32 len = ev->path_len;
        if (len >= FDP_PATH_MAX) {
            ev->flags |= FDP_F_PATH_TRUNC;
            return;
        }
        u64 name = KREAD(u64, dentry, OFF_DENTRY_D_NAME_NAME);
        long n = bpf_probe_read_kernel_str(&ev->path[len & (FDP_PATH_MAX - 1)], FDP_NAME_MAX, (void *)name);
        if (n > 0)
            ev->path_len = len + (u32)n;
        ev->ncomp += 1;
        dentry = parent;
    }
    /* Depth bound reached: unless this is the root, the path is incomplete. */
    if (!(dentry == w->root_dentry && vfsmnt == w->root_mnt))
        ev->flags |= FDP_F_PATH_TRUNC;
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

    u64 file = fd_file(w, fd);
    if (!file) {
        ev->flags |= FDP_F_NO_FILE;
        ev->path_len = 0;
        emit(ctx, w);
        return;
    }
    u64 inode = KREAD(u64, file, OFF_FILE_F_INODE);
    ev->file_flags = KREAD(u32, file, OFF_FILE_F_FLAGS);
    ev->file_ino = KREAD(u64, inode, OFF_INODE_I_INO);
    ev->i_mode = KREAD(u16, inode, OFF_INODE_I_MODE);
    u64 sb = KREAD(u64, inode, OFF_INODE_I_SB);
    ev->file_dev = KREAD(u32, sb, OFF_SUPER_BLOCK_S_DEV);
    ev->sb_magic = (u32)KREAD(u64, sb, OFF_SUPER_BLOCK_S_MAGIC);
    struct kpath fp = {};
    bpf_probe_read_kernel(&fp, sizeof(fp), (void *)(file + OFF_FILE_F_PATH));
    walk_path(w, fp.dentry, fp.mnt);
    emit(ctx, w);
}

/* Read message msg_idx's control data: collect its SCM_RIGHTS fds in order
 * (several SCM_RIGHTS cmsgs concatenate, as the kernel's scm_fp_copy does). */
static __always_inline void load_msg(struct work *w) {
    u32 idx = w->msg_idx;
    u64 msghdr = w->msgvec + (w->is_mmsg ? (u64)idx * MMSGHDR_SIZE : 0);
    struct { u64 control; u64 controllen; u32 flags; } h = {};
    w->msg_idx = idx + 1;
    w->nfds = 0;
    w->fd_pos = 0;
    w->msg_flags = 0;
    w->ev.msg_index = idx;
    if (bpf_probe_read_user(&h, sizeof(h), (void *)(msghdr + MSGHDR_CONTROL)) != 0 || !h.control)
        return;
    if (w->ev.direction == FDP_DIR_RECV && (h.flags & MSG_CTRUNC_))
        w->msg_flags |= FDP_F_CTRUNC;
    /* Running offset and count in map memory, for the reason given at walk_path(). */
    w->cmsg_off = 0;
    for (int c = 0; c < MAX_CMSGS; c++) {
        u64 off = w->cmsg_off;
        u32 n = w->nfds;
        if (off + 16 > h.controllen)
            goto parsed;
        /* Header and the first two fds in one read when the buffer holds
         * them (the common 1-2 fd case then costs one user read, not two). */
        struct { u64 len; s32 level; s32 type; s32 fd[2]; } ch = {};
        int inline_fds = off + sizeof(ch) <= h.controllen &&
                         bpf_probe_read_user(&ch, sizeof(ch), (void *)(h.control + off)) == 0;
        if (!inline_fds && bpf_probe_read_user(&ch, 16, (void *)(h.control + off)) != 0)
            goto parsed;
        if (ch.len < 16 || ch.len > h.controllen - off)
            goto parsed;
        if (ch.level == SOL_SOCKET_ && ch.type == SCM_RIGHTS_) {
            u32 cnt = (u32)((ch.len - 16) / 4);
            if (n + cnt > SCM_MAX_FD) {
                cnt = SCM_MAX_FD - n;
                w->msg_flags |= FDP_F_FDS_TRUNC;
            }
            if (inline_fds && cnt <= 2) {
                if (cnt > 0)
                    w->fds[n & 255] = ch.fd[0];
                if (cnt > 1)
                    w->fds[(n + 1) & 255] = ch.fd[1];
            } else if (cnt > 0 && cnt <= 255 && n <= 255) {
                bpf_probe_read_user(&w->fds[n & 255], (cnt & 255) * 4, (void *)(h.control + off + 16));
            }
            w->nfds = n + cnt;
        }
        w->cmsg_off = off + ((ch.len + 7) & ~7ULL);
    }
    if (w->cmsg_off + 16 <= h.controllen)
        w->msg_flags |= FDP_F_FDS_TRUNC; /* more cmsgs than MAX_CMSGS */
parsed:
    w->ev.fd_count = w->nfds;
}

int walk(void *ctx) {
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

static __always_inline int on_exit(void *ctx, long ret) {
    struct pending p = {};
    if (!take_pending(&p))
        return 0;
    if (ret < 0)
        return 0;
    if ((p.syscall == FDP_SYS_SENDMMSG || p.syscall == FDP_SYS_RECVMMSG) && ret == 0)
        return 0;
    u32 zero = 0;
    struct work *w = work.lookup(&zero);
    if (!w || begin(w, &p, ret) != 0)
        return 0;
    progs.call(ctx, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return on_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) { return on_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return on_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { return on_exit(args, args->ret); }
