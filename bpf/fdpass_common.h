/* fdpass kernel side: what both capture backends share.
 *
 * bpf/fdpass.bpf.c (syscall tracepoints) and bpf/fdpass_kernel.bpf.c
 * (in-kernel hooks) include this: the maps user space reads from both (events,
 * stats, seqno), the per-process cache, and everything that turns a task and
 * a struct file * into the fields of a struct fdp_event (bpf/fdpass.h), so
 * the two backends report a file and a task the same way. Kernel structs are
 * read at OFF_* offsets from BTF (collector/probes.py), never through headers.
 * collector/probes.py pastes this file into each backend's source rather than
 * letting the compiler include it: bcc rewrites map calls only in that source.
 */
#ifndef FDPASS_COMMON_H
#define FDPASS_COMMON_H

#include "fdpass.h"

#ifndef PATH_DEPTH
#define PATH_DEPTH 40      /* dentry components walked per path */
#endif
#ifndef RUN_ID
#define RUN_ID 0          /* collector/probes.py numbers each start within a boot */
#endif
#ifndef WAKE_EVERY
#define WAKE_EVERY 256     /* power of two */
#endif

/* Read a kernel value of type T at base + off. */
#define KREAD(T, base, off) ({ T _v = 0; bpf_probe_read_kernel(&_v, sizeof(_v), (void *)((u64)(base) + (off))); _v; })

/* Several members of one kernel struct in one read: bytes [lo, hi) of it go
 * into a stack buffer (lo rounded down to 8, so every member stays aligned as
 * the verifier wants stack loads), and WIN_AT picks a member out of it. One
 * bpf_probe_read_kernel costs about what a member read does, whatever its
 * size up to a cache line or two, so a record's file identity and path walk
 * read each struct once (docs/kernel.md "Cost"). Windows are computed from
 * the OFF_* values; one wider than WIN_MAX (some future layout) falls back to
 * a read per member. */
#define WIN_MIN(a, b) ((a) < (b) ? (a) : (b))
#define WIN_MAX_OF(a, b) ((a) > (b) ? (a) : (b))
#define WIN_MAX 128
#define WIN_AT(T, buf, lo, off) (*(T *)((char *)(buf) + ((off) - (lo))))
#define WIN_READ(buf, base, lo, hi) bpf_probe_read_kernel(buf, (hi) - (lo), (void *)((u64)(base) + (lo)))

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

