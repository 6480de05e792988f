"""A softIoc with the nameshim IOC plugin, started as an st.cmd would:

    dlload libnameshim.so            # epicsLoadLibrary: dlopen RTLD_GLOBAL
    dbLoadDatabase base.dbd (+ the PVA server's dbd) + nameshim.dbd
    registerAllRecordDeviceDrivers   # finds nameshimRegistrar by pvar_func_nameshimRegistrar
    dbLoadRecords DB
    iocInit

then the IOC shell (iocsh) reads commands from stdin, and at its end
`epicsExit(0)`, as softIoc's main does (epics-base softMain.cpp).

Usage: plugin_ioc.py epicscorelibs|pvxslibs DB LIBNAMESHIM DBD_DIR
"""

import ctypes
import os
import sys

flavour, db, plugin_lib, plugin_dbd_dir = sys.argv[1:5]
if flavour == "pvxslibs":
    os.environ.setdefault("PVXS_QSRV_ENABLE", "YES")

from epicscorelibs import ioc  # noqa: E402  (after the environment is set)

if flavour == "pvxslibs":
    import pvxslibs.path

    pva_dbd = (("pvxsIoc.dbd", pvxslibs.path.dbd_path),)
    pva_dso = ("pvxslibs.lib.pvxsIoc",)
else:
    pva_dbd = ioc.pva_dbd_load
    pva_dso = ioc.pva_dso_load

# C stdio line-buffered, so iocsh output reaches the log file at once.
libc = ctypes.CDLL(None)
libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), None, 1, 0)  # _IOLBF

# What iocsh's dlload does (it is registered only by base.dbd's registrar).
load = ioc.Com.epicsLoadLibrary
load.restype = ctypes.c_void_p
load.argtypes = [ctypes.c_char_p]
if not load(plugin_lib.encode()):
    sys.exit(f"epicsLoadLibrary {plugin_lib} failed")
ioc.start_ioc(
    dbs=[(db, "")],
    extra_dbd_load=pva_dbd + (("nameshim.dbd", plugin_dbd_dir),),
    extra_dso_load=pva_dso,
)
iocsh = ioc.Com.iocsh
iocsh.argtypes = [ctypes.c_char_p]
iocsh(None)
ioc.Com.epicsExit(0)
