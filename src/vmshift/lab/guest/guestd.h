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
#define VERIFY_TCP_PORT 7003
#define LATENCY_WINDOW_S 10 /* disklog write latency: max and p99 over this many seconds */
#define LATENCY_SAMPLES 4096
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

/* Result of checking a ring (disk log or disk writer) against what was written to it. */
struct ring_verify {
    unsigned long long from_seq, to_seq; /* the sequence numbers the ring must hold now */
    unsigned long long checked;          /* of them, found intact in their slot */
    unsigned long long missing;          /* slot holds an older record/chunk or nothing */
    unsigned long long corrupt;          /* slot holds something that fails its checks */
    unsigned long long torn;             /* boot scan only: the write in flight at a power cut */
    double ms;
    char error[128];
};

struct diskwrite_stats {
    int enabled;
    char device[64];
    unsigned rate_mibps;            /* 0 = as fast as the disk allows */
    unsigned chunk_kib;
    unsigned long long nslots;      /* chunks the ring holds */
    atomic_ullong durable_seq;      /* last chunk written before an fdatasync that returned */
    atomic_ullong first_seq;        /* first chunk this boot writes (after the boot scan) */
    atomic_ullong bytes_written;    /* since boot */
    atomic_ullong mibps_x100;       /* write rate over the last full second, x100 */
    atomic_ullong window_start_ms;  /* CLOCK_MONOTONIC ms that window began (for a stalled writer) */
    atomic_ullong window_bytes;     /* bytes_written when it began */
    atomic_ullong errors;           /* failed writes or flushes since boot */
    atomic_int scanned;             /* 1 once the boot scan finished (the writer runs after it) */
    struct ring_verify boot;        /* the boot scan's result (stable once scanned) */
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
int disklog_verify(struct ring_verify *out); /* re-reads the ring while the log keeps writing */
int disklog_latency_json(char *out, size_t n);

/* diskwrite.c */
int diskwrite_start(struct diskwrite_stats *st, const char *disklog_device);
int diskwrite_verify(struct ring_verify *out); /* pauses the writer while it re-reads the device */
double diskwrite_mibps(void);

/* guestd.c */
int ring_verify_json(char *out, size_t n, const struct ring_verify *v);
void json_str(char *out, size_t n, const char *s);

#endif
