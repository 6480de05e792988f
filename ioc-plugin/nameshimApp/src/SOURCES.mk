# The C sources of libnameshim, one per line. Read by nameshimApp/src/Makefile
# (EPICS build) and by scripts/build-ioc-plugin (direct build with cc), so the
# two cannot build different files; tests/e2e/test_ioc_plugin.py checks this.
nameshim_SRCS += nameshimIoc.c
