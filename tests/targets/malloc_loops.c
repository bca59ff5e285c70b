/* malloc_loops.c - the target of tests/test_malloc.py: threads in malloc/free tight loops while hotpatch
 * applies and reverts patches of this program and of libc itself. Built with `hotpatch cflags` (so compute()
 * is a hotpatch-ready, patchable-entry site) and -rdynamic (so a patch of libc can count into hp_* below).
 *
 * MALLOC_THREADS threads: each keeps SLOTS blocks; every step frees a random slot's block (after checking its
 * fill pattern) and puts a new block of a random size there: mostly 1..256 bytes, some up to 16 KiB, and one
 * step in 512 a 160..224 KiB block (above the mmap threshold: mmap/munmap). Malloc, calloc and realloc are
 * used, so blocks cross thread caches, fastbins, small and large bins and arenas. Every block gets
 *     u = malloc_usable_size(p)
 * checked: old (n <= u < n + 1 MiB: realloc keeps a shrunk mmapped block) or patched (the same plus 2^40); anything else, a NULL from malloc, or
 * a block whose fill pattern changed prints "WRONG ..." on stderr and exits 3 at once.
 *
 * COMPUTE_THREADS threads call compute(x) (old 3x+1, patched 3x+7) and check it the same way.
 *
 * Patches of libc may count their calls into hp_malloc_calls, hp_free_calls, hp_calloc_calls (exported by
 * -rdynamic).
 * stdout: "ready" once every thread ran; stdin: "stats" prints
 *     "stats steps=N usable_old=N usable_new=N compute_old=N compute_new=N hp_malloc=N hp_free=N hp_calloc=N"
 * "quit" or EOF stops every thread, frees every block and exits 0. The main thread waits in read(2).
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MALLOC_THREADS 4
#define COMPUTE_THREADS 2
#define SLOTS 64
#define PATCHED (1UL << 40)
#define SLACK (1UL << 20) /* a shrunk mmapped block keeps its pages (glibc realloc) */

long hp_malloc_calls, hp_free_calls, hp_calloc_calls; /* written by patches of libc (atomically) */

__attribute__((noinline, noipa)) long compute(long x) { return 3 * x + 1; }

static atomic_long steps, usable_old, usable_new, compute_old, compute_new;
static atomic_int stop, running;

static void wrong(const char *what, long a, long b) {
    fprintf(stderr, "WRONG %s %ld %ld\n", what, a, b);
    _exit(3);
}

static unsigned long next(unsigned long *s) { /* xorshift64 */
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static size_t pick_size(unsigned long r) {
    if ((r & 511) == 0) return 160 * 1024 + (r >> 20) % (64 * 1024);
    if ((r & 7) == 0) return 257 + (r >> 12) % (16 * 1024);
    return 1 + (r >> 12) % 256;
}

/* the pattern of a block: its first and last bytes and up to 64 at the start hold the tag */
static void fill(unsigned char *p, size_t n, unsigned char tag) {
    memset(p, tag, n < 64 ? n : 64);
    p[n - 1] = tag;
}

static void check(const unsigned char *p, size_t n, unsigned char tag) {
    for (size_t i = 0; i < (n < 64 ? n : 64); i++)
        if (p[i] != tag) wrong("pattern", (long)i, p[i]);
    if (p[n - 1] != tag) wrong("pattern-end", (long)n, p[n - 1]);
}

static int check_usable(void *p, size_t n) {
    size_t u = malloc_usable_size(p);
    if (u >= n && u < n + SLACK) return 0;
    if (u >= PATCHED && u - PATCHED >= n && u - PATCHED < n + SLACK) return 1;
    wrong("usable", (long)n, (long)u);
    return -1;
}

static void *malloc_worker(void *arg) {
    unsigned long seed = 0x9e3779b97f4a7c15UL * ((unsigned long)arg + 1);
    unsigned char *block[SLOTS] = {0};
    size_t size[SLOTS] = {0};
    unsigned char tag[SLOTS] = {0};
    long old = 0, new = 0, n = 0;
    atomic_fetch_add(&running, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned long r = next(&seed);
        int k = (int)(r % SLOTS);
        size_t len = pick_size(next(&seed));
        if (block[k]) check(block[k], size[k], tag[k]);
        switch ((r >> 8) % 4) {
        case 0: /* realloc the old block (it may move), else malloc */
            if (block[k]) {
                size_t keep = size[k] < len ? size[k] : len;
                unsigned char *p = realloc(block[k], len);
                if (!p) wrong("realloc", (long)len, 0);
                check(p, keep < 64 ? keep : 64, tag[k]); /* its kept start */
                block[k] = p;
                break;
            }
            /* fall through */
        case 1:
            free(block[k]);
            block[k] = calloc(1, len);
            if (!block[k]) wrong("calloc", (long)len, 0);
            if (block[k][0] || block[k][len - 1]) wrong("calloc-not-zero", (long)len, 0);
            break;
        default:
            free(block[k]);
            block[k] = malloc(len);
            if (!block[k]) wrong("malloc", (long)len, 0);
        }
        size[k] = len;
        tag[k] = (unsigned char)(r >> 32) | 1;
        fill(block[k], len, tag[k]);
        if (check_usable(block[k], len)) new++;
        else old++;
        if ((++n & 1023) == 0) {
            atomic_fetch_add_explicit(&steps, 1024, memory_order_relaxed);
            atomic_fetch_add_explicit(&usable_old, old, memory_order_relaxed);
            atomic_fetch_add_explicit(&usable_new, new, memory_order_relaxed);
            old = new = 0;
        }
    }
    for (int k = 0; k < SLOTS; k++) free(block[k]);
    return NULL;
}

static void *compute_worker(void *arg) {
    long x = (long)arg << 32, old = 0, new = 0;
    atomic_fetch_add(&running, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        x++;
        long v = compute(x);
        if (v == 3 * x + 1) old++;
        else if (v == 3 * x + 7) new++;
        else wrong("compute", x, v);
        if ((x & 4095) == 0) {
            atomic_fetch_add_explicit(&compute_old, old, memory_order_relaxed);
            atomic_fetch_add_explicit(&compute_new, new, memory_order_relaxed);
            old = new = 0;
        }
    }
    return NULL;
}

int main(void) {
    pthread_t t[MALLOC_THREADS + COMPUTE_THREADS];
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long i = 0; i < MALLOC_THREADS; i++)
        if (pthread_create(&t[i], NULL, malloc_worker, (void *)i)) return 2;
    for (long i = 0; i < COMPUTE_THREADS; i++)
        if (pthread_create(&t[MALLOC_THREADS + i], NULL, compute_worker, (void *)i)) return 2;
    while (atomic_load(&running) < MALLOC_THREADS + COMPUTE_THREADS) usleep(1000);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4) != 0) {
        if (strncmp(line, "stats", 5) == 0)
            printf("stats steps=%ld usable_old=%ld usable_new=%ld compute_old=%ld compute_new=%ld hp_malloc=%ld "
                   "hp_free=%ld hp_calloc=%ld\n",
                   atomic_load(&steps), atomic_load(&usable_old), atomic_load(&usable_new), atomic_load(&compute_old),
                   atomic_load(&compute_new), __atomic_load_n(&hp_malloc_calls, __ATOMIC_RELAXED),
                   __atomic_load_n(&hp_free_calls, __ATOMIC_RELAXED),
                   __atomic_load_n(&hp_calloc_calls, __ATOMIC_RELAXED));
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < MALLOC_THREADS + COMPUTE_THREADS; i++) pthread_join(t[i], NULL);
    return 0;
}
