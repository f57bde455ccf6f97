/* Small helpers shared by the daemon's threads. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "guestd.h"

double clock_s(clockid_t clock)
{
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

void timespec_add_ns(struct timespec *t, uint64_t ns)
{
    uint64_t total = (uint64_t)t->tv_nsec + ns;
    t->tv_sec += (time_t)(total / 1000000000ULL);
    t->tv_nsec = (long)(total % 1000000000ULL);
}

void sleep_until(const struct timespec *deadline)
{
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, deadline, NULL) == EINTR) {
    }
}

/* splitmix64 finaliser: a cheap, well-spread function of its input. */
uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static int bound_socket(int type, int port)
{
    int fd = socket(AF_INET6, type | SOCK_CLOEXEC, 0);
    int family = AF_INET6;
    if (fd < 0) { /* kernel without IPv6: fall back to IPv4 only */
        fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
        family = AF_INET;
    }
    if (fd < 0)
        return -1;
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc;
    if (family == AF_INET6) {
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                                 .sin6_addr = IN6ADDR_ANY_INIT};
        rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_ANY)};
        rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    }
    if (rc < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int listen_tcp(int port)
{
    int fd = bound_socket(SOCK_STREAM, port);
    if (fd >= 0 && listen(fd, 512) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int bind_udp(int port)
{
    return bound_socket(SOCK_DGRAM, port);
}

int start_thread(void *(*fn)(void *), void *arg, size_t stack_bytes)
{
    pthread_attr_t attr;
    pthread_t tid;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (stack_bytes)
        pthread_attr_setstacksize(&attr, stack_bytes);
    int rc = pthread_create(&tid, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

void logmsg(const char *fmt, ...)
{
    /* One write per line, prefix included: the init script writes to the same console, and a
     * prefix written on its own could land in front of its line ("ready" seen mid-line). */
    static const char prefix[] = "vmshift-guestd: ";
    char buf[512];
    size_t p = sizeof prefix - 1;
    memcpy(buf, prefix, p);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + p, sizeof buf - p - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = p + ((size_t)n > sizeof buf - p - 2 ? sizeof buf - p - 2 : (size_t)n);
    buf[len++] = '\n';
    fwrite(buf, 1, len, stderr);
    fflush(stderr);
}
