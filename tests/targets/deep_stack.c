#define _GNU_SOURCE
/* Two threads spinning in user space: "deep" (its comm) at the bottom of a recursion 128 KiB deep (more stack than one
 * perf sample copies), "shallow" in its thread function. Prints "ready" once both spin. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile unsigned long spins[2];
static volatile int started;

static void spin(int i) {
    __sync_fetch_and_add(&started, 1);
    for (;;)
        spins[i]++;
}

__attribute__((noinline)) static unsigned long deep(int depth) {
    volatile char frame[4096];
    memset((char *)frame, depth, sizeof frame);
    if (depth == 0)
        spin(0);
    return deep(depth - 1) + frame[depth % sizeof frame];
}

static void *deep_thread(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "deep");
    return (void *)deep(32);
}

static void *shallow_thread(void *arg) {
    (void)arg;
    spin(1);
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, deep_thread, NULL);
    pthread_create(&t, NULL, shallow_thread, NULL);
    while (started < 2)
        usleep(1000);
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