BPF_TABLE("lru_hash", u32, struct proc_info, procs, 8192);
BPF_PERCPU_ARRAY(stats, u64, FDP_STAT_N);
BPF_ARRAY(seqno, u64, 2); /* [0] record sequence, [1] transfer ids */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#ifdef FILTER_MNTNS
BPF_HASH(mntns_filter, u32, u8, 1024);
#endif

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline u64 next_id(u32 which) {
    u64 *n = seqno.lookup(&which);
    return ((u64)RUN_ID << 48) | (n ? __sync_fetch_and_add(n, 1) : 0);
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

/* current->files->fdt: the fd array and its size, in one read when adjacent. */
static __always_inline u64 fd_array_of(u64 task, u32 *max_fds) {
    u64 files = KREAD(u64, task, OFF_TASK_FILES);
    u64 fdt = KREAD(u64, files, OFF_FILES_FDT);
#if OFF_FDTABLE_FD == OFF_FDTABLE_MAX_FDS + 8
    struct { u32 max_fds; u32 pad; u64 fd; } t = {};
    bpf_probe_read_kernel(&t, sizeof(t), (void *)(fdt + OFF_FDTABLE_MAX_FDS));
    *max_fds = t.max_fds;
    return t.fd;
#else
    *max_fds = KREAD(u32, fdt, OFF_FDTABLE_MAX_FDS);
    return KREAD(u64, fdt, OFF_FDTABLE_FD);
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

/* The per-task part of a record: ids, credentials, cgroup, names, namespaces.
 * leader_comm: name the thread group leader (io_uring's io-wq workers are
 * threads named iou-wrk-PID; the ring owner's process is the actor). */
static __always_inline int fill_task(struct fdp_event *ev, u64 task, int leader_comm) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    ev->ktime_ns = bpf_ktime_get_ns();
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->uid = (u32)uid_gid;
    ev->gid = uid_gid >> 32;
    ev->cgroup_id = bpf_get_current_cgroup_id();
    if (leader_comm) {
        u64 leader = KREAD(u64, task, OFF_TASK_GROUP_LEADER);
        bpf_probe_read_kernel(ev->comm, sizeof(ev->comm), (void *)(leader + OFF_TASK_COMM));
    } else {
        bpf_get_current_comm(ev->comm, sizeof(ev->comm));
    }
    struct proc_info *pi = proc_info(task, ev->pid);
    if (!pi)
        return -1;
    ev->ppid = pi->ppid;
    ev->mntns_id = pi->mntns_id;
    ev->netns_id = pi->netns_id;
    ev->pidns_id = pi->pidns_id;
    /* Read every time: the parent may have exec'd since it was cached. */
    bpf_probe_read_kernel(ev->parent_comm, sizeof(ev->parent_comm), (void *)(pi->real_parent + OFF_TASK_COMM));
    return 0;
}

/* The task's root, where paths start (what /proc/PID/fd is relative to). */
static __always_inline void task_root(u64 task, struct kpath *root) {
    bpf_probe_read_kernel(root, sizeof(*root), (void *)(KREAD(u64, task, OFF_TASK_FS) + OFF_FS_ROOT));
}

/* Wake the reader once every WAKE_EVERY records, not per record (a wakeup
 * costs ~5 us); it also drains on a short timer, so nothing waits long. */
static __always_inline u64 wake_flag(u64 seq) {
    return (seq & (WAKE_EVERY - 1)) == 0 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* Send ev (header + ev->path_len bytes of path) to user space. ev is map
 * memory (a per-CPU work area). 0: the record is in the ring buffer. */
static __always_inline int emit_event(void *ctx, struct fdp_event *ev) {
    ev->seq = next_id(0);
    u64 size = offsetof(struct fdp_event, path) + ev->path_len;
    /* Keep the bound check and the use on one register, or clang may test a
     * copy and the verifier sees an unbounded size. */
    asm volatile("" : "+r"(size));
    if (size > sizeof(struct fdp_event))
        size = sizeof(struct fdp_event);
    asm volatile("" : "+r"(size));
    if (events.ringbuf_output(ev, size, wake_flag(ev->seq)) != 0) {
        stat_inc(FDP_STAT_RB_DROPS);
        return -1;
    }
    stat_inc(FDP_STAT_EVENTS);
    return 0;
}

/* The windows (see WIN_AT) the path walk and fill_file read. */
#define FILE_LO (WIN_MIN(WIN_MIN(OFF_FILE_F_INODE, OFF_FILE_F_FLAGS), OFF_FILE_F_PATH) & ~7)
#define FILE_HI WIN_MAX_OF(WIN_MAX_OF(OFF_FILE_F_INODE + 8, OFF_FILE_F_FLAGS + 4), OFF_FILE_F_PATH + 16)
#define INODE_LO (WIN_MIN(WIN_MIN(OFF_INODE_I_MODE, OFF_INODE_I_INO), OFF_INODE_I_SB) & ~7)
#define INODE_HI WIN_MAX_OF(WIN_MAX_OF(OFF_INODE_I_MODE + 2, OFF_INODE_I_INO + 8), OFF_INODE_I_SB + 8)
#define SB_LO (WIN_MIN(OFF_SUPER_BLOCK_S_DEV, OFF_SUPER_BLOCK_S_MAGIC) & ~7)
#define SB_HI WIN_MAX_OF(OFF_SUPER_BLOCK_S_DEV + 4, OFF_SUPER_BLOCK_S_MAGIC + 8)
/* A dentry: parent and name (every component), hash link and ops (the file's own). */
#define DENTRY_LO (WIN_MIN(WIN_MIN(OFF_DENTRY_D_PARENT, OFF_DENTRY_D_NAME_NAME), \
                           WIN_MIN(OFF_DENTRY_D_HASH_PPREV, OFF_DENTRY_D_OP)) & ~7)
#define DENTRY_HI WIN_MAX_OF(WIN_MAX_OF(OFF_DENTRY_D_PARENT, OFF_DENTRY_D_NAME_NAME), \
                             WIN_MAX_OF(OFF_DENTRY_D_HASH_PPREV, OFF_DENTRY_D_OP)) + 8
/* A struct mount: its parent, where it is mounted, and its vfsmount's root. */
#define MOUNT_LO (WIN_MIN(WIN_MIN(OFF_MOUNT_MNT_PARENT, OFF_MOUNT_MNT_MOUNTPOINT), \
                          OFF_MOUNT_MNT + OFF_VFSMOUNT_MNT_ROOT) & ~7)
#define MOUNT_HI WIN_MAX_OF(WIN_MAX_OF(OFF_MOUNT_MNT_PARENT, OFF_MOUNT_MNT_MOUNTPOINT), \
                            OFF_MOUNT_MNT + OFF_VFSMOUNT_MNT_ROOT) + 8
