/* faults.c - a target for fault injection (tests/test_faults.py): three threads call compute() in tight loops
 * and check every result (exit 3 with "WRONG" on a value neither the original's nor the patch's); the main
 * thread prints "addr compute 0xADDR" and "ready", then answers each line "X" with "x=X compute=V".
 *
 *   compute(x) = 2x + 1 (the patch: 2x + 2)
 *
 * With the argument "no-mprotect", once its threads run it installs a seccomp filter (seccomp(2),
 * SECCOMP_RET_ERRNO) making every mprotect() of the process fail with EPERM: a policy under which no page
 * ever changes protection. (Installed after start-up: the loader and pthread_create need mprotect.) */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline, noipa)) long compute(long x) {
    long r = x;
    for (int i = 0; i < 2; i++)
        r += x * (i == 0) + (i == 1);
    return r;
}

static void *worker(void *arg) {
    (void)arg;
    for (long i = 0;; i++) {
        long v = compute(i);
        if (v != 2 * i + 1 && v != 2 * i + 2) {
            fprintf(stderr, "WRONG compute(%ld) = %ld\n", i, v);
            _exit(3);
        }
    }
    return NULL;
}

static int forbid_mprotect(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mprotect, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

int main(int argc, char **argv) {
    pthread_t t;
    for (int i = 0; i < 3; i++)
        if (pthread_create(&t, NULL, worker, NULL))
            return 1;
    if (argc > 1 && strcmp(argv[1], "no-mprotect") == 0 && forbid_mprotect()) {
        perror("seccomp");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("addr compute %p\n", (void *)compute);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long x = strtol(line, NULL, 0);
        printf("x=%ld compute=%ld\n", x, compute(x));
    }
    return 0;
}
