/* Memory tester: dirties guest RAM at a chosen rate and checks that every page still holds what
 * was last written to it. A page that changed behind the guest's back (for example a page a live
 * migration failed to transfer) shows up as a mismatch.
 *
 * Page layout (512 64-bit words): word 0 = page index, word 1 = generation (the pass that wrote
 * it), words 2..511 = a seed derived from (index, generation) xor a per-word constant.
 *
 * With several threads the buffer is cut into contiguous slices, one per thread; each thread
 * sweeps only its slice at rate / threads. Page indexes stay global, so a page that turns up in
 * another slice (or another place in its own) is still caught. A pass of the whole tester counts
 * once every thread has finished that pass over its slice: `passes` is the minimum over threads.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "guestd.h"

#define PAGE_WORDS 512
#define PAGE_BYTES (PAGE_WORDS * 8)
#define BATCH_PAGES 64

struct slice {
    unsigned id;
    uint64_t first, end; /* global page indexes [first, end) */
    atomic_ullong passes;
};

static struct memtest_stats *S;
static uint64_t *buf;
static uint64_t npages;
static struct slice slices[MEMTEST_MAX_THREADS];

static inline uint64_t page_seed(uint64_t idx, uint64_t gen)
{
    return mix64(idx ^ (gen << 40) ^ 0x766d7368696674ULL);
}

static void fill_page(uint64_t *w, uint64_t idx, uint64_t gen)
{
    uint64_t seed = page_seed(idx, gen);
    w[0] = idx;
    w[1] = gen;
    for (uint64_t j = 2; j < PAGE_WORDS; j++)
        w[j] = seed ^ (j * 0x9E3779B97F4A7C15ULL);
}

static int page_ok(const uint64_t *w, uint64_t idx, uint64_t gen)
{
    if (w[0] != idx || w[1] != gen)
        return 0;
    uint64_t seed = page_seed(idx, gen);
    for (uint64_t j = 2; j < PAGE_WORDS; j++)
        if (w[j] != (seed ^ (j * 0x9E3779B97F4A7C15ULL)))
            return 0;
    return 1;
}

/* S->passes = min over threads of their passes; monotonic even when two threads race here. */
static void publish_passes(void)
{
    unsigned long long low = atomic_load(&slices[0].passes);
    for (unsigned t = 1; t < S->threads; t++) {
        unsigned long long p = atomic_load(&slices[t].passes);
        if (p < low)
            low = p;
    }
    unsigned long long cur = atomic_load(&S->passes);
    while (cur < low && !atomic_compare_exchange_weak(&S->passes, &cur, low)) {
    }
}

static void *memtest_loop(void *arg)
{
    struct slice *sl = arg;
    for (uint64_t i = sl->first; i < sl->end; i++)
        fill_page(buf + i * PAGE_WORDS, i, 0);

    /* Pacing: the batch that brings this thread's total to N pages may not end before
     * start + N / (rate / threads). */
    uint64_t pages_per_s = (uint64_t)S->rate_mibps * (1024 * 1024 / PAGE_BYTES);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    uint64_t paced = 0; /* pages done since `start` */

    for (uint64_t gen = 1;; gen++) {
        for (uint64_t i = sl->first; i < sl->end; i++) {
            uint64_t *w = buf + i * PAGE_WORDS;
            if (!page_ok(w, i, gen - 1)) {
                unsigned long long n = atomic_fetch_add(&S->mismatches, 1);
                if (n < 10)
                    logmsg("memtest mismatch: page %llu pass %llu thread %u (found index %llu gen %llu)",
                           (unsigned long long)i, (unsigned long long)gen, sl->id,
                           (unsigned long long)w[0], (unsigned long long)w[1]);
            }
            fill_page(w, i, gen);
            atomic_fetch_add_explicit(&S->pages, 1, memory_order_relaxed);
            if (pages_per_s && ++paced % BATCH_PAGES == 0) {
                struct timespec due = start;
                timespec_add_ns(&due, (uint64_t)((unsigned __int128)paced * 1000000000ULL * S->threads / pages_per_s));
                struct timespec now;
                clock_gettime(CLOCK_MONOTONIC, &now);
                double lag = (double)(now.tv_sec - due.tv_sec) + (double)(now.tv_nsec - due.tv_nsec) / 1e9;
                if (lag > 1.0) { /* fell behind (paused VM, slow vCPU): do not burst to catch up */
                    start = now;
                    paced = 0;
                } else if (lag < 0) {
                    sleep_until(&due);
                }
            }
        }
        atomic_fetch_add(&sl->passes, 1);
        publish_passes();
    }
    return NULL;
}

int memtest_start(struct memtest_stats *st)
{
    S = st;
    npages = (uint64_t)st->size_mib * (1024 * 1024 / PAGE_BYTES);
    if (st->threads < 1 || st->threads > MEMTEST_MAX_THREADS) {
        snprintf(st->error, sizeof st->error, "threads must be 1..%d", MEMTEST_MAX_THREADS);
        return -1;
    }
    void *p = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        snprintf(st->error, sizeof st->error, "cannot allocate %u MiB", st->size_mib);
        return -1;
    }
    madvise(p, npages * PAGE_BYTES, MADV_NOHUGEPAGE); /* 4 KiB dirty granularity, like a real workload */
    buf = p;
    for (unsigned t = 0; t < st->threads; t++) {
        slices[t].id = t;
        slices[t].first = npages * t / st->threads;
        slices[t].end = npages * (t + 1) / st->threads;
        atomic_init(&slices[t].passes, 0);
    }
    for (unsigned t = 0; t < st->threads; t++)
        if (start_thread(memtest_loop, &slices[t], 256 * 1024) < 0) {
            /* The threads already running keep going; `passes` stays 0 without this slice. */
            snprintf(st->error, sizeof st->error, "cannot start memtest thread %u of %u", t + 1, st->threads);
            return -1;
        }
    return 0;
}
