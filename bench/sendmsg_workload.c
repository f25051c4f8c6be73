/* Workload for bench/bench_probes.py: times N sendmsg calls without control
 * data ("plain"), or N SCM_RIGHTS transfers of K fds, sendmsg + recvmsg
 * ("fds"), on a unix socketpair, or N unrelated syscalls, getuid and getpid
 * alternately ("unrelated": what the raw_syscalls programs cost every other
 * syscall); prints nanoseconds per operation. C, so that the interpreter's
 * own cost does not hide the probes' cost. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/syscall.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s plain|fds|unrelated N [K]\n", argv[0]); return 2; }
    int n = atoi(argv[2]), k = argc > 3 ? atoi(argv[3]) : 1, sv[2];
    if (strcmp(argv[1], "unrelated") == 0) {
        double a = now_ns();
        for (int i = 0; i < n; i++)
            syscall(i & 1 ? SYS_getpid : SYS_getuid);
        printf("%.1f\n", (now_ns() - a) / n);
        return 0;
    }
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv)) { perror("socketpair"); return 1; }
    char byte = 'x', buf[16];
    int fds[253];
    for (int i = 0; i < k; i++) fds[i] = open("/etc/passwd", O_RDONLY);
    union { char b[CMSG_SPACE(sizeof(int) * 253)]; struct cmsghdr align; } ctl, rctl;
    struct iovec iov = {&byte, 1}, riov = {buf, sizeof(buf)};
    struct msghdr m = {0}, r = {0};
    m.msg_iov = &iov; m.msg_iovlen = 1;
    r.msg_iov = &riov; r.msg_iovlen = 1;
    int plain = strcmp(argv[1], "plain") == 0;
    if (!plain) {
        m.msg_control = ctl.b; m.msg_controllen = CMSG_SPACE(sizeof(int) * k);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int) * k);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * k);
    }
    double t0 = now_ns(), spent = 0;
    for (int i = 0; i < n; i++) {
        double a = now_ns();
        if (sendmsg(sv[0], &m, 0) < 0) { perror("sendmsg"); return 1; }
        if (plain) {
            spent += now_ns() - a;
            recv(sv[1], buf, sizeof(buf), 0);
            continue;
        }
        r.msg_control = rctl.b; r.msg_controllen = sizeof(rctl.b);
        if (recvmsg(sv[1], &r, 0) < 0) { perror("recvmsg"); return 1; }
        spent += now_ns() - a;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&r); c; c = CMSG_NXTHDR(&r, c)) {
            int cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (int j = 0; j < cnt; j++) close(((int *)CMSG_DATA(c))[j]);
        }
    }
    (void)t0;
    printf("%.1f\n", spent / n);
    return 0;
}
