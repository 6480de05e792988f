/* nameshimIoc.c: nameshim as a server layer of the IOC.
 *
 * Registers the iocsh commands nameshimStart, nameshimStop and
 * nameshimReport, registers "nameshim" with dbServer (so `dbsr` lists it
 * and EPICS_IOC_IGNORE_SERVERS can turn it off, as for rsrv and qsrv),
 * starts it when the IOC runs if NAMESHIM_LISTEN is set, and stops it when
 * the IOC shuts down. Modelled on how pvxs ties its server to the IOC
 * (pvxs ioc/iochooks.cpp: a registrar, iocsh commands, an init hook).
 *
 * Nothing here may stop, block or crash the IOC: every call into nameshim
 * returns an error code instead (see nameshim.h), and a failure is printed,
 * never fatal.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dbServer.h>
#include <envDefs.h>
#include <epicsStdio.h>
#include <initHooks.h>
#include <iocsh.h>

#include <epicsExport.h>

#include "nameshim.h"

#define SERVER_NAME "nameshim"

/* Set once by the registrar: whether EPICS_IOC_IGNORE_SERVERS names us. */
static int ignored;

/* The same word match as dbRegisterServer (epics-base dbServer.c): the
 * name counts only as a whole space-separated word of the list. */
static int ignoredByEnvironment(void)
{
    const char *list = envGetConfigParamPtr(&EPICS_IOC_IGNORE_SERVERS);
    size_t len = strlen(SERVER_NAME);
    const char *found;

    while (list && (found = strstr(list, SERVER_NAME))) {
        int starts = found == list || found[-1] == ' ';
        int ends = found[len] == '\0' || found[len] == ' ';
        if (starts && ends)
            return 1;
        list = found + len;
    }
    return 0;
}

static const char *describe(int code)
{
    switch (code) {
    case NAMESHIM_OK: return "ok";
    case NAMESHIM_PRINTED: return "printed, not started";
    case NAMESHIM_E_OPTIONS: return "options refused";
    case NAMESHIM_E_RUNNING: return "already running";
    case NAMESHIM_E_NOT_RUNNING: return "not running";
    case NAMESHIM_E_THREAD: return "cannot create its thread";
    case NAMESHIM_E_TIMEOUT: return "did not stop in time";
    case NAMESHIM_E_PANIC: return "internal error (logged)";
    case NAMESHIM_E_ARGUMENT: return "bad argument";
    default: return "unknown error";
    }
}

static void start(const char *options)
{
    int code;

    if (ignored) {
        printf(SERVER_NAME ": not started: ignored per EPICS_IOC_IGNORE_SERVERS\n");
        return;
    }
    code = nameshim_start(options ? options : "");
    if (code != NAMESHIM_OK && code != NAMESHIM_PRINTED)
        fprintf(stderr, SERVER_NAME ": not started: %s\n", describe(code));
}

static void stop(void)
{
    int code = nameshim_stop();

    if (code != NAMESHIM_OK)
        fprintf(stderr, SERVER_NAME ": stop: %s\n", describe(code));
}

static void report(unsigned level)
{
    nameshimStatus status;

    (void)level;
    if (nameshim_status(&status) != NAMESHIM_OK) {
        printf(SERVER_NAME ": no status\n");
    } else if (!status.running) {
        printf(SERVER_NAME ": not running\n");
    } else if (!status.port) {
        printf(SERVER_NAME ": running, port not bound (retrying; see the log)\n");
    } else {
        printf(SERVER_NAME ": port %u, clients ca %lld pva %lld, channels ca %lld pva %lld\n",
               status.port,
               (long long)status.ca_clients, (long long)status.pva_clients,
               (long long)status.ca_channels, (long long)status.pva_channels);
    }
}

/* For dbServerStats (iocStats and the like). */
static void stats(unsigned *channels, unsigned *clients)
{
    nameshimStatus status;

    if (nameshim_status(&status) != NAMESHIM_OK || !status.running) {
        memset(&status, 0, sizeof(status));
    }
    if (channels)
        *channels = (unsigned)(status.ca_channels + status.pva_channels);
    if (clients)
        *clients = (unsigned)(status.ca_clients + status.pva_clients);
}

static dbServer server = {
    ELLNODE_INIT, SERVER_NAME,
    report, stats, NULL, /* no client identity: the shim only relays */
    NULL, NULL, NULL, NULL /* started and stopped by init hooks instead */
};

static void initHook(initHookState state)
{
    static int autostarted;

    if (state == initHookAfterIocRunning && !autostarted) {
        /* Once: iocRun after an iocPause announces this again. */
        const char *listen = getenv("NAMESHIM_LISTEN");
        nameshimStatus status;

        autostarted = 1;
        if (listen && *listen && !ignored &&
            nameshim_status(&status) == NAMESHIM_OK && !status.running)
            start(""); /* the options come from NAMESHIM_* variables */
    } else if (state == initHookAtShutdown) {
        /* Before the servers it relays to go away. */
        int code = nameshim_stop();
        if (code != NAMESHIM_OK && code != NAMESHIM_E_NOT_RUNNING)
            fprintf(stderr, SERVER_NAME ": stop: %s\n", describe(code));
    }
}

static const iocshArg startArg0 = {"options", iocshArgString};
static const iocshArg *const startArgs[] = {&startArg0};
static const iocshFuncDef startDef = {"nameshimStart", 1, startArgs
#ifdef IOCSHFUNCDEF_HAS_USAGE
    , "Start nameshim with the options of its command line, e.g.\n"
      "  nameshimStart \"--listen 0.0.0.0:5075\"\n"
      "  nameshimStart \"--help\"\n"
#endif
};
static void startCall(const iocshArgBuf *args) { start(args[0].sval); }

static const iocshFuncDef stopDef = {"nameshimStop", 0, NULL
#ifdef IOCSHFUNCDEF_HAS_USAGE
    , "Stop nameshim; returns once its sockets are closed.\n"
#endif
};
static void stopCall(const iocshArgBuf *args) { (void)args; stop(); }

static const iocshFuncDef reportDef = {"nameshimReport", 0, NULL
#ifdef IOCSHFUNCDEF_HAS_USAGE
    , "Print nameshim's port and its client and channel counts.\n"
#endif
};
static void reportCall(const iocshArgBuf *args) { (void)args; report(0); }

static void nameshimRegistrar(void)
{
    static int done;

    if (done)
        return;
    done = 1;
    iocshRegister(&startDef, startCall);
    iocshRegister(&stopDef, stopCall);
    iocshRegister(&reportDef, reportCall);
    ignored = ignoredByEnvironment();
    /* dbRegisterServer prints the "Ignoring" line itself when ignored. */
    if (dbRegisterServer(&server) != 0)
        fprintf(stderr, SERVER_NAME ": cannot register with dbServer\n");
    initHookRegister(initHook);
}

epicsExportRegistrar(nameshimRegistrar);
