/* Disk log: fixed-size records appended to a raw block device, one flush per record.
 *
 * Slot k of the device (slot size = the device's logical block size, at least 512 bytes) holds
 * the record whose sequence number s (from 1) satisfies (s - 1) % nslots == k, so the log is a ring that wraps
 * after nslots records. A record is durable once the fdatasync after its write returned; the
 * status reports that number, and after any migration or power cut every record up to it must
 * still read back intact. At start the device is scanned up to the first never-written slot;
 * disklog_verify re-reads the ring on request while the log keeps writing.
 *
 * Each record's write + fdatasync is timed: the status reports the max and p99 over the last
 * LATENCY_WINDOW_S seconds and the worst since boot, which is what the guest feels of a storage
 * pivot or a switchover (a write blocked meanwhile shows as one long sample, or as inflight_ms).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "guestd.h"

#define REC_MAGIC 0x31474f4c48534d56ULL /* "VMSHLOG1" little-endian */
#define REC_BYTES 512
#define PAYLOAD_BYTES (REC_BYTES - 48)
#define SCAN_CHUNK (1024 * 1024)

struct record {
    uint64_t magic;
    uint64_t seq;
    uint64_t time_ns; /* CLOCK_REALTIME of the write */
    uint64_t boot_id; /* differs per boot of the daemon */
    uint64_t reserved;
    uint8_t payload[PAYLOAD_BYTES];
    uint64_t checksum; /* FNV-1a 64 of every byte before this field */
};
_Static_assert(sizeof(struct record) == REC_BYTES, "record must be 512 bytes");

static struct disklog_stats *S;
static int fd = -1;
static uint64_t slot_bytes, nslots, next_seq = 1, boot_id;
static void *iobuf; /* aligned for O_DIRECT */
static void *vbuf;  /* disklog_verify's own, so it never waits for the writer */
static pthread_mutex_t verify_lock = PTHREAD_MUTEX_INITIALIZER;

/* Latency samples: a ring of the last LATENCY_SAMPLES writes (µs, and the ms they ended). */
static pthread_mutex_t lat_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t lat_us[LATENCY_SAMPLES];
static uint64_t lat_end_ms[LATENCY_SAMPLES];
static uint64_t lat_count, lat_max_us;
static atomic_ullong inflight_since_us; /* CLOCK_MONOTONIC µs the current write began, 0 = none */

static uint64_t fnv1a(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}

