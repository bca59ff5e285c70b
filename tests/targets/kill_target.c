/* kill_target.c - the target of tests/test_kill.py: threads call compute() in a tight loop and check it.
 *
 * compute(x) = 3*x + 1 is compute_short_insns.h: three short instructions in the 5 bytes the jump overwrites,
 * so a thread stopped by hotpatch is often inside them. The patch returns 3*x + 2. Every worker thread checks each result: the old or the new value, anything else
 * prints "WRONG x=.. got=.." and ends the process with exit status 3 at once.
 *
 * Start: "addr compute 0x..", then "ready" once every worker has made a call. Each stdin line "stats" prints
 * "stats old=N new=M" (results seen so far); end of stdin exits with status 0.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define WORKERS 4

#include "compute_short_insns.h"

static atomic_long old_seen, new_seen;
static atomic_int started;

static void *worker(void *arg) {
    int x = (int)(long)arg * 1000;
    long old = 0, new = 0;
    atomic_fetch_add(&started, 1);
    for (;;) {
        x = (x + 7) & 0xfffff;
        int got = compute(x);
        if (got == 3 * x + 1) {
            old++;
        } else if (got == 3 * x + 2) {
            new++;
        } else {
            printf("WRONG x=%d got=%d\n", x, got);
            fflush(stdout);
            _exit(3);
        }
        if (((old + new) & 0xffff) == 0) {
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
    }
    return 0;
}