#if FILE_HI - FILE_LO <= WIN_MAX && INODE_HI - INODE_LO <= WIN_MAX && SB_HI - SB_LO <= WIN_MAX && \
    DENTRY_HI - DENTRY_LO <= WIN_MAX && MOUNT_HI - MOUNT_LO <= WIN_MAX
#define WINDOWS 1
#else
#define WINDOWS 0
#endif

/* What the walk needs of a dentry and of a mount. */
struct dent {
    u64 parent;
    u64 name;
    u64 op;     /* only for the file's own dentry (read_dent's `own`) */
    u64 pprev;  /*   d_hash.pprev, likewise */
};
struct mnt_facts {
    u64 root;        /* its vfsmount's mnt_root */
    u64 parent;      /* struct mount * */
    u64 mountpoint;  /* dentry * */
};

/* own: the file's own dentry, whose ops and hash link are wanted too. */
static __always_inline void read_dent(u64 dentry, struct dent *d, int own) {
#if WINDOWS
    u64 w[(DENTRY_HI - DENTRY_LO + 7) / 8];
    WIN_READ(w, dentry, DENTRY_LO, DENTRY_HI);
    d->parent = WIN_AT(u64, w, DENTRY_LO, OFF_DENTRY_D_PARENT);
    d->name = WIN_AT(u64, w, DENTRY_LO, OFF_DENTRY_D_NAME_NAME);
    if (own) {
        d->op = WIN_AT(u64, w, DENTRY_LO, OFF_DENTRY_D_OP);
        d->pprev = WIN_AT(u64, w, DENTRY_LO, OFF_DENTRY_D_HASH_PPREV);
    }
#else
    d->parent = KREAD(u64, dentry, OFF_DENTRY_D_PARENT);
    d->name = KREAD(u64, dentry, OFF_DENTRY_D_NAME_NAME);
    if (own) {
        d->op = KREAD(u64, dentry, OFF_DENTRY_D_OP);
        d->pprev = KREAD(u64, dentry, OFF_DENTRY_D_HASH_PPREV);
    }
#endif
}

static __always_inline void read_mount(u64 mount, struct mnt_facts *m) {
#if WINDOWS
    u64 w[(MOUNT_HI - MOUNT_LO + 7) / 8];
    WIN_READ(w, mount, MOUNT_LO, MOUNT_HI);
    m->root = WIN_AT(u64, w, MOUNT_LO, OFF_MOUNT_MNT + OFF_VFSMOUNT_MNT_ROOT);
    m->parent = WIN_AT(u64, w, MOUNT_LO, OFF_MOUNT_MNT_PARENT);
    m->mountpoint = WIN_AT(u64, w, MOUNT_LO, OFF_MOUNT_MNT_MOUNTPOINT);
#else
    m->root = KREAD(u64, mount, OFF_MOUNT_MNT + OFF_VFSMOUNT_MNT_ROOT);
    m->parent = KREAD(u64, mount, OFF_MOUNT_MNT_PARENT);
    m->mountpoint = KREAD(u64, mount, OFF_MOUNT_MNT_MOUNTPOINT);
#endif
}

/* Walk dentries from the file up to the task's root, crossing mounts, writing
 * names leaf first into ev->path (root: the task's, in map memory too). Mirrors the kernel's d_path()/prepend_path().
 * Each dentry is read once (parent and name together) and each mount once
 * (its root, parent and mountpoint together), not once per member.
 *
 * The running length and count live in the map value (ev->path_len,
 * ev->ncomp), not in locals: the verifier tracks locals precisely, so a
 * length that differs between the "cross a mount" and "take a name" branches
 * would keep it from merging states and it would explore every combination
 * of branches over PATH_DEPTH steps. Values loaded from map memory are
 * unknown scalars, bounded by the mask, and the states merge. */
