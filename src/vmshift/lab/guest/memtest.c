/* Memory tester: dirties guest RAM at a chosen rate and checks that every page still holds what
 * was last written to it. A page that changed behind the guest's back (for example a page a live
 * migration failed to transfer) shows up as a mismatch.
 *
 * Page layout (512 64-bit words): word 0 = page index, word 1 = generation (the pass that wrote
 * it), words 2..511 = a seed derived from (index, generation) xor a per-word constant.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "guestd.h"

#define PAGE_WORDS 512
#define PAGE_BYTES (PAGE_WORDS * 8)
#define BATCH_PAGES 64

static struct memtest_stats *S;
static uint64_t *buf;
static uint64_t npages;

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

static void *memtest_loop(void *arg)
{
    (void)arg;
    for (uint64_t i = 0; i < npages; i++)
        fill_page(buf + i * PAGE_WORDS, i, 0);

    /* Pacing: the batch that brings the total to N pages may not end before start + N / rate. */
    uint64_t pages_per_s = (uint64_t)S->rate_mibps * (1024 * 1024 / PAGE_BYTES);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    uint64_t paced = 0; /* pages done since `start` */

    for (uint64_t gen = 1;; gen++) {
        for (uint64_t i = 0; i < npages; i++) {
            uint64_t *w = buf + i * PAGE_WORDS;
            if (!page_ok(w, i, gen - 1)) {
                unsigned long long n = atomic_fetch_add(&S->mismatches, 1);
                if (n < 10)
                    logmsg("memtest mismatch: page %llu pass %llu (found index %llu gen %llu)",
                           (unsigned long long)i, (unsigned long long)gen,
                           (unsigned long long)w[0], (unsigned long long)w[1]);
            }
            fill_page(w, i, gen);
            atomic_fetch_add_explicit(&S->pages, 1, memory_order_relaxed);
            if (pages_per_s && ++paced % BATCH_PAGES == 0) {
                struct timespec due = start;
                timespec_add_ns(&due, paced * 1000000000ULL / pages_per_s);
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
        atomic_fetch_add(&S->passes, 1);
    }
    return NULL;
}

int memtest_start(struct memtest_stats *st)
{
    S = st;
    npages = (uint64_t)st->size_mib * (1024 * 1024 / PAGE_BYTES);
    void *p = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        snprintf(st->error, sizeof st->error, "cannot allocate %u MiB", st->size_mib);
        return -1;
    }
    madvise(p, npages * PAGE_BYTES, MADV_NOHUGEPAGE); /* 4 KiB dirty granularity, like a real workload */
    buf = p;
    return start_thread(memtest_loop, NULL, 256 * 1024);
}
