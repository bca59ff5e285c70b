/* parked.c - a thread parked inside a function, for --consistency stack.
 *
 * stdin commands, one per line:
 *   park S   a new thread calls parked(S): it prints "parked", sleeps S seconds inside parked(), and then
 *            prints "left <value>" (S + 1, or what a patch returns)
 *   call     the main thread prints "value <parked(0)>"
 * never_called() is what its name says: a test may write into it.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline)) long parked(long seconds) {
    if (seconds) {
        printf("parked\n");
        fflush(stdout);
        sleep((unsigned)seconds);
    }
    return seconds + 1;
}

__attribute__((noinline, used)) long never_called(long x) { return x * 3 + 1; }

static void *worker(void *arg) {
    long v = parked((long)arg);
    printf("left %ld\n", v);
    fflush(stdout);
    return NULL;
}

int main(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long s;
        if (sscanf(line, "park %ld", &s) == 1) {
            pthread_t t;
            pthread_create(&t, NULL, worker, (void *)s);
            pthread_detach(t);
        } else {
            printf("value %ld\n", parked(0));
            fflush(stdout);
        }
    }
    return 0;
}
