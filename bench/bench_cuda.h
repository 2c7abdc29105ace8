/*
 * bench_cuda: `llm-bench --backend cuda`: single-stream pp and tg, aggregate decode at 8, 32 and
 * 128 sequences, and tg against the device-memory bandwidth floor (weight bytes per token / the
 * bandwidth of device-to-device copies measured in the same run). Times are wall clock around
 * calls that return only once the device is done (eng_cuda_forward synchronises); one warm-up,
 * medians of reps. Prints figures, never passes or fails on time.
 */
#ifndef BENCH_CUDA_H
#define BENCH_CUDA_H

/* Returns the process exit code: 0, 1 (model or device failure) or 2 (no CUDA build or device:
 * the message says which). json (may be NULL) gets one JSON line appended. */
int bench_cuda_run(const char *model, int n_pp, int n_tg, int reps, const char *json,
                   const char *label);

#endif
