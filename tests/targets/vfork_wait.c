/* vfork_wait.c - a thread that cannot be stopped for a while: it calls vfork(), and the child sleeps
 * CHILD_S seconds before _exit. Until then the parent thread waits in the kernel in a killable-only sleep
 * (kernel/fork.c, wait_for_vfork_done), which PTRACE_INTERRUPT does not end. The main thread calls compute()
 * in a loop. stdout: "vfork" just before the vfork, "ready" once the main loop runs; stdin EOF exits 0. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef CHILD_S
#define CHILD_S 6
#endif

__attribute__((noinline)) long compute(long x) { return x * 3 + 1; }

static void *vforker(void *arg) {
    (void)arg;
    printf("vfork\n");
    fflush(stdout);
    pid_t child = vfork();
    if (child == 0) {
        struct timespec ts = {CHILD_S, 0};
        nanosleep(&ts, NULL);
        _exit(0);
    }
    waitpid(child, NULL, 0);
    for (;;) pause();
    return NULL;
}

static void *eof_watch(void *arg) {
    (void)arg;
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    _exit(0);
}

int main(void) {
    pthread_t t, w;
    pthread_create(&w, NULL, eof_watch, NULL);
    pthread_create(&t, NULL, vforker, NULL);
    printf("ready\n");
    fflush(stdout);
    volatile long sink = 0;
    for (long i = 0;; i++) {
        sink += compute(i);
        if ((i & 0xFFFF) == 0) usleep(100);
    }
}
