/* One message with one fd (/etc/shadow), received twice: recvmsg(MSG_PEEK)
 * installs a new fd without consuming the message, the next recvmsg installs
 * another. messages[0].received has both, in that order. */
#include "truth.h"

static void receive(int sock, int flags, struct msgrec *rec)
{
    char d;
    struct iovec iov = {&d, 1};
    union {
        char buf[CMSG_SPACE(MAXFD * sizeof(int))];
        struct cmsghdr align;
    } ctrl;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl.buf, .msg_controllen = sizeof ctrl.buf};
    if (recvmsg(sock, &m, flags) != 1)
        die("recvmsg(flags %#x): %s", flags, strerror(errno));
    if (native_rights(&m, rec->recv + rec->nrecv) != 1)
        die("recvmsg(flags %#x) did not get exactly one fd", flags);
    rec->nrecv++;
}

int main(void)
{
    int fd = open("/etc/shadow", O_RDONLY), sv[2];
    if (fd < 0)
        die("open /etc/shadow: %s", strerror(errno));
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair: %s", strerror(errno));
    char d = 'x';
    struct iovec iov = {&d, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctrl;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl.buf, .msg_controllen = sizeof ctrl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sv[0], &m, 0) != 1)
        die("sendmsg: %s", strerror(errno));

    struct msgrec rec = {.nsent = 1, .sent = {stat_fd(fd)}};
    receive(sv[1], MSG_PEEK, &rec);
    receive(sv[1], 0, &rec);
    if (rec.recv[0].fd == rec.recv[1].fd)
        die("the peek and the read installed the same fd %d", rec.recv[0].fd);
    struct truth t = {"X86_64", "peek", gettid(), gettid(), sv[0], sv[1], 1, &rec, NULL};
    print_truth(&t);
    return 0;
}
