/* sleepers.c - four threads asleep in read(2) on a pipe nobody writes, and compute(x) = 3x+1 placed right after
 * another function's `ret` (no padding before it, so an ordinary site: protocol R). Lets a test see that a
 * rolling check looks at sleeping threads without stopping them (tests/test_inuse.py). With the argument
 * "spin" the four threads spin at nice 19 instead (never calling compute): each must then be stopped to be
 * looked at.
 * Start: "ready"; a line "N" on stdin prints "compute C" with C = compute(N); end of stdin exits with status 0. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* a function whose `ret` is the last byte before compute: no padding there */
#define COMPUTE_PRELUDE \
    "    .globl before_compute\n" \
    "    .type before_compute, @function\n" \
    "before_compute:\n" \
    "    ret\n" \
    "    .size before_compute, .-before_compute\n"
#include "compute_short_insns.h"

static int fds[2];

static void *sleeper(void *arg) {
    char c;
    (void)arg;
    return read(fds[0], &c, 1) < 0 ? NULL : arg;
}

static volatile unsigned long spins;

static void *spinner(void *arg) {
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    for (;;)
        spins++;
    return arg;
}

int main(int argc, char **argv) {
    if (pipe(fds) != 0)
        return 1;
    int spin = argc > 1 && strcmp(argv[1], "spin") == 0;
    pthread_t t;
    for (int i = 0; i < 4; i++)
        pthread_create(&t, NULL, spin ? spinner : sleeper, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin))
        printf("compute %d\n", compute(atoi(line)));
    return 0;
}
