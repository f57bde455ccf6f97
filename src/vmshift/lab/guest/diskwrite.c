/* Disk writer: large sequential writes over a raw block device (the VM's second disk), as a ring,
 * at a chosen rate or flat out, so a storage migration has a guest that rewrites its disk faster
 * than a mirror drains it — and can prove afterwards that nothing it wrote went missing.
 *
 * The device is cut into 1 MiB chunks; chunk s (from 1) lives in slot (s - 1) % nslots. A chunk is
 * eight header words (magic "VMSHDW01", s, boot id, CLOCK_REALTIME ns, chunk size, 0, 0, checksum)
 * and a payload whose every word is a function of (s, word index), so a stale or misplaced sector
 * is caught, not only a flipped bit. The checksum is a word-wise FNV-1a over the chunk with the
 * checksum word taken as 0. Each chunk is written with O_DIRECT and followed by fdatasync; it is
 * durable (durable_seq) once that returned.
 *
 * The boot scan and a verify read every slot and check it holds the newest chunk that maps to it
 * (the last ring's worth up to the last chunk written). A verify pauses the writer meanwhile (one
 * lock around each chunk's write + flush), so it never sees a chunk half written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "guestd.h"

#define CHUNK_MAGIC 0x3130574448534d56ULL /* "VMSHDW01" little-endian */
#define CHUNK_BYTES (1024 * 1024)
#define CHUNK_WORDS (CHUNK_BYTES / 8)
#define HEAD_WORDS 8
#define SUM_WORD 7
#define MIN_SLOTS 4

enum slot_kind { SLOT_EMPTY, SLOT_OK, SLOT_TORN, SLOT_BAD };

static struct diskwrite_stats *S;
static int fd = -1;
static uint64_t nslots, next_seq = 1, boot_id;
static uint64_t *wbuf, *rbuf; /* aligned for O_DIRECT */
static uint64_t *slot_seq;    /* per slot: the sequence number its header names (scan scratch) */
static uint8_t *slot_kind;
static pthread_mutex_t io_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int full_window; /* 1 once a whole second of writing was counted */

static uint64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static inline uint64_t pattern_seed(uint64_t seq)
{
    return mix64(seq ^ 0x6469736b77726974ULL);
}

static void fill_chunk(uint64_t *w, uint64_t seq)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    w[0] = CHUNK_MAGIC;
    w[1] = seq;
    w[2] = boot_id;
    w[3] = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
    w[4] = CHUNK_BYTES;
    w[5] = w[6] = w[7] = 0;
    uint64_t h = 0xcbf29ce484222325ULL, seed = pattern_seed(seq);
    for (uint64_t i = 0; i < HEAD_WORDS; i++)
        h = (h ^ w[i]) * 0x100000001b3ULL;
    for (uint64_t i = HEAD_WORDS; i < CHUNK_WORDS; i++) {
        w[i] = seed ^ (i * 0x9E3779B97F4A7C15ULL);
        h = (h ^ w[i]) * 0x100000001b3ULL;
    }
    w[SUM_WORD] = h;
}

/* What a slot holds: nothing yet, an intact chunk in its right slot, a chunk whose header is
 * plausible but whose body is not (torn), or anything else. */
static enum slot_kind check_chunk(const uint64_t *w, uint64_t slot, uint64_t *seq)
{
    *seq = w[1];
    int zero = 1;
    for (int i = 0; i < HEAD_WORDS; i++)
        zero &= w[i] == 0;
    if (zero)
        return SLOT_EMPTY;
    if (w[0] != CHUNK_MAGIC || w[4] != CHUNK_BYTES || w[1] == 0 || (w[1] - 1) % nslots != slot)
        return SLOT_BAD;
    uint64_t h = 0xcbf29ce484222325ULL, seed = pattern_seed(w[1]), diff = 0;
    for (uint64_t i = 0; i < HEAD_WORDS; i++)
        h = (h ^ (i == SUM_WORD ? 0 : w[i])) * 0x100000001b3ULL;
    for (uint64_t i = HEAD_WORDS; i < CHUNK_WORDS; i++) {
        diff |= w[i] ^ seed ^ (i * 0x9E3779B97F4A7C15ULL);
        h = (h ^ w[i]) * 0x100000001b3ULL;
    }
    return diff == 0 && h == w[SUM_WORD] ? SLOT_OK : SLOT_TORN;
}

