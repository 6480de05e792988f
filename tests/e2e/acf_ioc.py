"""A softIoc (epicscorelibs or pvxslibs, as `python -m <flavour>.ioc`) with
access security: sets asCheckClientIP and asSetFilename before iocInit, as
`var asCheckClientIP 1` and `asSetFilename("x.acf")` would in a startup script.

  acf_ioc.py FLAVOUR ACF_FILE CHECK_CLIENT_IP(0|1) -d DB
"""

import ctypes
import os
import sys

from epicscorelibs import ioc


def main():
    flavour, acf, check_client_ip = sys.argv[1:4]
    # Both must be set before iocInit: rsrv reads asCheckClientIP for each
    # new client, and asLib resolves HAG host names to addresses at load.
    ctypes.c_int.in_dll(ioc.Com, "asCheckClientIP").value = int(check_client_ip)
    ioc.dbCore.asSetFilename.argtypes = [ctypes.c_char_p]
    ioc.dbCore.asSetFilename(acf.encode())
    sys.argv = [sys.argv[0], *sys.argv[4:]]
    if flavour == "pvxslibs":
        import pvxslibs.path

        os.environ.setdefault("PVXS_QSRV_ENABLE", "YES")
        ioc.main(
            extra_dbd_load=(("pvxsIoc.dbd", pvxslibs.path.dbd_path),),
            extra_dso_load=("pvxslibs.lib.pvxsIoc",),
        )
    else:
        ioc.main()


if __name__ == "__main__":
    main()
