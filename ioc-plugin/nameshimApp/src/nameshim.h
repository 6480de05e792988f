/* nameshim.h: the C ABI of nameshim, for running it inside an IOC process.
 *
 * nameshim serves one TCP port that is both an EPICS Channel Access and a
 * PV Access name server and relays the channels it finds to the CA and PVA
 * servers of its network namespace (this IOC's rsrv, QSRV, and any other).
 * These functions run it on a thread of its own; none of them can stop,
 * block or crash the caller: a panic inside is caught and becomes
 * NAMESHIM_E_PANIC, and a stop waits at most 5 seconds.
 *
 * Provided by the Rust static library built with the `ioc-plugin` feature
 * (see ioc-plugin/README.md for the link line). Thread-safe.
 */
#ifndef INC_nameshim_H
#define INC_nameshim_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NAMESHIM_OK (0)
/* --help or --version was printed; nothing was started. */
#define NAMESHIM_PRINTED (1)
/* The options were refused (the reason is printed on stderr). */
#define NAMESHIM_E_OPTIONS (-1)
/* Already running: stop it first. */
#define NAMESHIM_E_RUNNING (-2)
/* Stop or nothing to stop: was not running. */
#define NAMESHIM_E_NOT_RUNNING (-3)
/* The relay thread could not be created. */
#define NAMESHIM_E_THREAD (-4)
/* The relay did not stop within 5 s; its thread was left behind. */
#define NAMESHIM_E_TIMEOUT (-5)
/* A bug: a panic was caught and logged. */
#define NAMESHIM_E_PANIC (-6)
/* A NULL pointer, or options that are not UTF-8. */
#define NAMESHIM_E_ARGUMENT (-7)

typedef struct nameshimStatus {
    int running;          /* 1 between a start and the next stop */
    unsigned int port;    /* the shared CA+PVA TCP port while bound, else 0 */
    int64_t ca_clients;   /* client connections open now, per protocol */
    int64_t pva_clients;
    int64_t ca_channels;  /* channels those clients hold now */
    int64_t pva_channels;
} nameshimStatus;

/* Starts serving. `options` are the options of the nameshim command line
 * as one string, split as a shell would ("--listen 0.0.0.0:5075 --log
 * debug"); NULL or "" means the defaults, and NAMESHIM_* environment
 * variables apply as for the command. Returns NAMESHIM_OK once the relay
 * thread runs; a port that cannot be bound is then logged and retried
 * every 2 s while the IOC runs. */
int nameshim_start(const char *options);

/* Stops serving: returns NAMESHIM_OK once every socket is closed and the
 * thread joined, NAMESHIM_E_NOT_RUNNING if not running, NAMESHIM_E_TIMEOUT
 * after 5 s. */
int nameshim_stop(void);

/* Fills *status; never blocks. */
int nameshim_status(nameshimStatus *status);

#ifdef __cplusplus
}
#endif

#endif /* INC_nameshim_H */