/* Reads every slot and judges it against `last`, the last chunk written (at boot: the highest
 * intact one found). Slot k must hold the newest chunk s <= last with (s - 1) % nslots == k. At
 * boot a torn chunk last + 1 is the write a power cut interrupted: counted as torn, not as bad. */
static int scan(uint64_t *last, int boot, struct ring_verify *v)
{
    double t0 = clock_s(CLOCK_MONOTONIC);
    memset(v, 0, sizeof *v);
    uint64_t max_ok = 0;
    for (uint64_t k = 0; k < nslots; k++) {
        ssize_t n = pread(fd, rbuf, CHUNK_BYTES, (off_t)(k * CHUNK_BYTES));
        if (n != CHUNK_BYTES) {
            snprintf(v->error, sizeof v->error, "cannot read %s slot %llu: %s", S->device,
                     (unsigned long long)k, n < 0 ? strerror(errno) : "short read");
            return -1;
        }
        slot_kind[k] = (uint8_t)check_chunk(rbuf, k, &slot_seq[k]);
        if (slot_kind[k] == SLOT_OK && slot_seq[k] > max_ok)
            max_ok = slot_seq[k];
    }
    uint64_t m = boot ? max_ok : *last;
    *last = m;
    for (uint64_t k = 0; k < nslots; k++) {
        uint64_t expect = m >= k + 1 ? m - (m - (k + 1)) % nslots : 0, seq = slot_seq[k];
        enum slot_kind kind = slot_kind[k];
        if (boot && kind == SLOT_TORN && seq == m + 1)
            v->torn++;
        else if (expect && kind == SLOT_OK && seq == expect)
            v->checked++;
        else if (expect && (kind == SLOT_EMPTY || (kind == SLOT_OK && seq < expect)))
            v->missing++;
        else if (expect || kind != SLOT_EMPTY)
            v->corrupt++;
    }
    v->to_seq = m;
    v->from_seq = m == 0 ? 0 : m > nslots ? m - nslots + 1 : 1;
    v->ms = (clock_s(CLOCK_MONOTONIC) - t0) * 1000;
    return 0;
}

static void fail(const char *what)
{
    snprintf(S->error, sizeof S->error, "%s %s: %s", what, S->device, strerror(errno));
    logmsg("diskwrite: %s", S->error);
}

static int open_device(void)
{
    /* devtmpfs creates the node when virtio_blk probes, which init waited for: a short grace. */
    for (int i = 0; i < 30; i++) {
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
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
        fail("cannot size");
        return -1;
    }
    nslots = size / CHUNK_BYTES;
    S->nslots = nslots;
    if (nslots < MIN_SLOTS) {
        errno = ENOSPC;
        fail("too small (needs 4 MiB):");
        return -1;
    }
    slot_seq = calloc(nslots, sizeof *slot_seq);
    slot_kind = calloc(nslots, 1);
    if (!slot_seq || !slot_kind || posix_memalign((void **)&wbuf, 4096, CHUNK_BYTES) != 0 ||
        posix_memalign((void **)&rbuf, 4096, CHUNK_BYTES) != 0) {
        errno = ENOMEM;
        fail("no buffers for");
        return -1;
    }
    return 0;
}

static void count_rate(uint64_t now)
{
    uint64_t start = atomic_load(&S->window_start_ms);
    if (now - start < 1000)
        return;
    uint64_t bytes = atomic_load(&S->bytes_written), base = atomic_load(&S->window_bytes);
    atomic_store(&S->mibps_x100, (bytes - base) * 100 * 1000 / (now - start) / (1024 * 1024));
    atomic_store(&S->window_bytes, bytes);
    atomic_store(&S->window_start_ms, now);
    atomic_store(&full_window, 1);
}

