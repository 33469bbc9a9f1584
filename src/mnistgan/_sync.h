/* The few atomics the crew and the plans (_kernels.pyx) need to hand work
 * between two threads without a lock: acquire loads, release stores, a
 * fetch-and-add, a compare-and-swap, and a polite spin. */
#ifndef MNISTGAN_SYNC_H
#define MNISTGAN_SYNC_H

#if defined(_MSC_VER)
#include <windows.h>
typedef volatile long mg_atomic;
static inline long mg_load(mg_atomic *p) { return InterlockedCompareExchange(p, 0, 0); }
static inline void mg_store(mg_atomic *p, long v) { InterlockedExchange(p, v); }
static inline long mg_fetch_add(mg_atomic *p, long v) { return InterlockedExchangeAdd(p, v); }
static inline int mg_cas(mg_atomic *p, long expected, long desired) {
    return InterlockedCompareExchange(p, desired, expected) == expected;
}
static inline void mg_yield(void) { SwitchToThread(); }
#define MG_PAUSE() YieldProcessor()
#else
#include <sched.h>
typedef volatile long mg_atomic;
static inline long mg_load(mg_atomic *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void mg_store(mg_atomic *p, long v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline long mg_fetch_add(mg_atomic *p, long v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
static inline int mg_cas(mg_atomic *p, long expected, long desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline void mg_yield(void) { sched_yield(); }
#if defined(__x86_64__) || defined(__i386__)
#define MG_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define MG_PAUSE() __asm__ __volatile__("yield")
#else
#define MG_PAUSE() ((void)0)
#endif
#endif

/* Wait until *p >= bound, or until *abort is set; returns 0 if aborted.
 * Spins briefly (the other thread is usually microseconds away), then
 * yields the core so that an oversubscribed machine still makes progress. */
static inline int mg_wait_ge(mg_atomic *p, long bound, mg_atomic *abort) {
    int spins = 0;
    while (mg_load(p) < bound) {
        if (mg_load(abort)) return 0;
        if (++spins < 2000) { MG_PAUSE(); } else { mg_yield(); }
    }
    return 1;
}

#endif
