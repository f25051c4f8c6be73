/* Ground truth shared by the test workloads: what was sent and received,
 * taken with fstat(2) inside the workload, printed as ONE JSON line.
 * Any failure: a message on stderr and exit 1, never a partial line. */
#ifndef FDPASS_TEST_TRUTH_H
#define FDPASS_TEST_TRUTH_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAXFD 8

struct fdrec {
    int fd;
    unsigned long long ino, dev;
};

struct msgrec {
    int nsent, nrecv;
    struct fdrec sent[MAXFD], recv[MAXFD];
};

struct truth {
    const char *abi;
    const char *mode;
    long tid_send, tid_recv;
    int send_sock, recv_sock;
    int nmsg;
    struct msgrec *msgs;
    const char *extra; /* more "key": value pairs, or NULL */
};

static inline void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static inline struct fdrec stat_fd(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        die("fstat(%d): %s", fd, strerror(errno));
    struct fdrec r = {fd, (unsigned long long)st.st_ino, (unsigned long long)st.st_dev};
    return r;
}

static inline unsigned long long sock_ino(int fd)
{
    return stat_fd(fd).ino;
}

static inline void print_fds(const struct fdrec *r, int n)
{
    putchar('[');
    for (int i = 0; i < n; i++)
        printf("%s{\"fd\": %d, \"ino\": %llu, \"dev\": %llu}", i ? ", " : "", r[i].fd, r[i].ino, r[i].dev);
    putchar(']');
}

static inline void print_truth(const struct truth *t)
{
    printf("{\"pid\": %d, \"tid_send\": %ld, \"tid_recv\": %ld, \"send_sock_ino\": %llu, \"recv_sock_ino\": %llu, "
           "\"abi\": \"%s\"",
           (int)getpid(), t->tid_send, t->tid_recv, sock_ino(t->send_sock), sock_ino(t->recv_sock), t->abi);
    if (t->mode)
        printf(", \"mode\": \"%s\"", t->mode);
    if (t->extra)
        printf(", %s", t->extra);
    printf(", \"messages\": [");
    for (int i = 0; i < t->nmsg; i++) {
        printf("%s{\"sent\": ", i ? ", " : "");
        print_fds(t->msgs[i].sent, t->msgs[i].nsent);
        printf(", \"received\": ");
        print_fds(t->msgs[i].recv, t->msgs[i].nrecv);
        putchar('}');
    }
    printf("]}\n");
    if (fflush(stdout) != 0)
        die("stdout: %s", strerror(errno));
}

/* One message of 1 byte with room for one fd; m points into the struct, so
 * it stays where onefd_init built it. */
struct onefd {
    char data;
    struct iovec iov;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctrl;
    struct msghdr m;
};

/* fd >= 0: a message passing fd; -1: a receive buffer. */
static inline void onefd_init(struct onefd *o, char data, int fd)
{
    memset(o, 0, sizeof *o);
    o->data = data;
    o->iov = (struct iovec){&o->data, 1};
    o->m = (struct msghdr){.msg_iov = &o->iov, .msg_iovlen = 1, .msg_control = o->ctrl.buf,
                           .msg_controllen = sizeof o->ctrl.buf};
    if (fd < 0)
        return;
    struct cmsghdr *c = CMSG_FIRSTHDR(&o->m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
}

/* Opens each path O_RDONLY; at most MAXFD. */
static inline int open_paths(int n, char **paths, int *fds)
{
    if (n < 1 || n > MAXFD)
        die("need 1..%d paths, got %d", MAXFD, n);
    for (int i = 0; i < n; i++) {
        fds[i] = open(paths[i], O_RDONLY);
        if (fds[i] < 0)
            die("open %s: %s", paths[i], strerror(errno));
    }
    return n;
}

/* The fds of every SCM_RIGHTS cmsg in a native (this ABI's) control buffer. */
static inline int native_rights(struct msghdr *m, struct fdrec *out)
{
    int n = 0;
    if (m->msg_flags & MSG_CTRUNC)
        die("MSG_CTRUNC: control buffer too small");
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (n == MAXFD)
                die("more than %d fds received", MAXFD);
            out[n++] = stat_fd(fd);
        }
    }
    return n;
}

#endif
