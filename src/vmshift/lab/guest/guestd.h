/* vmshift-guestd: shared declarations.
 *
 * The daemon is the lab guest's workload: echo services a client can probe during a migration,
 * a memory tester that dirties pages at a known rate and verifies every page it rewrites, and a
 * disk log that proves writes acknowledged before a migration or crash are still there after it.
 */
#ifndef VMSHIFT_GUESTD_H
#define VMSHIFT_GUESTD_H

#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define ECHO_TCP_PORT 7000
#define ECHO_UDP_PORT 7001
#define STATUS_TCP_PORT 7002
#define MEMTEST_MAX_THREADS 64

struct memtest_stats {
    int enabled;
    unsigned size_mib;
    unsigned rate_mibps; /* 0 = as fast as the vCPU allows; split evenly between the threads */
    unsigned threads;    /* each owns a contiguous slice of the buffer (1 = one sweep over all) */
    atomic_ullong pages;      /* pages verified and rewritten since start, all threads (monotonic) */
    atomic_ullong passes;     /* sweeps every thread has completed over its slice (min over threads) */
    atomic_ullong mismatches; /* pages whose content was not what was last written */
    char error[128];
};

struct disklog_stats {
    int enabled;
    char device[64];
    unsigned rate_per_s;
    atomic_ullong durable_seq;      /* last sequence number whose fdatasync returned */
    atomic_ullong first_seq;        /* first sequence number written by this boot */
    atomic_ullong verified_at_boot; /* valid records found by the boot scan */
    atomic_ullong corrupt_at_boot;  /* records with a bad magic, checksum or slot */
    atomic_ullong errors;           /* failed writes or flushes since boot */
    atomic_int scanned;             /* 1 once the boot scan finished */
    char error[128];
};

struct echo_stats {
    atomic_ullong tcp_active;
    atomic_ullong tcp_total;
    atomic_ullong udp_packets;
};

/* util.c */
double clock_s(clockid_t clock);
void sleep_until(const struct timespec *deadline);
void timespec_add_ns(struct timespec *t, uint64_t ns);
uint64_t mix64(uint64_t x);
int listen_tcp(int port);
int bind_udp(int port);
int start_thread(void *(*fn)(void *), void *arg, size_t stack_bytes);
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* echo.c */
int echo_start(int tcp_fd, int udp_fd, struct echo_stats *st);

/* memtest.c */
int memtest_start(struct memtest_stats *st);

/* disklog.c */
int disklog_scan(struct disklog_stats *st); /* synchronous; call before disklog_start */
int disklog_start(struct disklog_stats *st);

#endif
