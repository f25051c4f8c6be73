/* fdpass: the one record the kernel side hands to user space.
 *
 * This header is the kernel/user boundary. bpf/fdpass.bpf.c fills
 * struct fdp_event; collector/records.py decodes exactly this layout (a unit
 * test compiles this header with the host C compiler and checks every
 * offset against the Python decoder). Change both together.
 *
 * Types are fixed-width and every field is naturally aligned with explicit
 * padding, so the layout is the same for BPF and x86_64 user space.
 */
#ifndef FDPASS_H
#define FDPASS_H

#include <linux/types.h>

#define FDP_COMM_LEN 16
#define FDP_PATH_MAX 4096             /* bytes of path components kept */
#define FDP_NAME_MAX 256              /* one component incl. its NUL */
#define FDP_PATH_BUF (FDP_PATH_MAX + FDP_NAME_MAX)

/* kind: what the record is */
#define FDP_KIND_FD 1   /* one passed descriptor */
#define FDP_KIND_LOSS 2 /* descriptors a bound kept us from reporting; fd_count says how many
                           (0: unknown, e.g. sendmmsg messages past the walk budget) */
/* The in-kernel backend (bpf/fdpass_kernel.bpf.c) sees each fd where the kernel moves it,
 * before the call's outcome is known: its FD records wait in user space for these two. */
#define FDP_KIND_MSG_END 3  /* one message of the thread's call is done: msg_index, fd_count
                               (its FD records), sock_ino, peer_sock_ino, FDP_F_PEER/CTRUNC;
                               fd_index 1 = its fds reached the peer (SEND) or were installed */
#define FDP_KIND_CALL_END 4 /* the thread's call is done: syscall, abi, sock_fd, ret; with
                               fd_count > 0 also its last message's end (the MSG_END fields) */
#define FDP_KIND_FD_SAME 5  /* a RECV FD record without the file's identity and path: its file is
                               the one the SEND FD record of the same transfer_id and fd_index
                               named (same struct file, same root, no rename or mount change
                               since that SEND's walk: docs/kernel.md, "Receives reuse the
                               send's walk"). It carries what only the receive knows (task, fd,
                               file_flags, FDP_F_DELETED); user space (collector/kernel_calls.py)
                               takes file_ino, file_dev, i_mode, sb_magic, ncomp, path and
                               FDP_F_DNAME/FDP_F_PATH_TRUNC from that SEND record. */
/* The kernel sends FDP_KIND_FD_SAME only when the SEND record is among those user space still
 * keeps: user space keeps a transfer's SEND records until it has seen a SEND record whose
 * transfer id (low 48 bits) is FDP_SAME_SPAN or more above it, and the kernel, after reserving
 * the record, checks that fewer than FDP_SAME_SPAN ids were taken since this one. */
#define FDP_SAME_SPAN 4096
#define FDP_SAME_FDS 16     /* list indexes 0..FDP_SAME_FDS-1 can take the short form */

/* direction */
#define FDP_DIR_SEND 1
#define FDP_DIR_RECV 2

/* syscall: the entry point that moved the fds */
#define FDP_SYS_SENDMSG 1
#define FDP_SYS_SENDMMSG 2
#define FDP_SYS_RECVMSG 3
#define FDP_SYS_RECVMMSG 4
#define FDP_SYS_URING_SENDMSG 5    /* io_uring IORING_OP_SENDMSG */
#define FDP_SYS_URING_SENDMSG_ZC 6 /* io_uring IORING_OP_SENDMSG_ZC */
#define FDP_SYS_URING_RECVMSG 7    /* io_uring IORING_OP_RECVMSG */

/* abi: the layout of the caller's msghdr/cmsghdr */
#define FDP_ABI_X86_64 1
#define FDP_ABI_IA32 2  /* 32-bit program, or int $0x80 from a 64-bit one */
#define FDP_ABI_X32 3

