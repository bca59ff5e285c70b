/* concurrency_patch.c - replaces c_compute and Greeter::compute of concurrency.cc: both return x + 1000.
 * The member function is written in C under its mangled name (an asm label); `self` is `this`. */
long c_compute(long x) { return x + 1000; }

long greeter_compute(const long *self, long x) __asm__("_ZN7Greeter7computeEl");
long greeter_compute(const long *self, long x) { return x + 999 + *self; }
