/* forkserver.c - a pre-forking TCP server on 127.0.0.1, for patching every process of a program.
 *
 * argv[1]: the number of workers. The parent listens on a free loopback port, prints "port <p>", forks the
 * workers (each prints "worker <pid>") and then reads stdin: "spawn" forks one more worker (for a child
 * forked after a patch); end of input stops every worker and the parent. Each worker accepts connections and
 * answers each line "<n>" with "<compute(n)>" (n + 1; a patch changes it). A worker dies with the parent
 * (PR_SET_PDEATHSIG), so killing the parent reaps the whole program.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long compute(long n) { return n + 1; }

static void serve(int conn) {
    FILE *in = fdopen(conn, "r+");
    char line[64];
    if (!in) {
        close(conn);
        return;
    }
    while (fgets(line, sizeof line, in)) {
        fprintf(in, "%ld\n", compute(strtol(line, NULL, 10)));
        fflush(in);
    }
    fclose(in);
}

static pid_t spawn(int lfd) {
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(0); /* the parent died before the prctl */
        for (;;) {
            int conn = accept(lfd, NULL, NULL);
            if (conn >= 0) serve(conn);
        }
    }
    printf("worker %d\n", (int)pid);
    fflush(stdout);
    return pid;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 8, lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    pid_t kids[256];
    int nkids = 0;
    char line[64];
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 128)) return 1;
    getsockname(lfd, (struct sockaddr *)&addr, &len);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (int i = 0; i < n && nkids < 256; i++) kids[nkids++] = spawn(lfd);
    while (fgets(line, sizeof line, stdin))
        if (strncmp(line, "spawn", 5) == 0 && nkids < 256) kids[nkids++] = spawn(lfd);
    for (int i = 0; i < nkids; i++) kill(kids[i], SIGKILL);
    for (int i = 0; i < nkids; i++) waitpid(kids[i], NULL, 0);
    return 0;
}