static int all_zero(const void *p, size_t n)
{
    const uint64_t *w = p;
    for (size_t i = 0; i < n / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

static int record_valid(const struct record *r, uint64_t slot)
{
    return r->magic == REC_MAGIC && r->seq > 0 && (r->seq - 1) % nslots == slot &&
           r->checksum == fnv1a(r, offsetof(struct record, checksum));
}

static void fail(const char *what)
{
    snprintf(S->error, sizeof S->error, "%s %s: %s", what, S->device, strerror(errno));
    logmsg("disklog: %s", S->error);
}

static int open_device(void)
{
    /* devtmpfs creates the node when virtio_blk probes; allow it a moment after boot. */
    for (int i = 0; i < 100; i++) {
        fd = open(S->device, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (fd >= 0 || errno != ENOENT)
            break;
        usleep(100000);
    }
    if (fd < 0) {
        fail("cannot open");
        return -1;
    }
    uint64_t size = 0;
    int lbs = 512;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || ioctl(fd, BLKSSZGET, &lbs) < 0) {
        fail("cannot size");
        return -1;
    }
    slot_bytes = lbs > REC_BYTES ? (uint64_t)lbs : REC_BYTES;
    nslots = size / slot_bytes;
    if (nslots < 2) {
        errno = ENOSPC;
        fail("too small:");
        return -1;
    }
    if (posix_memalign(&iobuf, 4096, SCAN_CHUNK) != 0) {
        errno = ENOMEM;
        fail("no buffer for");
        return -1;
    }
    return 0;
}

int disklog_scan(struct disklog_stats *st)
{
    S = st;
    boot_id = mix64((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32));
    if (open_device() < 0) {
        atomic_store(&S->scanned, 1);
        return -1;
    }
    uint64_t max_seq = 0, slot = 0;
    int end = 0;
    for (uint64_t off = 0; !end && slot < nslots; off += SCAN_CHUNK) {
        ssize_t n = pread(fd, iobuf, SCAN_CHUNK, (off_t)off);
        if (n <= 0) {
            if (n < 0)
                fail("cannot read");
            break;
        }
        for (uint64_t o = 0; o + slot_bytes <= (uint64_t)n && slot < nslots; o += slot_bytes, slot++) {
            const struct record *r = (const struct record *)((char *)iobuf + o);
            if (all_zero(r, REC_BYTES)) {
                end = 1; /* never written: the log has not reached this far */
                break;
            }
            if (record_valid(r, slot)) {
                atomic_fetch_add(&S->verified_at_boot, 1);
                if (r->seq > max_seq)
                    max_seq = r->seq;
            } else {
                atomic_fetch_add(&S->corrupt_at_boot, 1);
            }
        }
    }
    atomic_store(&S->durable_seq, max_seq);
    next_seq = max_seq + 1;
    atomic_store(&S->first_seq, next_seq);
    atomic_store(&S->scanned, 1);
    logmsg("disklog: %s has %llu slots; found %llu valid and %llu corrupt records, continuing at %llu",
           S->device, (unsigned long long)nslots, (unsigned long long)atomic_load(&S->verified_at_boot),
           (unsigned long long)atomic_load(&S->corrupt_at_boot), (unsigned long long)next_seq);
    return 0;
}

static int write_record(uint64_t seq)
{
    memset(iobuf, 0, slot_bytes);
    struct record *r = iobuf;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    r->magic = REC_MAGIC;
    r->seq = seq;
    r->time_ns = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
    r->boot_id = boot_id;
    for (size_t i = 0; i < PAYLOAD_BYTES / 8; i++) {
        uint64_t v = mix64(seq * PAYLOAD_BYTES + i);
        memcpy(r->payload + i * 8, &v, 8);
    }
    r->checksum = fnv1a(r, offsetof(struct record, checksum));
    off_t off = (off_t)(((seq - 1) % nslots) * slot_bytes);
    if (pwrite(fd, iobuf, slot_bytes, off) != (ssize_t)slot_bytes) {
        fail("cannot write");
        return -1;
    }
    if (fdatasync(fd) < 0) { /* O_DIRECT skips the page cache, not the disk's write cache */
        fail("cannot flush");
        return -1;
    }
    return 0;
}

static uint64_t now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000 + (uint64_t)t.tv_nsec / 1000;
}

static void *disklog_loop(void *arg)
{
    (void)arg;
    uint64_t period_ns = 1000000000ULL / (S->rate_per_s ? S->rate_per_s : 1);
    struct timespec due;
    clock_gettime(CLOCK_MONOTONIC, &due);
    for (;;) {
        uint64_t t0 = now_us();
        atomic_store(&inflight_since_us, t0);
        int rc = write_record(next_seq);
        uint64_t t1 = now_us();
        atomic_store(&inflight_since_us, 0);
        pthread_mutex_lock(&lat_lock);
        uint64_t i = lat_count++ % LATENCY_SAMPLES;
        lat_us[i] = (uint32_t)(t1 - t0 < UINT32_MAX ? t1 - t0 : UINT32_MAX);
        lat_end_ms[i] = t1 / 1000;
        if (t1 - t0 > lat_max_us)
            lat_max_us = t1 - t0;
        pthread_mutex_unlock(&lat_lock);
        if (rc == 0) {
            atomic_store(&S->durable_seq, next_seq);
            next_seq++;
        } else {
            atomic_fetch_add(&S->errors, 1);
        }
        timespec_add_ns(&due, period_ns);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > due.tv_sec + 1) /* far behind (VM was paused): restart the schedule */
            due = now;
        sleep_until(&due);
    }
    return NULL;
}

