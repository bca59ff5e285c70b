/* Threads calling compute() in loops while real-time signals (which queue, never merge) arrive: every
 * signal sent must be handled exactly once, whatever hotpatch does meanwhile. Prints the count of handled
 * signals when a line arrives on stdin; exits 3 on a wrong compute() result. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile long handled;

__attribute__((noipa)) long compute(long x) {
    long r = x;
    for (int i = 0; i < 3; i++)
        r += (i == 2);
    return r;
}

static void on_signal(int sig) {
    (void)sig;
    __atomic_add_fetch(&handled, 1, __ATOMIC_RELAXED);
}

static void *worker(void *arg) {
    (void)arg;
    for (long i = 0;; i++) {
        long v = compute(i);
        if (v != i + 1 && v != i + 1000) {
            fprintf(stderr, "WRONG %ld -> %ld\n", i, v);
            _exit(3);
        }
    }
    return NULL;
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t t;
    for (int i = 0; i < 3; i++)
        pthread_create(&t, NULL, worker, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin))
        printf("handled %ld\n", __atomic_load_n(&handled, __ATOMIC_RELAXED));
    return 0;
}
