/* ifunc_strlen.c - libc's strlen (an IFUNC) in use by several threads.
 *
 * Two threads call strlen("hello") in a tight loop; a result other than 5 prints "BAD <n>" and aborts. Each
 * line on stdin makes the main thread print "len <strlen of the probe string "@?hotpatch probe">" (16, or
 * what a patch returns). The pointers are volatile, so gcc cannot compute the lengths at build time.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *volatile probe = "@?hotpatch probe";
static const char *volatile word = "hello";

static void *spin(void *arg) {
    (void)arg;
    for (;;) {
        size_t n = strlen(word);
        if (n != 5) {
            printf("BAD %zu\n", n);
            fflush(stdout);
            abort();
        }
    }
    return NULL;
}

int main(void) {
    pthread_t t[2];
    char line[64];
    printf("len %zu\n", strlen(probe));  /* binds strlen's GOT slot before the threads start */
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, spin, NULL);
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        printf("len %zu\n", strlen(probe));
        fflush(stdout);
    }
    return 0;
}
