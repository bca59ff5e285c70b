/* protocols_ready_patch.c - fixed versions of the hotpatch-ready and opportunistic functions of protocols.c
 * only, so apply and revert run protocol A (no stop) under --protocol auto. */
long f_ms(long x) { return x + 1001; }
long f_pfe(long x) { return x + 1002; }
long f_opp(long x) { return x + 1003; }
