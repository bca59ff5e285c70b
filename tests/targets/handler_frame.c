/* A thread interrupted by a signal while it runs code in an anonymous page (two pages, as the commit
 * program's), whose handler then sleeps until SIGUSR2: its RIP is in libc while the signal frame on its stack
 * holds a RIP inside the page, and rt_sigreturn will jump back there. Prints "page 0xADDR", then
 * "in handler" from the handler (write(2) is async-signal-safe). With an argument, the main thread never
 * enters the page: it sleeps in pause(). */
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t released;

static void on_usr1(int sig) {
    static const char msg[] = "in handler\n";
    (void)sig;
    if (write(1, msg, sizeof msg - 1) < 0)
        _exit(4);
    while (!released)
        pause();
}

static void on_usr2(int sig) {
    (void)sig;
    released = 1;
}

int main(int argc, char **argv) {
    (void)argv;
    unsigned char *page = mmap(NULL, 8192, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return 1;
    page[0] = 0xeb; /* jmp $ */
    page[1] = 0xfe;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("page %p\n", (void *)page);
    if (argc > 1)
        for (;;)
            pause();
    ((void (*)(void))page)();
    return 0;
}
