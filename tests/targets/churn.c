/* churn.c - threads come and go while hotpatch stops the world (tests/test_churn.py).
 *
 * compute(x) is compute_short_insns.h (3x+1; the patch returns 3x+2). Two checker
 * threads call it in a tight loop; a spawner thread creates short-lived threads, each making 2000 checked
 * calls, and joins them, over and over: clones are under way at any moment of a stop-the-world. Any result
 * other than 3x+1 or 3x+2 prints "WRONG" and exits with status 3. Prints "ready", then, at end of stdin,
 * "stats spawned=N" and exits 0.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

#include "compute_short_insns.h"

static atomic_long spawned;

static void check(int x) {
    int got = compute(x);
    if (got != 3 * x + 1 && got != 3 * x + 2) {
        printf("WRONG x=%d got=%d\n", x, got);
        fflush(stdout);
        _exit(3);
    }
}

static void *checker(void *arg) {
    for (int x = (int)(long)arg;; x = (x + 7) & 0xfffff)
        check(x);
    return NULL;
}

static void *short_lived(void *arg) {
    for (int i = 0, x = (int)(long)arg; i < 2000; i++, x = (x + 3) & 0xfffff)
        check(x);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    for (long n = 0;; n++) {
        pthread_t t[4];
        for (int i = 0; i < 4; i++)
            if (pthread_create(&t[i], NULL, short_lived, (void *)(n * 4 + i)) != 0)
                _exit(2);
        for (int i = 0; i < 4; i++)
            pthread_join(t[i], NULL);
        atomic_fetch_add(&spawned, 4);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (long i = 0; i < 2; i++)
        if (pthread_create(&t, NULL, checker, (void *)(i * 1000)) != 0)
            return 2;
    if (pthread_create(&t, NULL, spawner, NULL) != 0)
        return 2;
    while (atomic_load(&spawned) < 8)
        usleep(1000);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin))
        ;
    printf("stats spawned=%ld\n", atomic_load(&spawned));
    return 0;
}
