/* Adversarial transfers: another thread changes what an fd number means
 * while the kernel, and the probes, look at it. COUNT messages of 1 byte and
 * 1 fd each go over a SOCK_STREAM socketpair to a receiver thread running
 * concurrently; every one is received (COUNT in, COUNT out).
 *
 *   race MODE COUNT          A = /etc/shadow, B = /dev/null
 *   flip     a thread keeps writing A, B, A, ... into the fd slot of the one
 *            control buffer every sendmsg reuses
 *   dup2     every message passes fd X while a thread keeps doing
 *            dup2(B, X), dup2(A, X)
 *   close    after each sendmsg, X is closed and reopened (A, B alternately)
 *   recvdup  the receiver's next fd number R (the lowest free one) is kept
 *            flipping by a thread doing dup2(B, R), close(R), so the fd the
 *            kernel just installed may be replaced before recvmsg returns
 *
 * messages[i].received is the truth of what the kernel moved: what the
 * receiver's fstat found right after recvmsg, except in recvdup where the
 * receiver's fd itself is under attack and the truth is A, the only file
 * ever sent ("raced" counts the fds the racer had replaced or closed by
 * then). messages[i].sent holds the fd number the sender used (flip: what
 * the buffer held once sendmsg returned) and what fstat said of it then.
 */
#include "truth.h"

#include <pthread.h>
#include <stdatomic.h>

#define PATH_A "/etc/shadow"
#define PATH_B "/dev/null"
#define X_FD 100 /* high, so never the lowest free number */

static const char *mode;
static int count, A, B, X, R, sv[2];
static struct msgrec *msgs;
static long tid_recv;
static int raced; /* recvdup: received fds that no longer named A at the receiver's fstat */
static atomic_int stop;
static union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} ctrl;

static int is(const char *m)
{
    return strcmp(mode, m) == 0;
}

static void *receiver(void *arg)
{
    (void)arg;
    tid_recv = gettid();
    for (int i = 0; i < count; i++) {
        char d;
        struct iovec iov = {&d, 1};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } in;
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = in.buf, .msg_controllen = sizeof in.buf};
        ssize_t n = recvmsg(sv[1], &m, 0);
        if (n != 1)
            die("recvmsg %d: %s", i, n < 0 ? strerror(errno) : "no byte");
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        if ((m.msg_flags & MSG_CTRUNC) || !c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int)))
            die("message %d did not carry exactly one fd", i);
        int fd;
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        msgs[i].nrecv = 1;
        if (is("recvdup")) {
            struct fdrec a = stat_fd(A);
            struct stat st;
            msgs[i].recv[0] = (struct fdrec){fd, a.ino, a.dev};
            if (fstat(fd, &st) != 0 || st.st_ino != a.ino || st.st_dev != a.dev)
                raced++;
        } else {
            msgs[i].recv[0] = stat_fd(fd);
        }
        close(fd); /* recvdup: may close the racer's B, or fail: either is fine */
    }
    return NULL;
}

static void *racer(void *arg)
{
    (void)arg;
    volatile int *slot = (volatile int *)CMSG_DATA(&ctrl.align);
    for (unsigned k = 0; !atomic_load_explicit(&stop, memory_order_relaxed); k++) {
        if (is("flip")) {
            *slot = k & 1 ? A : B; /* one store per turn: each value stays as long as the other */
        } else if (is("dup2")) {
            dup2(B, X);
            dup2(A, X);
        } else {
            dup2(B, R);
            close(R);
        }
    }
    return NULL;
}

static void reopen_x(int i)
{
    close(X);
    int fd = open(i % 2 ? PATH_A : PATH_B, O_RDONLY);
    if (fd < 0 || dup2(fd, X) != X)
        die("reopen at %d: %s", X, strerror(errno));
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 3)
        die("usage: %s flip|dup2|close|recvdup COUNT", argv[0]);
    mode = argv[1];
    count = atoi(argv[2]);
    if (!(is("flip") || is("dup2") || is("close") || is("recvdup")) || count < 1)
        die("bad mode or count: %s %s", argv[1], argv[2]);
    if ((A = open(PATH_A, O_RDONLY)) < 0 || (B = open(PATH_B, O_RDONLY)) < 0)
        die("open: %s", strerror(errno));
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair: %s", strerror(errno));
    if ((X = fcntl(A, F_DUPFD, X_FD)) != X_FD)
        die("F_DUPFD %d: %s", X_FD, strerror(errno));
    R = dup(A); /* the lowest free number: the receiver's first new fd */
    close(R);
    if (!(msgs = calloc(count, sizeof *msgs)))
        die("out of memory");

    char data = 'x';
    struct iovec iov = {&data, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl.buf, .msg_controllen = sizeof ctrl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    int passed = is("flip") || is("recvdup") ? A : X;
    memcpy(CMSG_DATA(c), &passed, sizeof passed);

    pthread_t rt, xt = 0;
    if (pthread_create(&rt, NULL, receiver, NULL) != 0)
        die("pthread_create receiver");
    if (!is("close") && pthread_create(&xt, NULL, racer, NULL) != 0)
        die("pthread_create racer");
    for (int i = 0; i < count; i++) {
        ssize_t n = sendmsg(sv[0], &m, 0);
        if (n != 1)
            die("sendmsg %d: %s", i, n < 0 ? strerror(errno) : "short");
        int fd;
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        msgs[i].nsent = 1;
        msgs[i].sent[0] = stat_fd(fd);
        if (is("close"))
            reopen_x(i);
    }
    if (pthread_join(rt, NULL) != 0)
        die("pthread_join receiver");
    atomic_store(&stop, 1);
    if (xt && pthread_join(xt, NULL) != 0)
        die("pthread_join racer");

    char extra[64];
    snprintf(extra, sizeof extra, "\"raced\": %d", raced);
    struct truth t = {"X86_64", mode, gettid(), tid_recv, sv[0], sv[1], count, msgs, is("recvdup") ? extra : NULL};
    print_truth(&t);
    return 0;
}
