/* A victim's io_uring receive waits for fds while an attacker parks FLOOD
 * more receives (with control buffers) on an empty socket, more than the
 * probe's table of requests in flight holds; then the victim's message is
 * sent (sendmsg(2)) and received. The probe may refuse to track requests it
 * has no room for (and must count them), but must not forget the victim's.
 *
 *   uringflood FLOOD PATH
 */
#include "truth.h"

#include <liburing.h>

int main(int argc, char **argv)
{
    int flood;
    if (argc != 3 || (flood = atoi(argv[1])) < 1)
        die("usage: %s FLOOD PATH", argv[0]);
    int file = open(argv[2], O_RDONLY);
    if (file < 0)
        die("open %s: %s", argv[2], strerror(errno));
    int victim[2], empty[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, victim) != 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, empty) != 0)
        die("socketpair: %s", strerror(errno));
    struct io_uring_params params = {.flags = IORING_SETUP_CQSIZE, .cq_entries = 2 * (unsigned)flood + 8};
    struct io_uring ring;
    int ret = io_uring_queue_init_params(4096, &ring, &params);
    if (ret != 0)
        die("io_uring_queue_init: %s", strerror(-ret));

    /* Every receive gets its own buffers: the kernel reads them when it runs. */
    struct onefd *slots = calloc(flood + 1, sizeof *slots);
    if (!slots)
        die("out of memory");
    for (int i = 0; i <= flood; i++) {
        struct onefd *s = &slots[i];
        onefd_init(s, 0, -1);
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        if (!sqe) {
            if ((ret = io_uring_submit(&ring)) < 0)
                die("io_uring_submit: %s", strerror(-ret));
            sqe = io_uring_get_sqe(&ring);
        }
        /* slot 0 is the victim's, submitted first; the rest park on the empty socket */
        io_uring_prep_recvmsg(sqe, i == 0 ? victim[1] : empty[1], &s->m, 0);
        io_uring_sqe_set_data64(sqe, (unsigned long long)i);
    }
    if ((ret = io_uring_submit(&ring)) < 0)
        die("io_uring_submit: %s", strerror(-ret));

    struct onefd out;
    onefd_init(&out, 'v', file);
    if (sendmsg(victim[0], &out.m, 0) != 1)
        die("sendmsg: %s", strerror(errno));

    struct io_uring_cqe *cqe;
    if ((ret = io_uring_wait_cqe(&ring, &cqe)) != 0)
        die("io_uring_wait_cqe: %s", strerror(-ret));
    if (io_uring_cqe_get_data64(cqe) != 0 || cqe->res != 1)
        die("the first completion is not the victim's receive (%llu, %d)",
            (unsigned long long)io_uring_cqe_get_data64(cqe), cqe->res);
    io_uring_cqe_seen(&ring, cqe);

    struct msgrec rec = {.nsent = 1};
    rec.sent[0] = stat_fd(file);
    rec.nrecv = native_rights(&slots[0].m, rec.recv);
    struct truth t = {"X86_64", "uringflood", gettid(), gettid(), victim[0], victim[1], 1, &rec, NULL};
    print_truth(&t);
    io_uring_queue_exit(&ring); /* cancels the parked receives */
    return 0;
}