int disklog_start(struct disklog_stats *st)
{
    S = st;
    if (fd < 0)
        return -1;
    return start_thread(disklog_loop, NULL, 256 * 1024);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

int disklog_latency_json(char *out, size_t n)
{
    static uint32_t win[LATENCY_SAMPLES]; /* only the status thread calls this */
    uint64_t now = now_us(), since = atomic_load(&inflight_since_us), count, boot_max;
    size_t k = 0;
    pthread_mutex_lock(&lat_lock);
    count = lat_count < LATENCY_SAMPLES ? lat_count : LATENCY_SAMPLES;
    for (uint64_t i = 0; i < count; i++)
        if (lat_end_ms[i] + LATENCY_WINDOW_S * 1000 >= now / 1000)
            win[k++] = lat_us[i];
    boot_max = lat_max_us;
    pthread_mutex_unlock(&lat_lock);
    qsort(win, k, sizeof win[0], cmp_u32);
    double max_ms = k ? win[k - 1] / 1000.0 : 0, p99_ms = k ? win[(k * 99 + 99) / 100 - 1] / 1000.0 : 0;
    return snprintf(out, n,
                    "{\"window_s\":%d,\"samples\":%zu,\"max_ms\":%.3f,\"p99_ms\":%.3f,\"max_boot_ms\":%.3f,"
                    "\"inflight_ms\":%.3f}",
                    LATENCY_WINDOW_S, k, max_ms, p99_ms, boot_max / 1000.0,
                    since && now > since ? (now - since) / 1000.0 : 0.0);
}

/* Re-reads the ring while the writer runs: slot k must hold the newest record that maps to it
 * up to durable_seq as read at the start, or a newer one the writer put there since. */
int disklog_verify(struct ring_verify *v)
{
    memset(v, 0, sizeof *v);
    if (!S || !S->enabled || fd < 0) {
        snprintf(v->error, sizeof v->error, "%s", S && S->error[0] ? S->error : "disklog is off");
        return -1;
    }
    pthread_mutex_lock(&verify_lock);
    double t0 = clock_s(CLOCK_MONOTONIC);
    if (!vbuf && posix_memalign(&vbuf, 4096, SCAN_CHUNK) != 0) {
        vbuf = NULL;
        snprintf(v->error, sizeof v->error, "no buffer to verify %s", S->device);
        pthread_mutex_unlock(&verify_lock);
        return -1;
    }
    uint64_t m = atomic_load(&S->durable_seq), used = m < nslots ? m : nslots;
    v->to_seq = m;
    v->from_seq = m == 0 ? 0 : m > nslots ? m - nslots + 1 : 1;
    for (uint64_t slot = 0, off = 0; slot < used; off += SCAN_CHUNK) {
        size_t want = (size_t)((used - slot) * slot_bytes < SCAN_CHUNK ? (used - slot) * slot_bytes : SCAN_CHUNK);
        ssize_t n = pread(fd, vbuf, want, (off_t)off);
        if (n != (ssize_t)want) {
            snprintf(v->error, sizeof v->error, "cannot read %s: %s", S->device, n < 0 ? strerror(errno) : "short");
            break;
        }
        for (uint64_t o = 0; o + slot_bytes <= (uint64_t)n; o += slot_bytes, slot++) {
            const struct record *r = (const struct record *)((char *)vbuf + o);
            uint64_t expect = m - (m - (slot + 1)) % nslots;
            if (record_valid(r, slot) && r->seq >= expect)
                v->checked++;
            else if (all_zero(r, REC_BYTES) || (record_valid(r, slot) && r->seq < expect))
                v->missing++;
            else
                v->corrupt++;
        }
    }
    v->ms = (clock_s(CLOCK_MONOTONIC) - t0) * 1000;
    pthread_mutex_unlock(&verify_lock);
    return v->error[0] ? -1 : 0;
}
