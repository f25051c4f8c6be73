/* Two senders on one socket by two paths: the main thread sendmsg(2)s A
 * (/etc/shadow) while another thread sends B (/dev/null) over the same
 * socket with io_uring, naming the socket as a registered (fixed) file, so
 * no fd number of it appears in the request. A receiver thread takes every
 * message. Each native send then has io_uring sends queueing lists on its
 * socket while it runs: the probe must not take one of those lists for the
 * native call's own (an event saying it moved B with fd A's number).
 *
 *   mixrace COUNT     COUNT native sends and COUNT io_uring sends (in bursts of
 *                     BURST requests per io_uring_enter); the receiver never
 *                     sleeps (MSG_DONTWAIT in a loop), so no wakeup tells the
 *                     probe which list a send queued before the send's exit
 *
 * messages[i] is the i-th message the receiver got: received is what its
 * fstat found; sent is empty (which sender it came from is what the events
 * say; the test checks each side against the file its path always sends).
 */
#include "truth.h"

#include <liburing.h>
#include <pthread.h>

#define BURST 8

static int count, A, B, sv[2];
static struct msgrec *msgs;
static long tid_recv, tid_uring;

static void *receiver(void *arg)
{
    (void)arg;
    tid_recv = gettid();
    for (int i = 0; i < 2 * count; i++) {
        struct onefd in;
        onefd_init(&in, 0, -1);
        ssize_t n;
        usleep(20); /* let both senders queue behind each other */
        while ((n = recvmsg(sv[1], &in.m, MSG_DONTWAIT)) < 0 && errno == EAGAIN)
            ;
        if (n != 1)
            die("recvmsg %d: %s", i, n < 0 ? strerror(errno) : "no byte");
        msgs[i].nrecv = native_rights(&in.m, msgs[i].recv);
        if (msgs[i].nrecv != 1)
            die("message %d carried %d fds", i, msgs[i].nrecv);
        close(msgs[i].recv[0].fd);
    }
    return NULL;
}

static void *uring_sender(void *arg)
{
    (void)arg;
    tid_uring = gettid();
    struct io_uring ring;
    int ret = io_uring_queue_init(BURST, &ring, 0);
    if (ret != 0)
        die("io_uring_queue_init: %s", strerror(-ret));
    if ((ret = io_uring_register_files(&ring, &sv[0], 1)) != 0)
        die("io_uring_register_files: %s", strerror(-ret));
    struct onefd out;
    onefd_init(&out, 'u', B);
    for (int i = 0; i < count;) {
        int burst = count - i < BURST ? count - i : BURST;
        for (int j = 0; j < burst; j++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            io_uring_prep_sendmsg(sqe, 0, &out.m, 0); /* 0: index 0 of the registered files */
            sqe->flags |= IOSQE_FIXED_FILE;
        }
        if ((ret = io_uring_submit(&ring)) != burst)
            die("io_uring_submit: %s", ret < 0 ? strerror(-ret) : "short");
        for (int j = 0; j < burst; j++, i++) {
            struct io_uring_cqe *cqe;
            if ((ret = io_uring_wait_cqe(&ring, &cqe)) != 0)
                die("io_uring_wait_cqe: %s", strerror(-ret));
            if (cqe->res != 1)
                die("io_uring sendmsg %d: %s", i, cqe->res < 0 ? strerror(-cqe->res) : "short");
            io_uring_cqe_seen(&ring, cqe);
        }
    }
    io_uring_queue_exit(&ring);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2 || (count = atoi(argv[1])) < 1)
        die("usage: %s COUNT", argv[0]);
    if ((A = open("/etc/shadow", O_RDONLY)) < 0 || (B = open("/dev/null", O_RDONLY)) < 0)
        die("open: %s", strerror(errno));
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair: %s", strerror(errno));
    if (!(msgs = calloc(2 * count, sizeof *msgs)))
        die("out of memory");
    pthread_t rt, ut;
    if (pthread_create(&rt, NULL, receiver, NULL) != 0 || pthread_create(&ut, NULL, uring_sender, NULL) != 0)
        die("pthread_create");
    struct onefd out;
    onefd_init(&out, 'n', A);
    for (int i = 0; i < count; i++) {
        ssize_t n = sendmsg(sv[0], &out.m, 0);
        if (n != 1)
            die("sendmsg %d: %s", i, n < 0 ? strerror(errno) : "short");
    }
    if (pthread_join(ut, NULL) != 0 || pthread_join(rt, NULL) != 0)
        die("pthread_join");
    struct fdrec a = stat_fd(A), b = stat_fd(B);
    char extra[256];
    snprintf(extra, sizeof extra, "\"tid_uring\": %ld, \"native_sent\": {\"ino\": %llu, \"dev\": %llu}, "
             "\"uring_sent\": {\"ino\": %llu, \"dev\": %llu}", tid_uring, a.ino, a.dev, b.ino, b.dev);
    struct truth t = {"X86_64", "mixrace", gettid(), tid_recv, sv[0], sv[1], 2 * count, msgs, extra};
    print_truth(&t);
    return 0;
}
