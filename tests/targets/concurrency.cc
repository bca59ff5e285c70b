/* concurrency.cc - 8 threads call a C function and a C++ member function in tight loops while
 * tests/test_concurrency.py applies and reverts a patch of both, many times.
 *
 *   c_compute(x)          old: x + 1    patched: x + 1000
 *   Greeter::compute(x)   old: x + 1    patched: x + 1000   (this->one == 1)
 *
 * Every result is checked: anything but the old or the new value prints "WRONG ..." on stderr and exits
 * with status 3 (C function) or 4 (member function). Each thread counts the old and new values it saw and
 * the number of times the value switched between old and new ("flips"). The worker threads run at nice 19
 * (the main thread at the caller's priority), so a tool can keep up on a machine with few cores.
 *
 * stdout: "ready" once all threads run. stdin commands: "stats" prints the running totals; "quit" (or EOF)
 * stops the threads, prints the final totals and exits 0. Totals line:
 *   stats c_old=N c_new=N c_flips=N m_old=N m_new=N m_flips=N
 */
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOCLONE __attribute__((noinline, noipa))

extern "C" NOCLONE long c_compute(long x) { return x + 1; }

struct Greeter {
    long one;
    NOCLONE long compute(long x);
};

NOCLONE long Greeter::compute(long x) { return x + one; }

enum { THREADS = 8, OLD = 1, NEW = 1000 };

struct alignas(64) Counters {
    std::atomic<long> c_old{0}, c_new{0}, c_flips{0}, m_old{0}, m_new{0}, m_flips{0};
};

static Counters counters[THREADS];
static std::atomic<bool> stop{false};
static std::atomic<int> running{0};

static inline void bump(std::atomic<long> &c) { c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }

static void worker(int id) {
    Counters &k = counters[id];
    Greeter g{1};
    int c_last = 0, m_last = 0;  // 0 = none yet, 1 = old, 2 = new
    // nice 19 for this thread only: on a 2-core machine 8 spinning threads at normal priority starve the
    // tool (and this process's main thread, which it uses for injected syscalls) of CPU time
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    running.fetch_add(1);
    for (long i = (long)id << 40; !stop.load(std::memory_order_relaxed); i++) {
        long v = c_compute(i);
        int now = v == i + OLD ? 1 : v == i + NEW ? 2 : 0;
        if (!now) {
            fprintf(stderr, "WRONG c_compute(%ld) = %ld in thread %d\n", i, v, id);
            _exit(3);
        }
        bump(now == 1 ? k.c_old : k.c_new);
        if (c_last && now != c_last) bump(k.c_flips);
        c_last = now;

        v = g.compute(i);
        now = v == i + OLD ? 1 : v == i + NEW ? 2 : 0;
        if (!now) {
            fprintf(stderr, "WRONG Greeter::compute(%ld) = %ld in thread %d\n", i, v, id);
            _exit(4);
        }
        bump(now == 1 ? k.m_old : k.m_new);
        if (m_last && now != m_last) bump(k.m_flips);
        m_last = now;
    }
}

static void print_stats() {
    long t[6] = {0, 0, 0, 0, 0, 0};
    for (auto &k : counters) {
        t[0] += k.c_old.load(); t[1] += k.c_new.load(); t[2] += k.c_flips.load();
        t[3] += k.m_old.load(); t[4] += k.m_new.load(); t[5] += k.m_flips.load();
    }
    printf("stats c_old=%ld c_new=%ld c_flips=%ld m_old=%ld m_new=%ld m_flips=%ld\n",
           t[0], t[1], t[2], t[3], t[4], t[5]);
}

int main() {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::vector<std::thread> threads;
    for (int i = 0; i < THREADS; i++) threads.emplace_back(worker, i);
    while (running.load() < THREADS) usleep(1000);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4) != 0) {
        if (strncmp(line, "stats", 5) == 0) print_stats();
    }
    stop.store(true);
    for (auto &t : threads) t.join();
    print_stats();
    return 0;
}
