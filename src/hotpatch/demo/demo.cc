// The demo program of `hotpatch demo` (after seed 004's demonstration application): two threads print
// through a C function and a C++ member function; hotpatch replaces both while it runs.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <string_view>
#include <thread>

#define FORCE_NO_INLINE __attribute__((noipa))

FORCE_NO_INLINE void say_hello_fun(int n, std::string_view sv) {
    std::printf("Hello, %.*s %d\n", static_cast<int>(sv.size()), sv.data(), n);
    std::fflush(stdout);
}

class DemoClass {
  public:
    FORCE_NO_INLINE void say_hello(int n, std::string_view sv) {
        std::printf("Hello, %.*s %d\n", static_cast<int>(sv.size()), sv.data(), n);
        std::fflush(stdout);
    }
};

static std::atomic<bool> running{true};

static void on_term(int) { running = false; }

int main() {
    std::signal(SIGTERM, on_term);
    std::thread c_thread([] {
        while (running) {
            say_hello_fun(42, "from C function!");
            std::this_thread::sleep_for(std::chrono::milliseconds(250));
        }
    });
    std::thread cxx_thread([] {
        DemoClass demo;
        std::this_thread::sleep_for(std::chrono::milliseconds(125));
        while (running) {
            demo.say_hello(42, "from C++ member function!");
            std::this_thread::sleep_for(std::chrono::milliseconds(250));
        }
    });
    c_thread.join();
    cxx_thread.join();
    return 0;
}
