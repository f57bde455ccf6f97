/* TCP echo (one thread per connection, so long-lived clients never block each other) and UDP echo. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "guestd.h"

struct conn {
    int fd;
    struct echo_stats *st;
};

struct listeners {
    int tcp_fd;
    int udp_fd;
    struct echo_stats *st;
};

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void *serve_conn(void *arg)
{
    struct conn *c = arg;
    char buf[16384];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || write_all(c->fd, buf, (size_t)n) < 0)
            break;
    }
    close(c->fd);
    atomic_fetch_sub(&c->st->tcp_active, 1);
    free(c);
    return NULL;
}

static void *tcp_accept_loop(void *arg)
{
    struct listeners *l = arg;
    for (;;) {
        int fd = accept4(l->tcp_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                usleep(10000); /* out of fds or memory: back off instead of spinning */
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        struct conn *c = malloc(sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->st = l->st;
        atomic_fetch_add(&l->st->tcp_active, 1);
        atomic_fetch_add(&l->st->tcp_total, 1);
        if (start_thread(serve_conn, c, 64 * 1024) < 0) {
            atomic_fetch_sub(&l->st->tcp_active, 1);
            close(fd);
            free(c);
        }
    }
    return NULL;
}

static void *udp_loop(void *arg)
{
    struct listeners *l = arg;
    char buf[65536];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        ssize_t n = recvfrom(l->udp_fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
        if (n < 0)
            continue;
        atomic_fetch_add(&l->st->udp_packets, 1);
        sendto(l->udp_fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
    }
    return NULL;
}

int echo_start(int tcp_fd, int udp_fd, struct echo_stats *st)
{
    static struct listeners l;
    l.tcp_fd = tcp_fd;
    l.udp_fd = udp_fd;
    l.st = st;
    if (start_thread(tcp_accept_loop, &l, 128 * 1024) < 0)
        return -1;
    return start_thread(udp_loop, &l, 256 * 1024);
}
