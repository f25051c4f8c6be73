/* Passes the fds of PATH... to itself with io_uring: the kernel runs the
 * sendmsg/recvmsg, no sendmsg(2)/recvmsg(2) system call is ever made.
 *
 *   uring MODE PATH...
 *   inline  IORING_OP_SENDMSG, then IORING_OP_RECVMSG, each run in io_uring_enter
 *   async   the same with IOSQE_ASYNC: both run in an io-wq worker (iou-wrk-PID)
 *   fixed   the same inline, naming both sockets as registered (fixed) files,
 *           so no fd number of a socket appears in either request
 *   skip    the send with IOSQE_CQE_SKIP_SUCCESS: a success posts no CQE (nor
 *           the io_uring_complete tracepoint), so the send is not waited for
 *   zc      IORING_OP_SENDMSG_ZC, then IORING_OP_RECVMSG; prints
 *           {"unsupported": true, ...} when the kernel refuses zero-copy here
 */
#include "truth.h"

#include <liburing.h>

static int nfds, fds[MAXFD];

/* Submits one SQE and returns its CQE's result; for zero-copy sends, also
 * waits for the notification CQE that says the buffers are released. */
static int run_one(struct io_uring *ring)
{
    int ret = io_uring_submit(ring);
    if (ret != 1)
        die("io_uring_submit: %s", strerror(-ret));
    struct io_uring_cqe *cqe;
    if ((ret = io_uring_wait_cqe(ring, &cqe)) != 0)
        die("io_uring_wait_cqe: %s", strerror(-ret));
    int res = cqe->res;
    unsigned more = cqe->flags & IORING_CQE_F_MORE;
    io_uring_cqe_seen(ring, cqe);
    if (more) {
        if ((ret = io_uring_wait_cqe(ring, &cqe)) != 0)
            die("io_uring_wait_cqe (notification): %s", strerror(-ret));
        io_uring_cqe_seen(ring, cqe);
    }
    return res;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        die("usage: %s inline|async|fixed|skip|zc PATH...", argv[0]);
    const char *mode = argv[1];
    int async = strcmp(mode, "async") == 0, zc = strcmp(mode, "zc") == 0, fixed = strcmp(mode, "fixed") == 0,
        skip = strcmp(mode, "skip") == 0;
    if (!async && !zc && !fixed && !skip && strcmp(mode, "inline") != 0)
        die("unknown mode %s", mode);
    nfds = open_paths(argc - 2, argv + 2, fds);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair: %s", strerror(errno));
    struct io_uring ring;
    int ret = io_uring_queue_init(8, &ring, 0);
    if (ret != 0)
        die("io_uring_queue_init: %s", strerror(-ret));
    if (fixed && (ret = io_uring_register_files(&ring, sv, 2)) != 0)
        die("io_uring_register_files: %s", strerror(-ret));
    int send_sock = fixed ? 0 : sv[0], recv_sock = fixed ? 1 : sv[1]; /* fixed: slots 0 and 1 */

    char out_data = 'x', in_data = 0;
    struct iovec out_iov = {&out_data, 1}, in_iov = {&in_data, 1};
    union {
        char buf[CMSG_SPACE(MAXFD * sizeof(int))];
        struct cmsghdr align;
    } out_ctrl, in_ctrl;
    memset(&out_ctrl, 0, sizeof out_ctrl);
    memset(&in_ctrl, 0, sizeof in_ctrl);
    struct msghdr out = {.msg_iov = &out_iov, .msg_iovlen = 1, .msg_control = out_ctrl.buf,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct msghdr in = {.msg_iov = &in_iov, .msg_iovlen = 1, .msg_control = in_ctrl.buf,
                        .msg_controllen = sizeof in_ctrl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&out);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));

    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (zc)
        io_uring_prep_sendmsg_zc(sqe, send_sock, &out, 0);
    else
        io_uring_prep_sendmsg(sqe, send_sock, &out, 0);
    if (async)
        sqe->flags |= IOSQE_ASYNC;
    if (fixed)
        sqe->flags |= IOSQE_FIXED_FILE;
    int res;
    if (skip) {
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
        res = io_uring_submit(&ring) == 1 ? 1 : -EIO; /* a failure would post a CQE: the recv below says */
    } else {
        res = run_one(&ring);
    }
    if (zc && (res == -EINVAL || res == -EOPNOTSUPP)) {
        struct stat st;
        if (fstat(sv[0], &st))
            die("fstat: %s", strerror(errno));
        printf("{\"unsupported\": true, \"mode\": \"zc\", \"error\": \"%s\", \"pid\": %d, "
               "\"send_sock_ino\": %llu}\n", strerror(-res), (int)getpid(), (unsigned long long)st.st_ino);
        return 0;
    }
    if (res != 1)
        die("%s: %s", zc ? "IORING_OP_SENDMSG_ZC" : "IORING_OP_SENDMSG", res < 0 ? strerror(-res) : "short send");

    sqe = io_uring_get_sqe(&ring);
    io_uring_prep_recvmsg(sqe, recv_sock, &in, 0);
    if (async)
        sqe->flags |= IOSQE_ASYNC;
    if (fixed)
        sqe->flags |= IOSQE_FIXED_FILE;
    res = run_one(&ring);
    if (res != 1)
        die("IORING_OP_RECVMSG: %s", res < 0 ? strerror(-res) : "short read");

    struct msgrec rec = {.nsent = nfds};
    for (int i = 0; i < nfds; i++)
        rec.sent[i] = stat_fd(fds[i]);
    rec.nrecv = native_rights(&in, rec.recv);
    struct truth t = {"X86_64", mode, gettid(), gettid(), sv[0], sv[1], 1, &rec, NULL};
    print_truth(&t);
    io_uring_queue_exit(&ring);
    return 0;
}
