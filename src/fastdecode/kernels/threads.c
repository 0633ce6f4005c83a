/* The kernels' threads: run_items(fn, arg, n) calls fn(arg, lo, hi) over chunks of the items
 * 0 .. n-1, on the calling thread and on worker threads, and returns when all n are done. A
 * decoder layer is a sequence of such phases (layer.c).
 *
 * The calling thread drives: it publishes a phase, claims items itself from a shared counter, and
 * waits only for items a worker has claimed and not finished. A worker claims items whenever it
 * runs. So on an idle machine both cores share every phase, and when another process holds a
 * core the caller simply does more of the work itself. (With OpenMP every phase ended in a
 * barrier that waited for every thread: libgomp's spinning waiters then held a core while the
 * awaited thread could not run, and a 15 ms decode step took 1.2 s; sleeping waiters cost a
 * wake-up per barrier, ~300 per step.) A thread with nothing to do spins for SPIN_SECONDS, then
 * sleeps on a futex. Which thread computes an item never changes its result.
 *
 * Claims are made on one 64-bit word, (phase number << 32) | next item, so that a worker that
 * was descheduled in the middle of a claim can never take an item of a later phase for the
 * earlier one's function: its compare-and-swap fails once the phase number has moved on.
 *
 * Threads: $FASTDECODE_THREADS, else $OMP_NUM_THREADS, else the CPUs this process may run on.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#include "kernels.h"

#define MAX_THREADS 64
#define SPIN_SECONDS 50e-6

typedef struct {
    items_fn fn;
    void *arg;
    long n, chunk;
} Phase;

static struct {
    int threads;
    Phase phase[2];               /* phase k is phase[k % 2]: the next one is written while no one can claim it */
    _Atomic unsigned long long claim; /* (phase number << 32) | next unclaimed item */
    atomic_uint published;        /* the phase number, alone (a futex word) */
    atomic_long finished;         /* items of the current phase done */
    atomic_uint done_word;        /* bumped when a phase completes while its caller sleeps (a futex word) */
    atomic_int caller_sleeps;
    atomic_int sleepers;
} pool;

static pthread_once_t started = PTHREAD_ONCE_INIT;
static pthread_mutex_t serial = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static inline void pause_once(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void futex_wait(atomic_uint *word, unsigned value) {
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)word, (void)value;
    sched_yield();
#endif
}

static void futex_wake(atomic_uint *word) {
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Claim and run items of phase `number` until none is left. */
static void work(unsigned number) {
    const Phase *p = &pool.phase[number % 2];
    for (;;) {
        unsigned long long c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((unsigned)(c >> 32) != number)
            return;
        long lo = (long)(c & 0xffffffffu);
        if (lo >= p->n)
            return;
        long hi = lo + p->chunk < p->n ? lo + p->chunk : p->n;
        unsigned long long want = ((unsigned long long)number << 32) | (unsigned long long)hi;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, want, memory_order_acq_rel, memory_order_acquire))
            continue;
        p->fn(p->arg, lo, hi); /* the claim succeeded, so p still describes phase `number` */
        if (atomic_fetch_add(&pool.finished, hi - lo) + (hi - lo) == p->n &&
            atomic_load(&pool.caller_sleeps)) {
            atomic_fetch_add(&pool.done_word, 1);
            futex_wake(&pool.done_word);
        }
    }
}

static void *worker(void *unused) {
    (void)unused;
    unsigned seen = 0;
    for (;;) {
        double until = now() + SPIN_SECONDS;
        for (long i = 0; atomic_load_explicit(&pool.published, memory_order_acquire) == seen; i++) {
            pause_once();
            if ((i & 63) == 63 && now() > until) {
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.published) == seen)
                    futex_wait(&pool.published, seen);
                atomic_fetch_sub(&pool.sleepers, 1);
            }
        }
        seen = atomic_load_explicit(&pool.published, memory_order_acquire);
        work(seen);
    }
    return NULL;
}

static void start(void) {
    const char *env = getenv("FASTDECODE_THREADS");
    if (!env || !*env)
        env = getenv("OMP_NUM_THREADS");
    int n = env && *env ? atoi(env) : 0;
    if (n <= 0) {
#ifdef __linux__
        cpu_set_t set;
        n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
#else
        n = (int)sysconf(_SC_NPROCESSORS_ONLN);
#endif
    }
    pool.threads = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
    for (int i = 1; i < pool.threads; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) {
            pool.threads = i;
            break;
        }
        pthread_detach(t);
    }
}

int kernel_threads(void) {
    pthread_once(&started, start);
    return pool.threads;
}

void run_items(items_fn fn, void *arg, long n, long chunk) {
    if (n <= 0)
        return;
    if (kernel_threads() == 1 || n == 1) { /* nothing to share */
        fn(arg, 0, n);
        return;
    }
    pthread_mutex_lock(&serial);
    unsigned number = atomic_load(&pool.published) + 1;
    pool.phase[number % 2] = (Phase){fn, arg, n, chunk < 1 ? 1 : chunk};
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.claim, (unsigned long long)number << 32, memory_order_release);
    atomic_store(&pool.published, number); /* seq_cst: ordered before the load of sleepers */
    if (atomic_load(&pool.sleepers))
        futex_wake(&pool.published);
    work(number);
    double until = now() + SPIN_SECONDS;
    for (long i = 0; atomic_load_explicit(&pool.finished, memory_order_acquire) < n; i++) {
        pause_once();
        if ((i & 63) == 63 && now() > until) { /* a worker still holds items: sleep until it is done */
            unsigned word = atomic_load(&pool.done_word);
            atomic_store(&pool.caller_sleeps, 1);
            while (atomic_load(&pool.finished) < n) {
                futex_wait(&pool.done_word, word);
                word = atomic_load(&pool.done_word);
            }
            atomic_store(&pool.caller_sleeps, 0);
        }
    }
    pthread_mutex_unlock(&serial);
}
