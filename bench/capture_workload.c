/* Workload for bench/bench_capture.py and tests/test_burst.py: passes one fd
 * per message over a unix socketpair (sendmsg + recvmsg + close: 2 events
 * per transfer) at a fixed rate.
 *
 *   capture_workload RATE TRANSFERS     RATE transfers/s (0: as fast as it can)
 *
 * Prints "ready PID" and waits for a line on stdin (so the collector can
 * attach with --pid first), then runs and prints "done TRANSFERS SECONDS".
 * Pacing is by absolute deadlines checked every 16 transfers, so a late
 * start is caught up and the mean rate is RATE whenever the machine allows;
 * the caller compares SECONDS with TRANSFERS / RATE to see if it did. C, so
 * that the workload costs the CPU the collector needs as little as possible. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s RATE TRANSFERS\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[1]);
    long n = atol(argv[2]);
    int sv[2], fd = open("/etc/passwd", O_RDONLY);
    if (fd < 0 || socketpair(AF_UNIX, SOCK_DGRAM, 0, sv)) {
        perror("capture_workload");
        return 1;
    }
    char byte = 'x', buf[16];
    union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctl, rctl;
    struct iovec iov = {&byte, 1}, riov = {buf, sizeof buf};
    struct msghdr m = {0}, r = {0};
    m.msg_iov = &iov, m.msg_iovlen = 1, m.msg_control = ctl.b, m.msg_controllen = sizeof ctl.b;
    r.msg_iov = &riov, r.msg_iovlen = 1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);

    printf("ready %d\n", getpid());
    fflush(stdout);
    if (!fgets(buf, sizeof buf, stdin))
        return 1;
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        if (rate > 0 && (i & 15) == 0) {
            long long due = t0 + (long long)(i * 1e9 / rate);
            if (now_ns() < due) {
                struct timespec ts = {due / 1000000000LL, due % 1000000000LL};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            }
        }
        if (sendmsg(sv[0], &m, 0) < 0) {
            perror("sendmsg");
            return 1;
        }
        r.msg_control = rctl.b, r.msg_controllen = sizeof rctl.b;
        if (recvmsg(sv[1], &r, 0) < 0) {
            perror("recvmsg");
            return 1;
        }
        struct cmsghdr *rc = CMSG_FIRSTHDR(&r);
        if (rc && rc->cmsg_type == SCM_RIGHTS) {
            int got;
            memcpy(&got, CMSG_DATA(rc), sizeof got);
            close(got);
        }
    }
    printf("done %ld %.3f\n", n, (now_ns() - t0) / 1e9);
    return 0;
}