static void *diskwrite_loop(void *arg)
{
    (void)arg;
    boot_id = mix64((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ 0x6477ULL);
    if (open_device() < 0) {
        atomic_store(&S->scanned, 1);
        return NULL;
    }
    uint64_t last = 0;
    pthread_mutex_lock(&io_lock);
    if (scan(&last, 1, &S->boot) < 0)
        snprintf(S->error, sizeof S->error, "%s", S->boot.error);
    next_seq = last + 1;
    pthread_mutex_unlock(&io_lock);
    atomic_store(&S->durable_seq, last);
    atomic_store(&S->first_seq, next_seq);
    atomic_store(&S->window_start_ms, now_ms());
    atomic_store(&S->scanned, 1);
    logmsg("diskwrite: %s has %llu chunks of 1 MiB; boot scan %llu intact, %llu missing, %llu corrupt, "
           "%llu torn in %.0f ms; writing from %llu at %u MiB/s (0 = flat out)", S->device,
           (unsigned long long)nslots, S->boot.checked, S->boot.missing, S->boot.corrupt, S->boot.torn, S->boot.ms,
           (unsigned long long)next_seq, S->rate_mibps);

    uint64_t period_ns = S->rate_mibps ? 1000000000ULL * CHUNK_BYTES / ((uint64_t)S->rate_mibps << 20) : 0;
    struct timespec due;
    clock_gettime(CLOCK_MONOTONIC, &due);
    for (;;) {
        fill_chunk(wbuf, next_seq);
        pthread_mutex_lock(&io_lock);
        off_t off = (off_t)(((next_seq - 1) % nslots) * CHUNK_BYTES);
        int ok = 0;
        if (pwrite(fd, wbuf, CHUNK_BYTES, off) != CHUNK_BYTES)
            fail("cannot write");
        else if (fdatasync(fd) < 0) /* O_DIRECT skips the page cache, not the disk's write cache */
            fail("cannot flush");
        else
            ok = 1;
        if (ok) {
            atomic_store(&S->durable_seq, next_seq);
            next_seq++;
        }
        pthread_mutex_unlock(&io_lock);
        if (ok) {
            atomic_fetch_add(&S->bytes_written, CHUNK_BYTES);
        } else {
            atomic_fetch_add(&S->errors, 1);
            usleep(100000); /* a failing disk: retry the same chunk, without spinning */
        }
        count_rate(now_ms());
        if (period_ns) {
            timespec_add_ns(&due, period_ns);
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec > due.tv_sec + 1) /* far behind (paused VM or verify): restart the schedule */
                due = now;
            sleep_until(&due);
        }
    }
    return NULL;
}

int diskwrite_start(struct diskwrite_stats *st, const char *disklog_device)
{
    S = st;
    S->chunk_kib = CHUNK_BYTES / 1024;
    if (disklog_device && !strcmp(disklog_device, S->device)) {
        snprintf(S->error, sizeof S->error, "%s is the disk log's device; give diskwrite another", S->device);
        logmsg("diskwrite: %s", S->error);
        atomic_store(&S->scanned, 1);
        return -1;
    }
    return start_thread(diskwrite_loop, NULL, 256 * 1024);
}

int diskwrite_verify(struct ring_verify *out)
{
    memset(out, 0, sizeof *out);
    if (!S || !S->enabled) {
        snprintf(out->error, sizeof out->error, "diskwrite is off");
        return -1;
    }
    if (fd < 0 || !atomic_load(&S->scanned)) {
        snprintf(out->error, sizeof out->error, "%s", S->error[0] ? S->error : "boot scan still running");
        return -1;
    }
    pthread_mutex_lock(&io_lock);
    uint64_t last = next_seq - 1;
    int rc = scan(&last, 0, out);
    pthread_mutex_unlock(&io_lock);
    return rc;
}

double diskwrite_mibps(void)
{
    uint64_t start = atomic_load(&S->window_start_ms), now = now_ms();
    if (start == 0 || now <= start)
        return 0;
    /* Before the first full second, or with the writer stuck: what it wrote since the window began. */
    if (!atomic_load(&full_window) || now - start > 2000)
        return (double)(atomic_load(&S->bytes_written) - atomic_load(&S->window_bytes)) * 1000.0 /
               (double)(now - start) / (1024 * 1024);
    return (double)atomic_load(&S->mibps_x100) / 100.0;
}