/* probe: the kind of hook that produced the record */
#define FDP_PROBE_TRACEPOINT 1     /* syscalls:sys_{enter,exit}_* and io_uring:* */
#define FDP_PROBE_RAW_TRACEPOINT 2 /* raw_syscalls sys_enter/sys_exit (compat calls) */
#define FDP_PROBE_FENTRY 3         /* fentry/fexit on the kernel functions that move the files */

/* flags */
#define FDP_F_PATH_TRUNC 0x01 /* the path walk hit a bound: path is incomplete */
#define FDP_F_FDS_TRUNC 0x02  /* the message held more fds/cmsgs than the probe reads */
#define FDP_F_CTRUNC 0x04     /* RECV: kernel set MSG_CTRUNC (fds dropped) */
#define FDP_F_DNAME 0x08      /* pseudo file (socket, pipe, anon inode, memfd...): path holds
                                 the dentry name only; user space renders it by sb_magic */
#define FDP_F_DELETED 0x10    /* the file is unlinked: the kernel would append " (deleted)" */
#define FDP_F_NO_FILE 0x20    /* the fd did not resolve to an open file (raced with close) */
#define FDP_F_PEER 0x40       /* peer_sock_ino is known */
#define FDP_F_VERIFIED 0x80   /* the file identity comes from (SEND) or was checked against (RECV)
                                 the kernel's SCM_RIGHTS list on the socket, not from user memory
                                 or the fd table alone: docs/kernel.md, "Verification" */

struct fdp_event {
    __u64 ktime_ns;      /* CLOCK_MONOTONIC at syscall exit */
    __u64 seq;           /* RUN_ID << 48 | n: every emission attempt of this probe load
                            takes the next n, so a gap in n is a lost record; RUN_ID
                            (15 bits) counts collector starts within the boot */
    __u64 cgroup_id;
    __u64 sock_ino;
    __u64 peer_sock_ino; /* valid when FDP_F_PEER */
    __u64 file_ino;
    __s64 ret;
    __u64 transfer_id;   /* RUN_ID << 48 | n per SCM_RIGHTS list seen; equal on a SEND and its
                            RECV(s); 0 = the kernel object was not seen */
    __u32 pid;           /* thread group id */
    __u32 tid;
    __u32 ppid;
    __u32 uid;
    __u32 gid;
    __u32 mntns_id;
    __u32 pidns_id;
    __u32 netns_id;
    __u32 file_dev;      /* kernel dev_t: major << 20 | minor */
    __u32 file_flags;
    __u32 sb_magic;
    __s32 sock_fd;
    __s32 fd;
    __u16 fd_index;
    __u16 fd_count;
    __u16 msg_index;
    __u16 i_mode;
    __u16 path_len;      /* bytes used in path[] */
    __u8 kind;
    __u8 direction;
    __u8 syscall;
    __u8 flags;
    __u8 ncomp;          /* components in path[] */
    __u8 abi;            /* FDP_ABI_* */
    __u8 probe;          /* FDP_PROBE_* */
    __u8 _pad[3];
    char comm[FDP_COMM_LEN];
    char parent_comm[FDP_COMM_LEN];
    /* Path components leaf first, each NUL-terminated ("passwd\0etc\0" for
     * /etc/passwd): the walk goes up from the file, and user space reverses.
     * Only path_len bytes are sent. */
    char path[FDP_PATH_BUF];
};

/* Counters in the `stats` per-CPU array. */
#define FDP_STAT_EVENTS 0        /* records emitted */
#define FDP_STAT_RB_DROPS 1      /* records lost: ring buffer full */
#define FDP_STAT_PENDING_FULL 2  /* syscalls not traced: pending map full */
#define FDP_STAT_BUDGET 3        /* syscalls whose fds outran the tail-call budget */
#define FDP_STAT_SPILLED 4       /* pending entries that took the spill map (slot collision) */
#define FDP_STAT_URING_FULL 5    /* io_uring requests not traced: uring_pending map full */
#define FDP_STAT_URING_UNSEEN 6  /* io_uring requests whose success posts no completion (CQE_SKIP_SUCCESS) */
#define FDP_STAT_N 7

#endif
