/* clones_patch.c - replaces scaled() of clones.c: 3x + 100 for x >= 0. */
long scaled(long x) { return x < 0 ? -1 : 3 * x + 100; }
