/* An i386 target for tests/test_i386.py, built with gcc -m32 -pthread at test time.
 *
 * Threads, each in a state an injected system call must leave intact:
 *   main     reads commands from stdin (asleep in read(2) on a pipe);
 *   reader   asleep in read(2) on an internal pipe, prints what arrives;
 *   sleeper  loops on nanosleep(2) of 300 ms (interrupted, it is restarted through restart_syscall);
 *   workers  spin on a computation that checks itself: two copies of an LCG kept in separate registers must
 *            stay equal, and each worker's __thread value must stay its own (the TLS base is %gs on i386).
 * Any broken invariant, failed or short call sets bad=1.
 *
 * Start-up output: "tid NAME TID" per thread, "addr NAME 0xADDR" for counter, compute, printf and getpid,
 * then "ready". Commands, one per line:
 *   send TEXT   the reader prints "reader got TEXT"
 *   report      "report bad=B sleeps=S n0=.. n1=.." (n: iterations of each worker)
 *   call X      "compute=<compute(X)>"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NWORKERS 2

int counter = 5;
static __thread unsigned tls_id;
static volatile int bad;
static volatile unsigned long counts[NWORKERS];
static volatile unsigned long sleeps;
static int pipe_fds[2];
static pthread_barrier_t started;

__attribute__((noinline)) int compute(int x) { return 3 * x + 1; }

static void announce(const char *name) {
    printf("tid %s %ld\n", name, (long)syscall(SYS_gettid));
}

static void *worker(void *arg) {
    unsigned id = (unsigned)(uintptr_t)arg;
    unsigned a = id * 7919u + 1, b = a;
    tls_id = id + 100;
    announce("worker");
    pthread_barrier_wait(&started);
    for (;;) {
        a = a * 1103515245u + 12345u;
        __asm__ volatile("" : "+r"(b));
        b = b * 1103515245u + 12345u;
        if (a != b || tls_id != id + 100)
            bad = 1;
        counts[id]++;
    }
    return NULL;
}

static void *reader(void *arg) {
    char buf[256];
    (void)arg;
    tls_id = 1;
    announce("reader");
    pthread_barrier_wait(&started);
    for (;;) {
        ssize_t n = read(pipe_fds[0], buf, sizeof buf - 1);
        if (n <= 0) {
            printf("reader error n=%d errno=%d\n", (int)n, errno);
            bad = 1;
            return NULL;
        }
        buf[n] = 0;
        if (tls_id != 1)
            bad = 1;
        printf("reader got %s\n", buf);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    tls_id = 2;
    announce("sleeper");
    pthread_barrier_wait(&started);
    for (;;) {
        struct timespec ts = {0, 300 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0 || tls_id != 2) {
            printf("sleeper error errno=%d\n", errno);
            bad = 1;
        }
        sleeps++;
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    char line[512];
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(pipe_fds) != 0)
        return 2;
    pthread_barrier_init(&started, NULL, NWORKERS + 3);
    announce("main");
    pthread_create(&t, NULL, reader, NULL);
    pthread_create(&t, NULL, sleeper, NULL);
    for (uintptr_t i = 0; i < NWORKERS; i++)
        pthread_create(&t, NULL, worker, (void *)i);
    pthread_barrier_wait(&started);
    printf("addr counter %p\naddr compute %p\n", (void *)&counter, (void *)compute);
    printf("addr printf %p\naddr getpid %p\n", (void *)printf, (void *)getpid);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin) != NULL) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "send ", 5) == 0) {
            size_t len = strlen(line + 5);
            if (write(pipe_fds[1], line + 5, len) != (ssize_t)len)
                bad = 1;
        } else if (strcmp(line, "report") == 0) {
            char out[256];
            int at = snprintf(out, sizeof out, "report bad=%d sleeps=%lu", bad, sleeps);
            for (int i = 0; i < NWORKERS; i++)
                at += snprintf(out + at, sizeof out - at, " n%d=%lu", i, counts[i]);
            puts(out);
        } else if (strncmp(line, "call ", 5) == 0) {
            printf("compute=%d\n", compute(atoi(line + 5)));
        }
    }
    if (ferror(stdin))
        printf("main read error errno=%d\n", errno);
    return 0;
}
