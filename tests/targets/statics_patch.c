/* statics_patch.c - replaces compute() of statics.c using the target's static counter and static helper:
 * counts 10 per call and returns scale(x) + 1000. */
extern long calls;
long scale(long x);

long compute(long x) {
    calls += 10;
    return scale(x) + 1000;
}
