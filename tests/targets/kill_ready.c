/* kill_ready.c - the hotpatch-ready target of tests/test_kill.py's protocol A tests: built with the flags
 * `hotpatch cflags` prints (-fpatchable-function-entry=16,14), so compute() has 14 NOPs before its entry and
 * two at it (a patchable-entry site, protocol A: no thread is ever stopped for the commit).
 *
 * Four worker threads call compute(x) in a tight loop and check every result: the old 3*x + 1 or the patched
 * 3*x + 2; anything else prints "WRONG x=.. got=.." and ends the process with exit status 3 at once. After
 * every call a thread publishes its call count and whether the result was the patched one (last[i]).
 *
 * Start: "addr compute 0x..", then "ready" once every worker has made a call. Each stdin line "stats" prints
 * "stats old=N new=M" (results seen so far); "probe" prints "probe C:K C:K C:K C:K" (per worker: calls made,
 * and K = 1 when its last result was the patched one, else 0). End of stdin exits with status 0.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define WORKERS 4

__attribute__((noinline, noipa)) long compute(long x) { return 3 * x + 1; }

static atomic_long old_seen, new_seen;
static atomic_ulong last[WORKERS]; /* calls << 1 | patched */
static atomic_int started;

static void *worker(void *arg) {
    long id = (long)arg, x = id << 40, old = 0, new = 0;
    unsigned long calls = 0;
    atomic_fetch_add(&started, 1);
    for (;;) {
        x++;
        long got = compute(x);
        int patched = got == 3 * x + 2;
        if (!patched && got != 3 * x + 1) {
            printf("WRONG x=%ld got=%ld\n", x, got);
            fflush(stdout);
            _exit(3);
        }
        patched ? new++ : old++;
        atomic_store_explicit(&last[id], ++calls << 1 | (unsigned long)patched, memory_order_release);
        if ((calls & 0xffff) == 0) {
            atomic_fetch_add(&old_seen, old);
            atomic_fetch_add(&new_seen, new);
            old = new = 0;
        }
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("addr compute %p\n", (void *)compute);
    pthread_t t[WORKERS];
    for (long i = 0; i < WORKERS; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0)
            return 2;
    while (atomic_load(&started) < WORKERS)
        usleep(1000);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "stats", 5) == 0)
            printf("stats old=%ld new=%ld\n", atomic_load(&old_seen), atomic_load(&new_seen));
        if (strncmp(line, "probe", 5) == 0) {
            unsigned long v[WORKERS];
            for (int i = 0; i < WORKERS; i++)
                v[i] = atomic_load_explicit(&last[i], memory_order_acquire);
            printf("probe %lu:%lu %lu:%lu %lu:%lu %lu:%lu\n", v[0] >> 1, v[0] & 1, v[1] >> 1, v[1] & 1, v[2] >> 1,
                   v[2] & 1, v[3] >> 1, v[3] & 1);
        }
    }
    return 0;
}
