/* forker.c - a process that forks all the time while tests/test_fork.py patches it: a thread forks children
 * in a loop, each child calls f_pfe (a hotpatch-ready site, protocol A) and compute (an ordinary site whose
 * first 5 bytes are three instructions, protocol R) once, checks the results and exits: 0 when both are the
 * old or the new value, 3 otherwise. A child that has not exited 3 s after its fork is reported ("HUNG pid")
 * and killed, and the process exits 4: a child that inherits a commit's half-done state (a self-loop at an
 * entry, with no program left to end it) hangs there.
 *
 * One more thread sleeps in read(2) (hotpatch borrows an asleep thread to run its commit program).
 * stdout: "ready"; stdin: "stats" prints "stats forks=N", "quit"/EOF exits 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "compute_short_insns.h"

#define NOCLONE __attribute__((noinline, noipa))
__attribute__((patchable_function_entry(16, 14))) NOCLONE long f_pfe(long x) { return x + 2; }

static atomic_long forks;
static int never[2];

static void *sleeper(void *arg) {
    char c;
    (void)arg;
    while (read(never[0], &c, 1) < 0)
        ;
    return NULL;
}

static void *forker(void *arg) {
    (void)arg;
    for (;;) {
        pid_t child = fork();
        if (child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test's process */
            long a = f_pfe(5);
            int b = compute(5);
            _exit((a == 7 || a == 1007) && (b == 16 || b == 17) ? 0 : 3);
        }
        if (child < 0)
            continue;
        struct timespec start, now, nap = {0, 100000};
        clock_gettime(CLOCK_MONOTONIC, &start);
        int status;
        while (waitpid(child, &status, WNOHANG) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec >= 3) {
                printf("HUNG %d\n", child);
                fflush(stdout);
                kill(child, SIGKILL);
                waitpid(child, &status, 0);
                _exit(4);
            }
            nanosleep(&nap, NULL);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("WRONG child status %#x\n", status);
            fflush(stdout);
            _exit(3);
        }
        atomic_fetch_add(&forks, 1);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    char line[64];
    if (pipe(never) != 0)
        return 1;
    pthread_create(&t, NULL, sleeper, NULL);
    pthread_create(&t, NULL, forker, NULL);
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "stats", 5) == 0) {
            printf("stats forks=%ld\n", atomic_load(&forks));
            fflush(stdout);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        }
    }
    return 0;
}
