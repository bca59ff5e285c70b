/* pair_patch.c - one patch that replaces both pair_a() (x + 10) and pair_b() (x + 20) of sites.c. */
long pair_a(long x) { return x + 100; }
long pair_b(long x) { return x + 200; }
