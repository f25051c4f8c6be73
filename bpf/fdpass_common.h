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

/* Send ev (header + ev->path_len bytes of path) to user space. ev is map
 * memory (a per-CPU work area). */
static __always_inline void emit_event(void *ctx, struct fdp_event *ev) {
    ev->seq = next_id(0);
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
 * names leaf first into ev->path (root: the task's, in map memory too). Mirrors the kernel's d_path()/prepend_path().
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
        if (dentry == root->dentry && vfsmnt == root->mnt)
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
    if (!(dentry == root->dentry && vfsmnt == root->mnt))
        ev->flags |= FDP_F_PATH_TRUNC;
}

/* The identity of a struct file into ev: inode number, device, type, open
 * flags, and its path. Returns the inode, for callers that check it again. */
static __always_inline u64 fill_file(struct fdp_event *ev, u64 file, const struct kpath *root) {
    u64 inode = KREAD(u64, file, OFF_FILE_F_INODE);
    ev->file_flags = KREAD(u32, file, OFF_FILE_F_FLAGS);
    ev->file_ino = KREAD(u64, inode, OFF_INODE_I_INO);
    ev->i_mode = KREAD(u16, inode, OFF_INODE_I_MODE);
    u64 sb = KREAD(u64, inode, OFF_INODE_I_SB);
    ev->file_dev = KREAD(u32, sb, OFF_SUPER_BLOCK_S_DEV);
    ev->sb_magic = (u32)KREAD(u64, sb, OFF_SUPER_BLOCK_S_MAGIC);
    struct kpath fp = {};
    bpf_probe_read_kernel(&fp, sizeof(fp), (void *)(file + OFF_FILE_F_PATH));
    walk_path(ev, root, fp.dentry, fp.mnt);
    return inode;
}

#endif
