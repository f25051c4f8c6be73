/* Hiding a transfer from the probes: msg_controllen is user memory, read by
 * the probe at syscall entry and by the kernel right after. A racer thread
 * flips it between 0 and the real length, so the probe can see "no control
 * data" while the kernel passes (or installs) the fd.
 *
 *   hidectl send COUNT   a hider thread sends B (/dev/null), COUNT messages
 *                        of 1 byte ('b') with its msghdr's msg_controllen
 *                        flipping, while the main thread sends A
 *                        (/etc/shadow), COUNT messages ('a'), unraced, on
 *                        the same socket: a send the probe did not see must
 *                        not pass for the main thread's
 *   hidectl recv COUNT   the main thread sends A COUNT times; the receiver's
 *                        msg_controllen flips
 *   hidectl ns COUNT     as send, but the hider is a child process in a mount
 *                        namespace of its own (outside a collector filtered to
 *                        this one's) and does not race: a call the filter
 *                        leaves out must not pass for the main thread's either
 *
 * messages[i] is the i-th message the receiver got (2*COUNT in send mode,
 * COUNT in recv mode): received holds the fd it got (none when the kernel
 * saw no control buffer on either side), sent names the sender by the
 * data byte: [{"fd": -1, "ino": 'a' or 'b', "dev": 0}].
 */
#include "truth.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/wait.h>

static const char *mode;
static int count, nmsg, A, B, sv[2];
static struct msgrec *msgs;
static long tid_recv, tid_hider;
static atomic_int stop;
static struct onefd hidden_send, hidden_recv;

static void *flipper(void *arg)
{
    struct msghdr *m = arg;
    size_t full = m->msg_controllen;
    volatile size_t *len = &m->msg_controllen;
    for (unsigned k = 0; !atomic_load_explicit(&stop, memory_order_relaxed); k++)
        *len = k & 1 ? full : 0;
    return NULL;
}

static void *receiver(void *arg)
{
    (void)arg;
    tid_recv = gettid();
    int raced = strcmp(mode, "recv") == 0;
    for (int i = 0; i < nmsg; i++) {
        struct onefd local, *in = raced ? &hidden_recv : &local;
        if (!raced)
            onefd_init(in, 0, -1);
        in->m.msg_flags = 0;
        ssize_t n = recvmsg(sv[1], &in->m, 0);
        if (n != 1)
            die("recvmsg %d: %s", i, n < 0 ? strerror(errno) : "no byte");
        msgs[i].nsent = 1;
        msgs[i].sent[0] = (struct fdrec){-1, (unsigned long long)in->data, 0};
        /* The flipper may have zeroed msg_controllen after the kernel wrote
         * it back: read the control buffer itself (a received fd's cmsg). */
        struct cmsghdr *c = &in->ctrl.align;
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int))) {
            int fd;
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
            msgs[i].nrecv = 1;
            msgs[i].recv[0] = stat_fd(fd);
            close(fd);
        }
        memset(&in->ctrl, 0, sizeof in->ctrl);
    }
    return NULL;
}

static void *hider(void *arg)
{
    (void)arg;
    tid_hider = gettid();
    for (int i = 0; i < count; i++)
        if (sendmsg(sv[0], &hidden_send.m, 0) != 1)
            die("hidden sendmsg %d: %s", i, strerror(errno));
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3 || (count = atoi(argv[2])) < 1)
        die("usage: %s send|recv COUNT", argv[0]);
    mode = argv[1];
    int ns_mode = strcmp(mode, "ns") == 0;
    int send_mode = strcmp(mode, "send") == 0 || ns_mode;
    if (!send_mode && strcmp(mode, "recv") != 0)
        die("bad mode: %s", mode);
    nmsg = send_mode ? 2 * count : count;
    if ((A = open("/etc/shadow", O_RDONLY)) < 0 || (B = open("/dev/null", O_RDONLY)) < 0)
        die("open: %s", strerror(errno));
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair: %s", strerror(errno));
    if (!(msgs = calloc(nmsg, sizeof *msgs)))
        die("out of memory");
    onefd_init(&hidden_send, 'b', B);
    onefd_init(&hidden_recv, 0, -1);
    pthread_t rt, ht = 0, ft;
    pid_t child = 0;
    if (ns_mode) {
        int ready[2];
        char c;
        if (pipe(ready) != 0 || (child = fork()) < 0)
            die("fork: %s", strerror(errno));
        if (child == 0) {
            if (unshare(CLONE_NEWNS) != 0)
                die("unshare: %s", strerror(errno));
            if (write(ready[1], "x", 1) != 1)
                die("pipe");
            hider(NULL);
            _exit(0);
        }
        if (read(ready[0], &c, 1) != 1)
            die("the hider child did not start");
        tid_hider = child;
    }
    if ((!ns_mode && pthread_create(&ft, NULL, flipper, send_mode ? &hidden_send.m : &hidden_recv.m) != 0) ||
        pthread_create(&rt, NULL, receiver, NULL) != 0 ||
        (send_mode && !ns_mode && pthread_create(&ht, NULL, hider, NULL) != 0))
        die("pthread_create");
    struct onefd out;
    onefd_init(&out, 'a', A);
    for (int i = 0; i < count; i++)
        if (sendmsg(sv[0], &out.m, 0) != 1)
            die("sendmsg %d: %s", i, strerror(errno));
    int status;
    if ((ht && pthread_join(ht, NULL) != 0) || pthread_join(rt, NULL) != 0 ||
        (child && (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)))
        die("pthread_join or waitpid");
    atomic_store(&stop, 1);
    if (!ns_mode && pthread_join(ft, NULL) != 0)
        die("pthread_join");
    struct fdrec a = stat_fd(A), b = stat_fd(B);
    char extra[256];
    snprintf(extra, sizeof extra, "\"tid_hider\": %ld, \"a\": {\"ino\": %llu, \"dev\": %llu}, "
             "\"b\": {\"ino\": %llu, \"dev\": %llu}", tid_hider, a.ino, a.dev, b.ino, b.dev);
    struct truth t = {"X86_64", mode, gettid(), tid_recv, sv[0], sv[1], nmsg, msgs, extra};
    print_truth(&t);
    return 0;
}