static __always_inline void walk_path(struct fdp_event *ev, const struct kpath *root, u64 dentry, u64 vfsmnt) {
    u64 mount = vfsmnt - OFF_MOUNT_MNT;
    ev->path_len = 0;
    ev->ncomp = 0;

    struct dent d = {};
    read_dent(dentry, &d, 1);
    struct mnt_facts m = {};
    read_mount(mount, &m);

    /* Pseudo files (sockets, pipes, anon inodes, memfds) name themselves
     * through d_op->d_dname, unless the dentry is its mount's root. */
    if (d.op && KREAD(u64, d.op, OFF_DENTRY_OPERATIONS_D_DNAME)) {
        if (d.parent != dentry || dentry != m.root) {
            long n = bpf_probe_read_kernel_str(ev->path, FDP_NAME_MAX, (void *)d.name);
            ev->flags |= FDP_F_DNAME;
            ev->ncomp = 1;
            ev->path_len = n > 0 ? (u16)n : 0;
            return;
        }
    }
    /* d_unlinked(): unhashed and not a root */
    if (!d.pprev && d.parent != dentry)
        ev->flags |= FDP_F_DELETED;
    for (int i = 0; i < PATH_DEPTH; i++) {
        if (dentry == root->dentry && vfsmnt == root->mnt)
            return;
        if (dentry == m.root) {
            if (m.parent == mount)
                return; /* global root, or a detached mount */
            dentry = m.mountpoint;
            mount = m.parent;
            vfsmnt = mount + OFF_MOUNT_MNT;
            read_mount(mount, &m);
            d.name = 0;
            continue;
        }
        /* This dentry's parent and name, unless known (the file's own). A
         * name is never NULL; the root, reached next, is never read. */
        if (!d.name)
            read_dent(dentry, &d, 0);
        if (d.parent == dentry)
            return; /* an unreachable root: the kernel stops here too */
        u32 len = ev->path_len;
        if (len >= FDP_PATH_MAX) {
            ev->flags |= FDP_F_PATH_TRUNC;
            return;
        }
        long n = bpf_probe_read_kernel_str(&ev->path[len & (FDP_PATH_MAX - 1)], FDP_NAME_MAX, (void *)d.name);
        if (n > 0)
            ev->path_len = len + (u32)n;
        ev->ncomp += 1;
        dentry = d.parent;
        d.name = 0;
    }
    /* Depth bound reached: unless this is the root, the path is incomplete. */
    if (!(dentry == root->dentry && vfsmnt == root->mnt))
        ev->flags |= FDP_F_PATH_TRUNC;
}

/* The identity of a struct file into ev: inode number, device, type, open
 * flags, and its path. Returns the inode, for callers that check it again.
 * One read each of the file, its inode and its superblock (see WIN_AT). */
static __always_inline u64 fill_file(struct fdp_event *ev, u64 file, const struct kpath *root) {
    struct kpath fp = {};
    u64 inode, sb;
#if WINDOWS
    u64 w[(WIN_MAX_OF(WIN_MAX_OF(FILE_HI - FILE_LO, INODE_HI - INODE_LO), SB_HI - SB_LO) + 7) / 8];
    WIN_READ(w, file, FILE_LO, FILE_HI);
    inode = WIN_AT(u64, w, FILE_LO, OFF_FILE_F_INODE);
    ev->file_flags = WIN_AT(u32, w, FILE_LO, OFF_FILE_F_FLAGS);
    fp.mnt = WIN_AT(u64, w, FILE_LO, OFF_FILE_F_PATH);
    fp.dentry = WIN_AT(u64, w, FILE_LO, OFF_FILE_F_PATH + 8);
    WIN_READ(w, inode, INODE_LO, INODE_HI);
    ev->file_ino = WIN_AT(u64, w, INODE_LO, OFF_INODE_I_INO);
    ev->i_mode = WIN_AT(u16, w, INODE_LO, OFF_INODE_I_MODE);
    sb = WIN_AT(u64, w, INODE_LO, OFF_INODE_I_SB);
    WIN_READ(w, sb, SB_LO, SB_HI);
    ev->file_dev = WIN_AT(u32, w, SB_LO, OFF_SUPER_BLOCK_S_DEV);
    ev->sb_magic = (u32)WIN_AT(u64, w, SB_LO, OFF_SUPER_BLOCK_S_MAGIC);
#else
    inode = KREAD(u64, file, OFF_FILE_F_INODE);
    ev->file_flags = KREAD(u32, file, OFF_FILE_F_FLAGS);
    ev->file_ino = KREAD(u64, inode, OFF_INODE_I_INO);
    ev->i_mode = KREAD(u16, inode, OFF_INODE_I_MODE);
    sb = KREAD(u64, inode, OFF_INODE_I_SB);
    ev->file_dev = KREAD(u32, sb, OFF_SUPER_BLOCK_S_DEV);
    ev->sb_magic = (u32)KREAD(u64, sb, OFF_SUPER_BLOCK_S_MAGIC);
    bpf_probe_read_kernel(&fp, sizeof(fp), (void *)(file + OFF_FILE_F_PATH));
#endif
    walk_path(ev, root, fp.dentry, fp.mnt);
    return inode;
}

#endif
